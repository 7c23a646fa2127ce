//! The api's connection pool (`hive_jobs::connections`), against a real Postgres: a connection
//! comes back without a round trip of its own, yet a transaction dropped without its commit
//! lets go of its locks at once, and a statement cancelled half-way leaves the connection usable.

use std::time::Duration;

use hive_jobs::connections::Connections;
use hive_tests::process::Postgres;
use sqlx::{Connection, PgConnection};

async fn setup() -> (Postgres, Connections, PgConnection) {
    let pg = Postgres::start().expect("postgres");
    let url = pg.url("postgres");
    let mut other = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE lockable (id int PRIMARY KEY)")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("INSERT INTO lockable VALUES (1)")
        .execute(&mut other)
        .await
        .unwrap();
    let db = Connections::new(url.parse().unwrap(), 1).expect("pool");
    (pg, db, other)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_transaction_lets_go_of_its_locks_at_once() {
    let (_pg, db, mut other) = setup().await;
    let pooled_pid: i32 = {
        let mut conn = db.get().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SELECT id FROM lockable WHERE id = 1 FOR UPDATE")
            .execute(&mut *tx)
            .await
            .unwrap();
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        // Dropped without commit or rollback, as a request that fails half-way does: sqlx only
        // queues the ROLLBACK, to be sent when the connection is next used.
        pid
    };
    // Nobody uses the pool again: the row must still be free within moments.
    sqlx::query("SET lock_timeout = '3s'")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("SELECT id FROM lockable WHERE id = 1 FOR UPDATE")
        .execute(&mut other)
        .await
        .expect("the dropped transaction still holds its lock");
    // And the pooled connection is idle, outside any transaction, back in the pool (the
    // flush that returns it may still be reading Postgres's answer: a moment's grace).
    let mut seen = (String::new(), (0, 0));
    for _ in 0..40 {
        let (state,): (String,) =
            sqlx::query_as("SELECT state FROM pg_stat_activity WHERE pid = $1")
                .bind(pooled_pid)
                .fetch_one(&mut other)
                .await
                .unwrap();
        seen = (state, db.status());
        if seen == ("idle".to_string(), (1, 1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen,
        ("idle".to_string(), (1, 1)),
        "the pooled connection after a dropped transaction: its state, and (open, idle)"
    );
    let _conn = db.get().await.unwrap();
    assert_eq!(db.status(), (1, 0), "one connection, in use");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_cancelled_half_way_leaves_the_connection_usable() {
    let (_pg, db, _other) = setup().await;
    let first_pid: i32 = {
        let mut conn = db.get().await.unwrap();
        let pid: (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let slow = sqlx::query("SELECT pg_sleep(0.5)").execute(&mut *conn);
        // The client went away: the statement's future is dropped before its answer.
        assert!(tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err());
        pid.0
    };
    let mut conn = db.get().await.unwrap();
    let (pid, one): (i32, i32) = sqlx::query_as("SELECT pg_backend_pid(), 1")
        .fetch_one(&mut *conn)
        .await
        .expect("the connection after a cancelled statement");
    assert_eq!(one, 1);
    assert_eq!(pid, first_pid, "the same connection, kept");
}

async fn pid_of(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?;
    Ok(pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_whose_backend_died_is_replaced_once_a_failure_is_reported() {
    let (_pg, db, mut other) = setup().await;
    let first = {
        let mut conn = db.get().await.unwrap();
        pid_of(&mut conn).await.unwrap()
    };
    // Its backend dies (as in a restart or a failover), between two uses close together.
    let (killed,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert!(killed);
    // Used again at once (no idle time to ping it for): it fails, and keeps failing.
    for _ in 0..3 {
        let mut conn = db.get().await.unwrap();
        assert!(
            pid_of(&mut conn).await.is_err(),
            "a dead connection answered"
        );
    }
    // Its owner reports the failure: the next use finds a live connection.
    db.suspect_all();
    let mut conn = db.get().await.expect("a new connection");
    let second = pid_of(&mut conn)
        .await
        .expect("a live connection after the report");
    assert_ne!(second, first, "a new backend");
}
