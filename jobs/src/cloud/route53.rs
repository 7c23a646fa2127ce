//! Route 53: the public name of a node, which points at Cloudflare's edge.

use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord, ResourceRecordSet, RrType,
};

use super::{aws_code, classify_aws, CloudError, CloudResult};

/// The node record's TTL.
const TTL: i64 = 300;

#[derive(Clone)]
pub struct Route53 {
    r53: aws_sdk_route53::Client,
    zone_id: String,
}

/// Whether a change has reached every Route 53 name server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    InSync,
    Pending,
}

impl Route53 {
    pub fn new(r53: aws_sdk_route53::Client, zone_id: String) -> Self {
        Self { r53, zone_id }
    }

    /// Whether the configured hosted zone can be read with our credentials (`hivectl doctor`).
    pub async fn ping(&self) -> CloudResult<()> {
        self.r53
            .get_hosted_zone()
            .id(&self.zone_id)
            .send()
            .await
            .map_err(|e| classify_aws("route53:GetHostedZone", e))?;
        Ok(())
    }

    /// Where a node's name points: its name under Cloudflare's partial-zone target.
    pub fn cname_target(hostname: &str) -> String {
        format!("{hostname}.cdn.cloudflare.net")
    }

    fn cname(hostname: &str) -> CloudResult<ResourceRecordSet> {
        ResourceRecordSet::builder()
            .name(hostname)
            .r#type(RrType::Cname)
            .ttl(TTL)
            .resource_records(
                ResourceRecord::builder()
                    .value(Self::cname_target(hostname))
                    .build()
                    .map_err(|e| CloudError::permanent("route53:build", e.to_string()))?,
            )
            .build()
            .map_err(|e| CloudError::permanent("route53:build", e.to_string()))
    }

    async fn submit(
        &self,
        action: ChangeAction,
        record: ResourceRecordSet,
    ) -> CloudResult<(String, Propagation)> {
        let batch = ChangeBatch::builder()
            .changes(
                Change::builder()
                    .action(action)
                    .resource_record_set(record)
                    .build()
                    .map_err(|e| CloudError::permanent("route53:build", e.to_string()))?,
            )
            .build()
            .map_err(|e| CloudError::permanent("route53:build", e.to_string()))?;
        let out = self
            .r53
            .change_resource_record_sets()
            .hosted_zone_id(&self.zone_id)
            .change_batch(batch)
            .send()
            .await
            .map_err(|e| classify_aws("route53:ChangeResourceRecordSets", e))?;
        let info = out.change_info().ok_or_else(|| {
            CloudError::permanent("route53:ChangeResourceRecordSets", "no change info")
        })?;
        Ok((info.id().to_string(), propagation(info.status())))
    }

    /// Creates or replaces the node's CNAME (UPSERT is idempotent): the change's id, and where
    /// Route 53 is with it (AWS answers every change `PENDING`).
    pub async fn upsert(&self, hostname: &str) -> CloudResult<(String, Propagation)> {
        self.submit(ChangeAction::Upsert, Self::cname(hostname)?)
            .await
    }

    /// Whether a record set is the one the node needs.
    pub fn is_wanted(record: &ResourceRecordSet, hostname: &str) -> bool {
        record.ttl() == Some(TTL)
            && record.resource_records().len() == 1
            && record.resource_records()[0].value() == Self::cname_target(hostname)
    }

    /// Where Route 53 is with a change we made: `INSYNC` once every name server has it. A
    /// change Route 53 no longer knows (`NoSuchChange`) is reported as `None`.
    pub async fn change_status(&self, change_id: &str) -> CloudResult<Option<Propagation>> {
        let id = change_id.trim_start_matches("/change/");
        match self.r53.get_change().id(id).send().await {
            Ok(out) => Ok(out.change_info().map(|info| propagation(info.status()))),
            Err(e) if aws_code(&e) == Some("NoSuchChange") => Ok(None),
            Err(e) => Err(classify_aws("route53:GetChange", e)),
        }
    }

    /// The node's CNAME record set as Route 53 holds it (TTL and values), if it exists.
    pub async fn find_record(&self, hostname: &str) -> CloudResult<Option<ResourceRecordSet>> {
        let fqdn = format!("{}.", hostname.trim_end_matches('.'));
        let out = self
            .r53
            .list_resource_record_sets()
            .hosted_zone_id(&self.zone_id)
            .start_record_name(&fqdn)
            .start_record_type(RrType::Cname)
            .max_items(1)
            .send()
            .await
            .map_err(|e| classify_aws("route53:ListResourceRecordSets", e))?;
        Ok(out
            .resource_record_sets()
            .iter()
            .find(|r| r.name() == fqdn && r.r#type() == &RrType::Cname)
            .cloned())
    }

    /// Names (without the final dot) of every CNAME in the zone.
    pub async fn list_cnames(&self) -> CloudResult<Vec<String>> {
        let mut names = Vec::new();
        let mut start: Option<(String, RrType)> = None;
        loop {
            let mut req = self
                .r53
                .list_resource_record_sets()
                .hosted_zone_id(&self.zone_id)
                // Route 53's most per page.
                .max_items(300);
            if let Some((name, kind)) = start.take() {
                req = req.start_record_name(name).start_record_type(kind);
            }
            let out = req
                .send()
                .await
                .map_err(|e| classify_aws("route53:ListResourceRecordSets", e))?;
            names.extend(
                out.resource_record_sets()
                    .iter()
                    .filter(|r| r.r#type() == &RrType::Cname)
                    .map(|r| r.name().trim_end_matches('.').to_string()),
            );
            match (
                out.is_truncated(),
                out.next_record_name(),
                out.next_record_type(),
            ) {
                (true, Some(name), Some(kind)) => start = Some((name.to_string(), kind.clone())),
                _ => break,
            }
        }
        Ok(names)
    }

    /// Deletes the node's CNAME exactly as Route 53 holds it: a DELETE must repeat the record
    /// (TTL and values included) or Route 53 refuses it for good, and the record may have been
    /// written by someone else, or by an older release with another TTL. A record that is not
    /// there counts as deleted.
    pub async fn delete(&self, hostname: &str) -> CloudResult<()> {
        let Some(record) = self.find_record(hostname).await? else {
            return Ok(());
        };
        match self.submit(ChangeAction::Delete, record).await {
            Ok(_) => Ok(()),
            Err(CloudError::Permanent { message, .. }) if message.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn propagation(status: &ChangeStatus) -> Propagation {
    if *status == ChangeStatus::Insync {
        Propagation::InSync
    } else {
        Propagation::Pending
    }
}
