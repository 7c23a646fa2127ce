//! What the reconciler reads and writes: owning and ready nodes, its claims on a tick, and what
//! it put right in a node's log.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{Desired, EventKind, NodeState};

use super::{insert_event, queue, teardown_states, StoreResult};

/// The reconciler saw a ready node's instance run as `instance_type`, not the type recorded:
/// that is recorded, and the node's job enqueued, so that the resize workflow converges on
/// what the node asks for. False when the node is no longer ready.
pub async fn observe_instance_type(
    pool: &PgPool,
    node_id: Uuid,
    instance_type: &str,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET applied_instance_type = $2, updated_at = now() \
         WHERE id = $1 AND state = $3",
    )
    .bind(node_id)
    .bind(instance_type)
    .bind(NodeState::Ready.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    queue::enqueue(&mut tx, &[node_id], Duration::ZERO).await?;
    tx.commit().await?;
    Ok(true)
}

/// Nodes that own resources: every node with a row that is not `terminated`.
///
/// A node that is to be gone and whose teardown failed for good (a permanent refusal) owns
/// nothing either: what it still holds is the reconciler's to remove, else it would run (and
/// be billed) until an operator noticed.
pub async fn owning_nodes(pool: &PgPool) -> StoreResult<Vec<(Uuid, String)>> {
    Ok(sqlx::query_as(
        "SELECT id, region FROM nodes WHERE state <> $1 \
         AND NOT (state = $2 AND desired = $3 AND failed_step = ANY($4))",
    )
    .bind(NodeState::Terminated.as_str())
    .bind(NodeState::Failed.as_str())
    .bind(Desired::Gone.as_str())
    .bind(teardown_states())
    .fetch_all(pool)
    .await?)
}

/// A ready node as the reconciler judges it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReadyNode {
    pub id: Uuid,
    pub region: String,
    pub instance_id: Option<String>,
    pub tunnel_id: Option<String>,
    pub applied_instance_type: Option<String>,
}

/// Ready nodes, with their region and recorded instance and tunnel.
pub async fn ready_nodes(pool: &PgPool) -> StoreResult<Vec<ReadyNode>> {
    Ok(sqlx::query_as(
        "SELECT id, region, instance_id, tunnel_id, applied_instance_type FROM nodes \
         WHERE state = $1 ORDER BY id",
    )
    .bind(NodeState::Ready.as_str())
    .fetch_all(pool)
    .await?)
}

/// Sends a ready node whose resource vanished back to the step that makes it, with a new
/// generation, and enqueues its job. False when the node is no longer ready.
pub async fn send_back_to(
    pool: &PgPool,
    node_id: Uuid,
    step: NodeState,
    tunnel_gone: bool,
    why: &str,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    let moved: Option<(i32,)> = sqlx::query_as(
        "UPDATE nodes SET state = $2, generation = generation + 1, attempt = 0, \
         step_started_at = now(), next_run_at = NULL, \
         tunnel_id = CASE WHEN $3 THEN NULL ELSE tunnel_id END, instance_id = NULL, \
         updated_at = now() WHERE id = $1 AND state = $4 RETURNING generation",
    )
    .bind(node_id)
    .bind(step.as_str())
    .bind(tunnel_gone)
    .bind(NodeState::Ready.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((generation,)) = moved else {
        return Ok(false);
    };
    insert_event(
        &mut *tx,
        node_id,
        generation,
        step,
        EventKind::Reconciled,
        Some(why),
    )
    .await?;
    queue::enqueue(&mut tx, &[node_id], Duration::ZERO).await?;
    tx.commit().await?;
    Ok(true)
}

/// Logs, in a node's history, a fix the reconciler made in place (the node stays where it is).
pub async fn log_reconciled(pool: &PgPool, node_id: Uuid, why: &str) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    let row: Option<(i32, String)> =
        sqlx::query_as("SELECT generation, state FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((generation, state)) = row {
        let state = NodeState::parse(&state).unwrap_or(NodeState::Ready);
        insert_event(
            &mut *tx,
            node_id,
            generation,
            state,
            EventKind::Reconciled,
            Some(why),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Records the start of a reconcile pass (claiming its tick, if it has one); `None` when
/// another worker has claimed that tick.
pub async fn claim_reconcile_run(
    pool: &PgPool,
    tick: Option<chrono::DateTime<chrono::Utc>>,
) -> StoreResult<Option<i64>> {
    let claimed: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO reconcile_runs (started_at, tick, removed, reprovisioned) \
         VALUES (now(), $1, '[]', '[]') ON CONFLICT (tick) DO NOTHING RETURNING id",
    )
    .bind(tick)
    .fetch_optional(pool)
    .await?;
    Ok(claimed.map(|(id,)| id))
}

/// Records what a reconcile pass removed and re-provisioned, or why it stopped.
pub async fn finish_reconcile_run(
    pool: &PgPool,
    run: i64,
    removed: &[String],
    reprovisioned: &[Uuid],
    error: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE reconcile_runs SET finished_at = now(), removed = $2, reprovisioned = $3, \
         error = $4 WHERE id = $1",
    )
    .bind(run)
    .bind(serde_json::json!(removed))
    .bind(serde_json::json!(reprovisioned))
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
