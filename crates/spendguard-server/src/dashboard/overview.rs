//! `/`: the overview. Headline gauges, budgets and meters, daily spend (bars and stacked by
//! model) over the chosen range, the month's cumulative spend against its budget, spend by
//! model, endpoint, tenant and user, and the current alerts. A tenant key is sent to its
//! tenant's page.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use spendguard_core::{Money, ScopeKey};

use super::data::{self, Filter, MeterFocus};
use super::parts::{self, ALERTS_ON_PAGE};
use super::{
    PageError, PageResult, View, ViewParams, charts, html_page, layout, require_viewer, tenant_url,
    usd_cents, usd_text,
};
use crate::AppState;

/// `GET /`.
pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match render(state, headers, params).await {
        Ok(r) | Err(r) => r,
    }
}

async fn render(
    state: AppState,
    headers: HeaderMap,
    params: Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Response> {
    let viewer = require_viewer(&state, &headers)
        .await
        .map_err(IntoResponse::into_response)?;
    if let Some(t) = viewer.own_tenant() {
        return Err(Redirect::to(&tenant_url(t.as_str())).into_response());
    }
    let Query(p) = params.map_err(|e| PageError::bad(e.body_text()).into_response())?;
    overview(&state, &viewer, &p)
        .await
        .map_err(IntoResponse::into_response)
}

async fn overview(state: &AppState, viewer: &super::Viewer, p: &ViewParams) -> PageResult {
    let now = state.guard.now();
    let ledger = state.guard.ledger();
    let policy = ledger.policy();
    let cal = &policy.calendar;
    let view = View::parse(p, cal, now)?;
    let filter = Filter {
        tenant: view.tenant.clone(),
        model: view.model.clone(),
        endpoint: view.endpoint.clone(),
        ..Default::default()
    };
    let b = data::breakdown(state, view.from, view.to, &filter, Some(data::TOP))
        .await
        .map_err(PageError::store)?;
    let month = data::month_so_far(state, &filter, (view.from, view.to), &b)
        .await
        .map_err(PageError::store)?;
    let alerts = data::alerts(state, view.tenant.clone())
        .await
        .map_err(PageError::store)?;
    // Would-be denials of limits in shadow over the range: shown only when there are some.
    let would_deny = crate::reports::WouldDenyOut::from_counts(
        &state
            .guard
            .store()
            .would_deny_counts(
                cal.date_start(view.from),
                cal.date_start(view.to),
                view.tenant.as_ref(),
            )
            .await
            .map_err(PageError::store)?,
    );
    let ids: Vec<i64> = alerts.iter().take(ALERTS_ON_PAGE).map(|a| a.id).collect();
    let acks: HashMap<i64, _> = state
        .guard
        .store()
        .alert_acks(&ids)
        .await
        .map_err(PageError::store)?
        .into_iter()
        .map(|a| (a.alert_id, a))
        .collect();
    let scope = match &view.tenant {
        Some(t) => ScopeKey::Tenant(t.clone()),
        None => ScopeKey::Global,
    };
    let budget = ledger.budget_of(&scope);
    let ((ds, dr), (ms, mr)) = ledger.scope_totals(&scope, now);
    let periods = cal.periods(now);
    let tenants: Vec<_> = b
        .tenants
        .iter()
        .flat_map(|r| r.rows.iter())
        .filter_map(|r| r.tenant.as_deref())
        .filter_map(|t| spendguard_core::TenantId::parse(t).ok())
        .collect();
    let meters = data::meters(state, &MeterFocus::All(view.tenant.clone()), &tenants);
    let month_spent = month
        .iter()
        .fold(Money::ZERO, |a, (_, c)| a.saturating_add(*c));
    let projected = data::projection(month_spent, now, (periods.month.start, periods.month.end));
    let month_len = usize::try_from(i64::from(cal.date_of(now).days_in_month())).unwrap_or(31);
    let days: Vec<_> = b.days.iter().map(|(d, t)| (*d, t.cost)).collect();
    let dates: Vec<_> = b.days.iter().map(|(d, _)| *d).collect();
    let whose = match &view.tenant {
        Some(t) => format!("tenant {}", t.as_str()),
        None => "global".to_owned(),
    };
    let back = format!("/?{}", view.query());
    let body = html! {
        (parts::range_form("/", &view, &["tenant", "model", "endpoint"], ""))
        (parts::gauge("spend-today", &format!("Spend today ({whose})"), ds, dr, budget.daily))
        (parts::gauge("spend-month", &format!("Spend this month ({whose})"), ms, mr, budget.monthly))
        section.third {
            h2 { "Active alerts" }
            div.big #alert-count { (alerts.len()) }
            div.sub {
                (if alerts.len() == 1 { "alert" } else { "alerts" }) " in the current day and month · store "
                @if state.guard.stats().health == spendguard_guard::StoreHealth::Ok { "ok" }
                @else { "unreachable (" (state.guard.stats().spool_depth) " batches spooled)" }
            }
        }
        @if would_deny.total > 0 {
            section.third #would-deny {
                h2 { "Would-be denials (shadow)" }
                div.big #would-deny-count { (would_deny.total) }
                div.sub {
                    "admitted although a limit in shadow would have refused them · "
                    @for (reason, n) in [
                        ("budget", would_deny.budget_exceeded),
                        ("rate", would_deny.rate_limited),
                        ("model", would_deny.model_not_allowed),
                        ("output tokens", would_deny.max_output_tokens_exceeded),
                    ] {
                        @if n > 0 { (reason) " " (n) " " }
                    }
                }
            }
        }
        (parts::meters(&meters))
        section {
            h2 { "Daily spend · " (view.label()) " · " span #range-total title=(usd_text(b.totals.cost)) { (usd_cents(b.totals.cost)) } }
            (charts::daily("daily-chart", &days, budget.daily))
        }
        section {
            h2 { "Daily spend by model" }
            @match &b.day_models {
                Some(dm) => { (charts::stacked(&dates, dm)) }
                None => { p.empty { "Not available with an endpoint filter." } }
            }
        }
        section {
            h2 { "This month, cumulative, against the monthly budget" }
            (charts::cumulative(&month, month_len, budget.monthly, projected))
        }
        (parts::ranked("half", "by-model", "Spend by model", "Model", b.models.as_ref(), &parts::model_label))
        (parts::ranked("half", "by-endpoint", "Spend by endpoint", "Endpoint", b.endpoints.as_ref(), &parts::endpoint_label))
        @if view.tenant.is_none() {
            (parts::ranked("half", "top-tenants", "Top tenants", "Tenant", b.tenants.as_ref(), &parts::tenant_label))
        } @else {
            (parts::ranked("half", "top-companies", "Top companies", "Company (tenant)", b.companies.as_ref(), &parts::company_label))
        }
        (parts::ranked("half", "top-users", "Top users", "User (tenant)", b.users.as_ref(), &parts::user_label))
        section {
            h2 { "Alerts, newest and most severe first" }
            (parts::alerts_table(&alerts[..alerts.len().min(ALERTS_ON_PAGE)], cal.time_zone(), &acks, viewer, &back))
            @if alerts.len() > ALERTS_ON_PAGE {
                p.sub #alerts-more { a href="/alerts" { (alerts.len() - ALERTS_ON_PAGE) " more" } }
            }
        }
    };
    Ok(html_page(
        StatusCode::OK,
        layout("spend", viewer, cal.time_zone_name(), true, body),
    ))
}
