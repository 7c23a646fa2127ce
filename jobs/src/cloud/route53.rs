//! Route 53: the public name of a node, which points at Cloudflare's edge.

use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ChangeStatus, ResourceRecord, ResourceRecordSet, RrType,
};

use super::{classify_aws, CloudError, CloudResult};

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
            .ttl(300)
            .resource_records(
                ResourceRecord::builder()
                    .value(Self::cname_target(hostname))
                    .build()
                    .map_err(|e| CloudError::permanent("route53:build", e.to_string()))?,
            )
            .build()
            .map_err(|e| CloudError::permanent("route53:build", e.to_string()))
    }

    async fn change(
        &self,
        action: ChangeAction,
        hostname: &str,
    ) -> CloudResult<(String, Propagation)> {
        let batch = ChangeBatch::builder()
            .changes(
                Change::builder()
                    .action(action)
                    .resource_record_set(Self::cname(hostname)?)
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

    /// Creates or replaces the node's CNAME (UPSERT is idempotent).
    pub async fn upsert(&self, hostname: &str) -> CloudResult<(String, Propagation)> {
        self.change(ChangeAction::Upsert, hostname).await
    }

    /// The node's CNAME target, if the record exists.
    pub async fn find(&self, hostname: &str) -> CloudResult<Option<String>> {
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
            .and_then(|r| r.resource_records().first().map(|v| v.value().to_string())))
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

    /// Deletes the node's CNAME; a record that is not there counts as deleted.
    pub async fn delete(&self, hostname: &str) -> CloudResult<()> {
        if self.find(hostname).await?.is_none() {
            return Ok(());
        }
        match self.change(ChangeAction::Delete, hostname).await {
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
