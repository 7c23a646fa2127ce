//! The Stripe events we received, recorded before they are applied, and those held until the
//! configuration allows applying them.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use super::StoreResult;

/// A Stripe event as we record it.
pub struct StripeEventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub api_version: Option<&'a str>,
    pub livemode: bool,
    /// The event's JSON as it was delivered (already checked to parse).
    pub payload: &'a str,
    /// Why it cannot be applied yet, when it cannot: it is kept, held.
    pub held_reason: Option<&'a str>,
    /// Why it is never to be applied (another mode than ours), when it is not.
    pub refused_reason: Option<&'a str>,
}

/// Records an event by its id, in the caller's transaction or, for an event that changes
/// nothing else, as its own. Returns false when it was recorded before (a redelivery); a
/// concurrent delivery of the same id waits here for the first to commit, then sees it.
pub async fn record_stripe_event(
    db: impl sqlx::PgExecutor<'_>,
    event: &StripeEventRecord<'_>,
) -> StoreResult<bool> {
    let inserted = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, api_version, livemode, payload, held_reason, \
         held_since, refused_reason) VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, \
         CASE WHEN $6::text IS NULL THEN NULL ELSE now() END, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(event.id)
    .bind(event.event_type)
    .bind(event.api_version)
    .bind(event.livemode)
    .bind(event.payload)
    .bind(event.held_reason)
    .bind(event.refused_reason)
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
    /// Why it is held, while it is.
    pub held_reason: Option<String>,
    /// Why it is never applied, when it is refused.
    pub refused_reason: Option<String>,
}

const STORED_COLUMNS: &str =
    "id, event_type, api_version, livemode, received_at, payload, held_reason, refused_reason";

/// The latest recorded Stripe events (of one type, when given; only the held ones, when
/// asked), newest first.
pub async fn stripe_events(
    pool: &PgPool,
    event_type: Option<&str>,
    held_only: bool,
    limit: i64,
) -> StoreResult<Vec<StoredStripeEvent>> {
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {STORED_COLUMNS} FROM stripe_events WHERE ($1::text IS NULL OR event_type = $1) \
         AND (NOT $2 OR held_reason IS NOT NULL) ORDER BY received_at DESC, id LIMIT $3"
    )))
    .bind(event_type)
    .bind(held_only)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn stripe_event(pool: &PgPool, id: &str) -> StoreResult<Option<StoredStripeEvent>> {
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {STORED_COLUMNS} FROM stripe_events WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The held events, in Stripe's order (then as received), at most `limit`.
pub async fn held_stripe_events(pool: &PgPool, limit: i64) -> StoreResult<Vec<StoredStripeEvent>> {
    Ok(sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {STORED_COLUMNS} FROM stripe_events WHERE held_reason IS NOT NULL \
         ORDER BY (payload->>'created')::bigint, received_at, id LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// How many events are held.
pub async fn held_stripe_event_count(pool: &PgPool) -> StoreResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE held_reason IS NOT NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Takes a held event to apply it, in the caller's transaction: false when it is no longer
/// held (another api applied it meanwhile). The row stays locked until the transaction ends.
pub async fn take_held_stripe_event(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
) -> StoreResult<bool> {
    Ok(sqlx::query(
        "UPDATE stripe_events SET held_reason = NULL, held_since = NULL \
         WHERE id = $1 AND held_reason IS NOT NULL",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// A held event still cannot be applied: why, now.
pub async fn still_held(pool: &PgPool, id: &str, reason: &str) -> StoreResult<()> {
    sqlx::query(
        "UPDATE stripe_events SET held_reason = $2 WHERE id = $1 AND held_reason IS NOT NULL",
    )
    .bind(id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Holds an event that was recorded (an earlier delivery) but turned out not to apply.
pub async fn hold_stripe_event(pool: &PgPool, id: &str, reason: &str) -> StoreResult<()> {
    sqlx::query(
        "UPDATE stripe_events SET held_reason = $2, held_since = COALESCE(held_since, now()) \
         WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
