//! Prometheus metrics of every binary, by Prometheus conventions: a `hive_` prefix, base units
//! (seconds), `_total` counters, and no node or user ids as labels (their number is unbounded).
//! Recorded through the `metrics` facade wherever things happen; served in the text format at
//! `GET /metrics` on `HIVE_METRICS_ADDR`, a listener of its own so that the public port never
//! exposes it. Gauges of the database (nodes by status, the oldest due job) are read at scrape
//! by `store::gauges_at_scrape`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::model::NodeStatus;

pub const HTTP_REQUESTS: &str = "hive_http_requests_total";
pub const HTTP_DURATION: &str = "hive_http_request_duration_seconds";
pub const WEBHOOK_EVENTS: &str = "hive_webhook_events_total";
pub const STEPS: &str = "hive_steps_total";
pub const STEP_DURATION: &str = "hive_step_duration_seconds";
pub const CLOUD_CALLS: &str = "hive_cloud_calls_total";
pub const NODES: &str = "hive_nodes";
pub const OLDEST_DUE_JOB: &str = "hive_queue_oldest_due_job_age_seconds";
pub const TEARDOWNS_STUCK: &str = "hive_teardowns_stuck";
pub const STRIPE_EVENTS_HELD: &str = "hive_stripe_events_held";
pub const RECONCILE_PASSES: &str = "hive_reconcile_passes_total";
pub const RECONCILE_FINDINGS: &str = "hive_reconcile_findings_total";
pub const BUDGET_WAIT: &str = "hive_rate_budget_wait_seconds";
pub const BUDGET_THROTTLED: &str = "hive_rate_budget_throttled_total";

/// Latencies from a millisecond to a minute.
const SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics recorder: {0}")]
    Recorder(#[from] BuildError),
    #[error("binding the metrics listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the process's recorder. Call once, before anything is recorded.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        "Time to answer an HTTP request, by route and method"
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Stripe events received, by type and outcome"
    );
    describe_counter!(STEPS, "Workflow steps run, by workflow, step and outcome");
    describe_histogram!(
        STEP_DURATION,
        "Time a step's action took, by workflow and step"
    );
    describe_counter!(
        CLOUD_CALLS,
        "Calls to cloud APIs, by provider, operation and outcome"
    );
    describe_gauge!(NODES, "Nodes by status (terminated included)");
    describe_gauge!(
        OLDEST_DUE_JOB,
        "Age of the oldest queue job that is due and not started"
    );
    describe_gauge!(
        TEARDOWNS_STUCK,
        "Teardowns retrying longer than HIVE_TEARDOWN_STUCK_SECS (they never give up by themselves)"
    );
    describe_gauge!(
        STRIPE_EVENTS_HELD,
        "Stripe events recorded but held: the configuration cannot apply them yet"
    );
    describe_counter!(RECONCILE_PASSES, "Reconcile passes, by outcome");
    describe_counter!(RECONCILE_FINDINGS, "What reconcile passes fixed, by kind");
    describe_histogram!(
        BUDGET_WAIT,
        "Time a cloud call waited for its shared rate budget, by budget"
    );
    describe_counter!(
        BUDGET_THROTTLED,
        "Rate-limit answers that arrived although within budget, by budget"
    );
}

/// What runs before each scrape is answered: the database gauges' refresh
/// (`store::gauges_at_scrape`), kept to a function so that the metrics know nothing of the store.
pub type BeforeScrape = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

/// Serves `GET /metrics` on `addr` (port 0 picks one); returns the bound address. `before`
/// runs at each scrape; histograms are kept trimmed meanwhile.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    before: BeforeScrape,
) -> Result<SocketAddr, MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            let before = before.clone();
            async move {
                before().await;
                handle.render()
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

/// Nodes by status: every status is set, so one that emptied reads 0, not its last value.
pub fn nodes_by_status(counts: &[(NodeStatus, f64)]) {
    for status in NodeStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0.0, |(_, n)| *n);
        gauge!(NODES, "status" => status.as_str()).set(n);
    }
}

/// The age of the oldest due job that nobody has started.
pub fn oldest_due_job(age: Option<Duration>) {
    gauge!(OLDEST_DUE_JOB).set(age.map_or(0.0, |d| d.as_secs_f64()));
}

/// Stripe events held until the configuration can apply them.
pub fn stripe_events_held(count: i64) {
    gauge!(STRIPE_EVENTS_HELD).set(count as f64);
}

/// Teardowns retrying for longer than the operator's threshold.
pub fn teardowns_stuck(count: usize) {
    gauge!(TEARDOWNS_STUCK).set(count as f64);
}

/// One answered HTTP request (the route is its pattern, `/api/v1/nodes/{id}`, never the path).
pub fn http_request(route: &str, method: &str, status: u16, took: Duration) {
    counter!(HTTP_REQUESTS, "route" => route.to_string(), "method" => method.to_string(),
        "status" => status.to_string())
    .increment(1);
    histogram!(HTTP_DURATION, "route" => route.to_string(), "method" => method.to_string())
        .record(took.as_secs_f64());
}

/// One Stripe event: `recorded`, `held`, `duplicate` or `rejected`.
pub fn webhook_event(event_type: &str, outcome: &'static str) {
    counter!(WEBHOOK_EVENTS, "type" => event_type.to_string(), "outcome" => outcome).increment(1);
}

/// One step run: `advanced`, `waiting`, `retrying`, `failed` or `fenced`.
pub fn step(workflow: &'static str, step: &'static str, outcome: &'static str, took: Duration) {
    counter!(STEPS, "workflow" => workflow, "step" => step, "outcome" => outcome).increment(1);
    histogram!(STEP_DURATION, "workflow" => workflow, "step" => step).record(took.as_secs_f64());
}

/// One call to a cloud API: `ok` or `error`.
pub fn cloud_call(provider: &'static str, operation: &str, ok: bool) {
    counter!(CLOUD_CALLS, "provider" => provider, "operation" => operation.to_string(),
        "outcome" => if ok { "ok" } else { "error" })
    .increment(1);
}

/// One reconcile pass and what it fixed.
pub fn reconcile_pass(ok: bool, removed: usize, reprovisioned: usize, repaired: usize) {
    counter!(RECONCILE_PASSES, "outcome" => if ok { "ok" } else { "error" }).increment(1);
    counter!(RECONCILE_FINDINGS, "kind" => "orphan_removed").increment(removed as u64);
    counter!(RECONCILE_FINDINGS, "kind" => "node_reprovisioned").increment(reprovisioned as u64);
    counter!(RECONCILE_FINDINGS, "kind" => "drift_repaired").increment(repaired as u64);
}

/// A call waited this long for its rate budget.
pub fn budget_wait(budget: &str, waited: Duration) {
    histogram!(BUDGET_WAIT, "budget" => budget.to_string()).record(waited.as_secs_f64());
}

/// A provider rate-limited a call made within budget.
pub fn budget_throttled(budget: &str) {
    counter!(BUDGET_THROTTLED, "budget" => budget.to_string()).increment(1);
}
