//! Request bodies are read whole, up to a limit, before any handler sees them: larger is a
//! `413` with the JSON error shape (axum's own limit would answer plain text).

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::LengthLimitError;

use crate::error::ApiError;

/// The app's calls carry a few small JSON fields.
pub const APP_LIMIT: usize = 64 * 1024;
/// Stripe's events (an invoice with many lines) are larger, but not without bound.
pub const WEBHOOK_LIMIT: usize = 512 * 1024;

pub async fn layer(request: Request, next: Next) -> Response {
    let limit = if request.uri().path().starts_with("/webhooks/") {
        WEBHOOK_LIMIT
    } else {
        APP_LIMIT
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge(limit).into_response();
    }
    let (parts, body) = request.into_parts();
    match to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(e) => {
            let too_large = e.into_inner().downcast_ref::<LengthLimitError>().is_some();
            if too_large {
                ApiError::PayloadTooLarge(limit).into_response()
            } else {
                ApiError::BadRequest("the request body could not be read".into()).into_response()
            }
        }
    }
}
