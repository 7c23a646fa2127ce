//! What the clouds really do, and moto or a kind stand-in would hide: EC2's reads lag its
//! launches, Route 53 changes are `PENDING` for a while, the worker's IAM policy is enforced,
//! Cloudflare refuses to delete a connected tunnel and has outages, a slow call outlives a
//! lease, and a reconcile pass takes long enough for nodes to be made while it runs. Each test
//! here fails on the code before the fix it names.

use std::time::{Duration, Instant};

use aws_sdk_route53::types::{Change, ChangeAction, ChangeBatch, ResourceRecordSet, RrType};
use hive_tests::aws_fixture::node_cname;
use hive_tests::aws_proxy::{AwsFault, AwsFaultMode};
use hive_tests::cloudflare_standin::{Fault, FaultMode};
use hive_tests::stack::{worker_policy, Stack, StackOptions, NODE_DOMAIN};

fn options(extra: &[(&str, &str)]) -> StackOptions {
    let mut options = StackOptions::default();
    options
        .extra_env
        .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    options
}

/// Every instance moto holds for the node, in any state.
async fn instances_of(stack: &Stack, node_id: &str) -> Vec<String> {
    let all = stack.tagged_instances().await.unwrap();
    all.into_iter()
        .filter(|i| i.node_id == node_id)
        .map(|i| i.id)
        .collect()
}

/// A `pro` node of `user`'s new subscription, once ready: (Stripe subscription, node).
async fn ready_pro_node(stack: &Stack, user: &str) -> (String, String) {
    let (subscription, mut nodes) = stack.send_subscription_checkout(user, "pro").await.unwrap();
    let node = nodes.remove(0);
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(120))
        .await
        .unwrap();
    (subscription, node)
}

/// One change of one record set.
fn one_change(action: ChangeAction, record: ResourceRecordSet) -> ChangeBatch {
    ChangeBatch::builder()
        .changes(
            Change::builder()
                .action(action)
                .resource_record_set(record)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// Fix: a retry resumes the launch attempt under way (same zone, type and `ClientToken`).
/// Before it, the retry began again in the first zone, which had capacity by then, with
/// another token: a second instance for the same node, while EC2 did not yet show the first.
#[tokio::test(flavor = "multi_thread")]
async fn a_launch_cut_off_in_the_second_zone_is_resumed_there_not_started_over() {
    let mut stack = Stack::start(options(&[("HIVE_HTTP_TIMEOUT_MS", "1000")]))
        .await
        .expect("stack");
    let zones = stack.aws.home.subnet_ids.clone();
    let file = stack.regions_file(&[&stack.aws.home], "").unwrap();
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), file.display().to_string()));
    // The first zone has no capacity for the first launch only (both of the SDK's attempts);
    // the launch in the second zone happens, but both of the SDK's attempts lose their answer.
    stack.aws_proxy.inject(AwsFault::new(
        "RunInstances",
        AwsFaultMode::InsufficientCapacity,
        2,
    ));
    stack.aws_proxy.inject(AwsFault::new(
        "RunInstances",
        AwsFaultMode::DropAfterSuccess,
        2,
    ));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (_, node) = ready_pro_node(&stack, "user-resumed-launch").await;
    assert!(
        stack.aws_proxy.armed().is_empty(),
        "faults that never fired"
    );
    let instances = instances_of(&stack, &node).await;
    assert_eq!(instances.len(), 1, "one node, one instance: {instances:?}");
    let placed = stack.tagged_instances().await.unwrap();
    let instance = placed.iter().find(|i| i.node_id == node).unwrap();
    assert_eq!(
        instance.subnet_id, zones[1],
        "launched where the attempt was"
    );
}

/// Fix: the reconciler repairs every resource of a ready node, its Route 53 record included
/// (before, a deleted record was never put back: the node's name stopped resolving).
#[tokio::test(flavor = "multi_thread")]
async fn a_ready_nodes_deleted_route53_record_is_put_back() {
    let mut stack = Stack::start(options(&[("HIVE_RECONCILE_SCHEDULE", "off")]))
        .await
        .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (_, node) = ready_pro_node(&stack, "user-r53-repair").await;
    let r53 = aws_sdk_route53::Client::new(&stack.sdk);
    let name = format!("{node}.{NODE_DOMAIN}.");
    let record = |r53: aws_sdk_route53::Client, zone: String, name: String| async move {
        r53.list_resource_record_sets()
            .hosted_zone_id(zone)
            .start_record_name(&name)
            .start_record_type(RrType::Cname)
            .max_items(1)
            .send()
            .await
            .unwrap()
            .resource_record_sets()
            .iter()
            .find(|r| r.name() == name)
            .cloned()
    };
    let found = record(r53.clone(), stack.aws.zone_id.clone(), name.clone())
        .await
        .expect("the node's record");
    // Someone deletes it behind our back.
    r53.change_resource_record_sets()
        .hosted_zone_id(&stack.aws.zone_id)
        .change_batch(one_change(ChangeAction::Delete, found.clone()))
        .send()
        .await
        .unwrap();
    assert!(record(r53.clone(), stack.aws.zone_id.clone(), name.clone())
        .await
        .is_none());

    let report = stack.reconcile_now().unwrap();
    assert!(report.contains("route53 record"), "{report}");
    let back = record(r53, stack.aws.zone_id.clone(), name)
        .await
        .expect("the record is back");
    assert_eq!(back.resource_records(), found.resource_records());
    assert_eq!(back.ttl(), found.ttl());
}

/// Fix: the reconciler reads who owns what after its listings, not before. Before, a pass
/// whose listing was slow took the resources of nodes created meanwhile for orphans and
/// deleted their secrets, tunnels and records while they provisioned.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_pass_while_fifty_nodes_provision_deletes_nothing_of_theirs() {
    let mut stack = Stack::start(options(&[
        ("HIVE_PLANS", "fleet=t4g.small:50:8"),
        ("HIVE_RECONCILE_SCHEDULE", "off"),
        ("HIVE_WORKER_CONCURRENCY", "50"),
    ]))
    .await
    .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    // The pass's listing of instances answers late, as one DescribeInstances over a large
    // fleet does (minutes, on AWS): what it lists is from before the nodes below exist.
    stack.aws_proxy.inject(
        AwsFault::new(
            "DescribeInstances",
            AwsFaultMode::SlowAnswer(Duration::from_secs(6)),
            1,
        )
        .when("Filter.1.Name", "tag-key"),
    );
    let hivectl = hive_tests::process::bin_path("hivectl").unwrap();
    let env = stack.env();
    let pass = std::thread::spawn(move || {
        std::process::Command::new(hivectl)
            .args(["reconcile", "--grace-secs", "0", "--yes"])
            .envs(env)
            .output()
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let nodes = stack.send_checkout("user-fleet", "fleet").await.unwrap();
    assert_eq!(nodes.len(), 50);
    let out = tokio::task::spawn_blocking(move || pass.join())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stack.aws_proxy.armed().is_empty(),
        "the listing was not slowed"
    );
    let pool = stack.pool().await.unwrap();
    let removed: Vec<String> =
        sqlx::query_scalar("SELECT jsonb_array_elements_text(removed) FROM reconcile_runs")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(removed.is_empty(), "the pass removed {removed:?}\n{report}");
    for node in &nodes {
        let error = stack
            .wait_for_state(node, "ready", Duration::from_secs(240))
            .await
            .unwrap();
        assert_eq!(error, None);
    }
    assert_eq!(stack.tagged_instances().await.unwrap().len(), 50);
}

/// Fix: a teardown never gives up on a transient failure. Before, a Cloudflare outage longer
/// than the retry budget left a canceled customer's node `failed` at `deleting_tunnel`, its
/// tunnel kept, until an operator noticed.
#[tokio::test(flavor = "multi_thread")]
async fn a_cloudflare_outage_longer_than_the_retry_budget_ends_in_terminated() {
    let mut stack = Stack::start(options(&[
        ("HIVE_RETRY_BUDGET", "3"),
        ("HIVE_RETRY_MAX_MS", "300"),
        ("HIVE_TEARDOWN_STUCK_SECS", "1"),
    ]))
    .await
    .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (subscription, node) = ready_pro_node(&stack, "user-outage").await;
    let node = &node;
    // Cloudflare's tunnel API goes down, until the test says it is over.
    stack.standin.inject(Fault {
        method: None,
        path_contains: "cfd_tunnel".into(),
        mode: FaultMode::ServerError,
        times: u32::MAX,
    });
    let started = Instant::now();
    stack.send_subscription_end(&subscription).await.unwrap();
    // Meanwhile the operator sees the teardown stuck, with its cause.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let queue: serde_json::Value =
            serde_json::from_str(&stack.hivectl_ok(&["queue", "--json"]).unwrap()).unwrap();
        let stuck = queue["stuck_teardowns"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(t) = stuck.iter().find(|t| t["id"] == node.as_str()) {
            assert_eq!(t["state"], "deleting_tunnel", "{t}");
            assert!(
                t["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("cloudflare")),
                "{t}"
            );
            let doctor = stack.hivectl(&["doctor"]).unwrap();
            let said = String::from_utf8_lossy(&doctor.stdout).into_owned();
            assert!(said.contains("stuck longer than 1 s"), "{said}");
            break;
        }
        assert!(Instant::now() < deadline, "never shown stuck: {queue}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Well past the retry budget, and still trying.
    let pool = stack.pool().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (state, retries): (String, i64) = sqlx::query_as(
            "SELECT state, (SELECT count(*) FROM node_events e WHERE e.node_id = n.id \
             AND e.kind = 'retry_scheduled') FROM nodes n WHERE id = $1::uuid",
        )
        .bind(node)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(state, "deleting_tunnel");
        if retries > 10 {
            break;
        }
        assert!(Instant::now() < deadline, "{retries} retries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.standin.clear_faults();
    let error = stack
        .wait_for_state(node, "terminated", Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(error, None);
    let (retries, failures): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind = 'retry_scheduled'), \
         count(*) FILTER (WHERE kind = 'failed') FROM node_events WHERE node_id = $1::uuid",
    )
    .bind(node)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        retries > 3,
        "the outage outlasted the budget: {retries} retries"
    );
    assert_eq!(failures, 0, "the teardown gave up on the way");
    assert!(
        stack.leftovers().await.unwrap().is_empty(),
        "left after {:?}",
        started.elapsed()
    );
}

/// Fix: the lease is renewed while a step runs. Before, a call that outlived the lease let the
/// stall sweep hand the node to the second worker, which rebooted the instance a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_step_held_past_its_lease_does_its_side_effect_once() {
    let mut stack = Stack::start(options(&[
        ("HIVE_LEASE_MS", "1000"),
        ("HIVE_STALL_AFTER_MS", "500"),
        ("HIVE_HEARTBEAT_MS", "250"),
    ]))
    .await
    .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    stack.start_worker().unwrap();
    let (_, node) = ready_pro_node(&stack, "user-long-reboot").await;
    // The reboot happens at once; its answer comes four leases later.
    stack.aws_proxy.inject(AwsFault::new(
        "RebootInstances",
        AwsFaultMode::SlowAnswer(Duration::from_secs(4)),
        1,
    ));
    stack.hivectl_ok(&["restart", &node]).unwrap();
    let pool = stack.pool().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (state, done): (String, i32) =
            sqlx::query_as("SELECT state, restarts_done FROM nodes WHERE id = $1::uuid")
                .bind(&node)
                .fetch_one(&pool)
                .await
                .unwrap();
        if state == "ready" && done == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "restart never finished: {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stack.aws_proxy.calls("RebootInstances"),
        1,
        "the instance was rebooted more than once"
    );
}

/// IAM as a contract: every test runs the worker under terraform's policy; without one of
/// its actions, the workflow that needs it fails on that action, named.
#[tokio::test(flavor = "multi_thread")]
async fn without_one_action_of_the_policy_the_workflow_that_needs_it_fails_naming_it() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    let full = worker_policy(std::slice::from_ref(&stack.aws.home), &stack.aws).unwrap();
    stack
        .aws_proxy
        .enforce(Some(full.without_action("ec2:ModifyVolume")));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (_, node) = ready_pro_node(&stack, "user-no-modify-volume").await;
    assert!(
        stack.aws_proxy.denied().is_empty(),
        "{:?}",
        stack.aws_proxy.denied()
    );
    stack
        .hivectl_ok(&["resize", &node, "--volume-gb", "20"])
        .unwrap();
    let error = stack
        .wait_for_state(&node, "failed", Duration::from_secs(120))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(error.contains("UnauthorizedOperation"), "{error}");
    let denied = stack.aws_proxy.denied();
    assert!(
        denied.iter().any(|d| d.starts_with("ec2:ModifyVolume on ")),
        "{denied:?}"
    );
}

/// Fix: a Route 53 delete repeats the record exactly as Route 53 holds it. Before, it sent the
/// record as we would write it (TTL 300), which Route 53 refuses for good when the record was
/// written otherwise (by an older release, by hand): the teardown failed and left the name.
#[tokio::test(flavor = "multi_thread")]
async fn a_route53_record_written_with_another_ttl_is_still_deleted() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (subscription, node) = ready_pro_node(&stack, "user-r53-ttl").await;
    let node = &node;
    // The record is rewritten with a TTL of 60 s.
    let r53 = aws_sdk_route53::Client::new(&stack.sdk);
    let hostname = format!("{node}.{NODE_DOMAIN}");
    r53.change_resource_record_sets()
        .hosted_zone_id(&stack.aws.zone_id)
        .change_batch(one_change(
            ChangeAction::Upsert,
            node_cname(&hostname, 60).unwrap(),
        ))
        .send()
        .await
        .unwrap();
    stack.send_subscription_end(&subscription).await.unwrap();
    let error = stack
        .wait_for_state(node, "terminated", Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(error, None);
    let left = stack.leftovers().await.unwrap();
    assert!(left.is_empty(), "{left:#?}");
}

/// Fix: a node that is to be gone and whose teardown was refused for good owns nothing, so the
/// reconciler removes what it still holds. Before, the failed node counted as an owner and its
/// instance ran on, billed to us, until an operator noticed.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_teardown_refused_for_good_left_is_removed_by_the_reconciler() {
    let mut stack = Stack::start(options(&[("HIVE_RECONCILE_SCHEDULE", "off")]))
        .await
        .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let (subscription, node) = ready_pro_node(&stack, "user-refused-teardown").await;
    let node = &node;
    // Terminating the instance is refused, as a policy changed by hand would refuse it.
    stack.aws_proxy.inject(AwsFault::new(
        "TerminateInstances",
        AwsFaultMode::AccessDenied,
        1,
    ));
    stack.send_subscription_end(&subscription).await.unwrap();
    let error = stack
        .wait_for_state(node, "failed", Duration::from_secs(120))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(error.contains("UnauthorizedOperation"), "{error}");
    assert_eq!(
        stack.failed_step(node).await.unwrap().as_deref(),
        Some("terminating_instance")
    );
    assert_eq!(instances_of(&stack, node).await.len(), 1);

    let report = stack.reconcile_now().unwrap();
    assert!(report.contains("instance"), "{report}");
    let live: Vec<_> = stack
        .tagged_instances()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.node_id == *node && i.state != "terminated" && i.state != "shutting-down")
        .collect();
    assert!(live.is_empty(), "{live:?}");
}
