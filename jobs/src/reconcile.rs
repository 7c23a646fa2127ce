//! The reconciler: compares what exists in the clouds with the nodes in Postgres, like a
//! kube-rs controller compares the world with its objects.
//!
//! - A tagged instance, a `hive-<node>` tunnel, a `hive/nodes/<node>/...` secret or a
//!   `<node>.<domain>` record (Cloudflare or Route 53) whose node has no row, is `terminated`,
//!   or is to be gone and failed its teardown for good, is an orphan and is removed once older
//!   than the grace period (Route 53 keeps no age). Who owns what is read after every listing,
//!   never before: a listing can take minutes, and a node created meanwhile has a row before
//!   it makes anything, so a fresh read knows every owner of what was listed.
//! - A `ready` node whose instance, secret or tunnel has vanished is sent back to the step
//!   that creates it, with a new generation, and its job enqueued (an instance whose tunnel is
//!   replaced is replaced too: it holds the old tunnel's token).
//! - Drift on a `ready` node is fixed in place: a missing Route 53 record is put back, a CNAME
//!   that does not route into the node's tunnel is pointed back, an instance stopped behind
//!   our back is started, a secret bound to another instance (or none) is bound to the node's, and an instance of another type is
//!   recorded as such so that the resize workflow converges on the node's type.
//! - Every region the worker drives is listed (instances by tag, secrets by path, a hundred or
//!   more a page), and each node is judged only in its own region; the calls of a pass grow
//!   with the number of pages, not of nodes.
//!
//! Everything found and done is logged and recorded in `node_events` (for nodes) and
//! `reconcile_runs`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cloud::cloudflare::{routes_to_tunnel, tunnel_target};
use crate::cloud::{CloudError, Clouds};
use crate::model::NodeState;
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ReconcileError {
    fn from(e: sqlx::Error) -> Self {
        ReconcileError::Store(StoreError::Database(e))
    }
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Orphans removed, as `kind id`.
    pub removed: Vec<String>,
    /// Ready nodes whose resources vanished, sent back to provisioning.
    pub reprovisioned: Vec<Uuid>,
    /// Drift fixed in place on ready nodes, as `what (node id)`: a CNAME pointing elsewhere.
    pub repaired: Vec<String>,
}

/// Nodes that own resources (every node with a row that is not `terminated`), with the region
/// their instance and secret live in.
async fn owning_nodes(pool: &PgPool) -> Result<HashMap<Uuid, String>, ReconcileError> {
    Ok(store::owning_nodes(pool).await?.into_iter().collect())
}

/// Whether a resource named for `node_id`, found in `region` (`None`: a global provider), has
/// no owner: no such node, or a node that lives in another region.
fn orphan(owners: &HashMap<Uuid, String>, node_id: &str, region: Option<&str>) -> bool {
    match Uuid::parse_str(node_id) {
        Ok(id) => match owners.get(&id) {
            None => true,
            Some(home) => region.is_some_and(|found_in| found_in != home),
        },
        // Not named like one of ours: not ours to delete.
        Err(_) => false,
    }
}

/// One reconcile pass, on demand (an operator's `hivectl reconcile`).
pub async fn reconcile(
    pool: &PgPool,
    clouds: &Clouds,
    node_domain: &str,
    grace: Duration,
) -> Result<Report, ReconcileError> {
    // A pass without a tick claims nothing another could hold, so it always runs.
    Ok(claim_and_run(pool, clouds, node_domain, grace, None)
        .await?
        .unwrap_or_default())
}

/// What a pass would remove and send back, without doing it (`hivectl reconcile --dry-run`);
/// no run is recorded.
pub async fn dry_run(
    pool: &PgPool,
    clouds: &Clouds,
    node_domain: &str,
    grace: Duration,
) -> Result<Report, ReconcileError> {
    pass(pool, clouds, node_domain, grace, Mode::DryRun).await
}

/// Whether a pass changes what it finds or only reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Act,
    DryRun,
}

/// The pass of a scheduled tick, unless another worker has claimed that tick (`None`).
pub async fn reconcile_tick(
    pool: &PgPool,
    clouds: &Clouds,
    node_domain: &str,
    grace: Duration,
    tick: DateTime<Utc>,
) -> Result<Option<Report>, ReconcileError> {
    claim_and_run(pool, clouds, node_domain, grace, Some(tick)).await
}

/// Records the pass's start (claiming its tick, if it has one), runs it and records its end.
async fn claim_and_run(
    pool: &PgPool,
    clouds: &Clouds,
    node_domain: &str,
    grace: Duration,
    tick: Option<DateTime<Utc>>,
) -> Result<Option<Report>, ReconcileError> {
    match store::claim_reconcile_run(pool, tick).await? {
        None => Ok(None),
        Some(run) => Ok(Some(
            record_pass(
                pool,
                run,
                pass(pool, clouds, node_domain, grace, Mode::Act).await,
            )
            .await?,
        )),
    }
}

/// Writes what a pass found and did (or why it stopped) to its `reconcile_runs` row.
async fn record_pass(
    pool: &PgPool,
    run: i64,
    outcome: Result<Report, ReconcileError>,
) -> Result<Report, ReconcileError> {
    let (report, error) = match &outcome {
        Ok(report) => (report.clone(), None),
        Err(e) => (Report::default(), Some(e.to_string())),
    };
    crate::metrics::reconcile_pass(
        error.is_none(),
        report.removed.len(),
        report.reprovisioned.len(),
        report.repaired.len(),
    );
    store::finish_reconcile_run(
        pool,
        run,
        &report.removed,
        &report.reprovisioned,
        error.as_deref(),
    )
    .await?;
    if !report.removed.is_empty() {
        tracing::warn!(removed = ?report.removed, "reconciler removed orphans");
    }
    outcome
}

async fn pass(
    pool: &PgPool,
    clouds: &Clouds,
    node_domain: &str,
    grace: Duration,
    mode: Mode,
) -> Result<Report, ReconcileError> {
    let act = mode == Mode::Act;
    let started = Utc::now();
    let grace = chrono::TimeDelta::from_std(grace).unwrap_or_default();
    let mut report = Report::default();

    // First every listing (one per provider, per region for EC2 and Secrets Manager; they
    // serve both the orphans and the ready nodes' checks), then who owns what: a listing can
    // take minutes over a large fleet, and an owner read before it would not know the nodes
    // created meanwhile, whose resources it lists. A node's row exists before anything of
    // it is made, so every resource listed has its owner in a read made after the listing.
    let mut instances_by_region = HashMap::new();
    let mut secrets_by_region = HashMap::new();
    for aws in &clouds.regions {
        let region = aws.settings.name.as_str();
        instances_by_region.insert(region, aws.compute.list_tagged().await?);
        secrets_by_region.insert(region, aws.secrets.list_node_secrets().await?);
    }
    let tunnels = clouds.cloudflare.list_tunnels("hive-").await?;
    let cnames = clouds.cloudflare.list_cnames().await?;
    // A set: each ready node below looks its name up in it.
    let route53_names: HashSet<String> = clouds.route53.list_cnames().await?.into_iter().collect();
    let owners = owning_nodes(pool).await?;
    // And, as a last guard, nothing younger than the grace is removed (a Route 53 record has
    // no age to tell: the fresh read of owners is its guard).
    let old_enough = |made: Option<DateTime<Utc>>| made.is_none_or(|at| started - at > grace);

    for aws in &clouds.regions {
        let region = aws.settings.name.as_str();
        for (instance, node_id) in instances_by_region.get(region).into_iter().flatten() {
            if orphan(&owners, node_id, Some(region)) && old_enough(instance.launched_at) {
                if act {
                    aws.compute.terminate(&instance.id).await?;
                }
                report.removed.push(format!(
                    "instance {} in {region} (node {node_id})",
                    instance.id
                ));
            }
        }
        for secret in secrets_by_region.get(region).into_iter().flatten() {
            let name = &secret.name;
            let node_id = name
                .trim_start_matches("hive/nodes/")
                .split('/')
                .next()
                .unwrap_or_default();
            if orphan(&owners, node_id, Some(region)) && old_enough(secret.created_at) {
                if act {
                    aws.secrets.delete(name).await?;
                }
                report.removed.push(format!("secret {name} in {region}"));
            }
        }
    }
    for tunnel in &tunnels {
        let node_id = tunnel.name.trim_start_matches("hive-");
        if orphan(&owners, node_id, None) && old_enough(Some(tunnel.created_at)) {
            if act {
                clouds
                    .cloudflare
                    .delete_tunnel(&tunnel.id.to_string())
                    .await?;
            }
            report.removed.push(format!("tunnel {}", tunnel.name));
        }
    }
    let suffix = format!(".{node_domain}");
    for record in &cnames {
        if let Some(node_id) = record.name.strip_suffix(&suffix) {
            if orphan(&owners, node_id, None) && old_enough(Some(record.created_on)) {
                if act {
                    clouds.cloudflare.delete_dns_record(&record.id).await?;
                }
                report
                    .removed
                    .push(format!("cloudflare record {}", record.name));
            }
        }
    }
    for name in &route53_names {
        if let Some(node_id) = name.strip_suffix(&suffix) {
            if orphan(&owners, node_id, None) {
                if act {
                    clouds.route53.delete(name).await?;
                }
                report.removed.push(format!("route53 record {name}"));
            }
        }
    }

    // Ready nodes whose instance or tunnel is gone go back to the step that makes it; drift
    // that can be fixed in place is fixed in place. Judged from the listings above; what they
    // miss is looked up once more (it may have been made after the listing).
    for node in store::ready_nodes(pool).await? {
        let (id, instance_id, tunnel_id) = (node.id, node.instance_id, node.tunnel_id);
        // Each node is judged in its own region only; a region another worker drives is its.
        let (Some(aws), Some(instances), Some(secrets)) = (
            clouds.region(&node.region),
            instances_by_region.get(node.region.as_str()),
            secrets_by_region.get(node.region.as_str()),
        ) else {
            tracing::debug!(node_id = %id, region = %node.region, "not judged: region not driven here");
            continue;
        };
        let tunnel_name = crate::model::tunnel_name(id);
        let tunnel_gone = match &tunnel_id {
            None => true,
            Some(_) if tunnels.iter().any(|t| t.name == tunnel_name) => false,
            Some(_) => clouds.cloudflare.find_tunnel(&tunnel_name).await?.is_none(),
        };
        let instance = match &instance_id {
            None => None,
            Some(i) => match instances.iter().find(|(x, _)| x.id == *i) {
                Some((listed, _)) => Some(listed.clone()),
                None => aws.compute.describe(i).await?,
            },
        };
        let instance_state = instance.as_ref().map(|i| i.state.as_str());
        let instance_gone = !matches!(
            instance_state,
            Some("running" | "pending" | "stopping" | "stopped")
        );
        // Stopped behind our back while it should run: started again, the same instance.
        if !tunnel_gone && instance_state == Some("stopped") {
            if let Some(instance) = &instance {
                if act {
                    aws.compute.start(&instance.id).await?;
                    tracing::warn!(node_id = %id, instance_id = %instance.id, "a ready node's instance was stopped; started it");
                    store::log_reconciled(pool, id, "instance was stopped; started again").await?;
                }
                report
                    .repaired
                    .push(format!("instance {} started (node {id})", instance.id));
            }
            continue;
        }
        let secret_name = crate::model::secret_name(id);
        let secret = secrets.iter().find(|s| s.name == secret_name);
        if let (false, false, Some(instance)) = (tunnel_gone, instance_gone, &instance) {
            // Resized behind our back (or by a resize that never recorded it): what runs is
            // recorded, and the resize workflow converges on what the node asks for.
            if node.applied_instance_type.as_deref() != Some(instance.instance_type.as_str()) {
                if act && store::observe_instance_type(pool, id, &instance.instance_type).await? {
                    tracing::warn!(node_id = %id, instance_type = %instance.instance_type, "a ready node's instance runs as another type; resizing");
                    store::log_reconciled(
                        pool,
                        id,
                        &format!("instance runs as {}; resizing", instance.instance_type),
                    )
                    .await?;
                }
                report.repaired.push(format!(
                    "instance {} type {} (node {id})",
                    instance.id, instance.instance_type
                ));
                continue;
            }
            // The secret must be readable by this instance, and by no other.
            if let Some(secret) = secret.filter(|s| s.bound_to.as_deref() != Some(&instance.arn)) {
                if act {
                    aws.secrets
                        .bind_to_instance(&secret.name, &instance.arn)
                        .await?;
                    tracing::warn!(node_id = %id, "the node's secret was not bound to its instance; bound");
                    store::log_reconciled(pool, id, "secret bound to the node's instance again")
                        .await?;
                }
                report
                    .repaired
                    .push(format!("secret {} bound (node {id})", secret.name));
            }
        }
        let secret_gone = secret.is_none();
        let restart_at = if tunnel_gone {
            NodeState::CreatingTunnel
        } else if secret_gone {
            NodeState::StoringSecret
        } else if instance_gone {
            NodeState::LaunchingInstance
        } else {
            let hostname = format!("{id}{suffix}");
            // Its public name at Route 53, looked up once more when the listing missed it.
            let route53_missing = !route53_names.contains(&hostname)
                && clouds.route53.find_record(&hostname).await?.is_none();
            if route53_missing {
                if act {
                    clouds.route53.upsert(&hostname).await?;
                    tracing::warn!(node_id = %id, "the node's Route 53 record was missing; put back");
                    store::log_reconciled(pool, id, "route 53 record put back").await?;
                }
                report
                    .repaired
                    .push(format!("route53 record {hostname} (node {id})"));
            }
            // Both are there: the name must route into this node's tunnel.
            if let Some(tunnel_id) = &tunnel_id {
                let record = cnames.iter().find(|r| r.name == hostname);
                let fixed = match record {
                    Some(r) if routes_to_tunnel(r, tunnel_id) => false,
                    Some(r) => {
                        if act {
                            clouds
                                .cloudflare
                                .repoint_proxied_cname(&r.id, &hostname, &tunnel_target(tunnel_id))
                                .await?;
                        }
                        true
                    }
                    None => {
                        if act {
                            clouds
                                .cloudflare
                                .create_proxied_cname(&hostname, &tunnel_target(tunnel_id))
                                .await?;
                        }
                        true
                    }
                };
                if fixed {
                    let what = format!("cloudflare record {hostname} (node {id})");
                    if act {
                        tracing::warn!(node_id = %id, "the node's CNAME did not route into its tunnel; fixed");
                        store::log_reconciled(pool, id, "cname repointed at the node's tunnel")
                            .await?;
                    }
                    report.repaired.push(what);
                }
            }
            continue;
        };
        let why = if tunnel_gone {
            "tunnel vanished"
        } else if secret_gone {
            "secret vanished"
        } else {
            "instance vanished"
        };
        // An instance holds its tunnel's token: one whose tunnel is replaced is replaced too,
        // or it would keep serving (nothing) with the old token while the node says ready.
        if tunnel_gone {
            if let Some(old) = instance.as_ref().filter(|_| !instance_gone) {
                if act {
                    aws.compute.terminate(&old.id).await?;
                }
                report.repaired.push(format!(
                    "instance {} replaced with its tunnel (node {id})",
                    old.id
                ));
            }
        }
        if !act {
            report.reprovisioned.push(id);
        } else if store::send_back_to(pool, id, restart_at, tunnel_gone, why).await? {
            tracing::warn!(node_id = %id, why, "ready node sent back to provisioning");
            report.reprovisioned.push(id);
        }
    }
    Ok(report)
}
