//! The job queue (apalis-postgres). A job carries only the node id: the step to run is read
//! from the node's row, so a stale or duplicate job is harmless.

use std::collections::BTreeMap;
use std::time::Duration;

use apalis::prelude::TaskBuilder;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::StoreResult;

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

/// The priority of a step's next look or retry: the longer its step has waited, the later it
/// goes among the looks due at once, so that a crowd of waiting nodes does not delay a new
/// node's few looks (a node provisions in seconds when nothing is slow). Within
/// [`FRESH_FOR`], each halving of the time waited is a band higher, so a step that began a
/// second ago goes before one that began ten seconds ago, however many of those are due.
/// After a minute (the same minute that slows its polling) it goes after everyone else's.
pub fn look_again_priority(waited: Duration) -> Priority {
    if waited >= Duration::from_secs(60) {
        return Priority::Slow;
    }
    if waited >= FRESH_FOR {
        return Priority::Later;
    }
    let mut band = 0;
    let mut bound = FRESH_FOR / 2;
    while band < Priority::FRESHEST && waited < bound {
        band += 1;
        bound /= 2;
    }
    Priority::Fresh(band)
}

/// How long a step's looks count as a new node's: longer than a whole provisioning takes
/// when nothing is slow.
pub const FRESH_FOR: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longer_a_step_waits_the_later_its_looks_go() {
        let at = |millis| look_again_priority(Duration::from_millis(millis));
        let fresh_for = FRESH_FOR.as_millis() as u64;
        assert_eq!(at(0), Priority::Fresh(Priority::FRESHEST));
        assert_eq!(at(fresh_for / 16 - 1), Priority::Fresh(4));
        assert_eq!(at(fresh_for / 16), Priority::Fresh(3));
        assert_eq!(at(fresh_for / 4), Priority::Fresh(1));
        assert_eq!(at(fresh_for / 2 - 1), Priority::Fresh(1));
        assert_eq!(at(fresh_for / 2), Priority::Fresh(0));
        assert_eq!(at(fresh_for - 1), Priority::Fresh(0));
        assert_eq!(at(fresh_for), Priority::Later);
        assert_eq!(at(60_000), Priority::Slow);
        // Never younger than a younger step, at any age.
        let ranks: Vec<usize> = (0..70_000).step_by(50).map(|ms| at(ms).rank()).collect();
        assert!(ranks.windows(2).all(|w| w[0] >= w[1]));
        // Work due now goes before every look; apalis takes the highest first.
        let order = [
            Priority::Slow,
            Priority::Later,
            Priority::Fresh(0),
            Priority::Fresh(Priority::FRESHEST),
            Priority::Now,
        ];
        assert!(order.windows(2).all(|w| w[0].rank() < w[1].rank()));
        // A band out of range counts as the freshest, never as work due now.
        assert!(Priority::Fresh(u8::MAX).rank() < Priority::Now.rank());
    }
}
