//! The Stripe events we received, recorded before they are applied.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreResult;

/// A Stripe event as we record it.
pub struct StripeEventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub api_version: Option<&'a str>,
    pub livemode: bool,
    /// The event's JSON as it was delivered (already checked to parse).
    pub payload: &'a str,
}

/// Records an event by its id, in the caller's transaction or, for an event that changes
/// nothing else, as its own. Returns false when it was recorded before (a redelivery); a
/// concurrent delivery of the same id waits here for the first to commit, then sees it.
pub async fn record_stripe_event(
    db: impl sqlx::PgExecutor<'_>,
    event: &StripeEventRecord<'_>,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, api_version, livemode, payload) \
         VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT (id) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.event_type)
    .bind(event.api_version)
    .bind(event.livemode)
    .bind(event.payload)
    .execute(db)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// A Stripe event as recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredStripeEvent {
    pub id: String,
    pub event_type: String,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub received_at: DateTime<Utc>,
    pub payload: sqlx::types::Json<serde_json::Value>,
}

/// The latest recorded Stripe events (of one type, when given), newest first.
pub async fn stripe_events(
    pool: &PgPool,
    event_type: Option<&str>,
    limit: i64,
) -> StoreResult<Vec<StoredStripeEvent>> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, api_version, livemode, received_at, payload FROM stripe_events \
         WHERE ($1::text IS NULL OR event_type = $1) ORDER BY received_at DESC, id LIMIT $2",
    )
    .bind(event_type)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn stripe_event(pool: &PgPool, id: &str) -> StoreResult<Option<StoredStripeEvent>> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, api_version, livemode, received_at, payload FROM stripe_events \
         WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}
