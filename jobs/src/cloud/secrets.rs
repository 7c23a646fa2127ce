//! Secrets Manager: the node's tunnel token, readable only by the node's own instance.

use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType, Tag};
use uuid::Uuid;

use super::{aws_code, classify_aws, CloudResult};
use crate::model::{secret_name, tags};

/// A node's secret as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSecret {
    pub name: String,
    /// The ARN of the instance allowed to read it (its binding tag).
    pub bound_to: Option<String>,
    /// When it was created, as Secrets Manager says.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Clone)]
pub struct Secrets {
    sm: aws_sdk_secretsmanager::Client,
}

/// A secret value that never shows in `Debug` or logs.
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl Secrets {
    pub fn new(sm: aws_sdk_secretsmanager::Client) -> Self {
        Self { sm }
    }

    /// Whether Secrets Manager answers our credentials (`hivectl doctor`).
    pub async fn ping(&self) -> CloudResult<()> {
        self.sm
            .list_secrets()
            .max_results(1)
            .send()
            .await
            .map_err(|e| classify_aws("secretsmanager:ListSecrets", e))?;
        Ok(())
    }

    /// Stores the node's token, or adopts the secret if it exists already (a retry, or a crash
    /// after creating it). `request_token` makes a repeated create or put the same version.
    /// Returns the secret's ARN.
    pub async fn store_tunnel_token(
        &self,
        node_id: Uuid,
        token: &SecretString,
        request_token: &str,
    ) -> CloudResult<String> {
        let name = secret_name(node_id);
        let created = self
            .sm
            .create_secret()
            .name(&name)
            .description("Cloudflare tunnel token of a Hive node")
            .secret_string(token.expose())
            .client_request_token(request_token)
            .tags(
                Tag::builder()
                    .key(tags::NODE_ID)
                    .value(node_id.to_string())
                    .build(),
            )
            .send()
            .await;
        match created {
            Ok(out) => Ok(out.arn().unwrap_or(&name).to_string()),
            Err(e) if aws_code(&e) == Some("ResourceExistsException") => {
                let out = self
                    .sm
                    .put_secret_value()
                    .secret_id(&name)
                    .secret_string(token.expose())
                    .client_request_token(request_token)
                    .send()
                    .await
                    .map_err(|e| classify_aws("secretsmanager:PutSecretValue", e))?;
                Ok(out.arn().unwrap_or(&name).to_string())
            }
            Err(e) => Err(classify_aws("secretsmanager:CreateSecret", e)),
        }
    }

    /// Tags the secret with the instance allowed to read it (tagging is idempotent).
    pub async fn bind_to_instance(&self, secret_id: &str, instance_arn: &str) -> CloudResult<()> {
        self.sm
            .tag_resource()
            .secret_id(secret_id)
            .tags(
                Tag::builder()
                    .key(tags::INSTANCE_ARN)
                    .value(instance_arn)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify_aws("secretsmanager:TagResource", e))?;
        Ok(())
    }

    /// Every node secret (`hive/nodes/...`), with the instance it is bound to, a hundred a
    /// page.
    pub async fn list_node_secrets(&self) -> CloudResult<Vec<NodeSecret>> {
        let mut found = Vec::new();
        let mut pages = self
            .sm
            .list_secrets()
            .max_results(100)
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values("hive/nodes/")
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify_aws("secretsmanager:ListSecrets", e))?;
            found.extend(page.secret_list().iter().filter_map(|s| {
                let name = s.name().filter(|n| n.starts_with("hive/nodes/"))?;
                Some(NodeSecret {
                    name: name.to_string(),
                    bound_to: s
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(tags::INSTANCE_ARN))
                        .and_then(|t| t.value())
                        .map(str::to_string),
                    created_at: s.created_date().and_then(super::utc),
                })
            }));
        }
        Ok(found)
    }

    /// Deletes the secret at once (no recovery window: the tunnel it opens is gone too).
    pub async fn delete(&self, secret_id: &str) -> CloudResult<()> {
        match self
            .sm
            .delete_secret()
            .secret_id(secret_id)
            .force_delete_without_recovery(true)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if aws_code(&e) == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(classify_aws("secretsmanager:DeleteSecret", e)),
        }
    }
}
