//! The v1 handlers and their request and response bodies.
//!
//! Request bodies convert to domain types once, at the edge: ids, money and model names are
//! parsed by their types' `Deserialize`, and unknown fields are rejected.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use spendguard_core::{
    BudgetOverride, CheckOutcome, CommitRequest, CompanyId, Denial, Endpoint, IdempotencyKey,
    LimitStatus, Micros, ModelName, Money, RecordRequest, RequestStatus, ReserveRequest, ScopeKey,
    Settlement, Subject, TenantId, TierName, Tokens, Unit, UserId, UserOverrides, Window,
};
use uuid::Uuid;

use crate::AppState;
use crate::auth::{Caller, create_key};
use crate::error::{ApiError, ApiJson, ApiQuery};

// ---------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------

/// Who calls which model (on reserve, check and record).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    #[schemars(with = "crate::openapi::Id")]
    pub user_id: UserId,
    #[schemars(with = "crate::openapi::Id")]
    pub tenant_id: TenantId,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub company_id: Option<CompanyId>,
    /// The user's tier; else the stored tier; else the configured default.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tier: Option<TierName>,
    #[schemars(with = "crate::openapi::Id")]
    pub model: ModelName,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub endpoint: Option<Endpoint>,
    pub input_tokens: u64,
    /// Defaults to the tier's maximum.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// A worst-case cost instead of the price-table estimate (number or decimal string).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::UsdIn>")]
    pub estimated_cost_usd: Option<Money>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub idempotency_key: Option<IdempotencyKey>,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

impl ReserveBody {
    /// `trusted_tier`: the caller may name any tier (the admin key).
    fn into_request(self, trusted_tier: bool) -> Result<ReserveRequest, ApiError> {
        let ttl_us = match self.ttl_seconds {
            None => None,
            Some(s) => Some(
                i64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(1_000_000))
                    .ok_or_else(|| ApiError::bad_request("ttl_seconds is too large"))?,
            ),
        };
        Ok(ReserveRequest {
            id: Uuid::nil(),
            subject: Subject {
                tenant: self.tenant_id,
                user: self.user_id,
                company: self.company_id,
                tier: self.tier,
                trusted_tier,
                model: self.model,
                endpoint: self.endpoint,
            },
            input_tokens: token_count("input_tokens", self.input_tokens)?,
            max_output_tokens: self
                .max_output_tokens
                .map(|n| token_count("max_output_tokens", n))
                .transpose()?,
            estimated_cost: self.estimated_cost_usd,
            idempotency_key: self.idempotency_key,
            ttl_us,
        })
    }
}

/// The actual usage of a reserved call.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: Option<u64>,
    /// Prompt tokens written to the provider's prompt cache, 1-hour writes included (part of
    /// `input_tokens`).
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// The part of `cache_creation_input_tokens` written to the 1-hour cache.
    #[serde(default)]
    pub cache_creation_1h_input_tokens: Option<u64>,
    /// Reasoning tokens (part of `output_tokens`); priced apart only where the price list
    /// prices them apart.
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    /// The real cost, if known; else computed from the tokens.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::UsdIn>")]
    pub cost_usd: Option<Money>,
    /// `success` (default), `error`, `cancelled` or `truncated` (cut off before its usage
    /// was known: a commit is then charged at least its estimate).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::CommitStatus>")]
    pub status: Option<RequestStatus>,
}

/// The largest token count accepted: the store keeps counts as signed 64-bit integers, so a
/// larger one would be stored clamped; it is refused instead.
pub const MAX_TOKENS: u64 = i64::MAX as u64;

/// Refuses a token count the store cannot hold.
fn token_count(field: &str, n: u64) -> Result<u64, ApiError> {
    if n > MAX_TOKENS {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {MAX_TOKENS}"
        )));
    }
    Ok(n)
}

/// The token counts of a commit or a record, as sent.
struct TokenCounts {
    input: u64,
    output: u64,
    cached: Option<u64>,
    creation: Option<u64>,
    creation_1h: Option<u64>,
    reasoning: Option<u64>,
}

/// Checks that each part is within its whole: cache reads and writes within the prompt, the
/// 1-hour writes within the writes, reasoning within the output.
fn tokens(c: TokenCounts) -> Result<Tokens, ApiError> {
    let input = token_count("input_tokens", c.input)?;
    let output = token_count("output_tokens", c.output)?;
    let cached = token_count("cached_input_tokens", c.cached.unwrap_or(0))?;
    let creation = token_count("cache_creation_input_tokens", c.creation.unwrap_or(0))?;
    let creation_1h = token_count("cache_creation_1h_input_tokens", c.creation_1h.unwrap_or(0))?;
    let reasoning = token_count("reasoning_tokens", c.reasoning.unwrap_or(0))?;
    if cached > input {
        return Err(ApiError::bad_request(
            "cached_input_tokens cannot exceed input_tokens (input_tokens counts all prompt tokens)",
        ));
    }
    if creation > input - cached {
        return Err(ApiError::bad_request(
            "cached_input_tokens plus cache_creation_input_tokens cannot exceed input_tokens \
             (input_tokens counts all prompt tokens, cache reads and writes included)",
        ));
    }
    if creation_1h > creation {
        return Err(ApiError::bad_request(
            "cache_creation_1h_input_tokens cannot exceed cache_creation_input_tokens \
             (the 1-hour writes are part of the cache writes)",
        ));
    }
    if reasoning > output {
        return Err(ApiError::bad_request(
            "reasoning_tokens cannot exceed output_tokens (reasoning tokens are output tokens)",
        ));
    }
    Ok(Tokens {
        input,
        cached_input: cached,
        output,
        cache_creation: creation,
        cache_creation_1h: creation_1h,
        reasoning,
    })
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    #[serde(default)]
    pub reason: Option<String>,
}

/// Usage of a call that was not reserved.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBody {
    #[schemars(with = "crate::openapi::Id")]
    pub user_id: UserId,
    #[schemars(with = "crate::openapi::Id")]
    pub tenant_id: TenantId,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub company_id: Option<CompanyId>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tier: Option<TierName>,
    #[schemars(with = "crate::openapi::Id")]
    pub model: ModelName,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub endpoint: Option<Endpoint>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: Option<u64>,
    /// Prompt tokens written to the provider's prompt cache, 1-hour writes included (part of
    /// `input_tokens`).
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    /// The part of `cache_creation_input_tokens` written to the 1-hour cache.
    #[serde(default)]
    pub cache_creation_1h_input_tokens: Option<u64>,
    /// Reasoning tokens (part of `output_tokens`); priced apart only where the price list
    /// prices them apart.
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::UsdIn>")]
    pub cost_usd: Option<Money>,
    /// `success` (default), `error`, `cancelled` or `truncated` (cut off before its usage
    /// was known: a commit is then charged at least its estimate).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::CommitStatus>")]
    pub status: Option<RequestStatus>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// When the call was made (RFC 3339), for importing history: admin key only; from
    /// 1970 to now. The record counts in the day and month of that time.
    #[serde(default)]
    #[schemars(with = "Option<crate::api::Rfc3339>")]
    pub created_at: Option<String>,
}

/// How far ahead of the server's clock a `created_at` may be (another machine's clock);
/// it is then taken as now.
pub const CREATED_AT_SKEW_US: i64 = 300_000_000;

/// Checks a backfilled record's time: RFC 3339, not before 1970, not after now (give or
/// take [`CREATED_AT_SKEW_US`]).
pub fn created_at(s: &str, now: Micros) -> Result<Micros, ApiError> {
    let t: jiff::Timestamp = s
        .trim()
        .parse()
        .map_err(|e| ApiError::bad_request(format!("created_at is not an RFC 3339 time: {e}")))?;
    let at = t.as_microsecond();
    if at < 0 {
        return Err(ApiError::bad_request("created_at is before 1970"));
    }
    if at > now.saturating_add(CREATED_AT_SKEW_US) {
        return Err(ApiError::bad_request("created_at is in the future"));
    }
    Ok(at.min(now))
}

/// Absent: unchanged. `null`: cleared. A value: set.
fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    /// USD per calendar day; `null` clears the override.
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(with = "Option<crate::openapi::UsdIn>")]
    pub daily_usd: Option<Option<Money>>,
    /// USD per calendar month; `null` clears the override.
    #[serde(default, deserialize_with = "double_option")]
    #[schemars(with = "Option<crate::openapi::UsdIn>")]
    pub monthly_usd: Option<Option<Money>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsQuery {
    #[schemars(with = "crate::openapi::Id")]
    pub user_id: UserId,
    /// The user's tenant: required with the admin key; a tenant key's own by default.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub company_id: Option<CompanyId>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tier: Option<TierName>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    #[schemars(with = "crate::openapi::Id")]
    pub tenant_id: TenantId,
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

pub fn rfc3339(t: Micros) -> String {
    jiff::Timestamp::from_microsecond(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// An instant written as RFC 3339 straight into the output (no intermediate string).
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub Micros);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match jiff::Timestamp::from_microsecond(self.0) {
            Ok(t) => s.collect_str(&t),
            Err(_) => s.serialize_none(),
        }
    }
}

/// One limit entry of the contract, serialized without building a JSON tree. The amounts
/// are left out of the global scope's entries shown to a tenant key.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LimitOut<'a> {
    #[schemars(with = "crate::openapi::ScopeName")]
    scope: &'static str,
    scope_id: &'a str,
    #[schemars(with = "crate::openapi::WindowName")]
    window: &'static str,
    #[schemars(with = "crate::openapi::UnitName")]
    unit: &'static str,
    /// USD for `usd`, a count otherwise (as for the next three). Left out of the global
    /// scope's entries shown to a tenant key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<f64>")]
    limit: Option<spendguard_core::Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<f64>")]
    used: Option<spendguard_core::Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<f64>")]
    reserved: Option<spendguard_core::Amount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<f64>")]
    remaining: Option<spendguard_core::Amount>,
    /// When the window ends (`null`: a concurrency limit).
    resets_at: Option<Rfc3339>,
    /// True when the limit is in shadow: counted like the others, but it never refuses a
    /// request (where it would have, the answer says so in `would_deny`).
    shadow: bool,
}

/// A limit entry, for the OpenAPI document.
pub type LimitDoc = LimitOut<'static>;

/// Who an answer is for: a tenant key sees its own scopes in full, and of the global
/// scope only which limit applies and when it resets, never the amounts (they would show
/// the other tenants' spend as it happens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Admin,
    Tenant,
}

impl View {
    pub fn of(caller: &Caller) -> View {
        match caller {
            Caller::Admin => View::Admin,
            Caller::Tenant(_) => View::Tenant,
        }
    }

    /// Whether this view shows the amounts of `l`.
    fn shows(self, l: &LimitStatus) -> bool {
        self == View::Admin || l.scope != ScopeKey::Global
    }
}

/// A list of limits, serialized entry by entry.
#[derive(Debug)]
pub struct LimitsOut<'a>(pub &'a [LimitStatus], pub View);

impl JsonSchema for LimitsOut<'_> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Limits".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        g.subschema_for::<Vec<LimitDoc>>()
    }
}

impl Serialize for LimitsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|l| {
            let shown = self.1.shows(l);
            let amount = |a: spendguard_core::Amount| shown.then_some(a);
            LimitOut {
                scope: l.scope.kind().as_str(),
                scope_id: l.scope.id(),
                window: l.window.as_str(),
                unit: l.unit_str(),
                limit: amount(l.limit),
                used: amount(l.used),
                reserved: amount(l.reserved),
                remaining: amount(l.remaining),
                resets_at: l.resets_at.map(Rfc3339),
                shadow: l.shadow,
            }
        }))
    }
}

fn limits_json(limits: &[LimitStatus], view: View) -> Value {
    serde_json::to_value(LimitsOut(limits, view)).unwrap_or(Value::Null)
}

/// The error for a refused reservation, with `Retry-After` and the IETF `RateLimit` headers.
fn denial_error(denial: &Denial, now: Micros, view: View) -> ApiError {
    match denial {
        Denial::Limits(failing) => {
            let budget = denial.is_budget();
            let (code, what) = if budget {
                ("budget_exceeded", "a budget")
            } else {
                ("rate_limited", "a rate limit")
            };
            let names: Vec<String> = failing
                .iter()
                .map(|l| {
                    format!(
                        "{} {} {}/{}",
                        l.scope.kind().as_str(),
                        l.scope.id(),
                        l.unit_str(),
                        l.window.as_str()
                    )
                })
                .collect();
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                code,
                format!("this call would exceed {what}: {}", names.join(", ")),
            )
            .with("limits", limits_json(failing, view));
            let retry = denial
                .retry_at()
                .map(|t| ((t - now).max(0) + 999_999) / 1_000_000)
                .unwrap_or(1)
                .max(1);
            e.headers
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            // The headers quote the first failing limit this caller may see the amounts of.
            if let Some(first) = failing.iter().find(|l| view.shows(l)) {
                let (limit, remaining) = (amount_num(first.limit), amount_num(first.remaining));
                let window = match first.window {
                    Window::Minute => 60,
                    Window::Day => 86_400,
                    Window::Month => 2_592_000,
                    // No limit counts in a week; kept for exhaustiveness.
                    Window::Week => 604_800,
                    Window::None => 1,
                };
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "\"{}\";q={};w={}",
                    first.unit_str(),
                    limit,
                    window
                )) {
                    e.headers.insert("ratelimit-policy", v);
                }
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "\"{}\";r={};t={}",
                    first.unit_str(),
                    remaining,
                    retry
                )) {
                    e.headers.insert("ratelimit", v);
                }
            }
            e
        }
        Denial::ModelNotAllowed { model, tier } => ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("tier `{tier}` may not call model `{model}`"),
        ),
        Denial::UnknownModel { model } => ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_model",
            format!(
                "model `{model}` has no price and unknown models are denied; pass estimated_cost_usd or configure a price"
            ),
        ),
        Denial::OutputTokensTooHigh { requested, max } => ApiError::new(
            StatusCode::FORBIDDEN,
            "max_output_tokens_exceeded",
            format!("max_output_tokens {requested} is above the tier's maximum of {max}"),
        ),
        Denial::TooManySubjects { tenant, limit, .. } => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_subjects",
                format!(
                    "tenant `{tenant}` already has {limit} users and companies tracked this month (max_tracked_subjects); reservations for new ones are refused until they are freed"
                ),
            )
            .with("limit", Value::from(*limit));
            let retry = denial
                .retry_at()
                .map(|t| ((t - now).max(0) + 999_999) / 1_000_000)
                .unwrap_or(1)
                .max(1);
            e.headers
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            e
        }
    }
}

/// A limit's amount as a plain number (integers for counts, USD for money).
fn amount_num(a: spendguard_core::Amount) -> String {
    match a {
        spendguard_core::Amount::Usd(m) => m.to_string(),
        spendguard_core::Amount::Count(n) => n.to_string(),
    }
}

pub trait UnitStr {
    fn unit_str(&self) -> &'static str;
}

impl UnitStr for LimitStatus {
    fn unit_str(&self) -> &'static str {
        match self.unit {
            Unit::Usd => "usd",
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::Concurrent => "concurrent",
        }
    }
}

fn denial_json(d: &Denial, now: Micros, view: View) -> Value {
    let e = denial_error(d, now, view);
    let mut m = serde_json::Map::new();
    m.insert("code".into(), e.code.into());
    m.insert("message".into(), e.message.clone().into());
    m.extend(e.details.clone());
    Value::Object(m)
}

/// A usage record as the API shows it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageOut<'a> {
    #[schemars(with = "crate::openapi::UuidStr")]
    usage_id: Uuid,
    #[schemars(with = "Option<crate::openapi::UuidStr>")]
    reservation_id: Option<Uuid>,
    tenant_id: &'a str,
    user_id: &'a str,
    company_id: Option<&'a str>,
    model: &'a str,
    endpoint: Option<&'a str>,
    subscription_tier: &'a str,
    input_tokens: u64,
    cached_input_tokens: u64,
    /// Prompt tokens written to the cache (part of `input_tokens`), 1-hour writes included.
    cache_creation_input_tokens: u64,
    /// The part of `cache_creation_input_tokens` written to the 1-hour cache.
    cache_creation_1h_input_tokens: u64,
    output_tokens: u64,
    /// Reasoning tokens (part of `output_tokens`).
    reasoning_tokens: u64,
    #[schemars(with = "crate::openapi::Usd")]
    cost_usd: Money,
    /// How `cost_usd` was found: `catalog`, `config`, `tenant_override`, `caller`,
    /// `estimate`, `default` or `free`.
    #[schemars(with = "crate::openapi::PricingName")]
    pricing: &'static str,
    /// The long-context tier the call was priced at (its threshold in prompt tokens), when
    /// its prompt was above one.
    long_context_above: Option<u64>,
    #[schemars(with = "crate::openapi::RequestStatusName")]
    request_status: &'static str,
    created_at: Rfc3339,
}

/// A usage record, for the OpenAPI document.
pub type UsageDoc = UsageOut<'static>;

fn usage_out(u: &spendguard_core::UsageRecord) -> UsageOut<'_> {
    UsageOut {
        usage_id: u.id,
        reservation_id: u.reservation_id,
        tenant_id: u.tenant.as_str(),
        user_id: u.user.as_str(),
        company_id: u.company.as_ref().map(|c| c.as_str()),
        model: u.model.as_str(),
        endpoint: u.endpoint.as_ref().map(|e| e.as_str()),
        subscription_tier: u.tier.as_str(),
        input_tokens: u.tokens.input,
        cached_input_tokens: u.tokens.cached_input,
        cache_creation_input_tokens: u.tokens.cache_creation,
        cache_creation_1h_input_tokens: u.tokens.cache_creation_1h,
        output_tokens: u.tokens.output,
        reasoning_tokens: u.tokens.reasoning,
        cost_usd: u.cost,
        pricing: u.pricing.as_str(),
        long_context_above: u.long_context_above,
        request_status: u.status.as_str(),
        created_at: Rfc3339(u.created_at),
    }
}

/// The answer to a direct record: the usage record, and whether it is the answer to an
/// earlier request with the same idempotency key.
#[derive(Serialize)]
struct RecordedOut<'a> {
    #[serde(flatten)]
    usage: UsageOut<'a>,
    replayed: bool,
}

/// The answer to a commit: the usage record and how it was settled.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CommittedOut<'a> {
    #[serde(flatten)]
    usage: UsageOut<'a>,
    #[schemars(with = "crate::openapi::Usd")]
    reserved_cost_usd: Money,
    /// The same commit was answered before: this is its record.
    replayed: bool,
    /// Committed after the reservation expired: recorded on its own.
    late: bool,
}

/// A commit's answer, for the OpenAPI document.
pub type CommittedDoc = CommittedOut<'static>;

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

pub async fn reserve(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ReserveBody>,
) -> Result<Response, ApiError> {
    caller.may_act_on(&body.tenant_id)?;
    let view = View::of(&caller);
    let req = body.into_request(view == View::Admin)?;
    let now = state.guard.now();
    match state.guard.reserve(req).await? {
        Ok(r) => {
            state.metrics.decision("admitted", "ok");
            let status = if r.replayed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = ReservedOut {
                reservation_id: r.reservation.id,
                reserved_cost_usd: r.reservation.estimate,
                reserved_tokens: r.reservation.estimated_tokens,
                expires_at: Rfc3339(r.reservation.expires_at),
                tier: r.reservation.tier.as_str(),
                replayed: r.replayed,
                limits: LimitsOut(&r.limits, view),
                would_deny: r.would_deny.as_ref().map(|d| denial_json(d, now, view)),
            };
            Ok((status, Json(body)).into_response())
        }
        Err(outcome) => {
            let denial = outcome.denial.expect("a refused reservation has a denial");
            let e = denial_error(&denial, now, view);
            state.metrics.decision("denied", e.code);
            Err(e)
        }
    }
}

/// The answer to an admitted reservation.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReservedOut<'a> {
    #[schemars(with = "crate::openapi::UuidStr")]
    reservation_id: Uuid,
    #[schemars(with = "crate::openapi::Usd")]
    reserved_cost_usd: Money,
    reserved_tokens: u64,
    expires_at: Rfc3339,
    tier: &'a str,
    /// The same idempotency key and body were answered before (status 200).
    replayed: bool,
    limits: LimitsOut<'a>,
    /// What limits in shadow would have refused, had they been enforced (the error a
    /// refusal carries: `code`, `message`, `limits`); `null` when none would have. The
    /// reservation is admitted either way.
    #[schemars(with = "Option<crate::openapi::ErrorDetail>")]
    would_deny: Option<Value>,
}

/// A reservation's answer, for the OpenAPI document.
pub type ReservedDoc = ReservedOut<'static>;

/// The answer to a check.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckOut {
    pub allowed: bool,
    #[schemars(with = "LimitsOut<'static>")]
    pub limits: Value,
    /// Why it would be refused (`null`: it would be admitted).
    #[schemars(with = "Option<crate::openapi::ErrorDetail>")]
    pub denial: Option<Value>,
    /// When admitted: what limits in shadow would refuse, had they been enforced (`null`
    /// when none would).
    #[schemars(with = "Option<crate::openapi::ErrorDetail>")]
    pub would_deny: Option<Value>,
}

pub async fn check(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ReserveBody>,
) -> Result<Json<CheckOut>, ApiError> {
    caller.may_act_on(&body.tenant_id)?;
    let view = View::of(&caller);
    let req = body.into_request(view == View::Admin)?;
    let s = &req.subject;
    state
        .guard
        .refresh(&s.tenant, &s.user, s.company.as_ref())
        .await?;
    let now = state.guard.now();
    let CheckOutcome {
        limits,
        denial,
        would_deny,
    } = state.guard.check(&req)?;
    Ok(Json(CheckOut {
        allowed: denial.is_none(),
        limits: limits_json(&limits, view),
        denial: denial.as_ref().map(|d| denial_json(d, now, view)),
        would_deny: would_deny.as_ref().map(|d| denial_json(d, now, view)),
    }))
}

fn parse_reservation_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_request(format!(
            "`{}` is not a reservation id (a UUID)",
            id.chars().take(64).collect::<String>()
        ))
    })
}

/// Refuses a tenant key acting on another tenant's reservation (as a 404: it does not
/// reveal that the id exists).
async fn authorize_reservation(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
) -> Result<(), ApiError> {
    if let Caller::Tenant(t) = caller {
        match state.guard.reservation_tenant(id).await? {
            Some(owner) if &owner == t => {}
            // Another tenant's id answers exactly as an unknown one.
            Some(_) | None => {
                return Err(ApiError::not_found(format!("reservation {id} not found")));
            }
        }
    }
    Ok(())
}

pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CommitBody>,
) -> Result<Response, ApiError> {
    let id = parse_reservation_id(&id)?;
    authorize_reservation(&state, &caller, id).await?;
    let req = CommitRequest {
        usage_id: Uuid::nil(),
        tokens: tokens(TokenCounts {
            input: body.input_tokens,
            output: body.output_tokens,
            cached: body.cached_input_tokens,
            creation: body.cache_creation_input_tokens,
            creation_1h: body.cache_creation_1h_input_tokens,
            reasoning: body.reasoning_tokens,
        })?,
        cost: body.cost_usd,
        status: body.status.unwrap_or(RequestStatus::Success),
        origin: None,
    };
    let c = state.guard.commit(id, req).await?;
    if !c.replayed {
        state.metrics.spend(c.usage.cost);
    }
    let body = CommittedOut {
        usage: usage_out(&c.usage),
        reserved_cost_usd: c.reserved,
        replayed: c.replayed,
        late: c.late,
    };
    Ok(Json(body).into_response())
}

pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ReleasedOut>, ApiError> {
    let id = parse_reservation_id(&id)?;
    // The body is optional: empty means no reason.
    let body: ReleaseBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReleaseBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            if e.is_data() {
                ApiError::bad_request(e.to_string())
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
            }
        })?
    };
    let reason = body.reason;
    if let Some(r) = &reason {
        free_text("reason", r, 1024)?;
    }
    authorize_reservation(&state, &caller, id).await?;
    let s = state.guard.release(id, reason).await?;
    let state_name = match s {
        Settlement::Released { .. } => "released",
        Settlement::Expired(_) => "expired",
        Settlement::Committed(_) => "committed",
    };
    Ok(Json(ReleasedOut {
        reservation_id: id,
        state: state_name,
    }))
}

/// The answer to a release: the state the reservation is in (a release of a reservation
/// already released or expired answers the same).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReleasedOut {
    #[schemars(with = "crate::openapi::UuidStr")]
    pub reservation_id: Uuid,
    #[schemars(with = "crate::openapi::SettledName")]
    pub state: &'static str,
}

pub async fn record(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<UsageBody>,
) -> Result<Response, ApiError> {
    caller.may_act_on(&body.tenant_id)?;
    let at = match &body.created_at {
        None => None,
        Some(_) if caller != Caller::Admin => {
            return Err(ApiError::forbidden(
                "only the admin key may record usage at another time (created_at)",
            ));
        }
        Some(s) => Some(created_at(s, state.guard.now())?),
    };
    let req = RecordRequest {
        id: Uuid::nil(),
        tokens: tokens(TokenCounts {
            input: body.input_tokens,
            output: body.output_tokens,
            cached: body.cached_input_tokens,
            creation: body.cache_creation_input_tokens,
            creation_1h: body.cache_creation_1h_input_tokens,
            reasoning: body.reasoning_tokens,
        })?,
        subject: Subject {
            tenant: body.tenant_id,
            user: body.user_id,
            company: body.company_id,
            tier: body.tier,
            trusted_tier: matches!(caller, Caller::Admin),
            model: body.model,
            endpoint: body.endpoint,
        },
        cost: body.cost_usd,
        status: body.status.unwrap_or(RequestStatus::Success),
        idempotency_key: body.idempotency_key,
    };
    let (u, replayed) = state.guard.record_replayable_at(req, at).await?;
    if replayed {
        // The same idempotency key again: the first record, as a commit replay answers.
        return Ok((
            StatusCode::OK,
            Json(RecordedOut {
                usage: usage_out(&u),
                replayed,
            }),
        )
            .into_response());
    }
    state.metrics.spend(u.cost);
    Ok((
        StatusCode::CREATED,
        Json(RecordedOut {
            usage: usage_out(&u),
            replayed,
        }),
    )
        .into_response())
}

pub async fn limits(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<LimitsQuery>,
) -> Result<Json<LimitsAnswer>, ApiError> {
    // As for reports: a tenant key reads its own tenant unless it names it.
    let tenant = match (&caller, q.tenant_id) {
        (_, Some(t)) => t,
        (Caller::Tenant(own), None) => own.clone(),
        (Caller::Admin, None) => {
            return Err(ApiError::bad_request(
                "users belong to a tenant: add ?tenant_id= (a tenant key may leave it out)",
            ));
        }
    };
    caller.may_act_on(&tenant)?;
    let view = View::of(&caller);
    state
        .guard
        .refresh(&tenant, &q.user_id, q.company_id.as_ref())
        .await?;
    let limits = state.guard.ledger().limits_as(
        &tenant,
        &q.user_id,
        q.company_id.as_ref(),
        q.tier.as_ref(),
        view == View::Admin,
        state.guard.now(),
    )?;
    Ok(Json(LimitsAnswer {
        tenant_id: tenant.as_str().to_owned(),
        user_id: q.user_id.as_str().to_owned(),
        limits: limits_json(&limits, view),
    }))
}

/// A user's effective limits.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LimitsAnswer {
    pub tenant_id: String,
    pub user_id: String,
    #[schemars(with = "LimitsOut<'static>")]
    pub limits: Value,
}

fn scope_key(scope: &str, id: &str, tenant: Option<TenantId>) -> Result<ScopeKey, ApiError> {
    let need_tenant = || {
        tenant.clone().ok_or_else(|| {
            ApiError::bad_request("companies and users belong to a tenant: add ?tenant_id=")
        })
    };
    let bad = |e: spendguard_core::IdError| ApiError::bad_request(e.to_string());
    Ok(match scope {
        "global" => {
            if id != "global" {
                return Err(ApiError::bad_request("the global scope's id is `global`"));
            }
            ScopeKey::Global
        }
        "tenant" => ScopeKey::Tenant(TenantId::parse(id).map_err(bad)?),
        "company" => ScopeKey::Company(need_tenant()?, CompanyId::parse(id).map_err(bad)?),
        "user" => ScopeKey::User(need_tenant()?, UserId::parse(id).map_err(bad)?),
        _ => {
            return Err(ApiError::bad_request(
                "scope is one of global, tenant, company, user",
            ));
        }
    })
}

/// Who changes something through the admin API, in the audit log.
const API_ACTOR: &str = "admin (API)";

/// Writes a change to the audit log (see `dashboard::audit`).
async fn audit(
    state: &AppState,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Result<(), ApiError> {
    crate::dashboard::audit::write(state, API_ACTOR, action, target, before, after)
        .await
        .map_err(|e| ApiError::from(spendguard_guard::GuardError::Store(e)))
}

fn caps_json(o: BudgetOverride) -> Value {
    let usd = |m: Option<Money>| m.map_or(Value::Null, |m| Value::String(m.to_string()));
    serde_json::json!({ "daily_usd": usd(o.daily), "monthly_usd": usd(o.monthly) })
}

pub async fn set_budget(
    State(state): State<AppState>,
    caller: Caller,
    Path((scope, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<TenantQuery>,
    ApiJson(body): ApiJson<BudgetBody>,
) -> Result<Json<BudgetOut>, ApiError> {
    caller.require_admin()?;
    let key = scope_key(&scope, &id, q.tenant_id)?;
    // A field left out keeps its value: read, change and write as one step, so two partial
    // updates racing each other both take effect.
    let mut before = BudgetOverride::default();
    let after = state
        .guard
        .update_budget(key.clone(), |current| {
            before = current;
            BudgetOverride {
                daily: body.daily_usd.unwrap_or(current.daily),
                monthly: body.monthly_usd.unwrap_or(current.monthly),
            }
        })
        .await?;
    let (label, _) = crate::dashboard::parts::scope_label(&key);
    audit(
        &state,
        "budget.set",
        &label,
        Some(caps_json(before)),
        Some(caps_json(after)),
    )
    .await?;
    Ok(Json(budget_out(&state, &key)))
}

pub async fn set_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    ApiQuery(q): ApiQuery<TenantQuery>,
    ApiJson(body): ApiJson<UserOverrides>,
) -> Result<Json<UserOut>, ApiError> {
    caller.require_admin()?;
    let user = UserId::parse(&user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tenant = q
        .tenant_id
        .ok_or_else(|| ApiError::bad_request("users belong to a tenant: add ?tenant_id="))?;
    let before = state.guard.ledger().user_overrides(&tenant, &user);
    state
        .guard
        .set_user(tenant.clone(), user.clone(), body.clone())
        .await?;
    audit(
        &state,
        "user.set",
        &format!("user {} ({})", user.as_str(), tenant.as_str()),
        before.map(|b| serde_json::to_value(b).unwrap_or_default()),
        Some(serde_json::to_value(&body).unwrap_or_default()),
    )
    .await?;
    Ok(Json(UserOut {
        tenant_id: tenant.as_str().to_owned(),
        user_id: user.as_str().to_owned(),
        overrides: body,
    }))
}

pub async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<KeyBody>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let (key, record) = create_key(
        state.guard.store(),
        &state.keys,
        Some(body.tenant_id.clone()),
        state.guard.now(),
    )
    .await
    .map_err(|e| ApiError::from(spendguard_guard::GuardError::Store(e)))?;
    audit(
        &state,
        "key.create",
        &format!("key {}", record.id),
        None,
        Some(serde_json::json!({ "id": record.id, "tenant_id": body.tenant_id.as_str(), "prefix": record.prefix })),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreatedOut {
            key,
            info: KeyOut::from(&record),
        }),
    )
        .into_response())
}

/// An API key as listings show it (never the key itself).
#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyOut {
    pub id: String,
    /// `null` for an admin key.
    pub tenant_id: Option<String>,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub created_at: Rfc3339,
    pub revoked_at: Option<Rfc3339>,
}

impl From<&spendguard_store::ApiKeyRecord> for KeyOut {
    fn from(k: &spendguard_store::ApiKeyRecord) -> KeyOut {
        KeyOut {
            id: k.id.clone(),
            tenant_id: k.tenant.as_ref().map(|t| t.as_str().to_owned()),
            prefix: k.prefix.clone(),
            created_at: Rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(Rfc3339),
        }
    }
}

/// A new key: shown in this answer only.
#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyCreatedOut {
    pub key: String,
    #[serde(flatten)]
    pub info: KeyOut,
}

/// Every API key.
#[derive(Debug, Serialize, JsonSchema)]
pub struct KeysOut {
    pub keys: Vec<KeyOut>,
}

/// A revoked key.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RevokedOut {
    pub id: String,
    pub revoked: bool,
}

pub async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<KeysOut>, ApiError> {
    caller.require_admin()?;
    let keys = state
        .guard
        .store()
        .list_api_keys()
        .await
        .map_err(|e| ApiError::from(spendguard_guard::GuardError::Store(e)))?;
    Ok(Json(KeysOut {
        keys: keys.iter().map(KeyOut::from).collect(),
    }))
}

pub async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RevokedOut>, ApiError> {
    caller.require_admin()?;
    let store = state.guard.store();
    let keys = store
        .list_api_keys()
        .await
        .map_err(|e| ApiError::from(spendguard_guard::GuardError::Store(e)))?;
    let Some(k) = keys
        .into_iter()
        .find(|k| k.id == id && k.revoked_at.is_none())
    else {
        return Err(ApiError::not_found("no such active API key"));
    };
    store
        .revoke_api_key(&k.id, state.guard.now())
        .await
        .map_err(|e| ApiError::from(spendguard_guard::GuardError::Store(e)))?;
    if let Ok(bytes) = hex::decode(&k.hash)
        && let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        state.keys.remove(&hash);
    }
    let tenant = k.tenant.as_ref().map(|t| t.as_str().to_owned());
    audit(
        &state,
        "key.revoke",
        &format!("key {}", k.id),
        Some(serde_json::json!({ "id": k.id, "tenant_id": tenant, "prefix": k.prefix, "revoked": false })),
        Some(serde_json::json!({ "id": k.id, "tenant_id": tenant, "prefix": k.prefix, "revoked": true })),
    )
    .await?;
    Ok(Json(RevokedOut {
        id: k.id,
        revoked: true,
    }))
}

/// Checks a free text the server stores: at most `max` bytes and no U+0000, which
/// PostgreSQL cannot hold in `text` (one such value would otherwise be refused by the store
/// after the decision was made).
fn free_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::bad_request(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if value.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "{field} must not contain the NUL character (U+0000)"
        )));
    }
    Ok(())
}

/// The process is up.
#[derive(Debug, Serialize, JsonSchema)]
pub struct HealthOut {
    /// Always `ok`.
    pub status: &'static str,
}

/// `GET /v1/admin/cluster`: the instances sharing this database.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ClusterOut {
    /// `single` or `cluster`.
    pub mode: &'static str,
    /// This instance (cluster mode).
    pub instance: Option<InstanceOut>,
    /// How this instance decides: `shared rows` in cluster mode (each batch under the
    /// locks of its rows, busy scopes through allowances), `memory` on one node.
    pub decisions: &'static str,
    /// An instance is live while its last heartbeat is younger than this (its lease):
    /// afterwards the others take back its allowances.
    pub live_within_seconds: u64,
    /// Every instance registered on the database, newest heartbeat first.
    pub instances: Vec<InstanceOut>,
    /// The kinds of scope decided through allowances (cluster mode).
    pub allowance_scopes: Vec<&'static str>,
    /// Every instance's allowances of busy scopes, by instance and scope.
    pub allowances: Vec<AllowanceHeldOut>,
    /// This instance's counters (cluster mode).
    pub stats: Option<ClusterStatsOut>,
}

/// Capacity of a busy scope's budget held by one instance.
#[derive(Debug, Serialize, JsonSchema)]
pub struct AllowanceHeldOut {
    pub instance: String,
    /// `global`, `tenant` or `company`.
    pub scope: String,
    /// The tenant (or the company's tenant); empty for the global scope.
    pub tenant_id: String,
    /// The tenant or the company; `global` for the global scope.
    pub scope_id: String,
    /// Capacity moved from the scope's budget to the instance, this day and this month.
    #[schemars(with = "crate::openapi::Usd")]
    pub granted_usd_day: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub granted_usd_month: Money,
    /// What the instance can still admit against it (null: the window has no cap).
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub free_usd_day: Option<Money>,
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub free_usd_month: Option<Money>,
    /// Reservations it admitted minus those it settled (below zero when it settled more
    /// than it admitted, for other instances).
    pub open_reservations: i64,
}

/// One instance of a cluster.
#[derive(Clone, Debug, Serialize, JsonSchema)]
pub struct InstanceOut {
    pub id: String,
    pub name: String,
    pub address: String,
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    pub heartbeat_at: String,
    pub stopped_at: Option<String>,
    /// Its heartbeat is recent and it did not stop.
    pub live: bool,
}

/// Counters of this instance in a cluster.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ClusterStatsOut {
    pub batches: u64,
    pub operations: u64,
    pub retries: u64,
    pub failures: u64,
    pub config_reloads: u64,
    pub config_version: i64,
    pub heartbeat_failing: bool,
    /// Batches that moved capacity from a busy scope's row to this instance.
    pub allowance_top_ups: u64,
    /// Heartbeats (and the shutdown) that folded this instance's allowances into the rows
    /// and gave back what it did not need.
    pub allowance_returns: u64,
    /// Allowances of lapsed instances this instance took back.
    pub allowance_reclaims: u64,
    /// Reservations refused by a budget decided through an allowance: at most these were
    /// false denials (capacity idle in another live instance's allowance).
    pub allowance_denials: u64,
    /// Of those, refusals while the cluster had the capacity free, idle in another live
    /// instance's allowance (as the batch saw it when it locked the row): false denials.
    pub false_denials: u64,
    /// Live instances as of the last heartbeat, this one included.
    pub live_instances: i64,
}

pub async fn cluster(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ClusterOut>, ApiError> {
    caller.require_admin()?;
    let Some((options, stats)) = state.guard.cluster() else {
        return Ok(Json(ClusterOut {
            mode: "single",
            instance: None,
            decisions: "memory",
            live_within_seconds: 0,
            instances: Vec::new(),
            allowance_scopes: Vec::new(),
            allowances: Vec::new(),
            stats: None,
        }));
    };
    let live_within = options.lease.as_secs().max(1);
    let pg =
        spendguard_store::Store::postgres(state.guard.store()).ok_or_else(ApiError::internal)?;
    let (now, list) = pg
        .cluster_instances()
        .await
        .map_err(spendguard_guard::GuardError::from)?;
    let time = rfc3339;
    let instances: Vec<InstanceOut> = list
        .into_iter()
        .map(|i| InstanceOut {
            id: i.id.to_string(),
            live: i.stopped_at.is_none()
                && now.saturating_sub(i.heartbeat_at) < (live_within as i64) * 1_000_000,
            name: i.name,
            address: i.address,
            version: i.version,
            started_at: time(i.started_at),
            heartbeat_at: time(i.heartbeat_at),
            stopped_at: i.stopped_at.map(time),
        })
        .collect();
    let me = instances
        .iter()
        .find(|i| i.id == options.id.to_string())
        .cloned();
    let allowances = state
        .guard
        .cluster_allowances()
        .await?
        .into_iter()
        .map(|a| AllowanceHeldOut {
            instance: a.instance.to_string(),
            scope: a.scope.kind().as_str().into(),
            tenant_id: a.scope.tenant().map_or("", |t| t.as_str()).into(),
            scope_id: a.scope.id().into(),
            granted_usd_day: a.granted_usd_day,
            granted_usd_month: a.granted_usd_month,
            free_usd_day: a.free_usd_day,
            free_usd_month: a.free_usd_month,
            open_reservations: a.open_reservations,
        })
        .collect();
    let kinds = options.allowances;
    let allowance_scopes = [
        (kinds.global, "global"),
        (kinds.tenant, "tenant"),
        (kinds.company, "company"),
    ]
    .into_iter()
    .filter_map(|(on, k)| on.then_some(k))
    .collect();
    Ok(Json(ClusterOut {
        mode: "cluster",
        instance: me,
        decisions: "shared rows",
        live_within_seconds: live_within,
        instances,
        allowance_scopes,
        allowances,
        stats: Some(ClusterStatsOut {
            batches: stats.batches,
            operations: stats.operations,
            retries: stats.retries,
            failures: stats.failures,
            config_reloads: stats.config_reloads,
            config_version: stats.config_version,
            heartbeat_failing: stats.heartbeat_failing,
            allowance_top_ups: stats.allowance_top_ups,
            allowance_returns: stats.allowance_returns,
            allowance_reclaims: stats.allowance_reclaims,
            allowance_denials: stats.allowance_denials,
            false_denials: stats.false_denials,
            live_instances: stats.live_instances,
        }),
    }))
}

pub async fn healthz() -> Json<HealthOut> {
    Json(HealthOut { status: "ok" })
}

/// Whether reservations are admitted, and the write path's state.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReadyOut {
    pub ready: bool,
    #[schemars(with = "crate::openapi::StoreHealthName")]
    pub store: spendguard_guard::StoreHealth,
    #[schemars(with = "crate::openapi::OnStoreErrorName")]
    pub on_store_error: spendguard_core::config::OnStoreError,
    /// Batches waiting in the spool for the store.
    pub spool_depth: u64,
    /// Events the store refused for good since start, kept as dead letters.
    pub dead_letters: u64,
    /// Why the service is not ready (the spool, the writer, the sweeper, deny mode).
    pub problems: Vec<&'static str>,
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let stats = state.guard.stats();
    let ready = state.guard.ready() && !state.shutting_down();
    let body = ReadyOut {
        ready,
        store: stats.health,
        on_store_error: stats.on_store_error,
        spool_depth: stats.spool_depth,
        dead_letters: stats.dead_letters,
        problems: state.guard.problems(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: needs the admin key or the metrics key.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match crate::auth::bearer_key(&headers) {
        Some(k) if state.keys.may_read_metrics(k) => open_metrics(State(state)).await,
        Some(_) => ApiError::unauthorized("unknown or revoked key").into_response(),
        None => ApiError::unauthorized(
            "send `Authorization: Bearer <key>` with the admin key or the metrics key",
        )
        .into_response(),
    }
}

/// The exposition, to whoever asks (the open metrics listener, bound to loopback).
pub async fn open_metrics(State(state): State<AppState>) -> Response {
    // Cluster mode: the budgets' gauges show what the cluster holds, not what this
    // instance last decided on.
    if let Err(e) = state.guard.refresh_shared().await {
        tracing::warn!(error = %e, "the budgets' gauges show this instance's last view");
    }
    let text = state.metrics.render(&state.guard, state.alerts.counts());
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (headers, text).into_response()
}

pub async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

pub async fn fallback() -> ApiError {
    ApiError::not_found("no such route")
}

// ---------------------------------------------------------------------------------------
// Reading back what the admin routes set, and the price table
// ---------------------------------------------------------------------------------------

/// A daily and a monthly cap (`null`: none).
#[derive(Clone, Copy, Debug, Serialize, JsonSchema)]
pub struct CapsOut {
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub daily_usd: Option<Money>,
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub monthly_usd: Option<Money>,
}

/// A scope's budget: the override set through the admin API and the caps in force.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BudgetOut {
    #[schemars(with = "crate::openapi::ScopeName")]
    pub scope: &'static str,
    pub scope_id: String,
    /// The tenant of a company or user scope.
    pub tenant_id: Option<String>,
    /// What the admin API set (`null` fields: the configuration applies).
    #[serde(rename = "override")]
    pub overrides: CapsOut,
    /// The caps enforced: the override, else the configuration.
    pub effective: CapsOut,
}

fn budget_out(state: &AppState, key: &ScopeKey) -> BudgetOut {
    let ledger = state.guard.ledger();
    let o = ledger.budget_override(key).unwrap_or_default();
    let e = ledger.budget_of(key);
    BudgetOut {
        scope: key.kind().as_str(),
        scope_id: key.id().to_owned(),
        tenant_id: key.tenant().map(|t| t.as_str().to_owned()),
        overrides: CapsOut {
            daily_usd: o.daily,
            monthly_usd: o.monthly,
        },
        effective: CapsOut {
            daily_usd: e.daily,
            monthly_usd: e.monthly,
        },
    }
}

/// `GET /v1/admin/budgets/{scope}/{id}`: what `PUT` set, and the caps in force.
pub async fn get_budget(
    State(state): State<AppState>,
    caller: Caller,
    Path((scope, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<TenantQuery>,
) -> Result<Json<BudgetOut>, ApiError> {
    caller.require_admin()?;
    let key = scope_key(&scope, &id, q.tenant_id)?;
    Ok(Json(budget_out(&state, &key)))
}

/// Every scope with a budget override.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BudgetsOut {
    pub budgets: Vec<BudgetOut>,
}

/// `GET /v1/admin/budgets`: every override, by scope kind then id.
pub async fn list_budgets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<BudgetsOut>, ApiError> {
    caller.require_admin()?;
    let budgets = state
        .guard
        .ledger()
        .budget_overrides()
        .into_iter()
        .map(|(key, _)| budget_out(&state, &key))
        .collect();
    Ok(Json(BudgetsOut { budgets }))
}

/// A user's stored tier and limit overrides (`null`: the tier's).
#[derive(Debug, Serialize, JsonSchema)]
pub struct UserOut {
    pub tenant_id: String,
    pub user_id: String,
    #[schemars(with = "crate::openapi::UserOverridesSchema")]
    pub overrides: UserOverrides,
}

/// `GET /v1/admin/users/{user_id}?tenant_id=`: what `PUT` set.
pub async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    ApiQuery(q): ApiQuery<TenantQuery>,
) -> Result<Json<UserOut>, ApiError> {
    caller.require_admin()?;
    let user = UserId::parse(&user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let tenant = q
        .tenant_id
        .ok_or_else(|| ApiError::bad_request("users belong to a tenant: add ?tenant_id="))?;
    let overrides = state
        .guard
        .ledger()
        .user_overrides(&tenant, &user)
        .unwrap_or_default();
    Ok(Json(UserOut {
        tenant_id: tenant.as_str().to_owned(),
        user_id: user.as_str().to_owned(),
        overrides,
    }))
}

/// Every user with stored overrides.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UsersOut {
    pub users: Vec<UserOut>,
}

/// `GET /v1/admin/users`: every user with overrides, by tenant then user.
pub async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<UsersOut>, ApiError> {
    caller.require_admin()?;
    let users = state
        .guard
        .ledger()
        .all_user_overrides()
        .into_iter()
        .map(|(tenant, user, overrides)| UserOut {
            tenant_id: tenant.as_str().to_owned(),
            user_id: user.as_str().to_owned(),
            overrides,
        })
        .collect();
    Ok(Json(UsersOut { users }))
}

/// The long-context tier of a price: above `above_tokens` prompt tokens, these replace the
/// base prices (USD per million tokens).
#[derive(Debug, Serialize, JsonSchema)]
pub struct LongContextOut {
    pub above_tokens: u64,
    #[schemars(with = "crate::openapi::Usd")]
    pub input: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub cached_input: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub cache_write: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub cache_write_1h: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub output: Money,
}

/// One model's effective price (token prices in USD per million tokens) and where it came
/// from.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PriceOut {
    /// The model name; dated names (`gpt-4o-2024-08-06`) resolve to it.
    pub model: String,
    /// Where the price came from: `catalog`, `config`, `tenant_override`, or for a model
    /// without a price, `default` (the configured default price) or `free`.
    #[schemars(with = "crate::openapi::PriceSourceName")]
    pub source: &'static str,
    /// The catalog's provider name (LiteLLM's `litellm_provider`), for a catalog price.
    pub provider: Option<&'static str>,
    /// The tenant's multiplier, when it scales this price.
    pub multiplier: Option<f64>,
    #[schemars(with = "crate::openapi::Usd")]
    pub input: Money,
    /// Prompt tokens read from the cache.
    #[schemars(with = "crate::openapi::Usd")]
    pub cached_input: Money,
    /// Prompt tokens written to the 5-minute cache.
    #[schemars(with = "crate::openapi::Usd")]
    pub cache_write: Money,
    /// Prompt tokens written to the 1-hour cache.
    #[schemars(with = "crate::openapi::Usd")]
    pub cache_write_1h: Money,
    #[schemars(with = "crate::openapi::Usd")]
    pub output: Money,
    /// Reasoning tokens (the output price unless priced apart).
    #[schemars(with = "crate::openapi::Usd")]
    pub reasoning: Money,
    /// USD per call, on top of the tokens.
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub per_request: Option<Money>,
    /// USD per input image (shown, not charged: records carry no image counts).
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub per_image_input: Option<Money>,
    /// USD per generated image (shown, not charged).
    #[schemars(with = "Option<crate::openapi::Usd>")]
    pub per_image_output: Option<Money>,
    pub long_context: Option<LongContextOut>,
}

impl PriceOut {
    pub fn new(
        model: &str,
        p: &spendguard_core::Price,
        source: &'static str,
        provider: Option<&'static str>,
        multiplier_ppm: u64,
    ) -> PriceOut {
        let write = p.cache_write.unwrap_or(p.input);
        PriceOut {
            model: model.to_owned(),
            source,
            provider,
            multiplier: (multiplier_ppm != spendguard_core::prices::PPM_ONE)
                .then(|| multiplier_ppm as f64 / 1e6),
            input: p.input,
            cached_input: p.cached_input(),
            cache_write: write,
            cache_write_1h: p.cache_write_1h.unwrap_or(write),
            output: p.output,
            reasoning: p.reasoning.unwrap_or(p.output),
            per_request: p.per_request,
            per_image_input: p.per_image_input,
            per_image_output: p.per_image_output,
            long_context: p.long_context.map(|lc| {
                let lc_write = lc.cache_write.or(p.cache_write).unwrap_or(lc.input);
                LongContextOut {
                    above_tokens: lc.above_tokens,
                    input: lc.input,
                    cached_input: lc.cached_input.or(p.cached_input).unwrap_or(lc.input),
                    cache_write: lc_write,
                    cache_write_1h: lc.cache_write_1h.or(p.cache_write_1h).unwrap_or(lc_write),
                    output: lc.output,
                }
            }),
        }
    }

    fn quoted(model: &str, q: &spendguard_core::prices::Quote) -> PriceOut {
        PriceOut::new(
            model,
            &q.price,
            q.source.as_str(),
            q.provider,
            q.multiplier_ppm,
        )
    }
}

/// The price table the server charges by.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PricesOut {
    /// Always `usd_per_million_tokens` (per-request and per-image prices: USD each).
    #[schemars(with = "crate::openapi::PriceUnit")]
    pub unit: &'static str,
    /// The built-in catalog's source: the LiteLLM version and snapshot date.
    pub catalog: &'static str,
    /// What happens to a model not in the table.
    #[schemars(with = "crate::openapi::UnknownModel")]
    pub unknown_model: &'static str,
    /// The price of unknown models under `unknown_model = "default_cost"`.
    pub default_price: Option<PriceOut>,
    /// The tenant whose overrides the prices include, if any.
    pub tenant_id: Option<String>,
    /// By model name; with `?model=`, that model's effective price alone.
    pub models: Vec<PriceOut>,
}

/// `GET /v1/prices` parameters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricesQuery {
    /// One model's effective price (dated names resolve), and where it came from.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub model: Option<ModelName>,
    /// Include this tenant's price overrides (a tenant key: its own tenant, the default).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Id>")]
    pub tenant_id: Option<TenantId>,
}

/// The effective prices: of one model (dated names resolve), or of every model in the table
/// with a tenant's own models added; each with where it came from. `None`: the model has no
/// price and unknown models are denied.
pub fn effective_prices(
    table: &spendguard_core::PriceTable,
    overrides: Option<&spendguard_core::prices::TenantPrices>,
    model: Option<&ModelName>,
) -> Option<Vec<PriceOut>> {
    use spendguard_core::prices::{PPM_ONE, Priced};
    if let Some(model) = model {
        let name = model.as_str();
        return Some(match table.price_for(model, overrides)? {
            Priced::Listed(quote) => vec![PriceOut::quoted(name, &quote)],
            Priced::Default(p) => vec![PriceOut::new(name, &p, "default", None, PPM_ONE)],
            Priced::Free => vec![PriceOut::new(
                name,
                &spendguard_core::Price::simple(Money::ZERO, Money::ZERO),
                "free",
                None,
                PPM_ONE,
            )],
        });
    }
    let mut models: Vec<PriceOut> = table
        .entries()
        .into_iter()
        .filter_map(|(m, _)| table.quote(m, overrides).map(|q| PriceOut::quoted(m, &q)))
        .collect();
    if let Some(o) = overrides {
        for name in o.models.keys() {
            if table.lookup_entry(name).is_none()
                && let Some(q) = table.quote(name, overrides)
            {
                models.push(PriceOut::quoted(name, &q));
            }
        }
        models.sort_by(|a, b| a.model.cmp(&b.model));
    }
    Some(models)
}

/// `GET /v1/prices`: the catalog with the configuration's prices and, for a tenant, its
/// overrides; or one model's effective price.
pub async fn prices(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PricesQuery>,
) -> Result<Json<PricesOut>, ApiError> {
    let tenant = match (&caller, q.tenant_id) {
        (_, Some(t)) => {
            caller.may_act_on(&t)?;
            Some(t)
        }
        (Caller::Tenant(t), None) => Some(t.clone()),
        (Caller::Admin, None) => None,
    };
    let policy = state.guard.ledger().policy();
    let overrides = tenant
        .as_ref()
        .and_then(|t| state.guard.ledger().tenant_prices(t));
    let overrides = overrides.as_deref();
    let table = &policy.prices;
    let unknown_model = match table.unknown_policy() {
        spendguard_core::UnknownModelPolicy::Deny => "deny",
        spendguard_core::UnknownModelPolicy::DefaultCost => "default_cost",
        spendguard_core::UnknownModelPolicy::Free => "free",
    };
    let default_price = table.default_price().map(|p| {
        PriceOut::new(
            "default",
            p,
            "default",
            None,
            spendguard_core::prices::PPM_ONE,
        )
    });
    let models = effective_prices(table, overrides, q.model.as_ref()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_model",
            format!(
                "model `{}` has no price and unknown_model is `deny`",
                q.model.as_ref().map_or("", |m| m.as_str())
            ),
        )
    })?;
    Ok(Json(PricesOut {
        unit: "usd_per_million_tokens",
        catalog: spendguard_core::prices::CATALOG_SNAPSHOT,
        unknown_model,
        default_price,
        tenant_id: tenant.map(|t| t.as_str().to_owned()),
        models,
    }))
}

/// A tenant's negotiated prices.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPricesBody {
    /// A multiplier on every configured or catalog price (`0.85`: 15% off), exact to six
    /// decimals, at most 1000; absent or null: none.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::Multiplier>")]
    pub multiplier: Option<Money>,
    /// Explicit prices by model name (USD per million tokens, as in the configuration's
    /// `[prices]`); they beat the configured and catalog prices and are not scaled.
    #[serde(default)]
    #[schemars(with = "std::collections::BTreeMap<String, crate::openapi::PriceSchema>")]
    pub models: std::collections::BTreeMap<ModelName, spendguard_core::Price>,
}

/// The most models a tenant's overrides may name.
pub const MAX_TENANT_PRICES: usize = 10_000;

/// A tenant's stored price overrides.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TenantPricesOut {
    pub tenant_id: String,
    pub multiplier: Option<f64>,
    /// The tenant's own prices, by model name.
    pub models: Vec<PriceOut>,
}

fn tenant_prices_out(
    tenant: &TenantId,
    p: &spendguard_core::prices::TenantPrices,
) -> TenantPricesOut {
    TenantPricesOut {
        tenant_id: tenant.as_str().to_owned(),
        multiplier: p.multiplier_ppm.map(|m| m as f64 / 1e6),
        models: p
            .models
            .iter()
            .map(|(m, price)| {
                PriceOut::new(
                    m,
                    price,
                    "tenant_override",
                    None,
                    spendguard_core::prices::PPM_ONE,
                )
            })
            .collect(),
    }
}

/// `PUT /v1/admin/tenants/{tenant_id}/prices`: sets (an empty object: clears) a tenant's
/// negotiated prices.
pub async fn set_tenant_prices(
    State(state): State<AppState>,
    caller: Caller,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<TenantPricesBody>,
) -> Result<Json<TenantPricesOut>, ApiError> {
    caller.require_admin()?;
    let tenant = TenantId::parse(&tenant).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let multiplier_ppm = match body.multiplier {
        None => None,
        // Money holds six decimals: its micro-units are parts per million.
        Some(m) if m.micros() as u64 > spendguard_core::prices::MAX_MULTIPLIER_PPM => {
            return Err(ApiError::bad_request("multiplier must be at most 1000"));
        }
        Some(m) => Some(m.micros() as u64),
    };
    if body.models.len() > MAX_TENANT_PRICES {
        return Err(ApiError::bad_request(format!(
            "models may name at most {MAX_TENANT_PRICES} models"
        )));
    }
    let prices = spendguard_core::prices::TenantPrices {
        multiplier_ppm,
        models: body
            .models
            .into_iter()
            .map(|(m, p)| (m.as_str().to_owned(), p))
            .collect(),
    };
    let before = state.guard.ledger().tenant_prices(&tenant);
    state
        .guard
        .set_tenant_prices(tenant.clone(), prices.clone())
        .await?;
    audit(
        &state,
        "tenant_prices.set",
        &format!("tenant {}", tenant.as_str()),
        before.map(|b| serde_json::to_value(&*b).unwrap_or_default()),
        Some(serde_json::to_value(&prices).unwrap_or_default()),
    )
    .await?;
    Ok(Json(tenant_prices_out(&tenant, &prices)))
}
