//! The spend dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver), against a server seeded through the HTTP API.
//!
//! Needs `chromedriver` and `chromium` (on the PATH or in /usr/bin, or named by
//! `SPENDGUARD_CHROMEDRIVER` and `SPENDGUARD_CHROMIUM`). Without them the test says
//! `SKIPPED` and appends a line to `SPENDGUARD_TEST_SKIP_LOG`, which fails CI.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::*;

const MICROS_PER_USD: i64 = 1_000_000;
/// The global caps the test's configuration sets.
const GLOBAL_DAY_CAP: i64 = 1_000 * MICROS_PER_USD;
const GLOBAL_MONTH_CAP: i64 = 25_000 * MICROS_PER_USD;
/// The daily budget set on tenant `acme`, which its spend today crosses 90% of.
const ACME_DAILY: i64 = 10 * MICROS_PER_USD;
/// How long any one thing the browser does may take.
const PATIENCE: Duration = Duration::from_secs(30);
const CHROME_ARGS: [&str; 6] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
];
/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One usage record to seed, at a time before the test's "now" (T0, 2026-03-10T12:00:00Z).
struct Seed {
    at: &'static str,
    tenant: &'static str,
    company: Option<&'static str>,
    user: &'static str,
    model: &'static str,
    input: u64,
    output: u64,
    /// Micro-dollars.
    cost: i64,
}

const fn seed(
    at: &'static str,
    tenant: &'static str,
    user: &'static str,
    model: &'static str,
    (input, output): (u64, u64),
    cost: i64,
) -> Seed {
    Seed {
        at,
        tenant,
        company: None,
        user,
        model,
        input,
        output,
        cost,
    }
}

/// Oldest first. Around the edges of the chart's 30 days (2026-02-09 to 2026-03-10) and of
/// the month (the page's tables are this month's only).
const SEEDS: [Seed; 12] = [
    // Before the 30 days: in no figure on the page.
    seed(
        "2026-02-05T10:00:00Z",
        "globex",
        "carol",
        "gpt-4o",
        (1_000, 500),
        50_000_000,
    ),
    // The chart's first day.
    seed(
        "2026-02-09T10:00:00Z",
        "globex",
        "carol",
        "gpt-4o",
        (2_000, 800),
        20_000_000,
    ),
    seed(
        "2026-02-20T10:00:00Z",
        "initech",
        "dave",
        "claude-sonnet-4",
        (1_500, 600),
        7_250_000,
    ),
    // The last second of February.
    seed(
        "2026-02-28T23:59:59Z",
        "initech",
        "dave",
        "gpt-4o-mini",
        (100, 50),
        400_000,
    ),
    // The first moment of March.
    Seed {
        company: Some("globex-eu"),
        ..seed(
            "2026-03-01T00:00:00Z",
            "globex",
            "carol",
            "gpt-4o",
            (4_000, 1_200),
            40_000_000,
        )
    },
    // Not a whole number of cents.
    seed(
        "2026-03-01T09:00:00Z",
        "initech",
        "dave",
        "claude-sonnet-4-5",
        (3_000, 900),
        12_345_678,
    ),
    seed(
        "2026-03-05T10:00:00Z",
        "globex",
        "erin",
        "gpt-4o-mini",
        (800, 300),
        750_000,
    ),
    seed(
        "2026-03-05T11:00:00Z",
        "acme",
        "alice",
        "gpt-4o",
        (1_200, 400),
        3_500_000,
    ),
    // A big day: thousands separators, and the chart's tallest bar.
    seed(
        "2026-03-09T15:00:00Z",
        "initech",
        "dave",
        "gpt-4o",
        (250_000, 90_000),
        1_234_500_000,
    ),
    // Today: acme reaches $9 of its $10 day.
    seed(
        "2026-03-10T08:00:00Z",
        "acme",
        "alice",
        "gpt-4o",
        (5_000, 2_000),
        6_000_000,
    ),
    seed(
        "2026-03-10T09:00:00Z",
        "acme",
        "bob",
        "claude-sonnet-4-5",
        (2_500, 1_000),
        3_000_000,
    ),
    seed(
        "2026-03-10T11:59:59Z",
        "globex",
        "carol",
        "gpt-4o-mini",
        (400, 100),
        250_000,
    ),
];

/// A decimal amount of USD with six places, as the API takes it and as the page's
/// `data-cost` attributes carry it.
fn decimal(micros: i64) -> String {
    assert!(micros >= 0);
    format!("{}.{:06}", micros / MICROS_PER_USD, micros % MICROS_PER_USD)
}

/// Digits grouped by thousands, as the page shows counts.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// USD as the page shows it: to the cent (half up), thousands separators; `<$0.01` for a
/// smaller non-zero amount.
fn usd(micros: i64) -> String {
    assert!(micros >= 0);
    if micros > 0 && micros < 5_000 {
        return "<$0.01".into();
    }
    let cents = (micros + 5_000) / 10_000;
    format!("${}.{:02}", grouped((cents / 100) as u64), cents % 100)
}

fn micros_at(at: &str) -> i64 {
    at.parse::<jiff::Timestamp>().unwrap().as_microsecond()
}

/// A row of a ranked table: label, requests, tokens, spend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Row {
    label: String,
    requests: u64,
    tokens: u64,
    cost: i64,
}

impl Row {
    /// The cells' texts and the spend cell's `data-cost`, as the page must show them.
    fn shown(&self) -> Value {
        json!({
            "cells": [self.label, grouped(self.requests), grouped(self.tokens), usd(self.cost)],
            "cost": decimal(self.cost),
        })
    }
}

/// Groups `seeds` by `label`, by spend descending (the data has no ties).
fn ranked<'a>(seeds: impl Iterator<Item = &'a Seed>, label: impl Fn(&Seed) -> String) -> Vec<Row> {
    let mut groups: BTreeMap<String, Row> = BTreeMap::new();
    for s in seeds {
        let l = label(s);
        let row = groups.entry(l.clone()).or_default();
        row.label = l;
        row.requests += 1;
        row.tokens += s.input + s.output;
        row.cost += s.cost;
    }
    let mut rows: Vec<Row> = groups.into_values().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.cost));
    assert!(
        rows.windows(2).all(|w| w[0].cost != w[1].cost),
        "the seeds must not tie"
    );
    rows
}

/// Reads the dashboard: texts, data attributes and some layout facts.
const READ_DASHBOARD: &str = r#"
const text = (sel) => { const e = document.querySelector(sel); return e ? e.textContent.trim() : null; };
const rows = (id) => {
  const t = document.getElementById(id);
  if (!t || t.tagName !== 'TABLE') return null;
  return Array.from(t.tBodies[0].rows).map((r) => ({
    cells: Array.from(r.cells).map((c) => c.textContent.trim()),
    cost: r.cells[r.cells.length - 1].dataset.cost ?? null,
  }));
};
const chart = document.getElementById('daily-chart');
const box = chart ? chart.getBoundingClientRect() : null;
return {
  path: location.pathname,
  spendToday: text('#spend-today'),
  spendTodayCap: text('#spend-today-cap'),
  spendTodayPct: text('#spend-today-pct'),
  spendMonth: text('#spend-month'),
  spendMonthCap: text('#spend-month-cap'),
  spendMonthPct: text('#spend-month-pct'),
  spend30d: text('#range-total'),
  bars: Array.from(document.querySelectorAll('#daily-chart rect.bar')).map((b) => ({
    day: b.dataset.day,
    cost: b.dataset.cost,
    height: parseFloat(b.getAttribute('height')),
    title: b.querySelector('title') ? b.querySelector('title').textContent : null,
  })),
  chartWidth: box ? box.width : 0,
  models: rows('by-model'),
  tenants: rows('top-tenants'),
  users: rows('top-users'),
  alertsTag: document.getElementById('alerts') ? document.getElementById('alerts').tagName : null,
  alertCount: text('#alert-count'),
  alerts: rows('alerts'),
  scriptCookies: document.cookie,
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
};
"#;

/// A server with [`SEEDS`] recorded (the clock moved to each one's time, then back to T0),
/// tenant `acme`'s daily budget set to [`ACME_DAILY`], and the alerts evaluated; returns
/// the alerts raised.
async fn seeded_server() -> (TestServer, Vec<spendguard_store::AlertRecord>) {
    // The seeded records are larger than the default ceiling of one record.
    let config = format!(
        "max_record_cost_usd = \"100000\"\n\
         [global]\nusd_per_day = \"{}\"\nusd_per_month = \"{}\"\n\
         [tiers.free]\nusd_per_day = \"unlimited\"\nusd_per_month = \"unlimited\"\n\
         requests_per_minute = \"unlimited\"\nrequests_per_day = \"unlimited\"\n\
         tokens_per_day = \"unlimited\"\n",
        decimal(GLOBAL_DAY_CAP),
        decimal(GLOBAL_MONTH_CAP)
    );
    let server = spawn(&config).await;

    // Seed through the API, moving the clock to each record's time.
    let t0 = server.state.guard.now();
    assert_eq!(t0, T0);
    for s in &SEEDS {
        let at = micros_at(s.at);
        assert!(at < T0, "{} is not before now", s.at);
        server.clock.set(at);
        let mut body = json!({
            "tenant_id": s.tenant,
            "user_id": s.user,
            "model": s.model,
            "endpoint": "chat",
            "input_tokens": s.input,
            "output_tokens": s.output,
            "cost_usd": decimal(s.cost),
        });
        if let Some(c) = s.company {
            body["company_id"] = json!(c);
        }
        let (st, v) = server.post("/v1/usage", ADMIN, body).await;
        assert_eq!(st, 201, "{}: {v}", s.at);
        assert_eq!(v["cost_usd"].as_f64(), Some(s.cost as f64 / 1e6), "{v}");
    }
    server.clock.set(T0);
    let (st, v, _) = server
        .call(
            M::PUT,
            "/v1/admin/budgets/tenant/acme",
            Some(ADMIN),
            Some(json!({ "daily_usd": decimal(ACME_DAILY), "monthly_usd": null })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let raised = server.state.alerts.evaluate().await.unwrap();
    (server, raised)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_seeded_spend_in_chromium() {
    let Some((driver_bin, chromium)) = browser_tools() else {
        return;
    };
    let started = Instant::now();
    let (server, raised) = seeded_server().await;

    // What the page must show, from the seeds.
    let today = "2026-03-10".parse::<jiff::civil::Date>().unwrap();
    let first = today.checked_sub(jiff::Span::new().days(29)).unwrap();
    let day_of = |s: &Seed| s.at[..10].parse::<jiff::civil::Date>().unwrap();
    let in_month = || {
        SEEDS
            .iter()
            .filter(move |s| day_of(s) >= today.first_of_month())
    };
    let spent_today: i64 = SEEDS
        .iter()
        .filter(|s| day_of(s) == today)
        .map(|s| s.cost)
        .sum();
    let spent_month: i64 = in_month().map(|s| s.cost).sum();
    let mut days: Vec<(String, i64)> = Vec::new();
    let mut d = first;
    while d <= today {
        let cost = SEEDS
            .iter()
            .filter(|s| day_of(s) == d)
            .map(|s| s.cost)
            .sum();
        days.push((d.to_string(), cost));
        d = d.tomorrow().unwrap();
    }
    let spent_30d: i64 = days.iter().map(|(_, c)| c).sum();
    // The first seed is older than the chart.
    assert!(spent_30d < SEEDS.iter().map(|s| s.cost).sum::<i64>());
    // The tables cover the page's range: the last 30 days by default.
    let in_range = || SEEDS.iter().filter(move |s| day_of(s) >= first);
    let models = ranked(in_range(), |s| s.model.to_owned());
    let tenants = ranked(in_range(), |s| s.tenant.to_owned());
    let users = ranked(in_range(), |s| format!("{} ({})", s.user, s.tenant));
    let acme_today: i64 = SEEDS
        .iter()
        .filter(|s| day_of(s) == today && s.tenant == "acme")
        .map(|s| s.cost)
        .sum();
    let thresholds: Vec<u32> = [50, 80, 90, 100]
        .into_iter()
        .filter(|t| acme_today * 100 >= ACME_DAILY * i64::from(*t))
        .collect();
    assert_eq!(
        thresholds,
        [50, 80, 90],
        "the seeds should reach 90% of acme's day, not 100%"
    );
    // Spend past several thresholds at once raises only the highest.
    let raised_thresholds: Vec<u32> = raised.iter().map(|r| r.alert.threshold_percent).collect();
    assert_eq!(raised_thresholds, [90], "{raised:?}");

    // Without a session, the page is not served: a redirect to the form; a wrong key gets
    // the form again with an error, and no cookie.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = plain.get(format!("{}/", server.url)).send().await.unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    assert_eq!(resp.headers()["location"], "/login");
    let resp = plain
        .post(format!("{}/login", server.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("key=sg_not-the-admin-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("set-cookie").is_none());
    let body = resp.text().await.unwrap();
    assert!(body.contains(r#"id="login-error""#), "{body}");
    assert!(!body.contains("spend-today"));

    // The browser.
    let mut wd = WebDriver::start(&driver_bin).await;
    wd.new_session(&chromium).await;
    println!(
        "chromedriver and a browser session up after {:?}",
        started.elapsed()
    );

    wd.goto(&format!("{}/", server.url)).await;
    wd.wait_for(
        "the sign-in form",
        "return location.pathname === '/login' && !!document.getElementById('key')",
    )
    .await;
    assert_eq!(wd.current_url().await, format!("{}/login", server.url));

    // A wrong key: the form again, with the error, and no session cookie.
    let key = wd.find("#key").await;
    wd.type_into(&key, "sg_not-the-admin-key").await;
    let button = wd.find("#sign-in").await;
    wd.click(&button).await;
    wd.wait_for(
        "the sign-in error",
        "return !!document.getElementById('login-error')",
    )
    .await;
    assert_eq!(wd.current_url().await, format!("{}/login", server.url));
    let error = wd
        .exec("return document.getElementById('login-error').textContent")
        .await;
    assert_eq!(error, "Unknown or revoked key.");
    assert!(
        wd.cookies().await.is_empty(),
        "a wrong key must not open a session"
    );

    // The admin key.
    let key = wd.find("#key").await;
    wd.type_into(&key, ADMIN).await;
    let button = wd.find("#sign-in").await;
    wd.click(&button).await;
    wd.wait_for(
        "the dashboard",
        "return location.pathname === '/' && document.readyState === 'complete' && !!document.getElementById('spend-today')",
    )
    .await;
    assert_eq!(wd.current_url().await, format!("{}/", server.url));
    let cookies = wd.cookies().await;
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["name"], "spendguard_session");
    assert_eq!(cookies[0]["httpOnly"], true);
    assert_eq!(cookies[0]["sameSite"], "Strict");

    let page = wd.exec(READ_DASHBOARD).await;
    println!("the dashboard read after {:?}", started.elapsed());
    assert_eq!(page["path"], "/");
    assert!(
        !page["scriptCookies"]
            .as_str()
            .unwrap()
            .contains("spendguard_session"),
        "the session cookie must be HttpOnly"
    );

    // The gauges.
    assert_eq!(page["spendToday"], usd(spent_today));
    assert_eq!(page["spendTodayCap"], usd(GLOBAL_DAY_CAP));
    assert_eq!(
        page["spendTodayPct"],
        format!("{:.1}%", spent_today as f64 / GLOBAL_DAY_CAP as f64 * 100.0)
    );
    assert_eq!(page["spendMonth"], usd(spent_month));
    assert_eq!(page["spendMonthCap"], usd(GLOBAL_MONTH_CAP));
    assert_eq!(
        page["spendMonthPct"],
        format!(
            "{:.1}%",
            spent_month as f64 / GLOBAL_MONTH_CAP as f64 * 100.0
        )
    );
    assert_eq!(page["spend30d"], usd(spent_30d));

    // The chart: a bar per day, oldest first, each as tall as its spend.
    let bars = page["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 30);
    let shown: Vec<(String, String)> = bars
        .iter()
        .map(|b| {
            (
                b["day"].as_str().unwrap().to_owned(),
                b["cost"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = days.iter().map(|(d, c)| (d.clone(), decimal(*c))).collect();
    assert_eq!(shown, want);
    let (top_day, top_cost) = days.iter().max_by_key(|(_, c)| *c).unwrap();
    let top = bars.iter().find(|b| b["day"] == top_day.as_str()).unwrap();
    let top_height = top["height"].as_f64().unwrap();
    assert!(top_height > 100.0, "{top}");
    assert_eq!(top["title"], format!("{top_day}: {}", usd(*top_cost)));
    for (b, (day, cost)) in bars.iter().zip(&days) {
        let height = b["height"].as_f64().unwrap();
        let mut want = top_height * *cost as f64 / *top_cost as f64;
        // A day with spend is never thinner than the minimum bar, so it stays visible.
        if *cost > 0 {
            want = want.max(2.0);
        }
        assert!(
            (height - want).abs() <= 0.15,
            "the bar of {day} is {height} high, not {want}"
        );
    }
    assert!(
        page["chartWidth"].as_f64().unwrap() >= 1000.0,
        "the chart should use the width: {}",
        page["chartWidth"]
    );

    // The range's tables.
    let rows = |v: &[Row]| Value::Array(v.iter().map(Row::shown).collect());
    assert_eq!(page["models"], rows(&models));
    // The record before the 30 days is in no table.
    let carol = users.iter().find(|r| r.label == "carol (globex)").unwrap();
    assert_eq!(
        carol.requests, 3,
        "carol has 4 records, one before the range"
    );
    assert_eq!(page["tenants"], rows(&tenants));
    assert_eq!(page["tenants"][0]["cells"][0], "initech");
    assert_eq!(page["users"], rows(&users));
    assert_eq!(page["users"][0]["cells"][0], "dave (initech)");

    // The alerts: acme's day reached 50, 80 and 90% at once; the 90% alert is the one raised.
    assert_eq!(page["alertsTag"], "TABLE");
    assert_eq!(page["alertCount"], "1");
    let alerts = page["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let cells = alerts[0]["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 5, "{alerts:?}");
    assert_eq!(cells[0], "2026-03-10 12:00 UTC");
    let top = thresholds.iter().max().unwrap();
    assert_eq!(
        cells[1],
        format!(
            "{top}% {} of {} daily budget",
            usd(acme_today),
            usd(ACME_DAILY)
        )
    );
    assert_eq!(cells[2], "tenant acme");
    assert_eq!(cells[3], "day");
    // An admin session may acknowledge it.
    assert_eq!(cells[4], "Acknowledge");

    // Layout: nothing wider than a 1400-pixel window.
    assert!(
        page["scrollWidth"].as_f64() <= page["innerWidth"].as_f64(),
        "the page scrolls sideways: {} > {}",
        page["scrollWidth"],
        page["innerWidth"]
    );

    // A screenshot of the whole page: the window as tall as the document.
    let height = wd
        .exec("return Math.ceil(document.documentElement.scrollHeight + window.outerHeight - window.innerHeight)")
        .await
        .as_u64()
        .unwrap();
    wd.set_window_size(1400, height.max(1000)).await;
    let png = wd.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(
        png.len() > 20_000,
        "a suspiciously small screenshot: {} bytes",
        png.len()
    );
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let png_height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(width, 1400);
    let doc_height = wd
        .exec("return document.documentElement.scrollHeight")
        .await
        .as_u64()
        .unwrap();
    assert!(
        u64::from(png_height) >= doc_height,
        "the screenshot ({png_height} px) is shorter than the page ({doc_height} px)"
    );
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    std::fs::write(screenshot_dir().join("dashboard-overview.png"), &png).unwrap();
    println!("screenshot: {} ({width}x{png_height})", path.display());

    wd.close().await;
    server.stop().await;
    println!("done in {:?}", started.elapsed());
}

/// Signs in through the form with `key` and waits for `landing`.
async fn sign_in(wd: &WebDriver, url: &str, key: &str, landing: &str) {
    wd.goto(&format!("{url}/login")).await;
    wd.wait_for(
        "the sign-in form",
        "return location.pathname === '/login' && !!document.getElementById('key')",
    )
    .await;
    let k = wd.find("#key").await;
    wd.type_into(&k, key).await;
    wd.click_and_wait(
        "#sign-in",
        "the first page",
        &format!(
            "return location.pathname === '{landing}' && document.readyState === 'complete' && !!document.querySelector('main')"
        ),
    )
    .await;
}

/// Opens `path` and waits until it is loaded.
async fn open(wd: &WebDriver, url: &str, path: &str) {
    wd.goto(&format!("{url}{path}")).await;
    wd.wait_for(
        path,
        "return document.readyState === 'complete' && !!document.querySelector('main')",
    )
    .await;
}

/// A browser (chromedriver and a session), or `None` when the tools are missing.
async fn browser(extra: Value) -> Option<WebDriver> {
    let (driver_bin, chromium) = browser_tools()?;
    let mut wd = WebDriver::start(&driver_bin).await;
    wd.new_session_with(&chromium, extra).await;
    Some(wd)
}

/// The bars of the daily chart, `(day, cost)`, and the model table, `(model, cost)`.
const READ_RANGE: &str = r#"
const bars = Array.from(document.querySelectorAll('#daily-chart rect.bar'))
  .map((b) => [b.dataset.day, b.dataset.cost]);
const t = document.getElementById('by-model');
const models = t && t.tagName === 'TABLE'
  ? Array.from(t.tBodies[0].rows).map((r) => [r.cells[0].textContent.trim(), r.cells[3].dataset.cost])
  : [];
const stacked = Array.from(document.querySelectorAll('#model-chart rect.seg'))
  .map((r) => [r.dataset.day, r.dataset.model, r.dataset.cost]);
return { bars, models, stacked, total: document.getElementById('range-total').textContent.trim(),
         label: document.getElementById('range-label').textContent.trim() };
"#;

/// Checks what the page shows for `from..=to` against the report API.
async fn assert_range_matches_the_api(server: &TestServer, shown: &Value, from: &str, to: &str) {
    let bars = shown["bars"].as_array().unwrap();
    assert_eq!(bars.first().unwrap()[0], from, "{shown}");
    assert_eq!(bars.last().unwrap()[0], to, "{shown}");
    let (st, days) = server
        .get(
            &format!("/v1/reports/usage?from={from}&to={to}&group_by=day"),
            ADMIN,
        )
        .await;
    assert_eq!(st, 200, "{days}");
    let want: BTreeMap<String, String> = days["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let micros = (r["cost_usd"].as_f64().unwrap() * 1e6).round() as i64;
            (r["day"].as_str().unwrap().to_owned(), decimal(micros))
        })
        .collect();
    for b in bars {
        let day = b[0].as_str().unwrap();
        let cost = want.get(day).map_or("0.000000", String::as_str);
        assert_eq!(b[1], cost, "{day}");
    }
    let total = (days["totals"]["cost_usd"].as_f64().unwrap() * 1e6).round() as i64;
    assert_eq!(shown["total"], usd(total));
    // The stacked chart sums to the same days.
    let mut stacked: BTreeMap<String, i64> = BTreeMap::new();
    for seg in shown["stacked"].as_array().unwrap() {
        let cost = (seg[2].as_str().unwrap().parse::<f64>().unwrap() * 1e6).round() as i64;
        *stacked
            .entry(seg[0].as_str().unwrap().to_owned())
            .or_default() += cost;
    }
    let stacked: BTreeMap<String, String> =
        stacked.into_iter().map(|(d, c)| (d, decimal(c))).collect();
    assert_eq!(stacked, want);
    let (_, models) = server
        .get(
            &format!("/v1/reports/usage?from={from}&to={to}&group_by=model&limit=10"),
            ADMIN,
        )
        .await;
    let want: Vec<Value> = models["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let micros = (r["cost_usd"].as_f64().unwrap() * 1e6).round() as i64;
            json!([r["model"], decimal(micros)])
        })
        .collect();
    assert_eq!(shown["models"], Value::Array(want));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_drills_down_from_a_tenant_to_a_user_to_a_record_in_chromium() {
    let (server, _) = seeded_server().await;
    let Some(mut wd) = browser(json!({})).await else {
        return;
    };
    sign_in(&wd, &server.url, ADMIN, "/").await;
    wd.click_and_wait(
        "#top-tenants a[href='/tenants/initech']",
        "initech's page",
        "return location.pathname === '/tenants/initech' && !!document.getElementById('records-section')",
    )
    .await;
    let users = wd
        .exec("return Array.from(document.querySelectorAll('#top-users tbody tr')).map((r) => r.cells[0].textContent.trim())")
        .await;
    assert_eq!(users, json!(["dave (initech)"]));
    wd.save_page(1400, "dashboard-tenant").await;
    wd.click_and_wait(
        "#top-users a[href='/tenants/initech/users/dave']",
        "dave's page",
        "return location.pathname === '/tenants/initech/users/dave' && !!document.getElementById('records')",
    )
    .await;
    // Dave's records of the last 30 days, newest first.
    let rows = wd
        .exec("return Array.from(document.querySelectorAll('#records tbody tr')).map((r) => [r.cells[2].textContent.trim(), r.querySelector('[data-cost]').dataset.cost])")
        .await;
    assert_eq!(
        rows,
        json!([
            ["gpt-4o", "1234.500000"],
            ["claude-sonnet-4-5", "12.345678"],
            ["gpt-4o-mini", "0.400000"],
            ["claude-sonnet-4", "7.250000"]
        ])
    );
    wd.save_page(1400, "dashboard-user").await;
    wd.click_and_wait(
        "#records tbody tr:first-child a.record",
        "the record",
        "return location.pathname.startsWith('/records/') && !!document.getElementById('record')",
    )
    .await;
    let record = wd
        .exec("const t = (id) => document.getElementById(id).textContent.trim(); return { cost: document.getElementById('record-cost').dataset.cost, user: t('record-user'), status: t('record-status'), pricing: t('record-pricing'), time: t('record-time') }")
        .await;
    assert_eq!(record["cost"], "1234.500000");
    assert_eq!(record["user"], "dave");
    assert_eq!(record["status"], "success");
    assert_eq!(record["pricing"], "caller");
    assert!(
        record["time"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-09 15:00:00"),
        "{record}"
    );
    // And back up: the record links to its user.
    wd.click_and_wait(
        "#record-user",
        "dave's page again",
        "return location.pathname === '/tenants/initech/users/dave'",
    )
    .await;
    wd.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_date_range_change_updates_charts_and_tables_in_chromium() {
    let (server, _) = seeded_server().await;
    let Some(mut wd) = browser(json!({})).await else {
        return;
    };
    sign_in(&wd, &server.url, ADMIN, "/").await;
    let first = wd.exec(READ_RANGE).await;
    assert_range_matches_the_api(&server, &first, "2026-02-09", "2026-03-10").await;
    // A preset.
    wd.click_and_wait(
        "#preset-7d",
        "the last 7 days",
        "return location.search.includes('range=7d') && document.querySelectorAll('#daily-chart rect.bar').length === 7",
    )
    .await;
    let week = wd.exec(READ_RANGE).await;
    assert_range_matches_the_api(&server, &week, "2026-03-04", "2026-03-10").await;
    assert_ne!(week["total"], first["total"]);
    wd.click_and_wait(
        "#preset-last-month",
        "last month",
        "return location.search.includes('range=last-month') && document.querySelectorAll('#daily-chart rect.bar').length === 28",
    )
    .await;
    let feb = wd.exec(READ_RANGE).await;
    assert_range_matches_the_api(&server, &feb, "2026-02-01", "2026-02-28").await;
    // A custom range through the form.
    wd.exec("document.getElementById('from').value = '2026-02-20'; document.getElementById('to').value = '2026-03-05'; return true")
        .await;
    wd.click_and_wait(
        "#apply",
        "the custom range",
        "return location.search.includes('from=2026-02-20') && document.querySelectorAll('#daily-chart rect.bar').length === 14",
    )
    .await;
    let custom = wd.exec(READ_RANGE).await;
    assert_range_matches_the_api(&server, &custom, "2026-02-20", "2026-03-05").await;
    assert_eq!(custom["label"], "2026-02-20 to 2026-03-05");
    wd.close().await;
    server.stop().await;
}

/// Every name of the tenants other than acme in [`SEEDS`], and the figures only they have.
const NOT_ACME: [&str; 8] = [
    "globex",
    "initech",
    "carol",
    "dave",
    "erin",
    "1,234.50",
    "1234.5",
    "12.345678",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_session_sees_only_its_own_tenant_in_chromium() {
    let (server, _) = seeded_server().await;
    let key = server.tenant_key("acme").await;
    let Some(mut wd) = browser(json!({})).await else {
        return;
    };
    // A tenant key lands on its own tenant's page.
    sign_in(&wd, &server.url, &key, "/tenants/acme").await;
    let mut seen_alice = false;
    for path in [
        "/",
        "/tenants/acme",
        "/tenants/acme?range=90d",
        "/tenants/acme/users/alice?range=90d",
        "/tenants/acme/users/bob",
        "/models/gpt-4o?range=90d",
        "/models/claude-sonnet-4-5?range=90d",
        "/alerts",
    ] {
        open(&wd, &server.url, path).await;
        let html = wd
            .exec("return document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap()
            .to_owned();
        for needle in NOT_ACME {
            assert!(
                !html.contains(needle),
                "{path} shows `{needle}` of another tenant"
            );
        }
        seen_alice |= html.contains("alice");
    }
    assert!(seen_alice, "the tenant's own users are shown");
    // Its alert (90% of its day) is listed.
    open(&wd, &server.url, "/alerts").await;
    let count = wd
        .exec("return document.getElementById('alert-count').textContent")
        .await;
    assert_eq!(count, "1");
    // Another tenant's page is refused, naming nothing of it.
    open(&wd, &server.url, "/tenants/initech").await;
    let html = wd
        .exec("return document.getElementById('page-error') ? document.body.innerText : null")
        .await;
    let text = html.as_str().expect("an error page");
    assert!(text.contains("own tenant only"), "{text}");
    assert!(!text.contains("dave"));
    open(&wd, &server.url, "/tenants/acme").await;
    wd.save_page(1400, "dashboard-tenant-view").await;
    wd.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_set_from_the_form_is_enforced_by_the_next_reservation_in_chromium() {
    let (server, _) = seeded_server().await;
    let Some(mut wd) = browser(json!({})).await else {
        return;
    };
    sign_in(&wd, &server.url, ADMIN, "/").await;
    // Admitted before.
    let (st, v) = server
        .post(
            "/v1/check",
            ADMIN,
            crate::support::reserve_body("globex", "erin"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allowed"], true, "{v}");
    open(&wd, &server.url, "/manage").await;
    let tenant = wd.find("#budget-tenant").await;
    wd.type_into(&tenant, "globex").await;
    let daily = wd.find("#budget-daily").await;
    wd.type_into(&daily, "0.0001").await;
    wd.click_and_wait(
        "#budget-save",
        "globex's page",
        "return location.pathname === '/tenants/globex' && !!document.getElementById('budgets')",
    )
    .await;
    // The page meters the new budget: far over it today.
    let meter = wd
        .exec("const r = Array.from(document.querySelectorAll('#budgets tbody tr')).find((r) => r.dataset.scope === 'tenant globex' && r.dataset.window === 'day'); return r ? [r.dataset.limit, r.className] : null")
        .await;
    assert_eq!(meter, json!(["0.000100", "meter-bad"]));
    // The next reservation is refused by it.
    let (st, v) = server
        .post(
            "/v1/reservations",
            ADMIN,
            crate::support::reserve_body("globex", "erin"),
        )
        .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(crate::support::error_code(&v), "budget_exceeded");
    assert!(
        v["error"]["limits"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["scope"] == "tenant" && l["scope_id"] == "globex"),
        "{v}"
    );
    // Another tenant is not.
    let (st, v) = server
        .post(
            "/v1/reservations",
            ADMIN,
            crate::support::reserve_body("initech", "dave"),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    // And the change is in the audit log.
    open(&wd, &server.url, "/audit").await;
    let rows = wd
        .exec("return Array.from(document.querySelectorAll('#audit tbody tr')).map((r) => [r.dataset.action, r.cells[3].textContent.trim(), r.cells[1].textContent.trim().replace(/#[0-9a-f]{8}/, '#…')])")
        .await;
    // Newest first: the form's change, then the seeding's through the admin API.
    assert_eq!(
        rows,
        json!([
            ["budget.set", "tenant globex", "admin key #… (dashboard)"],
            ["budget.set", "tenant acme", "admin (API)"]
        ])
    );
    wd.save_page(1400, "dashboard-manage-audit").await;
    open(&wd, &server.url, "/manage").await;
    wd.save_page(1400, "dashboard-manage").await;
    wd.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_fits_375_px_and_follows_dark_mode_in_chromium() {
    let (server, _) = seeded_server().await;
    let phone = json!({ "mobileEmulation": { "deviceMetrics": { "width": 375, "height": 812, "pixelRatio": 2.0 } } });
    let Some(mut wd) = browser(phone).await else {
        return;
    };
    sign_in(&wd, &server.url, ADMIN, "/").await;
    for path in [
        "/",
        "/?range=90d",
        "/tenants/initech",
        "/tenants/initech/users/dave",
        "/tenants/globex/companies/globex-eu",
        "/models/gpt-4o",
        "/alerts",
        "/manage",
        "/audit",
    ] {
        open(&wd, &server.url, path).await;
        let width = wd
            .exec("return [document.documentElement.scrollWidth, window.innerWidth]")
            .await;
        assert_eq!(
            width[1], 375,
            "{path}: the viewport is not a phone's: {width}"
        );
        assert!(
            width[0].as_u64().unwrap() <= 375,
            "{path} scrolls sideways at 375 px: {width}"
        );
    }
    open(&wd, &server.url, "/tenants/initech/users/dave").await;
    wd.click_and_wait(
        "#records tbody tr:first-child a.record",
        "a record",
        "return location.pathname.startsWith('/records/') && !!document.getElementById('record')",
    )
    .await;
    let width = wd.exec("return document.documentElement.scrollWidth").await;
    assert!(
        width.as_u64().unwrap() <= 375,
        "a record scrolls sideways: {width}"
    );
    open(&wd, &server.url, "/").await;
    let png = wd.screenshot().await;
    std::fs::write(screenshot_dir().join("dashboard-phone.png"), &png).unwrap();
    // Dark mode: the system's preference is followed.
    let light = wd
        .exec("return getComputedStyle(document.body).backgroundColor")
        .await;
    assert_eq!(light, "rgb(246, 248, 251)");
    wd.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    )
    .await;
    open(&wd, &server.url, "/").await;
    let dark = wd
        .exec("return [getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color, document.documentElement.scrollWidth]")
        .await;
    assert_eq!(dark[0], "rgb(18, 22, 29)", "{dark}");
    assert_eq!(dark[1], "rgb(228, 232, 239)", "{dark}");
    assert!(dark[2].as_u64().unwrap() <= 375);
    let png = wd.screenshot().await;
    std::fs::write(screenshot_dir().join("dashboard-phone-dark.png"), &png).unwrap();
    wd.close().await;
    server.stop().await;
}

/// Where the page screenshots go: `SPENDGUARD_SCREENSHOT_DIR` (the README's are made with
/// `SPENDGUARD_SCREENSHOT_DIR=docs`, relative to the workspace), else `target/`.
fn screenshot_dir() -> PathBuf {
    match std::env::var_os("SPENDGUARD_SCREENSHOT_DIR").filter(|d| !d.is_empty()) {
        Some(d) => {
            let d = PathBuf::from(d);
            let d = if d.is_relative() {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(d)
            } else {
                d
            };
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            tmp.parent().unwrap_or(tmp).to_path_buf()
        }
    }
}

/// `target/dashboard.png`.
fn screenshot_path() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("dashboard.png")
}

/// chromedriver and the browser, or `None` (the test is skipped) when one is missing.
fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let driver = tool("SPENDGUARD_CHROMEDRIVER", &["chromedriver"]);
    let browser = tool(
        "SPENDGUARD_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    match (driver, browser) {
        (Some(d), Some(b)) => Some((d, b)),
        (d, _) => {
            let missing = if d.is_none() {
                "chromedriver"
            } else {
                "chromium"
            };
            println!(
                "SKIPPED: {missing} not found (install chromium and chromium-driver, or set SPENDGUARD_CHROMEDRIVER and SPENDGUARD_CHROMIUM)"
            );
            // Test output is captured; CI reads this file to fail on any skip.
            if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG")
                && let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
            {
                let _ = writeln!(f, "skipped the browser test: no {missing}");
            }
            None
        }
    }
}

/// The program named by `var`, else the first of `names` on the PATH or in /usr/bin.
fn tool(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{var} names {}, which is not a file",
            p.display()
        );
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/bin"));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// A chromedriver process and at most one session of it. Dropping it ends the session
/// (closing the browser) and kills chromedriver, also when an assertion failed.
struct WebDriver {
    http: reqwest::Client,
    port: u16,
    process: Child,
    session: Option<String>,
}

impl WebDriver {
    /// Starts chromedriver on a free port and waits until it is ready.
    async fn start(program: &Path) -> WebDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let process = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut wd = WebDriver {
            http: reqwest::Client::builder()
                .timeout(PATIENCE)
                .build()
                .unwrap(),
            port,
            process,
            session: None,
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = wd.process.try_wait().unwrap() {
                panic!("chromedriver exited at start: {status}");
            }
            let ready = match wd.http.get(format!("{}/status", wd.base())).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                return wd;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver was not ready within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A WebDriver command; returns its `value`, or the WebDriver error.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() || v["value"]["error"].is_string() {
            return Err(format!(
                "{status} {}: {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    /// A command of the session; panics on a WebDriver error.
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let id = self.session.as_deref().expect("a session");
        let path = format!("/session/{id}{path}");
        self.send(method, &path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    async fn new_session(&mut self, browser: &Path) {
        self.new_session_with(browser, json!({})).await;
    }

    /// A session whose `goog:chromeOptions` also hold `extra` (e.g. `mobileEmulation`).
    async fn new_session_with(&mut self, browser: &Path, extra: Value) {
        let mut options = json!({ "binary": browser, "args": CHROME_ARGS });
        if let (Some(o), Some(e)) = (options.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                o.insert(k.clone(), v.clone());
            }
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        } } });
        let v = self
            .send(M::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("no browser session: {e}"));
        self.session = Some(v["sessionId"].as_str().expect("a session id").to_owned());
    }

    async fn goto(&self, url: &str) {
        self.cmd(M::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn current_url(&self) -> String {
        let v = self.cmd(M::GET, "/url", None).await;
        v.as_str().unwrap().to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                M::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn type_into(&self, element: &str, text: &str) {
        self.cmd(
            M::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, element: &str) {
        self.cmd(
            M::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn exec(&self, script: &str) -> Value {
        self.cmd(
            M::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Polls `script` until it returns `true`; a script error (the page is being replaced)
    /// counts as not yet.
    async fn wait_for(&self, what: &str, script: &str) {
        let id = self.session.as_deref().expect("a session");
        let path = format!("/session/{id}/execute/sync");
        let deadline = Instant::now() + PATIENCE;
        let mut last = Ok(Value::Null);
        while Instant::now() < deadline {
            last = self
                .send(
                    M::POST,
                    &path,
                    Some(json!({ "script": script, "args": [] })),
                )
                .await;
            if last.as_ref().is_ok_and(|v| *v == true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {what} within {PATIENCE:?} (last answer: {last:?})");
    }

    async fn cookies(&self) -> Vec<Value> {
        let v = self.cmd(M::GET, "/cookie", None).await;
        v.as_array().unwrap().clone()
    }

    async fn set_window_size(&self, width: u64, height: u64) {
        self.cmd(
            M::POST,
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(M::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    /// A Chrome DevTools command, through chromedriver.
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.cmd(
            M::POST,
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    /// Clicks the element `css` and waits until `done` (a script) returns true.
    async fn click_and_wait(&self, css: &str, what: &str, done: &str) {
        let e = self.find(css).await;
        self.click(&e).await;
        self.wait_for(what, done).await;
    }

    /// Saves a screenshot of the whole page as `name`.png (see [`screenshot_dir`]).
    async fn save_page(&self, width: u64, name: &str) {
        let height = self
            .exec("return Math.ceil(document.documentElement.scrollHeight + window.outerHeight - window.innerHeight)")
            .await
            .as_u64()
            .unwrap();
        self.set_window_size(width, height.clamp(600, 6000)).await;
        let png = self.screenshot().await;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        println!("screenshot: {}", path.display());
    }

    /// Ends the session: the browser quits.
    async fn close(&mut self) {
        if let Some(id) = self.session.take() {
            self.send(M::DELETE, &format!("/session/{id}"), None)
                .await
                .unwrap_or_else(|e| panic!("end the session: {e}"));
        }
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        // Not async here: a plain HTTP request ends the session, so the browser quits.
        if let Some(id) = self.session.take()
            && let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port))
        {
            let _ = stream.set_read_timeout(Some(PATIENCE));
            let _ = write!(
                stream,
                "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.port
            );
            // Until the whole answer is in: chromedriver may keep the connection open.
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
                if http_answer_complete(&answer) {
                    break;
                }
            }
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Whether `answer` holds a whole HTTP response with a `Content-Length`.
fn http_answer_complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|len| answer.len() >= end + 4 + len)
}
