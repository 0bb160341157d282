//! `Policy`: the validated limits the ledger enforces — tiers, budgets, prices, TTLs — and
//! the run-time overrides set through the admin API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

use crate::ids::{ModelName, TierName};
use crate::money::Money;
use crate::prices::PriceTable;
use crate::window::Calendar;

/// Daily and monthly cost caps of one scope. `None` is no cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub daily: Option<Money>,
    pub monthly: Option<Money>,
}

/// Which limits of a request are in shadow: decided and counted like the others, but a
/// limit in shadow never refuses a request; where it would have, the admission carries a
/// would-be denial instead. One bit per kind of limit of a request; copied into every
/// request's caps, so checking it costs a bit test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShadowMask(u16);

impl ShadowMask {
    pub const NONE: ShadowMask = ShadowMask(0);
    /// The daily and monthly budgets of every scope, and every limit of a user.
    pub const ALL: ShadowMask = ShadowMask(0x3fff);
    pub const REQUESTS_PER_DAY: ShadowMask = ShadowMask(1 << 8);
    pub const TOKENS_PER_DAY: ShadowMask = ShadowMask(1 << 9);
    pub const MAX_CONCURRENT: ShadowMask = ShadowMask(1 << 10);
    pub const REQUESTS_PER_MINUTE: ShadowMask = ShadowMask(1 << 11);
    pub const MAX_OUTPUT_TOKENS: ShadowMask = ShadowMask(1 << 12);
    pub const ALLOWED_MODELS: ShadowMask = ShadowMask(1 << 13);

    /// The cost budget of scope `scope` (0 global, 1 tenant, 2 company, 3 user) in one
    /// window.
    pub const fn budget(scope: usize, monthly: bool) -> ShadowMask {
        ShadowMask(1 << (2 * scope + monthly as usize))
    }

    /// Both cost budgets of scope `scope`.
    pub const fn budgets(scope: usize) -> ShadowMask {
        ShadowMask(0b11 << (2 * scope))
    }

    /// Every limit but the global budgets: what a whole tenant in shadow leaves enforced is
    /// the budget it shares with every other tenant.
    pub const ALL_BUT_GLOBAL: ShadowMask = ShadowMask(0x3fff & !0b11);

    /// Every limit of the user scope (what a tier sets).
    pub const USER: ShadowMask = ShadowMask(0x3fff & !0b11_1111);

    pub const fn union(self, other: ShadowMask) -> ShadowMask {
        ShadowMask(self.0 | other.0)
    }

    pub const fn intersect(self, other: ShadowMask) -> ShadowMask {
        ShadowMask(self.0 & other.0)
    }

    /// Whether every bit of `other` is in shadow.
    #[inline]
    pub const fn contains(self, other: ShadowMask) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The limits of one subscription tier, per user.
#[derive(Clone, Debug)]
pub struct Tier {
    pub limits: UserLimits,
    pub budget: Budget,
    /// Soft caps of each user of the tier: they raise alerts and never refuse anything.
    pub soft: Budget,
    /// The tier's limits in shadow (user-scope bits only).
    pub shadow: ShadowMask,
}

/// The non-monetary limits of a user. `None` is unlimited.
#[derive(Clone, Debug, Default)]
pub struct UserLimits {
    pub requests_per_minute: Option<u32>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub max_output_tokens: Option<u64>,
    pub allowed_models: Option<std::sync::Arc<ModelPatterns>>,
}

/// Glob patterns (`*` and `?`) of model names.
#[derive(Clone, Debug)]
pub struct ModelPatterns {
    raw: Vec<String>,
    compiled: Vec<WildMatch>,
}

impl ModelPatterns {
    pub fn new(patterns: Vec<String>) -> ModelPatterns {
        let compiled = patterns.iter().map(|p| WildMatch::new(p)).collect();
        ModelPatterns {
            raw: patterns,
            compiled,
        }
    }

    pub fn allows(&self, model: &ModelName) -> bool {
        self.compiled.iter().any(|p| p.matches(model.as_str()))
    }

    pub fn patterns(&self) -> &[String] {
        &self.raw
    }
}

impl PartialEq for ModelPatterns {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Tier {
    pub fn new(
        requests_per_minute: Option<u32>,
        requests_per_day: Option<u64>,
        tokens_per_day: Option<u64>,
        budget: Budget,
        max_concurrent: Option<u32>,
        max_output_tokens: Option<u64>,
        allowed_models: Option<Vec<String>>,
    ) -> Tier {
        Tier {
            limits: UserLimits {
                requests_per_minute,
                requests_per_day,
                tokens_per_day,
                max_concurrent,
                max_output_tokens,
                allowed_models: allowed_models.map(|p| std::sync::Arc::new(ModelPatterns::new(p))),
            },
            budget,
            soft: Budget::default(),
            shadow: ShadowMask::NONE,
        }
    }
}

/// Per-user settings stored through the admin API. Each `Some` wins over the tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserOverrides {
    #[serde(default)]
    pub tier: Option<TierName>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
}

impl UserOverrides {
    pub fn is_empty(&self) -> bool {
        *self == UserOverrides::default()
    }
}

/// What a tenant may do on its own (with its tenant key), beyond its budgets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantRules {
    /// The tiers a tenant key may name on a request. A tier named by a tenant key wins only
    /// when it is one of these and the user has no stored tier; otherwise it is ignored.
    pub allowed_tiers: Vec<TierName>,
    /// The tenant's share of each global budget, in parts per million: the tenant scope's
    /// cap is at most `share × global cap` (unless an admin override of that tenant's budget
    /// says otherwise). `None`: no share cap.
    pub share_of_global_ppm: Option<u32>,
    /// The most user and company scopes of this tenant held in memory at once. `None`:
    /// unbounded.
    pub max_tracked_subjects: Option<u32>,
    /// This tenant's limits in shadow (`[tenants.<id>] shadow`).
    pub shadow: ShadowMask,
    /// This tenant's soft caps, from its `[tenants.<id>]` section (else `[tenant]`'s); only
    /// read for tenants with a section of their own.
    pub soft: Budget,
}

impl TenantRules {
    pub fn allows_tier(&self, tier: &TierName) -> bool {
        self.allowed_tiers.iter().any(|t| t == tier)
    }

    /// `cap` limited to this tenant's share of the global `global` cap.
    pub fn share_cap(&self, cap: Option<Money>, global: Option<Money>) -> Option<Money> {
        let (Some(ppm), Some(global)) = (self.share_of_global_ppm, global) else {
            return cap;
        };
        let share = Money::from_micros(
            (global.micros() as i128 * ppm as i128 / 1_000_000).clamp(0, i64::MAX as i128) as i64,
        );
        Some(cap.map_or(share, |c| c.min(share)))
    }
}

/// Everything the ledger enforces, validated from [`crate::config::Config`].
#[derive(Clone, Debug)]
pub struct Policy {
    pub calendar: Calendar,
    pub default_tier: TierName,
    pub tiers: BTreeMap<TierName, Tier>,
    pub global: Budget,
    /// Caps applied to every tenant without an override.
    pub tenant: Budget,
    /// Caps applied to every company without an override.
    pub company: Budget,
    /// What every tenant may do, unless `tenants` names it.
    pub tenant_rules: TenantRules,
    /// Per-tenant rules from the `[tenants.<id>]` sections.
    pub tenants: BTreeMap<crate::ids::TenantId, TenantRules>,
    pub prices: PriceTable,
    pub reservation_ttl_us: i64,
    pub max_reservation_ttl_us: i64,
    /// A reservation whose estimate is above this amount may be held at most
    /// `large_reservation_max_ttl_us`.
    pub large_reservation: Money,
    pub large_reservation_max_ttl_us: i64,
    /// The largest cost one usage record (a direct record or a commit) may carry.
    pub max_record_cost: Money,
    /// The most tokens (input plus output) one usage record may carry.
    pub max_record_tokens: u64,
    /// Limits in shadow for every request: the service's `shadow` and the `shadow` keys of
    /// the `[global]`, `[tenant]` and `[company]` budgets.
    pub shadow: ShadowMask,
    /// Soft caps of the global scope, of every tenant and of every company: they raise
    /// alerts and never refuse anything. A user's are its tier's.
    pub soft_global: Budget,
    pub soft_tenant: Budget,
    pub soft_company: Budget,
}

impl Policy {
    /// The built-in policy.
    pub fn builtin() -> Policy {
        crate::config::Config::default()
            .validate()
            .expect("the built-in configuration is valid")
    }

    pub fn tier(&self, name: &TierName) -> Option<&Tier> {
        self.tiers.get(name)
    }

    /// The rules of one tenant: its `[tenants.<id>]` section, else the `[tenant]` defaults.
    pub fn tenant_rules(&self, tenant: &crate::ids::TenantId) -> &TenantRules {
        if self.tenants.is_empty() {
            return &self.tenant_rules;
        }
        self.tenants.get(tenant).unwrap_or(&self.tenant_rules)
    }
}
