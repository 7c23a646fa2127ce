//! The reconciler: compares what exists in the clouds with the nodes in Postgres, like a
//! kube-rs controller compares the world with its objects.
//!
//! - A tagged instance, a `hive-<node>` tunnel, a `hive/nodes/<node>/...` secret or a
//!   `<node>.<domain>` record (Cloudflare or Route 53) whose node has no row, or is
//!   `terminated`, is an orphan and is removed (instances and tunnels only once older than the
//!   grace period, as a last guard against a race with a step that is creating them).
//! - A `ready` node whose instance or tunnel has vanished is sent back to the step that
//!   creates it, with a new generation, and its job enqueued.
//!
//! Everything found and done is logged and recorded in `node_events` (for nodes) and
//! `reconcile_runs`.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cloud::CloudError;
use crate::model::NodeState;
use crate::provision::Clouds;
use crate::queue;
use crate::store::StoreError;

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
}

/// Node ids that own resources: every node with a row that is not `terminated`.
async fn owning_nodes(pool: &PgPool) -> Result<HashSet<Uuid>, ReconcileError> {
    let rows: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM nodes WHERE state <> 'terminated'")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

fn orphan(owners: &HashSet<Uuid>, node_id: &str) -> bool {
    match Uuid::parse_str(node_id) {
        Ok(id) => !owners.contains(&id),
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
    let claimed: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO reconcile_runs (started_at, tick, removed, reprovisioned) \
         VALUES (now(), $1, '[]', '[]') ON CONFLICT (tick) DO NOTHING RETURNING id",
    )
    .bind(tick)
    .fetch_optional(pool)
    .await?;
    match claimed {
        None => Ok(None),
        Some((run,)) => Ok(Some(
            record_pass(pool, run, pass(pool, clouds, node_domain, grace).await).await?,
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
    sqlx::query(
        "UPDATE reconcile_runs SET finished_at = now(), removed = $2, reprovisioned = $3, \
         error = $4 WHERE id = $1",
    )
    .bind(run)
    .bind(serde_json::json!(report.removed))
    .bind(serde_json::json!(report.reprovisioned))
    .bind(error)
    .execute(pool)
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
) -> Result<Report, ReconcileError> {
    let started = Utc::now();
    let grace = chrono::TimeDelta::from_std(grace).unwrap_or_default();
    let owners = owning_nodes(pool).await?;
    let mut report = Report::default();

    for (instance, node_id) in clouds.compute.list_tagged().await? {
        if orphan(&owners, &node_id) {
            clouds.compute.terminate(&instance.id).await?;
            report
                .removed
                .push(format!("instance {} (node {node_id})", instance.id));
        }
    }
    for tunnel in clouds.cloudflare.list_tunnels("hive-").await? {
        let node_id = tunnel.name.trim_start_matches("hive-");
        if orphan(&owners, node_id) && started - tunnel.created_at > grace {
            clouds
                .cloudflare
                .delete_tunnel(&tunnel.id.to_string())
                .await?;
            report.removed.push(format!("tunnel {}", tunnel.name));
        }
    }
    for name in clouds.secrets.list_node_secrets().await? {
        let node_id = name
            .trim_start_matches("hive/nodes/")
            .split('/')
            .next()
            .unwrap_or_default();
        if orphan(&owners, node_id) {
            clouds.secrets.delete(&name).await?;
            report.removed.push(format!("secret {name}"));
        }
    }
    let suffix = format!(".{node_domain}");
    for record in clouds.cloudflare.list_cnames().await? {
        if let Some(node_id) = record.name.strip_suffix(&suffix) {
            if orphan(&owners, node_id) {
                clouds.cloudflare.delete_dns_record(&record.id).await?;
                report
                    .removed
                    .push(format!("cloudflare record {}", record.name));
            }
        }
    }
    for name in clouds.route53.list_cnames().await? {
        if let Some(node_id) = name.strip_suffix(&suffix) {
            if orphan(&owners, node_id) {
                clouds.route53.delete(&name).await?;
                report.removed.push(format!("route53 record {name}"));
            }
        }
    }

    // Ready nodes whose instance or tunnel is gone go back to the step that makes it.
    let ready: Vec<(Uuid, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, instance_id, tunnel_id FROM nodes WHERE state = 'ready'")
            .fetch_all(pool)
            .await?;
    for (id, instance_id, tunnel_id) in ready {
        let tunnel_gone = match tunnel_id {
            None => true,
            Some(_) => clouds
                .cloudflare
                .find_tunnel(&crate::model::tunnel_name(id))
                .await?
                .is_none(),
        };
        let instance_gone = match &instance_id {
            None => true,
            Some(i) => clouds
                .compute
                .describe(i)
                .await?
                .is_none_or(|i| i.state != "running"),
        };
        let restart_at = if tunnel_gone {
            NodeState::CreatingTunnel
        } else if instance_gone {
            NodeState::LaunchingInstance
        } else {
            continue;
        };
        let why = if tunnel_gone {
            "tunnel vanished"
        } else {
            "instance vanished"
        };
        let mut tx = pool.begin().await?;
        let moved: Option<(i32,)> = sqlx::query_as(
            "UPDATE nodes SET state = $2, generation = generation + 1, attempt = 0, \
             step_started_at = now(), next_run_at = NULL, \
             tunnel_id = CASE WHEN $3 THEN NULL ELSE tunnel_id END, instance_id = NULL, \
             updated_at = now() WHERE id = $1 AND state = 'ready' RETURNING generation",
        )
        .bind(id)
        .bind(restart_at.as_str())
        .bind(tunnel_gone)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((generation,)) = moved {
            sqlx::query(
                "INSERT INTO node_events (node_id, generation, step, kind, detail) \
                 VALUES ($1, $2, $3, 'reconciled', $4)",
            )
            .bind(id)
            .bind(generation)
            .bind(restart_at.as_str())
            .bind(why)
            .execute(&mut *tx)
            .await?;
            queue::enqueue(&mut tx, &[id], Duration::ZERO).await?;
            tx.commit().await?;
            tracing::warn!(node_id = %id, why, "ready node sent back to provisioning");
            report.reprovisioned.push(id);
        }
    }
    Ok(report)
}
