//! The api alone against a real Postgres: Stripe's signature scheme, idempotent recording, and
//! what the app may see.

use hive_tests::assert_json_error;
use hive_tests::stack::{Stack, StackOptions, OLD_WEBHOOK_SECRET, WEBHOOK_SECRET};
use hive_tests::stripe_events::{signature, Fixtures};
use serde_json::{json, Value};
use sqlx::PgPool;

/// Rows in every table a webhook may write.
async fn counts(pool: &PgPool) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM stripe_events), (SELECT count(*) FROM subscriptions), \
         (SELECT count(*) FROM nodes), (SELECT count(*) FROM apalis.jobs)",
    )
    .fetch_one(pool)
    .await
    .expect("counting rows")
}

async fn api_only() -> Stack {
    let mut stack = Stack::start(StackOptions::default()).await.expect("stack");
    stack.start_api().expect("hive-api");
    stack
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_stale_wrong_and_malformed_webhooks_are_400_and_change_nothing() {
    let stack = api_only().await;
    let pool = stack.pool().await.unwrap();
    let fixtures = Fixtures::load().unwrap();
    let event = fixtures
        .subscription_checkout("user-a", "team", None)
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let now = chrono::Utc::now().timestamp();
    let before = counts(&pool).await;

    let forged = format!("t={now},v1={}", "ab".repeat(32));
    let wrong_secret = signature(&body, "whsec_not_ours");
    let stale = hive_api::stripe_signature::sign(&body, WEBHOOK_SECRET, now - 301);
    // A minute past the tolerance: the api reads its clock later than we did here.
    let future = hive_api::stripe_signature::sign(&body, WEBHOOK_SECRET, now + 360);
    let not_json = b"{\"id\": \"evt_1\", ".to_vec();
    let not_an_event = serde_json::to_vec(&json!({ "hello": "world" })).unwrap();
    let tampered = {
        let mut e = event.clone();
        e["data"]["object"]["metadata"]["plan"] = json!("pro");
        serde_json::to_vec(&e).unwrap()
    };

    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("forged signature", body.clone(), Some(forged)),
        ("wrong secret", body.clone(), Some(wrong_secret)),
        ("stale timestamp", body.clone(), Some(stale)),
        ("timestamp from the future", body.clone(), Some(future)),
        (
            "body changed after signing",
            tampered,
            Some(signature(&body, WEBHOOK_SECRET)),
        ),
        ("no signature", body.clone(), None),
        ("garbage header", body.clone(), Some("nonsense".into())),
        (
            "malformed JSON",
            not_json.clone(),
            Some(signature(&not_json, WEBHOOK_SECRET)),
        ),
        (
            "JSON that is no event",
            not_an_event.clone(),
            Some(signature(&not_an_event, WEBHOOK_SECRET)),
        ),
    ];
    for (what, body, sig) in cases {
        let (status, answer) = stack.post_webhook(&body, sig.as_deref()).await.unwrap();
        assert_json_error(status, &answer, 400, what);
        assert_eq!(counts(&pool).await, before, "{what} changed the database");
    }

    // A plan we do not sell: recorded and held, answered 200 (Stripe's retries end after
    // three days; the event must not end with them), nothing else changed.
    let unknown_plan = serde_json::to_vec(
        &fixtures
            .subscription_checkout("user-a", "gold", None)
            .unwrap(),
    )
    .unwrap();
    let (status, answer) = stack
        .post_webhook(
            &unknown_plan,
            Some(&signature(&unknown_plan, WEBHOOK_SECRET)),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["held"]
            .as_str()
            .is_some_and(|why| why.contains("gold")),
        "held, with why: {answer}"
    );
    let held = counts(&pool).await;
    assert_eq!(
        (held.1, held.2, held.3),
        (before.1, before.2, before.3),
        "an unknown plan changed more than its record"
    );
    assert_eq!(held.0, before.0 + 1, "the held event is recorded");
    let before = held;

    // The same event, properly signed with the secret being rotated out, is accepted.
    let (status, answer) = stack
        .post_webhook(&body, Some(&signature(&body, OLD_WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"].as_array().map(Vec::len), Some(5));
    let (events, subs, nodes, jobs) = counts(&pool).await;
    assert_eq!(
        (events, subs, nodes, jobs),
        (before.0 + 1, before.1 + 1, before.2 + 5, before.3 + 5)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_recorded_once_and_parsed_leniently() {
    let stack = api_only().await;
    let pool = stack.pool().await.unwrap();
    let fixtures = Fixtures::load().unwrap();

    // An event type we do not act on: recorded, answered 200, nothing provisioned.
    let customer = fixtures
        .event("customer.created", fixtures.object("customer").unwrap())
        .unwrap();
    let body = serde_json::to_vec(&customer).unwrap();
    let (status, answer) = stack
        .post_webhook(&body, Some(&signature(&body, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(counts(&pool).await, (1, 0, 0, 0));

    // A newer API version with fields we have never heard of is still a checkout.
    let mut newer = fixtures
        .subscription_checkout("user-b", "pro", None)
        .unwrap();
    newer["api_version"] = json!("2099-01-01.future");
    newer["brand_new_envelope_field"] = json!({ "x": 1 });
    newer["data"]["object"]["brand_new_session_field"] = json!([1, 2, 3]);
    let body = serde_json::to_vec(&newer).unwrap();
    let sig = signature(&body, WEBHOOK_SECRET);
    let (status, answer) = stack.post_webhook(&body, Some(&sig)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["nodes"].as_array().map(Vec::len), Some(1));

    // Redelivered: 200, no second effect.
    let (status, answer) = stack.post_webhook(&body, Some(&sig)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicate"], json!(true));
    assert_eq!(counts(&pool).await, (2, 1, 1, 1));

    // A one-off payment checkout is recorded but provisions nothing.
    let mut payment = fixtures
        .subscription_checkout("user-b", "pro", None)
        .unwrap();
    payment["data"]["object"]["mode"] = json!("payment");
    payment["data"]["object"]["subscription"] = Value::Null;
    let body = serde_json::to_vec(&payment).unwrap();
    let (status, _) = stack
        .post_webhook(&body, Some(&signature(&body, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(counts(&pool).await, (3, 1, 1, 1));
}

/// An event we only record is stored by one statement outside any transaction: its
/// redelivery must still be answered as a duplicate and stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_record_only_event_is_a_duplicate_stored_once() {
    let stack = api_only().await;
    let pool = stack.pool().await.unwrap();
    let fixtures = Fixtures::load().unwrap();
    let customer = fixtures
        .event("customer.created", fixtures.object("customer").unwrap())
        .unwrap();
    let body = serde_json::to_vec(&customer).unwrap();
    let sig = signature(&body, WEBHOOK_SECRET);

    let (status, answer) = stack.post_webhook(&body, Some(&sig)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "received": true, "nodes": [] }));

    let (status, answer) = stack.post_webhook(&body, Some(&sig)).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({ "received": true, "duplicate": true }));
    assert_eq!(counts(&pool).await, (1, 0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_app_sees_only_its_own_nodes() {
    let stack = api_only().await;
    let fixtures = Fixtures::load().unwrap();
    let event = fixtures
        .subscription_checkout("alice", "pro", Some("eu-west-1"))
        .unwrap();
    let body = serde_json::to_vec(&event).unwrap();
    let (status, answer) = stack
        .post_webhook(&body, Some(&signature(&body, WEBHOOK_SECRET)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let node_id = answer["nodes"][0].as_str().unwrap().to_string();

    let alice = Stack::jwt("alice", 300);
    let bob = Stack::jwt("bob", 300);

    let (status, list) = stack.get_as("/api/v1/nodes", Some(&alice)).await.unwrap();
    assert_eq!(status, 200);
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(node["id"], json!(node_id));
    assert_eq!(node["region"], json!("eu-west-1"));
    assert_eq!(node["instance_type"], json!("t4g.small"));
    assert!(["pending", "provisioning"].contains(&node["status"].as_str().unwrap()));
    assert_eq!(
        node["hostname"],
        json!(format!("{node_id}.nodes.hive.test"))
    );
    for field in [
        "step",
        "instance_id",
        "tunnel_id",
        "url",
        "error",
        "created_at",
        "updated_at",
    ] {
        assert!(node.get(field).is_some(), "node has no `{field}`: {node}");
    }

    let path = format!("/api/v1/nodes/{node_id}");
    let (status, one) = stack.get_as(&path, Some(&alice)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(one["id"], json!(node_id));

    let (status, body) = stack.get_as(&path, Some(&bob)).await.unwrap();
    assert_json_error(status, &body, 404, "another user's node");
    let (status, list) = stack.get_as("/api/v1/nodes", Some(&bob)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(list["nodes"], json!([]));
    let (status, body) = stack
        .get_as("/api/v1/nodes/not-a-uuid", Some(&alice))
        .await
        .unwrap();
    assert_json_error(status, &body, 404, "malformed id");

    let (status, body) = stack.get_as(&path, None).await.unwrap();
    assert_json_error(status, &body, 401, "no token");
    let (status, body) = stack.get_as("/api/v1/nodes", None).await.unwrap();
    assert_json_error(status, &body, 401, "no token on the list");
    let expired = Stack::jwt("alice", -60);
    let (status, body) = stack.get_as(&path, Some(&expired)).await.unwrap();
    assert_json_error(status, &body, 401, "expired token");
    let foreign = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": "alice", "exp": chrono::Utc::now().timestamp() + 300 }),
        &jsonwebtoken::EncodingKey::from_secret(b"somebody-elses-secret-000000000"),
    )
    .unwrap();
    let (status, body) = stack.get_as(&path, Some(&foreign)).await.unwrap();
    assert_json_error(status, &body, 401, "token signed with another secret");
    let (status, body) = stack.get_as(&path, Some("garbage")).await.unwrap();
    assert_json_error(status, &body, 401, "garbage token");

    let (status, health) = stack.get_as("/healthz", None).await.unwrap();
    assert_eq!((status, health["status"].clone()), (200, json!("ok")));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_gets_over_its_database_connections_dying_at_the_first_failure() {
    let stack = api_only().await;
    let pool = stack.pool().await.unwrap();
    stack.send_checkout("user-backends", "team").await.unwrap();
    let token = Stack::jwt("user-backends", 60);
    for _ in 0..3 {
        let (status, _) = stack.get_as("/api/v1/nodes", Some(&token)).await.unwrap();
        assert_eq!(status, 200);
    }
    // Every other backend dies (a restart or failover, seen from the api's side), and the app
    // asks again at once: no idle time after which the pool would have pinged them anyway.
    let (killed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed > 0, "no api connection to kill");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, body) = stack.get_as("/api/v1/nodes", Some(&token)).await.unwrap();
        if status != 200 {
            assert_json_error(status, &body, 500, "internal");
        }
        statuses.push(status);
    }
    assert!(
        statuses[1..].iter().all(|s| *s == 200),
        "after the first failure every request is answered: {statuses:?}"
    );
    // Webhooks are recorded again too.
    stack
        .send_checkout("user-backends-2", "team")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_request_after_a_postgres_restart_is_answered() {
    use sqlx::Connection;
    let mut stack = api_only().await;
    let nodes = stack.send_checkout("user-restart", "team").await.unwrap();
    let token = Stack::jwt("user-restart", 60);
    for _ in 0..3 {
        let (status, _) = stack.get_as("/api/v1/nodes", Some(&token)).await.unwrap();
        assert_eq!(status, 200);
    }
    // A restart: every connection the api holds dies with it.
    stack.pg.stop();
    stack.pg.run().unwrap();
    let url = stack.pg.url("postgres");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sqlx::PgConnection::connect(&url).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "postgres did not come back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Postgres takes connections again: the app's very next request is answered, not failed
    // on a connection that died in the restart.
    let (status, body) = stack.get_as("/api/v1/nodes", Some(&token)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["nodes"].as_array().map(Vec::len),
        Some(nodes.len()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_of_the_other_mode_is_recorded_refused_and_changes_nothing() {
    // The stack's key is a test key: a live event, though signed with our secret, is refused.
    let stack = api_only().await;
    let pool = stack.pool().await.unwrap();
    let fixtures = Fixtures::load().unwrap();
    let mut event = fixtures
        .subscription_checkout("user-live", "pro", None)
        .unwrap();
    event["livemode"] = json!(true);
    let before = counts(&pool).await;
    let (status, answer) = stack.post_event(&event).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["refused"]
            .as_str()
            .is_some_and(|why| why.contains("live event")),
        "{answer}"
    );
    let after = counts(&pool).await;
    assert_eq!(
        (after.0, after.1, after.2, after.3),
        (before.0 + 1, before.1, before.2, before.3),
        "recorded, and nothing else"
    );
    let refused: Option<String> =
        sqlx::query_scalar("SELECT refused_reason FROM stripe_events WHERE id = $1")
            .bind(event["id"].as_str().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(refused.is_some(), "recorded as refused");
    // Reprocessing it is refused too.
    let out = stack
        .hivectl(&[
            "stripe-events",
            "reprocess",
            event["id"].as_str().unwrap(),
            "--yes",
        ])
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(counts(&pool).await, after);
    // The same event in our mode provisions.
    let mut ours = fixtures
        .subscription_checkout("user-live", "pro", None)
        .unwrap();
    ours["livemode"] = json!(false);
    let (status, answer) = stack.post_event(&ours).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["nodes"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
}
