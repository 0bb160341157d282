//! Hostile clients: what an attacker over loopback tried, each answered as the security
//! review asked (metrics labels, the metrics endpoint, dashboard sessions, sign-in
//! throttling, token counts the store cannot hold, the bearer scheme, cross-tenant ids,
//! idempotent records).

use reqwest::redirect::Policy;
use serde_json::json;

use crate::support::*;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn invented_methods_are_counted_as_other() {
    let s = spawn("").await;
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let resp = s
            .client
            .request(method, format!("{}/healthz", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
    }
    let text = s.metrics().await;
    assert!(!text.contains("INVENTED"), "{text}");
    let series = text
        .lines()
        .filter(|l| {
            l.starts_with("spendguard_http_request_duration_seconds_count")
                && l.contains("method=\"other\"")
        })
        .collect::<Vec<_>>();
    assert_eq!(series.len(), 1, "{series:?}");
    assert!(series[0].ends_with(" 40"), "{series:?}");
    s.stop().await;
}

#[tokio::test]
async fn metrics_need_the_admin_key() {
    let s = spawn("").await;
    let tenant = s.tenant_key("acme").await;
    let get = |key: Option<&str>| {
        let mut req = s.client.get(format!("{}/metrics", s.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let resp = get(None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "unauthorized");
    assert_eq!(get(Some(&tenant)).await.unwrap().status(), 401);
    assert_eq!(get(Some("sg_guess")).await.unwrap().status(), 401);
    let resp = get(Some(ADMIN)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("spendguard_open_reservations")
    );
    s.stop().await;
}

/// Signs in with `key`; returns the status and the `Set-Cookie` header.
async fn sign_in(s: &TestServer, key: &str, extra: Option<(&str, &str)>) -> (u16, Option<String>) {
    let mut req = no_redirects()
        .post(format!("{}/login", s.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={key}"));
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), cookie)
}

async fn dashboard_status(s: &TestServer, cookie: &str) -> u16 {
    let pair = cookie.split(';').next().unwrap();
    no_redirects()
        .get(format!("{}/", s.url))
        .header("cookie", pair)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn revoking_an_admin_key_ends_its_dashboard_sessions() {
    let s = spawn("").await;
    let (key, record) =
        spendguard_server::auth::create_key(s.state.guard.store(), &s.state.keys, None, T0)
            .await
            .unwrap();
    let (st, cookie) = sign_in(&s, &key, None).await;
    assert_eq!(st, 303);
    let cookie = cookie.unwrap();
    assert_eq!(dashboard_status(&s, &cookie).await, 200);
    // Sessions opened with the environment's admin key are not touched by it.
    let (_, other) = sign_in(&s, ADMIN, None).await;
    let other = other.unwrap();
    let (st, _, _) = s
        .call(
            M::DELETE,
            &format!("/v1/admin/api-keys/{}", record.id),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200);
    // The session of the revoked key is over: back to the sign-in form.
    assert_eq!(dashboard_status(&s, &cookie).await, 303);
    assert_eq!(dashboard_status(&s, &other).await, 200);
    s.stop().await;
}

#[tokio::test]
async fn the_session_cookie_is_secure_behind_an_https_proxy() {
    let s = spawn("").await;
    let (_, plain) = sign_in(&s, ADMIN, None).await;
    let plain = plain.unwrap();
    assert!(
        plain.contains("HttpOnly") && !plain.contains("Secure"),
        "{plain}"
    );
    for header in [
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=192.0.2.1;proto=https;by=203.0.113.43"),
    ] {
        let (st, cookie) = sign_in(&s, ADMIN, Some(header)).await;
        assert_eq!(st, 303);
        let cookie = cookie.unwrap();
        assert!(cookie.contains("; Secure"), "{header:?}: {cookie}");
    }
    s.stop().await;
}

#[tokio::test]
async fn failed_sign_ins_are_throttled() {
    let s = spawn("").await;
    for i in 0..10 {
        let (st, _) = sign_in(&s, &format!("sg_guess{i}"), None).await;
        assert_eq!(st, 401, "attempt {i}");
    }
    // The 11th attempt within the minute is refused before the key is even looked at.
    let resp = no_redirects()
        .post(format!("{}/login", s.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "60");
    assert!(resp.headers().get("set-cookie").is_none());
    // The API (bearer keys) is not affected.
    let (st, _) = s.get("/v1/alerts", ADMIN).await;
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_huge_login_body_is_too_large() {
    let s = spawn("").await;
    let body = format!("key={}", "a".repeat(10 * 1024 * 1024));
    let resp = s
        .client
        .post(format!("{}/login", s.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    s.stop().await;
}

#[tokio::test]
async fn token_counts_the_store_cannot_hold_are_refused() {
    // No ceiling on one record's tokens below what the store holds: this is about the store.
    let s = spawn(
        "max_record_tokens = 9223372036854775807\n[tiers.free]\nrequests_per_minute = \"unlimited\"",
    )
    .await;
    let too_many = (i64::MAX as u64) + 1;
    let usage = |field: &str, n: u64| {
        let mut v = json!({
            "tenant_id": "acme", "user_id": "u1", "model": "gpt-4o-mini",
            "input_tokens": 1, "output_tokens": 1, "cost_usd": "0.01",
        });
        v[field] = json!(n);
        v
    };
    for field in ["input_tokens", "output_tokens"] {
        let (st, e) = s.post("/v1/usage", ADMIN, usage(field, too_many)).await;
        assert_eq!(
            (st, error_code(&e)),
            (400, "invalid_request"),
            "{field}: {e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{e}"
        );
    }
    let mut reserve = reserve_body("acme", "u1");
    reserve["estimated_cost_usd"] = json!("0.01");
    reserve["input_tokens"] = json!(too_many);
    let (st, e) = s.post("/v1/reservations", ADMIN, reserve).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"), "{e}");
    // The largest count the store holds is accepted.
    let mut largest = usage("output_tokens", i64::MAX as u64);
    largest["input_tokens"] = json!(0);
    let (st, e) = s.post("/v1/usage", ADMIN, largest).await;
    assert_eq!(st, 201, "{e}");
    s.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = spawn("").await;
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let resp = s
            .client
            .get(format!("{}/v1/alerts", s.url))
            .header("authorization", format!("{scheme} {ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    s.stop().await;
}

#[tokio::test]
async fn another_tenants_reservation_is_not_found() {
    let s = spawn("[tiers.free]\nrequests_per_minute = \"unlimited\"").await;
    let a = s.tenant_key("tenant-a").await;
    let b = s.tenant_key("tenant-b").await;
    let (st, r) = s
        .post("/v1/reservations", &a, reserve_body("tenant-a", "u1"))
        .await;
    assert_eq!(st, 201, "{r}");
    let id = r["reservation_id"].as_str().unwrap();
    let unknown = "0190a0a0-0000-7000-8000-000000000000";
    let commit = json!({ "input_tokens": 1, "output_tokens": 1 });
    // Another tenant's id answers exactly like an id that does not exist.
    let (st1, e1) = s
        .post(&format!("/v1/reservations/{id}/commit"), &b, commit.clone())
        .await;
    let (st2, e2) = s
        .post(&format!("/v1/reservations/{unknown}/commit"), &b, commit)
        .await;
    assert_eq!((st1, error_code(&e1)), (404, "not_found"), "{e1}");
    assert_eq!((st2, error_code(&e2)), (404, "not_found"), "{e2}");
    s.stop().await;
}

#[tokio::test]
async fn a_repeated_usage_record_says_it_was_replayed() {
    let s = spawn("").await;
    let body = json!({
        "tenant_id": "acme", "user_id": "u1", "model": "gpt-4o-mini",
        "input_tokens": 10, "output_tokens": 5, "idempotency_key": "call-1",
    });
    let (st, first) = s.post("/v1/usage", ADMIN, body.clone()).await;
    assert_eq!(st, 201, "{first}");
    assert_eq!(first["replayed"], false, "{first}");
    let (st, again) = s.post("/v1/usage", ADMIN, body.clone()).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["usage_id"], first["usage_id"]);
    // Also once memory has forgotten the key and the store answers.
    let s = s.restart().await;
    let (st, again) = s.post("/v1/usage", ADMIN, body).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["usage_id"], first["usage_id"]);
    s.stop().await;
}
