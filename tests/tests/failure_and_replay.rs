//! A permanent failure is visible to the app and the operator, starts nothing further, and an
//! operator's replay resumes the node from that step without creating anything twice.

use std::time::{Duration, Instant};

use hive_jobs::operator::{replay_failed_node, OperatorError};
use hive_tests::stack::{Stack, StackOptions};
use serde_json::Value;

const USER: &str = "user-replay";

pub async fn wait_for_status(stack: &Stack, node_id: &str, status: &str) -> Value {
    let token = Stack::jwt(USER, 600);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, node) = stack
            .get_as(&format!("/api/v1/nodes/{node_id}"), Some(&token))
            .await
            .unwrap();
        assert_eq!(code, 200, "{node}");
        if node["status"] == status {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "node never became {status}: {node}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_failed_node_is_visible_and_replay_resumes_it_without_duplicates() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().unwrap();
    // A worker configured with an image that does not exist: launching fails permanently, and
    // the operator has chosen to keep failed nodes as they are for inspection.
    stack
        .start_worker_with(&[
            ("HIVE_AMI_ID", "ami-0000000000000dead"),
            ("HIVE_UNDO_FAILED", "false"),
        ])
        .unwrap();

    let node_id = stack.send_checkout(USER, "pro").await.unwrap().remove(0);

    let failed = wait_for_status(&stack, &node_id, "failed").await;
    assert_eq!(failed["step"], "failed");
    // The app is told the image is not there; the operator's record names it.
    assert_eq!(failed["error_code"], "image_unavailable", "{failed}");
    assert!(
        !failed.to_string().contains("ami-0000000000000dead"),
        "{failed}"
    );
    let cause: Option<String> = sqlx::query_scalar("SELECT error FROM nodes WHERE id = $1::uuid")
        .bind(&node_id)
        .fetch_one(&stack.pool().await.unwrap())
        .await
        .unwrap();
    assert!(
        cause.is_some_and(|c| c.contains("ami-0000000000000dead")),
        "the operator's record keeps the cause"
    );
    assert!(failed["instance_id"].is_null());
    assert!(failed["tunnel_id"].is_string());
    let pool = stack.pool().await.unwrap();
    let (failed_step, generation): (Option<String>, i32) =
        sqlx::query_as("SELECT failed_step, generation FROM nodes WHERE id = $1::uuid")
            .bind(&node_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(failed_step.as_deref(), Some("launching_instance"));
    assert_eq!(generation, 0);

    // The operator fixes the configuration and replays the node.
    stack.workers.clear();
    stack.start_worker().unwrap();
    let id = uuid::Uuid::parse_str(&node_id).unwrap();
    let shown = stack.hivectl(&["node", &node_id, "--json"]).unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        shown["node"]["failed_step"], "launching_instance",
        "{shown}"
    );
    let listed = stack.hivectl(&["nodes", "--state", "failed"]).unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&node_id));
    let bad = stack.hivectl(&["replay", "not-a-node"]).unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("not a node id"), "{stderr}");
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_OPERATOR".into(), "alice".into()));
    let out = stack.hivectl(&["replay", &node_id]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node's log says who replayed it.
    let replays: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM node_events WHERE node_id = $1::uuid AND kind = 'replayed'",
    )
    .bind(&node_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        replays,
        vec!["replay from launching_instance, asked by operator alice".to_string()]
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("node {node_id} resumes at launching_instance (generation 1)")
    );
    assert!(matches!(
        replay_failed_node(&pool, id, "operator test").await,
        Err(OperatorError::NotFailed { .. })
    ));
    assert!(matches!(
        replay_failed_node(&pool, uuid::Uuid::new_v4(), "operator test").await,
        Err(OperatorError::NotFound(_))
    ));

    let ready = wait_for_status(&stack, &node_id, "ready").await;
    assert_eq!(
        ready["tunnel_id"], failed["tunnel_id"],
        "the tunnel was adopted, not re-created"
    );
    let cf = stack.cloudflare_state().await.unwrap();
    assert_eq!(cf["tunnels"].as_array().unwrap().len(), 1);
    assert_eq!(cf["dns_records"].as_array().unwrap().len(), 1);
    let sm = aws_sdk_secretsmanager::Client::new(&stack.sdk);
    let secrets = sm.list_secrets().send().await.unwrap();
    assert_eq!(secrets.secret_list().len(), 1);

    let kinds: Vec<(String, String)> =
        sqlx::query_as("SELECT step, kind FROM node_events WHERE node_id = $1::uuid ORDER BY id")
            .bind(&node_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    let has = |step: &str, kind: &str| kinds.iter().any(|(s, k)| s == step && k == kind);
    assert!(has("launching_instance", "failed"), "{kinds:?}");
    assert!(has("launching_instance", "replayed"), "{kinds:?}");
    assert!(has("waiting_for_tunnel", "succeeded"), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_a_failed_provisioning_is_undone_then_replay_starts_over() {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().unwrap();
    stack
        .start_worker_with(&[("HIVE_AMI_ID", "ami-0000000000000dead")])
        .unwrap();
    let node_id = stack.send_checkout(USER, "pro").await.unwrap().remove(0);

    // Failed, and once the undo has run, nothing of it is left anywhere.
    let failed = wait_for_status(&stack, &node_id, "failed").await;
    assert_eq!(failed["error_code"], "image_unavailable", "{failed}");
    // The app saw `failed` at once; the undo behind it finishes later.
    stack
        .wait_for_state(&node_id, "failed", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let cf = stack.cloudflare_state().await.unwrap();
    assert_eq!(
        cf["tunnels"].as_array().unwrap().len(),
        1,
        "one tunnel was made, then deleted"
    );
    let (status, node) = stack
        .get_as(
            &format!("/api/v1/nodes/{node_id}"),
            Some(&Stack::jwt(USER, 60)),
        )
        .await
        .unwrap();
    assert_eq!((status, node["status"].as_str()), (200, Some("failed")));
    assert!(node["error"]
        .as_str()
        .unwrap()
        .starts_with("the node's image is not available"));

    // After the fix, a replay provisions it from the start.
    stack.workers.clear();
    stack.start_worker().unwrap();
    let pool = stack.pool().await.unwrap();
    let replayed = replay_failed_node(
        &pool,
        uuid::Uuid::parse_str(&node_id).unwrap(),
        "operator test",
    )
    .await
    .unwrap();
    assert_eq!(replayed.step.as_str(), "pending");
    let ready = wait_for_status(&stack, &node_id, "ready").await;
    assert!(ready["instance_id"].is_string());
}
