//! The app's view of its billing: `GET /api/v1/billing` (its subscriptions and what they
//! entitle) and `GET /api/v1/usage` (node-hours).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, TimeDelta, Utc};
use hive_jobs::{store, usage};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

/// One subscription as the app sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Stripe's id (`sub_...`).
    pub id: String,
    pub plan: Option<String>,
    /// Stripe's status (`active`, `past_due`, ...).
    pub status: Option<String>,
    pub quantity: i32,
    /// Nodes it has (not being torn down), and how many its plan entitles.
    pub nodes: i64,
    pub nodes_entitled: Option<i32>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    /// When Stripe will end it (`cancel_at_period_end` or a set end); nothing changes before.
    pub cancel_at: Option<DateTime<Utc>>,
    pub past_due_since: Option<DateTime<Utc>>,
    /// When its nodes will be suspended unless it is paid.
    pub suspends_at: Option<DateTime<Utc>>,
}

/// The user's subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct BillingView {
    pub subscriptions: Vec<SubscriptionView>,
}

/// The user's subscriptions and what they entitle.
#[utoipa::path(
    get,
    path = "/api/v1/billing",
    tag = "billing",
    responses((status = 200, description = "The user's subscriptions", body = BillingView))
)]
pub async fn billing(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<BillingView>, ApiError> {
    let grace = TimeDelta::from_std(state.config.past_due_grace).unwrap_or_default();
    let subscriptions = store::user_subscriptions(&mut *state.conn().await?, &user)
        .await?
        .into_iter()
        .map(|(sub, nodes)| SubscriptionView {
            suspends_at: sub.past_due_since.map(|since| since + grace),
            id: sub.stripe_subscription_id,
            plan: sub.plan,
            status: sub.stripe_status,
            quantity: sub.quantity,
            nodes,
            nodes_entitled: sub.nodes_entitled,
            current_period_start: sub.current_period_start,
            current_period_end: sub.current_period_end,
            cancel_at: sub.cancel_at,
            past_due_since: sub.past_due_since,
        })
        .collect();
    Ok(Json(BillingView { subscriptions }))
}

/// Read as text, so that a malformed time is our JSON 400, not the extractor's.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start of the window (RFC 3339); by default the current billing period's start.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub from: Option<String>,
    /// End of the window (RFC 3339); by default now.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub to: Option<String>,
}

fn time(name: &str, raw: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|r| {
        DateTime::parse_from_rfc3339(r)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::BadRequest(format!("`{name}` is not an RFC 3339 time")))
    })
    .transpose()
}

/// The time one node was `ready` in the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeUsage {
    pub node_id: Uuid,
    pub hours: f64,
}

/// Node-hours: the time each node was `ready` in the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub nodes: Vec<NodeUsage>,
    pub total_hours: f64,
}

/// `from`..`to` (RFC 3339); by default the current billing period of the user's newest
/// subscription (else the last 30 days) until now.
#[utoipa::path(
    get,
    path = "/api/v1/usage",
    tag = "billing",
    params(UsageQuery),
    responses(
        (status = 200, description = "Node-hours in the window", body = UsageView),
        (status = 400, description = "A malformed time, or `from` not before `to`", body = ErrorBody),
    )
)]
pub async fn usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageView>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let now = Utc::now();
    let to = time("to", query.to.as_deref())?.unwrap_or(now);
    let from = match time("from", query.from.as_deref())? {
        Some(from) => from,
        None => store::user_subscriptions(&mut *state.conn().await?, &user)
            .await?
            .into_iter()
            .find_map(|(sub, _)| sub.current_period_start)
            .unwrap_or(to - TimeDelta::days(30)),
    };
    // A window that ends before it begins holds no time.
    let to = to.max(from);
    let moves = if from == to {
        Vec::new()
    } else {
        store::user_transitions(&mut *state.conn().await?, &user, from, to).await?
    };
    let used = usage::ready_time(&moves, from, to);
    let hours = |d: TimeDelta| d.num_milliseconds() as f64 / 3_600_000.0;
    let total = used.values().fold(TimeDelta::zero(), |a, b| a + *b);
    Ok(Json(UsageView {
        from,
        to,
        nodes: used
            .into_iter()
            .map(|(node_id, d)| NodeUsage {
                node_id,
                hours: hours(d),
            })
            .collect(),
        total_hours: hours(total),
    }))
}
