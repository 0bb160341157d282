//! Every endpoint, its statuses and the error shape.

use serde_json::json;

use crate::support::*;

const CONFIG: &str = r#"
[tiers.free]
usd_per_day = "0.01"
requests_per_minute = "unlimited"
max_concurrent = 5
"#;

#[tokio::test]
async fn reserve_commit_release_record_check_and_limits() {
    let s = spawn(CONFIG).await;
    let (st, r) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    assert_eq!(st, 201, "{r}");
    let id = r["reservation_id"].as_str().unwrap().to_owned();
    // 1000 input at 0.15 + 500 output at 0.60 per million = 0.00045.
    assert_eq!(r["reserved_cost_usd"], json!(0.00045));
    assert!(
        r["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-10T12:10:00")
    );
    assert!(
        r["limits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["scope"] == "user" && l["unit"] == "usd" && l["window"] == "day")
    );

    let commit = json!({ "input_tokens": 800, "output_tokens": 100, "cached_input_tokens": 200 });
    let (st, c) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            commit.clone(),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    // 600 x 0.15 + 200 x 0.075 + 100 x 0.60 = 90 + 15 + 60 = 165 micro-dollars.
    assert_eq!(c["cost_usd"], json!(0.000165));
    assert_eq!(c["request_status"], "success");
    // The same commit again: the same record.
    let (st, again) = s
        .post(&format!("/v1/reservations/{id}/commit"), ADMIN, commit)
        .await;
    assert_eq!(
        (st, &again["usage_id"], again["replayed"].as_bool()),
        (200, &c["usage_id"], Some(true))
    );
    // A different one: 409.
    let (st, e) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!((st, error_code(&e)), (409, "commit_conflict"));
    let (st, e) = s
        .post(&format!("/v1/reservations/{id}/release"), ADMIN, json!({}))
        .await;
    assert_eq!((st, error_code(&e)), (409, "already_settled"));

    // Release another one (body optional).
    let (_, r2) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    let id2 = r2["reservation_id"].as_str().unwrap();
    let (st, _, _) = s
        .call(
            M::POST,
            &format!("/v1/reservations/{id2}/release"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = s
        .post(
            &format!("/v1/reservations/{id2}/release"),
            ADMIN,
            json!({ "reason": "twice" }),
        )
        .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("released")));
    let (st, e) = s
        .post(
            &format!("/v1/reservations/{}/commit", uuid::Uuid::now_v7()),
            ADMIN,
            json!({ "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!((st, error_code(&e)), (404, "not_found"));

    // Direct usage: counted, never refused, idempotent by key.
    let usage = json!({ "tenant_id": "acme", "user_id": "alice", "model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.5", "idempotency_key": "u-1" });
    let (st, u) = s.post("/v1/usage", ADMIN, usage.clone()).await;
    assert_eq!((st, &u["cost_usd"]), (201, &json!(0.5)));
    let (st, u2) = s.post("/v1/usage", ADMIN, usage).await;
    assert_eq!((st, &u2["usage_id"]), (200, &u["usage_id"]));
    assert_eq!(u2["replayed"], true);

    // Now over the user's $0.01 day: check says no, reserve answers 429.
    let (st, chk) = s
        .post("/v1/check", ADMIN, reserve_body("acme", "alice"))
        .await;
    assert_eq!((st, chk["allowed"].as_bool()), (200, Some(false)));
    assert_eq!(chk["denial"]["code"], "budget_exceeded");
    let (st, e, headers) = s
        .call(
            M::POST,
            "/v1/reservations",
            Some(ADMIN),
            Some(reserve_body("acme", "alice")),
        )
        .await;
    assert_eq!((st, error_code(&e)), (429, "budget_exceeded"));
    let failing = e["error"]["limits"].as_array().unwrap();
    assert!(
        failing
            .iter()
            .all(|l| l["scope"] == "user" && l["unit"] == "usd")
    );
    // Retry-After: seconds until the user's day ends (12 hours from T0).
    assert_eq!(headers["retry-after"], "43200");
    assert!(
        headers["ratelimit-policy"]
            .to_str()
            .unwrap()
            .starts_with("\"usd\";q=0.010000")
    );
    assert!(headers.contains_key("ratelimit"));

    let (st, l) = s
        .get("/v1/limits?tenant_id=acme&user_id=alice", ADMIN)
        .await;
    assert_eq!(st, 200);
    let day = l["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["scope"] == "user" && x["unit"] == "usd" && x["window"] == "day")
        .unwrap()
        .clone();
    assert_eq!(day["used"], json!(0.500165));
    assert_eq!(day["remaining"], json!(0.0));
    let (st, e) = s.get("/v1/limits?tenant_id=acme", ADMIN).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));
    s.stop().await;
}

#[tokio::test]
async fn admin_budgets_users_and_keys() {
    let s = spawn(CONFIG).await;
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": "0.0001" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["effective"]["daily_usd"], json!(0.0001));
    let (st, e) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "bob"))
        .await;
    assert_eq!((st, error_code(&e)), (429, "budget_exceeded"));
    // null clears.
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": null })),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        s.post("/v1/reservations", ADMIN, reserve_body("acme", "bob"))
            .await
            .0,
        201
    );
    // Users need their tenant; unknown scopes and tiers are 400.
    let (st, e, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/user/bob",
            Some(ADMIN),
            Some(json!({ "daily_usd": 1 })),
        )
        .await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/user/bob?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "monthly_usd": 3 })),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/galaxy/x",
            Some(ADMIN),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 400);
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/users/bob?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "tier": "pro" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mut body = reserve_body("acme", "bob");
    body["model"] = json!("claude-opus-4-1");
    assert_eq!(
        s.post("/v1/reservations", ADMIN, body).await.0,
        201,
        "pro may call any model"
    );
    let (st, e, _) = s
        .call(
            M::PUT,
            "/v1/admin/users/bob?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "tier": "gold" })),
        )
        .await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));

    // Keys: created (shown once), listed without the key, revoked.
    let (st, k) = s
        .post("/v1/admin/api-keys", ADMIN, json!({ "tenant_id": "acme" }))
        .await;
    assert_eq!(st, 201);
    let key = k["key"].as_str().unwrap().to_owned();
    assert_eq!(
        s.get("/v1/limits?tenant_id=acme&user_id=bob", &key).await.0,
        200
    );
    let (_, list) = s.get("/v1/admin/api-keys", ADMIN).await;
    let text = list.to_string();
    assert!(!text.contains(&key), "a listing must not show keys");
    assert!(text.contains(k["id"].as_str().unwrap()));
    let (st, _, _) = s
        .call(
            M::DELETE,
            &format!("/v1/admin/api-keys/{}", k["id"].as_str().unwrap()),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, e) = s.get("/v1/limits?tenant_id=acme&user_id=bob", &key).await;
    assert_eq!((st, error_code(&e)), (401, "unauthorized"));
    let (st, _, _) = s
        .call(
            M::DELETE,
            &format!("/v1/admin/api-keys/{}", k["id"].as_str().unwrap()),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 404);
    s.stop().await;
}

#[tokio::test]
async fn expiry_then_a_late_commit() {
    let s = spawn(CONFIG).await;
    let mut body = reserve_body("acme", "carol");
    body["ttl_seconds"] = json!(60);
    let (_, r) = s.post("/v1/reservations", ADMIN, body).await;
    let id = r["reservation_id"].as_str().unwrap().to_owned();
    s.clock.advance(61_000_000);
    s.state.guard.sweep().await.unwrap();
    let (_, l) = s
        .get("/v1/limits?tenant_id=acme&user_id=carol", ADMIN)
        .await;
    assert!(
        l["limits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["unit"] == "usd")
            .all(|x| x["reserved"] == json!(0.0))
    );
    let (st, v) = s
        .post(&format!("/v1/reservations/{id}/release"), ADMIN, json!({}))
        .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("expired")));
    let (st, c) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 5, "output_tokens": 5 }),
        )
        .await;
    assert_eq!((st, c["late"].as_bool()), (200, Some(true)));
    let (st, e) = s.post("/v1/reservations", ADMIN, json!({ "tenant_id": "acme", "user_id": "carol", "model": "gpt-4o-mini", "input_tokens": 1, "ttl_seconds": 999999999 })).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));
    s.stop().await;
}

#[tokio::test]
async fn tier_rules_answer_403() {
    let s = spawn(CONFIG).await;
    let mut body = reserve_body("acme", "dan");
    body["model"] = json!("gpt-4o");
    let (st, e) = s.post("/v1/reservations", ADMIN, body.clone()).await;
    assert_eq!((st, error_code(&e)), (403, "model_not_allowed"));
    body["model"] = json!("gpt-4o-mini");
    body["max_output_tokens"] = json!(100000);
    let (st, e) = s.post("/v1/reservations", ADMIN, body.clone()).await;
    assert_eq!((st, error_code(&e)), (403, "max_output_tokens_exceeded"));
    let s2 = spawn("[tiers.free]\nallowed_models = [\"*\"]").await;
    body["model"] = json!("mystery-model");
    body["max_output_tokens"] = json!(10);
    let (st, e) = s2.post("/v1/reservations", ADMIN, body).await;
    assert_eq!((st, error_code(&e)), (403, "unknown_model"));
    s.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn operations_endpoints() {
    let s = spawn(CONFIG).await;
    let (st, _, _) = s.call(M::GET, "/healthz", None, None).await;
    assert_eq!(st, 200);
    let (st, v, _) = s.call(M::GET, "/readyz", None, None).await;
    assert_eq!((st, v["store"].as_str()), (200, Some("ok")));
    s.post("/v1/reservations", ADMIN, reserve_body("acme", "erin"))
        .await;
    let text = s.metrics().await;
    assert!(
        text.contains("spendguard_decisions_total{outcome=\"admitted\",reason=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("spendguard_http_request_duration_seconds_bucket"));
    assert!(text.contains("route=\"/v1/reservations\""));
    assert!(text.contains("spendguard_budget_utilisation_ratio{scope=\"global\""));
    assert!(text.contains("spendguard_alerts_raised_total 0"), "{text}");
    assert!(text.contains("spendguard_webhook_attempts_total{outcome=\"delivered\"} 0"));
    assert!(!text.contains("erin"), "metrics must not carry user ids");
    let (st, v) = s.get("/v1/alerts", ADMIN).await;
    assert_eq!((st, v["alerts"].as_array().map(Vec::len)), (200, Some(0)));
    let (st, v) = s.get("/v1/reports/usage?group_by=model", ADMIN).await;
    // Only an open reservation so far: nothing spent yet.
    assert_eq!(
        (st, v["rows"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
    s.stop().await;
}

#[tokio::test]
async fn openapi_lists_every_route_the_router_serves() {
    let s = spawn(CONFIG).await;
    let (st, doc, _) = s.call(M::GET, "/openapi.json", None, None).await;
    assert_eq!(st, 200);
    let paths = doc["paths"].as_object().unwrap();
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, spendguard_server::ROUTES.len());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            // Every documented operation is served: never the fallback's "no such route" or
            // a 405 (parameters filled with placeholders).
            let concrete = path
                .replace("{id}", "x")
                .replace("{scope}", "tenant")
                .replace("{user_id}", "u");
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (st, v, _) = s.call(m, &concrete, Some(ADMIN), Some(json!({}))).await;
            assert_ne!(st, 405, "{method} {path}");
            assert!(
                !(st == 404 && v["error"]["message"] == "no such route"),
                "{method} {path} is not served"
            );
        }
    }
    // And something undocumented is not served.
    let (st, v, _) = s.call(M::GET, "/v1/secret", Some(ADMIN), None).await;
    assert_eq!((st, error_code(&v)), (404, "not_found"));
    s.stop().await;
}

/// With `on_store_error = "deny"`, a store that cannot be written answers new reservations
/// with 503 (and `/readyz` with 503) until it is back. The store is made unwritable by
/// another connection holding SQLite's write lock past the busy timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_mode_answers_503_while_the_store_is_down() {
    let s = spawn_with(CONFIG, |o| {
        o.on_store_error = spendguard_guard::OnStoreError::Deny;
        o.retry_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let (st, r) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "dora"))
        .await;
    assert_eq!(st, 201);
    let id = r["reservation_id"].as_str().unwrap().to_owned();

    let blocker = block_appends(&s);
    // This commit cannot reach the store (busy), so it is spooled and still answered.
    let (st, _) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!(st, 200);
    let (st, e, h) = s
        .call(
            M::POST,
            "/v1/reservations",
            Some(ADMIN),
            Some(reserve_body("acme", "dora")),
        )
        .await;
    assert_eq!((st, error_code(&e)), (503, "store_unavailable"));
    assert!(h.contains_key("retry-after"));
    let (st, v, _) = s.call(M::GET, "/readyz", None, None).await;
    assert_eq!((st, v["store"].as_str()), (503, Some("spooling")));

    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let mut ready = false;
    for _ in 0..100 {
        if s.call(M::GET, "/readyz", None, None).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "the spool was not replayed");
    let (st, _) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "dora"))
        .await;
    assert_eq!(st, 201);
    s.stop().await;
}

/// A spool that cannot be written (the store is down too) makes `/readyz` answer 503 with
/// the reason, and shows in the metrics; the failed commit is an error, not a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_spool_makes_readyz_503_with_the_reason() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let faults = fail.clone();
    let s = spawn_with(CONFIG, |o| {
        o.retry_interval = std::time::Duration::from_millis(100);
        o.spool_faults = Some(faults);
    })
    .await;
    let (st, r) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "erin"))
        .await;
    assert_eq!(st, 201);
    let id = r["reservation_id"].as_str().unwrap().to_owned();
    let (st, _, _) = s.call(M::GET, "/readyz", None, None).await;
    assert_eq!(st, 200);

    let blocker = block_appends(&s);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let (st, _) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            ADMIN,
            json!({ "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!(
        st, 500,
        "a commit that is neither stored nor spooled succeeded"
    );
    let (st, v, _) = s.call(M::GET, "/readyz", None, None).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("spool")),
        "{v}"
    );
    let metrics = s
        .client
        .get(format!("{}/metrics", s.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("spendguard_spool_failures_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("spendguard_ready 0"), "{metrics}");

    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    // The next write works: ready again.
    let (st, _) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "erin"))
        .await;
    assert_eq!(st, 201);
    let (st, v, _) = s.call(M::GET, "/readyz", None, None).await;
    assert_eq!(st, 200, "{v}");
    s.stop().await;
}

/// Holds the write lock of the server's journal file (where batches are appended), so that
/// no batch can reach the store until the connection is rolled back or dropped.
fn block_appends(s: &TestServer) -> rusqlite::Connection {
    let path = spendguard_store::SqliteStore::journal_path(&s.db_path().to_string_lossy());
    let blocker = rusqlite::Connection::open(path).unwrap();
    blocker
        .execute_batch("BEGIN IMMEDIATE; DELETE FROM journal WHERE seq < 0;")
        .unwrap();
    blocker
}
