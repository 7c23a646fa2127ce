//! Stripe events built from Stripe's own example objects (`shared/stripe/fixtures3.json`), set
//! up as a real subscription checkout would be, and signed with Stripe's scheme.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

/// Where Stripe's fixtures are: `HIVE_STRIPE_FIXTURES`, else `shared/` beside the project.
pub fn fixtures_path() -> PathBuf {
    std::env::var_os("HIVE_STRIPE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/stripe/fixtures3.json")
        })
}

pub struct Fixtures {
    resources: Value,
}

impl Fixtures {
    pub fn load() -> anyhow::Result<Self> {
        let path = fixtures_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading Stripe fixtures at {}", path.display()))?;
        let all: Value = serde_json::from_str(&text).context("parsing Stripe fixtures")?;
        Ok(Fixtures {
            resources: all["resources"].clone(),
        })
    }

    pub fn object(&self, name: &str) -> anyhow::Result<Value> {
        self.resources
            .get(name)
            .cloned()
            .with_context(|| format!("no `{name}` in the fixtures"))
    }

    /// An event envelope (Stripe's own `event` example) around `object`.
    pub fn event(&self, event_type: &str, object: Value) -> anyhow::Result<Value> {
        let mut event = self.object("event")?;
        event["id"] = json!(format!("evt_{}", uuid::Uuid::new_v4().simple()));
        event["type"] = json!(event_type);
        event["api_version"] = json!("2025-03-31.basil");
        event["created"] = json!(chrono::Utc::now().timestamp());
        event["data"] = json!({ "object": object });
        Ok(event)
    }

    /// `checkout.session.completed` for a paid subscription checkout of `plan` by `user`.
    pub fn subscription_checkout(
        &self,
        user: &str,
        plan: &str,
        region: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut session = self.object("checkout.session")?;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        session["id"] = json!(format!("cs_test_{unique}"));
        session["mode"] = json!("subscription");
        session["status"] = json!("complete");
        session["payment_status"] = json!("paid");
        session["client_reference_id"] = json!(user);
        let mut metadata = json!({ "plan": plan });
        if let Some(region) = region {
            metadata["region"] = json!(region);
        }
        session["metadata"] = metadata;
        session["subscription"] = json!(format!("sub_{}", &unique[..24]));
        session["customer"] = json!(format!("cus_{}", &unique[..14]));
        self.event("checkout.session.completed", session)
    }
}

impl Fixtures {
    /// `customer.subscription.deleted` for the subscription `subscription_id`.
    pub fn subscription_deleted(&self, subscription_id: &str) -> anyhow::Result<Value> {
        let mut subscription = self.object("subscription")?;
        subscription["id"] = json!(subscription_id);
        subscription["status"] = json!("canceled");
        self.event("customer.subscription.deleted", subscription)
    }
}

/// One subscription as Stripe would speak of it in a test: its ids, and the times of events.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    pub user: String,
}

impl Subscription {
    /// A new subscription of `user`, with fresh Stripe ids.
    pub fn new(user: &str) -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        Subscription {
            id: format!("sub_{}", &unique[..24]),
            customer: format!("cus_{}", &unique[..14]),
            user: user.to_string(),
        }
    }
}

impl Fixtures {
    /// `checkout.session.completed` of `plan` for `sub`, at Stripe time `created`.
    pub fn checkout_of(
        &self,
        sub: &Subscription,
        plan: &str,
        created: i64,
    ) -> anyhow::Result<Value> {
        let mut event = self.subscription_checkout(&sub.user, plan, None)?;
        event["data"]["object"]["subscription"] = json!(sub.id);
        event["data"]["object"]["customer"] = json!(sub.customer);
        event["created"] = json!(created);
        Ok(event)
    }

    /// `customer.subscription.<what>` (`created`, `updated`, `deleted`) of `sub` with `status`,
    /// buying `quantity` of the price whose lookup key is `plan`, at Stripe time `created`.
    pub fn subscription_event(
        &self,
        what: &str,
        sub: &Subscription,
        status: &str,
        plan: &str,
        quantity: u32,
        created: i64,
    ) -> anyhow::Result<Value> {
        let mut object = self.object("subscription")?;
        object["id"] = json!(sub.id);
        object["customer"] = json!(sub.customer);
        object["status"] = json!(status);
        object["metadata"] = json!({});
        object["cancel_at"] = Value::Null;
        object["cancel_at_period_end"] = json!(false);
        let item = &mut object["items"]["data"][0];
        item["subscription"] = json!(sub.id);
        item["quantity"] = json!(quantity);
        item["price"]["id"] = json!(format!("price_{plan}_test"));
        item["price"]["lookup_key"] = json!(plan);
        let mut event = self.event(&format!("customer.subscription.{what}"), object)?;
        event["created"] = json!(created);
        Ok(event)
    }

    /// `invoice.paid` or `invoice.payment_failed` (`what`) of `sub`, at Stripe time `created`.
    pub fn invoice_event(
        &self,
        what: &str,
        sub: &Subscription,
        created: i64,
    ) -> anyhow::Result<Value> {
        let mut object = self.object("invoice")?;
        object["customer"] = json!(sub.customer);
        object["subscription"] = json!(sub.id);
        object["parent"] = json!({
            "quote_details": null,
            "subscription_details": { "metadata": {}, "subscription": sub.id },
            "type": "subscription_details"
        });
        object["status"] = json!(if what == "paid" { "paid" } else { "open" });
        let mut event = self.event(&format!("invoice.{what}"), object)?;
        event["created"] = json!(created);
        Ok(event)
    }
}

/// The `Stripe-Signature` header for `body`, signed now with `secret`.
pub fn signature(body: &[u8], secret: &str) -> String {
    hive_api::stripe_signature::sign(body, secret, chrono::Utc::now().timestamp())
}
