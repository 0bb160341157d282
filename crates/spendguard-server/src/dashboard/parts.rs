//! Pieces several pages share: the range form, gauges, budget meters, ranked tables, the
//! alerts table and the usage records table.

use std::collections::HashMap;

use maud::{Markup, html};
use spendguard_core::{Money, ScopeKey, UsageRecord, Window};
use spendguard_store::{AlertAck, GroupBy, Report, ReportRow};

use super::data::Meter;
use super::{
    PRESETS, View, Viewer, company_url, model_url, tenant_url, thousands, usd_cents, usd_text,
    user_url, when,
};
use crate::alerts::AlertOut;

/// The date-range presets, the custom range and the filters (`fields`: which of `tenant`,
/// `model` and `endpoint` can be chosen here), as a GET form to `path`. Then links to the
/// CSV export of what the page shows (`export`: the export's own filter, appended).
pub fn range_form(path: &str, view: &View, fields: &[&str], export: &str) -> Markup {
    let filters = {
        let mut f = Vec::new();
        if let Some(t) = &view.tenant {
            f.push(format!("tenant={}", super::enc(t.as_str())));
        }
        if let Some(m) = &view.model {
            f.push(format!("model={}", super::enc(m)));
        }
        if let Some(e) = &view.endpoint {
            f.push(format!("endpoint={}", super::enc(e)));
        }
        f.into_iter().map(|s| format!("&{s}")).collect::<String>()
    };
    let q = view.query();
    html! {
        section #range {
            h2 { "Range and filters · " span #range-label { (view.label()) } }
            div.presets {
                @for (name, label) in PRESETS {
                    a id=(format!("preset-{name}")) class=[(view.preset == Some(name)).then_some("on")] href=(format!("{path}?range={name}{filters}")) { (label) }
                }
            }
            form.range method="get" action=(path) {
                label { "From" input #from type="date" name="from" value=(view.from.to_string()); }
                label { "To" input #to type="date" name="to" value=(view.to.to_string()); }
                @if fields.contains(&"tenant") {
                    label { "Tenant" input #filter-tenant type="text" name="tenant" value=[view.tenant.as_ref().map(|t| t.as_str())]; }
                }
                @if fields.contains(&"model") {
                    label { "Model" input #filter-model type="text" name="model" value=[view.model.as_deref()]; }
                }
                @if fields.contains(&"endpoint") {
                    label { "Endpoint" input #filter-endpoint type="text" name="endpoint" value=[view.endpoint.as_deref()]; }
                }
                button #apply type="submit" { "Apply" }
            }
            p.sub {
                "Export as CSV: "
                @for g in [GroupBy::Day, GroupBy::Model, GroupBy::Endpoint, GroupBy::Tenant, GroupBy::User] {
                    a id=(format!("export-{}", g.as_str())) href=(format!("/export.csv?{q}{export}&group_by={}", g.as_str())) { "by " (g.as_str()) }
                    " "
                }
            }
        }
    }
}

/// A window's spend against its cap, for headline figures.
pub fn gauge(id: &str, title: &str, spent: Money, reserved: Money, cap: Option<Money>) -> Markup {
    let in_flight =
        (reserved > Money::ZERO).then(|| format!(" · {} in flight", usd_cents(reserved)));
    html! {
        section.third {
            h2 { (title) }
            div.big id=(id) title=(usd_text(spent)) { (usd_cents(spent)) }
            @match cap {
                Some(cap) if cap > Money::ZERO => {
                    @let pct = (spent.micros() as f64 / cap.micros() as f64 * 100.0).max(0.0);
                    @let class = if pct >= 100.0 { "bad" } else if pct >= 80.0 { "warn" } else { "" };
                    div.meter { span class=(class) style=(format!("width:{:.1}%", pct.min(100.0))) {} }
                    div.sub {
                        "of " span id=(format!("{id}-cap")) { (usd_cents(cap)) } " cap · "
                        span id=(format!("{id}-pct")) { (format!("{pct:.1}%")) }
                        @if let Some(f) = &in_flight { (f) }
                    }
                }
                Some(cap) => { div.sub { "cap " span id=(format!("{id}-cap")) { (usd_cents(cap)) } @if let Some(f) = &in_flight { (f) } } }
                None => { div.sub { "no cap" @if let Some(f) = &in_flight { (f) } } }
            }
        }
    }
}

/// A scope's name and the page that shows it.
pub fn scope_label(k: &ScopeKey) -> (String, Option<String>) {
    match k {
        ScopeKey::Global => ("global".into(), Some("/".into())),
        ScopeKey::Tenant(t) => (
            format!("tenant {}", t.as_str()),
            Some(tenant_url(t.as_str())),
        ),
        ScopeKey::Company(t, c) => (
            format!("company {} ({})", c.as_str(), t.as_str()),
            Some(company_url(t.as_str(), c.as_str())),
        ),
        ScopeKey::User(t, u) => (
            format!("user {} ({})", u.as_str(), t.as_str()),
            Some(user_url(t.as_str(), u.as_str())),
        ),
    }
}

/// The most budgets a page meters; the rest (further from their limits) are counted.
pub const METERS_ON_PAGE: usize = 50;

/// Budgets with their meters, the closest to its limit first.
pub fn meters(all: &[Meter]) -> Markup {
    let meters = &all[..all.len().min(METERS_ON_PAGE)];
    html! {
        section #budgets-section {
            h2 { "Budgets, closest to the limit first" }
            @if meters.is_empty() {
                p.empty #budgets { "No budgets here." }
            } @else {
                div.scroll {
                    table #budgets {
                        thead { tr { th { "Budget" } th { "Window" } th.n { "Used" } th.n { "Reserved" } th.n { "Limit" } th { "Meter" } th.n { "Projected month end" } } }
                        tbody {
                            @for m in meters {
                                @let (label, url) = scope_label(&m.scope);
                                @let pct = m.percent();
                                tr class=(format!("meter-{}", m.class())) data-scope=(label) data-window=(m.window.as_str()) data-used=(m.used.to_string()) data-limit=(m.limit.to_string()) data-pct=(format!("{pct:.1}")) {
                                    td.label { @match url { Some(u) => { a href=(u) { (label) } } None => { (label) } } }
                                    td { (if m.window == Window::Day { "day" } else { "month" }) }
                                    td.n title=(usd_text(m.used)) { (usd_cents(m.used)) }
                                    td.n title=(usd_text(m.reserved)) { (usd_cents(m.reserved)) }
                                    td.n { (usd_cents(m.limit)) }
                                    td.meter-cell {
                                        div.meter { span class=(m.class()) style=(format!("width:{:.1}%", pct.clamp(0.0, 100.0))) {} }
                                        span.sub { (format!("{pct:.1}%")) }
                                    }
                                    td.n { @match m.projected { Some(p) => { span class=[(p > m.limit).then_some("badge")] { (usd_cents(p)) } } None => { "–" } } }
                                }
                            }
                        }
                    }
                }
                @if all.len() > meters.len() {
                    p.sub #budgets-more { (all.len() - meters.len()) " more budgets, further from their limits" }
                }
            }
        }
    }
}

/// A label of a report row and the page it links to.
pub type LabelFn<'a> = &'a dyn Fn(&ReportRow) -> (String, Option<String>);

/// A ranked table of a report: label, requests, tokens, spend (`data-cost` exact).
pub fn ranked(
    class: &str,
    id: &str,
    title: &str,
    what: &str,
    report: Option<&Report>,
    label: LabelFn<'_>,
) -> Markup {
    html! {
        section class=(class) {
            h2 { (title) }
            @match report {
                None => { p.empty id=(id) { "Not available with this filter." } }
                Some(r) if r.rows.is_empty() => { p.empty id=(id) { "No spend in this range." } }
                Some(r) => {
                    div.scroll {
                        table id=(id) {
                            thead { tr { th { (what) } th.n { "Requests" } th.n { "Tokens" } th.n { "Spend" } } }
                            tbody {
                                @for row in &r.rows {
                                    @let (text, url) = label(row);
                                    tr {
                                        td.label title=(text) { @match url { Some(u) => { a href=(u) { (text) } } None => { (text) } } }
                                        td.n { (thousands(row.totals.requests)) }
                                        td.n { (thousands(row.totals.total_tokens())) }
                                        td.n data-cost=(row.totals.cost.to_string()) title=(usd_text(row.totals.cost)) { (usd_cents(row.totals.cost)) }
                                    }
                                }
                            }
                        }
                    }
                    @if r.groups > r.rows.len() { p.sub { (r.groups - r.rows.len()) " more (CSV export has them all)" } }
                }
            }
        }
    }
}

/// Labels: a model and its page.
pub fn model_label(r: &ReportRow) -> (String, Option<String>) {
    match &r.key {
        Some(m) => (m.clone(), Some(model_url(m))),
        None => ("-".into(), None),
    }
}

pub fn endpoint_label(r: &ReportRow) -> (String, Option<String>) {
    (r.key.clone().unwrap_or_else(|| "(none)".into()), None)
}

pub fn tenant_label(r: &ReportRow) -> (String, Option<String>) {
    let t = r.tenant.clone().unwrap_or_default();
    let url = tenant_url(&t);
    (t, Some(url))
}

pub fn user_label(r: &ReportRow) -> (String, Option<String>) {
    let (t, u) = (
        r.tenant.clone().unwrap_or_default(),
        r.key.clone().unwrap_or_default(),
    );
    let url = user_url(&t, &u);
    (format!("{u} ({t})"), Some(url))
}

pub fn company_label(r: &ReportRow) -> (String, Option<String>) {
    let t = r.tenant.clone().unwrap_or_default();
    match &r.key {
        Some(c) => (format!("{c} ({t})"), Some(company_url(&t, c))),
        None => (format!("(no company) ({t})"), None),
    }
}

/// The alerts table: raised, alert, budget, window, status (acknowledged, or a button to
/// acknowledge for an admin session).
pub fn alerts_table(
    alerts: &[AlertOut],
    tz: &jiff::tz::TimeZone,
    acks: &HashMap<i64, AlertAck>,
    viewer: &Viewer,
    back: &str,
) -> Markup {
    html! {
        @if alerts.is_empty() {
            p.empty #alerts { "No alerts in the current day or month." }
        } @else {
            div.scroll {
                table #alerts {
                    thead { tr { th { "Raised" } th { "Alert" } th { "Budget" } th { "Window" } th { "Status" } } }
                    tbody {
                        @for a in alerts {
                            @let badge = if a.kind == "projected" || a.threshold_percent < 100 { "badge warn" } else { "badge" };
                            @let window = if a.window == "day" { "daily" } else { "monthly" };
                            @let (label, text) = if a.kind == "projected" {
                                ("projected".to_owned(), format!("on course for {} this month; {window} budget {}", usd_cents(a.amount_usd), usd_cents(a.limit_usd)))
                            } else {
                                (format!("{}%", a.threshold_percent), format!("{} of {} {window} budget", usd_cents(a.amount_usd), usd_cents(a.limit_usd)))
                            };
                            @let scope = match (&a.tenant_id, a.scope) {
                                (Some(t), "company" | "user") => format!("{} {} ({t})", a.scope, a.scope_id),
                                _ => format!("{} {}", a.scope, a.scope_id),
                            };
                            tr data-alert-id=(a.id) {
                                td { (when(tz, a.created_at.0, "%Y-%m-%d %H:%M %Z")) }
                                td.msg title=(a.message) { span class=(badge) { (label) } " " (text) }
                                td { @match alert_scope_url(a) { Some(u) => { a href=(u) { (scope) } } None => { (scope) } } }
                                td { (a.window) }
                                td {
                                    @if let Some(ack) = acks.get(&a.id) {
                                        span.badge.ok title=(format!("by {} at {}", ack.actor, when(tz, ack.at, "%Y-%m-%d %H:%M %Z"))) { "acknowledged" }
                                    } @else if viewer.is_admin() && viewer.session.is_some() {
                                        form method="post" action=(format!("/alerts/{}/ack", a.id)) {
                                            input type="hidden" name="csrf" value=(viewer.csrf());
                                            input type="hidden" name="back" value=(back);
                                            button type="submit" class="ack" { "Acknowledge" }
                                        }
                                    } @else {
                                        "open"
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The page of an alert's scope.
fn alert_scope_url(a: &AlertOut) -> Option<String> {
    match (a.scope, a.tenant_id.as_deref()) {
        ("tenant", _) => Some(tenant_url(&a.scope_id)),
        ("company", Some(t)) => Some(company_url(t, &a.scope_id)),
        ("user", Some(t)) => Some(user_url(t, &a.scope_id)),
        _ => None,
    }
}

/// How many usage records a page lists at once.
pub const RECORDS_PER_PAGE: usize = 25;

/// Usage records, newest first, with links to each and a pager (`base`: the page's URL
/// with its query, without `page`).
pub fn records_table(
    records: &[UsageRecord],
    tz: &jiff::tz::TimeZone,
    show_tenant: bool,
    page: usize,
    base: &str,
) -> Markup {
    let sep = if base.contains('?') { '&' } else { '?' };
    html! {
        section #records-section {
            h2 { "Usage records, newest first" @if page > 0 { " · page " (page + 1) } }
            @if records.is_empty() {
                p.empty #records { "No usage records in this range." }
            } @else {
                div.scroll {
                    table #records {
                        thead { tr {
                            th { "Time" }
                            @if show_tenant { th { "Tenant" } }
                            th { "User" } th { "Model" } th { "Endpoint" } th { "Status" }
                            th.n { "Input" } th.n { "Output" } th.n { "Cost" } th { "Priced by" }
                        } }
                        tbody {
                            @for r in records {
                                tr data-id=(r.id.to_string()) {
                                    td { a.record href=(format!("/records/{}", r.id)) { (when(tz, r.created_at, "%Y-%m-%d %H:%M:%S")) } }
                                    @if show_tenant { td { a href=(tenant_url(r.tenant.as_str())) { (r.tenant.as_str()) } } }
                                    td.label { a href=(user_url(r.tenant.as_str(), r.user.as_str())) { (r.user.as_str()) } }
                                    td.label { a href=(model_url(r.model.as_str())) { (r.model.as_str()) } }
                                    td.label { (r.endpoint.as_ref().map_or("", |e| e.as_str())) }
                                    td { (r.status.as_str()) }
                                    td.n { (thousands(r.tokens.input)) }
                                    td.n { (thousands(r.tokens.output)) }
                                    td.n data-cost=(r.cost.to_string()) title=(usd_text(r.cost)) { (usd_text(r.cost)) }
                                    td { (r.pricing.as_str()) }
                                }
                            }
                        }
                    }
                }
            }
            div.pager {
                @if page > 0 { a #newer href=(format!("{base}{sep}page={}", page - 1)) { "← Newer" } }
                @if records.len() == RECORDS_PER_PAGE { a #older href=(format!("{base}{sep}page={}", page + 1)) { "Older →" } }
            }
        }
    }
}

/// The most alerts a page lists; the rest are on `/alerts`, paged.
pub const ALERTS_ON_PAGE: usize = 20;
