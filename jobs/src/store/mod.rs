//! Postgres, the one way the rest of the crate reaches the database: every SQL statement is
//! behind this module, one file per concern, each function re-exported here (`store::node`,
//! `store::commit_step`...).
//!
//! Every write of the worker is fenced: it names the state, generation and lease it read, so a
//! worker that comes back late cannot overwrite a newer result (`node_steps.rs`). Queries are
//! built only from constants (the column lists), hence `AssertSqlSafe` where they are.

mod idempotency;
mod intent;
mod node_steps;
mod nodes;
pub mod queue;
mod queue_health;
mod rate_budgets;
mod reconcile_runs;
mod retention;
mod stripe_events;
mod subscriptions;

pub use idempotency::*;
pub use intent::*;
pub use node_steps::*;
pub use nodes::*;
pub use queue_health::*;
pub use rate_budgets::*;
pub use reconcile_runs::*;
pub use retention::*;
pub use stripe_events::*;
pub use subscriptions::*;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::model::{EventKind, NodeState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("job queue: {0}")]
    Queue(#[from] apalis_postgres::Error),
    #[error("job payload: {0}")]
    Payload(#[from] serde_json::Error),
    #[error("{0}")]
    Connections(#[from] crate::connections::ConnectionsError),
}

pub type StoreResult<T> = Result<T, StoreError>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects, then applies our migrations and apalis's. sqlx's migrator holds an advisory lock
/// while it runs, so several binaries starting at once are safe.
pub async fn connect_and_migrate(database_url: &str, max_connections: u32) -> StoreResult<PgPool> {
    let options: PgConnectOptions = database_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings every connection it takes from the pool by default: a round trip more
        // per request, which doubled a status read's. A connection used a moment ago is alive;
        // only one idle for a while (a restart or a dropped link may have killed it) is pinged.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                // As our own pool does (one setting for both).
                if meta.idle_for > crate::connections::PING_WHEN_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    apalis_postgres::PostgresStorage::setup(&pool).await?;
    publish_transitions(&pool).await?;
    Ok(pool)
}

/// Writes the code's table of legal moves where the database's guard reads it. Moves only
/// get added: a binary of an older release still running meanwhile keeps its own.
async fn publish_transitions(pool: &PgPool) -> StoreResult<()> {
    let (from, to): (Vec<&str>, Vec<&str>) = NodeState::transitions()
        .into_iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .unzip();
    sqlx::query(
        "INSERT INTO node_transitions (from_state, to_state) \
         SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&from)
    .bind(&to)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) const NODE_COLUMNS: &str =
    "id, subscription_id, ordinal, user_id, region, instance_type, hostname, \
    state, generation, tunnel_id, secret_arn, instance_id, dns_record_id, error, failed_step, \
    teardown_reason, desired, volume_gb, applied_instance_type, applied_volume_gb, \
    restarts_requested, restarts_done, waiting_for, last_error, suspend_at, \
    attempt, step_started_at, next_run_at, created_at, updated_at, request_id, \
    placement, fallback_type, fallback_for, route53_change_id, launch_token, \
    instance_launched_at";

/// The names of the states in which a node rests (no step to run), for binding.
pub(super) fn resting_states() -> Vec<&'static str> {
    NodeState::ALL
        .iter()
        .filter(|s| !s.has_step())
        .map(|s| s.as_str())
        .collect()
}

/// The names of the teardown's states, for binding.
pub(super) fn teardown_states() -> Vec<&'static str> {
    crate::model::TEARDOWN.iter().map(|s| s.as_str()).collect()
}

pub(super) async fn insert_event<'e, E>(
    executor: E,
    node_id: Uuid,
    generation: i32,
    step: NodeState,
    kind: EventKind,
    detail: Option<&str>,
) -> StoreResult<()>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    sqlx::query(
        "INSERT INTO node_events (node_id, generation, step, kind, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(node_id)
    .bind(generation)
    .bind(step.as_str())
    .bind(kind.as_str())
    .bind(detail)
    .execute(executor)
    .await?;
    Ok(())
}

/// Names the api request a transaction acts for: every node it inserts or updates records the
/// id (a trigger reads the setting), and the worker's steps for those nodes log it.
pub async fn tag_request(tx: &mut Transaction<'_, Postgres>, request_id: &str) -> StoreResult<()> {
    sqlx::query("SELECT set_config('hive.request_id', $1, true)")
        .bind(request_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Migrations this binary knows that the database has not applied (empty: current).
pub async fn pending_migrations(pool: &PgPool) -> StoreResult<Vec<i64>> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    Ok(MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// The database's clock minus ours.
pub async fn clock_skew(pool: &PgPool) -> StoreResult<chrono::TimeDelta> {
    let theirs: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    Ok(theirs - Utc::now())
}
