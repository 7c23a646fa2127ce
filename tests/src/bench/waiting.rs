//! Scale, part one: many nodes waiting for their instance (a region slow to start them), with
//! one worker at production pacing. Worker memory (RSS) while they wait, what their waiting
//! costs (looks and EC2 calls per second), and a new node's time from checkout to ready
//! meanwhile, beside the same on the idle worker.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{rss_mib, Figure, Size};
use crate::stack::Stack;

const SCENARIO: &str = "waiting";

/// Sends a `pro` checkout and waits for its node to be ready; how long that took.
async fn checkout_to_ready(
    stack: &Stack,
    pool: &sqlx::PgPool,
    user: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let nodes = stack.send_checkout(user, "pro").await?;
    anyhow::ensure!(!nodes.is_empty(), "the checkout made no node");
    let deadline = started + Duration::from_secs(600);
    loop {
        let (ready, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'ready'), \
             count(*) FILTER (WHERE state = 'failed') FROM nodes WHERE id::text = ANY($1)",
        )
        .bind(&nodes)
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(failed == 0, "the new node failed");
        if ready as usize == nodes.len() {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new node was not ready in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(stack: &mut Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(10_000, 500);
    if stack.workers.is_empty() {
        stack.start_worker()?;
    }
    let worker = stack.workers[0].pid();
    let pool = stack.pool().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = checkout_to_ready(stack, &pool, "bench-idle").await?;
    let idle_rss = rss_mib(worker);

    let ids = crate::seed::waiting_nodes(stack, count).await?;
    // Until every waiting node has been looked at once.
    let seeded = Instant::now();
    loop {
        let looked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM nodes WHERE id = ANY($1) AND waiting_for IS NOT NULL",
        )
        .bind(&ids)
        .fetch_one(&pool)
        .await?;
        if looked as usize == ids.len() {
            break;
        }
        anyhow::ensure!(
            seeded.elapsed() < Duration::from_secs(900),
            "{looked} of {count} waiting nodes looked at in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first_look = seeded.elapsed();

    // A new node meanwhile, and what the waiting costs while it provisions.
    let describes_before = stack.aws_proxy.calls("DescribeInstances");
    let window_start: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let sampler = {
        let stop = tokio::sync::watch::channel(false);
        let (tx, mut rx) = stop;
        let handle = tokio::spawn(async move {
            let mut most = rss_mib(worker);
            loop {
                tokio::select! {
                    _ = rx.changed() => break most,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => most = most.max(rss_mib(worker)),
                }
            }
        });
        (tx, handle)
    };
    let busy = checkout_to_ready(stack, &pool, "bench-busy").await?;
    // At least a few seconds of the waiting's cost, however fast the new node was.
    let window = busy.max(Duration::from_secs(size.count(10, 2) as u64));
    tokio::time::sleep(window.saturating_sub(busy)).await;
    let _stopped = sampler.0.send(true);
    let most_rss = sampler.1.await?;
    let looks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE done_at IS NOT NULL AND lock_at >= $1",
    )
    .bind(window_start)
    .fetch_one(&pool)
    .await?;
    let describes = stack.aws_proxy.calls("DescribeInstances") - describes_before;
    pool.close().await;

    let secs = window.as_secs_f64();
    Ok(vec![
        Figure::new(SCENARIO, "worker RSS, idle", idle_rss, "MiB"),
        Figure::new(
            SCENARIO,
            format!("worker RSS, {count} waiting"),
            most_rss,
            "MiB",
        )
        .under(150.0, "target"),
        Figure::new(
            SCENARIO,
            format!("first look at all {count}"),
            first_look.as_secs_f64(),
            "s",
        ),
        Figure::new(
            SCENARIO,
            "jobs per second while waiting",
            looks as f64 / secs,
            "1/s",
        ),
        Figure::new(
            SCENARIO,
            "DescribeInstances per second",
            f64::from(describes) / secs,
            "1/s",
        )
        .under(20.0, "EC2 budget"),
        Figure::new(SCENARIO, "new node to ready, idle", idle.as_secs_f64(), "s"),
        Figure::new(
            SCENARIO,
            format!("new node to ready, {count} waiting"),
            busy.as_secs_f64(),
            "s",
        )
        .under(idle.as_secs_f64(), "idle worker"),
    ])
}
