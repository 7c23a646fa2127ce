//! The tests Oxide runs on every saga, for provisioning and teardown: each step and each undo
//! run twice changes nothing; a failure after any step unwinds to a clean slate; a crash
//! between any step's side effect and its commit leaves no duplicate once a worker takes over.

use std::time::{Duration, Instant};

use hive_jobs::model::{NodeState, PROVISIONING, TEARDOWN};
use hive_tests::stack::{Stack, StackOptions};

fn options() -> StackOptions {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_HEARTBEAT_MS", "500"),
            ("HIVE_LEASE_MS", "1500"),
            ("HIVE_STALL_AFTER_MS", "3000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    options
}

async fn wait_for_state(stack: &Stack, node_id: &str, state: &str) {
    stack
        .wait_for_state(node_id, state, Duration::from_secs(90))
        .await
        .unwrap();
}

/// Per node: one live instance, one secret, one tunnel, one Cloudflare record, one Route 53
/// record; and nothing else of ours.
async fn assert_exactly_one_of_each(stack: &Stack, nodes: &[String]) {
    let mut left = stack.leftovers().await.unwrap();
    left.sort();
    let mut expected: Vec<String> = Vec::new();
    for _ in nodes {
        expected.extend(
            [
                "instance",
                "secret",
                "route53 record",
                "tunnel",
                "cloudflare record",
            ]
            .map(String::from),
        );
    }
    let mut kinds: Vec<String> = left
        .iter()
        .map(|l| {
            [
                "instance",
                "secret",
                "route53 record",
                "tunnel",
                "cloudflare record",
            ]
            .into_iter()
            .find(|k| l.starts_with(k))
            .unwrap_or("other")
            .to_string()
        })
        .collect();
    kinds.sort();
    expected.sort();
    assert_eq!(kinds, expected, "{left:#?}");
    for node in nodes {
        let mentions = left.iter().filter(|l| l.contains(node.as_str())).count();
        // Each resource names its node: by tag, name or hostname.
        assert!(mentions >= 3, "resources of {node}: {left:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_step_and_every_undo_run_twice_changes_nothing() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack
        .start_worker_with(&[("HIVE_CHAOS", "repeat")])
        .unwrap();
    let (subscription, mut nodes) = stack
        .send_subscription_checkout("user-twice", "pro")
        .await
        .unwrap();
    let node = nodes.remove(0);
    wait_for_state(&stack, &node, "ready").await;
    assert_exactly_one_of_each(&stack, std::slice::from_ref(&node)).await;

    stack.send_subscription_end(&subscription).await.unwrap();
    wait_for_state(&stack, &node, "terminated").await;
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());

    // The node's log holds every move, each exactly once, in the workflows' order.
    let pool = stack.pool().await.unwrap();
    let moves: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM node_events WHERE node_id = $1::uuid AND kind = 'transition' ORDER BY id",
    )
    .bind(&node)
    .fetch_all(&pool)
    .await
    .unwrap();
    let path: Vec<&str> = PROVISIONING
        .iter()
        .map(|s| s.as_str())
        .chain(["ready"])
        .chain(TEARDOWN.iter().map(|s| s.as_str()))
        .chain(["terminated"])
        .collect();
    let expected: Vec<String> = path
        .windows(2)
        .map(|w| format!("{} -> {}", w[0], w[1]))
        .collect();
    assert_eq!(moves, expected);

    // And the database refuses a move outside the table, changing nothing.
    let illegal = sqlx::query("UPDATE nodes SET state = 'ready' WHERE id = $1::uuid")
        .bind(&node)
        .execute(&pool)
        .await;
    let message = illegal
        .expect_err("terminated -> ready was accepted")
        .to_string();
    assert!(
        message.contains("illegal node transition: terminated -> ready"),
        "{message}"
    );
    let (state,): (String,) = sqlx::query_as("SELECT state FROM nodes WHERE id = $1::uuid")
        .bind(&node)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "terminated");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_after_any_step_unwinds_to_a_clean_slate() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    for step in PROVISIONING {
        let chaos = format!("fail_after:{step}");
        stack
            .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
            .unwrap();
        let node = stack
            .send_checkout(&format!("user-fail-{step}"), "pro")
            .await
            .unwrap()
            .remove(0);
        wait_for_state(&stack, &node, "failed").await;
        assert_eq!(
            stack.failed_step(&node).await.unwrap().as_deref(),
            Some(step.as_str())
        );
        assert_eq!(
            stack.leftovers().await.unwrap(),
            Vec::<String>::new(),
            "after a failure at {step}"
        );
        stack.workers.clear();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_any_side_effect_and_its_commit_leaves_no_duplicate() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    let mut nodes = Vec::new();
    for step in PROVISIONING {
        let chaos = format!("crash_after:{step}");
        let crashing = stack
            .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
            .unwrap();
        let node = stack
            .send_checkout(&format!("user-crash-{step}"), "pro")
            .await
            .unwrap()
            .remove(0);
        take_over_after_crash(&mut stack, crashing, step).await;
        wait_for_state(&stack, &node, "ready").await;
        nodes.push(node);
        assert_exactly_one_of_each(&stack, &nodes).await;
        stack.workers.clear();
    }
}

/// Waits for the worker `crashing` to abort at `step`, then starts a healthy worker, which
/// takes the node over from where the dead one left it.
async fn take_over_after_crash(stack: &mut Stack, crashing: usize, step: NodeState) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.workers[crashing].try_wait().is_none() {
        assert!(Instant::now() < deadline, "the worker never reached {step}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.workers.clear();
    stack.start_worker().unwrap();
}

/// A `pro` node of `user`, provisioned by a plain worker that is then stopped; its
/// subscription and node ids.
async fn ready_node_without_workers(stack: &mut Stack, user: &str) -> (String, String) {
    stack.start_worker().unwrap();
    let (subscription, mut nodes) = stack.send_subscription_checkout(user, "pro").await.unwrap();
    let node = nodes.remove(0);
    wait_for_state(stack, &node, "ready").await;
    stack.workers.clear();
    (subscription, node)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_at_any_teardown_step_is_kept_and_a_replay_finishes_it() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    for step in TEARDOWN {
        let (subscription, node) =
            ready_node_without_workers(&mut stack, &format!("user-undo-fail-{step}")).await;
        let node = &node;

        let chaos = format!("fail_after:{step}");
        stack
            .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
            .unwrap();
        stack.send_subscription_end(&subscription).await.unwrap();
        wait_for_state(&stack, node, "failed").await;
        assert_eq!(
            stack.failed_step(node).await.unwrap().as_deref(),
            Some(step.as_str())
        );
        // A failed teardown starts no further side effect: what later steps remove is there.
        let last = TEARDOWN.last() == Some(&step);
        let left = stack.leftovers().await.unwrap();
        assert_eq!(
            left.is_empty(),
            last,
            "after a failure at {step}: {left:#?}"
        );

        stack.workers.clear();
        stack.start_worker().unwrap();
        let replay = stack.hivectl(&["replay", node]).unwrap();
        assert!(replay.status.success(), "{replay:?}");
        wait_for_state(&stack, node, "terminated").await;
        assert_eq!(
            stack.leftovers().await.unwrap(),
            Vec::<String>::new(),
            "after replaying a failure at {step}"
        );
        stack.workers.clear();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_any_undo_and_its_commit_still_ends_clean() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    for step in TEARDOWN {
        let (subscription, node) =
            ready_node_without_workers(&mut stack, &format!("user-undo-crash-{step}")).await;
        let node = &node;

        let chaos = format!("crash_after:{step}");
        let crashing = stack
            .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
            .unwrap();
        stack.send_subscription_end(&subscription).await.unwrap();
        take_over_after_crash(&mut stack, crashing, step).await;
        wait_for_state(&stack, node, "terminated").await;
        assert_eq!(
            stack.leftovers().await.unwrap(),
            Vec::<String>::new(),
            "after a crash at {step}"
        );
        stack.workers.clear();
    }
}
