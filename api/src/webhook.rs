//! `POST /webhooks/stripe`: verify, record, enqueue, answer. Nothing here calls a cloud.
//!
//! Each event type we act on has one function that reads it into what it means for a
//! subscription (`meaning` is the table); `billing::apply` merges that into the subscription
//! and makes its nodes follow, in the same transaction as the event's record.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use hive_jobs::billing::{
    self, BillingError, BillingRules, Binding, Items, StripeStatus, SubscriptionNews,
};
use hive_jobs::config::ApiConfig;
use hive_jobs::requests::RequestError;
use hive_jobs::store::{self, StripeEventRecord};
use serde::Deserialize;
use serde_json::Value;
use stripe_shared::{CheckoutSession, CheckoutSessionMode, Invoice, Subscription};
use stripe_types::Expandable;

use crate::error::{ApiError, ErrorBody};
use crate::request_id::RequestId;
use crate::stripe_signature;
use crate::AppState;

/// The envelope every Stripe event has. Parsed by us, leniently: fields we do not know and API
/// versions newer than ours are accepted; the object is parsed only for the types we act on.
#[derive(Debug, Deserialize)]
struct EventEnvelope {
    id: String,
    object: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    livemode: bool,
    /// Stripe's time of the event (seconds): which of two snapshots is newer.
    created: i64,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

fn expandable_id<T>(e: &Expandable<T>) -> String
where
    T: stripe_types::Object,
    T::Id: std::fmt::Display,
{
    e.id().to_string()
}

/// What an event means for us.
#[derive(Debug)]
enum Meaning {
    /// Recorded, nothing else.
    Record,
    /// News of a subscription, to be merged and followed by its nodes.
    Subscription(Box<SubscriptionNews>),
}

/// The table from event type to what it means: one function per type. Everything a 4xx could
/// come from is checked here, before anything is written.
fn meaning(event: &EventEnvelope, config: &ApiConfig) -> Result<Meaning, ApiError> {
    let object = &event.data.object;
    match event.event_type.as_str() {
        "checkout.session.completed" => checkout_completed(object, config),
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription_changed(object, event.created, config, None)
        }
        "customer.subscription.deleted" => {
            subscription_changed(object, event.created, config, Some(StripeStatus::Canceled))
        }
        "invoice.paid" => invoice_settled(object, event.created, StripeStatus::Active),
        "invoice.payment_failed" => invoice_settled(object, event.created, StripeStatus::PastDue),
        _ => Ok(Meaning::Record),
    }
}

fn parse<T: serde::de::DeserializeOwned>(object: &Value, what: &str) -> Result<T, ApiError> {
    serde_json::from_value(object.clone())
        .map_err(|e| ApiError::BadRequest(format!("data.object is not a {what}: {e}")))
}

/// A paid subscription checkout binds the subscription to the app's user, and says what it
/// buys until the subscription itself speaks (its status and items carry time 0).
fn checkout_completed(object: &Value, config: &ApiConfig) -> Result<Meaning, ApiError> {
    let session: CheckoutSession = parse(object, "checkout session")?;
    // A one-off payment is not ours to provision.
    if session.mode != CheckoutSessionMode::Subscription {
        return Ok(Meaning::Record);
    }
    let user_id = session
        .client_reference_id
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            ApiError::Unprocessable("checkout session has no client_reference_id".into())
        })?;
    let metadata = session.metadata.clone().unwrap_or_default();
    let plan = metadata
        .get("plan")
        .cloned()
        .ok_or_else(|| ApiError::Unprocessable("checkout session has no metadata.plan".into()))?;
    // Check what configuration decides before writing anything, so a bad order changes
    // nothing (and Stripe's redelivery succeeds once the operator has fixed the plans).
    if !config.plans.0.contains_key(&plan) {
        return Err(ApiError::Unprocessable(format!("unknown plan `{plan}`")));
    }
    let region = served_region(config, metadata.get("region"))?;
    let stripe_subscription_id = session
        .subscription
        .as_ref()
        .map(expandable_id)
        .ok_or_else(|| ApiError::Unprocessable("checkout session has no subscription".into()))?;
    Ok(Meaning::Subscription(Box::new(SubscriptionNews {
        stripe_subscription_id,
        stripe_customer_id: session.customer.as_ref().map(expandable_id),
        at: 0,
        binding: Some(Binding {
            user_id,
            region: Some(region),
        }),
        status: Some(StripeStatus::Active),
        items: Some(Items {
            plan,
            quantity: 1,
            price_id: None,
        }),
        cancel_at: None,
        current_period_start: None,
        current_period_end: None,
    })))
}

/// The region asked for, if the api serves it; the default region when none is asked for.
fn served_region(config: &ApiConfig, asked: Option<&String>) -> Result<String, ApiError> {
    let region = asked
        .filter(|r| !r.is_empty())
        .cloned()
        .unwrap_or_else(|| config.default_region.clone());
    if !config.regions.contains(&region) {
        return Err(ApiError::Unprocessable(format!(
            "region `{region}` is not served"
        )));
    }
    Ok(region)
}

/// A snapshot of the subscription: its status, what it buys (the plan its first item's price
/// names), and whose it is when our checkout put that in its metadata.
fn subscription_changed(
    object: &Value,
    at: i64,
    config: &ApiConfig,
    status: Option<StripeStatus>,
) -> Result<Meaning, ApiError> {
    let subscription: Subscription = parse(object, "subscription")?;
    let status = match status {
        Some(s) => s,
        None => StripeStatus::parse(subscription.status.as_str()).ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "unknown subscription status `{}`",
                subscription.status.as_str()
            ))
        })?,
    };
    let item = subscription.items.data.first();
    let plan = item.and_then(|item| {
        config.plans.for_price(
            item.price.id.as_str(),
            item.price.lookup_key.as_deref(),
            item.price.metadata.get("plan").map(String::as_str),
        )
    });
    let items = match (item, plan) {
        (Some(item), Some((name, _))) => Some(Items {
            plan: name.to_string(),
            quantity: item.quantity.unwrap_or(1).min(100) as i32,
            price_id: Some(item.price.id.to_string()),
        }),
        // What an ending subscription bought does not matter.
        _ if status == StripeStatus::Canceled => None,
        (Some(item), None) => {
            return Err(ApiError::Unprocessable(format!(
                "no plan is bought by price `{}`",
                item.price.id
            )))
        }
        (None, _) => None,
    };
    let binding = match subscription.metadata.get("user") {
        Some(user) if !user.is_empty() => Some(Binding {
            user_id: user.clone(),
            region: Some(served_region(config, subscription.metadata.get("region"))?),
        }),
        _ => None,
    };
    Ok(Meaning::Subscription(Box::new(SubscriptionNews {
        stripe_subscription_id: subscription.id.to_string(),
        stripe_customer_id: Some(expandable_id(&subscription.customer)),
        at,
        binding,
        status: Some(status),
        items,
        cancel_at: subscription.cancel_at,
        current_period_start: item.map(|i| i.current_period_start),
        current_period_end: item.map(|i| i.current_period_end),
    })))
}

/// An invoice of a subscription was paid (it runs again) or not (it is past due).
fn invoice_settled(object: &Value, at: i64, status: StripeStatus) -> Result<Meaning, ApiError> {
    let invoice: Invoice = parse(object, "invoice")?;
    // Older API versions name the subscription on the invoice, newer ones under its parent.
    let subscription = invoice
        .subscription
        .as_ref()
        .map(expandable_id)
        .or_else(|| {
            object["parent"]["subscription_details"]["subscription"]
                .as_str()
                .map(str::to_string)
        })
        .filter(|id| id.starts_with("sub_"));
    let Some(stripe_subscription_id) = subscription else {
        return Ok(Meaning::Record);
    };
    Ok(Meaning::Subscription(Box::new(SubscriptionNews {
        stripe_subscription_id,
        stripe_customer_id: invoice.customer.as_ref().map(expandable_id),
        at,
        binding: None,
        status: Some(status),
        items: None,
        cancel_at: None,
        current_period_start: None,
        current_period_end: None,
    })))
}

/// A Stripe event, signed with one of the endpoint's secrets: recorded once, and what it means
/// for the subscription's nodes enqueued in the same transaction.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "stripe",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the body")),
    request_body(content = serde_json::Value, description = "A Stripe event", content_type = "application/json"),
    responses(
        (status = 200, description = "Recorded (or a duplicate delivery of one recorded)", body = serde_json::Value),
        (status = 400, description = "No valid signature, or not a Stripe event", body = ErrorBody),
        (status = 422, description = "An event this api cannot apply (an unknown plan or price)", body = ErrorBody),
    )
)]
pub async fn stripe_webhook(
    State(state): State<AppState>,
    request_id: RequestId,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    receive(&state, &request_id, &headers, &body).await
}

/// Counts an event refused before its signature and shape were checked: such bodies may name
/// any type they like, which must not become a label.
fn unverified(e: ApiError) -> ApiError {
    hive_jobs::metrics::webhook_event("unverified", "rejected");
    e
}

async fn receive(
    state: &AppState,
    request_id: &RequestId,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("missing Stripe-Signature header".into()))
        .map_err(unverified)?;
    stripe_signature::verify(
        header,
        body,
        &state.config.stripe_webhook_secrets,
        state.config.stripe_tolerance,
        chrono::Utc::now().timestamp(),
    )
    .map_err(|e| unverified(ApiError::BadRequest(e.to_string())))?;

    let payload: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| unverified(ApiError::BadRequest("body is not JSON".into())))?;
    let event: EventEnvelope = serde_json::from_value(payload.clone()).map_err(|e| {
        unverified(ApiError::BadRequest(format!(
            "body is not a Stripe event: {e}"
        )))
    })?;
    if event.object != "event" || !event.id.starts_with("evt_") {
        return Err(unverified(ApiError::BadRequest(
            "body is not a Stripe event".into(),
        )));
    }
    let meaning = meaning(&event, &state.config).inspect_err(|_| {
        hive_jobs::metrics::webhook_event(&event.event_type, "rejected");
    })?;

    let mut tx = state.pool.begin().await.map_err(store::StoreError::from)?;
    request_id.tag(&mut tx).await?;
    let new = store::record_stripe_event(
        &mut tx,
        &StripeEventRecord {
            id: &event.id,
            event_type: &event.event_type,
            api_version: event.api_version.as_deref(),
            livemode: event.livemode,
            payload: &payload,
        },
    )
    .await?;
    if !new {
        tx.rollback().await.map_err(store::StoreError::from)?;
        tracing::info!(event_id = %event.id, "duplicate delivery");
        hive_jobs::metrics::webhook_event(&event.event_type, "duplicate");
        return Ok(Json(
            serde_json::json!({ "received": true, "duplicate": true }),
        ));
    }
    let applied = match &meaning {
        Meaning::Record => None,
        Meaning::Subscription(news) => {
            let rules = BillingRules {
                plans: &state.config.plans,
                default_region: &state.config.default_region,
                node_domain: &state.config.node_domain,
                past_due_grace: state.config.past_due_grace,
            };
            Some(
                billing::apply(&mut tx, news, &event.id, &rules)
                    .await
                    .map_err(|e| match e {
                        BillingError::Store(e) | BillingError::Request(RequestError::Store(e)) => {
                            ApiError::Internal(e)
                        }
                        other => ApiError::Unprocessable(other.to_string()),
                    })?,
            )
        }
    };
    tx.commit().await.map_err(store::StoreError::from)?;
    hive_jobs::metrics::webhook_event(&event.event_type, "recorded");
    let added = applied.map(|a| a.added).unwrap_or_default();
    tracing::info!(
        event_id = %event.id,
        event_type = %event.event_type,
        nodes = added.len(),
        "stripe event recorded"
    );
    Ok(Json(
        serde_json::json!({ "received": true, "nodes": added }),
    ))
}
