//! The app's view of its nodes: `GET /api/v1/nodes` and `GET /api/v1/nodes/{id}`.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use hive_jobs::model::{Desired, Node, NodeState, NodeStatus};
use hive_jobs::store;
use serde::Serialize;
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
