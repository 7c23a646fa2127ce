//! Lists, not lookups: a reconcile pass over 2,000 ready nodes reads each provider by pages and
//! compares in memory, so its calls grow with pages, not nodes; and it finds nothing to do
//! when nothing has drifted.

use hive_tests::stack::{Stack, StackOptions};
use serde_json::Value;

const NODES: usize = 2000;

#[tokio::test(flavor = "multi_thread")]
async fn a_pass_over_two_thousand_ready_nodes_reads_pages_and_finds_nothing_to_do() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RECONCILE_SCHEDULE", "off"),
            // moto takes seconds to write a page of a thousand instances.
            ("HIVE_HTTP_TIMEOUT_MS", "120000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    // The api applies the migrations; no worker runs, so nothing but the pass touches a node.
    stack.start_api().unwrap();

    let seeded = hive_tests::seed::ready_nodes(&stack, NODES).await.unwrap();
    assert_eq!(seeded.len(), NODES);
    let pool = stack.pool().await.unwrap();

    let (cloudflare_before, _) = stack.standin.call_counts();
    let ec2_before = stack.aws_proxy.ec2_calls();
    let out = stack
        .hivectl(&["reconcile", "--grace-secs", "0", "--yes", "--json"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (cloudflare_after, _) = stack.standin.call_counts();
    let cloudflare_calls = cloudflare_after - cloudflare_before;
    let ec2_calls = stack.aws_proxy.ec2_calls() - ec2_before;
    println!(
        "a pass over {NODES} ready nodes: {cloudflare_calls} Cloudflare calls (at most {}), \
         {ec2_calls} EC2 calls (at most {})",
        NODES / 100 + 10,
        NODES / 1000 + 10
    );
    for finding in ["removed", "reprovisioned", "repaired"] {
        assert_eq!(
            report[finding].as_array().map(Vec::len),
            Some(0),
            "{finding}: {report}"
        );
    }
    assert!(
        cloudflare_calls <= (NODES / 100 + 10) as u64,
        "{cloudflare_calls} Cloudflare calls for {NODES} nodes"
    );
    assert!(
        ec2_calls <= (NODES / 1000 + 10) as u32,
        "{ec2_calls} EC2 calls for {NODES} nodes"
    );
    // Nothing was sent back or touched.
    let ready: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE state = 'ready'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ready, NODES as i64);
    pool.close().await;
}
