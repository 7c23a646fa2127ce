//! Errors the api answers with: a status and a JSON body `{"error": {"code", "message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Unprocessable(String),
    /// The resource's state does not allow it; nothing was done.
    #[error("{0}")]
    Conflict(String),
    /// Stripe (or another service we call) failed; the message is theirs, never a secret.
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(#[from] hive_jobs::store::StoreError),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(e) = &self {
            // The cause goes to the log, not to the caller.
            tracing::error!(error = %e, "request failed");
        }
        let body = serde_json::json!({ "error": { "code": code, "message": self.to_string() } });
        (status, Json(body)).into_response()
    }
}

impl From<hive_jobs::requests::RequestError> for ApiError {
    fn from(e: hive_jobs::requests::RequestError) -> Self {
        use hive_jobs::requests::RequestError;
        match e {
            RequestError::NodeNotFound(_) | RequestError::SubscriptionNotFound(_) => {
                ApiError::NotFound
            }
            RequestError::NotAllowed { reason, .. } => ApiError::Conflict(reason),
            RequestError::Invalid(reason) => ApiError::Unprocessable(reason),
            RequestError::Store(e) => ApiError::Internal(e),
        }
    }
}
