//! Queue dispatch: jobs for nodes whose step does nothing (ready nodes with nothing asked of
//! them: the worker takes the lease, finds nothing to do and rests them), with one worker,
//! then three. Throughput: a backlog enqueued at once, worked off. Latency: jobs enqueued one
//! at a time, from the enqueuing commit to the worker's lock on the job.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Figure, Latencies, Size};
use crate::stack::Stack;

const SCENARIO: &str = "dispatch";

/// Enqueues jobs for `ids` in one transaction; when that transaction committed (as near as
/// Postgres's clock says).
async fn enqueue(pool: &sqlx::PgPool, ids: &[Uuid]) -> anyhow::Result<DateTime<Utc>> {
    let mut tx = pool.begin().await?;
    hive_jobs::store::queue::enqueue(&mut tx, ids, Duration::ZERO).await?;
    let at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(at)
}

/// Waits until every job enqueued since `since` is done; the last one's `done_at`.
async fn all_done(
    pool: &sqlx::PgPool,
    since: DateTime<Utc>,
    count: usize,
    within: Duration,
) -> anyhow::Result<DateTime<Utc>> {
    let deadline = Instant::now() + within;
    loop {
        let (done, last): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), max(done_at) FROM apalis.jobs \
             WHERE done_at IS NOT NULL AND lock_at >= $1",
        )
        .bind(since)
        .fetch_one(pool)
        .await?;
        if done as usize >= count {
            if let Some(last) = last {
                return Ok(last);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{done} of {count} jobs done in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(stack: &mut Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(10_000, 300);
    let probes = size.count(200, 20);
    let ids = super::reads::seed_nodes(stack, count + 2 * probes, "ready").await?;
    let pool = stack.pool().await?;
    let mut figures = Vec::new();
    for workers in [1usize, 3] {
        while stack.workers.len() < workers {
            stack.start_worker()?;
        }
        // Let the workers register and settle before the clock starts.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // A backlog, worked off.
        let backlog = &ids[..count];
        let enqueued = enqueue(&pool, backlog).await?;
        let last = all_done(
            &pool,
            enqueued - chrono::TimeDelta::seconds(1),
            count,
            Duration::from_secs(600),
        )
        .await?;
        let took = (last - enqueued).to_std().unwrap_or_default().as_secs_f64();
        figures.push(Figure::new(
            SCENARIO,
            format!("jobs per second, {workers} worker(s)"),
            count as f64 / took.max(1e-6),
            "1/s",
        ));

        // One at a time: how long a job waits for a worker that is idle.
        let probe_ids = match workers {
            1 => &ids[count..count + probes],
            _ => &ids[count + probes..],
        };
        let started: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&pool)
            .await?;
        let mut committed = HashMap::new();
        for id in probe_ids {
            committed.insert(
                id.to_string(),
                enqueue(&pool, std::slice::from_ref(id)).await?,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_done(&pool, started, probe_ids.len(), Duration::from_secs(120)).await?;
        let locked: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT convert_from(job, 'UTF8')::jsonb ->> 'node_id', lock_at FROM apalis.jobs \
             WHERE lock_at >= $1",
        )
        .bind(started)
        .fetch_all(&pool)
        .await?;
        let mut latencies = Latencies::default();
        for (node, lock_at) in locked {
            if let Some(at) = committed.get(&node) {
                latencies
                    .0
                    .push((lock_at - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        figures.push(
            Figure::new(
                SCENARIO,
                format!("enqueue to start p50, {workers} worker(s)"),
                latencies.percentile(50.0),
                "ms",
            )
            .under(5.0, "target"),
        );
        figures.push(Figure::new(
            SCENARIO,
            format!("enqueue to start p99, {workers} worker(s)"),
            latencies.percentile(99.0),
            "ms",
        ));
    }
    pool.close().await;
    Ok(figures)
}
