//! Postgres: nodes, their event log, subscriptions and Stripe events.
//!
//! Every write of the worker is fenced: it names the state, generation and lease it read, so a
//! worker that comes back late cannot overwrite a newer result.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
// Queries are built only from constants here (the column list), hence AssertSqlSafe.
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::model::{Node, NodeEvent, NodeState};
use crate::queue;

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

const NODE_COLUMNS: &str =
    "id, subscription_id, ordinal, user_id, region, instance_type, hostname, \
    state, generation, tunnel_id, secret_arn, instance_id, dns_record_id, error, failed_step, \
    teardown_reason, attempt, step_started_at, next_run_at, created_at, updated_at";

/// A Stripe event as we record it.
pub struct StripeEventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub api_version: Option<&'a str>,
    pub livemode: bool,
    pub payload: &'a serde_json::Value,
}

/// Records an event by its id. Returns false when it was recorded before (a redelivery); a
/// concurrent delivery of the same id waits here for the first to commit, then sees it.
pub async fn record_stripe_event(
    tx: &mut Transaction<'_, Postgres>,
    event: &StripeEventRecord<'_>,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, api_version, livemode, payload) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.event_type)
    .bind(event.api_version)
    .bind(event.livemode)
    .bind(event.payload)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub struct NewSubscription<'a> {
    pub stripe_event_id: &'a str,
    pub stripe_subscription_id: &'a str,
    pub stripe_customer_id: Option<&'a str>,
    pub user_id: &'a str,
    pub plan: &'a str,
    pub region: &'a str,
    pub instance_type: &'a str,
    pub nodes: u32,
    pub node_domain: &'a str,
}

/// Creates the subscription, its nodes and their first jobs in the caller's transaction.
/// Returns the new node ids, or none when the subscription existed already.
pub async fn create_subscription_with_nodes(
    tx: &mut Transaction<'_, Postgres>,
    sub: &NewSubscription<'_>,
) -> StoreResult<Vec<Uuid>> {
    let subscription_id = Uuid::new_v4();
    let created = sqlx::query(
        "INSERT INTO subscriptions (id, stripe_subscription_id, stripe_customer_id, user_id, plan, \
         region, stripe_event_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (stripe_subscription_id) DO NOTHING",
    )
    .bind(subscription_id)
    .bind(sub.stripe_subscription_id)
    .bind(sub.stripe_customer_id)
    .bind(sub.user_id)
    .bind(sub.plan)
    .bind(sub.region)
    .bind(sub.stripe_event_id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if created == 0 {
        return Ok(Vec::new());
    }
    let (ended,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM ended_subscriptions WHERE stripe_subscription_id = $1)",
    )
    .bind(sub.stripe_subscription_id)
    .fetch_one(&mut **tx)
    .await?;
    if ended {
        // Stripe told us it ended before it told us it began: provision nothing.
        sqlx::query("UPDATE subscriptions SET status = 'ended' WHERE id = $1")
            .bind(subscription_id)
            .execute(&mut **tx)
            .await?;
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(sub.nodes as usize);
    for ordinal in 0..sub.nodes {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, instance_type, hostname) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(subscription_id)
        .bind(ordinal as i32)
        .bind(sub.user_id)
        .bind(sub.region)
        .bind(sub.instance_type)
        .bind(format!("{id}.{}", sub.node_domain))
        .execute(&mut **tx)
        .await?;
        insert_event(&mut **tx, id, 0, NodeState::Pending, "created", None).await?;
        ids.push(id);
    }
    queue::enqueue(tx, &ids, Duration::ZERO).await?;
    Ok(ids)
}

/// Ends a subscription: its nodes are torn down (their generation bumped, so a step in flight
/// cannot commit over it), in the caller's transaction. Returns the nodes to tear down.
pub async fn end_subscription(
    tx: &mut Transaction<'_, Postgres>,
    stripe_subscription_id: &str,
    stripe_event_id: &str,
) -> StoreResult<Vec<Uuid>> {
    sqlx::query(
        "INSERT INTO ended_subscriptions (stripe_subscription_id, stripe_event_id) VALUES ($1, $2) \
         ON CONFLICT DO NOTHING",
    )
    .bind(stripe_subscription_id)
    .bind(stripe_event_id)
    .execute(&mut **tx)
    .await?;
    let ids: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE nodes SET state = 'terminating', teardown_reason = 'subscription_ended', \
         generation = generation + 1, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         failed_step = NULL, error = NULL, updated_at = now() \
         WHERE subscription_id IN (SELECT id FROM subscriptions WHERE stripe_subscription_id = $1) \
         AND state <> 'terminated' AND teardown_reason IS DISTINCT FROM 'subscription_ended' \
         RETURNING id, generation",
    )
    .bind(stripe_subscription_id)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query("UPDATE subscriptions SET status = 'ended', updated_at = now() WHERE stripe_subscription_id = $1")
        .bind(stripe_subscription_id)
        .execute(&mut **tx)
        .await?;
    for (id, generation) in &ids {
        insert_event(
            &mut **tx,
            *id,
            *generation,
            NodeState::Terminating,
            "teardown_requested",
            Some("subscription ended"),
        )
        .await?;
    }
    let ids: Vec<Uuid> = ids.into_iter().map(|(id, _)| id).collect();
    queue::enqueue(tx, &ids, Duration::ZERO).await?;
    Ok(ids)
}

async fn insert_event<'e, E>(
    executor: E,
    node_id: Uuid,
    generation: i32,
    step: NodeState,
    kind: &str,
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
    .bind(kind)
    .bind(detail)
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn list_nodes_for_user(pool: &PgPool, user_id: &str) -> StoreResult<Vec<Node>> {
    let sql = format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE user_id = $1 ORDER BY created_at, subscription_id, ordinal"
    );
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(user_id)
        .fetch_all(pool)
        .await?)
}

pub async fn node_for_user(pool: &PgPool, user_id: &str, id: Uuid) -> StoreResult<Option<Node>> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1 AND user_id = $2");
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .bind(user_id)
        .fetch_optional(pool)
        .await?)
}

/// Nodes for the operator, optionally of one state and one user.
pub async fn list_nodes(
    pool: &PgPool,
    state: Option<NodeState>,
    user_id: Option<&str>,
) -> StoreResult<Vec<Node>> {
    let sql = format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE ($1::text IS NULL OR state = $1) \
         AND ($2::text IS NULL OR user_id = $2) ORDER BY created_at, subscription_id, ordinal"
    );
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(state.map(NodeState::as_str))
        .bind(user_id)
        .fetch_all(pool)
        .await?)
}

/// A node's history, oldest first.
pub async fn node_events(pool: &PgPool, id: Uuid) -> StoreResult<Vec<NodeEvent>> {
    Ok(sqlx::query_as::<_, NodeEvent>(
        "SELECT at, generation, step, kind, detail FROM node_events WHERE node_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?)
}

pub async fn node(pool: &PgPool, id: Uuid) -> StoreResult<Option<Node>> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1");
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// What taking a node's lease found.
pub enum Lease {
    /// This run holds the node until it commits, schedules, fails or releases it.
    Held(Box<Node>),
    /// Another run holds it until the given time.
    HeldElsewhere { until: Duration },
    /// No such node.
    Gone,
}

/// Takes the node's lease for `owner`, unless a live lease of another run holds it.
pub async fn acquire(pool: &PgPool, id: Uuid, owner: Uuid, lease: Duration) -> StoreResult<Lease> {
    let sql = format!(
        "UPDATE nodes SET lease_owner = $2, lease_expires_at = now() + $3 \
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < now()) \
         RETURNING {NODE_COLUMNS}"
    );
    if let Some(node) = sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .bind(owner)
        .bind(lease)
        .fetch_optional(pool)
        .await?
    {
        return Ok(Lease::Held(Box::new(node)));
    }
    let remaining: Option<(Option<f64>,)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (lease_expires_at - now()))::float8 FROM nodes WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(match remaining {
        None => Lease::Gone,
        Some((secs,)) => Lease::HeldElsewhere {
            until: Duration::from_secs_f64(secs.unwrap_or(0.0).max(0.0)),
        },
    })
}

/// Ids of resources a step created, written with its state change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Created {
    pub tunnel_id: Option<String>,
    pub secret_arn: Option<String>,
    pub instance_id: Option<String>,
    pub dns_record_id: Option<String>,
}

/// Why a fenced write changed nothing: the node moved on under another run.
#[derive(Debug, thiserror::Error)]
#[error("node {0} changed under this run; its result is dropped")]
pub struct Fenced(pub Uuid);

/// Moves the node from the state it was read in to `to`, with what the step created.
pub async fn commit_step(
    pool: &PgPool,
    node: &Node,
    owner: Uuid,
    to: NodeState,
    created: &Created,
) -> StoreResult<Result<(), Fenced>> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET state = $5, tunnel_id = COALESCE($6, tunnel_id), \
         secret_arn = COALESCE($7, secret_arn), instance_id = COALESCE($8, instance_id), \
         dns_record_id = COALESCE($9, dns_record_id), attempt = 0, step_started_at = now(), \
         next_run_at = NULL, updated_at = now(), \
         error = CASE WHEN teardown_reason = 'provisioning_failed' THEN error END \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(to.as_str())
    .bind(&created.tunnel_id)
    .bind(&created.secret_arn)
    .bind(&created.instance_id)
    .bind(&created.dns_record_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    if to == NodeState::Terminated || (to == NodeState::Failed && node.state().is_teardown()) {
        // Torn down: nothing of these ids exists any more.
        sqlx::query(
            "UPDATE nodes SET tunnel_id = NULL, secret_arn = NULL, instance_id = NULL, \
             dns_record_id = NULL WHERE id = $1",
        )
        .bind(node.id)
        .execute(&mut *tx)
        .await?;
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        node.state(),
        "succeeded",
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Puts the node's step off until `delay` from now, releases the lease and enqueues the job
/// that will run it then, all in one transaction, so a crash loses no backoff.
pub async fn schedule(
    pool: &PgPool,
    node: &Node,
    owner: Uuid,
    delay: Duration,
    counts_as_attempt: bool,
    kind: &str,
    detail: Option<&str>,
) -> StoreResult<Result<(), Fenced>> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET attempt = attempt + $7::int, next_run_at = now() + $5, error = $6, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(delay)
    .bind(detail)
    .bind(i32::from(counts_as_attempt))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        node.state(),
        kind,
        detail,
    )
    .await?;
    queue::enqueue(&mut tx, &[node.id], delay).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Sets the node `failed` at its current step, with the error an operator will see. With
/// `unwind`, the node goes on to the teardown steps (keeping its lease) and ends `failed` once
/// everything it created is gone.
pub async fn fail(
    pool: &PgPool,
    node: &Node,
    owner: Uuid,
    error: &str,
    unwind: bool,
) -> StoreResult<Result<(), Fenced>> {
    let mut tx = pool.begin().await?;
    let sql = if unwind {
        "UPDATE nodes SET state = 'terminating', teardown_reason = 'provisioning_failed', \
         failed_step = $2, error = $5, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    } else {
        "UPDATE nodes SET state = 'failed', failed_step = $2, error = $5, next_run_at = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    };
    let updated = sqlx::query(sql)
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(error)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        node.state(),
        "failed",
        Some(error),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Records that a step began, for the node's log.
pub async fn step_started(pool: &PgPool, node: &Node) -> StoreResult<()> {
    insert_event(
        pool,
        node.id,
        node.generation,
        node.state(),
        "started",
        None,
    )
    .await
}

/// Gives the lease back (the run ends without having scheduled or failed the node).
pub async fn release(pool: &PgPool, id: Uuid, owner: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE nodes SET lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
}

/// Steps with a run that should have started by now but has not: the node is due (or its step
/// began) longer than `stale_after` ago and nobody holds it. Its job was lost (the database
/// went away while the queue was recording it, say); this enqueues a new one and marks the node
/// due now, in one transaction, skipping rows another worker is sweeping. Returns those nodes.
pub async fn requeue_stalled(pool: &PgPool, stale_after: Duration) -> StoreResult<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<(Uuid,)> = sqlx::query_as(
        "UPDATE nodes SET next_run_at = now() WHERE id IN ( \
           SELECT id FROM nodes \
           WHERE state NOT IN ('ready', 'failed', 'suspended', 'terminated') \
             AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
             AND COALESCE(next_run_at, step_started_at) < now() - $1 \
           ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(stale_after)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
    queue::enqueue(&mut tx, &ids, Duration::ZERO).await?;
    tx.commit().await?;
    Ok(ids)
}

/// A job to look at the node again after `delay`, outside any step (lease held elsewhere).
pub async fn enqueue_later(pool: &PgPool, id: Uuid, delay: Duration) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    queue::enqueue(&mut tx, &[id], delay).await?;
    tx.commit().await?;
    Ok(())
}
