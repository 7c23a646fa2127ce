//! What a Stripe event means for us, read from its payload: the api reads each event as it
//! arrives, and `hivectl stripe-events reprocess` reads a recorded one again. Each event type we
//! act on has one function (`meaning` is the table); `billing::apply` merges what it says into
//! the subscription and makes its nodes follow.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use stripe_shared::{CheckoutSession, CheckoutSessionMode, Invoice, Subscription};
use stripe_types::Expandable;

use crate::billing::{
    self, Applied, BillingError, BillingRules, Binding, Items, Payment, StripeStatus,
    SubscriptionNews,
};
use crate::config::ApiConfig;
use crate::store;

/// Why an event cannot be applied. Neither holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Not a Stripe event, or not the object its type says (the sender's fault: a 400).
    #[error("{0}")]
    Malformed(String),
    /// A well-formed event our configuration cannot apply (an unknown plan or region: a 422
    /// that Stripe redelivers until the operator has fixed the configuration).
    #[error("{0}")]
    Unusable(String),
}

impl EventEnvelope {
    /// The envelope of a stored payload, checked to be a Stripe event.
    pub fn of(payload: &Value) -> Result<Self, EventError> {
        // The object is kept as text (below): read from the payload's text.
        Self::from_body(payload.to_string().as_bytes())
    }

    /// The envelope of a webhook's body, read straight from its bytes (one parse, no copy of
    /// the whole tree: the ingest path runs this for every delivery).
    pub fn from_body(body: &[u8]) -> Result<Self, EventError> {
        let event: EventEnvelope = serde_json::from_slice(body).map_err(|e| {
            EventError::Malformed(if e.is_data() {
                format!("body is not a Stripe event: {e}")
            } else {
                "body is not JSON".into()
            })
        })?;
        event.checked()
    }

    fn checked(self) -> Result<Self, EventError> {
        let event = self;
        if event.object != "event" || !event.id.starts_with("evt_") {
            return Err(EventError::Malformed("body is not a Stripe event".into()));
        }
        Ok(event)
    }
}

/// The envelope every Stripe event has. Parsed by us, leniently: fields we do not know and API
/// versions newer than ours are accepted; the object is parsed only for the types we act on.
#[derive(Debug, Deserialize)]
pub struct EventEnvelope {
    pub id: String,
    pub object: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub livemode: bool,
    /// Stripe's time of the event (seconds): which of two snapshots is newer.
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    /// Kept as its text, parsed only for the types we act on: nine in ten events are only
    /// recorded, and building their tree cost the ingest path for nothing.
    pub object: Box<RawValue>,
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
pub enum Meaning {
    /// Recorded, nothing else.
    Record,
    /// News of a subscription, to be merged and followed by its nodes.
    Subscription(Box<SubscriptionNews>),
}

/// Why an event of the other mode than our account's is refused, if it is: a test event signed
/// with a shared secret must not provision real nodes (nor a live one touch a test setup).
pub fn refused(event: &EventEnvelope, config: &ApiConfig) -> Option<String> {
    let ours = config.stripe_livemode?;
    (event.livemode != ours).then(|| {
        let mode = |live: bool| if live { "live" } else { "test" };
        format!(
            "a {} event, and this api takes {} events",
            mode(event.livemode),
            mode(ours)
        )
    })
}

/// The table from event type to what it means: one function per type. Everything a 4xx could
/// come from is checked here, before anything is written.
pub fn meaning(event: &EventEnvelope, config: &ApiConfig) -> Result<Meaning, EventError> {
    let object = event.data.object.get();
    match event.event_type.as_str() {
        "checkout.session.completed" => checkout_completed(object, config),
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription_changed(object, event.created, config, None)
        }
        "customer.subscription.deleted" => {
            subscription_changed(object, event.created, config, Some(StripeStatus::Canceled))
        }
        "invoice.paid" => invoice_settled(object, event.created, Payment::Paid),
        "invoice.payment_failed" => invoice_settled(object, event.created, Payment::Failed),
        _ => Ok(Meaning::Record),
    }
}

fn parse<T: serde::de::DeserializeOwned>(object: &str, what: &str) -> Result<T, EventError> {
    serde_json::from_str(object)
        .map_err(|e| EventError::Malformed(format!("data.object is not a {what}: {e}")))
}

/// A paid subscription checkout binds the subscription to the app's user, and says what it
/// buys until the subscription itself speaks (its status and items carry time 0).
fn checkout_completed(object: &str, config: &ApiConfig) -> Result<Meaning, EventError> {
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
            EventError::Unusable("checkout session has no client_reference_id".into())
        })?;
    let metadata = session.metadata.clone().unwrap_or_default();
    let plan = metadata
        .get("plan")
        .cloned()
        .ok_or_else(|| EventError::Unusable("checkout session has no metadata.plan".into()))?;
    // Check what configuration decides before writing anything, so a bad order changes
    // nothing (and Stripe's redelivery succeeds once the operator has fixed the plans).
    if !config.plans.0.contains_key(&plan) {
        return Err(EventError::Unusable(format!("unknown plan `{plan}`")));
    }
    let region = served_region(config, metadata.get("region"))?;
    let stripe_subscription_id = session
        .subscription
        .as_ref()
        .map(expandable_id)
        .ok_or_else(|| EventError::Unusable("checkout session has no subscription".into()))?;
    Ok(Meaning::Subscription(Box::new(SubscriptionNews {
        stripe_subscription_id,
        stripe_customer_id: session.customer.as_ref().map(expandable_id),
        at: 0,
        binding: Some(Binding {
            user_id,
            region: Some(region),
        }),
        status: Some(StripeStatus::Active),
        payment: None,
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
fn served_region(config: &ApiConfig, asked: Option<&String>) -> Result<String, EventError> {
    let region = asked
        .filter(|r| !r.is_empty())
        .cloned()
        .unwrap_or_else(|| config.default_region.clone());
    if !config.regions.contains(&region) {
        return Err(EventError::Unusable(format!(
            "region `{region}` is not served"
        )));
    }
    Ok(region)
}

/// A snapshot of the subscription: its status, what it buys (the plan its first item's price
/// names), and whose it is when our checkout put that in its metadata.
fn subscription_changed(
    object: &str,
    at: i64,
    config: &ApiConfig,
    status: Option<StripeStatus>,
) -> Result<Meaning, EventError> {
    let subscription: Subscription = parse(object, "subscription")?;
    let status = match status {
        Some(s) => s,
        None => StripeStatus::parse(subscription.status.as_str()).ok_or_else(|| {
            EventError::Unusable(format!(
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
            return Err(EventError::Unusable(format!(
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
        payment: None,
        items,
        cancel_at: subscription.cancel_at,
        current_period_start: item.map(|i| i.current_period_start),
        current_period_end: item.map(|i| i.current_period_end),
    })))
}

/// An invoice of a subscription was paid (it runs again) or not (it is past due).
fn invoice_settled(object: &str, at: i64, payment: Payment) -> Result<Meaning, EventError> {
    let invoice: Invoice = parse(object, "invoice")?;
    // Older API versions name the subscription on the invoice, newer ones under its parent.
    let subscription = invoice
        .subscription
        .as_ref()
        .map(expandable_id)
        .or_else(|| {
            let tree: Value = serde_json::from_str(object).ok()?;
            tree["parent"]["subscription_details"]["subscription"]
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
        status: None,
        payment: Some(payment),
        items: None,
        cancel_at: None,
        current_period_start: None,
        current_period_end: None,
    })))
}

/// Merges what the event means into its subscription and makes the nodes follow, in the
/// caller's transaction. Safe to repeat: a snapshot no newer than what the subscription holds
/// changes nothing.
pub async fn apply(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    meaning: &Meaning,
    event_id: &str,
    config: &ApiConfig,
) -> Result<Option<Applied>, BillingError> {
    match meaning {
        Meaning::Record => Ok(None),
        Meaning::Subscription(news) => {
            let rules = BillingRules {
                plans: &config.plans,
                default_region: &config.default_region,
                node_domain: &config.node_domain,
                past_due_grace: config.past_due_grace,
            };
            billing::apply(tx, news, event_id, &rules).await.map(Some)
        }
    }
}

/// What applying the held events did: the ones applied (with what they did), and how many
/// stay held.
#[derive(Debug, Default)]
pub struct HeldApplied {
    pub applied: Vec<(String, Option<Applied>)>,
    pub still_held: usize,
}

/// Applies every held event the configuration now allows, in Stripe's order (the api does at
/// its start: a held event needs no redelivery). One that still cannot be applied keeps its
/// hold, with why, now. Several apis starting at once apply each event once.
pub async fn apply_held(
    pool: &sqlx::PgPool,
    config: &ApiConfig,
) -> Result<HeldApplied, BillingError> {
    /// Enough for any backlog an operator could leave; the rest waits for the next start.
    const AT_MOST: i64 = 10_000;
    let mut done = HeldApplied::default();
    for stored in store::held_stripe_events(pool, AT_MOST).await? {
        let meaning =
            EventEnvelope::of(&stored.payload.0).and_then(|event| match refused(&event, config) {
                Some(why) => Err(EventError::Unusable(why)),
                None => meaning(&event, config),
            });
        let meaning = match meaning {
            Ok(meaning) => meaning,
            Err(why) => {
                store::still_held(pool, &stored.id, &why.to_string()).await?;
                done.still_held += 1;
                continue;
            }
        };
        let mut tx = pool.begin().await.map_err(store::StoreError::from)?;
        if !store::take_held_stripe_event(&mut tx, &stored.id).await? {
            continue;
        }
        match apply(&mut tx, &meaning, &stored.id, config).await {
            Ok(applied) => {
                tx.commit().await.map_err(store::StoreError::from)?;
                done.applied.push((stored.id, applied));
            }
            Err(e) => {
                let why = match e.into_store() {
                    Ok(database) => return Err(BillingError::Store(database)),
                    Err(not_yet) => not_yet.to_string(),
                };
                tx.rollback().await.map_err(store::StoreError::from)?;
                store::still_held(pool, &stored.id, &why).await?;
                done.still_held += 1;
            }
        }
    }
    Ok(done)
}
