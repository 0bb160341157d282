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
//! Scope states live in 64 shards, each behind its own mutex, and reservations in 64 more.
//! An operation locks, in this order and each only if it needs it: the shard of the
//! idempotency key, the shard of the reservation, then the shards of the scopes it touches
//! in ascending shard order. No one holding a scope shard waits for any other kind of shard,
//! and scope shards are taken in one order, so two operations can never deadlock.
//!
//! # Layout
//! - `types` — the public types: scopes, subjects, requests, records, events, limits.
//! - `state` — shard state: scope counters in interned slots, reservations open and settled.
//! - `evaluate` — effective limits, and every limit of a request walked once.
//! - `machine` — the state machine: reserve, commit, release, expire, record, revert.
//! - `restore` — start-up from a snapshot, through the same code as reserve.
//! - `gcra` — the rolling requests-per-minute limit.
//! - `idempotency` — fingerprints and remembered keys.

mod allowance;
mod cluster;
mod evaluate;
mod gcra;
mod idempotency;
mod machine;
mod restore;
mod state;
mod types;

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};

use foldhash::fast::RandomState;
use uuid::Uuid;

pub use allowance::{Held, allowance_after, allowance_view, debts, fold, grant};
pub use cluster::{ScopeCounters, WindowCounters, scope_keys};
pub use idempotency::{late_usage_id, record_fingerprint, reserve_fingerprint};
pub use types::*;

use crate::ids::{TenantId, TierName, UserId};
use crate::money::Money;
use crate::policy::{Budget, ModelPatterns, Policy, UserOverrides};
use crate::prices::TenantPrices;
use crate::window::{Micros, Periods};
use idempotency::IdemShard;
use state::{ResShard, ScopeState, Shard, lock};

/// Hash maps of the hot path use foldhash: several times faster than SipHash on short keys.
/// Keys are chosen by callers, but every map is per-process seeded.
type HashMap<K, V> = std::collections::HashMap<K, V, RandomState>;

const SHARDS: usize = 64;
const MICROS_PER_MINUTE: i64 = 60_000_000;

/// How long idempotency keys are remembered in memory, by default.
pub const DEFAULT_RETENTION_US: i64 = 10 * MICROS_PER_MINUTE;

/// How long settled reservations are remembered in memory, by default: long enough to
/// answer a retried commit while the first one is still being written; after that the
/// store answers (see the `Guard`). Short, so memory stays proportional to the request
/// rate times a few seconds.
pub const DEFAULT_SETTLED_RETENTION_US: i64 = 5_000_000;

/// A user's stored overrides and their compiled model patterns.
type StoredUser = (UserOverrides, Option<Arc<ModelPatterns>>);

/// `(tenant, user)` borrowed: hashes like the owned pair, so a user's overrides are found
/// without cloning ids.
#[derive(Hash)]
struct UserRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(TenantId, UserId)> for UserRef<'_> {
    fn equivalent(&self, key: &(TenantId, UserId)) -> bool {
        self.0 == key.0.as_str() && self.1 == key.1.as_str()
    }
}

#[derive(Debug, Default)]
struct Overrides {
    budgets: hashbrown::HashMap<ScopeKey, BudgetOverride, RandomState>,
    users: hashbrown::HashMap<(TenantId, UserId), StoredUser, RandomState>,
    prices: hashbrown::HashMap<TenantId, Arc<TenantPrices>, RandomState>,
}

/// The live, in-memory ledger. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Ledger {
    policy: RwLock<Arc<Policy>>,
    overrides: RwLock<Overrides>,
    /// Whether any tenant has price overrides: the hot path skips their lock when none has.
    any_tenant_prices: std::sync::atomic::AtomicBool,
    hasher: RandomState,
    scopes: Box<[Mutex<Shard>]>,
    reservations: Box<[Mutex<ResShard>]>,
    idempotency: Box<[Mutex<IdemShard>]>,
    retention_us: i64,
    settled_retention_us: i64,
    /// When finished windows and old idempotency keys were last dropped.
    last_forget: std::sync::atomic::AtomicI64,
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
            any_tenant_prices: std::sync::atomic::AtomicBool::new(false),
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

    /// Sets (or, when empty, clears) a tenant's price overrides. Applies at once.
    pub fn set_tenant_prices(
        &self,
        tenant: TenantId,
        prices: TenantPrices,
    ) -> Result<Applied<()>, LedgerError> {
        if let Some(m) = prices.multiplier_ppm
            && m > crate::prices::MAX_MULTIPLIER_PPM
        {
            return Err(LedgerError::Overflow);
        }
        let mut o = self.overrides.write().unwrap_or_else(|e| e.into_inner());
        if prices == TenantPrices::default() {
            o.prices.remove(&tenant);
        } else {
            o.prices.insert(tenant.clone(), Arc::new(prices.clone()));
        }
        self.any_tenant_prices
            .store(!o.prices.is_empty(), std::sync::atomic::Ordering::Release);
        Ok(Applied {
            value: (),
            event: Some(Event::TenantPricesSet { tenant, prices }),
        })
    }

    /// A tenant's price overrides, if it has any.
    pub fn tenant_prices(&self, tenant: &TenantId) -> Option<Arc<TenantPrices>> {
        if !self
            .any_tenant_prices
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return None;
        }
        self.overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .prices
            .get(tenant)
            .cloned()
    }

    /// Every tenant's price overrides, sorted by tenant.
    pub fn all_tenant_prices(&self) -> Vec<(TenantId, TenantPrices)> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = o
            .prices
            .iter()
            .map(|(t, p)| (t.clone(), (**p).clone()))
            .collect();
        v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        v
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

    /// How long idempotency keys are remembered (for a reservation, at least until it
    /// expires).
    pub fn key_retention(&self) -> i64 {
        self.retention_us
    }

    /// A scope's hash and shard.
    fn scope_hash(&self, key: &ScopeKey) -> (u64, usize) {
        let hash = self.hasher.hash_one(key.as_ref());
        (hash, self.shard_for(key.as_ref(), hash))
    }

    /// An open reservation, if there is one with this id.
    pub fn reservation(&self, id: &Uuid) -> Option<Reservation> {
        lock(self.res_shard(id)).open(id).map(|o| o.res.clone())
    }

    /// The tenant of a reservation that is open or recently settled.
    pub fn reservation_tenant(&self, id: &Uuid) -> Option<TenantId> {
        let rs = lock(self.res_shard(id));
        if let Some(o) = rs.open(id) {
            return Some(o.res.subject.tenant.clone());
        }
        rs.settled(id).map(|s| s.reservation.subject.tenant.clone())
    }

    /// Spent and reserved money in the current day and month of every scope of `kind` held
    /// in memory (for metrics and dashboards): `(scope, day, month)` as `(spent, reserved)`.
    pub fn totals(&self, kind: ScopeKind, now: Micros) -> Vec<ScopeTotals> {
        let periods = self.policy().calendar.periods(now);
        let mut out = Vec::new();
        for shard in self.scopes.iter() {
            for (key, state) in lock(shard).iter().filter(|(k, _)| k.kind() == kind) {
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
        evaluate::scope_state(self, scope)
            .map(|state| Self::current(&state, &periods))
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
        let base = self
            .user_tier(&policy, tenant, user, tier)
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

    /// The soft caps of a scope (configuration only; they never refuse, they raise alerts):
    /// a user's are those of `tier`, else of its stored tier, else of the default tier.
    pub fn soft_budget_for(&self, scope: &ScopeKey, tier: Option<&TierName>) -> Budget {
        let policy = self.policy();
        match scope {
            ScopeKey::Global => policy.soft_global,
            ScopeKey::Tenant(t) => match policy.tenants.get(t) {
                Some(rules) => rules.soft,
                None => policy.soft_tenant,
            },
            ScopeKey::Company(..) => policy.soft_company,
            ScopeKey::User(tenant, user) => self
                .user_tier(&policy, tenant, user, tier)
                .map(|t| t.soft)
                .unwrap_or_default(),
        }
    }

    /// The tier a user's spend counts under: `tier` when the spend names one, else the
    /// user's stored tier, else the default tier (also when the named tier is gone).
    fn user_tier<'p>(
        &self,
        policy: &'p Policy,
        tenant: &TenantId,
        user: &UserId,
        tier: Option<&TierName>,
    ) -> Option<&'p crate::policy::Tier> {
        // The stored tier is looked up only when the spend names none.
        let stored = match tier {
            Some(_) => None,
            None => {
                let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
                o.users
                    .get(&UserRef(tenant.as_str(), user.as_str()))
                    .and_then(|(u, _)| u.tier.clone())
            }
        };
        let name = tier.or(stored.as_ref()).unwrap_or(&policy.default_tier);
        policy
            .tier(name)
            .or_else(|| policy.tier(&policy.default_tier))
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
        evaluate::scope_state(self, &ScopeKey::Tenant(tenant.clone())).map_or(0, |s| s.subjects)
    }

    /// The number of scope states held in memory (for metrics and memory tests).
    pub fn scope_count(&self) -> usize {
        self.scopes.iter().map(|s| lock(s).len()).sum()
    }

    /// The number of open reservations.
    pub fn open_reservations(&self) -> usize {
        self.reservations.iter().map(|s| lock(s).open_count()).sum()
    }
}
