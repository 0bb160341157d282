//! `/export.csv`: what a page shows, as CSV in the report API's format
//! (`GET /v1/reports/usage?format=csv`): the same range and filters, grouped by day,
//! model, endpoint, tenant, company or user. Without a model, endpoint, company or user
//! filter it is the report API's own answer; with one, the same columns from the sums the
//! page read. A tenant key exports its own tenant only.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use spendguard_core::{CompanyId, UserId};
use spendguard_store::{GroupBy, Report, ReportRow};

use super::data::{self, Filter};
use super::{PageError, View, ViewParams, require_viewer};
use crate::AppState;

/// `GET /export.csv`.
pub async fn csv(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let viewer = match require_viewer(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let result: Result<Response, PageError> = async {
        let Query(p) = params.map_err(|e| PageError::bad(e.body_text()))?;
        let now = state.guard.now();
        let cal = &state.guard.ledger().policy().calendar;
        let mut view = View::parse(&p, cal, now)?;
        if let Some(own) = viewer.own_tenant() {
            if view.tenant.as_ref().is_some_and(|t| t != own) {
                return Err(PageError::forbidden());
            }
            view.tenant = Some(own.clone());
        }
        let g = match p.group_by.as_deref().filter(|s| !s.is_empty()) {
            None => GroupBy::Day,
            Some(s) => GroupBy::parse(s).ok_or_else(|| {
                PageError::bad("group_by is one of day, tenant, company, user, model, endpoint")
            })?,
        };
        let text = |v: &Option<String>| -> Option<String> {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let company = text(&p.company)
            .map(|c| CompanyId::parse(&c).map_err(|e| PageError::bad(format!("company: {e}"))))
            .transpose()?;
        let user = text(&p.user)
            .map(|u| UserId::parse(&u).map_err(|e| PageError::bad(format!("user: {e}"))))
            .transpose()?;
        if (company.is_some() || user.is_some()) && view.tenant.is_none() {
            return Err(PageError::bad(
                "companies and users belong to a tenant: add tenant=",
            ));
        }
        let filter = Filter {
            tenant: view.tenant.clone(),
            company,
            user,
            model: view.model.clone(),
            endpoint: view.endpoint.clone(),
        };
        let plain = filter.company.is_none()
            && filter.user.is_none()
            && filter.model.is_none()
            && filter.endpoint.is_none();
        let report = if plain {
            // Exactly the report API's query.
            let spec = crate::reports::ReportSpec::new(
                cal,
                now,
                Some(&view.from.to_string()),
                Some(&view.to.to_string()),
                Some(g.as_str()),
                filter.tenant.clone(),
                None,
            )
            .map_err(PageError::bad)?;
            state
                .guard
                .store()
                .report(&spec.query)
                .await
                .map_err(PageError::store)?
        } else {
            let b = data::breakdown(&state, view.from, view.to, &filter, None)
                .await
                .map_err(PageError::store)?;
            let pick = match g {
                GroupBy::Day => Some(Report {
                    rows: b
                        .days
                        .iter()
                        .filter(|(_, t)| t.requests > 0)
                        .map(|(d, t)| ReportRow {
                            day: Some(cal.date_start(*d)),
                            tenant: None,
                            key: None,
                            totals: *t,
                        })
                        .collect(),
                    totals: b.totals,
                    groups: b.days.iter().filter(|(_, t)| t.requests > 0).count(),
                }),
                GroupBy::Model => b.models,
                GroupBy::Endpoint => b.endpoints,
                GroupBy::Tenant => b.tenants,
                GroupBy::Company => b.companies,
                GroupBy::User => b.users,
            };
            pick.ok_or_else(|| {
                PageError::bad(format!(
                    "grouping by {} is not available with this filter",
                    g.as_str()
                ))
            })?
        };
        let body = crate::reports::report_csv(cal, g, &report);
        let mut resp = (StatusCode::OK, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"spendguard-usage.csv\""),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
