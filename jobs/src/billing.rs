//! What Stripe says about a subscription, and what that means for its nodes.
//!
//! Each Stripe event is read into [`SubscriptionNews`] (api/src/webhook.rs holds the table from
//! event type to news). The news is merged into the subscription's row by Stripe's time: a
//! subscription keeps the latest snapshot it applied, status and items apart (invoices speak of
//! the status only), and an older snapshot never overwrites a newer one, so every delivery order
//! ends the same. Then the subscription's nodes are made to follow it, through the request entry
//! points of `requests.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::config::Plans;
use crate::model::Desired;
use crate::requests::{self, NodeShape, RequestError};
use crate::store::{self, StoreError, SubscriptionState};

pub use crate::model::StripeStatus;

/// Who a subscription belongs to (the checkout's `client_reference_id`, or the metadata our
/// checkout put on the subscription).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub user_id: String,
    pub region: Option<String>,
}

/// What a subscription buys: a plan (by our name) and how many of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Items {
    pub plan: String,
    pub quantity: i32,
    pub price_id: Option<String>,
}

/// What one Stripe event says about a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionNews {
    pub stripe_subscription_id: String,
    pub stripe_customer_id: Option<String>,
    /// Stripe's time of the news (the event's `created`, seconds). A checkout's status and
    /// items are given time 0: they count only until the subscription itself speaks.
    pub at: i64,
    pub binding: Option<Binding>,
    /// The subscription's own status, from the subscription (or a checkout).
    pub status: Option<StripeStatus>,
    /// What an invoice says of a payment: never a status by itself (see [`Payment`]).
    pub payment: Option<Payment>,
    pub items: Option<Items>,
    pub cancel_at: Option<i64>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
}

/// What an invoice event says: a payment went through or failed. It changes the status only
/// where the subscription's own status leaves no doubt of what it means: a paid invoice ends a
/// lapse (`past_due`, `unpaid`: Stripe makes the subscription `active` again), a failed one
/// starts one (`active`, `trialing` become `past_due`). It never starts an `incomplete`
/// subscription (its first payment failing keeps it `incomplete`, which runs nothing) and never
/// revives a `canceled` or `incomplete_expired` one (a final invoice may be paid days after the
/// end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payment {
    Paid,
    Failed,
}

impl Payment {
    /// Its entry in the status history, beside the statuses.
    fn as_str(self) -> &'static str {
        match self {
            Payment::Paid => "invoice.paid",
            Payment::Failed => "invoice.payment_failed",
        }
    }

    fn parse(s: &str) -> Option<Payment> {
        [Payment::Paid, Payment::Failed]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// The status after this payment, from the status before it.
    fn after(self, before: StripeStatus) -> StripeStatus {
        use StripeStatus::*;
        match (self, before) {
            (Payment::Paid, PastDue | Unpaid) => Active,
            (Payment::Failed, Active | Trialing) => PastDue,
            (_, unchanged) => unchanged,
        }
    }
}

/// A payment's entries sort before a status of the same second: the subscription's own word
/// then has the last say.
const PAYMENT_RANK: i32 = -1;

/// The status after each entry of a (sorted) history: statuses as Stripe sent them, payments
/// read against the status before them, and a final status (`canceled`,
/// `incomplete_expired`) final whatever comes after it.
fn statuses_along(history: &[(i64, i32, String)]) -> Vec<(i64, i32, StripeStatus)> {
    let mut along = Vec::with_capacity(history.len());
    let mut current: Option<StripeStatus> = None;
    for (at, rank, entry) in history {
        let next = match (StripeStatus::parse(entry), Payment::parse(entry)) {
            _ if current.is_some_and(StripeStatus::is_final) => current,
            (Some(status), _) => Some(status),
            (None, Some(payment)) => current.map(|before| payment.after(before)),
            (None, None) => current,
        };
        if let Some(next) = next {
            along.push((*at, *rank, next));
        }
        current = next;
    }
    along
}

/// How far back, in Stripe's time, the status history is kept entry by entry; older entries are
/// folded into the status they left (`compact_history`), so that a subscription's history does
/// not grow for ever. Stripe's retries end after three days: no news older than this still
/// arrives to be ordered among them.
pub const HISTORY_KEPT_SECS: i64 = 35 * 24 * 3600;

/// Folds the entries of a (sorted) history before `before` into one: the status they left,
/// dated from when that status began (a lapse's start, which its grace counts from, is kept).
/// What the history says of the status, then and after, is unchanged.
pub fn compact_history(history: &mut Vec<(i64, i32, String)>, before: i64) {
    let old = history.partition_point(|(at, ..)| *at < before);
    if old < 2 {
        return;
    }
    let along = statuses_along(&history[..old]);
    let Some(&(_, _, left)) = along.last() else {
        return;
    };
    let since = along
        .iter()
        .rev()
        .take_while(|(_, _, status)| *status == left)
        .last()
        .map(|(at, ..)| *at);
    let Some(since) = since else {
        return;
    };
    history.drain(..old);
    history.insert(0, (since, left.rank(), left.as_str().to_string()));
}

/// Merges `news` into the subscription's snapshot: each part only when it is newer than what
/// the row holds. Pure, so that every delivery order can be checked to end the same.
pub fn merge(sub: &mut SubscriptionState, news: &SubscriptionNews) {
    if sub.stripe_customer_id.is_none() {
        sub.stripe_customer_id = news.stripe_customer_id.clone();
    }
    if let (None, Some(binding)) = (&sub.user_id, &news.binding) {
        sub.user_id = Some(binding.user_id.clone());
        if sub.region.is_none() {
            sub.region = binding.region.clone();
        }
    }
    // Every status snapshot and payment is kept (once), and the status read off the whole
    // history in Stripe's time, so that whatever order they came in they end the same.
    let entry = match (news.status, news.payment) {
        (Some(status), _) => Some((news.at, status.rank(), status.as_str().to_string())),
        (None, Some(payment)) => Some((news.at, PAYMENT_RANK, payment.as_str().to_string())),
        (None, None) => None,
    };
    if let Some(entry) = entry {
        let news_key = (entry.0, entry.1);
        if !sub.status_history.0.contains(&entry) {
            sub.status_history.0.push(entry);
            sub.status_history.0.sort();
        }
        let along = statuses_along(&sub.status_history.0);
        if let Some((at, rank, latest)) = along.last().copied() {
            sub.stripe_status = Some(latest.as_str().to_string());
            sub.status_at = Some(at);
            sub.status_rank = Some(rank);
            sub.past_due_since = past_due_since(&along);
            let newest_news = news.status.is_some() && news_key == (at, rank);
            if newest_news && (news.cancel_at.is_some() || news.at > 0) {
                sub.cancel_at = news.cancel_at.and_then(|t| DateTime::from_timestamp(t, 0));
            }
        }
    }
    if let Some(items) = &news.items {
        let key = |plan: &str, quantity: i32| (plan.to_string(), quantity);
        let newer = match (sub.items_at, &sub.plan) {
            (Some(at), Some(plan)) => {
                (news.at, key(&items.plan, items.quantity)) > (at, key(plan, sub.quantity))
            }
            _ => true,
        };
        if newer {
            sub.plan = Some(items.plan.clone());
            sub.quantity = items.quantity;
            sub.price_id = items.price_id.clone();
            sub.items_at = Some(news.at);
            if let Some(start) = news.current_period_start {
                sub.current_period_start = DateTime::from_timestamp(start, 0);
            }
            if let Some(end) = news.current_period_end {
                sub.current_period_end = DateTime::from_timestamp(end, 0);
            }
        }
    }
}

/// When the latest run of `past_due` began (`None` unless the latest status is past due).
fn past_due_since(along: &[(i64, i32, StripeStatus)]) -> Option<DateTime<Utc>> {
    let mut since = None;
    for (at, _, status) in along.iter().rev() {
        if *status != StripeStatus::PastDue {
            break;
        }
        since = Some(*at);
    }
    since.and_then(|at| DateTime::from_timestamp(at, 0))
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("unknown plan `{0}`")]
    UnknownPlan(String),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BillingError {
    /// The database's failure, if that is what this is; else the failure itself, which is
    /// for want of configuration (the event is held until the configuration allows it).
    pub fn into_store(self) -> Result<StoreError, BillingError> {
        match self {
            BillingError::Store(e) | BillingError::Request(RequestError::Store(e)) => Ok(e),
            other => Err(other),
        }
    }
}

/// What the nodes are to do, from the subscription's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodesFollow {
    /// Nothing runs yet, and nothing changes.
    Nothing,
    /// Run, with a grace end when past due.
    Run {
        suspend_at: Option<DateTime<Utc>>,
    },
    Suspend,
    TearDown,
}

/// The one table from a subscription's status to its nodes.
pub fn nodes_follow(sub: &SubscriptionState, grace: Duration) -> NodesFollow {
    let status = sub.stripe_status.as_deref().and_then(StripeStatus::parse);
    match status {
        None | Some(StripeStatus::Incomplete) => NodesFollow::Nothing,
        Some(StripeStatus::Active | StripeStatus::Trialing) => {
            NodesFollow::Run { suspend_at: None }
        }
        Some(StripeStatus::PastDue) => NodesFollow::Run {
            suspend_at: sub
                .past_due_since
                .map(|since| since + chrono::TimeDelta::from_std(grace).unwrap_or_default()),
        },
        Some(StripeStatus::Unpaid | StripeStatus::Paused) => NodesFollow::Suspend,
        Some(StripeStatus::IncompleteExpired | StripeStatus::Canceled) => NodesFollow::TearDown,
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub subscription_id: Uuid,
    /// Nodes created.
    pub added: Vec<Uuid>,
    /// Nodes sent to teardown.
    pub removed: Vec<Uuid>,
}

/// What applying news needs from the api's configuration.
pub struct BillingRules<'a> {
    pub plans: &'a Plans,
    pub default_region: &'a str,
    pub node_domain: &'a str,
    pub past_due_grace: Duration,
}

/// Records `news` on its subscription (created if Stripe spoke of it first) and makes the
/// subscription's nodes follow it, in the caller's transaction.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    news: &SubscriptionNews,
    stripe_event_id: &str,
    rules: &BillingRules<'_>,
) -> Result<Applied, BillingError> {
    if let Some(items) = &news.items {
        if !rules.plans.0.contains_key(&items.plan) {
            return Err(BillingError::UnknownPlan(items.plan.clone()));
        }
    }
    let mut sub =
        store::lock_subscription(tx, &news.stripe_subscription_id, stripe_event_id).await?;
    let known = sub.clone();
    merge(&mut sub, news);
    compact_history(
        &mut sub.status_history.0,
        Utc::now().timestamp() - HISTORY_KEPT_SECS,
    );
    if sub.user_id.is_some() && sub.region.is_none() {
        sub.region = Some(rules.default_region.to_string());
    }
    let mut applied = Applied {
        subscription_id: sub.id,
        ..Applied::default()
    };
    // News no newer than what the subscription holds (an event applied again by an operator,
    // an old checkout) changes nothing: its nodes are not made to follow it again, so what
    // was done to them since (an operator's suspend) stands.
    if sub == known {
        return Ok(applied);
    }
    let by = format!("billing ({})", news.stripe_subscription_id);
    match (
        nodes_follow(&sub, rules.past_due_grace),
        &sub.user_id,
        &sub.plan,
    ) {
        (NodesFollow::TearDown, _, _) => {
            sub.status = "ended".into();
            applied.removed = store::end_subscription_nodes(tx, sub.id).await?;
        }
        // Nothing to run, or not yet known whose it is or what it buys: wait for more news.
        (NodesFollow::Nothing, _, _) | (_, None, _) | (_, _, None) => {}
        (follow, Some(_), Some(plan_name)) => {
            let plan = rules
                .plans
                .0
                .get(plan_name)
                .ok_or_else(|| BillingError::UnknownPlan(plan_name.clone()))?;
            // The subscription is locked (above) and written back once, at the end: its
            // nodes are locked here once, for both their count and their plan.
            let nodes = store::lock_counted_nodes(tx, sub.id).await?;
            let mut kept = nodes.as_slice();
            let entitled = plan.nodes as i32 * sub.quantity.max(0);
            if sub.nodes_entitled != Some(entitled) {
                // The plan is a ceiling that the checkout (or a plan change) fills.
                let count = entitled.max(0) as u32;
                let scaled = requests::set_locked_node_count(
                    tx,
                    &sub,
                    &nodes,
                    count,
                    NodeShape {
                        instance_type: Some(&plan.instance_type),
                        volume_gb: Some(plan.volume_gb),
                    },
                    rules.node_domain,
                    &by,
                )
                .await?;
                applied.added = scaled.added;
                applied.removed = scaled.removed;
                sub.nodes_entitled = Some(entitled);
                // The oldest stay; those torn down are past `count`, those added have the
                // plan's shape already.
                kept = &nodes[..nodes.len().min(count as usize)];
            }
            requests::follow_plan(tx, kept, &plan.instance_type, plan.volume_gb, &by).await?;
            let (desired, suspend_at) = match follow {
                NodesFollow::Suspend => (Desired::Suspended, None),
                NodesFollow::Run { suspend_at } => (Desired::Running, suspend_at),
                NodesFollow::Nothing | NodesFollow::TearDown => (Desired::Running, None),
            };
            let why = format!(
                "{by}: {}",
                sub.stripe_status.as_deref().unwrap_or("unknown")
            );
            store::follow_billing(tx, sub.id, desired, suspend_at, &why).await?;
        }
    }
    store::save_subscription(tx, &sub).await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> SubscriptionState {
        SubscriptionState {
            id: Uuid::nil(),
            stripe_subscription_id: "sub_1".into(),
            stripe_customer_id: None,
            user_id: None,
            plan: None,
            region: None,
            status: "active".into(),
            stripe_status: None,
            status_at: None,
            status_rank: None,
            items_at: None,
            quantity: 1,
            price_id: None,
            past_due_since: None,
            cancel_at: None,
            current_period_start: None,
            current_period_end: None,
            nodes_entitled: None,
            status_history: sqlx::types::Json(Vec::new()),
        }
    }

    fn news(at: i64, status: Option<StripeStatus>, plan: Option<(&str, i32)>) -> SubscriptionNews {
        SubscriptionNews {
            payment: None,
            stripe_subscription_id: "sub_1".into(),
            stripe_customer_id: Some("cus_1".into()),
            at,
            binding: None,
            status,
            items: plan.map(|(plan, quantity)| Items {
                plan: plan.into(),
                quantity,
                price_id: None,
            }),
            cancel_at: None,
            current_period_start: None,
            current_period_end: None,
        }
    }

    fn checkout() -> SubscriptionNews {
        let mut n = news(0, Some(StripeStatus::Active), Some(("pro", 1)));
        n.binding = Some(Binding {
            user_id: "user-1".into(),
            region: None,
        });
        n
    }

    fn permutations(items: &[SubscriptionNews]) -> Vec<Vec<SubscriptionNews>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                all.push(tail);
            }
        }
        all
    }

    /// Every order of `events`, each delivered twice, ends in the same snapshot.
    fn same_end_in_every_order(events: &[SubscriptionNews]) -> SubscriptionState {
        let mut first: Option<SubscriptionState> = None;
        for order in permutations(events) {
            let mut sub = blank();
            for event in order.iter().chain(order.iter()) {
                merge(&mut sub, event);
            }
            let end = format!("{sub:?}");
            match &first {
                None => first = Some(sub),
                Some(f) => assert_eq!(format!("{f:?}"), end, "order {order:#?}"),
            }
        }
        first.unwrap_or_else(blank)
    }

    #[test]
    fn every_order_of_a_subscriptions_events_ends_the_same() {
        use StripeStatus::*;
        let created = news(100, Some(Active), Some(("pro", 1)));
        let mut paid = news(101, Some(Active), None);
        paid.stripe_customer_id = None;
        let updated = news(102, Some(Active), Some(("pro", 1)));
        let base = vec![checkout(), created, paid, updated];
        let end = same_end_in_every_order(&base);
        assert_eq!(end.stripe_status.as_deref(), Some("active"));
        assert_eq!(end.user_id.as_deref(), Some("user-1"));
        assert_eq!(end.plan.as_deref(), Some("pro"));

        let mut lapsed = base.clone();
        lapsed.push(news(103, Some(PastDue), Some(("pro", 1))));
        lapsed.push(news(104, Some(Unpaid), Some(("pro", 1))));
        let end = same_end_in_every_order(&lapsed);
        assert_eq!(end.stripe_status.as_deref(), Some("unpaid"));
        assert_eq!(end.past_due_since, None);

        let mut back = lapsed.clone();
        back.push(news(105, Some(Active), None));
        back.push(news(106, Some(Active), Some(("pro", 1))));
        assert_eq!(
            same_end_in_every_order(&back).stripe_status.as_deref(),
            Some("active")
        );

        let mut ended = base.clone();
        ended.push(news(103, Some(Canceled), Some(("pro", 1))));
        assert_eq!(
            same_end_in_every_order(&ended).stripe_status.as_deref(),
            Some("canceled")
        );
    }

    #[test]
    fn ties_and_late_snapshots_never_undo_a_newer_one() {
        use StripeStatus::*;
        // A late `active` never overwrites a newer `canceled`; of the same second, the end wins.
        let end = same_end_in_every_order(&[
            news(200, Some(Canceled), None),
            news(199, Some(Active), None),
            news(200, Some(Active), None),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("canceled"));
        // Past due since the first past-due snapshot, kept while it stays past due.
        let end = same_end_in_every_order(&[
            news(300, Some(PastDue), None),
            news(305, Some(PastDue), None),
        ]);
        assert_eq!(end.past_due_since, DateTime::from_timestamp(300, 0));
        // ... and counted again from a new lapse after a payment.
        let end = same_end_in_every_order(&[
            news(300, Some(PastDue), None),
            news(302, Some(Active), None),
            news(305, Some(PastDue), None),
            news(306, Some(PastDue), None),
        ]);
        assert_eq!(end.past_due_since, DateTime::from_timestamp(305, 0));
        // Items of the same second: one deterministic winner.
        let end = same_end_in_every_order(&[
            news(400, None, Some(("pro", 1))),
            news(400, None, Some(("team", 1))),
        ]);
        assert_eq!(end.plan.as_deref(), Some("team"));
    }

    fn invoice(at: i64, payment: Payment) -> SubscriptionNews {
        let mut n = news(at, None, None);
        n.payment = Some(payment);
        n
    }

    #[test]
    fn an_invoice_never_revives_an_ended_subscription() {
        use StripeStatus::*;
        // The final invoice of a canceled subscription is paid after the end.
        let end = same_end_in_every_order(&[
            news(100, Some(Active), Some(("pro", 1))),
            news(200, Some(Canceled), None),
            invoice(300, Payment::Paid),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("canceled"));
        // Nor an expired first payment, whatever arrives later.
        let end = same_end_in_every_order(&[
            news(100, Some(Incomplete), Some(("pro", 1))),
            news(200, Some(IncompleteExpired), None),
            invoice(300, Payment::Paid),
            news(400, Some(Active), None),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("incomplete_expired"));
    }

    #[test]
    fn an_invoice_changes_what_we_know_of_payment_only() {
        use StripeStatus::*;
        // A failed first payment leaves an incomplete subscription incomplete (runs nothing).
        let end = same_end_in_every_order(&[
            news(100, Some(Incomplete), Some(("pro", 1))),
            invoice(101, Payment::Failed),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("incomplete"));
        assert_eq!(nodes_follow(&end, Duration::ZERO), NodesFollow::Nothing);
        // Nor does a paid invoice start it: the subscription's own `active` does.
        let end = same_end_in_every_order(&[
            news(100, Some(Incomplete), Some(("pro", 1))),
            invoice(101, Payment::Paid),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("incomplete"));
        // A renewal that fails starts a lapse, counted from the failure; paying ends it.
        let end = same_end_in_every_order(&[
            news(100, Some(Active), Some(("pro", 1))),
            invoice(200, Payment::Failed),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("past_due"));
        assert_eq!(end.past_due_since, DateTime::from_timestamp(200, 0));
        let end = same_end_in_every_order(&[
            news(100, Some(Active), Some(("pro", 1))),
            invoice(200, Payment::Failed),
            news(201, Some(PastDue), None),
            invoice(300, Payment::Paid),
        ]);
        assert_eq!(end.stripe_status.as_deref(), Some("active"));
        assert_eq!(end.past_due_since, None);
    }

    #[test]
    fn an_old_history_folds_into_the_status_it_left_and_says_the_same() {
        use StripeStatus::*;
        let mut sub = blank();
        for n in [
            news(100, Some(Active), Some(("pro", 1))),
            invoice(200, Payment::Failed),
            news(300, Some(PastDue), None),
            news(400, Some(PastDue), None),
            news(10_000, Some(PastDue), None),
        ] {
            merge(&mut sub, &n);
        }
        let mut folded = sub.clone();
        compact_history(&mut folded.status_history.0, 5_000);
        assert_eq!(
            folded.status_history.0,
            vec![
                (200, PastDue.rank(), "past_due".to_string()),
                (10_000, PastDue.rank(), "past_due".to_string()),
            ]
        );
        // Whatever comes next reads the same off both.
        for next in [
            invoice(20_000, Payment::Paid),
            news(20_000, Some(Unpaid), None),
            news(20_000, Some(Canceled), None),
        ] {
            let (mut full, mut short) = (sub.clone(), folded.clone());
            merge(&mut full, &next);
            merge(&mut short, &next);
            assert_eq!(full.stripe_status, short.stripe_status, "{next:?}");
            assert_eq!(full.past_due_since, short.past_due_since, "{next:?}");
        }
        let mut short = folded.clone();
        merge(&mut short, &news(20_000, Some(PastDue), None));
        assert_eq!(
            short.past_due_since,
            DateTime::from_timestamp(200, 0),
            "the lapse's start"
        );
        // Nothing to fold: nothing changes.
        let mut young = sub.status_history.0.clone();
        compact_history(&mut young, 50);
        assert_eq!(young, sub.status_history.0);
    }

    #[test]
    fn the_status_decides_what_the_nodes_do() {
        let grace = Duration::from_secs(60);
        let with = |status: &str| {
            let mut sub = blank();
            sub.stripe_status = Some(status.into());
            sub.past_due_since = DateTime::from_timestamp(1_000, 0);
            nodes_follow(&sub, grace)
        };
        assert_eq!(with("active"), NodesFollow::Run { suspend_at: None });
        assert_eq!(with("trialing"), NodesFollow::Run { suspend_at: None });
        assert_eq!(
            with("past_due"),
            NodesFollow::Run {
                suspend_at: DateTime::from_timestamp(1_060, 0)
            }
        );
        assert_eq!(with("unpaid"), NodesFollow::Suspend);
        assert_eq!(with("paused"), NodesFollow::Suspend);
        assert_eq!(with("incomplete"), NodesFollow::Nothing);
        assert_eq!(with("incomplete_expired"), NodesFollow::TearDown);
        assert_eq!(with("canceled"), NodesFollow::TearDown);
    }
}
