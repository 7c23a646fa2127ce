//! Call budgets shared by all workers through Postgres: a burst of checkouts on three workers
//! waits its turn instead of earning Cloudflare's 429s.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_one_cloudflare_budget_and_earn_no_429() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RATE_BUDGET_CLOUDFLARE", "90/10s"),
            ("HIVE_RECONCILE_SCHEDULE", "off"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    // Cloudflare's limit, played by the stand-in: 100 calls in any 10 s.
    stack.standin.limit_rate(100, Duration::from_secs(10));
    stack.start_api().unwrap();
    for _ in 0..3 {
        stack.start_worker().unwrap();
    }
    let mut nodes = Vec::new();
    for n in 0..50 {
        nodes.extend(
            stack
                .send_checkout(&format!("burst-{n}"), "pro")
                .await
                .unwrap(),
        );
    }
    assert_eq!(nodes.len(), 50);
    for node in &nodes {
        let error = stack
            .wait_for_state(node, "ready", Duration::from_secs(400))
            .await
            .unwrap();
        assert_eq!(error, None);
    }
    let (calls, throttled) = stack.standin.call_counts();
    println!(
        "50 pro checkouts on three workers: {calls} Cloudflare calls, {throttled} answered 429"
    );
    assert_eq!(
        throttled, 0,
        "the stand-in answered 429 to {throttled} of {calls} calls"
    );
    // More than two windows' worth: the budget, not luck, kept the workers under the limit.
    assert!(calls > 200, "only {calls} calls");
}
