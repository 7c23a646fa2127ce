//! The reconciler removes what belongs to no node and re-provisions a ready node whose
//! instance vanished, leaving everything of live nodes alone.

use std::time::Duration;

use hive_tests::stack::{Stack, StackOptions, NODE_DOMAIN};

async fn wait_ready(stack: &Stack, node: &str) {
    stack
        .wait_for_state(node, "ready", Duration::from_secs(90))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_removes_planted_orphans_and_heals_a_vanished_instance() {
    let mut options = StackOptions::default();
    options
        .extra_env
        .push(("HIVE_RECONCILE_SCHEDULE".into(), "off".into()));
    let mut stack = Stack::start(options).await.expect("stack");
    stack.start_api().unwrap();
    stack.start_worker().unwrap();
    let live = stack
        .send_checkout("user-live", "pro")
        .await
        .unwrap()
        .remove(0);
    wait_ready(&stack, &live).await;
    let before = stack.leftovers().await.unwrap();
    assert_eq!(before.len(), 5, "{before:#?}");

    // Orphans: resources named and tagged like a node's, of a node that does not exist.
    let ghost = uuid::Uuid::new_v4().to_string();
    let ghost_host = format!("{ghost}.{NODE_DOMAIN}");
    stack
        .plant_instance_orphan(&stack.aws.home, &ghost)
        .await
        .unwrap();
    stack.plant_secret_orphan(&ghost.to_string()).await.unwrap();
    stack.plant_cloudflare_orphans(&ghost).await.unwrap();
    let r53 = aws_sdk_route53::Client::new(&stack.sdk);
    let record = aws_sdk_route53::types::ResourceRecordSet::builder()
        .name(&ghost_host)
        .r#type(aws_sdk_route53::types::RrType::Cname)
        .ttl(300)
        .resource_records(
            aws_sdk_route53::types::ResourceRecord::builder()
                .value(format!("{ghost_host}.cdn.cloudflare.net"))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    r53.change_resource_record_sets()
        .hosted_zone_id(&stack.aws.zone_id)
        .change_batch(
            aws_sdk_route53::types::ChangeBatch::builder()
                .changes(
                    aws_sdk_route53::types::Change::builder()
                        .action(aws_sdk_route53::types::ChangeAction::Create)
                        .resource_record_set(record)
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stack.leftovers().await.unwrap().len(), 10);

    // And the live node's instance vanishes.
    let pool = stack.pool().await.unwrap();
    let (old_instance,): (String,) =
        sqlx::query_as("SELECT instance_id FROM nodes WHERE id = $1::uuid")
            .bind(&live)
            .fetch_one(&pool)
            .await
            .unwrap();
    let ec2 = aws_sdk_ec2::Client::new(&stack.sdk);
    ec2.terminate_instances()
        .instance_ids(&old_instance)
        .send()
        .await
        .unwrap();

    let stdout = stack.reconcile_now().unwrap();
    assert!(
        stdout.contains("5 orphan(s) removed, 1 node(s) re-provisioned"),
        "{stdout}"
    );

    wait_ready(&stack, &live).await;
    let after = stack.leftovers().await.unwrap();
    assert_eq!(
        after.len(),
        5,
        "only the live node's five resources: {after:#?}"
    );
    assert!(after.iter().all(|l| !l.contains(&ghost)), "{after:#?}");
    let (new_instance,): (String,) =
        sqlx::query_as("SELECT instance_id FROM nodes WHERE id = $1::uuid")
            .bind(&live)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(new_instance, old_instance);
    let (runs,): (i64,) = sqlx::query_as("SELECT count(*) FROM reconcile_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);

    // A second pass finds nothing to do.
    assert!(stack
        .reconcile_now()
        .unwrap()
        .contains("0 orphan(s) removed, 0 node(s) re-provisioned"));
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_passes_run_in_one_worker_per_tick() {
    let mut options = StackOptions::default();
    options.extra_env.extend(
        [
            ("HIVE_RECONCILE_SCHEDULE", "*/2 * * * * *"),
            ("HIVE_RECONCILE_GRACE_SECS", "0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start(options).await.expect("stack");
    for _ in 0..3 {
        stack.start_worker().unwrap();
    }
    // An orphan appears while the workers run; no operator asks for a pass.
    let ghost = uuid::Uuid::new_v4();
    stack.plant_secret_orphan(&ghost.to_string()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stack.leftovers().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled pass removed the orphan"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let a few more ticks pass, with all three workers awake for each.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pool = stack.pool().await.unwrap();
    let (runs, ticks, unfinished, removed): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT tick), count(*) FILTER (WHERE finished_at IS NULL), \
         coalesce(sum(jsonb_array_length(removed)), 0) FROM reconcile_runs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(runs >= 3, "{runs} passes");
    assert_eq!(runs, ticks, "a tick ran more than once");
    assert!(unfinished <= 1, "{unfinished} passes never finished");
    assert_eq!(removed, 1, "the orphan was removed once");
}
