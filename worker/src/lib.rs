//! hive-worker: runs the nodes' state machines off the Postgres job queue.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_cron::{CronScheduler, Tick};
use apalis_postgres::{Config, PostgresStorage};
use backon::{ExponentialBuilder, Retryable};
use hive_jobs::cloud::Clouds;
use hive_jobs::config::WorkerConfig;
use hive_jobs::engine::Engine;
use hive_jobs::store::queue::{node_queue, ProvisionNode};
use tracing::Instrument;

mod wakeup;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] hive_jobs::store::StoreError),
    #[error(transparent)]
    Cloud(#[from] hive_jobs::cloud::CloudError),
    #[error("worker runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Metrics(#[from] hive_jobs::metrics::MetricsError),
}

/// One job: advance the node's state machine as far as it can go now.
async fn provision_node(
    job: ProvisionNode,
    engine: Data<Arc<Engine>>,
    task_id: TaskId,
) -> Result<(), BoxDynError> {
    engine
        .advance(job.node_id, &task_id.to_string())
        .await
        .map_err(|e| Box::new(e) as BoxDynError)
}

/// Runs until `shutdown` resolves, then stops taking jobs and lets those in flight finish.
pub async fn run<F>(config: WorkerConfig, shutdown: F) -> Result<(), WorkerError>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let pool = (|| {
        // The jobs, the sweeper and the reconciler, and one listening connection per region.
        let size = config.concurrency + 4 + config.regions.len();
        hive_jobs::store::connect_and_migrate(&config.database_url, size as u32)
    })
    .retry(
        ExponentialBuilder::default()
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(10),
    )
    .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "database not ready"))
    .await?;
    if let Some(addr) = config.metrics_addr {
        let handle = hive_jobs::metrics::install()?;
        let bound = hive_jobs::metrics::serve(
            addr,
            handle,
            hive_jobs::store::gauges_at_scrape(pool.clone(), config.teardown_stuck_after),
        )
        .await?;
        // Whoever started us may have stopped reading stdout after the first line.
        if let Err(e) = writeln!(std::io::stdout(), "hive-worker metrics on {bound}") {
            tracing::debug!(error = %e, "stdout is closed");
        }
        tracing::info!(addr = %bound, "metrics at GET /metrics");
    }
    // The engine's statements and the call budgets' (sqlx's pool above, which apalis needs,
    // pings a connection after every use).
    let db =
        hive_jobs::connections::Connections::to_url(&config.database_url, config.concurrency + 2)
            .map_err(hive_jobs::store::StoreError::from)?;
    let budgets: Arc<dyn hive_jobs::cloud::budget::BudgetLedger> =
        Arc::new(hive_jobs::store::BudgetBuckets::new(db.clone()));
    let clouds = Arc::new(Clouds::from_config(&config, Some(budgets)).await?);
    let regions = clouds.region_names();
    let worker_name = format!("hive-worker-{}", uuid::Uuid::new_v4().simple());
    let reconciler = match &config.reconcile_schedule {
        None => None,
        Some(schedule) => {
            let context = Arc::new(ReconcileContext {
                pool: pool.clone(),
                clouds: clouds.clone(),
                config: config.clone(),
            });
            Some(tokio::spawn(reconcile_on_schedule(
                format!("{worker_name}-reconciler"),
                schedule.clone(),
                context,
            )))
        }
    };
    tracing::info!(worker = %worker_name, ?regions, concurrency = config.concurrency, "hive-worker started");
    let engine = Arc::new(Engine::new(db, clouds, config.clone()));
    let sweeper = tokio::spawn(sweep_stalled_nodes(
        pool.clone(),
        config.stall_after,
        config.job_retention,
        config.retention,
    ));

    // Shutdown is a flag every run of the apalis workers watches.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new jobs; finishing those in flight");
        let _ = stop_tx.send(true);
    });
    // One queue per region, one apalis worker on each: this worker takes jobs of its regions
    // only.
    let mut queues = tokio::task::JoinSet::new();
    for region in regions {
        queues.spawn(serve_queue(
            pool.clone(),
            config.clone(),
            format!("{worker_name}-{region}"),
            node_queue(&region),
            engine.clone(),
            stop_rx.clone(),
        ));
    }
    while let Some(done) = queues.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a queue's task ended abnormally");
        }
    }
    sweeper.abort();
    if let Some(reconciler) = reconciler {
        reconciler.abort();
    }
    tracing::info!("hive-worker stopped");
    Ok(())
}

/// Runs one region's queue until `stop` turns true, starting its apalis worker again whenever
/// it stops on its own (the database went away).
async fn serve_queue(
    pool: sqlx::PgPool,
    config: WorkerConfig,
    worker_name: String,
    queue: String,
    engine: Arc<Engine>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) {
    let mut retry_in = Duration::from_millis(500);
    for run in 0u64.. {
        // A new name per run: the queue may still count the previous one as alive.
        let name = format!("{worker_name}-{run}");
        let outcome = run_queue(
            &pool,
            &config,
            &name,
            &queue,
            engine.clone(),
            stop_rx.clone(),
        )
        .instrument(tracing::info_span!("queue", queue = %queue))
        .await;
        if *stop_rx.borrow() {
            break;
        }
        match outcome {
            Ok(()) => tracing::warn!(%queue, "job queue stopped; starting it again"),
            Err(e) => {
                tracing::warn!(%queue, error = %e, ?retry_in, "job queue failed; starting it again")
            }
        }
        tokio::time::sleep(retry_in).await;
        retry_in = (retry_in * 2).min(Duration::from_secs(5));
    }
}

/// One run of the apalis worker over one region's queue, until `stop` turns true (then jobs
/// in flight get `shutdown_deadline` to finish) or the queue fails.
async fn run_queue(
    pool: &sqlx::PgPool,
    config: &WorkerConfig,
    worker_name: &str,
    queue: &str,
    engine: Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let backend = PostgresStorage::<ProvisionNode>::new(pool)
        .with_config(
            Config::default()
                .queue(queue)
                .batch_size(config.concurrency)
                .heartbeat_interval(config.heartbeat)
                .missed_heartbeats(3),
        )
        .poll_with_strategy(
            Strategy::new()
                .interval(config.poll)
                // Woken at once by the queue's insert notification (apalis's trigger on its
                // table, delivered at commit), one listening connection per queue. The
                // interval still finds jobs due later (they notify nobody) and covers a
                // listener that was lost.
                .stream(wakeup::QueueWakeups::new(pool.clone(), queue.to_string())),
        );
    let worker = WorkerBuilder::new(worker_name)
        .backend(backend)
        .data(engine)
        .concurrency(config.concurrency)
        .enable_tracing()
        .build(provision_node);
    let mut stopped = stop.clone();
    let run = worker.run_until(async move {
        let _ = stopped.wait_for(|s| *s).await;
        Ok::<(), std::io::Error>(())
    });
    let deadline = config.shutdown_deadline;
    tokio::select! {
        result = run => result.map_err(|e| WorkerError::Runtime(e.to_string())),
        _ = async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                tokio::time::sleep(deadline).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            // Jobs still in flight are left to their leases and the queue's orphan recovery.
            tracing::warn!(?deadline, "shutdown deadline passed; leaving jobs in flight to other workers");
            Ok(())
        }
    }
}

/// Every so often, gives a new job to nodes whose job was lost (see `requeue_stalled`): the
/// queue is not the source of truth, the node rows are. And deletes jobs finished longer than
/// `retention` ago, a batch a tick.
async fn sweep_stalled_nodes(
    pool: sqlx::PgPool,
    stall_after: Duration,
    retention: Duration,
    rows_kept_for: Duration,
) {
    const PRUNED_PER_TICK: i64 = 10_000;
    // Small batches of old rows each tick: a backlog drains over ticks, never in one long
    // statement holding locks.
    const EXPIRED_PER_TICK: i64 = 1_000;
    let mut every = tokio::time::interval((stall_after / 2).max(Duration::from_millis(200)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match hive_jobs::store::prune_done_jobs(&pool, retention, PRUNED_PER_TICK).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "finished jobs pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning finished jobs failed"),
        }
        match hive_jobs::store::prune_expired(&pool, rows_kept_for, EXPIRED_PER_TICK).await {
            Ok(pruned) if pruned.total() == 0 => {}
            Ok(pruned) => tracing::info!(?pruned, "rows past their retention pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning rows past their retention failed"),
        }
        match hive_jobs::store::requeue_stalled(&pool, stall_after).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(nodes = ?ids, "re-enqueued nodes whose job was lost");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep for stalled nodes failed"),
        }
    }
}

/// What a scheduled reconcile pass needs.
struct ReconcileContext {
    pool: sqlx::PgPool,
    clouds: Arc<Clouds>,
    config: WorkerConfig,
}

/// One tick of the reconciler's schedule. Every worker gets each tick; the one that claims it
/// in `reconcile_runs` runs the pass, the others skip it.
async fn reconcile_tick(
    tick: Tick,
    context: Data<Arc<ReconcileContext>>,
) -> Result<(), BoxDynError> {
    let at = i64::try_from(tick.get_timestamp())
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .ok_or("tick out of range")?;
    log_pass(&context, at)
        .instrument(tracing::info_span!("reconcile", tick = %at))
        .await;
    Ok(())
}

/// Runs the tick's pass if this worker claims it; a failure is logged and recorded, and the
/// next tick tries again.
async fn log_pass(context: &ReconcileContext, at: chrono::DateTime<chrono::Utc>) {
    match hive_jobs::reconcile::reconcile_tick(
        &context.pool,
        &context.clouds,
        &context.config.node_domain,
        context.config.reconcile_grace,
        at,
    )
    .await
    {
        Ok(Some(report)) => tracing::info!(
            removed = report.removed.len(),
            reprovisioned = report.reprovisioned.len(),
            repaired = report.repaired.len(),
            "reconciled"
        ),
        Ok(None) => tracing::debug!("tick taken by another worker"),
        Err(e) => tracing::warn!(error = %e, "reconcile failed"),
    }
}

/// Runs the reconciler on its cron schedule (apalis-cron) for as long as the worker runs.
async fn reconcile_on_schedule(
    name: String,
    schedule: cron::Schedule,
    context: Arc<ReconcileContext>,
) {
    loop {
        let worker = WorkerBuilder::new(name.as_str())
            .backend(CronScheduler::new(schedule.clone()))
            .data(context.clone())
            .build(reconcile_tick);
        if let Err(e) = worker.run().await {
            tracing::warn!(error = %e, "reconcile schedule stopped; starting it again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
