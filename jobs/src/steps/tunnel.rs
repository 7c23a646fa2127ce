//! The node's Cloudflare tunnel: created, given its ingress, waited on until cloudflared on the
//! node has connected, and deleted.

use super::{done, required, Outcome, StepContext};
use crate::cloud::cloudflare::{IngressRule, TunnelConfig, TunnelHealth};
use crate::cloud::CloudResult;
use crate::model::Created;
use crate::model::Node;

/// Creates the tunnel `hive-<node>`, or adopts the one a crashed run made.
/// Undo: [`delete`].
pub async fn create(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let cloudflare = &ctx.clouds.cloudflare;
    let name = node.tunnel_name();
    let tunnel = match cloudflare.find_tunnel(&name).await? {
        Some(existing) => existing,
        None => cloudflare.create_tunnel(&name).await?,
    };
    Ok(Outcome::Done(Created {
        tunnel_id: Some(tunnel.id.to_string()),
        ..Created::default()
    }))
}

/// Deletes the node's tunnel, found by name; none left counts as done.
pub async fn delete(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let cloudflare = &ctx.clouds.cloudflare;
    if let Some(tunnel) = cloudflare.find_tunnel(&node.tunnel_name()).await? {
        cloudflare.delete_tunnel(&tunnel.id.to_string()).await?;
    }
    done()
}

/// Routes the node's name to its local service, and nothing else (a PUT that replaces).
/// No undo of its own: the ingress goes with the tunnel.
pub async fn configure_ingress(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
    ctx.clouds
        .cloudflare
        .configure_tunnel(tunnel_id, &ingress(node, ctx.config.edge_service_port))
        .await?;
    done()
}

/// Waits until cloudflared on the node has connected. No undo: it only reads.
pub async fn wait_healthy(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
    match ctx.clouds.cloudflare.tunnel_health(tunnel_id).await? {
        TunnelHealth::Healthy => done(),
        TunnelHealth::NotHealthy => Ok(Outcome::NotYet("tunnel is not connected yet")),
    }
}

/// The tunnel's routes: the node's name to its local service, then a 404 for anything else.
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
