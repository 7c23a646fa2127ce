//! The Cloudflare API stand-in as a process of its own.
//! `STANDIN_ADDR` (default 127.0.0.1:0), `CLOUDFLARE_API_TOKEN`, `STANDIN_CONNECT_DELAY_MS`.

use std::time::Duration;

use anyhow::Context;
use hive_tests::cloudflare_standin::StandIn;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("STANDIN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:0".into())
        .parse()
        .context("STANDIN_ADDR is not a socket address")?;
    let token = std::env::var("CLOUDFLARE_API_TOKEN").context("CLOUDFLARE_API_TOKEN is not set")?;
    let delay: u64 = std::env::var("STANDIN_CONNECT_DELAY_MS")
        .unwrap_or_else(|_| "2000".into())
        .parse()
        .context("STANDIN_CONNECT_DELAY_MS is not a number")?;
    let (bound, task) = StandIn::new(&token, Duration::from_millis(delay))
        .serve(addr)
        .await?;
    println!("cloudflare-standin listening on {bound}");
    task.await?;
    Ok(())
}
