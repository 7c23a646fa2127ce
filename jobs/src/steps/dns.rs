//! The node's public name: a proxied Cloudflare CNAME into its tunnel, and the Route 53 CNAME
//! that sends the name to Cloudflare's edge.

use super::{done, required, Outcome, StepContext};
use crate::cloud::cloudflare::tunnel_target;
use crate::cloud::route53::Propagation;
use crate::cloud::CloudResult;
use crate::model::Node;
use crate::store::Created;

/// The proxied CNAME `<node>.<domain>` → `<tunnel>.cfargotunnel.com`, adopted when it exists.
/// Undo: [`delete_cloudflare`].
pub async fn route_cloudflare(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
    let cloudflare = &ctx.clouds.cloudflare;
    let record = match cloudflare.find_cname(&node.hostname).await? {
        Some(existing) => existing,
        None => {
            cloudflare
                .create_proxied_cname(&node.hostname, &tunnel_target(tunnel_id))
                .await?
        }
    };
    Ok(Outcome::Done(Created {
        dns_record_id: Some(record.id),
        ..Created::default()
    }))
}

/// Deletes the node's Cloudflare record, found by name; none left counts as done.
pub async fn delete_cloudflare(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let cloudflare = &ctx.clouds.cloudflare;
    if let Some(record) = cloudflare.find_cname(&node.hostname).await? {
        cloudflare.delete_dns_record(&record.id).await?;
    }
    done()
}

/// The Route 53 CNAME `<node>.<domain>` → `<node>.<domain>.cdn.cloudflare.net` (an UPSERT),
/// until Route 53 reports it in sync. Undo: [`delete_route53`].
pub async fn route_route53(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let (_change, propagation) = ctx.clouds.route53.upsert(&node.hostname).await?;
    match propagation {
        Propagation::InSync => done(),
        Propagation::Pending => Ok(Outcome::NotYet("route 53 change is pending")),
    }
}

/// Deletes the node's Route 53 record; none left counts as done.
pub async fn delete_route53(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    ctx.clouds.route53.delete(&node.hostname).await?;
    done()
}
