//! Settings of `hive-worker` (and of `hivectl`'s commands that drive the clouds).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use super::{
    domain_setting, http_base, metrics_addr_setting, settings, teardown_stuck_after, ConfigError,
    ConfigFile, Env, Plans, RegionSettings,
};

settings! {
    /// How the provisioning state machine paces itself.
    #[derive(Debug, Clone)]
    pub struct Pacing from env {
        /// First retry delay after a transient failure (`HIVE_RETRY_BASE_MS`, 1 s); doubles per
        /// attempt, with full jitter...
        pub retry_base: Duration = env.millis_or("HIVE_RETRY_BASE_MS", 1_000)?,
        /// ...up to `HIVE_RETRY_MAX_MS` (60 s).
        pub retry_max: Duration = env.millis_or("HIVE_RETRY_MAX_MS", 60_000)?,
        /// Transient failures a step may have before the node is failed (`HIVE_RETRY_BUDGET`, 8).
        pub retry_budget: u32 = env.parsed_or("HIVE_RETRY_BUDGET", 8)?,
        /// How often a waiting step looks again (`HIVE_POLL_INTERVAL_MS`, 5 s).
        pub poll_interval: Duration = env.millis_or("HIVE_POLL_INTERVAL_MS", 5_000)?,
        /// How long a waiting step may wait in all before the node is failed
        /// (`HIVE_WAIT_BUDGET_SECS`, 900).
        pub wait_budget: Duration = env.secs_or("HIVE_WAIT_BUDGET_SECS", 900)?,
        /// How long a worker may hold a node before another may take it over (`HIVE_LEASE_MS`,
        /// 60 s).
        pub lease: Duration = env.millis_or("HIVE_LEASE_MS", 60_000)?,
    }
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

settings! {
    /// Settings of `hive-worker`.
    #[derive(Clone)]
    pub struct WorkerConfig from env {
        // Every binary reads the configuration file, so a malformed one stops each at start.
        let file = ConfigFile::from_env(env)?;

        /// Cloudflare's API (`CLOUDFLARE_API_BASE`, default Cloudflare's own).
        pub cloudflare_api_base: String =
            http_base(env, "CLOUDFLARE_API_BASE", CLOUDFLARE_PRODUCTION_API)?,
        /// Jobs one worker runs at once (`HIVE_WORKER_CONCURRENCY`, 16).
        pub concurrency: usize = env.positive_or("HIVE_WORKER_CONCURRENCY", 16)?,
        /// `DATABASE_URL`.
        pub database_url: String = env.required("DATABASE_URL")?,
        /// Where `GET /metrics` is served (`HIVE_METRICS_ADDR`; unset: not served).
        pub metrics_addr: Option<SocketAddr> = metrics_addr_setting(env)?,
        /// When the metrics count a teardown as stuck (see [`teardown_stuck_after`]).
        pub teardown_stuck_after: Duration = teardown_stuck_after(env)?,
        /// The domain nodes are named under (`HIVE_NODE_DOMAIN`).
        pub node_domain: String = domain_setting(env)?,
        /// Cloudflare's token, account and zone (`CLOUDFLARE_API_TOKEN`, `CLOUDFLARE_ACCOUNT_ID`,
        /// `CLOUDFLARE_ZONE_ID`).
        pub cloudflare_api_token: String = env.required("CLOUDFLARE_API_TOKEN")?,
        pub cloudflare_account_id: String = env.required("CLOUDFLARE_ACCOUNT_ID")?,
        pub cloudflare_zone_id: String = env.required("CLOUDFLARE_ZONE_ID")?,
        /// The Route 53 hosted zone of the nodes' names (`HIVE_ROUTE53_ZONE_ID`).
        pub route53_zone_id: String = env.required("HIVE_ROUTE53_ZONE_ID")?,
        /// Every region this worker drives, with what it launches there.
        pub regions: Vec<RegionSettings> = file.region_settings(env)?,
        /// The plans, for their fallback instance types.
        pub plans: Plans = file.plans(env)?,
        /// Call budgets per provider, shared by every worker (`HIVE_RATE_BUDGET_*`).
        pub budgets: RateBudgets = RateBudgets::from_env(env)?,
        /// Port of the edge node's own service on the node, which the tunnel routes to
        /// (`HIVE_EDGE_SERVICE_PORT`, 8080).
        pub edge_service_port: u16 = env.parsed_or("HIVE_EDGE_SERVICE_PORT", 8080)?,
        /// Package (URL of a .deb) of the edge node service, installed at boot when set
        /// (`HIVE_EDGE_PACKAGE_URL`).
        pub edge_package_url: Option<String> = env.optional("HIVE_EDGE_PACKAGE_URL"),
        /// Undo what a failed provisioning created (`HIVE_UNDO_FAILED`, default true), or keep it
        /// for the operator to inspect and replay.
        pub undo_failed: bool = env.parsed_or("HIVE_UNDO_FAILED", true)?,
        /// Timeout of one call to a cloud API (`HIVE_HTTP_TIMEOUT_MS`, 20 s).
        pub http_timeout: Duration = env.millis_or("HIVE_HTTP_TIMEOUT_MS", 20_000)?,
        /// How the state machine paces itself (see [`Pacing`]).
        pub pacing: Pacing = Pacing::from_env(env)?,
        /// How often idle workers look for due jobs (`HIVE_QUEUE_POLL_MS`, 1 s)...
        pub poll: Duration = env.millis_or("HIVE_QUEUE_POLL_MS", 1_000)?,
        /// ...and a job of a dead worker is taken up again after `heartbeat * 3`
        /// (`HIVE_HEARTBEAT_MS`, 10 s).
        pub heartbeat: Duration = env.millis_or("HIVE_HEARTBEAT_MS", 10_000)?,
        /// A node due this long ago that nobody works on has lost its job; the worker's sweep
        /// enqueues a new one (`HIVE_STALL_AFTER_MS`, default 30 s).
        pub stall_after: Duration = env.millis_or("HIVE_STALL_AFTER_MS", 30_000)?,
        /// How long node logs, Stripe events' payloads and reconcile runs are kept
        /// (`HIVE_RETENTION_DAYS`, 90); the worker prunes older rows in small batches.
        pub retention: Duration = env
            .positive_or("HIVE_RETENTION_DAYS", 90u32)
            .map(|days| Duration::from_secs(u64::from(days) * 24 * 3600))?,
        /// How long a finished job stays in the queue's table before the sweep deletes it
        /// (`HIVE_JOB_RETENTION_SECS`, default an hour): a waiting node leaves a job per look.
        pub job_retention: Duration = env.secs_or("HIVE_JOB_RETENTION_SECS", 3_600)?,
        /// How long a stopping worker lets jobs in flight finish (`HIVE_SHUTDOWN_DEADLINE_MS`).
        pub shutdown_deadline: Duration = env.millis_or("HIVE_SHUTDOWN_DEADLINE_MS", 20_000)?,
        /// When the reconciler runs, as a cron expression with seconds
        /// (`HIVE_RECONCILE_SCHEDULE`, default every ten minutes, `off` turns it off); each tick
        /// runs in one worker only.
        pub reconcile_schedule: Option<cron::Schedule> = reconcile_schedule(env)?,
        /// How old an orphan must be to be removed (`HIVE_RECONCILE_GRACE_SECS`, 600).
        pub reconcile_grace: Duration = env.secs_or("HIVE_RECONCILE_GRACE_SECS", 600)?,
        /// How long after a launch EC2's reads may still not show the instance
        /// (`HIVE_EC2_CONSISTENCY_SECS`, 300): until then "not found" means "not yet".
        pub ec2_consistency: Duration = env.secs_or("HIVE_EC2_CONSISTENCY_SECS", 300)?,
        /// Test-only fault injection (`HIVE_CHAOS`): refused unless the binary was built for
        /// the tests (feature `chaos`), as one of it aborts the process.
        pub chaos: Option<Chaos> = chaos_setting(env, cfg!(feature = "chaos"))?,
    }
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

/// Call budgets, shared by all workers through Postgres: `HIVE_RATE_BUDGET_CLOUDFLARE`
/// (default `1200/300s`, Cloudflare's own limit per token), `HIVE_RATE_BUDGET_EC2` (`20/1s`),
/// `HIVE_RATE_BUDGET_ROUTE53` (`5/1s`), `HIVE_RATE_BUDGET_SECRETS` (`50/1s`); `off` spends
/// freely. EC2's and Secrets Manager's apply per region, as AWS counts them.
#[derive(Debug, Clone, PartialEq)]
pub struct RateBudgets {
    pub cloudflare: Option<Rate>,
    pub ec2: Option<Rate>,
    pub route53: Option<Rate>,
    pub secrets: Option<Rate>,
}

impl RateBudgets {
    fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let one = |name: &'static str, default: &str| {
            let raw = env.optional(name).unwrap_or_else(|| default.to_string());
            parse_budget(&raw).map_err(|reason| ConfigError::Malformed { name, reason })
        };
        Ok(Self {
            cloudflare: one("HIVE_RATE_BUDGET_CLOUDFLARE", "1200/300s")?,
            ec2: one("HIVE_RATE_BUDGET_EC2", "20/1s")?,
            route53: one("HIVE_RATE_BUDGET_ROUTE53", "5/1s")?,
            secrets: one("HIVE_RATE_BUDGET_SECRETS", "50/1s")?,
        })
    }
}

/// `HIVE_CHAOS`, where `built_for_tests` allows it.
pub(super) fn chaos_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    built_for_tests: bool,
) -> Result<Option<Chaos>, ConfigError> {
    let Some(raw) = env.optional("HIVE_CHAOS") else {
        return Ok(None);
    };
    if !built_for_tests {
        return Err(ConfigError::Malformed {
            name: "HIVE_CHAOS",
            reason: "fault injection is only in builds for the tests (feature `chaos`)".into(),
        });
    }
    raw.parse()
        .map(Some)
        .map_err(|reason| ConfigError::Malformed {
            name: "HIVE_CHAOS",
            reason,
        })
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

/// `calls` per `per`, as configured (`1200/300s`, `90/10s`, `20/1s`, `100/1m`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub calls: u32,
    pub per: Duration,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        f64::from(self.calls) / self.per.as_secs_f64()
    }

    /// The bucket's size: a tenth of a period's calls, at least one.
    pub fn burst(&self) -> f64 {
        (f64::from(self.calls) / 10.0).max(1.0)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape =
            || format!("`{s}` is not calls/period (such as `1200/300s` or `20/1s`) or `off`");
        let (calls, period) = s.trim().split_once('/').ok_or_else(shape)?;
        let calls: u32 = calls.trim().parse().map_err(|_| shape())?;
        let period = period.trim();
        let (number, unit) = period.split_at(period.len().saturating_sub(1));
        let n: u64 = number.parse().map_err(|_| shape())?;
        let per = match unit {
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            _ => return Err(shape()),
        };
        if calls == 0 || per.is_zero() {
            return Err(shape());
        }
        Ok(Rate { calls, per })
    }
}

/// Parses a budget setting: a [`Rate`], or `off` (`None`).
pub fn parse_budget(raw: &str) -> Result<Option<Rate>, String> {
    if raw.trim().eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        raw.parse().map(Some)
    }
}
