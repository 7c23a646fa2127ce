//! A proxy in front of moto that makes AWS misbehave the way the real one does.
//!
//! The worker's `AWS_ENDPOINT_URL` points here; every request is forwarded to moto unless a
//! fault is armed for its operation. Faults answer in the wire shape of the service's protocol
//! (EC2's query XML, Secrets Manager's JSON, Route 53's REST XML), so the SDK parses them into
//! the same errors a real region would give.
//!
//! Two gaps of moto are closed here, because our correctness depends on them in production:
//! - EC2 honours `ClientToken`: a `RunInstances` repeated with a token already used answers the
//!   first reservation instead of launching again. moto launches again.
//! - Real instances stay `pending` for a while; moto's are `running` at once. With
//!   [`AwsProxy::hold_pending`] on, instances launched meanwhile are reported `pending` by
//!   `DescribeInstances` until [`AwsProxy::release_pending`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// How an armed fault fails a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsFaultMode {
    /// HTTP 500 `InternalError`; nothing happens.
    ServerError,
    /// HTTP 503 `ServiceUnavailable`; nothing happens.
    Unavailable,
    /// The service's throttling error (`RequestLimitExceeded`, `ThrottlingException`,
    /// `Throttling`); nothing happens.
    Throttle,
    /// EC2's `InsufficientInstanceCapacity`; nothing happens.
    InsufficientCapacity,
    /// A permanent refusal (`UnauthorizedOperation` / `AccessDeniedException`).
    AccessDenied,
    /// Never answer: the client's timeout fires; nothing happens.
    Hang,
    /// Forward to moto, then break the connection before the answer is complete: the change
    /// happened, the caller does not know.
    DropAfterSuccess,
    /// Forward to moto, then hold the answer this long: the change happened, the caller hears
    /// of it late (after its lease ran out, say).
    SlowAnswer(Duration),
}

/// Fails the next `times` requests of one operation (`RunInstances`, `CreateSecret`,
/// `ChangeResourceRecordSets`, ...).
#[derive(Debug, Clone)]
pub struct AwsFault {
    pub operation: String,
    pub mode: AwsFaultMode,
    pub times: u32,
}

impl AwsFault {
    pub fn new(operation: &str, mode: AwsFaultMode, times: u32) -> Self {
        Self {
            operation: operation.into(),
            mode,
            times,
        }
    }
}

/// Which wire protocol a request speaks, for the shape of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// EC2: form-encoded `Action=`, XML `<Response><Errors>`.
    Ec2Query,
    /// Secrets Manager: `X-Amz-Target`, JSON `{"__type": ...}`.
    Json,
    /// Route 53: REST paths, XML `<ErrorResponse>`.
    RestXml,
}

#[derive(Default)]
struct ProxyState {
    faults: Vec<AwsFault>,
    /// `RunInstances` answers by client token.
    launches: BTreeMap<String, Bytes>,
    hold_new_instances: bool,
    held: HashSet<String>,
    /// Stopped instances read `stopping` while this is on.
    hold_stopping: bool,
    /// Requests seen, by operation.
    calls: BTreeMap<String, u32>,
    /// EC2 requests seen (any operation).
    ec2_calls: u32,
    /// Subnets (zones) where `RunInstances` finds no capacity: of one type, or of any.
    full_subnets: HashSet<(String, Option<String>)>,
}

#[derive(Clone)]
pub struct AwsProxy {
    upstream: Arc<String>,
    http: reqwest::Client,
    state: Arc<Mutex<ProxyState>>,
}

impl AwsProxy {
    /// A proxy to `upstream` (moto's endpoint, `http://127.0.0.1:PORT`).
    pub fn new(upstream: &str) -> Self {
        Self {
            upstream: Arc::new(upstream.trim_end_matches('/').to_string()),
            http: reqwest::Client::new(),
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        // A poisoned lock only means a handler panicked; the data is still usable for a proxy.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn inject(&self, fault: AwsFault) {
        self.lock().faults.push(fault);
    }

    /// From now on, instances launched are reported `pending` until released.
    pub fn hold_pending(&self, on: bool) {
        self.lock().hold_new_instances = on;
    }

    /// These instances (launched past the proxy) are reported `pending` until released.
    pub fn hold_instances(&self, ids: impl IntoIterator<Item = String>) {
        self.lock().held.extend(ids);
    }

    /// Every held instance reports its real state again.
    pub fn release_pending(&self) {
        let mut state = self.lock();
        state.hold_new_instances = false;
        state.held.clear();
    }

    /// While on, every stopped instance is reported `stopping` (real instances take a while to
    /// stop; moto's stop at once).
    pub fn hold_stopping(&self, on: bool) {
        self.lock().hold_stopping = on;
    }

    /// From now on, launches into `subnet_id` (of `instance_type`, or of any type) answer
    /// `InsufficientInstanceCapacity`, as a zone that has run out does.
    pub fn zone_full(&self, subnet_id: &str, instance_type: Option<&str>) {
        self.lock()
            .full_subnets
            .insert((subnet_id.to_string(), instance_type.map(str::to_string)));
    }

    /// How many instances are held `pending`.
    pub fn held_count(&self) -> usize {
        self.lock().held.len()
    }

    /// How many requests of `operation` arrived (faulted or not).
    pub fn calls(&self, operation: &str) -> u32 {
        self.lock().calls.get(operation).copied().unwrap_or(0)
    }

    /// How many EC2 requests arrived, of any operation.
    pub fn ec2_calls(&self) -> u32 {
        self.lock().ec2_calls
    }

    /// Faults still armed (a test checks its faults really fired).
    pub fn armed(&self) -> Vec<AwsFault> {
        self.lock().faults.clone()
    }

    fn take_fault(&self, operation: &str) -> Option<AwsFaultMode> {
        let mut state = self.lock();
        *state.calls.entry(operation.to_string()).or_default() += 1;
        let i = state
            .faults
            .iter()
            .position(|f| f.times > 0 && f.operation == operation)?;
        state.faults[i].times -= 1;
        let mode = state.faults[i].mode;
        if state.faults[i].times == 0 {
            state.faults.remove(i);
        }
        Some(mode)
    }

    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }

    /// Serves on `addr` (port 0 picks one); returns the bound address and the server task.
    pub async fn serve(
        self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        crate::serve_router(self.router(), addr, "aws proxy").await
    }

    /// Sends the request on to moto; the answer's status, headers and whole body.
    async fn forward(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), reqwest::Error> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path_and_query}", self.upstream))
            .body(body);
        for (name, value) in headers {
            if !is_hop_header(name.as_str()) {
                request = request.header(name, value);
            }
        }
        let answer = request.send().await?;
        let status = answer.status();
        let mut headers = HeaderMap::new();
        for (name, value) in answer.headers() {
            if !is_hop_header(name.as_str()) {
                headers.append(name, value.clone());
            }
        }
        let body = answer.bytes().await?;
        Ok((status, headers, body))
    }
}

fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "host" | "content-length" | "transfer-encoding" | "connection" | "keep-alive"
    )
}

async fn handle(State(proxy): State<AwsProxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let (protocol, operation, form) = identify(&parts.method, &parts.uri, &parts.headers, &body);

    if protocol == Protocol::Ec2Query {
        proxy.lock().ec2_calls += 1;
    }
    let fault = proxy.take_fault(&operation);
    match fault {
        Some(AwsFaultMode::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return error_answer(
                protocol,
                StatusCode::GATEWAY_TIMEOUT,
                "RequestTimeout",
                "hang",
            );
        }
        Some(mode) => {
            if let Some((status, code, message)) = refusal(protocol, mode) {
                return error_answer(protocol, status, code, message);
            }
        }
        None => {}
    }
    let dropped = fault == Some(AwsFaultMode::DropAfterSuccess);
    if operation == "RunInstances" {
        let full = {
            let state = proxy.lock();
            let instance_type = form.get("InstanceType").cloned();
            form.iter()
                .filter(|(key, _)| *key == "SubnetId" || key.ends_with(".SubnetId"))
                .any(|(_, subnet)| {
                    state.full_subnets.contains(&(subnet.clone(), None))
                        || state
                            .full_subnets
                            .contains(&(subnet.clone(), instance_type.clone()))
                })
        };
        if let Some((status, code, message)) = full
            .then(|| refusal(protocol, AwsFaultMode::InsufficientCapacity))
            .flatten()
        {
            return error_answer(protocol, status, code, message);
        }
    }

    // EC2's idempotency: a launch with a client token already used answers the first launch.
    let client_token = (operation == "RunInstances")
        .then(|| form.get("ClientToken").cloned())
        .flatten();
    if let Some(token) = &client_token {
        let first = proxy.lock().launches.get(token).cloned();
        if let Some(first) = first {
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("text/xml"));
            return respond(StatusCode::OK, headers, first, dropped);
        }
    }

    let (status, headers, mut answer) = match proxy
        .forward(&parts.method, &path_and_query, &parts.headers, body)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            return error_answer(
                protocol,
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                &format!("proxy could not reach moto: {e}"),
            )
        }
    };

    if status.is_success() {
        match operation.as_str() {
            "RunInstances" => {
                let mut state = proxy.lock();
                if let Some(token) = client_token {
                    state.launches.insert(token, answer.clone());
                }
                if state.hold_new_instances {
                    state.held.extend(instance_ids(&answer));
                }
            }
            "DescribeInstances" => {
                let (held, stopping) = {
                    let state = proxy.lock();
                    (state.held.clone(), state.hold_stopping)
                };
                if !held.is_empty() {
                    answer = Bytes::from(report_pending(&String::from_utf8_lossy(&answer), &held));
                }
                if stopping {
                    answer = Bytes::from(report_stopping(&String::from_utf8_lossy(&answer)));
                }
            }
            _ => {}
        }
    }
    if let Some(AwsFaultMode::SlowAnswer(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    respond(status, headers, answer, dropped)
}

/// The protocol and operation of a request, and its form fields when it has them.
fn identify(
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> (Protocol, String, BTreeMap<String, String>) {
    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let operation = target.rsplit('.').next().unwrap_or(target).to_string();
        return (Protocol::Json, operation, BTreeMap::new());
    }
    let is_form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        let form: BTreeMap<String, String> = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let operation = form.get("Action").cloned().unwrap_or_default();
        return (Protocol::Ec2Query, operation, form);
    }
    (
        Protocol::RestXml,
        route53_operation(method, uri.path()),
        BTreeMap::new(),
    )
}

/// Route 53's operations by method and path (`/2013-04-01/hostedzone/Z1/rrset`, ...).
fn route53_operation(method: &Method, path: &str) -> String {
    let path = path.trim_end_matches('/');
    let name = if path.ends_with("/rrset") {
        if method == Method::POST {
            "ChangeResourceRecordSets"
        } else {
            "ListResourceRecordSets"
        }
    } else if path.contains("/change/") {
        "GetChange"
    } else if path.contains("/hostedzone") && method == Method::GET {
        "GetHostedZone"
    } else {
        return format!("{method} {path}");
    };
    name.to_string()
}

/// The error an armed fault answers with in the protocol's shape; `None` for a fault that
/// lets the request through or never answers.
fn refusal(
    protocol: Protocol,
    mode: AwsFaultMode,
) -> Option<(StatusCode, &'static str, &'static str)> {
    Some(match (mode, protocol) {
        (AwsFaultMode::ServerError, _) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        (AwsFaultMode::Unavailable, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is unavailable. Please try again shortly.",
        ),
        (AwsFaultMode::Throttle, Protocol::Ec2Query) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ),
        (AwsFaultMode::Throttle, Protocol::Json) => (
            StatusCode::BAD_REQUEST,
            "ThrottlingException",
            "Rate exceeded",
        ),
        (AwsFaultMode::Throttle, Protocol::RestXml) => {
            (StatusCode::BAD_REQUEST, "Throttling", "Rate exceeded")
        }
        (AwsFaultMode::InsufficientCapacity, _) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient t4g capacity in the Availability Zone you requested.",
        ),
        (AwsFaultMode::AccessDenied, Protocol::Ec2Query) => (
            StatusCode::FORBIDDEN,
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        ),
        (AwsFaultMode::AccessDenied, _) => (
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "User is not authorized to perform this operation.",
        ),
        // These let the request through (or never answer): no error of their own.
        (
            AwsFaultMode::Hang | AwsFaultMode::DropAfterSuccess | AwsFaultMode::SlowAnswer(_),
            _,
        ) => return None,
    })
}

fn error_answer(protocol: Protocol, status: StatusCode, code: &str, message: &str) -> Response {
    let request_id = uuid::Uuid::new_v4();
    let (content_type, body) = match protocol {
        Protocol::Ec2Query => (
            "text/xml;charset=UTF-8",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
            ),
        ),
        Protocol::Json => (
            "application/x-amz-json-1.1",
            serde_json::json!({ "__type": code, "message": message }).to_string(),
        ),
        Protocol::RestXml => {
            let kind = if status.is_server_error() { "Receiver" } else { "Sender" };
            (
                "text/xml",
                format!(
                    "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
                ),
            )
        }
    };
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    if protocol == Protocol::Json {
        if let Ok(code) = HeaderValue::from_str(code) {
            response.headers_mut().insert("x-amzn-errortype", code);
        }
    }
    response
}

/// The answer to send back; when `dropped`, the body breaks off half-way.
fn respond(status: StatusCode, headers: HeaderMap, body: Bytes, dropped: bool) -> Response {
    let body = if dropped {
        let half = body.slice(..body.len() / 2);
        Body::from_stream(futures_util::stream::iter(vec![
            Ok(half),
            Err(std::io::Error::other("injected: connection dropped")),
        ]))
    } else {
        Body::from(body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The instance ids in a `RunInstances` answer.
fn instance_ids(answer: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(answer);
    text.split("<instanceId>")
        .skip(1)
        .filter_map(|rest| {
            rest.split_once("</instanceId>")
                .map(|(id, _)| id.to_string())
        })
        .collect()
}

/// A `DescribeInstances` answer with every held instance's state set to `pending`.
fn report_pending(answer: &str, held: &HashSet<String>) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    // Each instance's `<instanceState>` follows its `<instanceId>` within its item.
    while let Some(at) = rest.find("<instanceId>") {
        let (before, from_id) = rest.split_at(at);
        out.push_str(before);
        let id_end = from_id.find("</instanceId>").unwrap_or(from_id.len());
        let id = &from_id["<instanceId>".len().min(id_end)..id_end];
        match (
            held.contains(id),
            from_id.find("<instanceState>"),
            from_id.find("</instanceState>"),
        ) {
            (true, Some(open), Some(close)) if open < close => {
                out.push_str(&from_id[..open]);
                out.push_str("<instanceState><code>0</code><name>pending</name></instanceState>");
                rest = &from_id[close + "</instanceState>".len()..];
            }
            _ => {
                let skip = "<instanceId>".len().min(from_id.len());
                out.push_str(&from_id[..skip]);
                rest = &from_id[skip..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A `DescribeInstances` answer with every stopped instance reported `stopping`.
fn report_stopping(answer: &str) -> String {
    const OPEN: &str = "<instanceState>";
    const CLOSE: &str = "</instanceState>";
    let mut out = String::with_capacity(answer.len());
    let mut rest = answer;
    while let Some(open) = rest.find(OPEN) {
        let Some(close) = rest[open..].find(CLOSE).map(|c| open + c + CLOSE.len()) else {
            break;
        };
        out.push_str(&rest[..open]);
        let block = &rest[open..close];
        if block.contains("<name>stopped</name>") {
            out.push_str("<instanceState><code>64</code><name>stopping</name></instanceState>");
        } else {
            out.push_str(block);
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_instances_read_stopping_while_held() {
        let answer = "<r><item><instanceId>i-1</instanceId><instanceState>\n<code>80</code>\n<name>stopped</name></instanceState></item>\
<item><instanceId>i-2</instanceId><instanceState><code>16</code><name>running</name></instanceState></item></r>";
        let out = report_stopping(answer);
        assert!(out.contains("<instanceId>i-1</instanceId><instanceState><code>64</code><name>stopping</name></instanceState>"), "{out}");
        assert!(
            out.contains(
                "<instanceId>i-2</instanceId><instanceState><code>16</code><name>running</name>"
            ),
            "{out}"
        );
        assert!(!out.contains("stopped"));
    }

    #[test]
    fn held_instances_read_pending_and_others_do_not() {
        let answer = "<r><item><instanceId>i-1</instanceId><imageId>a</imageId><instanceState><code>16</code><name>running</name></instanceState></item>\
<item><instanceId>i-2</instanceId><instanceState><code>16</code><name>running</name></instanceState></item></r>";
        let held: HashSet<String> = ["i-2".to_string()].into();
        let out = report_pending(answer, &held);
        assert!(out.contains("<instanceId>i-1</instanceId><imageId>a</imageId><instanceState><code>16</code><name>running</name>"));
        assert!(out.contains("<instanceId>i-2</instanceId><instanceState><code>0</code><name>pending</name></instanceState></item></r>"));
        assert_eq!(instance_ids(answer.as_bytes()), vec!["i-1", "i-2"]);
    }

    #[test]
    fn operations_are_named_as_aws_names_them() {
        let uri: axum::http::Uri = "/2013-04-01/hostedzone/Z1/rrset/".parse().unwrap();
        let (p, op, _) = identify(&Method::POST, &uri, &HeaderMap::new(), &Bytes::new());
        assert_eq!(
            (p, op.as_str()),
            (Protocol::RestXml, "ChangeResourceRecordSets")
        );
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        let (p, op, form) = identify(
            &Method::POST,
            &"/".parse().unwrap(),
            &h,
            &Bytes::from_static(b"Action=RunInstances&ClientToken=abc"),
        );
        assert_eq!((p, op.as_str()), (Protocol::Ec2Query, "RunInstances"));
        assert_eq!(form.get("ClientToken").map(String::as_str), Some("abc"));
    }
}
