//! Rate limits: `HIVE_RATE_LIMIT` requests per minute per client address (every route but
//! `/healthz`, the webhook included) and per user (the app's API, checked once the token is).
//! Over the limit is a `429` with `Retry-After`. Buckets are GCRA cells (governor), so a burst
//! of the whole minute's allowance is let through and then one request per 1/limit minute.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;
use crate::AppState;

pub struct RateLimits {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_user: DefaultKeyedRateLimiter<String>,
    /// The header a trusted proxy writes the client's address into.
    client_ip_header: Option<String>,
}

impl RateLimits {
    /// `None` when limits are off.
    pub fn new(
        per_minute: Option<NonZeroU32>,
        client_ip_header: Option<String>,
    ) -> Option<Arc<Self>> {
        let quota = Quota::per_minute(per_minute?);
        Some(Arc::new(Self {
            by_address: RateLimiter::keyed(quota),
            by_user: RateLimiter::keyed(quota),
            client_ip_header,
        }))
    }

    /// Forgets the buckets that are full again, so that memory follows the active clients.
    pub async fn sweep(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            self.by_address.retain_recent();
            self.by_user.retain_recent();
        }
    }

    /// One request of `user`: `Err` with the wait when over the limit.
    pub fn check_user(&self, user: &str) -> Result<(), ApiError> {
        self.by_user
            .check_key(&user.to_string())
            .map_err(|not_until| too_many(not_until.wait_time_from(DefaultClock::default().now())))
    }

    fn client_address(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
        if let Some(name) = &self.client_ip_header {
            // The proxy appends the address it saw: the last entry is the one it vouches for.
            let from_proxy = headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(|a| a.trim().parse().ok());
            if from_proxy.is_some() {
                return from_proxy;
            }
        }
        peer.map(|p| p.ip())
    }
}

fn too_many(wait: Duration) -> ApiError {
    // Whole seconds, rounded up: a client that waits this long is let through.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::TooManyRequests(secs.max(1))
}

/// The per-address limit, for every request but the health check.
pub async fn by_address(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(limits) = &state.limits else {
        return next.run(request).await;
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Some(address) = limits.client_address(request.headers(), peer) {
        if let Err(not_until) = limits.by_address.check_key(&address) {
            tracing::info!(%address, "rate limited");
            return too_many(not_until.wait_time_from(DefaultClock::default().now()))
                .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_last_entry_is_the_client() {
        let limits = RateLimits::new(NonZeroU32::new(2), Some("x-forwarded-for".into())).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        let peer = Some(SocketAddr::from(([10, 0, 0, 1], 9)));
        assert_eq!(
            limits.client_address(&headers, peer),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(
            limits.client_address(&HeaderMap::new(), peer),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn a_user_over_the_limit_waits_and_another_does_not() {
        let limits = RateLimits::new(NonZeroU32::new(2), None).unwrap();
        assert!(limits.check_user("a").is_ok());
        assert!(limits.check_user("a").is_ok());
        match limits.check_user("a") {
            Err(ApiError::TooManyRequests(secs)) => assert!((1..=30).contains(&secs)),
            other => panic!("{other:?}"),
        }
        assert!(limits.check_user("b").is_ok());
    }
}
