//! Backend-independent pieces, one module each: how values map to columns and back
//! (`codec`), the plan of a batch and its rollup deltas (`plan`), and how a report is read
//! and summed (`report`). Everything is re-exported here.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use spendguard_core::window::{WEEK_MICROS, week_bucket};

use spendguard_core::{
    BudgetOverride, CompanyId, CounterRow, Endpoint, Event, IdError, IdempotencyKey, Micros,
    ModelName, Money, Origin, Pricing, RequestStatus, Reservation, ScopeKey, ScopeKind, Subject,
    TenantId, TierName, Tokens, UsageRecord, UserId, UserOverrides, Window, prices::TenantPrices,
};
use uuid::Uuid;

use crate::error::StoreError;
use crate::{
    AlertKind, AlertRecord, Delivery, DeliveryState, GroupBy, NewAlert, Report, ReportQuery,
    ReportRow, UsageTotals,
};

mod codec;
mod plan;
mod report;

pub(crate) use codec::*;
pub(crate) use plan::*;
pub(crate) use report::*;

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
        "week" => Ok(Window::Week),
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

pub(crate) fn encode_tenant_prices(prices: &TenantPrices) -> Result<String, StoreError> {
    serde_json::to_string(prices)
        .map_err(|e| StoreError::Invalid(format!("tenant prices cannot be encoded: {e}")))
}

pub(crate) fn decode_tenant_prices(settings: &str) -> Result<TenantPrices, StoreError> {
    serde_json::from_str(settings).map_err(|e| corrupt(format!("tenant_prices.settings: {e}")))
}

pub(crate) fn decode_user(settings: &str) -> Result<UserOverrides, StoreError> {
    serde_json::from_str(settings).map_err(|e| corrupt(format!("user_overrides.settings: {e}")))
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
    fn counts_clamp_to_i64() {
        assert_eq!(clamp_u64(5), 5);
        assert_eq!(clamp_u64(u64::MAX), i64::MAX);
    }
}
