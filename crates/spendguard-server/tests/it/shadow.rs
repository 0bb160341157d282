//! Shadow mode over HTTP: would-be denials admitted, answered, counted once in metrics,
//! reports (across a restart) and the dashboard, and never at the expense of an enforced
//! limit, also under concurrency.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::{ADMIN, TestServer, error_code, spawn};

/// The global budget ($2 a day) is enforced; each user's ($1 a day) is in shadow.
const CONFIG: &str = r#"
[global]
usd_per_day = "2"
[tenant]
max_share_of_global = "unlimited"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
usd_per_day = "1"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
shadow = ["usd_per_day"]
"#;

async fn reserve(server: &TestServer, user: &str, usd: &str) -> (u16, Value) {
    server
        .post(
            "/v1/reservations",
            ADMIN,
            json!({
                "tenant_id": "acme", "user_id": user, "model": "gpt-4o",
                "input_tokens": 10, "max_output_tokens": 10, "estimated_cost_usd": usd,
            }),
        )
        .await
}

fn would_deny_total(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("spendguard_would_deny_total{reason=\"budget_exceeded\"} "))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn would_be_denials_are_admitted_counted_once_and_reported_after_a_restart() {
    let server = spawn(CONFIG).await;
    let (s, v) = reserve(&server, "u1", "0.6").await;
    assert_eq!(s, 201, "{v}");
    assert!(v["would_deny"].is_null());
    // Past the user's $1 (in shadow), within the global $2 (enforced): admitted, twice.
    for _ in 0..2 {
        let (s, v) = reserve(&server, "u1", "0.6").await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["would_deny"]["code"], "budget_exceeded");
        let failing = v["would_deny"]["limits"].as_array().unwrap();
        assert_eq!(failing.len(), 1);
        assert_eq!(failing[0]["scope"], "user");
        assert_eq!(failing[0]["shadow"], true);
    }
    // Past the global $2 as well: refused by the enforced limit alone, and not counted as
    // a would-be denial.
    let (s, v) = reserve(&server, "u1", "0.6").await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(error_code(&v), "budget_exceeded");
    let failing = v["error"]["limits"].as_array().unwrap();
    assert_eq!(failing.len(), 1, "{v}");
    assert_eq!(failing[0]["scope"], "global");
    assert_eq!(failing[0]["shadow"], false);
    // `GET /v1/limits` says which limits are in shadow.
    let (s, v) = server
        .get("/v1/limits?tenant_id=acme&user_id=u1", ADMIN)
        .await;
    assert_eq!(s, 200, "{v}");
    for l in v["limits"].as_array().unwrap() {
        let user_day_usd = l["scope"] == "user" && l["window"] == "day" && l["unit"] == "usd";
        assert_eq!(l["shadow"], user_day_usd, "{l}");
    }
    // Metrics: two would-be denials, one refusal.
    let metrics = server.metrics().await;
    assert_eq!(would_deny_total(&metrics), 2, "{metrics}");
    assert!(
        metrics.contains(
            "spendguard_decisions_total{outcome=\"denied\",reason=\"budget_exceeded\"} 1"
        ),
        "{metrics}"
    );
    // Reports count them, also after a restart.
    let (s, v) = server.get("/v1/reports/usage", ADMIN).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["would_deny"]["total"], 2, "{v}");
    assert_eq!(v["would_deny"]["budget_exceeded"], 2);
    let server = server.restart().await;
    let (_, v) = server.get("/v1/reports/usage", ADMIN).await;
    assert_eq!(v["would_deny"]["total"], 2, "{v}");
    // Another tenant's report has none.
    let (_, v) = server
        .get("/v1/reports/usage?tenant_id=globex", ADMIN)
        .await;
    assert_eq!(v["would_deny"]["total"], 0, "{v}");
    // The dashboard shows them.
    let page = server
        .client
        .get(format!("{}/", server.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<div class="big" id="would-deny-count">2</div>"#),
        "{page}"
    );
    server.stop().await;
}

/// 64 concurrent reservations of $0.10 against an enforced $2 global budget, each past its
/// user's $0.01 budget in shadow: exactly 20 are admitted, each one a would-be denial, and
/// every refusal is the global budget's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_limits_do_not_weaken_enforced_ones_under_concurrent_requests() {
    let server =
        Arc::new(spawn(&CONFIG.replace("usd_per_day = \"1\"", "usd_per_day = \"0.01\"")).await);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            reserve(&server, &format!("u{}", i % 8), "0.1").await
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        match s {
            201 => {
                admitted += 1;
                assert_eq!(v["would_deny"]["code"], "budget_exceeded", "{v}");
            }
            429 => {
                let failing = v["error"]["limits"].as_array().unwrap();
                assert!(
                    failing
                        .iter()
                        .all(|l| l["scope"] == "global" && l["shadow"] == false),
                    "{v}"
                );
            }
            _ => panic!("{s}: {v}"),
        }
    }
    assert_eq!(admitted, 20);
    assert_eq!(would_deny_total(&server.metrics().await), 20);
    let ((spent, reserved), _) = server
        .state
        .guard
        .ledger()
        .scope_totals(&spendguard_core::ScopeKey::Global, server.state.guard.now());
    assert_eq!(
        spent.saturating_add(reserved),
        spendguard_core::Money::parse_usd("2").unwrap()
    );
}
