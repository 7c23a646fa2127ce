//! The node, its intent and its states: the types every layer above shares, importing nothing
//! of the crate.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

pub mod public;
mod subscription;
pub mod workflows;

pub use subscription::StripeStatus;
pub use workflows::{
    NodeState, NodeStatus, Workflow, PROVISIONING, RESIZE, RESTART, RESUME, STOP, SUSPEND, TEARDOWN,
};

/// Why a node is torn down, stored in `nodes.teardown_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TeardownReason {
    /// The subscription ended: the node ends `terminated`.
    SubscriptionEnded,
    /// The subscription's node count went down: the node ends `terminated`.
    ScaledDown,
    /// The app or the operator asked for it: the node ends `terminated`.
    Requested,
    /// Provisioning failed and is undone: the node ends `failed`, with nothing left behind.
    ProvisioningFailed,
}

impl TeardownReason {
    pub const ALL: [TeardownReason; 4] = [
        TeardownReason::SubscriptionEnded,
        TeardownReason::ScaledDown,
        TeardownReason::Requested,
        TeardownReason::ProvisioningFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TeardownReason::SubscriptionEnded => "subscription_ended",
            TeardownReason::ScaledDown => "scaled_down",
            TeardownReason::Requested => "requested",
            TeardownReason::ProvisioningFailed => "provisioning_failed",
        }
    }

    pub fn parse(s: &str) -> Option<TeardownReason> {
        TeardownReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Where the last undo leaves the node.
    pub fn end_state(self) -> NodeState {
        match self {
            TeardownReason::ProvisioningFailed => NodeState::Failed,
            _ => NodeState::Terminated,
        }
    }
}

/// What the node should be, as last asked for (`nodes.desired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    /// Stopped by billing (the subscription is not paid); only billing undoes it.
    Suspended,
    /// Stopped by its user; only they undo it.
    Stopped,
    Gone,
}

impl Desired {
    pub const ALL: [Desired; 4] = [
        Desired::Running,
        Desired::Suspended,
        Desired::Stopped,
        Desired::Gone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Suspended => "suspended",
            Desired::Stopped => "stopped",
            Desired::Gone => "gone",
        }
    }

    pub fn parse(s: &str) -> Option<Desired> {
        Desired::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// The kinds of entry in a node's log (`node_events.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The node's row was made.
    Created,
    /// A step began.
    Started,
    /// A step's side effect is done and committed.
    Succeeded,
    /// A step looks again later (`detail`: what it waits for).
    Waiting,
    /// A step failed for a transient reason and is retried later (`detail`: the error).
    RetryScheduled,
    /// A step failed for good (`detail`: the error).
    Failed,
    /// An operator's replay.
    Replayed,
    /// The reconciler sent the node back to a step.
    Reconciled,
    /// The node is to be torn down (`detail`: why).
    TeardownRequested,
    /// Someone asked the node to change (`detail`: what and who).
    Requested,
    /// A workflow started because the node's intent asks for it.
    WorkflowStarted,
    /// A move of `nodes.state`, written by the database's guard (`detail`: `from -> to`).
    Transition,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Started => "started",
            EventKind::Succeeded => "succeeded",
            EventKind::Waiting => "waiting",
            EventKind::RetryScheduled => "retry_scheduled",
            EventKind::Failed => "failed",
            EventKind::Replayed => "replayed",
            EventKind::Reconciled => "reconciled",
            EventKind::TeardownRequested => "teardown_requested",
            EventKind::Requested => "requested",
            EventKind::WorkflowStarted => "workflow_started",
            EventKind::Transition => "transition",
        }
    }
}

/// A row of `nodes`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Node {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub ordinal: i32,
    pub user_id: String,
    pub region: String,
    pub instance_type: String,
    pub hostname: String,
    #[sqlx(try_from = "String")]
    pub state: StateColumn,
    pub generation: i32,
    pub tunnel_id: Option<String>,
    pub secret_arn: Option<String>,
    pub instance_id: Option<String>,
    pub dns_record_id: Option<String>,
    pub error: Option<String>,
    pub failed_step: Option<String>,
    pub teardown_reason: Option<String>,
    pub desired: String,
    pub volume_gb: i32,
    pub applied_instance_type: Option<String>,
    pub applied_volume_gb: Option<i32>,
    pub restarts_requested: i32,
    pub restarts_done: i32,
    pub waiting_for: Option<String>,
    pub last_error: Option<String>,
    /// A past-due subscription's grace ends here: the node is then suspended.
    pub suspend_at: Option<DateTime<Utc>>,
    pub attempt: i32,
    pub step_started_at: DateTime<Utc>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The api request that last asked something of the node (its `X-Request-Id`).
    pub request_id: Option<String>,
    /// Where its instance runs (`subnet-... (zone)`).
    pub placement: Option<String>,
    /// Its instance runs as `fallback_type` in place of `fallback_for`, for want of capacity.
    pub fallback_type: Option<String>,
    pub fallback_for: Option<String>,
    /// The Route 53 change its UPSERT made (waited on until INSYNC).
    pub route53_change_id: Option<String>,
    /// The ClientToken of the launch attempt under way (see `steps::instance::launch`).
    pub launch_token: Option<String>,
    /// When its instance was recorded (EC2 may not yet know a young id).
    pub instance_launched_at: Option<DateTime<Utc>>,
}

/// `nodes.state` as read from the database; a value we do not know is an error, not a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateColumn(pub NodeState);

impl TryFrom<String> for StateColumn {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeState::parse(&s)
            .map(StateColumn)
            .ok_or_else(|| format!("unknown node state `{s}`"))
    }
}

impl Node {
    pub fn state(&self) -> NodeState {
        self.state.0
    }

    pub fn teardown_reason(&self) -> Option<TeardownReason> {
        self.teardown_reason
            .as_deref()
            .and_then(TeardownReason::parse)
    }

    /// Provisioning failed and is being (or has been) undone.
    pub fn is_undoing_failure(&self) -> bool {
        self.teardown_reason() == Some(TeardownReason::ProvisioningFailed)
    }

    /// How long until a past-due grace ends, when the node is to run until then.
    pub fn pending_grace_end(&self, now: DateTime<Utc>) -> Option<std::time::Duration> {
        match (self.desired(), self.suspend_at) {
            (Desired::Running, Some(at)) if at > now => (at - now).to_std().ok(),
            _ => None,
        }
    }

    /// What the node should be; an unknown value (a newer release's) counts as running.
    pub fn desired(&self) -> Desired {
        Desired::parse(&self.desired).unwrap_or(Desired::Running)
    }

    /// What the customer's app sees: a node whose failed provisioning is being undone is
    /// `failed` all along, not `terminating`.
    pub fn status(&self) -> NodeStatus {
        if self.is_undoing_failure()
            && (self.state().is_teardown() || self.state() == NodeState::Failed)
        {
            NodeStatus::Failed
        } else {
            self.state().status()
        }
    }

    pub fn tunnel_name(&self) -> String {
        tunnel_name(self.id)
    }

    pub fn secret_name(&self) -> String {
        secret_name(self.id)
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.hostname)
    }
}

/// A row of `node_events`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct NodeEvent {
    pub at: DateTime<Utc>,
    pub generation: i32,
    pub step: String,
    pub kind: String,
    pub detail: Option<String>,
}

pub fn tunnel_name(node_id: Uuid) -> String {
    format!("hive-{node_id}")
}

pub fn secret_name(node_id: Uuid) -> String {
    format!("hive/nodes/{node_id}/tunnel-token")
}

/// Tags every AWS resource of a node carries.
pub mod tags {
    pub const NODE_ID: &str = "hive:node-id";
    pub const SUBSCRIPTION: &str = "hive:subscription";
    pub const USER: &str = "hive:user";
    /// On the secret: the ARN of the one instance whose role may read it.
    pub const INSTANCE_ARN: &str = "hive:instance-arn";
    /// On the instance: the restart request it last carried out, so that a reboot repeated
    /// after a crash is not done twice.
    pub const RESTARTED: &str = "hive:restarted";
}

/// Ids of resources a step created, written with its state change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Created {
    pub tunnel_id: Option<String>,
    pub secret_arn: Option<String>,
    pub instance_id: Option<String>,
    pub dns_record_id: Option<String>,
    /// The instance type and root volume size the instance now has.
    pub applied_instance_type: Option<String>,
    pub applied_volume_gb: Option<i32>,
    /// The restart request the instance has carried out.
    pub restarts_done: Option<i32>,
    /// Where the instance runs (`subnet-... (zone)`).
    pub placement: Option<String>,
    /// The instance runs as `.0` in place of `.1`, for want of capacity.
    pub fallback: Option<(String, String)>,
    /// What the step wants said in the node's log beside its success.
    pub note: Option<String>,
}
