//! The console's other reads: the queue's health, subscriptions, recorded Stripe events and a
//! node's log (followed as it grows). Each prints a table, or with `--json` a stable shape.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use comfy_table::Cell;
use hive_jobs::model::NodeState;
use hive_jobs::store::{self, StoredStripeEvent, SubscriptionState};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::view::{EventJson, Style};

pub async fn queue(pool: &PgPool, style: &Style, json: bool) -> anyhow::Result<()> {
    let stuck_after = hive_jobs::config::teardown_stuck_after(&hive_jobs::config::process_env())
        .context("HIVE_TEARDOWN_STUCK_SECS")?;
    let health = store::queue_health(pool, stuck_after)
        .await
        .context("reading the queue")?;
    if json {
        return crate::print_json(&health);
    }
    let mut jobs = style.table(&["jobs", "count"]);
    for (status, n) in &health.jobs {
        jobs.add_row(vec![status.clone(), n.to_string()]);
    }
    println!("{jobs}");
    println!(
        "oldest due job: {}",
        health
            .oldest_due_secs
            .map_or_else(|| "none waiting".into(), |s| format!("waiting {s:.1} s"))
    );
    let mut waiting = style.table(&["nodes waiting for", "count"]);
    for (why, n) in &health.waiting {
        waiting.add_row(vec![why.clone(), n.to_string()]);
    }
    println!("\n{waiting}");
    println!("nodes retrying a transient failure: {}", health.retrying);
    println!(
        "teardowns stuck longer than {} s: {}",
        stuck_after.as_secs(),
        health.stuck_teardowns.len()
    );
    if !health.stuck_teardowns.is_empty() {
        let mut stuck = style.table(&["stuck teardown", "step", "for", "last error"]);
        for t in &health.stuck_teardowns {
            stuck.add_row(vec![
                t.id.to_string(),
                t.state.clone(),
                format!("{:.0} s", t.stuck_secs),
                t.last_error.clone().unwrap_or_default(),
            ]);
        }
        println!("{stuck}");
    }
    let mut workers = style.table(&["worker", "last seen"]);
    for (id, seen) in &health.workers {
        workers.add_row(vec![
            id.clone(),
            seen.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    println!("\n{workers}");
    println!("{} worker(s) seen in the last minute", health.workers.len());
    Ok(())
}

/// A subscription as `subscriptions --json` and `subscription --json` give it.
#[derive(Debug, Serialize)]
pub struct SubscriptionJson {
    pub id: Uuid,
    pub stripe_subscription_id: String,
    pub stripe_customer_id: Option<String>,
    pub user: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    pub status: String,
    pub stripe_status: Option<String>,
    pub quantity: i32,
    pub nodes: i64,
    pub nodes_entitled: Option<i32>,
    pub past_due_since: Option<DateTime<Utc>>,
    pub cancel_at: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
}

impl SubscriptionJson {
    fn of((s, nodes): &(SubscriptionState, i64)) -> Self {
        SubscriptionJson {
            id: s.id,
            stripe_subscription_id: s.stripe_subscription_id.clone(),
            stripe_customer_id: s.stripe_customer_id.clone(),
            user: s.user_id.clone(),
            plan: s.plan.clone(),
            region: s.region.clone(),
            status: s.status.clone(),
            stripe_status: s.stripe_status.clone(),
            quantity: s.quantity,
            nodes: *nodes,
            nodes_entitled: s.nodes_entitled,
            past_due_since: s.past_due_since,
            cancel_at: s.cancel_at,
            current_period_end: s.current_period_end,
        }
    }
}

fn subscriptions_table(style: &Style, subs: &[SubscriptionJson]) -> comfy_table::Table {
    let mut table = style.table(&[
        "subscription",
        "stripe",
        "user",
        "plan",
        "stripe status",
        "nodes",
        "entitled",
    ]);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for s in subs {
        table.add_row(vec![
            Cell::new(s.id),
            Cell::new(&s.stripe_subscription_id),
            Cell::new(opt(&s.user)),
            Cell::new(opt(&s.plan)),
            Cell::new(opt(&s.stripe_status)),
            Cell::new(s.nodes),
            Cell::new(
                s.nodes_entitled
                    .map_or_else(|| "-".into(), |n| n.to_string()),
            ),
        ]);
    }
    table
}

pub async fn subscriptions(
    pool: &PgPool,
    style: &Style,
    user: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let subs: Vec<SubscriptionJson> = store::subscriptions(pool, user)
        .await
        .context("listing subscriptions")?
        .iter()
        .map(SubscriptionJson::of)
        .collect();
    if json {
        return crate::print_json(&subs);
    }
    println!("{}", subscriptions_table(style, &subs));
    println!("{} subscription(s)", subs.len());
    Ok(())
}

pub async fn subscription(
    pool: &PgPool,
    style: &Style,
    id: &str,
    json: bool,
) -> anyhow::Result<()> {
    let sub = store::subscription_of(pool, id)
        .await
        .context("reading the subscription")?
        .with_context(|| format!("no subscription {id}"))?;
    let view = SubscriptionJson::of(&sub);
    let nodes = store::find_nodes(
        pool,
        &store::NodeFilter {
            subscription: Some(view.id.to_string()),
            ..Default::default()
        },
    )
    .await
    .context("listing its nodes")?;
    if json {
        #[derive(Serialize)]
        struct Detail<'a> {
            subscription: &'a SubscriptionJson,
            nodes: Vec<crate::view::NodeJson>,
        }
        return crate::print_json(&Detail {
            subscription: &view,
            nodes: nodes.iter().map(crate::view::NodeJson::from).collect(),
        });
    }
    println!(
        "{}",
        subscriptions_table(style, std::slice::from_ref(&view))
    );
    println!("\nnodes:\n{}", crate::view::nodes_table(style, &nodes));
    Ok(())
}

/// A recorded Stripe event (`stripe-events show` adds its payload).
#[derive(Debug, Serialize)]
pub struct StripeEventJson {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub received_at: DateTime<Utc>,
    /// Why it cannot be applied yet, while it is held.
    pub held_reason: Option<String>,
    /// Why it is never applied (another mode than the api's), when it is refused.
    pub refused_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl StripeEventJson {
    fn of(e: StoredStripeEvent, with_payload: bool) -> Self {
        StripeEventJson {
            id: e.id,
            event_type: e.event_type,
            api_version: e.api_version,
            livemode: e.livemode,
            received_at: e.received_at,
            held_reason: e.held_reason,
            refused_reason: e.refused_reason,
            payload: with_payload.then_some(e.payload.0),
        }
    }
}

pub async fn stripe_events(
    pool: &PgPool,
    style: &Style,
    event_type: Option<&str>,
    held_only: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let events: Vec<StripeEventJson> = store::stripe_events(pool, event_type, held_only, limit)
        .await
        .context("listing Stripe events")?
        .into_iter()
        .map(|e| StripeEventJson::of(e, false))
        .collect();
    if json {
        return crate::print_json(&events);
    }
    let mut table = style.table(&["event", "type", "received", "live", "held"]);
    for e in &events {
        table.add_row(vec![
            e.id.clone(),
            e.event_type.clone(),
            e.received_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            e.livemode.to_string(),
            e.held_reason
                .clone()
                .or_else(|| e.refused_reason.as_ref().map(|r| format!("refused: {r}")))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{table}");
    println!("{} event(s)", events.len());
    Ok(())
}

pub async fn stripe_event(pool: &PgPool, id: &str, json: bool) -> anyhow::Result<()> {
    let event = store::stripe_event(pool, id)
        .await
        .context("reading the event")?
        .with_context(|| format!("no Stripe event {id}"))?;
    let view = StripeEventJson::of(event, true);
    if json {
        return crate::print_json(&view);
    }
    println!(
        "{} {} received {} (api {}, live {})",
        view.id,
        view.event_type,
        view.received_at.format("%Y-%m-%d %H:%M:%S"),
        view.api_version.as_deref().unwrap_or("-"),
        view.livemode
    );
    if let Some(reason) = &view.held_reason {
        println!("held: {reason}");
    }
    if let Some(reason) = &view.refused_reason {
        println!("refused, never applied: {reason}");
    }
    let payload = serde_json::to_string_pretty(&view.payload).context("writing the payload")?;
    println!("{payload}");
    Ok(())
}

/// A node's log; with `follow`, new entries as they come until the node is terminated.
pub async fn events(pool: &PgPool, id: Uuid, follow: bool, json: bool) -> anyhow::Result<()> {
    store::node(pool, id)
        .await
        .context("reading the node")?
        .with_context(|| format!("no node {id}"))?;
    let mut last = 0;
    loop {
        for (event_id, event) in store::node_events_after(pool, id, last)
            .await
            .context("reading the node's events")?
        {
            last = event_id;
            if json {
                // One object per line, so that a follower can read as they come.
                let line =
                    serde_json::to_string(&EventJson::from(&event)).context("writing JSON")?;
                println!("{line}");
            } else {
                println!(
                    "{}  g{}  {:<24} {:<16} {}",
                    event.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    event.generation,
                    event.step,
                    event.kind,
                    event.detail.unwrap_or_default()
                );
            }
        }
        if !follow {
            return Ok(());
        }
        let node = store::node(pool, id)
            .await
            .context("reading the node")?
            .with_context(|| format!("node {id} is gone"))?;
        if node.state() == NodeState::Terminated {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
