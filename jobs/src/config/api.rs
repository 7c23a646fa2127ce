//! Settings of `hive-api`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    domain_setting, http_base, metrics_addr_setting, settings, teardown_stuck_after, ConfigError,
    ConfigFile, Env, Plans,
};

settings! {
    /// Settings of `hive-api`.
    #[derive(Clone)]
    pub struct ApiConfig from env {
        // Every binary reads the configuration file, so a malformed one stops each at start.
        let file = api_config_file(env)?;

        /// Every secret that may have signed a webhook (`STRIPE_WEBHOOK_SECRET`, comma-separated:
        /// more than one while rotating).
        pub stripe_webhook_secrets: Vec<String> = webhook_secrets(env)?,
        /// How the app's bearer tokens are checked.
        pub tokens: TokenConfig = TokenConfig::from_env(env)?,
        /// Regions a node may live in: exactly those the workers are configured for (see
        /// [`RegionSettings`]).
        pub regions: Vec<String> = file.region_names(env)?,
        /// Region of a node whose checkout names none (`HIVE_DEFAULT_REGION`, else `AWS_REGION`
        /// when configured, else the first configured region).
        pub default_region: String = default_region(env, &regions)?,
        /// Connections the api's requests use (`HIVE_API_DB_CONNECTIONS`, default 4): about
        /// twice the database's cores, and the default database (`db.t4g.medium`) has two. More
        /// only queue inside Postgres: on the two-core bench, 8 took a tenth fewer reads per
        /// second than 4 at a higher p99, and 32 a third fewer webhooks than 8 (BENCHMARKS.md).
        pub db_connections: u32 = env.positive_or("HIVE_API_DB_CONNECTIONS", 4)?,
        /// `DATABASE_URL`.
        pub database_url: String = env.required("DATABASE_URL")?,
        /// Where `GET /metrics` is served (`HIVE_METRICS_ADDR`; unset: not served), never on the
        /// public listener.
        pub metrics_addr: Option<SocketAddr> = metrics_addr_setting(env)?,
        /// When the metrics count a teardown as stuck (see [`teardown_stuck_after`]).
        pub teardown_stuck_after: Duration = teardown_stuck_after(env)?,
        /// Where the api listens (`HIVE_API_ADDR`, default `127.0.0.1:8080`).
        pub listen_addr: SocketAddr =
            env.parsed_or("HIVE_API_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
        /// How old a webhook's signature may be (`STRIPE_WEBHOOK_TOLERANCE_SECS`, 300).
        pub stripe_tolerance: Duration = env.secs_or("STRIPE_WEBHOOK_TOLERANCE_SECS", 300)?,
        /// Requests per minute (`HIVE_RATE_LIMIT`, default 600; `off`: no limit): per user for
        /// valid tokens, per address for the rest, never for signed Stripe events
        /// (`rate_limit.rs`).
        pub rate_limit: Option<std::num::NonZeroU32> =
            limit_setting(env, "HIVE_RATE_LIMIT", 600, "minute")?,
        /// Nodes a user's own requests may create or delete an hour
        /// (`HIVE_NODE_CHANGES_PER_HOUR`, default 60; `off`: no limit): each launches or
        /// tears down real instances, and spends the rate budgets every tenant shares.
        pub node_changes_per_hour: Option<std::num::NonZeroU32> =
            limit_setting(env, "HIVE_NODE_CHANGES_PER_HOUR", 60, "hour")?,
        /// The header a trusted proxy in front of the api writes the client's address into
        /// (`HIVE_CLIENT_IP_HEADER`, e.g. `x-forwarded-for`: its last entry counts); unset, the
        /// connection's peer address is the client's.
        pub client_ip_header: Option<String> = env
            .optional("HIVE_CLIENT_IP_HEADER")
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty()),
        /// Origins whose pages may call the api from a browser (`HIVE_CORS_ORIGINS`,
        /// comma-separated `https://app.example.com`); none by default.
        pub cors_origins: Vec<String> = origins_setting(env, "HIVE_CORS_ORIGINS")?,
        /// Origins a checkout's and the portal's return URLs must be on
        /// (`HIVE_RETURN_URL_ORIGINS`, comma-separated; by default those of
        /// `HIVE_CORS_ORIGINS`): anything else is a 422.
        pub return_url_origins: Vec<String> = match env.optional("HIVE_RETURN_URL_ORIGINS") {
            Some(_) => origins_setting(env, "HIVE_RETURN_URL_ORIGINS")?,
            None => cors_origins.clone(),
        },
        /// Stripe's API, for the app's checkout and portal sessions (`STRIPE_SECRET_KEY`; unset:
        /// those two answer 503)...
        pub stripe_secret_key: Option<String> = env.optional("STRIPE_SECRET_KEY"),
        /// Whether our Stripe account's events are live (`HIVE_STRIPE_MODE`, `live` or `test`;
        /// else read off `STRIPE_SECRET_KEY`'s prefix; unknown when neither is set). An event
        /// of the other mode is refused: a test event signed with a shared secret must not
        /// provision real nodes.
        pub stripe_livemode: Option<bool> = stripe_mode(env, stripe_secret_key.as_deref())?,
        /// ...at `STRIPE_API_BASE` (default Stripe's own).
        pub stripe_api_base: String =
            http_base(env, "STRIPE_API_BASE", STRIPE_PRODUCTION_API)?,
        /// The plans (the file's `[plans.<name>]`, else `HIVE_PLANS`, else the defaults).
        pub plans: Plans = file.plans(env)?,
        /// How long a request holds its `Idempotency-Key` while it runs
        /// (`HIVE_IDEMPOTENCY_LEASE_SECS`, 120; longer than any request takes, Stripe's calls
        /// included): one that never finished (its client went away, the api crashed) frees
        /// the key after it.
        pub idempotency_lease: Duration = env.secs_or("HIVE_IDEMPOTENCY_LEASE_SECS", 120)?,
        /// How long a past-due subscription's nodes keep running before they are suspended
        /// (`HIVE_PAST_DUE_GRACE_SECS`, default 3 days).
        pub past_due_grace: Duration = env.secs_or("HIVE_PAST_DUE_GRACE_SECS", 3 * 24 * 3600)?,
        /// The domain nodes are named under (`HIVE_NODE_DOMAIN`).
        pub node_domain: String = domain_setting(env)?,
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are left out on purpose.
        f.debug_struct("ApiConfig")
            .field("listen_addr", &self.listen_addr)
            .field("db_connections", &self.db_connections)
            .field("plans", &self.plans)
            .field("default_region", &self.default_region)
            .field("node_domain", &self.node_domain)
            .finish_non_exhaustive()
    }
}

/// The bearer tokens the api accepts: HS256 signed with `HIVE_JWT_SECRET`, and/or RS256 or
/// ES256 signed by an identity provider's keys at `HIVE_JWKS_URL` (https; http only on
/// loopback). With a key set, `HIVE_JWT_ISSUER` and `HIVE_JWT_AUDIENCE` are required: a
/// provider shared by several apps signs tokens for all of them, and only `iss` and `aud` tell
/// ours apart. Without one they are checked when set.
#[derive(Clone)]
pub struct TokenConfig {
    pub hs256_secret: Option<String>,
    pub jwks_url: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// How long a fetched key set is trusted before it is fetched again
    /// (`HIVE_JWKS_REFRESH_SECS`, 3600; less when the provider's `Cache-Control: max-age`
    /// says so): a key the provider revoked stops being accepted within it.
    pub jwks_refresh: Duration,
}

impl TokenConfig {
    pub(super) fn from_env<F: Fn(&str) -> Option<String>>(
        env: &Env<F>,
    ) -> Result<Self, ConfigError> {
        let hs256_secret = env.optional("HIVE_JWT_SECRET");
        if hs256_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Malformed {
                name: "HIVE_JWT_SECRET",
                reason: "shorter than 16 bytes".into(),
            });
        }
        let jwks_url = env.optional("HIVE_JWKS_URL");
        if let Some(url) = &jwks_url {
            if !(url.starts_with("https://") || is_loopback_http(url)) {
                return Err(ConfigError::Malformed {
                    name: "HIVE_JWKS_URL",
                    reason: "not an https URL (http is taken only on loopback)".into(),
                });
            }
        }
        if hs256_secret.is_none() && jwks_url.is_none() {
            return Err(ConfigError::Missing("HIVE_JWT_SECRET (or HIVE_JWKS_URL)"));
        }
        let issuer = env.optional("HIVE_JWT_ISSUER");
        let audience = env.optional("HIVE_JWT_AUDIENCE");
        if jwks_url.is_some() {
            if issuer.is_none() {
                return Err(ConfigError::Missing(
                    "HIVE_JWT_ISSUER (needed with HIVE_JWKS_URL)",
                ));
            }
            if audience.is_none() {
                return Err(ConfigError::Missing(
                    "HIVE_JWT_AUDIENCE (needed with HIVE_JWKS_URL)",
                ));
            }
        }
        let jwks_refresh = env.secs_or("HIVE_JWKS_REFRESH_SECS", 3600)?;
        if jwks_refresh.is_zero() || jwks_refresh > Duration::from_secs(3600) {
            return Err(ConfigError::Malformed {
                name: "HIVE_JWKS_REFRESH_SECS",
                reason: "must be between 1 and 3600 (the key set is fetched at least hourly)"
                    .into(),
            });
        }
        Ok(Self {
            hs256_secret,
            jwks_url,
            issuer,
            audience,
            jwks_refresh,
        })
    }
}

/// `http://` to this machine (`127.0.0.1`, `[::1]`, `localhost`), where no one can listen in.
fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A number of requests per `period` (`off`: no limit).
fn limit_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
    default: u32,
    period: &str,
) -> Result<Option<std::num::NonZeroU32>, ConfigError> {
    match env.optional(name).as_deref().map(str::trim) {
        None => Ok(std::num::NonZeroU32::new(default)),
        Some("off") => Ok(None),
        Some(raw) => {
            raw.parse::<std::num::NonZeroU32>()
                .map(Some)
                .map_err(|_| ConfigError::Malformed {
                    name,
                    reason: format!("`{raw}` is not a number of requests per {period} (or `off`)"),
                })
        }
    }
}

/// `HIVE_STRIPE_MODE`, or the mode of the secret key (`sk_live_`/`rk_live_`, `sk_test_`/
/// `rk_test_`); the two must agree when both are set.
pub(super) fn stripe_mode<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    secret_key: Option<&str>,
) -> Result<Option<bool>, ConfigError> {
    let of_key = secret_key.and_then(|key| {
        if key.starts_with("sk_live_") || key.starts_with("rk_live_") {
            Some(true)
        } else if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
            Some(false)
        } else {
            None
        }
    });
    let set = match env.optional("HIVE_STRIPE_MODE").as_deref().map(str::trim) {
        None => None,
        Some("live") => Some(true),
        Some("test") => Some(false),
        Some(other) => {
            return Err(ConfigError::Malformed {
                name: "HIVE_STRIPE_MODE",
                reason: format!("`{other}` is not `live` or `test`"),
            })
        }
    };
    match (set, of_key) {
        (Some(set), Some(key)) if set != key => Err(ConfigError::Malformed {
            name: "HIVE_STRIPE_MODE",
            reason: "says another mode than STRIPE_SECRET_KEY's".into(),
        }),
        (set, key) => Ok(set.or(key)),
    }
}

/// A comma-separated list of origins (`scheme://host[:port]`).
fn origins_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
) -> Result<Vec<String>, ConfigError> {
    let origins: Vec<String> = env
        .optional(name)
        .map(|list| {
            list.split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for origin in &origins {
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if !rest.is_some_and(|host| !host.is_empty() && !host.contains('/')) {
            return Err(ConfigError::Malformed {
                name,
                reason: format!("`{origin}` is not an origin (scheme://host[:port])"),
            });
        }
    }
    Ok(origins)
}

pub const STRIPE_PRODUCTION_API: &str = "https://api.stripe.com/";

/// `HIVE_CONFIG_FILE`, refusing the retired `HIVE_REGIONS`.
fn api_config_file<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<ConfigFile, ConfigError> {
    if env.optional("HIVE_REGIONS").is_some() {
        return Err(ConfigError::Malformed {
            name: "HIVE_REGIONS",
            reason: "no longer read: name each region in a [regions.<name>] table of \
                     HIVE_CONFIG_FILE, so that the workers know how to launch there"
                .into(),
        });
    }
    ConfigFile::from_env(env)
}

fn webhook_secrets<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Vec<String>, ConfigError> {
    let secrets: Vec<String> = env
        .required("STRIPE_WEBHOOK_SECRET")?
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if secrets.is_empty() {
        return Err(ConfigError::Malformed {
            name: "STRIPE_WEBHOOK_SECRET",
            reason: "no secret in the list".into(),
        });
    }
    Ok(secrets)
}

fn default_region<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    regions: &[String],
) -> Result<String, ConfigError> {
    Ok(match env.optional("HIVE_DEFAULT_REGION") {
        Some(r) if regions.contains(&r) => r,
        Some(r) => {
            return Err(ConfigError::Malformed {
                name: "HIVE_DEFAULT_REGION",
                reason: format!("`{r}` is not one of the configured regions"),
            })
        }
        None => match env.optional("AWS_REGION") {
            Some(r) if regions.contains(&r) => r,
            _ => regions[0].clone(),
        },
    })
}
