//! hivectl: the operator's view of the nodes, over the same database as api and worker.
//!
//!   hivectl nodes [--state STATE] [--user USER]   list nodes
//!   hivectl node ID                               one node and its event log
//!   hivectl replay ID                             resume a failed node from its failed step
//!   hivectl reconcile [--grace-secs N]            remove orphans, re-provision vanished nodes
//!                                                 (reads the worker's settings)
//!   hivectl suspend|resume|restart|terminate ID   ask a node to change (done by the worker)
//!   hivectl resize ID --type T [--volume-gb N]    another t4g type and/or a larger volume
//!   hivectl scale SUBSCRIPTION COUNT [--type T]   provision or tear down whole nodes
//!
//! Requests are logged in the node's events with the operator's name (`HIVE_OPERATOR`, else
//! the login name).

use anyhow::{bail, Context};
use hive_jobs::model::{Node, NodeState, TeardownReason};
use hive_jobs::operator::replay_failed_node;
use hive_jobs::requests;
use sqlx::PgPool;
use uuid::Uuid;

const USAGE: &str = "usage: hivectl nodes [--state STATE] [--user USER] | node ID | replay ID | \
reconcile [--grace-secs N] | suspend ID | resume ID | restart ID | terminate ID | \
resize ID --type T [--volume-gb N] | scale SUBSCRIPTION COUNT [--type T]";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => {}
        Err(e) => {
            // One line, no backtrace: the chain of contexts joined.
            eprintln!("hivectl: {e:#}");
            std::process::exit(1);
        }
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> anyhow::Result<Option<&'a str>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => match args.get(i + 1) {
            Some(v) => Ok(Some(v.as_str())),
            None => bail!("{name} needs a value"),
        },
    }
}

fn node_id(args: &[String]) -> anyhow::Result<Uuid> {
    let raw = args.get(1).with_context(|| USAGE.to_string())?;
    Uuid::parse_str(raw).with_context(|| format!("`{raw}` is not a node id"))
}

async fn pool() -> anyhow::Result<PgPool> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    PgPool::connect(&url)
        .await
        .context("connecting to the database")
}

async fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("nodes") => {
            let state = flag(args, "--state")?;
            if let Some(s) = state {
                NodeState::parse(s).with_context(|| format!("`{s}` is not a node state"))?;
            }
            let user = flag(args, "--user")?;
            list(&pool().await?, state, user).await
        }
        Some("node") => {
            let id = node_id(args)?;
            show(&pool().await?, id).await
        }
        Some("replay") => {
            let id = node_id(args)?;
            let replayed = replay_failed_node(&pool().await?, id).await?;
            println!(
                "node {} resumes at {} (generation {})",
                replayed.node_id, replayed.step, replayed.generation
            );
            Ok(())
        }
        Some("reconcile") => {
            let grace: u64 = match flag(args, "--grace-secs")? {
                None => 600,
                Some(raw) => raw
                    .parse()
                    .with_context(|| format!("`{raw}` is not a number of seconds"))?,
            };
            let config =
                hive_jobs::config::WorkerConfig::from_env(&hive_jobs::config::process_env())?;
            let pool = pool().await?;
            let (clouds, _region) = hive_jobs::cloud::Clouds::from_config(&config).await?;
            let report = hive_jobs::reconcile::reconcile(
                &pool,
                &clouds,
                &config.node_domain,
                std::time::Duration::from_secs(grace),
            )
            .await?;
            for removed in &report.removed {
                println!("removed {removed}");
            }
            for node in &report.reprovisioned {
                println!("re-provisioning {node}");
            }
            println!(
                "{} orphan(s) removed, {} node(s) re-provisioned",
                report.removed.len(),
                report.reprovisioned.len()
            );
            Ok(())
        }
        Some(verb @ ("suspend" | "resume" | "restart" | "terminate" | "resize")) => {
            let id = node_id(args)?;
            let pool = pool().await?;
            let by = operator();
            let mut tx = pool.begin().await.context("starting a transaction")?;
            match verb {
                "suspend" => requests::suspend(&mut tx, id, &by).await?,
                "resume" => requests::resume(&mut tx, id, &by).await?,
                "restart" => requests::restart(&mut tx, id, &by).await?,
                "terminate" => {
                    requests::terminate(&mut tx, id, TeardownReason::Requested, &by).await?
                }
                _ => {
                    let node = hive_jobs::store::node(&pool, id)
                        .await?
                        .with_context(|| format!("no node {id}"))?;
                    let instance_type = flag(args, "--type")?.unwrap_or(&node.instance_type);
                    let volume_gb = match flag(args, "--volume-gb")? {
                        None => node.volume_gb,
                        Some(raw) => raw
                            .parse()
                            .with_context(|| format!("`{raw}` is not a number of GiB"))?,
                    };
                    requests::resize(&mut tx, id, instance_type, volume_gb, &by).await?
                }
            }
            tx.commit().await.context("recording the request")?;
            println!("node {id}: {verb} requested by {by}");
            Ok(())
        }
        Some("scale") => {
            let (subscription, count) = match (args.get(1), args.get(2)) {
                (Some(s), Some(c)) => (s, c),
                _ => bail!(USAGE),
            };
            let count: u32 = count
                .parse()
                .with_context(|| format!("`{count}` is not a node count"))?;
            let domain =
                std::env::var("HIVE_NODE_DOMAIN").context("HIVE_NODE_DOMAIN is not set")?;
            let pool = pool().await?;
            let id = hive_jobs::store::subscription_id(&pool, subscription)
                .await?
                .with_context(|| format!("no subscription {subscription}"))?;
            let by = operator();
            let mut tx = pool.begin().await.context("starting a transaction")?;
            let scaled = requests::set_node_count(
                &mut tx,
                id,
                count,
                requests::NodeShape {
                    instance_type: flag(args, "--type")?,
                    volume_gb: None,
                },
                &domain,
                &by,
            )
            .await?;
            tx.commit().await.context("recording the request")?;
            for node in &scaled.added {
                println!("provisioning {node}");
            }
            for node in &scaled.removed {
                println!("tearing down {node}");
            }
            println!(
                "subscription {id}: {} node(s) added, {} torn down",
                scaled.added.len(),
                scaled.removed.len()
            );
            Ok(())
        }
        _ => bail!(USAGE),
    }
}

/// Who is asking, for the node's log.
fn operator() -> String {
    let name = std::env::var("HIVE_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("operator {name}")
}

async fn list(pool: &PgPool, state: Option<&str>, user: Option<&str>) -> anyhow::Result<()> {
    let state = state.and_then(NodeState::parse);
    let nodes = hive_jobs::store::list_nodes(pool, state, user)
        .await
        .context("listing nodes")?;
    println!(
        "{:<36}  {:<20}  {:<20}  {:<20}  {:<19}  error",
        "node", "user", "state", "instance", "updated"
    );
    for n in &nodes {
        println!(
            "{}  {:<20}  {:<20}  {:<20}  {:<19}  {}",
            n.id,
            n.user_id,
            n.state(),
            n.instance_id.as_deref().unwrap_or("-"),
            n.updated_at.format("%Y-%m-%d %H:%M:%S"),
            n.error.as_deref().unwrap_or("")
        );
    }
    println!("{} node(s)", nodes.len());
    Ok(())
}

async fn show(pool: &PgPool, id: Uuid) -> anyhow::Result<()> {
    let node = hive_jobs::store::node(pool, id)
        .await
        .context("reading the node")?
        .with_context(|| format!("no node {id}"))?;
    print_node(&node);
    let events = hive_jobs::store::node_events(pool, id)
        .await
        .context("reading the node's events")?;
    println!("events:");
    for e in events {
        println!(
            "  {}  g{}  {:<22} {:<16} {}",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.generation,
            e.step,
            e.kind,
            e.detail.unwrap_or_default()
        );
    }
    Ok(())
}

fn print_node(node: &Node) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("node           {}", node.id);
    println!("user           {}", node.user_id);
    println!("subscription   {}", node.subscription_id);
    println!(
        "state          {} ({:?})",
        node.state(),
        node.state().status()
    );
    println!("desired        {}", node.desired);
    println!("generation     {}", node.generation);
    println!("hostname       {}", node.hostname);
    println!(
        "region         {} {} {} GiB (applied: {} {} GiB)",
        node.region,
        node.instance_type,
        node.volume_gb,
        opt(&node.applied_instance_type),
        node.applied_volume_gb
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    );
    println!("tunnel         {}", opt(&node.tunnel_id));
    println!("secret         {}", opt(&node.secret_arn));
    println!("instance       {}", opt(&node.instance_id));
    println!("dns record     {}", opt(&node.dns_record_id));
    println!("failed step    {}", opt(&node.failed_step));
    println!("waiting for    {}", opt(&node.waiting_for));
    println!("last error     {}", opt(&node.last_error));
    println!("error          {}", opt(&node.error));
}
