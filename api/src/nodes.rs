//! The app's nodes: `GET /api/v1/nodes`, `GET /api/v1/nodes/{id}`, and the controls
//! (`POST .../restart`, `.../stop`, `.../start`, `DELETE /api/v1/nodes/{id}`,
//! `POST /api/v1/nodes`), each answered `202` with the node and recorded in its log with who
//! asked; what the node's state does not allow is a `409` and nothing is enqueued.

use axum::body::Bytes;
use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use hive_jobs::conditions::{self, Condition};
use hive_jobs::connections::Connections;
use hive_jobs::model::TeardownReason;
use hive_jobs::model::{public, Desired, EventKind, Node, NodeState, NodeStatus};
use hive_jobs::{requests, store};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::idempotency::IdempotencyKey;
use crate::request_id::RequestId;
use crate::AppState;

/// A node as the app sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeView {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub status: NodeStatus,
    pub step: NodeState,
    /// What the node was last asked to be (`running`, `suspended`, `stopped`, `gone`).
    pub desired: Desired,
    pub region: String,
    pub instance_type: String,
    pub instance_id: Option<String>,
    pub tunnel_id: Option<String>,
    pub hostname: String,
    /// Set once the node is ready to serve.
    pub url: Option<String>,
    /// Set only when the node failed: what failed, in plain words, and a reference the
    /// operator finds the whole cause by (never a provider's own text).
    pub error: Option<String>,
    /// The failure's stable code, for the app to branch on (`launch_refused`,
    /// `image_unavailable`, `instance_refused`, `secret_refused`, `dns_refused`,
    /// `tunnel_refused`, `busy`, `step_failed`).
    pub error_code: Option<String>,
    /// What a step is waiting for ("instance is pending"): not an error.
    pub waiting_for: Option<String>,
    /// The last transient error of the current step, which is being retried (in plain words,
    /// as `error`).
    pub last_error: Option<String>,
    pub volume_gb: i32,
    /// `InstanceRunning`, `TunnelHealthy`, `DnsRouted`: true, false or unknown, and since when.
    pub conditions: Vec<Condition>,
    /// Its last 20 log entries, oldest first.
    pub events: Vec<EventView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One entry of a node's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub at: DateTime<Utc>,
    pub step: String,
    pub kind: String,
    pub message: Option<String>,
}

/// How many log entries a node view carries.
pub const EVENTS_SHOWN: i64 = 20;

impl NodeView {
    fn build(node: Node, events: Vec<EventView>, moves: &[(DateTime<Utc>, String)]) -> Self {
        let state = node.state();
        let status = node.status();
        // The operator's record keeps the providers' words; the app gets ours.
        let reference = format!(
            "{}/{}",
            &node.id.simple().to_string()[..8],
            node.failed_step.as_deref().unwrap_or(state.as_str())
        );
        let error = node
            .error
            .as_deref()
            .map(|raw| public::public_error(raw, &reference));
        let last_error = node
            .last_error
            .as_deref()
            .map(|raw| public::public_error(raw, &reference).message);
        let message = error
            .as_ref()
            .map(|e| e.message.clone())
            .or_else(|| node.waiting_for.clone())
            .or_else(|| last_error.clone());
        let conditions = conditions::conditions(state, message.as_deref(), node.created_at, moves);
        NodeView {
            url: (state == NodeState::Ready).then(|| node.url()),
            id: node.id,
            subscription_id: node.subscription_id,
            status,
            step: state,
            desired: node.desired(),
            region: node.region,
            instance_type: node.instance_type,
            instance_id: node.instance_id,
            tunnel_id: node.tunnel_id,
            hostname: node.hostname,
            error_code: error.as_ref().map(|e| e.code.to_string()),
            error: error.map(|e| e.message),
            waiting_for: node.waiting_for,
            last_error,
            volume_gb: node.volume_gb,
            conditions,
            events,
            created_at: node.created_at,
            updated_at: node.updated_at,
        }
    }
}

impl From<hive_jobs::model::NodeEvent> for EventView {
    fn from(e: hive_jobs::model::NodeEvent) -> Self {
        // A failure's detail is the provider's text: the app gets what failed, in our words.
        let failure = [EventKind::Failed, EventKind::RetryScheduled]
            .iter()
            .any(|k| k.as_str() == e.kind);
        let message = e.detail.map(|detail| {
            if failure {
                public::public_error(&detail, &e.step).message
            } else {
                public::scrub(&detail)
            }
        });
        EventView {
            at: e.at,
            step: e.step,
            kind: e.kind,
            message,
        }
    }
}

/// The views of `nodes`, with their conditions and recent events (two queries in all).
pub async fn views(
    conn: &mut sqlx::PgConnection,
    nodes: Vec<Node>,
) -> Result<Vec<NodeView>, ApiError> {
    let ids: Vec<Uuid> = nodes.iter().map(|n| n.id).collect();
    let (events, moves) = store::recent_history(conn, &ids, EVENTS_SHOWN).await?;
    let mut events_of: HashMap<Uuid, Vec<EventView>> = HashMap::new();
    for (id, e) in events {
        events_of.entry(id).or_default().push(EventView::from(e));
    }
    let mut moves_of: HashMap<Uuid, Vec<(DateTime<Utc>, String)>> = HashMap::new();
    for (id, at, detail) in moves {
        moves_of.entry(id).or_default().push((at, detail));
    }
    Ok(nodes
        .into_iter()
        .map(|node| {
            let events = events_of.remove(&node.id).unwrap_or_default();
            let moves = moves_of.remove(&node.id).unwrap_or_default();
            NodeView::build(node, events, &moves)
        })
        .collect())
}

/// The view of a node read with its history (one round trip: see
/// `store::node_with_history_for_user`).
pub fn view_of(found: store::NodeWithHistory) -> NodeView {
    let events = found.events.into_iter().map(EventView::from).collect();
    NodeView::build(found.node, events, &found.moves)
}

/// The view of the user's node `id`; 404 when it is not theirs.
pub async fn read_view(db: &Connections, user: &str, id: Uuid) -> Result<NodeView, ApiError> {
    let mut conn = db.get().await.map_err(store::StoreError::from)?;
    store::node_with_history_for_user(&mut *conn, user, id, EVENTS_SHOWN)
        .await?
        .map(view_of)
        .ok_or(ApiError::NotFound)
}

/// One page of the user's nodes.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// Read as text, so that a bad value is our JSON 400; the contract gives the real types.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Nodes per page (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 200)]
    pub limit: Option<String>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
    /// Only nodes of this status.
    #[param(value_type = Option<NodeStatus>)]
    pub status: Option<String>,
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// The user's nodes in creation order, `limit` at a time (default 50, at most 200), after an
/// opaque `cursor`, of one `status` when given.
#[utoipa::path(
    get,
    path = "/api/v1/nodes",
    tag = "nodes",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of the user's nodes", body = NodeList),
        (status = 400, description = "A malformed `limit`, `cursor` or `status`", body = ErrorBody),
    )
)]
pub async fn list_nodes(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<NodeList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = match &query.limit {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| ApiError::BadRequest(format!("`limit` must be 1 to {MAX_PAGE}")))?,
    };
    let cursor = query
        .cursor
        .as_deref()
        .map(|raw| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(raw)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<store::NodeCursor>(&bytes).ok())
                .ok_or_else(|| ApiError::BadRequest("`cursor` is not one we gave".into()))
        })
        .transpose()?;
    let wanted = query
        .status
        .as_deref()
        .map(|raw| {
            NodeStatus::parse(raw)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status `{raw}`")))
        })
        .transpose()?;
    // The states that can show the status (an undone provisioning shows `failed` from its
    // teardown steps too); the exact status is checked on each node.
    let states: Option<Vec<NodeState>> = wanted.map(|wanted| {
        NodeState::ALL
            .into_iter()
            .filter(|s| s.status() == wanted || (wanted == NodeStatus::Failed && s.is_teardown()))
            .collect()
    });
    let page = store::page_nodes_for_user(
        &mut *state.conn().await?,
        &user,
        cursor,
        states.as_deref(),
        limit,
    )
    .await?;
    let next_cursor = (page.len() as i64 == limit)
        .then(|| page.last().map(store::NodeCursor::after))
        .flatten()
        .map(|c| {
            let json = serde_json::to_vec(&c).unwrap_or_default();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        });
    let nodes: Vec<Node> = page
        .into_iter()
        .filter(|n| wanted.is_none_or(|w| n.status() == w))
        .collect();
    Ok(Json(NodeList {
        nodes: views(&mut *state.conn().await?, nodes).await?,
        next_cursor,
    }))
}

/// One of the user's nodes.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{id}",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
    )
)]
pub async fn get_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    // A malformed id names no node of this user: 404 like any other.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    Ok(Json(read_view(&state.db, &user, id).await?))
}

/// The user's node `id` (a malformed id names no node of theirs: 404 like any other).
async fn own_node(state: &AppState, user: &str, id: &str) -> Result<Node, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    store::node_for_user(&mut *state.conn().await?, user, id)
        .await?
        .ok_or(ApiError::NotFound)
}

/// A control asked of a node.
#[derive(Debug, Clone, Copy)]
enum Control {
    Restart,
    Stop,
    Start,
    Delete,
}

/// Records the control on the user's node, in one transaction with its job; `202` with the node.
async fn control(
    state: &AppState,
    user: &str,
    id: &str,
    control: Control,
    request: RequestId,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let node = own_node(state, user, id).await?;
    let by = format!("user {user}");
    let mut conn = state.conn().await?;
    let mut tx = conn.begin().await.map_err(store::StoreError::from)?;
    request.tag(&mut tx).await?;
    match control {
        Control::Restart => requests::restart(&mut tx, node.id, &by).await?,
        Control::Stop => requests::stop(&mut tx, node.id, &by).await?,
        Control::Start => requests::start(&mut tx, node.id, &by).await?,
        Control::Delete => {
            count_change(state, &mut tx, user).await?;
            requests::terminate(&mut tx, node.id, TeardownReason::Requested, &by).await?
        }
    }
    tx.commit().await.map_err(store::StoreError::from)?;
    drop(conn);
    tracing::info!(node_id = %node.id, user, ?control, "node control recorded");
    Ok((
        StatusCode::ACCEPTED,
        Json(read_view(&state.db, user, node.id).await?),
    ))
}

/// Reboots the node's instance; it is `restarting`, then `ready` again.
#[utoipa::path(
    post,
    path = "/api/v1/nodes/{id}/restart",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id"), IdempotencyKey),
    responses(
        (status = 202, description = "Recorded; the node as it is now", body = NodeView),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
        (status = 409, description = "The node's state does not allow it (nothing was done), \
            or a request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "This `Idempotency-Key` was used with another request", body = ErrorBody),
    )
)]
pub async fn restart_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    request: RequestId,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Restart, request).await
}

/// Stops the node until its user starts it (`stopped`, not billing's `suspended`).
#[utoipa::path(
    post,
    path = "/api/v1/nodes/{id}/stop",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id"), IdempotencyKey),
    responses(
        (status = 202, description = "Recorded; the node as it is now", body = NodeView),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
        (status = 409, description = "The node's state does not allow it (nothing was done), \
            or a request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "This `Idempotency-Key` was used with another request", body = ErrorBody),
    )
)]
pub async fn stop_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    request: RequestId,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Stop, request).await
}

/// Starts a node its user stopped.
#[utoipa::path(
    post,
    path = "/api/v1/nodes/{id}/start",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id"), IdempotencyKey),
    responses(
        (status = 202, description = "Recorded; the node as it is now", body = NodeView),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
        (status = 409, description = "The node's state does not allow it (nothing was done), \
            or a request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "This `Idempotency-Key` was used with another request", body = ErrorBody),
    )
)]
pub async fn start_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    request: RequestId,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Start, request).await
}

/// Counts a node creation or deletion against the user's hourly allowance
/// (`HIVE_NODE_CHANGES_PER_HOUR`), in the change's transaction: a `429` when it is spent (and
/// the transaction, dropped, changes nothing).
async fn count_change(
    state: &AppState,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user: &str,
) -> Result<(), ApiError> {
    let Some(per_hour) = state.config.node_changes_per_hour else {
        return Ok(());
    };
    match store::count_node_change(tx, user, per_hour.get()).await? {
        None => Ok(()),
        Some(wait) => {
            tracing::info!(user, ?wait, "node change limit reached");
            Err(ApiError::TooManyRequests(wait.as_secs().max(1)))
        }
    }
}

/// Tears the node down (`terminating`, then `terminated`); the plan's room it used is freed
/// once it is gone.
#[utoipa::path(
    delete,
    path = "/api/v1/nodes/{id}",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id"), IdempotencyKey),
    responses(
        (status = 202, description = "Recorded; the node as it is now", body = NodeView),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
        (status = 409, description = "The node is already gone (nothing was done), \
            or a request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "This `Idempotency-Key` was used with another request", body = ErrorBody),
    )
)]
pub async fn delete_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    request: RequestId,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Delete, request).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    /// Ours (a node's `subscription_id`); else the user's first subscription with room.
    pub subscription_id: Option<Uuid>,
    pub region: Option<String>,
}

/// One more node, while the user's subscription has room under its plan's count.
#[utoipa::path(
    post,
    path = "/api/v1/nodes",
    tag = "nodes",
    params(IdempotencyKey),
    request_body(content = Option<CreateNode>, description = "Empty: the user's first subscription with room, in its region"),
    responses(
        (status = 202, description = "Recorded; the new node", body = NodeView),
        (status = 400, description = "The body is not a `CreateNode`", body = ErrorBody),
        (status = 404, description = "The user has no subscription with this id", body = ErrorBody),
        (status = 409, description = "No room under the plan, no subscription, \
            or a request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "A region not served, \
            or this `Idempotency-Key` was used with another request", body = ErrorBody),
    )
)]
pub async fn create_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    request_id: RequestId,
    body: Bytes,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    // No body and a JSON `null` both mean "the defaults" (the contract's body is optional).
    let request: CreateNode = if body.is_empty() || body.trim_ascii() == b"null" {
        CreateNode {
            subscription_id: None,
            region: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
    };
    if let Some(region) = &request.region {
        if !state.config.regions.contains(region) {
            return Err(ApiError::Unprocessable(format!(
                "region `{region}` is not served"
            )));
        }
    }
    let subscriptions = store::user_subscriptions(&mut *state.conn().await?, &user).await?;
    let chosen = match request.subscription_id {
        Some(id) => subscriptions
            .iter()
            .find(|(sub, _)| sub.id == id)
            .ok_or(ApiError::NotFound)?,
        None => subscriptions
            .iter()
            .find(|(sub, live)| {
                sub.status != "ended" && *live < sub.nodes_entitled.unwrap_or(0) as i64
            })
            .or(subscriptions.first())
            .ok_or_else(|| ApiError::Conflict("the user has no subscription".into()))?,
    };
    let sub = &chosen.0;
    let plan = sub
        .plan
        .as_ref()
        .and_then(|p| state.config.plans.0.get(p))
        .ok_or_else(|| ApiError::Conflict("the subscription's plan is not known yet".into()))?;
    let by = format!("user {user}");
    let mut conn = state.conn().await?;
    let mut tx = conn.begin().await.map_err(store::StoreError::from)?;
    request_id.tag(&mut tx).await?;
    count_change(&state, &mut tx, &user).await?;
    let id = requests::add_node(
        &mut tx,
        sub.id,
        request.region.as_deref(),
        (&plan.instance_type, plan.volume_gb),
        &state.config.node_domain,
        &by,
    )
    .await?;
    tx.commit().await.map_err(store::StoreError::from)?;
    drop(conn);
    Ok((
        StatusCode::ACCEPTED,
        Json(read_view(&state.db, &user, id).await?),
    ))
}
