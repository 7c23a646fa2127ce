use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use hive_api::{router, AppState, SharedState};
use hive_jobs::config::{process_env, ApiConfig};

// mimalloc: glibc's malloc and free were an eighth of the api's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The listener's connection and one for the rest of sqlx's pool's few users.
const SQLX_POOL_SIZE: u32 = 2;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("hive-api: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    hive_jobs::telemetry::init();
    let config = match ApiConfig::from_env(&process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hive-api: {e}");
            std::process::exit(2);
        }
    };
    // Postgres may still be starting: retry the first connection for a while.
    // sqlx's pool, for migrations, `LISTEN`, the health check and the metrics' gauges: the
    // requests' statements go through `db` below.
    let pool = (|| hive_jobs::store::connect_and_migrate(&config.database_url, SQLX_POOL_SIZE))
        .retry(
            ExponentialBuilder::default()
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(10),
        )
        .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "database not ready"))
        .await
        .context("connecting to the database")?;
    // Events held for want of configuration are applied now that this configuration runs (no
    // redelivery needed); those it still cannot apply stay held, with why.
    match hive_jobs::stripe_events::apply_held(&pool, &config).await {
        Ok(held) if held.applied.is_empty() && held.still_held == 0 => {}
        Ok(held) => tracing::info!(
            applied = held.applied.len(),
            still_held = held.still_held,
            "held stripe events applied"
        ),
        Err(e) => tracing::warn!(error = %e, "applying the held stripe events failed"),
    }
    // The requests' connections (`HIVE_API_DB_CONNECTIONS`), opened as first needed: sqlx's
    // pool would ping each after every use (hive_jobs::connections).
    let db = hive_jobs::connections::Connections::to_url(
        &config.database_url,
        config.db_connections as usize,
    )
    .context("making the connection pool from DATABASE_URL")?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding {}", config.listen_addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // The first line on stdout says where we listen (tests and scripts read it).
    println!("hive-api listening on {addr}");
    if let Some(addr) = config.metrics_addr {
        let handle = hive_jobs::metrics::install().context("installing the metrics recorder")?;
        let bound = hive_jobs::metrics::serve(
            addr,
            handle,
            hive_jobs::store::gauges_at_scrape(pool.clone(), config.teardown_stuck_after),
        )
        .await
        .context("serving metrics")?;
        // The second line on stdout, after where the api listens.
        // Whoever started us may have stopped reading stdout after the first line.
        if let Err(e) = writeln!(std::io::stdout(), "hive-api metrics on {bound}") {
            tracing::debug!(error = %e, "stdout is closed");
        }
        tracing::info!(addr = %bound, "metrics at GET /metrics");
    }
    tracing::info!(%addr, "hive-api started");
    let stripe = hive_api::checkout::client(&config)
        .context("building the Stripe client")?
        .map(Arc::new);
    let changes = hive_api::wait::NodeChanges::default();
    tokio::spawn(changes.clone().listen(pool.clone(), db.clone()));
    let tokens = Arc::new(
        hive_api::auth::Tokens::new(&config.tokens).context("building the token checker")?,
    );
    tokio::spawn({
        let tokens = tokens.clone();
        async move { tokens.warm().await }
    });
    let limits =
        hive_api::rate_limit::RateLimits::new(config.rate_limit, config.client_ip_header.clone());
    if let Some(limits) = &limits {
        tokio::spawn(limits.clone().sweep());
    }
    let state = AppState::new(SharedState {
        pool,
        db,
        config: Arc::new(config),
        stripe,
        changes,
        tokens,
        limits,
    });
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(hive_jobs::telemetry::shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("hive-api stopped");
    Ok(())
}
