//! Prices over HTTP: where each price came from, a tenant's negotiated prices, and the token
//! kinds of a record.

use serde_json::{Value, json};

use crate::support::*;

const CONFIG: &str = r#"
[tiers.free]
usd_per_day = "1000"
usd_per_month = "10000"
tokens_per_day = "unlimited"
requests_per_minute = "unlimited"

[prices."claude-sonnet-4-5"]
input = "2"
output = "10"
"#;

async fn price(s: &TestServer, query: &str, key: &str) -> (u16, Value) {
    s.get(&format!("/v1/prices?{query}"), key).await
}

async fn set_prices(s: &TestServer, tenant: &str, key: &str, body: Value) -> (u16, Value) {
    let (st, v, _) = s
        .call(
            M::PUT,
            &format!("/v1/admin/tenants/{tenant}/prices"),
            Some(key),
            Some(body),
        )
        .await;
    (st, v)
}

fn usage(tenant: &str, model: &str, extra: Value) -> Value {
    let mut body = json!({
        "tenant_id": tenant, "user_id": "u", "model": model,
        "input_tokens": 1_000_000, "output_tokens": 1_000_000,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn prices_name_their_source_and_a_tenant_override_beats_config_and_catalog() {
    let s = spawn(CONFIG).await;

    // Config beats the catalog, for dated names too.
    let (st, v) = price(&s, "model=claude-sonnet-4-5-20250929", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let m = &v["models"][0];
    assert_eq!(
        (m["source"].as_str(), m["input"].as_f64()),
        (Some("config"), Some(2.0))
    );
    // A catalog price, with its provider and cache prices.
    let (_, v) = price(&s, "model=claude-haiku-4-5", ADMIN).await;
    let m = &v["models"][0];
    assert_eq!(m["source"], "catalog");
    assert_eq!(m["provider"], "anthropic");
    assert_eq!(
        (m["cache_write"].as_f64(), m["cache_write_1h"].as_f64()),
        (Some(1.25), Some(2.0))
    );
    assert!(v["catalog"].as_str().unwrap().starts_with("litellm "));
    // A long-context tier.
    let (_, v) = price(&s, "model=gemini/gemini-2.5-pro", ADMIN).await;
    assert_eq!(v["models"][0]["long_context"]["above_tokens"], 200_000);
    // No price, unknown models denied: 404.
    let (st, e) = price(&s, "model=mystery-model", ADMIN).await;
    assert_eq!((st, error_code(&e)), (404, "unknown_model"));
    // The whole list names its sources.
    let (_, v) = s.get("/v1/prices", ADMIN).await;
    let list = v["models"].as_array().unwrap();
    assert!(list.len() > 1000, "{}", list.len());
    assert!(list.iter().any(|m| m["source"] == "config"));

    // A tenant's negotiated prices: half of everything, its own price for one model.
    let body = json!({
        "multiplier": "0.5",
        "models": { "claude-sonnet-4-5": { "input": "1", "output": "1" } }
    });
    let (st, v) = set_prices(&s, "acme", ADMIN, body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["multiplier"], json!(0.5));
    let acme = s.tenant_key("acme").await;
    let (st, e) = set_prices(&s, "acme", &acme, body).await;
    assert_eq!(st, 403, "{e}");
    // A tenant key sees its own overrides, and no other tenant's.
    let (_, v) = price(&s, "model=claude-haiku-4-5", &acme).await;
    let m = &v["models"][0];
    assert_eq!(
        (m["source"].as_str(), m["multiplier"].as_f64()),
        (Some("tenant_override"), Some(0.5))
    );
    let (st, _) = price(&s, "model=claude-haiku-4-5&tenant_id=globex", &acme).await;
    assert_eq!(st, 403);
    let (_, v) = price(&s, "model=claude-sonnet-4-5&tenant_id=acme", ADMIN).await;
    assert_eq!(
        (
            v["models"][0]["input"].as_f64(),
            v["models"][0]["multiplier"].clone()
        ),
        (Some(1.0), Value::Null)
    );

    // Records: the tenant's own price, the config's for another tenant, the catalog's
    // scaled by the tenant's multiplier.
    let (st, u) = s
        .post(
            "/v1/usage",
            ADMIN,
            usage("acme", "claude-sonnet-4-5", json!({})),
        )
        .await;
    assert_eq!(st, 201, "{u}");
    assert_eq!(
        (u["pricing"].as_str(), u["cost_usd"].as_f64()),
        (Some("tenant_override"), Some(2.0))
    );
    let (_, u) = s
        .post(
            "/v1/usage",
            ADMIN,
            usage("globex", "claude-sonnet-4-5", json!({})),
        )
        .await;
    assert_eq!(
        (u["pricing"].as_str(), u["cost_usd"].as_f64()),
        (Some("config"), Some(12.0))
    );
    let (_, u) = s
        .post(
            "/v1/usage",
            ADMIN,
            usage("acme", "claude-haiku-4-5", json!({})),
        )
        .await;
    // Half of 1M x 1 + 1M x 5.
    assert_eq!(
        (u["pricing"].as_str(), u["cost_usd"].as_f64()),
        (Some("tenant_override"), Some(3.0))
    );

    // Cleared: the configured price again.
    let (st, _) = set_prices(&s, "acme", ADMIN, json!({})).await;
    assert_eq!(st, 200);
    let (_, u) = s
        .post(
            "/v1/usage",
            ADMIN,
            usage("acme", "claude-sonnet-4-5", json!({})),
        )
        .await;
    assert_eq!(u["pricing"], "config");
}

#[tokio::test]
async fn bad_tenant_prices_are_refused_with_a_400() {
    let s = spawn(CONFIG).await;
    for body in [
        json!({ "multiplier": "1000.5" }),
        json!({ "multiplier": "-1" }),
        json!({ "multiplier": "abc" }),
        json!({ "discount": "0.5" }),
        json!({ "models": { "bad name": { "input": "1", "output": "1" } } }),
        json!({ "models": { "m": { "input": "1" } } }),
        json!({ "models": { "m": { "input": "1", "output": "1", "bogus": "1" } } }),
        json!({ "models": { "m": { "input": "-1", "output": "1" } } }),
    ] {
        let (st, e) = set_prices(&s, "acme", ADMIN, body.clone()).await;
        assert_eq!(st, 400, "{body}: {e}");
    }
    let (st, _) = set_prices(&s, "bad%20tenant", ADMIN, json!({})).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn token_kinds_are_recorded_priced_and_checked() {
    let s = spawn(CONFIG).await;
    let kinds = json!({
        "input_tokens": 10_000, "cached_input_tokens": 2_000,
        "cache_creation_input_tokens": 3_000, "cache_creation_1h_input_tokens": 1_000,
        "output_tokens": 1_000, "reasoning_tokens": 400,
    });
    let (st, u) = s
        .post("/v1/usage", ADMIN, usage("acme", "claude-haiku-4-5", kinds))
        .await;
    assert_eq!(st, 201, "{u}");
    // 5000 x 1 + 2000 x 0.10 + 2000 x 1.25 + 1000 x 2 + 1000 x 5 (reasoning at the output
    // price) = 14700 micro-dollars.
    assert_eq!(u["cost_usd"], json!(0.0147));
    assert_eq!(u["pricing"], "catalog");
    assert_eq!(
        (
            &u["cache_creation_input_tokens"],
            &u["cache_creation_1h_input_tokens"],
            &u["reasoning_tokens"],
            &u["long_context_above"],
        ),
        (&json!(3_000), &json!(1_000), &json!(400), &Value::Null)
    );
    // Above the long-context threshold the tier is kept on the record.
    let (_, u) = s
        .post(
            "/v1/usage",
            ADMIN,
            usage(
                "acme",
                "gemini/gemini-2.5-pro",
                json!({ "input_tokens": 250_000, "output_tokens": 10 }),
            ),
        )
        .await;
    assert_eq!(u["long_context_above"], 200_000);

    // A commit carries the kinds too.
    let (_, r) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    let id = r["reservation_id"].as_str().unwrap();
    let (st, c) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 100, "output_tokens": 50, "reasoning_tokens": 20,
                    "cache_creation_input_tokens": 10 }),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(
        (
            c["reasoning_tokens"].as_u64(),
            c["cache_creation_input_tokens"].as_u64()
        ),
        (Some(20), Some(10))
    );

    // A part larger than its whole: 400.
    for extra in [
        json!({ "input_tokens": 10, "cached_input_tokens": 6, "cache_creation_input_tokens": 5 }),
        json!({ "input_tokens": 10, "cache_creation_input_tokens": 5, "cache_creation_1h_input_tokens": 6 }),
        json!({ "output_tokens": 10, "reasoning_tokens": 11 }),
        json!({ "reasoning_tokens": -1 }),
    ] {
        let (st, e) = s
            .post("/v1/usage", ADMIN, usage("acme", "gpt-4o", extra.clone()))
            .await;
        assert_eq!(
            (st, error_code(&e)),
            (400, "invalid_request"),
            "{extra}: {e}"
        );
    }
}
