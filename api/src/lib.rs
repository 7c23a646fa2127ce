//! hive-api: receives Stripe webhooks and serves node status to the customer's app.

pub mod auth;
pub mod billing;
pub mod checkout;
pub mod error;
pub mod idempotency;
pub mod nodes;
pub mod stripe_signature;
pub mod wait;
pub mod webhook;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use hive_jobs::config::ApiConfig;
use sqlx::PgPool;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<ApiConfig>,
    /// Stripe's API client; `None` when no secret key is configured.
    pub stripe: Option<Arc<stripe::Client>>,
    /// Node moves, for the waiters of `/wait`.
    pub changes: wait::NodeChanges,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(webhook::stripe_webhook))
        .route(
            "/api/v1/nodes",
            get(nodes::list_nodes).post(nodes::create_node),
        )
        .route(
            "/api/v1/nodes/{id}",
            get(nodes::get_node).delete(nodes::delete_node),
        )
        .route("/api/v1/nodes/{id}/wait", get(wait::wait_for_status))
        .route("/api/v1/nodes/{id}/restart", post(nodes::restart_node))
        .route("/api/v1/nodes/{id}/stop", post(nodes::stop_node))
        .route("/api/v1/nodes/{id}/start", post(nodes::start_node))
        .route("/api/v1/billing", get(billing::billing))
        .route("/api/v1/usage", get(billing::usage))
        .route("/api/v1/billing/checkout", post(checkout::checkout))
        .route("/api/v1/billing/portal", post(checkout::portal))
        .route("/healthz", get(healthz))
        .fallback(|| async { error::ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({ "status": "ok" }))),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "database unreachable" })),
        ),
    }
}
