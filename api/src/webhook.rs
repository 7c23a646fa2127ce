//! `POST /webhooks/stripe`: verify, record, enqueue, answer. Nothing here calls a cloud.
//!
//! Each event type we act on has one function that reads it into what it means for a
//! subscription (`meaning` is the table); `billing::apply` merges that into the subscription
//! and makes its nodes follow, in the same transaction as the event's record. A verified event
//! our configuration cannot apply yet (a plan nobody configured, a region not served) is
//! recorded all the same, held with why, and answered 200: it is applied by itself once the
//! configuration allows it (`stripe_events::apply_held`), with no redelivery needed.

use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::Extension;
use axum::Json;
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
        (status = 200, description = "Recorded (or a duplicate delivery of one recorded); `held` says why one that cannot be applied yet waits", body = serde_json::Value),
        (status = 400, description = "No valid signature, or not a Stripe event", body = ErrorBody),
    )
)]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    request_id: RequestId,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let verified = verify(&state, &headers, &body);
    if let (Err(_), Some(limits)) = (&verified, &state.limits) {
        // Only a request that is not Stripe's is limited by its address (rate_limit.rs).
        limits.check_address(&headers, peer.map(|Extension(ConnectInfo(p))| p))?;
    }
    verified.map_err(unverified)?;
    receive(&state, &request_id, &body).await
}

/// Checks the body's `Stripe-Signature` against every configured secret.
fn verify(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<(), ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("missing Stripe-Signature header".into()))?;
    stripe_signature::verify(
        header,
        body,
        &state.config.stripe_webhook_secrets,
        state.config.stripe_tolerance,
        chrono::Utc::now().timestamp(),
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))
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

/// A verified event: recorded, and applied when it means something for a subscription.
async fn receive(
    state: &AppState,
    request_id: &RequestId,
    body: &Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let event = EventEnvelope::from_body(body).map_err(|e| unverified(e.into()))?;
    // Parsed above, hence text; stored as delivered rather than serialized again.
    let payload = std::str::from_utf8(body)
        .map_err(|_| unverified(ApiError::BadRequest("body is not JSON".into())))?;
    let record = StripeEventRecord {
        id: &event.id,
        event_type: &event.event_type,
        api_version: event.api_version.as_deref(),
        livemode: event.livemode,
        payload,
        held_reason: None,
        refused_reason: None,
    };
    if let Some(why) = stripe_events::refused(&event, &state.config) {
        return record_unapplied(state, record, Unapplied::Refused, &why).await;
    }
    let meaning = match stripe_events::meaning(&event, &state.config) {
        Ok(meaning) => meaning,
        Err(EventError::Unusable(why)) => {
            return record_unapplied(state, record, Unapplied::Held, &why).await
        }
        Err(e) => {
            hive_jobs::metrics::webhook_event(&event.event_type, "rejected");
            return Err(e.into());
        }
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
    let applied = match stripe_events::apply(&mut tx, &meaning, &event.id, &state.config).await {
        Ok(applied) => applied,
        Err(e) => match e.into_store() {
            Ok(database) => return Err(ApiError::Internal(database)),
            // Not for want of the database: for want of configuration.
            Err(not_yet) => {
                tx.rollback().await.map_err(store::StoreError::from)?;
                return record_unapplied(state, record, Unapplied::Held, &not_yet.to_string())
                    .await;
            }
        },
    };
    tx.commit().await.map_err(store::StoreError::from)?;
    let added = applied.map(|a| a.added).unwrap_or_default();
    Ok(recorded(&event, &added))
}

/// Why a verified event is recorded without being applied.
#[derive(Debug, Clone, Copy)]
enum Unapplied {
    /// The configuration cannot apply it yet: kept until it can (`hivectl stripe-events list
    /// --held`, `doctor`, `hive_stripe_events_held`), applied at the api's start.
    Held,
    /// Of another mode than this api's: never applied.
    Refused,
}

impl Unapplied {
    fn as_str(self) -> &'static str {
        match self {
            Unapplied::Held => "held",
            Unapplied::Refused => "refused",
        }
    }
}

/// Records an event that is not applied, with why, and answers 200 with why: Stripe has
/// nothing to redeliver.
async fn record_unapplied(
    state: &AppState,
    mut record: StripeEventRecord<'_>,
    unapplied: Unapplied,
    why: &str,
) -> Result<Json<serde_json::Value>, ApiError> {
    match unapplied {
        Unapplied::Held => record.held_reason = Some(why),
        Unapplied::Refused => record.refused_reason = Some(why),
    }
    if !store::record_stripe_event(&mut *state.conn().await?, &record).await? {
        hive_jobs::metrics::webhook_event(record.event_type, "duplicate");
        return Ok(Json(
            serde_json::json!({ "received": true, "duplicate": true }),
        ));
    }
    let outcome = unapplied.as_str();
    hive_jobs::metrics::webhook_event(record.event_type, outcome);
    tracing::warn!(
        event_id = %record.id,
        event_type = %record.event_type,
        reason = %why,
        outcome,
        "stripe event recorded, not applied"
    );
    Ok(Json(serde_json::json!({ "received": true, outcome: why })))
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
