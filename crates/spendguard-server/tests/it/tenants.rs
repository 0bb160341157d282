//! No tenant can hurt another: not by naming a tier it was not given, not by holding the
//! global budget, not by charging an amount no call costs, not by growing memory, and not by
//! watching the others' spend in the global limits.

use serde_json::{Value, json};

use crate::support::*;

fn reserve(tenant: &str, user: &str, usd: &str) -> Value {
    json!({
        "tenant_id": tenant,
        "user_id": user,
        "model": "gpt-4o-mini",
        "input_tokens": 10,
        "max_output_tokens": 10,
        "estimated_cost_usd": usd,
    })
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// The entries of a limits list for one scope kind.
fn entries<'a>(limits: &'a Value, scope: &str) -> Vec<&'a Value> {
    limits
        .as_array()
        .unwrap_or_else(|| panic!("no limits in {limits}"))
        .iter()
        .filter(|l| l["scope"] == scope)
        .collect()
}

#[tokio::test]
async fn a_tenant_key_names_only_allowed_tiers_and_never_over_a_stored_one() {
    let s = spawn("").await;
    let a = s.tenant_key("tenant-a").await;
    // Not an allowed tier for tenant keys by default: the default tier applies.
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(
                reserve("tenant-a", "u1", "0.01"),
                "tier",
                json!("enterprise"),
            ),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["tier"], "free", "{r}");
    // An allowed tier applies when the admin stored none.
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(reserve("tenant-a", "u2", "0.01"), "tier", json!("pro")),
        )
        .await;
    assert_eq!((st, r["tier"].as_str()), (201, Some("pro")), "{r}");
    // A stored tier always wins over a tenant key's request, higher or lower.
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/users/u3?tenant_id=tenant-a",
            Some(ADMIN),
            Some(json!({ "tier": "pro" })),
        )
        .await;
    assert_eq!(st, 200);
    for asked in ["enterprise", "free"] {
        let (st, r) = s
            .post(
                "/v1/reservations",
                &a,
                with(reserve("tenant-a", "u3", "0.01"), "tier", json!(asked)),
            )
            .await;
        assert_eq!((st, r["tier"].as_str()), (201, Some("pro")), "{asked}: {r}");
    }
    // The tenant key's limits answer resolves the tier the same way.
    let (st, r) = s
        .get(
            "/v1/limits?tenant_id=tenant-a&user_id=u4&tier=enterprise",
            &a,
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let user_day_usd = entries(&r["limits"], "user")
        .into_iter()
        .find(|l| l["unit"] == "usd" && l["window"] == "day")
        .cloned()
        .unwrap();
    assert_eq!(user_day_usd["limit"], 0.5, "{r}");
    // The admin key may name any tier, over a stored one too.
    let (st, r) = s
        .post(
            "/v1/reservations",
            ADMIN,
            with(
                reserve("tenant-a", "u3", "0.01"),
                "tier",
                json!("enterprise"),
            ),
        )
        .await;
    assert_eq!((st, r["tier"].as_str()), (201, Some("enterprise")), "{r}");
    // Direct records resolve the tier the same way.
    let (st, r) = s
        .post(
            "/v1/usage",
            &a,
            json!({ "tenant_id": "tenant-a", "user_id": "u5", "model": "gpt-4o-mini",
                    "tier": "enterprise", "input_tokens": 1, "output_tokens": 1 }),
        )
        .await;
    assert_eq!(
        (st, r["subscription_tier"].as_str()),
        (201, Some("free")),
        "{r}"
    );
    s.stop().await;
}

/// The free tier without its own money caps, so only global and tenant budgets apply.
const OPEN_FREE_TIER: &str = "[tiers.free]\nusd_per_day = \"unlimited\"\nusd_per_month = \"unlimited\"\nrequests_per_minute = \"unlimited\"\n";

#[tokio::test]
async fn one_tenant_cannot_hold_the_global_budget() {
    let s = spawn(OPEN_FREE_TIER).await;
    let a = s.tenant_key("tenant-a").await;
    let b = s.tenant_key("tenant-b").await;
    // Tenant A tries to hold the whole $1,000 day, in large reservations held for an hour.
    let mut held = 0;
    for i in 0..5 {
        let (st, r) = s
            .post(
                "/v1/reservations",
                &a,
                with(
                    reserve("tenant-a", &format!("u{i}"), "9"),
                    "ttl_seconds",
                    json!(3600),
                ),
            )
            .await;
        if st == 201 {
            held += 9;
        } else {
            assert_eq!((st, error_code(&r)), (429, "budget_exceeded"), "{r}");
        }
    }
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "big", "300"))
        .await;
    assert_eq!((st, error_code(&r)), (429, "budget_exceeded"), "{r}");
    // The tenant scope refused it: its day is capped at 25% of the global $1,000.
    let tenant_day = entries(&r["error"]["limits"], "tenant")
        .into_iter()
        .find(|l| l["window"] == "day")
        .cloned()
        .unwrap_or_else(|| panic!("the tenant's day did not refuse: {r}"));
    assert_eq!(tenant_day["limit"], 250.0, "{r}");
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "big", "200"))
        .await;
    assert_eq!(st, 201, "{r}");
    held += 200;
    assert!(held <= 250);
    // Tenant B is not locked out.
    let (st, r) = s
        .post("/v1/reservations", &b, reserve("tenant-b", "u1", "240"))
        .await;
    assert_eq!(st, 201, "{r}");
    // An admin override of a tenant's budget replaces its share.
    let (st, _, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/tenant-b",
            Some(ADMIN),
            Some(json!({ "daily_usd": 500 })),
        )
        .await;
    assert_eq!(st, 200);
    let (st, r) = s
        .post("/v1/reservations", &b, reserve("tenant-b", "u2", "200"))
        .await;
    assert_eq!(st, 201, "{r}");
    s.stop().await;
}

#[tokio::test]
async fn records_and_long_held_reservations_are_bounded() {
    let s = spawn(OPEN_FREE_TIER).await;
    let a = s.tenant_key("tenant-a").await;
    let usage = |cost: Value, tokens: u64| {
        json!({ "tenant_id": "tenant-a", "user_id": "u1", "model": "gpt-4o-mini",
                "input_tokens": tokens, "output_tokens": 0, "cost_usd": cost })
    };
    // A month's global budget a hundred times over, in one record.
    let (st, r) = s.post("/v1/usage", &a, usage(json!("2770000"), 1)).await;
    assert_eq!((st, error_code(&r)), (400, "invalid_request"), "{r}");
    let (st, r) = s
        .post("/v1/usage", &a, usage(json!("9200000000000"), 1))
        .await;
    assert_eq!((st, error_code(&r)), (400, "invalid_request"), "{r}");
    let (st, r) = s
        .post("/v1/usage", &a, usage(json!("0.01"), 100_000_000))
        .await;
    assert_eq!((st, error_code(&r)), (400, "invalid_request"), "{r}");
    // Nothing was counted.
    let (_, l) = s.get("/v1/limits?tenant_id=tenant-a&user_id=u1", &a).await;
    for e in entries(&l["limits"], "tenant") {
        assert_eq!(e["used"], 0.0, "{l}");
    }
    // A real-sized record passes.
    let (st, r) = s.post("/v1/usage", &a, usage(json!("2.5"), 1000)).await;
    assert_eq!(st, 201, "{r}");
    // A commit cannot charge more than a record may either.
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "u1", "1"))
        .await;
    assert_eq!(st, 201, "{r}");
    let id = r["reservation_id"].as_str().unwrap().to_owned();
    let (st, r) = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            &a,
            json!({ "input_tokens": 1, "output_tokens": 1, "cost_usd": "5000000" }),
        )
        .await;
    assert_eq!((st, error_code(&r)), (400, "invalid_request"), "{r}");
    // A large reservation cannot be held for a day; a small one can.
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(
                reserve("tenant-a", "u2", "50"),
                "ttl_seconds",
                json!(86_400),
            ),
        )
        .await;
    assert_eq!((st, error_code(&r)), (400, "invalid_request"), "{r}");
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(reserve("tenant-a", "u2", "50"), "ttl_seconds", json!(3600)),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(reserve("tenant-a", "u3", "1"), "ttl_seconds", json!(86_400)),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    s.stop().await;
}

#[tokio::test]
async fn tenant_keys_do_not_see_global_amounts() {
    // Four tenants fill the global day; a fifth is refused by the global budget.
    let s = spawn("[global]\nusd_per_day = \"1\"\n").await;
    for t in ["t1", "t2", "t3", "t4"] {
        let k = s.tenant_key(t).await;
        let (st, r) = s
            .post("/v1/reservations", &k, reserve(t, "u1", "0.25"))
            .await;
        assert_eq!(st, 201, "{r}");
        // Its own scopes in full, the global ones without amounts.
        for g in entries(&r["limits"], "global") {
            for hidden in ["limit", "used", "reserved", "remaining"] {
                assert!(g.get(hidden).is_none(), "{hidden} shown: {r}");
            }
            assert!(g["resets_at"].is_string(), "{r}");
        }
        assert!(!entries(&r["limits"], "user").is_empty(), "{r}");
        assert!(entries(&r["limits"], "user")[0]["used"].is_number(), "{r}");
    }
    let e = s.tenant_key("t5").await;
    let (st, r, h) = s
        .call(
            M::POST,
            "/v1/reservations",
            Some(&e),
            Some(reserve("t5", "u1", "0.1")),
        )
        .await;
    assert_eq!((st, error_code(&r)), (429, "budget_exceeded"), "{r}");
    let failing = entries(&r["error"]["limits"], "global");
    assert!(!failing.is_empty(), "{r}");
    for g in failing {
        assert!(
            g.get("used").is_none() && g.get("remaining").is_none(),
            "{r}"
        );
    }
    assert!(h.get("retry-after").is_some());
    assert!(
        h.get("ratelimit").is_none(),
        "the global remaining leaks: {h:?}"
    );
    let (_, c) = s.post("/v1/check", &e, reserve("t5", "u1", "0.1")).await;
    for g in entries(&c["limits"], "global")
        .into_iter()
        .chain(entries(&c["denial"]["limits"], "global"))
    {
        assert!(
            g.get("used").is_none() && g.get("reserved").is_none(),
            "{c}"
        );
    }
    let (_, l) = s.get("/v1/limits?tenant_id=t5&user_id=u1", &e).await;
    let globals = entries(&l["limits"], "global");
    assert!(!globals.is_empty(), "{l}");
    for g in globals {
        assert!(g.get("used").is_none() && g.get("limit").is_none(), "{l}");
    }
    // The admin key sees everything.
    let (_, l) = s.get("/v1/limits?tenant_id=t5&user_id=u1", ADMIN).await;
    let day = entries(&l["limits"], "global")
        .into_iter()
        .find(|g| g["window"] == "day")
        .cloned()
        .unwrap();
    assert_eq!(
        (day["reserved"].as_f64(), day["limit"].as_f64()),
        (Some(1.0), Some(1.0)),
        "{l}"
    );
    s.stop().await;
}

#[tokio::test]
async fn tracked_subjects_are_capped_per_tenant() {
    let s = spawn(
        "[tenant]\nmax_tracked_subjects = 3\n[tiers.free]\nrequests_per_minute = \"unlimited\"\n",
    )
    .await;
    let a = s.tenant_key("tenant-a").await;
    let b = s.tenant_key("tenant-b").await;
    // One company and two users: three subjects.
    let (st, r) = s
        .post(
            "/v1/reservations",
            &a,
            with(reserve("tenant-a", "u1", "0.01"), "company_id", json!("c1")),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "u2", "0.01"))
        .await;
    assert_eq!(st, 201, "{r}");
    // A fourth is refused, clearly, with a time to retry.
    let (st, r, h) = s
        .call(
            M::POST,
            "/v1/reservations",
            Some(&a),
            Some(reserve("tenant-a", "u3", "0.01")),
        )
        .await;
    assert_eq!((st, error_code(&r)), (429, "too_many_subjects"), "{r}");
    assert_eq!(r["error"]["limit"], 3, "{r}");
    assert!(h.get("retry-after").is_some());
    let (_, c) = s
        .post("/v1/check", &a, reserve("tenant-a", "u3", "0.01"))
        .await;
    assert_eq!(
        (c["allowed"].as_bool(), c["denial"]["code"].as_str()),
        (Some(false), Some("too_many_subjects")),
        "{c}"
    );
    // Known subjects go on, and other tenants are not affected.
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "u2", "0.01"))
        .await;
    assert_eq!(st, 201, "{r}");
    let (st, r) = s
        .post("/v1/reservations", &b, reserve("tenant-b", "u3", "0.01"))
        .await;
    assert_eq!(st, 201, "{r}");
    // Usage of a new user is never refused: it counts against the tenant only.
    let (st, r) = s
        .post(
            "/v1/usage",
            &a,
            json!({ "tenant_id": "tenant-a", "user_id": "u9", "model": "gpt-4o-mini",
                    "input_tokens": 1, "output_tokens": 1, "cost_usd": "0.2" }),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    // ... and did not make u9 a tracked subject.
    let (st, r) = s
        .post("/v1/reservations", &a, reserve("tenant-a", "u9", "0.01"))
        .await;
    assert_eq!((st, error_code(&r)), (429, "too_many_subjects"), "{r}");
    let (_, l) = s.get("/v1/limits?tenant_id=tenant-a&user_id=u9", &a).await;
    let tenant_used: f64 = entries(&l["limits"], "tenant")
        .iter()
        .filter(|e| e["unit"] == "usd")
        .map(|e| e["used"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(tenant_used >= 0.2, "{l}");
    let metrics = s.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("too_many_subjects") && !l.starts_with('#')),
        "{metrics}"
    );
    s.stop().await;
}
