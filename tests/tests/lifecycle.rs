//! A node's whole life after provisioning: suspend, resume, restart, resize and scale, each a
//! workflow of fenced, retried, logged steps. Every workflow goes through the harness that
//! provisioning has: each step run twice changes nothing the second time; a failure after each
//! step keeps the node `failed` there and `hivectl replay` finishes it; a crash between each
//! step's side effect and its commit still does the action once.

use std::time::{Duration, Instant};

use hive_jobs::model::{NodeState, RESIZE, RESTART, RESUME, SUSPEND};
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

/// The id of the node's latest log entry.
async fn last_event(stack: &Stack, node_id: &str) -> i64 {
    let pool = stack.pool().await.unwrap();
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM node_events WHERE node_id = $1::uuid")
        .bind(node_id)
        .fetch_one(&pool)
        .await
        .unwrap()
}

/// Waits until the node's log holds the move `from -> to` after entry `after`.
async fn wait_for_move(stack: &Stack, node_id: &str, after: i64, from: NodeState, to: &str) {
    let pool = stack.pool().await.unwrap();
    let wanted = format!("{from} -> {to}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM node_events WHERE node_id = $1::uuid AND id > $2 \
             AND kind = 'transition' AND detail = $3)",
        )
        .bind(node_id)
        .bind(after)
        .bind(&wanted)
        .fetch_one(&pool)
        .await
        .unwrap();
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node_id} never moved {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_state(stack: &Stack, node_id: &str, state: &str) {
    stack
        .wait_for_state(node_id, state, Duration::from_secs(90))
        .await
        .unwrap();
}

/// Waits for the worker `crashing` to abort, then starts a healthy worker, which takes the
/// node over from where the dead one left it.
async fn take_over_after_crash(stack: &mut Stack, crashing: usize, step: NodeState) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.workers[crashing].try_wait().is_none() {
        assert!(Instant::now() < deadline, "the worker never reached {step}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.workers.clear();
    stack.start_worker().unwrap();
}

/// One workflow under test: how to ask for it, where it starts and ends, what it must call
/// exactly once, and what must be true after it.
#[derive(Clone, Copy)]
enum Flow {
    Suspend,
    Resume,
    Restart,
    Resize,
}

impl Flow {
    fn steps(self) -> &'static [NodeState] {
        match self {
            Flow::Suspend => &SUSPEND,
            Flow::Resume => &RESUME,
            Flow::Restart => &RESTART,
            Flow::Resize => &RESIZE,
        }
    }

    /// The resting state the workflow starts from, and the one it ends in.
    fn rests(self) -> (&'static str, &'static str) {
        match self {
            Flow::Suspend => ("ready", "suspended"),
            Flow::Resume => ("suspended", "ready"),
            Flow::Restart | Flow::Resize => ("ready", "ready"),
        }
    }

    /// The EC2 operations the workflow must call exactly once.
    fn actions(self) -> &'static [&'static str] {
        match self {
            Flow::Suspend => &["StopInstances"],
            Flow::Resume => &["StartInstances"],
            Flow::Restart => &["RebootInstances"],
            Flow::Resize => &[
                "StopInstances",
                "ModifyInstanceAttribute",
                "ModifyVolume",
                "StartInstances",
            ],
        }
    }
}

/// The node brought, by a plain worker, to where `flow` starts; the workers are then stopped.
async fn prepare(stack: &mut Stack, node: &str, flow: Flow) {
    stack.workers.clear();
    stack.start_worker().unwrap();
    let (from, _) = flow.rests();
    let now: String = {
        let pool = stack.pool().await.unwrap();
        sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1::uuid")
            .bind(node)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    if now != from {
        let verb = if from == "suspended" {
            "suspend"
        } else {
            "resume"
        };
        stack.hivectl_ok(&[verb, node]).unwrap();
        wait_for_state(stack, node, from).await;
    }
    stack.workers.clear();
}

/// Asks for `flow` through hivectl; `round` makes each resize ask for a new shape.
fn request(stack: &Stack, node: &str, flow: Flow, round: i32) {
    match flow {
        Flow::Suspend => stack.hivectl_ok(&["suspend", node]),
        Flow::Resume => stack.hivectl_ok(&["resume", node]),
        Flow::Restart => stack.hivectl_ok(&["restart", node]),
        Flow::Resize => {
            let (instance_type, volume) = resize_target(round);
            stack.hivectl_ok(&[
                "resize",
                node,
                "--type",
                instance_type,
                "--volume-gb",
                &volume.to_string(),
            ])
        }
    }
    .unwrap();
}

/// Each round of resizing asks for the other type and one more GiB than before.
fn resize_target(round: i32) -> (&'static str, i32) {
    let instance_type = if round % 2 == 0 {
        "t4g.medium"
    } else {
        "t4g.small"
    };
    (instance_type, 17 + round)
}

/// What must be true once `flow` has ended: on the same instance, in moto and the stand-in.
async fn assert_effect(stack: &Stack, node: &str, instance: &str, flow: Flow, round: i32) {
    assert_eq!(
        stack.instance_of(node).await.unwrap().as_deref(),
        Some(instance),
        "the node changed instance"
    );
    let shape = stack.instance_shape(instance).await.unwrap();
    match flow {
        Flow::Suspend => {
            assert_eq!(shape.state, "stopped");
            // Tunnel, both DNS records and the secret stay while suspended.
            let left = stack.leftovers().await.unwrap();
            for kind in ["tunnel", "cloudflare record", "route53 record", "secret"] {
                assert_eq!(
                    left.iter().filter(|l| l.starts_with(kind)).count(),
                    1,
                    "{kind} while suspended: {left:#?}"
                );
            }
        }
        Flow::Resume | Flow::Restart => assert_eq!(shape.state, "running"),
        Flow::Resize => {
            let (instance_type, volume_gb) = resize_target(round);
            assert_eq!(shape.state, "running");
            assert_eq!(shape.instance_type, instance_type);
            assert_eq!(shape.volume_gb, volume_gb);
        }
    }
}

/// The calls of each of `flow`'s actions the proxy has seen so far.
fn action_calls(stack: &Stack, flow: Flow) -> Vec<u32> {
    flow.actions()
        .iter()
        .map(|op| stack.aws_proxy.calls(op))
        .collect()
}

/// Runs `flow` once on `node` with a worker of `chaos` (none: a plain one), handling what the
/// chaos does, and checks that it ended with its effect and each action done exactly once.
async fn run_once(
    stack: &mut Stack,
    node: &str,
    instance: &str,
    flow: Flow,
    round: i32,
    chaos: Option<(&str, NodeState)>,
) {
    prepare(stack, node, flow).await;
    let before = action_calls(stack, flow);
    let since = last_event(stack, node).await;
    let (_, to) = flow.rests();
    match chaos {
        None => {
            stack.start_worker().unwrap();
            request(stack, node, flow, round);
        }
        Some(("repeat", _)) => {
            stack
                .start_worker_with(&[("HIVE_CHAOS", "repeat")])
                .unwrap();
            request(stack, node, flow, round);
        }
        Some(("fail_after", step)) => {
            let chaos = format!("fail_after:{step}");
            stack
                .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
                .unwrap();
            request(stack, node, flow, round);
            wait_for_state(stack, node, "failed").await;
            assert_eq!(
                stack.failed_step(node).await.unwrap().as_deref(),
                Some(step.as_str()),
                "a failure after {step} is kept at {step}"
            );
            // Kept: nothing was undone, the instance is still the node's.
            assert!(stack.instance_of(node).await.unwrap().is_some());
            stack.workers.clear();
            stack.start_worker().unwrap();
            stack.hivectl_ok(&["replay", node]).unwrap();
        }
        Some(("crash_after", step)) => {
            let chaos = format!("crash_after:{step}");
            let crashing = stack
                .start_worker_with(&[("HIVE_CHAOS", chaos.as_str())])
                .unwrap();
            request(stack, node, flow, round);
            take_over_after_crash(stack, crashing, step).await;
        }
        Some((other, _)) => panic!("unknown chaos {other}"),
    }
    let last = *flow.steps().last().unwrap();
    wait_for_move(stack, node, since, last, to).await;
    wait_for_state(stack, node, to).await;
    let what = format!("{chaos:?}");
    let after = action_calls(stack, flow);
    for ((op, b), a) in flow.actions().iter().zip(before).zip(after) {
        assert_eq!(a - b, 1, "{op} calls for one request ({what})");
    }
    assert_effect(stack, node, instance, flow, round).await;
    stack.workers.clear();
}

/// The whole harness for one workflow, on one node.
async fn harness(flow: Flow, user: &str) {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    wait_for_state(&stack, &node, "ready").await;
    let instance = stack.instance_of(&node).await.unwrap().unwrap();

    let mut round = 0;
    // A plain run, then every step run twice.
    for chaos in [None, Some(("repeat", NodeState::Ready))] {
        run_once(&mut stack, &node, &instance, flow, round, chaos).await;
        round += 1;
    }
    // A failure after each step (kept, then replayed), then a crash after each step.
    for fault in ["fail_after", "crash_after"] {
        for &step in flow.steps() {
            let chaos = Some((fault, step));
            run_once(&mut stack, &node, &instance, flow, round, chaos).await;
            round += 1;
        }
    }
    // One instance all along: no workflow launched another.
    let of_node: Vec<_> = stack
        .tagged_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.node_id == node)
        .collect();
    assert_eq!(of_node.len(), 1, "{of_node:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_stops_the_instance_and_keeps_tunnel_dns_and_secret() {
    harness(Flow::Suspend, "user-suspend").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_starts_the_same_instance_and_the_node_is_ready() {
    harness(Flow::Resume, "user-resume").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reboots_once_and_the_node_is_ready_again() {
    harness(Flow::Restart, "user-restart").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resize_changes_type_and_volume_on_the_same_instance() {
    harness(Flow::Resize, "user-resize").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_and_resume_ten_times_in_a_second_end_in_the_last_request() {
    let logs = tempfile::tempdir().unwrap();
    let mut options = options();
    options.log_dir = Some(logs.path().to_path_buf());
    let mut stack = Stack::start(options).await.expect("stack");
    stack.start_api().unwrap();
    // Two workers, so that requests meet a node in the middle of another's step.
    stack.start_worker().unwrap();
    stack.start_worker().unwrap();
    let node = stack
        .send_checkout("user-flapping", "pro")
        .await
        .unwrap()
        .remove(0);
    wait_for_state(&stack, &node, "ready").await;
    let node_id: uuid::Uuid = node.parse().unwrap();
    let instance = stack.instance_of(&node).await.unwrap().unwrap();
    let (stops, starts) = (
        stack.aws_proxy.calls("StopInstances"),
        stack.aws_proxy.calls("StartInstances"),
    );

    // Real instances take a while to stop: the suspend is in its wait when the rest arrive.
    stack.aws_proxy.hold_stopping(true);
    let pool = stack.pool().await.unwrap();
    let began = Instant::now();
    for i in 0..10 {
        let mut tx = pool.begin().await.unwrap();
        if i % 2 == 0 {
            hive_jobs::requests::suspend(&mut tx, node_id, "test").await
        } else {
            hive_jobs::requests::resume(&mut tx, node_id, "test").await
        }
        .unwrap();
        tx.commit().await.unwrap();
        if i == 0 {
            wait_for_state(&stack, &node, "waiting_for_stop").await;
        } else {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    // The suspend in flight is not interrupted: its wait goes on until the instance stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (state,): (String,) = sqlx::query_as("SELECT state FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "waiting_for_stop");
    stack.aws_proxy.hold_stopping(false);

    // The last request was resume: the node ends ready and stays so.
    wait_for_state(&stack, &node, "ready").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (state, desired): (String, String) =
        sqlx::query_as("SELECT state, desired FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), desired.as_str()), ("ready", "running"));
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "running"
    );

    // No more stops and starts than needed: at most one of each, as many starts as stops.
    let stopped = stack.aws_proxy.calls("StopInstances") - stops;
    let started = stack.aws_proxy.calls("StartInstances") - starts;
    assert!(
        stopped <= 1 && stopped == started,
        "{stopped} stops, {started} starts"
    );
    // Each workflow ran whole or not at all, and nothing failed.
    let moves: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM node_events WHERE node_id = $1 AND kind = 'transition' \
         AND id > (SELECT max(id) FROM node_events WHERE node_id = $1 AND detail = 'waiting_for_tunnel -> ready') \
         ORDER BY id",
    )
    .bind(node_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let full_cycle = [
        "ready -> stopping_instance",
        "stopping_instance -> waiting_for_stop",
        "waiting_for_stop -> suspended",
        "suspended -> starting_instance",
        "starting_instance -> waiting_for_start",
        "waiting_for_start -> waiting_for_reconnect",
        "waiting_for_reconnect -> ready",
    ];
    assert_eq!(moves, full_cycle);
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM node_events WHERE node_id = $1 AND kind = 'failed'",
    )
    .bind(node_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(failures, 0);
    // And the database refused no move: no worker met the guard.
    stack.workers.clear();
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let log = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!log.contains("illegal node transition"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_one_to_three_to_one_provisions_two_then_tears_down_the_two_newest() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let user = "user-scale";
    let (subscription, nodes) = stack.send_subscription_checkout(user, "pro").await.unwrap();
    let first = nodes[0].clone();
    let token = Stack::jwt(user, 600);
    stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();

    let out = stack
        .hivectl_ok(&["scale", &subscription, "3", "--yes"])
        .unwrap();
    assert!(out.contains("2 node(s) added"), "{out}");
    let three = stack
        .wait_all_status(&token, "ready", 3, Duration::from_secs(90))
        .await
        .unwrap();
    let ids: Vec<String> = three
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&first));
    assert_eq!(stack.tagged_instances().await.unwrap().len(), 3);
    // Asking again for three changes nothing.
    let out = stack
        .hivectl_ok(&["scale", &subscription, "3", "--yes"])
        .unwrap();
    assert!(out.contains("0 node(s) added, 0 torn down"), "{out}");

    let out = stack
        .hivectl_ok(&["scale", &subscription, "1", "--yes"])
        .unwrap();
    assert!(out.contains("2 torn down"), "{out}");
    let added: Vec<&String> = ids.iter().filter(|id| **id != first).collect();
    for node in &added {
        assert!(out.contains(node.as_str()), "{node} not torn down: {out}");
        wait_for_state(&stack, node, "terminated").await;
    }
    wait_for_state(&stack, &first, "ready").await;
    // Nothing leaked: exactly the first node's resources are left.
    let left = stack.leftovers().await.unwrap();
    assert_eq!(left.len(), 5, "{left:#?}");
    assert!(left.iter().all(|l| l.contains(&first)), "{left:#?}");
    // A count the subscription cannot have is refused with one line and changes nothing.
    let refused = stack
        .hivectl(&["scale", &subscription, "1000", "--yes"])
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("more than the 100"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_job_was_lost_is_still_carried_out() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node = stack
        .send_checkout("user-lost-job", "pro")
        .await
        .unwrap()
        .remove(0);
    wait_for_state(&stack, &node, "ready").await;
    stack.workers.clear();

    // The request commits, then its job is lost (as when the queue's write fails).
    stack.hivectl_ok(&["suspend", &node]).unwrap();
    let pool = stack.pool().await.unwrap();
    let lost = sqlx::query("DELETE FROM apalis.jobs WHERE status <> 'Done'")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert!(lost >= 1, "no job to lose");
    // A worker's sweep finds the node due and carries the request out.
    stack.start_worker().unwrap();
    wait_for_state(&stack, &node, "suspended").await;
    // Once it rests with nothing to do, it is no longer due.
    let due: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT next_run_at FROM nodes WHERE id = $1::uuid")
            .bind(&node)
            .fetch_one(&pool)
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut due = due;
    while due.is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        due = sqlx::query_scalar("SELECT next_run_at FROM nodes WHERE id = $1::uuid")
            .bind(&node)
            .fetch_one(&pool)
            .await
            .unwrap();
    }
    assert_eq!(due, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_a_node_cannot_take_are_refused_with_one_line_and_change_nothing() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let node = stack
        .send_checkout("user-refused", "pro")
        .await
        .unwrap()
        .remove(0);
    wait_for_state(&stack, &node, "ready").await;
    let pool = stack.pool().await.unwrap();
    let log_length = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM node_events WHERE node_id = $1::uuid")
                .bind(&node)
                .fetch_one(&pool)
                .await
                .unwrap();
        n
    };
    let before = log_length().await;
    let missing = uuid::Uuid::new_v4().to_string();
    for (args, expected) in [
        (
            vec!["resize", node.as_str(), "--volume-gb", "8"],
            "cannot shrink",
        ),
        (
            vec!["resize", node.as_str(), "--type", "m5.large"],
            "not a t4g",
        ),
        (vec!["suspend", missing.as_str()], "no node"),
        (vec!["suspend", "not-a-node"], "not a node id"),
        (vec!["scale", "sub_missing", "2"], "no subscription"),
    ] {
        let out = stack.hivectl(&args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A value of the wrong kind is a usage error (exit 2), told before anything is asked.
    let out = stack
        .hivectl(&["resize", node.as_str(), "--volume-gb", "lots"])
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'lots'"));
    assert_eq!(log_length().await, before, "a refused request was logged");

    // Restart is refused while suspended; anything is refused once the node is gone.
    stack.hivectl_ok(&["suspend", &node]).unwrap();
    wait_for_state(&stack, &node, "suspended").await;
    let out = stack.hivectl(&["restart", &node]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("suspended"));
    stack.hivectl_ok(&["terminate", &node]).unwrap();
    wait_for_state(&stack, &node, "terminated").await;
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let out = stack.hivectl(&["resume", &node]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("terminated"));
}
