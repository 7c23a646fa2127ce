//! `POST /webhooks/stripe`: verify, record, enqueue, answer. Nothing here calls a cloud.
//!
//! Each event type we act on has one function that reads it into what it means for a
//! subscription (`meaning` is the table); `billing::apply` merges that into the subscription
//! and makes its nodes follow, in the same transaction as the event's record.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use hive_jobs::billing::BillingError;
use hive_jobs::requests::RequestError;
use hive_jobs::store::{self, StripeEventRecord};
use hive_jobs::stripe_events::{self, EventEnvelope, EventError, Meaning};
use sqlx::Connection;

use crate::error::{ApiError, ErrorBody};
use crate::request_id::RequestId;
use crate::stripe_signature;
use crate::AppState;

/// A Stripe event, signed with one of the endpoint's secrets: recorded once, and what it means
/// for the subscription's nodes enqueued in the same transaction.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "stripe",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the body")),
    request_body(content = serde_json::Value, description = "A Stripe event", content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded (or a duplicate delivery of one recorded)", body = serde_json::Value),
        (status = 400, description = "No valid signature, or not a Stripe event", body = ErrorBody),
        (status = 422, description = "An event this api cannot apply (an unknown plan or price)", body = ErrorBody),
    )
)]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    request_id: RequestId,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    receive(&state, &request_id, &headers, &body).await
}

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        match e {
            EventError::Malformed(why) => ApiError::BadRequest(why),
            EventError::Unusable(why) => ApiError::Unprocessable(why),
        }
    }
}

/// Counts an event refused before its signature and shape were checked: such bodies may name
/// any type they like, which must not become a label.
fn unverified(e: ApiError) -> ApiError {
    hive_jobs::metrics::webhook_event("unverified", "rejected");
    e
}

async fn receive(
    state: &AppState,
    request_id: &RequestId,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("missing Stripe-Signature header".into()))
        .map_err(unverified)?;
    stripe_signature::verify(
        header,
        body,
        &state.config.stripe_webhook_secrets,
        state.config.stripe_tolerance,
        chrono::Utc::now().timestamp(),
    )
    .map_err(|e| unverified(ApiError::BadRequest(e.to_string())))?;

    let event = EventEnvelope::from_body(body).map_err(|e| unverified(e.into()))?;
    // Parsed above, hence text; stored as delivered rather than serialized again.
    let payload = std::str::from_utf8(body)
        .map_err(|_| unverified(ApiError::BadRequest("body is not JSON".into())))?;
    let meaning = stripe_events::meaning(&event, &state.config).map_err(|e| {
        hive_jobs::metrics::webhook_event(&event.event_type, "rejected");
        ApiError::from(e)
    })?;

    let record = StripeEventRecord {
        id: &event.id,
        event_type: &event.event_type,
        api_version: event.api_version.as_deref(),
        livemode: event.livemode,
        payload,
    };
    // Nine in ten events change nothing but their own row: one statement, its own
    // transaction (a retry storm costs one round trip an event, not four).
    if matches!(meaning, Meaning::Record) {
        return Ok(
            if store::record_stripe_event(&mut *state.conn().await?, &record).await? {
                recorded(&event, &[])
            } else {
                duplicate(&event)
            },
        );
    }
    let mut conn = state.conn().await?;
    let mut tx = conn.begin().await.map_err(store::StoreError::from)?;
    request_id.tag(&mut tx).await?;
    let new = store::record_stripe_event(&mut *tx, &record).await?;
    if !new {
        tx.rollback().await.map_err(store::StoreError::from)?;
        return Ok(duplicate(&event));
    }
    let applied = stripe_events::apply(&mut tx, &meaning, &event.id, &state.config)
        .await
        .map_err(|e| match e {
            BillingError::Store(e) | BillingError::Request(RequestError::Store(e)) => {
                ApiError::Internal(e)
            }
            other => ApiError::Unprocessable(other.to_string()),
        })?;
    tx.commit().await.map_err(store::StoreError::from)?;
    let added = applied.map(|a| a.added).unwrap_or_default();
    Ok(recorded(&event, &added))
}

/// The answer to a redelivery of an event recorded before, counted and logged.
fn duplicate(event: &EventEnvelope) -> Json<serde_json::Value> {
    tracing::info!(event_id = %event.id, "duplicate delivery");
    hive_jobs::metrics::webhook_event(&event.event_type, "duplicate");
    Json(serde_json::json!({ "received": true, "duplicate": true }))
}

/// The answer to a newly recorded event and the nodes it added, counted and logged.
fn recorded(event: &EventEnvelope, added: &[uuid::Uuid]) -> Json<serde_json::Value> {
    hive_jobs::metrics::webhook_event(&event.event_type, "recorded");
    tracing::info!(
        event_id = %event.id,
        event_type = %event.event_type,
        nodes = added.len(),
        "stripe event recorded"
    );
    Json(serde_json::json!({ "received": true, "nodes": added }))
}
