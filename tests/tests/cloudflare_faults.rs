//! Cloudflare failing under the worker: 500s, throttling, hangs past the client timeout, and
//! changes that succeed remotely while the answer is lost.

use std::time::Duration;

use hive_tests::cloudflare_standin::{Fault, FaultMode};
use hive_tests::stack::{Stack, StackOptions};

const USER: &str = "user-faults";

fn fault(method: &str, path: &str, mode: FaultMode, times: u32) -> Fault {
    Fault {
        method: Some(method.into()),
        path_contains: path.into(),
        mode,
        times,
    }
}

fn options(extra: &[(&str, &str)]) -> StackOptions {
    let mut options = StackOptions::default();
    options
        .extra_env
        .push(("HIVE_HTTP_TIMEOUT_MS".into(), "1000".into()));
    options
        .extra_env
        .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    options
}

async fn checkout(stack: &Stack) -> String {
    stack.send_checkout(USER, "pro").await.unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_cloudflare_failures_are_retried_and_nothing_is_made_twice() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    // The tunnel and the DNS record are created remotely but the answers are lost; the token
    // read fails twice; the ingress PUT is throttled; a status read hangs past the timeout.
    stack
        .standin
        .inject(fault("POST", "/cfd_tunnel", FaultMode::DropAfterSuccess, 1));
    stack
        .standin
        .inject(fault("GET", "/token", FaultMode::ServerError, 2));
    stack
        .standin
        .inject(fault("PUT", "/configurations", FaultMode::Throttle, 2));
    stack.standin.inject(fault(
        "POST",
        "/dns_records",
        FaultMode::DropAfterSuccess,
        1,
    ));
    stack
        .standin
        .inject(fault("GET", "/cfd_tunnel/", FaultMode::Hang, 1));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node_id = checkout(&stack).await;
    stack
        .wait_for_state(&node_id, "ready", Duration::from_secs(120))
        .await
        .unwrap();

    let cf = stack.cloudflare_state().await.unwrap();
    assert_eq!(
        cf["tunnels"].as_array().unwrap().len(),
        1,
        "one tunnel: {cf:#}"
    );
    assert_eq!(
        cf["dns_records"].as_array().unwrap().len(),
        1,
        "one record: {cf:#}"
    );
    let pool = stack.pool().await.unwrap();
    let retried: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT step FROM node_events WHERE node_id = $1::uuid AND kind = 'retry_scheduled'",
    )
    .bind(&node_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let retried: Vec<String> = retried.into_iter().map(|(s,)| s).collect();
    for step in [
        "creating_tunnel",
        "storing_secret",
        "configuring_ingress",
        "routing_cloudflare",
    ] {
        assert!(
            retried.iter().any(|s| s == step),
            "{step} was not retried: {retried:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_that_keeps_failing_spends_its_budget_then_unwinds_to_a_clean_slate() {
    let mut stack = Stack::start(options(&[("HIVE_RETRY_BUDGET", "3")]))
        .await
        .expect("stack");
    stack.standin.inject(fault(
        "PUT",
        "/configurations",
        FaultMode::ServerError,
        1000,
    ));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node_id = checkout(&stack).await;
    let error = stack
        .wait_for_state(&node_id, "failed", Duration::from_secs(120))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(error.contains("gave up after 3 attempts"), "{error}");
    assert!(error.contains("PutTunnelConfiguration"), "{error}");
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());

    let pool = stack.pool().await.unwrap();
    let (retries,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM node_events WHERE node_id = $1::uuid AND kind = 'retry_scheduled'",
    )
    .bind(&node_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        retries, 2,
        "two retries, then the third failure spends the budget"
    );
}
