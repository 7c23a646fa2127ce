//! Status reads: `GET /api/v1/nodes/{id}` with valid tokens over nodes of as many users, at 32
//! connections, made by wrk. Ceiling: pgbench point selects of the same rows, in slices
//! alternating with the load's.

use std::fmt::Write;

use anyhow::Context;
use uuid::Uuid;

use super::{pgbench, throughput_figures, wrk, Figure, PgbenchResult, Size, WrkResult, SLICE};
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
    // Each node's path and its user's token, made before the clock starts, for wrk's script.
    let dir = tempfile::tempdir()?;
    let targets = dir.path().join("targets.txt");
    let mut lines = String::new();
    for (i, id) in ids.iter().enumerate() {
        let token = Stack::jwt(&format!("bench-user-{}", i + 1), 3600);
        writeln!(lines, "/api/v1/nodes/{id} {token}")?;
    }
    std::fs::write(&targets, lines)?;
    let script = dir.path().join("reads.lua");
    std::fs::write(&script, include_str!("reads.lua"))?;
    let select_sql = dir.path().join("select.sql");
    std::fs::write(
        &select_sql,
        format!(
            "\\set i random(1, {count})\n\
             SELECT n.* FROM nodes n WHERE n.id = (SELECT id FROM bench_ids WHERE i = :i);\n"
        ),
    )?;
    let (mut load, mut ceiling) = (WrkResult::default(), PgbenchResult::default());
    for _ in 0..size.rounds() {
        let slice = wrk(
            &stack.api_url("/"),
            &script,
            &[&targets.to_string_lossy()],
            CONNECTIONS as u32,
            SLICE,
        )
        .context("the reads load")?;
        load.add(slice);
        let slice = pgbench(
            &stack.database_url,
            &[(&select_sql, 1)],
            CONNECTIONS as u32,
            SLICE,
        )
        .context("the reads ceiling")?;
        ceiling.add(slice);
    }
    // A wrong token (401) or a missing node (404) would be fast and measure nothing.
    anyhow::ensure!(
        load.non_2xx == 0 && load.socket_errors == 0,
        "of {} status reads, {} were not answered 200 and {} failed on the socket",
        load.requests,
        load.non_2xx,
        load.socket_errors
    );
    Ok(throughput_figures(
        SCENARIO,
        (
            format!("reads per second ({count} nodes)"),
            load.per_second(),
        ),
        &load.latencies,
        5.0,
        load.client_cpu_per_request(),
        (&ceiling, "pgbench point selects"),
    ))
}
