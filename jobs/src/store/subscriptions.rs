//! Subscriptions as Stripe last told us of them, and the nodes that follow them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use uuid::Uuid;

use crate::model::{Desired, EventKind, NodeState, TeardownReason};

use super::{insert_event, lock_counted_nodes, queue, tear_down, CountedNode, StoreResult};

/// A subscription as billing keeps it: whose it is, and the latest Stripe snapshot applied.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SubscriptionState {
    pub id: Uuid,
    pub stripe_subscription_id: String,
    pub stripe_customer_id: Option<String>,
    pub user_id: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    /// Ours: `active`, or `ended` once its nodes are torn down.
    pub status: String,
    pub stripe_status: Option<String>,
    pub status_at: Option<i64>,
    pub status_rank: Option<i32>,
    pub items_at: Option<i64>,
    pub quantity: i32,
    pub price_id: Option<String>,
    pub past_due_since: Option<DateTime<Utc>>,
    pub cancel_at: Option<DateTime<Utc>>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub nodes_entitled: Option<i32>,
    /// Every status snapshot applied, as (Stripe time, tie rank, status), oldest first.
    pub status_history: sqlx::types::Json<Vec<(i64, i32, String)>>,
}

const SUBSCRIPTION_COLUMNS: &str = "id, stripe_subscription_id, stripe_customer_id, user_id, \
    plan, region, status, stripe_status, status_at, status_rank, items_at, quantity, price_id, \
    past_due_since, cancel_at, current_period_start, current_period_end, nodes_entitled, \
    status_history";

/// The subscription Stripe calls `stripe_subscription_id`, created (knowing nothing yet) if
/// this is the first we hear of it, and locked in the caller's transaction: concurrent events
/// of one subscription apply one after the other.
pub async fn lock_subscription(
    tx: &mut Transaction<'_, Postgres>,
    stripe_subscription_id: &str,
    stripe_event_id: &str,
) -> StoreResult<SubscriptionState> {
    // One statement for both cases: a conflicting row is locked by the (no-op) update and
    // returned as it is, a new one is returned as inserted.
    let sql = format!(
        "INSERT INTO subscriptions (id, stripe_subscription_id, stripe_event_id) \
         VALUES ($1, $2, $3) \
         ON CONFLICT (stripe_subscription_id) DO UPDATE \
           SET stripe_subscription_id = subscriptions.stripe_subscription_id \
         RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    Ok(sqlx::query_as::<_, SubscriptionState>(AssertSqlSafe(sql))
        .bind(Uuid::new_v4())
        .bind(stripe_subscription_id)
        .bind(stripe_event_id)
        .fetch_one(&mut **tx)
        .await?)
}

/// Writes back what billing merged into the subscription.
pub async fn save_subscription(
    tx: &mut Transaction<'_, Postgres>,
    sub: &SubscriptionState,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE subscriptions SET stripe_customer_id = $2, user_id = $3, plan = $4, region = $5, \
         status = $6, stripe_status = $7, status_at = $8, status_rank = $9, items_at = $10, \
         quantity = $11, price_id = $12, past_due_since = $13, cancel_at = $14, \
         current_period_end = $15, nodes_entitled = $16, status_history = $17, \
         current_period_start = $18, updated_at = now() WHERE id = $1",
    )
    .bind(sub.id)
    .bind(&sub.stripe_customer_id)
    .bind(&sub.user_id)
    .bind(&sub.plan)
    .bind(&sub.region)
    .bind(&sub.status)
    .bind(&sub.stripe_status)
    .bind(sub.status_at)
    .bind(sub.status_rank)
    .bind(sub.items_at)
    .bind(sub.quantity)
    .bind(&sub.price_id)
    .bind(sub.past_due_since)
    .bind(sub.cancel_at)
    .bind(sub.current_period_end)
    .bind(sub.nodes_entitled)
    .bind(&sub.status_history)
    .bind(sub.current_period_start)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Tears down every node of the subscription (it ended), in the caller's transaction.
pub async fn end_subscription_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    let ids: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM nodes WHERE subscription_id = $1 ORDER BY ordinal")
            .bind(subscription_id)
            .fetch_all(&mut **tx)
            .await?;
    let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
    tear_down(
        tx,
        &ids,
        TeardownReason::SubscriptionEnded,
        "subscription ended",
    )
    .await
}

/// Makes the subscription's nodes (those not going away) want `desired`, suspended at
/// `suspend_at` if given; only nodes whose intent changes are touched, logged and enqueued (a
/// grace end gets its job at that moment, so the worker acts on it unasked). A node its user
/// stopped keeps that (only its grace end is recorded). Returns them.
pub async fn follow_billing(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
    desired: Desired,
    suspend_at: Option<DateTime<Utc>>,
    detail: &str,
) -> StoreResult<Vec<Uuid>> {
    let changed: Vec<(Uuid, i32, String)> = sqlx::query_as(
        "UPDATE nodes SET desired = CASE WHEN desired = $5 THEN desired ELSE $2 END, \
         suspend_at = $3, next_run_at = COALESCE(next_run_at, now()), updated_at = now() \
         WHERE subscription_id = $1 AND desired <> $4 \
           AND ((desired <> $2 AND desired <> $5) OR suspend_at IS DISTINCT FROM $3) \
         RETURNING id, generation, state",
    )
    .bind(subscription_id)
    .bind(desired.as_str())
    .bind(suspend_at)
    .bind(Desired::Gone.as_str())
    .bind(Desired::Stopped.as_str())
    .fetch_all(&mut **tx)
    .await?;
    let mut ids = Vec::with_capacity(changed.len());
    for (id, generation, state) in &changed {
        let step = NodeState::parse(state).unwrap_or(NodeState::Ready);
        let detail = match suspend_at {
            Some(at) => format!("{detail}; suspended at {at} unless paid"),
            None => detail.to_string(),
        };
        insert_event(
            &mut **tx,
            *id,
            *generation,
            step,
            EventKind::Requested,
            Some(&detail),
        )
        .await?;
        ids.push(*id);
    }
    queue::enqueue(tx, &ids, Duration::ZERO).await?;
    if let Some(at) = suspend_at {
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        queue::enqueue(tx, &ids, delay).await?;
    }
    Ok(ids)
}

/// The user's subscriptions (bound to them), newest first, each with how many of its nodes
/// are not going away.
pub async fn user_subscriptions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    subscriptions(db, Some(user_id)).await
}

/// The moves of the user's nodes that tell what they were in `[from, until]`: each node's last
/// move before `from` (the state it began the period in) and its moves within, as (node, when,
/// `from -> to`), in order. Read by period through `node_events_transitions`, never a
/// user's whole history.
pub async fn user_transitions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> StoreResult<Vec<(Uuid, DateTime<Utc>, String)>> {
    Ok(sqlx::query_as(
        "SELECT e.node_id, e.at, e.detail FROM nodes n CROSS JOIN LATERAL ( \
             (SELECT id, node_id, at, detail FROM node_events \
              WHERE node_id = n.id AND kind = $2 AND at < $3 ORDER BY at DESC, id DESC LIMIT 1) \
             UNION ALL \
             (SELECT id, node_id, at, detail FROM node_events \
              WHERE node_id = n.id AND kind = $2 AND at >= $3 AND at <= $4)) e \
         WHERE n.user_id = $1 ORDER BY e.node_id, e.at, e.id",
    )
    .bind(user_id)
    .bind(EventKind::Transition.as_str())
    .bind(from)
    .bind(until)
    .fetch_all(db)
    .await?)
}

/// The user's Stripe customer (of their newest subscription that has one).
pub async fn user_customer(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
) -> StoreResult<Option<String>> {
    let found: Option<(String,)> = sqlx::query_as(
        "SELECT stripe_customer_id FROM subscriptions \
         WHERE user_id = $1 AND stripe_customer_id IS NOT NULL ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await?;
    Ok(found.map(|(c,)| c))
}

/// Subscriptions for the operator (of one user, when given), newest first, with their live
/// node counts.
pub async fn subscriptions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: Option<&str>,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    subscriptions_where(db, "$1::text IS NULL OR user_id = $1", user_id).await
}

/// One subscription by our id or Stripe's, with its live node count.
pub async fn subscription_of(
    db: impl sqlx::PgExecutor<'_>,
    id: &str,
) -> StoreResult<Option<(SubscriptionState, i64)>> {
    let mut found =
        subscriptions_where(db, "id::text = $1 OR stripe_subscription_id = $1", Some(id)).await?;
    Ok(found.pop())
}

/// The subscriptions matching `condition` (on `$1`), newest first, each with how many of its
/// nodes are not going away.
async fn subscriptions_where(
    db: impl sqlx::PgExecutor<'_>,
    condition: &'static str,
    arg: Option<&str>,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        sub: SubscriptionState,
        live: i64,
    }
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS}, (SELECT count(*) FROM nodes n \
           WHERE n.subscription_id = subscriptions.id AND n.desired <> $2) AS live \
         FROM subscriptions WHERE {condition} ORDER BY created_at DESC"
    );
    let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(arg)
        .bind(Desired::Gone.as_str())
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.sub, r.live)).collect())
}

/// The subscription and its nodes that still count (not torn down nor being torn down),
/// oldest first, locked in the caller's transaction.
pub async fn lock_subscription_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Option<(SubscriptionState, Vec<CountedNode>)>> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE");
    let sub: Option<SubscriptionState> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(subscription_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(sub) = sub else {
        return Ok(None);
    };
    let nodes = lock_counted_nodes(tx, subscription_id).await?;
    Ok(Some((sub, nodes)))
}
