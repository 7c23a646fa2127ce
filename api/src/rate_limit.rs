//! Rate limits: `HIVE_RATE_LIMIT` requests per minute per user and per client address. Over
//! the limit is a `429` with `Retry-After`. Buckets are GCRA cells (governor), so a burst of
//! the whole minute's allowance is let through and then one request per 1/limit minute.
//!
//! Who is limited by what:
//! - a caller with a valid token, per user (checked once the token is): an app whose backend
//!   calls us for all its users from one address is not capped at one user's allowance;
//! - a caller whose token is not valid, per address, before it is told 401;
//! - Stripe's webhook is never limited when correctly signed (a month's renewals at once, or a
//!   redelivery after an outage, come from Stripe's few addresses, and a 429 would delay a
//!   paying customer's node by Stripe's next try, up to an hour); one badly signed is limited
//!   per address once the signature fails, before any database work;
//! - everything else (`/healthz` excepted), per address.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
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

    /// One request from the client's address: `Err` with the wait when over the limit.
    pub fn check_address(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<(), ApiError> {
        let Some(address) = self.client_address(headers, peer) else {
            return Ok(());
        };
        self.by_address.check_key(&address).map_err(|not_until| {
            tracing::info!(%address, "rate limited");
            too_many(not_until.wait_time_from(DefaultClock::default().now()))
        })
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

/// The per-address limit, for the requests it applies to at once (see above): not the health
/// check, not the webhook (limited once its signature fails), not a call to the app's API with
/// a bearer token (limited per user, or per address once the token fails).
pub async fn by_address(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(limits) = &state.limits else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    let bearer = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "));
    // A token is checked (and its caller limited) only by a route of the app's API: a path no
    // route takes is limited by address, token or not.
    let routed = request.extensions().get::<MatchedPath>().is_some();
    let checked_by_token = bearer && routed && path.starts_with("/api/");
    if path == "/healthz" || path == "/webhooks/stripe" || checked_by_token {
        return next.run(request).await;
    }
    if let Err(e) = limits.check_address(request.headers(), peer_of(request.extensions())) {
        return e.into_response();
    }
    next.run(request).await
}

/// The connection's peer address, when the server recorded it.
pub fn peer_of(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
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
