//! The public types of the ledger: scopes, subjects, requests, records, events, limits,
//! decisions and errors.

use std::hash::{Hash, Hasher};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::evaluate::LimitView;
use crate::ids::{CompanyId, Endpoint, IdempotencyKey, ModelName, TenantId, TierName, UserId};
use crate::money::Money;
use crate::policy::UserOverrides;
use crate::prices::{TenantPrices, Tokens};
use crate::window::{Micros, Window};

// ---------------------------------------------------------------------------------------
// Scopes, subjects and requests
// ---------------------------------------------------------------------------------------

/// The kind of scope a budget belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Global,
    Tenant,
    Company,
    User,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Global => "global",
            ScopeKind::Tenant => "tenant",
            ScopeKind::Company => "company",
            ScopeKind::User => "user",
        }
    }
}

/// One budget holder. Companies and users are identified within their tenant, so two
/// tenants can never share (or drain) each other's user budgets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ScopeKey {
    Global,
    Tenant(TenantId),
    Company(TenantId, CompanyId),
    User(TenantId, UserId),
}

impl ScopeKey {
    pub fn kind(&self) -> ScopeKind {
        match self {
            ScopeKey::Global => ScopeKind::Global,
            ScopeKey::Tenant(_) => ScopeKind::Tenant,
            ScopeKey::Company(..) => ScopeKind::Company,
            ScopeKey::User(..) => ScopeKind::User,
        }
    }

    /// The scope's own id (`"global"` for the global scope).
    pub fn id(&self) -> &str {
        match self {
            ScopeKey::Global => "global",
            ScopeKey::Tenant(t) => t.as_str(),
            ScopeKey::Company(_, c) => c.as_str(),
            ScopeKey::User(_, u) => u.as_str(),
        }
    }

    /// The tenant the scope belongs to; `None` for the global scope.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            ScopeKey::Global => None,
            ScopeKey::Tenant(t) | ScopeKey::Company(t, _) | ScopeKey::User(t, _) => Some(t),
        }
    }

    /// A borrowed view of the key.
    pub(super) fn as_ref(&self) -> ScopeRef<'_> {
        match self {
            ScopeKey::Global => ScopeRef::Global,
            ScopeKey::Tenant(t) => ScopeRef::Tenant(t),
            ScopeKey::Company(t, c) => ScopeRef::Company(t, c),
            ScopeKey::User(t, u) => ScopeRef::User(t, u),
        }
    }
}

/// Hashes what [`ScopeRef`] hashes, so a key can be found from a borrowed view without
/// building (and cloning the ids of) an owned key.
impl Hash for ScopeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

/// A scope key borrowed from a subject or a record: what the hot path hashes and compares,
/// so that looking a scope up clones nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ScopeRef<'a> {
    Global,
    Tenant(&'a TenantId),
    Company(&'a TenantId, &'a CompanyId),
    User(&'a TenantId, &'a UserId),
}

impl ScopeRef<'_> {
    pub(super) fn to_key(self) -> ScopeKey {
        match self {
            ScopeRef::Global => ScopeKey::Global,
            ScopeRef::Tenant(t) => ScopeKey::Tenant(t.clone()),
            ScopeRef::Company(t, c) => ScopeKey::Company(t.clone(), c.clone()),
            ScopeRef::User(t, u) => ScopeKey::User(t.clone(), u.clone()),
        }
    }
}

impl Hash for ScopeRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (tag, tenant, id): (u8, &str, &str) = match *self {
            ScopeRef::Global => (0, "", ""),
            ScopeRef::Tenant(t) => (1, t.as_str(), ""),
            ScopeRef::Company(t, c) => (2, t.as_str(), c.as_str()),
            ScopeRef::User(t, u) => (3, t.as_str(), u.as_str()),
        };
        state.write_u8(tag);
        state.write(tenant.as_bytes());
        state.write_u8(0xff);
        state.write(id.as_bytes());
        state.write_u8(0xff);
    }
}

impl hashbrown::Equivalent<ScopeKey> for ScopeRef<'_> {
    fn equivalent(&self, key: &ScopeKey) -> bool {
        *self == key.as_ref()
    }
}

/// Who is calling which model: given on reserve, check and record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subject {
    pub tenant: TenantId,
    pub user: UserId,
    pub company: Option<CompanyId>,
    /// The caller's tier; else the stored tier; else the configured default.
    pub tier: Option<TierName>,
    /// Whether `tier` was named by a trusted caller (the admin key, or code in the same
    /// process), which may name any tier. When false (a tenant key), `tier` applies only if
    /// the tenant's rules allow it and the user has no stored tier: a stored tier always
    /// wins over a tenant key's request.
    #[serde(default)]
    pub trusted_tier: bool,
    pub model: ModelName,
    pub endpoint: Option<Endpoint>,
}

impl Subject {
    /// The scopes this subject's spend counts against, most specific last: global,
    /// tenant, company (if any), user.
    pub(super) fn scope_refs(&self) -> [Option<ScopeRef<'_>>; 4] {
        [
            Some(ScopeRef::Global),
            Some(ScopeRef::Tenant(&self.tenant)),
            self.company
                .as_ref()
                .map(|c| ScopeRef::Company(&self.tenant, c)),
            Some(ScopeRef::User(&self.tenant, &self.user)),
        ]
    }
}

/// A request to reserve budget before a model call.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    /// The new reservation's id (UUID v7, chosen by the caller so the core needs no clock or
    /// random source).
    pub id: Uuid,
    pub subject: Subject,
    pub input_tokens: u64,
    /// The most completion tokens the call may produce; defaults to the tier's maximum.
    pub max_output_tokens: Option<u64>,
    /// A caller's own worst-case cost; replaces the price-table estimate.
    pub estimated_cost: Option<Money>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// Defaults to the configured TTL; at most the configured maximum.
    pub ttl_us: Option<i64>,
}

/// The outcome of a finished call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Success,
    Error,
    Cancelled,
    Expired,
    /// The call's output was cut off before its usage was known (a streamed call whose
    /// upstream stopped early): charged at least its reservation's estimate, never zero.
    Truncated,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Success => "success",
            RequestStatus::Error => "error",
            RequestStatus::Cancelled => "cancelled",
            RequestStatus::Expired => "expired",
            RequestStatus::Truncated => "truncated",
        }
    }

    pub fn parse(s: &str) -> Option<RequestStatus> {
        Some(match s {
            "success" => RequestStatus::Success,
            "error" => RequestStatus::Error,
            "cancelled" => RequestStatus::Cancelled,
            "expired" => RequestStatus::Expired,
            "truncated" => RequestStatus::Truncated,
            _ => return None,
        })
    }
}

/// How a usage record's cost was found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pricing {
    /// The built-in catalog. Also records written before spendguard stored how a record was
    /// priced.
    #[default]
    Catalog,
    /// A price from the configuration's `[prices]`.
    Config,
    /// The tenant's price overrides: its own price for the model, or its multiplier on the
    /// configured or catalog price.
    TenantOverride,
    /// The caller passed the cost (`cost_usd`).
    Caller,
    /// A model without a price, charged its reservation's estimate.
    Estimate,
    /// A model without a price, charged the default price (`default_price`, else the
    /// built-in conservative price).
    Default,
    /// A model without a price under `unknown_model = "free"`: tokens counted, no cost.
    Free,
}

impl Pricing {
    pub fn as_str(self) -> &'static str {
        match self {
            Pricing::Catalog => "catalog",
            Pricing::Config => "config",
            Pricing::TenantOverride => "tenant_override",
            Pricing::Caller => "caller",
            Pricing::Estimate => "estimate",
            Pricing::Default => "default",
            Pricing::Free => "free",
        }
    }

    pub fn parse(s: &str) -> Option<Pricing> {
        Some(match s {
            "catalog" => Pricing::Catalog,
            "config" => Pricing::Config,
            "tenant_override" => Pricing::TenantOverride,
            "caller" => Pricing::Caller,
            "estimate" => Pricing::Estimate,
            "default" => Pricing::Default,
            "free" => Pricing::Free,
            _ => return None,
        })
    }
}

/// The actual usage of a reserved call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CommitRequest {
    /// The id of the usage record this commit creates.
    pub usage_id: Uuid,
    pub tokens: Tokens,
    /// The real cost if the caller knows it; else computed from the tokens.
    pub cost: Option<Money>,
    /// Defaults to `success`. `expired` is reserved for the ledger. `truncated` without a
    /// cost charges at least the reservation's estimate.
    pub status: RequestStatus,
    /// Where spendguard forwarded the call, when it did (gateway mode).
    pub origin: Option<Origin>,
}

/// Where a call was forwarded, when spendguard forwarded it itself (gateway mode): kept on
/// its usage record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The configured upstream's name.
    pub upstream: String,
    /// The provider's id of the request (its request-id header), when it gave one.
    pub request_id: Option<String>,
}

impl CommitRequest {
    /// The same usage (tokens, cost, status), whatever usage id the retry was given.
    pub fn same_usage(&self, other: &CommitRequest) -> bool {
        self.tokens == other.tokens && self.cost == other.cost && self.status == other.status
    }
}

/// Usage of a call that was not reserved. Counted, never refused.
#[derive(Clone, Debug)]
pub struct RecordRequest {
    pub id: Uuid,
    pub subject: Subject,
    pub tokens: Tokens,
    pub cost: Option<Money>,
    pub status: RequestStatus,
    pub idempotency_key: Option<IdempotencyKey>,
}

// ---------------------------------------------------------------------------------------
// Records and events
// ---------------------------------------------------------------------------------------

/// An open reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: Uuid,
    pub subject: Subject,
    /// The tier the reservation was admitted under.
    pub tier: TierName,
    pub estimate: Money,
    pub estimated_tokens: u64,
    pub created_at: Micros,
    pub expires_at: Micros,
    /// The windows the reservation holds budget in.
    pub day_start: Micros,
    pub month_start: Micros,
    pub idempotency_key: Option<IdempotencyKey>,
    pub fingerprint: u64,
    /// When a limit in shadow would have refused it: the reason ([`Denial::code`]). Kept
    /// with the reservation's event, so would-be denials are counted where it is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_deny: Option<String>,
}

/// One immutable usage record: the `ai_usage` row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: Uuid,
    pub tenant: TenantId,
    pub user: UserId,
    pub company: Option<CompanyId>,
    pub model: ModelName,
    pub endpoint: Option<Endpoint>,
    pub tier: TierName,
    pub tokens: Tokens,
    pub cost: Money,
    /// How `cost` was found.
    #[serde(default)]
    pub pricing: Pricing,
    /// The long-context tier the call was priced at (its threshold in prompt tokens), when
    /// its prompt was above one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_context_above: Option<u64>,
    pub status: RequestStatus,
    /// When the call started: the reservation's admission time, or the record's time.
    pub created_at: Micros,
    pub reservation_id: Option<Uuid>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The calendar windows this record is counted in.
    pub day_start: Micros,
    pub month_start: Micros,
    /// Where the call was forwarded (gateway mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// A per-scope budget override set at run time. `None` fields fall back to configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetOverride {
    pub daily: Option<Money>,
    pub monthly: Option<Money>,
}

impl UsageRecord {
    /// The scopes this record counts against: global, tenant, company (if any), user.
    pub fn scopes(&self) -> impl Iterator<Item = ScopeKey> {
        let t = &self.tenant;
        [
            Some(ScopeKey::Global),
            Some(ScopeKey::Tenant(t.clone())),
            self.company
                .as_ref()
                .map(|c| ScopeKey::Company(t.clone(), c.clone())),
            Some(ScopeKey::User(t.clone(), self.user.clone())),
        ]
        .into_iter()
        .flatten()
    }

    /// [`UsageRecord::scopes`], borrowed.
    pub(super) fn scope_refs(&self) -> [Option<ScopeRef<'_>>; 4] {
        [
            Some(ScopeRef::Global),
            Some(ScopeRef::Tenant(&self.tenant)),
            self.company
                .as_ref()
                .map(|c| ScopeRef::Company(&self.tenant, c)),
            Some(ScopeRef::User(&self.tenant, &self.user)),
        ]
    }

    /// Who made the call, under the tier it was admitted with.
    pub fn subject(&self) -> Subject {
        Subject {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
            company: self.company.clone(),
            tier: Some(self.tier.clone()),
            // The tier a record was admitted with was already resolved.
            trusted_tier: true,
            model: self.model.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    /// Whether this record counts in the counters (expired reservations cost nothing and
    /// are not requests).
    pub fn counts(&self) -> bool {
        self.status != RequestStatus::Expired
    }
}

/// Persisted counters of one scope in one calendar window (a rollup row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterRow {
    pub scope: ScopeKey,
    pub window: Window,
    pub start: Micros,
    pub spent: Money,
    pub requests: u64,
    /// Input plus output tokens ([`Tokens::total`]) of the counting records.
    pub tokens: u64,
    /// The sum of the input tokens of the counting records (for reports; the ledger's
    /// counters use `tokens` only).
    pub input_tokens: u64,
    /// The sum of the cached input tokens of the counting records (part of the input
    /// tokens).
    pub cached_input_tokens: u64,
    /// The sum of the output tokens of the counting records.
    pub output_tokens: u64,
}

/// What a store loads at start-up: current-window counters, open reservations, overrides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub counters: Vec<CounterRow>,
    pub open: Vec<Reservation>,
    pub budgets: Vec<(ScopeKey, BudgetOverride)>,
    pub users: Vec<(TenantId, UserId, UserOverrides)>,
    /// Tenants' price overrides.
    pub tenant_prices: Vec<(TenantId, TenantPrices)>,
}

/// What [`Ledger::restore`] had to adjust.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Users whose stored tier the configuration no longer has: `(tenant, user, tier)`.
    /// They fall back to the default tier.
    pub dropped_tiers: Vec<(TenantId, UserId, TierName)>,
}

/// `(scope, (day spent, day reserved), (month spent, month reserved))`.
pub type ScopeTotals = (ScopeKey, (Money, Money), (Money, Money));

/// A state change to persist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Reserved(Reservation),
    Committed {
        reservation_id: Uuid,
        usage: UsageRecord,
    },
    Released {
        reservation_id: Uuid,
        reason: Option<String>,
        at: Micros,
    },
    Expired {
        reservation_id: Uuid,
        usage: UsageRecord,
    },
    /// A direct record, or a commit that arrived after its reservation expired.
    Recorded(UsageRecord),
    BudgetSet {
        scope: ScopeKey,
        budget: BudgetOverride,
    },
    UserSet {
        tenant: TenantId,
        user: UserId,
        overrides: UserOverrides,
    },
    /// A tenant's price overrides set (empty: cleared).
    TenantPricesSet {
        tenant: TenantId,
        prices: TenantPrices,
    },
}

// ---------------------------------------------------------------------------------------
// Limits and decisions
// ---------------------------------------------------------------------------------------

/// The unit of a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Usd,
    Requests,
    Tokens,
    Concurrent,
}

/// An amount in a limit's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Usd(Money),
    Count(u64),
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Usd(m) => m.serialize(s),
            Amount::Count(n) => s.serialize_u64(*n),
        }
    }
}

/// The state of one limit: what it allows, what is used and reserved, and when it resets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub scope: ScopeKey,
    pub window: Window,
    pub unit: Unit,
    pub limit: Amount,
    pub used: Amount,
    pub reserved: Amount,
    pub remaining: Amount,
    /// When the window ends (calendar windows) or the rate allows another request
    /// (requests per minute). `None` for levels such as concurrency.
    pub resets_at: Option<Micros>,
    /// True when the limit is in shadow: counted like the others, never refusing.
    pub shadow: bool,
}

/// Why a reservation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// One or more limits would be exceeded; every failing limit is listed.
    Limits(Vec<LimitStatus>),
    /// The tier does not allow this model.
    ModelNotAllowed { model: ModelName, tier: TierName },
    /// The model has no price and the policy is `deny`.
    UnknownModel { model: ModelName },
    /// `max_output_tokens` is above the tier's maximum.
    OutputTokensTooHigh { requested: u64, max: u64 },
    /// The reservation would add a user or company scope to a tenant that already has
    /// `limit` of them in memory. Scopes are freed when their month ends (`retry_at`).
    TooManySubjects {
        tenant: TenantId,
        limit: u32,
        retry_at: Micros,
    },
}

impl Denial {
    /// The earliest time at which retrying could succeed, if there is one.
    pub fn retry_at(&self) -> Option<Micros> {
        match self {
            Denial::Limits(l) => l.iter().filter_map(|s| s.resets_at).max(),
            Denial::TooManySubjects { retry_at, .. } => Some(*retry_at),
            _ => None,
        }
    }

    /// True when a money budget (not a rate) refused the reservation.
    pub fn is_budget(&self) -> bool {
        match self {
            Denial::Limits(l) => l.iter().any(|s| s.unit == Unit::Usd),
            _ => false,
        }
    }

    /// The error code of the refusal (`budget_exceeded`, `rate_limited`, ...): one per
    /// denial, also the reason a would-be denial is counted under.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Limits(_) if self.is_budget() => "budget_exceeded",
            Denial::Limits(_) => "rate_limited",
            Denial::ModelNotAllowed { .. } => "model_not_allowed",
            Denial::UnknownModel { .. } => "unknown_model",
            Denial::OutputTokensTooHigh { .. } => "max_output_tokens_exceeded",
            Denial::TooManySubjects { .. } => "too_many_subjects",
        }
    }
}

/// An admitted reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub reservation: Reservation,
    /// Every applicable limit after admission, built when first read.
    pub limits: Limits,
    /// True when this answers a retry with the same idempotency key.
    pub replayed: bool,
    /// What limits in shadow would have refused (admitted anyway): `None` when none would
    /// have, and always on a replay.
    pub would_deny: Option<Denial>,
}

/// The answer to `check` (and to a refused `reserve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub limits: Vec<LimitStatus>,
    pub denial: Option<Denial>,
    /// What limits in shadow would refuse when `denial` is `None`.
    pub would_deny: Option<Denial>,
}

impl CheckOutcome {
    pub fn allowed(&self) -> bool {
        self.denial.is_none()
    }
}

/// How a reservation was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    Committed(UsageRecord),
    Released { reason: Option<String> },
    Expired(UsageRecord),
}

/// The answer to a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub usage: UsageRecord,
    /// The reservation's estimate (zero for a commit after expiry).
    pub reserved: Money,
    /// True when this answers a repeated commit.
    pub replayed: bool,
    /// True when the reservation had expired and the usage was recorded on its own.
    pub late: bool,
}

/// Errors of ledger operations (never a limit: those are [`Denial`]s).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("reservation {0} not found")]
    NotFound(Uuid),
    #[error("reservation {id} is already {state}")]
    AlreadySettled { id: Uuid, state: &'static str },
    #[error("reservation {0} was already committed with different usage")]
    CommitMismatch(Uuid),
    #[error("idempotency key `{0}` was used with a different request")]
    IdempotencyConflict(IdempotencyKey),
    #[error("a reservation with id {0} already exists")]
    DuplicateId(Uuid),
    #[error("no tier named `{0}`")]
    UnknownTier(TierName),
    #[error("ttl_seconds must be between 1 and {max_seconds}")]
    InvalidTtl { max_seconds: i64 },
    #[error("status `expired` is set only by spendguard")]
    ExpiredStatus,
    #[error("the amounts are too large")]
    Overflow,
    #[error(
        "a reservation of more than {threshold} USD may be held at most {max_seconds} seconds (ttl_seconds)"
    )]
    LargeReservationTtl { threshold: Money, max_seconds: i64 },
    #[error("cost {cost} USD is above the most one usage record may carry ({max} USD)")]
    RecordCostTooLarge { cost: Money, max: Money },
    #[error("{tokens} tokens are above the most one usage record may carry ({max})")]
    RecordTokensTooLarge { tokens: u64, max: u64 },
}

/// The result of an operation that changes state: the value and the event to persist
/// (`None` when nothing changed, e.g. an idempotent replay).
#[derive(Clone, Debug, PartialEq)]
pub struct Applied<T> {
    pub value: T,
    pub event: Option<Event>,
}

/// Every applicable limit of an admitted reservation, as it was right after admission.
///
/// Built only when first read (it dereferences to `[LimitStatus]`): admitting a
/// reservation copies the few counters the statuses are made of, and allocates nothing.
/// `From<Vec<LimitStatus>>` wraps statuses built elsewhere.
#[derive(Clone)]
pub struct Limits {
    view: Option<LimitView>,
    built: OnceLock<Vec<LimitStatus>>,
}

impl Limits {
    pub(super) fn lazy(view: LimitView) -> Limits {
        Limits {
            view: Some(view),
            built: OnceLock::new(),
        }
    }

    /// The statuses (built on first use).
    pub fn as_slice(&self) -> &[LimitStatus] {
        self.built.get_or_init(|| {
            self.view
                .as_ref()
                .map(LimitView::statuses)
                .unwrap_or_default()
        })
    }

    /// The statuses, owned.
    pub fn into_vec(self) -> Vec<LimitStatus> {
        let Limits { view, built } = self;
        built
            .into_inner()
            .unwrap_or_else(|| view.as_ref().map(LimitView::statuses).unwrap_or_default())
    }
}

impl From<Vec<LimitStatus>> for Limits {
    fn from(statuses: Vec<LimitStatus>) -> Limits {
        Limits {
            view: None,
            built: OnceLock::from(statuses),
        }
    }
}

impl std::ops::Deref for Limits {
    type Target = [LimitStatus];
    fn deref(&self) -> &[LimitStatus] {
        self.as_slice()
    }
}

impl<'a> IntoIterator for &'a Limits {
    type Item = &'a LimitStatus;
    type IntoIter = std::slice::Iter<'a, LimitStatus>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl PartialEq for Limits {
    fn eq(&self, other: &Limits) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Limits {}
