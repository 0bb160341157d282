//! `/manage` (admin): create and revoke tenant API keys (a new key is shown once), set a
//! tenant's, company's or user's budget (or the global one), set a user's tier. Every form
//! carries the session's CSRF token and needs an admin session (a bearer key cannot post
//! them); every change goes to the audit log with its state before and after.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;
use serde_json::json;
use spendguard_core::{
    BudgetOverride, CompanyId, Money, ScopeKey, TenantId, TierName, UserId, UserOverrides,
};
use spendguard_guard::GuardError;

use super::parts::scope_label;
use super::{PageError, Viewer, html_page, layout, usd_text, viewer, when};
use crate::AppState;

/// The admin behind a form post: a live admin session (a bearer key cannot post forms;
/// CSRF needs the session's token).
pub async fn admin_form(state: &AppState, headers: &HeaderMap) -> Result<Viewer, PageError> {
    let v = viewer(state, headers).await.ok_or_else(|| {
        PageError::new(
            StatusCode::UNAUTHORIZED,
            "Sign in first (the session ended).",
        )
    })?;
    if !v.is_admin() {
        return Err(PageError::forbidden());
    }
    if v.session.is_none() {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Forms need a dashboard session; scripts use the admin API.",
        ));
    }
    Ok(v)
}

/// Refuses a form whose CSRF token is not the session's (compared in constant time).
pub fn check_csrf(viewer: &Viewer, token: &str) -> Result<(), PageError> {
    let want = viewer.csrf().as_bytes();
    let got = token.as_bytes();
    let same = !want.is_empty()
        && want.len() == got.len()
        && want.iter().zip(got).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(PageError::new(
            StatusCode::FORBIDDEN,
            "This form is stale or was not sent from the dashboard; reload the page and try again.",
        ))
    }
}

/// Where to go after a form: a path on this site, else `default`.
pub fn safe_back(back: Option<&str>, default: &str) -> String {
    match back {
        Some(b)
            if b.starts_with('/')
                && !b.starts_with("//")
                && !b.contains('\\')
                && !b.chars().any(char::is_control) =>
        {
            b.to_owned()
        }
        _ => default.to_owned(),
    }
}

fn guard_error(e: GuardError) -> PageError {
    match e {
        GuardError::Store(e) => PageError::store(e),
        GuardError::Unavailable | GuardError::ShuttingDown => {
            PageError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        e => PageError::bad(e.to_string()),
    }
}

fn form_error(_: axum::extract::rejection::FormRejection) -> PageError {
    PageError::bad("Send the form's fields.")
}

fn money_json(m: Option<Money>) -> serde_json::Value {
    m.map_or(serde_json::Value::Null, |m| json!(m.to_string()))
}

fn budget_json(b: BudgetOverride) -> serde_json::Value {
    json!({ "daily_usd": money_json(b.daily), "monthly_usd": money_json(b.monthly) })
}

/// `GET /manage`.
pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let viewer = match super::require_viewer(&state, &headers).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if !viewer.is_admin() {
        return PageError::forbidden().into_response();
    }
    let keys = match state.guard.store().list_api_keys().await {
        Ok(k) => k,
        Err(e) => return PageError::store(e).into_response(),
    };
    let ledger = state.guard.ledger();
    let policy = ledger.policy();
    let cal = &policy.calendar;
    let tz = cal.time_zone();
    let budgets = ledger.budget_overrides();
    let users = ledger.all_user_overrides();
    let csrf = viewer.csrf().to_owned();
    let can_post = viewer.session.is_some();
    let body = html! {
        h1.page { "Manage" }
        @if !can_post { section { p.err { "Signed in with a bearer key: the forms need a dashboard session." } } }
        section.half {
            h2 { "Set a budget" }
            form.stack #budget-form method="post" action="/manage/budget" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Scope" select #budget-scope name="scope" {
                    option value="tenant" { "tenant" } option value="company" { "company" }
                    option value="user" { "user" } option value="global" { "global" }
                } }
                label { "Tenant (for a tenant, company or user)" input #budget-tenant type="text" name="tenant_id"; }
                label { "Company or user id" input #budget-id type="text" name="id"; }
                label { "USD per day (empty: no override)" input #budget-daily type="text" name="daily_usd" inputmode="decimal"; }
                label { "USD per month (empty: no override)" input #budget-monthly type="text" name="monthly_usd" inputmode="decimal"; }
                button #budget-save type="submit" { "Save budget" }
            }
        }
        section.half {
            h2 { "Set a user's tier" }
            form.stack #tier-form method="post" action="/manage/user" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Tenant" input #tier-tenant type="text" name="tenant_id" required; }
                label { "User" input #tier-user type="text" name="user_id" required; }
                label { "Tier" select #tier-tier name="tier" {
                    option value="" { "(the default)" }
                    @for name in policy.tiers.keys() { option value=(name.as_str()) { (name.as_str()) } }
                } }
                button #tier-save type="submit" { "Save tier" }
            }
            h2 style="margin-top:1rem" { "Create a tenant API key" }
            form.stack #key-form method="post" action="/manage/keys" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Tenant" input #key-tenant type="text" name="tenant_id" required; }
                button #key-create type="submit" { "Create key" }
            }
        }
        section {
            h2 { "Budget overrides" }
            @if budgets.is_empty() { p.empty #overrides { "None: the configuration's budgets apply." } }
            @else {
                div.scroll { table #overrides {
                    thead { tr { th { "Scope" } th.n { "Per day" } th.n { "Per month" } } }
                    tbody { @for (k, b) in &budgets {
                        @let (label, url) = scope_label(k);
                        tr {
                            td { @match url { Some(u) => { a href=(u) { (label) } } None => { (label) } } }
                            td.n { (b.daily.map_or("–".to_owned(), usd_text)) }
                            td.n { (b.monthly.map_or("–".to_owned(), usd_text)) }
                        }
                    } }
                } }
            }
        }
        section {
            h2 { "Users with a stored tier or overrides" }
            @if users.is_empty() { p.empty #users { "None." } }
            @else {
                div.scroll { table #users {
                    thead { tr { th { "User" } th { "Tier" } } }
                    tbody { @for (t, u, o) in &users {
                        tr {
                            td { a href=(super::user_url(t.as_str(), u.as_str())) { (u.as_str()) " (" (t.as_str()) ")" } }
                            td { (o.tier.as_ref().map_or("–", |t| t.as_str())) }
                        }
                    } }
                } }
            }
        }
        section {
            h2 { "API keys" }
            @if keys.is_empty() { p.empty { "No stored keys yet (the admin key from the environment is not listed)." } }
            div.scroll { table #keys {
                thead { tr { th { "Key" } th { "Tenant" } th { "Created" } th { "State" } } }
                tbody { @for k in &keys {
                    tr data-key-id=(k.id) {
                        td { code { (k.prefix) "…" } }
                        td { (k.tenant.as_ref().map_or("(admin)", |t| t.as_str())) }
                        td { (when(tz, k.created_at, "%Y-%m-%d %H:%M %Z")) }
                        td {
                            @if let Some(r) = k.revoked_at { "revoked " (when(tz, r, "%Y-%m-%d %H:%M %Z")) }
                            @else if k.tenant.is_some() && can_post {
                                form method="post" action=(format!("/manage/keys/{}/revoke", k.id)) {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button.revoke type="submit" { "Revoke" }
                                }
                            } @else { "active" }
                        }
                    }
                } }
            } }
        }
    };
    html_page(
        StatusCode::OK,
        layout("manage", &viewer, cal.time_zone_name(), false, body),
    )
}

#[derive(Debug, Deserialize)]
pub struct BudgetForm {
    csrf: String,
    scope: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    daily_usd: String,
    #[serde(default)]
    monthly_usd: String,
}

fn usd_field(name: &str, v: &str) -> Result<Option<Money>, PageError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.starts_with('-') {
        return Err(PageError::bad(format!("{name} cannot be negative")));
    }
    Money::parse_usd(v)
        .map(Some)
        .map_err(|e| PageError::bad(format!("{name}: {e}")))
}

fn budget_scope(f: &BudgetForm) -> Result<ScopeKey, PageError> {
    let tenant =
        || TenantId::parse(f.tenant_id.trim()).map_err(|e| PageError::bad(format!("tenant: {e}")));
    Ok(match f.scope.as_str() {
        "global" => ScopeKey::Global,
        "tenant" => ScopeKey::Tenant(tenant()?),
        "company" => ScopeKey::Company(
            tenant()?,
            CompanyId::parse(f.id.trim()).map_err(|e| PageError::bad(format!("company: {e}")))?,
        ),
        "user" => ScopeKey::User(
            tenant()?,
            UserId::parse(f.id.trim()).map_err(|e| PageError::bad(format!("user: {e}")))?,
        ),
        _ => {
            return Err(PageError::bad(
                "scope is one of global, tenant, company, user",
            ));
        }
    })
}

/// `POST /manage/budget`: sets (or, with empty fields, clears) a scope's daily and monthly
/// budget override, as `PUT /v1/admin/budgets/{scope}/{id}` does.
pub async fn set_budget(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<BudgetForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result: Result<Response, PageError> = async {
        let viewer = admin_form(&state, &headers).await?;
        let Form(f) = form.map_err(form_error)?;
        check_csrf(&viewer, &f.csrf)?;
        let key = budget_scope(&f)?;
        let new = BudgetOverride {
            daily: usd_field("USD per day", &f.daily_usd)?,
            monthly: usd_field("USD per month", &f.monthly_usd)?,
        };
        let mut before = BudgetOverride::default();
        state
            .guard
            .update_budget(key.clone(), |current| {
                before = current;
                new
            })
            .await
            .map_err(guard_error)?;
        let (label, url) = scope_label(&key);
        super::audit::record(
            &state,
            &viewer.actor(),
            "budget.set",
            &label,
            Some(budget_json(before)),
            Some(budget_json(new)),
        )
        .await?;
        Ok(Redirect::to(&url.unwrap_or_else(|| "/manage".into())).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
pub struct UserForm {
    csrf: String,
    tenant_id: String,
    user_id: String,
    #[serde(default)]
    tier: String,
}

/// `POST /manage/user`: sets a user's tier (empty: the default), keeping its other
/// overrides.
pub async fn set_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<UserForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result: Result<Response, PageError> = async {
        let viewer = admin_form(&state, &headers).await?;
        let Form(f) = form.map_err(form_error)?;
        check_csrf(&viewer, &f.csrf)?;
        let t = TenantId::parse(f.tenant_id.trim())
            .map_err(|e| PageError::bad(format!("tenant: {e}")))?;
        let u =
            UserId::parse(f.user_id.trim()).map_err(|e| PageError::bad(format!("user: {e}")))?;
        let tier = match f.tier.trim() {
            "" => None,
            s => Some(TierName::parse(s).map_err(|e| PageError::bad(format!("tier: {e}")))?),
        };
        if let Some(name) = &tier
            && state.guard.ledger().policy().tier(name).is_none()
        {
            return Err(PageError::bad(format!(
                "there is no tier `{}`",
                name.as_str()
            )));
        }
        let before = state.guard.ledger().user_overrides(&t, &u);
        let after = UserOverrides {
            tier,
            ..before.clone().unwrap_or_default()
        };
        state
            .guard
            .set_user(t.clone(), u.clone(), after.clone())
            .await
            .map_err(guard_error)?;
        super::audit::record(
            &state,
            &viewer.actor(),
            "user.set",
            &format!("user {} ({})", u.as_str(), t.as_str()),
            before.map(|b| serde_json::to_value(b).unwrap_or_default()),
            Some(serde_json::to_value(&after).unwrap_or_default()),
        )
        .await?;
        Ok(Redirect::to(&super::user_url(t.as_str(), u.as_str())).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
pub struct KeyForm {
    csrf: String,
    tenant_id: String,
}

/// `POST /manage/keys`: creates a tenant key and shows it, once.
pub async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<KeyForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result: Result<Response, PageError> = async {
        let viewer = admin_form(&state, &headers).await?;
        let Form(f) = form.map_err(form_error)?;
        check_csrf(&viewer, &f.csrf)?;
        let t = TenantId::parse(f.tenant_id.trim())
            .map_err(|e| PageError::bad(format!("tenant: {e}")))?;
        let (key, record) = crate::auth::create_key(
            state.guard.store(),
            &state.keys,
            Some(t.clone()),
            state.guard.now(),
        )
        .await
        .map_err(PageError::store)?;
        super::audit::record(
            &state,
            &viewer.actor(),
            "key.create",
            &format!("key {}", record.id),
            None,
            Some(json!({ "id": record.id, "tenant_id": t.as_str(), "prefix": record.prefix })),
        )
        .await?;
        let cal = &state.guard.ledger().policy().calendar;
        let body = html! {
            h1.page { "New key for tenant " (t.as_str()) }
            section {
                p { "Copy it now: it is shown this once, and only its hash is kept." }
                p.secret #new-key { (key) }
                p { a href="/manage" { "Back to Manage" } }
            }
        };
        Ok(html_page(
            StatusCode::CREATED,
            layout("new key", &viewer, cal.time_zone_name(), false, body),
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

/// `POST /manage/keys/{id}/revoke`.
pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let result: Result<Response, PageError> = async {
        let viewer = admin_form(&state, &headers).await?;
        let Form(f) = form.map_err(form_error)?;
        check_csrf(&viewer, &f.csrf)?;
        let store = state.guard.store();
        let keys = store.list_api_keys().await.map_err(PageError::store)?;
        let Some(k) = keys
            .into_iter()
            .find(|k| k.id == id && k.revoked_at.is_none() && k.tenant.is_some())
        else {
            return Err(PageError::not_found("active tenant key"));
        };
        let now = state.guard.now();
        store
            .revoke_api_key(&k.id, now)
            .await
            .map_err(PageError::store)?;
        if let Ok(bytes) = hex::decode(&k.hash)
            && let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            state.keys.remove(&hash);
        }
        let tenant = k.tenant.as_ref().map(|t| t.as_str().to_owned());
        super::audit::record(
            &state,
            &viewer.actor(),
            "key.revoke",
            &format!("key {}", k.id),
            Some(json!({ "id": k.id, "tenant_id": tenant, "prefix": k.prefix, "revoked": false })),
            Some(json!({ "id": k.id, "tenant_id": tenant, "prefix": k.prefix, "revoked": true })),
        )
        .await?;
        Ok(Redirect::to("/manage").into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_gone_back_to() {
        assert_eq!(
            safe_back(Some("/tenants/acme?range=7d"), "/"),
            "/tenants/acme?range=7d"
        );
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "",
            "x",
        ] {
            assert_eq!(safe_back(Some(bad), "/alerts"), "/alerts", "{bad}");
        }
        assert_eq!(safe_back(None, "/alerts"), "/alerts");
    }

    #[test]
    fn budgets_read_empty_as_none_and_refuse_negatives() {
        assert_eq!(usd_field("d", " ").unwrap(), None);
        assert_eq!(
            usd_field("d", "12.5").unwrap(),
            Some(Money::from_micros(12_500_000))
        );
        assert_eq!(
            usd_field("d", "-1").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            usd_field("d", "abc").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
