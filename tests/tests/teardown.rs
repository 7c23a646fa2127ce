//! When Stripe ends the subscription, everything its nodes had is removed, once.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions, WEBHOOK_SECRET};
use hive_tests::stripe_events::{signature, Fixtures};
use serde_json::{json, Value};

const USER: &str = "user-teardown";

async fn wait_all(stack: &Stack, status: &str, count: usize) -> Vec<Value> {
    let token = Stack::jwt(USER, 600);
    stack
        .wait_all_status(&token, status, count, Duration::from_secs(120))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_subscription_tears_down_every_resource_of_its_nodes() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let fixtures = Fixtures::load().unwrap();
    let checkout = fixtures.subscription_checkout(USER, "team", None).unwrap();
    let subscription_id = checkout["data"]["object"]["subscription"]
        .as_str()
        .unwrap()
        .to_string();
    let body = serde_json::to_vec(&checkout).unwrap();
    let (status, _) = stack
        .post_webhook(&body, Some(&signature(&body, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_all(&stack, "ready", 5).await;
    assert!(!stack.leftovers().await.unwrap().is_empty());

    let ended =
        serde_json::to_vec(&fixtures.subscription_deleted(&subscription_id).unwrap()).unwrap();
    let sig = signature(&ended, WEBHOOK_SECRET);
    for _ in 0..2 {
        let (status, answer) = stack.post_webhook(&ended, Some(&sig)).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let nodes = wait_all(&stack, "terminated", 5).await;
    for node in nodes {
        assert!(
            node["instance_id"].is_null() && node["tunnel_id"].is_null(),
            "{node}"
        );
        assert!(node["url"].is_null());
    }
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let cf = stack.cloudflare_state().await.unwrap();
    assert_eq!(
        cf["tunnels"].as_array().unwrap().len(),
        5,
        "no tunnel was made twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_end_that_arrives_before_its_checkout_provisions_nothing() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().unwrap();
    let fixtures = Fixtures::load().unwrap();
    let checkout = fixtures.subscription_checkout(USER, "pro", None).unwrap();
    let subscription_id = checkout["data"]["object"]["subscription"].as_str().unwrap();
    let ended =
        serde_json::to_vec(&fixtures.subscription_deleted(subscription_id).unwrap()).unwrap();
    let (status, _) = stack
        .post_webhook(&ended, Some(&signature(&ended, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let body = serde_json::to_vec(&checkout).unwrap();
    let (status, answer) = stack
        .post_webhook(&body, Some(&signature(&body, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"], json!([]));
    let pool = stack.pool().await.unwrap();
    let (nodes, jobs): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM nodes), (SELECT count(*) FROM apalis.jobs)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((nodes, jobs), (0, 0));
}
