//! The app's way into Stripe: `POST /api/v1/billing/checkout` (a Checkout Session for a plan)
//! and `POST /api/v1/billing/portal` (a Billing Portal session for the user's customer), both
//! through async-stripe's client.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use hive_jobs::store;
use serde::{Deserialize, Serialize};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_shared::CheckoutSessionMode;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::idempotency::IdempotencyKey as IdempotencyKeyHeader;
use crate::AppState;

/// The Stripe client of the api's settings; `None` when no secret key is configured.
pub fn client(
    config: &hive_jobs::config::ApiConfig,
) -> Result<Option<stripe::Client>, StripeError> {
    // Two TLS providers are linked in (the AWS SDK's and ours); rustls needs one chosen.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a TLS provider was installed already");
    }
    config
        .stripe_secret_key
        .as_ref()
        .map(|key| {
            stripe::ClientBuilder::new(key.as_str())
                .url(config.stripe_api_base.as_str())
                .timeout(std::time::Duration::from_secs(20))
                .build()
        })
        .transpose()
}

/// A JSON body of `T`, or a 400 with a JSON error saying what is wrong.
fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

/// A URL Stripe sends the customer back to: http(s), and on one of the app's origins
/// (`HIVE_RETURN_URL_ORIGINS`), so that our checkout cannot send a paying customer to a page
/// of someone else's choosing.
fn url(name: &str, value: &str, origins: &[String]) -> Result<(), ApiError> {
    if !(value.starts_with("https://") || value.starts_with("http://")) {
        return Err(ApiError::BadRequest(format!(
            "`{name}` is not an http(s) URL"
        )));
    }
    let on_origin = |origin: &String| {
        value.strip_prefix(origin.as_str()).is_some_and(|rest| {
            rest.is_empty()
                || rest.starts_with('/')
                || rest.starts_with('?')
                || rest.starts_with('#')
        })
    };
    if origins.iter().any(on_origin) {
        Ok(())
    } else {
        Err(ApiError::Unprocessable(format!(
            "`{name}` is not on an origin of the app's (HIVE_RETURN_URL_ORIGINS)"
        )))
    }
}

/// The request's `Idempotency-Key`, made the key of this user's request at Stripe. Stripe
/// scopes keys per account, and ours is one account for every user: the key sent is derived
/// from the user, the route and theirs, so two users who pick the same key get two sessions.
fn strategy(headers: &HeaderMap, user: &str, route: &str) -> Result<RequestStrategy, ApiError> {
    use sha2::Digest;
    match headers.get("idempotency-key") {
        None => Ok(RequestStrategy::Once),
        Some(value) => {
            let theirs = value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key is not a valid key".into()))?;
            let digest = sha2::Sha256::new()
                .chain_update(user.as_bytes())
                .chain_update([0])
                .chain_update(route.as_bytes())
                .chain_update([0])
                .chain_update(theirs.as_bytes())
                .finalize();
            let key = IdempotencyKey::new(format!("hive-{}", hex::encode(digest)))
                .map_err(|_| ApiError::BadRequest("Idempotency-Key is not a valid key".into()))?;
            Ok(RequestStrategy::Idempotent(key))
        }
    }
}

/// A Stripe failure as the app sees it: Stripe's own message, never our key.
fn stripe_failed(e: StripeError) -> ApiError {
    match e {
        StripeError::Stripe(errors, status) => ApiError::Upstream(format!(
            "Stripe answered {status}: {}",
            errors.message.as_deref().unwrap_or("no message")
        )),
        StripeError::Timeout => ApiError::Upstream("Stripe did not answer in time".into()),
        other => {
            tracing::warn!(error = %other, "stripe call failed");
            ApiError::Upstream("Stripe could not be reached".into())
        }
    }
}

fn stripe_client(state: &AppState) -> Result<&stripe::Client, ApiError> {
    state.stripe.as_deref().ok_or(ApiError::Unavailable(
        "billing is not configured (STRIPE_SECRET_KEY)",
    ))
}

/// A subscription to buy.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// A plan of the api's settings (`starter`, `pro`, `team` by default).
    pub plan: String,
    /// Where its nodes run; by default the api's default region.
    pub region: Option<String>,
    /// How many of the plan (1 to 100, default 1).
    #[schema(minimum = 1, maximum = 100)]
    #[serde(default, deserialize_with = "whole_number")]
    pub quantity: Option<u32>,
    pub success_url: String,
    pub cancel_url: String,
}

/// A JSON number that is a whole number, as JSON Schema's `integer` has it: `12` and `12.0`
/// alike (`12.5` and negative numbers are refused).
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let Some(n) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    if n.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "`{n}` is not a whole number"
        )));
    }
    Ok(Some(n as u32))
}

/// The Checkout Session to send the user to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CheckoutAnswer {
    pub id: String,
    pub url: Option<String>,
}

/// A Checkout Session in subscription mode for the plan's price, bound to the user
/// (`client_reference_id`, and metadata on the session and on the subscription it makes).
#[utoipa::path(
    post,
    path = "/api/v1/billing/checkout",
    tag = "billing",
    params(IdempotencyKeyHeader),
    request_body = CheckoutRequest,
    responses(
        (status = 200, description = "The Checkout Session", body = CheckoutAnswer),
        (status = 400, description = "The body is not a `CheckoutRequest`", body = ErrorBody),
        (status = 409, description = "A request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "An unknown plan or region, a quantity out of range, \
            or this `Idempotency-Key` was used with another request", body = ErrorBody),
        (status = 502, description = "Stripe refused or failed", body = ErrorBody),
        (status = 503, description = "Billing is not configured", body = ErrorBody),
    )
)]
pub async fn checkout(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CheckoutAnswer>, ApiError> {
    let request: CheckoutRequest = json_body(&body)?;
    let config = &state.config;
    url(
        "success_url",
        &request.success_url,
        &config.return_url_origins,
    )?;
    url(
        "cancel_url",
        &request.cancel_url,
        &config.return_url_origins,
    )?;
    let plan = config
        .plans
        .0
        .get(&request.plan)
        .ok_or_else(|| ApiError::Unprocessable(format!("unknown plan `{}`", request.plan)))?;
    let price = plan.prices.first().ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "plan `{}` has no Stripe price configured (`prices` in HIVE_CONFIG_FILE)",
            request.plan
        ))
    })?;
    let quantity = request.quantity.unwrap_or(1);
    if !(1..=100).contains(&quantity) {
        return Err(ApiError::Unprocessable("quantity must be 1 to 100".into()));
    }
    let region = request
        .region
        .unwrap_or_else(|| config.default_region.clone());
    if !config.regions.contains(&region) {
        return Err(ApiError::Unprocessable(format!(
            "region `{region}` is not served"
        )));
    }
    let strategy = strategy(&headers, &user, "checkout")?;
    let client = stripe_client(&state)?;
    let metadata: std::collections::HashMap<String, String> = [
        ("user", user.clone()),
        ("plan", request.plan.clone()),
        ("region", region),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut item = CreateCheckoutSessionLineItems::new();
    item.price = Some(price.clone());
    item.quantity = Some(quantity.into());
    let mut subscription = CreateCheckoutSessionSubscriptionData::new();
    subscription.metadata = Some(metadata.clone());
    let mut create = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Subscription)
        .client_reference_id(user.as_str())
        .line_items(vec![item])
        .metadata(metadata)
        .subscription_data(subscription)
        .success_url(request.success_url)
        .cancel_url(request.cancel_url);
    if let Some(customer) = store::user_customer(&mut *state.conn().await?, &user).await? {
        create = create.customer(customer);
    }
    let session = create
        .customize()
        .request_strategy(strategy)
        .send(client)
        .await
        .map_err(stripe_failed)?;
    tracing::info!(user, session = %session.id, "checkout session created");
    Ok(Json(CheckoutAnswer {
        id: session.id.to_string(),
        url: session.url,
    }))
}

/// Where the portal sends the user back to.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalRequest {
    pub return_url: String,
}

/// The Billing Portal session to send the user to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PortalAnswer {
    pub url: String,
}

/// A Billing Portal session for the user's Stripe customer; 404 when the user has none.
#[utoipa::path(
    post,
    path = "/api/v1/billing/portal",
    tag = "billing",
    params(IdempotencyKeyHeader),
    request_body = PortalRequest,
    responses(
        (status = 200, description = "The Billing Portal session", body = PortalAnswer),
        (status = 400, description = "The body is not a `PortalRequest`", body = ErrorBody),
        (status = 404, description = "The user has no Stripe customer yet", body = ErrorBody),
        (status = 409, description = "A request with this `Idempotency-Key` is still running", body = ErrorBody),
        (status = 422, description = "This `Idempotency-Key` was used with another request", body = ErrorBody),
        (status = 502, description = "Stripe refused or failed", body = ErrorBody),
        (status = 503, description = "Billing is not configured", body = ErrorBody),
    )
)]
pub async fn portal(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PortalAnswer>, ApiError> {
    let request: PortalRequest = json_body(&body)?;
    url(
        "return_url",
        &request.return_url,
        &state.config.return_url_origins,
    )?;
    let strategy = strategy(&headers, &user, "portal")?;
    let client = stripe_client(&state)?;
    let customer = store::user_customer(&mut *state.conn().await?, &user)
        .await?
        .ok_or(ApiError::NotFound)?;
    let session = CreateBillingPortalSession::new()
        .customer(customer)
        .return_url(request.return_url)
        .customize()
        .request_strategy(strategy)
        .send(client)
        .await
        .map_err(stripe_failed)?;
    Ok(Json(PortalAnswer { url: session.url }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_built_from_the_settings() {
        let env = hive_jobs::config::Env(|k: &str| {
            match k {
                "STRIPE_WEBHOOK_SECRET" => Some("whsec_x"),
                "HIVE_JWT_SECRET" => Some("0123456789abcdef0123"),
                "DATABASE_URL" => Some("postgres://x"),
                "AWS_REGION" => Some("eu-west-1"),
                "HIVE_NODE_DOMAIN" => Some("nodes.example.com"),
                "STRIPE_SECRET_KEY" => Some("sk_test_x"),
                _ => None,
            }
            .map(str::to_string)
        });
        let config = hive_jobs::config::ApiConfig::from_env(&env).unwrap();
        assert!(client(&config).unwrap().is_some());
    }
}
