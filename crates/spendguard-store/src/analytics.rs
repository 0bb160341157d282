//! Reads for analytics (usage reports, per-user daily usage) and the alert and webhook
//! delivery tables.
//!
//! Reports are answered from rollups written in the same transaction as the records, so a
//! report costs O(days × groups), never O(records): groupings by day, tenant, company and
//! user from `rollups` (per scope and calendar window, in the deployment's time zone: the
//! sums of the counting usage records), by model and endpoint from `usage_rollups` (per
//! calendar day and dimension). A user's day per model is read from `usage_rollups` too.

use spendguard_core::{Micros, Money, ScopeKey, TenantId, Window};

/// What a usage report groups by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GroupBy {
    #[default]
    Day,
    Tenant,
    Company,
    User,
    Model,
    Endpoint,
}

impl GroupBy {
    pub const ALL: [GroupBy; 6] = [
        GroupBy::Day,
        GroupBy::Tenant,
        GroupBy::Company,
        GroupBy::User,
        GroupBy::Model,
        GroupBy::Endpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Day => "day",
            GroupBy::Tenant => "tenant",
            GroupBy::Company => "company",
            GroupBy::User => "user",
            GroupBy::Model => "model",
            GroupBy::Endpoint => "endpoint",
        }
    }

    pub fn parse(s: &str) -> Option<GroupBy> {
        GroupBy::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// A usage report over whole calendar days.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportQuery {
    /// The start of the first day (inclusive), as a `day_start` of the calendar.
    pub from_day: Micros,
    /// The start of the last day (inclusive).
    pub to_day: Micros,
    /// Only this tenant's usage.
    pub tenant: Option<TenantId>,
    pub group_by: GroupBy,
    /// At most this many rows (the top ones; see [`Report::rows`]).
    pub limit: Option<usize>,
    /// The `[start, end)` of calendar months that lie entirely within the report's days,
    /// ascending and not overlapping (the caller knows the calendar; empty is always
    /// right). The groupings by tenant, company and user read each of them from its month
    /// rollup rather than from its days: the same report, from fewer rows. `Day` ignores
    /// them. A month starting before `from_day` or after `to_day`, or out of order, is
    /// refused as invalid.
    pub whole_months: Vec<(Micros, Micros)>,
}

/// Sums over usage records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Money,
}

impl UsageTotals {
    /// Adds `other` (saturating).
    pub fn add(&mut self, other: &UsageTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(other.cached_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cost = self.cost.saturating_add(other.cost);
    }

    /// Input plus output tokens (cached input tokens are part of the input tokens).
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// One group of a report. Which fields are set depends on [`GroupBy`]:
/// `Day`: `day`; `Tenant`: `tenant`; `Company`: `tenant` and `key` (the company id, `None`
/// for usage without a company); `User`: `tenant` and `key` (the user id); `Model`: `key`
/// (the model); `Endpoint`: `key` (the endpoint, `None` for usage without one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportRow {
    pub day: Option<Micros>,
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub totals: UsageTotals,
}

/// A usage report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `Day`: every day with usage, oldest first. Other groupings: by cost descending, then
    /// by tenant and key ascending. Cut to the query's limit.
    pub rows: Vec<ReportRow>,
    /// The sums over all groups (before the limit).
    pub totals: UsageTotals,
    /// How many groups there were before the limit.
    pub groups: usize,
}

/// One model's usage in a user's day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelUsage {
    pub model: String,
    pub totals: UsageTotals,
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertKind {
    /// Spend reached `threshold_percent` of a cost budget.
    Threshold,
    /// The month-to-date run rate projects spend above the monthly budget.
    Projected,
    /// The store refused events for good today; they were kept as dead letters (global
    /// scope, day window; at most one a day).
    DeadLetter,
    /// Spend reached `threshold_percent` of a soft budget (which never refuses).
    Soft,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Threshold => "threshold",
            AlertKind::Projected => "projected",
            AlertKind::DeadLetter => "dead_letter",
            AlertKind::Soft => "soft_threshold",
        }
    }

    pub fn parse(s: &str) -> Option<AlertKind> {
        match s {
            "threshold" => Some(AlertKind::Threshold),
            "projected" => Some(AlertKind::Projected),
            "dead_letter" => Some(AlertKind::DeadLetter),
            "soft_threshold" => Some(AlertKind::Soft),
            _ => None,
        }
    }
}

/// An alert to persist. Unique per (scope, window, window start, threshold, kind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAlert {
    pub scope: ScopeKey,
    pub window: Window,
    pub window_start: Micros,
    /// The threshold crossed (percent of the budget); 100 for a projection.
    pub threshold_percent: u32,
    pub kind: AlertKind,
    /// The spend when raised (`Threshold`), or the projected spend (`Projected`).
    pub amount: Money,
    /// The budget.
    pub limit: Money,
    pub created_at: Micros,
}

/// A persisted alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    pub id: i64,
    pub alert: NewAlert,
}

/// Which alerts to list. Newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertQuery {
    /// Only alerts of scopes of this tenant (never the global scope's).
    pub tenant: Option<TenantId>,
    /// Only alerts of current windows: `(day start, month start)` of now. Day alerts with
    /// `window_start >= day start` and month alerts with `window_start >= month start`.
    pub current: Option<(Micros, Micros)>,
    pub limit: Option<usize>,
}

/// The state of one webhook delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "failed" => Some(DeliveryState::Failed),
            _ => None,
        }
    }
}

/// One alert to deliver to one URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub alert: AlertRecord,
    pub url: String,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at: Option<Micros>,
    pub delivered_at: Option<Micros>,
    pub last_error: Option<String>,
}

/// The outcome of one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered {
        at: Micros,
    },
    /// Failed; try again at `next_attempt_at`.
    Retry {
        next_attempt_at: Micros,
        error: String,
    },
    /// Failed for good (too many attempts).
    Failed {
        error: String,
    },
}
