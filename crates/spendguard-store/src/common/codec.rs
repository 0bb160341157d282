//! How rows of the tables are read by either backend: their columns and decoding.

use super::*;

/// The columns of one `ai_usage` row, as read by either backend.
pub(crate) struct UsageCols<'a> {
    pub id: Uuid,
    pub tenant: &'a str,
    pub user: &'a str,
    pub company: Option<&'a str>,
    pub model: &'a str,
    pub endpoint: Option<&'a str>,
    pub tier: &'a str,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub cost_micros: i64,
    pub status: &'a str,
    pub created_at: Micros,
    pub reservation_id: Option<Uuid>,
    pub idempotency_key: Option<&'a str>,
    pub day_start: Micros,
    pub month_start: Micros,
    pub pricing: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub provider_request_id: Option<&'a str>,
    pub cache_creation_input_tokens: i64,
    pub cache_creation_1h_input_tokens: i64,
    pub reasoning_tokens: i64,
    pub long_context_above: Option<i64>,
}

impl UsageCols<'_> {
    pub fn decode(&self) -> Result<UsageRecord, StoreError> {
        Ok(UsageRecord {
            id: self.id,
            tenant: parse_id("tenant_id", self.tenant, TenantId::parse)?,
            user: parse_id("user_id", self.user, UserId::parse)?,
            company: parse_opt("company_id", self.company, CompanyId::parse)?,
            model: parse_id("model", self.model, ModelName::parse)?,
            endpoint: parse_opt("endpoint", self.endpoint, Endpoint::parse)?,
            tier: parse_id("subscription_tier", self.tier, TierName::parse)?,
            tokens: Tokens {
                input: to_u64("input_tokens", self.input_tokens)?,
                cached_input: to_u64("cached_input_tokens", self.cached_input_tokens)?,
                output: to_u64("output_tokens", self.output_tokens)?,
                cache_creation: to_u64(
                    "cache_creation_input_tokens",
                    self.cache_creation_input_tokens,
                )?,
                cache_creation_1h: to_u64(
                    "cache_creation_1h_input_tokens",
                    self.cache_creation_1h_input_tokens,
                )?,
                reasoning: to_u64("reasoning_tokens", self.reasoning_tokens)?,
            },
            cost: Money::from_micros(self.cost_micros),
            pricing: match self.pricing {
                None => Pricing::Catalog,
                Some(p) => {
                    Pricing::parse(p).ok_or_else(|| corrupt(format!("unknown pricing `{p}`")))?
                }
            },
            long_context_above: self
                .long_context_above
                .map(|v| to_u64("long_context_above", v))
                .transpose()?,
            status: RequestStatus::parse(self.status)
                .ok_or_else(|| corrupt(format!("unknown request_status `{}`", self.status)))?,
            created_at: self.created_at,
            reservation_id: self.reservation_id,
            idempotency_key: parse_opt(
                "idempotency_key",
                self.idempotency_key,
                IdempotencyKey::parse,
            )?,
            day_start: self.day_start,
            month_start: self.month_start,
            origin: self.upstream.map(|u| Origin {
                upstream: u.to_owned(),
                request_id: self.provider_request_id.map(str::to_owned),
            }),
        })
    }
}

/// The columns of one `reservations` row, as read by either backend.
pub(crate) struct ReservationCols<'a> {
    pub id: Uuid,
    pub tenant: &'a str,
    pub user: &'a str,
    pub company: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub admitted_tier: &'a str,
    pub model: &'a str,
    pub endpoint: Option<&'a str>,
    pub estimate_micros: i64,
    pub estimated_tokens: i64,
    pub created_at: Micros,
    pub expires_at: Micros,
    pub day_start: Micros,
    pub month_start: Micros,
    pub idempotency_key: Option<&'a str>,
    pub fingerprint: i64,
}

impl ReservationCols<'_> {
    pub fn decode(&self) -> Result<Reservation, StoreError> {
        Ok(Reservation {
            id: self.id,
            subject: Subject {
                tenant: parse_id("tenant_id", self.tenant, TenantId::parse)?,
                user: parse_id("user_id", self.user, UserId::parse)?,
                company: parse_opt("company_id", self.company, CompanyId::parse)?,
                tier: parse_opt("tier", self.tier, TierName::parse)?,
                // An admitted reservation's tier is already resolved (`admitted_tier`).
                trusted_tier: true,
                model: parse_id("model", self.model, ModelName::parse)?,
                endpoint: parse_opt("endpoint", self.endpoint, Endpoint::parse)?,
            },
            tier: parse_id("admitted_tier", self.admitted_tier, TierName::parse)?,
            estimate: Money::from_micros(self.estimate_micros),
            estimated_tokens: to_u64("estimated_tokens", self.estimated_tokens)?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            day_start: self.day_start,
            month_start: self.month_start,
            idempotency_key: parse_opt(
                "idempotency_key",
                self.idempotency_key,
                IdempotencyKey::parse,
            )?,
            // The fingerprint is stored as the i64 with the same bits.
            fingerprint: self.fingerprint as u64,
            // Counted in `would_deny` when it was stored; not needed to settle it.
            would_deny: None,
        })
    }
}

/// The columns of a `rollups` row, in the order of inserts and selects alike.
pub(crate) const ROLLUP_COLUMNS: &str = "scope_kind, tenant_id, scope_id, \"window\", \
    window_start, spent_micros, requests, tokens, input_tokens, cached_input_tokens, \
    output_tokens";

/// The number of [`ROLLUP_COLUMNS`].
pub(crate) const ROLLUP_COLUMN_COUNT: usize = 11;

/// The columns of one `rollups` row ([`ROLLUP_COLUMNS`]), as read by either backend.
pub(crate) struct RollupCols<'a> {
    pub kind: &'a str,
    pub tenant: &'a str,
    pub id: &'a str,
    pub window: &'a str,
    pub start: Micros,
    pub spent: i64,
    pub requests: i64,
    pub tokens: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
}

/// The tenant id of the previous row, reused when the next row names the same tenant:
/// rows read in primary-key order come grouped by tenant, so a million users' counters share
/// a handful of tenant ids instead of parsing and allocating one each.
#[derive(Debug, Default)]
pub(crate) struct TenantCache(Option<TenantId>);

impl TenantCache {
    fn get(&mut self, s: &str) -> Result<TenantId, StoreError> {
        if let Some(t) = &self.0 {
            if t.as_str() == s {
                return Ok(t.clone());
            }
        }
        let t = parse_id("tenant_id", s, TenantId::parse)?;
        self.0 = Some(t.clone());
        Ok(t)
    }
}

impl RollupCols<'_> {
    pub fn decode_with(&self, tenants: &mut TenantCache) -> Result<CounterRow, StoreError> {
        let scope = match self.kind {
            "global" => ScopeKey::Global,
            "tenant" => ScopeKey::Tenant(tenants.get(self.tenant)?),
            "company" => ScopeKey::Company(
                tenants.get(self.tenant)?,
                parse_id("scope_id", self.id, CompanyId::parse)?,
            ),
            "user" => ScopeKey::User(
                tenants.get(self.tenant)?,
                parse_id("scope_id", self.id, UserId::parse)?,
            ),
            other => return Err(corrupt(format!("unknown scope_kind `{other}`"))),
        };
        Ok(CounterRow {
            scope,
            window: window_from_str(self.window)?,
            start: self.start,
            spent: Money::from_micros(self.spent),
            requests: to_u64("requests", self.requests)?,
            tokens: to_u64("tokens", self.tokens)?,
            input_tokens: to_u64("input_tokens", self.input_tokens)?,
            cached_input_tokens: to_u64("cached_input_tokens", self.cached_input_tokens)?,
            output_tokens: to_u64("output_tokens", self.output_tokens)?,
        })
    }
}

/// The columns of an alert: `(scope_kind, tenant_id, scope_id, window, window_start,
/// threshold_percent, kind, created_at, amount_micros, limit_micros)` as stored.
pub(crate) struct AlertCols<'a> {
    pub id: i64,
    pub scope_kind: &'a str,
    pub tenant: &'a str,
    pub scope_id: &'a str,
    pub window: &'a str,
    pub window_start: Micros,
    pub threshold_percent: i64,
    pub kind: &'a str,
    pub created_at: Micros,
    pub amount_micros: i64,
    pub limit_micros: i64,
}

impl AlertCols<'_> {
    pub fn decode(&self) -> Result<AlertRecord, StoreError> {
        Ok(AlertRecord {
            id: self.id,
            alert: NewAlert {
                scope: scope_from_columns(self.scope_kind, self.tenant, self.scope_id)?,
                window: window_from_str(self.window)?,
                window_start: self.window_start,
                threshold_percent: u32::try_from(self.threshold_percent).map_err(|_| {
                    corrupt(format!(
                        "column threshold_percent out of range: {}",
                        self.threshold_percent
                    ))
                })?,
                kind: AlertKind::parse(self.kind)
                    .ok_or_else(|| corrupt(format!("unknown alert kind `{}`", self.kind)))?,
                amount: Money::from_micros(self.amount_micros),
                limit: Money::from_micros(self.limit_micros),
                created_at: self.created_at,
            },
        })
    }
}

/// The columns of a webhook delivery, as read by either backend.
pub(crate) struct DeliveryCols<'a> {
    pub id: i64,
    pub url: &'a str,
    pub state: &'a str,
    pub attempts: i64,
    pub next_attempt_at: Option<Micros>,
    pub delivered_at: Option<Micros>,
    pub last_error: Option<&'a str>,
}

impl DeliveryCols<'_> {
    pub fn decode(&self, alert: AlertRecord) -> Result<Delivery, StoreError> {
        Ok(Delivery {
            id: self.id,
            alert,
            url: self.url.to_owned(),
            state: DeliveryState::parse(self.state)
                .ok_or_else(|| corrupt(format!("unknown delivery state `{}`", self.state)))?,
            attempts: u32::try_from(self.attempts)
                .map_err(|_| corrupt(format!("column attempts out of range: {}", self.attempts)))?,
            next_attempt_at: self.next_attempt_at,
            delivered_at: self.delivered_at,
            last_error: self.last_error.map(str::to_owned),
        })
    }
}
