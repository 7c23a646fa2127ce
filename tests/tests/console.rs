//! hivectl as the operator's console: `--help` and usage errors (exit 2), `--json` of every
//! read command holding what the table shows, filters, bulk replay that asks (and refuses
//! without a terminal), `--dry-run` that changes nothing, `reconcile --dry-run`, and `cancel`
//! of a node stuck waiting for its instance leaving nothing in the clouds.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions};
use serde_json::Value;
use sqlx::PgPool;

fn json_of(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every node's id, user, and state with what it is asked to be (`ready/running`).
async fn states(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT id::text, user_id, state || '/' || desired FROM nodes ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_reads_filters_replays_in_bulk_and_cancels() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();

    // Usage: --help is exit 0 on stdout; an unknown flag or command is exit 2.
    let help = stack.hivectl(&["--help"]).unwrap();
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    for command in [
        "nodes",
        "node",
        "replay",
        "cancel",
        "reconcile",
        "completions",
    ] {
        assert!(
            help.contains(command),
            "{command} missing from --help: {help}"
        );
    }
    let sub_help = stack.hivectl(&["replay", "--help"]).unwrap();
    assert_eq!(sub_help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&sub_help.stdout).contains("--all-failed"));
    for bad in [vec!["nodes", "--bogus"], vec!["frobnicate"], vec!["node"]] {
        let out = stack.hivectl(&bad).unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    let completions = stack.hivectl(&["completions", "bash"]).unwrap();
    assert!(String::from_utf8_lossy(&completions.stdout).contains("hivectl"));

    // Three failed nodes (two of one user), kept failed for inspection.
    stack
        .start_worker_with(&[
            ("HIVE_AMI_ID", "ami-0000000000000dead"),
            ("HIVE_UNDO_FAILED", "false"),
        ])
        .unwrap();
    let mut failed = Vec::new();
    for user in ["u-fail", "u-fail", "u-other"] {
        failed.extend(stack.send_checkout(user, "pro").await.unwrap());
    }
    for user in ["u-fail", "u-other"] {
        let n = if user == "u-fail" { 2 } else { 1 };
        stack
            .wait_all_status(&Stack::jwt(user, 600), "failed", n, Duration::from_secs(90))
            .await
            .unwrap();
    }
    // A good worker from now on: two ready nodes, one of them suspended by the operator.
    stack.workers.clear();
    stack.start_worker().unwrap();
    let ready_token = Stack::jwt("u-ready", 600);
    stack.send_checkout("u-ready", "pro").await.unwrap();
    stack.send_checkout("u-ready", "pro").await.unwrap();
    let ready = stack
        .wait_all_status(&ready_token, "ready", 2, Duration::from_secs(90))
        .await
        .unwrap();
    let suspended = ready[1]["id"].as_str().unwrap().to_string();
    stack.hivectl_ok(&["suspend", &suspended]).unwrap();
    let token = ready_token.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, node) = stack
            .get_as(&format!("/api/v1/nodes/{suspended}"), Some(&token))
            .await
            .unwrap();
        if node["status"] == "suspended" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not suspended: {node}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `nodes --json` holds every node, with what the table shows.
    let all = json_of(
        &stack.hivectl(&["nodes", "--json"]).unwrap(),
        "nodes --json",
    );
    let all = all.as_array().unwrap().clone();
    assert_eq!(all.len(), 5);
    let count = |status: &str| all.iter().filter(|n| n["status"] == status).count();
    assert_eq!(
        (count("failed"), count("ready"), count("suspended")),
        (3, 1, 1)
    );
    let table = stack.hivectl_ok(&["nodes"]).unwrap();
    for node in &all {
        let id = node["id"].as_str().unwrap();
        let line = table
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not in the table:\n{table}"));
        for field in ["user", "status", "state", "region"] {
            assert!(
                line.contains(node[field].as_str().unwrap()),
                "{field} of {id} not in its row: {line}"
            );
        }
    }
    // Piped, the table has no borders.
    assert!(!table.contains('│') && !table.contains('─'), "{table}");

    // Filters.
    let filtered = json_of(
        &stack
            .hivectl(&["nodes", "--status", "failed", "--user", "u-fail", "--json"])
            .unwrap(),
        "filtered nodes",
    );
    assert_eq!(filtered.as_array().unwrap().len(), 2);
    let by_step = json_of(
        &stack
            .hivectl(&["nodes", "--failed-step", "launching_instance", "--json"])
            .unwrap(),
        "by failed step",
    );
    assert_eq!(by_step.as_array().unwrap().len(), 3);
    let recent = json_of(
        &stack
            .hivectl(&["nodes", "--since", "1h", "--json"])
            .unwrap(),
        "since",
    );
    assert_eq!(recent.as_array().unwrap().len(), 5);
    let future = json_of(
        &stack
            .hivectl(&["nodes", "--since", "2099-01-01T00:00:00Z", "--json"])
            .unwrap(),
        "since the future",
    );
    assert_eq!(future.as_array().unwrap().len(), 0);
    let bad = stack.hivectl(&["nodes", "--status", "sleepy"]).unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );

    // `node ID --json`: the node, its conditions and its log, as the table shows them.
    let one = json_of(
        &stack.hivectl(&["node", &failed[0], "--json"]).unwrap(),
        "node --json",
    );
    assert_eq!(one["node"]["id"], failed[0].as_str());
    assert_eq!(one["node"]["failed_step"], "launching_instance");
    assert_eq!(one["conditions"].as_array().unwrap().len(), 3);
    assert!(!one["events"].as_array().unwrap().is_empty());
    let shown = stack.hivectl_ok(&["node", &failed[0]]).unwrap();
    assert!(
        shown.contains("launching_instance") && shown.contains("InstanceRunning"),
        "{shown}"
    );

    // Bulk replay: without --yes and without a terminal it refuses and changes nothing;
    // --dry-run changes nothing; --yes replays exactly the failed nodes of the filter.
    let before = states(&pool).await;
    let refused = stack
        .hivectl(&["replay", "--all-failed", "--user", "u-fail"])
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let dry = stack
        .hivectl_ok(&["replay", "--all-failed", "--user", "u-fail", "--dry-run"])
        .unwrap();
    assert_eq!(
        dry.lines()
            .filter(|l| l.starts_with("would replay"))
            .count(),
        2
    );
    assert_eq!(
        states(&pool).await,
        before,
        "a refused or dry replay changed something"
    );
    let done = stack
        .hivectl_ok(&["replay", "--all-failed", "--user", "u-fail", "--yes"])
        .unwrap();
    assert_eq!(
        done.lines().filter(|l| l.contains("resumes at")).count(),
        2,
        "{done}"
    );
    stack
        .wait_all_status(
            &Stack::jwt("u-fail", 600),
            "ready",
            2,
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    let other: String = sqlx::query_scalar("SELECT state FROM nodes WHERE user_id = 'u-other'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(other, "failed", "a node outside the filter was replayed");

    // reconcile --dry-run names the orphan and leaves it; reconcile removes it.
    let ghost = uuid::Uuid::new_v4().to_string();
    stack.plant_cloudflare_orphans(&ghost).await.unwrap();
    let planned = json_of(
        &stack
            .hivectl(&["reconcile", "--dry-run", "--grace-secs", "0", "--json"])
            .unwrap(),
        "reconcile --dry-run",
    );
    let would: Vec<String> = planned["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(would.iter().any(|r| r.contains(&ghost)), "{planned}");
    assert!(planned["reprovisioned"].as_array().unwrap().is_empty());
    let of_ghost = |left: Vec<String>| -> Vec<String> {
        left.into_iter().filter(|l| l.contains(&ghost)).collect()
    };
    assert_eq!(
        of_ghost(stack.leftovers().await.unwrap()).len(),
        2,
        "the dry run removed the orphan's tunnel or record"
    );
    // Without --yes and without a terminal, reconcile names what it found and refuses.
    let refused = stack.hivectl(&["reconcile", "--grace-secs", "0"]).unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains(&ghost));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(of_ghost(stack.leftovers().await.unwrap()).len(), 2);
    let removed = stack.reconcile_now().unwrap();
    assert!(removed.contains(&ghost), "{removed}");
    assert!(of_ghost(stack.leftovers().await.unwrap()).is_empty());

    // cancel of a node stuck waiting for its instance: torn down, nothing left behind.
    stack.aws_proxy.hold_pending(true);
    let stuck = stack
        .send_checkout("u-stuck", "pro")
        .await
        .unwrap()
        .remove(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1::uuid")
            .bind(&stuck)
            .fetch_one(&pool)
            .await
            .unwrap();
        if state == "waiting_for_instance" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stuck node is {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.hivectl_ok(&["cancel", &stuck]).unwrap();
    stack
        .wait_all_status(
            &Stack::jwt("u-stuck", 600),
            "terminated",
            1,
            Duration::from_secs(90),
        )
        .await
        .unwrap();
    stack.aws_proxy.hold_pending(false);
    let stuck_left: Vec<String> = stack
        .leftovers()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.contains(&stuck))
        .collect();
    assert!(stuck_left.is_empty(), "left behind: {stuck_left:?}");
    let (by,): (String,) = sqlx::query_as(
        "SELECT detail FROM node_events WHERE node_id = $1::uuid AND detail LIKE '%operator%' \
         ORDER BY id LIMIT 1",
    )
    .bind(&stuck)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(by.contains("operator"), "{by}");

    // The other reads, each as JSON holding what its table shows.
    let events = stack.hivectl_ok(&["events", &stuck, "--json"]).unwrap();
    let events: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["kind"] == "transition"));
    assert!(events.iter().any(|e| e["kind"] == "transition"
        && e["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("terminated")));
    // --follow of a terminated node prints its log and returns.
    let followed = stack.hivectl_ok(&["events", &stuck, "--follow"]).unwrap();
    assert_eq!(followed.lines().count(), events.len());

    let subs = json_of(
        &stack.hivectl(&["subscriptions", "--json"]).unwrap(),
        "subscriptions",
    );
    let subs = subs.as_array().unwrap().clone();
    assert_eq!(subs.len(), 6, "one per checkout");
    let table = stack.hivectl_ok(&["subscriptions"]).unwrap();
    for sub in &subs {
        let id = sub["stripe_subscription_id"].as_str().unwrap();
        let line = table.lines().find(|l| l.contains(id)).unwrap();
        assert!(line.contains(sub["user"].as_str().unwrap()), "{line}");
    }
    let ready_sub = subs.iter().find(|s| s["user"] == "u-ready").unwrap();
    let one = json_of(
        &stack
            .hivectl(&[
                "subscription",
                ready_sub["stripe_subscription_id"].as_str().unwrap(),
                "--json",
            ])
            .unwrap(),
        "subscription",
    );
    assert_eq!(one["subscription"]["id"], ready_sub["id"]);
    assert_eq!(one["nodes"].as_array().unwrap().len(), 1);

    // scale changes more than one node: it says what it would do and asks first.
    let ready_stripe_id = ready_sub["stripe_subscription_id"].as_str().unwrap();
    let nodes_before = states(&pool).await.len();
    let dry = stack
        .hivectl_ok(&["scale", ready_stripe_id, "3", "--dry-run"])
        .unwrap();
    assert!(
        dry.contains("1 -> 3") && dry.contains("would add 2"),
        "{dry}"
    );
    let refused = stack.hivectl(&["scale", ready_stripe_id, "3"]).unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        states(&pool).await.len(),
        nodes_before,
        "a refused scale changed nodes"
    );

    let listed = json_of(
        &stack
            .hivectl(&[
                "stripe-events",
                "list",
                "--type",
                "checkout.session.completed",
                "--json",
            ])
            .unwrap(),
        "stripe-events list",
    );
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 6);
    let first = listed[0]["id"].as_str().unwrap();
    let shown = json_of(
        &stack
            .hivectl(&["stripe-events", "show", first, "--json"])
            .unwrap(),
        "stripe-events show",
    );
    assert_eq!(shown["payload"]["id"], first);
    assert_eq!(shown["type"], "checkout.session.completed");

    let queue = json_of(&stack.hivectl(&["queue", "--json"]).unwrap(), "queue");
    assert!(
        queue["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j[0] == "Done"),
        "{queue}"
    );
    // The running worker (and the one stopped moments ago, seen within the minute).
    let seen = queue["workers"].as_array().unwrap().len();
    assert!((1..=2).contains(&seen), "{queue}");
    let queue_table = stack.hivectl_ok(&["queue"]).unwrap();
    assert!(
        queue_table.contains(&format!("{seen} worker(s) seen in the last minute")),
        "{queue_table}"
    );

    // reprocess applies a recorded event again, safely: an event already applied changes
    // nothing, and an old checkout neither brings back a node the operator cancelled since nor
    // resumes the one the operator suspended (u-ready's second).
    let events_of = |user: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT id FROM stripe_events \
                 WHERE payload->'data'->'object'->>'client_reference_id' = $1 ORDER BY id",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = states(&pool).await;
    let mut events = events_of("u-ready").await;
    assert_eq!(events.len(), 2, "{events:?}");
    events.extend(events_of("u-stuck").await);
    for event in events {
        let dry = stack
            .hivectl_ok(&["stripe-events", "reprocess", &event, "--dry-run"])
            .unwrap();
        assert!(dry.contains("would add 0 node(s), tear down 0"), "{dry}");
        let again = stack
            .hivectl_ok(&["stripe-events", "reprocess", &event])
            .unwrap();
        assert!(again.contains("applied again"), "{again}");
    }
    assert_eq!(states(&pool).await, before, "reprocessing changed nodes");
    let missing = stack
        .hivectl(&["stripe-events", "reprocess", "evt_missing"])
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no Stripe event"));

    // doctor passes on the stack; with moto stopped it names the AWS checks and exits 1.
    let healthy = stack.hivectl(&["doctor"]).unwrap();
    let report = String::from_utf8_lossy(&healthy.stdout).to_string();
    assert_eq!(
        healthy.status.code(),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    for check in [
        "postgres",
        "migrations",
        "teardowns",
        "stripe events",
        "clock skew",
        "aws ec2",
        "cloudflare",
        "stripe",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}: {report}"
        );
    }
    let as_json = json_of(
        &stack.hivectl(&["doctor", "--json"]).unwrap(),
        "doctor --json",
    );
    let checks = as_json.as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{as_json}");
    assert_eq!(
        checks.len(),
        report.lines().count(),
        "the table and the JSON hold the same checks"
    );
    stack.moto.process.kill_now();
    let sick = stack.hivectl(&["doctor"]).unwrap();
    let report = String::from_utf8_lossy(&sick.stdout).to_string();
    assert_eq!(sick.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("aws ec2")),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("postgres")),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&sick.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("aws ec2"), "{stderr}");
}
