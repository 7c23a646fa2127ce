//! AWS failing under the worker (through the fault proxy in front of moto): 500s, 503s,
//! throttling, no capacity, hangs past the client timeout, changes that succeed while the answer
//! is lost, a permanent refusal, and instances that stay `pending`.

use std::time::{Duration, Instant};

use hive_tests::aws_proxy::{AwsFault, AwsFaultMode};
use hive_tests::stack::{Stack, StackOptions};
use sqlx::PgPool;

fn options(extra: &[(&str, &str)]) -> StackOptions {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_HTTP_TIMEOUT_MS", "1000"),
            ("HIVE_RETRY_BUDGET", "12"),
            ("HIVE_HEARTBEAT_MS", "500"),
            ("HIVE_STALL_AFTER_MS", "3000"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    options
}

/// Every instance moto ever launched for the node, in any state.
async fn instances_of(stack: &Stack, node_id: &str) -> Vec<String> {
    let all = stack.tagged_instances().await.unwrap();
    all.into_iter()
        .filter(|i| i.node_id == node_id)
        .map(|i| i.id)
        .collect()
}

/// The steps whose log holds a scheduled retry.
async fn retried_steps(pool: &PgPool, node_id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT step FROM node_events
         WHERE node_id = $1::uuid AND kind = 'retry_scheduled' ORDER BY step",
    )
    .bind(node_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_aws_failures_are_retried_and_nothing_is_made_twice() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    let proxy = stack.aws_proxy.clone();
    // Each fault fires more often than the SDK's own single retry, so the worker's stored
    // retries are what carries the node through. They fire in the order armed.
    for fault in [
        AwsFault::new("RunInstances", AwsFaultMode::InsufficientCapacity, 2),
        AwsFault::new("RunInstances", AwsFaultMode::DropAfterSuccess, 2),
        AwsFault::new("CreateSecret", AwsFaultMode::DropAfterSuccess, 2),
        AwsFault::new("TagResource", AwsFaultMode::Throttle, 3),
        AwsFault::new("DescribeInstances", AwsFaultMode::Hang, 1),
        AwsFault::new("DescribeInstances", AwsFaultMode::ServerError, 2),
        AwsFault::new("ChangeResourceRecordSets", AwsFaultMode::Unavailable, 2),
        AwsFault::new("ChangeResourceRecordSets", AwsFaultMode::Throttle, 1),
    ] {
        proxy.inject(fault);
    }
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (subscription, nodes) = stack
        .send_subscription_checkout("user-aws-faults", "pro")
        .await
        .unwrap();
    let node = &nodes[0];
    stack
        .wait_for_state(node, "ready", Duration::from_secs(120))
        .await
        .unwrap();
    let armed: Vec<String> = proxy.armed().iter().map(|f| f.operation.clone()).collect();
    assert!(armed.is_empty(), "faults that never fired: {armed:?}");

    // Two launches reached moto (the second answered from its client token); one instance.
    assert_eq!(instances_of(&stack, node).await.len(), 1);
    let left = stack.leftovers().await.unwrap();
    assert_eq!(left.len(), 5, "one of each resource: {left:#?}");
    let pool = stack.pool().await.unwrap();
    let retried = retried_steps(&pool, node).await;
    for step in [
        "launching_instance",
        "storing_secret",
        "binding_secret",
        "routing_route53",
    ] {
        assert!(
            retried.contains(&step.to_string()),
            "{step} not retried: {retried:?}"
        );
    }

    // The same on the way out: every deletion fails first, some after they happened.
    for fault in [
        AwsFault::new(
            "ChangeResourceRecordSets",
            AwsFaultMode::DropAfterSuccess,
            2,
        ),
        AwsFault::new("TerminateInstances", AwsFaultMode::Throttle, 2),
        AwsFault::new("TerminateInstances", AwsFaultMode::DropAfterSuccess, 2),
        AwsFault::new("DeleteSecret", AwsFaultMode::ServerError, 2),
        AwsFault::new("DeleteSecret", AwsFaultMode::Hang, 1),
    ] {
        proxy.inject(fault);
    }
    stack.send_subscription_end(&subscription).await.unwrap();
    stack
        .wait_for_state(node, "terminated", Duration::from_secs(120))
        .await
        .unwrap();
    let armed: Vec<String> = proxy.armed().iter().map(|f| f.operation.clone()).collect();
    assert!(armed.is_empty(), "faults that never fired: {armed:?}");
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let retried = retried_steps(&pool, node).await;
    for step in [
        "deleting_route53_record",
        "terminating_instance",
        "deleting_secret",
    ] {
        assert!(
            retried.contains(&step.to_string()),
            "{step} not retried: {retried:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_refusal_fails_the_node_at_once_and_undoes_it() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack
        .aws_proxy
        .inject(AwsFault::new("RunInstances", AwsFaultMode::AccessDenied, 1));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node = stack
        .send_checkout("user-refused", "pro")
        .await
        .unwrap()
        .remove(0);
    let error = stack
        .wait_for_state(&node, "failed", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(error.contains("UnauthorizedOperation"), "{error}");
    // Not retried: one call, and nothing after it but the undo.
    assert_eq!(stack.aws_proxy.calls("RunInstances"), 1);
    assert_eq!(
        stack.failed_step(&node).await.unwrap().as_deref(),
        Some("launching_instance")
    );
    let pool = stack.pool().await.unwrap();
    assert!(retried_steps(&pool, &node).await.is_empty());
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let (app_status, view) = stack
        .get_as(
            &format!("/api/v1/nodes/{node}"),
            Some(&Stack::jwt("user-refused", 60)),
        )
        .await
        .unwrap();
    assert_eq!((app_status, view["status"].as_str()), (200, Some("failed")));
    // The app is told what failed in plain words, never our account, an ARN or a subnet...
    assert_eq!(view["error_code"], "launch_refused", "{view}");
    let told = view.to_string();
    for internal in [
        "arn:",
        "123456789012",
        "subnet-0123",
        "Encoded authorization",
        "gY3Kx0m",
    ] {
        assert!(
            !told.contains(internal),
            "the app was told {internal}: {view}"
        );
    }
    assert!(
        view["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("the cloud refused to launch the node (reference ")),
        "{view}"
    );
    // ...while the operator sees the whole cause.
    let operator = stack.hivectl_ok(&["node", &node, "--json"]).unwrap();
    assert!(
        operator.contains("UnauthorizedOperation") && operator.contains("123456789012"),
        "{operator}"
    );
}

/// Counts the nodes in each state.
async fn census(pool: &PgPool) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT state, count(*) FROM nodes GROUP BY state")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_pending_instances_do_not_hold_the_workers_slots() {
    let mut stack = Stack::start(options(&[
        ("HIVE_PLANS", "pro=t4g.small:1,fleet=t4g.small:50"),
        ("HIVE_WORKER_CONCURRENCY", "4"),
        ("HIVE_POLL_INTERVAL_MS", "1000"),
    ]))
    .await
    .expect("stack");
    stack.aws_proxy.hold_pending(true);
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let mut fleet = Vec::new();
    for _ in 0..4 {
        fleet.extend(stack.send_checkout("user-fleet", "fleet").await.unwrap());
    }
    assert_eq!(fleet.len(), 200);
    let pool = stack.pool().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let counts = census(&pool).await;
        if counts.get("waiting_for_instance") == Some(&200) {
            break;
        }
        assert!(Instant::now() < deadline, "fleet not launched: {counts:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(stack.aws_proxy.held_count(), 200);

    // Instances launched from now on start normally; the 200 stay pending.
    stack.aws_proxy.hold_pending(false);
    let newcomer = stack
        .send_checkout("user-newcomer", "pro")
        .await
        .unwrap()
        .remove(0);
    stack
        .wait_for_state(&newcomer, "ready", Duration::from_secs(120))
        .await
        .unwrap();
    let counts = census(&pool).await;
    assert_eq!(
        counts.get("waiting_for_instance"),
        Some(&200),
        "the fleet still waits: {counts:?}"
    );

    // Once EC2 reports them running, the fleet finishes too.
    stack.aws_proxy.release_pending();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let counts = census(&pool).await;
        if counts.get("ready") == Some(&201) {
            break;
        }
        assert!(Instant::now() < deadline, "fleet not ready: {counts:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // With 201 tunnels and records, Cloudflare lists them over several pages; orphans made
    // last are on the last page, and the reconciler still finds them and nothing else.
    let ghost = uuid::Uuid::new_v4().to_string();
    stack.plant_cloudflare_orphans(&ghost).await.unwrap();
    let stdout = stack.reconcile_now().unwrap();
    assert!(
        stdout.contains("2 orphan(s) removed, 0 node(s) re-provisioned"),
        "{stdout}"
    );
    let left = stack.leftovers().await.unwrap();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for l in &left {
        *kinds.entry(l.split(' ').next().unwrap_or("")).or_default() += 1;
    }
    assert_eq!(left.len(), 201 * 5, "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undo_refused_is_kept_and_replays_finish_the_undo_then_the_node() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    // Provisioning is refused at launch; its undo is refused at the secret.
    stack
        .aws_proxy
        .inject(AwsFault::new("RunInstances", AwsFaultMode::AccessDenied, 1));
    stack
        .aws_proxy
        .inject(AwsFault::new("DeleteSecret", AwsFaultMode::AccessDenied, 1));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node = stack
        .send_checkout("user-undo-refused", "pro")
        .await
        .unwrap()
        .remove(0);
    let pool = stack.pool().await.unwrap();
    let row = |pool: PgPool, node: String| async move {
        sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
            "SELECT state, failed_step, teardown_reason FROM nodes WHERE id = $1::uuid",
        )
        .bind(node)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let error = stack
        .wait_for_state(&node, "failed", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(error.contains("AccessDeniedException"), "{error}");
    let (_, failed_step, reason) = row(pool.clone(), node.clone()).await;
    assert_eq!(failed_step.as_deref(), Some("deleting_secret"));
    assert_eq!(reason.as_deref(), Some("provisioning_failed"));
    let left = stack.leftovers().await.unwrap();
    assert!(
        left.iter().any(|l| l.starts_with("secret"))
            && left.iter().any(|l| l.starts_with("tunnel")),
        "the secret and the tunnel are kept: {left:#?}"
    );

    // The first replay finishes the undo: the node is failed again, and clean.
    let replay = stack.hivectl(&["replay", &node]).unwrap();
    assert!(replay.status.success(), "{replay:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (state, _, reason) = row(pool.clone(), node.clone()).await;
        if state == "failed" && stack.leftovers().await.unwrap().is_empty() {
            assert_eq!(reason.as_deref(), Some("provisioning_failed"));
            break;
        }
        assert!(Instant::now() < deadline, "undo never finished: {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The second starts the node over, and it comes up.
    let replay = stack.hivectl(&["replay", &node]).unwrap();
    assert!(replay.status.success(), "{replay:?}");
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(instances_of(&stack, &node).await.len(), 1);
}
