//! `/alerts`: every current alert (the list `GET /v1/alerts` gives), newest and most
//! severe first, paged; and `POST /alerts/{id}/ack`, an admin's acknowledgement (audit
//! logged).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::parts::{self, ALERTS_ON_PAGE};
use super::{PageError, ViewParams, html_page, layout, require_viewer};
use crate::AppState;

/// `GET /alerts`.
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
        let Query(p) = params.map_err(|e| PageError::bad(e.body_text()))?;
        let page = match p.page.as_deref().filter(|s| !s.is_empty()) {
            None => 0,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| PageError::bad("page is a number from 0 to 100000"))?,
        };
        let all = super::data::alerts(&state, viewer.own_tenant().cloned())
            .await
            .map_err(PageError::store)?;
        let start = page.saturating_mul(ALERTS_ON_PAGE).min(all.len());
        let shown = &all[start..(start + ALERTS_ON_PAGE).min(all.len())];
        let ids: Vec<i64> = shown.iter().map(|a| a.id).collect();
        let acks: HashMap<i64, _> = state
            .guard
            .store()
            .alert_acks(&ids)
            .await
            .map_err(PageError::store)?
            .into_iter()
            .map(|a| (a.alert_id, a))
            .collect();
        let cal = &state.guard.ledger().policy().calendar;
        let back = format!("/alerts?page={page}");
        let body = html! {
            h1.page { "Alerts" }
            section {
                h2 { span #alert-count { (all.len()) } " in the current day and month, newest and most severe first" }
                (parts::alerts_table(shown, cal.time_zone(), &acks, &viewer, &back))
                div.pager {
                    @if page > 0 { a #newer href=(format!("/alerts?page={}", page - 1)) { "← Newer" } }
                    @if start + ALERTS_ON_PAGE < all.len() { a #older href=(format!("/alerts?page={}", page + 1)) { "Older →" } }
                }
            }
        };
        Ok::<_, PageError>(html_page(
            StatusCode::OK,
            layout("alerts", &viewer, cal.time_zone_name(), false, body),
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
pub struct AckForm {
    csrf: String,
    #[serde(default)]
    back: Option<String>,
}

/// `POST /alerts/{id}/ack`.
pub async fn acknowledge(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<AckForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result: Result<Response, PageError> = async {
        let viewer = super::manage::admin_form(&state, &headers).await?;
        let Form(form) = form.map_err(|_| PageError::bad("send the form's fields"))?;
        super::manage::check_csrf(&viewer, &form.csrf)?;
        let id: i64 = id
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| PageError::bad("an alert id is a positive number"))?;
        let store = state.guard.store();
        let before = store.alert_acks(&[id]).await.map_err(PageError::store)?;
        let now = state.guard.now();
        let actor = viewer.actor();
        if !store
            .acknowledge_alert(id, &actor, now)
            .await
            .map_err(PageError::store)?
        {
            return Err(PageError::not_found("alert"));
        }
        if before.is_empty() {
            super::audit::record(
                &state,
                &actor,
                "alert.acknowledge",
                &format!("alert {id}"),
                None,
                Some(serde_json::json!({ "acknowledged": true })),
            )
            .await?;
        }
        Ok(
            Redirect::to(&super::manage::safe_back(form.back.as_deref(), "/alerts"))
                .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
