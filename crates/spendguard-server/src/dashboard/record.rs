//! `/records/{id}`: one usage record, every field. A tenant key sees its own tenant's
//! records only; another's is "not found", so record ids cannot be probed.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use spendguard_store::Store;

use super::{
    PageError, company_url, html_page, layout, model_url, require_viewer, tenant_url, thousands,
    usd_cents, usd_text, user_url, when,
};
use crate::AppState;

/// `GET /records/{id}`.
pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = match require_viewer(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return PageError::bad("a record id is a UUID").into_response();
    };
    let r = match state.guard.store().usage(id).await {
        Ok(Some(r)) if viewer.may_see(&r.tenant) => r,
        Ok(_) => return PageError::not_found("usage record").into_response(),
        Err(e) => return PageError::store(e).into_response(),
    };
    let cal = &state.guard.ledger().policy().calendar;
    let tz = cal.time_zone();
    let (t, u) = (r.tenant.as_str(), r.user.as_str());
    let body = html! {
        h1.page { "Usage record " span #subject { (r.id.to_string()) } }
        section {
            dl.fields #record {
                dt { "Time" } dd #record-time { (when(tz, r.created_at, "%Y-%m-%d %H:%M:%S%.6f %Z")) }
                dt { "Tenant" } dd { a href=(tenant_url(t)) { (t) } }
                dt { "User" } dd { a #record-user href=(user_url(t, u)) { (u) } }
                dt { "Company" } dd { @match &r.company { Some(c) => { a href=(company_url(t, c.as_str())) { (c.as_str()) } } None => { "–" } } }
                dt { "Model" } dd { a href=(model_url(r.model.as_str())) { (r.model.as_str()) } }
                dt { "Endpoint" } dd { (r.endpoint.as_ref().map_or("–", |e| e.as_str())) }
                dt { "Tier" } dd { (r.tier.as_str()) }
                dt { "Status" } dd #record-status { (r.status.as_str()) }
                dt { "Input tokens" } dd { (thousands(r.tokens.input)) }
                dt { "Cached input tokens" } dd { (thousands(r.tokens.cached_input)) }
                dt { "Output tokens" } dd { (thousands(r.tokens.output)) }
                dt { "Cost" } dd #record-cost data-cost=(r.cost.to_string()) { (usd_text(r.cost)) " (" (usd_cents(r.cost)) ")" }
                dt { "Priced by" } dd #record-pricing { (r.pricing.as_str()) }
                dt { "Reservation" } dd { (r.reservation_id.map_or("–".to_owned(), |x| x.to_string())) }
                dt { "Idempotency key" } dd { (r.idempotency_key.as_ref().map_or("–", |k| k.as_str())) }
                @if let Some(o) = &r.origin {
                    dt { "Upstream" } dd { (o.upstream) }
                    dt { "Provider request id" } dd { (o.request_id.as_deref().unwrap_or("–")) }
                }
            }
        }
    };
    html_page(
        StatusCode::OK,
        layout("usage record", &viewer, cal.time_zone_name(), false, body),
    )
}
