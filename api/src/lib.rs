//! hive-api: receives Stripe webhooks and serves node status to the customer's app.

pub mod auth;
pub mod billing;
pub mod body_limit;
pub mod checkout;
pub mod error;
pub mod http_metrics;
pub mod idempotency;
pub mod nodes;
pub mod openapi;
pub mod rate_limit;
pub mod request_id;
pub mod stripe_signature;
pub mod wait;
pub mod webhook;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use hive_jobs::config::ApiConfig;
use hive_jobs::connections::Connections;
use sqlx::PgPool;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa_scalar::{Scalar, Servable};

/// What every handler shares, behind one `Arc`: axum clones the state for each extractor and
/// middleware of every request, and one reference count is cheaper than a clone and drop of
/// each part (that was 2 % of the api's CPU under the reads load, BENCHMARKS.md).
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl AppState {
    pub fn new(shared: SharedState) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct SharedState {
    /// For `LISTEN` and the health check: every request's statements go through `db`.
    pub pool: PgPool,
    /// The requests' connections (not sqlx's pool, which pings each after every use: see
    /// `hive_jobs::connections`).
    pub db: Connections,
    pub config: Arc<ApiConfig>,
    /// Stripe's API client; `None` when no secret key is configured.
    pub stripe: Option<Arc<stripe::Client>>,
    /// Node moves, for the waiters of `/wait`.
    pub changes: wait::NodeChanges,
    /// Checks the app's bearer tokens.
    pub tokens: Arc<auth::Tokens>,
    /// Per-user and per-address limits; `None` when off.
    pub limits: Option<Arc<rate_limit::RateLimits>>,
}

impl SharedState {
    /// A connection for one request's statements; give it back (drop it) before taking
    /// another, or a full pool could wait on itself.
    pub async fn conn(&self) -> Result<hive_jobs::connections::Conn, error::ApiError> {
        Ok(self
            .db
            .get()
            .await
            .map_err(hive_jobs::store::StoreError::from)?)
    }
}

/// The header that carries a request's id, on the way in (a caller's own is kept) and out.
const REQUEST_ID: &str = request_id::HEADER;

pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID);
    // `Idempotency-Key` on the methods a route has (a method it does not have is a 405,
    // whatever its key: a method router's own layer does not wrap its 405).
    let keyed = middleware::from_fn_with_state(state.clone(), idempotency::layer);
    let routes = Router::new()
        .route("/webhooks/stripe", post(webhook::stripe_webhook))
        .route(
            "/api/v1/nodes",
            get(nodes::list_nodes)
                .post(nodes::create_node)
                .route_layer(keyed.clone()),
        )
        .route(
            "/api/v1/nodes/{id}",
            get(nodes::get_node)
                .delete(nodes::delete_node)
                .route_layer(keyed.clone()),
        )
        .route("/api/v1/nodes/{id}/wait", get(wait::wait_for_status))
        .route(
            "/api/v1/nodes/{id}/restart",
            post(nodes::restart_node).route_layer(keyed.clone()),
        )
        .route(
            "/api/v1/nodes/{id}/stop",
            post(nodes::stop_node).route_layer(keyed.clone()),
        )
        .route(
            "/api/v1/nodes/{id}/start",
            post(nodes::start_node).route_layer(keyed.clone()),
        )
        .route("/api/v1/billing", get(billing::billing))
        .route("/api/v1/usage", get(billing::usage))
        .route(
            "/api/v1/billing/checkout",
            post(checkout::checkout).route_layer(keyed.clone()),
        )
        .route(
            "/api/v1/billing/portal",
            post(checkout::portal).route_layer(keyed),
        )
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::document))
        .merge(Scalar::with_url(
            "/docs",
            <openapi::ApiDoc as utoipa::OpenApi>::openapi(),
        ))
        .fallback(|| async { error::ApiError::NotFound })
        .method_not_allowed_fallback(|| async { error::ApiError::MethodNotAllowed });
    // Outermost last: the id is set first, so the trace span and every log line carry it.
    routes
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::by_address,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            check_connections_after_a_failure,
        ))
        .layer(middleware::from_fn(body_limit::layer))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| {
                    let id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                        request_id = %id,
                        user = tracing::field::Empty,
                    )
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(cors(&state.config.cors_origins))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(middleware::from_fn(http_metrics::layer))
        .with_state(state)
}

/// After any answer of ours that is a server error, every pooled connection is pinged before
/// its next use: a connection whose backend died (a Postgres restart, a failover) would
/// otherwise fail every request it serves until the load pauses (`hive_jobs::connections`).
async fn check_connections_after_a_failure(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let response = next.run(request).await;
    if response.status().is_server_error() {
        state.db.suspect_all();
    }
    response
}

/// Browsers may call the api from the allowed origins only (none unless configured).
fn cors(origins: &[String]) -> CorsLayer {
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static(REQUEST_ID),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            HeaderName::from_static(REQUEST_ID),
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Whether the api is up and reaches its database.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "Up", body = Health),
        (status = 503, description = "The database is unreachable", body = Health),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => (StatusCode::OK, Json(Health { status: "ok" })),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "database unreachable",
            }),
        ),
    }
}

/// The api's health.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, or what is wrong.
    pub status: &'static str,
}
