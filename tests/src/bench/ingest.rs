//! Webhook ingest: distinct, correctly signed Stripe events (nine in ten of a type we only
//! record, one in ten a `pro` checkout) at 32 connections. Ceiling: pgbench running the
//! handler's writes, in one transaction per event, on the same Postgres, in slices alternating
//! with the load's.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::{
    own_cpu, per_each, pgbench, throughput_figures, Figure, Latencies, PgbenchResult, Size, SLICE,
};
use crate::stack::{Stack, WEBHOOK_SECRET};
use crate::stripe_events::{signature, Fixtures};

const CONNECTIONS: usize = 32;
const SCENARIO: &str = "ingest";

/// The load's figures so far: the latency of each answer, and the ids answered 200.
#[derive(Default)]
struct Load {
    latencies: Latencies,
    accepted: Vec<String>,
    refused: usize,
    seconds: f64,
}

/// One event ready to send: made, serialized and signed before the clock starts, so that the
/// load generator's CPU (which shares the cores with what it measures) is spent on sending,
/// as pgbench's is.
struct Prepared {
    id: String,
    body: Vec<u8>,
    signature: String,
}

fn prepare(fixtures: &Fixtures, n: usize, connection: usize) -> anyhow::Result<Prepared> {
    let event = if n % 10 == 9 {
        fixtures.subscription_checkout(&format!("bench-{connection}-{n}"), "pro", None)?
    } else {
        fixtures.event("customer.created", fixtures.object("customer")?)?
    };
    let body = serde_json::to_vec(&event)?;
    Ok(Prepared {
        id: event["id"].as_str().unwrap_or_default().to_string(),
        signature: signature(&body, WEBHOOK_SECRET),
        body,
    })
}

/// One connection's events: those made before the clock, then any it makes as it goes.
struct Connection {
    index: usize,
    events: std::vec::IntoIter<Prepared>,
    made: usize,
}

impl Connection {
    fn next(&mut self, fixtures: &Fixtures) -> anyhow::Result<Prepared> {
        if let Some(event) = self.events.next() {
            return Ok(event);
        }
        self.made += 1;
        prepare(fixtures, self.made, self.index)
    }
}

/// Makes each connection's events, on every core, before any clock starts.
async fn prepare_all(
    fixtures: &std::sync::Arc<Fixtures>,
    per_connection: usize,
) -> anyhow::Result<Vec<Connection>> {
    let mut making = tokio::task::JoinSet::new();
    for index in 0..CONNECTIONS {
        let fixtures = fixtures.clone();
        making.spawn_blocking(move || {
            let events = (0..per_connection)
                .map(|n| prepare(&fixtures, n, index))
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::Ok(Connection {
                index,
                events: events.into_iter(),
                made: per_connection,
            })
        });
    }
    let mut connections = Vec::with_capacity(CONNECTIONS);
    while let Some(made) = making.join_next().await {
        connections.push(made??);
    }
    Ok(connections)
}

/// One slice of the load: every connection sends its events, one at a time, for `SLICE`.
async fn load_slice(
    client: &reqwest::Client,
    url: &str,
    fixtures: &std::sync::Arc<Fixtures>,
    connections: Vec<Connection>,
    load: &mut Load,
) -> anyhow::Result<Vec<Connection>> {
    let started = Instant::now();
    let until = started + SLICE;
    let mut running = tokio::task::JoinSet::new();
    for mut connection in connections {
        let (fixtures, client, url) = (fixtures.clone(), client.clone(), url.to_string());
        running.spawn(async move {
            let mut slice = Load::default();
            while Instant::now() < until {
                let event = connection.next(&fixtures)?;
                let sent = Instant::now();
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("stripe-signature", event.signature)
                    .body(event.body)
                    .send()
                    .await?;
                let status = answer.status().as_u16();
                answer.bytes().await?;
                slice
                    .latencies
                    .0
                    .push(sent.elapsed().as_secs_f64() * 1000.0);
                if status == 200 {
                    slice.accepted.push(event.id);
                } else {
                    slice.refused += 1;
                }
            }
            anyhow::Ok((connection, slice))
        });
    }
    let mut connections = Vec::with_capacity(CONNECTIONS);
    while let Some(done) = running.join_next().await {
        let (connection, slice) = done??;
        connections.push(connection);
        load.latencies.0.extend(slice.latencies.0);
        load.accepted.extend(slice.accepted);
        load.refused += slice.refused;
    }
    load.seconds += started.elapsed().as_secs_f64();
    Ok(connections)
}

pub async fn run(stack: &Stack, size: Size) -> anyhow::Result<Vec<Figure>> {
    let fixtures = std::sync::Arc::new(Fixtures::load()?);
    // Enough for 12,000 events a second, twice the best this api has done on these cores; a
    // connection that runs out makes the rest as it goes (its CPU then shows below).
    let per_connection =
        12_000 * SLICE.as_secs() as usize * size.rounds() as usize / CONNECTIONS + 1;
    let mut connections = prepare_all(&fixtures, per_connection).await?;
    let ceiling_scripts = CeilingScripts::write(&fixtures)?;

    let url = stack.api_url("/webhooks/stripe");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    // The load runs on one thread of its own, as each of pgbench's clients does: a
    // multi-threaded runtime wakes its other thread for answers, and every wakeup is CPU taken
    // from the cores under measure. It carries the connections from one slice to the next.
    let mut runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut load, mut ceiling) = (Load::default(), PgbenchResult::default());
    let mut client_cpu = Duration::ZERO;
    for _ in 0..size.rounds() {
        let cpu_before = own_cpu();
        let (client, url, fixtures) = (client.clone(), url.clone(), fixtures.clone());
        (runtime, connections, load) = tokio::task::spawn_blocking(move || {
            let connections =
                runtime.block_on(load_slice(&client, &url, &fixtures, connections, &mut load))?;
            anyhow::Ok((runtime, connections, load))
        })
        .await??;
        client_cpu += own_cpu().saturating_sub(cpu_before);
        ceiling.add(ceiling_scripts.run(stack)?);
    }
    runtime.shutdown_background();

    // Every event answered 200 is stored, exactly once.
    let pool = stack.pool().await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE id = ANY($1)")
        .bind(&load.accepted)
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    anyhow::ensure!(
        stored as usize == load.accepted.len(),
        "{} events answered 200, {stored} stored",
        load.accepted.len()
    );
    anyhow::ensure!(load.refused == 0, "{} events were refused", load.refused);

    let rate = load.accepted.len() as f64 / load.seconds.max(f64::MIN_POSITIVE);
    let mut figures = throughput_figures(
        SCENARIO,
        ("events accepted per second".into(), rate),
        &load.latencies,
        20.0,
        per_each(client_cpu, load.latencies.0.len() as u64),
        (&ceiling, "pgbench: the handler's writes"),
    );
    figures.push(Figure::new(
        SCENARIO,
        "events stored once",
        stored as f64,
        "events",
    ));
    Ok(figures)
}

/// pgbench with the handler's writes: nine record-only events (one statement, as the handler
/// records them) to one checkout (the request's tag, the event, its subscription, its node and
/// the node's job in one transaction).
struct CeilingScripts {
    _dir: tempfile::TempDir,
    record_sql: std::path::PathBuf,
    checkout_sql: std::path::PathBuf,
}

impl CeilingScripts {
    fn write(fixtures: &Fixtures) -> anyhow::Result<Self> {
        let payload = |v: Value| -> anyhow::Result<String> {
            Ok(serde_json::to_string(&v)?.replace('\'', "''"))
        };
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
        Ok(Self {
            _dir: dir,
            record_sql,
            checkout_sql,
        })
    }

    /// One slice of the ceiling.
    fn run(&self, stack: &Stack) -> anyhow::Result<PgbenchResult> {
        pgbench(
            &stack.database_url,
            &[(&self.record_sql, 9), (&self.checkout_sql, 1)],
            CONNECTIONS as u32,
            SLICE,
        )
        .context("the ingest ceiling")
    }
}
