//! `hive-bench --statements`: what Postgres spent a scenario's time on, statement by statement
//! (`pg_stat_statements`, loaded in the scenario's Postgres only when asked for).

use sqlx::Connection;

use crate::stack::Stack;

/// Makes the extension and forgets what the stack's start-up ran (migrations, seeding).
pub async fn reset(stack: &Stack) -> anyhow::Result<()> {
    let mut conn = stack.connection().await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut conn)
        .await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// Prints the `top` statements by total execution time since [`reset`]: calls, total and mean
/// time, and the statement's start.
pub async fn print_top(stack: &Stack, top: i64) -> anyhow::Result<()> {
    let mut conn = stack.connection().await?;
    let rows: Vec<(i64, f64, f64, String)> = sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time, \
         left(regexp_replace(query, '\\s+', ' ', 'g'), 90) \
         FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%' \
         ORDER BY total_exec_time DESC LIMIT $1",
    )
    .bind(top)
    .fetch_all(&mut conn)
    .await?;
    conn.close().await?;
    println!(
        "{:>9} {:>10} {:>9}  statement (top {top} by total time)",
        "calls", "total ms", "mean µs"
    );
    for (calls, total, mean, query) in rows {
        println!("{calls:>9} {total:>10.1} {:>9.1}  {query}", mean * 1000.0);
    }
    Ok(())
}
