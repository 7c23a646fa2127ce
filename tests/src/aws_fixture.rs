//! The static AWS footprint that terraform creates in production (a private subnet, a security
//! group without inbound rules, an arm64 image, the node zone), created in moto.

use anyhow::Context;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

/// SDK configuration that points at moto with dummy credentials.
pub async fn sdk_config(endpoint: &str, region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .load()
        .await
}

/// One region's part of the footprint: a VPC with a subnet in each of two zones, a security
/// group and an arm64 image.
#[derive(Debug, Clone)]
pub struct RegionFixture {
    pub region: String,
    pub vpc_id: String,
    /// In zones `a` and `b`, in that order.
    pub subnet_ids: Vec<String>,
    pub security_group_id: String,
    pub ami_id: String,
}

impl RegionFixture {
    pub async fn create(config: &aws_config::SdkConfig) -> anyhow::Result<Self> {
        let ec2 = aws_sdk_ec2::Client::new(config);
        let region = config.region().map(|r| r.to_string()).unwrap_or_default();
        let tag = |resource: ResourceType| {
            TagSpecification::builder()
                .resource_type(resource)
                .tags(Tag::builder().key("hive:stack").value("local").build())
                .build()
        };
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.42.0.0/16")
            .tag_specifications(tag(ResourceType::Vpc))
            .send()
            .await
            .context("creating the VPC")?;
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .context("VPC without id")?
            .to_string();
        let mut subnet_ids = Vec::new();
        for (n, zone) in ["a", "b"].iter().enumerate() {
            let subnet = ec2
                .create_subnet()
                .vpc_id(&vpc_id)
                .cidr_block(format!("10.42.{}.0/24", n + 1))
                .availability_zone(format!("{region}{zone}"))
                .tag_specifications(tag(ResourceType::Subnet))
                .send()
                .await
                .context("creating a subnet")?;
            subnet_ids.push(
                subnet
                    .subnet()
                    .and_then(|s| s.subnet_id())
                    .context("subnet without id")?
                    .to_string(),
            );
        }
        let sg = ec2
            .create_security_group()
            .group_name("hive-nodes")
            .description("Hive nodes: no inbound")
            .vpc_id(&vpc_id)
            .send()
            .await
            .context("creating the security group")?;
        let security_group_id = sg.group_id().context("group without id")?.to_string();
        let images = ec2
            .describe_images()
            .filters(
                Filter::builder()
                    .name("architecture")
                    .values("arm64")
                    .build(),
            )
            .send()
            .await
            .context("looking up an arm64 image")?;
        let ami_id = images
            .images()
            .iter()
            .find_map(|i| i.image_id())
            .context("moto has no arm64 image")?
            .to_string();
        Ok(RegionFixture {
            region,
            vpc_id,
            subnet_ids,
            security_group_id,
            ami_id,
        })
    }

    /// Its `[regions.<name>]` table for `HIVE_CONFIG_FILE`.
    pub fn toml(&self, instance_profile: &str) -> String {
        let subnets: Vec<String> = self.subnet_ids.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "[regions.{}]\nami = \"{}\"\nsubnets = [{}]\nsecurity_group = \"{}\"\ninstance_profile = \"{instance_profile}\"\n\n",
            self.region,
            self.ami_id,
            subnets.join(", "),
            self.security_group_id
        )
    }
}

#[derive(Debug, Clone)]
pub struct AwsFixture {
    pub region: String,
    pub vpc_id: String,
    /// The subnet of the first zone: the one-region shorthand names only it.
    pub subnet_id: String,
    pub home: RegionFixture,
    pub security_group_id: String,
    pub ami_id: String,
    pub zone_id: String,
    pub instance_profile: String,
}

impl AwsFixture {
    /// The home region's footprint, and the global part (the node zone, the instance profile).
    pub async fn create(
        config: &aws_config::SdkConfig,
        domain: &str,
        instance_profile: &str,
    ) -> anyhow::Result<Self> {
        let home = RegionFixture::create(config).await?;
        let r53 = aws_sdk_route53::Client::new(config);
        let zone = r53
            .create_hosted_zone()
            .name(domain)
            .caller_reference(uuid::Uuid::new_v4().to_string())
            .send()
            .await
            .context("creating the hosted zone")?;
        let zone_id = zone
            .hosted_zone()
            .map(|z| z.id().trim_start_matches("/hostedzone/").to_string())
            .context("zone without id")?;
        let iam = aws_sdk_iam::Client::new(config);
        let assume_ec2 = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
        iam.create_role()
            .role_name(instance_profile)
            .assume_role_policy_document(assume_ec2)
            .send()
            .await
            .context("creating the node role")?;
        iam.create_instance_profile()
            .instance_profile_name(instance_profile)
            .send()
            .await
            .context("creating the node instance profile")?;
        iam.add_role_to_instance_profile()
            .instance_profile_name(instance_profile)
            .role_name(instance_profile)
            .send()
            .await
            .context("adding the role to the profile")?;
        Ok(AwsFixture {
            instance_profile: instance_profile.to_string(),
            region: home.region.clone(),
            vpc_id: home.vpc_id.clone(),
            subnet_id: home.subnet_ids[0].clone(),
            security_group_id: home.security_group_id.clone(),
            ami_id: home.ami_id.clone(),
            home,
            zone_id,
        })
    }
}

/// A node's Route 53 record as provisioning writes it (`<node>.<domain>` →
/// `<node>.<domain>.cdn.cloudflare.net`), with `ttl`.
pub fn node_cname(
    hostname: &str,
    ttl: i64,
) -> anyhow::Result<aws_sdk_route53::types::ResourceRecordSet> {
    use aws_sdk_route53::types::{ResourceRecord, ResourceRecordSet, RrType};
    Ok(ResourceRecordSet::builder()
        .name(hostname)
        .r#type(RrType::Cname)
        .ttl(ttl)
        .resource_records(
            ResourceRecord::builder()
                .value(format!("{hostname}.cdn.cloudflare.net"))
                .build()?,
        )
        .build()?)
}
