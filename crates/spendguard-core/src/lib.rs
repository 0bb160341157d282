//! The pure core of spendguard: money, prices, policies, calendar windows and the
//! reserve → settle [`Ledger`].
//!
//! This crate does no I/O, runs no async code and never reads a clock: time is an argument
//! (microseconds since the Unix epoch) and every state change comes back as an [`Event`] for
//! a store to persist. That keeps every invariant testable with an injected clock.

pub mod config;
pub mod ids;
pub mod ledger;
pub mod money;
pub mod policy;
pub mod prices;
pub mod window;

pub use config::{Config, ConfigError};
pub use ids::{
    CompanyId, Endpoint, IdError, IdempotencyKey, ModelName, TenantId, TierName, UserId,
};
pub use ledger::*;
pub use money::{Money, MoneyError};
pub use policy::{Budget, Policy, TenantRules, Tier, UserOverrides};
pub use prices::{Price, PriceTable, Tokens, UnknownModelPolicy};
pub use window::{Calendar, Micros, Window};
