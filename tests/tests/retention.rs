//! Retention: the worker prunes what is older than `HIVE_RETENTION_DAYS` (node logs, Stripe
//! payloads, reconcile runs), idempotency keys after a day and counted node changes after an
//! hour, and nothing younger; a node's last move before the cutoff stays, for usage.

use std::time::{Duration, Instant};

use hive_tests::stack::{Stack, StackOptions};
use sqlx::PgPool;

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_older_than_the_retention_are_pruned_and_nothing_younger() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RETENTION_DAYS", "90"),
            // The sweep that prunes runs every half of this.
            ("HIVE_STALL_AFTER_MS", "1000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let node = stack
        .send_checkout("user-retention", "pro")
        .await
        .unwrap()
        .remove(0);

    // A node's log: old entries, and two old moves of which the later must stay.
    let insert_event = |kind: &'static str, detail: &'static str, days: i32| {
        let (pool, node) = (pool.clone(), node.clone());
        async move {
            sqlx::query(
                "INSERT INTO node_events (node_id, generation, step, kind, detail, at) \
                 VALUES ($1::uuid, 0, 'pending', $2, $3, now() - make_interval(days => $4))",
            )
            .bind(&node)
            .bind(kind)
            .bind(detail)
            .bind(days)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert_event("waiting", "old-wait", 120).await;
    insert_event("waiting", "old-wait", 100).await;
    insert_event("transition", "old-move-first", 110).await;
    insert_event("transition", "old-move-last", 95).await;
    insert_event("waiting", "young-wait", 10).await;
    // Stripe events: one old and unnamed, one old but named by the subscription, one old and
    // held, one young.
    let named: String = sqlx::query_scalar(
        "SELECT s.stripe_event_id FROM subscriptions s JOIN nodes n ON n.subscription_id = s.id \
         WHERE n.id = $1::uuid",
    )
    .bind(&node)
    .fetch_one(&pool)
    .await
    .unwrap();
    for (id, days, held) in [
        ("evt_retention_old", 100, None),
        ("evt_retention_held", 100, Some("unknown plan `gold`")),
        ("evt_retention_young", 10, None),
    ] {
        sqlx::query(
            "INSERT INTO stripe_events (id, event_type, livemode, payload, received_at, \
             held_reason) VALUES ($1, 'customer.created', false, '{\"email\": \"a@b.c\"}', \
             now() - make_interval(days => $2), $3)",
        )
        .bind(id)
        .bind(days)
        .bind(held)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE stripe_events SET received_at = now() - interval '100 days' WHERE id = $1")
        .bind(&named)
        .execute(&pool)
        .await
        .unwrap();
    for days in [100, 10] {
        sqlx::query(
            "INSERT INTO reconcile_runs (started_at, finished_at, removed, reprovisioned) \
             VALUES (now() - make_interval(days => $1), now() - make_interval(days => $1), \
             '[]', '[]')",
        )
        .bind(days)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (key, hours) in [("old-key", 48), ("young-key", 1)] {
        sqlx::query(
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, created_at) \
             VALUES ('user-retention', $1, 'f', 200, '', now() - make_interval(hours => $2))",
        )
        .bind(key)
        .bind(hours)
        .execute(&pool)
        .await
        .unwrap();
    }
    for minutes in [120, 10] {
        sqlx::query(
            "INSERT INTO node_change_requests (user_id, at) \
             VALUES ('user-retention', now() - make_interval(mins => $1))",
        )
        .bind(minutes)
        .execute(&pool)
        .await
        .unwrap();
    }

    // The worker's sweep prunes.
    stack.start_worker().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(
        &pool,
        "SELECT count(*) FROM idempotency_keys WHERE key = 'old-key'",
    )
    .await
        > 0
        || count(
            &pool,
            "SELECT count(*) FROM node_events WHERE detail = 'old-wait'",
        )
        .await
            > 0
    {
        assert!(Instant::now() < deadline, "nothing was pruned");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let details: Vec<String> = sqlx::query_scalar(
        "SELECT detail FROM node_events WHERE node_id = $1::uuid AND at < now() - interval '1 day' \
         ORDER BY at",
    )
    .bind(&node)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        details,
        vec!["old-move-last", "young-wait"],
        "the node's log"
    );
    let events: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, payload::text FROM stripe_events WHERE received_at < now() - interval '1 day' \
         ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert!(!ids.contains(&"evt_retention_old"), "{ids:?}");
    assert!(
        ids.contains(&"evt_retention_held"),
        "a held event waits: {ids:?}"
    );
    assert!(ids.contains(&"evt_retention_young"), "{ids:?}");
    let named_payload = events
        .iter()
        .find(|(id, _)| *id == named)
        .map(|(_, payload)| payload.as_str());
    assert_eq!(
        named_payload,
        Some("{}"),
        "named, kept, its personal data gone"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM reconcile_runs").await,
        1,
        "the young reconcile run stays"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'young-key'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM node_change_requests").await,
        1,
        "the change of ten minutes ago still counts"
    );
}
