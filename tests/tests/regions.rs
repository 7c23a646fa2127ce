//! Regions are first-class: one worker drives every configured region, workers configured for
//! different regions share one queue, and each node lives, and is judged, in its own region.
//! A zone without capacity sends the launch to the next zone, then to the plan's fallback type.

use std::collections::BTreeMap;
use std::time::Duration;

use hive_tests::aws_fixture::RegionFixture;
use hive_tests::stack::{Stack, StackOptions};
use serde_json::Value;

const HOME: &str = "eu-west-1";
const OTHER: &str = "us-east-1";

fn options() -> StackOptions {
    let mut options = StackOptions::default();
    options
        .extra_env
        .push(("HIVE_RECONCILE_SCHEDULE".into(), "off".into()));
    options
}

/// Sends a checkout of `plan` in `region` for `user`; the node ids it created.
async fn checkout_in(stack: &Stack, user: &str, plan: &str, region: &str) -> Vec<String> {
    let event = hive_tests::stripe_events::Fixtures::load()
        .unwrap()
        .subscription_checkout(user, plan, Some(region))
        .unwrap();
    let answer = stack.send_event(&event).await.unwrap();
    answer["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// Nodes by region, as their rows say; none may have failed.
async fn nodes_by_region(stack: &Stack) -> BTreeMap<String, Vec<(String, String)>> {
    let pool = stack.pool().await.unwrap();
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT id::text, region, state, instance_id FROM nodes WHERE state <> 'terminated'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut by_region: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (id, region, state, instance) in rows {
        assert_ne!(state, "failed", "node {id} of {region} failed");
        by_region
            .entry(region)
            .or_default()
            .push((id, instance.unwrap_or_default()));
    }
    by_region
}

/// Every node's instance runs in its node's region, and no region runs an instance of a node
/// of another region.
async fn assert_every_instance_in_its_region(stack: &Stack, expected_nodes: usize) {
    let by_region = nodes_by_region(stack).await;
    assert_eq!(
        by_region.values().map(Vec::len).sum::<usize>(),
        expected_nodes,
        "{by_region:?}"
    );
    for region in [HOME, OTHER] {
        let running: BTreeMap<String, String> = stack
            .tagged_instances_in(region)
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.state != "terminated")
            .map(|i| (i.node_id, i.id))
            .collect();
        let nodes = by_region.get(region).cloned().unwrap_or_default();
        assert!(!nodes.is_empty(), "no node in {region}");
        for (node, instance) in &nodes {
            assert_eq!(
                running.get(node),
                Some(instance),
                "node {node} of {region}: its instance is not running there"
            );
        }
        assert_eq!(
            running.len(),
            nodes.len(),
            "{region} runs instances of other regions' nodes: {running:?}"
        );
    }
}

async fn wait_all_ready(stack: &Stack, nodes: &[String]) {
    for node in nodes {
        let error = stack
            .wait_for_state(node, "ready", Duration::from_secs(120))
            .await
            .unwrap();
        assert_eq!(error, None);
    }
}

/// Plants an instance tagged for a node that does not exist, in `region`.
async fn plant_orphan(stack: &Stack, region: &RegionFixture) -> String {
    let ghost = uuid::Uuid::new_v4().to_string();
    stack.plant_instance_orphan(region, &ghost).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_worker_then_two_drive_both_regions_and_the_reconciler_judges_each_in_its_own() {
    let mut stack = Stack::start(options()).await.expect("stack");
    let other = stack.add_region(OTHER).await.unwrap();
    let file = stack.regions_file(&[&stack.aws.home, &other], "").unwrap();
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), file.display().to_string()));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();

    // The api offers exactly the configured regions.
    let (status, doc) = stack.get_as("/openapi.json", None).await.unwrap();
    assert_eq!(status, 200);
    let enums: Vec<&Value> = find_region_enums(&doc);
    assert!(!enums.is_empty(), "no region enum in the document");
    for e in enums {
        // A field that may be left out also allows null.
        let named: Vec<&Value> = e
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| !v.is_null())
            .collect();
        assert_eq!(named, vec![HOME, OTHER], "{e}");
    }

    // One worker: a team (five nodes) in each region.
    let mut nodes = checkout_in(&stack, "team-eu", "team", HOME).await;
    nodes.extend(checkout_in(&stack, "team-us", "team", OTHER).await);
    assert_eq!(nodes.len(), 10);
    wait_all_ready(&stack, &nodes).await;
    assert_every_instance_in_its_region(&stack, 10).await;

    // Two workers: more of each.
    stack.start_worker().unwrap();
    let mut more = Vec::new();
    for n in 0..2 {
        more.extend(checkout_in(&stack, &format!("pro-eu-{n}"), "pro", HOME).await);
        more.extend(checkout_in(&stack, &format!("pro-us-{n}"), "pro", OTHER).await);
    }
    wait_all_ready(&stack, &more).await;
    assert_every_instance_in_its_region(&stack, 14).await;

    // An orphan in each region is removed, and nothing else: every ready node of either
    // region keeps its instance (no region's nodes read as vanished in another).
    let home_orphan = plant_orphan(&stack, &stack.aws.home).await;
    let other_orphan = plant_orphan(&stack, &other).await;
    let report = stack.reconcile_now().unwrap();
    assert!(report.contains(&home_orphan), "{report}");
    assert!(report.contains(&other_orphan), "{report}");
    for region in [HOME, OTHER] {
        let orphans_left: Vec<_> = stack
            .tagged_instances_in(region)
            .await
            .unwrap()
            .into_iter()
            .filter(|i| [&home_orphan, &other_orphan].contains(&&i.id))
            .filter(|i| !["terminated", "shutting-down"].contains(&i.state.as_str()))
            .collect();
        assert!(orphans_left.is_empty(), "{orphans_left:?}");
    }
    let pool = stack.pool().await.unwrap();
    let not_ready: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes WHERE state <> 'ready'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(not_ready, 0, "the reconciler sent nodes back: {report}");
    pool.close().await;
    assert_every_instance_in_its_region(&stack, 14).await;
}

/// The `enum` of every schema property named `region` in the published document.
fn find_region_enums(doc: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    let mut stack = vec![doc];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(region) = map.get("region") {
                    if let Some(e) = region.get("enum") {
                        found.push(e);
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_of_different_regions_share_one_queue_without_failing_each_others_nodes() {
    let mut stack = Stack::start(options()).await.expect("stack");
    let other = stack.add_region(OTHER).await.unwrap();
    let both = stack.regions_file(&[&stack.aws.home, &other], "").unwrap();
    let home_only = stack.regions_file(&[&stack.aws.home], "").unwrap();
    let other_only = stack.regions_file(&[&other], "").unwrap();
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), both.display().to_string()));
    stack.start_api().unwrap();
    // Each worker can launch in one region only; every job is offered to both kinds.
    let home_path = home_only.display().to_string();
    let other_path = other_only.display().to_string();
    stack
        .start_worker_with(&[("HIVE_CONFIG_FILE", &home_path)])
        .unwrap();
    stack
        .start_worker_with(&[("HIVE_CONFIG_FILE", &other_path)])
        .unwrap();
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.extend(checkout_in(&stack, &format!("eu-{n}"), "pro", HOME).await);
        nodes.extend(checkout_in(&stack, &format!("us-{n}"), "pro", OTHER).await);
    }
    wait_all_ready(&stack, &nodes).await;
    assert_every_instance_in_its_region(&stack, 6).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zone_without_capacity_sends_the_launch_to_the_next_zone_then_to_a_fallback_type() {
    let mut stack = Stack::start(options()).await.expect("stack");
    let zones = stack.aws.home.subnet_ids.clone();
    let file = stack
        .regions_file(
            &[&stack.aws.home],
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nfallback_types = [\"t4g.medium\"]\n",
        )
        .unwrap();
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), file.display().to_string()));
    stack.start_api().unwrap();
    stack.start_worker().unwrap();

    // The first zone has nothing: the node is ready in the second.
    stack.aws_proxy.zone_full(&zones[0], None);
    let node = checkout_in(&stack, "zone-a-full", "pro", HOME)
        .await
        .remove(0);
    wait_all_ready(&stack, std::slice::from_ref(&node)).await;
    let instance = placed(&stack, &node).await;
    assert_eq!(instance.subnet_id, zones[1]);
    assert_eq!(instance.instance_type, "t4g.small");
    let (placement, fallback, log) = recorded(&stack, &node).await;
    assert!(placement.starts_with(&zones[1]), "{placement}");
    assert_eq!(fallback, None);
    assert!(
        log.contains("no capacity for t4g.small in") && log.contains(&zones[0]),
        "{log}"
    );

    // No zone has the plan's type: the node runs as its fallback type, says so, and is not
    // resized back while it waits.
    stack.aws_proxy.zone_full(&zones[1], Some("t4g.small"));
    let node = checkout_in(&stack, "no-small-left", "pro", HOME)
        .await
        .remove(0);
    wait_all_ready(&stack, std::slice::from_ref(&node)).await;
    let instance = placed(&stack, &node).await;
    assert_eq!(instance.instance_type, "t4g.medium");
    assert_eq!(instance.subnet_id, zones[1]);
    let (_, fallback, log) = recorded(&stack, &node).await;
    assert_eq!(fallback.as_deref(), Some("t4g.medium for t4g.small"));
    assert!(log.contains("launched as t4g.medium"), "{log}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pool = stack.pool().await.unwrap();
    let (state, workflows): (String, i64) = sqlx::query_as(
        "SELECT n.state, (SELECT count(*) FROM node_events e WHERE e.node_id = n.id \
         AND e.kind = 'workflow_started') FROM nodes n WHERE n.id = $1::uuid",
    )
    .bind(&node)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!(state, "ready");
    assert_eq!(workflows, 0, "a workflow started after the fallback launch");
    assert_eq!(placed(&stack, &node).await.state, "running");
}

async fn placed(stack: &Stack, node: &str) -> hive_tests::stack::TaggedInstance {
    stack
        .tagged_instances_in(HOME)
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.node_id == node && i.state != "terminated")
        .unwrap_or_else(|| panic!("no instance of {node}"))
}

/// The node's recorded placement, fallback (`type for wanted`) and event log, as one text.
async fn recorded(stack: &Stack, node: &str) -> (String, Option<String>, String) {
    let pool = stack.pool().await.unwrap();
    let (placement, fallback): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT placement, fallback_type || ' for ' || fallback_for FROM nodes WHERE id = $1::uuid",
    )
    .bind(node)
    .fetch_one(&pool)
    .await
    .unwrap();
    let log: Vec<Option<String>> =
        sqlx::query_scalar("SELECT detail FROM node_events WHERE node_id = $1::uuid ORDER BY id")
            .bind(node)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    (
        placement.unwrap_or_default(),
        fallback,
        log.into_iter().flatten().collect::<Vec<_>>().join("\n"),
    )
}
