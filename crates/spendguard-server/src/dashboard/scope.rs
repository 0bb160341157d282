//! The drill-down pages: `/tenants/{t}`, `/tenants/{t}/companies/{c}`,
//! `/tenants/{t}/users/{u}` and `/models/{m}`. Each shows its budgets and meters, its daily
//! spend over the chosen range (bars and stacked by model), its month against its budget,
//! its breakdowns, its alerts and its usage records (newest first, paged).
//!
//! A tenant key sees its own tenant's pages only (another's answer 403), and a model's page
//! shows its own tenant's use of the model only.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use spendguard_core::{CompanyId, Money, ScopeKey, TenantId, UserId};
use spendguard_store::RecordQuery;

use super::data::{self, Filter, MeterFocus};
use super::parts::{self, ALERTS_ON_PAGE, RECORDS_PER_PAGE};
use super::{
    PageError, View, ViewParams, Viewer, charts, company_url, html_page, layout, model_url,
    require_viewer, tenant_url, usd_cents, usd_text, user_url,
};
use crate::AppState;

/// Which drill-down.
#[derive(Clone, Debug)]
enum Subject {
    Tenant(TenantId),
    Company(TenantId, CompanyId),
    User(TenantId, UserId),
    Model(String),
}

type Params = Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>;

fn tenant_id(s: &str) -> Result<TenantId, PageError> {
    TenantId::parse(s).map_err(|e| PageError::bad(format!("tenant: {e}")))
}

/// `GET /tenants/{tenant}`.
pub async fn tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(t): Path<String>,
    params: Params,
) -> Response {
    let subject = tenant_id(&t).map(Subject::Tenant);
    show(state, headers, subject, params).await
}

/// `GET /tenants/{tenant}/companies/{company}`.
pub async fn company(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((t, c)): Path<(String, String)>,
    params: Params,
) -> Response {
    let subject = tenant_id(&t).and_then(|t| {
        CompanyId::parse(&c)
            .map(|c| Subject::Company(t, c))
            .map_err(|e| PageError::bad(format!("company: {e}")))
    });
    show(state, headers, subject, params).await
}

/// `GET /tenants/{tenant}/users/{user}`.
pub async fn user(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((t, u)): Path<(String, String)>,
    params: Params,
) -> Response {
    let subject = tenant_id(&t).and_then(|t| {
        UserId::parse(&u)
            .map(|u| Subject::User(t, u))
            .map_err(|e| PageError::bad(format!("user: {e}")))
    });
    show(state, headers, subject, params).await
}

/// `GET /models/{model}`.
pub async fn model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(m): Path<String>,
    params: Params,
) -> Response {
    let subject = spendguard_core::ModelName::parse(&m)
        .map(|m| Subject::Model(m.as_str().to_owned()))
        .map_err(|e| PageError::bad(format!("model: {e}")));
    show(state, headers, subject, params).await
}

async fn show(
    state: AppState,
    headers: HeaderMap,
    subject: Result<Subject, PageError>,
    params: Params,
) -> Response {
    let viewer = match require_viewer(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let result: Result<Response, PageError> = async {
        let subject = subject?;
        let Query(p) = params.map_err(|e| PageError::bad(e.body_text()))?;
        page(&state, &viewer, subject, &p).await
    }
    .await;
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn page(
    state: &AppState,
    viewer: &Viewer,
    subject: Subject,
    p: &ViewParams,
) -> Result<Response, PageError> {
    let now = state.guard.now();
    let ledger = state.guard.ledger();
    let cal = &ledger.policy().calendar;
    let mut view = View::parse(p, cal, now)?;
    // The path names the scope; the query may narrow it by model and endpoint (and a
    // model's page by tenant, for the admin).
    let (scope, mut filter, path, title, fields): (
        Option<ScopeKey>,
        Filter,
        String,
        Markup,
        &[&str],
    ) = match &subject {
        Subject::Tenant(t) => {
            if !viewer.may_see(t) {
                return Err(PageError::forbidden());
            }
            view.tenant = Some(t.clone());
            (
                Some(ScopeKey::Tenant(t.clone())),
                Filter {
                    tenant: Some(t.clone()),
                    ..Default::default()
                },
                tenant_url(t.as_str()),
                html! { "Tenant " span #subject { (t.as_str()) } },
                &["model", "endpoint"],
            )
        }
        Subject::Company(t, c) => {
            if !viewer.may_see(t) {
                return Err(PageError::forbidden());
            }
            view.tenant = Some(t.clone());
            (
                Some(ScopeKey::Company(t.clone(), c.clone())),
                Filter {
                    tenant: Some(t.clone()),
                    company: Some(c.clone()),
                    ..Default::default()
                },
                company_url(t.as_str(), c.as_str()),
                html! { "Company " span #subject { (c.as_str()) } " · tenant " a href=(tenant_url(t.as_str())) { (t.as_str()) } },
                &["model", "endpoint"],
            )
        }
        Subject::User(t, u) => {
            if !viewer.may_see(t) {
                return Err(PageError::forbidden());
            }
            view.tenant = Some(t.clone());
            (
                Some(ScopeKey::User(t.clone(), u.clone())),
                Filter {
                    tenant: Some(t.clone()),
                    user: Some(u.clone()),
                    ..Default::default()
                },
                user_url(t.as_str(), u.as_str()),
                html! { "User " span #subject { (u.as_str()) } " · tenant " a #crumb-tenant href=(tenant_url(t.as_str())) { (t.as_str()) } },
                &["model", "endpoint"],
            )
        }
        Subject::Model(m) => {
            if let Some(own) = viewer.own_tenant() {
                if view.tenant.as_ref().is_some_and(|t| t != own) {
                    return Err(PageError::forbidden());
                }
                view.tenant = Some(own.clone());
            }
            view.model = Some(m.clone());
            (
                None,
                Filter {
                    tenant: view.tenant.clone(),
                    ..Default::default()
                },
                model_url(m),
                html! { "Model " span #subject { (m) } },
                if viewer.is_admin() {
                    &["tenant", "endpoint"]
                } else {
                    &["endpoint"]
                },
            )
        }
    };
    filter.model = view.model.clone();
    filter.endpoint = view.endpoint.clone();
    let store = state.guard.store();
    let b = data::breakdown(state, view.from, view.to, &filter, Some(data::TOP))
        .await
        .map_err(PageError::store)?;
    let month = data::month_so_far(state, &filter, (view.from, view.to), &b)
        .await
        .map_err(PageError::store)?;
    let records = store
        .usage_records(
            &RecordQuery {
                from_day: cal.date_start(view.from),
                to_day: cal.date_start(view.to),
                tenant: filter.tenant.clone(),
                company: filter.company.clone(),
                user: filter.user.clone(),
                model: filter.model.clone(),
                endpoint: filter.endpoint.clone(),
            },
            RECORDS_PER_PAGE,
            view.page.saturating_mul(RECORDS_PER_PAGE),
        )
        .await
        .map_err(PageError::store)?;
    // Alerts: the tenant's (all of its scopes) or the scope's own.
    let alerts = match &scope {
        Some(key) => {
            let all = data::alerts(state, key.tenant().cloned())
                .await
                .map_err(PageError::store)?;
            match key {
                ScopeKey::Tenant(_) => all,
                _ => all.into_iter().filter(|a| data::alert_of(a, key)).collect(),
            }
        }
        None => Vec::new(),
    };
    let ids: Vec<i64> = alerts.iter().take(ALERTS_ON_PAGE).map(|a| a.id).collect();
    let acks: HashMap<i64, _> = store
        .alert_acks(&ids)
        .await
        .map_err(PageError::store)?
        .into_iter()
        .map(|a| (a.alert_id, a))
        .collect();
    let meters = match &scope {
        Some(ScopeKey::Tenant(t)) => data::meters(state, &MeterFocus::All(Some(t.clone())), &[]),
        Some(key) => data::meters(state, &MeterFocus::Scope(key.clone()), &[]),
        None => Vec::new(),
    };
    let budget = scope
        .as_ref()
        .map(|k| ledger.budget_of(k))
        .unwrap_or_default();
    // A user's monthly cost limit may come from its tier: the meters hold it.
    let monthly = budget.monthly.or_else(|| {
        meters
            .iter()
            .find(|m| {
                Some(&m.scope) == scope.as_ref() && m.window == spendguard_core::Window::Month
            })
            .map(|m| m.limit)
    });
    let daily = budget.daily.or_else(|| {
        meters
            .iter()
            .find(|m| Some(&m.scope) == scope.as_ref() && m.window == spendguard_core::Window::Day)
            .map(|m| m.limit)
    });
    let periods = cal.periods(now);
    let month_spent = month
        .iter()
        .fold(Money::ZERO, |a, (_, c)| a.saturating_add(*c));
    let projected = data::projection(month_spent, now, (periods.month.start, periods.month.end));
    let month_len = usize::try_from(i64::from(cal.date_of(now).days_in_month())).unwrap_or(31);
    let days: Vec<_> = b.days.iter().map(|(d, t)| (*d, t.cost)).collect();
    let dates: Vec<_> = b.days.iter().map(|(d, _)| *d).collect();
    let query = view.query();
    let base = format!("{path}?{query}");
    let export = match &subject {
        Subject::Company(_, c) => format!("&company={}", super::enc(c.as_str())),
        Subject::User(_, u) => format!("&user={}", super::enc(u.as_str())),
        _ => String::new(),
    };
    let show_tenant = viewer.is_admin() && filter.tenant.is_none();
    let body = html! {
        h1.page { (title) }
        (parts::range_form(&path, &view, fields, &export))
        @if scope.is_some() { (parts::meters(&meters)) }
        section {
            h2 { "Daily spend · " (view.label()) " · " span #range-total title=(usd_text(b.totals.cost)) { (usd_cents(b.totals.cost)) } }
            (charts::daily("daily-chart", &days, daily))
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
            (charts::cumulative(&month, month_len, monthly, projected))
        }
        @if !matches!(subject, Subject::Model(_)) {
            (parts::ranked("half", "by-model", "Spend by model", "Model", b.models.as_ref(), &parts::model_label))
        }
        (parts::ranked("half", "by-endpoint", "Spend by endpoint", "Endpoint", b.endpoints.as_ref(), &parts::endpoint_label))
        @if matches!(subject, Subject::Tenant(_)) {
            (parts::ranked("half", "top-users", "Top users", "User (tenant)", b.users.as_ref(), &parts::user_label))
            (parts::ranked("half", "top-companies", "Top companies", "Company (tenant)", b.companies.as_ref(), &parts::company_label))
        }
        @if matches!(subject, Subject::Model(_)) && show_tenant {
            (parts::ranked("half", "top-tenants", "Tenants using this model", "Tenant", b.tenants.as_ref(), &parts::tenant_label))
        }
        @if scope.is_some() {
            section {
                h2 { "Alerts, newest and most severe first" }
                (parts::alerts_table(&alerts[..alerts.len().min(ALERTS_ON_PAGE)], cal.time_zone(), &acks, viewer, &base))
                @if alerts.len() > ALERTS_ON_PAGE { p.sub { a href="/alerts" { (alerts.len() - ALERTS_ON_PAGE) " more" } } }
            }
        }
        (parts::records_table(&records, cal.time_zone(), show_tenant, view.page, &base))
    };
    let title_text = match &subject {
        Subject::Tenant(t) => format!("tenant {}", t.as_str()),
        Subject::Company(t, c) => format!("company {} ({})", c.as_str(), t.as_str()),
        Subject::User(t, u) => format!("user {} ({})", u.as_str(), t.as_str()),
        Subject::Model(m) => format!("model {m}"),
    };
    Ok(html_page(
        StatusCode::OK,
        layout(&title_text, viewer, cal.time_zone_name(), false, body),
    ))
}
