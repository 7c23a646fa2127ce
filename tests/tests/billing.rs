//! The nodes follow the subscription, whatever order Stripe speaks in: every order of a
//! subscription's events ends the same; lapses suspend, payments resume, an invoice never
//! revives an ended subscription nor starts an incomplete one, plan changes scale and resize, a
//! past-due grace runs out on its own, and an event naming a plan nobody configured is held
//! until the plan exists, then applied with no redelivery.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions};
use hive_tests::stripe_events::{Fixtures, Subscription};
use serde_json::Value;
use sqlx::PgPool;

fn options(extra: &[(&str, &str)]) -> StackOptions {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_HEARTBEAT_MS", "500"),
            ("HIVE_STALL_AFTER_MS", "3000"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    options
}

/// The sets of events of the issue, with Stripe times in their true order.
struct Story {
    sub: Subscription,
    fixtures: Fixtures,
    t0: i64,
}

impl Story {
    fn new(user: &str) -> Self {
        Story {
            sub: Subscription::new(user),
            fixtures: Fixtures::load().unwrap(),
            t0: chrono::Utc::now().timestamp() - 1_000,
        }
    }

    fn updated(&self, status: &str, plan: &str, quantity: u32, t: i64) -> Value {
        self.fixtures
            .subscription_event("updated", &self.sub, status, plan, quantity, self.t0 + t)
            .unwrap()
    }

    fn invoice(&self, what: &str, t: i64) -> Value {
        self.fixtures
            .invoice_event(what, &self.sub, self.t0 + t)
            .unwrap()
    }

    /// Checkout completed, subscription created (active), invoice paid, updated (active).
    fn paid(&self, plan: &str) -> Vec<Value> {
        vec![
            self.fixtures.checkout_of(&self.sub, plan, self.t0).unwrap(),
            self.fixtures
                .subscription_event("created", &self.sub, "active", plan, 1, self.t0 + 1)
                .unwrap(),
            self.invoice("paid", 2),
            self.updated("active", plan, 1, 3),
        ]
    }

    /// The same, then past due, then unpaid.
    fn lapsed(&self) -> Vec<Value> {
        let mut events = self.paid("pro");
        events.push(self.updated("past_due", "pro", 1, 4));
        events.push(self.updated("unpaid", "pro", 1, 5));
        events
    }

    /// The same, then paid again and active.
    fn back(&self) -> Vec<Value> {
        let mut events = self.lapsed();
        events.push(self.invoice("paid", 6));
        events.push(self.updated("active", "pro", 1, 7));
        events
    }

    /// The first set, then deleted.
    fn ended(&self) -> Vec<Value> {
        let mut events = self.paid("pro");
        events.push(
            self.fixtures
                .subscription_event("deleted", &self.sub, "canceled", "pro", 1, self.t0 + 4)
                .unwrap(),
        );
        events
    }

    /// Ended, then its final invoice paid later in Stripe's time: it stays ended.
    fn ended_then_paid(&self) -> Vec<Value> {
        let mut events = self.ended();
        events.push(self.invoice("paid", 5));
        events
    }

    /// A subscription of our checkout (its user in its metadata) whose first payment fails:
    /// `incomplete`, which runs nothing.
    fn first_payment_failed(&self) -> Vec<Value> {
        let mut created = self
            .fixtures
            .subscription_event("created", &self.sub, "incomplete", "pro", 1, self.t0 + 1)
            .unwrap();
        created["data"]["object"]["metadata"] = serde_json::json!({ "user": self.sub.user });
        vec![created, self.invoice("payment_failed", 2)]
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for order in permutations(n - 1) {
        for at in 0..=order.len() {
            let mut o = order.clone();
            o.insert(at, n - 1);
            all.push(o);
        }
    }
    all
}

/// Orders to deliver `n` events in: every one for up to five events; else the true order, its
/// reverse, every rotation and a fixed spread of shuffles.
fn orders(n: usize) -> Vec<Vec<usize>> {
    if n <= 5 {
        return permutations(n);
    }
    let mut orders = vec![(0..n).collect::<Vec<_>>(), (0..n).rev().collect()];
    for r in 1..n {
        orders.push((0..n).map(|i| (i + r) % n).collect());
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..24 {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        orders.push(order);
    }
    orders
}

/// Delivers `events` in `order`, then all again (Stripe's redelivery); every answer is 200.
async fn deliver(stack: &Stack, events: &[Value], order: &[usize]) {
    for &i in order.iter().chain(order) {
        stack.send_event(&events[i]).await.unwrap();
    }
}

/// The subscription's Stripe status, and its nodes' (desired, suspend_at set) of those not
/// going away.
async fn outcome(pool: &PgPool, sub: &Subscription) -> (Option<String>, Vec<(String, bool)>) {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT stripe_status FROM subscriptions WHERE stripe_subscription_id = $1",
    )
    .bind(&sub.id)
    .fetch_optional(pool)
    .await
    .unwrap()
    .flatten();
    let nodes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT n.desired, n.suspend_at IS NOT NULL FROM nodes n JOIN subscriptions s \
         ON s.id = n.subscription_id WHERE s.stripe_subscription_id = $1 AND n.desired <> 'gone' \
         ORDER BY n.ordinal",
    )
    .bind(&sub.id)
    .fetch_all(pool)
    .await
    .unwrap();
    (status, nodes)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_order_of_every_set_of_events_ends_the_same() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    /// A set's name, its events, and the status and nodes (desired, grace end set) it ends in.
    type Expected = (
        &'static str,
        fn(&Story) -> Vec<Value>,
        Option<&'static str>,
        Vec<(String, bool)>,
    );
    let sets: [Expected; 6] = [
        (
            "paid",
            |s| s.paid("pro"),
            Some("active"),
            vec![("running".into(), false)],
        ),
        (
            "lapsed",
            Story::lapsed,
            Some("unpaid"),
            vec![("suspended".into(), false)],
        ),
        (
            "back",
            Story::back,
            Some("active"),
            vec![("running".into(), false)],
        ),
        ("ended", Story::ended, Some("canceled"), vec![]),
        (
            "ended_then_paid",
            Story::ended_then_paid,
            Some("canceled"),
            vec![],
        ),
        (
            "first_payment_failed",
            Story::first_payment_failed,
            Some("incomplete"),
            vec![],
        ),
    ];
    let mut runs = 0;
    for (name, events_of, status, nodes) in sets {
        let n = events_of(&Story::new("probe")).len();
        for (k, order) in orders(n).into_iter().enumerate() {
            let story = Story::new(&format!("user-{name}-{k}"));
            deliver(&stack, &events_of(&story), &order).await;
            assert_eq!(
                outcome(&pool, &story.sub).await,
                (status.map(String::from), nodes.clone()),
                "{name} delivered in order {order:?}"
            );
            runs += 1;
        }
    }
    assert!(runs >= 24 + 3 * 30, "{runs} orders");
}

/// Waits until the node's row is in `state`.
async fn wait_for_state(stack: &Stack, node: &str, state: &str) {
    stack
        .wait_for_state(node, state, Duration::from_secs(90))
        .await
        .unwrap();
}

/// The ids of the subscription's nodes, oldest first, with their states.
async fn nodes_of(pool: &PgPool, sub: &Subscription) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT n.id::text, n.state FROM nodes n JOIN subscriptions s ON s.id = n.subscription_id \
         WHERE s.stripe_subscription_id = $1 ORDER BY n.ordinal",
    )
    .bind(&sub.id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_lapses_comes_back_and_ends_with_its_node_following() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let pool = stack.pool().await.unwrap();
    let story = Story::new("user-story");

    // The first set, in the hardest order: the subscription speaks before its checkout.
    let mut paid = story.paid("pro");
    paid.reverse();
    deliver(&stack, &paid, &[0, 1, 2, 3]).await;
    let node = nodes_of(&pool, &story.sub).await[0].0.clone();
    wait_for_state(&stack, &node, "ready").await;
    let instance = stack.instance_of(&node).await.unwrap().unwrap();
    let shape = stack.instance_shape(&instance).await.unwrap();
    assert_eq!(
        (shape.instance_type.as_str(), shape.volume_gb),
        ("t4g.small", 10)
    );

    // Past due, then unpaid (delivered unpaid first): suspended, its instance stopped.
    let lapse = [
        story.updated("unpaid", "pro", 1, 5),
        story.updated("past_due", "pro", 1, 4),
    ];
    deliver(&stack, &lapse, &[0, 1]).await;
    wait_for_state(&stack, &node, "suspended").await;
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "stopped"
    );

    // Paid again: ready, the same instance running again.
    let back = [
        story.updated("active", "pro", 1, 7),
        story.invoice("paid", 6),
    ];
    deliver(&stack, &back, &[0, 1]).await;
    wait_for_state(&stack, &node, "ready").await;
    assert_eq!(
        stack.instance_of(&node).await.unwrap().as_deref(),
        Some(instance.as_str())
    );
    assert_eq!(
        stack.instance_shape(&instance).await.unwrap().state,
        "running"
    );

    // A late `unpaid` of before the payment changes nothing.
    stack
        .send_event(&story.updated("unpaid", "pro", 1, 5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(nodes_of(&pool, &story.sub).await[0].1, "ready");

    // Deleted: nothing left in moto or the Cloudflare stand-in.
    let deleted = story
        .fixtures
        .subscription_event("deleted", &story.sub, "canceled", "pro", 1, story.t0 + 8)
        .unwrap();
    stack.send_event(&deleted).await.unwrap();
    wait_for_state(&stack, &node, "terminated").await;
    assert_eq!(stack.leftovers().await.unwrap(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_changes_scale_and_resize_the_nodes() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let pool = stack.pool().await.unwrap();

    // team -> pro: the oldest node stays (resized to pro's type), the four newest go.
    let team = Story::new("user-team");
    deliver(&stack, &team.paid("team"), &[0, 1, 2, 3]).await;
    let nodes = nodes_of(&pool, &team.sub).await;
    assert_eq!(nodes.len(), 5);
    for (node, _) in &nodes {
        wait_for_state(&stack, node, "ready").await;
    }
    stack
        .send_event(&team.updated("active", "pro", 1, 10))
        .await
        .unwrap();
    for (node, _) in &nodes[1..] {
        wait_for_state(&stack, node, "terminated").await;
    }
    let oldest = &nodes[0].0;
    let instance = stack.instance_of(oldest).await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let shape = stack.instance_shape(&instance).await.unwrap();
        let state = &nodes_of(&pool, &team.sub).await[0].1;
        // The volume never shrinks: pro's 10 GiB keeps team's 50.
        if shape.instance_type == "t4g.small" && state == "ready" {
            assert_eq!((shape.state.as_str(), shape.volume_gb), ("running", 50));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not resized: {shape:?} {state}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // pro -> team: four more nodes, and the first resized to team's type and volume.
    let pro = Story::new("user-pro");
    deliver(&stack, &pro.paid("pro"), &[0, 1, 2, 3]).await;
    let first = nodes_of(&pool, &pro.sub).await[0].0.clone();
    wait_for_state(&stack, &first, "ready").await;
    let instance = stack.instance_of(&first).await.unwrap().unwrap();
    stack
        .send_event(&pro.updated("active", "team", 1, 10))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let nodes = nodes_of(&pool, &pro.sub).await;
        let shape = stack.instance_shape(&instance).await.unwrap();
        if nodes.len() == 5
            && nodes.iter().all(|(_, s)| s == "ready")
            && shape.instance_type == "t4g.medium"
        {
            assert_eq!(shape.volume_gb, 50);
            assert_eq!(
                stack.instance_of(&first).await.unwrap(),
                Some(instance.clone())
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not scaled: {nodes:?} {shape:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // pro with quantity 3 runs three nodes.
    let three = Story::new("user-three");
    let mut events = three.paid("pro");
    events.push(three.updated("active", "pro", 3, 4));
    deliver(&stack, &events, &[4, 0, 1, 2, 3]).await;
    let nodes = nodes_of(&pool, &three.sub).await;
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for (node, _) in &nodes {
        wait_for_state(&stack, node, "ready").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_past_due_grace_runs_out_and_the_worker_suspends_on_its_own() {
    let mut stack = Stack::start(options(&[("HIVE_PAST_DUE_GRACE_SECS", "5")]))
        .await
        .expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let pool = stack.pool().await.unwrap();
    let story = Story {
        t0: chrono::Utc::now().timestamp() - 10,
        ..Story::new("user-grace")
    };
    deliver(&stack, &story.paid("pro"), &[0, 1, 2, 3]).await;
    let node = nodes_of(&pool, &story.sub).await[0].0.clone();
    wait_for_state(&stack, &node, "ready").await;

    // Past due as of now: still running for the grace, then suspended with no further event.
    let now = chrono::Utc::now().timestamp();
    stack
        .send_event(&story.updated("past_due", "pro", 1, now - story.t0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(nodes_of(&pool, &story.sub).await[0].1, "ready");
    wait_for_state(&stack, &node, "suspended").await;
    let (started, suspend_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT (SELECT at FROM node_events WHERE node_id = $1::uuid \
               AND kind = 'workflow_started' ORDER BY id DESC LIMIT 1), \
             (SELECT suspend_at FROM nodes WHERE id = $1::uuid)",
        )
        .bind(&node)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(suspend_at.timestamp(), now + 5);
    assert!(
        started >= suspend_at,
        "suspended at {started}, before the grace ended at {suspend_at}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_for_a_plan_nobody_configured_are_held_and_applied_once_it_exists() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let story = Story::new("user-new-plan");
    let created = story
        .fixtures
        .subscription_event(
            "created",
            &story.sub,
            "active",
            "enterprise",
            1,
            story.t0 + 1,
        )
        .unwrap();
    let checkout = story
        .fixtures
        .checkout_of(&story.sub, "big", story.t0)
        .unwrap();

    // Neither the price nor the plan is configured: both are answered 200 and held, with why.
    for (event, names) in [(&created, "price_enterprise_test"), (&checkout, "big")] {
        let (status, answer) = stack.post_event(event).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert!(
            answer["held"]
                .as_str()
                .is_some_and(|why| why.contains(names)),
            "held naming {names}: {answer}"
        );
    }
    let listed = stack
        .hivectl(&["stripe-events", "list", "--held", "--json"])
        .unwrap();
    assert_eq!(listed.status.code(), Some(0));
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut held: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    held.sort_unstable();
    let mut ids = vec![
        created["id"].as_str().unwrap(),
        checkout["id"].as_str().unwrap(),
    ];
    ids.sort_unstable();
    assert_eq!(held, ids);
    let doctor = stack.hivectl(&["doctor"]).unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("stripe events") && l.contains("2 held")),
        "doctor flags the held events: {report}"
    );
    let nodes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes n JOIN subscriptions s ON s.id = n.subscription_id \
         WHERE s.stripe_subscription_id = $1",
    )
    .bind(&story.sub.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(nodes, 0, "nothing is made of a held event");

    // The operator adds the plan (by its price id) in the configuration file and restarts the
    // api: the held events are applied at its start, with no redelivery from Stripe.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hive.toml");
    std::fs::write(
        &file,
        "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\n\n\
         [plans.big]\ninstance_type = \"t4g.large\"\nnodes = 2\nvolume_gb = 20\n\
         prices = [\"price_enterprise_test\"]\n",
    )
    .unwrap();
    stack.apis.clear();
    stack
        .options_mut()
        .extra_env
        .push(("HIVE_CONFIG_FILE".into(), file.display().to_string()));
    stack.start_api().unwrap();
    let shapes: Vec<(String, i32)> = sqlx::query_as(
        "SELECT n.instance_type, n.volume_gb FROM nodes n JOIN subscriptions s \
         ON s.id = n.subscription_id WHERE s.stripe_subscription_id = $1",
    )
    .bind(&story.sub.id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(shapes, vec![("t4g.large".to_string(), 20); 2]);
    let still: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE held_reason IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(still, 0, "no event is held once applied");
    // A redelivery now is a duplicate, and changes nothing.
    let (status, answer) = stack.post_event(&checkout).await.unwrap();
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_lived_subscriptions_status_history_stays_short() {
    let mut stack = Stack::start(options(&[])).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    // A subscription of a hundred days ago: paid, lapsed, paid again, month after month.
    let day = 24 * 3600;
    let mut story = Story::new("user-long-lived");
    story.t0 = chrono::Utc::now().timestamp() - 100 * day;
    let mut events = story.paid("pro");
    for month in 0..3 {
        let t = 4 + month * 30 * day;
        events.push(story.invoice("payment_failed", t));
        events.push(story.updated("past_due", "pro", 1, t + 1));
        events.push(story.invoice("paid", t + 2));
        events.push(story.updated("active", "pro", 1, t + 3));
    }
    for event in &events {
        stack.send_event(event).await.unwrap();
    }
    // Today's news: the history keeps the status its past left, and today.
    stack
        .send_event(&story.updated("active", "pro", 1, 100 * day))
        .await
        .unwrap();
    let (status, history): (Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT stripe_status, status_history FROM subscriptions \
         WHERE stripe_subscription_id = $1",
    )
    .bind(&story.sub.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status.as_deref(), Some("active"));
    let entries = history.as_array().unwrap();
    assert!(
        entries.len() <= 4,
        "{} entries for {} events: {history}",
        entries.len(),
        events.len() + 1
    );
}
