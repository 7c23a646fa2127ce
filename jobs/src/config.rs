//! All configuration, read from the environment in one place.
//!
//! A missing or malformed setting is a [`ConfigError`] that names the variable, so that a binary
//! can stop at start with one clear line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0} is not set")]
    Missing(&'static str),
    #[error("configuration: {name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
}

/// Reads settings through a lookup function, so tests can feed a map instead of the process
/// environment.
pub struct Env<F: Fn(&str) -> Option<String>>(pub F);

pub fn process_env() -> Env<impl Fn(&str) -> Option<String>> {
    Env(|name: &str| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        (self.0)(name).ok_or(ConfigError::Missing(name))
    }

    pub fn optional(&self, name: &'static str) -> Option<String> {
        (self.0)(name)
    }

    pub fn parsed_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match (self.0)(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::Malformed {
                    name,
                    reason: e.to_string(),
                }),
        }
    }

    /// A duration in milliseconds.
    pub fn millis_or(&self, name: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.parsed_or(name, default_ms).map(Duration::from_millis)
    }

    /// A duration in seconds.
    pub fn secs_or(&self, name: &'static str, default_s: u64) -> Result<Duration, ConfigError> {
        self.parsed_or(name, default_s).map(Duration::from_secs)
    }
}

/// How long a teardown step may go on retrying before the operator is shown it as stuck
/// (`HIVE_TEARDOWN_STUCK_SECS`, 900): `hivectl queue`, `hivectl doctor` and the
/// `hive_teardowns_stuck` gauge. A teardown never gives up by itself.
pub fn teardown_stuck_after<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Duration, ConfigError> {
    env.secs_or("HIVE_TEARDOWN_STUCK_SECS", 900)
}

/// What a plan gives: how many nodes, of which instance type and root volume size, and the
/// Stripe prices that buy it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub instance_type: String,
    pub nodes: u32,
    pub volume_gb: i32,
    /// Stripe price ids that buy this plan (besides a price whose `lookup_key` or
    /// `metadata.plan` is the plan's name).
    pub prices: Vec<String>,
    /// Instance types to launch instead when no zone of the region has capacity for
    /// `instance_type`, tried in order.
    pub fallback_types: Vec<String>,
}

/// Plans by name: from the `[plans.*]` tables of `HIVE_CONFIG_FILE`, else the shorthand
/// `HIVE_PLANS` (`name=instance_type:count[:volume_gb],...`), else the built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plans(pub BTreeMap<String, Plan>);

pub const DEFAULT_PLANS: &str = "pro=t4g.small:1:10,team=t4g.medium:5:50";

/// A plan's root volume when the shorthand does not say.
const DEFAULT_VOLUME_GB: i32 = 10;

impl Plans {
    /// The types to launch in place of `instance_type` when no zone has capacity for it: the
    /// `fallback_types` of the plan that launches it.
    pub fn fallbacks_for(&self, instance_type: &str) -> &[String] {
        self.0
            .values()
            .find(|p| p.instance_type == instance_type && !p.fallback_types.is_empty())
            .map(|p| p.fallback_types.as_slice())
            .unwrap_or_default()
    }

    /// The plan a Stripe price buys: the one named by its `lookup_key` or `metadata.plan`, or
    /// whose `prices` hold its id.
    pub fn for_price(
        &self,
        price_id: &str,
        lookup_key: Option<&str>,
        metadata_plan: Option<&str>,
    ) -> Option<(&str, &Plan)> {
        [lookup_key, metadata_plan]
            .into_iter()
            .flatten()
            .find_map(|name| self.0.get_key_value(name))
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(_, plan)| plan.prices.iter().any(|p| p == price_id))
            })
            .map(|(name, plan)| (name.as_str(), plan))
    }
}

/// What is wrong with a plan, as `key: problem`.
fn check_plan(name: &str, plan: &Plan) -> Result<(), String> {
    if !crate::requests::valid_instance_type(&plan.instance_type) {
        return Err(format!(
            "plans.{name}.instance_type: `{}` is not a t4g instance type",
            plan.instance_type
        ));
    }
    if plan.nodes == 0 || plan.nodes > 100 {
        return Err(format!("plans.{name}.nodes: must be 1 to 100"));
    }
    if !(1..=16_384).contains(&plan.volume_gb) {
        return Err(format!("plans.{name}.volume_gb: must be 1 to 16384"));
    }
    if let Some(bad) = plan
        .fallback_types
        .iter()
        .find(|t| !crate::requests::valid_instance_type(t))
    {
        return Err(format!(
            "plans.{name}.fallback_types: `{bad}` is not a t4g instance type"
        ));
    }
    Ok(())
}

impl FromStr for Plans {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut plans = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let shape = || format!("`{entry}` is not name=instance_type:count[:volume_gb]");
            let (name, rest) = entry.split_once('=').ok_or_else(shape)?;
            let mut parts = rest.split(':');
            let (Some(instance_type), Some(count)) = (parts.next(), parts.next()) else {
                return Err(shape());
            };
            let nodes: u32 = count
                .parse()
                .map_err(|_| format!("plan {name}: node count `{count}` is not a number"))?;
            let volume_gb = match parts.next() {
                None => DEFAULT_VOLUME_GB,
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("plan {name}: volume `{v}` is not a number of GiB"))?,
            };
            let plan = Plan {
                instance_type: instance_type.to_string(),
                nodes,
                volume_gb,
                prices: Vec::new(),
                fallback_types: Vec::new(),
            };
            check_plan(name, &plan).map_err(|e| format!("plan {e}"))?;
            plans.insert(name.to_string(), plan);
        }
        if plans.is_empty() {
            return Err("no plan defined".into());
        }
        Ok(Plans(plans))
    }
}

/// The `[plans.*]` tables of a configuration file; `None` when it has none.
fn plans_from_toml(table: &toml::Table) -> Result<Option<Plans>, String> {
    let Some(plans) = table.get("plans") else {
        return Ok(None);
    };
    let plans = plans
        .as_table()
        .ok_or("plans: must be a table of [plans.<name>] tables")?;
    let mut out = BTreeMap::new();
    for (name, value) in plans {
        let t = value
            .as_table()
            .ok_or_else(|| format!("plans.{name}: must be a table"))?;
        for key in t.keys() {
            if ![
                "instance_type",
                "nodes",
                "volume_gb",
                "prices",
                "fallback_types",
            ]
            .contains(&key.as_str())
            {
                return Err(format!("plans.{name}.{key}: unknown key"));
            }
        }
        let instance_type = t
            .get("instance_type")
            .ok_or_else(|| format!("plans.{name}.instance_type: missing"))?
            .as_str()
            .ok_or_else(|| format!("plans.{name}.instance_type: must be a string"))?;
        let int = |key: &str| -> Result<Option<i64>, String> {
            t.get(key)
                .map(|v| {
                    v.as_integer()
                        .ok_or_else(|| format!("plans.{name}.{key}: must be an integer"))
                })
                .transpose()
        };
        let nodes = int("nodes")?.ok_or_else(|| format!("plans.{name}.nodes: missing"))?;
        let volume_gb = int("volume_gb")?.unwrap_or(DEFAULT_VOLUME_GB as i64);
        let strings = |key: &str, what: &str| -> Result<Vec<String>, String> {
            match t.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|p| p.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| format!("plans.{name}.{key}: must be a list of {what}")),
            }
        };
        let plan = Plan {
            instance_type: instance_type.to_string(),
            nodes: u32::try_from(nodes).unwrap_or(0),
            volume_gb: i32::try_from(volume_gb).unwrap_or(0),
            prices: strings("prices", "price ids")?,
            fallback_types: strings("fallback_types", "instance types")?,
        };
        check_plan(name, &plan)?;
        out.insert(name.clone(), plan);
    }
    if out.is_empty() {
        return Err("plans: no plan defined".into());
    }
    Ok(Some(Plans(out)))
}

/// Where a region's nodes boot from: an AMI id, or an SSM parameter that names the current
/// one (`/aws/service/debian/release/12/latest/arm64`), which EC2 resolves at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Ami(String),
    Parameter(String),
}

impl Image {
    /// The `ImageId` of a launch: the AMI, or `resolve:ssm:<parameter>`.
    pub fn launch_image_id(&self) -> String {
        match self {
            Image::Ami(id) => id.clone(),
            Image::Parameter(name) => format!("resolve:ssm:{name}"),
        }
    }
}

/// Everything a worker needs to launch nodes in one region: the `[regions.<name>]` tables of
/// `HIVE_CONFIG_FILE`, else the one-region shorthand (`AWS_REGION`, `HIVE_AMI_ID`,
/// `HIVE_SUBNET_ID`, `HIVE_SECURITY_GROUP_ID`, `HIVE_INSTANCE_PROFILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSettings {
    pub name: String,
    pub image: Image,
    /// One per availability zone, tried in order when a zone has no capacity.
    pub subnets: Vec<String>,
    pub security_group: String,
    pub instance_profile: String,
}

/// A `[regions.<name>]` table as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionTable {
    ami: Option<String>,
    ami_parameter: Option<String>,
    subnets: Vec<String>,
    security_group: String,
    instance_profile: String,
}

fn check_region(name: &str, t: RegionTable) -> Result<RegionSettings, String> {
    if !valid_region(name) {
        return Err(format!("regions.{name}: `{name}` is not a region name"));
    }
    let image = match (t.ami, t.ami_parameter) {
        (Some(ami), None) if ami.starts_with("ami-") => Image::Ami(ami),
        (Some(ami), None) => {
            return Err(format!(
                "regions.{name}.ami: `{ami}` does not start with `ami-`"
            ))
        }
        (None, Some(p)) if p.starts_with('/') => Image::Parameter(p),
        (None, Some(p)) => {
            return Err(format!(
                "regions.{name}.ami_parameter: `{p}` is not a parameter path (starting with `/`)"
            ))
        }
        _ => {
            return Err(format!(
                "regions.{name}: set exactly one of ami, ami_parameter"
            ))
        }
    };
    if t.subnets.is_empty() {
        return Err(format!("regions.{name}.subnets: name at least one subnet"));
    }
    if let Some(bad) = t.subnets.iter().find(|s| !s.starts_with("subnet-")) {
        return Err(format!(
            "regions.{name}.subnets: `{bad}` does not start with `subnet-`"
        ));
    }
    if !t.security_group.starts_with("sg-") {
        return Err(format!(
            "regions.{name}.security_group: `{}` does not start with `sg-`",
            t.security_group
        ));
    }
    if t.instance_profile.trim().is_empty() {
        return Err(format!("regions.{name}.instance_profile: empty"));
    }
    Ok(RegionSettings {
        name: name.to_string(),
        image,
        subnets: t.subnets,
        security_group: t.security_group,
        instance_profile: t.instance_profile,
    })
}

/// The `[regions.*]` tables of a configuration file; `None` when it has none.
fn regions_from_toml(table: &toml::Table) -> Result<Option<Vec<RegionSettings>>, String> {
    let Some(regions) = table.get("regions") else {
        return Ok(None);
    };
    let regions = regions
        .as_table()
        .ok_or("regions: must be a table of [regions.<name>] tables")?;
    let mut out = Vec::new();
    for (name, value) in regions {
        let parsed: RegionTable = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("regions.{name}: {}", e.message().trim()))?;
        out.push(check_region(name, parsed)?);
    }
    if out.is_empty() {
        return Err("regions: no region defined".into());
    }
    Ok(Some(out))
}

/// The configuration file named by `HIVE_CONFIG_FILE`, read by every binary.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub plans: Option<Plans>,
    pub regions: Option<Vec<RegionSettings>>,
}

impl ConfigFile {
    /// Reads and checks `HIVE_CONFIG_FILE`, if set. A file that cannot be read or is malformed
    /// is one error naming the file, the key and what is wrong.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let Some(path) = env.optional("HIVE_CONFIG_FILE") else {
            return Ok(ConfigFile::default());
        };
        let malformed = |reason: String| ConfigError::Malformed {
            name: "HIVE_CONFIG_FILE",
            reason: format!("{path}: {reason}"),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| malformed(e.to_string()))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(1);
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            malformed(format!("line {line}: {}", message.join("; ")))
        })?;
        Ok(ConfigFile {
            plans: plans_from_toml(&table).map_err(&malformed)?,
            regions: regions_from_toml(&table).map_err(&malformed)?,
        })
    }

    /// The regions nodes may live in, by name: the file's, else the one-region shorthand.
    pub fn region_names<F: Fn(&str) -> Option<String>>(
        &self,
        env: &Env<F>,
    ) -> Result<Vec<String>, ConfigError> {
        match &self.regions {
            Some(regions) => Ok(regions.iter().map(|r| r.name.clone()).collect()),
            None => Ok(vec![aws_region(env)?]),
        }
    }

    /// The regions with their launch settings: the file's, else the one-region shorthand.
    pub fn region_settings<F: Fn(&str) -> Option<String>>(
        &self,
        env: &Env<F>,
    ) -> Result<Vec<RegionSettings>, ConfigError> {
        if let Some(regions) = &self.regions {
            return Ok(regions.clone());
        }
        Ok(vec![RegionSettings {
            name: aws_region(env)?,
            image: Image::Ami(prefixed(env, "HIVE_AMI_ID", "ami-")?),
            subnets: env
                .required("HIVE_SUBNET_ID")?
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.starts_with("subnet-") {
                        Ok(s)
                    } else {
                        Err(ConfigError::Malformed {
                            name: "HIVE_SUBNET_ID",
                            reason: format!("`{s}` does not start with `subnet-`"),
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|subnets| {
                    if subnets.is_empty() {
                        Err(ConfigError::Missing("HIVE_SUBNET_ID"))
                    } else {
                        Ok(subnets)
                    }
                })?,
            security_group: prefixed(env, "HIVE_SECURITY_GROUP_ID", "sg-")?,
            instance_profile: env.required("HIVE_INSTANCE_PROFILE")?,
        }])
    }

    /// The plans: the file's, else `HIVE_PLANS`, else the defaults.
    pub fn plans<F: Fn(&str) -> Option<String>>(&self, env: &Env<F>) -> Result<Plans, ConfigError> {
        match &self.plans {
            Some(plans) => Ok(plans.clone()),
            None => env.parsed_or("HIVE_PLANS", default_plans()),
        }
    }
}

fn default_plans() -> Plans {
    let mut plans = BTreeMap::new();
    for (name, instance_type, nodes, volume_gb) in
        [("pro", "t4g.small", 1, 10), ("team", "t4g.medium", 5, 50)]
    {
        plans.insert(
            name.to_string(),
            Plan {
                instance_type: instance_type.into(),
                nodes,
                volume_gb,
                prices: Vec::new(),
                fallback_types: Vec::new(),
            },
        );
    }
    Plans(plans)
}

/// An AWS region name as the SDK expects it (`eu-west-1`).
pub fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Settings of `hive-api`.
#[derive(Clone)]
pub struct ApiConfig {
    pub database_url: String,
    /// Connections the api's requests use (`HIVE_API_DB_CONNECTIONS`, default 4): about
    /// twice the database's cores, and the default database (`db.t4g.medium`) has two. More
    /// only queue inside Postgres: on the two-core bench, 8 took a tenth fewer reads per
    /// second than 4 at a higher p99, and 32 a third fewer webhooks than 8 (BENCHMARKS.md).
    pub db_connections: u32,
    /// Where `GET /metrics` is served (`HIVE_METRICS_ADDR`; unset: not served), never on the
    /// public listener.
    pub metrics_addr: Option<SocketAddr>,
    /// When the metrics count a teardown as stuck (see [`teardown_stuck_after`]).
    pub teardown_stuck_after: Duration,
    pub listen_addr: SocketAddr,
    /// Every secret that may have signed a webhook (more than one while rotating).
    pub stripe_webhook_secrets: Vec<String>,
    pub stripe_tolerance: Duration,
    /// How the app's bearer tokens are checked.
    pub tokens: TokenConfig,
    /// Requests per minute per user and per client address (`HIVE_RATE_LIMIT`, default 600;
    /// `off`: no limit). The webhook is limited per address only.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// The header a trusted proxy in front of the api writes the client's address into
    /// (`HIVE_CLIENT_IP_HEADER`, e.g. `x-forwarded-for`: its last entry counts); unset, the
    /// connection's peer address is the client's.
    pub client_ip_header: Option<String>,
    /// Origins whose pages may call the api from a browser (`HIVE_CORS_ORIGINS`, comma-separated
    /// `https://app.example.com`); none by default.
    pub cors_origins: Vec<String>,
    /// Stripe's API, for the app's checkout and portal sessions (`STRIPE_SECRET_KEY`; unset:
    /// those two answer 503), at `STRIPE_API_BASE` (default Stripe's own).
    pub stripe_secret_key: Option<String>,
    pub stripe_api_base: String,
    pub plans: Plans,
    /// How long a past-due subscription's nodes keep running before they are suspended
    /// (`HIVE_PAST_DUE_GRACE_SECS`, default 3 days).
    pub past_due_grace: Duration,
    /// Region of a node whose checkout names none (`HIVE_DEFAULT_REGION`, else `AWS_REGION`
    /// when configured, else the first configured region).
    pub default_region: String,
    /// Regions a node may live in: exactly those configured (see [`RegionSettings`]).
    pub regions: Vec<String>,
    pub node_domain: String,
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
/// ES256 signed by an identity provider's keys at `HIVE_JWKS_URL`; `HIVE_JWT_ISSUER` and
/// `HIVE_JWT_AUDIENCE`, when set, must match the token's `iss` and `aud`.
#[derive(Clone)]
pub struct TokenConfig {
    pub hs256_secret: Option<String>,
    pub jwks_url: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl TokenConfig {
    fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let hs256_secret = env.optional("HIVE_JWT_SECRET");
        if hs256_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Malformed {
                name: "HIVE_JWT_SECRET",
                reason: "shorter than 16 bytes".into(),
            });
        }
        let jwks_url = env.optional("HIVE_JWKS_URL");
        if let Some(url) = &jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::Malformed {
                    name: "HIVE_JWKS_URL",
                    reason: "not an http(s) URL".into(),
                });
            }
        }
        if hs256_secret.is_none() && jwks_url.is_none() {
            return Err(ConfigError::Missing("HIVE_JWT_SECRET (or HIVE_JWKS_URL)"));
        }
        Ok(Self {
            hs256_secret,
            jwks_url,
            issuer: env.optional("HIVE_JWT_ISSUER"),
            audience: env.optional("HIVE_JWT_AUDIENCE"),
        })
    }
}

fn rate_limit_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Option<std::num::NonZeroU32>, ConfigError> {
    match env.optional("HIVE_RATE_LIMIT").as_deref().map(str::trim) {
        None => Ok(std::num::NonZeroU32::new(600)),
        Some("off") => Ok(None),
        Some(raw) => {
            raw.parse::<std::num::NonZeroU32>()
                .map(Some)
                .map_err(|_| ConfigError::Malformed {
                    name: "HIVE_RATE_LIMIT",
                    reason: format!("`{raw}` is not a number of requests per minute (or `off`)"),
                })
        }
    }
}

fn cors_setting<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Vec<String>, ConfigError> {
    let origins: Vec<String> = env
        .optional("HIVE_CORS_ORIGINS")
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
                name: "HIVE_CORS_ORIGINS",
                reason: format!("`{origin}` is not an origin (scheme://host[:port])"),
            });
        }
    }
    Ok(origins)
}

impl ApiConfig {
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let stripe_webhook_secrets: Vec<String> = env
            .required("STRIPE_WEBHOOK_SECRET")?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if stripe_webhook_secrets.is_empty() {
            return Err(ConfigError::Malformed {
                name: "STRIPE_WEBHOOK_SECRET",
                reason: "no secret in the list".into(),
            });
        }
        let tokens = TokenConfig::from_env(env)?;
        if env.optional("HIVE_REGIONS").is_some() {
            return Err(ConfigError::Malformed {
                name: "HIVE_REGIONS",
                reason: "no longer read: name each region in a [regions.<name>] table of \
                         HIVE_CONFIG_FILE, so that the workers know how to launch there"
                    .into(),
            });
        }
        let file = ConfigFile::from_env(env)?;
        // The api accepts exactly the regions the workers are configured for.
        let regions = file.region_names(env)?;
        let default_region = match env.optional("HIVE_DEFAULT_REGION") {
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
        };
        let db_connections: u32 = env.parsed_or("HIVE_API_DB_CONNECTIONS", 4)?;
        if db_connections == 0 {
            return Err(ConfigError::Malformed {
                name: "HIVE_API_DB_CONNECTIONS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            database_url: env.required("DATABASE_URL")?,
            db_connections,
            metrics_addr: metrics_addr_setting(env)?,
            teardown_stuck_after: teardown_stuck_after(env)?,
            listen_addr: env
                .parsed_or("HIVE_API_ADDR", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            stripe_webhook_secrets,
            stripe_tolerance: env.secs_or("STRIPE_WEBHOOK_TOLERANCE_SECS", 300)?,
            tokens,
            rate_limit: rate_limit_setting(env)?,
            client_ip_header: env
                .optional("HIVE_CLIENT_IP_HEADER")
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
            cors_origins: cors_setting(env)?,
            stripe_secret_key: env.optional("STRIPE_SECRET_KEY"),
            stripe_api_base: http_base(env, "STRIPE_API_BASE", STRIPE_PRODUCTION_API)?,
            plans: file.plans(env)?,
            past_due_grace: env.secs_or("HIVE_PAST_DUE_GRACE_SECS", 3 * 24 * 3600)?,
            default_region,
            regions,
            node_domain: domain_setting(env)?,
        })
    }
}

/// `AWS_REGION`: the one region of the shorthand configuration.
fn aws_region<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<String, ConfigError> {
    let region = env.required("AWS_REGION")?;
    if !valid_region(&region) {
        return Err(ConfigError::Malformed {
            name: "AWS_REGION",
            reason: format!("`{region}` is not a region name"),
        });
    }
    Ok(region)
}

fn domain_setting<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<String, ConfigError> {
    let domain = env
        .required("HIVE_NODE_DOMAIN")?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        return Err(ConfigError::Malformed {
            name: "HIVE_NODE_DOMAIN",
            reason: format!("`{domain}` is not a domain name"),
        });
    }
    Ok(domain)
}

/// How the provisioning state machine paces itself.
#[derive(Debug, Clone)]
pub struct Pacing {
    /// First retry delay after a transient failure; doubles per attempt, with full jitter.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Transient failures a step may have before the node is failed.
    pub retry_budget: u32,
    /// How often a waiting step looks again.
    pub poll_interval: Duration,
    /// How long a waiting step may wait in all before the node is failed.
    pub wait_budget: Duration,
    /// How long a worker may hold a node before another may take it over.
    pub lease: Duration,
}

/// Faults the worker injects into its own steps, for tests only (`HIVE_CHAOS`): they let a
/// test prove what no emulator can show, such as a crash between a side effect and its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chaos {
    /// Run every step's side effect twice before committing; the second run must find what the
    /// first made (`repeat`).
    RepeatSteps,
    /// After this step's side effect succeeds, fail it permanently (`fail_after:<step>`).
    FailAfter(String),
    /// After this step's side effect succeeds, abort the process before the commit
    /// (`crash_after:<step>`).
    CrashAfter(String),
}

impl FromStr for Chaos {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "repeat" => Ok(Chaos::RepeatSteps),
            Some(("fail_after", step)) => Ok(Chaos::FailAfter(step.to_string())),
            Some(("crash_after", step)) => Ok(Chaos::CrashAfter(step.to_string())),
            _ => Err(format!(
                "`{s}` is not repeat, fail_after:<step> or crash_after:<step>"
            )),
        }
    }
}

/// Settings of `hive-worker`.
#[derive(Clone)]
pub struct WorkerConfig {
    pub database_url: String,
    /// Where `GET /metrics` is served (`HIVE_METRICS_ADDR`; unset: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// When the metrics count a teardown as stuck (see [`teardown_stuck_after`]).
    pub teardown_stuck_after: Duration,
    pub node_domain: String,
    pub cloudflare_api_token: String,
    pub cloudflare_account_id: String,
    pub cloudflare_zone_id: String,
    pub cloudflare_api_base: String,
    pub route53_zone_id: String,
    /// Every region this worker drives, with what it launches there.
    pub regions: Vec<RegionSettings>,
    /// The plans, for their fallback instance types.
    pub plans: Plans,
    /// Call budgets per provider, shared by every worker (`HIVE_RATE_BUDGET_*`).
    pub budgets: RateBudgets,
    /// Port of the edge node's own service on the node, which the tunnel routes to.
    pub edge_service_port: u16,
    /// Package (URL of a .deb) of the edge node service, installed at boot when set.
    pub edge_package_url: Option<String>,
    /// Jobs one worker runs at once.
    pub concurrency: usize,
    /// Undo what a failed provisioning created (`HIVE_UNDO_FAILED`, default true), or keep it
    /// for the operator to inspect and replay.
    pub undo_failed: bool,
    /// Timeout of one call to a cloud API.
    pub http_timeout: Duration,
    pub pacing: Pacing,
    /// How often idle workers look for due jobs; a job of a dead worker is taken up again
    /// after `heartbeat * 3`.
    pub poll: Duration,
    pub heartbeat: Duration,
    /// A node due this long ago that nobody works on has lost its job; the worker's sweep
    /// enqueues a new one (`HIVE_STALL_AFTER_MS`, default 30 s).
    pub stall_after: Duration,
    /// How long a finished job stays in the queue's table before the sweep deletes it
    /// (`HIVE_JOB_RETENTION_SECS`, default an hour): a waiting node leaves a job per look.
    pub job_retention: Duration,
    /// How long a stopping worker lets jobs in flight finish (`HIVE_SHUTDOWN_DEADLINE_MS`).
    pub shutdown_deadline: Duration,
    /// Test-only fault injection; never set in production.
    pub chaos: Option<Chaos>,
    /// When the reconciler runs, as a cron expression with seconds (`HIVE_RECONCILE_SCHEDULE`,
    /// default every ten minutes, `off` turns it off); each tick runs in one worker only. And
    /// how old an orphan must be to be removed (`HIVE_RECONCILE_GRACE_SECS`, 600).
    pub reconcile_schedule: Option<cron::Schedule>,
    pub reconcile_grace: Duration,
    /// How long after a launch EC2's reads may still not show the instance
    /// (`HIVE_EC2_CONSISTENCY_SECS`, 300): until then "not found" means "not yet".
    pub ec2_consistency: Duration,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Cloudflare token is left out on purpose.
        f.debug_struct("WorkerConfig")
            .field("node_domain", &self.node_domain)
            .field("cloudflare_account_id", &self.cloudflare_account_id)
            .field("cloudflare_zone_id", &self.cloudflare_zone_id)
            .field("cloudflare_api_base", &self.cloudflare_api_base)
            .field("route53_zone_id", &self.route53_zone_id)
            .field("regions", &self.regions)
            .field("concurrency", &self.concurrency)
            .field("pacing", &self.pacing)
            .finish_non_exhaustive()
    }
}

pub const CLOUDFLARE_PRODUCTION_API: &str = "https://api.cloudflare.com/client/v4/";
pub const STRIPE_PRODUCTION_API: &str = "https://api.stripe.com/";

/// An http(s) base URL setting, ending with `/`.
fn http_base<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
    default: &str,
) -> Result<String, ConfigError> {
    let mut base = env.optional(name).unwrap_or_else(|| default.to_string());
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(ConfigError::Malformed {
            name,
            reason: "not an http(s) URL".into(),
        });
    }
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// `HIVE_METRICS_ADDR`: an address to listen on (`127.0.0.1:0` picks a port), if set.
fn metrics_addr_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Option<SocketAddr>, ConfigError> {
    env.optional("HIVE_METRICS_ADDR")
        .filter(|raw| !raw.trim().is_empty())
        .map(|raw| {
            raw.trim()
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Malformed {
                    name: "HIVE_METRICS_ADDR",
                    reason: e.to_string(),
                })
        })
        .transpose()
}

impl WorkerConfig {
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let cloudflare_api_base = http_base(env, "CLOUDFLARE_API_BASE", CLOUDFLARE_PRODUCTION_API)?;
        // Every binary reads the configuration file, so a malformed one stops each at start.
        let file = ConfigFile::from_env(env)?;
        let concurrency: usize = env.parsed_or("HIVE_WORKER_CONCURRENCY", 16)?;
        if concurrency == 0 {
            return Err(ConfigError::Malformed {
                name: "HIVE_WORKER_CONCURRENCY",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            database_url: env.required("DATABASE_URL")?,
            metrics_addr: metrics_addr_setting(env)?,
            teardown_stuck_after: teardown_stuck_after(env)?,
            node_domain: domain_setting(env)?,
            cloudflare_api_token: env.required("CLOUDFLARE_API_TOKEN")?,
            cloudflare_account_id: env.required("CLOUDFLARE_ACCOUNT_ID")?,
            cloudflare_zone_id: env.required("CLOUDFLARE_ZONE_ID")?,
            cloudflare_api_base,
            route53_zone_id: env.required("HIVE_ROUTE53_ZONE_ID")?,
            regions: file.region_settings(env)?,
            plans: file.plans(env)?,
            budgets: RateBudgets::from_env(env)?,
            edge_service_port: env.parsed_or("HIVE_EDGE_SERVICE_PORT", 8080)?,
            edge_package_url: env.optional("HIVE_EDGE_PACKAGE_URL"),
            concurrency,
            undo_failed: env.parsed_or("HIVE_UNDO_FAILED", true)?,
            http_timeout: env.millis_or("HIVE_HTTP_TIMEOUT_MS", 20_000)?,
            pacing: Pacing {
                retry_base: env.millis_or("HIVE_RETRY_BASE_MS", 1_000)?,
                retry_max: env.millis_or("HIVE_RETRY_MAX_MS", 60_000)?,
                retry_budget: env.parsed_or("HIVE_RETRY_BUDGET", 8)?,
                poll_interval: env.millis_or("HIVE_POLL_INTERVAL_MS", 5_000)?,
                wait_budget: env.secs_or("HIVE_WAIT_BUDGET_SECS", 900)?,
                lease: env.millis_or("HIVE_LEASE_MS", 60_000)?,
            },
            poll: env.millis_or("HIVE_QUEUE_POLL_MS", 1_000)?,
            heartbeat: env.millis_or("HIVE_HEARTBEAT_MS", 10_000)?,
            stall_after: env.millis_or("HIVE_STALL_AFTER_MS", 30_000)?,
            job_retention: env.secs_or("HIVE_JOB_RETENTION_SECS", 3_600)?,
            shutdown_deadline: env.millis_or("HIVE_SHUTDOWN_DEADLINE_MS", 20_000)?,
            reconcile_schedule: reconcile_schedule(env)?,
            reconcile_grace: env.secs_or("HIVE_RECONCILE_GRACE_SECS", 600)?,
            ec2_consistency: env.secs_or("HIVE_EC2_CONSISTENCY_SECS", 300)?,
            chaos: match env.optional("HIVE_CHAOS") {
                None => None,
                Some(raw) => Some(raw.parse().map_err(|reason| ConfigError::Malformed {
                    name: "HIVE_CHAOS",
                    reason,
                })?),
            },
        })
    }
}

/// Call budgets, shared by all workers through Postgres: `HIVE_RATE_BUDGET_CLOUDFLARE`
/// (default `1200/300s`, Cloudflare's own limit per token), `HIVE_RATE_BUDGET_EC2` (`20/1s`),
/// `HIVE_RATE_BUDGET_ROUTE53` (`5/1s`), `HIVE_RATE_BUDGET_SECRETS` (`50/1s`); `off` spends
/// freely. EC2's and Secrets Manager's apply per region, as AWS counts them.
#[derive(Debug, Clone, PartialEq)]
pub struct RateBudgets {
    pub cloudflare: Option<crate::cloud::budget::Rate>,
    pub ec2: Option<crate::cloud::budget::Rate>,
    pub route53: Option<crate::cloud::budget::Rate>,
    pub secrets: Option<crate::cloud::budget::Rate>,
}

impl RateBudgets {
    fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let one = |name: &'static str, default: &str| {
            let raw = env.optional(name).unwrap_or_else(|| default.to_string());
            crate::cloud::budget::parse_budget(&raw)
                .map_err(|reason| ConfigError::Malformed { name, reason })
        };
        Ok(Self {
            cloudflare: one("HIVE_RATE_BUDGET_CLOUDFLARE", "1200/300s")?,
            ec2: one("HIVE_RATE_BUDGET_EC2", "20/1s")?,
            route53: one("HIVE_RATE_BUDGET_ROUTE53", "5/1s")?,
            secrets: one("HIVE_RATE_BUDGET_SECRETS", "50/1s")?,
        })
    }
}

/// The reconciler's default: every ten minutes, on the minute.
pub const DEFAULT_RECONCILE_SCHEDULE: &str = "0 */10 * * * *";

fn reconcile_schedule<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Option<cron::Schedule>, ConfigError> {
    const NAME: &str = "HIVE_RECONCILE_SCHEDULE";
    let raw = env
        .optional(NAME)
        .unwrap_or_else(|| DEFAULT_RECONCILE_SCHEDULE.into());
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    cron::Schedule::from_str(raw.trim())
        .map(Some)
        .map_err(|_| ConfigError::Malformed {
            name: NAME,
            reason: format!(
                "`{raw}` is not a cron expression with seconds, such as `{DEFAULT_RECONCILE_SCHEDULE}`, or `off`"
            ),
        })
}

fn prefixed<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
    prefix: &str,
) -> Result<String, ConfigError> {
    let value = env.required(name)?;
    if !value.starts_with(prefix) {
        return Err(ConfigError::Malformed {
            name,
            reason: format!("does not start with `{prefix}`"),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env(move |k: &str| map.get(k).cloned())
    }

    #[test]
    fn plans_parse_and_reject_nonsense() {
        let plans: Plans = DEFAULT_PLANS.parse().unwrap();
        assert_eq!(plans, default_plans());
        assert_eq!(plans.0["team"].nodes, 5);
        assert_eq!(plans.0["pro"].instance_type, "t4g.small");
        assert_eq!(plans.0["pro"].volume_gb, 10);
        assert_eq!(
            "pro=t4g.small:1".parse::<Plans>().unwrap().0["pro"].volume_gb,
            10
        );
        assert!("team=m5.large:5".parse::<Plans>().is_err());
        assert!("team=t4g.small:zero".parse::<Plans>().is_err());
        assert!("".parse::<Plans>().is_err());
    }

    fn file_env(
        text: &str,
    ) -> (
        tempfile_path::TempPath,
        Env<impl Fn(&str) -> Option<String>>,
    ) {
        let path = tempfile_path::TempPath::write(text);
        let shown = path.0.display().to_string();
        (
            path,
            Env(move |k: &str| (k == "HIVE_CONFIG_FILE").then(|| shown.clone())),
        )
    }

    /// A file removed when dropped (std only).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn write(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "hive-config-{}.toml",
                    uuid::Uuid::new_v4().simple()
                ));
                std::fs::write(&path, text).expect("writing a temp file");
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn plans_come_from_the_config_file_with_their_prices() {
        let (_file, env) = file_env(
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nvolume_gb = 10\nprices = [\"price_1Pro\"]\n\n[plans.big]\ninstance_type = \"t4g.large\"\nnodes = 3\n",
        );
        let plans = ConfigFile::from_env(&env).unwrap().plans(&env).unwrap();
        assert_eq!(plans.0.len(), 2);
        assert_eq!(plans.0["big"].volume_gb, 10);
        assert_eq!(
            plans.for_price("price_1Pro", None, None).map(|p| p.0),
            Some("pro")
        );
        assert_eq!(
            plans.for_price("price_x", Some("big"), None).map(|p| p.0),
            Some("big")
        );
        assert_eq!(
            plans.for_price("price_x", None, Some("pro")).map(|p| p.0),
            Some("pro")
        );
        assert_eq!(plans.for_price("price_x", Some("nope"), None), None);
    }

    #[test]
    fn a_malformed_config_file_is_one_line_naming_the_file_and_key() {
        for (text, expected) in [
            (
                "[plans.pro]\ninstance_type = \"m5.large\"\nnodes = 1\n",
                "plans.pro.instance_type: `m5.large` is not a t4g",
            ),
            (
                "[plans.pro]\ninstance_type = \"t4g.small\"\n",
                "plans.pro.nodes: missing",
            ),
            (
                "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = \"one\"\n",
                "plans.pro.nodes: must be an integer",
            ),
            (
                "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\ncolour = 2\n",
                "plans.pro.colour: unknown key",
            ),
            ("[plans.pro\nnodes = 1\n", "line 1"),
        ] {
            let (file, env) = file_env(text);
            let e = ConfigFile::from_env(&env).unwrap_err().to_string();
            assert!(
                e.starts_with("configuration: HIVE_CONFIG_FILE is malformed: "),
                "{e}"
            );
            assert!(e.contains(&file.0.display().to_string()), "{e}");
            assert!(e.contains(expected), "{text}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    const TWO_REGIONS: &str = "[regions.eu-west-1]\nami = \"ami-0abc\"\nsubnets = [\"subnet-a\", \"subnet-b\"]\nsecurity_group = \"sg-0abc\"\ninstance_profile = \"hive-node\"\n\n[regions.us-east-1]\nami_parameter = \"/aws/service/debian/release/12/latest/arm64\"\nsubnets = [\"subnet-c\"]\nsecurity_group = \"sg-0def\"\ninstance_profile = \"hive-node\"\n\n[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nfallback_types = [\"t4g.medium\"]\n";

    #[test]
    fn regions_come_from_the_config_file_else_the_shorthand() {
        let (_file, from_file) = file_env(TWO_REGIONS);
        let file = ConfigFile::from_env(&from_file).unwrap();
        let regions = file.region_settings(&from_file).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].name, "eu-west-1");
        assert_eq!(regions[0].subnets, vec!["subnet-a", "subnet-b"]);
        assert_eq!(regions[0].image.launch_image_id(), "ami-0abc");
        assert_eq!(
            regions[1].image.launch_image_id(),
            "resolve:ssm:/aws/service/debian/release/12/latest/arm64"
        );
        assert_eq!(
            file.plans(&from_file).unwrap().0["pro"].fallback_types,
            vec!["t4g.medium"]
        );

        let shorthand = env(&[
            ("AWS_REGION", "eu-west-1"),
            ("HIVE_AMI_ID", "ami-1"),
            ("HIVE_SUBNET_ID", "subnet-1, subnet-2"),
            ("HIVE_SECURITY_GROUP_ID", "sg-1"),
            ("HIVE_INSTANCE_PROFILE", "p"),
        ]);
        let regions = ConfigFile::default().region_settings(&shorthand).unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].name, "eu-west-1");
        assert_eq!(regions[0].subnets, vec!["subnet-1", "subnet-2"]);
    }

    #[test]
    fn malformed_regions_are_named() {
        for (text, expected) in [
            (
                "[regions.eu-west-1]\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
                "regions.eu-west-1: set exactly one of ami, ami_parameter",
            ),
            (
                "[regions.eu-west-1]\nami = \"ami-1\"\nsubnets = []\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
                "regions.eu-west-1.subnets: name at least one subnet",
            ),
            (
                "[regions.eu-west-1]\nami = \"ami-1\"\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\nzone = 1\n",
                "unknown field `zone`",
            ),
            (
                "[regions.Mars]\nami = \"ami-1\"\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
                "`Mars` is not a region name",
            ),
            (
                "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nfallback_types = [\"m5.large\"]\n",
                "plans.pro.fallback_types: `m5.large` is not a t4g",
            ),
        ] {
            let (_file, env) = file_env(text);
            let e = ConfigFile::from_env(&env).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_api_accepts_exactly_the_configured_regions() {
        let (file, _) = file_env(TWO_REGIONS);
        let path = file.0.display().to_string();
        let base = [
            ("STRIPE_WEBHOOK_SECRET", "whsec_a"),
            ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
            ("DATABASE_URL", "postgres://x"),
            ("HIVE_NODE_DOMAIN", "nodes.example.com"),
            ("HIVE_CONFIG_FILE", path.as_str()),
        ];
        let api = ApiConfig::from_env(&env(&base)).unwrap();
        assert_eq!(api.regions, vec!["eu-west-1", "us-east-1"]);
        assert_eq!(api.default_region, "eu-west-1");
        let mut with_default = base.to_vec();
        with_default.push(("HIVE_DEFAULT_REGION", "us-east-1"));
        assert_eq!(
            ApiConfig::from_env(&env(&with_default))
                .unwrap()
                .default_region,
            "us-east-1"
        );
        let mut unknown = base.to_vec();
        unknown.push(("HIVE_DEFAULT_REGION", "ap-south-1"));
        let e = ApiConfig::from_env(&env(&unknown)).unwrap_err();
        assert!(e.to_string().contains("HIVE_DEFAULT_REGION"), "{e}");
        let mut legacy = base.to_vec();
        legacy.push(("HIVE_REGIONS", "eu-west-1,ap-south-1"));
        let e = ApiConfig::from_env(&env(&legacy)).unwrap_err();
        assert!(e.to_string().contains("[regions.<name>]"), "{e}");
    }

    #[test]
    fn missing_and_malformed_settings_are_named() {
        let e = ApiConfig::from_env(&env(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration: STRIPE_WEBHOOK_SECRET is not set"
        );
        let e = ApiConfig::from_env(&env(&[
            ("STRIPE_WEBHOOK_SECRET", "whsec_a,whsec_b"),
            ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
            ("DATABASE_URL", "postgres://x"),
            ("HIVE_API_ADDR", "not-an-addr"),
            ("AWS_REGION", "eu-west-1"),
            ("HIVE_NODE_DOMAIN", "nodes.example.com"),
        ]))
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("configuration: HIVE_API_ADDR is malformed"));
        let ok = ApiConfig::from_env(&env(&[
            ("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b"),
            ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
            ("DATABASE_URL", "postgres://x"),
            ("AWS_REGION", "eu-west-1"),
            ("HIVE_NODE_DOMAIN", "Nodes.Example.com."),
        ]))
        .unwrap();
        assert_eq!(ok.stripe_webhook_secrets, vec!["whsec_a", "whsec_b"]);
        assert_eq!(ok.node_domain, "nodes.example.com");
        assert_eq!(ok.db_connections, 4);
        assert!(!format!("{ok:?}").contains("whsec_a"));
        let e = ApiConfig::from_env(&env(&[
            ("STRIPE_WEBHOOK_SECRET", "whsec_a"),
            ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
            ("DATABASE_URL", "postgres://x"),
            ("AWS_REGION", "eu-west-1"),
            ("HIVE_NODE_DOMAIN", "nodes.example.com"),
            ("HIVE_API_DB_CONNECTIONS", "0"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("HIVE_API_DB_CONNECTIONS"), "{e}");
    }
}
