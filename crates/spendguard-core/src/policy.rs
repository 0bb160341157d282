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

/// The limits of one subscription tier, per user.
#[derive(Clone, Debug)]
pub struct Tier {
    pub limits: UserLimits,
    pub budget: Budget,
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
    pub prices: PriceTable,
    pub reservation_ttl_us: i64,
    pub max_reservation_ttl_us: i64,
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
}
