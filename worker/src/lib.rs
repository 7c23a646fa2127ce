//! hive-worker: runs the nodes' state machines off the Postgres job queue.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage};
use backon::{ExponentialBuilder, Retryable};
use hive_jobs::config::WorkerConfig;
use hive_jobs::provision::{Clouds, Provisioner};
use hive_jobs::queue::{ProvisionNode, NODE_QUEUE};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] hive_jobs::store::StoreError),
    #[error(transparent)]
    Cloud(#[from] hive_jobs::cloud::CloudError),
    #[error("worker runtime: {0}")]
    Runtime(String),
}

/// One job: advance the node's state machine as far as it can go now.
async fn provision_node(
    job: ProvisionNode,
    provisioner: Data<Arc<Provisioner>>,
    task_id: TaskId,
) -> Result<(), BoxDynError> {
    provisioner
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
        hive_jobs::store::connect_and_migrate(&config.database_url, (config.concurrency as u32) + 4)
    })
    .retry(
        ExponentialBuilder::default()
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(10),
    )
    .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "database not ready"))
    .await?;
    let (clouds, region) = Clouds::from_config(&config).await?;
    let worker_name = format!("hive-worker-{}", uuid::Uuid::new_v4().simple());
    tracing::info!(worker = %worker_name, %region, concurrency = config.concurrency, "hive-worker started");
    let provisioner = Arc::new(Provisioner::new(
        pool.clone(),
        clouds,
        config.clone(),
        region,
    ));
    let backend = PostgresStorage::<ProvisionNode>::new(&pool)
        .with_config(
            Config::default()
                .queue(NODE_QUEUE)
                .batch_size(config.concurrency)
                .heartbeat_interval(config.heartbeat)
                .missed_heartbeats(3),
        )
        .poll_with_strategy(Strategy::new().interval(config.poll));
    let worker = WorkerBuilder::new(worker_name)
        .backend(backend)
        .data(provisioner)
        .concurrency(config.concurrency)
        .enable_tracing()
        .build(provision_node);
    worker
        .run_until(async move {
            shutdown.await;
            tracing::info!("shutting down: no new jobs; finishing those in flight");
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| WorkerError::Runtime(e.to_string()))?;
    tracing::info!("hive-worker stopped");
    Ok(())
}
