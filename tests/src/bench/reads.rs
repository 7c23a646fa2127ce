//! Status reads: `GET /api/v1/nodes/{id}` with valid tokens over nodes of as many users, at 32
//! connections. Ceiling: pgbench point selects of the same rows.

use std::time::Instant;

use anyhow::Context;
use uuid::Uuid;

use super::{pgbench, Figure, Latencies, Size};
use crate::stack::Stack;

const CONNECTIONS: usize = 32;
const SCENARIO: &str = "reads";

/// Seeds `count` ready nodes, one per user (each with its subscription), straight into the
/// tables; their ids in the order of `bench_ids.i` (1-based).
pub async fn seed_nodes(stack: &Stack, count: usize, state: &str) -> anyhow::Result<Vec<Uuid>> {
    let pool = stack.pool().await?;
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO stripe_events (id, event_type, livemode, payload) \
         VALUES ('evt_bench_seed', 'checkout.session.completed', false, '{}') \
         ON CONFLICT (id) DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    // A fixture, not a workflow: the guard on legal moves stays out of it.
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "WITH n AS (SELECT id, ordinality AS i FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id)), \
         s AS (INSERT INTO subscriptions (id, stripe_subscription_id, user_id, plan, region, \
               stripe_event_id) \
               SELECT n.id, 'sub_bench_' || n.id, 'bench-user-' || n.i, 'pro', $2, \
               'evt_bench_seed' FROM n RETURNING id, user_id) \
         INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, instance_type, \
               volume_gb, hostname, state, applied_instance_type, applied_volume_gb) \
         SELECT s.id, s.id, 1, s.user_id, $2, 't4g.small', 10, s.id::text || '.bench', $3, \
               't4g.small', 10 FROM s",
    )
    .bind(&ids)
    .bind(&stack.aws.region)
    .bind(state)
    .execute(&mut *tx)
    .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_ids (i INT PRIMARY KEY, id UUID NOT NULL)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO bench_ids (i, id) \
         SELECT ordinality, id FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id) \
         ON CONFLICT (i) DO UPDATE SET id = EXCLUDED.id",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    pool.close().await;
    Ok(ids)
}

pub async fn run(stack: &Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(10_000, 500);
    let ids = seed_nodes(stack, count, "ready").await?;
    // Each user's token, made before the clock starts.
    let tokens: Vec<String> = (1..=count)
        .map(|i| Stack::jwt(&format!("bench-user-{i}"), 3600))
        .collect();
    let targets: std::sync::Arc<Vec<(String, String)>> = std::sync::Arc::new(
        ids.iter()
            .zip(tokens)
            .map(|(id, token)| (stack.api_url(&format!("/api/v1/nodes/{id}")), token))
            .collect(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    let started = Instant::now();
    let until = started + size.duration();
    let mut connections = tokio::task::JoinSet::new();
    for connection in 0..CONNECTIONS {
        let (targets, client) = (targets.clone(), client.clone());
        connections.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = connection * 7919;
            while Instant::now() < until {
                let (url, token) = &targets[i % targets.len()];
                i += 31;
                let sent = Instant::now();
                let answer = client.get(url).bearer_auth(token).send().await?;
                let status = answer.status().as_u16();
                answer.bytes().await?;
                anyhow::ensure!(status == 200, "a status read answered {status}");
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Latencies::default();
    while let Some(load) = connections.join_next().await {
        latencies.0.extend(load??);
    }
    let rate = latencies.0.len() as f64 / started.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let select_sql = dir.path().join("select.sql");
    std::fs::write(
        &select_sql,
        format!(
            "\\set i random(1, {count})\n\
             SELECT n.* FROM nodes n WHERE n.id = (SELECT id FROM bench_ids WHERE i = :i);\n"
        ),
    )?;
    let ceiling = pgbench(
        &stack.database_url,
        &[(&select_sql, 1)],
        CONNECTIONS as u32,
        size.duration(),
    )
    .context("the reads ceiling")?;
    Ok(vec![
        Figure::new(
            SCENARIO,
            format!("reads per second ({count} nodes)"),
            rate,
            "1/s",
        )
        .against(ceiling.tps, "pgbench point selects"),
        Figure::new(SCENARIO, "p50 latency", latencies.percentile(50.0), "ms")
            .under(ceiling.latency_ms, "pgbench mean latency"),
        Figure::new(SCENARIO, "p99 latency", latencies.percentile(99.0), "ms").under(5.0, "target"),
    ])
}
