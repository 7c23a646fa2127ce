//! The id of the request being answered (`X-Request-Id`: the caller's own, else one we made),
//! for handlers that hand work on: the nodes a request changes record it, and the worker's log
//! lines of the steps it causes carry it.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// The header, on the way in and out.
pub const HEADER: &str = "x-request-id";

#[derive(Debug, Clone)]
pub struct RequestId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestId(
            parts
                .headers
                .get(HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= 200)
                .map(str::to_string),
        ))
    }
}

impl RequestId {
    /// Names this request on the transaction, so the nodes it changes record it.
    pub async fn tag(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), hive_jobs::store::StoreError> {
        match &self.0 {
            Some(id) => hive_jobs::store::tag_request(tx, id).await,
            None => Ok(()),
        }
    }
}
