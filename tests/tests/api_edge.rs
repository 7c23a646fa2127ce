//! The api as it faces the internet: rate limits per user for valid tokens and per address for
//! the rest, signed Stripe events never limited (`429` with `Retry-After`), body limits (`413` in the JSON error shape, the webhook included), the CORS
//! allow-list, a request id on every answer and in the log lines of its request, JSON for a
//! method a route does not have, and tokens of an identity provider (`HIVE_JWKS_URL`: ES256 and
//! RS256 keys, fetched again when it rotates; issuer and audience checked).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use hive_tests::assert_json_error;
use hive_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn options_with(env: &[(&str, &str)]) -> StackOptions {
    let mut options = StackOptions::default();
    options
        .extra_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    options
}

async fn get_from(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    address: &str,
) -> (u16, Option<String>, Value) {
    let mut req = http.get(url).header("x-forwarded-for", address);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        retry_after,
        resp.json().await.unwrap_or(Value::Null),
    )
}

fn assert_limited(status: u16, retry_after: Option<String>, body: &Value, what: &str) {
    assert_json_error(status, body, 429, what);
    assert_eq!(body["error"]["code"], "rate_limited", "{what}");
    let secs: u64 = retry_after
        .unwrap_or_else(|| panic!("{what}: no Retry-After"))
        .parse()
        .unwrap();
    // 5 a minute: the next request is let through within 12 s.
    assert!((1..=12).contains(&secs), "{what}: Retry-After {secs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_hold_per_address_and_per_user_and_answer_429_with_retry_after() {
    let mut stack = Stack::start(options_with(&[
        ("HIVE_RATE_LIMIT", "5"),
        ("HIVE_CLIENT_IP_HEADER", "x-forwarded-for"),
    ]))
    .await
    .unwrap();
    stack.start_api().unwrap();
    let http = reqwest::Client::new();
    let nodes = stack.api_url("/api/v1/nodes");

    // One address, many users with valid tokens (an app's backend calling for its users):
    // limited per user, not by the address they share.
    for i in 0..12 {
        let token = Stack::jwt(&format!("addr-user-{i}"), 600);
        for k in 0..3 {
            let (status, _, body) = get_from(&http, &nodes, Some(&token), "203.0.113.1").await;
            assert_eq!(
                status, 200,
                "request {k} of user {i} from one address: {body}"
            );
        }
    }
    // Tokens that are not valid are limited by address: five 401s, then 429.
    for i in 0..5 {
        let (status, _, body) = get_from(&http, &nodes, Some("not-a-token"), "203.0.113.1").await;
        assert_json_error(status, &body, 401, &format!("bad token {i}"));
    }
    let (status, retry_after, body) =
        get_from(&http, &nodes, Some("not-a-token"), "203.0.113.1").await;
    assert_limited(status, retry_after, &body, "sixth bad token of one address");
    // A path no route takes is limited by address, whatever token it carries.
    let nowhere = stack.api_url("/api/v1/nowhere");
    for i in 0..5 {
        let (status, _, body) = get_from(&http, &nowhere, Some("not-a-token"), "203.0.113.9").await;
        assert_json_error(status, &body, 404, &format!("unrouted {i}"));
    }
    let (status, retry_after, body) =
        get_from(&http, &nowhere, Some("not-a-token"), "203.0.113.9").await;
    assert_limited(
        status,
        retry_after,
        &body,
        "sixth unrouted request of one address",
    );
    // A valid token from that address still goes through.
    let token = Stack::jwt("addr-user-0", 600);
    let (status, _, body) = get_from(&http, &nodes, Some(&token), "203.0.113.1").await;
    assert_eq!(status, 200, "a valid token from a limited address: {body}");

    // One user, six addresses: the user's sixth request is refused.
    let user_token = Stack::jwt("busy-user", 600);
    for i in 0..5 {
        let address = format!("198.51.100.{i}");
        let (status, _, body) = get_from(&http, &nodes, Some(&user_token), &address).await;
        assert_eq!(status, 200, "request {i} of one user: {body}");
    }
    let (status, retry_after, body) =
        get_from(&http, &nodes, Some(&user_token), "198.51.100.9").await;
    assert_limited(status, retry_after, &body, "sixth request of one user");

    // The webhook's unsigned posts are limited per address: refused 400 until the address's
    // allowance is spent, then 429.
    let webhook = stack.api_url("/webhooks/stripe");
    for i in 0..5 {
        let resp = http
            .post(&webhook)
            .header("x-forwarded-for", "192.0.2.77")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "webhook post {i}");
    }
    let resp = http
        .post(&webhook)
        .header("x-forwarded-for", "192.0.2.77")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    assert_limited(
        status,
        retry_after,
        &body,
        "sixth webhook post of one address",
    );
    // A correctly signed event from that same address is Stripe's: never limited.
    let fixtures = hive_tests::stripe_events::Fixtures::load().unwrap();
    for i in 0..10 {
        let event = fixtures
            .event("customer.created", fixtures.object("customer").unwrap())
            .unwrap();
        let body = serde_json::to_vec(&event).unwrap();
        let resp = http
            .post(&webhook)
            .header("x-forwarded-for", "192.0.2.77")
            .header("content-type", "application/json")
            .header(
                "stripe-signature",
                hive_tests::stripe_events::signature(&body, hive_tests::stack::WEBHOOK_SECRET),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "signed event {i}");
    }

    // The health check is never limited.
    for _ in 0..10 {
        let (status, _, _) = get_from(&http, &stack.api_url("/healthz"), None, "192.0.2.77").await;
        assert_eq!(status, 200);
    }
}

/// Posts `count` Stripe events from one address, `signed` correctly or not, eight at a time;
/// the statuses answered.
async fn post_events_from_one_address(
    stack: &Stack,
    count: usize,
    signed: bool,
) -> std::collections::BTreeMap<u16, usize> {
    let http = reqwest::Client::new();
    let url = stack.api_url("/webhooks/stripe");
    let fixtures = hive_tests::stripe_events::Fixtures::load().unwrap();
    let bodies: Vec<Vec<u8>> = (0..count)
        .map(|_| {
            let event = fixtures
                .event("customer.created", fixtures.object("customer").unwrap())
                .unwrap();
            serde_json::to_vec(&event).unwrap()
        })
        .collect();
    let secret = if signed {
        hive_tests::stack::WEBHOOK_SECRET
    } else {
        "whsec_not_ours"
    };
    let mut statuses = std::collections::BTreeMap::new();
    for chunk in bodies.chunks(8) {
        let sent = chunk.iter().map(|body| {
            http.post(&url)
                .header("x-forwarded-for", "192.0.2.200")
                .header("content-type", "application/json")
                .header(
                    "stripe-signature",
                    hive_tests::stripe_events::signature(body, secret),
                )
                .body(body.clone())
                .send()
        });
        for resp in futures::future::join_all(sent).await {
            *statuses.entry(resp.unwrap().status().as_u16()).or_default() += 1;
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread")]
async fn stripe_and_an_apps_backend_are_not_limited_as_one_stranger() {
    // The default limit: 600 a minute.
    let mut stack = Stack::start(options_with(&[
        ("HIVE_RATE_LIMIT", "600"),
        ("HIVE_CLIENT_IP_HEADER", "x-forwarded-for"),
    ]))
    .await
    .unwrap();
    stack.start_api().unwrap();

    // A month's renewals at once from one of Stripe's addresses: every one recorded.
    let signed = post_events_from_one_address(&stack, 1_000, true).await;
    assert_eq!(signed.get(&200), Some(&1_000), "{signed:?}");
    // The same from a stranger who cannot sign: limited, cheaply.
    let forged = post_events_from_one_address(&stack, 1_000, false).await;
    assert!(
        forged.get(&429).is_some_and(|&n| n >= 300),
        "badly signed posts are limited: {forged:?}"
    );
    assert_eq!(forged.get(&200), None, "{forged:?}");

    // An app's backend calling for 100 users from one address, 20 requests each.
    let http = reqwest::Client::new();
    let nodes = stack.api_url("/api/v1/nodes");
    let tokens: Vec<String> = (0..100)
        .map(|i| Stack::jwt(&format!("backend-user-{i}"), 600))
        .collect();
    let mut answered = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..20 {
        for chunk in tokens.chunks(10) {
            let sent = chunk
                .iter()
                .map(|token| get_from(&http, &nodes, Some(token), "203.0.113.50"));
            for (status, _, _) in futures::future::join_all(sent).await {
                *answered.entry(status).or_default() += 1;
            }
        }
    }
    assert_eq!(answered.get(&200), Some(&2_000), "{answered:?}");
}

/// Sends `body` with no length announced (chunked), as a client may; returns the status line.
async fn post_chunked(addr: SocketAddr, path: &str, body: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(16 * 1024) {
        let size = format!("{:x}\r\n", chunk.len());
        stream.write_all(size.as_bytes()).await.unwrap();
        stream.write_all(chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).to_string();
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_413_in_the_json_shape_and_change_nothing() {
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    let addr = stack.start_api().unwrap();
    let pool = stack.pool().await.unwrap();
    let http = reqwest::Client::new();
    let token = Stack::jwt("big-bodies", 600);

    // The app's API: 64 KiB.
    let big = json!({ "region": "x".repeat(100 * 1024) });
    let (status, body) = stack
        .post_as("/api/v1/nodes", Some(&token), &[], &big)
        .await
        .unwrap();
    assert_json_error(status, &body, 413, "a 100 KiB node request");
    assert_eq!(body["error"]["code"], "payload_too_large");

    // The webhook: 512 KiB; under it, an unsigned event is refused for its signature.
    let (status, body) = stack
        .post_webhook(&vec![b' '; 600 * 1024], Some("t=1,v1=00"))
        .await
        .unwrap();
    assert_json_error(status, &body, 413, "a 600 KiB webhook");
    let (status, body) = stack
        .post_webhook(&vec![b' '; 100 * 1024], Some("t=1,v1=00"))
        .await
        .unwrap();
    assert_json_error(status, &body, 400, "a 100 KiB unsigned webhook");

    // A body whose length is not announced is cut off at the limit too.
    let status_line = post_chunked(addr, "/webhooks/stripe", &vec![b' '; 700 * 1024]).await;
    assert!(
        status_line.contains(" 413 "),
        "chunked webhook: {status_line}"
    );

    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((events, nodes), (0, 0), "a refused body changed something");

    // A method a route does not have: 405 in the same shape.
    let resp = http
        .put(stack.api_url("/api/v1/nodes"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let allow = resp
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    assert_json_error(status, &body, 405, "PUT on the node list");
    assert_eq!(
        allow.as_deref(),
        Some("GET,HEAD,POST"),
        "the methods it has"
    );
    // Whatever its Idempotency-Key: the key is looked at only for a request a route takes.
    let first = http
        .post(stack.api_url(&format!("/api/v1/nodes/{}/restart", uuid::Uuid::new_v4())))
        .bearer_auth(&token)
        .header("idempotency-key", "key-of-another-request")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 404);
    let resp = http
        .delete(stack.api_url(&format!("/api/v1/nodes/{}/start", uuid::Uuid::new_v4())))
        .bearer_auth(&token)
        .header("idempotency-key", "key-of-another-request")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        resp.headers().get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_admits_the_listed_origins_only_and_every_answer_has_a_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options_with(&[(
        "HIVE_CORS_ORIGINS",
        "https://app.example.com, http://localhost:5173",
    )]);
    options.log_dir = Some(dir.path().to_path_buf());
    let mut stack = Stack::start(options).await.unwrap();
    stack.start_api().unwrap();
    let http = reqwest::Client::new();
    let nodes = stack.api_url("/api/v1/nodes");

    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &nodes)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("https://app.example.com")
    );
    let methods = allowed
        .headers()
        .get("access-control-allow-methods")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let refused = preflight("https://evil.example.net").await.unwrap();
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "an unlisted origin was allowed"
    );
    // A real call from the allowed origin may read our error's headers.
    let resp = http
        .get(&nodes)
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("http://localhost:5173")
    );

    // Every answer carries a request id: ours when the caller sent none, else theirs.
    let mut seen = std::collections::HashSet::new();
    for path in ["/healthz", "/api/v1/nodes", "/nowhere", "/openapi.json"] {
        let resp = http.get(stack.api_url(path)).send().await.unwrap();
        let id = resp
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{path}: no request id"))
            .to_str()
            .unwrap()
            .to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{path}: {id}");
        assert!(seen.insert(id), "{path}: a request id was reused");
    }
    let token = Stack::jwt("traced-user", 600);
    let resp = http
        .post(stack.api_url("/api/v1/nodes/not-a-node/restart"))
        .bearer_auth(&token)
        .header("x-request-id", "req-trace-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.headers()["x-request-id"], "req-trace-4711");
    // The request's log line carries its id (and its user).
    let log_path = dir.path().join("hive-api.log");
    let mut line = None;
    for _ in 0..50 {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        line = log
            .lines()
            .find(|l| l.contains("req-trace-4711"))
            .map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = line.expect("no log line with the request id");
    assert!(line.contains("404"), "{line}");
    assert!(line.contains("traced-user"), "{line}");
}

/// An identity provider's key: its private half (DER, as jsonwebtoken signs with it) and its
/// public JWK, made by the `openssl` command.
struct ProviderKey {
    kid: String,
    algorithm: jsonwebtoken::Algorithm,
    private_der: Vec<u8>,
    jwk: Value,
}

fn openssl(args: &[&str], dir: &std::path::Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn ec_key(kid: &str, dir: &std::path::Path) -> ProviderKey {
    let pem = format!("{kid}.pem");
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &pem,
        ],
        dir,
    );
    let private_der = openssl(
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", &pem, "-outform", "DER",
        ],
        dir,
    );
    let public = openssl(&["ec", "-in", &pem, "-pubout", "-outform", "DER"], dir);
    // The uncompressed point (04 || x || y) ends the public key's DER.
    let point = &public[public.len() - 65..];
    assert_eq!(point[0], 4);
    ProviderKey {
        kid: kid.into(),
        algorithm: jsonwebtoken::Algorithm::ES256,
        private_der,
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..]),
        }),
    }
}

fn rsa_key(kid: &str, dir: &std::path::Path) -> ProviderKey {
    let pem = format!("{kid}.pem");
    openssl(&["genrsa", "-traditional", "-out", &pem, "2048"], dir);
    let private_der = openssl(
        &["rsa", "-in", &pem, "-traditional", "-outform", "DER"],
        dir,
    );
    let modulus =
        String::from_utf8(openssl(&["rsa", "-in", &pem, "-noout", "-modulus"], dir)).unwrap();
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    ProviderKey {
        kid: kid.into(),
        algorithm: jsonwebtoken::Algorithm::RS256,
        private_der,
        jwk: json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64url(&n), "e": "AQAB",
        }),
    }
}

impl ProviderKey {
    fn token(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut header = jsonwebtoken::Header::new(self.algorithm);
        header.kid = kid.map(str::to_string);
        let key = match self.algorithm {
            jsonwebtoken::Algorithm::ES256 => {
                jsonwebtoken::EncodingKey::from_ec_der(&self.private_der)
            }
            _ => jsonwebtoken::EncodingKey::from_rsa_der(&self.private_der),
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn signed(&self, claims: &Value) -> String {
        self.token(claims, Some(&self.kid))
    }
}

/// How long the api trusts a fetched key set in the test below.
const JWKS_REFRESH: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_an_identity_provider_are_checked_against_its_rotating_keys() {
    let dir = tempfile::tempdir().unwrap();
    let first = ec_key("ec-1", dir.path());
    let rsa = rsa_key("rsa-1", dir.path());
    let rotated = ec_key("ec-2", dir.path());

    // The provider's key set, served on loopback; it counts how often it is fetched.
    let published = Arc::new(Mutex::new(vec![first.jwk.clone(), rsa.jwk.clone()]));
    let fetches = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/.well-known/jwks.json",
        get({
            let published = published.clone();
            let fetches = fetches.clone();
            move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                let keys = published.lock().unwrap().clone();
                Json(json!({ "keys": keys }))
            }
        }),
    );
    let (jwks_addr, jwks_task) =
        hive_tests::serve_router(app, SocketAddr::from(([127, 0, 0, 1], 0)), "jwks")
            .await
            .unwrap();
    let jwks_url = format!("http://{jwks_addr}/.well-known/jwks.json");
    let mut stack = Stack::start(options_with(&[
        ("HIVE_JWKS_URL", &jwks_url),
        ("HIVE_JWT_ISSUER", "https://idp.example.test/"),
        ("HIVE_JWT_AUDIENCE", "hive"),
        (
            "HIVE_JWKS_REFRESH_SECS",
            &JWKS_REFRESH.as_secs().to_string(),
        ),
    ]))
    .await
    .unwrap();
    stack.start_api().unwrap();

    let exp = chrono::Utc::now().timestamp() + 600;
    let claims = |sub: &str| json!({ "sub": sub, "exp": exp, "iss": "https://idp.example.test/", "aud": "hive" });
    let list = |token: String| {
        let stack = &stack;
        async move { stack.get_as("/api/v1/nodes", Some(&token)).await.unwrap() }
    };

    // ES256 and RS256 tokens of the provider's keys are taken.
    let (status, body) = list(first.signed(&claims("idp-user"))).await;
    assert_eq!(status, 200, "ES256: {body}");
    let (status, body) = list(rsa.signed(&claims("idp-user"))).await;
    assert_eq!(status, 200, "RS256: {body}");

    // Wrong audience or issuer, no key id, expired, or signed by a key not in the set: 401.
    let mut wrong_aud = claims("idp-user");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("idp-user");
    wrong_iss["iss"] = json!("https://evil.example.net/");
    let mut expired = claims("idp-user");
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
    let mut not_yet = claims("idp-user");
    not_yet["nbf"] = json!(chrono::Utc::now().timestamp() + 3600);
    for (what, token) in [
        ("another audience", first.signed(&wrong_aud)),
        ("another issuer", first.signed(&wrong_iss)),
        ("no key id", first.token(&claims("idp-user"), None)),
        ("expired", first.signed(&expired)),
        ("not valid for another hour", first.signed(&not_yet)),
        // The rotated key's id is not published yet.
        ("an unknown key", rotated.signed(&claims("idp-user"))),
        // An HS256 token needs HIVE_JWT_SECRET's key (the stack sets it); made with a public
        // key's bytes as the secret, it is refused.
        ("a public key as an HMAC secret", {
            let secret = serde_json::to_vec(&first.jwk).unwrap();
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims("idp-user"),
                &jsonwebtoken::EncodingKey::from_secret(&secret),
            )
            .unwrap()
        }),
    ] {
        let (status, body) = list(token).await;
        assert_json_error(status, &body, 401, what);
    }
    let before = fetches.load(Ordering::SeqCst);

    // The provider rotates: a token of the new key is taken once the set is fetched again
    // (at most once per few seconds, so made-up key ids cannot flood the provider).
    published.lock().unwrap().push(rotated.jwk.clone());
    tokio::time::sleep(hive_api::auth::REFETCH_AT_MOST_EVERY + Duration::from_millis(500)).await;
    let (status, body) = list(rotated.signed(&claims("idp-user"))).await;
    assert_eq!(status, 200, "the rotated key: {body}");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        before + 1,
        "one fetch for the new key"
    );
    // Known keys are not fetched again.
    for _ in 0..5 {
        let (status, _) = list(first.signed(&claims("idp-user"))).await;
        assert_eq!(status, 200);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), before + 1);
    // Made-up key ids in a burst cost at most one more fetch.
    for i in 0..10 {
        let (status, _) = list(first.token(&claims("idp-user"), Some(&format!("bogus-{i}")))).await;
        assert_eq!(status, 401);
    }
    assert!(fetches.load(Ordering::SeqCst) <= before + 2);

    // HS256 tokens of the shared secret still work beside the provider's, with the same
    // issuer and audience checks.
    let hs = |claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(hive_tests::stack::JWT_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let (status, body) = list(hs(&claims("hs-user"))).await;
    assert_eq!(status, 200, "HS256: {body}");
    let (status, body) = list(hs(&wrong_aud)).await;
    assert_json_error(status, &body, 401, "HS256 of another audience");

    // The provider revokes a key: once the set's lifetime has passed, its tokens are refused,
    // though no token named an unknown key, while the keys still published are taken.
    published
        .lock()
        .unwrap()
        .retain(|jwk| jwk["kid"] != json!(first.kid));
    tokio::time::sleep(JWKS_REFRESH + Duration::from_millis(500)).await;
    let (status, body) = list(first.signed(&claims("idp-user"))).await;
    assert_json_error(status, &body, 401, "a revoked key");
    let (status, body) = list(rsa.signed(&claims("idp-user"))).await;
    assert_eq!(status, 200, "a key still published: {body}");
    jwks_task.abort();
}
