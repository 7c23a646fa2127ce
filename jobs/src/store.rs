//! Postgres: nodes, their event log, subscriptions and Stripe events.
//!
//! Every write of the worker is fenced: it names the state, generation and lease it read, so a
//! worker that comes back late cannot overwrite a newer result.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
// Queries are built only from constants here (the column list), hence AssertSqlSafe.
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::billing::StripeStatus;
use crate::model::{Desired, EventKind, Node, NodeEvent, NodeState, TeardownReason, Workflow};
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

const NODE_COLUMNS: &str =
    "id, subscription_id, ordinal, user_id, region, instance_type, hostname, \
    state, generation, tunnel_id, secret_arn, instance_id, dns_record_id, error, failed_step, \
    teardown_reason, desired, volume_gb, applied_instance_type, applied_volume_gb, \
    restarts_requested, restarts_done, waiting_for, last_error, suspend_at, \
    attempt, step_started_at, next_run_at, created_at, updated_at, request_id, \
    placement, fallback_type, fallback_for, route53_change_id, launch_token, \
    instance_launched_at";

/// The names of the states in which a node rests (no step to run), for binding.
fn resting_states() -> Vec<&'static str> {
    NodeState::ALL
        .iter()
        .filter(|s| !s.has_step())
        .map(|s| s.as_str())
        .collect()
}

/// The names of the teardown's states, for binding.
fn teardown_states() -> Vec<&'static str> {
    crate::workflows::TEARDOWN
        .iter()
        .map(|s| s.as_str())
        .collect()
}

/// A Stripe event as we record it.
pub struct StripeEventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub api_version: Option<&'a str>,
    pub livemode: bool,
    /// The event's JSON as it was delivered (already checked to parse).
    pub payload: &'a str,
}

/// Records an event by its id, in the caller's transaction or, for an event that changes
/// nothing else, as its own. Returns false when it was recorded before (a redelivery); a
/// concurrent delivery of the same id waits here for the first to commit, then sees it.
pub async fn record_stripe_event(
    db: impl sqlx::PgExecutor<'_>,
    event: &StripeEventRecord<'_>,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, api_version, livemode, payload) \
         VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT (id) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.event_type)
    .bind(event.api_version)
    .bind(event.livemode)
    .bind(event.payload)
    .execute(db)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// What the nodes of one subscription share.
pub struct NodeSpec<'a> {
    pub subscription_id: Uuid,
    pub user_id: &'a str,
    pub region: &'a str,
    pub instance_type: &'a str,
    pub volume_gb: i32,
    pub node_domain: &'a str,
}

/// Creates nodes with the given ordinals and enqueues their provisioning, in the caller's
/// transaction. Returns their ids.
pub async fn add_nodes(
    tx: &mut Transaction<'_, Postgres>,
    spec: &NodeSpec<'_>,
    ordinals: std::ops::Range<i32>,
) -> StoreResult<Vec<Uuid>> {
    let ordinals: Vec<i32> = ordinals.collect();
    if ordinals.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = ordinals.iter().map(|_| Uuid::new_v4()).collect();
    let hostnames: Vec<String> = ids
        .iter()
        .map(|id| format!("{id}.{}", spec.node_domain))
        .collect();
    // The nodes and their `created` events in one statement, however many: a checkout's
    // transaction holds one of the api's connections for each of its round trips.
    sqlx::query(
        "WITH added AS ( \
           INSERT INTO nodes (id, subscription_id, ordinal, user_id, region, instance_type, \
             hostname, state, volume_gb) \
           SELECT id, $2, ordinal, $3, $4, $5, hostname, $6, $7 \
           FROM unnest($1::uuid[], $8::int4[], $9::text[]) AS n (id, ordinal, hostname) \
           RETURNING id) \
         INSERT INTO node_events (node_id, generation, step, kind, detail) \
         SELECT id, 0, $6, $10, NULL FROM added",
    )
    .bind(&ids)
    .bind(spec.subscription_id)
    .bind(spec.user_id)
    .bind(spec.region)
    .bind(spec.instance_type)
    .bind(NodeState::Pending.as_str())
    .bind(spec.volume_gb)
    .bind(&ordinals)
    .bind(&hostnames)
    .bind(EventKind::Created.as_str())
    .execute(&mut **tx)
    .await?;
    queue::enqueue_in_region(tx, spec.region, &ids, Duration::ZERO, queue::Priority::Now).await?;
    Ok(ids)
}

/// Sends nodes to teardown from wherever they are, in the caller's transaction: their
/// generation is bumped (so a step in flight cannot commit over it), their intent becomes
/// `gone`, and their jobs are enqueued. Nodes already terminated or being torn down for the
/// same reason are left alone. Returns the nodes sent.
pub async fn tear_down(
    tx: &mut Transaction<'_, Postgres>,
    node_ids: &[Uuid],
    reason: TeardownReason,
    detail: &str,
) -> StoreResult<Vec<Uuid>> {
    let ids: Vec<(Uuid, i32)> = sqlx::query_as(
        "UPDATE nodes SET state = $2, teardown_reason = $3, desired = $4, \
         generation = generation + 1, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         failed_step = NULL, error = NULL, waiting_for = NULL, last_error = NULL, updated_at = now() \
         WHERE id = ANY($1) AND state <> $5 AND teardown_reason IS DISTINCT FROM $3 \
         RETURNING id, generation",
    )
    .bind(node_ids)
    .bind(NodeState::Terminating.as_str())
    .bind(reason.as_str())
    .bind(Desired::Gone.as_str())
    .bind(NodeState::Terminated.as_str())
    .fetch_all(&mut **tx)
    .await?;
    for (id, generation) in &ids {
        insert_event(
            &mut **tx,
            *id,
            *generation,
            NodeState::Terminating,
            EventKind::TeardownRequested,
            Some(detail),
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

/// Where a page of a user's nodes starts: after this node (in creation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeCursor {
    pub created_at: DateTime<Utc>,
    pub subscription_id: Uuid,
    pub ordinal: i32,
}

impl NodeCursor {
    pub fn after(node: &Node) -> Self {
        NodeCursor {
            created_at: node.created_at,
            subscription_id: node.subscription_id,
            ordinal: node.ordinal,
        }
    }
}

/// A page of the user's nodes in creation order, after `cursor`, of the given states (all when
/// `None`), at most `limit`.
pub async fn page_nodes_for_user(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    cursor: Option<NodeCursor>,
    states: Option<&[NodeState]>,
    limit: i64,
) -> StoreResult<Vec<Node>> {
    let sql = format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE user_id = $1 \
         AND ($2::timestamptz IS NULL OR (created_at, subscription_id, ordinal) > ($2, $3, $4)) \
         AND ($5::text[] IS NULL OR state = ANY($5)) \
         ORDER BY created_at, subscription_id, ordinal LIMIT $6"
    );
    let states: Option<Vec<&str>> = states.map(|s| s.iter().map(|s| s.as_str()).collect());
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(user_id)
        .bind(cursor.map(|c| c.created_at))
        .bind(cursor.map(|c| c.subscription_id))
        .bind(cursor.map(|c| c.ordinal))
        .bind(states)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// The last `per_node` log entries of each node, oldest first, and every move of each (for
/// its conditions), in two queries whatever the number of nodes.
pub async fn recent_history(
    conn: &mut PgConnection,
    node_ids: &[Uuid],
    per_node: i64,
) -> StoreResult<(Vec<(Uuid, NodeEvent)>, Vec<(Uuid, DateTime<Utc>, String)>)> {
    #[derive(sqlx::FromRow)]
    struct Row {
        node_id: Uuid,
        #[sqlx(flatten)]
        event: NodeEvent,
    }
    let events: Vec<Row> = sqlx::query_as(
        "SELECT node_id, at, generation, step, kind, detail FROM ( \
           SELECT e.*, row_number() OVER (PARTITION BY node_id ORDER BY id DESC) AS recent \
           FROM node_events e WHERE node_id = ANY($1)) r \
         WHERE recent <= $2 ORDER BY node_id, id",
    )
    .bind(node_ids)
    .bind(per_node)
    .fetch_all(&mut *conn)
    .await?;
    let moves: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT node_id, at, detail FROM node_events WHERE node_id = ANY($1) AND kind = $2 \
         ORDER BY node_id, id",
    )
    .bind(node_ids)
    .bind(EventKind::Transition.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let events = events.into_iter().map(|r| (r.node_id, r.event)).collect();
    Ok((events, moves))
}

/// A node with its recent history, as the app's view of it needs.
#[derive(Debug, Clone)]
pub struct NodeWithHistory {
    pub node: Node,
    /// Its last events, oldest first.
    pub events: Vec<NodeEvent>,
    /// Every transition of its state (when, and `from -> to`), oldest first.
    pub moves: Vec<(DateTime<Utc>, String)>,
}

/// The user's node `id` with its last `per_node` events and its transitions: what
/// [`recent_history`] gives a list, in the same round trip as the row (a status read is the
/// app's commonest call).
pub async fn node_with_history_for_user(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    id: Uuid,
    per_node: i64,
) -> StoreResult<Option<NodeWithHistory>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        node: Node,
        events: sqlx::types::Json<Vec<NodeEvent>>,
        moves: sqlx::types::Json<Vec<Move>>,
    }
    #[derive(serde::Deserialize)]
    struct Move {
        at: DateTime<Utc>,
        detail: Option<String>,
    }
    let sql = format!(
        "SELECT {NODE_COLUMNS}, \
           COALESCE((SELECT json_agg(json_build_object('at', e.at, 'generation', e.generation, \
               'step', e.step, 'kind', e.kind, 'detail', e.detail) ORDER BY e.id) \
             FROM (SELECT * FROM node_events WHERE node_id = n.id ORDER BY id DESC LIMIT $3) e), \
             '[]') AS events, \
           COALESCE((SELECT json_agg(json_build_object('at', m.at, 'detail', m.detail) \
               ORDER BY m.id) \
             FROM node_events m WHERE m.node_id = n.id AND m.kind = $4), '[]') AS moves \
         FROM nodes n WHERE n.id = $1 AND n.user_id = $2"
    );
    let row: Option<Row> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(id)
        .bind(user_id)
        .bind(per_node)
        .bind(EventKind::Transition.as_str())
        .fetch_optional(db)
        .await?;
    Ok(row.map(|r| NodeWithHistory {
        node: r.node,
        events: r.events.0,
        moves: r
            .moves
            .0
            .into_iter()
            .map(|m| (m.at, m.detail.unwrap_or_default()))
            .collect(),
    }))
}

pub async fn node_for_user(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    id: Uuid,
) -> StoreResult<Option<Node>> {
    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1 AND user_id = $2");
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .bind(user_id)
        .fetch_optional(db)
        .await?)
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

/// How many nodes are in each state (for the nodes-by-status gauge).
pub async fn node_counts_by_state(pool: &PgPool) -> StoreResult<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM nodes GROUP BY state")
            .fetch_all(pool)
            .await?,
    )
}

/// How long the oldest queue job that is due has waited to start (`None`: none is waiting).
pub async fn oldest_due_job_age(pool: &PgPool) -> StoreResult<Option<Duration>> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM now() - min(run_at))::float8 FROM apalis.jobs \
         WHERE status IN ('Pending', 'Queued') AND run_at <= now()",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Which nodes an operator asks for; every field unset matches all.
#[derive(Debug, Default, Clone)]
pub struct NodeFilter {
    /// Any of these states (a status names several).
    pub states: Option<Vec<NodeState>>,
    pub user_id: Option<String>,
    /// Ours (a uuid) or Stripe's (`sub_...`).
    pub subscription: Option<String>,
    pub region: Option<String>,
    pub failed_step: Option<String>,
    /// Changed at or after this time.
    pub since: Option<DateTime<Utc>>,
}

/// The nodes matching `filter`, oldest first.
pub async fn find_nodes(pool: &PgPool, filter: &NodeFilter) -> StoreResult<Vec<Node>> {
    let sql = format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE ($1::text[] IS NULL OR state = ANY($1)) \
         AND ($2::text IS NULL OR user_id = $2) \
         AND ($3::text IS NULL OR subscription_id::text = $3 OR subscription_id IN \
              (SELECT id FROM subscriptions WHERE stripe_subscription_id = $3)) \
         AND ($4::text IS NULL OR region = $4) \
         AND ($5::text IS NULL OR failed_step = $5) \
         AND ($6::timestamptz IS NULL OR updated_at >= $6) \
         ORDER BY created_at, subscription_id, ordinal"
    );
    let states: Option<Vec<&str>> = filter
        .states
        .as_ref()
        .map(|s| s.iter().map(|s| s.as_str()).collect());
    Ok(sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(states)
        .bind(filter.user_id.as_deref())
        .bind(filter.subscription.as_deref())
        .bind(filter.region.as_deref())
        .bind(filter.failed_step.as_deref())
        .bind(filter.since)
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

/// A node's log entries after entry `after` (0: from the start), with their ids, oldest first.
pub async fn node_events_after(
    pool: &PgPool,
    id: Uuid,
    after: i64,
) -> StoreResult<Vec<(i64, NodeEvent)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        #[sqlx(flatten)]
        event: NodeEvent,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, at, generation, step, kind, detail FROM node_events \
         WHERE node_id = $1 AND id > $2 ORDER BY id",
    )
    .bind(id)
    .bind(after)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.event)).collect())
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
pub async fn acquire(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> StoreResult<Lease> {
    let sql = format!(
        "UPDATE nodes SET lease_owner = $2, lease_expires_at = now() + $3 \
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_expires_at < now()) \
         RETURNING {NODE_COLUMNS}"
    );
    if let Some(node) = sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(id)
        .bind(owner)
        .bind(lease)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(Lease::Held(Box::new(node)));
    }
    let remaining: Option<(Option<f64>,)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (lease_expires_at - now()))::float8 FROM nodes WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
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
    /// The instance type and root volume size the instance now has.
    pub applied_instance_type: Option<String>,
    pub applied_volume_gb: Option<i32>,
    /// The restart request the instance has carried out.
    pub restarts_done: Option<i32>,
    /// Where the instance runs (`subnet-... (zone)`).
    pub placement: Option<String>,
    /// The instance runs as `.0` in place of `.1`, for want of capacity.
    pub fallback: Option<(String, String)>,
    /// What the step wants said in the node's log beside its success.
    pub note: Option<String>,
}

/// Why a fenced write changed nothing: the node moved on under another run.
#[derive(Debug, thiserror::Error)]
#[error("node {0} changed under this run; its result is dropped")]
pub struct Fenced(pub Uuid);

/// Moves the node from the state it was read in to `to`, with what the step created, and
/// hands back the node as it now is, its lease renewed for `lease` and (when `to` has a step)
/// the start of that step logged: the engine runs the next step from it, in one round trip
/// per step instead of three (take the lease, log the start, commit).
pub async fn commit_step(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    to: NodeState,
    created: &Created,
    lease: Duration,
) -> StoreResult<Result<Node, Fenced>> {
    // Torn down: nothing of these ids exists any more.
    let torn_down =
        to == NodeState::Terminated || (to == NodeState::Failed && node.state().is_teardown());
    // One statement, so one round trip and its own transaction: the move (the guard's trigger
    // logs the transition), the step's success and the next step's start. Fenced, the update
    // matches no row and so nothing is logged. The events are numbered in this order.
    let sql = format!(
        "WITH moved AS ( \
             UPDATE nodes SET state = $5, \
             tunnel_id = CASE WHEN $18 THEN NULL ELSE COALESCE($6, tunnel_id) END, \
             secret_arn = CASE WHEN $18 THEN NULL ELSE COALESCE($7, secret_arn) END, \
             instance_id = CASE WHEN $18 THEN NULL ELSE COALESCE($8, instance_id) END, \
             dns_record_id = CASE WHEN $18 THEN NULL ELSE COALESCE($9, dns_record_id) END, \
             instance_launched_at = CASE WHEN $18 THEN NULL \
                 WHEN $8::text IS NOT NULL AND $8 IS DISTINCT FROM instance_id THEN now() \
                 ELSE instance_launched_at END, \
             route53_change_id = CASE WHEN $18 OR $5 = $23 THEN NULL \
                 ELSE route53_change_id END, \
             applied_instance_type = CASE WHEN $18 THEN NULL \
                 ELSE COALESCE($10, applied_instance_type) END, \
             applied_volume_gb = CASE WHEN $18 THEN NULL \
                 ELSE COALESCE($11, applied_volume_gb) END, \
             restarts_done = COALESCE($12, restarts_done), \
             placement = CASE WHEN $18 THEN NULL ELSE COALESCE($14, placement) END, \
             fallback_type = CASE WHEN $18 THEN NULL WHEN $15::text IS NULL THEN fallback_type \
                 ELSE $15 END, \
             fallback_for = CASE WHEN $18 THEN NULL WHEN $15::text IS NULL THEN fallback_for \
                 ELSE $16 END, \
             attempt = 0, step_started_at = now(), next_run_at = NULL, updated_at = now(), \
             waiting_for = NULL, last_error = NULL, lease_expires_at = now() + $17, \
             error = CASE WHEN teardown_reason = $13 THEN error END \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4 \
             RETURNING {NODE_COLUMNS}), \
         logged AS ( \
             INSERT INTO node_events (node_id, generation, step, kind, detail) \
             SELECT moved.id, moved.generation, e.step, e.kind, e.detail \
             FROM moved, (VALUES (1, $2::text, $19::text, $20::text), \
                                 (2, $5::text, $21::text, NULL)) AS e (n, step, kind, detail) \
             WHERE e.n = 1 OR $22 \
             ORDER BY e.n) \
         SELECT * FROM moved"
    );
    let moved = sqlx::query_as::<_, Node>(AssertSqlSafe(sql))
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(to.as_str())
        .bind(&created.tunnel_id)
        .bind(&created.secret_arn)
        .bind(&created.instance_id)
        .bind(&created.dns_record_id)
        .bind(&created.applied_instance_type)
        .bind(created.applied_volume_gb)
        .bind(created.restarts_done)
        .bind(TeardownReason::ProvisioningFailed.as_str())
        .bind(&created.placement)
        .bind(created.fallback.as_ref().map(|f| f.0.as_str()))
        .bind(created.fallback.as_ref().map(|f| f.1.as_str()))
        .bind(lease)
        .bind(torn_down)
        .bind(EventKind::Succeeded.as_str())
        .bind(created.note.as_deref())
        .bind(EventKind::Started.as_str())
        .bind(to.has_step())
        // A node entering the Route 53 step waits on a change of its own, never an old one.
        .bind(NodeState::RoutingRoute53.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(moved.ok_or(Fenced(node.id)))
}

/// Why a step is put off.
#[derive(Debug, Clone, Copy)]
pub enum Postponed<'a> {
    /// Nothing to do yet (kept in `waiting_for`; not an attempt).
    Waiting(&'a str),
    /// A transient failure (kept in `last_error`; an attempt).
    Retrying(&'a str),
}

/// Puts the node's step off until `delay` from now, releases the lease and enqueues the job
/// that will run it then, all in one transaction, so a crash loses no backoff.
pub async fn schedule(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    delay: Duration,
    why: Postponed<'_>,
) -> StoreResult<Result<(), Fenced>> {
    let (kind, waiting_for, last_error) = match why {
        Postponed::Waiting(why) => (EventKind::Waiting, Some(why), None),
        Postponed::Retrying(error) => (EventKind::RetryScheduled, None, Some(error)),
    };
    let mut tx = conn.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET attempt = attempt + $8::int, next_run_at = now() + $5, \
         waiting_for = $6, last_error = COALESCE($7, last_error), \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(delay)
    .bind(waiting_for)
    .bind(last_error)
    .bind(i32::from(matches!(why, Postponed::Retrying(_))))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    // A node waiting for the same thing as at its last look has nothing new to tell: one
    // event per reason, not one per look (thousands of waiting nodes would fill the table).
    let news = match why {
        Postponed::Waiting(why) => node.waiting_for.as_deref() != Some(why),
        Postponed::Retrying(_) => true,
    };
    if news {
        insert_event(
            &mut *tx,
            node.id,
            node.generation,
            node.state(),
            kind,
            waiting_for.or(last_error),
        )
        .await?;
    }
    let waited = (Utc::now() - node.step_started_at)
        .to_std()
        .unwrap_or_default();
    let priority = crate::policy::look_again_priority(waited);
    // The node's region is in hand: no lookup of its row.
    queue::enqueue_in_region(&mut tx, &node.region, &[node.id], delay, priority).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// What a permanent failure does to the node (the policy's `FailAndUndo` / `FailAndKeep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The node goes on to the teardown steps (keeping its lease) and ends `failed` once
    /// everything it created is gone.
    Undo,
    /// The node rests `failed` at this step, everything kept.
    Keep,
}

/// Sets the node `failed` at its current step, with the error an operator will see, undone or
/// kept as `failure` says.
pub async fn fail(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    error: &str,
    failure: Failure,
) -> StoreResult<Result<(), Fenced>> {
    let unwind = failure == Failure::Undo;
    let mut tx = conn.begin().await?;
    let sql = if unwind {
        "UPDATE nodes SET state = $6, teardown_reason = $7, \
         failed_step = $2, error = $5, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    } else {
        "UPDATE nodes SET state = $6, failed_step = $2, error = $5, next_run_at = NULL, \
         waiting_for = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4"
    };
    let to = if unwind {
        NodeState::Terminating
    } else {
        NodeState::Failed
    };
    let mut query = sqlx::query(sql)
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(error)
        .bind(to.as_str());
    if unwind {
        query = query.bind(TeardownReason::ProvisioningFailed.as_str());
    }
    let updated = query.execute(&mut *tx).await?.rows_affected();
    if updated == 0 {
        return Ok(Err(Fenced(node.id)));
    }
    insert_event(
        &mut *tx,
        node.id,
        node.generation,
        node.state(),
        EventKind::Failed,
        Some(error),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Starts `workflow` on a resting node whose intent asks for it (the node keeps its lease and
/// goes on at once), fenced like a step's commit.
pub async fn start_workflow(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    workflow: Workflow,
) -> StoreResult<Result<(), Fenced>> {
    let Some(first) = workflow.steps().first() else {
        return Ok(Ok(()));
    };
    let mut tx = conn.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET state = $5, attempt = 0, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, last_error = NULL, updated_at = now() \
         WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
    )
    .bind(node.id)
    .bind(node.state().as_str())
    .bind(node.generation)
    .bind(owner)
    .bind(first.as_str())
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
        *first,
        EventKind::WorkflowStarted,
        Some(&format!("{workflow:?}")),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Records that a step began, for the node's log.
pub async fn step_started(conn: &mut PgConnection, node: &Node) -> StoreResult<()> {
    insert_event(
        &mut *conn,
        node.id,
        node.generation,
        node.state(),
        EventKind::Started,
        None,
    )
    .await
}

/// Gives the lease back of a node that rests with nothing to do, and clears its due mark (or
/// moves it to the end of a past-due grace, when the worker must act on its own).
pub async fn rest(conn: &mut PgConnection, id: Uuid, owner: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE nodes SET lease_owner = NULL, lease_expires_at = NULL, \
         next_run_at = CASE WHEN state <> ALL($3) THEN next_run_at \
           WHEN suspend_at > now() AND desired = $4 THEN suspend_at END \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(resting_states())
    .bind(Desired::Running.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Extends the lease of a run whose step is still under way (a budget wait, a slow cloud):
/// `false` when the run no longer holds the node, whose step must then stop before its side
/// effect (another worker may be running it).
pub async fn renew_lease(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Uuid,
    lease: Duration,
) -> StoreResult<bool> {
    let renewed = sqlx::query(
        "UPDATE nodes SET lease_expires_at = now() + $3 \
         WHERE id = $1 AND lease_owner = $2 AND lease_expires_at > now()",
    )
    .bind(id)
    .bind(owner)
    .bind(lease)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// What a step writes down before (or while waiting on) its side effect.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// The launch attempt about to be sent (its `ClientToken`), and when.
    LaunchAttempt(&'a str),
    /// The Route 53 change made, to wait on.
    Route53Change(&'a str),
}

/// Records a step's progress, fenced like a commit: `false` when the node moved on under this
/// run.
pub async fn record_progress(
    conn: &mut PgConnection,
    node: &Node,
    owner: Uuid,
    what: Progress<'_>,
) -> StoreResult<bool> {
    let (sql, value) = match what {
        Progress::LaunchAttempt(token) => (
            "UPDATE nodes SET launch_token = $5, instance_launched_at = now() \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
            token,
        ),
        Progress::Route53Change(change) => (
            "UPDATE nodes SET route53_change_id = $5 \
             WHERE id = $1 AND state = $2 AND generation = $3 AND lease_owner = $4",
            change,
        ),
    };
    let recorded = sqlx::query(sql)
        .bind(node.id)
        .bind(node.state().as_str())
        .bind(node.generation)
        .bind(owner)
        .bind(value)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(recorded == 1)
}

/// Gives the lease back (the run ends without having scheduled or failed the node).
pub async fn release(conn: &mut PgConnection, id: Uuid, owner: Uuid) -> StoreResult<()> {
    sqlx::query(
        "UPDATE nodes SET lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Steps with a run that should have started by now but has not: the node is due (or its step
/// began) longer than `stale_after` ago and nobody holds it; a resting node is due only when a
/// request marked it so. Its job was lost (the database
/// went away while the queue was recording it, say); this enqueues a new one and marks the node
/// due now, in one transaction, skipping rows another worker is sweeping. Returns those nodes.
///
/// A queue that is merely behind is not a lost job: a node due after the oldest job still
/// waiting in its region's queue may have its job in that backlog, and is left alone (else a
/// busy queue would grow by duplicates of its own backlog). A node due well before it (by
/// `stale_after`, since a job's time and its node's come from different clocks and
/// statements) cannot. The backlog is computed once (`MATERIALIZED`): inlined, Postgres ran
/// its aggregate again for every node, seconds per sweep with ten thousand waiting.
pub async fn requeue_stalled(pool: &PgPool, stale_after: Duration) -> StoreResult<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<(Uuid,)> = sqlx::query_as(
        "WITH backlog AS MATERIALIZED ( \
           SELECT job_type, min(run_at) AS oldest FROM apalis.jobs \
           WHERE status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts) \
           GROUP BY job_type) \
         UPDATE nodes SET next_run_at = now() WHERE id IN ( \
           SELECT id FROM nodes \
           WHERE (state <> ALL($2) OR next_run_at IS NOT NULL) \
             AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
             AND COALESCE(next_run_at, step_started_at) < now() - $1 \
             AND COALESCE(next_run_at, step_started_at) < COALESCE( \
               (SELECT oldest FROM backlog WHERE job_type = $3 || nodes.region) - $1, \
               'infinity') \
           ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .bind(stale_after)
    .bind(resting_states())
    .bind(queue::node_queue(""))
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
    queue::enqueue(&mut tx, &ids, Duration::ZERO).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Deletes finished jobs done more than `older_than` ago, at most `limit` of them; how many.
/// Node history lives in `node_events`; a done job only says that a look happened.
pub async fn prune_done_jobs(pool: &PgPool, older_than: Duration, limit: i64) -> StoreResult<u64> {
    let deleted = sqlx::query(
        "DELETE FROM apalis.jobs WHERE id IN ( \
           SELECT id FROM apalis.jobs WHERE status = 'Done' AND done_at < now() - $1 \
           LIMIT $2)",
    )
    .bind(older_than)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}

/// A job to look at the node again after `delay`, outside any step (lease held elsewhere).
pub async fn enqueue_later(conn: &mut PgConnection, id: Uuid, delay: Duration) -> StoreResult<()> {
    let mut tx = conn.begin().await?;
    queue::enqueue(&mut tx, &[id], delay).await?;
    tx.commit().await?;
    Ok(())
}

/// What a replay needs to know of a node, read under a row lock in the caller's transaction.
pub struct ReplayFacts {
    pub state: Option<NodeState>,
    pub raw_state: String,
    pub failed_step: Option<String>,
    pub teardown_reason: Option<TeardownReason>,
}

/// Locks the node for a replay; `None` when there is no such node.
pub async fn lock_for_replay(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
) -> StoreResult<Option<ReplayFacts>> {
    let row: Option<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT state, failed_step, teardown_reason FROM nodes WHERE id = $1 FOR UPDATE",
    )
    .bind(node_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(state, failed_step, reason)| ReplayFacts {
        state: NodeState::parse(&state),
        raw_state: state,
        failed_step,
        teardown_reason: reason.as_deref().and_then(TeardownReason::parse),
    }))
}

/// Resumes a failed node at `step` with a new generation and enqueues its job, in the caller's
/// transaction. `restart`: the undone provisioning starts over (its teardown reason is
/// cleared); `keep_error`: a resumed undo keeps the provisioning's error. Returns the new
/// generation.
pub async fn resume_failed(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    step: NodeState,
    restart: bool,
    keep_error: bool,
    detail: &str,
) -> StoreResult<i32> {
    let (generation,): (i32,) = sqlx::query_as(
        "UPDATE nodes SET state = $2, failed_step = NULL, \
         error = CASE WHEN $4 THEN error ELSE NULL END, attempt = 0, \
         teardown_reason = CASE WHEN $3 THEN NULL ELSE teardown_reason END, \
         generation = generation + 1, step_started_at = now(), next_run_at = NULL, \
         waiting_for = NULL, last_error = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now() \
         WHERE id = $1 RETURNING generation",
    )
    .bind(node_id)
    .bind(step.as_str())
    .bind(restart)
    .bind(keep_error)
    .fetch_one(&mut **tx)
    .await?;
    insert_event(
        &mut **tx,
        node_id,
        generation,
        step,
        EventKind::Replayed,
        Some(detail),
    )
    .await?;
    queue::enqueue(tx, &[node_id], Duration::ZERO).await?;
    Ok(generation)
}

/// The reconciler saw a ready node's instance run as `instance_type`, not the type recorded:
/// that is recorded, and the node's job enqueued, so that the resize workflow converges on
/// what the node asks for. False when the node is no longer ready.
pub async fn observe_instance_type(
    pool: &PgPool,
    node_id: Uuid,
    instance_type: &str,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE nodes SET applied_instance_type = $2, updated_at = now() \
         WHERE id = $1 AND state = $3",
    )
    .bind(node_id)
    .bind(instance_type)
    .bind(NodeState::Ready.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    queue::enqueue(&mut tx, &[node_id], Duration::ZERO).await?;
    tx.commit().await?;
    Ok(true)
}

/// Nodes that own resources: every node with a row that is not `terminated`.
///
/// A node that is to be gone and whose teardown failed for good (a permanent refusal) owns
/// nothing either: what it still holds is the reconciler's to remove, else it would run (and
/// be billed) until an operator noticed.
pub async fn owning_nodes(pool: &PgPool) -> StoreResult<Vec<(Uuid, String)>> {
    Ok(sqlx::query_as(
        "SELECT id, region FROM nodes WHERE state <> $1 \
         AND NOT (state = $2 AND desired = $3 AND failed_step = ANY($4))",
    )
    .bind(NodeState::Terminated.as_str())
    .bind(NodeState::Failed.as_str())
    .bind(Desired::Gone.as_str())
    .bind(teardown_states())
    .fetch_all(pool)
    .await?)
}

/// A ready node as the reconciler judges it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReadyNode {
    pub id: Uuid,
    pub region: String,
    pub instance_id: Option<String>,
    pub tunnel_id: Option<String>,
    pub applied_instance_type: Option<String>,
}

/// Ready nodes, with their region and recorded instance and tunnel.
pub async fn ready_nodes(pool: &PgPool) -> StoreResult<Vec<ReadyNode>> {
    Ok(sqlx::query_as(
        "SELECT id, region, instance_id, tunnel_id, applied_instance_type FROM nodes \
         WHERE state = $1 ORDER BY id",
    )
    .bind(NodeState::Ready.as_str())
    .fetch_all(pool)
    .await?)
}

/// Sends a ready node whose resource vanished back to the step that makes it, with a new
/// generation, and enqueues its job. False when the node is no longer ready.
pub async fn send_back_to(
    pool: &PgPool,
    node_id: Uuid,
    step: NodeState,
    tunnel_gone: bool,
    why: &str,
) -> StoreResult<bool> {
    let mut tx = pool.begin().await?;
    let moved: Option<(i32,)> = sqlx::query_as(
        "UPDATE nodes SET state = $2, generation = generation + 1, attempt = 0, \
         step_started_at = now(), next_run_at = NULL, \
         tunnel_id = CASE WHEN $3 THEN NULL ELSE tunnel_id END, instance_id = NULL, \
         updated_at = now() WHERE id = $1 AND state = $4 RETURNING generation",
    )
    .bind(node_id)
    .bind(step.as_str())
    .bind(tunnel_gone)
    .bind(NodeState::Ready.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((generation,)) = moved else {
        return Ok(false);
    };
    insert_event(
        &mut *tx,
        node_id,
        generation,
        step,
        EventKind::Reconciled,
        Some(why),
    )
    .await?;
    queue::enqueue(&mut tx, &[node_id], Duration::ZERO).await?;
    tx.commit().await?;
    Ok(true)
}

/// Logs, in a node's history, a fix the reconciler made in place (the node stays where it is).
pub async fn log_reconciled(pool: &PgPool, node_id: Uuid, why: &str) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    let row: Option<(i32, String)> =
        sqlx::query_as("SELECT generation, state FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((generation, state)) = row {
        let state = NodeState::parse(&state).unwrap_or(NodeState::Ready);
        insert_event(
            &mut *tx,
            node_id,
            generation,
            state,
            EventKind::Reconciled,
            Some(why),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Records the start of a reconcile pass (claiming its tick, if it has one); `None` when
/// another worker has claimed that tick.
pub async fn claim_reconcile_run(
    pool: &PgPool,
    tick: Option<chrono::DateTime<chrono::Utc>>,
) -> StoreResult<Option<i64>> {
    let claimed: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO reconcile_runs (started_at, tick, removed, reprovisioned) \
         VALUES (now(), $1, '[]', '[]') ON CONFLICT (tick) DO NOTHING RETURNING id",
    )
    .bind(tick)
    .fetch_optional(pool)
    .await?;
    Ok(claimed.map(|(id,)| id))
}

/// Records what a reconcile pass removed and re-provisioned, or why it stopped.
pub async fn finish_reconcile_run(
    pool: &PgPool,
    run: i64,
    removed: &[String],
    reprovisioned: &[Uuid],
    error: Option<&str>,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE reconcile_runs SET finished_at = now(), removed = $2, reprovisioned = $3, \
         error = $4 WHERE id = $1",
    )
    .bind(run)
    .bind(serde_json::json!(removed))
    .bind(serde_json::json!(reprovisioned))
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// A node's intent as a request needs it, read under a row lock in the caller's transaction.
#[derive(Debug, Clone)]
pub struct IntentRow {
    pub id: Uuid,
    pub state: String,
    pub desired: String,
    pub instance_type: String,
    pub volume_gb: i32,
    pub restarts_requested: i32,
    /// Billing wants it stopped (its subscription is unpaid or paused, or a past-due grace
    /// has run out).
    pub billing_hold: bool,
}

/// Locks the node's row for a change of intent; `None` when there is no such node.
pub async fn lock_intent(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
) -> StoreResult<Option<IntentRow>> {
    let row: Option<(Uuid, String, String, String, i32, i32, bool)> = sqlx::query_as(
        "SELECT n.id, n.state, n.desired, n.instance_type, n.volume_gb, n.restarts_requested, \
           COALESCE(n.suspend_at <= now(), false) OR COALESCE(s.stripe_status = ANY($2), false) \
         FROM nodes n JOIN subscriptions s ON s.id = n.subscription_id \
         WHERE n.id = $1 FOR UPDATE OF n",
    )
    .bind(node_id)
    .bind(
        [StripeStatus::Unpaid, StripeStatus::Paused]
            .map(StripeStatus::as_str)
            .to_vec(),
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(
        |(id, state, desired, instance_type, volume_gb, restarts_requested, billing_hold)| {
            IntentRow {
                id,
                state,
                desired,
                instance_type,
                volume_gb,
                restarts_requested,
                billing_hold,
            }
        },
    ))
}

/// A change of a node's intent.
#[derive(Debug, Clone, Copy)]
pub enum IntentChange<'a> {
    Desired(Desired),
    Restart,
    Spec {
        instance_type: &'a str,
        volume_gb: i32,
    },
}

/// Records a change of the node's intent, logs who asked, and enqueues its job, in the
/// caller's transaction. The node's state is not touched: the worker acts on the difference
/// once the node rests. The node is marked due (`next_run_at`), so that the sweep finds it
/// should its job be lost; the worker clears the mark when the node rests with nothing to do.
pub async fn change_intent(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    change: IntentChange<'_>,
    detail: &str,
) -> StoreResult<()> {
    let (desired, restart, instance_type, volume_gb) = match change {
        IntentChange::Desired(d) => (Some(d.as_str()), false, None, None),
        IntentChange::Restart => (None, true, None, None),
        IntentChange::Spec {
            instance_type,
            volume_gb,
        } => (None, false, Some(instance_type), Some(volume_gb)),
    };
    let (state, generation): (String, i32) = sqlx::query_as(
        "UPDATE nodes SET desired = COALESCE($2, desired), \
         restarts_requested = restarts_requested + $3::int, \
         instance_type = COALESCE($4, instance_type), volume_gb = COALESCE($5, volume_gb), \
         next_run_at = COALESCE(next_run_at, now()), updated_at = now() \
         WHERE id = $1 RETURNING state, generation",
    )
    .bind(node_id)
    .bind(desired)
    .bind(i32::from(restart))
    .bind(instance_type)
    .bind(volume_gb)
    .fetch_one(&mut **tx)
    .await?;
    let step = NodeState::parse(&state).unwrap_or(NodeState::Ready);
    insert_event(
        &mut **tx,
        node_id,
        generation,
        step,
        EventKind::Requested,
        Some(detail),
    )
    .await?;
    queue::enqueue(tx, &[node_id], Duration::ZERO).await?;
    Ok(())
}

/// A node of a subscription that still counts: (id, ordinal, instance type, volume).
pub type CountedNode = (Uuid, i32, String, i32);

/// The subscription and its nodes that still count (not torn down nor being torn down),
/// oldest first, locked in the caller's transaction.
pub async fn lock_subscription_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Option<(SubscriptionState, Vec<CountedNode>)>> {
    let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE");
    let sub: Option<SubscriptionState> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(subscription_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(sub) = sub else {
        return Ok(None);
    };
    let nodes = lock_counted_nodes(tx, subscription_id).await?;
    Ok(Some((sub, nodes)))
}

/// The subscription's nodes that still count, oldest first, locked in the caller's
/// transaction; the caller holds the subscription's lock.
pub async fn lock_counted_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Vec<CountedNode>> {
    Ok(sqlx::query_as(
        "SELECT id, ordinal, instance_type, volume_gb FROM nodes \
         WHERE subscription_id = $1 AND desired <> $2 ORDER BY ordinal FOR UPDATE",
    )
    .bind(subscription_id)
    .bind(Desired::Gone.as_str())
    .fetch_all(&mut **tx)
    .await?)
}

/// The highest ordinal a subscription's nodes ever had (new nodes take the next ones).
pub async fn max_ordinal(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<i32> {
    let (max,): (Option<i32>,) =
        sqlx::query_as("SELECT max(ordinal) FROM nodes WHERE subscription_id = $1")
            .bind(subscription_id)
            .fetch_one(&mut **tx)
            .await?;
    Ok(max.unwrap_or(-1))
}

/// A subscription as billing keeps it: whose it is, and the latest Stripe snapshot applied.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionState {
    pub id: Uuid,
    pub stripe_subscription_id: String,
    pub stripe_customer_id: Option<String>,
    pub user_id: Option<String>,
    pub plan: Option<String>,
    pub region: Option<String>,
    /// Ours: `active`, or `ended` once its nodes are torn down.
    pub status: String,
    pub stripe_status: Option<String>,
    pub status_at: Option<i64>,
    pub status_rank: Option<i32>,
    pub items_at: Option<i64>,
    pub quantity: i32,
    pub price_id: Option<String>,
    pub past_due_since: Option<DateTime<Utc>>,
    pub cancel_at: Option<DateTime<Utc>>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub nodes_entitled: Option<i32>,
    /// Every status snapshot applied, as (Stripe time, tie rank, status), oldest first.
    pub status_history: sqlx::types::Json<Vec<(i64, i32, String)>>,
}

const SUBSCRIPTION_COLUMNS: &str = "id, stripe_subscription_id, stripe_customer_id, user_id, \
    plan, region, status, stripe_status, status_at, status_rank, items_at, quantity, price_id, \
    past_due_since, cancel_at, current_period_start, current_period_end, nodes_entitled, \
    status_history";

/// The subscription Stripe calls `stripe_subscription_id`, created (knowing nothing yet) if
/// this is the first we hear of it, and locked in the caller's transaction: concurrent events
/// of one subscription apply one after the other.
pub async fn lock_subscription(
    tx: &mut Transaction<'_, Postgres>,
    stripe_subscription_id: &str,
    stripe_event_id: &str,
) -> StoreResult<SubscriptionState> {
    // One statement for both cases: a conflicting row is locked by the (no-op) update and
    // returned as it is, a new one is returned as inserted.
    let sql = format!(
        "INSERT INTO subscriptions (id, stripe_subscription_id, stripe_event_id) \
         VALUES ($1, $2, $3) \
         ON CONFLICT (stripe_subscription_id) DO UPDATE \
           SET stripe_subscription_id = subscriptions.stripe_subscription_id \
         RETURNING {SUBSCRIPTION_COLUMNS}"
    );
    Ok(sqlx::query_as::<_, SubscriptionState>(AssertSqlSafe(sql))
        .bind(Uuid::new_v4())
        .bind(stripe_subscription_id)
        .bind(stripe_event_id)
        .fetch_one(&mut **tx)
        .await?)
}

/// Writes back what billing merged into the subscription.
pub async fn save_subscription(
    tx: &mut Transaction<'_, Postgres>,
    sub: &SubscriptionState,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE subscriptions SET stripe_customer_id = $2, user_id = $3, plan = $4, region = $5, \
         status = $6, stripe_status = $7, status_at = $8, status_rank = $9, items_at = $10, \
         quantity = $11, price_id = $12, past_due_since = $13, cancel_at = $14, \
         current_period_end = $15, nodes_entitled = $16, status_history = $17, \
         current_period_start = $18, updated_at = now() WHERE id = $1",
    )
    .bind(sub.id)
    .bind(&sub.stripe_customer_id)
    .bind(&sub.user_id)
    .bind(&sub.plan)
    .bind(&sub.region)
    .bind(&sub.status)
    .bind(&sub.stripe_status)
    .bind(sub.status_at)
    .bind(sub.status_rank)
    .bind(sub.items_at)
    .bind(sub.quantity)
    .bind(&sub.price_id)
    .bind(sub.past_due_since)
    .bind(sub.cancel_at)
    .bind(sub.current_period_end)
    .bind(sub.nodes_entitled)
    .bind(&sub.status_history)
    .bind(sub.current_period_start)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Tears down every node of the subscription (it ended), in the caller's transaction.
pub async fn end_subscription_nodes(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    let ids: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM nodes WHERE subscription_id = $1 ORDER BY ordinal")
            .bind(subscription_id)
            .fetch_all(&mut **tx)
            .await?;
    let ids: Vec<Uuid> = ids.into_iter().map(|(id,)| id).collect();
    tear_down(
        tx,
        &ids,
        TeardownReason::SubscriptionEnded,
        "subscription ended",
    )
    .await
}

/// Makes the subscription's nodes (those not going away) want `desired`, suspended at
/// `suspend_at` if given; only nodes whose intent changes are touched, logged and enqueued (a
/// grace end gets its job at that moment, so the worker acts on it unasked). A node its user
/// stopped keeps that (only its grace end is recorded). Returns them.
pub async fn follow_billing(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
    desired: Desired,
    suspend_at: Option<DateTime<Utc>>,
    detail: &str,
) -> StoreResult<Vec<Uuid>> {
    let changed: Vec<(Uuid, i32, String)> = sqlx::query_as(
        "UPDATE nodes SET desired = CASE WHEN desired = $5 THEN desired ELSE $2 END, \
         suspend_at = $3, next_run_at = COALESCE(next_run_at, now()), updated_at = now() \
         WHERE subscription_id = $1 AND desired <> $4 \
           AND ((desired <> $2 AND desired <> $5) OR suspend_at IS DISTINCT FROM $3) \
         RETURNING id, generation, state",
    )
    .bind(subscription_id)
    .bind(desired.as_str())
    .bind(suspend_at)
    .bind(Desired::Gone.as_str())
    .bind(Desired::Stopped.as_str())
    .fetch_all(&mut **tx)
    .await?;
    let mut ids = Vec::with_capacity(changed.len());
    for (id, generation, state) in &changed {
        let step = NodeState::parse(state).unwrap_or(NodeState::Ready);
        let detail = match suspend_at {
            Some(at) => format!("{detail}; suspended at {at} unless paid"),
            None => detail.to_string(),
        };
        insert_event(
            &mut **tx,
            *id,
            *generation,
            step,
            EventKind::Requested,
            Some(&detail),
        )
        .await?;
        ids.push(*id);
    }
    queue::enqueue(tx, &ids, Duration::ZERO).await?;
    if let Some(at) = suspend_at {
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        queue::enqueue(tx, &ids, delay).await?;
    }
    Ok(ids)
}

/// The user's subscriptions (bound to them), newest first, each with how many of its nodes
/// are not going away.
pub async fn user_subscriptions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    subscriptions(db, Some(user_id)).await
}

/// Every move of the user's nodes up to `until`, as (node, when, `from -> to`), in order.
pub async fn user_transitions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    until: DateTime<Utc>,
) -> StoreResult<Vec<(Uuid, DateTime<Utc>, String)>> {
    Ok(sqlx::query_as(
        "SELECT e.node_id, e.at, e.detail FROM node_events e JOIN nodes n ON n.id = e.node_id \
         WHERE n.user_id = $1 AND e.kind = $2 AND e.at <= $3 ORDER BY e.node_id, e.id",
    )
    .bind(user_id)
    .bind(EventKind::Transition.as_str())
    .bind(until)
    .fetch_all(db)
    .await?)
}

/// The user's Stripe customer (of their newest subscription that has one).
pub async fn user_customer(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
) -> StoreResult<Option<String>> {
    let found: Option<(String,)> = sqlx::query_as(
        "SELECT stripe_customer_id FROM subscriptions \
         WHERE user_id = $1 AND stripe_customer_id IS NOT NULL ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user_id)
    .fetch_optional(db)
    .await?;
    Ok(found.map(|(c,)| c))
}

/// What a request with an `Idempotency-Key` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key: run the request, then record its answer.
    New,
    /// Used before for the same request: its answer.
    Replay { status: u16, body: Vec<u8> },
    /// Used before for another request.
    Mismatch,
    /// The first request with this key has not finished yet.
    InProgress,
}

/// How long a key is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Claims `key` of `user_id` for the request `fingerprint`.
pub async fn claim_idempotency_key(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &str,
) -> StoreResult<IdempotencyClaim> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND created_at < now() - $3",
    )
    .bind(user_id)
    .bind(key)
    .bind(IDEMPOTENCY_WINDOW)
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(key)
    .bind(fingerprint)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let claim = if inserted == 1 {
        IdempotencyClaim::New
    } else {
        let (first, status, body): (String, Option<i32>, Option<Vec<u8>>) = sqlx::query_as(
            "SELECT fingerprint, status, body FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        match (first == fingerprint, status) {
            (false, _) => IdempotencyClaim::Mismatch,
            (true, None) => IdempotencyClaim::InProgress,
            (true, Some(status)) => IdempotencyClaim::Replay {
                status: u16::try_from(status).unwrap_or(500),
                body: body.unwrap_or_default(),
            },
        }
    };
    tx.commit().await?;
    Ok(claim)
}

/// Records the answer to a claimed key; `None` forgets the key (a failure worth retrying).
pub async fn finish_idempotency_key(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    key: &str,
    answer: Option<(u16, &[u8])>,
) -> StoreResult<()> {
    match answer {
        Some((status, body)) => {
            sqlx::query(
                "UPDATE idempotency_keys SET status = $3, body = $4 WHERE user_id = $1 AND key = $2",
            )
            .bind(user_id)
            .bind(key)
            .bind(i32::from(status))
            .bind(body)
            .execute(db)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
                .bind(user_id)
                .bind(key)
                .execute(db)
                .await?;
        }
    }
    Ok(())
}

/// Subscriptions for the operator (of one user, when given), newest first, with their live
/// node counts.
pub async fn subscriptions(
    db: impl sqlx::PgExecutor<'_>,
    user_id: Option<&str>,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    subscriptions_where(db, "$1::text IS NULL OR user_id = $1", user_id).await
}

/// One subscription by our id or Stripe's, with its live node count.
pub async fn subscription_of(
    db: impl sqlx::PgExecutor<'_>,
    id: &str,
) -> StoreResult<Option<(SubscriptionState, i64)>> {
    let mut found =
        subscriptions_where(db, "id::text = $1 OR stripe_subscription_id = $1", Some(id)).await?;
    Ok(found.pop())
}

/// The subscriptions matching `condition` (on `$1`), newest first, each with how many of its
/// nodes are not going away.
async fn subscriptions_where(
    db: impl sqlx::PgExecutor<'_>,
    condition: &'static str,
    arg: Option<&str>,
) -> StoreResult<Vec<(SubscriptionState, i64)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        sub: SubscriptionState,
        live: i64,
    }
    let sql = format!(
        "SELECT {SUBSCRIPTION_COLUMNS}, (SELECT count(*) FROM nodes n \
           WHERE n.subscription_id = subscriptions.id AND n.desired <> $2) AS live \
         FROM subscriptions WHERE {condition} ORDER BY created_at DESC"
    );
    let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(arg)
        .bind(Desired::Gone.as_str())
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.sub, r.live)).collect())
}

/// A Stripe event as recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredStripeEvent {
    pub id: String,
    pub event_type: String,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub received_at: DateTime<Utc>,
    pub payload: sqlx::types::Json<serde_json::Value>,
}

/// The latest recorded Stripe events (of one type, when given), newest first.
pub async fn stripe_events(
    pool: &PgPool,
    event_type: Option<&str>,
    limit: i64,
) -> StoreResult<Vec<StoredStripeEvent>> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, api_version, livemode, received_at, payload FROM stripe_events \
         WHERE ($1::text IS NULL OR event_type = $1) ORDER BY received_at DESC, id LIMIT $2",
    )
    .bind(event_type)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn stripe_event(pool: &PgPool, id: &str) -> StoreResult<Option<StoredStripeEvent>> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, api_version, livemode, received_at, payload FROM stripe_events \
         WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The queue as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueHealth {
    /// Jobs by apalis status (`Pending`, `Queued`, `Running`, `Done`, `Failed`, `Killed`).
    pub jobs: Vec<(String, i64)>,
    /// How long the oldest due job has waited to start, in seconds.
    pub oldest_due_secs: Option<f64>,
    /// Nodes waiting on something, by what they wait for.
    pub waiting: Vec<(String, i64)>,
    /// Nodes retrying a transient failure.
    pub retrying: i64,
    /// Workers seen in the last minute, with when.
    pub workers: Vec<(String, DateTime<Utc>)>,
    /// Teardowns retrying longer than the operator's threshold.
    pub stuck_teardowns: Vec<StuckTeardown>,
}

/// A teardown that has gone on retrying longer than the operator's threshold.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct StuckTeardown {
    pub id: Uuid,
    pub state: String,
    /// How long its current step has been retrying or waiting, in seconds.
    pub stuck_secs: f64,
    pub last_error: Option<String>,
}

/// Nodes in a teardown step begun longer than `after` ago, the longest stuck first.
pub async fn stuck_teardowns(pool: &PgPool, after: Duration) -> StoreResult<Vec<StuckTeardown>> {
    Ok(sqlx::query_as(
        "SELECT id, state, EXTRACT(EPOCH FROM now() - step_started_at)::float8 AS stuck_secs, \
         last_error FROM nodes WHERE state = ANY($1) AND step_started_at < now() - $2 \
         ORDER BY step_started_at",
    )
    .bind(teardown_states())
    .bind(after)
    .fetch_all(pool)
    .await?)
}

pub async fn queue_health(pool: &PgPool, stuck_after: Duration) -> StoreResult<QueueHealth> {
    let jobs =
        sqlx::query_as("SELECT status, count(*) FROM apalis.jobs GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?;
    let waiting = sqlx::query_as(
        "SELECT waiting_for, count(*) FROM nodes WHERE waiting_for IS NOT NULL \
         GROUP BY waiting_for ORDER BY count(*) DESC, waiting_for",
    )
    .fetch_all(pool)
    .await?;
    let retrying: i64 =
        sqlx::query_scalar("SELECT count(*) FROM nodes WHERE last_error IS NOT NULL")
            .fetch_one(pool)
            .await?;
    let workers = sqlx::query_as(
        "SELECT id, last_seen FROM apalis.workers WHERE last_seen > now() - interval '1 minute' \
         ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(QueueHealth {
        jobs,
        oldest_due_secs: oldest_due_job_age(pool).await?.map(|d| d.as_secs_f64()),
        waiting,
        retrying,
        workers,
        stuck_teardowns: stuck_teardowns(pool, stuck_after).await?,
    })
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

/// Takes one call from the budget `name` (a token bucket refilled at `per_sec` up to `burst`,
/// at half that rate while shrunk). `None`: taken; `Some(wait)`: none left, one is there after
/// `wait`. The row is made on first use, full.
pub async fn take_budget(
    conn: &mut PgConnection,
    name: &str,
    burst: f64,
    per_sec: f64,
) -> StoreResult<Option<Duration>> {
    // What the bucket holds now: what it held, plus the refill since.
    const AVAILABLE: &str =
        "LEAST($2, tokens + EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at) \
        * CASE WHEN shrunk_until > clock_timestamp() THEN $3 / 2 ELSE $3 END)";
    // Most calls find a token: one plain update of an existing row, which matches nothing
    // when the bucket is empty (or not made yet). The row lock makes a concurrent taker
    // re-check the bucket as this one left it.
    let taken = sqlx::query_scalar::<_, i32>(AssertSqlSafe(format!(
        "UPDATE rate_budgets SET tokens = {AVAILABLE} - 1, refreshed_at = clock_timestamp() \
         WHERE name = $1 AND {AVAILABLE} >= 1 RETURNING 1"
    )))
    .bind(name)
    .bind(burst)
    .bind(per_sec)
    .fetch_optional(&mut *conn)
    .await?;
    if taken.is_some() {
        return Ok(None);
    }
    // Empty or new: make the row if need be, refill it, and take one if the refill made one.
    let available: f64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "WITH made AS ( \
             INSERT INTO rate_budgets (name, tokens) VALUES ($1, $2 - 1) \
             ON CONFLICT (name) DO NOTHING), \
         cur AS ( \
             SELECT name, {AVAILABLE} AS available \
             FROM rate_budgets WHERE name = $1 FOR UPDATE) \
         UPDATE rate_budgets b SET \
             tokens = cur.available - CASE WHEN cur.available >= 1 THEN 1 ELSE 0 END, \
             refreshed_at = clock_timestamp() \
         FROM cur WHERE b.name = cur.name \
         RETURNING cur.available"
    )))
    .bind(name)
    .bind(burst)
    .bind(per_sec)
    .fetch_optional(&mut *conn)
    .await?
    // The row was made by this very statement (not visible to it yet), full but for the
    // token this call takes (a burst is at least one).
    .unwrap_or(burst);
    if available >= 1.0 {
        return Ok(None);
    }
    let secs = (1.0 - available) / per_sec.max(f64::MIN_POSITIVE);
    Ok(Some(Duration::from_secs_f64(secs.clamp(0.001, 3600.0))))
}

/// A provider answered "too many calls" although the budget allowed them: nothing more for
/// `wait`, and half the rate until `shrink_for` has passed.
pub async fn shrink_budget(
    conn: &mut PgConnection,
    name: &str,
    per_sec: f64,
    wait: Duration,
    shrink_for: Duration,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE rate_budgets SET tokens = LEAST(tokens, 0) - $2 * $3, \
         refreshed_at = clock_timestamp(), \
         shrunk_until = clock_timestamp() + make_interval(secs => $4) \
         WHERE name = $1",
    )
    .bind(name)
    .bind(wait.as_secs_f64())
    .bind(per_sec)
    .bind(shrink_for.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
