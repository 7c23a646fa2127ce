//! The node's EC2 instance: launched, waited on, stopped, started, rebooted, resized and
//! terminated. Every action reads the instance first and acts only on the difference, so a
//! repeat (a crash, a retry, a second worker) does not act twice.

use super::{done, idempotency_token, instance_is_young, required, Outcome, StepContext};
use crate::cloud::compute::{InstanceInfo, LaunchError, LaunchSpec};
use crate::cloud::{CloudError, CloudResult};
use crate::model::Created;
use crate::model::Node;
use crate::user_data::{self, UserDataParams};

/// The node's recorded instance as EC2 sees it now, read together with the other nodes'
/// reads of the moment, or the outcome to answer: EC2 does not know a young instance yet
/// (look again); gone otherwise is a permanent failure (the reconciler brings a ready node
/// whose instance vanished back to launching).
pub(crate) async fn current(
    ctx: &StepContext<'_>,
    node: &Node,
) -> CloudResult<Result<InstanceInfo, Outcome>> {
    let instance_id = required(node, "instance_id", &node.instance_id)?;
    match ctx.aws.compute.observe(instance_id).await? {
        Some(instance) => Ok(Ok(instance)),
        None if instance_is_young(ctx, node) => Ok(Err(Outcome::NotYet(NOT_VISIBLE_YET))),
        None => Err(CloudError::permanent(
            "ec2",
            format!("instance {instance_id} has vanished"),
        )),
    }
}

const NOT_VISIBLE_YET: &str = "instance not visible to EC2's reads yet";

/// The node's instance, or return the outcome [`current`] answered.
macro_rules! current_or_return {
    ($ctx:expr, $node:expr) => {
        match current($ctx, $node).await? {
            Ok(instance) => instance,
            Err(outcome) => return Ok(outcome),
        }
    };
}

/// Launches the node's t4g instance, or adopts the one tagged with the node (a crashed run's,
/// or the same `ClientToken`'s). A zone without capacity moves the launch to the region's next
/// subnet, then to the plan's fallback types; where it landed, and why, is recorded. Undo:
/// [`terminate`].
pub async fn launch(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let compute = &ctx.aws.compute;
    if let Some(existing) = compute.find_by_node(node.id).await? {
        // Record what it really is, so a resize converges from there.
        let volume_gb = match &existing.root_volume_id {
            Some(volume) => compute.volume_size(volume).await?,
            None => None,
        };
        let fallback = (existing.instance_type != node.instance_type)
            .then(|| (existing.instance_type.clone(), node.instance_type.clone()));
        return Ok(Outcome::Done(Created {
            instance_id: Some(existing.id),
            applied_instance_type: Some(existing.instance_type),
            applied_volume_gb: volume_gb.or(Some(node.volume_gb)),
            placement: existing.placement,
            fallback,
            ..Created::default()
        }));
    }
    let config = ctx.config;
    let region = &ctx.aws.settings;
    let secret_id = node.secret_name();
    let user_data = user_data::render(&UserDataParams {
        node_id: node.id,
        region: &node.region,
        secret_id: &secret_id,
        hostname: &node.hostname,
        edge_service_port: config.edge_service_port,
        edge_package_url: config.edge_package_url.as_deref(),
    })
    .map_err(|e| CloudError::permanent("user-data", e.to_string()))?;
    let mut types = vec![node.instance_type.as_str()];
    types.extend(
        config
            .plans
            .fallbacks_for(&node.instance_type)
            .iter()
            .map(String::as_str)
            .filter(|t| *t != node.instance_type),
    );
    // A retry repeats the attempt under way when it was cut off (same zone, type and token):
    // EC2 then answers the instance it launched, which its reads may not show yet. Starting
    // over in a zone that had no capacity before could launch a second one.
    let token_base = idempotency_token(node);
    let resume_at = node
        .launch_token
        .as_deref()
        .and_then(|token| attempt_of(token, &token_base))
        .unwrap_or((0, 0));
    let mut full = Vec::new();
    for (t, instance_type) in types.iter().enumerate() {
        for (s, subnet_id) in region.subnets.iter().enumerate() {
            if (t, s) < resume_at {
                continue;
            }
            let client_token = format!("{token_base}-{t}-{s}");
            // Written first: a teardown then knows an instance may exist that EC2 does not
            // show yet, and a retry where to resume.
            ctx.progress.launch_attempt(node, &client_token).await?;
            let launched = compute
                .launch(&LaunchSpec {
                    node_id: node.id,
                    subscription_id: node.subscription_id,
                    user_id: &node.user_id,
                    instance_type,
                    image: &region.image,
                    subnet_id,
                    security_group_id: &region.security_group,
                    instance_profile: &region.instance_profile,
                    user_data: &user_data,
                    volume_gb: node.volume_gb,
                    // Another subnet or type is another request: EC2 refuses one token
                    // with other parameters.
                    client_token,
                })
                .await;
            let instance = match launched {
                Ok(instance) => instance,
                Err(LaunchError::NoCapacity(what)) => {
                    tracing::warn!(%what, "no capacity; trying the next zone or type");
                    full.push(what);
                    continue;
                }
                Err(LaunchError::Cloud(e)) => return Err(e),
            };
            let placement = instance.placement.clone();
            tracing::info!(instance_id = %instance.id, placement = ?placement, %instance_type, "instance launched");
            let fallback = (*instance_type != node.instance_type)
                .then(|| (instance_type.to_string(), node.instance_type.clone()));
            let note = (!full.is_empty()).then(|| {
                format!(
                    "launched as {instance_type} in {}: no capacity for {}",
                    placement.as_deref().unwrap_or(subnet_id),
                    full.join(", ")
                )
            });
            return Ok(Outcome::Done(Created {
                instance_id: Some(instance.id),
                applied_instance_type: Some(instance_type.to_string()),
                applied_volume_gb: Some(node.volume_gb),
                placement,
                fallback,
                note,
                ..Created::default()
            }));
        }
    }
    // No zone has any of the types now; capacity comes back, so this is worth retrying.
    Err(CloudError::transient(
        "ec2:RunInstances",
        format!(
            "InsufficientInstanceCapacity: no capacity for {}",
            full.join(", ")
        ),
    ))
}

/// The (type, subnet) indexes of a launch attempt's token of this generation.
fn attempt_of(token: &str, base: &str) -> Option<(usize, usize)> {
    let (t, s) = token
        .strip_prefix(base)?
        .strip_prefix('-')?
        .split_once('-')?;
    Some((t.parse().ok()?, s.parse().ok()?))
}

/// Terminates the node's instances: the tagged one, and the recorded one should it differ;
/// only live ones (terminating one twice is an error in some EC2 implementations). A young
/// recorded instance that EC2 does not show yet is waited for, never taken for gone: it may
/// be running (EC2's reads are eventually consistent).
pub async fn terminate(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let compute = &ctx.aws.compute;
    let is_live = |i: &InstanceInfo| !matches!(i.state.as_str(), "shutting-down" | "terminated");
    // One read of everything tagged with the node, in any state: what EC2 shows at all.
    let tagged = compute.all_by_node(node.id).await?;
    let mut seen = !tagged.is_empty();
    let mut live: Vec<String> = tagged
        .iter()
        .filter(|i| is_live(i))
        .map(|i| i.id.clone())
        .collect();
    if let Some(recorded) = node.instance_id.as_ref().filter(|r| !live.contains(r)) {
        if let Some(instance) = compute.describe_in_any_state(recorded).await? {
            seen = true;
            if is_live(&instance) {
                live.push(recorded.clone());
            }
        }
    }
    if !seen && instance_is_young(ctx, node) {
        // A launch was attempted a moment ago: its instance may run without EC2 showing it.
        return Ok(Outcome::NotYet(NOT_VISIBLE_YET));
    }
    for instance_id in &live {
        compute.terminate(instance_id).await?;
    }
    done()
}

/// Waits until the instance runs. No undo: it only reads.
pub async fn wait_running(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    match instance.state.as_str() {
        "running" => done(),
        "pending" => Ok(Outcome::NotYet("instance is pending")),
        other => Err(CloudError::permanent(
            "ec2",
            format!("instance {} is {other}, not starting", instance.id),
        )),
    }
}

/// Stops the instance; its volume, tunnel, DNS and secret stay. No undo: starting it again is
/// a workflow of its own (resume), chosen by the node's intent.
pub async fn stop(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    match instance.state.as_str() {
        "stopped" | "stopping" => done(),
        // EC2 refuses to stop an instance that has not started yet.
        "pending" => Ok(Outcome::NotYet("instance is pending")),
        _ => {
            ctx.aws.compute.stop(&instance.id).await?;
            tracing::info!(instance_id = %instance.id, "instance stopping");
            done()
        }
    }
}

/// Waits until the instance is `stopped`. No undo: it only reads (or stops again an instance
/// someone started meanwhile).
pub async fn wait_stopped(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    match instance.state.as_str() {
        "stopped" => done(),
        "stopping" => Ok(Outcome::NotYet("instance is stopping")),
        "pending" => Ok(Outcome::NotYet("instance is pending")),
        _ => {
            ctx.aws.compute.stop(&instance.id).await?;
            Ok(Outcome::NotYet("instance is stopping"))
        }
    }
}

/// Starts the stopped instance. No undo: stopping it is the suspend workflow's.
pub async fn start(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    match instance.state.as_str() {
        "running" | "pending" => done(),
        "stopping" => Ok(Outcome::NotYet("instance is still stopping")),
        _ => {
            ctx.aws.compute.start(&instance.id).await?;
            tracing::info!(instance_id = %instance.id, "instance starting");
            done()
        }
    }
}

/// Reboots the instance once per restart request: the instance carries the number of the
/// request it carried out (`hive:restarted`), so a repeat finds it done. No undo: a reboot
/// cannot be taken back.
pub async fn reboot(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    let request = node.restarts_requested.to_string();
    let carried_out = Outcome::Done(Created {
        restarts_done: Some(node.restarts_requested),
        ..Created::default()
    });
    if instance.restarted.as_deref() == Some(request.as_str()) {
        return Ok(carried_out);
    }
    if instance.state != "running" {
        return Ok(Outcome::NotYet("instance is not running"));
    }
    let compute = &ctx.aws.compute;
    compute.reboot(&instance.id).await?;
    compute.mark_restarted(&instance.id, &request).await?;
    tracing::info!(instance_id = %instance.id, request, "instance rebooted");
    Ok(carried_out)
}

/// Gives the stopped instance the node's instance type. No undo: a later resize converges on
/// whatever type the node then asks for.
pub async fn change_type(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    if instance.instance_type != node.instance_type {
        if instance.state != "stopped" {
            return Err(CloudError::permanent(
                "ec2",
                format!(
                    "instance {} is {}, not stopped",
                    instance.id, instance.state
                ),
            ));
        }
        ctx.aws
            .compute
            .set_instance_type(&instance.id, &node.instance_type)
            .await?;
        tracing::info!(instance_id = %instance.id, instance_type = %node.instance_type, "instance type changed");
    }
    Ok(Outcome::Done(Created {
        applied_instance_type: Some(node.instance_type.clone()),
        ..Created::default()
    }))
}

/// Grows the root volume to the node's size (a volume is never shrunk). No undo: EBS cannot
/// shrink a volume.
pub async fn grow_volume(ctx: &StepContext<'_>, node: &Node) -> CloudResult<Outcome> {
    let instance = current_or_return!(ctx, node);
    let volume = instance.root_volume_id.ok_or_else(|| {
        CloudError::permanent(
            "ec2",
            format!("instance {} has no root volume", instance.id),
        )
    })?;
    let compute = &ctx.aws.compute;
    let size = compute
        .volume_size(&volume)
        .await?
        .ok_or_else(|| CloudError::permanent("ec2", format!("volume {volume} has vanished")))?;
    // A modification under way is not asked for again: EC2 refuses another until it is done,
    // and its new size shows only once it is `optimizing` (a repeat after a crash would
    // otherwise see the old size and ask again).
    if let Some((state, target)) = compute.volume_modification(&volume).await? {
        if matches!(state.as_str(), "modifying" | "optimizing") {
            let target = target.unwrap_or(size);
            if target < node.volume_gb {
                return Ok(Outcome::NotYet(
                    "an earlier volume modification is under way",
                ));
            }
            return Ok(Outcome::Done(Created {
                applied_volume_gb: Some(target.max(size)),
                ..Created::default()
            }));
        }
    }
    if size < node.volume_gb {
        compute.grow_volume(&volume, node.volume_gb).await?;
        tracing::info!(volume, size_gb = node.volume_gb, "root volume grown");
    }
    Ok(Outcome::Done(Created {
        applied_volume_gb: Some(size.max(node.volume_gb)),
        ..Created::default()
    }))
}
