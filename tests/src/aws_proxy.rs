//! A proxy in front of moto that makes AWS misbehave the way the real one does.
//!
//! The worker's `AWS_ENDPOINT_URL` points here; every request is forwarded to moto unless a
//! fault is armed for its operation. Faults answer in the wire shape of the service's protocol
//! (EC2's query XML, Secrets Manager's JSON, Route 53's REST XML), so the SDK parses them into
//! the same errors a real region would give.
//!
//! AWS's timing is kept here too (see `aws_strict`): instances unknown to EC2's reads for a
//! while after launch, `pending` and `stopping` states, Route 53 changes `PENDING` until
//! `GetChange` says `INSYNC`. It is on unless a test turns it off ([`AwsProxy::set_timing`]).
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

use crate::aws_iam::{self, Authorization, Caller, Policy};
use crate::aws_strict::{self, Clock, Timing};

/// The account moto's resources are in (its default).
pub const MOTO_ACCOUNT: &str = "123456789012";

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
    /// Only requests with this form field and value (EC2), such as one kind of listing.
    pub when: Option<(String, String)>,
}

impl AwsFault {
    pub fn new(operation: &str, mode: AwsFaultMode, times: u32) -> Self {
        Self {
            operation: operation.into(),
            mode,
            times,
            when: None,
        }
    }

    /// Only for requests whose form has `key` = `value`.
    pub fn when(mut self, key: &str, value: &str) -> Self {
        self.when = Some((key.into(), value.into()));
        self
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
    /// How slow AWS is, and what it remembers to be so.
    timing: Option<Timing>,
    clock: Clock,
    /// Secrets deleted with a recovery window (by name): their names cannot be created again
    /// until the window ends or they are restored.
    scheduled_secrets: HashSet<String>,
    /// The policy every request is authorized against (`aws_iam`), when one is enforced.
    policy: Option<Arc<Policy>>,
    /// Requests the policy refused: `action on resource: why`.
    denied: Vec<String>,
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
        let proxy = Self {
            upstream: Arc::new(upstream.trim_end_matches('/').to_string()),
            http: reqwest::Client::new(),
            state: Arc::default(),
        };
        proxy.set_timing(Timing::strict());
        proxy
    }

    /// From now on every request must be allowed by `policy`, as IAM would require of the
    /// worker's role; `None` lets everything through (moto's default).
    pub fn enforce(&self, policy: Option<Policy>) {
        self.lock().policy = policy.map(Arc::new);
    }

    /// The policy enforced now.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.lock().policy.clone()
    }

    /// The requests the enforced policy refused so far, each as `action on resource: why`.
    pub fn denied(&self) -> Vec<String> {
        self.lock().denied.clone()
    }

    /// AWS's delays from now on.
    pub fn set_timing(&self, timing: Timing) {
        self.lock().timing = Some(timing);
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

    fn take_fault(&self, operation: &str, form: &BTreeMap<String, String>) -> Option<AwsFaultMode> {
        let mut state = self.lock();
        *state.calls.entry(operation.to_string()).or_default() += 1;
        let i = state.faults.iter().position(|f| {
            f.times > 0
                && f.operation == operation
                && f.when.as_ref().is_none_or(|(k, v)| form.get(k) == Some(v))
        })?;
        state.faults[i].times -= 1;
        let mode = state.faults[i].mode;
        if state.faults[i].times == 0 {
            state.faults.remove(i);
        }
        Some(mode)
    }

    /// The refusal IAM would answer under the enforced policy; `None` when it allows the
    /// request (or none is enforced).
    async fn authorize(
        &self,
        protocol: Protocol,
        operation: &str,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
        form: &BTreeMap<String, String>,
        body: &Bytes,
    ) -> Option<Response> {
        let policy = self.policy()?;
        let signature = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let caller = Caller {
            region: aws_iam::signed_region(signature).unwrap_or("us-east-1"),
            account: MOTO_ACCOUNT,
        };
        let authorizations: Vec<Authorization> = match protocol {
            Protocol::Ec2Query => {
                let tags = if operation.starts_with("Describe") || operation == "RunInstances" {
                    Default::default()
                } else {
                    self.resource_tags(headers, form).await
                };
                aws_iam::ec2_authorizations(&caller, operation, form, &tags)
            }
            Protocol::Json => aws_iam::secrets_authorizations(&caller, operation, body),
            Protocol::RestXml => aws_iam::route53_authorizations(operation, uri.path()),
        };
        for a in &authorizations {
            if let Err(why) = policy.authorize(a) {
                let what = format!("{} on {}: {why}", a.action, a.resource);
                tracing::error!(denied = %what, "the worker's policy does not allow this call");
                self.lock().denied.push(what.clone());
                let (code, status) = match protocol {
                    Protocol::Ec2Query => ("UnauthorizedOperation", StatusCode::FORBIDDEN),
                    Protocol::Json => ("AccessDeniedException", StatusCode::BAD_REQUEST),
                    Protocol::RestXml => ("AccessDenied", StatusCode::FORBIDDEN),
                };
                return Some(error_answer(
                    protocol,
                    status,
                    code,
                    &format!("User is not authorized to perform: {what}"),
                ));
            }
        }
        None
    }

    /// The tags of the instances and volumes an EC2 request names, as moto holds them (a
    /// condition on `aws:ResourceTag/...` needs them).
    async fn resource_tags(
        &self,
        headers: &HeaderMap,
        form: &BTreeMap<String, String>,
    ) -> std::collections::HashMap<String, aws_iam::Tags> {
        let ids: Vec<&String> = form
            .iter()
            .filter(|(k, v)| {
                (k.starts_with("InstanceId") || k.starts_with("ResourceId.") || *k == "VolumeId")
                    && (v.starts_with("i-") || v.starts_with("vol-"))
            })
            .map(|(_, v)| v)
            .collect();
        let mut found: std::collections::HashMap<String, aws_iam::Tags> = Default::default();
        if ids.is_empty() {
            return found;
        }
        let mut query = vec![
            ("Action".to_string(), "DescribeTags".to_string()),
            ("Version".to_string(), "2016-11-15".to_string()),
            ("Filter.1.Name".to_string(), "resource-id".to_string()),
        ];
        for (n, id) in ids.iter().enumerate() {
            query.push((format!("Filter.1.Value.{}", n + 1), (*id).clone()));
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        let mut request = self
            .http
            .post(format!("{}/", self.upstream))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        // moto reads the region from the signature's scope (it does not check the signature).
        if let Some(signature) = headers.get("authorization") {
            request = request.header("authorization", signature);
        }
        let Ok(answer) = request.send().await else {
            return found;
        };
        let Ok(text) = answer.text().await else {
            return found;
        };
        for item in text.split("<item>").skip(1) {
            if let (Some(id), Some(key)) = (xml_field(item, "resourceId"), xml_field(item, "key")) {
                let value = xml_field(item, "value").unwrap_or_default();
                found.entry(id).or_default().insert(key, value);
            }
        }
        found
    }

    /// The answer AWS would give before doing anything, where moto would be kinder: EC2 does
    /// not know an instance yet, refuses an action in the instance's state; Route 53 tells a
    /// change's status. `None`: on to moto.
    fn as_aws_would(
        &self,
        protocol: Protocol,
        operation: &str,
        uri: &axum::http::Uri,
        form: &BTreeMap<String, String>,
    ) -> Option<Response> {
        let state = self.lock();
        let timing = state.timing?;
        let now = std::time::Instant::now();
        if operation == "GetChange" {
            let id = uri.path().rsplit('/').next().unwrap_or_default();
            return Some(match state.clock.change_status(id, &timing, now) {
                Some(status) => {
                    let mut response =
                        (StatusCode::OK, aws_strict::get_change_answer(id, status)).into_response();
                    response
                        .headers_mut()
                        .insert("content-type", HeaderValue::from_static("text/xml"));
                    response
                }
                None => error_answer(
                    protocol,
                    StatusCode::NOT_FOUND,
                    "NoSuchChange",
                    &format!("A change with the specified change ID does not exist: {id}"),
                ),
            });
        }
        if protocol != Protocol::Ec2Query || operation == "RunInstances" {
            return None;
        }
        let named = aws_strict::named_instances(form);
        let unknown = state.clock.unknown(&timing, now);
        if let Some(id) = named.iter().find(|id| unknown.contains(*id)) {
            return Some(error_answer(
                protocol,
                StatusCode::BAD_REQUEST,
                "InvalidInstanceID.NotFound",
                &format!("The instance ID '{id}' does not exist"),
            ));
        }
        let pending = state.clock.pending(&timing, now);
        let stopping = state.clock.stopping(&timing, now);
        if operation == "ModifyVolume" {
            let volume = form.get("VolumeId")?;
            let (state, _) = state.clock.modification(volume, &timing, now)?;
            return Some(error_answer(
                protocol,
                StatusCode::BAD_REQUEST,
                "IncorrectModificationState",
                &format!(
                    "Volume {volume} cannot be modified in modification state {}",
                    state.to_uppercase()
                ),
            ));
        }
        let refused = match operation {
            "StopInstances" => named.iter().find(|id| pending.contains(*id)),
            "ModifyInstanceAttribute" => named
                .iter()
                .find(|id| pending.contains(*id) || stopping.contains(*id)),
            _ => None,
        };
        refused.map(|id| {
            error_answer(
                protocol,
                StatusCode::BAD_REQUEST,
                "IncorrectInstanceState",
                &format!("The instance '{id}' is not in a state from which it can be {operation}."),
            )
        })
    }

    /// Secrets Manager's deletion window: a name scheduled for deletion cannot be created
    /// again (AWS: "a secret with this name is already scheduled for deletion"), unless the
    /// secret was deleted without recovery. Remembered here; moto says only "exists".
    fn secret_as_aws_would(&self, operation: &str, body: &Bytes) -> Option<Response> {
        let json: serde_json::Value = serde_json::from_slice(body).ok()?;
        let mut state = self.lock();
        state.timing?;
        match operation {
            "CreateSecret" => {
                let name = json["Name"].as_str()?;
                state.scheduled_secrets.contains(name).then(|| {
                    error_answer(
                        Protocol::Json,
                        StatusCode::BAD_REQUEST,
                        "InvalidRequestException",
                        "You can't create this secret because a secret with this name is already scheduled for deletion.",
                    )
                })
            }
            "DeleteSecret" => {
                let name = json["SecretId"].as_str()?.to_string();
                if json["ForceDeleteWithoutRecovery"].as_bool() == Some(true) {
                    state.scheduled_secrets.remove(&name);
                } else {
                    state.scheduled_secrets.insert(name);
                }
                None
            }
            "RestoreSecret" => {
                let name = json["SecretId"].as_str()?;
                state.scheduled_secrets.remove(name);
                None
            }
            _ => None,
        }
    }

    /// Route 53 deletes a record set only when the request repeats it exactly as it is now
    /// (TTL and values): "Tried to delete resource record set ... but the values provided do
    /// not match the current values". moto accepts any values it was ever given.
    async fn route53_delete_as_aws_would(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Option<Response> {
        self.lock().timing?;
        let text = String::from_utf8_lossy(body);
        if xml_field(&text, "Action").as_deref() != Some("DELETE") {
            return None;
        }
        let name = xml_field(&text, "Name")?;
        let kind = xml_field(&text, "Type")?;
        let asked = (xml_field(&text, "TTL"), xml_fields(&text, "Value"));
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let rrset_path = format!(
            "{}?name={fqdn}&type={kind}&maxitems=1",
            path.trim_end_matches('/')
        );
        let mut request = self.http.get(format!("{}{rrset_path}", self.upstream));
        if let Some(signature) = headers.get("authorization") {
            request = request.header("authorization", signature);
        }
        let current = request.send().await.ok()?.text().await.ok()?;
        let found = current
            .split("<ResourceRecordSet>")
            .skip(1)
            .find(|set| xml_field(set, "Name").as_deref() == Some(fqdn.as_str()))?;
        let now = (xml_field(found, "TTL"), xml_fields(found, "Value"));
        (now != asked).then(|| {
            error_answer(
                Protocol::RestXml,
                StatusCode::BAD_REQUEST,
                "InvalidChangeBatch",
                &format!(
                    "[Tried to delete resource record set [name='{fqdn}', type='{kind}'] but the values provided do not match the current values]"
                ),
            )
        })
    }

    /// A successful answer as AWS would time it, and what it starts remembered.
    fn timed(&self, operation: &str, form: &BTreeMap<String, String>, answer: Bytes) -> Bytes {
        let mut state = self.lock();
        let Some(timing) = state.timing else {
            return answer;
        };
        let now = std::time::Instant::now();
        match operation {
            "RunInstances" => {
                state.clock.launched(instance_ids(&answer), now);
                answer
            }
            "StartInstances" => {
                state.clock.started(aws_strict::named_instances(form), now);
                answer
            }
            "StopInstances" => {
                state.clock.stopped(aws_strict::named_instances(form), now);
                answer
            }
            "DescribeInstances" => {
                let text = String::from_utf8_lossy(&answer);
                let text = aws_strict::without_instances(&text, &state.clock.unknown(&timing, now));
                let text = aws_strict::with_state(
                    &text,
                    Some(&state.clock.pending(&timing, now)),
                    Some("running"),
                    0,
                    "pending",
                );
                let text = aws_strict::with_state(
                    &text,
                    Some(&state.clock.stopping(&timing, now)),
                    Some("stopped"),
                    64,
                    "stopping",
                );
                Bytes::from(text)
            }
            "ModifyVolume" => {
                let text = String::from_utf8_lossy(&answer).into_owned();
                if let (Some(volume), Some(original)) =
                    (form.get("VolumeId"), xml_field(&text, "originalSize"))
                {
                    state.clock.volume_modified(volume.clone(), original, now);
                }
                answer
            }
            "DescribeVolumes" | "DescribeVolumesModifications" => {
                let mut text = String::from_utf8_lossy(&answer).into_owned();
                for (volume, modification, original) in state.clock.modifications(&timing, now) {
                    text = if operation == "DescribeVolumes" {
                        // The new size shows once the volume is optimizing.
                        if modification == "modifying" {
                            aws_strict::with_volume_field(&text, &volume, "size", &original, false)
                        } else {
                            text
                        }
                    } else {
                        aws_strict::with_volume_field(
                            &text,
                            &volume,
                            "modificationState",
                            modification,
                            true,
                        )
                    };
                }
                Bytes::from(text)
            }
            "ChangeResourceRecordSets" => {
                let id = state.clock.change(now);
                Bytes::from(aws_strict::pending_change(
                    &String::from_utf8_lossy(&answer),
                    &id,
                ))
            }
            _ => answer,
        }
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
    // IAM first, as AWS does: a refused call does nothing and hits no other fault.
    if let Some(refusal) = proxy
        .authorize(
            protocol,
            &operation,
            &parts.uri,
            &parts.headers,
            &form,
            &body,
        )
        .await
    {
        return refusal;
    }
    let fault = proxy.take_fault(&operation, &form);
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
    if let Some(answer) = proxy.as_aws_would(protocol, &operation, &parts.uri, &form) {
        return answer;
    }
    if let Some(answer) = proxy.secret_as_aws_would(&operation, &body) {
        return answer;
    }
    if operation == "ChangeResourceRecordSets" {
        if let Some(answer) = proxy
            .route53_delete_as_aws_would(parts.uri.path(), &parts.headers, &body)
            .await
        {
            return answer;
        }
    }
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
        answer = proxy.timed(&operation, &form, answer);
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
                    answer = Bytes::from(aws_strict::with_state(
                        &String::from_utf8_lossy(&answer),
                        Some(&held),
                        None,
                        0,
                        "pending",
                    ));
                }
                if stopping {
                    answer = Bytes::from(aws_strict::with_state(
                        &String::from_utf8_lossy(&answer),
                        None,
                        Some("stopped"),
                        64,
                        "stopping",
                    ));
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
        // As EC2 says it: who we are (our account), what on which resource, and an encoded
        // message for `sts:DecodeAuthorizationMessage`.
        (AwsFaultMode::AccessDenied, Protocol::Ec2Query) => (
            StatusCode::FORBIDDEN,
            "UnauthorizedOperation",
            "You are not authorized to perform this operation. User: \
             arn:aws:sts::123456789012:assumed-role/hive-worker/worker is not authorized to \
             perform: ec2:RunInstances on resource: \
             arn:aws:ec2:eu-west-1:123456789012:subnet/subnet-0123456789abcdef0 because no \
             identity-based policy allows the ec2:RunInstances action. Encoded authorization \
             failure message: gY3Kx0mZ9EXAMPLEEXAMPLE",
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

/// The text of the first `<name>` element of an XML document.
fn xml_field(text: &str, name: &str) -> Option<String> {
    xml_fields(text, name).into_iter().next()
}

/// The text of every `<name>` element of an XML document, in order.
fn xml_fields(text: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    text.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.to_string()))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launched_instance_ids_are_read_from_the_answer() {
        let answer = "<r><item><instanceId>i-1</instanceId></item><item><instanceId>i-2</instanceId></item></r>";
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
