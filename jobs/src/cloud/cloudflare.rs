//! Cloudflare: the node's tunnel, its ingress, and its proxied DNS record.
//!
//! Built on the `cloudflare` crate; the endpoints it lacks (tunnel token, tunnel configuration,
//! one tunnel's status) are added below by implementing its `EndpointSpec`.

use std::time::Duration;

use cloudflare::endpoints::cfd_tunnel::{
    create_tunnel, delete_tunnel, list_tunnels, ConfigurationSrc, Tunnel,
};
use cloudflare::endpoints::dns::dns::{
    CreateDnsRecord, CreateDnsRecordParams, DeleteDnsRecord, DnsContent, DnsRecord, ListDnsRecords,
    ListDnsRecordsParams, UpdateDnsRecord, UpdateDnsRecordParams,
};
use cloudflare::framework::auth::Credentials;
use cloudflare::framework::client::async_api::Client;
use cloudflare::framework::client::ClientConfig;
use cloudflare::framework::endpoint::spec::EndpointSpec;
use cloudflare::framework::endpoint::{Method, RequestBody};
use cloudflare::framework::response::{
    ApiFailure, ApiResponse, ApiResult, ApiSuccess, ResponseConverter,
};
use cloudflare::framework::Environment;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::secrets::SecretString;
use super::{CloudError, CloudResult};

/// Tunnels per page when listing (Cloudflare's most); the listing reads every page.
const TUNNEL_PAGE_SIZE: u32 = 1000;

/// DNS records per page when listing (Cloudflare allows far more; 5,000 keeps one answer of
/// a reasonable size).
const DNS_PAGE_SIZE: u32 = 5000;

pub struct Cloudflare {
    client: Client,
    /// Every call is taken from it first.
    budget: super::budget::Budget,
    account_id: String,
    zone_id: String,
}

/// Where a tunnel stands, as Cloudflare reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelHealth {
    /// cloudflared on the node is connected.
    Healthy,
    /// Not connected (yet): `inactive`, `down` or `degraded`.
    NotHealthy,
}

/// The published routes of a tunnel (remotely managed: `config_src = cloudflare`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRule {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hostname: Option<String>,
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelConfig {
    pub ingress: Vec<IngressRule>,
}

impl Cloudflare {
    pub fn new(
        api_base: &str,
        api_token: &str,
        account_id: &str,
        zone_id: &str,
        timeout: Duration,
        budget: super::budget::Budget,
    ) -> CloudResult<Self> {
        let client = Client::new(
            Credentials::UserAuthToken {
                token: api_token.to_string(),
            },
            ClientConfig {
                http_timeout: timeout,
                ..ClientConfig::default()
            },
            Environment::Custom(api_base.to_string()),
        )
        .map_err(|e| CloudError::permanent("cloudflare:client", e.to_string()))?;
        Ok(Self {
            client,
            budget,
            account_id: account_id.to_string(),
            zone_id: zone_id.to_string(),
        })
    }

    /// One call within the budget, counted by operation and outcome
    /// (`hive_cloud_calls_total`). The outer error is the budget's (spent for too long).
    async fn send<E>(
        &self,
        op: &'static str,
        endpoint: &E,
    ) -> CloudResult<ApiResponse<E::ResponseType>>
    where
        E: EndpointSpec + Send + Sync,
        E::ResponseType: ResponseConverter<E::JsonResponse>,
    {
        self.budget.take().await?;
        let result = self.client.request(endpoint).await;
        let operation = op.trim_start_matches("cloudflare:");
        crate::metrics::cloud_call("cloudflare", operation, result.is_ok());
        if let Err(ApiFailure::Error(status, _)) = &result {
            if status.as_u16() == 429 {
                // The crate keeps the answer's headers to itself, so Retry-After is not
                // known: wait a whole period of the budget.
                self.budget.throttled(None).await;
            }
        }
        Ok(result)
    }

    /// One call, its failure classified as transient or permanent.
    async fn call<E>(&self, op: &'static str, endpoint: &E) -> CloudResult<E::ResponseType>
    where
        E: EndpointSpec + Send + Sync,
        E::ResponseType: ResponseConverter<E::JsonResponse>,
    {
        self.send(op, endpoint).await?.map_err(|e| classify(op, e))
    }

    /// Live (not deleted) tunnels matching `params`.
    async fn live_tunnels(&self, params: list_tunnels::Params) -> CloudResult<Vec<Tunnel>> {
        let mut live = Vec::new();
        for page in 1.. {
            let found = self
                .call(
                    "cloudflare:ListTunnels",
                    &list_tunnels::ListTunnels {
                        account_identifier: &self.account_id,
                        params: list_tunnels::Params {
                            is_deleted: Some(false),
                            pagination_params: Some(list_tunnels::PaginationParams {
                                page,
                                per_page: TUNNEL_PAGE_SIZE.into(),
                            }),
                            ..params.clone()
                        },
                    },
                )
                .await?;
            let last = found.result.len() < TUNNEL_PAGE_SIZE as usize;
            live.extend(found.result.into_iter().filter(|t| t.deleted_at.is_none()));
            if last {
                break;
            }
        }
        Ok(live)
    }

    /// The live tunnel of that name, if one exists.
    pub async fn find_tunnel(&self, name: &str) -> CloudResult<Option<Tunnel>> {
        let params = list_tunnels::Params {
            name: Some(name.to_string()),
            ..Default::default()
        };
        Ok(self
            .live_tunnels(params)
            .await?
            .into_iter()
            .find(|t| t.name == name))
    }

    /// Every live tunnel whose name starts with `prefix`.
    pub async fn list_tunnels(&self, prefix: &str) -> CloudResult<Vec<Tunnel>> {
        let params = list_tunnels::Params {
            include_prefix: Some(prefix.to_string()),
            ..Default::default()
        };
        Ok(self
            .live_tunnels(params)
            .await?
            .into_iter()
            .filter(|t| t.name.starts_with(prefix))
            .collect())
    }

    /// Every CNAME of the zone.
    pub async fn list_cnames(&self) -> CloudResult<Vec<DnsRecord>> {
        let mut cnames = Vec::new();
        for page in 1.. {
            let found = self
                .call(
                    "cloudflare:ListDnsRecords",
                    &ListDnsRecords {
                        zone_identifier: &self.zone_id,
                        params: ListDnsRecordsParams {
                            page: Some(page),
                            per_page: Some(DNS_PAGE_SIZE),
                            ..Default::default()
                        },
                    },
                )
                .await?;
            let last = found.result.len() < DNS_PAGE_SIZE as usize;
            cnames.extend(
                found
                    .result
                    .into_iter()
                    .filter(|r| matches!(r.content, DnsContent::CNAME { .. })),
            );
            if last {
                break;
            }
        }
        Ok(cnames)
    }

    /// Creates a remotely managed tunnel. Callers look it up by name first.
    pub async fn create_tunnel(&self, name: &str) -> CloudResult<Tunnel> {
        // With config_src = cloudflare, Cloudflare generates the token; the secret is unused
        // after creation but the API wants one.
        let mut tunnel_secret = vec![0u8; 32];
        rand::rng().fill_bytes(&mut tunnel_secret);
        let created = self
            .call(
                "cloudflare:CreateTunnel",
                &create_tunnel::CreateTunnel {
                    account_identifier: &self.account_id,
                    params: create_tunnel::Params {
                        name,
                        tunnel_secret: &tunnel_secret,
                        config_src: &ConfigurationSrc::Cloudflare,
                        metadata: None,
                    },
                },
            )
            .await?;
        Ok(created.result)
    }

    /// The token cloudflared runs the tunnel with. It goes straight to Secrets Manager.
    pub async fn tunnel_token(&self, tunnel_id: &str) -> CloudResult<SecretString> {
        let token = self
            .call(
                "cloudflare:GetTunnelToken",
                &GetTunnelToken {
                    account_id: &self.account_id,
                    tunnel_id,
                },
            )
            .await?;
        Ok(SecretString::new(token.result.0))
    }

    /// Replaces the tunnel's ingress (PUT replaces, so repeating it is harmless).
    pub async fn configure_tunnel(
        &self,
        tunnel_id: &str,
        config: &TunnelConfig,
    ) -> CloudResult<()> {
        self.call(
            "cloudflare:PutTunnelConfiguration",
            &PutTunnelConfiguration {
                account_id: &self.account_id,
                tunnel_id,
                config,
            },
        )
        .await?;
        Ok(())
    }

    pub async fn tunnel_health(&self, tunnel_id: &str) -> CloudResult<TunnelHealth> {
        let tunnel = self
            .call(
                "cloudflare:GetTunnel",
                &GetTunnel {
                    account_id: &self.account_id,
                    tunnel_id,
                },
            )
            .await?;
        Ok(if tunnel.result.status == "healthy" {
            TunnelHealth::Healthy
        } else {
            TunnelHealth::NotHealthy
        })
    }

    /// Deletes the tunnel's connections, then the tunnel: Cloudflare refuses to delete a
    /// tunnel that has active connections, and its API's delete takes no `cascade` any more.
    /// A tunnel that is gone counts as deleted.
    pub async fn delete_tunnel(&self, tunnel_id: &str) -> CloudResult<()> {
        let cleaned = self
            .send(
                "cloudflare:CleanupTunnelConnections",
                &DeleteTunnelConnections {
                    account_id: &self.account_id,
                    tunnel_id,
                },
            )
            .await?;
        match cleaned {
            Ok(_) => {}
            Err(ApiFailure::Error(status, _)) if status.as_u16() == 404 => return Ok(()),
            Err(e) => return Err(classify("cloudflare:CleanupTunnelConnections", e)),
        }
        let result = self
            .send(
                "cloudflare:DeleteTunnel",
                &delete_tunnel::DeleteTunnel {
                    account_identifier: &self.account_id,
                    tunnel_id,
                    params: delete_tunnel::Params { cascade: true },
                },
            )
            .await?;
        match result {
            Ok(_) => Ok(()),
            Err(ApiFailure::Error(status, _)) if status.as_u16() == 404 => Ok(()),
            Err(e) => Err(classify("cloudflare:DeleteTunnel", e)),
        }
    }

    /// The zone's CNAME of that name, if any.
    pub async fn find_cname(&self, name: &str) -> CloudResult<Option<DnsRecord>> {
        let found = self
            .call(
                "cloudflare:ListDnsRecords",
                &ListDnsRecords {
                    zone_identifier: &self.zone_id,
                    params: ListDnsRecordsParams {
                        name: Some(name.to_string()),
                        ..Default::default()
                    },
                },
            )
            .await?;
        Ok(found
            .result
            .into_iter()
            .find(|r| r.name == name && matches!(r.content, DnsContent::CNAME { .. })))
    }

    /// Creates a proxied CNAME. Callers look it up by name first.
    pub async fn create_proxied_cname(&self, name: &str, target: &str) -> CloudResult<DnsRecord> {
        let created = self
            .call(
                "cloudflare:CreateDnsRecord",
                &CreateDnsRecord {
                    zone_identifier: &self.zone_id,
                    params: CreateDnsRecordParams {
                        ttl: Some(1),
                        priority: None,
                        proxied: Some(true),
                        name,
                        content: DnsContent::CNAME {
                            content: target.to_string(),
                        },
                    },
                },
            )
            .await?;
        Ok(created.result)
    }

    /// Points an existing record at `target`, proxied (the record kept its id).
    pub async fn repoint_proxied_cname(
        &self,
        record_id: &str,
        name: &str,
        target: &str,
    ) -> CloudResult<DnsRecord> {
        let updated = self
            .call(
                "cloudflare:UpdateDnsRecord",
                &UpdateDnsRecord {
                    zone_identifier: &self.zone_id,
                    identifier: record_id,
                    params: UpdateDnsRecordParams {
                        ttl: Some(1),
                        proxied: Some(true),
                        name,
                        content: DnsContent::CNAME {
                            content: target.to_string(),
                        },
                    },
                },
            )
            .await?;
        Ok(updated.result)
    }

    pub async fn delete_dns_record(&self, record_id: &str) -> CloudResult<()> {
        let result = self
            .send(
                "cloudflare:DeleteDnsRecord",
                &DeleteDnsRecord {
                    zone_identifier: &self.zone_id,
                    identifier: record_id,
                },
            )
            .await?;
        match result {
            Ok(_) => Ok(()),
            Err(ApiFailure::Error(status, _)) if status.as_u16() == 404 => Ok(()),
            Err(e) => Err(classify("cloudflare:DeleteDnsRecord", e)),
        }
    }
}

/// The CNAME target that routes a name into a tunnel.
pub fn tunnel_target(tunnel_id: &str) -> String {
    format!("{tunnel_id}.cfargotunnel.com")
}

/// Sorts a Cloudflare failure: 429 and 5xx, timeouts and broken connections are transient.
fn classify(op: &'static str, failure: ApiFailure) -> CloudError {
    match &failure {
        ApiFailure::Error(status, errors) => {
            let detail: Vec<String> = errors
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect();
            let message = format!("HTTP {} {}", status.as_u16(), detail.join("; "));
            if status.as_u16() == 429 || status.is_server_error() {
                CloudError::transient(op, message)
            } else {
                CloudError::permanent(op, message)
            }
        }
        // No answer, or an answer cut short: the call may or may not have happened remotely,
        // which every step copes with by looking up before creating.
        ApiFailure::Invalid(e) => CloudError::transient(op, e.to_string()),
    }
}

/// `GET accounts/{account}/cfd_tunnel/{id}/token`.
struct GetTunnelToken<'a> {
    account_id: &'a str,
    tunnel_id: &'a str,
}

/// The token, which must never be printed.
#[derive(Deserialize)]
#[serde(transparent)]
struct TunnelToken(String);

impl std::fmt::Debug for TunnelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelToken(<redacted>)")
    }
}

impl ApiResult for TunnelToken {}

impl EndpointSpec for GetTunnelToken<'_> {
    type JsonResponse = TunnelToken;
    type ResponseType = ApiSuccess<TunnelToken>;

    fn method(&self) -> Method {
        Method::GET
    }
    fn path(&self) -> String {
        format!(
            "accounts/{}/cfd_tunnel/{}/token",
            self.account_id, self.tunnel_id
        )
    }
}

/// `PUT accounts/{account}/cfd_tunnel/{id}/configurations`.
struct PutTunnelConfiguration<'a> {
    account_id: &'a str,
    tunnel_id: &'a str,
    config: &'a TunnelConfig,
}

/// The answer to a configuration PUT; nothing in it is needed beyond its success.
#[derive(Debug, Deserialize)]
struct TunnelConfiguration {}

impl ApiResult for TunnelConfiguration {}

impl EndpointSpec for PutTunnelConfiguration<'_> {
    type JsonResponse = TunnelConfiguration;
    type ResponseType = ApiSuccess<TunnelConfiguration>;

    fn method(&self) -> Method {
        Method::PUT
    }
    fn path(&self) -> String {
        format!(
            "accounts/{}/cfd_tunnel/{}/configurations",
            self.account_id, self.tunnel_id
        )
    }
    fn body(&self) -> Option<RequestBody<'_>> {
        let body = serde_json::json!({ "config": self.config });
        Some(RequestBody::Json(body.to_string()))
    }
}

/// `DELETE accounts/{account}/cfd_tunnel/{id}/connections`: removes every connector of the
/// tunnel (what must go before the tunnel itself can).
struct DeleteTunnelConnections<'a> {
    account_id: &'a str,
    tunnel_id: &'a str,
}

impl EndpointSpec for DeleteTunnelConnections<'_> {
    type JsonResponse = ();
    type ResponseType = ApiSuccess<()>;

    fn method(&self) -> Method {
        Method::DELETE
    }
    fn path(&self) -> String {
        format!(
            "accounts/{}/cfd_tunnel/{}/connections",
            self.account_id, self.tunnel_id
        )
    }
}

/// `GET accounts/{account}/cfd_tunnel/{id}`: one tunnel with its status.
struct GetTunnel<'a> {
    account_id: &'a str,
    tunnel_id: &'a str,
}

#[derive(Debug, Deserialize)]
struct TunnelStatus {
    status: String,
}

impl ApiResult for TunnelStatus {}

impl EndpointSpec for GetTunnel<'_> {
    type JsonResponse = TunnelStatus;
    type ResponseType = ApiSuccess<TunnelStatus>;

    fn method(&self) -> Method {
        Method::GET
    }
    fn path(&self) -> String {
        format!("accounts/{}/cfd_tunnel/{}", self.account_id, self.tunnel_id)
    }
}

/// Whether a record is the proxied CNAME into `tunnel_id`'s tunnel.
pub fn routes_to_tunnel(record: &DnsRecord, tunnel_id: &str) -> bool {
    let target = tunnel_target(tunnel_id);
    record.proxied && matches!(&record.content, DnsContent::CNAME { content } if *content == target)
}
