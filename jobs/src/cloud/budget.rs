//! Call budgets shared by every worker through Postgres, so that a burst of work waits its turn
//! instead of earning the provider's rate-limit answers.
//!
//! Each budget is a token bucket kept by a [`BudgetLedger`] (the store's `rate_budgets`): it refills
//! at the configured rate and holds at most a tenth of a period's calls, so that no window of
//! one period ever sees more than 110 % of the rate (set the budget a tenth under the
//! provider's limit). A rate-limit answer that arrives anyway empties the bucket for the wait
//! it asked for and halves the rate for a while.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Rate;

use super::{CloudError, CloudResult};

/// How long one call waits for the budget before it gives up (a transient failure: the step
/// is retried later).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How long a budget stays halved after a rate-limit answer, in periods.
const SHRINK_PERIODS: u32 = 5;

/// Where the buckets are kept, shared by every worker: implemented by the store
/// (`store::BudgetBuckets`); an interface, so that the clients know nothing of the store.
pub trait BudgetLedger: Send + Sync + std::fmt::Debug {
    /// Takes one call from `name`'s bucket (refilled at `per_sec` up to `burst`). `None`:
    /// taken; `Some(wait)`: none left, one is there after `wait`.
    fn take<'a>(
        &'a self,
        name: &'a str,
        burst: f64,
        per_sec: f64,
    ) -> LedgerFuture<'a, Option<Duration>>;
    /// Empties `name`'s bucket for `wait` and halves its rate for `shrink_for`.
    fn shrink<'a>(
        &'a self,
        name: &'a str,
        per_sec: f64,
        wait: Duration,
        shrink_for: Duration,
    ) -> LedgerFuture<'a, ()>;
}

/// What a [`BudgetLedger`] hands back.
pub type LedgerFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// Why a ledger could not answer (the database is unreachable...).
pub type LedgerError = Box<dyn std::error::Error + Send + Sync>;

/// One provider's budget (in one region, for EC2 and Secrets Manager).
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Option<Arc<Shared>>,
}

#[derive(Debug)]
struct Shared {
    ledger: Arc<dyn BudgetLedger>,
    name: String,
    rate: Rate,
}

impl Budget {
    /// A budget named `name` (`cloudflare`, `ec2:eu-west-1`...); `None` spends freely.
    pub fn new(ledger: &Arc<dyn BudgetLedger>, name: String, rate: Option<Rate>) -> Self {
        Self {
            inner: rate.map(|rate| {
                Arc::new(Shared {
                    ledger: ledger.clone(),
                    name,
                    rate,
                })
            }),
        }
    }

    /// No budget: every call goes at once.
    pub fn unlimited() -> Self {
        Self { inner: None }
    }

    /// Waits until the budget allows one more call, and takes it.
    pub async fn take(&self) -> CloudResult<()> {
        let Some(shared) = &self.inner else {
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        loop {
            let wait = shared
                .take_one()
                .await
                .map_err(|e| CloudError::transient("rate budget", e.to_string()))?;
            let Some(wait) = wait else {
                crate::metrics::budget_wait(&shared.name, started.elapsed());
                return Ok(());
            };
            if started.elapsed() + wait > MAX_WAIT {
                crate::metrics::budget_wait(&shared.name, started.elapsed());
                return Err(CloudError::transient(
                    "rate budget",
                    format!("{} budget spent; no call for {:?}", shared.name, wait),
                ));
            }
            // Many workers wait for the same refill: spread them out a little.
            let jitter = Duration::from_millis(rand::random_range(0..=20));
            tokio::time::sleep(wait + jitter).await;
        }
    }

    /// The provider answered "too many calls": nothing more for `retry_after` (a period when
    /// it did not say), then half the rate for a while.
    pub async fn throttled(&self, retry_after: Option<Duration>) {
        let Some(shared) = &self.inner else {
            return;
        };
        let wait = retry_after.unwrap_or(shared.rate.per);
        crate::metrics::budget_throttled(&shared.name);
        tracing::warn!(budget = %shared.name, ?wait, "rate limited although within budget; slowing down");
        if let Err(e) = shared.shrink(wait).await {
            tracing::warn!(budget = %shared.name, error = %e, "could not record the rate limit");
        }
    }
}

impl Shared {
    async fn take_one(&self) -> Result<Option<Duration>, LedgerError> {
        let (burst, per_sec) = (self.rate.burst(), self.rate.per_sec());
        self.ledger.take(&self.name, burst, per_sec).await
    }

    async fn shrink(&self, wait: Duration) -> Result<(), LedgerError> {
        let shrink_for = self.rate.per * SHRINK_PERIODS;
        self.ledger
            .shrink(&self.name, self.rate.per_sec(), wait, shrink_for)
            .await
    }
}

/// An AWS SDK HTTP client that takes each request from a budget first: one place for every
/// call of a service, the SDK's own retries included (AWS counts those too).
#[derive(Debug, Clone)]
pub struct BudgetedHttpClient {
    inner: aws_smithy_runtime_api::client::http::SharedHttpClient,
    budget: Budget,
    attempt_timeout: Duration,
}

impl BudgetedHttpClient {
    /// The SDK's default HTTPS client (rustls), behind `budget`. `attempt_timeout` bounds
    /// the call itself, from when the budget let it go: the wait for the budget must not eat
    /// the attempt's time (the SDK's own attempt timeout is set above both).
    pub fn new(budget: Budget, attempt_timeout: Duration) -> Self {
        use aws_smithy_http_client::tls;
        Self {
            inner: aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .build_https(),
            budget,
            attempt_timeout,
        }
    }
}

impl aws_smithy_runtime_api::client::http::HttpClient for BudgetedHttpClient {
    fn http_connector(
        &self,
        settings: &aws_smithy_runtime_api::client::http::HttpConnectorSettings,
        components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
    ) -> aws_smithy_runtime_api::client::http::SharedHttpConnector {
        aws_smithy_runtime_api::client::http::SharedHttpConnector::new(BudgetedConnector {
            inner: self.inner.http_connector(settings, components),
            budget: self.budget.clone(),
            attempt_timeout: self.attempt_timeout,
        })
    }
}

#[derive(Debug)]
struct BudgetedConnector {
    inner: aws_smithy_runtime_api::client::http::SharedHttpConnector,
    budget: Budget,
    attempt_timeout: Duration,
}

impl aws_smithy_runtime_api::client::http::HttpConnector for BudgetedConnector {
    fn call(
        &self,
        request: aws_smithy_runtime_api::client::orchestrator::HttpRequest,
    ) -> aws_smithy_runtime_api::client::http::HttpConnectorFuture {
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let inner = self.inner.clone();
        let budget = self.budget.clone();
        let attempt_timeout = self.attempt_timeout;
        aws_smithy_runtime_api::client::http::HttpConnectorFuture::new(async move {
            budget
                .take()
                .await
                .map_err(|e| ConnectorError::other(Box::new(e), None))?;
            let response = tokio::time::timeout(attempt_timeout, inner.call(request))
                .await
                .map_err(|elapsed| ConnectorError::timeout(Box::new(elapsed)))??;
            // 429, or EC2's 503 `RequestLimitExceeded`: slow every worker down.
            let status = response.status().as_u16();
            if status == 429 || status == 503 {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                budget.throttled(retry_after).await;
            }
            Ok(response)
        })
    }
}
