//! The app's node controls: restart, stop, start, delete and create, each `202` with the node
//! and logged with who asked; what the node's state does not allow is a `409` that enqueues
//! nothing; another user's node is a `404`.

use std::time::Duration;

use hive_tests::assert_json_error;
use hive_tests::stack::{Stack, StackOptions};
use hive_tests::stripe_events::{Fixtures, Subscription};
use serde_json::{json, Value};
use sqlx::PgPool;

fn options() -> StackOptions {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_HEARTBEAT_MS", "500"),
            ("HIVE_STALL_AFTER_MS", "3000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    options
}

async fn jobs(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM apalis.jobs")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn post(stack: &Stack, token: &str, path: &str) -> (u16, Value) {
    stack
        .post_as(path, Some(token), &[], &json!({}))
        .await
        .unwrap()
}

fn assert_conflict(status: u16, body: &Value, what: &str) {
    assert_json_error(status, body, 409, what);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_app_stops_starts_restarts_deletes_and_recreates_its_node() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let pool = stack.pool().await.unwrap();
    let user = "user-controls";
    let token = Stack::jwt(user, 600);
    let fixtures = Fixtures::load().unwrap();
    let sub = Subscription::new(user);
    let t0 = chrono::Utc::now().timestamp() - 100;
    stack
        .send_event(&fixtures.checkout_of(&sub, "pro", t0).unwrap())
        .await
        .unwrap();
    let nodes = stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let node = nodes[0]["id"].as_str().unwrap().to_string();
    let instance = stack.instance_of(&node).await.unwrap().unwrap();
    let base = format!("/api/v1/nodes/{node}");

    // Another user's node is a 404 for every control, and nothing is enqueued.
    let stranger = Stack::jwt("someone-else", 600);
    let before = jobs(&pool).await;
    for control in ["restart", "stop", "start"] {
        let (status, body) = post(&stack, &stranger, &format!("{base}/{control}")).await;
        assert_eq!(status, 404, "{control}: {body}");
    }
    let resp = reqwest::Client::new()
        .delete(stack.api_url(&base))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(jobs(&pool).await, before);

    // Stop: 202 with the node, then `stopped` with its instance stopped; asked again, nothing more.
    let (status, body) = post(&stack, &token, &format!("{base}/stop")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["id"], json!(node));
    assert_eq!(body["desired"], "stopped");
    stack
        .wait_for_state(&node, "stopped", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "stopped"
    );
    let stops = stack.aws_proxy.calls("StopInstances");
    let (status, body) = post(&stack, &token, &format!("{base}/stop")).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("stopped")));
    // A stopped node cannot restart.
    let before = jobs(&pool).await;
    let (status, body) = post(&stack, &token, &format!("{base}/restart")).await;
    assert_conflict(status, &body, "restart while stopped");
    assert_eq!(
        jobs(&pool).await,
        before,
        "a refused control enqueued a job"
    );

    // Billing leaves a node its user stopped alone: an unpaid-then-paid subscription does not
    // start it.
    let unpaid = fixtures
        .subscription_event("updated", &sub, "unpaid", "pro", 1, t0 + 10)
        .unwrap();
    stack.send_event(&unpaid).await.unwrap();
    // ... and while billing holds it, the user cannot start it either.
    let (status, body) = post(&stack, &token, &format!("{base}/start")).await;
    assert_conflict(status, &body, "start while unpaid");
    let active = fixtures
        .subscription_event("updated", &sub, "active", "pro", 1, t0 + 20)
        .unwrap();
    stack.send_event(&active).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "stopped"
    );
    assert_eq!(stack.aws_proxy.calls("StopInstances"), stops);

    // Start: the same instance runs again, the node is ready.
    let (status, body) = post(&stack, &token, &format!("{base}/start")).await;
    assert_eq!(status, 202, "{body}");
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "running"
    );

    // Restart: ready again after one reboot.
    let reboots = stack.aws_proxy.calls("RebootInstances");
    let (status, _) = post(&stack, &token, &format!("{base}/restart")).await;
    assert_eq!(status, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stack.aws_proxy.calls("RebootInstances") == reboots {
        assert!(std::time::Instant::now() < deadline, "no reboot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(stack.aws_proxy.calls("RebootInstances"), reboots + 1);

    // The plan (pro: one node) has no room for another.
    let (status, body) = stack
        .post_as("/api/v1/nodes", Some(&token), &[], &json!({}))
        .await
        .unwrap();
    assert_conflict(status, &body, "a node over the plan");

    // Delete: torn down, nothing left; a deleted node cannot be started.
    let resp = reqwest::Client::new()
        .delete(stack.api_url(&base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    // Until it is gone, the node being torn down still counts against the plan.
    let (status, body) = stack
        .post_as("/api/v1/nodes", Some(&token), &[], &json!({}))
        .await
        .unwrap();
    assert_conflict(status, &body, "a node while the deleted one is torn down");
    stack
        .wait_for_state(&node, "terminated", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
    let (status, body) = post(&stack, &token, &format!("{base}/start")).await;
    assert_conflict(status, &body, "start a terminated node");

    // The log says who asked for each.
    let asked: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM node_events WHERE node_id = $1::uuid AND kind IN ('requested', 'teardown_requested') ORDER BY id",
    )
    .bind(&node)
    .fetch_all(&pool)
    .await
    .unwrap();
    for control in ["stop", "start", "restart #1", "terminate (requested)"] {
        assert!(
            asked
                .iter()
                .any(|d| d.starts_with(control) && d.ends_with(&format!("asked by user {user}"))),
            "{control} not logged with its user: {asked:#?}"
        );
    }

    // The deletion made room under the plan: the app creates a node, and it becomes ready.
    let (status, body) = stack
        .post_as(
            "/api/v1/nodes",
            Some(&token),
            &[],
            &json!({ "region": "eu-west-1" }),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let new = body["id"].as_str().unwrap().to_string();
    assert_ne!(new, node);
    assert_eq!(body["instance_type"], "t4g.small");
    stack
        .wait_for_state(&new, "ready", Duration::from_secs(90))
        .await
        .unwrap();
    // A region nobody serves, and an unknown field, change nothing.
    for (body, expected) in [
        (json!({ "region": "mars-north-1" }), 422),
        (json!({ "colour": "blue" }), 400),
    ] {
        let (status, answer) = stack
            .post_as("/api/v1/nodes", Some(&token), &[], &body)
            .await
            .unwrap();
        assert_eq!(status, expected, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_over_the_node_change_limit_gets_429_and_nothing_changes() {
    let mut options = options();
    options
        .extra_env
        .push(("HIVE_NODE_CHANGES_PER_HOUR".into(), "1".into()));
    let mut stack = Stack::start(options).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let user = "user-change-limit";
    let token = Stack::jwt(user, 600);
    let fixtures = Fixtures::load().unwrap();
    let sub = Subscription::new(user);
    // The checkout's five nodes are billing's doing, not the user's: they do not count.
    stack
        .send_event(&fixtures.checkout_of(&sub, "team", 0).unwrap())
        .await
        .unwrap();
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM nodes WHERE user_id = $1 ORDER BY ordinal")
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(ids.len(), 5);
    let delete = |id: &str| {
        let (url, token) = (stack.api_url(&format!("/api/v1/nodes/{id}")), token.clone());
        async move {
            let resp = reqwest::Client::new()
                .delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            (status, retry_after, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, _, body) = delete(&ids[0]).await;
    assert_eq!(status, 202, "the hour's one change: {body}");
    let jobs_before = jobs(&pool).await;
    let (status, retry_after, body) = delete(&ids[1]).await;
    assert_json_error(status, &body, 429, "a second change within the hour");
    let secs: u64 = retry_after
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3000..=3600).contains(&secs), "Retry-After {secs}");
    // Nothing changed: the node runs on, nothing was enqueued, nothing logged.
    let (desired, asked): (String, i64) = sqlx::query_as(
        "SELECT desired, (SELECT count(*) FROM node_events WHERE node_id = $1::uuid \
         AND kind = 'teardown_requested') FROM nodes WHERE id = $1::uuid",
    )
    .bind(&ids[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((desired.as_str(), asked), ("running", 0));
    assert_eq!(jobs(&pool).await, jobs_before);
    // Creating is a change too (and another user is not held back).
    let (status, body) = stack
        .post_as("/api/v1/nodes", Some(&token), &[], &json!({}))
        .await
        .unwrap();
    assert_json_error(status, &body, 429, "a creation over the limit");
    let (status, body) = stack
        .get_as("/api/v1/nodes", Some(&Stack::jwt("someone-else", 600)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiters_wake_when_the_node_gets_there_on_one_listener() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let user = "user-waits";
    let token = Stack::jwt(user, 600);
    let node = stack.send_checkout(user, "pro").await.unwrap().remove(0);
    let wait = format!("/api/v1/nodes/{node}/wait?status=ready&timeout=120");

    // More waiters than the api has database connections, before any worker runs.
    let mut waiters = Vec::new();
    for _ in 0..24 {
        let url = stack.api_url(&wait);
        let token = token.clone();
        waiters.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await?;
            let status = resp.status().as_u16();
            anyhow::Ok((status, resp.json::<Value>().await?))
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "a waiter answered before the node moved"
    );
    // They cost one listening connection, and the api still answers others meanwhile.
    let listeners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%LISTEN%hive_node_changed%' \
         AND pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(listeners, 1);
    let (status, _) = stack
        .get_as(&format!("/api/v1/nodes/{node}"), Some(&token))
        .await
        .unwrap();
    assert_eq!(status, 200);

    stack.start_worker().unwrap();
    for waiter in waiters {
        let (status, body) = waiter.await.unwrap().unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ready")),
            "{body}"
        );
    }

    // Already there: at once. Not there in time: 200 with the node as it is (its status says
    // it did not get there).
    let (status, body) = stack.get_as(&wait, Some(&token)).await.unwrap();
    assert_eq!((status, body["id"].as_str()), (200, Some(node.as_str())));
    let (status, body) = stack
        .get_as(
            &format!("/api/v1/nodes/{node}/wait?status=suspended&timeout=1"),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ready")),
        "{body}"
    );
    // Bad input is a JSON 400; another user's node a 404.
    for query in ["status=bogus", "timeout=5", "status=ready&timeout=soon"] {
        let (status, body) = stack
            .get_as(&format!("/api/v1/nodes/{node}/wait?{query}"), Some(&token))
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"]["message"].is_string(), "{query}: {body}");
    }
    let (status, _) = stack
        .get_as(&wait, Some(&Stack::jwt("someone-else", 600)))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Being deleted, it can never be ready again: 409 at once; waiting for `terminated` works.
    let resp = reqwest::Client::new()
        .delete(stack.api_url(&format!("/api/v1/nodes/{node}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let (status, body) = stack.get_as(&wait, Some(&token)).await.unwrap();
    assert_eq!(status, 409, "{body}");
    let (status, body) = stack
        .get_as(
            &format!("/api/v1/nodes/{node}/wait?status=terminated&timeout=60"),
            Some(&token),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("terminated")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_gives_the_first_answer_again() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let user = "user-keys";
    let token = Stack::jwt(user, 600);
    let nodes = stack.send_checkout(user, "team").await.unwrap();
    let node = &nodes[0];
    let http = reqwest::Client::new();
    let send = |path: String, key: &'static str| {
        let req = http
            .post(stack.api_url(&path))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .json(&json!({}));
        async move {
            let resp = req.send().await.unwrap();
            let replayed = resp.headers().contains_key("idempotent-replayed");
            let status = resp.status().as_u16();
            (status, replayed, resp.json::<Value>().await.unwrap())
        }
    };
    let restarts = || async {
        let n: i32 = sqlx::query_scalar("SELECT restarts_requested FROM nodes WHERE id = $1::uuid")
            .bind(node)
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    };

    let restart = format!("/api/v1/nodes/{node}/restart");
    let (status, replayed, first) = send(restart.clone(), "restart-1").await;
    assert_eq!((status, replayed), (202, false), "{first}");
    let (status, replayed, again) = send(restart.clone(), "restart-1").await;
    assert_eq!((status, replayed), (202, true));
    assert_eq!(again, first);
    assert_eq!(restarts().await, 1, "the repeated request ran again");
    // A new key is a new request.
    let (status, _, _) = send(restart.clone(), "restart-2").await;
    assert_eq!(status, 202);
    assert_eq!(restarts().await, 2);
    // The same key with another request is refused, and runs nothing.
    let (status, _, body) = send(format!("/api/v1/nodes/{node}/stop"), "restart-1").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
    let desired: String = sqlx::query_scalar("SELECT desired FROM nodes WHERE id = $1::uuid")
        .bind(node)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(desired, "running");
    // A refusal is an answer too: the same again.
    let (status, replayed, _) = send("/api/v1/nodes".into(), "create-1").await;
    assert_eq!((status, replayed), (409, false));
    let (status, replayed, _) = send("/api/v1/nodes".into(), "create-1").await;
    assert_eq!((status, replayed), (409, true));
    // Keys are the user's own: another user's same key is theirs, and meets their own 404.
    let resp = http
        .post(stack.api_url(&restart))
        .bearer_auth(Stack::jwt("someone-else", 600))
        .header("Idempotency-Key", "restart-1")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(restarts().await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_view_tells_what_a_node_waits_for_and_the_list_pages() {
    let mut stack = Stack::start(options()).await.expect("stack");
    stack.start_api().unwrap();
    stack.aws_proxy.hold_pending(true);
    stack.start_worker().unwrap();
    let user = "user-views";
    let token = Stack::jwt(user, 600);
    let nodes = stack.send_checkout(user, "team").await.unwrap();

    // Waiting for its instance: not an error, and the conditions say why.
    stack
        .wait_for_state(&nodes[0], "waiting_for_instance", Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, node) = stack
        .get_as(&format!("/api/v1/nodes/{}", nodes[0]), Some(&token))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(node["status"], "provisioning");
    assert!(node["error"].is_null(), "{node}");
    assert_eq!(node["waiting_for"], "instance is pending", "{node}");
    let running = &node["conditions"][0];
    assert_eq!(running["type"], "InstanceRunning");
    assert_eq!(running["status"], "false");
    assert_eq!(running["reason"], "waiting_for_instance");
    assert_eq!(running["message"], "instance is pending");
    let events = node["events"].as_array().unwrap();
    assert!(!events.is_empty() && events.len() <= 20, "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["kind"] == "waiting" && e["step"] == "waiting_for_instance"));

    stack.aws_proxy.release_pending();
    stack
        .wait_all_status(&token, "ready", 5, Duration::from_secs(120))
        .await
        .unwrap();
    let (_, node) = stack
        .get_as(&format!("/api/v1/nodes/{}", nodes[0]), Some(&token))
        .await
        .unwrap();
    for condition in node["conditions"].as_array().unwrap() {
        assert_eq!(condition["status"], "true", "{condition}");
    }
    assert_eq!(node["events"].as_array().unwrap().len(), 20);

    // Pages of two, in creation order, each node once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/v1/nodes?limit=2".to_string(),
            Some(c) => format!("/api/v1/nodes?limit=2&cursor={c}"),
        };
        let (status, page) = stack.get_as(&path, Some(&token)).await.unwrap();
        assert_eq!(status, 200, "{page}");
        let got = page["nodes"].as_array().unwrap();
        assert!(got.len() <= 2);
        seen.extend(got.iter().map(|n| n["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, nodes);

    // The status filter: one node stopped.
    let (status, _) = post(&stack, &token, &format!("/api/v1/nodes/{}/stop", nodes[1])).await;
    assert_eq!(status, 202);
    stack
        .wait_for_state(&nodes[1], "stopped", Duration::from_secs(60))
        .await
        .unwrap();
    let (_, stopped) = stack
        .get_as("/api/v1/nodes?status=stopped", Some(&token))
        .await
        .unwrap();
    let stopped = stopped["nodes"].as_array().unwrap();
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["id"], json!(nodes[1]));
    let conditions: Vec<(&str, &str)> = stopped[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("InstanceRunning", "false"),
            ("TunnelHealthy", "false"),
            ("DnsRouted", "true")
        ]
    );
    let (_, ready) = stack
        .get_as("/api/v1/nodes?status=ready", Some(&token))
        .await
        .unwrap();
    assert_eq!(ready["nodes"].as_array().unwrap().len(), 4);

    // Bad paging input is a JSON 400.
    for query in ["limit=0", "limit=many", "cursor=not-ours", "status=asleep"] {
        let (status, body) = stack
            .get_as(&format!("/api/v1/nodes?{query}"), Some(&token))
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"]["message"].is_string(), "{query}: {body}");
    }
}
