//! Webhook ingest: distinct, correctly signed Stripe events (nine in ten of a type we only
//! record, one in ten a `pro` checkout) at 32 connections. Ceiling: pgbench running the
//! handler's writes, in one transaction per event, on the same Postgres.

use std::time::Instant;

use anyhow::Context;
use serde_json::Value;

use super::{pgbench, Figure, Latencies, Size};
use crate::stack::{Stack, WEBHOOK_SECRET};
use crate::stripe_events::{signature, Fixtures};

const CONNECTIONS: usize = 32;
const SCENARIO: &str = "ingest";

/// One connection's share of the load: the latency of each answer, and the ids answered 200.
#[derive(Default)]
struct Load {
    latencies: Vec<f64>,
    accepted: Vec<String>,
    refused: usize,
}

fn event(fixtures: &Fixtures, n: usize, connection: usize) -> anyhow::Result<Value> {
    if n % 10 == 9 {
        fixtures.subscription_checkout(&format!("bench-{connection}-{n}"), "pro", None)
    } else {
        fixtures.event("customer.created", fixtures.object("customer")?)
    }
}

pub async fn run(stack: &Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let fixtures = std::sync::Arc::new(Fixtures::load()?);
    let url = stack.api_url("/webhooks/stripe");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    let started = Instant::now();
    let until = started + size.duration();
    let mut connections = tokio::task::JoinSet::new();
    for connection in 0..CONNECTIONS {
        let (fixtures, client, url) = (fixtures.clone(), client.clone(), url.clone());
        connections.spawn(async move {
            let mut load = Load::default();
            let mut n = 0;
            while Instant::now() < until {
                let event = event(&fixtures, n, connection)?;
                n += 1;
                let body = serde_json::to_vec(&event)?;
                let signed = signature(&body, WEBHOOK_SECRET);
                let sent = Instant::now();
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("stripe-signature", signed)
                    .body(body)
                    .send()
                    .await?;
                let status = answer.status().as_u16();
                answer.bytes().await?;
                load.latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                if status == 200 {
                    load.accepted
                        .push(event["id"].as_str().unwrap_or_default().to_string());
                } else {
                    load.refused += 1;
                }
            }
            anyhow::Ok(load)
        });
    }
    let mut latencies = Latencies::default();
    let mut accepted = Vec::new();
    let mut refused = 0;
    while let Some(load) = connections.join_next().await {
        let load = load??;
        latencies.0.extend(load.latencies);
        accepted.extend(load.accepted);
        refused += load.refused;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Every event answered 200 is stored, exactly once.
    let pool = stack.pool().await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = ANY($1)")
        .bind(&accepted)
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    anyhow::ensure!(
        stored as usize == accepted.len(),
        "{} events answered 200, {stored} stored",
        accepted.len()
    );
    anyhow::ensure!(refused == 0, "{refused} events were refused");

    let ceiling = pgbench_ceiling(stack, &fixtures, size)?;
    let rate = accepted.len() as f64 / elapsed;
    Ok(vec![
        Figure::new(SCENARIO, "events accepted per second", rate, "1/s")
            .against(ceiling.tps, "pgbench: the handler's writes"),
        Figure::new(SCENARIO, "p50 latency", latencies.percentile(50.0), "ms")
            .under(ceiling.latency_ms, "pgbench mean latency"),
        Figure::new(SCENARIO, "p99 latency", latencies.percentile(99.0), "ms")
            .under(20.0, "target"),
        Figure::new(SCENARIO, "events stored once", stored as f64, "events"),
    ])
}

/// pgbench with the handler's writes: nine record-only events (one statement, as the handler
/// records them) to one checkout (the request's tag, the event, its subscription, its node and
/// the node's job in one transaction).
fn pgbench_ceiling(
    stack: &Stack,
    fixtures: &Fixtures,
    size: Size,
) -> anyhow::Result<super::PgbenchResult> {
    let payload =
        |v: Value| -> anyhow::Result<String> { Ok(serde_json::to_string(&v)?.replace('\'', "''")) };
    let record = payload(fixtures.event("customer.created", fixtures.object("customer")?)?)?;
    let checkout = payload(fixtures.subscription_checkout("pgbench", "pro", None)?)?;
    let dir = tempfile::tempdir()?;
    let record_sql = dir.path().join("record.sql");
    let checkout_sql = dir.path().join("checkout.sql");
    std::fs::write(
        &record_sql,
        format!(
            "\\set r random(1, 2000000000)\n\
             INSERT INTO stripe_events (id, event_type, api_version, livemode, payload) \
             VALUES ('evt_pgb_' || :client_id || '_' || :r, 'customer.created', \
             '2025-03-31.basil', false, '{record}') ON CONFLICT (id) DO NOTHING;\n"
        ),
    )?;
    std::fs::write(
        &checkout_sql,
        format!(
            "\\set r random(1, 2000000000)\n\
             BEGIN;\n\
             SELECT set_config('hive.request_id', 'pgbench-' || :r, true);\n\
             WITH e AS (INSERT INTO stripe_events (id, event_type, api_version, livemode, payload) \
               VALUES ('evt_pgc_' || :client_id || '_' || :r, 'checkout.session.completed', \
               '2025-03-31.basil', false, '{checkout}') ON CONFLICT (id) DO NOTHING RETURNING id), \
             s AS (INSERT INTO subscriptions (id, stripe_subscription_id, user_id, plan, region, \
               stripe_event_id) SELECT gen_random_uuid(), 'sub_pgb_' || e.id, 'pgbench-' || e.id, \
               'pro', 'eu-west-1', e.id FROM e RETURNING id, user_id), \
             n AS (INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, \
               instance_type, hostname) SELECT gen_random_uuid(), s.id, 1, s.user_id, \
               'eu-west-1', 't4g.small', gen_random_uuid()::text || '.pgbench' FROM s \
               RETURNING id) \
             INSERT INTO apalis.jobs (job, id, job_type) \
               SELECT convert_to('{{\"node_id\":\"' || n.id || '\"}}', 'UTF8'), \
               gen_random_uuid()::text, 'hive-nodes:pgbench' FROM n;\n\
             COMMIT;\n"
        ),
    )?;
    let result = pgbench(
        &stack.database_url,
        &[(&record_sql, 9), (&checkout_sql, 1)],
        CONNECTIONS as u32,
        size.duration(),
    )
    .context("the ingest ceiling")?;
    Ok(result)
}
