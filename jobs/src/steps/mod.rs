//! The steps of every workflow, one file per resource, each forward action beside its undo.
//!
//! A step is one external side effect: it looks at what exists first and converges on what the
//! node needs, so running it twice changes nothing the second time, and a step repeated after a
//! crash adopts what the first run made. A waiting step never sleeps: it answers
//! [`Outcome::NotYet`] and the engine looks again later. Which step runs in which state is the
//! table in `model/workflows.rs` ([`run_step`] is made from it here); what happens after a
//! step is `policy::decide`. The steps know the clouds and the model, never the store: what
//! they must record goes through [`Progress`] and their [`Outcome`].

pub mod dns;
pub mod instance;
pub mod region;
pub mod secret;
pub mod teardown;
pub mod tunnel;

use crate::cloud::{CloudError, CloudResult, Clouds, RegionClouds};
use crate::config::WorkerConfig;
use crate::model::Created;
use crate::model::{Node, NodeState};

/// What a step may use: the clouds and the worker's settings.
pub struct StepContext<'a> {
    /// Cloudflare and Route 53 (global).
    pub clouds: &'a Clouds,
    /// EC2 and Secrets Manager in the node's own region, with its launch settings.
    pub aws: &'a RegionClouds,
    pub config: &'a WorkerConfig,
    /// Where a step writes down, before a side effect, what a retry must repeat.
    pub progress: &'a dyn Progress,
}

/// A future that a [`Progress`] hands back.
pub type ProgressFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = CloudResult<()>> + Send + 'a>>;

/// What a step records before its side effect, fenced like its commit (an error when the node
/// moved on under this run: the side effect must then not happen). Kept to an interface so the
/// steps know nothing of the store.
pub trait Progress: Send + Sync {
    /// The launch attempt (its `ClientToken`) about to be sent.
    fn launch_attempt<'a>(&'a self, node: &'a Node, token: &'a str) -> ProgressFuture<'a>;
    /// The Route 53 change made, to be waited on by later looks.
    fn route53_change<'a>(&'a self, node: &'a Node, change_id: &'a str) -> ProgressFuture<'a>;
}

/// Makes `run_step` from the workflow table's rows: each state's step function, resolved here
/// where the step files are.
macro_rules! declare_dispatch {
    ( $( $state:ident => $action:path ; )+ ) => {
        /// Runs the side effect of the node's current step.
        pub(crate) async fn run_step(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
            match node.state() {
                $( NodeState::$state => $action(ctx, node).await, )+
                _ => Ok(Outcome::NotYet("not a state with a step")),
            }
        }
    };
}

crate::model::workflows::step_rows!(declare_dispatch);

/// What a step did.
// One is made per step and moved once; boxing `Created` would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The side effect is done (or was found done): move on, recording what was created.
    Done(Created),
    /// Nothing to do yet: look again later.
    NotYet(&'static str),
}

/// Done, with nothing new to record.
pub(crate) fn done() -> CloudResult<Outcome> {
    Ok(Outcome::Done(Created::default()))
}

/// A value an earlier step recorded on the row, which this step needs.
pub(crate) fn required<'a>(
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

/// The same for every try within one generation, new after an operator's replay.
pub(crate) fn idempotency_token(node: &Node) -> String {
    format!("{}-g{:08}", node.id.simple(), node.generation)
}

/// Whether the node's last launch attempt (or its instance's record) is too recent for EC2's
/// "not found" to mean gone: EC2's reads are eventually consistent, and an instance may not
/// show, by id or by tag, for a while after `RunInstances` (`HIVE_EC2_CONSISTENCY_SECS`).
pub(crate) fn instance_is_young(ctx: &StepContext<'_>, node: &Node) -> bool {
    let window = chrono::TimeDelta::from_std(ctx.config.ec2_consistency).unwrap_or_default();
    node.instance_launched_at
        .is_some_and(|at| chrono::Utc::now() - at < window)
}
