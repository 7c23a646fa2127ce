//! The region check that opens provisioning.

use super::{done, Outcome, StepContext};
use crate::cloud::{CloudError, CloudResult};
use crate::model::Node;

/// A node is only ever acted on in its own region. No undo: a check makes nothing.
pub async fn check_served(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    if node.region != ctx.region {
        return Err(CloudError::permanent(
            "worker",
            format!(
                "region {} is not served by this worker ({})",
                node.region, ctx.region
            ),
        ));
    }
    done()
}
