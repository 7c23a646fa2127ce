//! The app's `Idempotency-Key`s: a repeated request gets the first one's answer.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::StoreResult;

/// What a request with an `Idempotency-Key` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key (or its last request's claim lapsed): run the request, then
    /// record its answer under this claim.
    New { claimed_at: DateTime<Utc> },
    /// Used before for the same request: its answer.
    Replay { status: u16, body: Vec<u8> },
    /// Used before for another request.
    Mismatch,
    /// The first request with this key has not finished yet.
    InProgress,
}

/// How long a key is remembered.
pub(super) const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Claims `key` of `user_id` for the request `fingerprint`. A claim whose request never
/// finished (its client went away, the api crashed) lapses after `lease`: the key can be used
/// again, and the lapsed request's late answer is not kept ([`finish_idempotency_key`] names
/// its claim).
pub async fn claim_idempotency_key(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &str,
    lease: Duration,
) -> StoreResult<IdempotencyClaim> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 \
         AND (created_at < now() - $3 OR (status IS NULL AND created_at < now() - $4))",
    )
    .bind(user_id)
    .bind(key)
    .bind(IDEMPOTENCY_WINDOW)
    .bind(lease)
    .execute(&mut *tx)
    .await?;
    let claimed: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING RETURNING created_at",
    )
    .bind(user_id)
    .bind(key)
    .bind(fingerprint)
    .fetch_optional(&mut *tx)
    .await?;
    let claim = if let Some(claimed_at) = claimed {
        IdempotencyClaim::New { claimed_at }
    } else {
        let (first, status, body): (String, Option<i32>, Option<Vec<u8>>) = sqlx::query_as(
            "SELECT fingerprint, status, body FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        match (first == fingerprint, status) {
            (false, _) => IdempotencyClaim::Mismatch,
            (true, None) => IdempotencyClaim::InProgress,
            (true, Some(status)) => IdempotencyClaim::Replay {
                status: u16::try_from(status).unwrap_or(500),
                body: body.unwrap_or_default(),
            },
        }
    };
    tx.commit().await?;
    Ok(claim)
}

/// Records the answer to the claim of a key made at `claimed_at`; `None` forgets the key (a
/// failure worth retrying). A claim that lapsed meanwhile (and was claimed again) is left
/// alone.
pub async fn finish_idempotency_key(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    key: &str,
    claimed_at: DateTime<Utc>,
    answer: Option<(u16, &[u8])>,
) -> StoreResult<()> {
    match answer {
        Some((status, body)) => {
            sqlx::query(
                "UPDATE idempotency_keys SET status = $3, body = $4 \
                 WHERE user_id = $1 AND key = $2 AND created_at = $5",
            )
            .bind(user_id)
            .bind(key)
            .bind(i32::from(status))
            .bind(body)
            .bind(claimed_at)
            .execute(db)
            .await?;
        }
        None => {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND created_at = $3",
            )
            .bind(user_id)
            .bind(key)
            .bind(claimed_at)
            .execute(db)
            .await?;
        }
    }
    Ok(())
}
