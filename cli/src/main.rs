//! hivectl: the operator's console over the same database as the api and the worker.
//!
//! Exit codes: 0 done; 1 refused or failed (one line on stderr saying why); 2 a usage error.
//! Every request is recorded in the node's log with the operator's name (`HIVE_OPERATOR`, else
//! the login name), and carried out by the worker through the same entry points as the api's.

mod doctor;
mod inspect;
mod view;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Args, CommandFactory, Parser, Subcommand};
use hive_jobs::model::{NodeState, NodeStatus, TeardownReason};
use hive_jobs::operator::replay_failed_node;
use hive_jobs::requests;
use hive_jobs::store::{self, NodeFilter};
use hive_jobs::stripe_events::{self, EventEnvelope};
use sqlx::PgPool;
use uuid::Uuid;

use crate::view::{NodeDetailJson, NodeJson, Style};

#[derive(Debug, Parser)]
#[command(
    name = "hivectl",
    version,
    about = "The operator's console of Hive Provisioner",
    long_about = "The operator's console of Hive Provisioner: inspect nodes, replay failed ones, \
        ask nodes to change, reconcile the clouds with the database.\n\n\
        Reads DATABASE_URL (and, for reconcile, the worker's settings).\n\n\
        Exit codes: 0 done; 1 refused or failed; 2 usage error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List nodes, oldest first.
    Nodes {
        #[command(flatten)]
        filter: Filter,
        /// Only nodes in this exact state (`waiting_for_instance`, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only nodes of this status (`ready`, `failed`, `suspended`, ...).
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One node: what it is, what it should be, its conditions and its log.
    Node {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A node's log; `--follow` prints new entries as they come, until it is terminated.
    Events {
        id: String,
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Subscriptions, newest first, with their node counts.
    Subscriptions {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One subscription (ours or Stripe's id) and its nodes.
    Subscription {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Recorded Stripe events.
    #[command(subcommand)]
    StripeEvents(StripeEvents),
    /// The queue: jobs by state, the oldest due job, nodes waiting and why, workers seen.
    Queue {
        #[arg(long)]
        json: bool,
    },
    /// Check settings, Postgres, AWS, Cloudflare, Stripe, migrations and clocks; exit 1 if any
    /// check fails.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Resume failed nodes from their failed step (or redo an undone provisioning).
    Replay {
        /// The nodes to replay.
        ids: Vec<String>,
        /// Every failed node matching the filters instead.
        #[arg(long, conflicts_with = "ids")]
        all_failed: bool,
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Tear a node down; a provisioning under way is stopped and undone.
    Cancel { id: String },
    /// Stop a node for billing (only billing or `resume` undoes it).
    Suspend { id: String },
    /// Start a suspended node again.
    Resume { id: String },
    /// Reboot a node's instance.
    Restart { id: String },
    /// Tear a node down.
    Terminate { id: String },
    /// Give a node another instance type and/or a larger volume.
    Resize {
        id: String,
        /// A t4g instance type.
        #[arg(long = "type")]
        instance_type: Option<String>,
        #[arg(long)]
        volume_gb: Option<i32>,
    },
    /// Provision or tear down whole nodes of a subscription (ours or Stripe's id).
    Scale {
        subscription: String,
        count: u32,
        /// The instance type of nodes added (default: the subscription's).
        #[arg(long = "type")]
        instance_type: Option<String>,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Remove orphans from the clouds and send back ready nodes whose resources vanished
    /// (prints what it found and asks first, unless --yes).
    Reconcile {
        /// Only print what would be removed and healed.
        #[arg(long, conflicts_with = "yes")]
        dry_run: bool,
        /// Do it without asking.
        #[arg(long)]
        yes: bool,
        /// How old an orphan must be to be removed.
        #[arg(long, default_value_t = 600)]
        grace_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum StripeEvents {
    /// The latest events, newest first.
    List {
        /// Only events of this type (`checkout.session.completed`, ...).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only the events held because they cannot be applied yet (an unknown plan, a region
        /// not served), with why.
        #[arg(long)]
        held: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One event with its payload.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Apply a recorded event again (after fixing the plans it named, say). Safe: a snapshot
    /// no newer than what its subscription holds changes nothing. Reads the api's settings.
    Reprocess {
        id: String,
        #[command(flatten)]
        confirm: Confirm,
    },
}

/// Which nodes (for `nodes` and `replay --all-failed`).
#[derive(Debug, Args)]
struct Filter {
    /// Only this user's nodes.
    #[arg(long)]
    user: Option<String>,
    /// Only this subscription's nodes (ours or Stripe's `sub_...`).
    #[arg(long)]
    subscription: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// Only nodes that failed at this step.
    #[arg(long)]
    failed_step: Option<String>,
    /// Only nodes changed since: RFC 3339, or an age such as `30m`, `2h`, `7d`.
    #[arg(long)]
    since: Option<String>,
}

/// For commands that change more than one node.
#[derive(Debug, Args)]
struct Confirm {
    /// Do it without asking.
    #[arg(long)]
    yes: bool,
    /// Only print what would be done.
    #[arg(long, conflicts_with = "yes")]
    dry_run: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` print and exit 0; a usage error prints and exits 2.
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hivectl: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: the chain of contexts joined.
            eprintln!("hivectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let style = Style::of_stdout();
    match command {
        Command::Nodes {
            filter,
            state,
            status,
            json,
        } => {
            let mut filter = filter.resolve()?;
            filter.states = states_of(state.as_deref(), status.as_deref())?;
            let nodes = store::find_nodes(&pool().await?, &filter)
                .await
                .context("listing nodes")?;
            if json {
                let out: Vec<NodeJson> = nodes.iter().map(NodeJson::from).collect();
                print_json(&out)
            } else {
                println!("{}", view::nodes_table(&style, &nodes));
                println!("{} node(s)", nodes.len());
                Ok(())
            }
        }
        Command::Node { id, json } => {
            let id = node_id(&id)?;
            let pool = pool().await?;
            let node = store::node(&pool, id)
                .await
                .context("reading the node")?
                .with_context(|| format!("no node {id}"))?;
            let events = store::node_events(&pool, id)
                .await
                .context("reading the node's events")?;
            let detail = NodeDetailJson::new(&node, &events);
            if json {
                print_json(&detail)
            } else {
                println!("{}", view::node_detail(&style, &detail));
                Ok(())
            }
        }
        Command::Events { id, follow, json } => {
            inspect::events(&pool().await?, node_id(&id)?, follow, json).await
        }
        Command::Subscriptions { user, json } => {
            inspect::subscriptions(&pool().await?, &style, user.as_deref(), json).await
        }
        Command::Subscription { id, json } => {
            inspect::subscription(&pool().await?, &style, &id, json).await
        }
        Command::StripeEvents(StripeEvents::List {
            event_type,
            held,
            limit,
            json,
        }) => {
            if !(1..=1000).contains(&limit) {
                bail!("--limit must be 1 to 1000");
            }
            let pool = pool().await?;
            inspect::stripe_events(&pool, &style, event_type.as_deref(), held, limit, json).await
        }
        Command::StripeEvents(StripeEvents::Show { id, json }) => {
            inspect::stripe_event(&pool().await?, &id, json).await
        }
        Command::StripeEvents(StripeEvents::Reprocess { id, confirm }) => {
            reprocess(&id, &confirm).await
        }
        Command::Queue { json } => inspect::queue(&pool().await?, &style, json).await,
        Command::Doctor { json } => {
            let checks = doctor::run().await;
            if json {
                print_json(&checks)?;
            } else {
                for c in &checks {
                    let mark = if c.ok { "ok  " } else { "FAIL" };
                    println!("{mark}  {:<20} {}", c.name, c.detail);
                }
            }
            let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
            if failed.is_empty() {
                Ok(())
            } else {
                bail!("failing: {}", failed.join(", "))
            }
        }
        Command::Replay {
            ids,
            all_failed,
            filter,
            confirm,
        } => replay(ids, all_failed, filter, confirm).await,
        Command::Cancel { id } => request(&id, Request::Terminate).await,
        Command::Suspend { id } => request(&id, Request::Suspend).await,
        Command::Resume { id } => request(&id, Request::Resume).await,
        Command::Restart { id } => request(&id, Request::Restart).await,
        Command::Terminate { id } => request(&id, Request::Terminate).await,
        Command::Resize {
            id,
            instance_type,
            volume_gb,
        } => {
            request(
                &id,
                Request::Resize {
                    instance_type,
                    volume_gb,
                },
            )
            .await
        }
        Command::Scale {
            subscription,
            count,
            instance_type,
            confirm,
        } => scale(&subscription, count, instance_type.as_deref(), &confirm).await,
        Command::Reconcile {
            dry_run,
            yes,
            grace_secs,
            json,
        } => reconcile(dry_run, yes, grace_secs, json).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "hivectl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("writing JSON")?;
    println!("{text}");
    Ok(())
}

fn node_id(raw: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(raw).with_context(|| format!("`{raw}` is not a node id"))
}

async fn pool() -> anyhow::Result<PgPool> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    PgPool::connect(&url)
        .await
        .context("connecting to the database")
}

/// The states a `--state` or `--status` names (both: those of the state that show the status).
fn states_of(state: Option<&str>, status: Option<&str>) -> anyhow::Result<Option<Vec<NodeState>>> {
    let state = state
        .map(|s| NodeState::parse(s).with_context(|| format!("`{s}` is not a node state")))
        .transpose()?;
    let status = status
        .map(|s| NodeStatus::parse(s).with_context(|| format!("`{s}` is not a node status")))
        .transpose()?;
    Ok(match (state, status) {
        (None, None) => None,
        (Some(state), None) => Some(vec![state]),
        (state, Some(status)) => Some(
            NodeState::ALL
                .into_iter()
                .filter(|s| s.status() == status && state.is_none_or(|only| only == *s))
                .collect(),
        ),
    })
}

impl Filter {
    fn resolve(self) -> anyhow::Result<NodeFilter> {
        if let Some(step) = &self.failed_step {
            NodeState::parse(step).with_context(|| format!("`{step}` is not a step"))?;
        }
        Ok(NodeFilter {
            states: None,
            user_id: self.user,
            subscription: self.subscription,
            region: self.region,
            failed_step: self.failed_step,
            since: self.since.as_deref().map(since).transpose()?,
        })
    }
}

/// RFC 3339, or an age back from now (`90s`, `30m`, `2h`, `7d`).
fn since(raw: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    let bad = || format!("`{raw}` is neither an RFC 3339 time nor an age like 30m, 2h or 7d");
    let split = raw.len().checked_sub(1).with_context(bad)?;
    let (number, unit) = raw.split_at(split);
    let n: i64 = number.parse().ok().with_context(bad)?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!(bad()),
    };
    Ok(Utc::now() - chrono::TimeDelta::seconds(n.saturating_mul(secs)))
}

/// Who is asking, for the node's log.
fn operator() -> String {
    let name = std::env::var("HIVE_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("operator {name}")
}

/// Asks on the terminal before a change of many nodes; refuses without a terminal.
fn confirmed(confirm: &Confirm, what: &str) -> anyhow::Result<bool> {
    if confirm.yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what}: refusing without a terminal to ask on; pass --yes (or --dry-run)");
    }
    print!("{what}? [y/N] ");
    std::io::stdout().flush().context("writing the question")?;
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn replay(
    ids: Vec<String>,
    all_failed: bool,
    filter: Filter,
    confirm: Confirm,
) -> anyhow::Result<()> {
    let pool = pool().await?;
    let targets: Vec<Uuid> = if all_failed {
        let mut filter = filter.resolve()?;
        filter.states = Some(vec![NodeState::Failed]);
        store::find_nodes(&pool, &filter)
            .await
            .context("listing failed nodes")?
            .into_iter()
            .map(|n| n.id)
            .collect()
    } else {
        if ids.is_empty() {
            bail!("name the nodes to replay, or pass --all-failed");
        }
        ids.iter().map(|id| node_id(id)).collect::<Result<_, _>>()?
    };
    if targets.len() > 1 || all_failed {
        for id in &targets {
            println!("would replay {id}");
        }
        if confirm.dry_run {
            println!(
                "{} node(s) would be replayed (dry run: nothing done)",
                targets.len()
            );
            return Ok(());
        }
        if targets.is_empty() {
            println!("no failed node matches");
            return Ok(());
        }
        if !confirmed(&confirm, &format!("replay {} node(s)", targets.len()))? {
            bail!("not confirmed; nothing done");
        }
    } else if confirm.dry_run {
        println!("would replay {} (dry run: nothing done)", targets[0]);
        return Ok(());
    }
    let mut failures = 0;
    let by = operator();
    for id in &targets {
        match replay_failed_node(&pool, *id, &by).await {
            Ok(replayed) => println!(
                "node {} resumes at {} (generation {})",
                replayed.node_id, replayed.step, replayed.generation
            ),
            Err(e) if targets.len() == 1 => return Err(e.into()),
            Err(e) => {
                failures += 1;
                eprintln!("hivectl: node {id}: {e}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} replays refused", targets.len());
    }
    Ok(())
}

enum Request {
    Suspend,
    Resume,
    Restart,
    Terminate,
    Resize {
        instance_type: Option<String>,
        volume_gb: Option<i32>,
    },
}

impl Request {
    fn verb(&self) -> &'static str {
        match self {
            Request::Suspend => "suspend",
            Request::Resume => "resume",
            Request::Restart => "restart",
            Request::Terminate => "terminate",
            Request::Resize { .. } => "resize",
        }
    }
}

/// Records a request of one node, in one transaction with its job.
async fn request(id: &str, request: Request) -> anyhow::Result<()> {
    let id = node_id(id)?;
    let pool = pool().await?;
    let by = operator();
    let mut tx = pool.begin().await.context("starting a transaction")?;
    match &request {
        Request::Suspend => requests::suspend(&mut tx, id, &by).await?,
        Request::Resume => requests::resume(&mut tx, id, &by).await?,
        Request::Restart => requests::restart(&mut tx, id, &by).await?,
        Request::Terminate => {
            requests::terminate(&mut tx, id, TeardownReason::Requested, &by).await?
        }
        Request::Resize {
            instance_type,
            volume_gb,
        } => {
            let node = store::node(&pool, id)
                .await?
                .with_context(|| format!("no node {id}"))?;
            let instance_type = instance_type.as_deref().unwrap_or(&node.instance_type);
            let volume_gb = volume_gb.unwrap_or(node.volume_gb);
            requests::resize(&mut tx, id, instance_type, volume_gb, &by).await?
        }
    }
    tx.commit().await.context("recording the request")?;
    println!("node {id}: {} requested by {by}", request.verb());
    Ok(())
}

async fn scale(
    subscription: &str,
    count: u32,
    instance_type: Option<&str>,
    confirm: &Confirm,
) -> anyhow::Result<()> {
    let domain = std::env::var("HIVE_NODE_DOMAIN").context("HIVE_NODE_DOMAIN is not set")?;
    let pool = pool().await?;
    let (sub, live) = store::subscription_of(&pool, subscription)
        .await?
        .with_context(|| format!("no subscription {subscription}"))?;
    let id = sub.id;
    let change = i64::from(count) - live;
    let plan = match change {
        0 => "no change".to_string(),
        n if n > 0 => format!("would add {n} node(s)"),
        n => format!("would tear down {} node(s)", -n),
    };
    println!("subscription {id}: {live} -> {count} node(s): {plan}");
    if confirm.dry_run {
        println!("dry run: nothing done");
        return Ok(());
    }
    if change.abs() > 1 && !confirmed(confirm, &format!("scale to {count} node(s)"))? {
        bail!("not confirmed; nothing done");
    }
    let by = operator();
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let scaled = requests::set_node_count(
        &mut tx,
        id,
        count,
        requests::NodeShape {
            instance_type,
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

async fn reconcile(dry_run: bool, yes: bool, grace_secs: u64, json: bool) -> anyhow::Result<()> {
    let config = hive_jobs::config::WorkerConfig::from_env(&hive_jobs::config::process_env())?;
    let pool = pool().await?;
    // The providers' call budgets, shared with the workers.
    let budgets = hive_jobs::connections::Connections::to_url(&config.database_url, 2)?;
    let budgets: std::sync::Arc<dyn hive_jobs::cloud::budget::BudgetLedger> =
        std::sync::Arc::new(hive_jobs::store::BudgetBuckets::new(budgets));
    let clouds = hive_jobs::cloud::Clouds::from_config(&config, Some(budgets)).await?;
    let grace = std::time::Duration::from_secs(grace_secs);
    let ask_first = !dry_run && !yes;
    let report = if dry_run || ask_first {
        hive_jobs::reconcile::dry_run(&pool, &clouds, &config.node_domain, grace).await?
    } else {
        hive_jobs::reconcile::reconcile(&pool, &clouds, &config.node_domain, grace).await?
    };
    if ask_first {
        for removed in &report.removed {
            println!("would remove {removed}");
        }
        for node in &report.reprovisioned {
            println!("would re-provision {node}");
        }
        for repair in &report.repaired {
            println!("would repair {repair}");
        }
        if report.removed.is_empty()
            && report.reprovisioned.is_empty()
            && report.repaired.is_empty()
        {
            println!("nothing to do");
            return Ok(());
        }
        let confirm = Confirm {
            yes: false,
            dry_run: false,
        };
        if !confirmed(&confirm, "reconcile")? {
            bail!("not confirmed; nothing done");
        }
        return Box::pin(reconcile(false, true, grace_secs, json)).await;
    }
    if json {
        return print_json(&serde_json::json!({
            "dry_run": dry_run,
            "removed": report.removed,
            "reprovisioned": report.reprovisioned,
            "repaired": report.repaired,
        }));
    }
    let (remove, heal) = if dry_run {
        ("would remove", "would re-provision")
    } else {
        ("removed", "re-provisioning")
    };
    for removed in &report.removed {
        println!("{remove} {removed}");
    }
    for node in &report.reprovisioned {
        println!("{heal} {node}");
    }
    for repair in &report.repaired {
        println!(
            "{} {repair}",
            if dry_run { "would repair" } else { "repaired" }
        );
    }
    println!(
        "{} orphan(s) {}, {} node(s) {}{}",
        report.removed.len(),
        if dry_run { "found" } else { "removed" },
        report.reprovisioned.len(),
        if dry_run {
            "to re-provision"
        } else {
            "re-provisioned"
        },
        if dry_run {
            " (dry run: nothing done)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Applies a recorded Stripe event again: first in a transaction that is rolled back, to say
/// what it would do (no lock is held while asking), then for real once confirmed.
async fn reprocess(id: &str, confirm: &Confirm) -> anyhow::Result<()> {
    let config = hive_jobs::config::ApiConfig::from_env(&hive_jobs::config::process_env())
        .context("reprocessing reads the api's settings")?;
    let pool = pool().await?;
    let stored = store::stripe_event(&pool, id)
        .await
        .context("reading the event")?
        .with_context(|| format!("no Stripe event {id}"))?;
    let event = EventEnvelope::of(&stored.payload.0)?;
    if let Some(why) = stripe_events::refused(&event, &config) {
        bail!("{id} is refused, never applied: {why}");
    }
    let meaning =
        stripe_events::meaning(&event, &config).with_context(|| match &stored.held_reason {
            Some(_) => format!("{id} is still held"),
            None => format!("{id} cannot be applied"),
        })?;
    let held = stored.held_reason.is_some();
    let apply = |commit: bool| {
        let (pool, meaning, config, event_id) = (&pool, &meaning, &config, &event.id);
        async move {
            let mut tx = pool.begin().await.context("starting a transaction")?;
            // A held event is applied once: taking it off hold is part of the change.
            if held && !store::take_held_stripe_event(&mut tx, event_id).await? {
                bail!("{event_id} was applied meanwhile (no longer held)");
            }
            let applied = stripe_events::apply(&mut tx, meaning, event_id, config).await?;
            if commit {
                tx.commit().await.context("recording the change")?;
            } else {
                tx.rollback().await.context("rolling back the trial")?;
            }
            anyhow::Ok(applied)
        }
    };
    let trial = apply(false).await?;
    let (added, removed) = trial
        .as_ref()
        .map_or((0, 0), |a| (a.added.len(), a.removed.len()));
    println!(
        "{} ({}): {}",
        event.id,
        event.event_type,
        match &trial {
            None => "recorded only; nothing to apply".to_string(),
            Some(a) => format!(
                "subscription {}: would add {added} node(s), tear down {removed}",
                a.subscription_id
            ),
        }
    );
    if (trial.is_none() && !held) || confirm.dry_run {
        if confirm.dry_run {
            println!("dry run: nothing done");
        }
        return Ok(());
    }
    if added + removed > 1 && !confirmed(confirm, &format!("reprocess {}", event.id))? {
        bail!("not confirmed; nothing done");
    }
    let applied = apply(true).await?;
    for node in applied.iter().flat_map(|a| a.added.iter()) {
        println!("provisioning {node}");
    }
    for node in applied.iter().flat_map(|a| a.removed.iter()) {
        println!("tearing down {node}");
    }
    println!("{} applied again", event.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_are_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn since_reads_times_and_ages() {
        let t = since("2026-11-01T00:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        let two_hours = Utc::now() - since("2h").unwrap();
        assert!((7190..=7210).contains(&two_hours.num_seconds()));
        for bad in ["", "h", "2y", "yesterday"] {
            assert!(since(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_status_names_every_state_that_shows_it() {
        let states = states_of(None, Some("ready")).unwrap().unwrap();
        assert!(states.contains(&NodeState::Ready));
        assert!(states.iter().all(|s| s.status() == NodeStatus::Ready));
        assert!(states_of(Some("nope"), None).is_err());
        assert!(states_of(None, Some("nope")).is_err());
    }
}
