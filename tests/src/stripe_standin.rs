//! A stateful stand-in for the part of Stripe's API the api calls (Checkout Sessions, Billing
//! Portal sessions), speaking its wire shapes: form-encoded requests with bracketed keys,
//! Stripe's own example objects (`shared/stripe/fixtures3.json`) as answers, `{"error": {...}}`
//! for failures, and `Idempotency-Key` honoured (the same key answers the first result again),
//! so that async-stripe's real client is what the tests drive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use serde_json::{json, Value};

use crate::stripe_events::Fixtures;

/// One request the stand-in received: its path, form fields and idempotency key.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub form: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

#[derive(Default)]
struct StripeState {
    prices: BTreeSet<String>,
    customers: BTreeSet<String>,
    /// Answers by idempotency key.
    answered: BTreeMap<String, (StatusCode, Value)>,
    received: Vec<Received>,
    /// The next request fails with this status and message, once.
    fail_next: Option<(StatusCode, String)>,
    /// The next checkout is answered only after this long, once (Stripe being slow).
    delay_next: Option<std::time::Duration>,
}

#[derive(Clone)]
pub struct StripeStandIn {
    secret_key: Arc<String>,
    fixtures: Arc<Value>,
    base: Arc<Mutex<String>>,
    state: Arc<Mutex<StripeState>>,
}

impl StripeStandIn {
    pub fn new(secret_key: &str) -> anyhow::Result<Self> {
        let fixtures = Fixtures::load()?;
        let objects = json!({
            "checkout.session": fixtures.object("checkout.session")?,
            "billing_portal.session": fixtures.object("billing_portal.session")?,
        });
        Ok(Self {
            secret_key: Arc::new(secret_key.to_string()),
            fixtures: Arc::new(objects),
            base: Arc::default(),
            state: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StripeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A price that exists in the account.
    pub fn add_price(&self, id: &str) {
        self.lock().prices.insert(id.to_string());
    }

    /// A customer that exists in the account.
    pub fn add_customer(&self, id: &str) {
        self.lock().customers.insert(id.to_string());
    }

    /// The next request is answered with `status` and Stripe's error shape, once.
    pub fn fail_next(&self, status: u16, message: &str) {
        self.lock().fail_next = Some((
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message.to_string(),
        ));
    }

    /// The next checkout session is answered only after `delay`, once.
    pub fn delay_next(&self, delay: std::time::Duration) {
        self.lock().delay_next = Some(delay);
    }

    /// Every request received, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/checkout/sessions", post(create_checkout_session))
            .route("/v1/billing_portal/sessions", post(create_portal_session))
            .route("/v1/balance", axum::routing::get(retrieve_balance))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "Unrecognized request URL",
                )
            })
            .with_state(self)
    }

    /// Serves on `addr` (port 0 picks one); returns the bound address and the server task.
    pub async fn serve(
        self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = format!("http://{bound}");
        let app = self.router();
        let handle = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "stripe stand-in stopped");
            }
        });
        Ok((bound, handle))
    }

    /// Authenticates, records, honours the idempotency key and any armed failure, then answers
    /// with `make`'s result.
    fn handle(
        &self,
        path: &str,
        headers: &HeaderMap,
        form: Vec<(String, String)>,
        make: impl FnOnce(&Self, &BTreeMap<String, String>) -> (StatusCode, Value),
    ) -> Response {
        let authorized = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", self.secret_key));
        if !authorized {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Invalid API Key provided",
            );
        }
        let form: BTreeMap<String, String> = form.into_iter().collect();
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        {
            let mut state = self.lock();
            state.received.push(Received {
                path: path.to_string(),
                form: form.clone(),
                idempotency_key: key.clone(),
            });
            if let Some((status, message)) = state.fail_next.take() {
                return error(status, "api_error", &message);
            }
            if let Some((status, body)) = key.as_ref().and_then(|k| state.answered.get(k)) {
                return (*status, Json(body.clone())).into_response();
            }
        }
        let (status, body) = make(self, &form);
        if let Some(key) = key {
            self.lock().answered.insert(key, (status, body.clone()));
        }
        (status, Json(body)).into_response()
    }

    fn base(&self) -> String {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Stripe's error answer.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(error_body(kind, message))).into_response()
}

fn error_body(kind: &str, message: &str) -> Value {
    json!({ "error": { "type": kind, "message": message } })
}

/// The `prefix[...]` fields of a form as a map (`metadata[plan]` → `plan`).
fn sub_map(form: &BTreeMap<String, String>, prefix: &str) -> Value {
    let mut map = serde_json::Map::new();
    for (k, v) in form {
        if let Some(key) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('[')) {
            if let Some(key) = key.strip_suffix(']').filter(|k| !k.contains('[')) {
                map.insert(key.to_string(), json!(v));
            }
        }
    }
    Value::Object(map)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..24]
    )
}

async fn create_checkout_session(
    State(standin): State<StripeStandIn>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let delay = standin.lock().delay_next.take();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    standin.handle("/v1/checkout/sessions", &headers, form, |standin, form| {
        let invalid = |m: String| {
            (
                StatusCode::BAD_REQUEST,
                error_body("invalid_request_error", &m),
            )
        };
        let price = form
            .get("line_items[0][price]")
            .cloned()
            .unwrap_or_default();
        if !standin.lock().prices.contains(&price) {
            return invalid(format!("No such price: '{price}'"));
        }
        for required in ["mode", "success_url"] {
            if !form.contains_key(required) {
                return invalid(format!("Missing required param: {required}."));
            }
        }
        let id = unique("cs_test");
        let mut session = standin.fixtures["checkout.session"].clone();
        session["id"] = json!(id);
        session["object"] = json!("checkout.session");
        session["mode"] = json!(form["mode"]);
        session["status"] = json!("open");
        session["payment_status"] = json!("unpaid");
        session["client_reference_id"] = json!(form.get("client_reference_id"));
        session["customer"] = json!(form.get("customer"));
        session["metadata"] = sub_map(form, "metadata");
        session["success_url"] = json!(form.get("success_url"));
        session["cancel_url"] = json!(form.get("cancel_url"));
        session["subscription"] = Value::Null;
        session["url"] = json!(format!("{}/c/pay/{id}", standin.base()));
        (StatusCode::OK, session)
    })
}

/// The account's balance, as Stripe shapes it (what `hivectl doctor` reads to check the key).
async fn retrieve_balance(State(standin): State<StripeStandIn>, headers: HeaderMap) -> Response {
    standin.handle("/v1/balance", &headers, Vec::new(), |_, _| {
        (
            StatusCode::OK,
            serde_json::json!({
                "object": "balance",
                "livemode": false,
                "available": [{ "amount": 0, "currency": "usd", "source_types": { "card": 0 } }],
                "pending": [{ "amount": 0, "currency": "usd", "source_types": { "card": 0 } }],
            }),
        )
    })
}

async fn create_portal_session(
    State(standin): State<StripeStandIn>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    standin.handle(
        "/v1/billing_portal/sessions",
        &headers,
        form,
        |standin, form| {
            let customer = form.get("customer").cloned().unwrap_or_default();
            if !standin.lock().customers.contains(&customer) {
                return (
                    StatusCode::BAD_REQUEST,
                    error_body(
                        "invalid_request_error",
                        &format!("No such customer: '{customer}'"),
                    ),
                );
            }
            let id = unique("bps");
            let mut session = standin.fixtures["billing_portal.session"].clone();
            session["id"] = json!(id);
            session["customer"] = json!(customer);
            session["flow"] = Value::Null;
            session["return_url"] = json!(form.get("return_url"));
            session["url"] = json!(format!("{}/p/session/{id}", standin.base()));
            (StatusCode::OK, session)
        },
    )
}
