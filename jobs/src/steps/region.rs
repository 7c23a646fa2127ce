//! The region check that opens provisioning.

use super::{done, Outcome, StepContext};
use crate::cloud::{CloudError, CloudResult};
use crate::model::Node;

/// A node is only ever acted on in its own region: the engine hands every step the clients of
/// the node's region, and this check makes that explicit in the node's log before anything is
/// created. No undo: a check makes nothing.
pub async fn check_served(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    if node.region != ctx.aws.settings.name {
        return Err(CloudError::permanent(
            "worker",
            format!(
                "node of region {} handed the clients of {}",
                node.region, ctx.aws.settings.name
            ),
        ));
    }
    done()
}
