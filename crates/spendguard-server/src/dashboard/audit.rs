//! The audit log: every change made through the dashboard's forms (and the admin API's
//! writes) is appended with who made it, what it changed, and the state before and after
//! (JSON). `/audit` shows it, newest first, paged (admin only).

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde_json::Value;
use spendguard_store::{AuditEntry, StoreError};

use super::{PageError, ViewParams, html_page, layout, require_viewer, when};
use crate::AppState;

/// Entries per page of `/audit`.
pub const PER_PAGE: usize = 50;

/// Appends a change to the audit log.
pub async fn write(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Result<(), StoreError> {
    state
        .guard
        .store()
        .insert_audit(&AuditEntry {
            id: 0,
            at: state.guard.now(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            before: before.map(|v| v.to_string()),
            after: after.map(|v| v.to_string()),
        })
        .await
        .map(|_| ())
}

/// [`write()`], for a page.
pub async fn record(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Result<(), PageError> {
    write(state, actor, action, target, before, after)
        .await
        .map_err(PageError::store)
}

/// `GET /audit`.
pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<ViewParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let viewer = match require_viewer(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let result: Result<Response, PageError> = async {
        if !viewer.is_admin() {
            return Err(PageError::forbidden());
        }
        let Query(p) = params.map_err(|e| PageError::bad(e.body_text()))?;
        let page = match p.page.as_deref().filter(|s| !s.is_empty()) {
            None => 0,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| PageError::bad("page is a number from 0 to 100000"))?,
        };
        let entries = state
            .guard
            .store()
            .audit_log(PER_PAGE, page * PER_PAGE)
            .await
            .map_err(PageError::store)?;
        let cal = &state.guard.ledger().policy().calendar;
        let tz = cal.time_zone();
        let body = html! {
            h1.page { "Audit log" }
            section {
                h2 { "Changes, newest first" }
                @if entries.is_empty() {
                    p.empty #audit { "No changes yet." }
                } @else {
                    div.scroll {
                        table #audit {
                            thead { tr { th { "When" } th { "Who" } th { "What" } th { "Target" } th { "Before" } th { "After" } } }
                            tbody {
                                @for e in &entries {
                                    tr data-action=(e.action) {
                                        td { (when(tz, e.at, "%Y-%m-%d %H:%M:%S %Z")) }
                                        td { (e.actor) }
                                        td { (e.action) }
                                        td.label title=(e.target) { (e.target) }
                                        td.msg { code { (e.before.as_deref().unwrap_or("–")) } }
                                        td.msg { code { (e.after.as_deref().unwrap_or("–")) } }
                                    }
                                }
                            }
                        }
                    }
                }
                div.pager {
                    @if page > 0 { a #newer href=(format!("/audit?page={}", page - 1)) { "← Newer" } }
                    @if entries.len() == PER_PAGE { a #older href=(format!("/audit?page={}", page + 1)) { "Older →" } }
                }
            }
        };
        Ok(html_page(
            StatusCode::OK,
            layout("audit log", &viewer, cal.time_zone_name(), false, body),
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
