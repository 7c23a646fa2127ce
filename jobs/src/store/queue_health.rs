//! The queue's health: node counts, due and stalled jobs, stuck teardowns, and the finished
//! jobs pruned.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{NodeState, NodeStatus};

use super::{queue, resting_states, teardown_states, StoreResult};

/// How many nodes are in each state (for the nodes-by-status gauge).
pub async fn node_counts_by_state(pool: &PgPool) -> StoreResult<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM nodes GROUP BY state")
            .fetch_all(pool)
            .await?,
    )
}

/// How long the oldest queue job that is due has waited to start (`None`: none is waiting).
pub async fn oldest_due_job_age(pool: &PgPool) -> StoreResult<Option<Duration>> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(run_at))::float8 FROM apalis.jobs \
         WHERE status IN ('Pending', 'Queued') AND run_at <= now()",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Steps with a run that should have started by now but has not: the node is due (or its step
/// began) longer than `stale_after` ago and nobody holds it; a resting node is due only when a
/// request marked it so. Its job was lost (the database
/// went away while the queue was recording it, say); this enqueues a new one and marks the node
/// due now, in one transaction, skipping rows another worker is sweeping. Returns those nodes.
///
/// A queue that is merely behind is not a lost job: a node due after the oldest job still
/// waiting in its region's queue may have its job in that backlog, and is left alone (else a
/// busy queue would grow by duplicates of its own backlog). A node due well before it (by
/// `stale_after`, since a job's time and its node's come from different clocks and
/// statements) cannot. The backlog is computed once (`MATERIALIZED`): inlined, Postgres ran
/// its aggregate again for every node, seconds per sweep with ten thousand waiting.
pub async fn requeue_stalled(pool: &PgPool, stale_after: Duration) -> StoreResult<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<(Uuid,)> = sqlx::query_as(
        "WITH backlog AS MATERIALIZED ( \
           SELECT job_type, min(run_at) AS oldest FROM apalis.jobs \
           WHERE status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts) \
           GROUP BY job_type) \
         UPDATE nodes SET next_run_at = now() WHERE id IN ( \
           SELECT id FROM nodes \
           WHERE (state <> ALL($2) OR next_run_at IS NOT NULL) \
             AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
             AND COALESCE(next_run_at, step_started_at) < now() - $1 \
             AND COALESCE(next_run_at, step_started_at) < COALESCE( \
               (SELECT oldest FROM backlog WHERE job_type = $3 || nodes.region) - $1, \
               'infinity') \
           ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(stale_after)
    .bind(resting_states())
    .bind(queue::node_queue(""))
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
    queue::enqueue(&mut tx, &ids, Duration::ZERO).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Deletes finished jobs done more than `older_than` ago, at most `limit` of them; how many.
/// Node history lives in `node_events`; a done job only says that a look happened.
pub async fn prune_done_jobs(pool: &PgPool, older_than: Duration, limit: i64) -> StoreResult<u64> {
    let deleted = sqlx::query(
        "DELETE FROM apalis.jobs WHERE id IN ( \
           SELECT id FROM apalis.jobs WHERE status = 'Done' AND done_at < now() - $1 \
           LIMIT $2)",
    )
    .bind(older_than)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}

/// The queue as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueHealth {
    /// Jobs by apalis status (`Pending`, `Queued`, `Running`, `Done`, `Failed`, `Killed`).
    pub jobs: Vec<(String, i64)>,
    /// How long the oldest due job has waited to start, in seconds.
    pub oldest_due_secs: Option<f64>,
    /// Nodes waiting on something, by what they wait for.
    pub waiting: Vec<(String, i64)>,
    /// Nodes retrying a transient failure.
    pub retrying: i64,
    /// Workers seen in the last minute, with when.
    pub workers: Vec<(String, DateTime<Utc>)>,
    /// Teardowns retrying longer than the operator's threshold.
    pub stuck_teardowns: Vec<StuckTeardown>,
}

/// A teardown that has gone on retrying longer than the operator's threshold.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StuckTeardown {
    pub id: Uuid,
    pub state: String,
    /// How long its current step has been retrying or waiting, in seconds.
    pub stuck_secs: f64,
    pub last_error: Option<String>,
}

/// Nodes in a teardown step begun longer than `after` ago, the longest stuck first.
pub async fn stuck_teardowns(pool: &PgPool, after: Duration) -> StoreResult<Vec<StuckTeardown>> {
    Ok(sqlx::query_as(
        "SELECT id, state, EXTRACT(EPOCH FROM now() - step_started_at)::float8 AS stuck_secs, \
         last_error FROM nodes WHERE state = ANY($1) AND step_started_at < now() - $2 \
         ORDER BY step_started_at",
    )
    .bind(teardown_states())
    .bind(after)
    .fetch_all(pool)
    .await?)
}

pub async fn queue_health(pool: &PgPool, stuck_after: Duration) -> StoreResult<QueueHealth> {
    let jobs =
        sqlx::query_as("SELECT status, count(*) FROM apalis.jobs GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?;
    let waiting = sqlx::query_as(
        "SELECT waiting_for, count(*) FROM nodes WHERE waiting_for IS NOT NULL \
         GROUP BY waiting_for ORDER BY count(*) DESC, waiting_for",
    )
    .fetch_all(pool)
    .await?;
    let retrying: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nodes WHERE last_error IS NOT NULL")
            .fetch_one(pool)
            .await?;
    let workers = sqlx::query_as(
        "SELECT id, last_seen FROM apalis.workers WHERE last_seen > now() - interval '1 minute' \
         ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(QueueHealth {
        jobs,
        oldest_due_secs: oldest_due_job_age(pool).await?.map(|d| d.as_secs_f64()),
        waiting,
        retrying,
        workers,
        stuck_teardowns: stuck_teardowns(pool, stuck_after).await?,
    })
}

/// The database gauges' refresh, run before each scrape of `GET /metrics` (a teardown counts
/// as stuck after `teardown_stuck_after`).
pub fn gauges_at_scrape(
    pool: PgPool,
    teardown_stuck_after: Duration,
) -> crate::metrics::BeforeScrape {
    std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            if let Err(e) = publish_gauges(&pool, teardown_stuck_after).await {
                // The other metrics are still worth answering with.
                tracing::warn!(error = %e, "reading the database gauges failed");
            }
        })
    })
}

async fn publish_gauges(pool: &PgPool, teardown_stuck_after: Duration) -> StoreResult<()> {
    let mut by_status: Vec<(NodeStatus, f64)> = Vec::new();
    for (state, count) in node_counts_by_state(pool).await? {
        let Some(status) = NodeState::parse(&state).map(NodeState::status) else {
            continue;
        };
        match by_status.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += count as f64,
            None => by_status.push((status, count as f64)),
        }
    }
    crate::metrics::nodes_by_status(&by_status);
    crate::metrics::oldest_due_job(oldest_due_job_age(pool).await?);
    crate::metrics::teardowns_stuck(stuck_teardowns(pool, teardown_stuck_after).await?.len());
    crate::metrics::stripe_events_held(super::held_stripe_event_count(pool).await?);
    Ok(())
}
