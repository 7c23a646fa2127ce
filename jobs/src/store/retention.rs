//! Retention: rows older than `HIVE_RETENTION_DAYS` (node logs, Stripe payloads, reconcile
//! runs) and the short-lived ones past their use (idempotency keys after a day, counted node
//! changes after an hour), pruned by the worker in small batches.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};

use super::idempotency::IDEMPOTENCY_WINDOW;
use super::intent::NODE_CHANGE_WINDOW;
use super::{StoreError, StoreResult};

/// What one prune removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub node_events: u64,
    pub stripe_events: u64,
    /// Old events kept because a subscription names them, their payload (customers' personal
    /// data) emptied.
    pub stripe_payloads_emptied: u64,
    pub reconcile_runs: u64,
    pub idempotency_keys: u64,
    pub node_change_requests: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.node_events
            + self.stripe_events
            + self.stripe_payloads_emptied
            + self.reconcile_runs
            + self.idempotency_keys
            + self.node_change_requests
    }
}

/// Removes at most `batch` rows of each kind older than `retention` (the keys and counted
/// changes older than their own windows). A node's last move before the cutoff is kept: usage
/// reads the state a node was in when a period began from it.
pub async fn prune_expired(pool: &PgPool, retention: Duration, batch: i64) -> StoreResult<Pruned> {
    // An event a subscription names stays, as the row it refers to.
    const NAMED: &str = "EXISTS (SELECT 1 FROM subscriptions s WHERE s.stripe_event_id = e.id)";
    let prune = |sql: String, older_than: Duration| async move {
        Ok::<u64, StoreError>(
            sqlx::query(AssertSqlSafe(sql))
                .bind(older_than)
                .bind(batch)
                .execute(pool)
                .await?
                .rows_affected(),
        )
    };
    Ok(Pruned {
        node_events: prune(
            "DELETE FROM node_events WHERE id IN ( \
                 SELECT e.id FROM node_events e WHERE e.at < now() - $1 \
                 AND NOT (e.kind = 'transition' AND e.id = ( \
                     SELECT max(k.id) FROM node_events k \
                     WHERE k.node_id = e.node_id AND k.kind = 'transition' \
                     AND k.at < now() - $1)) \
                 LIMIT $2)"
                .into(),
            retention,
        )
        .await?,
        stripe_events: prune(
            format!(
                "DELETE FROM stripe_events WHERE id IN ( \
                     SELECT e.id FROM stripe_events e WHERE e.received_at < now() - $1 \
                     AND e.held_reason IS NULL AND NOT {NAMED} LIMIT $2)"
            ),
            retention,
        )
        .await?,
        stripe_payloads_emptied: prune(
            format!(
                "UPDATE stripe_events SET payload = '{{}}'::jsonb WHERE id IN ( \
                     SELECT e.id FROM stripe_events e WHERE e.received_at < now() - $1 \
                     AND e.held_reason IS NULL AND e.payload <> '{{}}'::jsonb AND {NAMED} \
                     LIMIT $2)"
            ),
            retention,
        )
        .await?,
        reconcile_runs: prune(
            "DELETE FROM reconcile_runs WHERE id IN ( \
                 SELECT id FROM reconcile_runs WHERE started_at < now() - $1 LIMIT $2)"
                .into(),
            retention,
        )
        .await?,
        idempotency_keys: prune(
            "DELETE FROM idempotency_keys WHERE (user_id, key) IN ( \
                 SELECT user_id, key FROM idempotency_keys WHERE created_at < now() - $1 \
                 LIMIT $2)"
                .into(),
            IDEMPOTENCY_WINDOW.min(retention),
        )
        .await?,
        node_change_requests: prune(
            "DELETE FROM node_change_requests WHERE ctid IN ( \
                 SELECT ctid FROM node_change_requests WHERE at < now() - $1 LIMIT $2)"
                .into(),
            NODE_CHANGE_WINDOW,
        )
        .await?,
    })
}
