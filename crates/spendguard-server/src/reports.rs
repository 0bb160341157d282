//! Usage reports, per-user daily usage and the alert list: HTTP handlers, and the
//! renderers (JSON, CSV, text table) the `spendguard` command shares with them.
//!
//! Everything here reads the store's rollups (`usage_rollups`, `alerts`), never the
//! ledger's hot path and never `ai_usage` row by row, so it stays fast on large histories.

use std::fmt::Write as _;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use jiff::civil::Date;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spendguard_core::{Calendar, Money, TenantId, UserId};
use spendguard_store::{
    AlertQuery, GroupBy, ModelUsage, Report, ReportQuery, ReportRow, StoreError, UsageTotals,
};

use crate::AppState;
use crate::alerts::{AlertOut, payload};
use crate::auth::Caller;
use crate::error::{ApiError, ApiQuery};

/// The longest report range, in days.
pub const MAX_REPORT_DAYS: i64 = 3 * 366;
/// The most rows a report may be limited to (and the default cap of the alert list).
pub const MAX_LIMIT: usize = 100_000;
/// Alerts listed when the request gives no `limit` (the dashboard counts the same list).
pub const ALERTS_DEFAULT_LIMIT: usize = 1000;

/// Output formats of reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Table,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Json, Format::Csv, Format::Table];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Table => "table",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// A date argument (`YYYY-MM-DD`), with a message naming the argument on error.
pub fn parse_date(name: &str, s: &str) -> Result<Date, String> {
    s.parse::<Date>()
        .map_err(|_| format!("{name} must be a date written YYYY-MM-DD, not `{s}`"))
}

/// The calendar months wholly inside `from..=to`, as `[start, end)` instants: a month counts
/// when its first day is in the range and its last day is too, or the range reaches `today`
/// (no record is dated after today, so such a month holds nothing outside the range).
/// Reports read these from month rollups instead of summing their days.
pub fn whole_months(calendar: &Calendar, from: Date, to: Date, today: Date) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut first = from.first_of_month();
    if first < from {
        first = match first.checked_add(jiff::Span::new().months(1)) {
            Ok(d) => d,
            Err(_) => return out,
        };
    }
    while first <= to {
        let Ok(next) = first.checked_add(jiff::Span::new().months(1)) else {
            break;
        };
        let last = first.last_of_month();
        if last <= to || to >= today {
            out.push((calendar.date_start(first), calendar.date_start(next)));
        }
        first = next;
    }
    out
}

/// A report's date range and grouping, checked: `to` defaults to today, `from` to 29 days
/// before `to` (30 days in all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSpec {
    pub from: Date,
    pub to: Date,
    pub query: ReportQuery,
}

impl ReportSpec {
    pub fn new(
        calendar: &Calendar,
        now: i64,
        from: Option<&str>,
        to: Option<&str>,
        group_by: Option<&str>,
        tenant: Option<TenantId>,
        limit: Option<usize>,
    ) -> Result<ReportSpec, String> {
        let to = match to {
            Some(s) => parse_date("to", s)?,
            None => calendar.date_of(now),
        };
        let from = match from {
            Some(s) => parse_date("from", s)?,
            None => to.checked_sub(jiff::Span::new().days(29)).unwrap_or(to),
        };
        if from > to {
            return Err(format!("from ({from}) is after to ({to})"));
        }
        let days = (to - from).get_days() as i64 + 1;
        if days > MAX_REPORT_DAYS {
            return Err(format!(
                "a report covers at most {MAX_REPORT_DAYS} days; this one covers {days}"
            ));
        }
        let group_by = match group_by {
            None => GroupBy::Day,
            Some(g) => GroupBy::parse(g).ok_or_else(|| {
                format!(
                    "group_by must be one of day, tenant, company, user, model, endpoint; not `{g}`"
                )
            })?,
        };
        if let Some(l) = limit
            && !(1..=MAX_LIMIT).contains(&l)
        {
            return Err(format!("limit must be from 1 to {MAX_LIMIT}"));
        }
        Ok(ReportSpec {
            from,
            to,
            query: ReportQuery {
                from_day: calendar.date_start(from),
                to_day: calendar.date_start(to),
                tenant,
                group_by,
                limit,
                whole_months: whole_months(calendar, from, to, calendar.date_of(now)),
            },
        })
    }
}

/// Sums as JSON (money as a USD number).
#[derive(Clone, Copy, Debug, Default, Serialize, JsonSchema)]
pub struct TotalsOut {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    #[schemars(with = "crate::openapi::Usd")]
    pub cost_usd: Money,
}

impl From<&UsageTotals> for TotalsOut {
    fn from(t: &UsageTotals) -> TotalsOut {
        TotalsOut {
            requests: t.requests,
            input_tokens: t.input_tokens,
            cached_input_tokens: t.cached_input_tokens,
            output_tokens: t.output_tokens,
            total_tokens: t.total_tokens(),
            cost_usd: t.cost,
        }
    }
}

/// The key columns of a grouping.
pub fn key_columns(g: GroupBy) -> &'static [&'static str] {
    match g {
        GroupBy::Day => &["day"],
        GroupBy::Tenant => &["tenant_id"],
        GroupBy::Company => &["tenant_id", "company_id"],
        GroupBy::User => &["tenant_id", "user_id"],
        GroupBy::Model => &["model"],
        GroupBy::Endpoint => &["endpoint"],
    }
}

const TOTAL_COLUMNS: [&str; 6] = [
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
];

/// A row's key values, in [`key_columns`] order (`None`: no company or endpoint).
pub fn key_values(calendar: &Calendar, g: GroupBy, row: &ReportRow) -> Vec<Option<String>> {
    match g {
        GroupBy::Day => vec![row.day.map(|d| calendar.date_of(d).to_string())],
        GroupBy::Tenant => vec![row.tenant.clone()],
        GroupBy::Company | GroupBy::User => vec![row.tenant.clone(), row.key.clone()],
        GroupBy::Model | GroupBy::Endpoint => vec![row.key.clone()],
    }
}

fn total_values(t: &UsageTotals) -> [String; 6] {
    [
        t.requests.to_string(),
        t.input_tokens.to_string(),
        t.cached_input_tokens.to_string(),
        t.output_tokens.to_string(),
        t.total_tokens().to_string(),
        t.cost.to_string(),
    ]
}

/// One row of a report: the grouping's key columns (only those), then the sums.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct ReportRowOut {
    /// With `group_by=day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::openapi::DateStr>")]
    pub day: Option<String>,
    /// With `group_by=tenant`, `company` and `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// With `group_by=company`; `null`: usage without a company.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub company_id: Option<Option<String>>,
    /// With `group_by=user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// With `group_by=model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// With `group_by=endpoint`; `null`: usage without an endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Option<String>>,
    #[serde(flatten)]
    pub totals: TotalsOut,
}

/// A usage report.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReportOut {
    #[schemars(with = "crate::openapi::DateStr")]
    pub from: String,
    #[schemars(with = "crate::openapi::DateStr")]
    pub to: String,
    /// The IANA time zone the days are counted in.
    pub time_zone: String,
    #[schemars(with = "crate::openapi::GroupByName")]
    pub group_by: &'static str,
    /// The tenant the report is restricted to, if any.
    pub tenant_id: Option<String>,
    /// How many groups there are (`rows` may hold fewer, with `limit`).
    pub groups: usize,
    pub rows: Vec<ReportRowOut>,
    /// The sums over every group.
    pub totals: TotalsOut,
    /// Reservations of the range (and tenant) that were admitted although a limit in shadow
    /// would have refused them, by the reason it would have given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_deny: Option<WouldDenyOut>,
    /// When not null, `?cursor=` this fetches the next page of rows.
    pub next_cursor: Option<String>,
}

/// The report as a typed answer.
pub fn report_out(calendar: &Calendar, spec: &ReportSpec, report: &Report) -> ReportOut {
    let g = spec.query.group_by;
    let rows = report
        .rows
        .iter()
        .map(|r| {
            let mut row = ReportRowOut {
                totals: TotalsOut::from(&r.totals),
                ..ReportRowOut::default()
            };
            for (col, v) in key_columns(g).iter().zip(key_values(calendar, g, r)) {
                match *col {
                    "day" => row.day = v,
                    "tenant_id" => row.tenant_id = v,
                    "company_id" => row.company_id = Some(v),
                    "user_id" => row.user_id = v,
                    "model" => row.model = v,
                    _ => row.endpoint = Some(v),
                }
            }
            row
        })
        .collect();
    ReportOut {
        from: spec.from.to_string(),
        to: spec.to.to_string(),
        time_zone: calendar.time_zone_name().to_owned(),
        group_by: g.as_str(),
        tenant_id: spec.query.tenant.as_ref().map(|t| t.as_str().to_owned()),
        groups: report.groups,
        rows,
        totals: TotalsOut::from(&report.totals),
        would_deny: None,
        next_cursor: None,
    }
}

/// Would-be denials (shadow mode) by reason, and their total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct WouldDenyOut {
    pub total: u64,
    pub budget_exceeded: u64,
    pub rate_limited: u64,
    pub model_not_allowed: u64,
    pub max_output_tokens_exceeded: u64,
}

impl WouldDenyOut {
    pub fn from_counts(counts: &[(String, u64)]) -> WouldDenyOut {
        let mut out = WouldDenyOut::default();
        for (reason, n) in counts {
            let slot = match reason.as_str() {
                "budget_exceeded" => &mut out.budget_exceeded,
                "rate_limited" => &mut out.rate_limited,
                "model_not_allowed" => &mut out.model_not_allowed,
                "max_output_tokens_exceeded" => &mut out.max_output_tokens_exceeded,
                _ => continue,
            };
            *slot = slot.saturating_add(*n);
            out.total = out.total.saturating_add(*n);
        }
        out
    }
}

/// The report as JSON.
pub fn report_json(calendar: &Calendar, spec: &ReportSpec, report: &Report) -> Value {
    serde_json::to_value(report_out(calendar, spec, report)).unwrap_or(Value::Null)
}

/// The report as CSV (RFC 4180: CRLF line ends, a header row; written by the `csv` crate,
/// which quotes a field holding a comma, quote or line break). Money has 6 decimals.
pub fn report_csv(calendar: &Calendar, g: GroupBy, report: &Report) -> String {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let header = key_columns(g).iter().chain(TOTAL_COLUMNS.iter());
    // Writing to memory cannot fail.
    let _ = w.write_record(header);
    for r in &report.rows {
        let fields = key_values(calendar, g, r)
            .into_iter()
            .map(Option::unwrap_or_default)
            .chain(total_values(&r.totals));
        let _ = w.write_record(fields);
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// The report as an aligned text table, with a total line.
pub fn report_table(calendar: &Calendar, g: GroupBy, report: &Report) -> String {
    let mut header: Vec<String> = key_columns(g).iter().map(|s| (*s).to_owned()).collect();
    header.extend(TOTAL_COLUMNS.iter().map(|s| (*s).to_owned()));
    let mut rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            let mut v: Vec<String> = key_values(calendar, g, r)
                .into_iter()
                .map(|k| k.unwrap_or_else(|| "-".into()))
                .collect();
            v.extend(total_values(&r.totals));
            v
        })
        .collect();
    let mut total = vec![String::new(); key_columns(g).len()];
    total[0] = format!("total ({} groups)", report.groups);
    total.extend(total_values(&report.totals));
    rows.push(total);
    table(&header, &rows)
}

/// Aligns columns: text left, numbers right.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, v) in widths.iter_mut().zip(r) {
            *w = (*w).max(v.chars().count());
        }
    }
    // A column is numeric when every cell of it is (decided once per column).
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| {
            !rows.is_empty()
                && rows.iter().all(|r| {
                    r.get(i).is_none_or(|v| {
                        v.is_empty() || v.chars().all(|c| c.is_ascii_digit() || c == '.')
                    })
                })
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut parts = Vec::new();
        for (i, c) in cells.iter().enumerate().take(widths.len()) {
            if numeric[i] {
                parts.push(format!("{c:>w$}", w = widths[i]));
            } else {
                parts.push(format!("{c:<w$}", w = widths[i]));
            }
        }
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, header);
    for r in rows {
        line(&mut out, r);
    }
    out
}

/// One model's share of a user's day.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ModelDayOut {
    pub model: String,
    #[serde(flatten)]
    pub totals: TotalsOut,
}

/// A user's usage on one day.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DailyOut {
    pub tenant_id: String,
    pub user_id: String,
    #[schemars(with = "crate::openapi::DateStr")]
    pub date: String,
    pub time_zone: String,
    pub totals: TotalsOut,
    /// By cost, highest first.
    pub models: Vec<ModelDayOut>,
}

/// A user's day as a typed answer.
pub fn daily_out(
    calendar: &Calendar,
    tenant: &TenantId,
    user: &UserId,
    date: Date,
    models: &[ModelUsage],
) -> DailyOut {
    let mut totals = UsageTotals::default();
    for m in models {
        totals.add(&m.totals);
    }
    DailyOut {
        tenant_id: tenant.as_str().to_owned(),
        user_id: user.as_str().to_owned(),
        date: date.to_string(),
        time_zone: calendar.time_zone_name().to_owned(),
        totals: TotalsOut::from(&totals),
        models: models
            .iter()
            .map(|m| ModelDayOut {
                model: m.model.clone(),
                totals: TotalsOut::from(&m.totals),
            })
            .collect(),
    }
}

/// A user's day as JSON.
pub fn daily_json(
    calendar: &Calendar,
    tenant: &TenantId,
    user: &UserId,
    date: Date,
    models: &[ModelUsage],
) -> Value {
    serde_json::to_value(daily_out(calendar, tenant, user, date, models)).unwrap_or(Value::Null)
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store error while reading a report");
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the usage store failed",
    )
}

/// The tenant a read is restricted to: a tenant key's own (another one given is refused);
/// for the admin, the one asked for, if any.
fn read_scope(caller: &Caller, asked: Option<TenantId>) -> Result<Option<TenantId>, ApiError> {
    match (caller, asked) {
        (Caller::Admin, asked) => Ok(asked),
        (Caller::Tenant(own), None) => Ok(Some(own.clone())),
        (Caller::Tenant(own), Some(t)) => {
            caller.may_act_on(&t)?;
            Ok(Some(own.clone()))
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// The first day (default: 29 days before `to`).
    #[schemars(with = "Option<crate::openapi::DateStr>")]
    pub from: Option<String>,
    /// The last day (default: today).
    #[schemars(with = "Option<crate::openapi::DateStr>")]
    pub to: Option<String>,
    /// Default `day`.
    #[schemars(with = "Option<crate::openapi::GroupByName>")]
    pub group_by: Option<String>,
    /// Default `json`.
    #[schemars(with = "Option<crate::openapi::ReportFormat>")]
    pub format: Option<String>,
    /// Admin key: only this tenant (a tenant key always reads its own).
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
    /// Keep the top N groups (1 to 100000).
    #[schemars(range(min = 1, max = 100_000))]
    pub limit: Option<usize>,
    /// Where the previous page ended (its `next_cursor`).
    pub cursor: Option<String>,
}

/// The furthest a cursor may point into a report.
pub const MAX_CURSOR: usize = 10_000_000;
/// How long a report waits for a turn (`[reports] max_concurrent`) before answering 503.
pub const REPORT_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets its flag when dropped: the store's read stops when the request is dropped (the
/// client went away, or the request timed out).
struct CancelOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn parse_cursor(c: &str) -> Result<usize, ApiError> {
    c.parse::<usize>()
        .ok()
        .filter(|n| *n <= MAX_CURSOR && c.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::bad_request("cursor must be the `next_cursor` of a previous page"))
}

/// `GET /v1/reports/usage`: one page of at most `limit` rows (default `[reports]
/// default_limit`); `next_cursor`, when not null, fetches the next page (`?cursor=`).
pub async fn usage_report(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ReportParams>,
) -> Result<Response, ApiError> {
    let format = match q.format.as_deref() {
        None => Format::Json,
        Some(f) => Format::parse(f)
            .filter(|f| *f != Format::Table)
            .ok_or_else(|| {
                ApiError::bad_request(format!("format must be json or csv, not `{f}`"))
            })?,
    };
    let tenant = read_scope(&caller, q.tenant_id)?;
    let policy = state.guard.ledger().policy();
    let calendar = &policy.calendar;
    let spec = ReportSpec::new(
        calendar,
        state.guard.now(),
        q.from.as_deref(),
        q.to.as_deref(),
        q.group_by.as_deref(),
        tenant,
        Some(q.limit.unwrap_or(state.limits.report_default_limit)),
    )
    .map_err(ApiError::bad_request)?;
    let offset = q
        .cursor
        .as_deref()
        .map(parse_cursor)
        .transpose()?
        .unwrap_or(0);
    let page = spec.query.limit.unwrap_or(MAX_LIMIT);
    let mut query = spec.query.clone();
    query.limit = Some(offset.saturating_add(page));
    // At most `max_concurrent` reports read at once: each holds its groups in memory.
    let _turn = tokio::time::timeout(REPORT_QUEUE_WAIT, state.limits.report_slots.acquire())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            let mut e = ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many reports are being read right now; try again shortly",
            );
            e.headers
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            e
        })?;
    let cancel = CancelOnDrop(Default::default());
    let mut report = state
        .guard
        .store()
        .report_cancellable(&query, cancel.0.clone())
        .await
        .map_err(store_error)?;
    report.rows.drain(..offset.min(report.rows.len()));
    let next = offset.saturating_add(page);
    let next_cursor = (report.groups > next).then(|| next.to_string());
    Ok(match format {
        Format::Csv => {
            let name = format!(
                "attachment; filename=\"spendguard-usage-{}-{}-by-{}.csv\"",
                spec.from,
                spec.to,
                spec.query.group_by.as_str()
            );
            let mut resp = report_csv(calendar, spec.query.group_by, &report).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            if let Ok(v) = HeaderValue::from_str(&name) {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            if let Some(c) = &next_cursor
                && let Ok(v) = HeaderValue::from_str(c)
            {
                h.insert("x-next-cursor", v);
            }
            resp
        }
        _ => {
            let would_deny = state
                .guard
                .store()
                .would_deny_counts(
                    spec.query.from_day,
                    spec.query.to_day,
                    spec.query.tenant.as_ref(),
                )
                .await
                .map_err(store_error)?;
            Json(ReportOut {
                next_cursor,
                would_deny: Some(WouldDenyOut::from_counts(&would_deny)),
                ..report_out(calendar, &spec, &report)
            })
            .into_response()
        }
    })
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DailyParams {
    /// Default: today.
    #[schemars(with = "Option<crate::openapi::DateStr>")]
    pub date: Option<String>,
    /// The user's tenant: required with the admin key; a tenant key's own by default.
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
}

/// `GET /v1/users/{user_id}/daily-usage`.
pub async fn daily_usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiQuery(q): ApiQuery<DailyParams>,
) -> Result<Json<DailyOut>, ApiError> {
    let user = UserId::parse(&user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tenant = read_scope(&caller, q.tenant_id)?.ok_or_else(|| {
        ApiError::bad_request("users belong to a tenant: add ?tenant_id= (admin key)")
    })?;
    let policy = state.guard.ledger().policy();
    let calendar = &policy.calendar;
    let date = match q.date.as_deref() {
        Some(d) => parse_date("date", d).map_err(ApiError::bad_request)?,
        None => calendar.date_of(state.guard.now()),
    };
    let models = state
        .guard
        .store()
        .user_day(&tenant, &user, calendar.date_start(date))
        .await
        .map_err(store_error)?;
    Ok(Json(daily_out(calendar, &tenant, &user, date, &models)))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertParams {
    /// Also alerts of past windows.
    pub all: Option<bool>,
    /// Admin key: only this tenant (a tenant key always reads its own).
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
    /// At most this many (1 to 100000; default 1000).
    #[schemars(range(min = 1, max = 100_000))]
    pub limit: Option<usize>,
}

/// Alerts, newest first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AlertsOut {
    pub alerts: Vec<AlertOut>,
}

/// The alert list.
pub async fn list_alerts(
    state: &AppState,
    tenant: Option<TenantId>,
    all: bool,
    limit: usize,
) -> Result<Vec<AlertOut>, StoreError> {
    let now = state.guard.now();
    let periods = state.guard.ledger().policy().calendar.periods(now);
    let query = AlertQuery {
        tenant,
        current: (!all).then_some((periods.day.start, periods.month.start)),
        limit: Some(limit),
    };
    let alerts = state.guard.store().alerts(&query).await?;
    Ok(alerts.iter().map(payload).collect())
}

/// `GET /v1/alerts`: alerts of the current day and month windows, newest first
/// (`?all=true`: of every window).
pub async fn alerts(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AlertParams>,
) -> Result<Json<AlertsOut>, ApiError> {
    let tenant = read_scope(&caller, q.tenant_id)?;
    let limit = q.limit.unwrap_or(ALERTS_DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be from 1 to {MAX_LIMIT}"
        )));
    }
    let list = list_alerts(&state, tenant, q.all.unwrap_or(false), limit)
        .await
        .map_err(store_error)?;
    Ok(Json(AlertsOut { alerts: list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(day: Option<i64>, tenant: Option<&str>, key: Option<&str>, cost: i64) -> ReportRow {
        ReportRow {
            day,
            tenant: tenant.map(str::to_owned),
            key: key.map(str::to_owned),
            totals: UsageTotals {
                requests: 2,
                input_tokens: 10,
                cached_input_tokens: 1,
                output_tokens: 5,
                cost: Money::from_micros(cost),
            },
        }
    }

    #[test]
    fn csv_is_rfc_4180() {
        let cal = Calendar::utc();
        let report = Report {
            rows: vec![
                row(None, Some("acme"), Some("a,b"), 1_500_000),
                row(None, Some("acme"), None, 1),
            ],
            totals: UsageTotals::default(),
            groups: 2,
        };
        let csv = report_csv(&cal, GroupBy::Company, &report);
        assert_eq!(
            csv,
            "tenant_id,company_id,requests,input_tokens,cached_input_tokens,output_tokens,total_tokens,cost_usd\r\n\
             acme,\"a,b\",2,10,1,5,15,1.500000\r\n\
             acme,,2,10,1,5,15,0.000001\r\n"
        );
    }

    #[test]
    fn specs_default_to_the_last_30_days_and_check_their_arguments() {
        let cal = Calendar::new("America/New_York").unwrap();
        // 2026-03-10T03:00Z is still March 9 in New York.
        let now = 1_773_111_600_000_000;
        let spec = ReportSpec::new(&cal, now, None, None, None, None, None).unwrap();
        assert_eq!(spec.to.to_string(), "2026-03-09");
        assert_eq!(spec.from.to_string(), "2026-02-08");
        assert_eq!(spec.query.group_by, GroupBy::Day);
        assert_eq!(spec.query.to_day, cal.date_start(spec.to));
        let err = |f: Option<&str>, t: Option<&str>, g: Option<&str>, l: Option<usize>| {
            ReportSpec::new(&cal, now, f, t, g, None, l).unwrap_err()
        };
        assert!(err(Some("2026-3-1"), None, None, None).starts_with("from must be a date"));
        assert!(err(Some("2026-03-05"), Some("2026-03-01"), None, None).contains("is after"));
        assert!(err(Some("2020-01-01"), Some("2026-01-01"), None, None).contains("at most"));
        assert!(err(None, None, Some("week"), None).starts_with("group_by must be one of"));
        assert!(err(None, None, None, Some(0)).starts_with("limit must be"));
    }

    #[test]
    fn whole_months_are_the_ones_the_range_covers() {
        let cal = Calendar::new("Europe/Berlin").unwrap();
        let d = |s: &str| s.parse::<Date>().unwrap();
        let starts = |v: Vec<(i64, i64)>| -> Vec<String> {
            v.into_iter()
                .map(|(s, e)| format!("{}..{}", cal.date_of(s), cal.date_of(e)))
                .collect()
        };
        let today = d("2026-11-30");
        // Partial months at both ends are not whole.
        assert_eq!(
            starts(whole_months(&cal, d("2026-01-15"), d("2026-04-10"), today)),
            ["2026-02-01..2026-03-01", "2026-03-01..2026-04-01"]
        );
        // Exact month bounds are.
        assert_eq!(
            starts(whole_months(&cal, d("2026-02-01"), d("2026-02-28"), today)),
            ["2026-02-01..2026-03-01"]
        );
        // The current month, up to today, is whole: nothing is dated after today.
        assert_eq!(
            starts(whole_months(&cal, d("2026-11-01"), d("2026-11-30"), today)),
            ["2026-11-01..2026-12-01"]
        );
        assert!(whole_months(&cal, d("2026-11-02"), d("2026-11-30"), today).is_empty());
        assert!(whole_months(&cal, d("2026-10-01"), d("2026-10-30"), today).is_empty());
        // Month starts are local midnights.
        let (start, _) = whole_months(&cal, d("2026-03-01"), d("2026-03-31"), today)[0];
        assert_eq!(start, cal.date_start(d("2026-03-01")));
    }

    #[test]
    fn tables_align_numbers_right() {
        // A row shorter than the header does not panic.
        assert_eq!(
            table(&["a".into(), "b".into()], &[vec!["1".into()]]),
            "a  b\n1\n"
        );
        let t = table(
            &["model".into(), "cost_usd".into()],
            &[
                vec!["gpt-4o".into(), "12.500000".into()],
                vec!["o1".into(), "1.000000".into()],
            ],
        );
        assert_eq!(
            t,
            "model    cost_usd\ngpt-4o  12.500000\no1       1.000000\n"
        );
    }
}
