//! What happens after a step, and which workflow a resting node starts: pure functions, in the
//! spirit of kube-rs's `error_policy -> Action`. The engine runs steps and carries out these
//! decisions; it decides nothing itself.

use std::time::Duration;

use crate::cloud::CloudError;
use crate::config::Pacing;
use crate::model::{Desired, Node, NodeState, TeardownReason, Workflow};

/// What the step just did.
#[derive(Debug, Clone, Copy)]
pub enum StepResult<'a> {
    /// Its side effect is done (or was found done).
    Done,
    /// Nothing to do yet; why.
    NotYet(&'a str),
    /// It failed.
    Failed(&'a CloudError),
}

/// What the step's run means for the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Commit the step and move to `to`.
    Advance { to: NodeState },
    /// Nothing to do yet: look again after `after` (not an attempt; `why` is shown as the
    /// node's `waiting_for`, never as an error).
    LookAgain { after: Duration, why: String },
    /// A transient failure: try again after `after` (an attempt; `error` is shown as the node's
    /// `last_error`).
    Retry { after: Duration, error: String },
    /// A permanent failure of a provisioning step: undo what was made, then rest `failed`.
    FailAndUndo { error: String },
    /// A permanent failure: rest `failed` at this step, everything kept for the operator.
    FailAndKeep { error: String },
}

/// The facts about the step that the decision rests on.
#[derive(Debug, Clone, Copy)]
pub struct StepFacts {
    pub state: NodeState,
    /// Transient failures of this step so far.
    pub attempt: u32,
    /// How long the step has been running or waiting, in all.
    pub waited: Duration,
    pub teardown_reason: Option<TeardownReason>,
}

impl StepFacts {
    pub fn of(node: &Node, now: chrono::DateTime<chrono::Utc>) -> Self {
        StepFacts {
            state: node.state(),
            attempt: node.attempt.max(0) as u32,
            waited: (now - node.step_started_at).to_std().unwrap_or_default(),
            teardown_reason: node.teardown_reason(),
        }
    }
}

/// The rules the decision follows (from the worker's settings).
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub pacing: &'a Pacing,
    /// Undo a failed provisioning (`HIVE_UNDO_FAILED`), or keep it for the operator.
    pub undo_failed: bool,
}

/// How long a waiting step rests before it looks again: the poll interval at first, one more
/// interval for every minute waited, at most six: what is slow to come is looked at less
/// often, which spares the providers' rate limits when many nodes wait at once.
pub fn poll_after(pacing: &Pacing, waited: Duration) -> Duration {
    const SLOWEST: f64 = 6.0;
    let factor = (1.0 + waited.as_secs_f64() / 60.0).min(SLOWEST);
    // Whole milliseconds: Postgres intervals hold microseconds, and the queue rounds anyway.
    let millis = pacing.poll_interval.as_millis() as f64 * factor;
    Duration::from_millis(millis.round() as u64)
}

/// Decides what a step's result means. `jitter` is a draw from [0, 1] that spreads retries
/// (full jitter); passing it in keeps this function pure.
pub fn decide(step: &StepFacts, result: StepResult<'_>, rules: &Rules<'_>, jitter: f64) -> Action {
    let pacing = rules.pacing;
    match result {
        StepResult::Done => Action::Advance {
            to: next_state(step.state, step.teardown_reason),
        },
        // A teardown never gives up on what is only slow or unavailable for now: a node left
        // failed would keep its instance running (and billed) until an operator noticed. It
        // retries with a capped backoff for as long as it takes; one stuck longer than
        // `config::teardown_stuck_after` is shown to the operator (`hivectl queue`, `doctor`,
        // a metric).
        StepResult::NotYet(why) if step.state.is_teardown() => Action::LookAgain {
            after: poll_after(pacing, step.waited),
            why: why.to_string(),
        },
        StepResult::Failed(error) if error.is_transient() && step.state.is_teardown() => {
            Action::Retry {
                after: full_jitter_backoff(pacing, step.attempt, jitter),
                error: error.to_string(),
            }
        }
        StepResult::NotYet(why) if step.waited > pacing.wait_budget => fail(
            step,
            rules,
            format!(
                "{}: gave up after {}s: {why}",
                step.state,
                step.waited.as_secs()
            ),
        ),
        StepResult::NotYet(why) => Action::LookAgain {
            after: poll_after(pacing, step.waited),
            why: why.to_string(),
        },
        StepResult::Failed(error)
            if error.is_transient() && step.attempt + 1 < pacing.retry_budget =>
        {
            Action::Retry {
                after: full_jitter_backoff(pacing, step.attempt, jitter),
                error: error.to_string(),
            }
        }
        StepResult::Failed(error) if error.is_transient() => fail(
            step,
            rules,
            format!("{error}; gave up after {} attempts", step.attempt + 1),
        ),
        StepResult::Failed(error) => fail(step, rules, error.to_string()),
    }
}

/// A failed provisioning is undone (unless configured to be kept); any other failed step is
/// kept for the operator (undoing a teardown would re-create what the customer stopped paying
/// for; a failed suspend or resize leaves the instance as it is for a replay to finish).
fn fail(step: &StepFacts, rules: &Rules<'_>, error: String) -> Action {
    if rules.undo_failed && step.state.is_provisioning() {
        Action::FailAndUndo { error }
    } else {
        Action::FailAndKeep { error }
    }
}

/// Where a node goes when its current step is done: the next step of its workflow, else the
/// workflow's end (a teardown ends where its reason says).
pub fn next_state(state: NodeState, teardown_reason: Option<TeardownReason>) -> NodeState {
    if let Some(next) = state.next_in_workflow() {
        return next;
    }
    match state.workflow() {
        Some(Workflow::Teardown) => teardown_reason
            .map(TeardownReason::end_state)
            .unwrap_or(NodeState::Terminated),
        Some(workflow) => workflow.end(),
        None => state,
    }
}

/// Exponential backoff with full jitter: `jitter` × min(max, base × 2^attempt), in whole
/// milliseconds (Postgres intervals hold microseconds at most).
pub fn full_jitter_backoff(pacing: &Pacing, attempt: u32, jitter: f64) -> Duration {
    let ceiling = pacing
        .retry_base
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(pacing.retry_max);
    let millis = ceiling.as_millis().min(u64::MAX as u128) as f64 * jitter.clamp(0.0, 1.0);
    Duration::from_millis(millis.round() as u64)
}

/// The node's intent, as the choice of a workflow needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent<'a> {
    pub state: NodeState,
    pub desired: Desired,
    pub instance_type: &'a str,
    pub volume_gb: i32,
    pub applied_instance_type: Option<&'a str>,
    pub applied_volume_gb: Option<i32>,
    /// The instance runs as `.0` in place of `.1`, for want of capacity.
    pub fallback: Option<(&'a str, &'a str)>,
    pub restarts_requested: i32,
    pub restarts_done: i32,
}

impl<'a> Intent<'a> {
    /// The node's intent at `now`: once a past-due grace has ended, a running node is to be
    /// suspended without anyone asking again.
    pub fn of(node: &'a Node, now: chrono::DateTime<chrono::Utc>) -> Self {
        let desired = match (node.desired(), node.suspend_at) {
            (Desired::Running, Some(at)) if at <= now => Desired::Suspended,
            (desired, _) => desired,
        };
        Intent {
            state: node.state(),
            desired,
            instance_type: &node.instance_type,
            volume_gb: node.volume_gb,
            applied_instance_type: node.applied_instance_type.as_deref(),
            applied_volume_gb: node.applied_volume_gb,
            fallback: node
                .fallback_type
                .as_deref()
                .zip(node.fallback_for.as_deref()),
            restarts_requested: node.restarts_requested,
            restarts_done: node.restarts_done,
        }
    }
}

/// The workflow a resting node starts to reach what was last asked of it, if any. Only a
/// resting node starts one: a request that arrives mid-workflow waits for the workflow to end,
/// so no step is interrupted and only the latest request is acted on.
pub fn workflow_for(intent: &Intent<'_>) -> Option<Workflow> {
    // A capacity fallback is what the node asked for, as long as it still asks for that.
    let fallen_back = |applied: &str| intent.fallback == Some((applied, intent.instance_type));
    let resize_needed = intent
        .applied_instance_type
        .is_some_and(|t| t != intent.instance_type && !fallen_back(t))
        || intent
            .applied_volume_gb
            .is_some_and(|v| v < intent.volume_gb);
    match (intent.state, intent.desired) {
        (NodeState::Ready, Desired::Suspended) => Some(Workflow::Suspend),
        (NodeState::Ready, Desired::Stopped) => Some(Workflow::Stop),
        (NodeState::Suspended | NodeState::Stopped, Desired::Running) => Some(Workflow::Resume),
        (NodeState::Ready, Desired::Running) if resize_needed => Some(Workflow::Resize),
        (NodeState::Ready, Desired::Running)
            if intent.restarts_requested > intent.restarts_done =>
        {
            Some(Workflow::Restart)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing() -> Pacing {
        Pacing {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            retry_budget: 3,
            poll_interval: Duration::from_millis(250),
            wait_budget: Duration::from_secs(60),
            lease: Duration::from_secs(1),
        }
    }

    fn facts(state: NodeState, attempt: u32, waited_s: u64) -> StepFacts {
        StepFacts {
            state,
            attempt,
            waited: Duration::from_secs(waited_s),
            teardown_reason: None,
        }
    }

    #[test]
    fn a_done_step_advances_within_its_workflow_then_to_its_end() {
        let pacing = pacing();
        let rules = Rules {
            pacing: &pacing,
            undo_failed: true,
        };
        let advance = |state, reason| {
            let mut f = facts(state, 0, 0);
            f.teardown_reason = reason;
            decide(&f, StepResult::Done, &rules, 0.5)
        };
        use NodeState::*;
        for (state, reason, to) in [
            (Pending, None, CreatingTunnel),
            (WaitingForTunnel, None, Ready),
            (Terminating, None, DeletingRoute53Record),
            (
                DeletingTunnel,
                Some(TeardownReason::SubscriptionEnded),
                Terminated,
            ),
            (DeletingTunnel, Some(TeardownReason::ScaledDown), Terminated),
            (
                DeletingTunnel,
                Some(TeardownReason::ProvisioningFailed),
                Failed,
            ),
            (StoppingInstance, None, WaitingForStop),
            (WaitingForStop, None, Suspended),
            (WaitingForReconnect, None, Ready),
            (RebootingInstance, None, WaitingAfterReboot),
            (WaitingAfterReboot, None, Ready),
            (GrowingVolume, None, StartingResized),
            (WaitingForResizedTunnel, None, Ready),
        ] {
            assert_eq!(advance(state, reason), Action::Advance { to }, "{state}");
        }
    }

    #[test]
    fn waiting_looks_again_until_the_budget_then_fails() {
        let pacing = pacing();
        let rules = Rules {
            pacing: &pacing,
            undo_failed: true,
        };
        let why = "instance is pending";
        assert_eq!(
            decide(
                &facts(NodeState::WaitingForInstance, 0, 0),
                StepResult::NotYet(why),
                &rules,
                0.5
            ),
            Action::LookAgain {
                after: Duration::from_millis(250),
                why: why.into()
            }
        );
        // Looked at less often the longer it waits, up to six intervals.
        assert_eq!(
            poll_after(&pacing, Duration::from_secs(30)),
            Duration::from_millis(375)
        );
        assert_eq!(
            poll_after(&pacing, Duration::from_secs(120)),
            Duration::from_millis(750)
        );
        assert_eq!(
            poll_after(&pacing, Duration::from_secs(3600)),
            Duration::from_millis(1500)
        );
        let odd = poll_after(&pacing, Duration::from_millis(12_345));
        assert_eq!(odd.subsec_nanos() % 1_000_000, 0, "{odd:?}");
        match decide(
            &facts(NodeState::WaitingForInstance, 0, 61),
            StepResult::NotYet(why),
            &rules,
            0.5,
        ) {
            Action::FailAndUndo { error } => {
                assert_eq!(
                    error,
                    "waiting_for_instance: gave up after 61s: instance is pending"
                )
            }
            other => panic!("{other:?}"),
        }
        // Outside provisioning a spent wait is kept, not undone.
        assert!(matches!(
            decide(
                &facts(NodeState::WaitingForStop, 0, 61),
                StepResult::NotYet("instance is stopping"),
                &rules,
                0.5
            ),
            Action::FailAndKeep { .. }
        ));
    }

    #[test]
    fn transient_failures_retry_with_jitter_until_the_budget() {
        let pacing = pacing();
        let rules = Rules {
            pacing: &pacing,
            undo_failed: true,
        };
        let error = CloudError::transient("ec2:RunInstances", "Throttling");
        for (attempt, jitter, after_ms) in
            [(0, 1.0, 100), (1, 1.0, 200), (1, 0.5, 100), (0, 0.0, 0)]
        {
            assert_eq!(
                decide(
                    &facts(NodeState::LaunchingInstance, attempt, 0),
                    StepResult::Failed(&error),
                    &rules,
                    jitter
                ),
                Action::Retry {
                    after: Duration::from_millis(after_ms),
                    error: error.to_string()
                }
            );
        }
        match decide(
            &facts(NodeState::LaunchingInstance, 2, 0),
            StepResult::Failed(&error),
            &rules,
            0.5,
        ) {
            Action::FailAndUndo { error } => assert!(error.ends_with("gave up after 3 attempts")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_teardown_never_gives_up_on_a_transient_failure_or_a_wait() {
        let pacing = pacing();
        let rules = Rules {
            pacing: &pacing,
            undo_failed: true,
        };
        let error = CloudError::transient("cloudflare:DeleteTunnel", "503");
        // Far past the retry budget and the wait budget: still retried, the backoff capped.
        let long = facts(NodeState::DeletingTunnel, 500, 86_400);
        assert_eq!(
            decide(&long, StepResult::Failed(&error), &rules, 1.0),
            Action::Retry {
                after: pacing.retry_max,
                error: error.to_string()
            }
        );
        assert!(matches!(
            decide(
                &long,
                StepResult::NotYet("instance not visible"),
                &rules,
                1.0
            ),
            Action::LookAgain { .. }
        ));
        // A permanent refusal still ends it (kept for the operator and the reconciler).
        assert!(matches!(
            decide(
                &facts(NodeState::DeletingTunnel, 0, 0),
                StepResult::Failed(&CloudError::permanent("cloudflare", "403")),
                &rules,
                1.0
            ),
            Action::FailAndKeep { .. }
        ));
    }

    #[test]
    fn permanent_failures_undo_provisioning_and_keep_everything_else() {
        let pacing = pacing();
        let error = CloudError::permanent("ec2:RunInstances", "UnauthorizedOperation");
        let undo = Rules {
            pacing: &pacing,
            undo_failed: true,
        };
        let keep = Rules {
            pacing: &pacing,
            undo_failed: false,
        };
        let at = |state| facts(state, 0, 0);
        assert!(matches!(
            decide(
                &at(NodeState::LaunchingInstance),
                StepResult::Failed(&error),
                &undo,
                0.5
            ),
            Action::FailAndUndo { .. }
        ));
        for (state, rules) in [
            (NodeState::LaunchingInstance, &keep),
            (NodeState::DeletingSecret, &undo),
            (NodeState::StoppingInstance, &undo),
            (NodeState::StartingInstance, &undo),
            (NodeState::RebootingInstance, &undo),
            (NodeState::ChangingInstanceType, &undo),
        ] {
            assert_eq!(
                decide(&at(state), StepResult::Failed(&error), rules, 0.5),
                Action::FailAndKeep {
                    error: error.to_string()
                },
                "{state}"
            );
        }
    }

    #[test]
    fn backoff_stays_under_its_ceiling_in_whole_milliseconds() {
        let pacing = pacing();
        for attempt in 0..40 {
            let d = full_jitter_backoff(&pacing, attempt, 1.0);
            let ceiling = (100u64 << attempt.min(20)).min(1000);
            assert_eq!(d, Duration::from_millis(ceiling), "at {attempt}");
            let jittered = full_jitter_backoff(&pacing, attempt, 0.123_456_789);
            assert!(jittered <= d);
            assert_eq!(jittered.subsec_nanos() % 1_000_000, 0, "{jittered:?}");
        }
    }

    #[test]
    fn a_resting_node_starts_the_workflow_its_intent_asks_for() {
        let base = Intent {
            state: NodeState::Ready,
            desired: Desired::Running,
            instance_type: "t4g.small",
            volume_gb: 16,
            applied_instance_type: Some("t4g.small"),
            applied_volume_gb: Some(16),
            fallback: None,
            restarts_requested: 0,
            restarts_done: 0,
        };
        assert_eq!(workflow_for(&base), None);
        let with = |f: &dyn Fn(&mut Intent<'static>)| {
            let mut i = base.clone();
            f(&mut i);
            workflow_for(&i)
        };
        // Landed as a fallback type for want of capacity: no resize while it asks for the
        // same; a resize once it asks for another type (the old one included).
        assert_eq!(
            with(&|i| {
                i.applied_instance_type = Some("t4g.medium");
                i.fallback = Some(("t4g.medium", "t4g.small"));
            }),
            None
        );
        assert_eq!(
            with(&|i| {
                i.applied_instance_type = Some("t4g.large");
                i.fallback = Some(("t4g.medium", "t4g.small"));
            }),
            Some(Workflow::Resize)
        );
        assert_eq!(
            with(&|i| i.desired = Desired::Suspended),
            Some(Workflow::Suspend)
        );
        assert_eq!(
            with(&|i| {
                i.state = NodeState::Suspended;
            }),
            Some(Workflow::Resume)
        );
        assert_eq!(
            with(&|i| {
                i.state = NodeState::Suspended;
                i.desired = Desired::Suspended;
            }),
            None
        );
        assert_eq!(
            with(&|i| i.instance_type = "t4g.medium"),
            Some(Workflow::Resize)
        );
        assert_eq!(with(&|i| i.volume_gb = 20), Some(Workflow::Resize));
        assert_eq!(with(&|i| i.volume_gb = 8), None);
        assert_eq!(with(&|i| i.restarts_requested = 1), Some(Workflow::Restart));
        // Mid-workflow, failed or gone: nothing starts.
        for state in [
            NodeState::WaitingForStop,
            NodeState::Failed,
            NodeState::Terminated,
        ] {
            assert_eq!(
                with(&|i| {
                    i.state = state;
                    i.desired = Desired::Suspended;
                }),
                None
            );
        }
        // Suspension wins over a pending resize or restart.
        assert_eq!(
            with(&|i| {
                i.desired = Desired::Suspended;
                i.restarts_requested = 1;
                i.instance_type = "t4g.large";
            }),
            Some(Workflow::Suspend)
        );
    }
}
