//! A stand-in for the OpenAI and Anthropic APIs, for tests and the gateway benchmark: an
//! axum server that answers the routes the gateway forwards to with the exact JSON and
//! server-sent event sequences the providers send (usage chunks, cached and reasoning
//! tokens, Anthropic's cache fields), and counts what it was asked.
//!
//! What it answers depends on the requested model's name:
//! - `…-error…`: a 500 in the provider's error shape, without usage;
//! - `…-cut…`: a stream that breaks off (the connection is dropped) before its usage;
//! - `…-slow…`: a stream of [`SLOW_CHUNKS`] chunks, [`SLOW_CHUNK_DELAY`] apart;
//! - `…-held…`: an answer that waits until [`MockUpstream::open_gate`] is called;
//! - `…-stall…`: a stream that stops sending, without ending, before its usage;
//! - anything else: an answer with the usage in [`usage`].
//!
//! Streams follow the providers: an OpenAI chat stream carries its usage in a last chunk
//! without choices only when the request asked for it (`stream_options.include_usage`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The usage every successful answer reports.
pub mod usage {
    /// OpenAI chat completions: `prompt_tokens` (cached ones included), its cached part,
    /// `completion_tokens` (reasoning ones included), its reasoning part.
    pub const CHAT_PROMPT: u64 = 1_234;
    pub const CHAT_CACHED: u64 = 1_000;
    pub const CHAT_COMPLETION: u64 = 567;
    pub const CHAT_REASONING: u64 = 300;
    /// OpenAI responses: `input_tokens`, `input_tokens_details.cached_tokens`,
    /// `output_tokens`.
    pub const RESPONSES_INPUT: u64 = 2_048;
    pub const RESPONSES_CACHED: u64 = 1_024;
    pub const RESPONSES_OUTPUT: u64 = 333;
    /// OpenAI embeddings: `prompt_tokens`.
    pub const EMBEDDINGS_PROMPT: u64 = 42;
    /// Anthropic messages: `input_tokens` (uncached), `cache_read_input_tokens` and
    /// `cache_creation_input_tokens` on top of it, `output_tokens`.
    pub const MESSAGES_INPUT: u64 = 150;
    pub const MESSAGES_CACHE_READ: u64 = 2_000;
    pub const MESSAGES_CACHE_CREATION: u64 = 500;
    /// The part of `cache_creation_input_tokens` written to the 1-hour cache
    /// (`cache_creation.ephemeral_1h_input_tokens`).
    pub const MESSAGES_CACHE_CREATION_1H: u64 = 200;
    pub const MESSAGES_OUTPUT: u64 = 89;
    /// Anthropic `count_tokens`.
    pub const COUNT_TOKENS: u64 = 77;
    /// A `…-held…` chat completion: a small call, within any worst case of its request.
    pub const HELD_PROMPT: u64 = 5;
    pub const HELD_COMPLETION: u64 = 100;
}

/// Chunks of a `…-slow…` stream.
pub const SLOW_CHUNKS: usize = 20;
/// The pause before each chunk of a `…-slow…` stream.
pub const SLOW_CHUNK_DELAY: Duration = Duration::from_millis(50);

/// The provider key the tests configure; the mock records which key each call carried.
pub const PROVIDER_KEY: &str = "sk-mock-provider-key";

/// What the mock has seen.
#[derive(Debug)]
pub struct Seen {
    /// Calls to a model route (everything but `GET /v1/models`).
    pub calls: AtomicU64,
    /// Calls in flight now, and the most ever at once.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Streams sent to their end, usage included.
    pub streams_finished: AtomicU64,
    /// The body and headers of the last call to a model route.
    pub last: Mutex<Option<(HeaderMap, Value)>>,
    /// Opens the gate `…-held…` calls wait at.
    pub gate: tokio::sync::watch::Sender<bool>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            streams_finished: AtomicU64::new(0),
            last: Mutex::new(None),
            gate: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// A running mock upstream.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl MockUpstream {
    /// Serves on a free loopback port until the runtime ends.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a local address");
        let seen = Arc::new(Seen::default());
        let app = router(seen.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockUpstream { addr, seen }
    }

    /// The base URL an OpenAI SDK (and an `openai` upstream) takes: `http://addr/v1`.
    pub fn openai_base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The base URL an Anthropic SDK (and an `anthropic` upstream) takes: `http://addr`.
    pub fn anthropic_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> u64 {
        self.seen.calls.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> u64 {
        self.seen.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn streams_finished(&self) -> u64 {
        self.seen.streams_finished.load(Ordering::SeqCst)
    }

    /// Calls being answered now.
    pub fn in_flight(&self) -> u64 {
        self.seen.in_flight.load(Ordering::SeqCst)
    }

    /// Lets every `…-held…` call (waiting or to come) answer.
    pub fn open_gate(&self) {
        self.seen.gate.send_replace(true);
    }

    /// The headers and JSON body of the last call to a model route.
    pub fn last_request(&self) -> Option<(HeaderMap, Value)> {
        self.seen.last.lock().expect("not poisoned").clone()
    }
}

/// The mock's routes, for serving it on a listener of one's own.
pub fn router(seen: Arc<Seen>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .with_state(seen)
}

/// Counts a call while it is answered (a streamed answer counts until its body ends).
struct InFlight(Arc<Seen>);

impl InFlight {
    fn enter(seen: &Arc<Seen>, headers: &HeaderMap, body: &Value) -> InFlight {
        seen.calls.fetch_add(1, Ordering::SeqCst);
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
        *seen.last.lock().expect("not poisoned") = Some((headers.clone(), body.clone()));
        InFlight(seen.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits at the gate if the model is a `…-held…` one.
async fn wait_if_held(seen: &Seen, model: &str) {
    if model.contains("-held") {
        let mut rx = seen.gate.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

fn parse(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": format!("bad JSON: {e}"), "type": "invalid_request_error"}})),
        )
            .into_response())
    })
}

fn model_of(v: &Value) -> String {
    v["model"].as_str().unwrap_or("").to_owned()
}

fn wants_stream(v: &Value) -> bool {
    v["stream"].as_bool() == Some(true)
}

const CREATED: u64 = 1_767_225_600;

/// A JSON answer with the provider's request-id header.
fn json_answer(request_id_header: &'static str, id: &str, body: Value) -> Response {
    let mut r = axum::Json(body).into_response();
    r.headers_mut()
        .insert(request_id_header, id.parse().expect("a header value"));
    r
}

/// What a scenario does to a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Normal,
    Cut,
    Slow,
    Error,
    Held,
    Stall,
}

fn scenario(model: &str) -> Scenario {
    if model.contains("-error") {
        Scenario::Error
    } else if model.contains("-cut") {
        Scenario::Cut
    } else if model.contains("-slow") {
        Scenario::Slow
    } else if model.contains("-held") {
        Scenario::Held
    } else if model.contains("-stall") {
        Scenario::Stall
    } else {
        Scenario::Normal
    }
}

/// A server-sent event stream of `events` (already framed). `Cut` breaks the connection
/// before the events marked as carrying usage; `Slow` pauses before each event. The stream
/// counts as finished (and leaves the in-flight count) when its last event has been sent.
fn sse(
    events: Vec<(String, bool)>,
    scenario: Scenario,
    guard: InFlight,
    request_id_header: &'static str,
    id: &str,
) -> Response {
    let stream = futures_util::stream::unfold(
        (events.into_iter(), Some(guard)),
        move |(mut events, mut guard)| async move {
            let (event, usage) = events.next()?;
            if scenario == Scenario::Slow {
                tokio::time::sleep(SLOW_CHUNK_DELAY).await;
            }
            if scenario == Scenario::Stall && usage {
                // Neither sends nor ends: a provider that hangs mid-stream.
                std::future::pending::<()>().await;
            }
            if scenario == Scenario::Cut && usage {
                // Let what was sent so far reach the caller (the server writes when the
                // body has nothing ready), then drop the connection mid-stream: a broken
                // chunked body.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Some((
                    Err(std::io::Error::other("the mock cut this stream")),
                    (events, None),
                ));
            }
            if events.len() == 0 {
                if let Some(g) = guard.take() {
                    g.0.streams_finished.fetch_add(1, Ordering::SeqCst);
                }
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(event)), (events, guard)))
        },
    );
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "text/event-stream".parse().expect("a header value"),
    );
    h.insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("a header value"),
    );
    h.insert(request_id_header, id.parse().expect("a header value"));
    r
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

fn named(event: &str, v: &Value) -> String {
    format!("event: {event}\ndata: {v}\n\n")
}

fn openai_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})),
    )
        .into_response()
}

fn anthropic_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": "api_error", "message": message}})),
    )
        .into_response()
}

/// The pieces of text an answer streams.
fn pieces(scenario: Scenario) -> Vec<String> {
    let n = if scenario == Scenario::Slow {
        SLOW_CHUNKS
    } else {
        3
    };
    (0..n).map(|i| format!("piece {i} ")).collect()
}

fn chat_usage(scenario: Scenario) -> Value {
    use usage::*;
    if scenario == Scenario::Held {
        return json!({
            "prompt_tokens": HELD_PROMPT,
            "completion_tokens": HELD_COMPLETION,
            "total_tokens": HELD_PROMPT + HELD_COMPLETION
        });
    }
    json!({
        "prompt_tokens": CHAT_PROMPT,
        "completion_tokens": CHAT_COMPLETION,
        "total_tokens": CHAT_PROMPT + CHAT_COMPLETION,
        "prompt_tokens_details": {"cached_tokens": CHAT_CACHED, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": CHAT_REASONING,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// What every model route starts with: the parsed body, the call counted (until the
/// answer ends), a `…-held…` call waiting at the gate, and a `…-error…` model's failure.
struct Begun {
    req: Value,
    guard: InFlight,
    model: String,
    scenario: Scenario,
}

async fn begin(
    seen: &Arc<Seen>,
    headers: &HeaderMap,
    body: &Bytes,
    error: fn(StatusCode, &str) -> Response,
) -> Result<Begun, Response> {
    let req = parse(body).map_err(|r| *r)?;
    let guard = InFlight::enter(seen, headers, &req);
    let model = model_of(&req);
    wait_if_held(seen, &model).await;
    let scenario = scenario(&model);
    if scenario == Scenario::Error {
        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the mock failed"));
    }
    Ok(Begun {
        req,
        guard,
        model,
        scenario,
    })
}

async fn chat(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let Begun {
        req,
        guard,
        model,
        scenario,
    } = match begin(&seen, &headers, &body, openai_error).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let id = "chatcmpl-mock";
    let request_id = "req_mock_chat";
    if !wants_stream(&req) {
        return json_answer(
            "x-request-id",
            request_id,
            json!({
                "id": id,
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the mock.", "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": chat_usage(scenario),
                "system_fingerprint": "fp_mock"
            }),
        );
    }
    let include_usage = req["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        })
    };
    let mut events = vec![(
        data(&chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )),
        false,
    )];
    for p in pieces(scenario) {
        events.push((data(&chunk(json!({"content": p}), Value::Null)), false));
    }
    events.push((data(&chunk(json!({}), json!("stop"))), false));
    if include_usage {
        let last = json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock", "choices": [], "usage": chat_usage(scenario)
        });
        events.push((data(&last), true));
    }
    // A cut stream breaks before its usage, or before its end when it has none.
    events.push(("data: [DONE]\n\n".to_owned(), !include_usage));
    sse(events, scenario, guard, "x-request-id", request_id)
}

fn response_object(model: &str, status: &str, text: &str) -> Value {
    use usage::*;
    json!({
        "id": "resp_mock",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": null,
        "incomplete_details": null,
        "instructions": null,
        "max_output_tokens": null,
        "model": model,
        "output": [{
            "type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]
        }],
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null},
        "store": false,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": RESPONSES_INPUT,
            "input_tokens_details": {"cached_tokens": RESPONSES_CACHED},
            "output_tokens": RESPONSES_OUTPUT,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": RESPONSES_INPUT + RESPONSES_OUTPUT
        },
        "user": null,
        "metadata": {}
    })
}

async fn responses(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let Begun {
        req,
        guard,
        model,
        scenario,
    } = match begin(&seen, &headers, &body, openai_error).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request_id = "req_mock_responses";
    if !wants_stream(&req) {
        return json_answer(
            "x-request-id",
            request_id,
            response_object(&model, "completed", "Hello from the mock."),
        );
    }
    let mut seq = 0u64;
    let mut event = |kind: &str, mut v: Value| {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(seq);
        seq += 1;
        named(kind, &v)
    };
    let mut created = response_object(&model, "in_progress", "");
    created["usage"] = Value::Null;
    created["output"] = json!([]);
    let mut events = vec![
        (
            event("response.created", json!({"response": created.clone()})),
            false,
        ),
        (
            event("response.in_progress", json!({"response": created})),
            false,
        ),
    ];
    let mut text = String::new();
    for p in pieces(scenario) {
        text.push_str(&p);
        events.push((
            event(
                "response.output_text.delta",
                json!({"item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": p, "logprobs": []}),
            ),
            false,
        ));
    }
    events.push((
        event(
            "response.completed",
            json!({"response": response_object(&model, "completed", &text)}),
        ),
        true,
    ));
    sse(events, scenario, guard, "x-request-id", request_id)
}

async fn embeddings(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let _guard = InFlight::enter(&seen, &headers, &req);
    let model = model_of(&req);
    if scenario(&model) == Scenario::Error {
        return openai_error(StatusCode::INTERNAL_SERVER_ERROR, "the mock failed");
    }
    let n = match &req["input"] {
        Value::Array(a) if a.iter().all(|x| x.is_string()) => a.len(),
        _ => 1,
    };
    // base64 of three little-endian f32 (0.25, 0.5, 1.0), as when encoding_format=base64.
    let embedding = if req["encoding_format"].as_str() == Some("base64") {
        json!("AACAPgAAAD8AAIA/")
    } else {
        json!([0.25, 0.5, 1.0])
    };
    let data: Vec<Value> = (0..n)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": embedding}))
        .collect();
    json_answer(
        "x-request-id",
        "req_mock_embeddings",
        json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": usage::EMBEDDINGS_PROMPT, "total_tokens": usage::EMBEDDINGS_PROMPT}
        }),
    )
}

fn message_usage(output: u64) -> Value {
    use usage::*;
    json!({
        "input_tokens": MESSAGES_INPUT,
        "cache_creation_input_tokens": MESSAGES_CACHE_CREATION,
        "cache_read_input_tokens": MESSAGES_CACHE_READ,
        "cache_creation": {
            "ephemeral_5m_input_tokens": MESSAGES_CACHE_CREATION - MESSAGES_CACHE_CREATION_1H,
            "ephemeral_1h_input_tokens": MESSAGES_CACHE_CREATION_1H
        },
        "output_tokens": output
    })
}

async fn messages(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let Begun {
        req,
        guard,
        model,
        scenario,
    } = match begin(&seen, &headers, &body, anthropic_error).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request_id = "req_mock_messages";
    if !wants_stream(&req) {
        return json_answer(
            "request-id",
            request_id,
            json!({
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": "Hello from the mock."}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": message_usage(usage::MESSAGES_OUTPUT)
            }),
        );
    }
    let start = json!({
        "type": "message_start",
        "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": message_usage(1)
        }
    });
    let mut events = vec![
        (named("message_start", &start), false),
        (
            named(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            false,
        ),
        (named("ping", &json!({"type": "ping"})), false),
    ];
    for p in pieces(scenario) {
        events.push((
            named(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
            ),
            false,
        ));
    }
    events.push((
        named(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        false,
    ));
    // The usage of message_delta is cumulative: a first one part-way, then the final one.
    events.push((
        named(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": null, "stop_sequence": null}, "usage": {"output_tokens": usage::MESSAGES_OUTPUT / 2}}),
        ),
        true,
    ));
    events.push((
        named(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": usage::MESSAGES_OUTPUT}}),
        ),
        false,
    ));
    events.push((
        named("message_stop", &json!({"type": "message_stop"})),
        false,
    ));
    sse(events, scenario, guard, "request-id", request_id)
}

async fn count_tokens(State(seen): State<Arc<Seen>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let _guard = InFlight::enter(&seen, &headers, &req);
    json_answer(
        "request-id",
        "req_mock_count",
        json!({"input_tokens": usage::COUNT_TOKENS}),
    )
}

async fn models() -> Result<Response, Infallible> {
    Ok(axum::Json(json!({"object": "list", "data": []})).into_response())
}
