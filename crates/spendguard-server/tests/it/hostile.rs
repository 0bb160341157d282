//! Hostile input: every case answers a 4xx in the error shape, and the server keeps serving.

use reqwest::header::CONTENT_TYPE;
use serde_json::json;

use crate::support::*;

const CONFIG: &str = "[tiers.free]\nrequests_per_minute = \"unlimited\"";

#[tokio::test]
async fn hostile_requests_get_clear_4xx_and_the_server_keeps_serving() {
    let s = spawn(CONFIG).await;
    hostile_table(&s).await;
    s.stop().await;
}

/// The same table on PostgreSQL, which refuses values SQLite stores (U+0000 in text): every
/// one must be a 4xx at the edge, and the writer must keep writing.
#[tokio::test]
async fn postgres_hostile_requests_get_clear_4xx_and_the_server_keeps_serving() {
    let Some(s) = spawn_postgres(CONFIG, "hostile").await else {
        return;
    };
    hostile_table(&s).await;
    assert_eq!(s.state.guard.stats().store_errors, 0);
    s.stop().await;
}

async fn hostile_table(s: &TestServer) {
    let good = reserve_body("acme", "alice").to_string();
    let with = |field: &str, value: &str| good.replacen('}', &format!(",\"{field}\":{value}}}"), 1);
    let set = |field: &str, value: serde_json::Value| {
        let mut v = reserve_body("acme", "alice");
        v[field] = value;
        v.to_string()
    };
    let big = format!("{{\"tenant_id\":\"{}\"}}", "a".repeat(10 * 1024 * 1024));
    let mut bad_utf8 = br#"{"tenant_id":"acme","user_id":"al"#.to_vec();
    bad_utf8.extend([0xff, 0xfe]);
    bad_utf8.extend(br#"ice","model":"gpt-4o-mini","input_tokens":1}"#);
    let cases: Vec<(&str, &str, String, Vec<u8>, u16)> = vec![
        ("malformed JSON", "/v1/reservations", String::new(), b"{\"tenant_id\":".to_vec(), 400),
        ("not JSON", "/v1/reservations", String::new(), b"hello".to_vec(), 400),
        ("empty body", "/v1/reservations", String::new(), Vec::new(), 400),
        ("array", "/v1/reservations", String::new(), b"[1,2]".to_vec(), 400),
        ("wrong type", "/v1/reservations", String::new(), set("input_tokens", json!("many")).into_bytes(), 400),
        ("id as number", "/v1/reservations", String::new(), set("user_id", json!(42)).into_bytes(), 400),
        ("negative tokens", "/v1/reservations", String::new(), set("input_tokens", json!(-5)).into_bytes(), 400),
        ("fractional tokens", "/v1/reservations", String::new(), set("max_output_tokens", json!(1e30)).into_bytes(), 400),
        ("u64 overflow", "/v1/reservations", String::new(), set("input_tokens", json!(u64::MAX)).replace("18446744073709551615", "18446744073709551616").into_bytes(), 400),
        ("tokens overflow sum", "/v1/reservations", String::new(), { let mut v = reserve_body("acme", "alice"); v["input_tokens"] = json!(u64::MAX); v["max_output_tokens"] = json!(u64::MAX); v.to_string().into_bytes() }, 400),
        ("1e400", "/v1/reservations", String::new(), with("estimated_cost_usd", "1e400").into_bytes(), 400),
        ("NaN", "/v1/reservations", String::new(), with("estimated_cost_usd", "NaN").into_bytes(), 400),
        ("Infinity", "/v1/reservations", String::new(), with("estimated_cost_usd", "Infinity").into_bytes(), 400),
        ("negative money", "/v1/reservations", String::new(), with("estimated_cost_usd", "-1").into_bytes(), 400),
        ("money string junk", "/v1/reservations", String::new(), with("estimated_cost_usd", "\"1.2.3\"").into_bytes(), 400),
        ("money overflow", "/v1/reservations", String::new(), with("estimated_cost_usd", "\"1e30\"").into_bytes(), 400),
        ("unknown field", "/v1/reservations", String::new(), with("surprise", "true").into_bytes(), 400),
        ("missing field", "/v1/reservations", String::new(), br#"{"tenant_id":"acme"}"#.to_vec(), 400),
        ("bad utf-8", "/v1/reservations", String::new(), bad_utf8, 400),
        ("10 MB body", "/v1/reservations", String::new(), big.into_bytes(), 413),
        ("id with space", "/v1/reservations", String::new(), set("user_id", json!("a b")).into_bytes(), 400),
        ("id too long", "/v1/reservations", String::new(), set("user_id", json!("x".repeat(129))).into_bytes(), 400),
        ("id with dots and slashes is fine but ..%00 is not", "/v1/reservations", String::new(), set("tenant_id", json!("../\u{0}")).into_bytes(), 400),
        ("empty id", "/v1/reservations", String::new(), set("tenant_id", json!("")).into_bytes(), 400),
        ("unicode id", "/v1/reservations", String::new(), set("user_id", json!("ülrich")).into_bytes(), 400),
        ("status expired", "/v1/usage", String::new(), json!({"tenant_id":"acme","user_id":"a","model":"gpt-4o-mini","input_tokens":1,"output_tokens":1,"status":"expired"}).to_string().into_bytes(), 400),
        ("unknown status", "/v1/usage", String::new(), json!({"tenant_id":"acme","user_id":"a","model":"gpt-4o-mini","input_tokens":1,"output_tokens":1,"status":"maybe"}).to_string().into_bytes(), 400),
        ("cached above input", "/v1/usage", String::new(), json!({"tenant_id":"acme","user_id":"a","model":"gpt-4o-mini","input_tokens":1,"output_tokens":1,"cached_input_tokens":2}).to_string().into_bytes(), 400),
        ("path trick in id", "/v1/reservations/..%2F..%2Fetc%2Fpasswd/commit", String::new(), b"{\"input_tokens\":1,\"output_tokens\":1}".to_vec(), 400),
        ("not a uuid", "/v1/reservations/12345/release", String::new(), b"{}".to_vec(), 400),
        ("release junk", "/v1/reservations/01000000-0000-7000-8000-000000000000/release", String::new(), b"{\"why\":1}".to_vec(), 400),
        ("wrong content type", "/v1/reservations", "text/plain".into(), good.clone().into_bytes(), 415),
    ];
    for (name, path, content_type, body, expected) in cases {
        let ct = if content_type.is_empty() {
            "application/json".to_owned()
        } else {
            content_type
        };
        let resp = s
            .client
            .post(format!("{}{path}", s.url))
            .bearer_auth(ADMIN)
            .header(CONTENT_TYPE, ct)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert_eq!(status, expected, "{name}: {text}");
        error_code(&v);
    }
    // Wrong methods and odd query strings.
    let (st, v, h) = s.call(M::GET, "/v1/reservations", Some(ADMIN), None).await;
    assert_eq!((st, error_code(&v)), (405, "method_not_allowed"));
    assert!(h.contains_key("allow"));
    let (st, v) = s
        .get("/v1/limits?tenant_id=acme&user_id=a&user_id=b&x=1", ADMIN)
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/user/a%20b?tenant_id=acme",
            Some(ADMIN),
            Some(json!({})),
        )
        .await;
    assert_eq!((st, error_code(&v)), (400, "invalid_request"));
    // Dot segments are resolved before routing: what is left is no route.
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/user/%2e%2e/%2e%2e/keys?tenant_id=acme",
            Some(ADMIN),
            Some(json!({})),
        )
        .await;
    assert_eq!((st, error_code(&v)), (404, "not_found"));
    // Reports, daily usage and alerts: hostile query strings are 400s in the error shape.
    for path in [
        "/v1/reports/usage?from=%FF%FE",
        "/v1/reports/usage?from=2026-02-30",
        "/v1/reports/usage?from=99999-01-01",
        "/v1/reports/usage?limit=99999999999999999999999",
        "/v1/reports/usage?limit=-1",
        "/v1/reports/usage?group_by=day&group_by=user",
        "/v1/reports/usage?format=csv%00",
        "/v1/reports/usage?tenant_id=a%20b",
        "/v1/users/a%20b/daily-usage?tenant_id=acme",
        "/v1/users/alice/daily-usage?tenant_id=acme&date=2026-13-01",
        "/v1/alerts?all=maybe",
        "/v1/alerts?limit=0",
    ] {
        let (st, v, _) = s.call(M::GET, path, Some(ADMIN), None).await;
        assert_eq!(st, 400, "{path}: {v}");
        error_code(&v);
    }
    // The dashboard's form: junk is a 4xx page, never a session.
    for (ct, body) in [
        ("application/x-www-form-urlencoded", b"key=%FF%FE".to_vec()),
        ("application/x-www-form-urlencoded", b"nokey=1".to_vec()),
        ("application/json", br#"{"key":"test-admin-key"}"#.to_vec()),
        (
            "application/x-www-form-urlencoded",
            format!("key={}", "a".repeat(10 * 1024 * 1024)).into_bytes(),
        ),
    ] {
        let resp = s
            .client
            .post(format!("{}/login", s.url))
            .header(CONTENT_TYPE, ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{ct}: {status}");
        assert!(resp.headers().get("set-cookie").is_none());
    }
    // Still serving normally.
    let (st, _) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    assert_eq!(st, 201);
    let (st, _, _) = s.call(M::GET, "/healthz", None, None).await;
    assert_eq!(st, 200);
}
