//! Metrics and tracing across processes: both binaries serve `/metrics` on a listener of their
//! own (Prometheus text, read here by a Prometheus parser); after a team checkout the step and
//! cloud-call counters and the nodes-by-status gauge show five ready nodes; the webhook's
//! request id is in the api's log line and in the worker's (JSON) log lines of every step of
//! the nodes it created.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions, WEBHOOK_SECRET};
use hive_tests::stripe_events::{signature, Fixtures};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// A loopback address no one listens on now.
fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The sum of `metric`'s samples whose labels include all of `labels`.
fn sum(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_request_ids_follow_a_checkout_through_both_processes() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = StackOptions {
        log_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let api_metrics = free_addr();
    options
        .extra_env
        .push(("HIVE_METRICS_ADDR".into(), api_metrics.to_string()));
    let mut stack = Stack::start(options).await.unwrap();
    let api = stack.start_api().unwrap();
    let worker_metrics = free_addr();
    stack
        .start_worker_with(&[
            ("HIVE_METRICS_ADDR", &worker_metrics.to_string()),
            ("HIVE_LOG_FORMAT", "json"),
        ])
        .unwrap();
    // Metrics are on their own listener, never on the public one.
    let public = reqwest::get(format!("http://{api}/metrics")).await.unwrap();
    assert_eq!(public.status().as_u16(), 404);

    let user = "user-observed";
    let event = Fixtures::load()
        .unwrap()
        .subscription_checkout(user, "team", None)
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let answer = reqwest::Client::new()
        .post(stack.api_url("/webhooks/stripe"))
        .header("stripe-signature", signature(&body, WEBHOOK_SECRET))
        .header("content-type", "application/json")
        .header("x-request-id", "req-observed-42")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(answer.headers()["x-request-id"], "req-observed-42");
    let nodes: Vec<String> = answer.json::<Json>().await.unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes.len(), 5);
    stack
        .wait_all_status(&Stack::jwt(user, 600), "ready", 5, Duration::from_secs(120))
        .await
        .unwrap();

    // The worker's metrics: every node's steps advanced, its cloud calls counted, five ready.
    let worker = scrape(worker_metrics).await;
    assert_eq!(sum(&worker, "hive_nodes", &[("status", "ready")]), 5.0);
    assert_eq!(sum(&worker, "hive_nodes", &[("status", "failed")]), 0.0);
    let provisioning_steps = hive_jobs::model::PROVISIONING.len() as f64;
    let advanced = sum(
        &worker,
        "hive_steps_total",
        &[("workflow", "provisioning"), ("outcome", "advanced")],
    );
    assert!(
        advanced >= 5.0 * (provisioning_steps - 1.0),
        "{advanced} advanced steps for {provisioning_steps} steps"
    );
    let launches = sum(
        &worker,
        "hive_cloud_calls_total",
        &[
            ("provider", "ec2"),
            ("operation", "RunInstances"),
            ("outcome", "ok"),
        ],
    );
    assert_eq!(launches, 5.0);
    let tunnels = sum(
        &worker,
        "hive_cloud_calls_total",
        &[
            ("provider", "cloudflare"),
            ("operation", "CreateTunnel"),
            ("outcome", "ok"),
        ],
    );
    assert_eq!(tunnels, 5.0);
    assert!(worker
        .samples
        .iter()
        .any(|s| s.metric.starts_with("hive_step_duration_seconds")));
    // No node id ever becomes a label.
    for sample in &worker.samples {
        for node in &nodes {
            assert!(
                !format!("{:?}", sample.labels).contains(node.as_str()),
                "{sample:?}"
            );
        }
    }

    // The api's metrics: the webhook by route and status, the event by type and outcome.
    let api_scrape = scrape(api_metrics).await;
    assert_eq!(
        sum(
            &api_scrape,
            "hive_http_requests_total",
            &[("route", "/webhooks/stripe"), ("status", "200")]
        ),
        1.0
    );
    assert!(
        sum(
            &api_scrape,
            "hive_http_requests_total",
            &[
                ("route", "/api/v1/nodes"),
                ("method", "GET"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    assert_eq!(
        sum(
            &api_scrape,
            "hive_webhook_events_total",
            &[
                ("type", "checkout.session.completed"),
                ("outcome", "recorded")
            ]
        ),
        1.0
    );
    assert_eq!(sum(&api_scrape, "hive_nodes", &[("status", "ready")]), 5.0);

    // The request id: in the api's line of the request, and in the worker's JSON lines of
    // every step of each node the request created.
    let api_log = std::fs::read_to_string(dir.path().join("hive-api.log")).unwrap();
    assert!(
        api_log
            .lines()
            .any(|l| l.contains("req-observed-42") && l.contains("stripe event recorded")),
        "no api line of the request"
    );
    let worker_log = std::fs::read_to_string(dir.path().join("hive-worker-0.log")).unwrap();
    let step_lines: Vec<Json> = worker_log
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|l| l["fields"]["message"] == "step succeeded")
        .collect();
    for node in &nodes {
        let of_node: Vec<&Json> = step_lines
            .iter()
            .filter(|l| l["span"]["node_id"] == node.as_str())
            .collect();
        assert!(
            of_node.len() as f64 >= provisioning_steps - 1.0,
            "{node}: {} step lines",
            of_node.len()
        );
        for line in of_node {
            assert_eq!(line["span"]["request_id"], "req-observed-42", "{line}");
            assert!(line["span"]["job_id"].is_string(), "{line}");
            assert!(line["span"]["step"].is_string(), "{line}");
        }
    }
}
