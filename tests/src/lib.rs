//! The local stack (a private Postgres cluster, moto, the Cloudflare stand-in, hive-api and
//! hive-worker) as a library, shared by the end-to-end tests and the `hive-stack` command.

pub mod aws_fixture;
pub mod aws_iam;
pub mod aws_proxy;
pub mod aws_strict;
pub mod bench;
pub mod cloudflare_standin;
pub mod process;
pub mod seed;
pub mod stack;
pub mod stripe_events;
pub mod stripe_standin;

/// Serves `app` on `addr` (port 0 picks one); returns the bound address and the server task,
/// which the owner aborts to stop it.
pub async fn serve_router(
    app: axum::Router,
    addr: std::net::SocketAddr,
    what: &'static str,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
    Ok((bound, handle))
}

/// The api answered `expected` with its JSON error shape: `{"error": {"message": "..."}}`.
pub fn assert_json_error(status: u16, body: &serde_json::Value, expected: u16, what: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: error body is not JSON with a message: {body}"
    );
    assert!(
        body["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
        "{what}: error body has no stable code: {body}"
    );
}
