//! The app's nodes: `GET /api/v1/nodes`, `GET /api/v1/nodes/{id}`, and the controls
//! (`POST .../restart`, `.../stop`, `.../start`, `DELETE /api/v1/nodes/{id}`,
//! `POST /api/v1/nodes`), each answered `202` with the node and recorded in its log with who
//! asked; what the node's state does not allow is a `409` and nothing is enqueued.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use hive_jobs::model::TeardownReason;
use hive_jobs::model::{Desired, Node, NodeState, NodeStatus};
use hive_jobs::{requests, store};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::AppState;

/// A node as the app sees it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub status: NodeStatus,
    pub step: NodeState,
    /// What the node was last asked to be (`running`, `suspended`, `gone`).
    pub desired: Desired,
    pub region: String,
    pub instance_type: String,
    pub instance_id: Option<String>,
    pub tunnel_id: Option<String>,
    pub hostname: String,
    /// Set once the node is ready to serve.
    pub url: Option<String>,
    /// Set only when the node failed.
    pub error: Option<String>,
    /// What a step is waiting for ("instance is pending"): not an error.
    pub waiting_for: Option<String>,
    /// The last transient error of the current step, which is being retried.
    pub last_error: Option<String>,
    pub volume_gb: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Node> for NodeView {
    fn from(node: Node) -> Self {
        let state = node.state();
        let status = node.status();
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
            error: node.error,
            waiting_for: node.waiting_for,
            last_error: node.last_error,
            volume_gb: node.volume_gb,
            created_at: node.created_at,
            updated_at: node.updated_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

pub async fn list_nodes(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<NodeList>, ApiError> {
    let nodes = store::list_nodes_for_user(&state.pool, &user).await?;
    Ok(Json(NodeList {
        nodes: nodes.into_iter().map(NodeView::from).collect(),
    }))
}

pub async fn get_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    // A malformed id names no node of this user: 404 like any other.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let node = store::node_for_user(&state.pool, &user, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(node.into()))
}

/// The user's node `id` (a malformed id names no node of theirs: 404 like any other).
async fn own_node(state: &AppState, user: &str, id: &str) -> Result<Node, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    store::node_for_user(&state.pool, user, id)
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
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let node = own_node(state, user, id).await?;
    let by = format!("user {user}");
    let mut tx = state.pool.begin().await.map_err(store::StoreError::from)?;
    match control {
        Control::Restart => requests::restart(&mut tx, node.id, &by).await?,
        Control::Stop => requests::stop(&mut tx, node.id, &by).await?,
        Control::Start => requests::start(&mut tx, node.id, &by).await?,
        Control::Delete => {
            requests::terminate(&mut tx, node.id, TeardownReason::Requested, &by).await?
        }
    }
    tx.commit().await.map_err(store::StoreError::from)?;
    tracing::info!(node_id = %node.id, user, ?control, "node control recorded");
    let node = store::node_for_user(&state.pool, user, node.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((StatusCode::ACCEPTED, Json(node.into())))
}

pub async fn restart_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Restart).await
}

pub async fn stop_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Stop).await
}

pub async fn start_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Start).await
}

pub async fn delete_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    control(&state, &user, &id, Control::Delete).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    /// Ours (a node's `subscription_id`); else the user's first subscription with room.
    pub subscription_id: Option<Uuid>,
    pub region: Option<String>,
}

/// One more node, while the user's subscription has room under its plan's count.
pub async fn create_node(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    body: Bytes,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let request: CreateNode = if body.is_empty() {
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
    let subscriptions = store::user_subscriptions(&state.pool, &user).await?;
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
    let mut tx = state.pool.begin().await.map_err(store::StoreError::from)?;
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
    let node = store::node_for_user(&state.pool, &user, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok((StatusCode::ACCEPTED, Json(node.into())))
}
