//! The dashboard: server-rendered HTML pages (inline CSS and SVG, no script, nothing loaded
//! from elsewhere), one file per page, rendered with maud (compile-checked templates that
//! escape every value by default).
//!
//! - `/` ([`overview`]): budgets and meters, charts and breakdowns over a date range, alerts.
//! - `/tenants/{t}`, `/tenants/{t}/companies/{c}`, `/tenants/{t}/users/{u}`, `/models/{m}`
//!   ([`scope`]): one scope's meters, charts, breakdowns, alerts and usage records.
//! - `/records/{id}` ([`record`]): one usage record.
//! - `/alerts` ([`alerts`]): every current alert, paged, with acknowledgement (admin).
//! - `/manage` ([`manage`]): API keys, budgets, user tiers (admin); every change is written
//!   to the audit log, shown at `/audit` ([`audit`]).
//! - `/export.csv` ([`export`]): what a page shows, as the report API's CSV.
//!
//! A browser signs in at `/login` ([`login()`]) with the admin key or a tenant key and gets a
//! session cookie (random, `HttpOnly`, `SameSite=Strict`, 12 hours; sessions live in memory,
//! so a restart signs everyone out); scripts may send `Authorization: Bearer <key>`
//! instead. A tenant key sees its own tenant only: every page and export is filtered to it,
//! and another tenant's pages answer 403. Every form that changes something carries the
//! session's CSRF token.

pub mod alerts;
pub mod audit;
pub mod charts;
pub mod data;
pub mod export;
pub mod login;
pub mod manage;
pub mod overview;
pub mod parts;
pub mod record;
pub mod scope;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use jiff::civil::Date;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use spendguard_core::{Calendar, Micros, Money, TenantId};

use crate::AppState;
use crate::auth::Caller;

pub use login::{login, login_page, logout};
pub use overview::page;

/// The session cookie's name.
pub const COOKIE: &str = "spendguard_session";
/// How long a dashboard session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How often the overview reloads itself, in seconds.
pub const REFRESH_SECONDS: u32 = 30;

/// The most sessions kept at once: opening one more drops the one closest to expiry.
pub const MAX_SESSIONS: usize = 1024;
/// The most sessions one key keeps: opening one more drops that key's oldest, so no key (a
/// tenant's) can fill the table and sign the others out.
pub const MAX_SESSIONS_PER_KEY: usize = 16;
/// Failed sign-ins allowed per client address in [`LOGIN_WINDOW`]; more answer 429.
pub const LOGIN_FAILURES: u32 = 10;
/// The window of [`LOGIN_FAILURES`].
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// The most client addresses the sign-in throttle tracks; beyond it, sign-ins from new
/// addresses are refused until entries expire (a flood cannot grow memory).
pub const MAX_THROTTLED: usize = 10_000;

/// One session: when it ends, the hash of the key that opened it, the key's fingerprint
/// (named in the audit log) and its CSRF token.
#[derive(Clone, Debug)]
struct Session {
    expires: Instant,
    key: [u8; 32],
    prefix: String,
    csrf: String,
}

/// Dashboard sessions (SHA-256 of the cookie value → session), and the sign-in throttle.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// A live session as a request sees it.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub key: [u8; 32],
    pub prefix: String,
    pub csrf: String,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the key whose hash is `key` (named `prefix` in the audit log);
    /// returns the cookie value.
    pub fn open(&self, key: [u8; 32], prefix: &str) -> String {
        let token = crate::auth::generate_key();
        let now = Instant::now();
        let mut live = self.lock();
        live.retain(|_, s| s.expires > now);
        loop {
            let mine = live.iter().filter(|(_, s)| s.key == key);
            if mine.clone().count() < MAX_SESSIONS_PER_KEY {
                break;
            }
            let Some(oldest) = mine.min_by_key(|(_, s)| s.expires).map(|(h, _)| *h) else {
                break;
            };
            live.remove(&oldest);
        }
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
                prefix: prefix.to_owned(),
                csrf: crate::auth::generate_key(),
            },
        );
        token
    }

    /// The session of `token` if it is live and `still_valid` accepts its key (a revoked
    /// key ends its sessions).
    pub fn get(&self, token: &str, still_valid: impl Fn(&[u8; 32]) -> bool) -> Option<SessionInfo> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut live = self.lock();
        match live.get(&h) {
            Some(s) if s.expires > Instant::now() && still_valid(&s.key) => Some(SessionInfo {
                key: s.key,
                prefix: s.prefix.clone(),
                csrf: s.csrf.clone(),
            }),
            Some(_) => {
                live.remove(&h);
                None
            }
            None => None,
        }
    }

    /// Whether `token` is a live session whose key `still_valid` accepts.
    pub fn valid(&self, token: &str, still_valid: impl Fn(&[u8; 32]) -> bool) -> bool {
        self.get(token, still_valid).is_some()
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

/// The session cookie's value, if the request carries one (read by the `cookie` crate).
pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    CookieJar::from_headers(headers)
        .get(COOKIE)
        .map(|c| c.value().to_owned())
}

/// The session cookie: `HttpOnly`, `SameSite=Strict`, for the whole site, for
/// [`SESSION_TTL`]; `Secure` when the request came over HTTPS.
pub fn session_cookie(token: String, secure: bool) -> Cookie<'static> {
    Cookie::build((COOKIE, token))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(SESSION_TTL.as_secs()).unwrap_or(i64::MAX),
        ))
        .secure(secure)
        .build()
}

/// Who is looking at a page.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub caller: Caller,
    /// The session (absent for `Authorization: Bearer`, which cannot post forms).
    pub session: Option<SessionInfo>,
}

impl Viewer {
    pub fn is_admin(&self) -> bool {
        self.caller == Caller::Admin
    }

    /// The tenant a tenant key is confined to.
    pub fn own_tenant(&self) -> Option<&TenantId> {
        match &self.caller {
            Caller::Tenant(t) => Some(t),
            Caller::Admin => None,
        }
    }

    /// Whether this viewer may see `tenant`'s pages.
    pub fn may_see(&self, tenant: &TenantId) -> bool {
        self.own_tenant().is_none_or(|t| t == tenant)
    }

    /// Who made a change, for the audit log.
    pub fn actor(&self) -> String {
        match &self.session {
            Some(s) => format!("admin {} (dashboard)", s.prefix),
            None => "admin (dashboard)".to_owned(),
        }
    }

    pub fn csrf(&self) -> &str {
        self.session.as_ref().map_or("", |s| s.csrf.as_str())
    }
}

/// Cluster mode: the database that keeps the dashboard's sessions for every instance.
pub(crate) fn shared_sessions(state: &AppState) -> Option<&spendguard_store::PostgresStore> {
    state.guard.cluster()?;
    spendguard_store::Store::postgres(state.guard.store())
}

/// The live session of the cookie `token`: from this instance's memory, or in cluster mode
/// from the database (so a session opened or closed on any instance is so on all).
async fn session_of(state: &AppState, token: &str) -> Option<SessionInfo> {
    let valid = |k: &[u8; 32]| state.keys.caller_of_hash(k).is_some();
    let Some(pg) = shared_sessions(state) else {
        return state.sessions.get(token, valid);
    };
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    match pg.dashboard_session(&hash).await {
        Ok(Some(s)) if valid(&s.key_hash) => Some(SessionInfo {
            key: s.key_hash,
            prefix: s.prefix,
            csrf: s.csrf,
        }),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the dashboard's sessions");
            None
        }
    }
}

/// Who is looking: a live session, else a valid `Authorization: Bearer` key.
pub async fn viewer(state: &AppState, headers: &HeaderMap) -> Option<Viewer> {
    if let Some(t) = cookie_token(headers)
        && let Some(s) = session_of(state, &t).await
        && let Some(caller) = state.keys.caller_of_hash(&s.key)
    {
        return Some(Viewer {
            caller,
            session: Some(s),
        });
    }
    let key = crate::auth::bearer_key(headers)?;
    state.keys.authenticate(key).map(|caller| Viewer {
        caller,
        session: None,
    })
}

/// A page's answer when something is wrong: status and a message, inside the layout.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> PageError {
        PageError {
            status,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> PageError {
        PageError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn forbidden() -> PageError {
        PageError::new(
            StatusCode::FORBIDDEN,
            "This key may not see this page: a tenant key sees its own tenant only.",
        )
    }

    pub fn not_found(what: &str) -> PageError {
        PageError::new(StatusCode::NOT_FOUND, format!("No such {what}."))
    }

    pub fn store(e: spendguard_store::StoreError) -> PageError {
        tracing::error!(error = %e, "the dashboard could not read the store");
        PageError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The usage store cannot be read right now; try again in a moment.",
        )
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head { (head("spendguard")) }
                body {
                    header.top { a.brand href="/" { "spendguard" } }
                    main { section { p #page-error { (self.message) } p { a href="/" { "Back to the dashboard" } } } }
                }
            }
        };
        html_page(self.status, body)
    }
}

/// The answer of a page handler.
pub type PageResult = Result<Response, PageError>;

/// Who is looking, or the way to the sign-in form.
pub async fn require_viewer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, Redirect> {
    viewer(state, headers)
        .await
        .ok_or_else(|| Redirect::to("/login"))
}

/// An HTML answer with the dashboard's headers: not cached, a strict content security
/// policy (inline styles only, no script), no sniffing, no framing.
pub fn html_page(status: StatusCode, body: Markup) -> Response {
    let mut resp = (status, Html(body.into_string())).into_response();
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

/// Percent-encodes a path segment or query value (everything but `A-Z a-z 0-9 - . _ ~`).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The page of a tenant.
pub fn tenant_url(t: &str) -> String {
    format!("/tenants/{}", enc(t))
}

/// The page of a user of a tenant.
pub fn user_url(t: &str, u: &str) -> String {
    format!("/tenants/{}/users/{}", enc(t), enc(u))
}

/// The page of a company of a tenant.
pub fn company_url(t: &str, c: &str) -> String {
    format!("/tenants/{}/companies/{}", enc(t), enc(c))
}

/// The page of a model.
pub fn model_url(m: &str) -> String {
    format!("/models/{}", enc(m))
}

/// A time in the deployment's zone, to the minute.
pub fn when(tz: &jiff::tz::TimeZone, t: Micros, format: &str) -> String {
    jiff::Timestamp::from_microsecond(t)
        .map(|t| t.to_zoned_datetime(tz.clone()).strftime(format).to_string())
        .unwrap_or_default()
}

/// The date-range presets.
pub const PRESETS: [(&str, &str); 5] = [
    ("today", "Today"),
    ("7d", "7 days"),
    ("month", "This month"),
    ("last-month", "Last month"),
    ("90d", "90 days"),
];

/// The query string of every dashboard page: a date range (a preset, or `from` and `to`;
/// the last 30 days by default), filters, and the page of a paged list.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ViewParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    pub page: Option<String>,
    /// The export's grouping.
    pub group_by: Option<String>,
    /// The export's company or user (with `tenant`).
    pub company: Option<String>,
    pub user: Option<String>,
}

/// [`ViewParams`], checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The preset chosen, if one was.
    pub preset: Option<&'static str>,
    pub from: Date,
    pub to: Date,
    pub today: Date,
    pub tenant: Option<TenantId>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    /// From 0.
    pub page: usize,
}

/// The longest a filter value may be.
const MAX_FILTER: usize = 128;

fn filter_value(name: &str, v: Option<&String>) -> Result<Option<String>, PageError> {
    match v.map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) if s.len() > MAX_FILTER || s.chars().any(char::is_control) => Err(PageError::bad(
            format!("{name} must be at most {MAX_FILTER} printable characters"),
        )),
        Some(s) => Ok(Some(s.to_owned())),
    }
}

impl View {
    /// Checks `p` against the calendar, now.
    pub fn parse(p: &ViewParams, cal: &Calendar, now: Micros) -> Result<View, PageError> {
        let today = cal.date_of(now);
        let days_back = |n: i64| {
            today
                .checked_sub(jiff::Span::new().days(n))
                .unwrap_or(today)
        };
        let mut preset = None;
        let (from, to) = match p.range.as_deref().filter(|r| !r.is_empty()) {
            Some(r) => {
                let Some((name, _)) = PRESETS.iter().find(|(n, _)| *n == r) else {
                    return Err(PageError::bad(format!(
                        "range is one of today, 7d, month, last-month, 90d; not `{r}`"
                    )));
                };
                preset = Some(*name);
                match *name {
                    "today" => (today, today),
                    "7d" => (days_back(6), today),
                    "month" => (today.first_of_month(), today),
                    "last-month" => {
                        let last = today.first_of_month().yesterday().unwrap_or(today);
                        (last.first_of_month(), last)
                    }
                    _ => (days_back(89), today),
                }
            }
            None => {
                let parse = |name: &str, v: Option<&String>| -> Result<Option<Date>, PageError> {
                    match v.map(|s| s.trim()).filter(|s| !s.is_empty()) {
                        None => Ok(None),
                        Some(s) => crate::reports::parse_date(name, s)
                            .map(Some)
                            .map_err(PageError::bad),
                    }
                };
                let to = parse("to", p.to.as_ref())?.unwrap_or(today);
                let from = parse("from", p.from.as_ref())?
                    .unwrap_or_else(|| to.checked_sub(jiff::Span::new().days(29)).unwrap_or(to));
                (from, to)
            }
        };
        if from > to {
            return Err(PageError::bad(format!("from ({from}) is after to ({to})")));
        }
        let days = i64::from((to - from).get_days()) + 1;
        if days > crate::reports::MAX_REPORT_DAYS {
            return Err(PageError::bad(format!(
                "a range covers at most {} days; this one covers {days}",
                crate::reports::MAX_REPORT_DAYS
            )));
        }
        let tenant = filter_value("tenant", p.tenant.as_ref())?
            .map(|t| TenantId::parse(&t).map_err(|e| PageError::bad(format!("tenant: {e}"))))
            .transpose()?;
        let page = match p.page.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => 0,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| PageError::bad("page is a number from 0 to 100000"))?,
        };
        Ok(View {
            preset,
            from,
            to,
            today,
            tenant,
            model: filter_value("model", p.model.as_ref())?,
            endpoint: filter_value("endpoint", p.endpoint.as_ref())?,
            page,
        })
    }

    /// How many days the range covers.
    pub fn days(&self) -> usize {
        usize::try_from((self.to - self.from).get_days()).unwrap_or(0) + 1
    }

    /// The query string of this view (without `page`), `&`-joined, for links.
    pub fn query(&self) -> String {
        let mut q = Vec::new();
        match self.preset {
            Some(p) => q.push(format!("range={p}")),
            None => {
                q.push(format!("from={}", self.from));
                q.push(format!("to={}", self.to));
            }
        }
        if let Some(t) = &self.tenant {
            q.push(format!("tenant={}", enc(t.as_str())));
        }
        if let Some(m) = &self.model {
            q.push(format!("model={}", enc(m)));
        }
        if let Some(e) = &self.endpoint {
            q.push(format!("endpoint={}", enc(e)));
        }
        q.join("&")
    }

    /// What the range is, for headings.
    pub fn label(&self) -> String {
        match self
            .preset
            .and_then(|p| PRESETS.iter().find(|(n, _)| *n == p))
        {
            Some((_, l)) => format!("{l} ({} to {})", self.from, self.to),
            None => format!("{} to {}", self.from, self.to),
        }
    }
}

pub const STYLE: &str = r#"
:root { color-scheme: light dark;
        --fg:#1d2430; --muted:#5b6577; --line:#e3e7ee; --bg:#f6f8fb; --card:#fff;
        --bar:#3b6fd8; --warn:#c77700; --bad:#c62828; --ok:#2e7d32; --link:#2450b8;
        --badbg:#fdecea; --warnbg:#fff4e0; }
@media (prefers-color-scheme: dark) {
  :root { --fg:#e4e8ef; --muted:#9aa4b5; --line:#2c3442; --bg:#12161d; --card:#1a2029;
          --bar:#6b95ee; --warn:#f0a33a; --bad:#ef6b6b; --ok:#5cbf6a; --link:#8fb0ff;
          --badbg:#3a1f22; --warnbg:#3a2d17; }
}
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
a { color:var(--link); }
header.top { display:flex; flex-wrap:wrap; align-items:baseline; gap:.4rem 1rem;
         padding:.9rem 1.5rem; background:var(--card); border-bottom:1px solid var(--line); }
header.top .brand { font-size:1.15rem; font-weight:600; color:var(--fg); text-decoration:none; }
header.top nav { display:flex; flex-wrap:wrap; gap:.8rem; }
header.top .meta { color:var(--muted); font-size:.85rem; flex:1; min-width:12rem; }
header.top form { margin:0; }
main { max-width:1280px; margin:0 auto; padding:1.2rem 1.5rem 2rem;
       display:grid; grid-template-columns:repeat(6,minmax(0,1fr)); gap:1rem; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:1rem 1.1rem; grid-column:span 6; min-width:0; }
section.third { grid-column:span 2; } section.half { grid-column:span 3; }
@media (max-width:900px) { section.third, section.half { grid-column:span 6; } }
@media (max-width:600px) { main { padding:.8rem .6rem; gap:.7rem; }
  header.top { padding:.7rem .8rem; } section { padding:.8rem .7rem; } }
h1.page { grid-column:span 6; margin:0; font-size:1.3rem; overflow-wrap:anywhere; }
h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--muted);
     margin:0 0 .6rem; }
.big { font-size:1.9rem; font-weight:600; font-variant-numeric:tabular-nums; }
.sub { color:var(--muted); font-size:.9rem; }
.meter { height:10px; background:var(--line); border-radius:5px; overflow:hidden; margin:.6rem 0 .3rem; }
.meter span { display:block; height:100%; background:var(--ok); }
.meter span.warn { background:var(--warn); } .meter span.bad { background:var(--bad); }
.scroll { overflow-x:auto; max-width:100%; }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:.3rem .4rem; border-bottom:1px solid var(--line);
         white-space:nowrap; }
td.label { max-width:22rem; overflow:hidden; text-overflow:ellipsis; }
td.msg { white-space:normal; }
td.meter-cell { min-width:6rem; width:25%; } td.meter-cell .meter { margin:.2rem 0; }
th { color:var(--muted); font-weight:500; font-size:.8rem; }
td.n, th.n { text-align:right; }
.empty { color:var(--muted); font-style:italic; }
.badge { display:inline-block; padding:0 .4rem; border-radius:4px; font-size:.8rem;
         background:var(--badbg); color:var(--bad); }
.badge.warn { background:var(--warnbg); color:var(--warn); }
.badge.ok { background:transparent; color:var(--ok); border:1px solid var(--line); }
svg { display:block; max-width:100%; height:auto; }
svg text { font:11px system-ui,sans-serif; fill:var(--muted); }
svg rect.bar { fill:var(--bar); }
svg line.grid { stroke:var(--line); }
svg line.cap, svg path.cap { stroke:var(--bad); stroke-dasharray:5 4; fill:none; } svg text.cap { fill:var(--bad); }
svg path.spend { stroke:var(--bar); stroke-width:2.5; fill:none; }
svg path.projection { stroke:var(--warn); stroke-width:2; stroke-dasharray:6 4; fill:none; }
svg text.peak { fill:var(--fg); }
.legend { display:flex; flex-wrap:wrap; gap:.3rem .9rem; font-size:.85rem; margin-top:.4rem; }
.legend i { display:inline-block; width:.8rem; height:.8rem; border-radius:2px; margin-right:.3rem; vertical-align:-1px; }
form.range { display:flex; flex-wrap:wrap; gap:.5rem; align-items:end; }
form.range label, form.stack label { display:flex; flex-direction:column; font-size:.8rem; color:var(--muted); }
form.stack { display:grid; gap:.5rem; max-width:28rem; }
input, select { font:inherit; padding:.3rem .4rem; border:1px solid var(--line); border-radius:5px;
                background:var(--card); color:var(--fg); max-width:100%; }
input[type=date] { width:10rem; } form.range input[type=text] { width:9rem; }
.presets { display:flex; flex-wrap:wrap; gap:.3rem .8rem; margin-bottom:.6rem; }
.presets a.on { font-weight:700; text-decoration:none; color:var(--fg); }
button { font:inherit; padding:.2rem .7rem; border:1px solid var(--line); border-radius:5px;
         background:var(--card); color:var(--fg); cursor:pointer; }
.pager { display:flex; gap:1rem; margin-top:.5rem; }
.secret { font-family:ui-monospace,monospace; overflow-wrap:anywhere; background:var(--bg);
          padding:.5rem; border-radius:5px; }
.err { color:var(--bad); margin:0; }
dl.fields { display:grid; grid-template-columns:max-content minmax(0,1fr); gap:.3rem 1rem; margin:0; }
dl.fields dt { color:var(--muted); } dl.fields dd { margin:0; overflow-wrap:anywhere; }
"#;

/// The `<head>` contents of every page.
pub fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width,initial-scale=1";
        meta name="color-scheme" content="light dark";
        title { (title) " · spendguard" }
        style { (PreEscaped(STYLE)) }
    }
}

/// A whole page: the header with navigation, then `body` in the grid.
pub fn layout(title: &str, viewer: &Viewer, tz_name: &str, refresh: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                (head(title))
                @if refresh { meta http-equiv="refresh" content=(REFRESH_SECONDS); }
            }
            body {
                header.top {
                    a.brand href="/" { "spendguard" }
                    nav {
                        @match viewer.own_tenant() {
                            Some(t) => { a #nav-tenant href=(tenant_url(t.as_str())) { "Tenant " (t.as_str()) } }
                            None => {
                                a href="/" { "Overview" }
                                a href="/alerts" { "Alerts" }
                                a href="/manage" { "Manage" }
                                a href="/audit" { "Audit log" }
                            }
                        }
                    }
                    span.meta {
                        "Days in " (tz_name)
                        @if refresh { " · refreshes every " (REFRESH_SECONDS) " s" }
                        @if let Some(t) = viewer.own_tenant() { " · signed in as tenant " (t.as_str()) }
                    }
                    form method="post" action="/logout" { button type="submit" { "Sign out" } }
                }
                main { (body) }
            }
        }
    }
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
    fn sessions_open_check_and_close() {
        let s = Sessions::default();
        let t = s.open([1; 32], "key #01");
        let info = s.get(&t, |_| true).unwrap();
        assert_eq!(info.prefix, "key #01");
        assert!(info.csrf.starts_with("sg_") && info.csrf.len() == 67);
        // Each session has its own CSRF token.
        let other = s.open([1; 32], "key #01");
        assert_ne!(s.get(&other, |_| true).unwrap().csrf, info.csrf);
        assert!(!s.valid("sg_forged", |_| true));
        // A key that is no longer valid ends its sessions.
        assert!(!s.valid(&t, |_| false));
        assert!(!s.valid(&t, |_| true));
        s.close(&other);
        assert!(!s.valid(&other, |_| true));
    }

    #[test]
    fn one_key_cannot_sign_the_others_out() {
        let s = Sessions::default();
        let admin = s.open([9; 32], "admin");
        let tenant: Vec<String> = (0..MAX_SESSIONS + 10)
            .map(|_| s.open([1; 32], "tenant"))
            .collect();
        assert!(s.valid(&admin, |_| true), "the admin's session survives");
        assert_eq!(s.len(), MAX_SESSIONS_PER_KEY + 1);
        // The tenant's newest sessions are the ones kept.
        assert!(s.valid(tenant.last().unwrap(), |_| true));
        assert!(!s.valid(&tenant[0], |_| true));
    }

    #[test]
    fn ranges_come_from_presets_or_dates_and_are_checked() {
        let cal = Calendar::utc();
        // 2026-03-10T12:00:00Z.
        let now = 1_773_144_000_000_000;
        let p = view_params;
        let v = View::parse(&p("range=last-month"), &cal, now).unwrap();
        assert_eq!(
            (v.from.to_string(), v.to.to_string()),
            ("2026-02-01".into(), "2026-02-28".into())
        );
        assert_eq!(v.days(), 28);
        let v = View::parse(&p("range=7d"), &cal, now).unwrap();
        assert_eq!(v.from.to_string(), "2026-03-04");
        let v = View::parse(&p(""), &cal, now).unwrap();
        assert_eq!((v.from.to_string(), v.days()), ("2026-02-09".into(), 30));
        let v = View::parse(
            &p("from=2026-01-01&to=2026-01-31&tenant=acme&model=gpt-4o"),
            &cal,
            now,
        )
        .unwrap();
        assert_eq!(
            v.query(),
            "from=2026-01-01&to=2026-01-31&tenant=acme&model=gpt-4o"
        );
        for bad in [
            "range=year",
            "from=2026-02-30",
            "from=2026-03-02&to=2026-03-01",
            "page=x",
            "tenant=a%20b",
        ] {
            assert_eq!(
                View::parse(&p(bad), &cal, now).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    /// A query string as the pages get it (only `%20` decoded).
    fn view_params(q: &str) -> ViewParams {
        let mut v = ViewParams::default();
        for (k, val) in q
            .split('&')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| kv.split_once('='))
        {
            let val = Some(val.replace("%20", " "));
            match k {
                "range" => v.range = val,
                "from" => v.from = val,
                "to" => v.to = val,
                "tenant" => v.tenant = val,
                "model" => v.model = val,
                "endpoint" => v.endpoint = val,
                "page" => v.page = val,
                _ => {}
            }
        }
        v
    }
}
