//! The app's calls carry a short-lived JWT whose `sub` is the user id: HS256 signed with
//! `HIVE_JWT_SECRET`, or RS256/ES256 signed by an identity provider whose public keys are
//! published at `HIVE_JWKS_URL`. Those keys are cached and fetched again when a token names a
//! key id (`kid`) the cache does not hold (the provider rotated), at most once per
//! [`REFETCH_AT_MOST_EVERY`], so that made-up ids cannot make us hammer the provider.
//! The set is also fetched again once it is older than its lifetime (`HIVE_JWKS_REFRESH_SECS`,
//! at most an hour, or the provider's shorter `Cache-Control: max-age`), so that a key the
//! provider revoked stops being accepted. `exp` and `nbf` are checked with a few seconds'
//! leeway; `HIVE_JWT_ISSUER` and `HIVE_JWT_AUDIENCE` must be the token's `iss` and `aud`
//! (required with a key set).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use hive_jobs::config::TokenConfig;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::error::ApiError;
use crate::AppState;

/// The least time between two fetches of the key set.
pub const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// The clock skew forgiven on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// The user a request is made for.
#[derive(Debug, Clone)]
pub struct AuthUser(pub String);

/// What checks the app's tokens: the settings, the HS256 key and the provider's cached keys.
pub struct Tokens {
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    issuer: Option<String>,
    audience: Option<String>,
}

struct Jwks {
    url: String,
    http: reqwest::Client,
    /// The keys held, read by every token without waiting for a fetch under way.
    keys: RwLock<KeySet>,
    /// When the set was last fetched (tried); held while fetching, so that one fetch serves
    /// all.
    fetched: Mutex<Option<Instant>>,
    /// The longest a set is trusted (`HIVE_JWKS_REFRESH_SECS`).
    refresh: Duration,
}

/// The provider's keys by id, and until when they are trusted.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, DecodingKey>,
    /// `None` until the first fetch.
    fresh_until: Option<Instant>,
}

impl KeySet {
    fn stale(&self) -> bool {
        self.fresh_until.is_none_or(|until| Instant::now() >= until)
    }
}

/// Why a token was not taken. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid or expired token")]
    Invalid,
    #[error("the identity provider's keys could not be fetched")]
    KeysUnavailable,
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Invalid => ApiError::Unauthorized("invalid or expired token"),
            TokenError::KeysUnavailable => {
                ApiError::Unavailable("the identity provider's keys could not be fetched")
            }
        }
    }
}

impl Tokens {
    pub fn new(config: &TokenConfig) -> Result<Self, reqwest::Error> {
        let jwks = match &config.jwks_url {
            None => None,
            Some(url) => Some(Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()?,
                keys: RwLock::new(KeySet::default()),
                fetched: Mutex::new(None),
                refresh: config.jwks_refresh,
            }),
        };
        Ok(Self {
            hs256: config
                .hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// The user the token is for.
    pub async fn user_of(&self, token: &str) -> Result<String, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Invalid)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.clone().ok_or(TokenError::Invalid)?,
            Algorithm::RS256 | Algorithm::ES256 => {
                let jwks = self.jwks.as_ref().ok_or(TokenError::Invalid)?;
                let kid = header.kid.as_deref().ok_or(TokenError::Invalid)?;
                jwks.key(kid).await?
            }
            _ => return Err(TokenError::Invalid),
        };
        // The key's kind must fit the algorithm the token names (jsonwebtoken refuses a
        // mismatch), so an RSA public key cannot be used as an HMAC secret.
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = decode::<Claims>(token, &key, &validation).map_err(|_| TokenError::Invalid)?;
        if data.claims.sub.is_empty() {
            return Err(TokenError::Invalid);
        }
        Ok(data.claims.sub)
    }

    /// Fetches the provider's keys now (at start, so the first call does not wait).
    pub async fn warm(&self) {
        if let Some(jwks) = &self.jwks {
            if let Err(e) = jwks.refetch().await {
                tracing::warn!(error = %e, "fetching the identity provider's keys failed");
            }
        }
    }
}

impl Jwks {
    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if self.keys.read().await.stale() {
            // Past its lifetime: fetch it again before trusting it. If the provider cannot be
            // reached, the keys held stay in use (and the next token tries again).
            if let Err(e) = self.refetch().await {
                tracing::warn!(error = %e, "refreshing the identity provider's keys failed");
            }
        }
        if let Some(key) = self.keys.read().await.keys.get(kid) {
            return Ok(key.clone());
        }
        // An unknown id: the provider may have rotated. Fetch again, unless that was just done.
        match self.refetch().await {
            Ok(()) | Err(FetchError::TooSoon) => {}
            Err(e) => {
                tracing::warn!(error = %e, "fetching the identity provider's keys failed");
                return Err(TokenError::KeysUnavailable);
            }
        }
        self.keys
            .read()
            .await
            .keys
            .get(kid)
            .cloned()
            .ok_or(TokenError::Invalid)
    }

    async fn refetch(&self) -> Result<(), FetchError> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < REFETCH_AT_MOST_EVERY) {
            return Err(FetchError::TooSoon);
        }
        let now = Instant::now();
        *fetched = Some(now);
        let response = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(FetchError::Http)?;
        let lifetime =
            max_age(response.headers()).map_or(self.refresh, |max_age| max_age.min(self.refresh));
        let set: JwkSet = response.json().await.map_err(FetchError::Http)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Only public keys of the kinds we verify; a symmetric key in the set is ignored.
            let public = matches!(
                jwk.algorithm,
                AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
            );
            let (Some(kid), true) = (&jwk.common.key_id, public) else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(kid.clone(), key);
                }
                Err(e) => tracing::warn!(kid, error = %e, "a key of the set is unusable"),
            }
        }
        tracing::info!(
            keys = keys.len(),
            ?lifetime,
            "identity provider's keys fetched"
        );
        *self.keys.write().await = KeySet {
            keys,
            fresh_until: Some(now + lifetime),
        };
        Ok(())
    }
}

/// `Cache-Control: max-age=N`, if the response says so.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').find_map(|directive| {
        let seconds = directive.trim().strip_prefix("max-age=")?;
        seconds.trim().parse().ok().map(Duration::from_secs)
    })
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("fetched moments ago")]
    TooSoon,
    #[error("{0}")]
    Http(reqwest::Error),
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Checked once per request, though the idempotency layer asks before the handler.
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(user.clone());
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let user = match state.tokens.user_of(token).await {
            Ok(user) => user,
            Err(e) => {
                // Not a valid token: limited by address, as a caller without one is.
                if let Some(limits) = &state.limits {
                    let peer = crate::rate_limit::peer_of(&parts.extensions);
                    limits.check_address(&parts.headers, peer)?;
                }
                return Err(e.into());
            }
        };
        if let Some(limits) = &state.limits {
            limits.check_user(&user)?;
        }
        tracing::Span::current().record("user", user.as_str());
        let user = AuthUser(user);
        parts.extensions.insert(user.clone());
        Ok(user)
    }
}
