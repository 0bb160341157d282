//! spendguard's HTTP API: the v1 contract (DESIGN.md §3) over a [`Guard`].
//!
//! [`app`] builds the router (tests call it directly), [`run`] serves it on a listener until
//! a shutdown signal, then drains the writer. Every route is declared once, in the table
//! below, which builds both the router and the OpenAPI document, so the two cannot drift.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod dashboard;
pub mod error;
pub mod import;
pub mod metrics;
pub mod openapi;
pub mod reports;
pub mod serve;
pub mod starting;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use spendguard_guard::Guard;
use spendguard_store::AnyStore;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

pub use alerts::{AlertSettings, Alerts};
pub use auth::{Caller, KeyRing};
pub use metrics::Metrics;
pub use serve::ConnectionLimits;

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// The longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub guard: Guard<AnyStore>,
    pub keys: Arc<KeyRing>,
    pub metrics: Arc<Metrics>,
    pub alerts: Arc<Alerts>,
    pub sessions: Arc<dashboard::Sessions>,
    pub limits: Arc<ServerLimits>,
    shutting_down: Arc<AtomicBool>,
}

/// The limits of the HTTP service, from the `[http]` and `[reports]` sections.
#[derive(Debug)]
pub struct ServerLimits {
    pub connections: ConnectionLimits,
    /// Rows of a report page when the request gives no `limit`.
    pub report_default_limit: usize,
    /// Turns for report queries: at most this many run at once.
    pub report_slots: tokio::sync::Semaphore,
}

impl ServerLimits {
    pub fn from_config(config: &spendguard_core::Config) -> ServerLimits {
        ServerLimits {
            connections: ConnectionLimits::from_config(&config.http),
            report_default_limit: usize::try_from(config.reports.default_limit)
                .unwrap_or(usize::MAX),
            report_slots: tokio::sync::Semaphore::new(
                usize::try_from(config.reports.max_concurrent).unwrap_or(1),
            ),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits::from_config(&spendguard_core::Config::default())
    }
}

impl AppState {
    /// With the built-in alert settings (thresholds, no webhooks).
    pub fn new(guard: Guard<AnyStore>, keys: KeyRing) -> AppState {
        AppState::with_alerts(guard, keys, AlertSettings::default())
    }

    pub fn with_alerts(guard: Guard<AnyStore>, keys: KeyRing, alerts: AlertSettings) -> AppState {
        let metrics = if guard.cluster().is_some() {
            Metrics::for_cluster()
        } else {
            Metrics::new()
        };
        AppState {
            alerts: Arc::new(Alerts::new(guard.clone(), alerts)),
            guard,
            keys: Arc::new(keys),
            metrics: Arc::new(metrics),
            sessions: Arc::new(dashboard::Sessions::default()),
            limits: Arc::new(ServerLimits::default()),
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// With these limits instead of the built-in ones.
    pub fn with_limits(mut self, limits: ServerLimits) -> AppState {
        self.limits = Arc::new(limits);
        self
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// One documented route.
#[derive(Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    /// Whether it needs `Authorization: Bearer <key>`.
    pub auth: bool,
    pub summary: &'static str,
    /// The schema of its query string, if it takes one.
    pub query: Option<SchemaFn>,
    /// The schema of its request body, if it takes one.
    pub body: Option<SchemaFn>,
    /// What it answers when it succeeds.
    pub answer: Answer,
}

/// Builds a schema (a `$ref` for named types) with the document's generators.
pub type SchemaFn = fn(&mut openapi::Generators) -> schemars::Schema;

/// A route's successful answer.
#[derive(Debug)]
pub enum Answer {
    /// JSON of this status and schema.
    Json(u16, SchemaFn),
    /// `/readyz`: the same JSON as 200 or 503.
    Ready,
    /// Plain text (Prometheus).
    Text,
    /// An HTML page.
    Html,
    /// The dashboard: HTML, or a redirect to the sign-in page.
    Dashboard,
    /// A form post answered with a redirect (HTML on errors).
    Redirect,
    /// CSV (the dashboard's export), or a redirect to the sign-in page.
    Csv,
}

macro_rules! api {
    ($( $m:ident $path:literal => $h:path { auth: $auth:literal, query: $query:tt, body: $body:tt, answer: $answer:tt, summary: $s:literal } )*) => {
        fn routes() -> Router<AppState> {
            let mut r = Router::new();
            $( r = r.route($path, axum::routing::$m($h)); )*
            r
        }

        /// Every route the router serves.
        pub const ROUTES: &[RouteDoc] = &[
            $( RouteDoc {
                method: stringify!($m),
                path: $path,
                auth: $auth,
                summary: $s,
                query: api!(@request $query),
                body: api!(@request $body),
                answer: api!(@answer $answer),
            }, )*
        ];
    };
    (@request none) => { None };
    (@request ($t:ty)) => { Some(openapi::request::<$t> as SchemaFn) };
    (@answer ($code:literal, $t:ty)) => { Answer::Json($code, openapi::answer::<$t> as SchemaFn) };
    (@answer ready) => { Answer::Ready };
    (@answer text) => { Answer::Text };
    (@answer html) => { Answer::Html };
    (@answer dashboard) => { Answer::Dashboard };
    (@answer redirect) => { Answer::Redirect };
    (@answer csv) => { Answer::Csv };
}

api! {
    post "/v1/reservations" => api::reserve { auth: true, query: none, body: (api::ReserveBody), answer: (201, api::ReservedDoc), summary: "Reserve a worst-case estimate before a model call (201; 200 when an idempotency key replays)" }
    post "/v1/reservations/{id}/commit" => api::commit { auth: true, query: none, body: (api::CommitBody), answer: (200, api::CommittedDoc), summary: "Commit the actual usage of a reservation" }
    post "/v1/reservations/{id}/release" => api::release { auth: true, query: none, body: (api::ReleaseBody), answer: (200, api::ReleasedOut), summary: "Release a reservation whose call never happened" }
    post "/v1/usage" => api::record { auth: true, query: none, body: (api::UsageBody), answer: (201, api::UsageDoc), summary: "Record usage of a call that was not reserved (never refused; 200 when an idempotency key replays)" }
    post "/v1/check" => api::check { auth: true, query: none, body: (api::ReserveBody), answer: (200, api::CheckOut), summary: "Would this reservation be admitted? Changes nothing" }
    get "/v1/limits" => api::limits { auth: true, query: (api::LimitsQuery), body: none, answer: (200, api::LimitsAnswer), summary: "A user's effective limits, used, reserved and remaining" }
    get "/v1/users/{user_id}/daily-usage" => reports::daily_usage { auth: true, query: (reports::DailyParams), body: none, answer: (200, reports::DailyOut), summary: "A user's usage on one day (?date=YYYY-MM-DD, default today), by model" }
    get "/v1/reports/usage" => reports::usage_report { auth: true, query: (reports::ReportParams), body: none, answer: (200, reports::ReportOut), summary: "Usage over whole days (?from=&to=, default the last 30), grouped by day, tenant, company, user, model or endpoint (?group_by=); top spenders first; JSON or CSV (?format=)" }
    get "/v1/alerts" => reports::alerts { auth: true, query: (reports::AlertParams), body: none, answer: (200, reports::AlertsOut), summary: "Cost alerts of the current day and month (?all=true: of every window), newest first" }
    get "/v1/prices" => api::prices { auth: true, query: (api::PricesQuery), body: none, answer: (200, api::PricesOut), summary: "The prices the server charges by (USD per million tokens) and where each came from; ?model= for one model's effective price, ?tenant_id= with a tenant's overrides (a tenant key: its own)" }
    get "/v1/admin/cluster" => api::cluster { auth: true, query: none, body: none, answer: (200, api::ClusterOut), summary: "Cluster mode: the instances on this database, their heartbeats, and this instance's counters (admin)" }
    put "/v1/admin/tenants/{tenant_id}/prices" => api::set_tenant_prices { auth: true, query: none, body: (api::TenantPricesBody), answer: (200, api::TenantPricesOut), summary: "Set a tenant's negotiated prices: a multiplier and explicit prices per model; an empty object clears them (admin)" }
    get "/v1/admin/budgets" => api::list_budgets { auth: true, query: none, body: none, answer: (200, api::BudgetsOut), summary: "Every scope with a budget override (admin)" }
    get "/v1/admin/budgets/{scope}/{id}" => api::get_budget { auth: true, query: (api::TenantQuery), body: none, answer: (200, api::BudgetOut), summary: "A scope's budget override and the caps in force (admin)" }
    put "/v1/admin/budgets/{scope}/{id}" => api::set_budget { auth: true, query: (api::TenantQuery), body: (api::BudgetBody), answer: (200, api::BudgetOut), summary: "Set or clear a scope's daily and monthly caps (admin)" }
    get "/v1/admin/users" => api::list_users { auth: true, query: none, body: none, answer: (200, api::UsersOut), summary: "Every user with a stored tier or limit overrides (admin)" }
    get "/v1/admin/users/{user_id}" => api::get_user { auth: true, query: (api::TenantQuery), body: none, answer: (200, api::UserOut), summary: "A user's stored tier and limit overrides (admin)" }
    put "/v1/admin/users/{user_id}" => api::set_user { auth: true, query: (api::TenantQuery), body: (openapi::UserOverridesSchema), answer: (200, api::UserOut), summary: "Set a user's tier and limit overrides; an empty object clears them (admin)" }
    post "/v1/admin/api-keys" => api::create_api_key { auth: true, query: none, body: (api::KeyBody), answer: (201, api::KeyCreatedOut), summary: "Create a tenant API key, shown once (admin)" }
    get "/v1/admin/api-keys" => api::list_api_keys { auth: true, query: none, body: none, answer: (200, api::KeysOut), summary: "List API keys, without the keys (admin)" }
    delete "/v1/admin/api-keys/{id}" => api::revoke_api_key { auth: true, query: none, body: none, answer: (200, api::RevokedOut), summary: "Revoke an API key (admin)" }
    get "/healthz" => api::healthz { auth: false, query: none, body: none, answer: (200, api::HealthOut), summary: "The process is up" }
    get "/readyz" => api::readyz { auth: false, query: none, body: none, answer: ready, summary: "Ready to admit reservations (store state)" }
    get "/metrics" => api::metrics { auth: true, query: none, body: none, answer: text, summary: "Prometheus metrics (the admin key or the metrics key)" }
    get "/openapi.json" => api::openapi { auth: false, query: none, body: none, answer: (200, serde_json::Value), summary: "This API's OpenAPI document" }
    get "/" => dashboard::page { auth: false, query: none, body: none, answer: dashboard, summary: "The dashboard's overview (HTML; a session cookie or a key; ?range=, from=, to=, tenant=, model=, endpoint=). A tenant key is sent to its tenant's page" }
    get "/tenants/{tenant}" => dashboard::scope::tenant { auth: false, query: none, body: none, answer: dashboard, summary: "A tenant's dashboard page (HTML; a tenant key: its own only)" }
    get "/tenants/{tenant}/companies/{company}" => dashboard::scope::company { auth: false, query: none, body: none, answer: dashboard, summary: "A company's dashboard page (HTML)" }
    get "/tenants/{tenant}/users/{user}" => dashboard::scope::user { auth: false, query: none, body: none, answer: dashboard, summary: "A user's dashboard page (HTML)" }
    get "/models/{model}" => dashboard::scope::model { auth: false, query: none, body: none, answer: dashboard, summary: "A model's dashboard page (HTML; a tenant key: its own use)" }
    get "/records/{id}" => dashboard::record::page { auth: false, query: none, body: none, answer: dashboard, summary: "One usage record (HTML)" }
    get "/alerts" => dashboard::alerts::page { auth: false, query: none, body: none, answer: dashboard, summary: "The current alerts, paged (HTML; ?page=)" }
    post "/alerts/{id}/ack" => dashboard::alerts::acknowledge { auth: false, query: none, body: (openapi::AckForm), answer: redirect, summary: "Acknowledge an alert (admin session, CSRF token; audit logged)" }
    get "/manage" => dashboard::manage::page { auth: false, query: none, body: none, answer: dashboard, summary: "API keys, budgets and tiers (HTML; admin)" }
    post "/manage/budget" => dashboard::manage::set_budget { auth: false, query: none, body: (openapi::BudgetForm), answer: redirect, summary: "Set or clear a budget override (admin session, CSRF token; audit logged)" }
    post "/manage/user" => dashboard::manage::set_user { auth: false, query: none, body: (openapi::UserForm), answer: redirect, summary: "Set a user's tier (admin session, CSRF token; audit logged)" }
    post "/manage/keys" => dashboard::manage::create_key { auth: false, query: none, body: (openapi::KeyForm), answer: redirect, summary: "Create a tenant API key, shown once (admin session, CSRF token; audit logged)" }
    post "/manage/keys/{id}/revoke" => dashboard::manage::revoke_key { auth: false, query: none, body: (openapi::CsrfForm), answer: redirect, summary: "Revoke a tenant API key (admin session, CSRF token; audit logged)" }
    get "/audit" => dashboard::audit::page { auth: false, query: none, body: none, answer: dashboard, summary: "The audit log of changes, newest first (HTML; admin; ?page=)" }
    get "/export.csv" => dashboard::export::csv { auth: false, query: none, body: none, answer: csv, summary: "What a dashboard page shows, as the report API's CSV (same range and filters; ?group_by=)" }
    get "/login" => dashboard::login_page { auth: false, query: none, body: none, answer: html, summary: "The dashboard's sign-in form (HTML)" }
    post "/login" => dashboard::login { auth: false, query: none, body: (openapi::LoginForm), answer: redirect, summary: "Sign in to the dashboard with the admin key or a tenant key (form field `key`)" }
    post "/logout" => dashboard::logout { auth: false, query: none, body: none, answer: redirect, summary: "Sign out of the dashboard" }
}

/// The router with every route and layer.
pub fn app(state: AppState) -> Router {
    routes()
        .fallback(api::fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(error::normalize_errors))
        .with_state(state)
}

/// The router of the open metrics listener (`[metrics] open_listen`): `/metrics` without
/// a key, nothing else.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(api::open_metrics))
        .fallback(api::fallback)
        .with_state(state)
}

/// Serves [`metrics_app`] until `shutdown` resolves (the listener should be a loopback
/// address; the configuration refuses any other).
pub async fn run_metrics(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (limits, metrics) = (state.limits.connections, state.metrics.clone());
    serve::serve(listener, metrics_app(state), limits, metrics, shutdown).await
}

/// How often keys are re-read from the store.
pub const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the background work of a server: key reloading, the alert engine and the webhook
/// dispatcher.
pub fn spawn_background(state: &AppState) {
    spawn_key_reload(state);
    state.alerts.spawn();
}

/// Re-reads API keys periodically, so `spendguard keys create|revoke` apply to a running
/// server within [`KEY_RELOAD_INTERVAL`].
pub fn spawn_key_reload(state: &AppState) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEY_RELOAD_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            if state.shutting_down() {
                return;
            }
            if let Err(e) = state.keys.reload(state.guard.store()).await {
                tracing::warn!(error = %e, "could not reload API keys");
            }
        }
    });
}

/// Serves until `shutdown` resolves, finishes in-flight requests, then flushes the writer
/// and projects the journal (for at most 10 s).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, state, None, shutdown, async {}).await
}

/// How long a stopping server spends projecting the journal's pending batches.
const SHUTDOWN_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// [`run`], also serving `extra` routes beside the API's (the gateway's, which bring their
/// own limits and layers). After the listener stops and before the writer is flushed,
/// `settle` runs (the gateway waits there for the streams it is still reading).
pub async fn run_with(
    listener: TcpListener,
    state: AppState,
    extra: Option<Router>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    settle: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let flag = state.shutting_down.clone();
    let guard = state.guard.clone();
    let alerts = state.alerts.clone();
    let (limits, metrics) = (state.limits.connections, state.metrics.clone());
    let mut router = app(state);
    if let Some(extra) = extra {
        router = router.merge(extra);
    }
    let result = serve::serve(listener, router, limits, metrics, async move {
        shutdown.await;
        flag.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await;
    settle.await;
    alerts.stop().await;
    guard.shutdown().await;
    // What was acknowledged is durable in the journal already; projecting it now leaves the
    // tables complete for whoever reads them in SQL while the service is stopped. Bounded:
    // a backlog, or a database that stopped answering, must not hold the stop up (the next
    // start projects what is left).
    match tokio::time::timeout(SHUTDOWN_CATCH_UP, guard.store().catch_up()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the journal could not be projected at shutdown; it will be at the next start");
        }
        Err(_) => tracing::warn!(
            seconds = SHUTDOWN_CATCH_UP.as_secs(),
            "the journal was not projected in time at shutdown; the rest will be at the next start"
        ),
    }
    tracing::info!("writer flushed; stopped");
    result
}
