//! Workers killed mid-request and a database restarted mid-run: every node still becomes
//! ready, and nothing is created twice.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hive_tests::stack::{Stack, StackOptions};
use nix::sys::signal::Signal;

fn options() -> StackOptions {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            (
                "HIVE_PLANS",
                "pro=t4g.small:1,team=t4g.medium:5,fleet=t4g.micro:30",
            ),
            // A dead worker's jobs go back to the queue after 3 missed heartbeats (1.5 s), and
            // its node leases run out after 3 s.
            ("HIVE_HEARTBEAT_MS", "500"),
            ("HIVE_LEASE_MS", "3000"),
            ("HIVE_WORKER_CONCURRENCY", "4"),
            ("HIVE_STALL_AFTER_MS", "3000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    options
}

async fn order(stack: &Stack, user: &str, plan: &str) -> Vec<String> {
    stack.send_checkout(user, plan).await.unwrap()
}

async fn states(stack: &Stack) -> Vec<String> {
    let pool = stack.pool().await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as("SELECT state FROM nodes ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.into_iter().map(|(s,)| s).collect()
}

async fn wait_all_ready(stack: &Stack, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = states(stack).await;
        if now.len() == count && now.iter().all(|s| s == "ready") {
            return;
        }
        assert!(!now.iter().any(|s| s == "failed"), "a node failed: {now:?}");
        assert!(Instant::now() < deadline, "not all ready: {now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Exactly one live instance per node, and one tunnel per node.
async fn assert_one_of_each(stack: &Stack, nodes: &[String]) {
    let mut tagged: Vec<String> = stack
        .tagged_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == "pending" || i.state == "running")
        .map(|i| i.node_id)
        .collect();
    tagged.sort();
    let mut expected = nodes.to_vec();
    expected.sort();
    assert_eq!(tagged, expected, "one instance per node, no more");

    let cf = stack.cloudflare_state().await.unwrap();
    let tunnels: Vec<String> = cf["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["name"]
                .as_str()
                .unwrap()
                .trim_start_matches("hive-")
                .to_string()
        })
        .collect();
    assert_eq!(tunnels.len(), nodes.len(), "one tunnel per node, no more");
    assert_eq!(
        tunnels.into_iter().collect::<BTreeSet<_>>(),
        nodes.iter().cloned().collect::<BTreeSet<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_storm_of_workers_still_gives_thirty_ready_nodes_once_each() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    for _ in 0..3 {
        stack.start_worker().unwrap();
    }
    let nodes = order(&stack, "user-storm", "fleet").await;
    assert_eq!(nodes.len(), 30);

    // SIGKILL a random worker every few hundred milliseconds, and start it again.
    let storm_until = Instant::now() + Duration::from_secs(12);
    let mut kills = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    while Instant::now() < storm_until {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let victim = (seed % 3) as usize;
        stack.workers[victim].kill_now();
        kills += 1;
        let (process, _) =
            hive_tests::process::spawn_ours("hive-worker", &stack.env(), None).unwrap();
        stack.workers[victim] = process;
        tokio::time::sleep(Duration::from_millis(200 + seed % 300)).await;
    }
    assert!(kills >= 20, "the storm killed {kills} workers");

    wait_all_ready(&stack, 30, Duration::from_secs(240)).await;
    assert_one_of_each(&stack, &nodes).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_run_loses_nothing() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    stack.start_worker().unwrap();
    let nodes = order(&stack, "user-pg-restart", "team").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stack.pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.pg.run().unwrap();

    wait_all_ready(&stack, 5, Duration::from_secs(180)).await;
    assert_one_of_each(&stack, &nodes).await;
    for worker in stack.workers.iter_mut() {
        assert!(
            worker.try_wait().is_none(),
            "a worker died with the database"
        );
    }
    // And the app still gets answers after the restart.
    let (status, _) = stack
        .get_as("/api/v1/nodes", Some(&Stack::jwt("user-pg-restart", 60)))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // SIGTERM: the workers stop taking jobs and exit 0 within their deadline.
    for worker in stack.workers.iter_mut() {
        let status = worker.stop(Signal::SIGTERM, Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "exit on SIGTERM: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_comes_back_late_cannot_overwrite_a_newer_result() {
    use hive_tests::aws_proxy::{AwsFault, AwsFaultMode};
    let mut options = options();
    options.extra_env.extend(
        [
            ("HIVE_LEASE_MS", "1000"),
            ("HIVE_STALL_AFTER_MS", "1000"),
            ("HIVE_HTTP_TIMEOUT_MS", "10000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    // The first launch happens at once, but its answer reaches the worker only after its
    // lease has run out and another worker has taken the node over.
    stack.aws_proxy.inject(AwsFault::new(
        "RunInstances",
        AwsFaultMode::SlowAnswer(Duration::from_secs(6)),
        1,
    ));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    stack.start_worker().unwrap();
    let node = order(&stack, "user-late", "pro").await.remove(0);
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(60))
        .await
        .unwrap();
    // Let the late answer arrive and its worker try to commit.
    let pool = stack.pool().await.unwrap();
    let generation = |pool: sqlx::PgPool, node: String| async move {
        sqlx::query_as::<_, (String, i32)>(
            "SELECT state, generation FROM nodes WHERE id = $1::uuid",
        )
        .bind(node)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = generation(pool.clone(), node.clone()).await;
    while stack.aws_proxy.calls("RunInstances") < 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(generation(pool.clone(), node.clone()).await, before);
    assert_eq!(before.0, "ready");
    let (launches,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM node_events WHERE node_id = $1::uuid \
         AND step = 'launching_instance' AND kind = 'succeeded'",
    )
    .bind(&node)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(launches, 1, "the late result was not recorded");
    // The worker that took over found the instance instead of launching another.
    assert_eq!(stack.aws_proxy.calls("RunInstances"), 1);
    assert_one_of_each(&stack, std::slice::from_ref(&node)).await;
}
