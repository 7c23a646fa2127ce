//! EC2: the node's instance.

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceType, ResourceType, Tag, TagSpecification,
    VolumeType,
};
use base64::Engine;
use uuid::Uuid;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::instance_reads::{self, Reads};
use super::{aws_code, classify_aws, CloudError, CloudResult};
use crate::config::Image;
use crate::model::tags;

/// Why a launch did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// `InsufficientInstanceCapacity`: this zone has none of this type right now; another
    /// zone or type may.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// The root device of an image named by a parameter, which DescribeImages cannot look up:
/// Debian's and Amazon Linux's arm64 images boot from it.
const PARAMETER_IMAGE_ROOT_DEVICE: &str = "/dev/xvda";

#[derive(Clone)]
pub struct Compute {
    ec2: aws_sdk_ec2::Client,
    region: String,
    /// The region's batched reads (see `instance_reads`), started by the first read.
    reads: Arc<OnceLock<Reads<InstanceInfo>>>,
}

/// What we need to know of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    pub arn: String,
    /// `t4g.small`, ...
    pub instance_type: String,
    /// The EBS volume at the root device.
    pub root_volume_id: Option<String>,
    /// The restart request last carried out on it (its `hive:restarted` tag).
    pub restarted: Option<String>,
    /// Where it runs: `subnet-... (zone)`.
    pub placement: Option<String>,
    /// When it was launched, as EC2 says.
    pub launched_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `subnet-... (zone)`, or what of it is known.
fn placement_of(instance: &aws_sdk_ec2::types::Instance) -> Option<String> {
    let zone = instance.placement().and_then(|p| p.availability_zone());
    match (instance.subnet_id(), zone) {
        (Some(subnet), Some(zone)) => Some(format!("{subnet} ({zone})")),
        (Some(subnet), None) => Some(subnet.to_string()),
        (None, Some(zone)) => Some(zone.to_string()),
        (None, None) => None,
    }
}

/// Everything a launch needs, beyond the node's identity.
pub struct LaunchSpec<'a> {
    pub node_id: Uuid,
    pub subscription_id: Uuid,
    pub user_id: &'a str,
    pub instance_type: &'a str,
    pub image: &'a Image,
    pub subnet_id: &'a str,
    pub security_group_id: &'a str,
    pub instance_profile: &'a str,
    pub user_data: &'a str,
    /// Root volume size in GiB.
    pub volume_gb: i32,
    /// Idempotency token for RunInstances: the same for every try of one generation.
    pub client_token: String,
}

/// States in which an instance still exists for us (not terminated or on its way there).
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// The DescribeInstances filter for instances in a [`LIVE_STATES`] state.
fn live_states() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(LIVE_STATES.iter().map(|s| s.to_string()).collect()))
        .build()
}

impl Compute {
    pub fn new(ec2: aws_sdk_ec2::Client, region: String) -> Self {
        Self {
            ec2,
            region,
            reads: Arc::default(),
        }
    }

    /// Whether EC2 answers our credentials in our region (`hivectl doctor`).
    pub async fn ping(&self) -> CloudResult<()> {
        self.ec2
            .describe_availability_zones()
            .send()
            .await
            .map_err(|e| classify_aws("ec2:DescribeAvailabilityZones", e))?;
        Ok(())
    }

    /// The live instance tagged with this node, if any.
    pub async fn find_by_node(&self, node_id: Uuid) -> CloudResult<Option<InstanceInfo>> {
        Ok(self.tagged_with(node_id, true).await?.into_iter().next())
    }

    /// Every instance EC2 shows tagged with this node, terminated ones included.
    pub async fn all_by_node(&self, node_id: Uuid) -> CloudResult<Vec<InstanceInfo>> {
        self.tagged_with(node_id, false).await
    }

    async fn tagged_with(&self, node_id: Uuid, live_only: bool) -> CloudResult<Vec<InstanceInfo>> {
        let mut request = self.ec2.describe_instances().filters(
            Filter::builder()
                .name(format!("tag:{}", tags::NODE_ID))
                .values(node_id.to_string())
                .build(),
        );
        if live_only {
            request = request.filters(live_states());
        }
        let out = request
            .send()
            .await
            .map_err(|e| classify_aws("ec2:DescribeInstances", e))?;
        Ok(self.instances(&out))
    }

    /// Every live instance tagged as a node's: (instance, node id from its tag).
    pub async fn list_tagged(&self) -> CloudResult<Vec<(InstanceInfo, String)>> {
        let mut found = Vec::new();
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag-key")
                    .values(tags::NODE_ID)
                    .build(),
            )
            .filters(live_states())
            // EC2's most: the pass's calls grow with pages, not nodes.
            .max_results(1000)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify_aws("ec2:DescribeInstances", e))?;
            let infos = self.instances(&page);
            let node_ids = page
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(|i| {
                    i.tags()
                        .iter()
                        .find(|t| t.key() == Some(tags::NODE_ID))
                        .and_then(|t| t.value())
                        .unwrap_or_default()
                        .to_string()
                });
            found.extend(infos.into_iter().zip(node_ids));
        }
        Ok(found)
    }

    /// The instance by id; `None` when EC2 does not know it (or it is terminated).
    pub async fn describe(&self, instance_id: &str) -> CloudResult<Option<InstanceInfo>> {
        Ok(self
            .describe_in_any_state(instance_id)
            .await?
            .filter(|i| i.state != "terminated"))
    }

    /// The instance by id, terminated included; `None` when EC2 does not know it (yet: a
    /// young instance may not show; or any more: a terminated one shows for about an hour).
    pub async fn describe_in_any_state(
        &self,
        instance_id: &str,
    ) -> CloudResult<Option<InstanceInfo>> {
        let result = self
            .ec2
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        match result {
            Ok(out) => Ok(self.instances(&out).into_iter().next()),
            Err(e) if super::aws_code(&e) == Some("InvalidInstanceID.NotFound") => Ok(None),
            Err(e) => Err(classify_aws("ec2:DescribeInstances", e)),
        }
    }

    /// The instance by id, read together with the other reads waiting at the same moment
    /// (one `DescribeInstances` for a crowd of waiting nodes); `None` as for [`describe`].
    ///
    /// [`describe`]: Compute::describe
    pub async fn observe(&self, instance_id: &str) -> CloudResult<Option<InstanceInfo>> {
        let reads = self.reads.get_or_init(|| {
            // The sending task gets a client of its own, so it ends when we are dropped.
            let compute = Compute::new(self.ec2.clone(), self.region.clone());
            instance_reads::spawn(move |ids: Vec<String>| {
                let compute = compute.clone();
                async move { compute.describe_many(&ids).await }
            })
        });
        instance_reads::read(reads, instance_id).await
    }

    /// The live instances among `ids` (at most `instance_reads::MOST_PER_CALL`), by id. A
    /// filter rather than `InstanceIds`: one unknown id fails a whole `InstanceIds` call.
    pub async fn describe_many(
        &self,
        ids: &[String],
    ) -> CloudResult<HashMap<String, InstanceInfo>> {
        let mut found = Vec::with_capacity(ids.len());
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("instance-id")
                    .set_values(Some(ids.to_vec()))
                    .build(),
            )
            .max_results(1000)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify_aws("ec2:DescribeInstances", e))?;
            found.extend(self.instances(&page));
        }
        Ok(found
            .into_iter()
            .filter(|i| i.state != "terminated")
            .map(|i| (i.id.clone(), i))
            .collect())
    }

    fn instances(
        &self,
        out: &aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput,
    ) -> Vec<InstanceInfo> {
        let mut found = Vec::new();
        for reservation in out.reservations() {
            let account = reservation.owner_id().unwrap_or("000000000000");
            for instance in reservation.instances() {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default();
                let root_volume_id = instance
                    .block_device_mappings()
                    .iter()
                    .find(|m| m.device_name() == instance.root_device_name())
                    .or_else(|| instance.block_device_mappings().first())
                    .and_then(|m| m.ebs())
                    .and_then(|e| e.volume_id())
                    .map(str::to_string);
                let restarted = instance
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(tags::RESTARTED))
                    .and_then(|t| t.value())
                    .map(str::to_string);
                found.push(InstanceInfo {
                    id: id.to_string(),
                    state,
                    arn: format!("arn:aws:ec2:{}:{account}:instance/{id}", self.region),
                    instance_type: instance
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    root_volume_id,
                    restarted,
                    placement: placement_of(instance),
                    launched_at: instance.launch_time().and_then(super::utc),
                });
            }
        }
        found
    }

    /// Launches the node's instance: IMDSv2 only, no public IP, encrypted root volume, tagged.
    pub async fn launch(&self, spec: &LaunchSpec<'_>) -> Result<InstanceInfo, LaunchError> {
        let root_device = match spec.image {
            Image::Ami(ami_id) => self.root_device_name(ami_id).await?,
            Image::Parameter(_) => PARAMETER_IMAGE_ROOT_DEVICE.to_string(),
        };
        let node_tags = [
            (tags::NODE_ID, spec.node_id.to_string()),
            (tags::SUBSCRIPTION, spec.subscription_id.to_string()),
            (tags::USER, spec.user_id.to_string()),
            ("Name", format!("hive-{}", spec.node_id)),
        ];
        let tag_spec = |resource: ResourceType| {
            let mut b = TagSpecification::builder().resource_type(resource);
            for (k, v) in &node_tags {
                b = b.tags(Tag::builder().key(*k).value(v).build());
            }
            b.build()
        };
        let out = self
            .ec2
            .run_instances()
            .client_token(&spec.client_token)
            .image_id(spec.image.launch_image_id())
            .instance_type(InstanceType::from(spec.instance_type))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(spec.user_data))
            .iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(spec.instance_profile)
                    .build(),
            )
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .subnet_id(spec.subnet_id)
                    .groups(spec.security_group_id)
                    .associate_public_ip_address(false)
                    .delete_on_termination(true)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .encrypted(true)
                            .volume_type(VolumeType::Gp3)
                            .volume_size(spec.volume_gb)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume))
            .send()
            .await
            .map_err(|e| {
                if aws_code(&e) == Some("InsufficientInstanceCapacity") {
                    LaunchError::NoCapacity(format!("{} in {}", spec.instance_type, spec.subnet_id))
                } else {
                    LaunchError::Cloud(classify_aws("ec2:RunInstances", e))
                }
            })?;
        let instance = out.instances().first().ok_or_else(|| {
            CloudError::permanent("ec2:RunInstances", "no instance in the answer")
        })?;
        let id = instance
            .instance_id()
            .ok_or_else(|| CloudError::permanent("ec2:RunInstances", "instance without id"))?;
        let account = out.owner_id().unwrap_or("000000000000");
        Ok(InstanceInfo {
            id: id.to_string(),
            state: instance
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_else(|| "pending".into()),
            arn: format!("arn:aws:ec2:{}:{account}:instance/{id}", self.region),
            instance_type: spec.instance_type.to_string(),
            root_volume_id: None,
            restarted: None,
            placement: placement_of(instance).or_else(|| Some(spec.subnet_id.to_string())),
            launched_at: instance.launch_time().and_then(super::utc),
        })
    }

    async fn root_device_name(&self, ami_id: &str) -> CloudResult<String> {
        let out = self
            .ec2
            .describe_images()
            .image_ids(ami_id)
            .send()
            .await
            .map_err(|e| classify_aws("ec2:DescribeImages", e))?;
        let image = out.images().first().ok_or_else(|| {
            CloudError::permanent("ec2:DescribeImages", format!("AMI {ami_id} not found"))
        })?;
        Ok(image.root_device_name().unwrap_or("/dev/xvda").to_string())
    }

    /// Terminates the instance; one that is gone already counts as done.
    pub async fn terminate(&self, instance_id: &str) -> CloudResult<()> {
        match self
            .ec2
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if super::aws_code(&e) == Some("InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(classify_aws("ec2:TerminateInstances", e)),
        }
    }

    /// Stops the instance (it keeps its volume, tags and identity).
    pub async fn stop(&self, instance_id: &str) -> CloudResult<()> {
        self.ec2
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| classify_aws("ec2:StopInstances", e))?;
        Ok(())
    }

    /// Starts a stopped instance.
    pub async fn start(&self, instance_id: &str) -> CloudResult<()> {
        self.ec2
            .start_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| classify_aws("ec2:StartInstances", e))?;
        Ok(())
    }

    /// Reboots a running instance.
    pub async fn reboot(&self, instance_id: &str) -> CloudResult<()> {
        self.ec2
            .reboot_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| classify_aws("ec2:RebootInstances", e))?;
        Ok(())
    }

    /// Records on the instance which restart request it has carried out.
    pub async fn mark_restarted(&self, instance_id: &str, request: &str) -> CloudResult<()> {
        self.ec2
            .create_tags()
            .resources(instance_id)
            .tags(Tag::builder().key(tags::RESTARTED).value(request).build())
            .send()
            .await
            .map_err(|e| classify_aws("ec2:CreateTags", e))?;
        Ok(())
    }

    /// Changes a stopped instance's type.
    pub async fn set_instance_type(
        &self,
        instance_id: &str,
        instance_type: &str,
    ) -> CloudResult<()> {
        self.ec2
            .modify_instance_attribute()
            .instance_id(instance_id)
            .instance_type(
                aws_sdk_ec2::types::AttributeValue::builder()
                    .value(instance_type)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify_aws("ec2:ModifyInstanceAttribute", e))?;
        Ok(())
    }

    /// A volume's size in GiB; `None` when EC2 does not know it.
    pub async fn volume_size(&self, volume_id: &str) -> CloudResult<Option<i32>> {
        match self
            .ec2
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
        {
            Ok(out) => Ok(out.volumes().first().and_then(|v| v.size())),
            Err(e) if super::aws_code(&e) == Some("InvalidVolume.NotFound") => Ok(None),
            Err(e) => Err(classify_aws("ec2:DescribeVolumes", e)),
        }
    }

    /// The state (`modifying`, `optimizing`, `completed`, `failed`) and target size of the
    /// volume's latest modification; `None` when it was never modified.
    pub async fn volume_modification(
        &self,
        volume_id: &str,
    ) -> CloudResult<Option<(String, Option<i32>)>> {
        match self
            .ec2
            .describe_volumes_modifications()
            .volume_ids(volume_id)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .volumes_modifications()
                .iter()
                .max_by_key(|m| m.start_time().map(|t| (t.secs(), t.subsec_nanos())))
                .map(|m| {
                    (
                        m.modification_state()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                        m.target_size(),
                    )
                })),
            Err(e)
                if matches!(
                    super::aws_code(&e),
                    Some("InvalidVolumeModification.NotFound" | "InvalidVolume.NotFound")
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify_aws("ec2:DescribeVolumesModifications", e)),
        }
    }

    /// Grows a volume to `size_gb` (EBS never shrinks one).
    pub async fn grow_volume(&self, volume_id: &str, size_gb: i32) -> CloudResult<()> {
        self.ec2
            .modify_volume()
            .volume_id(volume_id)
            .size(size_gb)
            .send()
            .await
            .map_err(|e| classify_aws("ec2:ModifyVolume", e))?;
        Ok(())
    }
}
