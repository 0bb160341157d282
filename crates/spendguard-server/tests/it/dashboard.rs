//! The dashboard over HTTP: a tenant session's isolation on every page and export, the
//! management forms (sessions, CSRF, audit log, enforcement of what they set), date ranges
//! and filters against the report API, and bad input.

use reqwest::redirect::Policy;
use serde_json::{Value, json};

use crate::support::*;

/// A client that does not follow redirects.
fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `key`; returns the `Cookie` header value.
async fn sign_in(s: &TestServer, key: &str) -> String {
    let resp = plain()
        .post(format!("{}/login", s.url))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

async fn page(s: &TestServer, cookie: &str, path: &str) -> (u16, String) {
    let resp = plain()
        .get(format!("{}{path}", s.url))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn post_form(
    s: &TestServer,
    cookie: Option<&str>,
    path: &str,
    form: &[(&str, &str)],
) -> (u16, String, Option<String>) {
    let mut req = plain().post(format!("{}{path}", s.url)).form(form);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned());
    (status, resp.text().await.unwrap(), location)
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The CSRF token of the first form of a page.
fn csrf(body: &str) -> String {
    body.split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in {body}"))
        .to_owned()
}

const MICROS: i64 = 1_000_000;

const CONFIG: &str = "max_record_cost_usd = \"100000\"\n\
    [tiers.free]\nusd_per_day = \"unlimited\"\nusd_per_month = \"unlimited\"\n\
    requests_per_minute = \"unlimited\"\nrequests_per_day = \"unlimited\"\n\
    tokens_per_day = \"unlimited\"\n";

/// Records one usage at `at` (RFC 3339) through the API; returns its id.
async fn usage(
    s: &TestServer,
    at: &str,
    (tenant, company, user): (&str, Option<&str>, &str),
    (model, endpoint): (&str, &str),
    cost_micros: i64,
) -> String {
    let now = s.state.guard.now();
    s.clock
        .set(at.parse::<jiff::Timestamp>().unwrap().as_microsecond());
    let mut body = json!({
        "tenant_id": tenant, "user_id": user, "model": model, "endpoint": endpoint,
        "input_tokens": 1000, "output_tokens": 200,
        "cost_usd": format!("{}.{:06}", cost_micros / MICROS, cost_micros % MICROS),
    });
    if let Some(c) = company {
        body["company_id"] = json!(c);
    }
    let (st, v) = s.post("/v1/usage", ADMIN, body).await;
    s.clock.set(now);
    assert_eq!(st, 201, "{v}");
    v["usage_id"].as_str().unwrap().to_owned()
}

/// Two tenants: `acme` (the one signed in) and `zorgcorp`, whose every name and figure is
/// distinctive, so that any trace of it on acme's pages can be found.
async fn two_tenants(s: &TestServer) -> (String, String) {
    let acme = usage(
        s,
        "2026-03-09T10:00:00Z",
        ("acme", Some("acme-eng"), "alice"),
        ("gpt-4o", "chat"),
        3_250_000,
    )
    .await;
    usage(
        s,
        "2026-03-10T09:00:00Z",
        ("acme", None, "bob"),
        ("shared-model", "embed"),
        1_500_000,
    )
    .await;
    let zorg = usage(
        s,
        "2026-03-08T10:00:00Z",
        ("zorgcorp", Some("zorgcompany"), "zorguser"),
        ("zorgmodel", "zorgendpoint"),
        7_777_770_000,
    )
    .await;
    usage(
        s,
        "2026-03-10T08:00:00Z",
        ("zorgcorp", None, "zorguser"),
        ("shared-model", "zorgendpoint"),
        4_444_440_000,
    )
    .await;
    // A budget and an alert of each tenant, and a user override each.
    for (t, daily) in [("acme", "2"), ("zorgcorp", "5123.45")] {
        let (st, v, _) = s
            .call(
                M::PUT,
                &format!("/v1/admin/budgets/tenant/{t}"),
                Some(ADMIN),
                Some(json!({ "daily_usd": daily, "monthly_usd": "100000" })),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/users/zorguser?tenant_id=zorgcorp",
            Some(ADMIN),
            Some(json!({ "tier": "free" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    s.state.alerts.evaluate().await.unwrap();
    (acme, zorg)
}

/// Every trace of `zorgcorp`: names and figures as pages and exports show them.
const ZORG: [&str; 10] = [
    "zorg",
    "7,777.77",
    "7777.77",
    "4,444.44",
    "4444.44",
    "12,222.21",
    "12222.21",
    "5,123.45",
    "5123.450000",
    "5123.45",
];

fn assert_no_zorg(what: &str, body: &str) {
    for needle in ZORG {
        assert!(
            !body.contains(needle),
            "{what} shows `{needle}` of another tenant:\n{body}"
        );
    }
}

#[tokio::test]
async fn a_tenant_session_never_sees_another_tenants_names_or_figures() {
    let s = spawn(CONFIG).await;
    let (acme_record, zorg_record) = two_tenants(&s).await;
    let key = s.tenant_key("acme").await;
    let cookie = sign_in(&s, &key).await;

    // `/` sends a tenant to its own page.
    let (st, _) = page(&s, &cookie, "/").await;
    assert_eq!(st, 303);
    let mut pages = vec![
        "/tenants/acme".to_owned(),
        "/tenants/acme?range=90d".to_owned(),
        "/tenants/acme?range=today".to_owned(),
        "/tenants/acme?model=shared-model".to_owned(),
        "/tenants/acme?endpoint=embed".to_owned(),
        "/tenants/acme?model=shared-model&endpoint=embed".to_owned(),
        "/tenants/acme/users/alice".to_owned(),
        "/tenants/acme/users/bob?range=month".to_owned(),
        "/tenants/acme/companies/acme-eng".to_owned(),
        "/models/shared-model".to_owned(),
        "/models/shared-model?range=90d&endpoint=embed".to_owned(),
        "/alerts".to_owned(),
        format!("/records/{acme_record}"),
    ];
    for g in ["day", "model", "endpoint", "tenant", "user", "company"] {
        pages.push(format!("/export.csv?range=90d&group_by={g}"));
        pages.push(format!(
            "/export.csv?range=90d&group_by={g}&model=shared-model"
        ));
    }
    let mut own_figures = 0;
    for p in &pages {
        let (st, body) = page(&s, &cookie, p).await;
        assert!(
            st == 200 || (st == 400 && p.contains("export")),
            "{p}: {st} {body}"
        );
        assert_no_zorg(p, &body);
        if body.contains("3.25") || body.contains("1.50") {
            own_figures += 1;
        }
    }
    // The pages do show acme's own figures (the check above is not vacuous).
    assert!(own_figures >= 10, "{own_figures}");
    let (_, body) = page(&s, &cookie, "/tenants/acme").await;
    assert!(
        body.contains("alice") && body.contains("acme-eng"),
        "{body}"
    );
    let (_, body) = page(&s, &cookie, "/models/shared-model").await;
    assert!(body.contains(r#"data-cost="1.500000""#), "{body}");
    assert!(body.contains("alert") || body.contains("records"), "{body}");
    // Another tenant's model: the page names what was asked for, and shows no figure.
    let (st, body) = page(&s, &cookie, "/models/zorgmodel?range=90d").await;
    assert_eq!(st, 200);
    for needle in &ZORG[1..] {
        assert!(!body.contains(needle), "{needle}: {body}");
    }
    assert!(body.contains(r#"id="records">No usage records"#), "{body}");
    let (_, body) = page(&s, &cookie, "/alerts").await;
    assert!(
        body.contains("tenant acme"),
        "acme's own alert is listed: {body}"
    );

    // Another tenant's pages, records and exports, and the admin's pages, are refused.
    for p in [
        "/tenants/zorgcorp",
        "/tenants/zorgcorp/users/zorguser",
        "/tenants/zorgcorp/companies/zorgcompany",
        "/models/shared-model?tenant=zorgcorp",
        "/export.csv?tenant=zorgcorp",
        "/manage",
        "/audit",
    ] {
        let (st, body) = page(&s, &cookie, p).await;
        assert_eq!(st, 403, "{p}: {body}");
        assert_no_zorg(p, &body);
    }
    let (st, body) = page(&s, &cookie, &format!("/records/{zorg_record}")).await;
    assert_eq!(st, 404, "{body}");
    assert_no_zorg("another tenant's record", &body);
    // A tenant cannot post the admin's forms, even with a token of its own page.
    let (_, own) = page(&s, &cookie, "/tenants/acme").await;
    assert!(!own.contains(r#"name="csrf""#), "no forms for a tenant");
    let (st, _, _) = post_form(
        &s,
        Some(&cookie),
        "/manage/budget",
        &[
            ("csrf", "x"),
            ("scope", "tenant"),
            ("tenant_id", "acme"),
            ("daily_usd", "1000"),
        ],
    )
    .await;
    assert_eq!(st, 403);

    // A revoked key's session ends.
    let (st, v) = s.get("/v1/admin/api-keys", ADMIN).await;
    assert_eq!(st, 200);
    let id = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["tenant_id"] == "acme")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (st, _, _) = s
        .call(
            M::DELETE,
            &format!("/v1/admin/api-keys/{id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = page(&s, &cookie, "/tenants/acme").await;
    assert_eq!(st, 303);
    s.stop().await;
}

#[tokio::test]
async fn management_forms_need_the_session_token_and_are_audited_and_enforced() {
    let s = spawn(CONFIG).await;
    let cookie = sign_in(&s, ADMIN).await;
    let (st, manage) = page(&s, &cookie, "/manage").await;
    assert_eq!(st, 200, "{manage}");
    let token = csrf(&manage);
    let budget = |token: &str| {
        vec![
            ("csrf", token.to_owned()),
            ("scope", "tenant".to_owned()),
            ("tenant_id", "acme".to_owned()),
            ("id", String::new()),
            ("daily_usd", "0.0001".to_owned()),
            ("monthly_usd", String::new()),
        ]
    };
    let form = |v: &Vec<(&'static str, String)>| -> Vec<(&'static str, String)> { v.clone() };
    // Without the token, with a wrong one, or with a bearer key instead of a session:
    // refused, and nothing changes.
    for (cookie, token) in [
        (Some(cookie.as_str()), "sg_wrong"),
        (Some(cookie.as_str()), ""),
        (None, token.as_str()),
    ] {
        let f = form(&budget(token));
        let (st, body, _) = post_form(&s, cookie, "/manage/budget", &as_refs(&f)).await;
        assert!(st == 403 || st == 401, "{st} {body}");
    }
    let resp = plain()
        .post(format!("{}/manage/budget", s.url))
        .bearer_auth(ADMIN)
        .form(&as_refs(&budget(&token)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let (_, v) = s.get("/v1/admin/budgets", ADMIN).await;
    assert_eq!(v["budgets"], json!([]), "{v}");

    // With it: set, and enforced by the next reservation.
    let f = budget(&token);
    let (st, body, location) = post_form(&s, Some(&cookie), "/manage/budget", &as_refs(&f)).await;
    assert_eq!(st, 303, "{body}");
    assert_eq!(location.as_deref(), Some("/tenants/acme"));
    let (st, v) = s
        .post("/v1/reservations", ADMIN, reserve_body("acme", "alice"))
        .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(error_code(&v), "budget_exceeded");
    let (st, v) = s
        .post("/v1/reservations", ADMIN, reserve_body("globex", "alice"))
        .await;
    assert_eq!(st, 201, "{v}");
    // Bad amounts are a 400, never a change.
    for bad in ["-1", "abc", "1e400"] {
        let mut f = budget(&token);
        f[4].1 = bad.to_owned();
        let (st, body, _) = post_form(&s, Some(&cookie), "/manage/budget", &as_refs(&f)).await;
        assert_eq!(st, 400, "{bad}: {body}");
    }

    // A user's tier.
    let (st, body, _) = post_form(
        &s,
        Some(&cookie),
        "/manage/user",
        &[
            ("csrf", &token),
            ("tenant_id", "acme"),
            ("user_id", "alice"),
            ("tier", "free"),
        ],
    )
    .await;
    assert_eq!(st, 303, "{body}");
    let (_, v) = s.get("/v1/admin/users/alice?tenant_id=acme", ADMIN).await;
    assert_eq!(v["overrides"]["tier"], "free", "{v}");
    let (st, _, _) = post_form(
        &s,
        Some(&cookie),
        "/manage/user",
        &[
            ("csrf", &token),
            ("tenant_id", "acme"),
            ("user_id", "alice"),
            ("tier", "platinum"),
        ],
    )
    .await;
    assert_eq!(st, 400);

    // A key: shown once, works, then revoked.
    let (st, body, _) = post_form(
        &s,
        Some(&cookie),
        "/manage/keys",
        &[("csrf", &token), ("tenant_id", "acme")],
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let key = body
        .split(r#"id="new-key">"#)
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap()
        .to_owned();
    assert!(key.starts_with("sg_"), "{key}");
    let (st, _) = s.get("/v1/limits?user_id=alice", &key).await;
    assert_eq!(st, 200);
    let (_, manage) = page(&s, &cookie, "/manage").await;
    assert!(!manage.contains(&key), "a key is shown once only");
    let (_, v) = s.get("/v1/admin/api-keys", ADMIN).await;
    let id = v["keys"][0]["id"].as_str().unwrap().to_owned();
    let (st, _, _) = post_form(
        &s,
        Some(&cookie),
        &format!("/manage/keys/{id}/revoke"),
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(st, 303);
    let (st, _) = s.get("/v1/limits?user_id=alice", &key).await;
    assert_eq!(st, 401);

    // An alert (usage is recorded even over a budget), acknowledged once.
    usage(
        &s,
        "2026-03-10T11:00:00Z",
        ("acme", None, "alice"),
        ("gpt-4o", "chat"),
        1_000_000,
    )
    .await;
    s.state.alerts.evaluate().await.unwrap();
    let (_, v) = s.get("/v1/alerts", ADMIN).await;
    let alerts = v["alerts"].as_array().unwrap().clone();
    assert!(!alerts.is_empty(), "{v}");
    let alert = alerts[0]["id"].as_i64().unwrap();
    let (st, _, location) = post_form(
        &s,
        Some(&cookie),
        &format!("/alerts/{alert}/ack"),
        &[("csrf", &token), ("back", "https://evil.example/")],
    )
    .await;
    assert_eq!(st, 303);
    assert_eq!(location.as_deref(), Some("/alerts"));
    let (_, body) = page(&s, &cookie, "/alerts").await;
    assert!(body.contains("acknowledged"), "{body}");
    let (st, _, _) = post_form(&s, Some(&cookie), "/alerts/999999/ack", &[("csrf", &token)]).await;
    assert_eq!(st, 404);

    // The audit log: every change, newest first, who, before and after.
    let (st, audit) = page(&s, &cookie, "/audit").await;
    assert_eq!(st, 200);
    let actions: Vec<&str> = audit
        .split(r#"data-action=""#)
        .skip(1)
        .map(|r| r.split('"').next().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "alert.acknowledge",
            "key.revoke",
            "key.create",
            "user.set",
            "budget.set"
        ],
        "{audit}"
    );
    assert!(audit.contains("tenant acme"), "{audit}");
    assert!(
        audit.contains(
            r#"{&quot;daily_usd&quot;:&quot;0.000100&quot;,&quot;monthly_usd&quot;:null}"#
        ),
        "{audit}"
    );
    assert!(audit.contains("admin key #"), "{audit}");
    assert!(
        !audit.contains(ADMIN),
        "the audit log names keys by fingerprint only"
    );
    assert!(!audit.contains(&key));
    // The admin API's changes are audited too.
    let (st, v, _) = s
        .call(
            M::PUT,
            "/v1/admin/budgets/company/eng?tenant_id=acme",
            Some(ADMIN),
            Some(json!({ "monthly_usd": "12" })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, audit) = page(&s, &cookie, "/audit").await;
    let first = audit.split(r#"data-action=""#).nth(1).unwrap();
    assert!(first.starts_with("budget.set"), "{first}");
    assert!(
        first.contains("admin (API)") && first.contains("company eng (acme)"),
        "{first}"
    );
    assert!(
        first.contains("&quot;monthly_usd&quot;:&quot;12.000000&quot;"),
        "{first}"
    );
    s.stop().await;
}

/// The bars of `#daily-chart`: (day, cost).
fn bars(body: &str) -> Vec<(String, String)> {
    let chart = body
        .split(r#"id="daily-chart""#)
        .nth(1)
        .unwrap()
        .split("</svg>")
        .next()
        .unwrap();
    chart
        .split(r#"data-day=""#)
        .skip(1)
        .map(|r| {
            let day = r.split('"').next().unwrap().to_owned();
            let cost = r
                .split(r#"data-cost=""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned();
            (day, cost)
        })
        .collect()
}

/// The `data-cost` of each row of a table.
fn table_costs(body: &str, id: &str) -> Vec<(String, String)> {
    let Some(t) = body.split(&format!(r#"<table id="{id}">"#)).nth(1) else {
        return Vec::new();
    };
    let t = t.split("</table>").next().unwrap();
    t.split("<tr>")
        .skip(2)
        .map(|r| {
            let label = r
                .split(r#"title=""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned();
            let cost = r
                .split(r#"data-cost=""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned();
            (label, cost)
        })
        .collect()
}

fn usd6(v: &Value) -> String {
    let micros = (v.as_f64().unwrap() * 1e6).round() as i64;
    format!("{}.{:06}", micros / MICROS, micros % MICROS)
}

#[tokio::test]
async fn date_ranges_and_filters_show_the_report_apis_figures() {
    let s = spawn(CONFIG).await;
    two_tenants(&s).await;
    usage(
        &s,
        "2026-02-14T10:00:00Z",
        ("acme", None, "alice"),
        ("gpt-4o", "chat"),
        2_000_000,
    )
    .await;
    let cookie = sign_in(&s, ADMIN).await;
    let cal = s.state.guard.ledger().policy().calendar.clone();
    let today = cal.date_of(s.state.guard.now());
    for range in ["today", "7d", "month", "last-month", "90d"] {
        let (st, body) = page(&s, &cookie, &format!("/?range={range}")).await;
        assert_eq!(st, 200, "{body}");
        let shown = bars(&body);
        let from = &shown[0].0;
        let to = &shown[shown.len() - 1].0;
        let (st, v) = s
            .get(
                &format!("/v1/reports/usage?from={from}&to={to}&group_by=day"),
                ADMIN,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        for row in v["rows"].as_array().unwrap() {
            let day = row["day"].as_str().unwrap();
            let bar = shown.iter().find(|(d, _)| d == day).unwrap();
            assert_eq!(bar.1, usd6(&row["cost_usd"]), "{range} {day}");
        }
        let with_spend = shown.iter().filter(|(_, c)| c != "0.000000").count();
        assert_eq!(with_spend, v["rows"].as_array().unwrap().len(), "{range}");
        // The model table is the report API's grouping by model.
        let (_, v) = s
            .get(
                &format!("/v1/reports/usage?from={from}&to={to}&group_by=model&limit=10"),
                ADMIN,
            )
            .await;
        let want: Vec<(String, String)> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["model"].as_str().unwrap().to_owned(),
                    usd6(&r["cost_usd"]),
                )
            })
            .collect();
        assert_eq!(table_costs(&body, "by-model"), want, "{range}");
        // The CSV export is the report API's CSV.
        let (_, csv) = page(
            &s,
            &cookie,
            &format!("/export.csv?range={range}&group_by=model"),
        )
        .await;
        let api_csv = s
            .client
            .get(format!(
                "{}/v1/reports/usage?from={from}&to={to}&group_by=model&format=csv",
                s.url
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(csv, api_csv, "{range}");
        match range {
            "today" => assert_eq!(shown.len(), 1),
            "7d" => assert_eq!(shown.len(), 7),
            "90d" => assert_eq!(shown.len(), 90),
            "month" => assert_eq!(from.as_str(), today.first_of_month().to_string()),
            _ => assert_eq!(from.as_str(), "2026-02-01"),
        }
    }
    // The month chart is this month's, whatever the range.
    let (_, v) = s
        .get(
            "/v1/reports/usage?from=2026-03-01&to=2026-03-10&group_by=day",
            ADMIN,
        )
        .await;
    let month = usd6(&v["totals"]["cost_usd"]);
    for range in ["last-month", "90d", "today", "month"] {
        let (_, body) = page(&s, &cookie, &format!("/?range={range}")).await;
        let spent = body
            .split(r#"id="month-chart""#)
            .nth(1)
            .and_then(|r| r.split(r#"data-spent=""#).nth(1))
            .and_then(|r| r.split('"').next())
            .unwrap();
        assert_eq!(spent, month, "{range}");
    }
    // A custom range, and a model filter: per-tenant figures of that model only.
    let (st, body) = page(
        &s,
        &cookie,
        "/?from=2026-03-01&to=2026-03-10&model=shared-model",
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        table_costs(&body, "top-tenants"),
        [
            ("zorgcorp".to_owned(), "4444.440000".to_owned()),
            ("acme".to_owned(), "1.500000".to_owned())
        ]
    );
    let (_, csv) = page(
        &s,
        &cookie,
        "/export.csv?from=2026-03-01&to=2026-03-10&model=shared-model&group_by=tenant",
    )
    .await;
    assert!(
        csv.contains("zorgcorp,1,1000,0,200,1200,4444.440000"),
        "{csv}"
    );
    // A user's page: its records, newest first, linked.
    let (_, body) = page(&s, &cookie, "/tenants/acme/users/alice?range=90d").await;
    let records: Vec<&str> = body
        .split(r#"<a class="record" href="/records/"#)
        .skip(1)
        .map(|r| r.split('"').next().unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{body}");
    let listed = body.split(r#"id="records""#).nth(1).unwrap();
    assert!(listed.find("2026-03-09").unwrap() < listed.find("2026-02-14").unwrap());
    // Ids with a slash are one path segment, encoded.
    usage(
        &s,
        "2026-03-10T10:00:00Z",
        ("acme", None, "team/carol"),
        ("gpt-4o", "chat"),
        1_000_000,
    )
    .await;
    let (_, body) = page(&s, &cookie, "/tenants/acme").await;
    assert!(
        body.contains(r#"href="/tenants/acme/users/team%2Fcarol""#),
        "{body}"
    );
    let (st, body) = page(&s, &cookie, "/tenants/acme/users/team%2Fcarol").await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains(r#"<span id="subject">team/carol</span>"#),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_dashboard_input_is_a_clear_4xx() {
    let s = spawn(CONFIG).await;
    let cookie = sign_in(&s, ADMIN).await;
    for (path, want) in [
        ("/?range=forever", 400),
        ("/?from=2026-13-01", 400),
        ("/?from=2026-03-10&to=2026-03-01", 400),
        ("/?from=2000-01-01&to=2026-03-01", 400),
        ("/?page=-1", 400),
        ("/?tenant=bad%20tenant", 400),
        ("/?model=%00", 400),
        ("/tenants/bad%20tenant", 400),
        ("/tenants/acme/users/%3Cscript%3E", 400),
        ("/models/%3Cb%3E", 400),
        ("/records/not-a-uuid", 400),
        ("/records/0190a3c4-0000-7000-8000-000000000000", 404),
        ("/export.csv?group_by=weekday", 400),
        ("/export.csv?user=alice", 400),
        ("/alerts?page=x", 400),
        ("/audit?page=x", 400),
    ] {
        let (st, body) = page(&s, &cookie, path).await;
        assert_eq!(st, want, "{path}: {body}");
        assert!(
            body.contains("page-error") || path.contains("export"),
            "{path}: {body}"
        );
    }
    // Forms: junk, missing fields, an unknown scope.
    let (_, manage) = page(&s, &cookie, "/manage").await;
    let token = csrf(&manage);
    for form in [
        vec![("csrf", token.as_str())],
        vec![
            ("csrf", token.as_str()),
            ("scope", "planet"),
            ("tenant_id", "acme"),
        ],
        vec![
            ("csrf", token.as_str()),
            ("scope", "user"),
            ("tenant_id", "acme"),
            ("id", "a b"),
        ],
    ] {
        let (st, body, _) = post_form(&s, Some(&cookie), "/manage/budget", &form).await;
        assert_eq!(st, 400, "{form:?}: {body}");
    }
    s.stop().await;
}
