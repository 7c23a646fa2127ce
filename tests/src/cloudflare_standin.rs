//! A stateful stand-in for the part of Cloudflare's API we use, speaking its wire shapes
//! (`/client/v4/...`, the `{success, errors, messages, result}` envelope), so that a lookup
//! before a create really finds what was created.
//!
//! A real tunnel turns `healthy` when cloudflared on the node connects. Nothing runs on a moto
//! instance, so the stand-in plays the node: a tunnel whose ingress has been configured reports
//! one connection and `healthy` after `connect_delay`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Tunnel {
    pub id: Uuid,
    pub account: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub config_src: String,
    pub token: String,
    pub config: Option<Value>,
    pub configured_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct DnsRecord {
    pub id: String,
    pub zone: String,
    pub record_type: String,
    pub name: String,
    pub content: String,
    pub proxied: bool,
    pub ttl: u32,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Default)]
pub struct Store {
    pub tunnels: BTreeMap<Uuid, Tunnel>,
    pub dns: BTreeMap<String, DnsRecord>,
}

/// How an injected fault fails a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// Answer 500 with Cloudflare's error envelope; nothing happens.
    ServerError,
    /// Answer 429 (rate limited); nothing happens.
    Throttle,
    /// Never answer (the client's timeout fires); nothing happens.
    Hang,
    /// Do the request, then break the connection before the answer is complete: the change
    /// happened, the caller does not know.
    DropAfterSuccess,
}

/// Fails the next `times` requests whose method and path match.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Fault {
    /// `GET`, `POST`, ...; any when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// A part of the path after `/client/v4/`, e.g. `cfd_tunnel` or `/token`.
    pub path_contains: String,
    pub mode: FaultMode,
    pub times: u32,
}

/// Cloudflare's rate limit, played: at most `calls` API calls in any `per`; more answer 429.
#[derive(Debug, Default)]
struct RateWindow {
    limit: Option<(u32, Duration)>,
    recent: std::collections::VecDeque<std::time::Instant>,
    /// Every API call that arrived, and those answered 429 for the limit.
    calls: u64,
    throttled: u64,
}

#[derive(Clone)]
pub struct StandIn {
    pub store: Arc<Mutex<Store>>,
    faults: Arc<Mutex<Vec<Fault>>>,
    window: Arc<Mutex<RateWindow>>,
    api_token: Arc<String>,
    connect_delay: Duration,
}

type Answer = (StatusCode, Json<Value>);

fn ok(result: Value) -> Answer {
    (
        StatusCode::OK,
        Json(json!({ "success": true, "errors": [], "messages": [], "result": result })),
    )
}

/// One page of a list, as Cloudflare pages them (`page` from 1, `per_page` with the endpoint's
/// default), with its `result_info`.
fn page_of(items: Vec<Value>, page: Option<u32>, per_page: Option<u32>, default: u32) -> Answer {
    let per_page = per_page.unwrap_or(default).clamp(1, 5000) as usize;
    let page = page.unwrap_or(1).max(1) as usize;
    let total = items.len();
    let shown: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let info = json!({
        "page": page,
        "per_page": per_page,
        "count": shown.len(),
        "total_count": total,
        "total_pages": total.div_ceil(per_page),
    });
    (
        StatusCode::OK,
        Json(json!({
            "success": true, "errors": [], "messages": [],
            "result": shown, "result_info": info
        })),
    )
}

fn fail(status: StatusCode, code: u32, message: &str) -> Answer {
    (
        status,
        Json(json!({
            "success": false,
            "errors": [{ "code": code, "message": message }],
            "messages": [],
            "result": null
        })),
    )
}

impl StandIn {
    pub fn new(api_token: &str, connect_delay: Duration) -> Self {
        Self {
            store: Arc::default(),
            faults: Arc::default(),
            window: Arc::default(),
            api_token: Arc::new(api_token.to_string()),
            connect_delay,
        }
    }

    /// From now on, at most `calls` API calls in any `per`; the rest answer 429.
    pub fn limit_rate(&self, calls: u32, per: Duration) {
        self.window_lock().limit = Some((calls, per));
    }

    /// API calls that arrived so far, and how many of them were answered 429 for the limit.
    pub fn call_counts(&self) -> (u64, u64) {
        let w = self.window_lock();
        (w.calls, w.throttled)
    }

    fn window_lock(&self) -> std::sync::MutexGuard<'_, RateWindow> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the call; whether the rate limit refuses it.
    fn over_limit(&self) -> bool {
        let mut w = self.window_lock();
        w.calls += 1;
        let Some((calls, per)) = w.limit else {
            return false;
        };
        let now = std::time::Instant::now();
        while w
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= per)
        {
            w.recent.pop_front();
        }
        if w.recent.len() >= calls as usize {
            w.throttled += 1;
            return true;
        }
        w.recent.push_back(now);
        false
    }

    /// Adds a fault for the next matching requests.
    pub fn inject(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// Disarms every fault: an outage ends.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Takes one use of the first fault matching the request, if any.
    fn take_fault(&self, method: &str, path: &str) -> Option<FaultMode> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let i = faults.iter().position(|f| {
            f.times > 0
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && path.contains(&f.path_contains)
        })?;
        faults[i].times -= 1;
        let mode = faults[i].mode;
        if faults[i].times == 0 {
            faults.remove(i);
        }
        Some(mode)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A poisoned lock only means a handler panicked; the data is still usable for a stand-in.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn router(self) -> Router {
        let api = Router::new()
            .route(
                "/accounts/{account}/cfd_tunnel",
                get(list_tunnels).post(create_tunnel),
            )
            .route(
                "/accounts/{account}/cfd_tunnel/{id}",
                get(get_tunnel).delete(delete_tunnel),
            )
            .route(
                "/accounts/{account}/cfd_tunnel/{id}/token",
                get(tunnel_token),
            )
            .route(
                "/accounts/{account}/cfd_tunnel/{id}/connections",
                axum::routing::delete(delete_connections),
            )
            .route(
                "/accounts/{account}/cfd_tunnel/{id}/configurations",
                get(get_configuration).put(put_configuration),
            )
            .route("/zones/{zone}/dns_records", get(list_dns).post(create_dns))
            .route(
                "/zones/{zone}/dns_records/{id}",
                axum::routing::delete(delete_dns).put(update_dns),
            )
            .layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .layer(middleware::from_fn_with_state(self.clone(), inject_faults));
        Router::new()
            .nest("/client/v4", api)
            .route("/__standin/state", get(dump_state))
            .route("/__standin/faults", axum::routing::post(add_fault))
            .with_state(self)
    }

    /// Serves on `addr` (port 0 picks one); returns the bound address and the server task.
    pub async fn serve(
        self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        crate::serve_router(self.router(), addr, "stand-in").await
    }

    fn tunnel_json(&self, t: &Tunnel) -> Value {
        let healthy = self.is_connected(t);
        let connections = if healthy {
            json!([{
                "colo_name": "ams01",
                "uuid": t.id,
                "id": t.id,
                "is_pending_reconnect": false,
                "origin_ip": "10.0.0.10",
                "opened_at": t.configured_at,
                "client_id": t.id,
                "client_version": "2025.4.0"
            }])
        } else {
            json!([])
        };
        json!({
            "id": t.id,
            "account_tag": t.account,
            "created_at": t.created_at,
            "deleted_at": t.deleted_at,
            "name": t.name,
            "connections": connections,
            "conns_active_at": if healthy { json!(t.configured_at) } else { Value::Null },
            "conns_inactive_at": Value::Null,
            "tun_type": "cfd_tunnel",
            "metadata": {},
            "status": if t.deleted_at.is_some() { "deleted" } else if healthy { "healthy" } else { "inactive" },
            "remote_config": t.config_src == "cloudflare"
        })
    }

    fn is_connected(&self, t: &Tunnel) -> bool {
        match (t.deleted_at, t.configured_at) {
            (None, Some(at)) => {
                Utc::now() - at
                    >= chrono::TimeDelta::from_std(self.connect_delay).unwrap_or_default()
            }
            _ => false,
        }
    }
}

fn dns_json(r: &DnsRecord) -> Value {
    json!({
        "id": r.id,
        "zone_id": r.zone,
        "zone_name": "example.com",
        "name": r.name,
        "type": r.record_type,
        "content": r.content,
        "proxiable": true,
        "proxied": r.proxied,
        "ttl": r.ttl,
        "locked": false,
        "meta": { "auto_added": false, "source": "primary" },
        "comment": null,
        "tags": [],
        "created_on": r.created_on,
        "modified_on": r.created_on
    })
}

async fn authenticate(State(s): State<StandIn>, request: Request, next: Next) -> Response {
    let expected = format!("Bearer {}", s.api_token);
    let given = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return fail(StatusCode::FORBIDDEN, 10000, "Authentication error").into_response();
    }
    next.run(request).await
}

async fn inject_faults(State(s): State<StandIn>, request: Request, next: Next) -> Response {
    if s.over_limit() {
        let mut resp = fail(StatusCode::TOO_MANY_REQUESTS, 10000, "Rate limited").into_response();
        resp.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("10"));
        return resp;
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    match s.take_fault(&method, &path) {
        None => next.run(request).await,
        Some(FaultMode::ServerError) => fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            10001,
            "injected: internal error",
        )
        .into_response(),
        Some(FaultMode::Throttle) => {
            let mut resp = fail(
                StatusCode::TOO_MANY_REQUESTS,
                10013,
                "injected: rate limited",
            )
            .into_response();
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            resp
        }
        Some(FaultMode::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            fail(StatusCode::GATEWAY_TIMEOUT, 10002, "injected: hang").into_response()
        }
        Some(FaultMode::DropAfterSuccess) => {
            let done = next.run(request).await;
            // The change is made; the answer breaks off before it is complete.
            let (parts, _) = done.into_parts();
            let broken = futures_util::stream::iter(vec![
                Ok(axum::body::Bytes::from_static(b"{\"success\": tr")),
                Err(std::io::Error::other("injected: connection dropped")),
            ]);
            Response::from_parts(parts, axum::body::Body::from_stream(broken))
        }
    }
}

async fn add_fault(State(s): State<StandIn>, Json(fault): Json<Fault>) -> StatusCode {
    s.inject(fault);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct TunnelQuery {
    name: Option<String>,
    include_prefix: Option<String>,
    is_deleted: Option<bool>,
    page: Option<u32>,
    per_page: Option<u32>,
}

async fn list_tunnels(
    State(s): State<StandIn>,
    Path(account): Path<String>,
    Query(q): Query<TunnelQuery>,
) -> Answer {
    let store = s.lock();
    // Oldest first, as Cloudflare lists them: something made last is on the last page.
    let mut tunnels: Vec<&Tunnel> = store.tunnels.values().collect();
    tunnels.sort_by_key(|t| (t.created_at, t.id));
    let found: Vec<Value> = tunnels
        .into_iter()
        .filter(|t| t.account == account)
        .filter(|t| q.name.as_ref().is_none_or(|n| &t.name == n))
        .filter(|t| {
            q.include_prefix
                .as_ref()
                .is_none_or(|p| t.name.starts_with(p.as_str()))
        })
        .filter(|t| q.is_deleted.is_none_or(|d| d == t.deleted_at.is_some()))
        .map(|t| s.tunnel_json(t))
        .collect();
    page_of(found, q.page, q.per_page, 20)
}

#[derive(Debug, Deserialize)]
struct CreateTunnel {
    name: String,
    #[serde(default)]
    config_src: Option<String>,
    #[serde(default)]
    tunnel_secret: Option<String>,
}

async fn create_tunnel(
    State(s): State<StandIn>,
    Path(account): Path<String>,
    body: Option<Json<CreateTunnel>>,
) -> Answer {
    let Some(Json(body)) = body else {
        return fail(StatusCode::BAD_REQUEST, 1001, "Invalid request body");
    };
    if body.name.is_empty() || body.name.len() > 255 {
        return fail(StatusCode::BAD_REQUEST, 1001, "Invalid tunnel name");
    }
    let secret_ok = body.tunnel_secret.as_deref().is_none_or(|s| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .is_ok_and(|b| b.len() >= 32)
    });
    if !secret_ok {
        return fail(
            StatusCode::BAD_REQUEST,
            1001,
            "tunnel_secret must be at least 32 bytes, base64",
        );
    }
    let mut store = s.lock();
    if store
        .tunnels
        .values()
        .any(|t| t.account == account && t.name == body.name && t.deleted_at.is_none())
    {
        return fail(
            StatusCode::CONFLICT,
            1013,
            "You already have a tunnel with this name.",
        );
    }
    let id = Uuid::new_v4();
    let token_json = json!({ "a": account, "t": id, "s": base64::engine::general_purpose::STANDARD.encode(Uuid::new_v4().as_bytes()) });
    let tunnel = Tunnel {
        id,
        account,
        name: body.name,
        created_at: Utc::now(),
        deleted_at: None,
        config_src: body.config_src.unwrap_or_else(|| "local".into()),
        token: base64::engine::general_purpose::STANDARD.encode(token_json.to_string()),
        config: None,
        configured_at: None,
    };
    let answer = s.tunnel_json(&tunnel);
    store.tunnels.insert(id, tunnel);
    ok(answer)
}

fn find_tunnel<'a>(store: &'a mut Store, account: &str, id: &str) -> Option<&'a mut Tunnel> {
    let id = Uuid::parse_str(id).ok()?;
    store.tunnels.get_mut(&id).filter(|t| t.account == account)
}

fn tunnel_not_found() -> Answer {
    fail(StatusCode::NOT_FOUND, 1002, "Tunnel not found")
}

async fn get_tunnel(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
) -> Answer {
    let mut store = s.lock();
    match find_tunnel(&mut store, &account, &id) {
        Some(t) => {
            let t = t.clone();
            ok(s.tunnel_json(&t))
        }
        None => tunnel_not_found(),
    }
}

/// Cloudflare refuses to delete a tunnel that has active connections (the API's delete of a
/// `cfd_tunnel` takes no `cascade` any more): its connections are cleaned up first
/// ([`delete_connections`]), once whatever ran cloudflared is gone.
async fn delete_tunnel(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
) -> Answer {
    let mut store = s.lock();
    let connected = find_tunnel(&mut store, &account, &id).is_some_and(|t| s.is_connected(t));
    if connected {
        return fail(
            StatusCode::BAD_REQUEST,
            1022,
            "Cannot delete tunnel because it has active connections. Clean up connections first.",
        );
    }
    match find_tunnel(&mut store, &account, &id) {
        Some(t) if t.deleted_at.is_none() => {
            t.deleted_at = Some(Utc::now());
            let t = t.clone();
            ok(s.tunnel_json(&t))
        }
        _ => tunnel_not_found(),
    }
}

/// Removes the tunnel's connections (`DELETE .../cfd_tunnel/{id}/connections`): the stand-in
/// plays the node, which reconnects only when the tunnel is configured again.
async fn delete_connections(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
) -> Answer {
    let mut store = s.lock();
    match find_tunnel(&mut store, &account, &id) {
        Some(t) if t.deleted_at.is_none() => {
            t.configured_at = None;
            ok(Value::Null)
        }
        _ => tunnel_not_found(),
    }
}

async fn tunnel_token(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
) -> Answer {
    let mut store = s.lock();
    match find_tunnel(&mut store, &account, &id) {
        Some(t) if t.deleted_at.is_none() => ok(Value::String(t.token.clone())),
        _ => tunnel_not_found(),
    }
}

fn configuration_json(t: &Tunnel) -> Value {
    json!({
        "tunnel_id": t.id,
        "version": if t.config.is_some() { 1 } else { 0 },
        "config": t.config,
        "source": t.config_src,
        "created_at": t.configured_at
    })
}

async fn get_configuration(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
) -> Answer {
    let mut store = s.lock();
    match find_tunnel(&mut store, &account, &id) {
        Some(t) => ok(configuration_json(t)),
        None => tunnel_not_found(),
    }
}

async fn put_configuration(
    State(s): State<StandIn>,
    Path((account, id)): Path<(String, String)>,
    body: Option<Json<Value>>,
) -> Answer {
    let Some(Json(body)) = body else {
        return fail(StatusCode::BAD_REQUEST, 1001, "Invalid request body");
    };
    let Some(config) = body.get("config").cloned() else {
        return fail(StatusCode::BAD_REQUEST, 1001, "config is required");
    };
    // Cloudflare insists that the last ingress rule is a catch-all without a hostname.
    let catch_all_last = config
        .get("ingress")
        .and_then(Value::as_array)
        .and_then(|rules| rules.last())
        .is_some_and(|last| last.get("hostname").is_none() && last.get("service").is_some());
    if !catch_all_last {
        return fail(
            StatusCode::BAD_REQUEST,
            1056,
            "The last ingress rule must match all URLs",
        );
    }
    let mut store = s.lock();
    match find_tunnel(&mut store, &account, &id) {
        Some(t) if t.deleted_at.is_none() => {
            t.config = Some(config);
            t.configured_at.get_or_insert_with(Utc::now);
            ok(configuration_json(t))
        }
        _ => tunnel_not_found(),
    }
}

#[derive(Debug, Deserialize)]
struct DnsQuery {
    name: Option<String>,
    #[serde(rename = "type")]
    record_type: Option<String>,
    page: Option<u32>,
    per_page: Option<u32>,
}

async fn list_dns(
    State(s): State<StandIn>,
    Path(zone): Path<String>,
    Query(q): Query<DnsQuery>,
) -> Answer {
    let store = s.lock();
    let mut records: Vec<&DnsRecord> = store.dns.values().collect();
    records.sort_by(|a, b| (a.created_on, &a.id).cmp(&(b.created_on, &b.id)));
    let found: Vec<Value> = records
        .into_iter()
        .filter(|r| r.zone == zone)
        .filter(|r| q.name.as_ref().is_none_or(|n| &r.name == n))
        .filter(|r| q.record_type.as_ref().is_none_or(|t| &r.record_type == t))
        .map(dns_json)
        .collect();
    page_of(found, q.page, q.per_page, 100)
}

#[derive(Debug, Deserialize)]
struct CreateDns {
    #[serde(rename = "type")]
    record_type: String,
    name: String,
    content: String,
    #[serde(default)]
    proxied: bool,
    #[serde(default)]
    ttl: Option<u32>,
}

async fn create_dns(
    State(s): State<StandIn>,
    Path(zone): Path<String>,
    body: Option<Json<CreateDns>>,
) -> Answer {
    let Some(Json(body)) = body else {
        return fail(StatusCode::BAD_REQUEST, 1004, "DNS Validation Error");
    };
    let mut store = s.lock();
    if store
        .dns
        .values()
        .any(|r| r.zone == zone && r.name == body.name && r.record_type == "CNAME")
    {
        return fail(
            StatusCode::BAD_REQUEST,
            81053,
            "An A, AAAA, or CNAME record with that host already exists.",
        );
    }
    let record = DnsRecord {
        id: Uuid::new_v4().simple().to_string(),
        zone,
        record_type: body.record_type,
        name: body.name,
        content: body.content,
        proxied: body.proxied,
        ttl: body.ttl.unwrap_or(1),
        created_on: Utc::now(),
    };
    let answer = dns_json(&record);
    store.dns.insert(record.id.clone(), record);
    ok(answer)
}

/// `PUT`: the record keeps its id and takes the body's type, name, content and proxying.
async fn update_dns(
    State(s): State<StandIn>,
    Path((zone, id)): Path<(String, String)>,
    body: Option<Json<CreateDns>>,
) -> Answer {
    let Some(Json(body)) = body else {
        return fail(StatusCode::BAD_REQUEST, 1004, "DNS Validation Error");
    };
    let mut store = s.lock();
    match store.dns.get_mut(&id) {
        Some(record) if record.zone == zone => {
            record.record_type = body.record_type;
            record.name = body.name;
            record.content = body.content;
            record.proxied = body.proxied;
            record.ttl = body.ttl.unwrap_or(1);
            ok(dns_json(record))
        }
        _ => fail(StatusCode::NOT_FOUND, 81044, "Record does not exist."),
    }
}

async fn delete_dns(State(s): State<StandIn>, Path((zone, id)): Path<(String, String)>) -> Answer {
    let mut store = s.lock();
    match store.dns.get(&id) {
        Some(r) if r.zone == zone => {
            store.dns.remove(&id);
            ok(json!({ "id": id }))
        }
        _ => fail(StatusCode::NOT_FOUND, 81044, "Record does not exist."),
    }
}

/// Everything the stand-in holds, for tests and the local stack (not part of Cloudflare's API).
async fn dump_state(State(s): State<StandIn>) -> Json<Value> {
    let store = s.lock();
    let tunnels: Vec<Value> = store
        .tunnels
        .values()
        .map(|t| {
            let mut v = s.tunnel_json(t);
            v["config"] = t.config.clone().unwrap_or(Value::Null);
            v["token"] = Value::String(t.token.clone());
            v
        })
        .collect();
    let dns: Vec<Value> = store.dns.values().map(dns_json).collect();
    Json(json!({ "tunnels": tunnels, "dns_records": dns }))
}
