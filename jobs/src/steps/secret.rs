//! The node's tunnel token in Secrets Manager, and its binding to the one instance that may
//! read it.

use super::{done, idempotency_token, required, Outcome, StepContext};
use crate::cloud::CloudResult;
use crate::model::Created;
use crate::model::Node;

/// Stores the tunnel's token as `hive/nodes/<node>/tunnel-token` (never in the database, a log
/// or user-data). Undo: [`delete`].
pub async fn store_token(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let tunnel_id = required(node, "tunnel_id", &node.tunnel_id)?;
    let token = ctx.clouds.cloudflare.tunnel_token(tunnel_id).await?;
    let arn = ctx
        .aws
        .secrets
        .store_tunnel_token(node.id, &token, &idempotency_token(node))
        .await?;
    Ok(Outcome::Done(Created {
        secret_arn: Some(arn),
        ..Created::default()
    }))
}

/// Deletes the node's secret, found by name; none left counts as done.
pub async fn delete(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    ctx.aws.secrets.delete(&node.secret_name()).await?;
    done()
}

/// Tags the secret with the instance's ARN, so that only this instance's role may read it.
/// No undo of its own: the tag goes with the secret.
pub async fn bind_to_instance(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let secret_arn = required(node, "secret_arn", &node.secret_arn)?;
    // Its ARN names the account, which EC2 tells; a young instance it may not show yet.
    let instance = match super::instance::current(ctx, node).await? {
        Ok(instance) => instance,
        Err(not_yet) => return Ok(not_yet),
    };
    ctx.aws
        .secrets
        .bind_to_instance(secret_arn, &instance.arn)
        .await?;
    done()
}
