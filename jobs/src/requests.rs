//! The entry points through which billing, the app's API and hivectl ask something of a node:
//! one function per request, each taking the caller's transaction and enqueuing in it, so the
//! request exists if and only if the caller's change commits.
//!
//! A request changes only the node's intent (`desired`, its spec, its restart count) and logs
//! who asked. The worker compares intent with where the node stands whenever the node rests and
//! starts the workflow that closes the difference; so a request that arrives mid-workflow
//! interrupts no step, and of several requests only the latest is acted on. Teardown is the
//! exception: it takes the node from wherever it is (its generation is bumped, so a step in
//! flight cannot commit over it), as the subscription's end always has.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::config::valid_instance_type;
use crate::model::{Desired, NodeState, TeardownReason};
use crate::store::{
    self, CountedNode, IntentChange, IntentRow, NodeSpec, StoreError, SubscriptionState,
};

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no node {0}")]
    NodeNotFound(Uuid),
    #[error("no subscription {0}")]
    SubscriptionNotFound(Uuid),
    /// The node's state or intent does not allow it; nothing was recorded.
    #[error("node {id}: {reason}")]
    NotAllowed { id: Uuid, reason: String },
    /// The request itself is malformed; nothing was recorded.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type RequestResult<T> = Result<T, RequestError>;

/// The node's row, locked; refused when the node is gone or going.
async fn live_node(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    what: &str,
) -> RequestResult<IntentRow> {
    let row = store::lock_intent(tx, node_id)
        .await?
        .ok_or(RequestError::NodeNotFound(node_id))?;
    if row.desired == Desired::Gone.as_str() || row.state == NodeState::Terminated.as_str() {
        return Err(RequestError::NotAllowed {
            id: node_id,
            reason: format!("cannot {what}: the node is terminated or being torn down"),
        });
    }
    Ok(row)
}

/// Records that the node should be `desired`, logging who asked for `verb`.
async fn want(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    desired: Desired,
    verb: &str,
    by: &str,
) -> RequestResult<()> {
    let detail = format!("{verb}, asked by {by}");
    store::change_intent(tx, node_id, IntentChange::Desired(desired), &detail).await?;
    Ok(())
}

/// Stop the node's instance and keep it stopped (billing's suspension); tunnel, DNS and
/// secret stay.
pub async fn suspend(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    by: &str,
) -> RequestResult<()> {
    live_node(tx, node_id, "suspend").await?;
    want(tx, node_id, Desired::Suspended, "suspend", by).await
}

/// Run the node again.
pub async fn resume(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    by: &str,
) -> RequestResult<()> {
    live_node(tx, node_id, "resume").await?;
    want(tx, node_id, Desired::Running, "resume", by).await
}

/// Stop the node's instance because its user asks (the app's stop): the node ends
/// `stopped`, and only its user starts it again. A node billing suspended is refused.
pub async fn stop(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    by: &str,
) -> RequestResult<()> {
    let row = live_node(tx, node_id, "stop").await?;
    if row.desired == Desired::Stopped.as_str() {
        return Ok(());
    }
    if row.desired == Desired::Suspended.as_str() || row.billing_hold {
        return Err(RequestError::NotAllowed {
            id: node_id,
            reason: "cannot stop: the node is suspended for its subscription's billing".into(),
        });
    }
    want(tx, node_id, Desired::Stopped, "stop", by).await
}

/// Start a node its user stopped. A node billing holds (suspended, unpaid) is refused: paying
/// is what starts it.
pub async fn start(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    by: &str,
) -> RequestResult<()> {
    let row = live_node(tx, node_id, "start").await?;
    if row.desired == Desired::Suspended.as_str() || row.billing_hold {
        return Err(RequestError::NotAllowed {
            id: node_id,
            reason: "cannot start: the node is suspended for its subscription's billing".into(),
        });
    }
    if row.desired == Desired::Running.as_str() {
        return Ok(());
    }
    want(tx, node_id, Desired::Running, "start", by).await
}

/// Reboot the node's instance once more (carried out once it is ready).
pub async fn restart(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    by: &str,
) -> RequestResult<()> {
    let row = live_node(tx, node_id, "restart").await?;
    for (desired, what) in [
        (Desired::Suspended, "suspended"),
        (Desired::Stopped, "stopped"),
    ] {
        if row.desired == desired.as_str() {
            return Err(RequestError::NotAllowed {
                id: node_id,
                reason: format!("cannot restart: the node is {what}"),
            });
        }
    }
    let detail = format!("restart #{}, asked by {by}", row.restarts_requested + 1);
    store::change_intent(tx, node_id, IntentChange::Restart, &detail).await?;
    Ok(())
}

/// Give the node another t4g instance type and/or a larger root volume (a volume never
/// shrinks). Carried out on the same instance once it is ready.
pub async fn resize(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    instance_type: &str,
    volume_gb: i32,
    by: &str,
) -> RequestResult<()> {
    if !valid_instance_type(instance_type) {
        return Err(RequestError::Invalid(format!(
            "`{instance_type}` is not a t4g instance type"
        )));
    }
    if !(1..=16_384).contains(&volume_gb) {
        return Err(RequestError::Invalid(format!(
            "volume size {volume_gb} GiB is not between 1 and 16384"
        )));
    }
    let row = live_node(tx, node_id, "resize").await?;
    if volume_gb < row.volume_gb {
        return Err(RequestError::NotAllowed {
            id: node_id,
            reason: format!(
                "cannot shrink the root volume from {} GiB to {volume_gb} GiB",
                row.volume_gb
            ),
        });
    }
    if row.instance_type == instance_type && row.volume_gb == volume_gb {
        return Ok(());
    }
    let detail = format!("resize to {instance_type} with {volume_gb} GiB, asked by {by}");
    store::change_intent(
        tx,
        node_id,
        IntentChange::Spec {
            instance_type,
            volume_gb,
        },
        &detail,
    )
    .await?;
    Ok(())
}

/// Tear the node down, from wherever it is. A node already gone is left alone.
pub async fn terminate(
    tx: &mut Transaction<'_, Postgres>,
    node_id: Uuid,
    reason: TeardownReason,
    by: &str,
) -> RequestResult<()> {
    store::lock_intent(tx, node_id)
        .await?
        .ok_or(RequestError::NodeNotFound(node_id))?;
    let detail = format!("terminate ({}), asked by {by}", reason.as_str());
    store::tear_down(tx, &[node_id], reason, &detail).await?;
    Ok(())
}

/// What a change of a subscription's node count did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scaled {
    /// New nodes, to be provisioned.
    pub added: Vec<Uuid>,
    /// The newest nodes, to be torn down.
    pub removed: Vec<Uuid>,
}

/// The instance type and root volume of new nodes; what is not given is copied from the
/// subscription's newest node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeShape<'a> {
    pub instance_type: Option<&'a str>,
    pub volume_gb: Option<i32>,
}

/// A new node's root volume when nothing says otherwise.
const DEFAULT_VOLUME_GB: i32 = 10;

/// Makes the subscription have `count` nodes: new ones (of `shape`, named under `node_domain`)
/// are provisioned, or the newest are torn down first.
pub async fn set_node_count(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
    count: u32,
    shape: NodeShape<'_>,
    node_domain: &str,
    by: &str,
) -> RequestResult<Scaled> {
    let (sub, nodes) = store::lock_subscription_nodes(tx, subscription_id)
        .await?
        .ok_or(RequestError::SubscriptionNotFound(subscription_id))?;
    set_locked_node_count(tx, &sub, &nodes, count, shape, node_domain, by).await
}

/// [`set_node_count`] for a subscription the caller has locked, as it stands in the caller's
/// hands (`sub`, its binding read from there), with its counted nodes locked too.
pub async fn set_locked_node_count(
    tx: &mut Transaction<'_, Postgres>,
    sub: &SubscriptionState,
    nodes: &[CountedNode],
    count: u32,
    shape: NodeShape<'_>,
    node_domain: &str,
    by: &str,
) -> RequestResult<Scaled> {
    let subscription_id = sub.id;
    if count > 100 {
        return Err(RequestError::Invalid(format!(
            "{count} nodes is more than the 100 a subscription may have"
        )));
    }
    if sub.status == "ended" && count > 0 {
        return Err(RequestError::NotAllowed {
            id: subscription_id,
            reason: "the subscription has ended".into(),
        });
    }
    let newest = nodes.last().map(|(_, _, t, v)| (t.as_str(), *v));
    let instance_type = shape
        .instance_type
        .or(newest.map(|(t, _)| t))
        .ok_or_else(|| {
            RequestError::Invalid(
                "the subscription has no node to copy an instance type from; name one".into(),
            )
        })?
        .to_string();
    let volume_gb = shape
        .volume_gb
        .or(newest.map(|(_, v)| v))
        .unwrap_or(DEFAULT_VOLUME_GB);
    if !valid_instance_type(&instance_type) {
        return Err(RequestError::Invalid(format!(
            "`{instance_type}` is not a t4g instance type"
        )));
    }
    let count = count as usize;
    let mut scaled = Scaled::default();
    if count > nodes.len() {
        let (Some(user_id), Some(region)) = (&sub.user_id, &sub.region) else {
            return Err(RequestError::NotAllowed {
                id: subscription_id,
                reason: "the subscription is not bound to a user yet".into(),
            });
        };
        let next = store::max_ordinal(tx, subscription_id).await? + 1;
        let spec = NodeSpec {
            subscription_id,
            user_id,
            region,
            instance_type: &instance_type,
            volume_gb,
            node_domain,
        };
        let more = (count - nodes.len()) as i32;
        scaled.added = store::add_nodes(tx, &spec, next..next + more).await?;
    } else if count < nodes.len() {
        // Newest first: the highest ordinals.
        let newest: Vec<Uuid> = nodes[count..].iter().rev().map(|(id, ..)| *id).collect();
        let detail = format!("scaled to {count} nodes, asked by {by}");
        store::tear_down(tx, &newest, TeardownReason::ScaledDown, &detail).await?;
        scaled.removed = newest;
    }
    Ok(scaled)
}

/// Resizes every one of `nodes` (a subscription's counted nodes, locked by the caller) that
/// does not have the plan's type and volume (a volume never shrinks: a smaller plan keeps the
/// larger volume).
pub async fn follow_plan(
    tx: &mut Transaction<'_, Postgres>,
    nodes: &[CountedNode],
    instance_type: &str,
    volume_gb: i32,
    by: &str,
) -> RequestResult<()> {
    for (id, _, current_type, current_volume) in nodes {
        let volume = volume_gb.max(*current_volume);
        if current_type != instance_type || *current_volume != volume {
            resize(tx, *id, instance_type, volume, by).await?;
        }
    }
    Ok(())
}

/// One more node for the subscription, if its plan has room (the plan is a ceiling: nodes the
/// app deleted may be made again, never more than the plan's count). In `region`, else the
/// subscription's; shaped like its newest node, else like `plan_shape` (type, volume).
/// Returns the new node.
pub async fn add_node(
    tx: &mut Transaction<'_, Postgres>,
    subscription_id: Uuid,
    region: Option<&str>,
    plan_shape: (&str, i32),
    node_domain: &str,
    by: &str,
) -> RequestResult<Uuid> {
    let (sub, nodes) = store::lock_subscription_nodes(tx, subscription_id)
        .await?
        .ok_or(RequestError::SubscriptionNotFound(subscription_id))?;
    let entitled = sub.nodes_entitled.unwrap_or(0).max(0) as usize;
    // A node being torn down still runs (and costs) until it is gone.
    let leaving = store::leaving_nodes(tx, subscription_id).await?;
    if sub.status == "ended" || nodes.len() + leaving >= entitled {
        return Err(RequestError::NotAllowed {
            id: subscription_id,
            reason: format!(
                "the subscription's plan has room for {entitled} node(s), and it has {} \
                 ({leaving} of them being torn down)",
                nodes.len() + leaving
            ),
        });
    }
    let (Some(user_id), Some(sub_region)) = (&sub.user_id, &sub.region) else {
        return Err(RequestError::NotAllowed {
            id: subscription_id,
            reason: "the subscription is not bound to a user yet".into(),
        });
    };
    let (instance_type, volume_gb) = match nodes.last() {
        Some((_, _, t, v)) => (t.clone(), *v),
        None => (plan_shape.0.to_string(), plan_shape.1),
    };
    let next = store::max_ordinal(tx, subscription_id).await? + 1;
    let spec = NodeSpec {
        subscription_id,
        user_id,
        region: region.unwrap_or(sub_region),
        instance_type: &instance_type,
        volume_gb,
        node_domain,
    };
    let ids = store::add_nodes(tx, &spec, next..next + 1).await?;
    let id = ids
        .first()
        .copied()
        .ok_or(RequestError::SubscriptionNotFound(subscription_id))?;
    tracing::info!(node_id = %id, %subscription_id, by, "node added on request");
    Ok(id)
}
