//! spendguard's gateway mode: a drop-in OpenAI- and Anthropic-compatible proxy.
//!
//! SDKs are pointed at `/openai/v1` or `/anthropic` with a spendguard key as their API key.
//! Each call is guarded like a hand-wired one, in three steps:
//!
//! 1. **Reserve the worst case before forwarding**: input tokens counted from the request
//!    ([`count`]), output from its `max_tokens` (or the tier's maximum). A refusal answers
//!    429 (or 403/400 for tier gates) in the provider's error shape, with `Retry-After`, and
//!    nothing reaches the provider: concurrent calls cannot overshoot a budget.
//! 2. **Forward**, with the provider key from the configuration (never the caller's key,
//!    never logged). A stream is passed on event by event as it arrives.
//! 3. **Commit from the provider's usage** ([`usage`]), before the caller sees the end of the
//!    answer. An error without usage releases the reservation. A stream whose client goes
//!    away is still read to its end (bounded by `drain_timeout_seconds`) for its usage; one
//!    the provider cuts before its usage is committed at its estimate, status `truncated`:
//!    never $0.

pub mod count;
pub mod mock;
mod shape;
pub mod usage;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use spendguard_core::config::{GatewayConfig, UpstreamKind};
use spendguard_core::{
    CommitRequest, CompanyId, Denial, Endpoint, LedgerError, ModelName, Origin, RequestStatus,
    ReserveRequest, Subject, TenantId, Tokens, UserId,
};
use spendguard_guard::GuardError;
use spendguard_server::api::UnitStr as _;
use spendguard_server::{AppState, Caller};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;
use wildmatch::WildMatch;

pub use shape::GatewayError;
use usage::{Api, Events, Pass, StreamUsage};

/// The gateway: its upstreams and the calls it is still settling.
#[derive(Clone, Debug)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: AppState,
    upstreams: Vec<Upstream>,
    default_user: Option<UserId>,
    client: reqwest::Client,
    drain: Duration,
    ttl_us: i64,
    max_body: usize,
    /// Streams still being read (their client may be gone), and a wake-up when one ends.
    streams: AtomicUsize,
    stream_ended: Notify,
}

struct Upstream {
    name: String,
    kind: UpstreamKind,
    base: String,
    key: Option<HeaderValue>,
    models: Vec<String>,
    patterns: Vec<WildMatch>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base", &self.base)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

/// Headers passed from the caller to the provider; every other one (the caller's key
/// first) stays here.
const PASSED_TO_UPSTREAM: &[&str] = &[
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "idempotency-key",
];

/// Headers passed from the provider's answer to the caller.
const PASSED_TO_CALLER: &[&str] = &[
    "content-type",
    "x-request-id",
    "request-id",
    "retry-after",
    "openai-processing-ms",
];

/// The longest provider request id kept on a record.
const MAX_REQUEST_ID: usize = 128;

/// Checks that every upstream's key variable is set and can be sent, before anything
/// starts.
pub fn check_keys(config: &GatewayConfig) -> Result<(), String> {
    for (i, u) in config.upstreams.iter().enumerate() {
        upstream_key(i, u, &|name| std::env::var(name).ok())?;
    }
    Ok(())
}

/// The header value carrying an upstream's key, from the variable its configuration names.
fn upstream_key(
    i: usize,
    u: &spendguard_core::config::UpstreamConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<HeaderValue>, String> {
    if u.api_key_env.is_empty() {
        return Ok(None);
    }
    let value = env(&u.api_key_env).ok_or_else(|| {
        format!(
            "gateway.upstreams[{i}].api_key_env: the environment variable `{}` is not set",
            u.api_key_env
        )
    })?;
    let header = match u.kind {
        UpstreamKind::Openai => format!("Bearer {value}"),
        UpstreamKind::Anthropic => value,
    };
    let mut v = HeaderValue::from_str(&header).map_err(|_| {
        format!(
            "gateway.upstreams[{i}].api_key_env: `{}` holds characters a header cannot carry",
            u.api_key_env
        )
    })?;
    v.set_sensitive(true);
    Ok(Some(v))
}

impl Gateway {
    /// Builds the gateway from its configuration (which must have been validated). Fails
    /// when an upstream's key variable is not set.
    pub fn new(state: AppState, config: &GatewayConfig) -> Result<Gateway, String> {
        Gateway::with_env(state, config, &|name| std::env::var(name).ok())
    }

    /// [`Gateway::new`], reading the upstreams' key variables through `env`.
    pub fn with_env(
        state: AppState,
        config: &GatewayConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Gateway, String> {
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for (i, u) in config.upstreams.iter().enumerate() {
            let key = upstream_key(i, u, env)?;
            upstreams.push(Upstream {
                name: u.name.clone(),
                kind: u.kind,
                base: u.base_url.trim_end_matches('/').to_owned(),
                key,
                models: u.models.clone(),
                patterns: u.models.iter().map(|m| WildMatch::new(m)).collect(),
            });
        }
        let default_user = if config.default_user.is_empty() {
            None
        } else {
            Some(
                UserId::parse(&config.default_user)
                    .map_err(|e| format!("gateway.default_user: {e}"))?,
            )
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.upstream_timeout_seconds))
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("the gateway's HTTP client: {e}"))?;
        let policy = state.guard.ledger().policy();
        let ttl_us = i64::try_from(
            (config.upstream_timeout_seconds + config.drain_timeout_seconds)
                .saturating_mul(1_000_000),
        )
        .unwrap_or(i64::MAX)
        .min(policy.max_reservation_ttl_us)
        .min(policy.large_reservation_max_ttl_us);
        Ok(Gateway {
            inner: Arc::new(Inner {
                state,
                upstreams,
                default_user,
                client,
                drain: Duration::from_secs(config.drain_timeout_seconds),
                ttl_us,
                max_body: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
                streams: AtomicUsize::new(0),
                stream_ended: Notify::new(),
            }),
        })
    }

    /// The gateway's routes, to merge into the server's router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/openai/v1/chat/completions", post(chat))
            .route("/openai/v1/responses", post(responses))
            .route("/openai/v1/embeddings", post(embeddings))
            .route("/openai/v1/models", get(models))
            .route("/anthropic/v1/messages", post(messages))
            .route("/anthropic/v1/messages/count_tokens", post(count_tokens))
            .layer(axum::middleware::from_fn_with_state(
                self.inner.state.clone(),
                spendguard_server::metrics::track,
            ))
            .layer(DefaultBodyLimit::max(self.inner.max_body))
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .with_state(self.clone())
    }

    /// Waits until no stream is being read any more (their usage is committed): for a
    /// graceful shutdown, before the writer is flushed, and for tests.
    pub async fn idle(&self) {
        loop {
            let ended = self.inner.stream_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.inner.streams.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }

    /// The first upstream of `kind` that serves `model` (its index), or 404.
    fn upstream(&self, kind: UpstreamKind, model: &ModelName) -> Result<usize, GatewayError> {
        self.inner
            .upstreams
            .iter()
            .position(|u| u.kind == kind && u.patterns.iter().any(|p| p.matches(model.as_str())))
            .ok_or_else(|| no_upstream(model))
    }
}

impl Api {
    fn kind(self) -> UpstreamKind {
        match self {
            Api::Messages => UpstreamKind::Anthropic,
            _ => UpstreamKind::Openai,
        }
    }

    /// The path after the upstream's base URL.
    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Responses => "/responses",
            Api::Embeddings => "/embeddings",
            Api::Messages => "/v1/messages",
        }
    }

    /// Whether this event ends the stream (the gateway commits before passing it on, so a
    /// caller that saw the end of its stream finds the call recorded).
    fn is_end(self, event: &[u8]) -> bool {
        let ends: &[&[u8]] = match self {
            Api::Chat | Api::Embeddings => &[b"data: [DONE]"],
            Api::Responses => &[
                b"\"response.completed\"",
                b"\"response.incomplete\"",
                b"\"response.failed\"",
            ],
            Api::Messages => &[b"\"message_stop\""],
        };
        ends.iter().any(|end| usage::contains(event, end))
    }
}

/// The handlers of the model routes: each is [`Gateway::call`] with its API.
macro_rules! model_route {
    ($($name:ident => $api:expr),* $(,)?) => {$(
        async fn $name(
            State(g): State<Gateway>,
            headers: HeaderMap,
            body: Result<Bytes, BytesRejection>,
        ) -> Response {
            g.call($api, headers, body).await
        }
    )*};
}

model_route! {
    chat => Api::Chat,
    responses => Api::Responses,
    embeddings => Api::Embeddings,
    messages => Api::Messages,
}

/// `GET /openai/v1/models`: the models the OpenAI-kind upstreams are configured with.
async fn models(State(g): State<Gateway>, headers: HeaderMap) -> Response {
    if let Err(e) = g.caller_tenant(&headers) {
        return e.answer(UpstreamKind::Openai);
    }
    let data: Vec<Value> = g
        .inner
        .upstreams
        .iter()
        .filter(|u| u.kind == UpstreamKind::Openai)
        .flat_map(|u| {
            u.models
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": u.name}))
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /anthropic/v1/messages/count_tokens`: passed through (it costs nothing).
async fn count_tokens(
    State(g): State<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let kind = UpstreamKind::Anthropic;
    let run = async {
        g.caller_tenant(&headers)?;
        let body = body.map_err(rejection)?;
        let json = parse_body(&body)?;
        let model = model_name(&json)?;
        let up = &g.inner.upstreams[g.upstream(kind, &model)?];
        let resp = g
            .send(up, "/v1/messages/count_tokens", &headers, body, false)
            .await?;
        let (status, out_headers) = (resp.status(), caller_headers(resp.headers()));
        let bytes = resp.bytes().await.map_err(upstream_failed)?;
        Ok::<_, GatewayError>(answer(status, out_headers, bytes.into()))
    };
    run.await.unwrap_or_else(|e| e.answer(kind))
}

/// A call, ready to be reserved and forwarded.
struct Prepared {
    api: Api,
    up_index: usize,
    request: ReserveRequest,
    body: Bytes,
    stream: bool,
    /// The gateway asked for the usage chunk of an OpenAI chat stream; the caller did not.
    hide_usage: bool,
}

impl Gateway {
    async fn call(
        &self,
        api: Api,
        headers: HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Response {
        let kind = api.kind();
        let prepared = match self.prepare(api, &headers, body) {
            Ok(p) => p,
            Err(e) => return e.answer(kind),
        };
        match self.run(prepared, &headers).await {
            Ok(r) => r,
            Err(e) => e.answer(kind),
        }
    }

    /// The caller's tenant: a tenant key's own, or the one the admin key names in
    /// `x-spendguard-tenant`. The key comes as `Authorization: Bearer` (OpenAI SDKs) or
    /// `x-api-key` (Anthropic's).
    fn caller_tenant(&self, headers: &HeaderMap) -> Result<TenantId, GatewayError> {
        let key = spendguard_server::auth::bearer_key(headers)
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .ok_or_else(|| {
                GatewayError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a spendguard API key is needed: pass it as the SDK's API key",
                )
            })?;
        let caller = self.inner.state.keys.authenticate(key).ok_or_else(|| {
            GatewayError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key")
        })?;
        let named = headers
            .get("x-spendguard-tenant")
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| TenantId::parse(s).ok())
                    .ok_or_else(|| {
                        GatewayError::bad_request("x-spendguard-tenant is not a valid tenant id")
                    })
            })
            .transpose()?;
        match (caller, named) {
            (Caller::Tenant(t), None) => Ok(t),
            (Caller::Tenant(t), Some(n)) if n == t => Ok(t),
            (Caller::Tenant(_), Some(_)) => Err(GatewayError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this key belongs to another tenant",
            )),
            (Caller::Admin, Some(n)) => Ok(n),
            (Caller::Admin, None) => Err(GatewayError::bad_request(
                "the admin key must name the tenant to charge in x-spendguard-tenant",
            )),
        }
    }

    fn prepare(
        &self,
        api: Api,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Prepared, GatewayError> {
        let tenant = self.caller_tenant(headers)?;
        let body = body.map_err(rejection)?;
        let mut json = parse_body(&body)?;
        let model = model_name(&json)?;
        let kind = api.kind();
        let up_index = self.upstream(kind, &model)?;
        let user = self.user(api, headers, &json)?;
        let company = header_id(headers, "x-spendguard-company", CompanyId::parse)?;
        let stream =
            api != Api::Embeddings && json.get("stream").and_then(Value::as_bool) == Some(true);
        let counter = count::Counter::for_model(kind, model.as_str());
        let (input_tokens, max_output) = match api {
            Api::Chat => (count::chat_input(counter, &json), chat_max_output(&json)?),
            Api::Responses => (
                count::responses_input(counter, &json),
                max_tokens(&json, &["max_output_tokens"])?,
            ),
            Api::Embeddings => (count::embeddings_input(counter, &json), Some(0)),
            Api::Messages => (
                count::messages_input(counter, &json),
                max_tokens(&json, &["max_tokens"])?,
            ),
        };
        // An OpenAI chat stream reports usage only when asked: ask, and hide the extra
        // chunk from a caller that did not.
        let mut hide_usage = false;
        let mut body = body;
        if api == Api::Chat && stream {
            let asked = json["stream_options"]["include_usage"].as_bool() == Some(true);
            if !asked {
                hide_usage = true;
                let options = json
                    .as_object_mut()
                    .expect("checked to be an object")
                    .entry("stream_options")
                    .or_insert_with(|| json!({}));
                if !options.is_object() {
                    *options = json!({});
                }
                options["include_usage"] = json!(true);
                body = serde_json::to_vec(&json)
                    .map_err(|e| {
                        GatewayError::bad_request(format!("the body cannot be re-encoded: {e}"))
                    })?
                    .into();
            }
        }
        let request = ReserveRequest {
            id: Uuid::nil(),
            subject: Subject {
                tenant,
                user,
                company,
                tier: None,
                trusted_tier: false,
                model,
                endpoint: Some(Endpoint::parse(api.endpoint()).expect("a valid endpoint")),
            },
            input_tokens,
            max_output_tokens: max_output,
            estimated_cost: None,
            idempotency_key: None,
            ttl_us: Some(self.inner.ttl_us),
        };
        Ok(Prepared {
            api,
            up_index,
            request,
            body,
            stream,
            hide_usage,
        })
    }

    /// The user charged: `x-spendguard-user`, else the OpenAI `user` field or the Anthropic
    /// `metadata.user_id`, else the configured default.
    fn user(&self, api: Api, headers: &HeaderMap, json: &Value) -> Result<UserId, GatewayError> {
        if let Some(u) = header_id(headers, "x-spendguard-user", UserId::parse)? {
            return Ok(u);
        }
        let (field, from_body) = match api {
            Api::Messages => ("metadata.user_id", json["metadata"]["user_id"].as_str()),
            _ => ("user", json["user"].as_str()),
        };
        if let Some(s) = from_body {
            return UserId::parse(s)
                .map_err(|e| GatewayError::bad_request(format!("{field}: {e}")));
        }
        self.inner.default_user.clone().ok_or_else(|| {
            GatewayError::bad_request(format!(
                "no user to charge: send the x-spendguard-user header or `{field}`"
            ))
        })
    }

    async fn run(&self, p: Prepared, headers: &HeaderMap) -> Result<Response, GatewayError> {
        let state = &self.inner.state;
        let now = state.guard.now();
        // Decided in memory, stored in order before the commit; the caller's answer waits
        // for the commit to be durable (see `Guard::reserve_unacknowledged`).
        let reserved = match state.guard.reserve_unacknowledged(p.request.clone()).await {
            Ok(Ok(r)) => r,
            Ok(Err(outcome)) => {
                let e = denial_error(outcome.denial.as_ref(), now);
                state.metrics.decision("denied", e.code);
                return Err(e);
            }
            Err(e) => return Err(guard_error(e)),
        };
        state.metrics.decision("admitted", "ok");
        let res = reserved.reservation;
        let up = &self.inner.upstreams[p.up_index];
        let call = Call {
            gateway: self.clone(),
            reservation: res.id,
            upstream: up.name.clone(),
            input_estimate: p.request.input_tokens,
            output_estimate: res.estimated_tokens.saturating_sub(p.request.input_tokens),
        };
        // Neither the request nor the tier bounds the output: the worst case is unknown, and
        // reserving the input alone would let the call overshoot by all of its output.
        if p.api != Api::Embeddings
            && p.request.max_output_tokens.is_none()
            && call.output_estimate == 0
        {
            call.release("no output bound").await;
            return Err(GatewayError::bad_request(format!(
                "spendguard: send `{}`, or give tier `{}` a max_output_tokens, so this call's \
                 worst case can be reserved",
                match p.api {
                    Api::Chat => "max_completion_tokens",
                    Api::Responses => "max_output_tokens",
                    _ => "max_tokens",
                },
                res.tier.as_str()
            )));
        }
        let resp = match self.send(up, p.api.path(), headers, p.body, p.stream).await {
            Ok(r) => r,
            Err(e) => {
                call.release("the upstream could not be reached").await;
                return Err(e);
            }
        };
        let status = resp.status();
        let out_headers = caller_headers(resp.headers());
        let request_id = request_id(resp.headers());
        if !status.is_success() {
            // The provider refused or failed: nothing was generated unless it says so.
            let bytes = resp.bytes().await.unwrap_or_default();
            let used = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| usage::of_answer(p.api, &v))
                .filter(|t| t.total() > 0);
            match used {
                Some(t) => call.commit(t, RequestStatus::Error, request_id).await,
                None => call.release("the upstream answered an error").await,
            }
            return Ok(answer(status, out_headers, bytes.into()));
        }
        if p.stream {
            return Ok(self.stream(
                call,
                p.api,
                p.hide_usage,
                resp,
                status,
                out_headers,
                request_id,
            ));
        }
        match resp.bytes().await {
            Ok(bytes) => {
                let used = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
                    let id = request_id.clone().or_else(|| body_id(&v));
                    usage::of_answer(p.api, &v).map(|t| (t, id))
                });
                match used {
                    Some((t, id)) => call.commit(t, RequestStatus::Success, id).await,
                    None => call.truncated(None, request_id).await,
                }
                Ok(answer(status, out_headers, bytes.into()))
            }
            Err(e) => {
                call.truncated(None, request_id).await;
                Err(upstream_failed(e))
            }
        }
    }

    /// Forwards a body to an upstream with its key.
    async fn send(
        &self,
        up: &Upstream,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        stream: bool,
    ) -> Result<reqwest::Response, GatewayError> {
        let mut req = self
            .inner
            .client
            .post(format!("{}{}", up.base, path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &up.key {
            req = match up.kind {
                UpstreamKind::Openai => req.header(header::AUTHORIZATION, key.clone()),
                UpstreamKind::Anthropic => req.header("x-api-key", key.clone()),
            };
        }
        for name in PASSED_TO_UPSTREAM {
            if let Some(v) = headers.get(*name) {
                req = req.header(*name, v.clone());
            }
        }
        if up.kind == UpstreamKind::Anthropic && !headers.contains_key("anthropic-version") {
            req = req.header("anthropic-version", "2023-06-01");
        }
        if stream {
            req = req.header(header::ACCEPT, "text/event-stream");
        }
        req.send().await.map_err(upstream_failed)
    }

    /// Passes a stream on event by event, reading it to its end even when the caller goes
    /// away, and commits its usage before passing on its last event.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        call: Call,
        api: Api,
        hide_usage: bool,
        resp: reqwest::Response,
        status: reqwest::StatusCode,
        out_headers: HeaderMap,
        request_id: Option<String>,
    ) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        self.inner.streams.fetch_add(1, Ordering::SeqCst);
        let gateway = self.clone();
        let drain = self.inner.drain;
        tokio::spawn(async move {
            let mut upstream = resp.bytes_stream();
            let mut events = Events::default();
            let mut seen = StreamUsage::new(api);
            let mut caller_gone = false;
            let mut deadline: Option<tokio::time::Instant> = None;
            let mut settled = false;
            let mut broken = false;
            // Sends to the caller while it listens.
            async fn pass(
                tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
                event: Bytes,
                caller_gone: &mut bool,
                deadline: &mut Option<tokio::time::Instant>,
                drain: Duration,
            ) {
                if !*caller_gone && tx.send(Ok(event)).await.is_err() {
                    *caller_gone = true;
                    *deadline = Some(tokio::time::Instant::now() + drain);
                    tracing::debug!("the caller left mid-stream; reading on for the usage");
                }
            }
            loop {
                let next = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, upstream.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            tracing::warn!(
                                reservation = %call.reservation,
                                "the upstream stream did not end within drain_timeout_seconds after its caller left"
                            );
                            broken = true;
                            break;
                        }
                    },
                    // A caller that leaves while the upstream is silent is noticed at once.
                    None => tokio::select! {
                        n = upstream.next() => n,
                        _ = tx.closed() => {
                            caller_gone = true;
                            deadline = Some(tokio::time::Instant::now() + drain);
                            tracing::debug!("the caller left mid-stream; reading on for the usage");
                            continue;
                        }
                    },
                };
                let chunk = match next {
                    None => break,
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        tracing::warn!(reservation = %call.reservation, error = %e, "the upstream stream broke off");
                        broken = true;
                        break;
                    }
                };
                events.push(&chunk);
                while let Some(event) = events.next_event() {
                    let verdict = seen.event(&event, hide_usage);
                    if !settled && api.is_end(&event) {
                        if let Some(t) = seen.finished() {
                            let status = if seen.failed {
                                RequestStatus::Error
                            } else {
                                RequestStatus::Success
                            };
                            call.commit(t, status, request_id.clone()).await;
                            settled = true;
                        }
                    }
                    if verdict == Pass::Forward {
                        pass(&tx, event, &mut caller_gone, &mut deadline, drain).await;
                    }
                }
            }
            if let Some(rest) = events.rest() {
                if seen.event(&rest, hide_usage) == Pass::Forward {
                    pass(&tx, rest, &mut caller_gone, &mut deadline, drain).await;
                }
            }
            if !settled {
                match (broken, seen.finished()) {
                    (false, Some(t)) => {
                        let status = if seen.failed {
                            RequestStatus::Error
                        } else {
                            RequestStatus::Success
                        };
                        call.commit(t, status, request_id.clone()).await;
                    }
                    _ => call.truncated(seen.partial(), request_id.clone()).await,
                }
            }
            if broken && !caller_gone {
                // The caller sees the stream break, as it did upstream.
                let _ = tx
                    .send(Err(std::io::Error::other("the upstream stream broke off")))
                    .await;
            }
            drop(tx);
            drop(call);
            gateway.inner.streams.fetch_sub(1, Ordering::SeqCst);
            gateway.inner.stream_ended.notify_waiters();
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut r = Response::new(axum::body::Body::from_stream(body));
        *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK);
        *r.headers_mut() = out_headers;
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}

/// One admitted call, to be settled once.
struct Call {
    gateway: Gateway,
    reservation: Uuid,
    upstream: String,
    input_estimate: u64,
    output_estimate: u64,
}

impl Call {
    async fn commit(&self, tokens: Tokens, status: RequestStatus, request_id: Option<String>) {
        let req = CommitRequest {
            usage_id: Uuid::nil(),
            tokens,
            cost: None,
            status,
            origin: Some(Origin {
                upstream: self.upstream.clone(),
                request_id,
            }),
        };
        if let Err(e) = self
            .gateway
            .inner
            .state
            .guard
            .commit(self.reservation, req)
            .await
        {
            // The call happened; its reservation expires into a record if this failed.
            tracing::error!(reservation = %self.reservation, error = %e, "could not commit a gateway call's usage");
        }
    }

    /// The usage is unknown (the answer broke off): the estimate is charged, never less,
    /// with what is known (an Anthropic stream's input counts).
    async fn truncated(&self, known: Option<Tokens>, request_id: Option<String>) {
        let known = known.unwrap_or_default();
        let tokens = Tokens {
            input: if known.input > 0 {
                known.input
            } else {
                self.input_estimate
            },
            cached_input: known.cached_input,
            output: known.output.max(self.output_estimate),
            ..Default::default()
        };
        self.commit(tokens, RequestStatus::Truncated, request_id)
            .await;
    }

    async fn release(&self, reason: &str) {
        if let Err(e) = self
            .gateway
            .inner
            .state
            .guard
            .release(self.reservation, Some(reason.to_owned()))
            .await
        {
            tracing::error!(reservation = %self.reservation, error = %e, "could not release a gateway call's reservation");
        }
    }
}

fn answer(status: reqwest::StatusCode, headers: HeaderMap, body: axum::body::Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    *r.headers_mut() = headers;
    r
}

/// The provider's headers a caller gets.
fn caller_headers(from: &reqwest::header::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in PASSED_TO_CALLER {
        if let Some(v) = from.get(*name) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                out.insert(n, v);
            }
        }
    }
    out
}

/// The provider's request id: its `x-request-id` (OpenAI) or `request-id` (Anthropic).
fn request_id(from: &reqwest::header::HeaderMap) -> Option<String> {
    ["x-request-id", "request-id"]
        .iter()
        .find_map(|h| from.get(*h))
        .and_then(|v| v.to_str().ok())
        .and_then(clean_id)
}

fn body_id(v: &Value) -> Option<String> {
    v.get("id").and_then(Value::as_str).and_then(clean_id)
}

/// A provider's id as kept on a record: printable ASCII, at most [`MAX_REQUEST_ID`].
fn clean_id(s: &str) -> Option<String> {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_REQUEST_ID)
        .collect();
    (!s.is_empty()).then_some(s)
}

fn rejection(r: BytesRejection) -> GatewayError {
    let status = r.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "payload_too_large"
    } else {
        "invalid_request"
    };
    GatewayError::new(status, code, r.body_text())
}

fn parse_body(body: &Bytes) -> Result<Value, GatewayError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(GatewayError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

fn model_name(v: &Value) -> Result<ModelName, GatewayError> {
    let m = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| GatewayError::bad_request("`model` is missing"))?;
    ModelName::parse(m).map_err(|e| GatewayError::bad_request(format!("model: {e}")))
}

fn no_upstream(model: &ModelName) -> GatewayError {
    GatewayError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "no upstream of this gateway serves the model `{}`",
            model.as_str()
        ),
    )
}

fn header_id<T, E: std::fmt::Display>(
    headers: &HeaderMap,
    name: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, GatewayError> {
    headers
        .get(name)
        .map(|v| {
            let s = v
                .to_str()
                .map_err(|_| GatewayError::bad_request(format!("{name} is not text")))?;
            parse(s).map_err(|e| GatewayError::bad_request(format!("{name}: {e}")))
        })
        .transpose()
}

/// A chat completion's most output: `max_completion_tokens` (or `max_tokens`) for each of
/// its `n` choices. Several choices need an explicit bound: the tier's maximum is a bound
/// for one.
fn chat_max_output(v: &Value) -> Result<Option<u64>, GatewayError> {
    let per_choice = max_tokens(v, &["max_completion_tokens", "max_tokens"])?;
    let n = match v.get("n") {
        None | Some(Value::Null) => 1,
        Some(n) => n
            .as_u64()
            .filter(|n| (1..=128).contains(n))
            .ok_or_else(|| GatewayError::bad_request("`n` must be a whole number from 1 to 128"))?,
    };
    match (per_choice, n) {
        (per, 1) => Ok(per),
        (Some(per), n) => Ok(Some(per.saturating_mul(n))),
        (None, _) => Err(GatewayError::bad_request(
            "spendguard: a chat completion with several choices (`n`) needs \
             `max_completion_tokens` or `max_tokens`, so its worst case can be reserved",
        )),
    }
}

/// The first of `keys` the body sets, as a token count.
fn max_tokens(v: &Value, keys: &[&str]) -> Result<Option<u64>, GatewayError> {
    for k in keys {
        match v.get(*k) {
            None | Some(Value::Null) => continue,
            Some(n) => {
                return n.as_u64().map(Some).ok_or_else(|| {
                    GatewayError::bad_request(format!("`{k}` must be a whole number of tokens"))
                });
            }
        }
    }
    Ok(None)
}

fn upstream_failed(e: reqwest::Error) -> GatewayError {
    let (status, what) = if e.is_timeout() {
        (StatusCode::GATEWAY_TIMEOUT, "did not answer in time")
    } else {
        (StatusCode::BAD_GATEWAY, "could not be reached")
    };
    tracing::warn!(error = %e, "upstream call failed");
    GatewayError::new(
        status,
        "upstream_unavailable",
        format!("the upstream {what}"),
    )
}

/// A refused reservation in the provider's shape: limits are 429 with `Retry-After`, tier
/// gates 403 (a model the tier may not use) or 400.
fn denial_error(denial: Option<&Denial>, now: i64) -> GatewayError {
    let Some(denial) = denial else {
        return GatewayError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "refused");
    };
    let mut e = match denial {
        Denial::Limits(failing) => {
            let budget = denial.is_budget();
            let names: Vec<String> = failing
                .iter()
                .map(|l| {
                    format!(
                        "{} {}/{}",
                        l.scope.kind().as_str(),
                        l.unit_str(),
                        l.window.as_str()
                    )
                })
                .collect();
            GatewayError::new(
                StatusCode::TOO_MANY_REQUESTS,
                if budget {
                    "budget_exceeded"
                } else {
                    "rate_limited"
                },
                format!(
                    "spendguard: this call would exceed {}: {}",
                    if budget { "a budget" } else { "a rate limit" },
                    names.join(", ")
                ),
            )
        }
        Denial::ModelNotAllowed { model, tier } => GatewayError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "spendguard: tier `{}` may not use model `{}`",
                tier.as_str(),
                model.as_str()
            ),
        ),
        Denial::UnknownModel { model } => GatewayError::new(
            StatusCode::BAD_REQUEST,
            "unknown_model",
            format!("spendguard: model `{}` has no price", model.as_str()),
        ),
        Denial::OutputTokensTooHigh { requested, max } => GatewayError::new(
            StatusCode::BAD_REQUEST,
            "max_tokens_too_high",
            format!(
                "spendguard: {requested} output tokens requested; this tier allows at most {max}"
            ),
        ),
        Denial::TooManySubjects { limit, .. } => GatewayError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_subjects",
            format!("spendguard: this tenant already tracks {limit} users and companies"),
        ),
    };
    if e.status == StatusCode::TOO_MANY_REQUESTS {
        let secs = denial
            .retry_at()
            .map(|t| ((t - now).max(0) + 999_999) / 1_000_000)
            .unwrap_or(1)
            .max(1);
        e.retry_after = Some(u64::try_from(secs).unwrap_or(1));
    }
    e
}

fn guard_error(e: GuardError) -> GatewayError {
    match e {
        GuardError::Unavailable => {
            let mut e = GatewayError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "spendguard's usage store is unavailable; new calls are refused until it is back",
            );
            e.retry_after = Some(1);
            e
        }
        GuardError::ShuttingDown => GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "spendguard is shutting down",
        ),
        GuardError::Ledger(
            l @ (LedgerError::UnknownTier(_)
            | LedgerError::InvalidTtl { .. }
            | LedgerError::Overflow
            | LedgerError::LargeReservationTtl { .. }
            | LedgerError::RecordCostTooLarge { .. }
            | LedgerError::RecordTokensTooLarge { .. }),
        ) => GatewayError::bad_request(format!("spendguard: {l}")),
        other => {
            tracing::error!(error = %other, "a gateway reservation failed");
            GatewayError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see spendguard's log",
            )
        }
    }
}
