//! The `Ledger`: live counters of every scope and the reserve → settle state machine.
//!
//! Every operation takes the current time as an argument and returns its decision plus the
//! [`Event`] a store must persist. The ledger never refuses to *record* spend (commits and
//! direct records are always counted); it only refuses to *admit* new reservations.
//!
//! # Invariant
//! For every limit of every scope, at every moment:
//! `spent + reserved <= capacity`, except for the documented overshoot of commits whose
//! actual cost exceeded their estimate, and of direct records (`record`), which are never
//! refused. A reservation is admitted only if `spent + reserved + estimate <= capacity` holds
//! for **all** applicable limits; the check and the update happen under the locks of all the
//! scopes involved, so they are atomic (all or nothing) with respect to every other operation.
//!
//! # Concurrency
//! Scope states live in 64 shards, each behind its own mutex. An operation locks the shards
//! of the scopes it touches in ascending shard order (so two operations can never deadlock),
//! then the shard of the reservation, then nothing else. Idempotency shards, when needed, are
//! locked before all of them.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::RandomState;

/// Hash maps of the hot path use foldhash: several times faster than SipHash on short keys.
/// Keys are chosen by callers, but every map is per-process seeded.
type HashMap<K, V> = std::collections::HashMap<K, V, RandomState>;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ids::{CompanyId, Endpoint, IdempotencyKey, ModelName, TenantId, TierName, UserId};
use crate::money::Money;
use crate::policy::{Budget, ModelPatterns, Policy, UserOverrides};
use crate::prices::{Priced, Tokens};
use crate::window::{Micros, Periods, Window};

const SHARDS: usize = 64;
const MICROS_PER_MINUTE: i64 = 60_000_000;

/// How long idempotency keys are remembered in memory, by default.
pub const DEFAULT_RETENTION_US: i64 = 10 * MICROS_PER_MINUTE;

/// How long settled reservations are remembered in memory, by default: long enough to
/// answer a retried commit while the first one is still being written; after that the
/// store answers (see the `Guard`). Short, so memory stays proportional to the request
/// rate times a few seconds.
pub const DEFAULT_SETTLED_RETENTION_US: i64 = 5_000_000;

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
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

    fn shard(&self, hasher: &RandomState) -> usize {
        (hasher.hash_one(self) as usize) % SHARDS
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
    /// The scopes this subject's spend counts against, most specific last.
    fn scopes(&self) -> Scopes {
        Scopes {
            keys: [
                Some(ScopeKey::Global),
                Some(ScopeKey::Tenant(self.tenant.clone())),
                self.company
                    .as_ref()
                    .map(|c| ScopeKey::Company(self.tenant.clone(), c.clone())),
                Some(ScopeKey::User(self.tenant.clone(), self.user.clone())),
            ],
        }
    }
}

/// The (up to four) scopes of one subject.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scopes {
    keys: [Option<ScopeKey>; 4],
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
    /// The price table (built in, or configured). Also records written before spendguard
    /// stored how a record was priced.
    #[default]
    Catalog,
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
            Pricing::Caller => "caller",
            Pricing::Estimate => "estimate",
            Pricing::Default => "default",
            Pricing::Free => "free",
        }
    }

    pub fn parse(s: &str) -> Option<Pricing> {
        Some(match s {
            "catalog" => Pricing::Catalog,
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
}

/// An admitted reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub reservation: Reservation,
    /// Every applicable limit after admission.
    pub limits: Vec<LimitStatus>,
    /// True when this answers a retry with the same idempotency key.
    pub replayed: bool,
}

/// The answer to `check` (and to a refused `reserve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub limits: Vec<LimitStatus>,
    pub denial: Option<Denial>,
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

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

/// Counters of one calendar window of one scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    start: Micros,
    spent: Money,
    reserved: Money,
    requests: u64,
    requests_reserved: u64,
    tokens: u64,
    tokens_reserved: u64,
}

impl Counters {
    /// The counters as of the window starting at `start`: zero if they are of another one.
    fn at(&self, start: Micros) -> Counters {
        if self.start == start {
            *self
        } else {
            Counters {
                start,
                ..Counters::default()
            }
        }
    }

    /// Moves to the window at `start` if that is newer than the current one. Returns the
    /// counters to update for `start`, or `None` when `start` is an older, finished window.
    fn window_mut(&mut self, start: Micros) -> Option<&mut Counters> {
        if self.start < start {
            *self = Counters {
                start,
                ..Counters::default()
            };
        }
        (self.start == start).then_some(self)
    }
}

/// The live state of one scope. Only the current windows are kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ScopeState {
    day: Counters,
    month: Counters,
    /// Reservations open against this scope.
    in_flight: u32,
    /// Tenant scopes only: how many user and company scopes of the tenant are held in
    /// memory (maintained where they are created and dropped).
    subjects: u32,
    /// GCRA theoretical arrival time (users only).
    tat: Micros,
}

#[derive(Debug, Default)]
struct Shard {
    scopes: HashMap<ScopeKey, ScopeState>,
}

#[derive(Debug)]
struct Settled {
    settlement: Settlement,
    /// The commit that settled it (or, after expiry, the late commit recorded on its own).
    commit: Option<CommitRequest>,
    /// The usage recorded by a commit that arrived after expiry.
    late: Option<UsageRecord>,
    /// The reservation that was settled: what a replay answers, and what an undone
    /// settlement reopens.
    reservation: Box<Reservation>,
    at: Micros,
}

#[derive(Debug, Default)]
struct ResShard {
    open: HashMap<Uuid, Box<Reservation>>,
    /// Boxed: entries are large and the map is churned on every settle.
    settled: HashMap<Uuid, Box<Settled>>,
}

#[derive(Debug)]
enum Remembered {
    Reservation(Box<Reservation>),
    Usage(Box<UsageRecord>),
}

#[derive(Debug)]
struct IdemEntry {
    fingerprint: u64,
    result: Remembered,
    /// Remembered until then: the retention, and for a reservation at least its expiry.
    until: Micros,
}

#[derive(Debug, Default)]
struct IdemShard {
    keys: HashMap<(TenantId, IdempotencyKey), IdemEntry>,
}

/// The effective limits of one user.
#[derive(Clone, Debug)]
struct Effective {
    tier: TierName,
    rpm: Option<u32>,
    requests_per_day: Option<u64>,
    tokens_per_day: Option<u64>,
    max_concurrent: Option<u32>,
    max_output_tokens: Option<u64>,
    allowed_models: Option<Arc<ModelPatterns>>,
    /// Budgets of [global, tenant, company, user].
    budgets: [Budget; 4],
    /// The most user and company scopes the tenant may have in memory.
    max_subjects: Option<u32>,
}

/// A user's stored overrides and their compiled model patterns.
type StoredUser = (UserOverrides, Option<Arc<ModelPatterns>>);

#[derive(Debug, Default)]
struct Overrides {
    budgets: HashMap<ScopeKey, BudgetOverride>,
    users: HashMap<(TenantId, UserId), StoredUser>,
}

/// The live, in-memory ledger. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Ledger {
    policy: RwLock<Arc<Policy>>,
    overrides: RwLock<Overrides>,
    hasher: RandomState,
    scopes: Box<[Mutex<Shard>]>,
    reservations: Box<[Mutex<ResShard>]>,
    idempotency: Box<[Mutex<IdemShard>]>,
    retention_us: i64,
    settled_retention_us: i64,
    /// When finished windows and old idempotency keys were last dropped.
    last_forget: std::sync::atomic::AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave it half-updated (updates are applied after
    // all checks), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shards of up to four scopes, locked in ascending order.
struct Locked<'a> {
    guards: [Option<(usize, MutexGuard<'a, Shard>)>; 4],
}

impl Locked<'_> {
    fn shard(&mut self, idx: usize) -> &mut Shard {
        self.guards
            .iter_mut()
            .flatten()
            .find(|(i, _)| *i == idx)
            .map(|(_, g)| &mut **g)
            .expect("the shard is locked")
    }
}

fn fits_money(used: Money, reserved: Money, add: Money, capacity: Money) -> bool {
    // `capacity` is the whole limit in single-node mode; in cluster mode it will be the
    // allowance this instance holds (see ARCHITECTURE.md, leases).
    used.checked_add(reserved)
        .and_then(|x| x.checked_add(add))
        .is_some_and(|total| total <= capacity)
}

fn fits_count(used: u64, reserved: u64, add: u64, capacity: u64) -> bool {
    used.checked_add(reserved)
        .and_then(|x| x.checked_add(add))
        .is_some_and(|total| total <= capacity)
}

/// The canonical encoding of a request whose SHA-256 is its fingerprint: a version tag and
/// the request's kind, then each field in a fixed order, strings and options with explicit
/// lengths and markers, integers big-endian. It is persisted (reservations keep it for
/// retries across restarts), so it never depends on `Hash` implementations or the
/// toolchain; changing it needs a new version tag.
struct Canonical(Sha256);

impl Canonical {
    fn new(kind: &str) -> Canonical {
        let mut c = Canonical(Sha256::new());
        c.str("spendguard.fingerprint.v1");
        c.str(kind);
        c
    }
    fn u64(&mut self, v: u64) {
        self.0.update(v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.update(v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.update(s.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.0.update([0u8]),
            Some(v) => {
                self.0.update([1u8]);
                f(self, v);
            }
        }
    }
    fn subject(&mut self, s: &Subject) {
        self.str(s.tenant.as_str());
        self.str(s.user.as_str());
        self.opt(s.company.as_ref(), |c, v| c.str(v.as_str()));
        self.opt(s.tier.as_ref(), |c, v| c.str(v.as_str()));
        self.str(s.model.as_str());
        self.opt(s.endpoint.as_ref(), |c, v| c.str(v.as_str()));
    }
    /// The first eight bytes of the digest, big-endian.
    fn finish(self) -> u64 {
        let digest = self.0.finalize();
        u64::from_be_bytes(
            digest[..8]
                .try_into()
                .expect("a SHA-256 digest has 32 bytes"),
        )
    }
}

/// The fingerprint of a reservation request, compared when its idempotency key is reused.
pub fn reserve_fingerprint(req: &ReserveRequest) -> u64 {
    let mut c = Canonical::new("reserve");
    c.subject(&req.subject);
    c.u64(req.input_tokens);
    c.opt(req.max_output_tokens, Canonical::u64);
    c.opt(req.estimated_cost, |c, m| c.i64(m.micros()));
    c.opt(req.ttl_us, Canonical::i64);
    c.finish()
}

/// The fingerprint of a direct record request, compared when its idempotency key is reused.
pub fn record_fingerprint(req: &RecordRequest) -> u64 {
    let mut c = Canonical::new("record");
    c.subject(&req.subject);
    c.u64(req.tokens.input);
    c.u64(req.tokens.cached_input);
    c.u64(req.tokens.output);
    c.opt(req.cost, |c, m| c.i64(m.micros()));
    c.str(req.status.as_str());
    c.finish()
}

/// The id of the usage record of a commit that arrives after its reservation expired: a
/// UUID (version 8) derived from the reservation id, so a retried late commit, even after a
/// restart, can only ever create the same record.
pub fn late_usage_id(reservation: &Uuid) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"spendguard.late-commit.v1");
    h.update(reservation.as_bytes());
    let digest = h.finalize();
    Uuid::new_v8(
        digest[..16]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

impl Ledger {
    pub fn new(policy: Policy) -> Ledger {
        Ledger::with_retention(policy, DEFAULT_RETENTION_US)
    }

    /// A ledger that remembers idempotency keys for `retention_us` and settled reservations
    /// for the shorter of that and [`DEFAULT_SETTLED_RETENTION_US`].
    pub fn with_retention(policy: Policy, retention_us: i64) -> Ledger {
        Ledger {
            policy: RwLock::new(Arc::new(policy)),
            overrides: RwLock::new(Overrides::default()),
            hasher: RandomState::default(),
            scopes: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            reservations: (0..SHARDS)
                .map(|_| Mutex::new(ResShard::default()))
                .collect(),
            idempotency: (0..SHARDS)
                .map(|_| Mutex::new(IdemShard::default()))
                .collect(),
            retention_us,
            settled_retention_us: retention_us.min(DEFAULT_SETTLED_RETENTION_US),
            last_forget: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the policy (e.g. after a configuration reload). Counters are kept.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    // ----- admin --------------------------------------------------------------------

    /// Sets (or, with both fields `None`, clears) a scope's budget override. Applies at once.
    pub fn set_budget(&self, scope: ScopeKey, budget: BudgetOverride) -> Applied<()> {
        let mut o = self.overrides.write().unwrap_or_else(|e| e.into_inner());
        if budget == BudgetOverride::default() {
            o.budgets.remove(&scope);
        } else {
            o.budgets.insert(scope.clone(), budget);
        }
        Applied {
            value: (),
            event: Some(Event::BudgetSet { scope, budget }),
        }
    }

    pub fn budget_override(&self, scope: &ScopeKey) -> Option<BudgetOverride> {
        self.overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .budgets
            .get(scope)
            .copied()
    }

    /// Sets (or, when empty, clears) a user's tier and limit overrides. Applies at once.
    pub fn set_user(
        &self,
        tenant: TenantId,
        user: UserId,
        overrides: UserOverrides,
    ) -> Result<Applied<()>, LedgerError> {
        if let Some(t) = &overrides.tier
            && self.policy().tier(t).is_none()
        {
            return Err(LedgerError::UnknownTier(t.clone()));
        }
        let mut o = self.overrides.write().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.clone(), user.clone());
        if overrides.is_empty() {
            o.users.remove(&key);
        } else {
            let patterns = overrides
                .allowed_models
                .clone()
                .map(|p| Arc::new(ModelPatterns::new(p)));
            o.users.insert(key, (overrides.clone(), patterns));
        }
        Ok(Applied {
            value: (),
            event: Some(Event::UserSet {
                tenant,
                user,
                overrides,
            }),
        })
    }

    /// Every budget override, sorted by scope (kind, then ids).
    pub fn budget_overrides(&self) -> Vec<(ScopeKey, BudgetOverride)> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = o.budgets.iter().map(|(k, b)| (k.clone(), *b)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every user's stored overrides, sorted by tenant, then user.
    pub fn all_user_overrides(&self) -> Vec<(TenantId, UserId, UserOverrides)> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = o
            .users
            .iter()
            .map(|((t, u), (overrides, _))| (t.clone(), u.clone(), overrides.clone()))
            .collect();
        v.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
        v
    }

    pub fn user_overrides(&self, tenant: &TenantId, user: &UserId) -> Option<UserOverrides> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        o.users
            .get(&(tenant.clone(), user.clone()))
            .map(|(u, _)| u.clone())
    }

    // ----- decisions ----------------------------------------------------------------

    fn effective(&self, policy: &Policy, subject: &Subject) -> Result<Effective, LedgerError> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        let user_key = (subject.tenant.clone(), subject.user.clone());
        let stored = o.users.get(&user_key);
        let rules = policy.tenant_rules(&subject.tenant);
        let stored_tier = stored.and_then(|(u, _)| u.tier.as_ref());
        // A trusted caller names any tier. A tenant key's tier applies only when its tenant
        // may use it and the admin stored no tier for the user: a stored tier always wins.
        let requested = match &subject.tier {
            Some(t) if policy.tier(t).is_none() => return Err(LedgerError::UnknownTier(t.clone())),
            Some(t) if subject.trusted_tier || (stored_tier.is_none() && rules.allows_tier(t)) => {
                Some(t)
            }
            _ => None,
        };
        let tier_name = requested.or(stored_tier).unwrap_or(&policy.default_tier);
        let tier = policy
            .tier(tier_name)
            .ok_or_else(|| LedgerError::UnknownTier(tier_name.clone()))?;
        let mut e = Effective {
            tier: tier_name.clone(),
            rpm: tier.limits.requests_per_minute,
            requests_per_day: tier.limits.requests_per_day,
            tokens_per_day: tier.limits.tokens_per_day,
            max_concurrent: tier.limits.max_concurrent,
            max_output_tokens: tier.limits.max_output_tokens,
            allowed_models: tier.limits.allowed_models.clone(),
            budgets: [policy.global, policy.tenant, policy.company, tier.budget],
            max_subjects: rules.max_tracked_subjects,
        };
        if let Some((u, patterns)) = stored {
            e.rpm = u.requests_per_minute.or(e.rpm);
            e.requests_per_day = u.requests_per_day.or(e.requests_per_day);
            e.tokens_per_day = u.tokens_per_day.or(e.tokens_per_day);
            e.max_concurrent = u.max_concurrent.or(e.max_concurrent);
            e.max_output_tokens = u.max_output_tokens.or(e.max_output_tokens);
            if patterns.is_some() {
                e.allowed_models = patterns.clone();
            }
        }
        let mut tenant_override = BudgetOverride::default();
        if !o.budgets.is_empty() {
            for (i, key) in subject.scopes().keys.iter().enumerate() {
                if let Some(b) = key.as_ref().and_then(|k| o.budgets.get(k)) {
                    e.budgets[i].daily = b.daily.or(e.budgets[i].daily);
                    e.budgets[i].monthly = b.monthly.or(e.budgets[i].monthly);
                    if i == 1 {
                        tenant_override = *b;
                    }
                }
            }
        }
        e.budgets[1] = Self::tenant_share(rules, e.budgets[1], e.budgets[0], tenant_override);
        Ok(e)
    }

    /// A tenant's caps after its share of the global caps: for each window, the admin's
    /// override of that tenant wins if it sets one; else the cap is the smaller of the
    /// configured tenant cap and `share × global cap`.
    fn tenant_share(
        rules: &crate::policy::TenantRules,
        tenant: Budget,
        global: Budget,
        overridden: BudgetOverride,
    ) -> Budget {
        if rules.share_of_global_ppm.is_none() {
            return tenant;
        }
        Budget {
            daily: match overridden.daily {
                Some(d) => Some(d),
                None => rules.share_cap(tenant.daily, global.daily),
            },
            monthly: match overridden.monthly {
                Some(m) => Some(m),
                None => rules.share_cap(tenant.monthly, global.monthly),
            },
        }
    }

    /// Creates the missing states of `scopes`, counting each new user or company scope on
    /// its tenant's state. With `cap`, a missing user or company scope is left uncreated
    /// when its tenant already tracks `cap` of them. Returns which scopes exist afterwards.
    fn ensure_scopes(
        locked: &mut Locked<'_>,
        scopes: &Scopes,
        idx: &[usize; 4],
        cap: Option<u32>,
    ) -> [bool; 4] {
        let mut present = [false; 4];
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if locked.shard(idx[i]).scopes.contains_key(key) {
                present[i] = true;
                continue;
            }
            if let (ScopeKey::Company(t, _) | ScopeKey::User(t, _), Some(tkey)) =
                (key, &scopes.keys[1])
            {
                debug_assert_eq!(tkey.tenant(), Some(t));
                let tenant = locked.shard(idx[1]).scopes.entry(tkey.clone()).or_default();
                if cap.is_some_and(|cap| tenant.subjects >= cap) {
                    continue;
                }
                tenant.subjects += 1;
            }
            locked
                .shard(idx[i])
                .scopes
                .insert(key.clone(), ScopeState::default());
            present[i] = true;
        }
        present
    }

    fn lock_scopes(&self, scopes: &Scopes) -> (Locked<'_>, [usize; 4]) {
        let mut idx = [usize::MAX; 4];
        for (i, k) in scopes.keys.iter().enumerate() {
            if let Some(k) = k {
                idx[i] = k.shard(&self.hasher);
            }
        }
        let mut order = idx;
        order.sort_unstable();
        let mut guards: [Option<(usize, MutexGuard<'_, Shard>)>; 4] = [None, None, None, None];
        let mut last = usize::MAX;
        for (slot, &s) in order.iter().enumerate() {
            if s != usize::MAX && s != last {
                guards[slot] = Some((s, lock(&self.scopes[s])));
                last = s;
            }
        }
        (Locked { guards }, idx)
    }

    fn res_shard(&self, id: &Uuid) -> &Mutex<ResShard> {
        &self.reservations[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    fn idem_shard(&self, tenant: &TenantId, key: &IdempotencyKey) -> &Mutex<IdemShard> {
        &self.idempotency[(self.hasher.hash_one((tenant, key)) as usize) % SHARDS]
    }

    /// Evaluates every limit for a reservation of `estimate` (read-only). Returns all
    /// statuses (as they would be after admission when `after` is set), the failing ones,
    /// and a refusal when admitting would track more user and company scopes than the
    /// tenant may have (found in the same scope lookups, so it costs no extra hashing).
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        locked: &mut Locked<'_>,
        scopes: &Scopes,
        idx: &[usize; 4],
        eff: &Effective,
        periods: &Periods,
        estimate: Money,
        tokens: u64,
        requests: u64,
        now: Micros,
        want_all: bool,
        after: bool,
    ) -> (Vec<LimitStatus>, Vec<LimitStatus>, Option<Denial>) {
        let mut all = Vec::with_capacity(if want_all { 16 } else { 0 });
        let mut failing = Vec::new();
        let empty = ScopeState::default();
        let (mut tracked, mut new_subjects) = (0u32, 0u32);
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            let shard = locked.shard(idx[i]);
            let found = shard.scopes.get(key);
            match key {
                ScopeKey::Tenant(_) => tracked = found.map_or(0, |s| s.subjects),
                ScopeKey::Company(..) | ScopeKey::User(..) if found.is_none() => new_subjects += 1,
                _ => {}
            }
            let state = found.unwrap_or(&empty);
            let day = state.day.at(periods.day.start);
            let month = state.month.at(periods.month.start);
            let mut push = |status: LimitStatus, ok: bool| {
                if !ok {
                    failing.push(status.clone());
                }
                if want_all {
                    all.push(status);
                }
            };
            let budget = eff.budgets[i];
            for (cap, c, window, end) in [
                (budget.daily, day, Window::Day, periods.day.end),
                (budget.monthly, month, Window::Month, periods.month.end),
            ] {
                let Some(cap) = cap else { continue };
                let ok = fits_money(c.spent, c.reserved, estimate, cap);
                let reserved = if after && ok {
                    c.reserved.saturating_add(estimate)
                } else {
                    c.reserved
                };
                push(
                    LimitStatus {
                        scope: key.clone(),
                        window,
                        unit: Unit::Usd,
                        limit: Amount::Usd(cap),
                        used: Amount::Usd(c.spent),
                        reserved: Amount::Usd(reserved),
                        remaining: Amount::Usd(
                            cap.saturating_sub(c.spent.saturating_add(reserved))
                                .max(Money::ZERO),
                        ),
                        resets_at: Some(end),
                    },
                    ok,
                );
            }
            if !matches!(key, ScopeKey::User(..)) {
                continue;
            }
            let counts = [
                (
                    eff.requests_per_day,
                    day.requests,
                    day.requests_reserved,
                    requests,
                    Unit::Requests,
                ),
                (
                    eff.tokens_per_day,
                    day.tokens,
                    day.tokens_reserved,
                    tokens,
                    Unit::Tokens,
                ),
            ];
            for (cap, used, reserved, add, unit) in counts {
                let Some(cap) = cap else { continue };
                let ok = fits_count(used, reserved, add, cap);
                let reserved = if after && ok {
                    reserved.saturating_add(add)
                } else {
                    reserved
                };
                push(
                    LimitStatus {
                        scope: key.clone(),
                        window: Window::Day,
                        unit,
                        limit: Amount::Count(cap),
                        used: Amount::Count(used),
                        reserved: Amount::Count(reserved),
                        remaining: Amount::Count(cap.saturating_sub(used.saturating_add(reserved))),
                        resets_at: Some(periods.day.end),
                    },
                    ok,
                );
            }
            if let Some(cap) = eff.max_concurrent {
                let add = requests as u32;
                let ok = state.in_flight.saturating_add(add) <= cap;
                let level = if after && ok {
                    state.in_flight + add
                } else {
                    state.in_flight
                };
                push(
                    LimitStatus {
                        scope: key.clone(),
                        window: Window::None,
                        unit: Unit::Concurrent,
                        limit: Amount::Count(cap as u64),
                        used: Amount::Count(level as u64),
                        reserved: Amount::Count(0),
                        remaining: Amount::Count(cap.saturating_sub(level) as u64),
                        resets_at: None,
                    },
                    ok,
                );
            }
            if let Some(rpm) = eff.rpm {
                let g = Gcra::new(rpm);
                let (ok, tat_after) = g.try_admit(state.tat, now, requests);
                let tat = if after && ok { tat_after } else { state.tat };
                let used = g.used(tat, now);
                push(
                    LimitStatus {
                        scope: key.clone(),
                        window: Window::Minute,
                        unit: Unit::Requests,
                        limit: Amount::Count(rpm as u64),
                        used: Amount::Count(used),
                        reserved: Amount::Count(0),
                        remaining: Amount::Count((rpm as u64).saturating_sub(used)),
                        resets_at: Some(if ok {
                            tat.max(now)
                        } else {
                            g.next_allowed(state.tat, now)
                        }),
                    },
                    ok,
                );
            }
        }
        let too_many = match (eff.max_subjects, &scopes.keys[1]) {
            (Some(cap), Some(ScopeKey::Tenant(t)))
                if new_subjects > 0 && tracked.saturating_add(new_subjects) > cap =>
            {
                Some(Denial::TooManySubjects {
                    tenant: t.clone(),
                    limit: cap,
                    retry_at: periods.month.end,
                })
            }
            _ => None,
        };
        (all, failing, too_many)
    }

    /// Admission rules that do not depend on counters.
    fn static_denial(eff: &Effective, subject: &Subject, max_output: u64) -> Option<Denial> {
        if let Some(p) = &eff.allowed_models
            && !p.allows(&subject.model)
        {
            return Some(Denial::ModelNotAllowed {
                model: subject.model.clone(),
                tier: eff.tier.clone(),
            });
        }
        if let Some(max) = eff.max_output_tokens
            && max_output > max
        {
            return Some(Denial::OutputTokensTooHigh {
                requested: max_output,
                max,
            });
        }
        None
    }

    /// The worst-case cost and tokens of a reservation request.
    fn estimate(
        policy: &Policy,
        eff: &Effective,
        req: &ReserveRequest,
    ) -> Result<Result<(Money, u64, u64), Denial>, LedgerError> {
        let max_output = req.max_output_tokens.or(eff.max_output_tokens).unwrap_or(0);
        let tokens = req
            .input_tokens
            .checked_add(max_output)
            .ok_or(LedgerError::Overflow)?;
        let cost = match req.estimated_cost {
            Some(c) => c,
            None => match policy.prices.price(&req.subject.model) {
                None => {
                    return Ok(Err(Denial::UnknownModel {
                        model: req.subject.model.clone(),
                    }));
                }
                Some(p) => p
                    .cost(Tokens {
                        input: req.input_tokens,
                        cached_input: 0,
                        output: max_output,
                    })
                    .ok_or(LedgerError::Overflow)?,
            },
        };
        Ok(Ok((cost, tokens, max_output)))
    }

    /// Would this reservation be admitted now? Changes nothing.
    pub fn check(&self, req: &ReserveRequest, now: Micros) -> Result<CheckOutcome, LedgerError> {
        let policy = self.policy();
        let eff = self.effective(&policy, &req.subject)?;
        let periods = policy.calendar.periods(now);
        let scopes = req.subject.scopes();
        let (estimate, tokens, denial) = match Self::estimate(&policy, &eff, req)? {
            Ok((c, t, max_output)) => (c, t, Self::static_denial(&eff, &req.subject, max_output)),
            Err(d) => (Money::ZERO, req.input_tokens, Some(d)),
        };
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let (limits, failing, too_many) = Self::evaluate(
            &mut locked,
            &scopes,
            &idx,
            &eff,
            &periods,
            estimate,
            tokens,
            1,
            now,
            true,
            false,
        );
        let denial = denial
            .or((!failing.is_empty()).then_some(Denial::Limits(failing)))
            .or(too_many);
        Ok(CheckOutcome { limits, denial })
    }

    /// The effective limits of a user and what remains of them, `tier` named by a trusted
    /// caller. Changes nothing.
    pub fn limits(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
        tier: Option<&TierName>,
        now: Micros,
    ) -> Result<Vec<LimitStatus>, LedgerError> {
        self.limits_as(tenant, user, company, tier, true, now)
    }

    /// The effective limits of a user, `tier` named by a trusted caller or not (see
    /// [`Subject::trusted_tier`]). Changes nothing.
    pub fn limits_as(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
        tier: Option<&TierName>,
        trusted_tier: bool,
        now: Micros,
    ) -> Result<Vec<LimitStatus>, LedgerError> {
        let policy = self.policy();
        let subject = Subject {
            tenant: tenant.clone(),
            user: user.clone(),
            company: company.cloned(),
            tier: tier.cloned(),
            trusted_tier,
            model: ModelName::parse("-").expect("valid"),
            endpoint: None,
        };
        let eff = self.effective(&policy, &subject)?;
        let periods = policy.calendar.periods(now);
        let scopes = subject.scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let (limits, _, _) = Self::evaluate(
            &mut locked,
            &scopes,
            &idx,
            &eff,
            &periods,
            Money::ZERO,
            0,
            0,
            now,
            true,
            false,
        );
        Ok(limits)
    }

    /// Reserves a worst-case estimate against every applicable limit, all or nothing.
    ///
    /// `Ok(Err(outcome))` is a denial (nothing changed); `Err` is a bad request.
    pub fn reserve(
        &self,
        req: &ReserveRequest,
        now: Micros,
    ) -> Result<Result<Applied<Reserved>, CheckOutcome>, LedgerError> {
        let policy = self.policy();
        let eff = self.effective(&policy, &req.subject)?;
        let ttl = req.ttl_us.unwrap_or(policy.reservation_ttl_us);
        if ttl <= 0 || ttl > policy.max_reservation_ttl_us {
            return Err(LedgerError::InvalidTtl {
                max_seconds: policy.max_reservation_ttl_us / 1_000_000,
            });
        }
        let fp = req
            .idempotency_key
            .as_ref()
            .map_or(0, |_| reserve_fingerprint(req));
        // Idempotency: the key's shard stays locked for the whole operation, so two retries
        // racing each other admit once.
        let mut idem = req
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(&req.subject.tenant, k))));
        if let Some((k, shard)) = &idem
            && let Some(e) = shard.keys.get(&(req.subject.tenant.clone(), (*k).clone()))
        {
            if e.fingerprint != fp {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            }
            let Remembered::Reservation(reservation) = &e.result else {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            };
            let reservation = (**reservation).clone();
            let s = &req.subject;
            let limits = self.limits_as(
                &s.tenant,
                &s.user,
                s.company.as_ref(),
                s.tier.as_ref(),
                s.trusted_tier,
                now,
            )?;
            return Ok(Ok(Applied {
                value: Reserved {
                    reservation,
                    limits,
                    replayed: true,
                },
                event: None,
            }));
        }
        let (estimate, tokens, max_output) = match Self::estimate(&policy, &eff, req)? {
            Ok(v) => v,
            Err(d) => {
                return Ok(Err(CheckOutcome {
                    limits: Vec::new(),
                    denial: Some(d),
                }));
            }
        };
        if let Some(d) = Self::static_denial(&eff, &req.subject, max_output) {
            return Ok(Err(CheckOutcome {
                limits: Vec::new(),
                denial: Some(d),
            }));
        }
        if estimate > policy.large_reservation && ttl > policy.large_reservation_max_ttl_us {
            return Err(LedgerError::LargeReservationTtl {
                threshold: policy.large_reservation,
                max_seconds: policy.large_reservation_max_ttl_us / 1_000_000,
            });
        }
        let periods = policy.calendar.periods(now);
        let scopes = req.subject.scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let (limits, failing, too_many) = Self::evaluate(
            &mut locked,
            &scopes,
            &idx,
            &eff,
            &periods,
            estimate,
            tokens,
            1,
            now,
            true,
            true,
        );
        if !failing.is_empty() {
            return Ok(Err(CheckOutcome {
                limits,
                denial: Some(Denial::Limits(failing)),
            }));
        }
        if let Some(d) = too_many {
            return Ok(Err(CheckOutcome {
                limits,
                denial: Some(d),
            }));
        }
        let reservation = Reservation {
            id: req.id,
            subject: Subject {
                tier: req.subject.tier.clone(),
                ..req.subject.clone()
            },
            tier: eff.tier.clone(),
            estimate,
            estimated_tokens: tokens,
            created_at: now,
            expires_at: now.saturating_add(ttl),
            day_start: periods.day.start,
            month_start: periods.month.start,
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: fp,
        };
        {
            let mut rs = lock(self.res_shard(&req.id));
            if rs.open.contains_key(&req.id) || rs.settled.contains_key(&req.id) {
                return Err(LedgerError::DuplicateId(req.id));
            }
            rs.open.insert(req.id, Box::new(reservation.clone()));
        }
        let mut new_subjects = 0;
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            let state = locked
                .shard(idx[i])
                .scopes
                .entry(key.clone())
                .or_insert_with(|| {
                    if i >= 2 {
                        new_subjects += 1;
                    }
                    ScopeState::default()
                });
            state.in_flight += 1;
            for (c, start) in [
                (&mut state.day, periods.day.start),
                (&mut state.month, periods.month.start),
            ] {
                if let Some(c) = c.window_mut(start) {
                    c.reserved = c.reserved.saturating_add(estimate);
                    c.requests_reserved += 1;
                    c.tokens_reserved = c.tokens_reserved.saturating_add(tokens);
                }
            }
            if matches!(key, ScopeKey::User(..))
                && let Some(rpm) = eff.rpm
            {
                state.tat = Gcra::new(rpm).try_admit(state.tat, now, 1).1;
            }
        }
        if new_subjects > 0
            && let Some(tkey) = &scopes.keys[1]
            && let Some(t) = locked.shard(idx[1]).scopes.get_mut(tkey)
        {
            // The tenant's state was created first (scopes run global, tenant, company, user).
            t.subjects += new_subjects;
        }
        drop(locked);
        if let Some((k, shard)) = &mut idem {
            shard.keys.insert(
                (req.subject.tenant.clone(), (*k).clone()),
                IdemEntry {
                    fingerprint: fp,
                    result: Remembered::Reservation(Box::new(reservation.clone())),
                    until: now
                        .saturating_add(self.retention_us)
                        .max(reservation.expires_at),
                },
            );
        }
        Ok(Ok(Applied {
            value: Reserved {
                reservation: reservation.clone(),
                limits,
                replayed: false,
            },
            event: Some(Event::Reserved(reservation)),
        }))
    }

    fn find_reservation(&self, id: &Uuid) -> Option<Reservation> {
        lock(self.res_shard(id)).open.get(id).map(|r| (**r).clone())
    }

    /// An open reservation, if there is one with this id.
    pub fn reservation(&self, id: &Uuid) -> Option<Reservation> {
        self.find_reservation(id)
    }

    /// Takes an open reservation out under the locks of its scopes, applies `apply` to its
    /// counters and keeps it among the settled ones with the settlement (and the commit)
    /// that `settled` makes. Returns the reservation's estimate and the settlement, or `None`
    /// when it is no longer open.
    fn settle_open(
        &self,
        id: &Uuid,
        now: Micros,
        settled: impl FnOnce(&Reservation) -> (Settlement, Option<CommitRequest>),
        mut apply: impl FnMut(&mut ScopeState, &Reservation),
    ) -> Option<(Money, Settlement)> {
        let scopes = lock(self.res_shard(id)).open.get(id)?.subject.scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let mut rs = lock(self.res_shard(id));
        // Re-check under the scope locks: another thread may have settled it meanwhile.
        let res = rs.open.remove(id)?;
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if let Some(state) = locked.shard(idx[i]).scopes.get_mut(key) {
                state.in_flight = state.in_flight.saturating_sub(1);
                apply(state, &res);
            }
        }
        let (settlement, commit) = settled(&res);
        let estimate = res.estimate;
        rs.settled.insert(
            *id,
            Box::new(Settled {
                settlement: settlement.clone(),
                commit,
                late: None,
                reservation: res,
                at: now,
            }),
        );
        Some((estimate, settlement))
    }

    fn release_counters(c: &mut Counters, res: &Reservation) {
        c.reserved = c.reserved.saturating_sub(res.estimate);
        c.requests_reserved = c.requests_reserved.saturating_sub(1);
        c.tokens_reserved = c.tokens_reserved.saturating_sub(res.estimated_tokens);
    }

    fn charge(c: &mut Counters, cost: Money, tokens: u64) {
        c.spent = c.spent.saturating_add(cost);
        c.requests += 1;
        c.tokens = c.tokens.saturating_add(tokens);
    }

    fn uncharge(c: &mut Counters, cost: Money, tokens: u64) {
        c.spent = c.spent.saturating_sub(cost);
        c.requests = c.requests.saturating_sub(1);
        c.tokens = c.tokens.saturating_sub(tokens);
    }

    fn usage_from(
        res: &Reservation,
        commit: &CommitRequest,
        cost: Money,
        pricing: Pricing,
    ) -> UsageRecord {
        UsageRecord {
            id: commit.usage_id,
            tenant: res.subject.tenant.clone(),
            user: res.subject.user.clone(),
            company: res.subject.company.clone(),
            model: res.subject.model.clone(),
            endpoint: res.subject.endpoint.clone(),
            tier: res.tier.clone(),
            tokens: commit.tokens,
            cost,
            pricing,
            status: commit.status,
            created_at: res.created_at,
            reservation_id: Some(res.id),
            idempotency_key: res.idempotency_key.clone(),
            day_start: res.day_start,
            month_start: res.month_start,
            origin: commit.origin.clone(),
        }
    }

    /// Refuses a usage record larger than any real model call (`max_record_cost_usd`,
    /// `max_record_tokens`), so no caller can charge a budget an arbitrary amount. A commit
    /// (`floor` is its reservation's estimate) may always charge its estimate, and exceed it
    /// by at most `max_record_cost_usd`: a large reservation is committed in full, and one
    /// call's overshoot past its estimate stays bounded.
    fn within_record_ceiling(
        policy: &Policy,
        cost: Money,
        tokens: Tokens,
        floor: Option<Money>,
    ) -> Result<(), LedgerError> {
        let max = floor.map_or(policy.max_record_cost, |estimate| {
            estimate.saturating_add(policy.max_record_cost)
        });
        if cost > max {
            return Err(LedgerError::RecordCostTooLarge { cost, max });
        }
        let total = tokens.total();
        if total > policy.max_record_tokens {
            return Err(LedgerError::RecordTokensTooLarge {
                tokens: total,
                max: policy.max_record_tokens,
            });
        }
        Ok(())
    }

    /// The cost of a finished call and how it was found: the caller's cost, else the price
    /// table. A model without a price is never charged zero by accident: a reserved call
    /// (`floor` is its estimate) pays at least its estimate, or the default price when that
    /// is more (`unknown_model = "default_cost"`); a direct record pays the default price
    /// ([`PriceTable::fallback`](crate::prices::PriceTable::fallback)). Only
    /// `unknown_model = "free"` charges nothing, as configured.
    fn price_call(
        policy: &Policy,
        model: &ModelName,
        tokens: Tokens,
        given: Option<Money>,
        floor: Option<Money>,
    ) -> Result<(Money, Pricing), LedgerError> {
        let priced = match given {
            Some(c) => (c, Pricing::Caller),
            None => Self::price_listed(policy, model, tokens, floor)?,
        };
        Self::within_record_ceiling(policy, priced.0, tokens, floor)?;
        Ok(priced)
    }

    /// A truncated call without a caller's cost is charged at least its estimate: its real
    /// usage is unknown, and the estimate is the worst case it was admitted for.
    fn at_least_estimate_if_truncated(
        commit: &CommitRequest,
        estimate: Money,
        priced: (Money, Pricing),
    ) -> (Money, Pricing) {
        if commit.status == RequestStatus::Truncated && commit.cost.is_none() && priced.0 < estimate
        {
            (estimate, Pricing::Estimate)
        } else {
            priced
        }
    }

    /// [`Ledger::price_call`] without a caller's cost.
    fn price_listed(
        policy: &Policy,
        model: &ModelName,
        tokens: Tokens,
        floor: Option<Money>,
    ) -> Result<(Money, Pricing), LedgerError> {
        let at = |p: crate::prices::Price| p.cost(tokens).ok_or(LedgerError::Overflow);
        Ok(match (policy.prices.price(model), floor) {
            (Some(Priced::Listed(p)), _) => (at(p)?, Pricing::Catalog),
            (Some(Priced::Free), _) => (Money::ZERO, Pricing::Free),
            (Some(Priced::Default(p)), Some(estimate)) => {
                let cost = at(p)?;
                if cost >= estimate {
                    (cost, Pricing::Default)
                } else {
                    (estimate, Pricing::Estimate)
                }
            }
            (Some(Priced::Default(p)), None) => (at(p)?, Pricing::Default),
            (None, Some(estimate)) => (estimate, Pricing::Estimate),
            (None, None) => (at(policy.prices.fallback())?, Pricing::Default),
        })
    }

    /// Commits the actual usage of a reservation. Below the estimate, the rest is released;
    /// above it, the whole actual cost is charged. Committing the same usage again returns
    /// the same record; a commit after expiry is recorded on its own (never dropped).
    pub fn commit(
        &self,
        id: &Uuid,
        commit: &CommitRequest,
        now: Micros,
    ) -> Result<Applied<Committed>, LedgerError> {
        if commit.status == RequestStatus::Expired {
            return Err(LedgerError::ExpiredStatus);
        }
        // The common case first: an open reservation. Settled ones are answered below.
        let open = lock(self.res_shard(id))
            .open
            .get(id)
            .map(|r| (r.subject.model.clone(), r.estimate));
        let Some((model, estimate)) = open else {
            return self
                .settled_answer(id, commit, now)?
                .ok_or(LedgerError::NotFound(*id));
        };
        let (cost, pricing) = Self::at_least_estimate_if_truncated(
            commit,
            estimate,
            Self::price_call(
                &self.policy(),
                &model,
                commit.tokens,
                commit.cost,
                Some(estimate),
            )?,
        );
        let total_tokens = commit.tokens.total();
        let settled = self.settle_open(
            id,
            now,
            |res| {
                (
                    Settlement::Committed(Self::usage_from(res, commit, cost, pricing)),
                    Some(commit.clone()),
                )
            },
            |state, res| {
                for (c, start) in [
                    (&mut state.day, res.day_start),
                    (&mut state.month, res.month_start),
                ] {
                    if c.start == start {
                        Self::release_counters(c, res);
                        Self::charge(c, cost, total_tokens);
                    }
                }
            },
        );
        match settled {
            Some((estimate, Settlement::Committed(usage))) => Ok(Applied {
                value: Committed {
                    usage: usage.clone(),
                    reserved: estimate,
                    replayed: false,
                    late: false,
                },
                event: Some(Event::Committed {
                    reservation_id: *id,
                    usage,
                }),
            }),
            // Settled by someone else between the two looks.
            _ => self
                .settled_answer(id, commit, now)?
                .ok_or(LedgerError::NotFound(*id)),
        }
    }

    /// The answer for a commit of an already settled reservation, if it is settled.
    fn settled_answer(
        &self,
        id: &Uuid,
        commit: &CommitRequest,
        now: Micros,
    ) -> Result<Option<Applied<Committed>>, LedgerError> {
        let (expired, estimate) = {
            let rs = lock(self.res_shard(id));
            let Some(s) = rs.settled.get(id) else {
                return Ok(None);
            };
            match &s.settlement {
                Settlement::Committed(usage) => {
                    if !s.commit.as_ref().is_some_and(|c| c.same_usage(commit)) {
                        return Err(LedgerError::CommitMismatch(*id));
                    }
                    // Exactly the first answer.
                    return Ok(Some(Applied {
                        value: Committed {
                            usage: usage.clone(),
                            reserved: s.reservation.estimate,
                            replayed: true,
                            late: false,
                        },
                        event: None,
                    }));
                }
                Settlement::Released { .. } => {
                    return Err(LedgerError::AlreadySettled {
                        id: *id,
                        state: "released",
                    });
                }
                Settlement::Expired(usage) => (usage.clone(), s.reservation.estimate),
            }
        };
        // Expired, yet the call happened after all: its real spend is recorded on its own,
        // in the current windows, exactly once, under an id derived from the reservation's.
        let policy = self.policy();
        let record = RecordRequest {
            id: late_usage_id(id),
            subject: expired.subject(),
            tokens: commit.tokens,
            cost: commit.cost,
            status: commit.status,
            idempotency_key: None,
        };
        let mut usage = self.build_record(&policy, &record, now, Some(estimate))?;
        (usage.cost, usage.pricing) =
            Self::at_least_estimate_if_truncated(commit, estimate, (usage.cost, usage.pricing));
        usage.reservation_id = Some(*id);
        usage.origin = commit.origin.clone();
        let first = {
            let mut rs = lock(self.res_shard(id));
            let Some(s) = rs.settled.get_mut(id) else {
                return Ok(None);
            };
            match &s.commit {
                None => {
                    s.commit = Some(commit.clone());
                    s.late = Some(usage.clone());
                    true
                }
                Some(prev) if prev.same_usage(commit) => {
                    usage = s.late.clone().unwrap_or(usage);
                    false
                }
                Some(_) => return Err(LedgerError::CommitMismatch(*id)),
            }
        };
        if first {
            self.charge_usage(&usage);
        }
        Ok(Some(Applied {
            value: Committed {
                usage: usage.clone(),
                reserved: Money::ZERO,
                replayed: !first,
                late: true,
            },
            event: first.then_some(Event::Recorded(usage)),
        }))
    }

    /// Releases a reservation whose call never happened. Releasing twice is harmless.
    pub fn release(
        &self,
        id: &Uuid,
        reason: Option<String>,
        now: Micros,
    ) -> Result<Applied<Settlement>, LedgerError> {
        let settled = self.settle_open(
            id,
            now,
            |_| {
                (
                    Settlement::Released {
                        reason: reason.clone(),
                    },
                    None,
                )
            },
            |state, res| {
                for (c, start) in [
                    (&mut state.day, res.day_start),
                    (&mut state.month, res.month_start),
                ] {
                    if c.start == start {
                        Self::release_counters(c, res);
                    }
                }
            },
        );
        if settled.is_some() {
            return Ok(Applied {
                value: Settlement::Released {
                    reason: reason.clone(),
                },
                event: Some(Event::Released {
                    reservation_id: *id,
                    reason,
                    at: now,
                }),
            });
        }
        let rs = lock(self.res_shard(id));
        match rs.settled.get(id).map(|s| &s.settlement) {
            None => Err(LedgerError::NotFound(*id)),
            Some(Settlement::Committed(_)) => Err(LedgerError::AlreadySettled {
                id: *id,
                state: "committed",
            }),
            Some(s) => Ok(Applied {
                value: s.clone(),
                event: None,
            }),
        }
    }

    /// Releases every reservation whose TTL has passed, recording each as `expired` (no
    /// tokens, no cost), and forgets settled reservations, idempotency keys and finished
    /// windows older than the retention. Call it periodically.
    pub fn expire(&self, now: Micros) -> Vec<Event> {
        let mut due = Vec::new();
        for shard in self.reservations.iter() {
            let mut rs = lock(shard);
            due.extend(
                rs.open
                    .values()
                    .filter(|r| r.expires_at <= now)
                    .map(|r| r.id),
            );
            let horizon = now.saturating_sub(self.settled_retention_us);
            rs.settled.retain(|_, s| s.at > horizon);
        }
        let mut events = Vec::with_capacity(due.len());
        for id in due {
            let settled = self.settle_open(
                &id,
                now,
                |res| {
                    let commit = CommitRequest {
                        usage_id: res.id,
                        tokens: Tokens::default(),
                        cost: Some(Money::ZERO),
                        status: RequestStatus::Expired,
                        origin: None,
                    };
                    let usage = Self::usage_from(res, &commit, Money::ZERO, Pricing::Catalog);
                    (Settlement::Expired(usage), None)
                },
                |state, res| {
                    for (c, start) in [
                        (&mut state.day, res.day_start),
                        (&mut state.month, res.month_start),
                    ] {
                        if c.start == start {
                            Self::release_counters(c, res);
                        }
                    }
                },
            );
            if let Some((_, Settlement::Expired(usage))) = settled {
                events.push(Event::Expired {
                    reservation_id: id,
                    usage,
                });
            }
        }
        // Dropping finished windows scans every scope: once a minute is plenty.
        let last = self.last_forget.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= MICROS_PER_MINUTE || now < last {
            self.last_forget
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.forget(now);
        }
        events
    }

    /// Drops idempotency keys past the retention and scope states of finished windows.
    fn forget(&self, now: Micros) {
        for shard in self.idempotency.iter() {
            lock(shard).keys.retain(|_, e| e.until > now);
        }
        let periods = self.policy().calendar.periods(now);
        let keep = |s: &ScopeState| {
            s.in_flight > 0
                || s.subjects > 0
                || s.month.start >= periods.month.start
                || s.day.start >= periods.day.start
                || s.tat > now
        };
        let mut dropped: Vec<TenantId> = Vec::new();
        for shard in self.scopes.iter() {
            lock(shard).scopes.retain(|key, s| {
                let kept = keep(s);
                if !kept && let ScopeKey::User(t, _) | ScopeKey::Company(t, _) = key {
                    dropped.push(t.clone());
                }
                kept
            });
            // Each tenant's count is lowered after its subjects' shard is unlocked (one lock
            // at a time, so no lock order is needed). Meanwhile the count is too high, which
            // can only refuse, never admit, a new subject. A finished tenant state whose
            // last subject went is dropped too.
            for t in dropped.drain(..) {
                let tkey = ScopeKey::Tenant(t);
                let mut tshard = lock(&self.scopes[tkey.shard(&self.hasher)]);
                if let Some(s) = tshard.scopes.get_mut(&tkey) {
                    s.subjects = s.subjects.saturating_sub(1);
                    if !keep(s) {
                        tshard.scopes.remove(&tkey);
                    }
                }
            }
        }
    }

    /// Counts usage of a call that was not reserved. Never refused by limits.
    pub fn record(
        &self,
        req: &RecordRequest,
        now: Micros,
    ) -> Result<Applied<UsageRecord>, LedgerError> {
        if req.status == RequestStatus::Expired {
            return Err(LedgerError::ExpiredStatus);
        }
        let policy = self.policy();
        let fp = req
            .idempotency_key
            .as_ref()
            .map_or(0, |_| record_fingerprint(req));
        let tenant = &req.subject.tenant;
        let mut idem = req
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(tenant, k))));
        if let Some((k, shard)) = &idem
            && let Some(e) = shard.keys.get(&(tenant.clone(), (*k).clone()))
        {
            if e.fingerprint != fp {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            }
            if let Remembered::Usage(u) = &e.result {
                return Ok(Applied {
                    value: (**u).clone(),
                    event: None,
                });
            }
            return Err(LedgerError::IdempotencyConflict((*k).clone()));
        }
        let usage = self.build_record(&policy, req, now, None)?;
        self.charge_usage(&usage);
        if let Some((k, shard)) = &mut idem {
            shard.keys.insert(
                (tenant.clone(), (*k).clone()),
                IdemEntry {
                    fingerprint: fp,
                    result: Remembered::Usage(Box::new(usage.clone())),
                    until: now.saturating_add(self.retention_us),
                },
            );
        }
        Ok(Applied {
            value: usage.clone(),
            event: Some(Event::Recorded(usage)),
        })
    }

    /// The usage record of a direct record at `now` (pure). `floor` is the estimate of the
    /// reservation a late commit belonged to (see [`Ledger::price_call`]).
    fn build_record(
        &self,
        policy: &Policy,
        req: &RecordRequest,
        now: Micros,
        floor: Option<Money>,
    ) -> Result<UsageRecord, LedgerError> {
        let eff = self.effective(policy, &req.subject)?;
        let (cost, pricing) =
            Self::price_call(policy, &req.subject.model, req.tokens, req.cost, floor)?;
        let periods = policy.calendar.periods(now);
        Ok(UsageRecord {
            id: req.id,
            tenant: req.subject.tenant.clone(),
            user: req.subject.user.clone(),
            company: req.subject.company.clone(),
            model: req.subject.model.clone(),
            endpoint: req.subject.endpoint.clone(),
            tier: eff.tier,
            tokens: req.tokens,
            cost,
            pricing,
            status: req.status,
            created_at: now,
            reservation_id: None,
            idempotency_key: req.idempotency_key.clone(),
            day_start: periods.day.start,
            month_start: periods.month.start,
            origin: None,
        })
    }

    /// Adds a usage record to the counters of its windows, in every scope.
    ///
    /// Usage of a user or company the tenant cannot track any more (its
    /// `max_tracked_subjects` are all in memory) is counted against the global and tenant
    /// scopes (and whichever of the others are tracked) only: the record itself is kept whole.
    fn charge_usage(&self, usage: &UsageRecord) {
        let cap = self
            .policy()
            .tenant_rules(&usage.tenant)
            .max_tracked_subjects;
        let scopes = usage.subject().scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let present = Self::ensure_scopes(&mut locked, &scopes, &idx, cap);
        let tokens = usage.tokens.total();
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if !present[i] {
                continue;
            }
            let state = locked.shard(idx[i]).scopes.entry(key.clone()).or_default();
            for (c, start) in [
                (&mut state.day, usage.day_start),
                (&mut state.month, usage.month_start),
            ] {
                if let Some(c) = c.window_mut(start) {
                    Self::charge(c, usage.cost, tokens);
                }
            }
        }
    }

    /// Loads persisted state into an empty ledger at start-up: the counters of the current
    /// windows, the open reservations (their estimates become reserved again) and the
    /// overrides. Rolling request rates are not persisted: after a restart each user may
    /// send one fresh burst.
    ///
    /// A stored user tier that the configuration no longer has is dropped (the user falls
    /// back to the default tier, keeping the other overrides) and reported, so that removing
    /// a tier from the configuration never stops start-up.
    pub fn restore(&self, snapshot: Snapshot) -> Result<Restored, LedgerError> {
        let mut restored = Restored::default();
        for (scope, budget) in snapshot.budgets {
            self.set_budget(scope, budget);
        }
        let policy = self.policy();
        for (tenant, user, mut overrides) in snapshot.users {
            if let Some(tier) = &overrides.tier
                && policy.tier(tier).is_none()
            {
                restored
                    .dropped_tiers
                    .push((tenant.clone(), user.clone(), tier.clone()));
                overrides.tier = None;
            }
            self.set_user(tenant, user, overrides)?;
        }
        for row in snapshot.counters {
            // Persisted spend is restored whole, even above a tenant's subject cap (new
            // reservations for new subjects are then refused until scopes are freed).
            if let Some(t) = row.scope.tenant()
                && matches!(row.scope.kind(), ScopeKind::User | ScopeKind::Company)
                && !lock(&self.scopes[row.scope.shard(&self.hasher)])
                    .scopes
                    .contains_key(&row.scope)
            {
                let tkey = ScopeKey::Tenant(t.clone());
                lock(&self.scopes[tkey.shard(&self.hasher)])
                    .scopes
                    .entry(tkey)
                    .or_default()
                    .subjects += 1;
            }
            let mut shard = lock(&self.scopes[row.scope.shard(&self.hasher)]);
            let state = shard.scopes.entry(row.scope).or_default();
            let c = match row.window {
                Window::Day => &mut state.day,
                Window::Month => &mut state.month,
                Window::Minute | Window::None => continue,
            };
            if let Some(c) = c.window_mut(row.start) {
                c.spent = c.spent.saturating_add(row.spent);
                c.requests = c.requests.saturating_add(row.requests);
                c.tokens = c.tokens.saturating_add(row.tokens);
            }
        }
        for res in snapshot.open {
            let scopes = res.subject.scopes();
            let (mut locked, idx) = self.lock_scopes(&scopes);
            Self::ensure_scopes(&mut locked, &scopes, &idx, None);
            for (i, key) in scopes.keys.iter().enumerate() {
                let Some(key) = key else { continue };
                let state = locked.shard(idx[i]).scopes.entry(key.clone()).or_default();
                state.in_flight += 1;
                for (c, start) in [
                    (&mut state.day, res.day_start),
                    (&mut state.month, res.month_start),
                ] {
                    if let Some(c) = c.window_mut(start) {
                        c.reserved = c.reserved.saturating_add(res.estimate);
                        c.requests_reserved += 1;
                        c.tokens_reserved = c.tokens_reserved.saturating_add(res.estimated_tokens);
                    }
                }
            }
            drop(locked);
            if let Some(k) = &res.idempotency_key {
                lock(self.idem_shard(&res.subject.tenant, k)).keys.insert(
                    (res.subject.tenant.clone(), k.clone()),
                    IdemEntry {
                        fingerprint: res.fingerprint,
                        result: Remembered::Reservation(Box::new(res.clone())),
                        until: res
                            .created_at
                            .saturating_add(self.retention_us)
                            .max(res.expires_at),
                    },
                );
            }
            lock(self.res_shard(&res.id))
                .open
                .insert(res.id, Box::new(res));
        }
        Ok(restored)
    }

    /// True when an idempotency key of this tenant is remembered in memory.
    pub fn knows_key(&self, tenant: &TenantId, key: &IdempotencyKey) -> bool {
        lock(self.idem_shard(tenant, key))
            .keys
            .contains_key(&(tenant.clone(), key.clone()))
    }

    /// Remembers a reservation that was settled before memory knew it (read back from the
    /// store to answer a retry), so that the retry goes through the usual settled path:
    /// a late commit is then recorded once however many retries race. Does nothing when the
    /// reservation is open or settled in memory already.
    ///
    /// `usage` is the stored record that settled it (a commit's or an expiry's; none after a
    /// release) and `late` the stored record of a commit that arrived after its expiry.
    pub fn remember_settled(
        &self,
        reservation: Reservation,
        usage: Option<UsageRecord>,
        late: Option<UsageRecord>,
        now: Micros,
    ) {
        let id = reservation.id;
        let settlement = match usage {
            Some(u) if u.status == RequestStatus::Expired => Settlement::Expired(u),
            Some(u) => Settlement::Committed(u),
            None => Settlement::Released { reason: None },
        };
        // What a retry is compared with: the stored usage, as its commit gave it.
        let commit = match (&settlement, &late) {
            (Settlement::Committed(u), _) | (Settlement::Expired(_), Some(u)) => {
                Some(CommitRequest {
                    usage_id: u.id,
                    tokens: u.tokens,
                    cost: (u.pricing == Pricing::Caller).then_some(u.cost),
                    status: u.status,
                    origin: u.origin.clone(),
                })
            }
            _ => None,
        };
        let mut rs = lock(self.res_shard(&id));
        if rs.open.contains_key(&id) || rs.settled.contains_key(&id) {
            return;
        }
        rs.settled.insert(
            id,
            Box::new(Settled {
                settlement,
                commit,
                late,
                reservation: Box::new(reservation),
                at: now,
            }),
        );
    }

    /// How long idempotency keys are remembered (for a reservation, at least until it
    /// expires).
    pub fn key_retention(&self) -> i64 {
        self.retention_us
    }

    /// Undoes in memory what an event did, when the event could not be made durable (the
    /// store and the spool both failed): memory goes back to what the store holds, and a
    /// retry starts afresh. A reservation is taken back (its key forgotten), a settlement
    /// reopens its reservation, a record is uncounted. Admin events are not undone here (the
    /// caller knows the previous value). Events that no longer match memory (already undone,
    /// or forgotten) change nothing.
    pub fn revert(&self, event: &Event) {
        match event {
            Event::Reserved(res) => self.unreserve(res),
            Event::Committed {
                reservation_id,
                usage,
            } => self.reopen(
                reservation_id,
                |s| matches!(&s.settlement, Settlement::Committed(u) if u.id == usage.id),
            ),
            Event::Released { reservation_id, .. } => self.reopen(reservation_id, |s| {
                matches!(s.settlement, Settlement::Released { .. })
            }),
            Event::Expired { reservation_id, .. } => self.reopen(reservation_id, |s| {
                matches!(s.settlement, Settlement::Expired(_))
            }),
            Event::Recorded(usage) => self.unrecord(usage),
            Event::BudgetSet { .. } | Event::UserSet { .. } => {}
        }
    }

    /// Undoes an admitted reservation that is still open.
    fn unreserve(&self, res: &Reservation) {
        let mut idem = res
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(&res.subject.tenant, k))));
        let scopes = res.subject.scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        if lock(self.res_shard(&res.id)).open.remove(&res.id).is_none() {
            return;
        }
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if let Some(state) = locked.shard(idx[i]).scopes.get_mut(key) {
                state.in_flight = state.in_flight.saturating_sub(1);
                for (c, start) in [
                    (&mut state.day, res.day_start),
                    (&mut state.month, res.month_start),
                ] {
                    if c.start == start {
                        Self::release_counters(c, res);
                    }
                }
            }
        }
        drop(locked);
        if let Some((k, shard)) = &mut idem {
            let key = (res.subject.tenant.clone(), (*k).clone());
            if matches!(shard.keys.get(&key), Some(IdemEntry { result: Remembered::Reservation(r), .. }) if r.id == res.id)
            {
                shard.keys.remove(&key);
            }
        }
    }

    /// Reopens a settled reservation whose settlement `is_it` recognises: its estimate is
    /// reserved again and a commit's charge is taken back.
    fn reopen(&self, id: &Uuid, is_it: impl FnOnce(&Settled) -> bool) {
        let Some(scopes) = lock(self.res_shard(id))
            .settled
            .get(id)
            .map(|s| s.reservation.subject.scopes())
        else {
            return;
        };
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let mut rs = lock(self.res_shard(id));
        if !rs.settled.get(id).is_some_and(|s| is_it(s)) {
            return;
        }
        let Some(settled) = rs.settled.remove(id) else {
            return;
        };
        let res = settled.reservation;
        let charged = match &settled.settlement {
            Settlement::Committed(u) => Some((u.cost, u.tokens.total())),
            _ => None,
        };
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            let state = locked.shard(idx[i]).scopes.entry(key.clone()).or_default();
            state.in_flight += 1;
            for (c, start) in [
                (&mut state.day, res.day_start),
                (&mut state.month, res.month_start),
            ] {
                if let Some(c) = c.window_mut(start) {
                    if let Some((cost, tokens)) = charged {
                        Self::uncharge(c, cost, tokens);
                    }
                    c.reserved = c.reserved.saturating_add(res.estimate);
                    c.requests_reserved += 1;
                    c.tokens_reserved = c.tokens_reserved.saturating_add(res.estimated_tokens);
                }
            }
        }
        rs.open.insert(*id, res);
    }

    /// Uncounts a record: a direct one (its key forgotten) or a late commit (its
    /// reservation's late usage cleared).
    fn unrecord(&self, usage: &UsageRecord) {
        if let Some(rid) = usage.reservation_id {
            let mut rs = lock(self.res_shard(&rid));
            let Some(s) = rs.settled.get_mut(&rid) else {
                return;
            };
            if s.late.as_ref().is_none_or(|l| l.id != usage.id) {
                return;
            }
            s.late = None;
            s.commit = None;
        } else if let Some(k) = &usage.idempotency_key {
            let mut shard = lock(self.idem_shard(&usage.tenant, k));
            let key = (usage.tenant.clone(), k.clone());
            match shard.keys.get(&key) {
                Some(IdemEntry {
                    result: Remembered::Usage(u),
                    ..
                }) if u.id == usage.id => {
                    shard.keys.remove(&key);
                }
                _ => return,
            }
        }
        let scopes = usage.subject().scopes();
        let (mut locked, idx) = self.lock_scopes(&scopes);
        let tokens = usage.tokens.total();
        for (i, key) in scopes.keys.iter().enumerate() {
            let Some(key) = key else { continue };
            if let Some(state) = locked.shard(idx[i]).scopes.get_mut(key) {
                for (c, start) in [
                    (&mut state.day, usage.day_start),
                    (&mut state.month, usage.month_start),
                ] {
                    if c.start == start {
                        Self::uncharge(c, usage.cost, tokens);
                    }
                }
            }
        }
    }

    /// The tenant of a reservation that is open or recently settled.
    pub fn reservation_tenant(&self, id: &Uuid) -> Option<TenantId> {
        let rs = lock(self.res_shard(id));
        if let Some(r) = rs.open.get(id) {
            return Some(r.subject.tenant.clone());
        }
        rs.settled
            .get(id)
            .map(|s| s.reservation.subject.tenant.clone())
    }

    /// Spent and reserved money in the current day and month of every scope of `kind` held
    /// in memory (for metrics and dashboards): `(scope, day, month)` as `(spent, reserved)`.
    pub fn totals(&self, kind: ScopeKind, now: Micros) -> Vec<ScopeTotals> {
        let periods = self.policy().calendar.periods(now);
        let mut out = Vec::new();
        for shard in self.scopes.iter() {
            for (key, state) in lock(shard).scopes.iter().filter(|(k, _)| k.kind() == kind) {
                let (d, m) = Self::current(state, &periods);
                out.push((key.clone(), d, m));
            }
        }
        out
    }

    /// One scope's `((day spent, day reserved), (month spent, month reserved))` in the
    /// current windows; zeros for a scope with nothing in them.
    pub fn scope_totals(&self, scope: &ScopeKey, now: Micros) -> ((Money, Money), (Money, Money)) {
        let periods = self.policy().calendar.periods(now);
        let shard = lock(&self.scopes[scope.shard(&self.hasher)]);
        shard
            .scopes
            .get(scope)
            .map(|state| Self::current(state, &periods))
            .unwrap_or_default()
    }

    /// A scope state's spent and reserved amounts in the windows of `periods`.
    fn current(state: &ScopeState, periods: &Periods) -> ((Money, Money), (Money, Money)) {
        let d = state.day.at(periods.day.start);
        let m = state.month.at(periods.month.start);
        ((d.spent, d.reserved), (m.spent, m.reserved))
    }

    /// The cost caps the ledger enforces on a scope, for spend under `tier`: a user's caps
    /// are those of `tier` (else the user's stored tier, else the default tier); then the
    /// scope's budget override applies.
    pub fn budget_for(&self, scope: &ScopeKey, tier: Option<&TierName>) -> Budget {
        let ScopeKey::User(tenant, user) = scope else {
            return self.budget_of(scope);
        };
        let policy = self.policy();
        // The stored tier is looked up only when the spend names none.
        let stored = match tier {
            Some(_) => None,
            None => {
                let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
                o.users
                    .get(&(tenant.clone(), user.clone()))
                    .and_then(|(u, _)| u.tier.clone())
            }
        };
        let name = tier.or(stored.as_ref()).unwrap_or(&policy.default_tier);
        let base = policy
            .tier(name)
            .or_else(|| policy.tier(&policy.default_tier))
            .map(|t| t.budget)
            .unwrap_or_default();
        match self.budget_override(scope) {
            Some(o) => Budget {
                daily: o.daily.or(base.daily),
                monthly: o.monthly.or(base.monthly),
            },
            None => base,
        }
    }

    /// The effective daily and monthly caps of a scope (configuration plus overrides). For a
    /// user, the tier's caps of `tier` (or the configured default tier).
    pub fn budget_of(&self, scope: &ScopeKey) -> Budget {
        let policy = self.policy();
        if let ScopeKey::Tenant(t) = scope {
            let own = self.budget_override(scope).unwrap_or_default();
            let base = Budget {
                daily: own.daily.or(policy.tenant.daily),
                monthly: own.monthly.or(policy.tenant.monthly),
            };
            let global = self.budget_of(&ScopeKey::Global);
            return Self::tenant_share(policy.tenant_rules(t), base, global, own);
        }
        let base = match scope {
            ScopeKey::Global => policy.global,
            ScopeKey::Tenant(_) => policy.tenant,
            ScopeKey::Company(..) => policy.company,
            ScopeKey::User(..) => policy
                .tier(&policy.default_tier)
                .map(|t| t.budget)
                .unwrap_or_default(),
        };
        match self.budget_override(scope) {
            Some(o) => Budget {
                daily: o.daily.or(base.daily),
                monthly: o.monthly.or(base.monthly),
            },
            None => base,
        }
    }

    /// How many user and company scopes of `tenant` the ledger counts as held in memory
    /// (the count `max_tracked_subjects` is checked against).
    pub fn tracked_subjects(&self, tenant: &TenantId) -> u32 {
        let key = ScopeKey::Tenant(tenant.clone());
        lock(&self.scopes[key.shard(&self.hasher)])
            .scopes
            .get(&key)
            .map_or(0, |s| s.subjects)
    }

    /// The number of scope states held in memory (for metrics and memory tests).
    pub fn scope_count(&self) -> usize {
        self.scopes.iter().map(|s| lock(s).scopes.len()).sum()
    }

    /// The number of open reservations.
    pub fn open_reservations(&self) -> usize {
        self.reservations.iter().map(|s| lock(s).open.len()).sum()
    }
}

/// GCRA (the generic cell rate algorithm) for requests per minute.
///
/// Emission interval `T = 60 s / limit`, burst tolerance `(limit - 1) * T`: an idle user may
/// send `limit` requests at once; after that one request is admitted every `T`. Over any
/// span of `d` seconds at most `limit + d / T` requests are admitted, so a 60-second span
/// can hold up to `2 * limit` requests when a full burst is followed by a steady stream,
/// while the sustained rate never exceeds `limit` per minute.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    interval: i64,
    tolerance: i64,
}

impl Gcra {
    fn new(limit: u32) -> Gcra {
        let interval = MICROS_PER_MINUTE / limit.max(1) as i64;
        Gcra {
            interval,
            tolerance: interval * (limit.max(1) as i64 - 1),
        }
    }

    /// Whether `n` more requests fit at `now`, and the arrival time after admitting them.
    fn try_admit(&self, tat: Micros, now: Micros, n: u64) -> (bool, Micros) {
        if n == 0 {
            return (true, tat);
        }
        let start = tat.max(now);
        let new_tat = start.saturating_add(self.interval.saturating_mul(n as i64));
        // The last of the n requests must arrive within the tolerance.
        let ok = new_tat - self.interval - now <= self.tolerance;
        (ok, new_tat)
    }

    /// Requests counted against the burst at `now`.
    fn used(&self, tat: Micros, now: Micros) -> u64 {
        let ahead = tat.saturating_sub(now).max(0);
        (ahead + self.interval - 1)
            .checked_div(self.interval)
            .unwrap_or(0) as u64
    }

    /// When the next request will be admitted.
    fn next_allowed(&self, tat: Micros, now: Micros) -> Micros {
        tat.saturating_sub(self.tolerance).max(now)
    }
}
