//! Provisioning cost: `pro` checkouts to ready against the local stand-ins, with one worker:
//! the wall time, and the control plane's CPU per node (api, worker and every Postgres process,
//! from `/proc`), so that a slow stand-in does not hide our own cost.

use std::time::{Duration, Instant};

use super::{cpu_time, process_tree, Figure, Size};
use crate::stack::Stack;

const SCENARIO: &str = "provisioning";

/// CPU the api, the workers and the Postgres cluster have used so far, each.
fn control_plane_cpu(stack: &Stack) -> [Duration; 3] {
    let sum = |pids: Vec<u32>| pids.into_iter().map(cpu_time).sum::<Duration>();
    let postgres = match &stack.pg.process {
        Some(pg) => sum(process_tree(pg.pid())),
        None => Duration::ZERO,
    };
    [
        sum(stack.apis.iter().map(|(p, _)| p.pid()).collect()),
        sum(stack.workers.iter().map(|w| w.pid()).collect()),
        postgres,
    ]
}

/// Transactions the database has committed or rolled back so far.
async fn transactions(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn run(stack: &mut Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let count = size.count(200, 10);
    if stack.workers.is_empty() {
        stack.start_worker()?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pool = stack.pool().await?;
    let transactions_before = transactions(&pool).await?;
    let cpu_before = control_plane_cpu(stack);
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
    loop {
        let (ready, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'ready'), \
             count(*) FILTER (WHERE state = 'failed') FROM nodes WHERE id::text = ANY($1)",
        )
        .bind(&nodes)
        .fetch_one(&pool)
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
    let cpu_after = control_plane_cpu(stack);
    // (Statistics reach pg_stat_database within a second; the readiness polls of this
    // function are counted too, about one per 50 ms.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let transactions = transactions(&pool).await? - transactions_before;
    pool.close().await;
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
