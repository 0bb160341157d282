//! Tenant keys act on and read only their own tenant; no key, or a bad one, is 401.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn tenant_keys_are_confined_to_their_tenant() {
    let s = spawn("[tiers.free]\nrequests_per_minute = \"unlimited\"").await;
    let a = s.tenant_key("tenant-a").await;
    let b = s.tenant_key("tenant-b").await;

    let (st, r) = s
        .post("/v1/reservations", &a, reserve_body("tenant-a", "u1"))
        .await;
    assert_eq!(st, 201, "{r}");
    let id = r["reservation_id"].as_str().unwrap().to_owned();

    // Writing for another tenant.
    for (path, body) in [
        ("/v1/reservations", reserve_body("tenant-b", "u1")),
        ("/v1/check", reserve_body("tenant-b", "u1")),
        (
            "/v1/usage",
            json!({ "tenant_id": "tenant-b", "user_id": "u1", "model": "gpt-4o-mini", "input_tokens": 1, "output_tokens": 1 }),
        ),
    ] {
        let (st, e) = s.post(path, &a, body).await;
        assert_eq!((st, error_code(&e)), (403, "forbidden"), "{path}");
    }
    // Reading another tenant.
    let (st, e) = s.get("/v1/limits?tenant_id=tenant-b&user_id=u1", &a).await;
    assert_eq!((st, error_code(&e)), (403, "forbidden"));
    // Settling another tenant's reservation.
    let commit = json!({ "input_tokens": 1, "output_tokens": 1 });
    let (st, e) = s
        .post(&format!("/v1/reservations/{id}/commit"), &b, commit.clone())
        .await;
    assert_eq!((st, error_code(&e)), (404, "not_found"));
    let (st, _) = s
        .post(&format!("/v1/reservations/{id}/release"), &b, json!({}))
        .await;
    assert_eq!(st, 404);
    // Admin routes.
    let (st, _) = s
        .post("/v1/admin/api-keys", &a, json!({ "tenant_id": "tenant-a" }))
        .await;
    assert_eq!(st, 403);
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/tenant-a",
            Some(&a),
            Some(json!({ "daily_usd": 100 })),
        )
        .await;
    assert_eq!(st, 403);
    // The owner may.
    let (st, _) = s
        .post(&format!("/v1/reservations/{id}/commit"), &a, commit)
        .await;
    assert_eq!(st, 200);

    // No key, a malformed header, an unknown key.
    let (st, e, h) = s
        .call(
            M::GET,
            "/v1/limits?tenant_id=tenant-a&user_id=u1",
            None,
            None,
        )
        .await;
    assert_eq!((st, error_code(&e)), (401, "unauthorized"));
    assert_eq!(h["www-authenticate"], "Bearer");
    let resp = s
        .client
        .get(format!("{}/v1/alerts", s.url))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let (st, _) = s.get("/v1/alerts", "sg_0000").await;
    assert_eq!(st, 401);
    s.stop().await;
}
