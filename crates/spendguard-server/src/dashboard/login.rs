//! `/login` and `/logout`: the admin key or a tenant key opens a session.

use std::net::IpAddr;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};

use super::{
    COOKIE, LOGIN_WINDOW, Peer, cookie_token, head, html_page, over_https, session_cookie,
    tenant_url,
};
use crate::AppState;
use crate::auth::Caller;

fn login_html(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                (head("sign in"))
                style { "form.login { max-width:360px; margin:12vh auto; background:var(--card); padding:1.5rem; border:1px solid var(--line); border-radius:8px; display:grid; gap:.7rem; }" }
            }
            body {
                form.login method="post" action="/login" {
                    h1 style="margin:0;font-size:1.2rem" { "spendguard" }
                    label for="key" { "API key (admin, or a tenant's)" }
                    input #key name="key" type="password" autocomplete="current-password" required autofocus;
                    @if let Some(e) = error { p.err #login-error { (e) } }
                    button #sign-in type="submit" { "Sign in" }
                }
            }
        }
    }
}

/// `GET /login`.
pub async fn login_page() -> Response {
    html_page(StatusCode::OK, login_html(None))
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    key: String,
}

/// `POST /login`: a key opens a session (the admin key: everything; a tenant key: its own
/// tenant). Failed attempts are throttled per client address
/// ([`LOGIN_FAILURES`](super::LOGIN_FAILURES) per [`LOGIN_WINDOW`]).
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
    let Some(caller) = state.keys.authenticate(key) else {
        state.sessions.failed(ip);
        return html_page(
            StatusCode::UNAUTHORIZED,
            login_html(Some("Unknown or revoked key.")),
        );
    };
    // The audit log names the key by a fingerprint of its hash, never by its characters.
    let hash = crate::auth::hash_key(key);
    let fingerprint = format!("key #{}", &hex::encode(hash)[..8]);
    let token = match super::shared_sessions(&state) {
        None => state.sessions.open(hash, &fingerprint),
        Some(pg) => {
            let token = crate::auth::generate_key();
            let session = spendguard_store::DashboardSession {
                token_hash: crate::auth::hash_key(&token),
                key_hash: hash,
                prefix: fingerprint.clone(),
                csrf: crate::auth::generate_key(),
            };
            let ttl = super::SESSION_TTL.as_secs() as i64;
            let per_key = super::MAX_SESSIONS_PER_KEY as i64;
            if let Err(e) = pg.put_dashboard_session(&session, ttl, per_key).await {
                tracing::warn!(error = %e, "cannot keep a dashboard session");
                return html_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    login_html(Some("The database cannot be reached; try again shortly.")),
                );
            }
            token
        }
    };
    let to = match &caller {
        Caller::Admin => "/".to_owned(),
        Caller::Tenant(t) => tenant_url(t.as_str()),
    };
    let jar = CookieJar::new().add(session_cookie(token, over_https(&headers)));
    (jar, Redirect::to(&to)).into_response()
}

/// `POST /logout`.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(t) = cookie_token(&headers) {
        match super::shared_sessions(&state) {
            None => state.sessions.close(&t),
            Some(pg) => {
                if let Err(e) = pg
                    .delete_dashboard_session(&crate::auth::hash_key(&t))
                    .await
                {
                    tracing::warn!(error = %e, "cannot end a dashboard session");
                }
            }
        }
    }
    // An expired cookie of the same name and path replaces the session's.
    let gone = Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO)
        .build();
    (CookieJar::new().add(gone), Redirect::to("/login")).into_response()
}
