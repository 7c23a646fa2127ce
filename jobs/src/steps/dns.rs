//! The node's public name: a proxied Cloudflare CNAME into its tunnel, and the Route 53 CNAME
//! that sends the name to Cloudflare's edge.

use super::{done, required, Outcome, StepContext};
use crate::cloud::cloudflare::{routes_to_tunnel, tunnel_target};
use crate::cloud::route53::{Propagation, Route53};
use crate::cloud::CloudResult;
use crate::model::Created;
use crate::model::Node;

/// The proxied CNAME `<node>.<domain>` → `<tunnel>.cfargotunnel.com`. A record of that name
/// that exists already is kept only if it points at the node's current tunnel; else it is
/// pointed there (a record left by an earlier tunnel would route the name nowhere).
/// Undo: [`delete_cloudflare`].
pub async fn route_cloudflare(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
    let cloudflare = &ctx.clouds.cloudflare;
    let target = tunnel_target(tunnel_id);
    let record = match cloudflare.find_cname(&node.hostname).await? {
        Some(existing) if routes_to_tunnel(&existing, tunnel_id) => existing,
        Some(elsewhere) => {
            tracing::warn!(record = %elsewhere.id, "the node's CNAME pointed elsewhere; repointing");
            cloudflare
                .repoint_proxied_cname(&elsewhere.id, &node.hostname, &target)
                .await?
        }
        None => {
            cloudflare
                .create_proxied_cname(&node.hostname, &target)
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

/// The Route 53 CNAME `<node>.<domain>` → `<node>.<domain>.cdn.cloudflare.net`, until Route
/// 53 has it on every name server. AWS answers every change `PENDING` and tells `INSYNC` only
/// through `GetChange` of that change, so the step makes one UPSERT, writes its change id down
/// before waiting, and on each later look asks `GetChange` of it. (A node entering this step
/// starts with no change recorded: the reconciler's way back makes a fresh UPSERT.) Undo:
/// [`delete_route53`].
pub async fn route_route53(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let route53 = &ctx.clouds.route53;
    if let Some(change) = &node.route53_change_id {
        match route53.change_status(change).await? {
            Some(Propagation::InSync) => return done(),
            Some(Propagation::Pending) => return Ok(Outcome::NotYet(PENDING)),
            // Forgotten by Route 53: in sync if the record is there as the node needs it.
            None => {
                if route53
                    .find_record(&node.hostname)
                    .await?
                    .is_some_and(|r| Route53::is_wanted(&r, &node.hostname))
                {
                    return done();
                }
            }
        }
    }
    let (change, propagation) = route53.upsert(&node.hostname).await?;
    if propagation == Propagation::InSync {
        return done();
    }
    ctx.progress.route53_change(node, &change).await?;
    Ok(Outcome::NotYet(PENDING))
}

const PENDING: &str = "route 53 change is pending";

/// Deletes the node's Route 53 record; none left counts as done.
pub async fn delete_route53(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    ctx.clouds.route53.delete(&node.hostname).await?;
    done()
}
