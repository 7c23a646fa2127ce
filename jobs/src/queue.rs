//! The job queue (apalis-postgres). A job carries only the node id: the step to run is read
//! from the node's row, so a stale or duplicate job is harmless.

use std::collections::BTreeMap;
use std::time::Duration;

use apalis::prelude::TaskBuilder;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::store::StoreResult;

/// The queues node jobs go through: one per region, so that a worker takes only jobs of the
/// regions it drives, and workers configured for different regions share one database.
pub fn node_queue(region: &str) -> String {
    format!("hive-nodes:{region}")
}

/// Which jobs a worker takes first when more are due than it can run (apalis takes higher
/// priorities first, then older ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A look again (or retry) of a step that has been slow to come for a while.
    Slow,
    /// Work due later: a look again (or retry) of a step that began a while ago.
    Later,
    /// A look again (or retry) of a step that began moments ago, the younger the step the
    /// higher the band (0 to [`Priority::FRESHEST`]): the next look of a new node goes before
    /// the looks of a crowd that began waiting even a few seconds earlier, which a saturated
    /// worker would otherwise run first (oldest first) while the new node's look waits behind
    /// them.
    Fresh(u8),
    /// Something changed and the node has work now: a new node is not held up by a crowd of
    /// waiting ones, however many of their looks are due.
    Now,
}

impl Priority {
    /// The highest band of [`Priority::Fresh`].
    pub const FRESHEST: u8 = 4;

    /// The number apalis stores and orders by (higher first).
    pub fn rank(self) -> usize {
        match self {
            Priority::Slow => 0,
            Priority::Later => 1,
            Priority::Fresh(band) => 2 + usize::from(band.min(Self::FRESHEST)),
            Priority::Now => 3 + usize::from(Self::FRESHEST),
        }
    }
}

/// "Advance this node's state machine."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionNode {
    pub node_id: Uuid,
}

/// Enqueues one job per node in the caller's transaction: the job exists if and only if the
/// change that needs it commits. Due at once, it goes first ([`Priority::Now`]); later, after
/// the work due now ([`Priority::Later`]).
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    node_ids: &[Uuid],
    delay: Duration,
) -> StoreResult<()> {
    let priority = if delay.is_zero() {
        Priority::Now
    } else {
        Priority::Later
    };
    enqueue_as(tx, node_ids, delay, priority).await
}

/// As [`enqueue`], at the given priority.
pub async fn enqueue_as(
    tx: &mut Transaction<'_, Postgres>,
    node_ids: &[Uuid],
    delay: Duration,
    priority: Priority,
) -> StoreResult<()> {
    if node_ids.is_empty() {
        return Ok(());
    }
    // Each job goes to its node's region's queue (a node without a row has no job).
    let regions: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, region FROM nodes WHERE id = ANY($1) ORDER BY region")
            .bind(node_ids)
            .fetch_all(&mut **tx)
            .await?;
    let mut by_region: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (node_id, region) in &regions {
        by_region.entry(region).or_default().push(*node_id);
    }
    for (region, ids) in by_region {
        enqueue_in_region(tx, region, &ids, delay, priority).await?;
    }
    Ok(())
}

/// As [`enqueue_as`], for nodes the caller knows to be in `region` (it has just made them
/// there): no lookup of their rows.
pub async fn enqueue_in_region(
    tx: &mut Transaction<'_, Postgres>,
    region: &str,
    node_ids: &[Uuid],
    delay: Duration,
    priority: Priority,
) -> StoreResult<()> {
    if node_ids.is_empty() {
        return Ok(());
    }
    let mut tasks = Vec::with_capacity(node_ids.len());
    for node_id in node_ids {
        let args = serde_json::to_vec(&ProvisionNode { node_id: *node_id })?;
        // Step retries are ours (stored on the node); apalis retries a job only when the
        // handler itself failed (the database was unreachable).
        let mut task = TaskBuilder::new(args).priority(priority.rank());
        if !delay.is_zero() {
            task = task.run_after(delay);
        }
        tasks.push(task.build());
    }
    apalis_postgres::queries::push_tasks(&mut **tx, &node_queue(region), tasks).await?;
    Ok(())
}
