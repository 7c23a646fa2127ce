//! A pool of Postgres connections that costs no round trip of its own on a busy path.
//!
//! sqlx's pool (0.9) pings every connection as it comes back (`return_to_pool` in sqlx-core's
//! `pool/connection.rs`, on a task it spawns for each): a round trip to Postgres after every
//! query. A status read is one statement, so that ping was half of its round trips and half of
//! the Postgres wakeups it causes (BENCHMARKS.md, change 16; the worker's step statements and
//! rate-budget tokens paid the same, about 40 round trips a provisioned node, change 19).
//! sqlx's pool stays only where apalis needs it. This pool is deadpool's, holding
//! sqlx connections, and checks a connection only when it has a reason to:
//!
//! - on its way back, a connection with something unsent (a transaction dropped without its
//!   commit queues its `ROLLBACK` until the connection is next used) sends it at once, so that
//!   the transaction's locks do not wait for the next request;
//! - on its way out, one idle for longer than [`PING_WHEN_IDLE_FOR`] is pinged (a restart or a
//!   dropped link may have killed it), and one older than [`MAX_LIFETIME`] is replaced;
//! - after its owner saw a failure ([`Connections::suspect_all`]), every connection is pinged
//!   once on its way out. A connection whose backend died fails every statement from then on,
//!   and a busy pool never leaves it idle long enough for the ping above: without this, a
//!   Postgres restart under load would fail requests until the load paused.
//!
//! A statement that was cancelled half-way (its client went away) leaves only answers to read:
//! sqlx reads them before the connection's next statement.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// How long a connection may sit idle before it is pinged on its way out.
pub const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);
/// Connections are replaced after this long (as sqlx's pool does by default), so that a
/// backend's caches and any server-side change of settings do not live forever.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How long a request waits for a connection, or for a new one to open.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("no database connection within {0:?}")]
    Timeout(Duration),
    #[error("the connection pool is closed")]
    Closed,
    #[error("connection pool: {0}")]
    Build(String),
}

/// Opens and checks connections for deadpool.
pub struct Manager {
    options: PgConnectOptions,
    /// Bumped by [`Connections::suspect_all`].
    suspicion: Arc<AtomicU64>,
}

/// A pooled connection, and the suspicion it was last checked against.
pub struct Pooled {
    conn: PgConnection,
    checked_at: u64,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled, sqlx::Error> {
        let checked_at = self.suspicion.load(Ordering::Acquire);
        let conn = self.options.connect().await?;
        Ok(Pooled { conn, checked_at })
    }

    async fn recycle(&self, pooled: &mut Pooled, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        if metrics.age() > MAX_LIFETIME {
            return Err(RecycleError::message("past its lifetime"));
        }
        let suspicion = self.suspicion.load(Ordering::Acquire);
        if pooled.conn.should_flush()
            || metrics.last_used() > PING_WHEN_IDLE_FOR
            || pooled.checked_at != suspicion
        {
            pooled.conn.ping().await.map_err(RecycleError::Backend)?;
            pooled.checked_at = suspicion;
        }
        Ok(())
    }
}

/// The pool. Cloning shares it.
#[derive(Clone)]
pub struct Connections {
    pool: managed::Pool<Manager>,
    suspicion: Arc<AtomicU64>,
}

impl Connections {
    /// At most `size` connections to `options`, opened as they are first needed.
    pub fn new(options: PgConnectOptions, size: usize) -> Result<Self, ConnectionsError> {
        let suspicion = Arc::new(AtomicU64::new(0));
        let manager = Manager {
            options,
            suspicion: suspicion.clone(),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| ConnectionsError::Build(e.to_string()))?;
        Ok(Self { pool, suspicion })
    }

    /// At most `size` connections to the database at `url`.
    pub fn to_url(url: &str, size: usize) -> Result<Self, ConnectionsError> {
        Self::new(url.parse()?, size)
    }

    /// Something failed that a dead connection could explain (a statement's error, a 5xx):
    /// every connection is pinged before its next use, and a dead one replaced. Costs one round
    /// trip per connection, once.
    pub fn suspect_all(&self) {
        self.suspicion.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection, back in the pool when dropped.
    pub async fn get(&self) -> Result<Conn, ConnectionsError> {
        match self.pool.get().await {
            Ok(object) => Ok(Conn(Some(object))),
            Err(managed::PoolError::Backend(e)) => Err(e.into()),
            Err(managed::PoolError::Timeout(_)) => Err(ConnectionsError::Timeout(WAIT)),
            Err(managed::PoolError::Closed) => Err(ConnectionsError::Closed),
            Err(e) => Err(ConnectionsError::Build(e.to_string())),
        }
    }

    /// Connections open now, and how many of them are idle.
    pub fn status(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.size, status.available)
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (open, idle) = self.status();
        f.debug_struct("Connections")
            .field("open", &open)
            .field("idle", &idle)
            .finish()
    }
}

/// A connection of the pool; derefs to sqlx's `PgConnection`.
pub struct Conn(Option<Object<Manager>>);

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Taken only in `drop`.
        &self.0.as_deref().expect("a connection until dropped").conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self
            .0
            .as_deref_mut()
            .expect("a connection until dropped")
            .conn
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut object) = self.0.take() else {
            return;
        };
        if !object.conn.should_flush() {
            // Clean: back to the pool at once (`Object`'s own drop).
            return;
        }
        // A dropped transaction's ROLLBACK (or a cancelled write) is waiting to be sent: send
        // it now, and return the connection once Postgres has answered. Outside a runtime the
        // connection goes back as it is and is pinged on its way out.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = object.conn.ping().await {
                    tracing::warn!(error = %e, "a returned connection failed; closing it");
                    // Out of the pool: dropping the connection closes its socket.
                    drop(Object::take(object));
                }
            });
        }
    }
}
