//! `POST /webhooks/stripe`: verify, record, enqueue, answer. Nothing here calls a cloud.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use hive_jobs::store::{self, NewSubscription, StripeEventRecord};
use serde::Deserialize;
use stripe_shared::{CheckoutSession, CheckoutSessionMode};
use stripe_types::Expandable;

use crate::error::ApiError;
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
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

/// What a paid subscription checkout asks of us.
#[derive(Debug, PartialEq, Eq)]
struct Order {
    user_id: String,
    plan: String,
    region: Option<String>,
    stripe_subscription_id: String,
    stripe_customer_id: Option<String>,
}

fn expandable_id<T>(e: &Expandable<T>) -> String
where
    T: stripe_types::Object,
    T::Id: std::fmt::Display,
{
    e.id().to_string()
}

/// Reads the order out of a completed Checkout Session; `None` when it is not a subscription
/// checkout (a one-off payment is not ours to provision).
fn order_from_session(session: &CheckoutSession) -> Result<Option<Order>, ApiError> {
    if session.mode != CheckoutSessionMode::Subscription {
        return Ok(None);
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
    let stripe_subscription_id = session
        .subscription
        .as_ref()
        .map(expandable_id)
        .ok_or_else(|| ApiError::Unprocessable("checkout session has no subscription".into()))?;
    Ok(Some(Order {
        user_id,
        plan,
        region: metadata.get("region").cloned().filter(|r| !r.is_empty()),
        stripe_subscription_id,
        stripe_customer_id: session.customer.as_ref().map(expandable_id),
    }))
}

pub async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("missing Stripe-Signature header".into()))?;
    stripe_signature::verify(
        header,
        &body,
        &state.config.stripe_webhook_secrets,
        state.config.stripe_tolerance,
        chrono::Utc::now().timestamp(),
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;

    let payload: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("body is not JSON".into()))?;
    let event: EventEnvelope = serde_json::from_value(payload.clone())
        .map_err(|e| ApiError::BadRequest(format!("body is not a Stripe event: {e}")))?;
    if event.object != "event" || !event.id.starts_with("evt_") {
        return Err(ApiError::BadRequest("body is not a Stripe event".into()));
    }

    // The subscription is over: its nodes are torn down.
    let ended_subscription = if event.event_type == "customer.subscription.deleted" {
        let id = event
            .data
            .object
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if !id.starts_with("sub_") {
            return Err(ApiError::BadRequest(
                "data.object is not a subscription".into(),
            ));
        }
        Some(id.to_string())
    } else {
        None
    };
    let order = if event.event_type == "checkout.session.completed" {
        let session: CheckoutSession = serde_json::from_value(event.data.object).map_err(|e| {
            ApiError::BadRequest(format!("data.object is not a checkout session: {e}"))
        })?;
        order_from_session(&session)?
    } else {
        None
    };
    // Check what configuration decides before writing anything, so a bad order changes nothing
    // (and Stripe's redelivery succeeds once the operator has fixed the plans).
    let provision = match &order {
        None => None,
        Some(order) => {
            let plan =
                state.config.plans.0.get(&order.plan).ok_or_else(|| {
                    ApiError::Unprocessable(format!("unknown plan `{}`", order.plan))
                })?;
            let region = order
                .region
                .clone()
                .unwrap_or_else(|| state.config.default_region.clone());
            if !state.config.regions.contains(&region) {
                return Err(ApiError::Unprocessable(format!(
                    "region `{region}` is not served"
                )));
            }
            Some((plan.clone(), region))
        }
    };

    let mut tx = state.pool.begin().await.map_err(store::StoreError::from)?;
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
        return Ok(Json(
            serde_json::json!({ "received": true, "duplicate": true }),
        ));
    }
    let mut node_ids = Vec::new();
    if let Some(ended) = &ended_subscription {
        let torn_down = store::end_subscription(&mut tx, ended, &event.id).await?;
        tracing::info!(event_id = %event.id, subscription = %ended, nodes = torn_down.len(), "subscription ended");
    }
    if let (Some(order), Some((plan, region))) = (&order, &provision) {
        node_ids = store::create_subscription_with_nodes(
            &mut tx,
            &NewSubscription {
                stripe_event_id: &event.id,
                stripe_subscription_id: &order.stripe_subscription_id,
                stripe_customer_id: order.stripe_customer_id.as_deref(),
                user_id: &order.user_id,
                plan: &order.plan,
                region,
                instance_type: &plan.instance_type,
                nodes: plan.nodes,
                node_domain: &state.config.node_domain,
            },
        )
        .await?;
    }
    tx.commit().await.map_err(store::StoreError::from)?;
    tracing::info!(
        event_id = %event.id,
        event_type = %event.event_type,
        nodes = node_ids.len(),
        "stripe event recorded"
    );
    Ok(Json(
        serde_json::json!({ "received": true, "nodes": node_ids }),
    ))
}
