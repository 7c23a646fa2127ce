//! Nodes and their log, as the app and the operator read them.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use uuid::Uuid;

use crate::model::{EventKind, Node, NodeEvent, NodeState};

use super::{StoreResult, NODE_COLUMNS};

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
