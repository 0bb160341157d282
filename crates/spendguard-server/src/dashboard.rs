//! The spend dashboard at `/`: one server-rendered HTML page (inline CSS and SVG, no
//! script, nothing loaded from elsewhere) that refreshes itself every 30 seconds.
//!
//! It is for the admin. A browser signs in at `/login` with the admin key and gets a session
//! cookie (random, `HttpOnly`, `SameSite=Strict`, 12 hours; sessions live in memory, so a
//! restart signs everyone out); scripts may send `Authorization: Bearer <admin key>` instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use spendguard_core::{Calendar, Micros, Money, ScopeKey};
use spendguard_store::{GroupBy, Report, ReportQuery, StoreError};

use crate::AppState;
use crate::alerts::AlertOut;
use crate::auth::Caller;

/// The session cookie's name.
pub const COOKIE: &str = "spendguard_session";
/// How long a dashboard session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How often the page reloads itself, in seconds.
pub const REFRESH_SECONDS: u32 = 30;

/// The most sessions kept at once: opening one more drops the one closest to expiry.
pub const MAX_SESSIONS: usize = 1024;
/// Failed sign-ins allowed per client address in [`LOGIN_WINDOW`]; more answer 429.
pub const LOGIN_FAILURES: u32 = 10;
/// The window of [`LOGIN_FAILURES`].
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// The most client addresses the sign-in throttle tracks; beyond it, sign-ins from new
/// addresses are refused until entries expire (a flood cannot grow memory).
pub const MAX_THROTTLED: usize = 10_000;

/// One session: when it ends and the hash of the admin key that opened it.
#[derive(Clone, Copy, Debug)]
struct Session {
    expires: Instant,
    key: [u8; 32],
}

/// Dashboard sessions (SHA-256 of the cookie value → session), and the sign-in throttle.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the admin key whose hash is `key`; returns the cookie value.
    pub fn open(&self, key: [u8; 32]) -> String {
        let token = crate::auth::generate_key();
        let now = Instant::now();
        let mut live = self.lock();
        live.retain(|_, s| s.expires > now);
        while live.len() >= MAX_SESSIONS {
            let Some(oldest) = live.iter().min_by_key(|(_, s)| s.expires).map(|(h, _)| *h) else {
                break;
            };
            live.remove(&oldest);
        }
        live.insert(
            Sha256::digest(token.as_bytes()).into(),
            Session {
                expires: now + SESSION_TTL,
                key,
            },
        );
        token
    }

    /// Whether `token` is a live session whose key `still_admin` accepts (a revoked key
    /// ends its sessions).
    pub fn valid(&self, token: &str, still_admin: impl Fn(&[u8; 32]) -> bool) -> bool {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut live = self.lock();
        match live.get(&h) {
            Some(s) if s.expires > Instant::now() && still_admin(&s.key) => true,
            Some(_) => {
                live.remove(&h);
                false
            }
            None => false,
        }
    }

    pub fn close(&self, token: &str) {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.lock().remove(&h);
    }

    /// How many sessions are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `ip` may try to sign in now.
    pub fn may_try(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match f.get(&ip) {
            Some((since, n)) if now.duration_since(*since) < LOGIN_WINDOW => *n < LOGIN_FAILURES,
            Some(_) => {
                f.remove(&ip);
                true
            }
            None => {
                if f.len() >= MAX_THROTTLED {
                    f.retain(|_, (since, _)| now.duration_since(*since) < LOGIN_WINDOW);
                }
                f.len() < MAX_THROTTLED
            }
        }
    }

    /// Counts a failed sign-in from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() >= MAX_THROTTLED && !f.contains_key(&ip) {
            return;
        }
        let e = f.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= LOGIN_WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

/// The client's address, when the server knows it (it does when served by [`crate::run`]).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Peer, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Whether the browser reached us over HTTPS: a TLS-terminating proxy says so with
/// `X-Forwarded-Proto: https` or `Forwarded: proto=https`. The session cookie is then
/// marked `Secure`. (Trusting the header is safe here: it can only make the cookie stricter.)
pub fn over_https(headers: &HeaderMap) -> bool {
    let xfp = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
        });
    let forwarded = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([';', ',']))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| {
            k.eq_ignore_ascii_case("proto") && v.trim_matches('"').eq_ignore_ascii_case("https")
        });
    xfp || forwarded
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Who is looking: `Some(true)` admin, `Some(false)` a valid non-admin key, `None` nobody.
fn viewer(state: &AppState, headers: &HeaderMap) -> Option<bool> {
    if let Some(t) = cookie_token(headers)
        && state.sessions.valid(t, |k| state.keys.is_admin_hash(k))
    {
        return Some(true);
    }
    let key = crate::auth::bearer_key(headers)?;
    state
        .keys
        .authenticate(key)
        .map(|c| matches!(c, Caller::Admin))
}

/// USD for people: cents when exact to the cent, else every significant micro-dollar.
pub fn usd_text(m: Money) -> String {
    let micros = m.micros();
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let (whole, frac) = (abs / 1_000_000, abs % 1_000_000);
    let whole_s = thousands(whole);
    if frac % 10_000 == 0 {
        format!("{sign}${whole_s}.{:02}", frac / 10_000)
    } else {
        let f = format!("{frac:06}");
        format!("{sign}${whole_s}.{}", f.trim_end_matches('0'))
    }
}

/// Groups digits by thousands: `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// USD to the cent (half up), for headline figures; `<$0.01` for a smaller non-zero amount.
/// Exact amounts stay in the page's `data-cost` attributes and in the reports.
pub fn usd_cents(m: Money) -> String {
    let micros = m.micros();
    if micros > 0 && micros < 5_000 {
        return "<$0.01".into();
    }
    let sign = if micros < 0 { "-" } else { "" };
    let cents = (u128::from(micros.unsigned_abs()) + 5_000) / 10_000;
    let whole = u64::try_from(cents / 100).unwrap_or(u64::MAX);
    format!("{sign}${}.{:02}", thousands(whole), cents % 100)
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One day of the chart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaySpend {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub cost: Money,
}

/// Spend of one window against its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gauge {
    pub spent: Money,
    pub reserved: Money,
    pub cap: Option<Money>,
}

/// A ranked row: a label and its spend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranked {
    pub label: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost: Money,
}

/// Everything the page shows.
#[derive(Clone, Debug)]
pub struct DashboardData {
    pub now: Micros,
    pub time_zone: String,
    /// The configured time zone (dates and times are shown in it).
    pub tz: jiff::tz::TimeZone,
    pub today: Gauge,
    pub month: Gauge,
    /// The last 30 days, oldest first, every day present.
    pub days: Vec<DaySpend>,
    pub models: Vec<Ranked>,
    pub tenants: Vec<Ranked>,
    pub users: Vec<Ranked>,
    pub alerts: Vec<AlertOut>,
    pub store_ok: bool,
    pub spool_depth: u64,
}

fn ranked(report: &Report, label: impl Fn(&spendguard_store::ReportRow) -> String) -> Vec<Ranked> {
    report
        .rows
        .iter()
        .map(|r| Ranked {
            label: label(r),
            requests: r.totals.requests,
            tokens: r.totals.total_tokens(),
            cost: r.totals.cost,
        })
        .collect()
}

/// Gathers the page's data: gauges from the ledger (live), the rest from rollups.
pub async fn gather(state: &AppState) -> Result<DashboardData, StoreError> {
    let now = state.guard.now();
    let ledger = state.guard.ledger();
    let policy = ledger.policy();
    let cal: &Calendar = &policy.calendar;
    let periods = cal.periods(now);
    let budget = ledger.budget_of(&ScopeKey::Global);
    let ((ds, dr), (ms, mr)) = ledger.scope_totals(&ScopeKey::Global, now);
    let today = cal.date_of(now);
    let first = today
        .checked_sub(jiff::Span::new().days(29))
        .unwrap_or(today);
    let month_first = cal.date_of(periods.month.start);
    let store = state.guard.store();
    let query = |from: jiff::civil::Date, group_by, limit| ReportQuery {
        from_day: cal.date_start(from),
        to_day: periods.day.start,
        tenant: None,
        group_by,
        limit,
        whole_months: crate::reports::whole_months(cal, from, today, today),
    };
    let daily = store.report(&query(first, GroupBy::Day, None)).await?;
    let models = store
        .report(&query(month_first, GroupBy::Model, Some(10)))
        .await?;
    let tenants = store
        .report(&query(month_first, GroupBy::Tenant, Some(10)))
        .await?;
    let users = store
        .report(&query(month_first, GroupBy::User, Some(10)))
        .await?;
    let by_day: HashMap<String, Money> = daily
        .rows
        .iter()
        .filter_map(|r| r.day.map(|d| (cal.date_of(d).to_string(), r.totals.cost)))
        .collect();
    let mut days = Vec::with_capacity(30);
    let mut d = first;
    while d <= today {
        let date = d.to_string();
        let cost = by_day.get(&date).copied().unwrap_or(Money::ZERO);
        days.push(DaySpend { date, cost });
        match d.tomorrow() {
            Ok(n) => d = n,
            Err(_) => break,
        }
    }
    // The same list as `GET /v1/alerts` (its default limit), so the count agrees with it.
    let alerts =
        crate::reports::list_alerts(state, None, false, crate::reports::ALERTS_DEFAULT_LIMIT)
            .await?;
    let stats = state.guard.stats();
    Ok(DashboardData {
        now,
        time_zone: cal.time_zone_name().to_owned(),
        tz: cal.time_zone().clone(),
        today: Gauge {
            spent: ds,
            reserved: dr,
            cap: budget.daily,
        },
        month: Gauge {
            spent: ms,
            reserved: mr,
            cap: budget.monthly,
        },
        days,
        models: ranked(&models, |r| r.key.clone().unwrap_or_else(|| "-".into())),
        tenants: ranked(&tenants, |r| r.tenant.clone().unwrap_or_default()),
        users: ranked(&users, |r| {
            format!(
                "{} ({})",
                r.key.as_deref().unwrap_or("-"),
                r.tenant.as_deref().unwrap_or("-")
            )
        }),
        alerts,
        store_ok: stats.health == spendguard_guard::StoreHealth::Ok,
        spool_depth: stats.spool_depth,
    })
}

const STYLE: &str = r#"
:root { --fg:#1d2430; --muted:#5b6577; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff;
        --bar:#3b6fd8; --warn:#c77700; --bad:#c62828; --ok:#2e7d32; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:1rem; padding:.9rem 1.5rem;
         background:var(--card); border-bottom:1px solid var(--line); }
header h1 { font-size:1.15rem; margin:0; }
header .meta { color:var(--muted); font-size:.85rem; flex:1; }
header form { margin:0; }
main { max-width:1280px; margin:0 auto; padding:1.2rem 1.5rem 2rem;
       display:grid; grid-template-columns:repeat(6,minmax(0,1fr)); gap:1rem; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:1rem 1.1rem; grid-column:span 6; min-width:0; }
section.third { grid-column:span 2; } section.half { grid-column:span 3; }
@media (max-width:900px) { section.third, section.half { grid-column:span 6; } }
h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--muted);
     margin:0 0 .6rem; }
.big { font-size:1.9rem; font-weight:600; font-variant-numeric:tabular-nums; }
.sub { color:var(--muted); font-size:.9rem; }
.meter { height:10px; background:var(--line); border-radius:5px; overflow:hidden; margin:.6rem 0 .3rem; }
.meter span { display:block; height:100%; background:var(--ok); }
.meter span.warn { background:var(--warn); } .meter span.bad { background:var(--bad); }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:.3rem .4rem; border-bottom:1px solid var(--line);
         white-space:nowrap; }
td.label { max-width:22rem; overflow:hidden; text-overflow:ellipsis; }
td.msg { white-space:normal; }
th { color:var(--muted); font-weight:500; font-size:.8rem; }
td.n, th.n { text-align:right; }
.empty { color:var(--muted); font-style:italic; }
.badge { display:inline-block; padding:0 .4rem; border-radius:4px; font-size:.8rem;
         background:#fdecea; color:var(--bad); }
.badge.warn { background:#fff4e0; color:var(--warn); }
svg text { font:11px system-ui,sans-serif; fill:var(--muted); }
svg rect.bar { fill:var(--bar); } svg rect.bar:hover { fill:#1f4fb0; }
svg line.cap { stroke:var(--bad); stroke-dasharray:5 4; } svg text.cap { fill:var(--bad); }
svg text.peak { fill:var(--fg); }
button { font:inherit; padding:.2rem .7rem; border:1px solid var(--line); border-radius:5px;
         background:var(--card); cursor:pointer; }
"#;

fn gauge(out: &mut String, id: &str, title: &str, g: &Gauge) {
    let _ = write!(
        out,
        r#"<section class="third"><h2>{title}</h2><div class="big" id="{id}" title="{}">{}</div>"#,
        esc(&usd_text(g.spent)),
        usd_cents(g.spent)
    );
    let in_flight = if g.reserved > Money::ZERO {
        format!(" · {} in flight", usd_cents(g.reserved))
    } else {
        String::new()
    };
    match g.cap {
        Some(cap) if cap > Money::ZERO => {
            let pct = (g.spent.micros() as f64 / cap.micros() as f64 * 100.0).max(0.0);
            let class = if pct >= 100.0 {
                "bad"
            } else if pct >= 80.0 {
                "warn"
            } else {
                ""
            };
            let _ = write!(
                out,
                r#"<div class="meter"><span class="{class}" style="width:{:.1}%"></span></div><div class="sub">of <span id="{id}-cap">{}</span> cap · <span id="{id}-pct">{pct:.1}%</span>{in_flight}</div>"#,
                pct.min(100.0),
                usd_cents(cap),
            );
        }
        Some(cap) => {
            let _ = write!(
                out,
                r#"<div class="sub">cap <span id="{id}-cap">{}</span>{in_flight}</div>"#,
                usd_cents(cap)
            );
        }
        None => {
            let _ = write!(out, r#"<div class="sub">no cap{in_flight}</div>"#);
        }
    }
    out.push_str("</section>");
}

/// The shortest bar of a day with spend, so that small days stay visible.
pub const MIN_BAR: f64 = 2.0;

/// The 30-day bar chart, as inline SVG, with the daily cap as a dashed line when it is
/// within twice the highest day (else the axis would flatten every bar).
pub fn chart(days: &[DaySpend], cap: Option<Money>) -> String {
    let (w, h, left, bottom, top) = (1100.0f64, 220.0f64, 70.0f64, 24.0f64, 16.0f64);
    let max = days
        .iter()
        .map(|d| d.cost.micros())
        .max()
        .unwrap_or(0)
        .max(1);
    let cap = cap
        .map(|c| c.micros())
        .filter(|c| *c > 0 && *c <= max.saturating_mul(2));
    let top_value = max.max(cap.unwrap_or(0));
    // A round axis maximum: 1, 2 or 5 × 10^k micro-dollars.
    let mut step = 1i64;
    while step.saturating_mul(10) < top_value {
        step *= 10;
    }
    let axis_max = [1, 2, 5, 10]
        .iter()
        .map(|m| m * step)
        .find(|v| *v >= top_value)
        .unwrap_or(top_value);
    let plot_w = w - left - 8.0;
    let plot_h = h - bottom - top;
    let y_of = |v: i64| top + plot_h - plot_h * (v as f64 / axis_max as f64);
    let n = days.len().max(1) as f64;
    let slot = plot_w / n;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg id="daily-chart" viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="Daily spend, last 30 days">"#
    );
    for i in 0..=4 {
        let v = axis_max / 4 * i;
        let y = y_of(v);
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e3e7ee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - 8.0,
            left - 6.0,
            y + 4.0,
            esc(&usd_cents(Money::from_micros(v)))
        );
    }
    let peak = days
        .iter()
        .enumerate()
        .max_by_key(|(_, d)| d.cost)
        .map(|(i, _)| i);
    for (i, d) in days.iter().enumerate() {
        let mut bh = plot_h * (d.cost.micros() as f64 / axis_max as f64);
        if d.cost > Money::ZERO {
            bh = bh.max(MIN_BAR);
        }
        let x = left + slot * i as f64 + slot * 0.15;
        let y = top + plot_h - bh;
        let _ = write!(
            svg,
            r#"<rect class="bar" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" data-day="{}" data-cost="{}"><title>{}: {}</title></rect>"#,
            slot * 0.7,
            esc(&d.date),
            d.cost,
            esc(&d.date),
            esc(&usd_cents(d.cost))
        );
        if peak == Some(i) && d.cost > Money::ZERO {
            let _ = write!(
                svg,
                r#"<text class="peak" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + slot * 0.35,
                (y - 4.0).max(10.0),
                esc(&usd_cents(d.cost))
            );
        }
        if i % 5 == 0 || i + 1 == days.len() || peak == Some(i) {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x + slot * 0.35,
                h - 6.0,
                esc(d.date.get(5..).unwrap_or(&d.date))
            );
        }
    }
    if let Some(c) = cap {
        let y = y_of(c);
        let _ = write!(
            svg,
            r#"<line class="cap" x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="cap" x="{}" y="{:.1}">daily cap</text>"#,
            w - 8.0,
            left + 4.0,
            y - 4.0
        );
    }
    svg.push_str("</svg>");
    svg
}

fn ranked_table(out: &mut String, class: &str, id: &str, title: &str, what: &str, rows: &[Ranked]) {
    let _ = write!(out, r#"<section class="{class}"><h2>{title}</h2>"#);
    if rows.is_empty() {
        let _ = write!(
            out,
            r#"<p class="empty" id="{id}">No spend this month.</p>"#
        );
    } else {
        let _ = write!(
            out,
            r#"<table id="{id}"><thead><tr><th>{what}</th><th class="n">Requests</th><th class="n">Tokens</th><th class="n">Spend</th></tr></thead><tbody>"#
        );
        for r in rows {
            let _ = write!(
                out,
                r#"<tr><td class="label" title="{}">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n" data-cost="{}" title="{}">{}</td></tr>"#,
                esc(&r.label),
                esc(&r.label),
                thousands(r.requests),
                thousands(r.tokens),
                r.cost,
                esc(&usd_text(r.cost)),
                esc(&usd_cents(r.cost))
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");
}

/// The most alert rows the page lists; the rest are counted ("N more").
pub const ALERT_ROWS: usize = 20;

/// The whole page.
pub fn render(d: &DashboardData) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let updated = jiff::Timestamp::from_microsecond(d.now)
        .map(|t| {
            t.to_zoned_datetime(d.tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_default();
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><meta http-equiv="refresh" content="{REFRESH_SECONDS}"><title>spendguard · spend</title><style>{STYLE}</style></head><body><header><h1>spendguard</h1><span class="meta">Updated {updated} · days in {} · refreshes every {REFRESH_SECONDS} s</span><form method="post" action="/logout"><button type="submit">Sign out</button></form></header><main>"#,
        esc(&d.time_zone),
    );
    gauge(&mut out, "spend-today", "Global spend today", &d.today);
    gauge(&mut out, "spend-month", "Global spend this month", &d.month);
    let alerts = &d.alerts;
    let _ = write!(
        out,
        r#"<section class="third"><h2>Active alerts</h2><div class="big" id="alert-count">{}</div><div class="sub">{} in the current day and month · store {}</div></section>"#,
        alerts.len(),
        if alerts.len() == 1 { "alert" } else { "alerts" },
        if d.store_ok {
            "ok".to_owned()
        } else {
            format!("unreachable ({} batches spooled)", d.spool_depth)
        }
    );
    let total_30: Money = d
        .days
        .iter()
        .fold(Money::ZERO, |a, x| a.saturating_add(x.cost));
    let _ = write!(
        out,
        r#"<section><h2>Daily spend, last 30 days · <span id="spend-30d" title="{}">{}</span></h2>{}</section>"#,
        esc(&usd_text(total_30)),
        usd_cents(total_30),
        chart(&d.days, d.today.cap)
    );
    ranked_table(
        &mut out,
        "half",
        "by-model",
        "Spend by model, this month",
        "Model",
        &d.models,
    );
    ranked_table(
        &mut out,
        "half",
        "top-tenants",
        "Top tenants, this month",
        "Tenant",
        &d.tenants,
    );
    ranked_table(
        &mut out,
        "",
        "top-users",
        "Top users, this month",
        "User (tenant)",
        &d.users,
    );
    out.push_str(r#"<section><h2>Alerts, newest first</h2>"#);
    if alerts.is_empty() {
        out.push_str(r#"<p class="empty" id="alerts">No alerts in the current day or month.</p>"#);
    } else {
        out.push_str(r#"<table id="alerts"><thead><tr><th>Raised</th><th>Alert</th><th>Budget</th><th>Window</th></tr></thead><tbody>"#);
        for a in alerts.iter().take(ALERT_ROWS) {
            let badge = if a.kind == "projected" || a.threshold_percent < 100 {
                "badge warn"
            } else {
                "badge"
            };
            let window = if a.window == "day" {
                "daily"
            } else {
                "monthly"
            };
            let (label, text) = if a.kind == "projected" {
                (
                    "projected".to_owned(),
                    format!(
                        "on course for {} this month; {window} budget {}",
                        usd_cents(a.amount_usd),
                        usd_cents(a.limit_usd)
                    ),
                )
            } else {
                (
                    format!("{}%", a.threshold_percent),
                    format!(
                        "{} of {} {window} budget",
                        usd_cents(a.amount_usd),
                        usd_cents(a.limit_usd)
                    ),
                )
            };
            let raised = jiff::Timestamp::from_microsecond(a.created_at.0)
                .map(|t| {
                    t.to_zoned_datetime(d.tz.clone())
                        .strftime("%Y-%m-%d %H:%M %Z")
                        .to_string()
                })
                .unwrap_or_default();
            let scope = match (&a.tenant_id, a.scope) {
                (Some(t), "company" | "user") => format!("{} {} ({t})", a.scope, a.scope_id),
                _ => format!("{} {}", a.scope, a.scope_id),
            };
            let _ = write!(
                out,
                r#"<tr><td>{}</td><td class="msg" title="{}"><span class="{badge}">{}</span> {}</td><td>{}</td><td>{}</td></tr>"#,
                esc(&raised),
                esc(&a.message),
                esc(&label),
                esc(&text),
                esc(&scope),
                a.window
            );
        }
        out.push_str("</tbody></table>");
        if alerts.len() > ALERT_ROWS {
            let _ = write!(
                out,
                r#"<p class="sub" id="alerts-more">{} more (all of them: <code>GET /v1/alerts</code>)</p>"#,
                alerts.len() - ALERT_ROWS
            );
        }
    }
    out.push_str("</section></main></body></html>");
    out
}

fn html_page(status: StatusCode, body: String) -> Response {
    let mut resp = (status, Html(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /`.
pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match viewer(&state, &headers) {
        None => Redirect::to("/login").into_response(),
        Some(false) => html_page(
            StatusCode::FORBIDDEN,
            login_html(Some(
                "The dashboard is for the admin key; tenant keys use the API.",
            )),
        ),
        Some(true) => match gather(&state).await {
            Ok(data) => html_page(StatusCode::OK, render(&data)),
            Err(e) => {
                tracing::error!(error = %e, "the dashboard could not read the store");
                html_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"><title>spendguard</title></head><body><p>The usage store cannot be read right now; this page retries every {REFRESH_SECONDS} seconds.</p></body></html>"
                    ),
                )
            }
        },
    }
}

fn login_html(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="err" id="login-error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>spendguard · sign in</title><style>{STYLE}
form.login {{ max-width:360px; margin:12vh auto; background:var(--card); padding:1.5rem;
  border:1px solid var(--line); border-radius:8px; display:grid; gap:.7rem; }}
form.login input {{ font:inherit; padding:.45rem; border:1px solid var(--line); border-radius:5px; }}
.err {{ color:var(--bad); margin:0; }}</style></head><body><form class="login" method="post" action="/login"><h1 style="margin:0;font-size:1.2rem">spendguard</h1><label for="key">Admin API key</label><input id="key" name="key" type="password" autocomplete="current-password" required autofocus>{error}<button id="sign-in" type="submit">Sign in</button></form></body></html>"#
    )
}

/// `GET /login`.
pub async fn login_page() -> Response {
    html_page(StatusCode::OK, login_html(None))
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    key: String,
}

/// `POST /login`: the admin key opens a session. Failed attempts are throttled per client
/// address ([`LOGIN_FAILURES`] per [`LOGIN_WINDOW`]).
pub async fn login(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let ip = peer
        .0
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !state.sessions.may_try(ip) {
        let mut resp = html_page(
            StatusCode::TOO_MANY_REQUESTS,
            login_html(Some("Too many failed sign-ins; try again in a minute.")),
        );
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(LOGIN_WINDOW.as_secs()),
        );
        return resp;
    }
    let form = match form {
        Ok(Form(form)) => form,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return html_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                login_html(Some("The form is too large.")),
            );
        }
        Err(_) => {
            return html_page(
                StatusCode::BAD_REQUEST,
                login_html(Some("Send the form with the key field.")),
            );
        }
    };
    let key = form.key.trim();
    match state.keys.authenticate(key) {
        Some(Caller::Admin) => {
            let token = state.sessions.open(crate::auth::hash_key(key));
            let mut resp = Redirect::to("/").into_response();
            let secure = if over_https(&headers) { "; Secure" } else { "" };
            let cookie = format!(
                "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                SESSION_TTL.as_secs()
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Some(Caller::Tenant(_)) => html_page(
            StatusCode::FORBIDDEN,
            login_html(Some(
                "That is a tenant key; the dashboard needs the admin key.",
            )),
        ),
        None => {
            state.sessions.failed(ip);
            html_page(
                StatusCode::UNAUTHORIZED,
                login_html(Some("Unknown or revoked key.")),
            )
        }
    }
}

/// `POST /logout`.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(t) = cookie_token(&headers) {
        state.sessions.close(t);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "spendguard_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_well() {
        assert_eq!(usd_text(Money::from_micros(0)), "$0.00");
        assert_eq!(usd_text(Money::from_micros(12_500_000)), "$12.50");
        assert_eq!(
            usd_text(Money::from_micros(1_234_567_890_000)),
            "$1,234,567.89"
        );
        assert_eq!(usd_text(Money::from_micros(150)), "$0.00015");
        assert_eq!(usd_text(Money::from_micros(-2_000_000)), "-$2.00");
        assert_eq!(usd_cents(Money::from_micros(1_300_345_678)), "$1,300.35");
        assert_eq!(usd_cents(Money::from_micros(1_005_000)), "$1.01");
        assert_eq!(usd_cents(Money::from_micros(4_999)), "<$0.01");
        assert_eq!(usd_cents(Money::ZERO), "$0.00");
        assert_eq!(thousands(353_800), "353,800");
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let t = s.open([1; 32]);
        assert!(s.valid(&t, |_| true));
        assert!(!s.valid("sg_forged", |_| true));
        s.close(&t);
        assert!(!s.valid(&t, |_| true));
    }

    #[test]
    fn the_chart_has_a_bar_per_day_scaled_to_a_round_maximum() {
        let days: Vec<DaySpend> = (1..=30)
            .map(|i| DaySpend {
                date: format!("2026-03-{i:02}"),
                cost: Money::from_micros(i * 100_000),
            })
            .collect();
        let svg = chart(&days, None);
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 30);
        assert!(svg.contains(r#"data-day="2026-03-30" data-cost="3.000000""#));
        // $3.00 max → a $5.00 axis; a cap far above is not drawn.
        assert!(svg.contains(">$5.00</text>"));
        assert!(!chart(&days, Some(Money::from_micros(100_000_000))).contains("class=\"cap\""));
        // A cap within reach is drawn, and the axis covers it.
        let with_cap = chart(&days, Some(Money::from_micros(4_000_000)));
        assert!(with_cap.contains("class=\"cap\""));
        assert!(with_cap.contains(">$5.00</text>"));
    }
}
