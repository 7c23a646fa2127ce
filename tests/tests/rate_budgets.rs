//! Call budgets shared by all workers through Postgres: a burst of checkouts on three workers
//! waits its turn instead of earning Cloudflare's 429s.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_one_cloudflare_budget_and_earn_no_429() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RATE_BUDGET_CLOUDFLARE", "90/10s"),
            ("HIVE_RECONCILE_SCHEDULE", "off"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    // Cloudflare's limit, played by the stand-in: 100 calls in any 10 s.
    stack.standin.limit_rate(100, Duration::from_secs(10));
    stack.start_api().unwrap();
    for _ in 0..3 {
        stack.start_worker().unwrap();
    }
    let mut nodes = Vec::new();
    for n in 0..50 {
        nodes.extend(
            stack
                .send_checkout(&format!("burst-{n}"), "pro")
                .await
                .unwrap(),
        );
    }
    assert_eq!(nodes.len(), 50);
    for node in &nodes {
        let error = stack
            .wait_for_state(node, "ready", Duration::from_secs(400))
            .await
            .unwrap();
        assert_eq!(error, None);
    }
    let (calls, throttled) = stack.standin.call_counts();
    println!(
        "50 pro checkouts on three workers: {calls} Cloudflare calls, {throttled} answered 429"
    );
    assert_eq!(
        throttled, 0,
        "the stand-in answered 429 to {throttled} of {calls} calls"
    );
    // More than two windows' worth: the budget, not luck, kept the workers under the limit.
    assert!(calls > 200, "only {calls} calls");
}

/// The buckets are an unlogged table: a take commits without waiting for a WAL flush, and a
/// crash of Postgres empties the table. The next take makes its bucket again, full, on a pool
/// whose connections all died with the server.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_of_postgres_starts_the_budgets_again_full() {
    use hive_jobs::cloud::budget::{Budget, BudgetLedger};
    use hive_jobs::config::Rate;
    use hive_jobs::connections::Connections;
    use hive_tests::process::Postgres;

    let mut pg = Postgres::start().expect("postgres");
    let url = pg.url("postgres");
    let pool = hive_jobs::store::connect_and_migrate(&url, 2)
        .await
        .expect("migrate");
    let db = Connections::to_url(&url, 2).expect("connections");
    // Two calls a second and a bucket of two: two takes spend it.
    let rate = Rate {
        calls: 20,
        per: Duration::from_secs(10),
    };
    let ledger: std::sync::Arc<dyn BudgetLedger> =
        std::sync::Arc::new(hive_jobs::store::BudgetBuckets::new(db.clone()));
    let budget = Budget::new(&ledger, "crash-test".into(), Some(rate));
    budget.take().await.expect("first take");
    budget.take().await.expect("second take");
    let tokens: f64 = sqlx::query_scalar("SELECT tokens FROM rate_budgets WHERE name = $1")
        .bind("crash-test")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(tokens < 1.0, "the bucket should be spent, holds {tokens}");
    pool.close().await;

    pg.crash();
    pg.run().expect("postgres again");
    let pool = sqlx::PgPool::connect(&url).await.expect("connect again");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM rate_budgets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        kept, 0,
        "crash recovery should have emptied the unlogged buckets"
    );

    // The pooled connection died with the server: the first take may fail (transient), and
    // has every connection checked before its next use.
    let mut took = budget.take().await;
    if took.is_err() {
        took = budget.take().await;
    }
    took.expect("a take after the crash");
    let tokens: f64 = sqlx::query_scalar("SELECT tokens FROM rate_budgets WHERE name = $1")
        .bind("crash-test")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Made full (two tokens) and one taken, with at most a moment's refill since.
    assert!(
        (1.0..1.5).contains(&tokens),
        "the bucket made again should hold one token after one take, holds {tokens}"
    );
}
