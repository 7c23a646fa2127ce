//! The rate budgets' token buckets, shared by every worker (see `cloud::budget`).

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection};

use crate::cloud::budget::{BudgetLedger, LedgerError, LedgerFuture};
use crate::connections::Connections;

use super::StoreResult;

/// The buckets of `rate_budgets`, on connections of their own: the ledger the cloud clients'
/// budgets take their calls from.
#[derive(Debug, Clone)]
pub struct BudgetBuckets {
    db: Connections,
}

impl BudgetBuckets {
    pub fn new(db: Connections) -> Self {
        Self { db }
    }

    /// A failed statement may be a connection whose backend died: check them all before
    /// their next use.
    fn suspect_connections_after<T>(&self, result: StoreResult<T>) -> Result<T, LedgerError> {
        if result.is_err() {
            self.db.suspect_all();
        }
        result.map_err(LedgerError::from)
    }
}

impl BudgetLedger for BudgetBuckets {
    fn take<'a>(
        &'a self,
        name: &'a str,
        burst: f64,
        per_sec: f64,
    ) -> LedgerFuture<'a, Option<Duration>> {
        Box::pin(async move {
            let taken = async {
                let mut conn = self.db.get().await?;
                take_budget(&mut conn, name, burst, per_sec).await
            }
            .await;
            self.suspect_connections_after(taken)
        })
    }

    fn shrink<'a>(
        &'a self,
        name: &'a str,
        per_sec: f64,
        wait: Duration,
        shrink_for: Duration,
    ) -> LedgerFuture<'a, ()> {
        Box::pin(async move {
            let shrunk = async {
                let mut conn = self.db.get().await?;
                shrink_budget(&mut conn, name, per_sec, wait, shrink_for).await
            }
            .await;
            self.suspect_connections_after(shrunk)
        })
    }
}

/// Takes one call from the budget `name` (a token bucket refilled at `per_sec` up to `burst`,
/// at half that rate while shrunk). `None`: taken; `Some(wait)`: none left, one is there after
/// `wait`. The row is made on first use, full.
pub async fn take_budget(
    conn: &mut PgConnection,
    name: &str,
    burst: f64,
    per_sec: f64,
) -> StoreResult<Option<Duration>> {
    // What the bucket holds now: what it held, plus the refill since.
    const AVAILABLE: &str =
        "LEAST($2, tokens + EXTRACT(EPOCH FROM clock_timestamp() - refreshed_at) \
        * CASE WHEN shrunk_until > clock_timestamp() THEN $3 / 2 ELSE $3 END)";
    // Most calls find a token: one plain update of an existing row, which matches nothing
    // when the bucket is empty (or not made yet). The row lock makes a concurrent taker
    // re-check the bucket as this one left it.
    let taken = sqlx::query_scalar::<_, i32>(AssertSqlSafe(format!(
        "UPDATE rate_budgets SET tokens = {AVAILABLE} - 1, refreshed_at = clock_timestamp() \
         WHERE name = $1 AND {AVAILABLE} >= 1 RETURNING 1"
    )))
    .bind(name)
    .bind(burst)
    .bind(per_sec)
    .fetch_optional(&mut *conn)
    .await?;
    if taken.is_some() {
        return Ok(None);
    }
    // Empty or new: make the row if need be, refill it, and take one if the refill made one.
    let available: f64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "WITH made AS ( \
             INSERT INTO rate_budgets (name, tokens) VALUES ($1, $2 - 1) \
             ON CONFLICT (name) DO NOTHING), \
         cur AS ( \
             SELECT name, {AVAILABLE} AS available \
             FROM rate_budgets WHERE name = $1 FOR UPDATE) \
         UPDATE rate_budgets b SET \
             tokens = cur.available - CASE WHEN cur.available >= 1 THEN 1 ELSE 0 END, \
             refreshed_at = clock_timestamp() \
         FROM cur WHERE b.name = cur.name \
         RETURNING cur.available"
    )))
    .bind(name)
    .bind(burst)
    .bind(per_sec)
    .fetch_optional(&mut *conn)
    .await?
    // The row was made by this very statement (not visible to it yet), full but for the
    // token this call takes (a burst is at least one).
    .unwrap_or(burst);
    if available >= 1.0 {
        return Ok(None);
    }
    let secs = (1.0 - available) / per_sec.max(f64::MIN_POSITIVE);
    Ok(Some(Duration::from_secs_f64(secs.clamp(0.001, 3600.0))))
}

/// A provider answered "too many calls" although the budget allowed them: nothing more for
/// `wait`, and half the rate until `shrink_for` has passed.
pub async fn shrink_budget(
    conn: &mut PgConnection,
    name: &str,
    per_sec: f64,
    wait: Duration,
    shrink_for: Duration,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE rate_budgets SET tokens = LEAST(tokens, 0) - $2 * $3, \
         refreshed_at = clock_timestamp(), \
         shrunk_until = clock_timestamp() + make_interval(secs => $4) \
         WHERE name = $1",
    )
    .bind(name)
    .bind(wait.as_secs_f64())
    .bind(per_sec)
    .bind(shrink_for.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
