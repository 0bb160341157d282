//! The OpenAPI 3.1 document, generated from the route table that also builds the router.

use serde_json::{Map, Value, json};

use crate::ROUTES;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = Map::new();
        op.insert("summary".into(), route.summary.into());
        op.insert(
            "operationId".into(),
            format!("{} {}", route.method, route.path).into(),
        );
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(schema) = route.body {
            op.insert(
                "requestBody".into(),
                json!({ "required": route.path != "/v1/reservations/{id}/release",
                        "content": { "application/json": { "schema": schema() } } }),
            );
        }
        let mut responses = Map::new();
        responses.insert("2XX".into(), json!({ "description": "Success (JSON)" }));
        responses.insert("4XX".into(), error_response("Invalid request, unknown key (401), another tenant (403), not found, conflict (409), too large (413) or a limit reached (429, with Retry-After)"));
        responses.insert(
            "5XX".into(),
            error_response("Store unavailable (503) or an internal error"),
        );
        op.insert("responses".into(), Value::Object(responses));
        if route.auth {
            op.insert("security".into(), json!([{ "bearer": [] }]));
        }
        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "spendguard",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stops AI bills from running away: reserve before a model call, commit after it."
        },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": { "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": { "type": "string" },
                            "message": { "type": "string" },
                            "limits": { "type": "array", "items": { "type": "object" } }
                        }
                    } }
                }
            }
        }
    })
}
