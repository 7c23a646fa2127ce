//! What an operator does to a node, as library functions (hivectl calls them).

use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{NodeState, TeardownReason};
use crate::store::{self, StoreError};

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
/// tokens of the failed attempt are not reused), and enqueues its job, in one transaction. The
/// node's log says who asked (`by`: `operator <name>`).
pub async fn replay_failed_node(
    pool: &PgPool,
    node_id: Uuid,
    by: &str,
) -> Result<Replayed, OperatorError> {
    let mut tx = pool.begin().await?;
    let facts = store::lock_for_replay(&mut tx, node_id)
        .await?
        .ok_or(OperatorError::NotFound(node_id))?;
    if facts.state != Some(NodeState::Failed) {
        return Err(OperatorError::NotFailed {
            id: node_id,
            state: facts.raw_state,
        });
    }
    let not_resumable = |step: &str| OperatorError::NotResumable {
        id: node_id,
        step: step.to_string(),
    };
    let failed_at = match facts.failed_step.as_deref() {
        None => None,
        Some(name) => Some(
            NodeState::parse(name)
                .filter(|s| s.has_step())
                .ok_or_else(|| not_resumable(name))?,
        ),
    };
    let undone = facts.teardown_reason == Some(TeardownReason::ProvisioningFailed);
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
    let detail = format!("replay from {step}, asked by {by}");
    let generation =
        store::resume_failed(&mut tx, node_id, step, restart, resumes_undo, &detail).await?;
    tx.commit().await?;
    Ok(Replayed {
        node_id,
        step,
        generation,
    })
}
