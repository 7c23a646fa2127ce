//! `GET /api/v1/nodes/{id}/wait?status=ready&timeout=60`: answers as soon as the node reaches
//! the status. One `LISTEN hive_node_changed` per api process (the node guard's `pg_notify` on
//! every move) is fanned out to every waiter, so many waiters cost one connection, and none of
//! them polls.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use hive_jobs::connections::Connections;
use hive_jobs::model::{Desired, Node, NodeStatus};
use hive_jobs::policy::Intent;
use hive_jobs::store;
use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::nodes::{read_view, view_of, NodeView, EVENTS_SHOWN};
use crate::AppState;

/// The channel the node guard announces moves on.
const CHANNEL: &str = "hive_node_changed";
/// The longest a caller may wait.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// Node moves, for the api's waiters. `Uuid::nil()` means "moves may have been missed (the
/// listener reconnected): look again".
#[derive(Clone)]
pub struct NodeChanges {
    sender: broadcast::Sender<Uuid>,
}

impl Default for NodeChanges {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(4096).0,
        }
    }
}

impl NodeChanges {
    fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.sender.subscribe()
    }

    /// Listens for node moves for as long as the api runs, reconnecting when Postgres goes
    /// away (the waiters then look again, since moves may have been missed meanwhile). The
    /// listener is the first to see Postgres go away, having a read always pending: it has the
    /// requests' connections checked before their next use (they died with it).
    pub async fn listen(self, pool: PgPool, requests: Connections) {
        loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => loop {
                        match listener.try_recv().await {
                            Ok(Some(n)) => {
                                if let Ok(id) = Uuid::parse_str(n.payload()) {
                                    // No waiter at all is not an error.
                                    let _no_waiters = self.sender.send(id);
                                }
                            }
                            Ok(None) => {
                                requests.suspect_all();
                                let _no_waiters = self.sender.send(Uuid::nil());
                            }
                            Err(e) => {
                                requests.suspect_all();
                                tracing::warn!(error = %e, "node listener failed; listening again");
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                },
                Err(e) => tracing::warn!(error = %e, "node listener could not connect"),
            }
            let _no_waiters = self.sender.send(Uuid::nil());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Read as text, so that a bad value is our JSON 400; the contract gives the real types.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The status to wait for.
    #[param(required = true, value_type = NodeStatus)]
    pub status: Option<String>,
    /// Seconds to wait at most (default 60, at most 300).
    #[param(value_type = Option<u64>, minimum = 0)]
    pub timeout: Option<String>,
}

/// Whether the node can still reach `wanted` without anyone acting.
fn reachable(node: &Node, wanted: NodeStatus) -> bool {
    let now = node.status();
    // What the node is to be now (a past-due grace that ran out counts as suspended).
    let desired = Intent::of(node, chrono::Utc::now()).desired;
    let resting_by_intent = matches!(
        (now, desired),
        (NodeStatus::Stopped, Desired::Stopped) | (NodeStatus::Suspended, Desired::Suspended)
    );
    match now {
        _ if now == wanted => true,
        NodeStatus::Terminated | NodeStatus::Failed => false,
        _ if desired == Desired::Gone => {
            matches!(wanted, NodeStatus::Terminating | NodeStatus::Terminated)
        }
        _ if resting_by_intent => false,
        _ => true,
    }
}

/// Answers as soon as the node has the status, or when the timeout passes.
#[utoipa::path(
    get,
    path = "/api/v1/nodes/{id}/wait",
    tag = "nodes",
    params(("id" = Uuid, Path, description = "The node's id"), WaitQuery),
    responses(
        (status = 200, description = "The node, once it has the status or when the timeout \
            passed first: its `status` says which (a long poll that ends is not an error)", body = NodeView),
        (status = 400, description = "A missing or unknown `status`, a malformed `timeout`", body = ErrorBody),
        (status = 404, description = "No node of this user has this id", body = ErrorBody),
        (status = 409, description = "The node cannot reach the status unless someone acts \
            (it failed, it is gone, its user stopped it)", body = ErrorBody),
    )
)]
pub async fn wait_for_status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<(StatusCode, Json<NodeView>), ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let raw = query
        .status
        .ok_or_else(|| ApiError::BadRequest("`status` is required".into()))?;
    let wanted = NodeStatus::parse(&raw)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown status `{raw}`")))?;
    let timeout = match query.timeout {
        None => Duration::from_secs(60),
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::BadRequest("`timeout` is not a number of seconds".into()))?,
        ),
    }
    .min(MAX_WAIT);
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    // Subscribe before the first read, so that no move between the two is missed.
    let mut changes = state.changes.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // The connection goes back before the wait below.
        let found =
            store::node_with_history_for_user(&mut *state.conn().await?, &user, id, EVENTS_SHOWN)
                .await?
                .ok_or(ApiError::NotFound)?;
        let node = &found.node;
        if node.status() == wanted {
            return Ok((StatusCode::OK, Json(view_of(found))));
        }
        if !reachable(node, wanted) {
            return Err(ApiError::Conflict(format!(
                "node {id} is {:?} and cannot become {raw} unless someone acts",
                node.status()
            )));
        }
        // Until a move of this node (or a missed one) or the deadline.
        let woke = tokio::time::timeout_at(deadline, async {
            loop {
                match changes.recv().await {
                    Ok(changed) if changed == id || changed.is_nil() => return true,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        match woke {
            Ok(true) => continue,
            // The deadline passed (or the api is stopping): the node as it is now; its status
            // tells the app whether it got there.
            Ok(false) | Err(_) => {
                let view = read_view(&state.db, &user, id).await?;
                return Ok((StatusCode::OK, Json(view)));
            }
        }
    }
}
