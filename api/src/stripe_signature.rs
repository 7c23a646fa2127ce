//! Stripe's webhook signature scheme: `Stripe-Signature: t=<unix>,v1=<hex hmac>,v1=...`, where
//! each `v1` is HMAC-SHA256 over `"<t>.<raw body>"` with an endpoint secret.
//!
//! Written here rather than taken from async-stripe's `Webhook::construct_event`, which checks
//! one secret with a fixed 5-minute tolerance: we check every configured secret (rotation) with a
//! configurable tolerance, and parse the event separately.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("Stripe-Signature header is malformed")]
    Malformed,
    #[error("no v1 signature matches any configured secret")]
    NoMatch,
    #[error("signature timestamp is outside the tolerance")]
    Stale,
}

/// Verifies `header` over `payload` against every secret; `now` is Unix seconds.
pub fn verify(
    header: &str,
    payload: &[u8],
    secrets: &[String],
    tolerance: Duration,
    now: i64,
) -> Result<(), SignatureError> {
    let mut timestamp: Option<i64> = None;
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            return Err(SignatureError::Malformed);
        };
        match key {
            "t" => timestamp = Some(value.parse().map_err(|_| SignatureError::Malformed)?),
            // A v1 that is not hex cannot match; others may still.
            "v1" => {
                if let Ok(sig) = hex::decode(value) {
                    candidates.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::NoMatch);
    }
    let matched = secrets.iter().any(|secret| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        // verify_slice compares in constant time.
        candidates
            .iter()
            .any(|c| mac.clone().verify_slice(c).is_ok())
    });
    if !matched {
        return Err(SignatureError::NoMatch);
    }
    if (now - t).unsigned_abs() > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// The header Stripe would send for `payload` signed with `secret` at `t` (for tests and the
/// local stack's example sender).
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Duration = Duration::from_secs(300);

    fn secrets() -> Vec<String> {
        vec!["whsec_old".into(), "whsec_new".into()]
    }

    #[test]
    fn accepts_any_configured_secret_and_any_v1() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(body, "whsec_new", 1000);
        assert_eq!(verify(&good, body, &secrets(), TOL, 1000), Ok(()));
        let v1 = good.split_once(",v1=").unwrap().1;
        let two = format!("t=1000,v1={},v1={v1},v0=abc", "00".repeat(32));
        assert_eq!(verify(&two, body, &secrets(), TOL, 1100), Ok(()));
    }

    #[test]
    fn rejects_forged_stale_wrong_secret_and_garbage() {
        let body = br#"{"id":"evt_1"}"#;
        let wrong = sign(body, "whsec_other", 1000);
        assert_eq!(
            verify(&wrong, body, &secrets(), TOL, 1000),
            Err(SignatureError::NoMatch)
        );
        let good = sign(body, "whsec_old", 1000);
        assert_eq!(
            verify(&good, b"{\"id\":\"evt_2\"}", &secrets(), TOL, 1000),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify(&good, body, &secrets(), TOL, 1301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&good, body, &secrets(), TOL, 699),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify("garbage", body, &secrets(), TOL, 1000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify("t=1000", body, &secrets(), TOL, 1000),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify("t=x,v1=00", body, &secrets(), TOL, 1000),
            Err(SignatureError::Malformed)
        );
    }
}
