//! Provisioning cost: `pro` checkouts to ready against the local stand-ins, with one worker:
//! the wall time, and the control plane's CPU per node (api, worker and every Postgres process,
//! from `/proc`), so that a slow stand-in does not hide our own cost.

use std::time::{Duration, Instant};

use sqlx::Connection;

use super::{cpu_time, process_tree, reaped_children_cpu, Figure, Size};
use crate::stack::Stack;

const SCENARIO: &str = "provisioning";

/// CPU the api, the workers and the Postgres cluster have used so far, each; the Postgres
/// backend of the benchmark's own connection (`bench_backend`) is not the control plane's.
fn control_plane_cpu(stack: &Stack, bench_backend: u32) -> [Duration; 3] {
    let sum = |pids: Vec<u32>| pids.into_iter().map(cpu_time).sum::<Duration>();
    let postgres = match &stack.pg.process {
        // Backends that have exited are counted in the postmaster's reaped children.
        Some(pg) => {
            sum(process_tree(pg.pid())
                .into_iter()
                .filter(|&pid| pid != bench_backend)
                .collect())
                + reaped_children_cpu(pg.pid())
        }
        None => Duration::ZERO,
    };
    [
        sum(stack.apis.iter().map(|(p, _)| p.pid()).collect()),
        sum(stack.workers.iter().map(|w| w.pid()).collect()),
        postgres,
    ]
}

/// Transactions the database has committed or rolled back so far.
async fn transactions(conn: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .fetch_one(conn)
    .await?)
}

pub async fn run(stack: &mut Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(200, 10);
    if stack.workers.is_empty() {
        stack.start_worker()?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One connection for the benchmark's own queries, so that its backend can be left out.
    let mut conn = stack.connection().await?;
    let bench_backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let bench_backend = u32::try_from(bench_backend)?;
    let transactions_before = transactions(&mut conn).await?;
    let cpu_before = control_plane_cpu(stack, bench_backend);
    let started = Instant::now();
    let mut nodes = Vec::with_capacity(count);
    for n in 0..count {
        nodes.extend(
            stack
                .send_checkout(&format!("bench-pro-{n}"), "pro")
                .await?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut polls = 0;
    loop {
        polls += 1;
        let (ready, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'ready'), \
             count(*) FILTER (WHERE state = 'failed') FROM nodes WHERE id::text = ANY($1)",
        )
        .bind(&nodes)
        .fetch_one(&mut conn)
        .await?;
        anyhow::ensure!(failed == 0, "{failed} nodes failed");
        if ready as usize == nodes.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{ready} of {} ready in time",
            nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let cpu_after = control_plane_cpu(stack, bench_backend);
    // A backend that reported its counters less than a second before it went idle reports
    // the rest 10 s later (Postgres 15's `PGSTAT_IDLE_INTERVAL`): read pg_stat_database after
    // that, or a busy run's last second is missing from it. The readiness polls above (one
    // transaction each) and the first count are the benchmark's, not the control plane's.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let transactions = transactions(&mut conn).await? - transactions_before - polls - 1;
    conn.close().await?;
    let per_node_ms = |d: Duration| d.as_secs_f64() * 1000.0 / count as f64;
    let used: Vec<Duration> = (0..3)
        .map(|i| cpu_after[i].saturating_sub(cpu_before[i]))
        .collect();
    let total: Duration = used.iter().sum();
    let mut figures = vec![
        Figure::new(
            SCENARIO,
            format!("{count} pro checkouts to ready"),
            wall.as_secs_f64(),
            "s",
        ),
        Figure::new(
            SCENARIO,
            "control-plane CPU per node",
            per_node_ms(total),
            "ms",
        )
        .under(20.0, "target"),
    ];
    for (part, used) in ["api", "worker", "Postgres"].iter().zip(&used) {
        figures.push(Figure::new(
            SCENARIO,
            format!("  of which {part}"),
            per_node_ms(*used),
            "ms",
        ));
    }
    figures.push(Figure::new(
        SCENARIO,
        "Postgres transactions per node",
        transactions as f64 / count as f64,
        "",
    ));
    Ok(figures)
}
