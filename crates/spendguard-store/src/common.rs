//! Backend-independent pieces: the plan of a batch, rollup deltas, and how values map to
//! columns and back.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use spendguard_core::{
    BudgetOverride, CompanyId, CounterRow, Endpoint, Event, IdError, IdempotencyKey, Micros,
    ModelName, Money, Origin, Pricing, RequestStatus, Reservation, ScopeKey, ScopeKind, Subject,
    TenantId, TierName, Tokens, UsageRecord, UserId, UserOverrides, Window,
};
use uuid::Uuid;

use crate::error::StoreError;
use crate::{
    AlertKind, AlertRecord, Delivery, DeliveryState, GroupBy, NewAlert, Report, ReportQuery,
    ReportRow, UsageTotals,
};

/// A non-negative count as a signed 64-bit column: values past `i64::MAX` are stored as
/// `i64::MAX` (no real token count gets there).
pub(crate) fn clamp_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The wall clock in microseconds since the Unix epoch.
pub(crate) fn now_micros() -> Micros {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// `(scope_kind, tenant_id, scope_id)` of a scope; the global scope has tenant `''`.
pub(crate) fn scope_columns(scope: &ScopeKey) -> (&'static str, &str, &str) {
    (
        scope.kind().as_str(),
        scope.tenant().map_or("", |t| t.as_str()),
        scope.id(),
    )
}

pub(crate) fn scope_from_columns(
    kind: &str,
    tenant: &str,
    id: &str,
) -> Result<ScopeKey, StoreError> {
    let tenant_id = || parse_id("tenant_id", tenant, TenantId::parse);
    Ok(match kind {
        "global" => ScopeKey::Global,
        "tenant" => ScopeKey::Tenant(tenant_id()?),
        "company" => ScopeKey::Company(tenant_id()?, parse_id("scope_id", id, CompanyId::parse)?),
        "user" => ScopeKey::User(tenant_id()?, parse_id("scope_id", id, UserId::parse)?),
        other => return Err(corrupt(format!("unknown scope_kind `{other}`"))),
    })
}

pub(crate) fn scope_kind_from_str(s: &str) -> Result<ScopeKind, StoreError> {
    [
        ScopeKind::Global,
        ScopeKind::Tenant,
        ScopeKind::Company,
        ScopeKind::User,
    ]
    .into_iter()
    .find(|k| k.as_str() == s)
    .ok_or_else(|| corrupt(format!("unknown scope_kind `{s}`")))
}

pub(crate) fn window_from_str(s: &str) -> Result<Window, StoreError> {
    match s {
        "day" => Ok(Window::Day),
        "month" => Ok(Window::Month),
        other => Err(corrupt(format!("unknown rollup window `{other}`"))),
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn parse_id<T>(
    column: &str,
    value: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<T, StoreError> {
    parse(value).map_err(|e| corrupt(format!("column {column}: {e}")))
}

fn parse_opt<T>(
    column: &str,
    value: Option<&str>,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<Option<T>, StoreError> {
    value.map(|v| parse_id(column, v, parse)).transpose()
}

pub(crate) fn to_u64(column: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(format!("column {column} is negative: {value}")))
}

pub(crate) fn encode_user(overrides: &UserOverrides) -> Result<String, StoreError> {
    serde_json::to_string(overrides)
        .map_err(|e| StoreError::Invalid(format!("user overrides cannot be encoded: {e}")))
}

pub(crate) fn decode_user(settings: &str) -> Result<UserOverrides, StoreError> {
    serde_json::from_str(settings).map_err(|e| corrupt(format!("user_overrides.settings: {e}")))
}

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
            },
            cost: Money::from_micros(self.cost_micros),
            pricing: match self.pricing {
                None => Pricing::Catalog,
                Some(p) => {
                    Pricing::parse(p).ok_or_else(|| corrupt(format!("unknown pricing `{p}`")))?
                }
            },
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
        })
    }
}

/// How a reservation is settled by a batch.
#[derive(Debug)]
pub(crate) enum Settle<'a> {
    /// Settled when its record was made (so a projection made later, or again, writes the
    /// same row).
    Commit {
        id: Uuid,
        usage_id: Uuid,
        at: Micros,
    },
    Release {
        id: Uuid,
        reason: Option<&'a str>,
        at: Micros,
    },
    Expire {
        id: Uuid,
        usage_id: Uuid,
    },
}

/// A batch of events sorted into the statements that persist it. Applying the parts in
/// this order (reservations, settlements, usage rows, rollups, overrides) is equivalent to
/// applying the events one by one:
/// - a reservation is always reserved before it is settled;
/// - only the first settlement of a reservation counts (later ones find it no longer open);
/// - a usage id or reservation id seen twice is the same record seen twice;
/// - for overrides, the last event of each key wins.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub reserved: Vec<&'a Reservation>,
    pub settles: Vec<Settle<'a>>,
    pub usage: Vec<&'a UsageRecord>,
    pub budgets: Vec<(&'a ScopeKey, BudgetOverride)>,
    pub users: Vec<(&'a TenantId, &'a UserId, &'a UserOverrides)>,
}

impl<'a> Plan<'a> {
    pub fn new(events: &'a [Event]) -> Plan<'a> {
        let mut plan = Plan {
            reserved: Vec::new(),
            settles: Vec::new(),
            usage: Vec::with_capacity(events.len()),
            budgets: Vec::new(),
            users: Vec::new(),
        };
        let mut reserved = HashSet::new();
        let mut settled = HashSet::new();
        let mut usage = HashSet::with_capacity(events.len());
        let mut budgets: HashMap<&ScopeKey, usize> = HashMap::new();
        let mut users: HashMap<(&TenantId, &UserId), usize> = HashMap::new();
        for event in events {
            match event {
                Event::Reserved(r) => {
                    if reserved.insert(r.id) {
                        plan.reserved.push(r);
                    }
                }
                Event::Committed {
                    reservation_id,
                    usage: u,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Commit {
                            id: *reservation_id,
                            usage_id: u.id,
                            at: u.created_at,
                        });
                    }
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::Released {
                    reservation_id,
                    reason,
                    at,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Release {
                            id: *reservation_id,
                            reason: reason.as_deref(),
                            at: *at,
                        });
                    }
                }
                Event::Expired {
                    reservation_id,
                    usage: u,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Expire {
                            id: *reservation_id,
                            usage_id: u.id,
                        });
                    }
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::Recorded(u) => {
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::BudgetSet { scope, budget } => match budgets.get(scope) {
                    Some(&i) => plan.budgets[i].1 = *budget,
                    None => {
                        budgets.insert(scope, plan.budgets.len());
                        plan.budgets.push((scope, *budget));
                    }
                },
                Event::UserSet {
                    tenant,
                    user,
                    overrides,
                } => match users.get(&(tenant, user)) {
                    Some(&i) => plan.users[i].2 = overrides,
                    None => {
                        users.insert((tenant, user), plan.users.len());
                        plan.users.push((tenant, user, overrides));
                    }
                },
            }
        }
        plan
    }
}

/// Rollup increments, summed in memory over a batch so each rollup row is written once.
#[derive(Debug, Default)]
pub(crate) struct Deltas {
    map: HashMap<(ScopeKey, Window, Micros), Delta>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Delta {
    spent: Money,
    requests: u64,
    tokens: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
}

/// `a + b`, saturating at `i64::MAX`, the most a column holds.
fn add_count(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(i64::MAX as u64)
}

impl Deltas {
    /// Counts a newly inserted usage record (nothing if it does not count).
    pub fn add(&mut self, usage: &UsageRecord) {
        if usage.counts() {
            self.add_parts(
                usage.scopes(),
                usage.cost,
                &usage.tokens,
                usage.day_start,
                usage.month_start,
            );
        }
    }

    /// Counts one request of `cost` and `tokens` in the day and month windows of `scopes`.
    pub fn add_parts(
        &mut self,
        scopes: impl Iterator<Item = ScopeKey>,
        cost: Money,
        tokens: &Tokens,
        day_start: Micros,
        month_start: Micros,
    ) {
        let total = tokens.total();
        for scope in scopes {
            for (window, start) in [(Window::Day, day_start), (Window::Month, month_start)] {
                let d = self.map.entry((scope.clone(), window, start)).or_default();
                d.spent = d.spent.saturating_add(cost);
                // Counts saturate at `i64::MAX`, the most a column holds.
                d.requests = add_count(d.requests, 1);
                d.tokens = add_count(d.tokens, total);
                d.input_tokens = add_count(d.input_tokens, tokens.input);
                d.cached_input_tokens = add_count(d.cached_input_tokens, tokens.cached_input);
                d.output_tokens = add_count(d.output_tokens, tokens.output);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The increments as counter rows, sorted by key (writers lock rows in this order).
    pub fn into_rows(self) -> Vec<CounterRow> {
        let mut rows: Vec<CounterRow> = self
            .map
            .into_iter()
            .map(|((scope, window, start), d)| CounterRow {
                scope,
                window,
                start,
                spent: d.spent,
                requests: d.requests,
                tokens: d.tokens,
                input_tokens: d.input_tokens,
                cached_input_tokens: d.cached_input_tokens,
                output_tokens: d.output_tokens,
            })
            .collect();
        sort_rows(&mut rows);
        rows
    }
}

/// Sorts counter rows by scope, window and start.
pub(crate) fn sort_rows(rows: &mut [CounterRow]) {
    // Keys are unique (the primary key), so an unstable sort gives the one order.
    rows.sort_unstable_by(|a, b| (&a.scope, a.window, a.start).cmp(&(&b.scope, b.window, b.start)));
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

/// `column = column + excluded.column`, saturating at `i64::MAX`, for an upsert into the
/// table `$table` (valid on SQLite and PostgreSQL).
macro_rules! saturating_add {
    ($table:literal, $column:literal) => {
        concat!(
            $column,
            " = CASE WHEN excluded.",
            $column,
            " <= 0 THEN ",
            $table,
            ".",
            $column,
            " + excluded.",
            $column,
            " WHEN ",
            $table,
            ".",
            $column,
            " > 9223372036854775807 - excluded.",
            $column,
            " THEN 9223372036854775807 ELSE ",
            $table,
            ".",
            $column,
            " + excluded.",
            $column,
            " END"
        )
    };
}

/// The `ON CONFLICT` clause of a rollup upsert.
pub(crate) const ROLLUP_CONFLICT: &str = concat!(
    " ON CONFLICT (scope_kind, tenant_id, scope_id, \"window\", window_start) DO UPDATE SET ",
    saturating_add!("rollups", "spent_micros"),
    ", ",
    saturating_add!("rollups", "requests"),
    ", ",
    saturating_add!("rollups", "tokens"),
    ", ",
    saturating_add!("rollups", "input_tokens"),
    ", ",
    saturating_add!("rollups", "cached_input_tokens"),
    ", ",
    saturating_add!("rollups", "output_tokens"),
);

/// A dimension of `usage_rollups` (the other report groupings read `rollups`). The
/// variants are ordered like their names, as the `dim` column sorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Dim {
    /// Key: the endpoint, `''` without one.
    Endpoint,
    /// Key: the model.
    Model,
    /// Key: the user id; model: the model.
    UserModel,
}

impl Dim {
    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Endpoint => "endpoint",
            Dim::Model => "model",
            Dim::UserModel => "user_model",
        }
    }
}

/// The key of a `usage_rollups` row: (dim, day_start, tenant_id, key, model).
pub(crate) type UsageKey<'a> = (Dim, Micros, &'a str, &'a str, &'a str);

/// `usage_rollups` increments, summed in memory over a batch so each row is written once.
#[derive(Debug, Default)]
pub(crate) struct UsageDeltas<'a> {
    map: HashMap<UsageKey<'a>, UsageTotals>,
}

impl<'a> UsageDeltas<'a> {
    /// Counts a newly inserted usage record (nothing if it does not count).
    pub fn add(&mut self, u: &'a UsageRecord) {
        if !u.counts() {
            return;
        }
        let one = UsageTotals {
            requests: 1,
            input_tokens: u.tokens.input,
            cached_input_tokens: u.tokens.cached_input,
            output_tokens: u.tokens.output,
            cost: u.cost,
        };
        let (day, tenant, user, model) = (
            u.day_start,
            u.tenant.as_str(),
            u.user.as_str(),
            u.model.as_str(),
        );
        let endpoint = u.endpoint.as_ref().map_or("", |e| e.as_str());
        for (dim, key, model_column) in [
            (Dim::Model, model, ""),
            (Dim::Endpoint, endpoint, ""),
            (Dim::UserModel, user, model),
        ] {
            self.map
                .entry((dim, day, tenant, key, model_column))
                .or_default()
                .add(&one);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The increments, sorted by key (writers lock rows in this order). The sums saturate
    /// at `u64::MAX`; [`clamp_u64`] them when binding.
    pub fn into_rows(self) -> Vec<(UsageKey<'a>, UsageTotals)> {
        let mut rows: Vec<_> = self.map.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

/// The `ON CONFLICT` clause of a `usage_rollups` upsert.
pub(crate) const USAGE_ROLLUP_CONFLICT: &str = concat!(
    " ON CONFLICT (dim, day_start, tenant_id, key, model) DO UPDATE SET ",
    saturating_add!("usage_rollups", "requests"),
    ", ",
    saturating_add!("usage_rollups", "input_tokens"),
    ", ",
    saturating_add!("usage_rollups", "cached_input_tokens"),
    ", ",
    saturating_add!("usage_rollups", "output_tokens"),
    ", ",
    saturating_add!("usage_rollups", "cost_micros"),
);

/// Orders a user's day: by cost descending, then by model.
pub(crate) fn sort_models(models: &mut [crate::ModelUsage]) {
    models.sort_by(|a, b| {
        b.totals
            .cost
            .cmp(&a.totals.cost)
            .then_with(|| a.model.cmp(&b.model))
    });
}

/// Reads the sums of a `usage_rollups` row (or of a group of them).
pub(crate) fn usage_totals(
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    cost: i64,
) -> Result<UsageTotals, StoreError> {
    Ok(UsageTotals {
        requests: to_u64("requests", requests)?,
        input_tokens: to_u64("input_tokens", input)?,
        cached_input_tokens: to_u64("cached_input_tokens", cached)?,
        output_tokens: to_u64("output_tokens", output)?,
        cost: Money::from_micros(cost),
    })
}

/// A range of `rollups` rows a report reads: the window, and the first and the last window
/// start (inclusive).
pub(crate) type RollupRange = (Window, Micros, Micros);

/// What a report reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReportPlan {
    /// The `usage_rollups` rows of a dimension with `day_start` in the query's days.
    Usage(Dim),
    /// The `rollups` rows of each of `kinds` (of the query's tenant, if any) in `ranges`.
    Rollups {
        kinds: Vec<ScopeKind>,
        ranges: Vec<RollupRange>,
    },
}

impl ReportPlan {
    /// The plan of `query`. `Day` reads the day rows of the global scope (or of the tenant);
    /// `Tenant`, `Company` (with the tenants', see [`Groups::add_scope`]) and `User` read
    /// each whole month of [`ReportQuery::whole_months`] from its month row and the other
    /// days from day rows; `Model` and `Endpoint` read `usage_rollups`.
    pub fn new(query: &ReportQuery) -> Result<ReportPlan, StoreError> {
        let kinds = match query.group_by {
            GroupBy::Model => return Ok(ReportPlan::Usage(Dim::Model)),
            GroupBy::Endpoint => return Ok(ReportPlan::Usage(Dim::Endpoint)),
            GroupBy::Day if query.tenant.is_some() => vec![ScopeKind::Tenant],
            GroupBy::Day => vec![ScopeKind::Global],
            GroupBy::Tenant => vec![ScopeKind::Tenant],
            GroupBy::Company => vec![ScopeKind::Company, ScopeKind::Tenant],
            GroupBy::User => vec![ScopeKind::User],
        };
        let months: &[(Micros, Micros)] = if query.group_by == GroupBy::Day {
            &[]
        } else {
            &query.whole_months
        };
        let mut ranges = Vec::with_capacity(2 * months.len() + 1);
        // The first day start not read yet.
        let mut next = query.from_day;
        for &(start, end) in months {
            if start < next || end <= start || start > query.to_day {
                return Err(StoreError::Invalid(format!(
                    "the whole months of a report must ascend without overlapping and lie \
                     within its days; [{start}, {end}) does not"
                )));
            }
            if start > next {
                ranges.push((Window::Day, next, start - 1));
            }
            ranges.push((Window::Month, start, start));
            next = end;
        }
        if next <= query.to_day {
            ranges.push((Window::Day, next, query.to_day));
        }
        Ok(ReportPlan::Rollups { kinds, ranges })
    }
}

/// `a - b` for each sum (saturating): what `a` holds beyond `b`.
fn minus(a: &UsageTotals, b: &UsageTotals) -> UsageTotals {
    UsageTotals {
        requests: a.requests.saturating_sub(b.requests),
        input_tokens: a.input_tokens.saturating_sub(b.input_tokens),
        cached_input_tokens: a.cached_input_tokens.saturating_sub(b.cached_input_tokens),
        output_tokens: a.output_tokens.saturating_sub(b.output_tokens),
        cost: a.cost.saturating_sub(b.cost),
    }
}

/// The groups of a report, summed from the rows of a [`ReportPlan`] (or from groups already
/// summed by the database).
#[derive(Debug)]
pub(crate) struct Groups {
    group_by: GroupBy,
    days: HashMap<Micros, UsageTotals>,
    /// By `tenant \n key` (ids never hold a line feed), or by key alone.
    named: HashMap<String, ReportRow>,
    /// `Company`: the totals of each tenant.
    tenants: HashMap<String, UsageTotals>,
    buf: String,
}

impl Groups {
    pub fn new(group_by: GroupBy) -> Groups {
        Groups {
            group_by,
            days: HashMap::new(),
            named: HashMap::new(),
            tenants: HashMap::new(),
            buf: String::new(),
        }
    }

    /// Adds a row of `day`, `tenant` and `key` (the columns the grouping does not use are
    /// ignored).
    pub fn add(&mut self, day: Micros, tenant: &str, key: &str, totals: &UsageTotals) {
        let (tenant, key) = match self.group_by {
            GroupBy::Day => {
                self.days.entry(day).or_default().add(totals);
                return;
            }
            GroupBy::Tenant => (Some(tenant), None),
            GroupBy::Company | GroupBy::User => (Some(tenant), Some(key)),
            GroupBy::Model | GroupBy::Endpoint => (None, Some(key)),
        };
        self.buf.clear();
        if let Some(t) = tenant {
            self.buf.push_str(t);
        }
        self.buf.push('\n');
        if let Some(k) = key {
            self.buf.push_str(k);
        }
        if let Some(row) = self.named.get_mut(self.buf.as_str()) {
            row.totals.add(totals);
            return;
        }
        self.named.insert(
            self.buf.clone(),
            ReportRow {
                day: None,
                tenant: tenant.map(str::to_owned),
                key: key.filter(|k| !k.is_empty()).map(str::to_owned),
                totals: *totals,
            },
        );
    }

    /// Adds a `rollups` row (or a group of them) of a scope of `kind`: `start` is its window
    /// start, `tenant` and `id` its `tenant_id` and `scope_id`. For `Company`, the tenants'
    /// rows are their totals: the part of a tenant's totals not in its companies' rows is the
    /// usage without a company, reported as the tenant's group without a key.
    pub fn add_scope(
        &mut self,
        kind: ScopeKind,
        start: Micros,
        tenant: &str,
        id: &str,
        totals: &UsageTotals,
    ) {
        if self.group_by == GroupBy::Company && kind == ScopeKind::Tenant {
            match self.tenants.get_mut(tenant) {
                Some(sum) => sum.add(totals),
                None => {
                    self.tenants.insert(tenant.to_owned(), *totals);
                }
            }
        } else {
            self.add(start, tenant, id, totals);
        }
    }

    /// `Company`: each tenant's group without a company (its totals minus its companies'),
    /// unless every sum of it is zero.
    fn without_company(&self) -> Vec<ReportRow> {
        let mut companies: HashMap<&str, UsageTotals> = HashMap::new();
        for row in self.named.values() {
            if let Some(tenant) = &row.tenant {
                companies
                    .entry(tenant.as_str())
                    .or_default()
                    .add(&row.totals);
            }
        }
        let mut out = Vec::new();
        for (tenant, totals) in &self.tenants {
            let rest = match companies.get(tenant.as_str()) {
                Some(in_companies) => minus(totals, in_companies),
                None => *totals,
            };
            if rest != UsageTotals::default() {
                out.push(ReportRow {
                    day: None,
                    tenant: Some(tenant.clone()),
                    key: None,
                    totals: rest,
                });
            }
        }
        out
    }

    /// The report: totals over every group, then the rows in order, cut to `limit`.
    pub fn finish(self, limit: Option<usize>) -> Report {
        let mut rows: Vec<ReportRow> = if self.group_by == GroupBy::Day {
            self.days
                .into_iter()
                .map(|(day, totals)| ReportRow {
                    day: Some(day),
                    tenant: None,
                    key: None,
                    totals,
                })
                .collect()
        } else {
            let mut rows = self.without_company();
            rows.extend(self.named.into_values());
            rows
        };
        let mut totals = UsageTotals::default();
        for row in &rows {
            totals.add(&row.totals);
        }
        if self.group_by == GroupBy::Day {
            rows.sort_unstable_by_key(|r| r.day);
        } else {
            rows.sort_unstable_by(|a, b| {
                b.totals
                    .cost
                    .cmp(&a.totals.cost)
                    .then_with(|| a.tenant.cmp(&b.tenant))
                    .then_with(|| a.key.cmp(&b.key))
            });
        }
        let groups = rows.len();
        if let Some(limit) = limit {
            rows.truncate(limit);
        }
        Report {
            rows,
            totals,
            groups,
        }
    }
}

/// A limit as an SQL `LIMIT` value (`None`: no limit).
pub(crate) fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
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

/// The order in which a batch of alerts is inserted: by their unique key, so concurrent
/// inserts of overlapping batches lock rows in the same order.
pub(crate) fn alert_order(alerts: &[NewAlert]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..alerts.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&alerts[a], &alerts[b]);
        (
            scope_columns(&a.scope),
            a.window.as_str(),
            a.window_start,
            a.threshold_percent,
            a.kind.as_str(),
        )
            .cmp(&(
                scope_columns(&b.scope),
                b.window.as_str(),
                b.window_start,
                b.threshold_percent,
                b.kind.as_str(),
            ))
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_columns() {
        let t = TenantId::parse("t").unwrap();
        for scope in [
            ScopeKey::Global,
            ScopeKey::Tenant(t.clone()),
            ScopeKey::Company(t.clone(), CompanyId::parse("c").unwrap()),
            ScopeKey::User(t, UserId::parse("u").unwrap()),
        ] {
            let (k, tenant, id) = scope_columns(&scope);
            assert_eq!(scope_from_columns(k, tenant, id).unwrap(), scope);
        }
        assert!(matches!(
            scope_from_columns("planet", "", "x"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn whole_months_replace_their_days() {
        let query = ReportQuery {
            from_day: 10,
            to_day: 100,
            group_by: GroupBy::User,
            whole_months: vec![(20, 40), (40, 60), (70, 95)],
            ..ReportQuery::default()
        };
        let plan = |q: &ReportQuery| ReportPlan::new(q).unwrap();
        assert_eq!(
            plan(&query),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::User],
                ranges: vec![
                    (Window::Day, 10, 19),
                    (Window::Month, 20, 20),
                    (Window::Month, 40, 40),
                    (Window::Day, 60, 69),
                    (Window::Month, 70, 70),
                    (Window::Day, 95, 100),
                ],
            }
        );
        // A month ending the range leaves no days after it; one starting it none before.
        let edges = ReportQuery {
            whole_months: vec![(10, 50), (50, 101)],
            group_by: GroupBy::Company,
            ..query.clone()
        };
        assert_eq!(
            plan(&edges),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Company, ScopeKind::Tenant],
                ranges: vec![(Window::Month, 10, 10), (Window::Month, 50, 50)],
            }
        );
        // `Day` reads days only, of the global scope or of the tenant.
        let days = ReportQuery {
            group_by: GroupBy::Day,
            ..query.clone()
        };
        assert_eq!(
            plan(&days),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Global],
                ranges: vec![(Window::Day, 10, 100)],
            }
        );
        let tenant_days = ReportQuery {
            tenant: Some(TenantId::parse("t").unwrap()),
            ..days
        };
        assert_eq!(
            plan(&tenant_days),
            ReportPlan::Rollups {
                kinds: vec![ScopeKind::Tenant],
                ranges: vec![(Window::Day, 10, 100)],
            }
        );
        let models = ReportQuery {
            group_by: GroupBy::Model,
            ..query.clone()
        };
        assert_eq!(plan(&models), ReportPlan::Usage(Dim::Model));
        // No days at all: nothing to read.
        let empty = ReportQuery {
            from_day: 5,
            to_day: 4,
            whole_months: Vec::new(),
            ..query.clone()
        };
        assert!(matches!(
            plan(&empty),
            ReportPlan::Rollups { ranges, .. } if ranges.is_empty()
        ));
        for months in [
            vec![(5, 20)],
            vec![(101, 120)],
            vec![(20, 40), (30, 50)],
            vec![(40, 60), (20, 40)],
            vec![(20, 20)],
        ] {
            let bad = ReportQuery {
                whole_months: months,
                ..query.clone()
            };
            assert!(matches!(ReportPlan::new(&bad), Err(StoreError::Invalid(_))));
        }
    }

    #[test]
    fn counts_clamp_to_i64() {
        assert_eq!(clamp_u64(5), 5);
        assert_eq!(clamp_u64(u64::MAX), i64::MAX);
    }
}
