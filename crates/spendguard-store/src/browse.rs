//! Reads and writes of the dashboard: usage records of a scope (newest first, paged), their
//! sums per day, model and endpoint, the raw day rows of `usage_rollups`, the audit log of
//! changes made through the dashboard, and alert acknowledgements.
//!
//! The sums over `ai_usage` ([`AnyStore::usage_slices`]) cost O(records of the scope); the
//! dashboard uses them only where the rollups do not hold the breakdown (a company, a
//! user's endpoints, a model and an endpoint filter together). Everything over all tenants
//! reads [`AnyStore::rollup_slices`](crate::AnyStore::rollup_slices) instead: O(days × groups).

use spendguard_core::{CompanyId, Micros, TenantId, UserId};

use crate::UsageTotals;

/// Which usage records to list or sum: those of the days `from_day..=to_day` (as
/// `day_start`s of the calendar) that match every filter given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordQuery {
    pub from_day: Micros,
    pub to_day: Micros,
    pub tenant: Option<TenantId>,
    /// Only with `tenant` (companies belong to a tenant).
    pub company: Option<CompanyId>,
    /// Only with `tenant` (users belong to a tenant).
    pub user: Option<UserId>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
}

/// The usage of one day and one combination of tenant, model and endpoint. Which of those
/// are set depends on where it was read from (see [`SliceDim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaySlice {
    pub day: Micros,
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
    pub totals: UsageTotals,
}

/// A dimension of `usage_rollups`, read by [`AnyStore::rollup_slices`](crate::AnyStore::rollup_slices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceDim {
    /// Per day, tenant and model: `tenant` and `model` set.
    Model,
    /// Per day, tenant and endpoint: `tenant` and `endpoint` (`None`: no endpoint) set.
    Endpoint,
    /// One user's days per model: `tenant` and `model` set (needs the tenant).
    UserModel(UserId),
}

impl SliceDim {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            SliceDim::Model => "model",
            SliceDim::Endpoint => "endpoint",
            SliceDim::UserModel(_) => "user_model",
        }
    }
}

/// One change made through the dashboard: who, what, and the state before and after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by the store (ascending); ignored on insert.
    pub id: i64,
    pub at: Micros,
    /// Who made it (`admin` and the key's prefix).
    pub actor: String,
    /// What kind of change: `budget.set`, `user.set`, `key.create`, `key.revoke`,
    /// `alert.acknowledge`.
    pub action: String,
    /// What it changed (a scope, a user, a key id, an alert id).
    pub target: String,
    /// JSON of the state before (`None`: there was none).
    pub before: Option<String>,
    /// JSON of the state after.
    pub after: Option<String>,
}

/// An acknowledged alert: who acknowledged it and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertAck {
    pub alert_id: i64,
    pub at: Micros,
    pub actor: String,
}

/// The `WHERE` conditions of a [`RecordQuery`] after the day range: each filter given as
/// `(column, value)`, in order.
pub(crate) fn record_filters(q: &RecordQuery) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(t) = &q.tenant {
        out.push(("tenant_id", t.as_str().to_owned()));
    }
    if let Some(c) = &q.company {
        out.push(("company_id", c.as_str().to_owned()));
    }
    if let Some(u) = &q.user {
        out.push(("user_id", u.as_str().to_owned()));
    }
    if let Some(m) = &q.model {
        out.push(("model", m.clone()));
    }
    if let Some(e) = &q.endpoint {
        out.push(("endpoint", e.clone()));
    }
    out
}

/// Orders slices by day, then tenant, model and endpoint.
pub(crate) fn sort_slices(slices: &mut [DaySlice]) {
    slices.sort_by(|a, b| {
        (a.day, &a.tenant, &a.model, &a.endpoint).cmp(&(b.day, &b.tenant, &b.model, &b.endpoint))
    });
}

/// A slice of a `usage_rollups` row of `dim`: `key` and `model` as stored.
pub(crate) fn rollup_slice(
    dim: &SliceDim,
    day: Micros,
    tenant: String,
    key: String,
    model: String,
    totals: UsageTotals,
) -> DaySlice {
    let (model, endpoint) = match dim {
        SliceDim::Model => (Some(key), None),
        SliceDim::Endpoint => (None, (!key.is_empty()).then_some(key)),
        SliceDim::UserModel(_) => (Some(model), None),
    };
    DaySlice {
        day,
        tenant: Some(tenant),
        model,
        endpoint,
        totals,
    }
}
