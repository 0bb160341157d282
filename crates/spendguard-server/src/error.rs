//! `ApiError`: every error the API answers, in one JSON shape:
//! `{"error": {"code": "...", "message": "...", ...details}}`, with a fitting status.
//!
//! The extractors here (`ApiJson`, `ApiQuery`) turn malformed requests into the same shape,
//! and [`normalize_errors`] rewrites any error response produced outside the handlers
//! (unknown route, wrong method, timeout, body too large) into it too.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use spendguard_core::LedgerError;
use spendguard_guard::GuardError;

/// An error answer (boxed: results stay small on the success path).
#[derive(Debug)]
pub struct ApiError(Box<ErrorBody>);

/// The parts of an error answer.
#[derive(Debug)]
pub struct ErrorBody {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra fields of the `error` object (e.g. `limits`).
    pub details: serde_json::Map<String, Value>,
    pub headers: HeaderMap,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(ErrorBody {
            status,
            code,
            message: message.into(),
            details: Default::default(),
            headers: HeaderMap::new(),
        }))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.headers
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        e
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        self.details.insert(key.to_owned(), value);
        self
    }
}

impl std::ops::Deref for ApiError {
    type Target = ErrorBody;
    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorBody {
        &mut self.0
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = *self.0;
        let mut error = serde_json::Map::new();
        error.insert("code".into(), Value::from(this.code));
        error.insert("message".into(), Value::from(this.message));
        error.extend(this.details);
        let mut response = (this.status, axum::Json(json!({ "error": error }))).into_response();
        response.headers_mut().extend(this.headers);
        response
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> ApiError {
        let message = e.to_string();
        match e {
            LedgerError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            LedgerError::AlreadySettled { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_settled", message)
            }
            LedgerError::CommitMismatch(_) => {
                ApiError::new(StatusCode::CONFLICT, "commit_conflict", message)
            }
            LedgerError::IdempotencyConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            LedgerError::DuplicateId(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            LedgerError::UnknownTier(_)
            | LedgerError::InvalidTtl { .. }
            | LedgerError::ExpiredStatus
            | LedgerError::Overflow
            | LedgerError::LargeReservationTtl { .. }
            | LedgerError::RecordCostTooLarge { .. }
            | LedgerError::RecordTokensTooLarge { .. } => ApiError::bad_request(message),
        }
    }
}

impl From<GuardError> for ApiError {
    fn from(e: GuardError) -> ApiError {
        match e {
            GuardError::Ledger(e) => e.into(),
            GuardError::Unavailable => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the usage store is unavailable; new reservations are refused until it is back",
                );
                e.headers
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                e
            }
            GuardError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "spendguard is shutting down",
            ),
            GuardError::Store(e) => {
                tracing::error!(error = %e, "store error while answering a request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the usage store failed",
                )
            }
            GuardError::Spool(e) | GuardError::SpoolRefused(e) => {
                tracing::error!(error = %e, "spool error while answering a request");
                ApiError::internal()
            }
            // The request was valid but the store cannot hold a value of it: retrying will
            // not help. The change was kept as a dead letter (logged where it was handled).
            GuardError::Rejected(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_stored",
                "the usage store refused this change for good; it was not applied and was kept \
                 for an operator",
            ),
            // Only at start-up.
            e @ GuardError::TimeZoneChanged { .. } => {
                tracing::error!(error = %e, "unexpected start-up error while answering a request");
                ApiError::internal()
            }
        }
    }
}

/// A JSON body: malformed or invalid bodies answer in the API's error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonDataError(e) => ApiError::bad_request(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(e) => {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::bad_request(e.body_text())
            }
        }
        other => ApiError::new(other.status(), "invalid_request", other.body_text()),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!(
            "the request body is larger than {} bytes",
            crate::BODY_LIMIT
        ),
    )
}

/// A query string, with the API's error shape on failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::bad_request(e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Rewrites error responses made outside the handlers (no route, wrong method, timeout,
/// body limit, panic) into the API's error shape.
pub async fn normalize_errors(req: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // JSON errors are already in shape; HTML pages (the dashboard's) are answers of their own.
    let own_body = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json") || v.as_bytes().starts_with(b"text/html")
        });
    if own_body {
        return response;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "this route does not take that method")
        }
        StatusCode::PAYLOAD_TOO_LARGE => return too_large().into_response(),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long"),
        s if s.is_server_error() => ("internal", "internal error; see the server log"),
        _ => ("invalid_request", "the request could not be handled"),
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}
