//! What the app, billing and the operator ask of nodes: new nodes, their intent, teardowns and
//! replays, each enqueuing the node's job in the same transaction.

use std::time::Duration;

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::model::{Desired, EventKind, NodeState, StripeStatus, TeardownReason};

use super::{insert_event, queue, teardown_states, StoreResult};

/// What the nodes of one subscription share.
pub struct NodeSpec<'a> {
    pub subscription_id: Uuid,
    pub user_id: &'a str,
    pub region: &'a str,
    pub instance_type: &'a str,
    pub volume_gb: i32,
    pub node_domain: &'a str,
}

/// Creates nodes with the given ordinals and enqueues their provisioning, in the caller's
/// transaction. Returns their ids.
pub async fn add_nodes(
    tx: &mut Transaction<'_, Postgres>,
    spec: &NodeSpec<'_>,
    ordinals: std::ops::Range<i32>,
) -> StoreResult<Vec<Uuid>> {
    let ordinals: Vec<i32> = ordinals.collect();
    if ordinals.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = ordinals.iter().map(|_| Uuid::new_v4()).collect();
    let hostnames: Vec<String> = ids
        .iter()
        .map(|id| format!("{id}.{}", spec.node_domain))
        .collect();
    // The nodes and their `created` events in one statement, however many: a checkout's
    // transaction holds one of the api's connections for each of its round trips.
    sqlx::query(
        "WITH added AS ( \
           INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, instance_type, \
             hostname, state, volume_gb) \
           SELECT id, $2, ordinal, $3, $4, $5, hostname, $6, $7 \
           FROM unnest($1::uuid[], $8::int4[], $9::text[]) AS n (id, ordinal, hostname) \
           RETURNING id) \
         INSERT INTO node_events (node_id, generation, step, kind, detail) \
         SELECT id, 0, $6, $10, NULL FROM added",
    )
    .bind(&ids)
    .bind(spec.subscription_id)
    .bind(spec.user_id)
    .bind(spec.region)
    .bind(spec.instance_type)
    .bind(NodeState::Pending.as_str())
    .bind(spec.volume_gb)
    .bind(&ordinals)
    .bind(&hostnames)
    .bind(EventKind::Created.as_str())
    .execute(&mut **tx)
    .await?;
    queue::enqueue_in_region(tx, spec.region, &ids, Duration::ZERO, queue::Priority::Now).await?;
    Ok(ids)
}

/// Sends nodes to teardown from wherever they are, in the caller's transaction: their
/// generation is bumped (so a step in flight cannot commit over it), their intent becomes
/// `gone`, and their jobs are enqueued. Nodes already terminated or being torn down for the
/// same reason are left alone. Returns the nodes sent.
pub async fn tear_down(
    tx: &mut Transaction<'_, Postgres>,
    node_ids: &[Uuid],
    reason: TeardownReason,
    detail: &str,
) -> StoreResult<Vec<Uuid>> {
    let ids: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE nodes SET state = $2, teardown_reason = $3, desired = $4, \
         generation = generation + 1, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         failed_step = NULL, error = NULL, waiting_for = NULL, last_error = NULL, updated_at = now() \
         WHERE id = ANY($1) AND state <> $5 AND teardown_reason IS DISTINCT FROM $3 \
         RETURNING id, generation",
    )
    .bind(node_ids)
    .bind(NodeState::Terminating.as_str())
    .bind(reason.as_str())
    .bind(Desired::Gone.as_str())
    .bind(NodeState::Terminated.as_str())
    .fetch_all(&mut **tx)
    .await?;
    for (id, generation) in &ids {
        insert_event(
            &mut **tx,
            *id,
            *generation,
            NodeState::Terminating,
            EventKind::TeardownRequested,
            Some(detail),
        )
        .await?;
    }
    let ids: Vec<Uuid> = ids.into_iter().map(|(id, _)| id).collect();
    queue::enqueue(tx, &ids, Duration::ZERO).await?;
    Ok(ids)
}

/// A node's intent as a request needs it, read under a row lock in the caller's transaction.
#[derive(Debug, Clone)]
pub struct IntentRow {
    pub id: Uuid,
    pub state: String,
    pub desired: String,
    pub instance_type: String,
    pub volume_gb: i32,
    pub restarts_requested: i32,
    /// Billing wants it stopped (its subscription is unpaid or paused, or a past-due grace
    /// has run out).
    pub billing_hold: bool,
}

/// Locks the node's row for a change of intent; `None` when there is no such node.
pub async fn lock_intent(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
) -> StoreResult<Option<IntentRow>> {
    let row: Option<(Uuid, String, String, String, i32, i32, bool)> = sqlx::query_as(
        "SELECT n.id, n.state, n.desired, n.instance_type, n.volume_gb, n.restarts_requested, \
           COALESCE(n.suspend_at <= now(), false) OR COALESCE(s.stripe_status = ANY($2), false) \
         FROM nodes n JOIN subscriptions s ON s.id = n.subscription_id \
         WHERE n.id = $1 FOR UPDATE OF n",
    )
    .bind(node_id)
    .bind(
        [StripeStatus::Unpaid, StripeStatus::Paused]
            .map(StripeStatus::as_str)
            .to_vec(),
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(
        |(id, state, desired, instance_type, volume_gb, restarts_requested, billing_hold)| {
            IntentRow {
                id,
                state,
                desired,
                instance_type,
                volume_gb,
                restarts_requested,
                billing_hold,
            }
        },
    ))
}

/// A change of a node's intent.
#[derive(Debug, Clone, Copy)]
pub enum IntentChange<'a> {
    Desired(Desired),
    Restart,
    Spec {
        instance_type: &'a str,
        volume_gb: i32,
    },
}

/// Records a change of the node's intent, logs who asked, and enqueues its job, in the
/// caller's transaction. The node's state is not touched: the worker acts on the difference
/// once the node rests. The node is marked due (`next_run_at`), so that the sweep finds it
/// should its job be lost; the worker clears the mark when the node rests with nothing to do.
pub async fn change_intent(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    change: IntentChange<'_>,
    detail: &str,
) -> StoreResult<()> {
    let (desired, restart, instance_type, volume_gb) = match change {
        IntentChange::Desired(d) => (Some(d.as_str()), false, None, None),
        IntentChange::Restart => (None, true, None, None),
        IntentChange::Spec {
            instance_type,
            volume_gb,
        } => (None, false, Some(instance_type), Some(volume_gb)),
    };
    let (state, generation): (String, i32) = sqlx::query_as(
        "UPDATE nodes SET desired = COALESCE($2, desired), \
         restarts_requested = restarts_requested + $3::int, \
         instance_type = COALESCE($4, instance_type), volume_gb = COALESCE($5, volume_gb), \
         next_run_at = COALESCE(next_run_at, now()), updated_at = now() \
         WHERE id = $1 RETURNING state, generation",
    )
    .bind(node_id)
    .bind(desired)
    .bind(i32::from(restart))
    .bind(instance_type)
    .bind(volume_gb)
    .fetch_one(&mut **tx)
    .await?;
    let step = NodeState::parse(&state).unwrap_or(NodeState::Ready);
    insert_event(
        &mut **tx,
        node_id,
        generation,
        step,
        EventKind::Requested,
        Some(detail),
    )
    .await?;
    queue::enqueue(tx, &[node_id], Duration::ZERO).await?;
    Ok(())
}

/// A node of a subscription that still counts: (id, ordinal, instance type, volume).
pub type CountedNode = (Uuid, i32, String, i32);

/// The subscription's nodes that still count, oldest first, locked in the caller's
/// transaction; the caller holds the subscription's lock.
pub async fn lock_counted_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Vec<CountedNode>> {
    Ok(sqlx::query_as(
        "SELECT id, ordinal, instance_type, volume_gb FROM nodes \
         WHERE subscription_id = $1 AND desired <> $2 ORDER BY ordinal FOR UPDATE",
    )
    .bind(subscription_id)
    .bind(Desired::Gone.as_str())
    .fetch_all(&mut **tx)
    .await?)
}

/// The highest ordinal a subscription's nodes ever had (new nodes take the next ones).
pub async fn max_ordinal(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<i32> {
    let (max,): (Option<i32>,) =
        sqlx::query_as("SELECT max(ordinal) FROM nodes WHERE subscription_id = $1")
            .bind(subscription_id)
            .fetch_one(&mut **tx)
            .await?;
    Ok(max.unwrap_or(-1))
}

/// What a replay needs to know of a node, read under a row lock in the caller's transaction.
pub struct ReplayFacts {
    pub state: Option<NodeState>,
    pub raw_state: String,
    pub failed_step: Option<String>,
    pub teardown_reason: Option<TeardownReason>,
}

/// Locks the node for a replay; `None` when there is no such node.
pub async fn lock_for_replay(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
) -> StoreResult<Option<ReplayFacts>> {
    let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT state, failed_step, teardown_reason FROM nodes WHERE id = $1 FOR UPDATE",
    )
    .bind(node_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(state, failed_step, reason)| ReplayFacts {
        state: NodeState::parse(&state),
        raw_state: state,
        failed_step,
        teardown_reason: reason.as_deref().and_then(TeardownReason::parse),
    }))
}

/// Resumes a failed node at `step` with a new generation and enqueues its job, in the caller's
/// transaction. `restart`: the undone provisioning starts over (its teardown reason is
/// cleared); `keep_error`: a resumed undo keeps the provisioning's error. Returns the new
/// generation.
pub async fn resume_failed(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    step: NodeState,
    restart: bool,
    keep_error: bool,
    detail: &str,
) -> StoreResult<i32> {
    let (generation,): (i32,) = sqlx::query_as(
        "UPDATE nodes SET state = $2, failed_step = NULL, \
         error = CASE WHEN $4 THEN error ELSE NULL END, attempt = 0, \
         teardown_reason = CASE WHEN $3 THEN NULL ELSE teardown_reason END, \
         generation = generation + 1, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, last_error = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 RETURNING generation",
    )
    .bind(node_id)
    .bind(step.as_str())
    .bind(restart)
    .bind(keep_error)
    .fetch_one(&mut **tx)
    .await?;
    insert_event(
        &mut **tx,
        node_id,
        generation,
        step,
        EventKind::Replayed,
        Some(detail),
    )
    .await?;
    queue::enqueue(tx, &[node_id], Duration::ZERO).await?;
    Ok(generation)
}

/// The window `HIVE_NODE_CHANGES_PER_HOUR` counts in.
pub(super) const NODE_CHANGE_WINDOW: Duration = Duration::from_secs(3600);

/// Counts one node creation or deletion that `user_id` asked for, in the caller's transaction,
/// if their allowance of `per_hour` has room: `None` when counted, else how long until the
/// oldest change counted leaves the hour. One user's changes are counted one at a time.
pub async fn count_node_change(
    tx: &mut Transaction<'_, Postgres>,
    user_id: &str,
    per_hour: u32,
) -> StoreResult<Option<Duration>> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('node-changes:' || $1, 0))")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM node_change_requests WHERE user_id = $1 AND at < now() - $2")
        .bind(user_id)
        .bind(NODE_CHANGE_WINDOW)
        .execute(&mut **tx)
        .await?;
    let (count, oldest_age): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(at))::float8 FROM node_change_requests \
         WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&mut **tx)
    .await?;
    if count >= i64::from(per_hour) {
        let window = NODE_CHANGE_WINDOW.as_secs_f64();
        let wait = window - oldest_age.unwrap_or(0.0);
        return Ok(Some(Duration::from_secs_f64(wait.clamp(1.0, window))));
    }
    sqlx::query("INSERT INTO node_change_requests (user_id) VALUES ($1)")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    Ok(None)
}

/// How many of the subscription's nodes are being torn down (not gone yet): they count
/// against its plan until they are, as their instances still run.
pub async fn leaving_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<usize> {
    let leaving: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE subscription_id = $1 AND state = ANY($2)",
    )
    .bind(subscription_id)
    .bind(teardown_states())
    .fetch_one(&mut **tx)
    .await?;
    Ok(usize::try_from(leaving).unwrap_or(0))
}
