//! Clients of the clouds the worker drives: one file per resource client.

pub mod budget;
pub mod cloudflare;
pub mod compute;
pub mod instance_reads;
pub mod route53;
pub mod secrets;

use std::time::Duration;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::config::{RegionSettings, WorkerConfig};

/// The clouds a worker drives: EC2 and Secrets Manager in each of its regions, and the global
/// DNS and tunnel providers.
pub struct Clouds {
    pub regions: Vec<RegionClouds>,
    pub route53: route53::Route53,
    pub cloudflare: cloudflare::Cloudflare,
}

/// One region's clients, with what the worker launches there.
pub struct RegionClouds {
    pub settings: RegionSettings,
    pub compute: compute::Compute,
    pub secrets: secrets::Secrets,
}

/// An AWS timestamp as ours; `None` for one out of chrono's range.
pub(crate) fn utc(t: &aws_smithy_types::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

impl Clouds {
    /// Clients from the AWS SDK's standard configuration (`AWS_ENDPOINT_URL`, credentials...),
    /// one set per configured region, and the Cloudflare settings. Their calls are taken from
    /// the budgets `ledger` keeps (the store's, shared by every worker); without one
    /// (`hivectl doctor`'s few probes, which must work before migrations ran) they spend
    /// freely.
    pub async fn from_config(
        config: &WorkerConfig,
        ledger: Option<std::sync::Arc<dyn budget::BudgetLedger>>,
    ) -> CloudResult<Self> {
        let budgets = &config.budgets;
        let budget = |name: String, rate| match &ledger {
            Some(ledger) => budget::Budget::new(ledger, name, rate),
            None => budget::Budget::unlimited(),
        };
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            // The call itself is bounded by `http_timeout` in the budgeted client, from when
            // its budget let it go; this bound is only a backstop above both.
            .operation_attempt_timeout(config.http_timeout + budget::MAX_WAIT)
            .connect_timeout(Duration::from_secs(5))
            .build();
        // Our own retries are stored in Postgres; the SDK retries only briefly within a step.
        let retry = aws_config::retry::RetryConfig::standard().with_max_attempts(2);
        let load = |region: Option<String>| {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .timeout_config(timeouts.clone())
                .retry_config(retry.clone());
            if let Some(region) = region {
                loader = loader.region(aws_config::Region::new(region));
            }
            loader.load()
        };
        let mut regions = Vec::with_capacity(config.regions.len());
        for settings in &config.regions {
            let shared = load(Some(settings.name.clone())).await;
            let region = &settings.name;
            let ec2_config = aws_sdk_ec2::config::Builder::from(&shared)
                .interceptor(CountCalls)
                .http_client(budget::BudgetedHttpClient::new(
                    budget(format!("ec2:{region}"), budgets.ec2),
                    config.http_timeout,
                ))
                .build();
            let sm_config = aws_sdk_secretsmanager::config::Builder::from(&shared)
                .interceptor(CountCalls)
                .http_client(budget::BudgetedHttpClient::new(
                    budget(format!("secretsmanager:{region}"), budgets.secrets),
                    config.http_timeout,
                ))
                .build();
            regions.push(RegionClouds {
                settings: settings.clone(),
                compute: compute::Compute::new(
                    aws_sdk_ec2::Client::from_conf(ec2_config),
                    settings.name.clone(),
                ),
                secrets: secrets::Secrets::new(aws_sdk_secretsmanager::Client::from_conf(
                    sm_config,
                )),
            });
        }
        // Route 53 is global; its endpoint answers in us-east-1 whatever the region.
        let first = config.regions.first().map(|r| r.name.clone());
        let shared = load(first).await;
        let r53_config = aws_sdk_route53::config::Builder::from(&shared)
            .interceptor(CountCalls)
            .http_client(budget::BudgetedHttpClient::new(
                budget("route53".into(), budgets.route53),
                config.http_timeout,
            ))
            .build();
        Ok(Clouds {
            regions,
            route53: route53::Route53::new(
                aws_sdk_route53::Client::from_conf(r53_config),
                config.route53_zone_id.clone(),
            ),
            cloudflare: cloudflare::Cloudflare::new(
                &config.cloudflare_api_base,
                &config.cloudflare_api_token,
                &config.cloudflare_account_id,
                &config.cloudflare_zone_id,
                config.http_timeout,
                budget("cloudflare".into(), budgets.cloudflare),
            )?,
        })
    }

    /// One of this worker's regions.
    pub fn region(&self, name: &str) -> Option<&RegionClouds> {
        self.regions.iter().find(|r| r.settings.name == name)
    }

    /// The names of this worker's regions.
    pub fn region_names(&self) -> Vec<String> {
        self.regions
            .iter()
            .map(|r| r.settings.name.clone())
            .collect()
    }
}

/// A failed cloud call, sorted by what the state machine should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// Worth retrying: throttling, 5xx, timeouts, refused connections, no capacity right now.
    #[error("{op}: {message} (transient)")]
    Transient { op: &'static str, message: String },
    /// Retrying will not help: bad request, auth, quota.
    #[error("{op}: {message}")]
    Permanent { op: &'static str, message: String },
}

impl CloudError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CloudError::Transient { .. })
    }

    pub fn transient(op: &'static str, message: impl Into<String>) -> Self {
        CloudError::Transient {
            op,
            message: message.into(),
        }
    }

    pub fn permanent(op: &'static str, message: impl Into<String>) -> Self {
        CloudError::Permanent {
            op,
            message: message.into(),
        }
    }
}

pub type CloudResult<T> = Result<T, CloudError>;

/// AWS error codes that say "try again later".
const TRANSIENT_AWS_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "PriorRequestNotComplete",
    "InsufficientInstanceCapacity",
    "InternalError",
    "InternalFailure",
    "InternalServiceError",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
];

/// The AWS error code of a service error, if the call got that far.
pub fn aws_code<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<&str> {
    match err {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}

/// Sorts an AWS SDK error. The message is AWS's own, which names resources, never secrets.
pub fn classify_aws<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CloudError::transient(
                op,
                format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&err)),
            )
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or("Unknown");
            let message = format!(
                "{code} (HTTP {status}): {}",
                service.err().message().unwrap_or("no message")
            );
            if status >= 500 || status == 429 || TRANSIENT_AWS_CODES.contains(&code) {
                CloudError::transient(op, message)
            } else {
                CloudError::permanent(op, message)
            }
        }
        _ => CloudError::permanent(
            op,
            format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&err)),
        ),
    }
}

/// Counts every AWS call by service, operation and outcome (`hive_cloud_calls_total`): one
/// interceptor on each SDK client, rather than a line at each call site.
#[derive(Debug)]
struct CountCalls;

impl aws_smithy_runtime_api::client::interceptors::Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "CountCalls"
    }

    fn read_after_execution(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let ok = matches!(context.output_or_error(), Some(Ok(_)));
        match cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>() {
            Some(metadata) => {
                let provider = match metadata.service().to_ascii_lowercase().as_str() {
                    "ec2" => "ec2",
                    "route53" | "route 53" => "route53",
                    "secretsmanager" | "secrets manager" => "secretsmanager",
                    _ => "aws",
                };
                crate::metrics::cloud_call(provider, metadata.name(), ok);
            }
            None => crate::metrics::cloud_call("aws", "unknown", ok),
        }
        Ok(())
    }
}
