//! The job queue (apalis-postgres). A job carries only the node id: the step to run is read
//! from the node's row, so a stale or duplicate job is harmless.

use std::time::Duration;

use apalis::prelude::TaskBuilder;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::store::StoreResult;

/// The queue all node jobs go through.
pub const NODE_QUEUE: &str = "hive-nodes";

/// "Advance this node's state machine."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionNode {
    pub node_id: Uuid,
}

/// Enqueues one job per node in the caller's transaction: the job exists if and only if the
/// change that needs it commits.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    node_ids: &[Uuid],
    delay: Duration,
) -> StoreResult<()> {
    let mut tasks = Vec::with_capacity(node_ids.len());
    for &node_id in node_ids {
        let args = serde_json::to_vec(&ProvisionNode { node_id })?;
        // Step retries are ours (stored on the node); apalis retries a job only when the
        // handler itself failed (the database was unreachable).
        let mut task = TaskBuilder::new(args);
        if !delay.is_zero() {
            task = task.run_after(delay);
        }
        tasks.push(task.build());
    }
    apalis_postgres::queries::push_tasks(&mut **tx, NODE_QUEUE, tasks).await?;
    Ok(())
}
