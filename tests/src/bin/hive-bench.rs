//! hive-bench: every benchmark scenario against the local stack, each figure beside its ceiling.
//! `scripts/bench.sh` runs it as a release build; CI runs the debug build with `--short`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hive_tests::bench::{self, Figure, Size};
use hive_tests::stack::{Stack, StackOptions};

#[derive(Parser)]
#[command(about = "Benchmarks of Hive's api and worker, each figure beside its ceiling")]
struct Args {
    /// A second a scenario and small counts: keeps the command working, measures nothing.
    #[arg(long)]
    short: bool,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench.json")]
    json: PathBuf,
    /// Only these scenarios (ingest, reads, dispatch, provisioning, waiting, reconcile).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run each scenario this many times, each on a fresh stack, and report each figure's
    /// median: on a shared machine one run's ratio moves by a fifth either way.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// Load `pg_stat_statements` in each scenario's Postgres and print, after each run, the
    /// statements that took the most of its time: the profile behind a figure.
    #[arg(long)]
    statements: bool,
}

/// A fresh stack per scenario, with production pacing (only what the load needs is changed).
/// `HIVE_*` settings in hive-bench's own environment go to the stack's binaries last, so a
/// setting can be measured (`HIVE_API_DB_CONNECTIONS=16 hive-bench --only ingest`).
async fn stack(track_statements: bool) -> anyhow::Result<Stack> {
    let mut extra_env: Vec<(String, String)> = [
        // One client address makes every request: the per-address limit would measure
        // itself.
        ("HIVE_RATE_LIMIT", "off"),
        ("HIVE_RECONCILE_SCHEDULE", "off"),
        // moto takes seconds to write a page of a thousand instances, and the reconcile
        // scenario's one DescribeInstances of ten thousand took 100-125 s on the two cores
        // (run 13's full run hit the 120 s it had).
        ("HIVE_HTTP_TIMEOUT_MS", "300000"),
        ("RUST_LOG", "warn"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    extra_env.extend(
        std::env::vars().filter(|(k, _)| k.starts_with("HIVE_") || k == "TOKIO_WORKER_THREADS"),
    );
    let options = StackOptions {
        extra_env,
        track_statements,
        ..StackOptions::default()
    };
    let mut stack = Stack::start(options).await?;
    stack.start_api()?;
    Ok(stack)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = if args.short { Size::Short } else { Size::Full };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut figures: Vec<Figure> = Vec::new();
    let mut failed = Vec::new();
    for scenario in [
        "ingest",
        "reads",
        "dispatch",
        "provisioning",
        "waiting",
        "reconcile",
    ] {
        if !wanted(scenario) {
            continue;
        }
        let mut runs = Vec::new();
        for _ in 0..args.repeat {
            let mut stack = stack(args.statements).await?;
            if args.statements {
                bench::statements::reset(&stack).await?;
            }
            let found = match scenario {
                "ingest" => bench::ingest::run(&stack, size).await,
                "reads" => bench::reads::run(&stack, size).await,
                "dispatch" => bench::dispatch::run(&mut stack, size).await,
                "provisioning" => bench::provisioning::run(&mut stack, size).await,
                "waiting" => bench::waiting::run(&mut stack, size).await,
                _ => bench::reconcile::run(&stack, size).await,
            };
            match found {
                Ok(found) => {
                    // As they come: a later scenario that fails does not hide them.
                    bench::print(&found);
                    runs.push(found);
                    if args.statements {
                        bench::statements::print_top(&stack, 15).await?;
                    }
                }
                Err(e) => {
                    eprintln!("{scenario} failed: {e:#}");
                    failed.push(scenario);
                    break;
                }
            }
        }
        figures.extend(bench::medians(&runs));
    }
    println!();
    if args.repeat > 1 {
        println!("medians of {} runs:", args.repeat);
    }
    bench::print(&figures);
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&figures)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("figures written to {}", args.json.display());
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {failed:?}");
    Ok(())
}
