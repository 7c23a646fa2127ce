//! The first teardown step: it only marks the start of the undos, which are each resource's own
//! steps.

use super::{done, Outcome, StepContext};
use crate::cloud::CloudResult;
use crate::model::Node;

/// Has no side effect; the undos follow in the teardown's order.
pub async fn begin(_: &StepContext<'_>, _: &Node) -> CloudResult<Outcome> {
    done()
}
