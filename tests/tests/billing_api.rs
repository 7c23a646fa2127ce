//! The app's billing calls: checkout and portal sessions through async-stripe's client against
//! the Stripe stand-in, the billing view, and usage in node-hours.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hive_tests::assert_json_error;
use hive_tests::stack::{Stack, StackOptions, NODE_DOMAIN};
use hive_tests::stripe_events::{Fixtures, Subscription};
use serde_json::{json, Value};

const PRO_PRICE: &str = "price_pro_test";

/// A stack whose plans carry Stripe prices (pro has one; team has none).
async fn stack_with_prices(extra: &[(&str, &str)]) -> (Stack, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hive.toml");
    std::fs::write(
        &file,
        format!(
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nvolume_gb = 10\n\
             prices = [\"{PRO_PRICE}\"]\n\n[plans.team]\ninstance_type = \"t4g.medium\"\n\
             nodes = 5\nvolume_gb = 50\n"
        ),
    )
    .unwrap();
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [("HIVE_CONFIG_FILE", file.display().to_string().as_str())]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    stack.stripe.add_price(PRO_PRICE);
    stack.start_api().unwrap();
    (stack, dir)
}

fn checkout_body() -> Value {
    json!({
        "plan": "pro",
        "success_url": "https://app.example.com/welcome",
        "cancel_url": "https://app.example.com/pricing"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn checkout_and_portal_go_through_stripes_client() {
    let (stack, _dir) = stack_with_prices(&[]).await;
    let user = "user-checkout";
    let token = Stack::jwt(user, 600);
    let stripe_base = format!("http://{}", stack.stripe_addr);

    let (status, first) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &[("Idempotency-Key", "checkout-key-1")],
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{first}");
    assert!(first["id"].as_str().unwrap().starts_with("cs_test_"));
    assert!(
        first["url"].as_str().unwrap().starts_with(&stripe_base),
        "{first}"
    );
    // The stand-in saw the plan's price, the user and the metadata, and the key.
    let received = stack.stripe.received();
    let sent = &received.last().unwrap();
    assert_eq!(sent.path, "/v1/checkout/sessions");
    // The key Stripe sees is derived from the user and theirs (Stripe scopes keys per account).
    let sent_key = sent.idempotency_key.clone().unwrap_or_default();
    assert!(
        sent_key.starts_with("hive-") && !sent_key.contains("checkout-key-1"),
        "{sent_key}"
    );
    for (key, value) in [
        ("mode", "subscription"),
        ("line_items[0][price]", PRO_PRICE),
        ("line_items[0][quantity]", "1"),
        ("client_reference_id", user),
        ("metadata[user]", user),
        ("metadata[plan]", "pro"),
        ("metadata[region]", "eu-west-1"),
        ("subscription_data[metadata][user]", user),
        ("subscription_data[metadata][plan]", "pro"),
    ] {
        assert_eq!(
            sent.form.get(key).map(String::as_str),
            Some(value),
            "{key}: {:?}",
            sent.form
        );
    }
    // The same key twice gives the same session.
    let (status, again) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &[("Idempotency-Key", "checkout-key-1")],
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(again["id"], first["id"]);
    // Another user who picks the same key gets a session of their own.
    let (status, theirs) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&Stack::jwt("user-same-key", 600)),
            &[("Idempotency-Key", "checkout-key-1")],
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{theirs}");
    assert_ne!(
        theirs["id"], first["id"],
        "two users, one key: two sessions"
    );
    assert_eq!(
        stack
            .stripe
            .received()
            .last()
            .unwrap()
            .form
            .get("client_reference_id")
            .map(String::as_str),
        Some("user-same-key")
    );

    // No customer yet: the portal is a 404.
    let portal = json!({ "return_url": "https://app.example.com/account" });
    let (status, body) = stack
        .post_as("/api/v1/billing/portal", Some(&token), &[], &portal)
        .await
        .unwrap();
    assert_json_error(status, &body, 404, "portal without a customer");

    // The checkout completes: the user's customer opens the portal.
    let sub = Subscription::new(user);
    stack.stripe.add_customer(&sub.customer);
    let completed = Fixtures::load()
        .unwrap()
        .checkout_of(&sub, "pro", 0)
        .unwrap();
    stack.send_event(&completed).await.unwrap();
    let (status, body) = stack
        .post_as("/api/v1/billing/portal", Some(&token), &[], &portal)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["url"].as_str().unwrap().starts_with(&stripe_base),
        "{body}"
    );
    let sent = stack.stripe.received();
    let sent = sent.last().unwrap();
    assert_eq!(sent.form.get("customer"), Some(&sub.customer));
    assert_eq!(
        sent.form.get("return_url").map(String::as_str),
        Some("https://app.example.com/account")
    );
    // Another user has no customer of theirs: still a 404.
    let (status, body) = stack
        .post_as(
            "/api/v1/billing/portal",
            Some(&Stack::jwt("someone-else", 600)),
            &[],
            &portal,
        )
        .await
        .unwrap();
    assert_json_error(status, &body, 404, "another user's portal");
    // A second checkout of this user names their customer.
    let (status, _) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &[],
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        stack.stripe.received().last().unwrap().form.get("customer"),
        Some(&sub.customer)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_billing_requests_get_a_json_error_and_reach_nobody() {
    let (stack, _dir) = stack_with_prices(&[]).await;
    let token = Stack::jwt("user-bad-billing", 600);
    let with = |change: &dyn Fn(&mut Value)| {
        let mut body = checkout_body();
        change(&mut body);
        body
    };
    for (body, expected, what) in [
        (
            with(&|b| b["plan"] = json!("platinum")),
            422,
            "unknown plan",
        ),
        (
            with(&|b| b["plan"] = json!("team")),
            422,
            "a plan without a Stripe price",
        ),
        (
            with(&|b| b["region"] = json!("mars-north-1")),
            422,
            "a region not served",
        ),
        (with(&|b| b["quantity"] = json!(0)), 422, "no quantity"),
        (
            with(&|b| {
                b.as_object_mut().unwrap().remove("success_url");
            }),
            400,
            "a missing URL",
        ),
        (
            with(&|b| b["cancel_url"] = json!("javascript:alert(1)")),
            400,
            "not a URL",
        ),
        (
            with(&|b| b["success_url"] = json!("https://evil.example.net/welcome")),
            422,
            "a return URL on a foreign origin",
        ),
        (
            with(&|b| b["success_url"] = json!("https://app.example.com.evil.net/")),
            422,
            "a foreign origin that starts like ours",
        ),
        (
            with(&|b| b["colour"] = json!("blue")),
            400,
            "an unknown field",
        ),
    ] {
        let (status, answer) = stack
            .post_as("/api/v1/billing/checkout", Some(&token), &[], &body)
            .await
            .unwrap();
        assert_json_error(status, &answer, expected, what);
    }
    let (status, answer) = stack
        .post_as("/api/v1/billing/checkout", None, &[], &checkout_body())
        .await
        .unwrap();
    assert_json_error(status, &answer, 401, "no token");
    assert!(
        stack.stripe.received().is_empty(),
        "a bad request reached Stripe"
    );

    // Stripe refusing is a 502 with Stripe's message.
    stack.stripe.fail_next(402, "Your card was declined.");
    let (status, answer) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &[],
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_json_error(status, &answer, 502, "Stripe's refusal");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Your card was declined."),
        "{answer}"
    );
    assert!(
        !answer.to_string().contains("sk_test"),
        "the key leaked: {answer}"
    );
}

/// The times of the node's moves `detail`, oldest first.
async fn moves_at(stack: &Stack, node: &str, detail: &str) -> Vec<DateTime<Utc>> {
    let pool = stack.pool().await.unwrap();
    sqlx::query_scalar(
        "SELECT at FROM node_events WHERE node_id = $1::uuid AND kind = 'transition' \
         AND detail = $2 ORDER BY id",
    )
    .bind(node)
    .bind(detail)
    .fetch_all(&pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_shows_the_subscription_and_usage_counts_only_ready_time() {
    let (mut stack, _dir) = stack_with_prices(&[("HIVE_PAST_DUE_GRACE_SECS", "3600")]).await;
    stack.start_worker().unwrap();
    let user = "user-usage";
    let token = Stack::jwt(user, 600);
    let fixtures = Fixtures::load().unwrap();
    let sub = Subscription::new(user);
    let t0 = Utc::now().timestamp() - 100;
    stack
        .send_event(&fixtures.checkout_of(&sub, "pro", t0).unwrap())
        .await
        .unwrap();
    let nodes = stack
        .wait_all_status(&token, "ready", 1, Duration::from_secs(90))
        .await
        .unwrap();
    let node = nodes[0]["id"].as_str().unwrap().to_string();
    assert!(nodes[0]["hostname"]
        .as_str()
        .unwrap()
        .ends_with(NODE_DOMAIN));

    // Ready for a while (T1), suspended for a while (T2), running again (T3).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let unpaid = fixtures
        .subscription_event("updated", &sub, "unpaid", "pro", 1, t0 + 10)
        .unwrap();
    stack.send_event(&unpaid).await.unwrap();
    stack
        .wait_for_state(&node, "suspended", Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let past_due = fixtures
        .subscription_event("updated", &sub, "past_due", "pro", 1, t0 + 20)
        .unwrap();
    stack.send_event(&past_due).await.unwrap();
    stack
        .wait_for_state(&node, "ready", Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The billing view: plan, status, nodes, and when a past-due subscription suspends.
    let (status, billing) = stack.get_as("/api/v1/billing", Some(&token)).await.unwrap();
    assert_eq!(status, 200, "{billing}");
    let view = &billing["subscriptions"][0];
    assert_eq!(view["id"], json!(sub.id));
    assert_eq!(view["plan"], "pro");
    assert_eq!(view["status"], "past_due");
    assert_eq!(view["nodes"], 1);
    let since = DateTime::from_timestamp(t0 + 20, 0).unwrap();
    assert_eq!(view["past_due_since"], json!(since));
    assert_eq!(
        view["suspends_at"],
        json!(since + chrono::TimeDelta::hours(1))
    );

    // Usage: T1 + T3, not the suspended time between.
    let to = Utc::now();
    let became_ready = moves_at(&stack, &node, "waiting_for_tunnel -> ready").await[0];
    let left_ready = moves_at(&stack, &node, "ready -> stopping_instance").await[0];
    let back = moves_at(&stack, &node, "waiting_for_reconnect -> ready").await[0];
    let expected = (left_ready - became_ready) + (to - back);
    let from = became_ready - chrono::TimeDelta::hours(1);
    let path = format!(
        "/api/v1/usage?from={}&to={}",
        from.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B"),
        to.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B"),
    );
    let (status, usage) = stack.get_as(&path, Some(&token)).await.unwrap();
    assert_eq!(status, 200, "{usage}");
    let hours = usage["total_hours"].as_f64().unwrap();
    let expected_hours = expected.num_milliseconds() as f64 / 3_600_000.0;
    assert!(
        (hours - expected_hours).abs() < 1e-6,
        "{hours} h, expected {expected_hours} h"
    );
    assert_eq!(usage["nodes"][0]["node_id"], json!(node));
    let wall = (to - became_ready).num_milliseconds() as f64 / 3_600_000.0;
    let suspended = (back - left_ready).num_milliseconds() as f64 / 3_600_000.0;
    assert!(
        hours <= wall - suspended + 1e-6,
        "{hours} h of {wall} h, {suspended} h suspended"
    );

    // A malformed window is a JSON 400.
    let (status, body) = stack
        .get_as("/api/v1/usage?from=yesterday", Some(&token))
        .await
        .unwrap();
    assert_json_error(status, &body, 400, "a malformed time");
    // Another user sees none of it.
    let (status, other) = stack
        .get_as("/api/v1/billing", Some(&Stack::jwt("someone-else", 600)))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(other["subscriptions"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_whose_request_was_cut_off_is_usable_again_after_its_lease() {
    let (mut stack, _dir) = stack_with_prices(&[("HIVE_IDEMPOTENCY_LEASE_SECS", "3")]).await;
    let token = Stack::jwt("user-cut-off", 600);
    let key = [("Idempotency-Key", "cut-off-1")];
    // Stripe is slow, the client gives up, and the api dies while the request waits.
    stack.stripe.delay_next(std::time::Duration::from_secs(30));
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(1))
        .build()
        .unwrap();
    let cut = impatient
        .post(stack.api_url("/api/v1/billing/checkout"))
        .bearer_auth(&token)
        .header(key[0].0, key[0].1)
        .json(&checkout_body())
        .send()
        .await;
    assert!(cut.is_err(), "the request should have been cut off");
    stack.apis.clear();
    stack.start_api().unwrap();
    // Within the lease the key is still held by the request that died...
    let (status, body) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &key,
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_json_error(status, &body, 409, "the key within its lease");
    // ...and after it, the key is the user's again.
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
    let (status, body) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &key,
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cs_test_")),
        "{body}"
    );
    let (status, again) = stack
        .post_as(
            "/api/v1/billing/checkout",
            Some(&token),
            &key,
            &checkout_body(),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, &again["id"]),
        (200, &body["id"]),
        "its answer is kept"
    );
}
