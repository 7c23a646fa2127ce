//! The node and its state machine's states.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// Where a node is in its life. Stored as its snake_case name in `nodes.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Pending,
    CreatingTunnel,
    StoringSecret,
    LaunchingInstance,
    BindingSecret,
    WaitingForInstance,
    ConfiguringIngress,
    RoutingCloudflare,
    RoutingRoute53,
    WaitingForTunnel,
    Ready,
    Failed,
    Suspended,
    Terminating,
    DeletingRoute53Record,
    DeletingCloudflareRecord,
    TerminatingInstance,
    DeletingSecret,
    DeletingTunnel,
    Terminated,
}

/// The provisioning workflow as a saga: each step beside the teardown step that undoes it.
/// `None`: the step makes nothing of its own (a check, a wait), or what it makes goes with
/// another's undo (the secret's instance tag with the secret, the ingress with the tunnel).
/// [`PROVISIONING`] and [`TEARDOWN`] are read off this table.
pub const PROVISIONING_UNDO: [(NodeState, Option<NodeState>); 10] = [
    (NodeState::Pending, None),
    (NodeState::CreatingTunnel, Some(NodeState::DeletingTunnel)),
    (NodeState::StoringSecret, Some(NodeState::DeletingSecret)),
    (
        NodeState::LaunchingInstance,
        Some(NodeState::TerminatingInstance),
    ),
    (NodeState::BindingSecret, None),
    (NodeState::WaitingForInstance, None),
    (NodeState::ConfiguringIngress, None),
    (
        NodeState::RoutingCloudflare,
        Some(NodeState::DeletingCloudflareRecord),
    ),
    (
        NodeState::RoutingRoute53,
        Some(NodeState::DeletingRoute53Record),
    ),
    (NodeState::WaitingForTunnel, None),
];

/// The provisioning steps, in order. Each state runs one side effect and then moves to the next.
pub const PROVISIONING: [NodeState; 10] = {
    let mut steps = [NodeState::Pending; 10];
    let mut i = 0;
    while i < steps.len() {
        steps[i] = PROVISIONING_UNDO[i].0;
        i += 1;
    }
    steps
};

/// The teardown steps, in order: the provisioning side effects undone in reverse. Each finds
/// what to delete by the node's identity (tags, names), not only by the ids on the row, so it
/// also removes what a crash left unrecorded; "not found" counts as done.
pub const TEARDOWN: [NodeState; 6] = {
    // `terminating`, then the undos of PROVISIONING_UNDO from last to first.
    let mut steps = [NodeState::Terminating; 6];
    let mut filled = 1;
    let mut i = PROVISIONING_UNDO.len();
    while i > 0 {
        i -= 1;
        if let Some(undo) = PROVISIONING_UNDO[i].1 {
            steps[filled] = undo;
            filled += 1;
        }
    }
    assert!(
        filled == steps.len(),
        "TEARDOWN's length is not the number of undos + 1"
    );
    steps
};

/// Why a node is torn down, stored in `nodes.teardown_reason`.
pub mod teardown_reason {
    /// The subscription ended: the node ends `terminated`.
    pub const SUBSCRIPTION_ENDED: &str = "subscription_ended";
    /// Provisioning failed and is undone: the node ends `failed`, with nothing left behind.
    pub const PROVISIONING_FAILED: &str = "provisioning_failed";
}

impl NodeState {
    pub const ALL: [NodeState; 20] = [
        NodeState::Pending,
        NodeState::CreatingTunnel,
        NodeState::StoringSecret,
        NodeState::LaunchingInstance,
        NodeState::BindingSecret,
        NodeState::WaitingForInstance,
        NodeState::ConfiguringIngress,
        NodeState::RoutingCloudflare,
        NodeState::RoutingRoute53,
        NodeState::WaitingForTunnel,
        NodeState::Ready,
        NodeState::Failed,
        NodeState::Suspended,
        NodeState::Terminating,
        NodeState::DeletingRoute53Record,
        NodeState::DeletingCloudflareRecord,
        NodeState::TerminatingInstance,
        NodeState::DeletingSecret,
        NodeState::DeletingTunnel,
        NodeState::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::CreatingTunnel => "creating_tunnel",
            NodeState::StoringSecret => "storing_secret",
            NodeState::LaunchingInstance => "launching_instance",
            NodeState::BindingSecret => "binding_secret",
            NodeState::WaitingForInstance => "waiting_for_instance",
            NodeState::ConfiguringIngress => "configuring_ingress",
            NodeState::RoutingCloudflare => "routing_cloudflare",
            NodeState::RoutingRoute53 => "routing_route53",
            NodeState::WaitingForTunnel => "waiting_for_tunnel",
            NodeState::Ready => "ready",
            NodeState::Failed => "failed",
            NodeState::Suspended => "suspended",
            NodeState::Terminating => "terminating",
            NodeState::DeletingRoute53Record => "deleting_route53_record",
            NodeState::DeletingCloudflareRecord => "deleting_cloudflare_record",
            NodeState::TerminatingInstance => "terminating_instance",
            NodeState::DeletingSecret => "deleting_secret",
            NodeState::DeletingTunnel => "deleting_tunnel",
            NodeState::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        NodeState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The provisioning step after this one (`Ready` after the last).
    pub fn next_provisioning(self) -> Option<NodeState> {
        let i = PROVISIONING.iter().position(|s| *s == self)?;
        Some(PROVISIONING.get(i + 1).copied().unwrap_or(NodeState::Ready))
    }

    /// The teardown step after this one (`None` after the last: the node is then
    /// `terminated`, or `failed` when its provisioning was undone).
    pub fn next_teardown(self) -> Option<NodeState> {
        let i = TEARDOWN.iter().position(|s| *s == self)?;
        TEARDOWN.get(i + 1).copied()
    }

    /// A state whose step the worker runs; the others wait for an outside event.
    pub fn is_provisioning(self) -> bool {
        PROVISIONING.contains(&self)
    }

    pub fn is_teardown(self) -> bool {
        TEARDOWN.contains(&self)
    }

    /// A state the worker has a step for.
    pub fn has_step(self) -> bool {
        self.is_provisioning() || self.is_teardown()
    }

    /// The one table of legal moves (the database refuses any other, see the
    /// `node_transitions` migration).
    pub fn may_become(self, to: NodeState) -> bool {
        use NodeState::*;
        if self == to || self == Terminated {
            return false;
        }
        // Ending the subscription tears down a node from wherever it is; a failed provisioning
        // is undone through the same steps.
        if to == Terminating {
            return true;
        }
        match self {
            s if s.is_provisioning() => Some(to) == s.next_provisioning() || to == Failed,
            s if s.is_teardown() => match s.next_teardown() {
                Some(next) => to == next || to == Failed,
                // The last undo ends the node, or leaves an undone provisioning `failed`.
                None => to == Terminated || to == Failed,
            },
            // The reconciler re-provisions from the step that creates what vanished.
            Ready => to.is_provisioning(),
            // An operator's replay resumes at any step.
            Failed => to.has_step(),
            // Suspended waits for an outside event; terminated is final.
            _ => false,
        }
    }

    /// Every legal move, as `(from, to)`.
    pub fn transitions() -> Vec<(NodeState, NodeState)> {
        let mut all = Vec::new();
        for from in NodeState::ALL {
            for to in NodeState::ALL {
                if from.may_become(to) {
                    all.push((from, to));
                }
            }
        }
        all
    }

    /// What the customer's app sees.
    pub fn status(self) -> NodeStatus {
        match self {
            NodeState::Pending => NodeStatus::Pending,
            NodeState::Ready => NodeStatus::Ready,
            NodeState::Failed => NodeStatus::Failed,
            NodeState::Suspended => NodeStatus::Suspended,
            NodeState::Terminated => NodeStatus::Terminated,
            s if s.is_teardown() => NodeStatus::Terminating,
            _ => NodeStatus::Provisioning,
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Pending,
    Provisioning,
    Ready,
    Failed,
    Suspended,
    Terminating,
    Terminated,
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
    pub attempt: i32,
    pub step_started_at: DateTime<Utc>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
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

    /// Provisioning failed and is being (or has been) undone.
    pub fn is_undoing_failure(&self) -> bool {
        self.teardown_reason.as_deref() == Some(teardown_reason::PROVISIONING_FAILED)
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
#[derive(Debug, Clone, sqlx::FromRow)]
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_provisioning_is_ordered() {
        for s in NodeState::ALL {
            assert_eq!(NodeState::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            NodeState::Pending.next_provisioning(),
            Some(NodeState::CreatingTunnel)
        );
        assert_eq!(
            NodeState::WaitingForTunnel.next_provisioning(),
            Some(NodeState::Ready)
        );
        assert_eq!(NodeState::Ready.next_provisioning(), None);
        assert_eq!(NodeState::BindingSecret.status(), NodeStatus::Provisioning);
        assert_eq!(NodeState::DeletingSecret.status(), NodeStatus::Terminating);
        assert_eq!(
            NodeState::Terminating.next_teardown(),
            Some(NodeState::DeletingRoute53Record)
        );
        assert_eq!(NodeState::DeletingTunnel.next_teardown(), None);
        assert!(PROVISIONING.iter().all(|s| !s.is_teardown()));
    }

    #[test]
    fn teardown_is_the_provisioning_undos_in_reverse() {
        let steps: Vec<NodeState> = PROVISIONING_UNDO.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, PROVISIONING);
        let mut undos: Vec<NodeState> = PROVISIONING_UNDO.iter().filter_map(|(_, u)| *u).collect();
        undos.reverse();
        assert_eq!(TEARDOWN[0], NodeState::Terminating);
        assert_eq!(&TEARDOWN[1..], undos.as_slice());
    }

    #[test]
    fn only_the_workflows_moves_are_legal() {
        use NodeState::*;
        for (from, to) in [
            (Pending, CreatingTunnel),
            (WaitingForTunnel, Ready),
            (LaunchingInstance, Failed),
            (LaunchingInstance, Terminating),
            (Ready, Terminating),
            (Ready, LaunchingInstance),
            (DeletingRoute53Record, DeletingCloudflareRecord),
            (DeletingTunnel, Terminated),
            (DeletingTunnel, Failed),
            (Failed, StoringSecret),
            (Failed, DeletingSecret),
        ] {
            assert!(from.may_become(to), "{from} -> {to} should be legal");
        }
        for (from, to) in [
            (Pending, Ready),
            (Pending, LaunchingInstance),
            (CreatingTunnel, Pending),
            (Ready, Terminated),
            (Ready, Failed),
            (Terminated, Pending),
            (Terminated, Terminating),
            (DeletingSecret, Terminated),
            (DeletingSecret, DeletingRoute53Record),
            (Failed, Ready),
            (Failed, Terminated),
            (Ready, Ready),
        ] {
            assert!(!from.may_become(to), "{from} -> {to} should be illegal");
        }
        assert!(NodeState::transitions().len() > 40);
    }
}
