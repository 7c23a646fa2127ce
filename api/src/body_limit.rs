//! Request bodies are read whole, up to a limit, before any handler sees them: larger is a
//! `413` with the JSON error shape (axum's own limit would answer plain text).
//!
//! An oversized body is still read (and thrown away) up to [`DRAIN_CAP`] before the answer,
//! for a short while: a client that is still sending when we answer and close would otherwise
//! see its connection reset instead of our 413. Past the cap, or the time, we stop reading.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// The app's calls carry a few small JSON fields.
pub const APP_LIMIT: usize = 64 * 1024;
/// Stripe's events (an invoice with many lines) are larger, but not without bound.
pub const WEBHOOK_LIMIT: usize = 512 * 1024;
/// How much of an oversized body is read before answering.
const DRAIN_CAP: usize = 2 * 1024 * 1024;
/// How long an oversized body is read before answering.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// What reading a body found.
enum Read {
    Whole(Bytes),
    TooLarge,
    Unreadable,
}

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
    let (parts, body) = request.into_parts();
    let read = if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        Read::TooLarge
    } else {
        read_up_to(body, limit).await
    };
    match read {
        Read::Whole(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Read::TooLarge => ApiError::PayloadTooLarge(limit).into_response(),
        Read::Unreadable => {
            ApiError::BadRequest("the request body could not be read".into()).into_response()
        }
    }
}

async fn read_up_to(mut body: Body, limit: usize) -> Read {
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Read::Unreadable;
        };
        if let Ok(data) = frame.into_data() {
            if whole.len() + data.len() > limit {
                drain(body).await;
                return Read::TooLarge;
            }
            whole.extend_from_slice(&data);
        }
    }
    Read::Whole(Bytes::from(whole))
}

/// Reads and drops what is left of a body, up to the cap and for a short while at most.
async fn drain(mut body: Body) {
    let reading = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_CAP {
                break;
            }
        }
    };
    if tokio::time::timeout(DRAIN_TIME, reading).await.is_err() {
        tracing::debug!("stopped reading an oversized body: too slow");
    }
}
