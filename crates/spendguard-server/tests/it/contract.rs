//! The contract a user reads back: `GET` for what `PUT` sets, the price table, and tenant
//! keys reading their own limits without naming their tenant.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn budgets_set_by_put_are_read_back_by_get() {
    let s = spawn("").await;
    // Nothing set yet: the scope answers with no override and the configured caps.
    let (st, v) = s.get("/v1/admin/budgets/tenant/acme", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["override"]["daily_usd"], json!(null));
    let (st, v) = s.get("/v1/admin/budgets/global/global", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["effective"]["daily_usd"], json!(1000.0));

    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": "50" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/user/alice?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "monthly_usd": 3 })),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    let (st, v) = s.get("/v1/admin/budgets/tenant/acme", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["scope"], "tenant");
    assert_eq!(v["scope_id"], "acme");
    assert_eq!(v["override"]["daily_usd"], json!(50.0));
    assert_eq!(v["override"]["monthly_usd"], json!(null));
    assert_eq!(v["effective"]["daily_usd"], json!(50.0));
    let (st, v) = s
        .get("/v1/admin/budgets/user/alice?tenant_id=acme", ADMIN)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["override"]["monthly_usd"], json!(3.0));
    assert_eq!(v["tenant_id"], "acme");
    // A user's scope needs its tenant, as on PUT.
    let (st, e) = s.get("/v1/admin/budgets/user/alice", ADMIN).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));

    // The list holds both overrides, in a stable order.
    let (st, v) = s.get("/v1/admin/budgets", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let list = v["budgets"].as_array().unwrap();
    let ids: Vec<(&str, &str)> = list
        .iter()
        .map(|b| {
            (
                b["scope"].as_str().unwrap(),
                b["scope_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(ids, [("tenant", "acme"), ("user", "alice")], "{v}");

    // Cleared overrides leave the list.
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": null })),
        )
        .await;
    assert_eq!(st, 200);
    let (_, v) = s.get("/v1/admin/budgets", ADMIN).await;
    assert_eq!(v["budgets"].as_array().unwrap().len(), 1, "{v}");

    // Tenant keys may not read them.
    let key = s.tenant_key("acme").await;
    let (st, e) = s.get("/v1/admin/budgets", &key).await;
    assert_eq!((st, error_code(&e)), (403, "forbidden"));
    let (st, e) = s.get("/v1/admin/budgets/tenant/acme", &key).await;
    assert_eq!((st, error_code(&e)), (403, "forbidden"));
    s.stop().await;
}

#[tokio::test]
async fn users_set_by_put_are_read_back_by_get() {
    let s = spawn("").await;
    let (st, v) = s.get("/v1/admin/users/alice?tenant_id=acme", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["overrides"]["tier"], json!(null));

    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/users/alice?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "tier": "pro", "requests_per_day": 7 })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.get("/v1/admin/users/alice?tenant_id=acme", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["user_id"], "alice");
    assert_eq!(v["overrides"]["tier"], "pro");
    assert_eq!(v["overrides"]["requests_per_day"], 7);
    // Another tenant's alice is another user.
    let (_, v) = s.get("/v1/admin/users/alice?tenant_id=globex", ADMIN).await;
    assert_eq!(v["overrides"]["tier"], json!(null));
    let (st, e) = s.get("/v1/admin/users/alice", ADMIN).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));

    let (st, v) = s.get("/v1/admin/users", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let users = v["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{v}");
    assert_eq!(users[0]["user_id"], "alice");
    assert_eq!(users[0]["overrides"]["tier"], "pro");

    let key = s.tenant_key("acme").await;
    let (st, _) = s.get("/v1/admin/users", &key).await;
    assert_eq!(st, 403);
    let (st, _) = s.get("/v1/admin/users/alice?tenant_id=acme", &key).await;
    assert_eq!(st, 403);
    s.stop().await;
}

#[tokio::test]
async fn prices_are_the_table_the_server_uses() {
    let s = spawn("[prices.\"my-finetune\"]\ninput = \"3\"\noutput = \"12.5\"\n").await;
    let key = s.tenant_key("acme").await;
    for k in [ADMIN, key.as_str()] {
        let (st, v) = s.get("/v1/prices", k).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["unit"], "usd_per_million_tokens");
        assert_eq!(v["unknown_model"], "deny");
        let models = v["models"].as_array().unwrap();
        let find = |name: &str| {
            models
                .iter()
                .find(|m| m["model"] == name)
                .unwrap_or_else(|| panic!("{name} missing from {v}"))
                .clone()
        };
        let mine = find("my-finetune");
        assert_eq!(mine["input"], json!(3.0));
        assert_eq!(mine["cached_input"], json!(3.0));
        assert_eq!(mine["output"], json!(12.5));
        assert_eq!(find("gpt-4o-mini")["input"], json!(0.15));
    }
    let (st, _) = s.get("/v1/prices", "not-a-key").await;
    assert_eq!(st, 401);
    s.stop().await;
}

#[tokio::test]
async fn tenant_keys_read_limits_of_their_own_tenant_without_naming_it() {
    let s = spawn("").await;
    let key = s.tenant_key("acme").await;
    let (st, v) = s.get("/v1/limits?user_id=alice", &key).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["tenant_id"], "acme");
    assert!(!v["limits"].as_array().unwrap().is_empty(), "{v}");
    // Naming another tenant is still refused; the admin must name one.
    let (st, e) = s
        .get("/v1/limits?user_id=alice&tenant_id=globex", &key)
        .await;
    assert_eq!((st, error_code(&e)), (403, "forbidden"));
    let (st, e) = s.get("/v1/limits?user_id=alice", ADMIN).await;
    assert_eq!((st, error_code(&e)), (400, "invalid_request"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant_id"),
        "{e}"
    );
    s.stop().await;
}
