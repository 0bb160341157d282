//! The OpenAPI 3.1 document, generated from the route table that also builds the router and
//! from the request, query and answer types themselves (`schemars`), so neither the routes
//! nor the shapes can drift from the code.
//!
//! The types here only describe formats the Rust types cannot say by themselves (money,
//! instants, ids, the closed sets of names the API answers with).

use std::borrow::Cow;

use schemars::generate::{Contract, SchemaSettings};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{Answer, ROUTES};

/// Schemas for requests (what is accepted) and for answers (what is sent).
#[derive(Debug)]
pub struct Generators {
    pub requests: SchemaGenerator,
    pub answers: SchemaGenerator,
}

fn generator(contract: Contract) -> SchemaGenerator {
    SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
            s.contract = contract;
        })
        .into_generator()
}

/// A schema for a request body or query string.
pub fn request<T: JsonSchema>(g: &mut Generators) -> Schema {
    g.requests.subschema_for::<T>()
}

/// A schema for an answer.
pub fn answer<T: JsonSchema>(g: &mut Generators) -> Schema {
    g.answers.subschema_for::<T>()
}

macro_rules! described {
    ($(#[$doc:meta])* $name:ident, $schema:tt) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl JsonSchema for $name {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

described!(
    /// An amount of USD in an answer: a number with at most 6 decimals (a decimal string from
    /// a billion USD up, which a float cannot hold to the micro-dollar).
    Usd,
    {
        "type": ["number", "string"],
        "description": "USD, at most 6 decimals: a number, or from 1,000,000,000 USD up a decimal string (\"9223372036854.775807\"), which a float cannot hold to the micro-dollar"
    }
);
described!(
    /// An amount of USD in a request: a non-negative number or decimal string, parsed exactly
    /// (rounded up to a micro-dollar).
    UsdIn,
    {
        "description": "USD as a number or a decimal string (\"0.75\"), parsed exactly",
        "anyOf": [
            { "type": "number", "minimum": 0 },
            { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$" }
        ]
    }
);
described!(
    /// A price multiplier: a non-negative number or decimal string, exact to six decimals.
    Multiplier,
    {
        "description": "A multiplier as a number or a decimal string (\"0.85\"), exact to six decimals, at most 1000",
        "anyOf": [
            { "type": "number", "minimum": 0, "maximum": 1000 },
            { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$" }
        ]
    }
);
described!(
    /// An id of a tenant, company, user, model or endpoint, or an idempotency key.
    Id,
    { "type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:@/-]+$" }
);
described!(
    /// A UUID (reservations and usage records).
    UuidStr,
    { "type": "string", "format": "uuid" }
);
described!(
    /// A calendar day, `YYYY-MM-DD`.
    DateStr,
    { "type": "string", "format": "date" }
);
described!(
    /// An instant, RFC 3339 in UTC.
    DateTime,
    { "type": "string", "format": "date-time" }
);
described!(
    /// A token count.
    Count,
    { "type": "integer", "minimum": 0 }
);

impl JsonSchema for crate::api::Rfc3339 {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "DateTime".into()
    }
    fn json_schema(g: &mut SchemaGenerator) -> Schema {
        DateTime::json_schema(g)
    }
}

/// The closed sets of names the API uses.
macro_rules! names {
    ($($(#[$doc:meta])* $name:ident [$($v:ident),+])*) => {$(
        $(#[$doc])*
        #[derive(Debug, Serialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($v),+ }
    )*};
}

names! {
    /// The kind of a budget's scope.
    ScopeName [Global, Tenant, Company, User]
    /// A limit's window.
    WindowName [Minute, Day, Month, None]
    /// What a limit counts.
    UnitName [Usd, Requests, Tokens, Concurrent]
    /// The state a release left a reservation in.
    SettledName [Released, Expired, Committed]
    /// How a call ended.
    RequestStatusName [Success, Error, Cancelled, Expired, Truncated]
    /// How a usage record's cost was found.
    PricingName [Catalog, Config, TenantOverride, Caller, Estimate, Default, Free]
    /// Where a price came from.
    PriceSourceName [Catalog, Config, TenantOverride, Default, Free]
    /// A report's grouping.
    GroupByName [Day, Tenant, Company, User, Model, Endpoint]
    /// A report's format.
    ReportFormat [Json, Csv]
    /// The unit of prices.
    PriceUnit [UsdPerMillionTokens]
    /// What happens to a model with no price.
    UnknownModel [Deny, DefaultCost, Free]
    /// The write path's state.
    StoreHealthName [Ok, Spooling]
    /// What new reservations get while the store cannot be written.
    OnStoreErrorName [Spool, Deny]
    /// An alert's kind.
    AlertKindName [Threshold, Projected, DeadLetter, SoftThreshold]
    /// Every `error.code` the API answers with.
    ErrorCode [
        InvalidRequest, MalformedJson, UnsupportedMediaType, BodyTooLarge, Unauthorized,
        Forbidden, NotFound, MethodNotAllowed, Timeout, Conflict, AlreadySettled,
        CommitConflict, IdempotencyConflict, BudgetExceeded, RateLimited, ModelNotAllowed,
        UnknownModel, MaxOutputTokensExceeded, TooManySubjects, StoreUnavailable, NotStored,
        Starting, ShuttingDown, Busy, Internal
    ]
}

/// A commit's `status` (`expired` is the sweeper's alone).
#[derive(Debug, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommitStatus {
    Success,
    Error,
    Cancelled,
    /// The output was cut off before its usage was known; a commit is charged at least its
    /// reservation's estimate.
    Truncated,
}

/// A user's tier and limit overrides (`PUT /v1/admin/users/{user_id}`): each field set wins
/// over the tier; an empty object clears them.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct UserOverridesSchema {
    #[serde(default)]
    tier: Option<Id>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    requests_per_day: Option<u64>,
    #[serde(default)]
    tokens_per_day: Option<u64>,
    #[serde(default)]
    max_concurrent: Option<u32>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    /// Glob patterns (`gpt-4o*`).
    #[serde(default)]
    allowed_models: Option<Vec<String>>,
}

/// A long-context tier of a price in a request: above `above_tokens` prompt tokens these
/// replace the base prices (USD per million tokens).
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct LongContextSchema {
    above_tokens: u64,
    input: UsdIn,
    output: UsdIn,
    #[serde(default)]
    cached_input: Option<UsdIn>,
    #[serde(default)]
    cache_write: Option<UsdIn>,
    #[serde(default)]
    cache_write_1h: Option<UsdIn>,
}

/// A model's price in a request, USD per million tokens (per-request and per-image prices:
/// USD each), as in the configuration's `[prices]`.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct PriceSchema {
    input: UsdIn,
    output: UsdIn,
    /// Defaults to `input`.
    #[serde(default)]
    cached_input: Option<UsdIn>,
    /// The 5-minute cache write; defaults to `input`.
    #[serde(default)]
    cache_write: Option<UsdIn>,
    /// The 1-hour cache write; defaults to `cache_write`.
    #[serde(default)]
    cache_write_1h: Option<UsdIn>,
    /// Defaults to `output`.
    #[serde(default)]
    reasoning: Option<UsdIn>,
    #[serde(default)]
    per_request: Option<UsdIn>,
    #[serde(default)]
    per_image_input: Option<UsdIn>,
    #[serde(default)]
    per_image_output: Option<UsdIn>,
    #[serde(default)]
    long_context: Option<LongContextSchema>,
}

/// A failing limit (in a 429 and in a check's denial).
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    code: ErrorCode,
    message: String,
    /// The failing limits (429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limits: Option<Vec<crate::api::LimitDoc>>,
}

/// Every error: `{"error": {"code": ..., "message": ..., ...details}}`.
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// The login form of the dashboard.
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct LoginForm {
    /// The admin key or a tenant key.
    key: String,
}

/// A dashboard form that carries only the session's CSRF token.
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct CsrfForm {
    csrf: String,
}

/// The dashboard's acknowledgement of an alert.
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct AckForm {
    csrf: String,
    /// Where to go afterwards (a path on this site).
    back: Option<String>,
}

/// The dashboard's budget form (empty amounts clear the override).
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct BudgetForm {
    csrf: String,
    /// global, tenant, company or user.
    scope: String,
    tenant_id: Option<String>,
    /// The company or user.
    id: Option<String>,
    daily_usd: Option<String>,
    monthly_usd: Option<String>,
}

/// The dashboard's user tier form (an empty tier: the default).
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct UserForm {
    csrf: String,
    tenant_id: String,
    user_id: String,
    tier: Option<String>,
}

/// The dashboard's form to create a tenant key.
#[derive(Debug, JsonSchema)]
#[allow(dead_code)]
pub struct KeyForm {
    csrf: String,
    tenant_id: String,
}

fn html(description: &str) -> Value {
    json!({ "description": description, "content": { "text/html": { "schema": { "type": "string" } } } })
}

fn redirect(description: &str) -> Value {
    json!({
        "description": description,
        "headers": { "Location": { "schema": { "type": "string" } } }
    })
}

/// The error answers a route can give, each with the error shape.
fn errors(route: &crate::RouteDoc) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![("400", "Invalid input (query string, path, body)")];
    if route.auth {
        out.push(("401", "No key, or an unknown or revoked one"));
        out.push((
            "403",
            "A tenant key acting on another tenant, or on an admin route",
        ));
    }
    out.push(("404", "Unknown id"));
    out.push(("405", "Wrong method"));
    out.push(("408", "The request took too long"));
    if route.body.is_some() {
        out.push((
            "409",
            "Idempotency conflict, or the reservation is already settled",
        ));
        out.push(("413", "The body is over 64 KiB"));
        out.push(("415", "The body is not sent as application/json"));
    }
    if route.path == "/v1/reservations" {
        out.push((
            "429",
            "A limit is reached (Retry-After, RateLimit-Policy and RateLimit headers)",
        ));
    }
    if route.auth {
        out.push((
            "503",
            "The store is unavailable (on_store_error = \"deny\") or shutting down",
        ));
    }
    out
}

/// The whole document.
pub fn document() -> Value {
    let mut g = Generators {
        requests: generator(Contract::Deserialize),
        answers: generator(Contract::Serialize),
    };
    let error = answer::<ErrorBody>(&mut g);
    let mut paths = Map::new();
    for route in ROUTES {
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                let schema = match name {
                    "scope" => {
                        json!({ "type": "string", "enum": ["global", "tenant", "company", "user"] })
                    }
                    "user_id" => Value::from(Id::json_schema(&mut g.requests)),
                    _ => json!({ "type": "string" }),
                };
                json!({ "name": name, "in": "path", "required": true, "schema": schema })
            })
            .collect();
        if let Some(query) = route.query {
            params.extend(query_parameters(&mut g, query));
        }
        let mut op = Map::new();
        op.insert("summary".into(), route.summary.into());
        op.insert(
            "operationId".into(),
            format!("{} {}", route.method, route.path).into(),
        );
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(body) = route.body {
            let schema = Value::from(body(&mut g));
            let content = if matches!(route.answer, Answer::Redirect) {
                json!({ "application/x-www-form-urlencoded": { "schema": schema } })
            } else {
                json!({ "application/json": { "schema": schema } })
            };
            op.insert(
                "requestBody".into(),
                json!({ "required": route.path != "/v1/reservations/{id}/release", "content": content }),
            );
        }
        let mut responses = Map::new();
        match route.answer {
            Answer::Json(status, schema) => {
                let schema = Value::from(schema(&mut g));
                let mut ok = json!({
                    "description": "Success",
                    "content": { "application/json": { "schema": schema } }
                });
                if route.path == "/v1/reports/usage" {
                    ok["content"]["text/csv"] = json!({ "schema": { "type": "string" } });
                    ok["description"] = "The report (JSON, or CSV with ?format=csv)".into();
                }
                responses.insert(status.to_string(), ok.clone());
                // Replays answer 200 where a first call answers 201.
                if status == 201 {
                    responses.insert("200".into(), ok);
                }
            }
            Answer::Text => {
                responses.insert(
                    "200".into(),
                    json!({ "description": "Prometheus text exposition",
                            "content": { "text/plain": { "schema": { "type": "string" } } } }),
                );
            }
            Answer::Html => {
                responses.insert("200".into(), html("The page"));
            }
            Answer::Dashboard => {
                responses.insert("200".into(), html("The dashboard"));
                responses.insert("303".into(), redirect("Not signed in: to /login"));
                responses.insert("400".into(), html("An invalid id or query"));
                responses.insert(
                    "403".into(),
                    html("Another tenant's page, or an admin page"),
                );
                responses.insert("404".into(), html("No such record"));
                responses.insert("503".into(), html("The store is unavailable"));
            }
            Answer::Csv => {
                responses.insert(
                    "200".into(),
                    json!({ "description": "The report as CSV",
                            "content": { "text/csv": { "schema": { "type": "string" } } } }),
                );
                responses.insert("303".into(), redirect("Not signed in: to /login"));
                responses.insert("400".into(), html("An invalid query"));
                responses.insert("403".into(), html("Another tenant's figures"));
                responses.insert("503".into(), html("The store is unavailable"));
            }
            Answer::Redirect => {
                responses.insert("303".into(), redirect("Done: to the next page"));
                responses.insert("201".into(), html("Created: the new key, shown once"));
                for (code, what) in [
                    ("400", "Invalid form"),
                    ("401", "Wrong key, or no session"),
                    ("403", "Not the admin, no session, or a stale CSRF token"),
                    ("404", "No such alert or key"),
                    ("413", "The form is too large"),
                    ("429", "Too many attempts"),
                    ("503", "The store is unavailable"),
                ] {
                    responses.insert(code.into(), html(what));
                }
            }
            Answer::Ready => {
                let schema = Value::from(answer::<crate::api::ReadyOut>(&mut g));
                let body = json!({ "application/json": { "schema": schema } });
                responses.insert(
                    "200".into(),
                    json!({ "description": "Ready", "content": body.clone() }),
                );
                responses.insert(
                    "503".into(),
                    json!({ "description": "Not ready (store down with on_store_error = \"deny\", or shutting down)", "content": body }),
                );
            }
        }
        if !matches!(
            route.answer,
            Answer::Html | Answer::Dashboard | Answer::Redirect | Answer::Csv
        ) {
            for (code, what) in errors(route) {
                responses.entry(code).or_insert_with(|| {
                    let mut r = json!({
                        "description": what,
                        "content": { "application/json": { "schema": Value::from(error.clone()) } }
                    });
                    if code == "429" {
                        r["headers"] = json!({
                            "Retry-After": { "schema": { "type": "integer" } },
                            "RateLimit-Policy": { "schema": { "type": "string" } },
                            "RateLimit": { "schema": { "type": "string" } }
                        });
                    }
                    r
                });
            }
        } else {
            for (code, what) in [("405", "Wrong method"), ("408", "Too slow")] {
                responses.insert(
                    code.into(),
                    json!({ "description": what,
                            "content": { "application/json": { "schema": Value::from(error.clone()) } } }),
                );
            }
        }
        op.insert("responses".into(), Value::Object(responses));
        if route.auth {
            op.insert("security".into(), json!([{ "bearer": [] }]));
        }
        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method] = Value::Object(op);
    }
    let mut schemas = g.requests.take_definitions(true);
    for (name, schema) in g.answers.take_definitions(true) {
        schemas.entry(name).or_insert(schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "spendguard",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stops AI bills from running away: reserve before a model call, commit after it.",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" }
        },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas
        }
    })
}

/// A query struct's fields as OpenAPI parameters.
fn query_parameters(g: &mut Generators, query: fn(&mut Generators) -> Schema) -> Vec<Value> {
    let schema = Value::from(query(g));
    // A `$ref` to a definition: look it up.
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default();
            g.requests
                .definitions()
                .get(name)
                .cloned()
                .unwrap_or(Value::Null)
        }
        None => schema,
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .map(|(name, s)| {
                    let s = &not_null(s.clone());
                    let mut p = json!({
                        "name": name,
                        "in": "query",
                        "required": required.contains(&name.as_str()),
                        "schema": s,
                    });
                    if let Some(d) = s.get("description") {
                        p["description"] = d.clone();
                    }
                    p
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A query parameter's schema without `null` (a query string has no null: the parameter is
/// left out instead).
fn not_null(mut s: Value) -> Value {
    if let Some(o) = s.as_object_mut() {
        if o.get("default") == Some(&Value::Null) {
            o.remove("default");
        }
        if let Some(Value::Array(types)) = o.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let t = types[0].clone();
                o.insert("type".into(), t);
            }
        }
        if let Some(Value::Array(any)) = o.get_mut("anyOf") {
            any.retain(|a| a.get("type").and_then(Value::as_str) != Some("null"));
            if any.len() == 1 {
                let only = any.remove(0);
                o.remove("anyOf");
                if let Value::Object(inner) = only {
                    for (k, v) in inner {
                        o.entry(k).or_insert(v);
                    }
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r);
                }
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 20, "{all:?}");
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} points outside the components"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not defined"
            );
        }
    }

    #[test]
    fn the_user_overrides_schema_names_the_stored_fields() {
        // The core type has no schema of its own (the core depends on no schema crate).
        let stored = serde_json::to_value(spendguard_core::UserOverrides::default()).unwrap();
        let mut stored: Vec<&String> = stored.as_object().unwrap().keys().collect();
        stored.sort();
        let doc = document();
        let schema = &doc["components"]["schemas"]["UserOverridesSchema"];
        let mut documented: Vec<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        documented.sort();
        assert_eq!(documented, stored);
        assert_eq!(schema["additionalProperties"], false);
    }

    #[test]
    fn query_parameters_are_never_null() {
        let doc = document();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let text = p["schema"].to_string();
                    assert!(!text.contains("null"), "{method} {path}: {p}");
                }
            }
        }
    }
}
