//! Every workflow of a node, as data: the one declaration that the state names, their parsing,
//! the legal moves and the worker's dispatch all come from.
//!
//! A row is `State = "name" => resource::action[, undo UndoState];`: the state a node is in
//! while that step runs, the name stored in `nodes.state`, and the step's function (in its
//! resource's file under `steps/`). Adding a step is one function and one row here.
//!
//! The rows make the states here, and a macro, `step_rows!`, that hands each state and its step
//! function on: `steps::run_step` is made from it where the step functions live (their names
//! are passed over here, never resolved, so the model imports nothing above it).

/// Makes the states and workflows of the table's rows: `NodeState` (with `ALL`, `as_str`,
/// `parse`, `workflow`, `undo`), `Workflow` (with `steps`, `end`, `entered_from`, `status`),
/// one const array per workflow, and `step_rows!`. `$d` is a `$`, for the macro it makes.
macro_rules! declare_workflows {
    (
        $d:tt
        resting: [ $( $rest:ident = $rest_name:literal => $rest_status:ident ),* $(,)? ]
        $(
            $(#[$wf_meta:meta])*
            workflow $wf:ident = $steps_const:ident,
                from [ $( $from:ident ),* ], ends $end:ident, shown as $wf_status:ident {
                $(
                    $state:ident = $name:literal => $action:path $( , undo $undo:ident )? ;
                )+
            }
        )+
    ) => {
        /// Where a node is in its life. Stored as its snake_case name in `nodes.state`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum NodeState {
            $( $rest, )*
            $( $( $state, )+ )+
        }

        /// A table of steps that moves a node from one resting state to another.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Workflow {
            $( $(#[$wf_meta])* $wf, )+
        }

        $(
            $(#[$wf_meta])*
            pub const $steps_const: [NodeState; count!($( $state )+)] = [ $( NodeState::$state ),+ ];
        )+

        impl NodeState {
            pub const ALL: [NodeState; count!($( $rest )* $( $( $state )+ )+)] = [
                $( NodeState::$rest, )*
                $( $( NodeState::$state, )+ )+
            ];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( NodeState::$rest => $rest_name, )*
                    $( $( NodeState::$state => $name, )+ )+
                }
            }

            pub fn parse(s: &str) -> Option<NodeState> {
                match s {
                    $( $rest_name => Some(NodeState::$rest), )*
                    $( $( $name => Some(NodeState::$state), )+ )+
                    _ => None,
                }
            }

            /// The workflow this state is a step of; `None` for a resting state.
            pub fn workflow(self) -> Option<Workflow> {
                match self {
                    $( $( NodeState::$state => Some(Workflow::$wf), )+ )+
                    _ => None,
                }
            }

            /// The teardown step that undoes this step's side effect, if it has one of its own.
            pub fn undo(self) -> Option<NodeState> {
                match self {
                    $( $( NodeState::$state => <[NodeState]>::first(&[ $( NodeState::$undo )? ]).copied(), )+ )+
                    _ => None,
                }
            }

            /// What the app sees of a node resting in this state.
            fn resting_status(self) -> Option<NodeStatus> {
                match self {
                    $( NodeState::$rest => Some(NodeStatus::$rest_status), )*
                    _ => None,
                }
            }
        }

        impl Workflow {
            pub const ALL: [Workflow; count!($( $wf )+)] = [ $( Workflow::$wf ),+ ];

            /// Its steps, in order.
            pub fn steps(self) -> &'static [NodeState] {
                match self {
                    $( Workflow::$wf => &$steps_const, )+
                }
            }

            /// The resting state it ends in.
            pub fn end(self) -> NodeState {
                match self {
                    $( Workflow::$wf => NodeState::$end, )+
                }
            }

            /// The resting states it may start from (the worker starts it there when the
            /// node's intent asks for it).
            pub fn entered_from(self) -> &'static [NodeState] {
                match self {
                    $( Workflow::$wf => &[ $( NodeState::$from ),* ], )+
                }
            }

            /// What the app sees of a node in one of its steps.
            pub fn status(self) -> NodeStatus {
                match self {
                    $( Workflow::$wf => NodeStatus::$wf_status, )+
                }
            }
        }


        /// Hands every `State => step function;` pair to `$then!` (`steps` makes its dispatch).
        macro_rules! step_rows {
            ($d then:ident) => {
                $d then! { $( $( $state => $action; )+ )+ }
            };
        }
        pub(crate) use step_rows;
    };
}

/// The number of token trees given: array lengths are counted, never kept by hand.
macro_rules! count {
    () => { 0usize };
    ($head:tt $( $tail:tt )*) => { 1usize + count!($( $tail )*) };
}

declare_workflows! { $
    resting: [
        Ready = "ready" => Ready,
        Failed = "failed" => Failed,
        Suspended = "suspended" => Suspended,
        Stopped = "stopped" => Stopped,
        Terminated = "terminated" => Terminated,
    ]

    /// A paid node from nothing to ready.
    workflow Provisioning = PROVISIONING, from [], ends Ready, shown as Provisioning {
        Pending = "pending" => region::check_served;
        CreatingTunnel = "creating_tunnel" => tunnel::create, undo DeletingTunnel;
        StoringSecret = "storing_secret" => secret::store_token, undo DeletingSecret;
        LaunchingInstance = "launching_instance" => instance::launch, undo TerminatingInstance;
        BindingSecret = "binding_secret" => secret::bind_to_instance;
        WaitingForInstance = "waiting_for_instance" => instance::wait_running;
        ConfiguringIngress = "configuring_ingress" => tunnel::configure_ingress;
        RoutingCloudflare = "routing_cloudflare" => dns::route_cloudflare, undo DeletingCloudflareRecord;
        RoutingRoute53 = "routing_route53" => dns::route_route53, undo DeletingRoute53Record;
        WaitingForTunnel = "waiting_for_tunnel" => tunnel::wait_healthy;
    }

    /// Every provisioning side effect undone, in reverse (see `teardown_is_the_undos_in_reverse`).
    /// Entered from any state (`NodeState::may_become`); ends `terminated`, or `failed` when it
    /// undoes a failed provisioning.
    workflow Teardown = TEARDOWN, from [], ends Terminated, shown as Terminating {
        Terminating = "terminating" => teardown::begin;
        DeletingRoute53Record = "deleting_route53_record" => dns::delete_route53;
        DeletingCloudflareRecord = "deleting_cloudflare_record" => dns::delete_cloudflare;
        TerminatingInstance = "terminating_instance" => instance::terminate;
        DeletingSecret = "deleting_secret" => secret::delete;
        DeletingTunnel = "deleting_tunnel" => tunnel::delete;
    }

    /// The customer stopped paying: the instance is stopped; tunnel, DNS and secret stay.
    workflow Suspend = SUSPEND, from [Ready], ends Suspended, shown as Suspending {
        StoppingInstance = "stopping_instance" => instance::stop;
        WaitingForStop = "waiting_for_stop" => instance::wait_stopped;
    }

    /// The user stopped the node from their app: as suspend, but theirs to undo (billing
    /// neither starts nor suspends a node its user stopped).
    workflow Stop = STOP, from [Ready], ends Stopped, shown as Stopping {
        StoppingForUser = "stopping_for_user" => instance::stop;
        WaitingForUserStop = "waiting_for_user_stop" => instance::wait_stopped;
    }

    /// They paid again, or the user started it: the same instance runs and its tunnel
    /// reconnects.
    workflow Resume = RESUME, from [Suspended, Stopped], ends Ready, shown as Resuming {
        StartingInstance = "starting_instance" => instance::start;
        WaitingForStart = "waiting_for_start" => instance::wait_running;
        WaitingForReconnect = "waiting_for_reconnect" => tunnel::wait_healthy;
    }

    /// A reboot asked for by the app or the operator.
    workflow Restart = RESTART, from [Ready], ends Ready, shown as Restarting {
        RebootingInstance = "rebooting_instance" => instance::reboot;
        WaitingAfterReboot = "waiting_after_reboot" => tunnel::wait_healthy;
    }

    /// Another instance type and/or a larger root volume, on the same instance.
    workflow Resize = RESIZE, from [Ready], ends Ready, shown as Resizing {
        StoppingForResize = "stopping_for_resize" => instance::stop;
        WaitingForResizeStop = "waiting_for_resize_stop" => instance::wait_stopped;
        ChangingInstanceType = "changing_instance_type" => instance::change_type;
        GrowingVolume = "growing_volume" => instance::grow_volume;
        StartingResized = "starting_resized" => instance::start;
        WaitingForResizedStart = "waiting_for_resized_start" => instance::wait_running;
        WaitingForResizedTunnel = "waiting_for_resized_tunnel" => tunnel::wait_healthy;
    }
}

/// What the customer's app sees of a node.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Pending,
    Provisioning,
    Ready,
    Failed,
    Suspending,
    Suspended,
    Stopping,
    Stopped,
    Resuming,
    Restarting,
    Resizing,
    Terminating,
    Terminated,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 13] = [
        NodeStatus::Pending,
        NodeStatus::Provisioning,
        NodeStatus::Ready,
        NodeStatus::Failed,
        NodeStatus::Suspending,
        NodeStatus::Suspended,
        NodeStatus::Stopping,
        NodeStatus::Stopped,
        NodeStatus::Resuming,
        NodeStatus::Restarting,
        NodeStatus::Resizing,
        NodeStatus::Terminating,
        NodeStatus::Terminated,
    ];

    /// A status by its snake_case name, as the app writes it.
    pub fn parse(s: &str) -> Option<NodeStatus> {
        NodeStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    /// Its snake_case name, as the app reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Pending => "pending",
            NodeStatus::Provisioning => "provisioning",
            NodeStatus::Ready => "ready",
            NodeStatus::Failed => "failed",
            NodeStatus::Suspending => "suspending",
            NodeStatus::Suspended => "suspended",
            NodeStatus::Stopping => "stopping",
            NodeStatus::Stopped => "stopped",
            NodeStatus::Resuming => "resuming",
            NodeStatus::Restarting => "restarting",
            NodeStatus::Resizing => "resizing",
            NodeStatus::Terminating => "terminating",
            NodeStatus::Terminated => "terminated",
        }
    }
}

impl NodeState {
    /// A provisioning step.
    pub fn is_provisioning(self) -> bool {
        self.workflow() == Some(Workflow::Provisioning)
    }

    /// A teardown step.
    pub fn is_teardown(self) -> bool {
        self.workflow() == Some(Workflow::Teardown)
    }

    /// A state the worker has a step for; the others rest until an intent moves them.
    pub fn has_step(self) -> bool {
        self.workflow().is_some()
    }

    /// The step after this one in its workflow; `None` after the last (or at rest).
    pub fn next_in_workflow(self) -> Option<NodeState> {
        let steps = self.workflow()?.steps();
        let i = steps.iter().position(|s| *s == self)?;
        steps.get(i + 1).copied()
    }

    /// The provisioning step after this one (`Ready` after the last).
    pub fn next_provisioning(self) -> Option<NodeState> {
        self.is_provisioning()
            .then(|| self.next_in_workflow().unwrap_or(NodeState::Ready))
    }

    /// The teardown step after this one (`None` after the last: the node is then
    /// `terminated`, or `failed` when its provisioning was undone).
    pub fn next_teardown(self) -> Option<NodeState> {
        if self.is_teardown() {
            self.next_in_workflow()
        } else {
            None
        }
    }

    /// The one table of legal moves (the database refuses any other, see the
    /// `node_transitions` migration), read off the workflow tables.
    pub fn may_become(self, to: NodeState) -> bool {
        use NodeState::*;
        if self == to || self == Terminated {
            return false;
        }
        // Ending the subscription (or scaling down, or a user's delete) tears down a node from
        // wherever it is; a failed provisioning is undone through the same steps.
        if to == Terminating {
            return true;
        }
        if let Some(workflow) = self.workflow() {
            let onward = match self.next_in_workflow() {
                Some(next) => to == next,
                None => to == workflow.end(),
            };
            // Any step may fail; the last undo may also leave an undone provisioning `failed`.
            return onward || to == Failed;
        }
        match self {
            // The reconciler re-provisions from the step that creates what vanished.
            Ready if to.is_provisioning() => true,
            // An operator's replay resumes at any step.
            Failed => to.has_step(),
            // A resting node starts the workflow its intent asks for.
            _ => Workflow::ALL
                .iter()
                .any(|w| w.entered_from().contains(&self) && w.steps().first() == Some(&to)),
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
        match (self, self.workflow()) {
            (NodeState::Pending, _) => NodeStatus::Pending,
            (_, Some(workflow)) => workflow.status(),
            (state, None) => state.resting_status().unwrap_or(NodeStatus::Failed),
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_name_is_its_json_name() {
        for status in super::NodeStatus::ALL {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
            assert_eq!(super::NodeStatus::parse(status.as_str()), Some(status));
        }
    }

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
        assert_eq!(NodeState::WaitingForStop.status(), NodeStatus::Suspending);
        assert_eq!(NodeState::Suspended.status(), NodeStatus::Suspended);
        assert_eq!(NodeStatus::parse("stopped"), Some(NodeStatus::Stopped));
        assert_eq!(NodeStatus::parse("asleep"), None);
        assert_eq!(
            NodeState::Terminating.next_teardown(),
            Some(NodeState::DeletingRoute53Record)
        );
        assert_eq!(NodeState::DeletingTunnel.next_teardown(), None);
        assert!(PROVISIONING.iter().all(|s| !s.is_teardown()));
        // Every state belongs to one workflow at most, and every name is distinct.
        let mut names: Vec<&str> = NodeState::ALL.iter().map(|s| s.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), NodeState::ALL.len());
    }

    #[test]
    fn teardown_is_the_undos_in_reverse() {
        let mut undos: Vec<NodeState> = PROVISIONING.iter().filter_map(|s| s.undo()).collect();
        undos.reverse();
        assert_eq!(TEARDOWN[0], NodeState::Terminating);
        assert_eq!(&TEARDOWN[1..], undos.as_slice());
        // Only provisioning steps have undos.
        for workflow in Workflow::ALL {
            if workflow != Workflow::Provisioning {
                assert!(workflow.steps().iter().all(|s| s.undo().is_none()));
            }
        }
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
            (Ready, StoppingInstance),
            (StoppingInstance, WaitingForStop),
            (WaitingForStop, Suspended),
            (Suspended, StartingInstance),
            (WaitingForReconnect, Ready),
            (Ready, RebootingInstance),
            (Ready, StoppingForResize),
            (WaitingForResizedTunnel, Ready),
            (Suspended, Terminating),
            (Failed, WaitingForStop),
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
            (Ready, Suspended),
            (Ready, StartingInstance),
            (Suspended, Ready),
            (Suspended, StoppingInstance),
            (Suspended, RebootingInstance),
            (StoppingInstance, StartingInstance),
            (WaitingForStop, Ready),
        ] {
            assert!(!from.may_become(to), "{from} -> {to} should be illegal");
        }
        assert!(NodeState::transitions().len() > 40);
    }
}
