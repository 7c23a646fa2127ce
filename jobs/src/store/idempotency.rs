//! The app's `Idempotency-Key`s: a repeated request gets the first one's answer.

use std::time::Duration;

use sqlx::PgConnection;

use super::StoreResult;

/// What a request with an `Idempotency-Key` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key: run the request, then record its answer.
    New,
    /// Used before for the same request: its answer.
    Replay { status: u16, body: Vec<u8> },
    /// Used before for another request.
    Mismatch,
    /// The first request with this key has not finished yet.
    InProgress,
}

/// How long a key is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Claims `key` of `user_id` for the request `fingerprint`.
pub async fn claim_idempotency_key(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &str,
) -> StoreResult<IdempotencyClaim> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND created_at < now() - $3",
    )
    .bind(user_id)
    .bind(key)
    .bind(IDEMPOTENCY_WINDOW)
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(key)
    .bind(fingerprint)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let claim = if inserted == 1 {
        IdempotencyClaim::New
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

/// Records the answer to a claimed key; `None` forgets the key (a failure worth retrying).
pub async fn finish_idempotency_key(
    db: impl sqlx::PgExecutor<'_>,
    user_id: &str,
    key: &str,
    answer: Option<(u16, &[u8])>,
) -> StoreResult<()> {
    match answer {
        Some((status, body)) => {
            sqlx::query(
                "UPDATE idempotency_keys SET status = $3, body = $4 WHERE user_id = $1 AND key = $2",
            )
            .bind(user_id)
            .bind(key)
            .bind(i32::from(status))
            .bind(body)
            .execute(db)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
                .bind(user_id)
                .bind(key)
                .execute(db)
                .await?;
        }
    }
    Ok(())
}
