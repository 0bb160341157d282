//! Errors in the provider's own shape, so SDKs raise their usual exceptions (a 429 is the
//! SDK's `RateLimitError`, and its retry logic reads `Retry-After`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use spendguard_core::config::UpstreamKind;

/// An error answer of the gateway.
#[derive(Debug)]
pub struct GatewayError {
    pub status: StatusCode,
    /// spendguard's code (`budget_exceeded`, `model_not_found`, …).
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl GatewayError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        GatewayError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// The answer in the shape of `kind`'s API.
    pub fn answer(self, kind: UpstreamKind) -> Response {
        let body = match kind {
            UpstreamKind::Openai => json!({"error": {
                "message": self.message,
                "type": openai_type(self.status, self.code),
                "param": null,
                "code": self.code,
            }}),
            UpstreamKind::Anthropic => json!({
                "type": "error",
                "error": {"type": anthropic_type(self.status), "message": self.message},
            }),
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
            // The SDKs retry a 429 on their own, after at most a minute whatever
            // Retry-After says: a denial that lasts longer (a daily budget) is final now.
            if s > 60 {
                r.headers_mut()
                    .insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn openai_type(status: StatusCode, code: &str) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "invalid_request_error",
        429 if code == "budget_exceeded" => "insufficient_quota",
        429 => "rate_limit_exceeded",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}
