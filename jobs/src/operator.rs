//! What an operator does to a node, as library functions (hivectl calls them).

use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{teardown_reason, NodeState};
use crate::queue;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no node {0}")]
    NotFound(Uuid),
    #[error("node {id} is {state}, not failed: only a failed node can be replayed")]
    NotFailed { id: Uuid, state: String },
    #[error("node {id} failed at `{step}`, which is not a step that can be resumed")]
    NotResumable { id: Uuid, step: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for OperatorError {
    fn from(e: sqlx::Error) -> Self {
        OperatorError::Store(StoreError::Database(e))
    }
}

/// The result of a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub node_id: Uuid,
    pub step: NodeState,
    pub generation: i32,
}

/// Resumes a failed node from the step where it stopped (from the start when its failed
/// provisioning was undone), with a new generation (so idempotency
/// tokens of the failed attempt are not reused), and enqueues its job, in one transaction.
pub async fn replay_failed_node(pool: &PgPool, node_id: Uuid) -> Result<Replayed, OperatorError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT state, failed_step, teardown_reason FROM nodes WHERE id = $1 FOR UPDATE",
    )
    .bind(node_id)
    .fetch_optional(&mut *tx)
    .await?;
    let (state, failed_step, teardown_reason) = row.ok_or(OperatorError::NotFound(node_id))?;
    if state != NodeState::Failed.as_str() {
        return Err(OperatorError::NotFailed { id: node_id, state });
    }
    let not_resumable = |step: &str| OperatorError::NotResumable {
        id: node_id,
        step: step.to_string(),
    };
    let failed_at = match failed_step.as_deref() {
        None => None,
        Some(name) => Some(
            NodeState::parse(name)
                .filter(|s| s.has_step())
                .ok_or_else(|| not_resumable(name))?,
        ),
    };
    let undone = teardown_reason.as_deref() == Some(teardown_reason::PROVISIONING_FAILED);
    let (step, restart) = match failed_at {
        // A failed provisioning that was undone (its failed step is empty once a replayed undo
        // has finished) has nothing left to resume: start over.
        None if undone => (NodeState::Pending, true),
        Some(s) if undone && s.is_provisioning() => (NodeState::Pending, true),
        // Anything else resumes where it stopped, a failed undo included.
        Some(s) => (s, false),
        None => return Err(not_resumable("")),
    };
    // Resuming an undo keeps the provisioning's error (the node stays `failed` to the app).
    let resumes_undo = undone && !restart;
    let (generation,): (i32,) = sqlx::query_as(
        "UPDATE nodes SET state = $2, failed_step = NULL, \
         error = CASE WHEN $4 THEN error ELSE NULL END, attempt = 0, \
         teardown_reason = CASE WHEN $3 THEN NULL ELSE teardown_reason END, \
         generation = generation + 1, step_started_at = now(), next_run_at = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 RETURNING generation",
    )
    .bind(node_id)
    .bind(step.as_str())
    .bind(restart)
    .bind(resumes_undo)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO node_events (node_id, generation, step, kind, detail) \
         VALUES ($1, $2, $3, 'replayed', 'operator replay')",
    )
    .bind(node_id)
    .bind(generation)
    .bind(step.as_str())
    .execute(&mut *tx)
    .await?;
    queue::enqueue(&mut tx, &[node_id], std::time::Duration::ZERO).await?;
    tx.commit().await?;
    Ok(Replayed {
        node_id,
        step,
        generation,
    })
}
