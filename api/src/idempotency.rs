//! `Idempotency-Key` on every `POST` and `DELETE` of the app's API: the same key with the same
//! request (method, path, body) within 24 hours gets the first answer again, without running
//! anything; the same key with another request is a `422`; while the first is still running, a
//! `409`, until its claim lapses (`HIVE_IDEMPOTENCY_LEASE_SECS`): a request whose client went
//! away or whose api crashed does not hold its key for a day. Keys are per user. Answers of 5xx
//! are not kept, so a retry runs again.

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hive_jobs::store::{self, IdempotencyClaim};
use sha2::{Digest, Sha256};

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::AppState;

/// The `Idempotency-Key` header, as the contract shows it.
#[derive(utoipa::IntoParams)]
#[into_params(names("Idempotency-Key"), parameter_in = Header)]
pub struct IdempotencyKey(
    /// The same key and request within 24 h answers the first answer again.
    #[param(min_length = 1, max_length = 255)]
    pub Option<String>,
);

/// The largest body a keyed request may have.
const MAX_BODY: usize = 1024 * 1024;

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keyed = matches!(*request.method(), Method::POST | Method::DELETE)
        && request.uri().path().starts_with("/api/v1/");
    let key = match request.headers().get("idempotency-key") {
        Some(key) if keyed => key.to_str().ok().map(str::to_string),
        _ => return next.run(request).await,
    };
    let Some(key) = key.filter(|k| !k.is_empty() && k.len() <= 255) else {
        return ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible characters".into())
            .into_response();
    };
    match keyed_request(&state, &key, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn keyed_request(
    state: &AppState,
    key: &str,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let AuthUser(user) = AuthUser::from_request_parts(&mut parts, state).await?;
    let body = to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::BadRequest("body too large or unreadable".into()))?;
    let mut hash = Sha256::new();
    hash.update(parts.method.as_str());
    hash.update([0]);
    hash.update(parts.uri.path());
    hash.update([0]);
    hash.update(&body);
    let fingerprint = hex::encode(hash.finalize());
    let lease = state.config.idempotency_lease;
    let claim =
        store::claim_idempotency_key(&mut *state.conn().await?, &user, key, &fingerprint, lease)
            .await?;
    match claim {
        IdempotencyClaim::Mismatch => Err(ApiError::Unprocessable(
            "this Idempotency-Key was used with another request".into(),
        )),
        IdempotencyClaim::InProgress => Err(ApiError::Conflict(
            "a request with this Idempotency-Key is still in progress".into(),
        )),
        IdempotencyClaim::Replay { status, body } => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let headers = response.headers_mut();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        IdempotencyClaim::New { claimed_at } => {
            let response = next.run(Request::from_parts(parts, Body::from(body))).await;
            let (parts, body) = response.into_parts();
            let body = match to_bytes(body, usize::MAX).await {
                Ok(body) => body,
                Err(e) => {
                    let mut conn = state.conn().await?;
                    store::finish_idempotency_key(&mut *conn, &user, key, claimed_at, None).await?;
                    tracing::error!(error = %e, "reading an answer failed");
                    return Err(ApiError::Upstream("the answer could not be read".into()));
                }
            };
            let kept = (parts.status.as_u16() < 500).then(|| (parts.status.as_u16(), &body[..]));
            store::finish_idempotency_key(&mut *state.conn().await?, &user, key, claimed_at, kept)
                .await?;
            Ok(Response::from_parts(parts, Body::from(body)))
        }
    }
}
