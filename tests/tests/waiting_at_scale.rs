//! Many nodes waiting for their instance at once (a region slow to start instances): their
//! reads of EC2 go together, a look that finds nothing new writes no event, and a new node is
//! provisioned meanwhile, its jobs taken before the crowd's looks.

use std::time::{Duration, Instant};

use hive_tests::stack::{Stack, StackOptions};

const WAITING: usize = 500;

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_waiting_nodes_read_ec2_together_and_a_new_node_still_gets_ready() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RECONCILE_SCHEDULE", "off"),
            ("HIVE_HTTP_TIMEOUT_MS", "120000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    stack.start_api().unwrap();
    let waiting = hive_tests::seed::waiting_nodes(&stack, WAITING)
        .await
        .unwrap();
    let pool = stack.pool().await.unwrap();
    let describes_before = stack.aws_proxy.calls("DescribeInstances");
    stack.start_worker().unwrap();

    // Every waiting node looked at twice or more (its job taken, done, and enqueued again).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let looks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apalis.jobs WHERE done_at IS NOT NULL \
             AND convert_from(job, 'UTF8')::jsonb ->> 'node_id' = ANY($1)",
        )
        .bind(waiting.iter().map(|id| id.to_string()).collect::<Vec<_>>())
        .fetch_one(&pool)
        .await
        .unwrap();
        if looks as usize >= 2 * WAITING {
            let describes = stack.aws_proxy.calls("DescribeInstances") - describes_before;
            // One call a read would be `looks` calls; read together, a batch a call.
            assert!(
                (describes as usize) * 4 < looks as usize,
                "{describes} DescribeInstances for {looks} looks"
            );
            break;
        }
        assert!(Instant::now() < deadline, "only {looks} looks in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each still waits, with one `started` and one `waiting` event however often it was
    // looked at.
    let (still, events, starts): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM nodes WHERE id = ANY($1) \
                 AND state = 'waiting_for_instance' AND waiting_for = 'instance is pending'), \
                (SELECT count(*) FROM node_events WHERE node_id = ANY($1) AND kind = 'waiting'), \
                (SELECT count(*) FROM node_events WHERE node_id = ANY($1) AND kind = 'started')",
    )
    .bind(&waiting)
    .fetch_one(&pool)
    .await
    .unwrap();
    let states: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT state, waiting_for, count(*) FROM nodes WHERE id = ANY($1) GROUP BY 1, 2",
    )
    .bind(&waiting)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(still as usize, WAITING, "{states:?}");
    assert_eq!(events as usize, WAITING, "one waiting event per node");
    assert_eq!(starts as usize, WAITING, "one started event per node");

    // A new node goes all the way while the crowd keeps waiting.
    let nodes = stack.send_checkout("user-new", "pro").await.unwrap();
    assert_eq!(nodes.len(), 1);
    stack
        .wait_for_state(&nodes[0], "ready", Duration::from_secs(120))
        .await
        .unwrap();
    let still: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM nodes WHERE id = ANY($1) AND state = 'waiting_for_instance'",
    )
    .bind(&waiting)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(still as usize, WAITING);
    pool.close().await;
}
