//! What `serve` answers while it cannot start yet: the database cannot be reached, so the
//! ledger cannot be restored, and deciding without the restored counters would not be exact.
//! `/healthz` answers (the process is alive), `/readyz` is 503 with the reason, and every
//! other request gets a 503 `starting` error with `Retry-After`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::ApiError;

/// Why spendguard is not serving yet (shared with the start-up loop, which updates it).
#[derive(Clone, Debug, Default)]
pub struct Starting {
    reason: Arc<Mutex<String>>,
}

impl Starting {
    pub fn set_reason(&self, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The router of the starting phase.
pub fn app(starting: Starting) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_yet)
        .with_state(starting)
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(s): State<Starting>) -> Response {
    let body = json!({ "ready": false, "store": "starting", "reason": s.reason() });
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

async fn not_yet() -> Response {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "spendguard is starting: the usage database cannot be reached yet",
    );
    e.headers
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    e.into_response()
}

/// Serves the starting phase on `listener` until `until` resolves.
pub async fn serve(
    listener: TcpListener,
    starting: Starting,
    until: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(starting))
        .with_graceful_shutdown(until)
        .await
}
