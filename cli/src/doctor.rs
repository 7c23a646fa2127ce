//! `hivectl doctor`: one line per check of what a deployment needs (settings valid; Postgres,
//! AWS, Cloudflare and Stripe reachable with the configured credentials; migrations current;
//! clocks in step), and exit 1 if any fails. Every check runs, whatever failed before it.

use std::future::Future;
use std::time::Duration;

use hive_jobs::cloud::Clouds;
use hive_jobs::config::{process_env, ApiConfig, WorkerConfig};
use hive_jobs::store;
use serde::Serialize;
use sqlx::PgPool;

/// The most the database's clock may differ from ours (leases and schedules compare them).
const MAX_SKEW: Duration = Duration::from_secs(2);
/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found, or why it failed.
    pub detail: String,
}

async fn check<F>(name: &'static str, run: F) -> Check
where
    F: Future<Output = Result<String, String>>,
{
    let outcome = tokio::time::timeout(CHECK_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer in {} s", CHECK_TIMEOUT.as_secs())));
    match outcome {
        Ok(detail) => Check {
            name,
            ok: true,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            detail,
        },
    }
}

fn skipped(name: &'static str, why: &str) -> Check {
    Check {
        name,
        ok: false,
        detail: format!("not checked: {why}"),
    }
}

pub async fn run() -> Vec<Check> {
    let env = process_env();
    let mut checks = Vec::new();
    let worker = WorkerConfig::from_env(&env);
    checks.push(Check {
        name: "worker settings",
        ok: worker.is_ok(),
        detail: match &worker {
            Ok(c) => format!("node domain {}", c.node_domain),
            Err(e) => e.to_string(),
        },
    });
    // The api's settings, where this environment is the api's too.
    let api = std::env::var_os("STRIPE_WEBHOOK_SECRET").map(|_| ApiConfig::from_env(&env));
    if let Some(api) = &api {
        checks.push(Check {
            name: "api settings",
            ok: api.is_ok(),
            detail: match api {
                Ok(c) => format!(
                    "{} plan(s), regions {}",
                    c.plans.0.len(),
                    c.regions.join(",")
                ),
                Err(e) => e.to_string(),
            },
        });
    }

    let url = std::env::var("DATABASE_URL").ok();
    let pool = match &url {
        Some(url) => {
            let connected = tokio::time::timeout(CHECK_TIMEOUT, PgPool::connect(url)).await;
            match connected {
                Ok(Ok(pool)) => {
                    checks.push(Check {
                        name: "postgres",
                        ok: true,
                        detail: "connected".into(),
                    });
                    Some(pool)
                }
                Ok(Err(e)) => {
                    checks.push(Check {
                        name: "postgres",
                        ok: false,
                        detail: e.to_string(),
                    });
                    None
                }
                Err(_) => {
                    checks.push(skipped("postgres", "no answer in time"));
                    None
                }
            }
        }
        None => {
            checks.push(skipped("postgres", "DATABASE_URL is not set"));
            None
        }
    };
    match &pool {
        Some(pool) => {
            checks.push(
                check("migrations", async {
                    let pending = store::pending_migrations(pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    if pending.is_empty() {
                        Ok("current".into())
                    } else {
                        Err(format!(
                            "not applied: {pending:?} (start a binary to apply them)"
                        ))
                    }
                })
                .await,
            );
            checks.push(
                check("teardowns", async {
                    let after = hive_jobs::config::teardown_stuck_after(&env)
                        .map_err(|e| e.to_string())?;
                    let stuck = store::stuck_teardowns(pool, after)
                        .await
                        .map_err(|e| e.to_string())?;
                    match stuck.first() {
                        None => Ok(format!("none stuck longer than {} s", after.as_secs())),
                        Some(longest) => Err(format!(
                            "{} stuck longer than {} s (see hivectl queue); the longest: node {} at {} for {:.0} s: {}",
                            stuck.len(),
                            after.as_secs(),
                            longest.id,
                            longest.state,
                            longest.stuck_secs,
                            longest.last_error.as_deref().unwrap_or("no error recorded")
                        )),
                    }
                })
                .await,
            );
            checks.push(
                check("stripe events", async {
                    let held = store::held_stripe_events(pool, 1)
                        .await
                        .map_err(|e| e.to_string())?;
                    let count = store::held_stripe_event_count(pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    match held.first() {
                        None => Ok("none held".into()),
                        Some(first) => Err(format!(
                            "{count} held: the configuration cannot apply them (see hivectl \
                             stripe-events list --held; fix the configuration and restart the \
                             api, or reprocess); the oldest: {} ({}): {}",
                            first.id,
                            first.event_type,
                            first.held_reason.as_deref().unwrap_or("no reason recorded")
                        )),
                    }
                })
                .await,
            );
            checks.push(
                check("clock skew", async {
                    let skew = store::clock_skew(pool).await.map_err(|e| e.to_string())?;
                    let ms = skew.num_milliseconds();
                    if ms.unsigned_abs() <= MAX_SKEW.as_millis() as u64 {
                        Ok(format!("{ms} ms from the database's clock"))
                    } else {
                        Err(format!(
                            "{ms} ms from the database's clock (at most {} s)",
                            MAX_SKEW.as_secs()
                        ))
                    }
                })
                .await,
            );
        }
        None => {
            checks.push(skipped("migrations", "no database"));
            checks.push(skipped("teardowns", "no database"));
            checks.push(skipped("stripe events", "no database"));
            checks.push(skipped("clock skew", "no database"));
        }
    }

    match &worker {
        Ok(config) => clouds(config, &mut checks).await,
        Err(_) => {
            for name in [
                "aws ec2",
                "aws secrets manager",
                "aws route 53",
                "cloudflare",
            ] {
                checks.push(skipped(name, "the worker's settings are not valid"));
            }
        }
    }

    match api {
        Some(Ok(config)) => checks.push(stripe(&config).await),
        Some(Err(_)) => checks.push(skipped("stripe", "the api's settings are not valid")),
        None => {}
    }
    checks
}

async fn clouds(config: &WorkerConfig, checks: &mut Vec<Check>) {
    let clouds = match Clouds::from_config(config, None).await {
        Ok(clouds) => clouds,
        Err(e) => {
            for name in [
                "aws ec2",
                "aws secrets manager",
                "aws route 53",
                "cloudflare",
            ] {
                checks.push(Check {
                    name,
                    ok: false,
                    detail: e.to_string(),
                });
            }
            return;
        }
    };
    let ok = |what: &str| Ok::<String, String>(what.to_string());
    let regions = clouds.region_names().join(", ");
    checks.push(
        check("aws ec2", async {
            for aws in &clouds.regions {
                aws.compute
                    .ping()
                    .await
                    .map_err(|e| format!("{}: {e}", aws.settings.name))?;
            }
            Ok(format!("answers in {regions}"))
        })
        .await,
    );
    checks.push(
        check("aws secrets manager", async {
            for aws in &clouds.regions {
                aws.secrets
                    .ping()
                    .await
                    .map_err(|e| format!("{}: {e}", aws.settings.name))?;
            }
            Ok(format!("answers in {regions}"))
        })
        .await,
    );
    checks.push(
        check("aws route 53", async {
            clouds.route53.ping().await.map_err(|e| e.to_string())?;
            ok("hosted zone found")
        })
        .await,
    );
    checks.push(
        check("cloudflare", async {
            clouds
                .cloudflare
                .find_tunnel("hive-doctor-probe")
                .await
                .map_err(|e| e.to_string())?;
            clouds
                .cloudflare
                .find_cname(&format!("doctor-probe.{}", config.node_domain))
                .await
                .map_err(|e| e.to_string())?;
            ok("account tunnels and zone records readable")
        })
        .await,
    );
}

/// Reads the account's balance: the cheapest call that proves the key works.
async fn stripe(config: &ApiConfig) -> Check {
    let Some(key) = &config.stripe_secret_key else {
        // A deployment may do without checkout; that is a choice, not a fault.
        return Check {
            name: "stripe",
            ok: true,
            detail: "not configured (STRIPE_SECRET_KEY unset: checkout answers 503)".into(),
        };
    };
    check("stripe", async {
        let http = reqwest::Client::builder()
            .timeout(CHECK_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let answer = http
            .get(format!("{}v1/balance", config.stripe_api_base))
            .bearer_auth(key)
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        match answer.status().as_u16() {
            200 => Ok("the key is accepted".into()),
            401 => Err("the key is refused (401)".into()),
            status => Err(format!("answered {status}")),
        }
    })
    .await
}
