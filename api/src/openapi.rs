//! The published contract: an OpenAPI 3.1 document generated from the handlers and the types
//! they answer with, served at `GET /openapi.json`, with a browsable page at `/docs`.
//!
//! Each handler declares the answers particular to it; what every call of the app's API may
//! answer (401, 413, 429, 500) and its bearer token are added here, once.

use axum::extract::State;
use axum::Json;
use serde_json::Value;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, OpenApi as Document, Ref, Type,
};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hive Provisioner API",
        description = "The customer's app reads and controls its nodes and billing. Calls under \
            `/api/v1` carry a bearer JWT whose `sub` is the user. Every error answers \
            `{\"error\": {\"code\", \"message\"}}` with a stable `code`."
    ),
    paths(
        crate::nodes::list_nodes,
        crate::nodes::create_node,
        crate::nodes::get_node,
        crate::nodes::delete_node,
        crate::nodes::restart_node,
        crate::nodes::stop_node,
        crate::nodes::start_node,
        crate::wait::wait_for_status,
        crate::billing::billing,
        crate::billing::usage,
        crate::checkout::checkout,
        crate::checkout::portal,
        crate::webhook::stripe_webhook,
        crate::healthz,
    ),
    components(schemas(ErrorBody)),
    modifiers(&CommonAnswers),
    tags(
        (name = "nodes", description = "The user's nodes and their controls"),
        (name = "billing", description = "The user's subscriptions, usage and Stripe sessions"),
        (name = "stripe", description = "Stripe's webhook (signed by Stripe, not by the app)"),
        (name = "health", description = "Liveness"),
    )
)]
pub struct ApiDoc;

/// The name of the bearer scheme in the document.
const BEARER: &str = "bearer";

struct CommonAnswers;

fn error_answer(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    )
}

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        let rate_limited: Response =
            error_answer("Over the rate limit; try again after `Retry-After`")
                .header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("Seconds to wait"))
                        .build(),
                )
                .build();
        for (path, item) in doc.paths.paths.iter_mut() {
            let app = path.starts_with("/api/");
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.patch.as_mut(),
                item.delete.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                add_common(operation, app, &rate_limited);
            }
        }
    }
}

fn add_common(operation: &mut Operation, app: bool, rate_limited: &Response) {
    let answers = &mut operation.responses.responses;
    let mut add = |status: &str, response: Response| {
        answers.entry(status.to_string()).or_insert(response.into());
    };
    if app {
        add(
            "400",
            error_answer("A malformed request (header, parameter or body)").build(),
        );
        add("401", error_answer("No valid bearer token").build());
        operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    }
    if operation.request_body.is_some() || app {
        add(
            "413",
            error_answer("The body is larger than the api accepts").build(),
        );
    }
    add("429", rate_limited.clone());
    add(
        "500",
        error_answer("Something failed on our side; the cause is in our log").build(),
    );
}

/// `GET /openapi.json`: the document, with the plans and regions this api serves as the only
/// values of the fields that name one, and its return URL origins as the pattern of the URLs
/// (they come from its settings, not from the code).
pub async fn document(State(state): State<AppState>) -> Json<Value> {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    // Only the plans a checkout can buy: those with a Stripe price.
    let mut plans: Vec<&String> = state
        .config
        .plans
        .0
        .iter()
        .filter(|(_, plan)| !plan.prices.is_empty())
        .map(|(name, _)| name)
        .collect();
    plans.sort();
    let regions = &state.config.regions;
    allow_only(&mut doc, "CheckoutRequest", "plan", &plans, false);
    allow_only(&mut doc, "CheckoutRequest", "region", regions, true);
    allow_only(&mut doc, "CreateNode", "region", regions, true);
    let on_origins = origins_pattern(&state.config.return_url_origins);
    for (schema, field) in [
        ("CheckoutRequest", "success_url"),
        ("CheckoutRequest", "cancel_url"),
        ("PortalRequest", "return_url"),
    ] {
        let pointer = format!("/components/schemas/{schema}/properties/{field}");
        if let Some(Value::Object(property)) = doc.pointer_mut(&pointer) {
            property.insert("pattern".into(), Value::String(on_origins.clone()));
        }
    }
    Json(doc)
}

/// A URL on one of `origins` (`HIVE_RETURN_URL_ORIGINS`), as a pattern of the contract.
fn origins_pattern(origins: &[String]) -> String {
    if origins.is_empty() {
        // None configured: no URL is taken.
        return "^(?!)$".into();
    }
    let escaped: Vec<String> = origins
        .iter()
        .map(|o| {
            o.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_string()
                    } else {
                        format!("\\{c}")
                    }
                })
                .collect()
        })
        .collect();
    format!("^(?:{})(?:[/?#].*)?$", escaped.join("|"))
}

fn allow_only<S: serde::Serialize>(
    doc: &mut Value,
    schema: &str,
    field: &str,
    values: &[S],
    nullable: bool,
) {
    let pointer = format!("/components/schemas/{schema}/properties/{field}");
    if let Some(Value::Object(property)) = doc.pointer_mut(&pointer) {
        let mut allowed: Vec<Value> = values
            .iter()
            .filter_map(|v| serde_json::to_value(v).ok())
            .collect();
        if nullable {
            allowed.push(Value::Null);
        }
        property.insert("enum".into(), Value::Array(allowed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/api/v1/nodes",
            "/api/v1/nodes/{id}",
            "/api/v1/nodes/{id}/wait",
            "/api/v1/nodes/{id}/restart",
            "/api/v1/nodes/{id}/stop",
            "/api/v1/nodes/{id}/start",
            "/api/v1/billing",
            "/api/v1/usage",
            "/api/v1/billing/checkout",
            "/api/v1/billing/portal",
            "/webhooks/stripe",
            "/healthz",
        ] {
            assert!(paths.contains_key(path), "{path} is missing");
        }
        let get = &paths["/api/v1/nodes/{id}"]["get"];
        assert_eq!(get["security"][0]["bearer"], serde_json::json!([]));
        for status in ["200", "401", "404", "429", "500"] {
            assert!(get["responses"].get(status).is_some(), "{status}");
        }
        assert!(paths["/webhooks/stripe"]["post"].get("security").is_none());
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        assert!(codes.as_array().unwrap().contains(&"rate_limited".into()));
    }
}
