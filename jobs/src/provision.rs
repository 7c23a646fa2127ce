//! The provisioning state machine: every step of a node, in one place.
//!
//! One step is one external side effect and one commit of its result. Every step looks up what
//! it would create before creating it, so a step repeated after a crash adopts what the first
//! run made. A waiting step never sleeps in a worker slot: it commits "look again at T" and a job
//! for T, and returns.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use crate::cloud::cloudflare::{
    tunnel_target, Cloudflare, IngressRule, TunnelConfig, TunnelHealth,
};
use crate::cloud::compute::{Compute, LaunchSpec};
use crate::cloud::route53::{Propagation, Route53};
use crate::cloud::secrets::Secrets;
use crate::cloud::{CloudError, CloudResult};
use crate::config::{Chaos, Pacing, WorkerConfig};
use crate::model::{Node, NodeState};
use crate::store::{self, Created, Lease, StoreResult};
use crate::user_data::{self, UserDataParams};

/// The clouds a worker drives.
pub struct Clouds {
    pub compute: Compute,
    pub secrets: Secrets,
    pub route53: Route53,
    pub cloudflare: Cloudflare,
}

impl Clouds {
    /// Clients from the AWS SDK's standard configuration (`AWS_REGION`, `AWS_ENDPOINT_URL`, ...)
    /// and the Cloudflare settings.
    pub async fn from_config(config: &WorkerConfig) -> CloudResult<(Self, String)> {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(config.http_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build();
        // Our own retries are stored in Postgres; the SDK retries only briefly within a step.
        let retry = aws_config::retry::RetryConfig::standard().with_max_attempts(2);
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(retry)
            .load()
            .await;
        let region = shared
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| CloudError::permanent("aws:config", "no AWS region configured"))?;
        let ec2_config = aws_sdk_ec2::config::Builder::from(&shared).build();
        let sm_config = aws_sdk_secretsmanager::config::Builder::from(&shared).build();
        let r53_config = aws_sdk_route53::config::Builder::from(&shared).build();
        let clouds = Clouds {
            compute: Compute::new(aws_sdk_ec2::Client::from_conf(ec2_config), region.clone()),
            secrets: Secrets::new(aws_sdk_secretsmanager::Client::from_conf(sm_config)),
            route53: Route53::new(
                aws_sdk_route53::Client::from_conf(r53_config),
                config.route53_zone_id.clone(),
            ),
            cloudflare: Cloudflare::new(
                &config.cloudflare_api_base,
                &config.cloudflare_api_token,
                &config.cloudflare_account_id,
                &config.cloudflare_zone_id,
                config.http_timeout,
            )?,
        };
        Ok((clouds, region))
    }
}

/// What a step did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The side effect is done (or was found done): move on, recording what was created.
    Done(Created),
    /// Nothing to do yet: look again later.
    NotYet(&'static str),
}

/// A job that arrives this much before its node's next run time is a duplicate and is dropped;
/// less than that is the queue's rounding of run times to whole seconds.
const EARLY_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(1500);

pub struct Provisioner {
    pool: PgPool,
    clouds: Arc<Clouds>,
    config: WorkerConfig,
    region: String,
}

impl Provisioner {
    /// `clouds` is shared with the worker's reconciler.
    pub fn new(pool: PgPool, clouds: Arc<Clouds>, config: WorkerConfig, region: String) -> Self {
        Self {
            pool,
            clouds,
            config,
            region,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs the node's steps until it is ready, must wait, or has failed. Errors are only those
    /// of our own database; the job is then retried by the queue.
    pub async fn advance(&self, node_id: Uuid, job_id: &str) -> StoreResult<()> {
        let owner = Uuid::new_v4();
        loop {
            let node =
                match store::acquire(&self.pool, node_id, owner, self.config.pacing.lease).await? {
                    Lease::Held(node) => *node,
                    Lease::HeldElsewhere { until } => {
                        // Someone is on it; look again when their lease runs out, in case they died.
                        store::enqueue_later(&self.pool, node_id, until + Duration::from_secs(1))
                            .await?;
                        return Ok(());
                    }
                    Lease::Gone => {
                        tracing::warn!(%node_id, job_id, "job for a node that does not exist");
                        return Ok(());
                    }
                };
            let state = node.state();
            if !state.has_step() {
                return store::release(&self.pool, node_id, owner).await;
            }
            if let Some(at) = node.next_run_at {
                if at - Utc::now() > EARLY_TOLERANCE {
                    // Another job is queued for that time.
                    return store::release(&self.pool, node_id, owner).await;
                }
            }
            let span = tracing::info_span!(
                "step",
                %node_id,
                job_id,
                step = %state,
                generation = node.generation,
                attempt = node.attempt
            );
            let keep_going = self.run_one(&node, owner).instrument(span).await?;
            if !keep_going {
                return Ok(());
            }
        }
    }

    /// Runs the node's current step and records its result. True when the next step may run
    /// right away.
    async fn run_one(&self, node: &Node, owner: Uuid) -> StoreResult<bool> {
        let state = node.state();
        store::step_started(&self.pool, node).await?;
        let pacing = &self.config.pacing;
        match self.run_step_with_chaos(node).await {
            Ok(Outcome::Done(created)) => {
                let next = self.next_state(node);
                if let Err(fenced) =
                    store::commit_step(&self.pool, node, owner, next, &created).await?
                {
                    tracing::warn!(%fenced, "step result dropped");
                    store::release(&self.pool, node.id, owner).await?;
                    return Ok(false);
                }
                tracing::info!(next = %next, "step succeeded");
                if !next.has_step() {
                    store::release(&self.pool, node.id, owner).await?;
                    return Ok(false);
                }
                Ok(true)
            }
            Ok(Outcome::NotYet(why)) => {
                let waited = (Utc::now() - node.step_started_at)
                    .to_std()
                    .unwrap_or_default();
                if waited > pacing.wait_budget {
                    let error = format!("{state}: gave up after {}s: {why}", waited.as_secs());
                    return self.fail(node, owner, &error).await;
                } else {
                    tracing::debug!(why, "not yet; looking again later");
                    store::schedule(
                        &self.pool,
                        node,
                        owner,
                        pacing.poll_interval,
                        false,
                        "waiting",
                        Some(why),
                    )
                    .await?
                    .ok();
                }
                Ok(false)
            }
            Err(error)
                if error.is_transient() && (node.attempt as u32) + 1 < pacing.retry_budget =>
            {
                let delay = full_jitter_backoff(pacing, node.attempt as u32);
                let message = error.to_string();
                tracing::warn!(error = %message, delay_ms = delay.as_millis() as u64, "transient failure; retry scheduled");
                store::schedule(
                    &self.pool,
                    node,
                    owner,
                    delay,
                    true,
                    "retry_scheduled",
                    Some(&message),
                )
                .await?
                .ok();
                Ok(false)
            }
            Err(error) => {
                let message = if error.is_transient() {
                    format!("{error}; gave up after {} attempts", node.attempt + 1)
                } else {
                    error.to_string()
                };
                self.fail(node, owner, &message).await
            }
        }
    }

    /// The step, with the test-only faults of `HIVE_CHAOS` applied around its side effect.
    async fn run_step_with_chaos(&self, node: &Node) -> CloudResult<Outcome> {
        let outcome = self.run_step(node).await;
        let step = node.state().as_str();
        match (&self.config.chaos, &outcome) {
            (Some(Chaos::RepeatSteps), Ok(Outcome::Done(first))) => {
                let again = self.run_step(node).await?;
                if again != Outcome::Done(first.clone()) {
                    return Err(CloudError::permanent(
                        "chaos",
                        format!("{step} is not idempotent: {first:?} then {again:?}"),
                    ));
                }
                outcome
            }
            (Some(Chaos::FailAfter(at)), Ok(Outcome::Done(_))) if at == step => Err(
                CloudError::permanent("chaos", format!("injected failure after {step}")),
            ),
            (Some(Chaos::CrashAfter(at)), Ok(Outcome::Done(_))) if at == step => {
                tracing::error!(
                    "chaos: crashing after the side effect of {step}, before its commit"
                );
                std::process::abort();
            }
            _ => outcome,
        }
    }

    /// Where a node goes when its current step is done.
    fn next_state(&self, node: &Node) -> NodeState {
        let state = node.state();
        if state.is_teardown() {
            match state.next_teardown() {
                Some(next) => next,
                None if node.is_undoing_failure() => NodeState::Failed,
                None => NodeState::Terminated,
            }
        } else {
            state.next_provisioning().unwrap_or(NodeState::Ready)
        }
    }

    /// A failed step: a failed provisioning is undone (unless configured to be kept); a failed
    /// teardown is kept for the operator. True when the node goes on at once (to its undo).
    async fn fail(&self, node: &Node, owner: Uuid, error: &str) -> StoreResult<bool> {
        let unwind = self.config.undo_failed && node.state().is_provisioning();
        tracing::error!(error, unwind, "step failed");
        let recorded = store::fail(&self.pool, node, owner, error, unwind).await?;
        if recorded.is_err() {
            store::release(&self.pool, node.id, owner).await?;
            return Ok(false);
        }
        Ok(unwind)
    }

    /// The side effect of the node's current step.
    async fn run_step(&self, node: &Node) -> CloudResult<Outcome> {
        let clouds = &self.clouds;
        let done = |created: Created| Ok(Outcome::Done(created));
        match node.state() {
            NodeState::Pending => {
                if node.region != self.region {
                    return Err(CloudError::permanent(
                        "worker",
                        format!(
                            "region {} is not served by this worker ({})",
                            node.region, self.region
                        ),
                    ));
                }
                done(Created::default())
            }
            NodeState::CreatingTunnel => {
                let name = node.tunnel_name();
                let tunnel = match clouds.cloudflare.find_tunnel(&name).await? {
                    Some(existing) => existing,
                    None => clouds.cloudflare.create_tunnel(&name).await?,
                };
                done(Created {
                    tunnel_id: Some(tunnel.id.to_string()),
                    ..Created::default()
                })
            }
            NodeState::StoringSecret => {
                let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
                let token = clouds.cloudflare.tunnel_token(tunnel_id).await?;
                let arn = clouds
                    .secrets
                    .store_tunnel_token(node.id, &token, &idempotency_token(node))
                    .await?;
                done(Created {
                    secret_arn: Some(arn),
                    ..Created::default()
                })
            }
            NodeState::LaunchingInstance => {
                if let Some(existing) = clouds.compute.find_by_node(node.id).await? {
                    return done(Created {
                        instance_id: Some(existing.id),
                        ..Created::default()
                    });
                }
                let secret_id = node.secret_name();
                let user_data = user_data::render(&UserDataParams {
                    node_id: node.id,
                    region: &node.region,
                    secret_id: &secret_id,
                    hostname: &node.hostname,
                    edge_service_port: self.config.edge_service_port,
                    edge_package_url: self.config.edge_package_url.as_deref(),
                })
                .map_err(|e| CloudError::permanent("user-data", e.to_string()))?;
                let instance = clouds
                    .compute
                    .launch(&LaunchSpec {
                        node_id: node.id,
                        subscription_id: node.subscription_id,
                        user_id: &node.user_id,
                        instance_type: &node.instance_type,
                        ami_id: &self.config.ami_id,
                        subnet_id: &self.config.subnet_id,
                        security_group_id: &self.config.security_group_id,
                        instance_profile: &self.config.instance_profile,
                        user_data: &user_data,
                        client_token: idempotency_token(node),
                    })
                    .await?;
                tracing::info!(instance_id = %instance.id, "instance launched");
                done(Created {
                    instance_id: Some(instance.id),
                    ..Created::default()
                })
            }
            NodeState::BindingSecret => {
                let instance_id = required(node, "instance_id", &node.instance_id)?;
                let secret_arn = required(node, "secret_arn", &node.secret_arn)?;
                let instance = clouds.compute.describe(instance_id).await?.ok_or_else(|| {
                    CloudError::permanent("ec2", format!("instance {instance_id} has vanished"))
                })?;
                clouds
                    .secrets
                    .bind_to_instance(secret_arn, &instance.arn)
                    .await?;
                done(Created::default())
            }
            NodeState::WaitingForInstance => {
                let instance_id = required(node, "instance_id", &node.instance_id)?;
                let instance = clouds.compute.describe(instance_id).await?.ok_or_else(|| {
                    CloudError::permanent("ec2", format!("instance {instance_id} has vanished"))
                })?;
                match instance.state.as_str() {
                    "running" => done(Created::default()),
                    "pending" => Ok(Outcome::NotYet("instance is pending")),
                    other => Err(CloudError::permanent(
                        "ec2",
                        format!("instance {instance_id} is {other}, not starting"),
                    )),
                }
            }
            NodeState::ConfiguringIngress => {
                let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
                clouds
                    .cloudflare
                    .configure_tunnel(tunnel_id, &ingress(node, self.config.edge_service_port))
                    .await?;
                done(Created::default())
            }
            NodeState::RoutingCloudflare => {
                let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
                let record = match clouds.cloudflare.find_cname(&node.hostname).await? {
                    Some(existing) => existing,
                    None => {
                        clouds
                            .cloudflare
                            .create_proxied_cname(&node.hostname, &tunnel_target(tunnel_id))
                            .await?
                    }
                };
                done(Created {
                    dns_record_id: Some(record.id),
                    ..Created::default()
                })
            }
            NodeState::RoutingRoute53 => {
                let (_change, propagation) = clouds.route53.upsert(&node.hostname).await?;
                match propagation {
                    Propagation::InSync => done(Created::default()),
                    Propagation::Pending => Ok(Outcome::NotYet("route 53 change is pending")),
                }
            }
            NodeState::WaitingForTunnel => {
                let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
                match clouds.cloudflare.tunnel_health(tunnel_id).await? {
                    TunnelHealth::Healthy => done(Created::default()),
                    TunnelHealth::NotHealthy => Ok(Outcome::NotYet("tunnel is not connected yet")),
                }
            }
            // Teardown: each step undoes one provisioning side effect, found by the node's
            // identity; "not found" counts as done.
            NodeState::Terminating => done(Created::default()),
            NodeState::DeletingRoute53Record => {
                clouds.route53.delete(&node.hostname).await?;
                done(Created::default())
            }
            NodeState::DeletingCloudflareRecord => {
                if let Some(record) = clouds.cloudflare.find_cname(&node.hostname).await? {
                    clouds.cloudflare.delete_dns_record(&record.id).await?;
                }
                done(Created::default())
            }
            NodeState::TerminatingInstance => {
                // The tagged instance, and the recorded one should it differ; only live ones
                // (terminating one twice is an error in some EC2 implementations).
                let mut live = Vec::new();
                if let Some(instance) = clouds.compute.find_by_node(node.id).await? {
                    live.push(instance.id);
                }
                if let Some(recorded) = node.instance_id.as_ref().filter(|r| !live.contains(r)) {
                    if clouds
                        .compute
                        .describe(recorded)
                        .await?
                        .is_some_and(|i| i.state != "shutting-down")
                    {
                        live.push(recorded.clone());
                    }
                }
                for instance_id in &live {
                    clouds.compute.terminate(instance_id).await?;
                }
                done(Created::default())
            }
            NodeState::DeletingSecret => {
                clouds.secrets.delete(&node.secret_name()).await?;
                done(Created::default())
            }
            NodeState::DeletingTunnel => {
                if let Some(tunnel) = clouds.cloudflare.find_tunnel(&node.tunnel_name()).await? {
                    clouds
                        .cloudflare
                        .delete_tunnel(&tunnel.id.to_string())
                        .await?;
                }
                done(Created::default())
            }
            NodeState::Ready | NodeState::Failed | NodeState::Suspended | NodeState::Terminated => {
                Ok(Outcome::NotYet("not a state with a step"))
            }
        }
    }
}

/// The tunnel's routes: the node's name to its local service, and nothing else.
pub fn ingress(node: &Node, edge_service_port: u16) -> TunnelConfig {
    TunnelConfig {
        ingress: vec![
            IngressRule {
                hostname: Some(node.hostname.clone()),
                service: format!("http://localhost:{edge_service_port}"),
            },
            IngressRule {
                hostname: None,
                service: "http_status:404".into(),
            },
        ],
    }
}

/// The same for every try within one generation, new after an operator's replay.
fn idempotency_token(node: &Node) -> String {
    format!("{}-g{:08}", node.id.simple(), node.generation)
}

fn required<'a>(
    node: &Node,
    what: &'static str,
    value: &'a Option<String>,
) -> CloudResult<&'a str> {
    value.as_deref().ok_or_else(|| {
        CloudError::permanent(
            "state machine",
            format!("node in state {} has no {what}", node.state()),
        )
    })
}

/// Exponential backoff with full jitter: a uniform delay in [0, min(max, base * 2^attempt)].
pub fn full_jitter_backoff(pacing: &Pacing, attempt: u32) -> Duration {
    let ceiling = pacing
        .retry_base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(pacing.retry_max);
    let millis = ceiling.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let pacing = Pacing {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            retry_budget: 5,
            poll_interval: Duration::from_millis(10),
            wait_budget: Duration::from_secs(1),
            lease: Duration::from_secs(1),
        };
        for attempt in 0..40 {
            let d = full_jitter_backoff(&pacing, attempt);
            let ceiling = (100u64 << attempt.min(20)).min(1000);
            assert!(d <= Duration::from_millis(ceiling), "{d:?} at {attempt}");
        }
    }
}
