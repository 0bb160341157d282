//! Cost alerts: raised exactly once, listed, and delivered to a webhook with a valid
//! signature, retried after a failure, and not sent again after a restart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use spendguard_store::{AlertQuery, DeliveryState};

use crate::support::{ADMIN, T0, TestServer, error_code, spawn};

/// Free-tier users without cost or rate limits of their own, so only the budgets set in
/// each test raise alerts.
const BASE: &str = r#"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

async fn spend(server: &TestServer, tenant: &str, user: &str, usd: &str) {
    let (s, v) = server
        .post(
            "/v1/usage",
            ADMIN,
            json!({
                "tenant_id": tenant, "user_id": user, "model": "gpt-4o",
                "input_tokens": 10, "output_tokens": 10, "cost_usd": usd,
            }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

async fn all_alerts(server: &TestServer) -> Vec<spendguard_store::AlertRecord> {
    server
        .state
        .guard
        .store()
        .alerts(&AlertQuery::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thresholds_are_raised_exactly_once_under_concurrent_commits() {
    let server = Arc::new(spawn(&format!("{BASE}\n[tenant]\nusd_per_day = \"10\"\n")).await);
    // 40 reservations of $0.25 committed concurrently: $10 in all, crossing 50, 80, 90 and
    // 100% of acme's daily budget, while alert runs race with the commits.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let (s, v) = server
                .post(
                    "/v1/reservations",
                    ADMIN,
                    json!({
                        "tenant_id": "acme", "user_id": format!("u{}", i % 7),
                        "model": "gpt-4o", "input_tokens": 10,
                        "estimated_cost_usd": "0.25",
                    }),
                )
                .await;
            assert_eq!(s, 201, "{v}");
            let id = v["reservation_id"].as_str().unwrap().to_owned();
            let (s, v) = server
                .post(
                    &format!("/v1/reservations/{id}/commit"),
                    ADMIN,
                    json!({ "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.25" }),
                )
                .await;
            assert_eq!(s, 200, "{v}");
            server.state.alerts.evaluate().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.state.alerts.evaluate().await.unwrap();
    let alerts = all_alerts(&server).await;
    // Each run raises only the highest threshold reached, so which of 50, 80 and 90 were
    // raised depends on how the commits and runs interleaved; 100 is raised, and nothing
    // twice.
    let mut thresholds: Vec<u32> = alerts.iter().map(|a| a.alert.threshold_percent).collect();
    thresholds.sort_unstable();
    let mut unique = thresholds.clone();
    unique.dedup();
    assert_eq!(unique, thresholds, "{alerts:?}");
    assert_eq!(thresholds.last(), Some(&100), "{alerts:?}");
    assert!(thresholds.iter().all(|t| [50, 80, 90, 100].contains(t)));
    let raised = alerts.len();
    for a in &alerts {
        assert_eq!(a.alert.scope.id(), "acme");
        assert_eq!(a.alert.window, spendguard_core::Window::Day);
        assert_eq!(a.alert.limit.micros(), 10_000_000);
    }
    // More spend and more runs raise nothing new.
    spend(&server, "acme", "u1", "1").await;
    server.state.alerts.evaluate().await.unwrap();
    assert_eq!(all_alerts(&server).await.len(), raised);

    // The API lists them, newest first, with the contract's fields.
    let (s, v) = server.get("/v1/alerts", ADMIN).await;
    assert_eq!(s, 200, "{v}");
    let list = v["alerts"].as_array().unwrap();
    assert_eq!(list.len(), raised);
    let hundred = list.iter().find(|a| a["threshold_percent"] == 100).unwrap();
    assert_eq!(hundred["kind"], "threshold");
    assert_eq!(hundred["scope"], "tenant");
    assert_eq!(hundred["scope_id"], "acme");
    assert_eq!(hundred["tenant_id"], "acme");
    assert_eq!(hundred["window"], "day");
    assert_eq!(hundred["limit_usd"], 10.0);
    assert!(hundred["amount_usd"].as_f64().unwrap() >= 10.0);
}

#[tokio::test]
async fn alerts_are_listed_per_tenant_and_per_window() {
    let server = spawn(&format!("{BASE}\n[tenant]\nusd_per_day = \"10\"\n")).await;
    spend(&server, "acme", "u1", "5").await;
    spend(&server, "globex", "u1", "8").await;
    server.state.alerts.evaluate().await.unwrap();
    let acme = server.tenant_key("acme").await;
    let (s, v) = server.get("/v1/alerts", &acme).await;
    assert_eq!(s, 200, "{v}");
    let list = v["alerts"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["scope_id"], "acme");
    assert_eq!(list[0]["threshold_percent"], 50);
    let (s, e) = server.get("/v1/alerts?tenant_id=globex", &acme).await;
    assert_eq!((s, error_code(&e)), (403, "forbidden"));
    // acme at 50%, globex at 80% (only its highest threshold).
    let (_, v) = server.get("/v1/alerts", ADMIN).await;
    assert_eq!(v["alerts"].as_array().unwrap().len(), 2, "{v}");
    // The next day, yesterday's day alerts are no longer current, but still on record.
    server.clock.advance(24 * 3_600_000_000);
    let (_, v) = server.get("/v1/alerts", ADMIN).await;
    assert_eq!(v["alerts"], json!([]));
    let (_, v) = server.get("/v1/alerts?all=true", ADMIN).await;
    assert_eq!(v["alerts"].as_array().unwrap().len(), 2, "{v}");
    server.stop().await;
}

#[tokio::test]
async fn a_jump_past_several_thresholds_raises_only_the_highest() {
    let server = spawn(&format!("{BASE}\n[tenant]\nusd_per_day = \"10\"\n")).await;
    // $0 → $9.512345 in one record: past 50, 80 and 90% at once.
    spend(&server, "acme", "u1", "9.512345").await;
    let raised = server.state.alerts.evaluate().await.unwrap();
    let thresholds: Vec<u32> = raised.iter().map(|a| a.alert.threshold_percent).collect();
    assert_eq!(thresholds, [90], "{raised:?}");
    // Money in the message is to the cent.
    let (_, v) = server.get("/v1/alerts", ADMIN).await;
    let message = v["alerts"][0]["message"].as_str().unwrap().to_owned();
    assert_eq!(
        message,
        "tenant acme has spent $9.51 of its $10.00 daily budget (90% threshold)"
    );
    // The next crossing raises the next threshold, once; lower ones are never raised.
    spend(&server, "acme", "u1", "0.6").await;
    let raised = server.state.alerts.evaluate().await.unwrap();
    let thresholds: Vec<u32> = raised.iter().map(|a| a.alert.threshold_percent).collect();
    assert_eq!(thresholds, [100], "{raised:?}");
    spend(&server, "acme", "u1", "1").await;
    assert!(server.state.alerts.evaluate().await.unwrap().is_empty());
    let mut all: Vec<u32> = all_alerts(&server)
        .await
        .iter()
        .map(|a| a.alert.threshold_percent)
        .collect();
    all.sort_unstable();
    assert_eq!(all, [90, 100]);
    server.stop().await;
}

#[tokio::test]
async fn a_monthly_run_rate_over_budget_raises_a_projection() {
    // T0 is March 10, 12:00 UTC: 9.5 of March's 31 days have passed.
    let server = spawn(&format!("{BASE}\n[tenant]\nusd_per_month = \"100\"\n")).await;
    spend(&server, "acme", "u1", "40").await;
    let raised = server.state.alerts.evaluate().await.unwrap();
    assert_eq!(raised.len(), 1, "{raised:?}");
    let a = &raised[0].alert;
    assert_eq!(a.kind, spendguard_store::AlertKind::Projected);
    assert_eq!(a.window, spendguard_core::Window::Month);
    // $40 × 31 / 9.5 days.
    let expected = 40_000_000i128 * 31 * 48 / (9 * 48 + 24);
    assert_eq!(i128::from(a.amount.micros()), expected);
    // Slower spend elsewhere projects under budget: nothing.
    spend(&server, "globex", "u1", "20").await;
    assert!(server.state.alerts.evaluate().await.unwrap().is_empty());
    server.stop().await;
}

/// A webhook receiver that fails its first `fail_first` requests with a 500.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
}

async fn receiver(fail_first: usize) -> Receiver {
    let got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
    let failures = Arc::new(AtomicUsize::new(fail_first));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let got = got.clone();
            move |headers: HeaderMap, body: Bytes| {
                let got = got.clone();
                let failures = failures.clone();
                async move {
                    got.lock().unwrap().push((headers, body));
                    let fail = failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, got }
}

/// Whether `X-Spendguard-Signature` (`t=<unix seconds>,v1=<hex>`) is the HMAC-SHA256 of
/// `<t>.<X-Spendguard-Delivery>.<body>` keyed with `secret`, computed here independently of
/// the server's code, as a receiver would.
fn signed(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let header = headers["x-spendguard-signature"].to_str().unwrap();
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let delivery = headers["x-spendguard-delivery"].to_str().unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{delivery}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes()) == v1
}

/// The signed timestamp of a delivery, in Unix seconds.
fn signed_at(headers: &HeaderMap) -> i64 {
    let header = headers["x-spendguard-signature"].to_str().unwrap();
    header
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap()
}

/// Checks the signature and the content type; returns the body as JSON.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> Value {
    assert!(signed(secret, headers, body), "bad signature on {body:?}");
    assert_eq!(headers["content-type"], "application/json");
    serde_json::from_slice(body).unwrap()
}

#[tokio::test]
async fn webhooks_are_signed_retried_and_not_sent_again_after_a_restart() {
    let hook = receiver(1).await;
    let secret = "whsec-test";
    let config = format!(
        "{BASE}\n[tenant]\nusd_per_day = \"10\"\n[alerts]\nthresholds = [50, 100]\nwebhook_urls = [\"{}\"]\nwebhook_secret = \"{secret}\"\n",
        hook.url
    );
    let server = spawn(&config).await;
    spend(&server, "acme", "u1", "6").await;
    assert_eq!(server.state.alerts.evaluate().await.unwrap().len(), 1);

    // First attempt: the receiver fails; the delivery waits for its backoff (1 s).
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 1);
    let deliveries = server.state.guard.store().deliveries().await.unwrap();
    assert_eq!(deliveries.len(), 1);
    let d = &deliveries[0];
    assert_eq!((d.state, d.attempts), (DeliveryState::Pending, 1));
    assert!(d.last_error.as_deref().unwrap().contains("500"), "{d:?}");
    assert_eq!(d.next_attempt_at, Some(T0 + 1_000_000));
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 0);
    assert_eq!(hook.got.lock().unwrap().len(), 1);

    // Once due, the retry goes through.
    server.clock.advance(1_000_000);
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 1);
    let d = &server.state.guard.store().deliveries().await.unwrap()[0];
    assert_eq!((d.state, d.attempts), (DeliveryState::Delivered, 2));
    let text = server.metrics().await;
    for line in [
        "spendguard_alerts_raised_total 1",
        "spendguard_webhook_attempts_total{outcome=\"delivered\"} 1",
        "spendguard_webhook_attempts_total{outcome=\"retry\"} 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    {
        let got = hook.got.lock().unwrap();
        assert_eq!(got.len(), 2);
        for (i, (headers, body)) in got.iter().enumerate() {
            let v = verify(secret, headers, body);
            assert_eq!(v["type"], "spendguard.alert");
            assert_eq!(v["kind"], "threshold");
            assert_eq!(v["threshold_percent"], 50);
            assert_eq!(v["scope"], "tenant");
            assert_eq!(v["scope_id"], "acme");
            assert_eq!(v["amount_usd"], 6.0);
            assert_eq!(v["limit_usd"], 10.0);
            assert_eq!(headers["x-spendguard-delivery"], d.id.to_string().as_str());
            assert_eq!(
                headers["x-spendguard-attempt"],
                (i + 1).to_string().as_str()
            );
        }
        // Each attempt is signed at its own time (the server's clock), which a receiver
        // checks is recent (its replay window).
        assert_eq!(signed_at(&got[0].0), T0 / 1_000_000);
        assert_eq!(signed_at(&got[1].0), T0 / 1_000_000 + 1);
        // A changed body, another secret, another timestamp or another delivery id does
        // not verify: a captured request cannot be replayed with a fresh timestamp.
        let (headers, body) = &got[0];
        let mut forged = body.to_vec();
        forged[0] = b' ';
        assert!(!signed(secret, headers, &forged));
        assert!(!signed("another-secret", headers, body));
        let mut later = headers.clone();
        let sig = later["x-spendguard-signature"].to_str().unwrap().to_owned();
        let moved = sig.replacen(
            &format!("t={}", T0 / 1_000_000),
            &format!("t={}", T0 / 1_000_000 + 600),
            1,
        );
        later.insert("x-spendguard-signature", moved.parse().unwrap());
        assert!(!signed(secret, &later, body));
        let mut other = headers.clone();
        other.insert("x-spendguard-delivery", "999999".parse().unwrap());
        assert!(!signed(secret, &other, body));
    }

    // After a restart, nothing is sent again; a new crossing is sent once.
    let server = server.restart().await;
    spend(&server, "acme", "u1", "1").await;
    assert!(server.state.alerts.evaluate().await.unwrap().is_empty());
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 0);
    assert_eq!(hook.got.lock().unwrap().len(), 2);
    spend(&server, "acme", "u1", "3").await;
    assert_eq!(server.state.alerts.evaluate().await.unwrap().len(), 1);
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 1);
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    assert_eq!(
        verify(secret, &got[2].0, &got[2].1)["threshold_percent"],
        100
    );
    server.stop().await;
}

#[tokio::test]
async fn the_background_dispatcher_delivers_without_being_asked() {
    let hook = receiver(0).await;
    let config = format!(
        "{BASE}\n[tenant]\nusd_per_day = \"10\"\n[alerts]\nthresholds = [50]\nwebhook_urls = [\"{}\"]\nwebhook_secret = \"s\"\n",
        hook.url
    );
    let server = spawn(&config).await;
    server.state.alerts.spawn();
    spend(&server, "acme", "u1", "5").await;
    // Wait (with a deadline) for the engine and the dispatcher to do their work.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while hook.got.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no webhook within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.stop().await;
    let got = hook.got.lock().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(verify("s", &got[0].0, &got[0].1)["threshold_percent"], 50);
}

#[tokio::test]
async fn the_dashboard_counts_the_same_alerts_as_the_api() {
    let server = spawn(&format!("{BASE}\n[tenant]\nusd_per_day = \"10\"\n")).await;
    // 25 tenants at 50% of their daily budget: 25 alerts.
    for i in 0..25 {
        spend(&server, &format!("tenant-{i:02}"), "u1", "5").await;
    }
    server.state.alerts.evaluate().await.unwrap();
    let (_, v) = server.get("/v1/alerts", ADMIN).await;
    let listed = v["alerts"].as_array().unwrap().len();
    assert_eq!(listed, 25);
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
    let count = page
        .split(r#"id="alert-count">"#)
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap();
    assert_eq!(count, listed.to_string());
    let rows = page
        .split(r#"<table id="alerts">"#)
        .nth(1)
        .unwrap()
        .split("</table>")
        .next()
        .unwrap()
        .matches("<tr")
        .count();
    // A header row and 20 alerts, then how many more there are.
    assert_eq!(rows, 21);
    assert!(
        page.contains(r#"id="alerts-more"><a href="/alerts">5 more</a>"#),
        "{page}"
    );
    // `/alerts` lists them all, 20 a page, with the same count.
    let ids = |page: &str| -> Vec<i64> {
        page.split(r#"data-alert-id=""#)
            .skip(1)
            .map(|r| r.split('"').next().unwrap().parse().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    for n in 0..2 {
        let page = server
            .client
            .get(format!("{}/alerts?page={n}", server.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(r#"<span id="alert-count">25</span>"#),
            "{page}"
        );
        seen.extend(ids(&page));
    }
    let api: Vec<i64> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    let mut sorted_seen = seen.clone();
    sorted_seen.sort_unstable();
    let mut sorted_api = api.clone();
    sorted_api.sort_unstable();
    assert_eq!(seen.len(), 25);
    assert_eq!(sorted_seen, sorted_api);
    server.stop().await;
}

/// An event the database refuses for good (a NUL in text, on PostgreSQL; the HTTP edge
/// refuses it, so it is sent through the guard) is kept as a dead letter and raises one
/// alert for the day, listed by `/v1/alerts`, however often the engine evaluates.
#[tokio::test]
async fn postgres_a_dead_letter_raises_one_alert() {
    let Some(s) = crate::support::spawn_postgres("", "deadletter").await else {
        return;
    };
    let (st, r) = s
        .post(
            "/v1/reservations",
            ADMIN,
            crate::support::reserve_body("acme", "ann"),
        )
        .await;
    assert_eq!(st, 201, "{r}");
    let id: uuid::Uuid = r["reservation_id"].as_str().unwrap().parse().unwrap();
    let refused = s.state.guard.release(id, Some("a\u{0}b".into())).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(s.state.guard.stats().dead_letters, 1);
    for _ in 0..3 {
        s.state.alerts.evaluate().await.unwrap();
    }
    let (st, v) = s.get("/v1/alerts", ADMIN).await;
    assert_eq!(st, 200, "{v}");
    let dead: Vec<&Value> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "dead_letter")
        .collect();
    assert_eq!(dead.len(), 1, "{v}");
    assert_eq!(dead[0]["scope"], "global");
    assert!(
        dead[0]["message"]
            .as_str()
            .unwrap()
            .contains("dead letters")
    );
    s.stop().await;
}

#[tokio::test]
async fn soft_budgets_raise_alerts_and_never_deny() {
    // A soft tenant budget of $1 a day and a soft user budget of $0.50 (the tier's), no
    // hard cost caps below the global ones.
    let config = format!(
        "{BASE}soft_usd_per_day = \"0.5\"\n[tenant]\nsoft_usd_per_day = \"1\"\n[alerts]\nthresholds = [50, 100]\n"
    );
    let server = spawn(&config).await;
    // Twelve reservations of $0.25: $3 in all, three times the soft tenant budget; each is
    // admitted and committed.
    for i in 0..12 {
        let (s, v) = server
            .post(
                "/v1/reservations",
                ADMIN,
                json!({
                    "tenant_id": "acme", "user_id": "u1", "model": "gpt-4o",
                    "input_tokens": 10, "estimated_cost_usd": "0.25",
                }),
            )
            .await;
        assert_eq!(s, 201, "reservation {i}: {v}");
        assert!(v["would_deny"].is_null(), "{v}");
        let id = v["reservation_id"].as_str().unwrap().to_owned();
        let (s, v) = server
            .post(
                &format!("/v1/reservations/{id}/commit"),
                ADMIN,
                json!({ "input_tokens": 10, "output_tokens": 10, "cost_usd": "0.25" }),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let raised = server.state.alerts.evaluate().await.unwrap();
    let mut soft: Vec<(String, u32)> = raised
        .iter()
        .filter(|r| r.alert.kind == spendguard_store::AlertKind::Soft)
        .map(|r| {
            (
                r.alert.scope.kind().as_str().to_owned(),
                r.alert.threshold_percent,
            )
        })
        .collect();
    soft.sort();
    assert_eq!(
        soft,
        vec![("tenant".to_owned(), 100), ("user".to_owned(), 100)]
    );
    // Listed with their kind, budget name and cents.
    let (s, v) = server.get("/v1/alerts", ADMIN).await;
    assert_eq!(s, 200, "{v}");
    let alerts = v["alerts"].as_array().unwrap();
    let tenant = alerts
        .iter()
        .find(|a| a["kind"] == "soft_threshold" && a["scope"] == "tenant")
        .unwrap_or_else(|| panic!("a soft tenant alert in {v}"));
    assert_eq!(tenant["budget"], "tenant acme daily soft budget");
    assert_eq!(tenant["limit_usd"], 1.0);
    let message = tenant["message"].as_str().unwrap();
    assert!(
        message.contains("$3.00 of its $1.00 daily soft budget"),
        "{message}"
    );
    // Raised once: more spend raises nothing new.
    spend(&server, "acme", "u1", "1").await;
    assert!(
        server
            .state
            .alerts
            .evaluate()
            .await
            .unwrap()
            .iter()
            .all(|r| r.alert.kind != spendguard_store::AlertKind::Soft)
    );
    server.stop().await;
}

#[tokio::test]
async fn slack_messages_have_text_and_blocks_and_retries_keep_the_delivery_id() {
    let hook = receiver(1).await;
    let signed_hook = receiver(0).await;
    let config = format!(
        "{BASE}\n[tenant]\nusd_per_day = \"10\"\n[alerts]\nthresholds = [50]\nslack_webhook_urls = [\"{}\"]\nwebhook_urls = [\"{}\"]\nwebhook_secret = \"s\"\n",
        hook.url, signed_hook.url
    );
    let server = spawn(&config).await;
    spend(&server, "acme", "u1", "6").await;
    assert_eq!(server.state.alerts.evaluate().await.unwrap().len(), 1);
    // The Slack destination fails once and is retried after its backoff; the signed
    // webhook gets the same alert in its own format.
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 2);
    server.clock.advance(1_000_000);
    assert_eq!(server.state.alerts.deliver_due().await.unwrap(), 1);
    let deliveries = server.state.guard.store().deliveries().await.unwrap();
    assert!(
        deliveries
            .iter()
            .all(|d| d.state == DeliveryState::Delivered),
        "{deliveries:?}"
    );
    let slack = deliveries.iter().find(|d| d.url == hook.url).unwrap();
    assert_eq!(slack.attempts, 2);
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    for (i, (headers, body)) in got.iter().enumerate() {
        // The same delivery id on every attempt, so a receiver can drop a repeat.
        assert_eq!(
            headers["x-spendguard-delivery"],
            slack.id.to_string().as_str()
        );
        assert_eq!(
            headers["x-spendguard-attempt"],
            (i + 1).to_string().as_str()
        );
        assert_eq!(headers["content-type"], "application/json");
        assert!(!headers.contains_key("x-spendguard-signature"));
        let v: Value = serde_json::from_slice(body).unwrap();
        let text = v["text"].as_str().unwrap();
        assert_eq!(
            text,
            "tenant acme has spent $6.00 of its $10.00 daily budget (50% threshold)"
        );
        let blocks = v["blocks"].as_array().unwrap();
        let types: Vec<&str> = blocks.iter().map(|b| b["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["header", "section", "context"]);
        assert_eq!(blocks[0]["text"]["type"], "plain_text");
        assert_eq!(
            blocks[0]["text"]["text"],
            "spendguard: tenant acme daily budget at 50%"
        );
        assert_eq!(blocks[1]["text"]["type"], "mrkdwn");
        assert_eq!(blocks[1]["text"]["text"], text);
        let fields: Vec<&str> = blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "*Budget*\ntenant acme daily budget",
                "*Kind*\nthreshold",
                "*Spend*\n$6.00",
                "*Limit*\n$10.00"
            ]
        );
        assert_eq!(blocks[2]["elements"][0]["type"], "mrkdwn");
        // Nothing but `text` and `blocks`: what an incoming webhook takes.
        assert_eq!(v.as_object().unwrap().len(), 2);
    }
    let signed_got = signed_hook.got.lock().unwrap().clone();
    assert_eq!(signed_got.len(), 1);
    let v = verify("s", &signed_got[0].0, &signed_got[0].1);
    assert_eq!(v["budget"], "tenant acme daily budget");
    server.stop().await;
}
