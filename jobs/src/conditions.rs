//! What the app is told of a node beyond its status: conditions in the manner of Kubernetes
//! (`InstanceRunning`, `TunnelHealthy`, `DnsRouted`), each true, false or unknown with the
//! reason and since when, read off where the node's workflows stand and its log of moves.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::NodeState;

/// The conditions, in the order they are shown.
pub const KINDS: [&str; 3] = ["InstanceRunning", "TunnelHealthy", "DnsRouted"];

/// A condition's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<Option<bool>> for ConditionStatus {
    fn from(v: Option<bool>) -> Self {
        match v {
            Some(true) => ConditionStatus::True,
            Some(false) => ConditionStatus::False,
            None => ConditionStatus::Unknown,
        }
    }
}

/// One condition of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Condition {
    /// `InstanceRunning`, `TunnelHealthy` or `DnsRouted`.
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "InstanceRunning")]
    pub kind: &'static str,
    pub status: ConditionStatus,
    /// The state the node is in (why the condition has its value).
    pub reason: String,
    pub message: Option<String>,
    /// When the condition last changed value.
    pub last_transition_time: DateTime<Utc>,
}

/// What a node in `state` has: (instance running, tunnel healthy, DNS routed). `None` where a
/// state says nothing sure (a failure, a teardown under way).
pub fn observed(state: NodeState) -> [Option<bool>; 3] {
    use NodeState::*;
    let (instance, tunnel, dns) = match state {
        Pending | CreatingTunnel | StoringSecret | LaunchingInstance | BindingSecret
        | WaitingForInstance => (false, false, false),
        ConfiguringIngress | RoutingCloudflare | RoutingRoute53 => (true, false, false),
        WaitingForTunnel => (true, false, true),
        Ready | RebootingInstance => (true, true, true),
        WaitingAfterReboot | WaitingForReconnect | WaitingForResizedTunnel => (true, false, true),
        StoppingInstance
        | WaitingForStop
        | Suspended
        | StoppingForUser
        | WaitingForUserStop
        | Stopped
        | StartingInstance
        | WaitingForStart
        | StoppingForResize
        | WaitingForResizeStop
        | ChangingInstanceType
        | GrowingVolume
        | StartingResized
        | WaitingForResizedStart => (false, false, true),
        Terminated => (false, false, false),
        // A failure, a teardown under way, or a step not classified here yet: nothing sure.
        _ => return [None; 3],
    };
    [Some(instance), Some(tunnel), Some(dns)]
}

/// The node's conditions now, from its state and its moves (`from -> to` details with their
/// times, oldest first); `since` is when the node was made.
pub fn conditions(
    state: NodeState,
    message: Option<&str>,
    since: DateTime<Utc>,
    moves: &[(DateTime<Utc>, String)],
) -> Vec<Condition> {
    let mut value = observed(NodeState::Pending);
    let mut changed = [since; 3];
    for (at, detail) in moves {
        let Some(to) = detail
            .split_once(" -> ")
            .and_then(|(_, to)| NodeState::parse(to))
        else {
            continue;
        };
        let next = observed(to);
        for i in 0..3 {
            if next[i] != value[i] {
                changed[i] = *at;
            }
        }
        value = next;
    }
    // The row is the truth about where the node stands now.
    let now = observed(state);
    KINDS
        .iter()
        .enumerate()
        .map(|(i, kind)| Condition {
            kind,
            status: now[i].into(),
            reason: state.as_str().to_string(),
            message: message.map(str::to_string),
            last_transition_time: changed[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_moves_and_say_since_when() {
        let t = |s: i64| DateTime::from_timestamp(1_000 + s, 0).unwrap();
        let moves: Vec<(DateTime<Utc>, String)> = [
            (1, "pending -> creating_tunnel"),
            (5, "waiting_for_instance -> configuring_ingress"),
            (8, "routing_route53 -> waiting_for_tunnel"),
            (9, "waiting_for_tunnel -> ready"),
            (20, "ready -> stopping_instance"),
            (22, "waiting_for_stop -> suspended"),
        ]
        .into_iter()
        .map(|(s, d)| (t(s), d.to_string()))
        .collect();
        let c = conditions(NodeState::Suspended, None, t(0), &moves);
        assert_eq!(c[0].kind, "InstanceRunning");
        assert_eq!(
            (c[0].status, c[0].last_transition_time),
            (ConditionStatus::False, t(20))
        );
        assert_eq!(
            (c[1].status, c[1].last_transition_time),
            (ConditionStatus::False, t(20))
        );
        assert_eq!(
            (c[2].status, c[2].last_transition_time),
            (ConditionStatus::True, t(8))
        );
        assert_eq!(c[0].reason, "suspended");
        let c = conditions(NodeState::Pending, Some("why"), t(0), &[]);
        assert!(c
            .iter()
            .all(|c| c.status == ConditionStatus::False && c.last_transition_time == t(0)));
        assert!(conditions(NodeState::Failed, None, t(0), &moves)
            .iter()
            .all(|c| c.status == ConditionStatus::Unknown));
    }
}
