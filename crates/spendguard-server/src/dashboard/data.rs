//! What the pages show, read once per page: breakdowns of a scope's usage over a date range
//! (from the rollups where they hold it, from the scope's own records where they do not),
//! budget meters, and alerts.

use std::collections::BTreeMap;

use jiff::civil::Date;
use spendguard_core::{Calendar, CompanyId, Micros, Money, ScopeKey, TenantId, UserId, Window};
use spendguard_store::{
    DaySlice, GroupBy, RecordQuery, Report, ReportQuery, ReportRow, SliceDim, StoreError,
    UsageTotals,
};

use crate::AppState;
use crate::alerts::AlertOut;

/// Whose usage a page shows. `company` and `user` need `tenant`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub tenant: Option<TenantId>,
    pub company: Option<CompanyId>,
    pub user: Option<UserId>,
    pub model: Option<String>,
    pub endpoint: Option<String>,
}

/// A scope's usage over a range of days. A grouping is `None` where the source read for
/// this filter does not hold it (a model filter has no per-endpoint sums in the rollups).
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    /// Every day of the range, oldest first, with its spend.
    pub days: Vec<(Date, UsageTotals)>,
    /// Per day, the spend of each model (for the stacked chart).
    pub day_models: Option<BTreeMap<Date, BTreeMap<String, Money>>>,
    pub models: Option<Report>,
    pub endpoints: Option<Report>,
    pub tenants: Option<Report>,
    pub companies: Option<Report>,
    pub users: Option<Report>,
    pub totals: UsageTotals,
}

/// How many rows the ranked tables show.
pub const TOP: usize = 10;

/// A group of [`group`]: day, tenant, key.
type GroupKey = (Option<Micros>, Option<String>, Option<String>);

/// Groups slices into a report like the store's: days oldest first; other groupings by
/// cost descending, then tenant and key ascending.
pub fn group(slices: &[DaySlice], g: GroupBy, limit: Option<usize>) -> Report {
    let mut groups: BTreeMap<GroupKey, UsageTotals> = BTreeMap::new();
    let mut totals = UsageTotals::default();
    for s in slices {
        let k = match g {
            GroupBy::Day => (Some(s.day), None, None),
            GroupBy::Tenant => (None, s.tenant.clone(), None),
            GroupBy::Model => (None, None, s.model.clone()),
            GroupBy::Endpoint => (None, None, s.endpoint.clone()),
            // Not held by slices.
            GroupBy::Company | GroupBy::User => (None, None, None),
        };
        groups.entry(k).or_default().add(&s.totals);
        totals.add(&s.totals);
    }
    let mut rows: Vec<ReportRow> = groups
        .into_iter()
        .map(|((day, tenant, key), totals)| ReportRow {
            day,
            tenant,
            key,
            totals,
        })
        .collect();
    if g != GroupBy::Day {
        rows.sort_by(|a, b| {
            b.totals
                .cost
                .cmp(&a.totals.cost)
                .then_with(|| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)))
        });
    }
    let n = rows.len();
    if let Some(l) = limit {
        rows.truncate(l);
    }
    Report {
        rows,
        totals,
        groups: n,
    }
}

fn every_day(cal: &Calendar, from: Date, to: Date, by_day: &Report) -> Vec<(Date, UsageTotals)> {
    let got: BTreeMap<Date, UsageTotals> = by_day
        .rows
        .iter()
        .filter_map(|r| r.day.map(|d| (cal.date_of(d), r.totals)))
        .collect();
    let mut out = Vec::new();
    let mut d = from;
    while d <= to {
        out.push((d, got.get(&d).copied().unwrap_or_default()));
        match d.tomorrow() {
            Ok(n) => d = n,
            Err(_) => break,
        }
    }
    out
}

fn day_models(cal: &Calendar, slices: &[DaySlice]) -> BTreeMap<Date, BTreeMap<String, Money>> {
    let mut out: BTreeMap<Date, BTreeMap<String, Money>> = BTreeMap::new();
    for s in slices {
        if let Some(m) = &s.model {
            let e = out
                .entry(cal.date_of(s.day))
                .or_default()
                .entry(m.clone())
                .or_insert(Money::ZERO);
            *e = e.saturating_add(s.totals.cost);
        }
    }
    out
}

/// The usage of `f` over the days `from..=to`.
/// `limit`: the most rows of each ranked grouping ([`TOP`] on pages, all for exports).
pub async fn breakdown(
    state: &AppState,
    from: Date,
    to: Date,
    f: &Filter,
    limit: Option<usize>,
) -> Result<Breakdown, StoreError> {
    let now = state.guard.now();
    let cal = &state.guard.ledger().policy().calendar;
    let store = state.guard.store();
    let (from_day, to_day) = (cal.date_start(from), cal.date_start(to));
    let slices = if f.company.is_some() || f.user.is_some() {
        // One company's or user's records: bounded by the indexes on ai_usage.
        store
            .usage_slices(&RecordQuery {
                from_day,
                to_day,
                tenant: f.tenant.clone(),
                company: f.company.clone(),
                user: f.user.clone(),
                model: f.model.clone(),
                endpoint: f.endpoint.clone(),
            })
            .await?
    } else {
        match (&f.model, &f.endpoint) {
            (None, None) => {
                // The report API's own queries, from the rollups.
                let today = cal.date_of(now);
                let query = |group_by, limit: Option<usize>| ReportQuery {
                    from_day,
                    to_day,
                    tenant: f.tenant.clone(),
                    group_by,
                    limit,
                    whole_months: crate::reports::whole_months(cal, from, to, today),
                };
                let by_day = store.report(&query(GroupBy::Day, None)).await?;
                let models = store.report(&query(GroupBy::Model, limit)).await?;
                let endpoints = store.report(&query(GroupBy::Endpoint, limit)).await?;
                let users = store.report(&query(GroupBy::User, limit)).await?;
                let (tenants, companies) = if f.tenant.is_some() {
                    (
                        None,
                        Some(store.report(&query(GroupBy::Company, limit)).await?),
                    )
                } else {
                    (
                        Some(store.report(&query(GroupBy::Tenant, limit)).await?),
                        None,
                    )
                };
                let per_model = store
                    .rollup_slices(&SliceDim::Model, from_day, to_day, f.tenant.as_ref())
                    .await?;
                return Ok(Breakdown {
                    days: every_day(cal, from, to, &by_day),
                    day_models: Some(day_models(cal, &per_model)),
                    totals: by_day.totals,
                    models: Some(models),
                    endpoints: Some(endpoints),
                    tenants,
                    companies,
                    users: Some(users),
                });
            }
            (Some(m), None) => store
                .rollup_slices(&SliceDim::Model, from_day, to_day, f.tenant.as_ref())
                .await?
                .into_iter()
                .filter(|s| s.model.as_deref() == Some(m.as_str()))
                .collect(),
            (None, Some(e)) => store
                .rollup_slices(&SliceDim::Endpoint, from_day, to_day, f.tenant.as_ref())
                .await?
                .into_iter()
                .filter(|s| s.endpoint.as_deref() == Some(e.as_str()))
                .collect(),
            (Some(_), Some(_)) => {
                store
                    .usage_slices(&RecordQuery {
                        from_day,
                        to_day,
                        tenant: f.tenant.clone(),
                        model: f.model.clone(),
                        endpoint: f.endpoint.clone(),
                        ..Default::default()
                    })
                    .await?
            }
        }
    };
    // Records of a company or user, and the raw sums, hold both; the rollups' model rows
    // hold no endpoints and their endpoint rows no models.
    let own = f.company.is_some() || f.user.is_some();
    let has_model = own || f.model.is_some();
    let has_endpoint = own || f.endpoint.is_some();
    let by_day = group(&slices, GroupBy::Day, None);
    Ok(Breakdown {
        days: every_day(cal, from, to, &by_day),
        day_models: has_model.then(|| day_models(cal, &slices)),
        totals: by_day.totals,
        models: has_model.then(|| group(&slices, GroupBy::Model, limit)),
        endpoints: has_endpoint.then(|| group(&slices, GroupBy::Endpoint, limit)),
        tenants: f
            .tenant
            .is_none()
            .then(|| group(&slices, GroupBy::Tenant, limit)),
        companies: None,
        users: None,
    })
}

/// One budget against its spend in the current window.
#[derive(Clone, Debug, PartialEq)]
pub struct Meter {
    pub scope: ScopeKey,
    pub window: Window,
    pub used: Money,
    pub reserved: Money,
    pub limit: Money,
    /// The month's spend at its current rate (monthly budgets).
    pub projected: Option<Money>,
}

impl Meter {
    /// Used and reserved, in percent of the limit.
    pub fn percent(&self) -> f64 {
        if self.limit.micros() <= 0 {
            return if self.used.micros() + self.reserved.micros() > 0 {
                100.0
            } else {
                0.0
            };
        }
        (self.used.micros() as f64 + self.reserved.micros() as f64) / self.limit.micros() as f64
            * 100.0
    }

    /// `ok`, `warn` (80% or more) or `bad` (100% or more).
    pub fn class(&self) -> &'static str {
        let p = self.percent();
        if p >= 100.0 {
            "bad"
        } else if p >= 80.0 {
            "warn"
        } else {
            "ok"
        }
    }
}

/// The month's spend if it goes on at the rate of its spend so far.
pub fn projection(spent: Money, now: Micros, (start, end): (Micros, Micros)) -> Option<Money> {
    let elapsed = now.saturating_sub(start);
    let length = end.saturating_sub(start);
    if elapsed <= 0 || length <= 0 {
        return None;
    }
    let p = spent.micros() as f64 * length as f64 / elapsed as f64;
    Some(Money::from_micros(p.round().min(i64::MAX as f64) as i64))
}

/// Which budgets a page meters: all of them (the overview), or one tenant's, company's or
/// user's.
#[derive(Clone, Debug)]
pub enum MeterFocus {
    /// Every scope with a budget; `Some(tenant)`: only that tenant's (never the global one).
    All(Option<TenantId>),
    Scope(ScopeKey),
}

fn cost_meters(state: &AppState, key: &ScopeKey, now: Micros, out: &mut Vec<Meter>) {
    let budget = state.guard.ledger().budget_of(key);
    push_meters(state, key, budget, now, out);
}

fn push_meters(
    state: &AppState,
    key: &ScopeKey,
    budget: spendguard_core::Budget,
    now: Micros,
    out: &mut Vec<Meter>,
) {
    let ledger = state.guard.ledger();
    let periods = ledger.policy().calendar.periods(now);
    let ((ds, dr), (ms, mr)) = ledger.scope_totals(key, now);
    if let Some(limit) = budget.daily {
        out.push(Meter {
            scope: key.clone(),
            window: Window::Day,
            used: ds,
            reserved: dr,
            limit,
            projected: None,
        });
    }
    if let Some(limit) = budget.monthly {
        out.push(Meter {
            scope: key.clone(),
            window: Window::Month,
            used: ms,
            reserved: mr,
            limit,
            projected: projection(ms, now, (periods.month.start, periods.month.end)),
        });
    }
}

/// A user's cost budgets: its budget override, else the budget of its stored tier (else of
/// the default tier), as the ledger enforces them for a request that names no tier. Read
/// from the ledger's maps, not through `limits_as` (which works out every limit of the
/// user): the overview meters every user with a stored tier.
fn user_meters(
    state: &AppState,
    key: &ScopeKey,
    stored: Option<&spendguard_core::UserOverrides>,
    now: Micros,
    out: &mut Vec<Meter>,
) {
    let ledger = state.guard.ledger();
    let policy = ledger.policy();
    let tier = stored
        .and_then(|o| o.tier.as_ref())
        .unwrap_or(&policy.default_tier);
    let base = policy.tier(tier).map(|t| t.budget).unwrap_or_default();
    let own = ledger.budget_override(key).unwrap_or_default();
    let budget = spendguard_core::Budget {
        daily: own.daily.or(base.daily),
        monthly: own.monthly.or(base.monthly),
    };
    push_meters(state, key, budget, now, out);
}

/// The meters of `focus`, the closest to its limit first. `tenants`: tenants to meter
/// besides those with an override (those with spend, whose configured tenant budget
/// applies).
pub fn meters(state: &AppState, focus: &MeterFocus, tenants: &[TenantId]) -> Vec<Meter> {
    let now = state.guard.now();
    let ledger = state.guard.ledger();
    let mut out = Vec::new();
    match focus {
        MeterFocus::Scope(key @ ScopeKey::User(t, u)) => {
            let stored = ledger.user_overrides(t, u);
            user_meters(state, key, stored.as_ref(), now, &mut out);
        }
        MeterFocus::Scope(key) => cost_meters(state, key, now, &mut out),
        MeterFocus::All(only) => {
            let mine = |k: &ScopeKey| match only {
                None => true,
                Some(t) => k.tenant() == Some(t),
            };
            let mut keys: Vec<ScopeKey> = Vec::new();
            if only.is_none() {
                keys.push(ScopeKey::Global);
            }
            if let Some(t) = only {
                keys.push(ScopeKey::Tenant(t.clone()));
            }
            for t in tenants {
                keys.push(ScopeKey::Tenant(t.clone()));
            }
            // Users: those with a budget override or a stored tier, once each.
            let mut users: std::collections::BTreeMap<
                ScopeKey,
                Option<spendguard_core::UserOverrides>,
            > = std::collections::BTreeMap::new();
            for (k, _) in ledger.budget_overrides() {
                match k {
                    ScopeKey::User(..) => {
                        users.insert(k, None);
                    }
                    k => keys.push(k),
                }
            }
            for (t, u, o) in ledger.all_user_overrides() {
                users.insert(ScopeKey::User(t, u), Some(o));
            }
            keys.retain(|k| mine(k));
            keys.sort();
            keys.dedup();
            for k in &keys {
                cost_meters(state, k, now, &mut out);
            }
            for (k, stored) in users.iter().filter(|(k, _)| mine(k)) {
                let stored = match (stored, k) {
                    (Some(o), _) => Some(o.clone()),
                    (None, ScopeKey::User(t, u)) => ledger.user_overrides(t, u),
                    (None, _) => None,
                };
                user_meters(state, k, stored.as_ref(), now, &mut out);
            }
        }
    }
    out.sort_by(|a, b| {
        b.percent()
            .partial_cmp(&a.percent())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.scope.cmp(&b.scope))
    });
    out
}

/// The current alerts `GET /v1/alerts` lists for this tenant (all, for `None`), newest and
/// most severe first.
pub async fn alerts(
    state: &AppState,
    tenant: Option<TenantId>,
) -> Result<Vec<AlertOut>, StoreError> {
    let mut list =
        crate::reports::list_alerts(state, tenant, false, crate::reports::ALERTS_DEFAULT_LIMIT)
            .await?;
    list.sort_by(|a, b| {
        b.created_at
            .0
            .cmp(&a.created_at.0)
            .then_with(|| severity(b).cmp(&severity(a)))
    });
    Ok(list)
}

/// How bad an alert is: its threshold, a projection below a crossing of 100%.
pub fn severity(a: &AlertOut) -> u32 {
    match a.kind {
        "projected" => 95,
        "dead_letter" => 200,
        _ => a.threshold_percent,
    }
}

/// Whether an alert is about `key`.
pub fn alert_of(a: &AlertOut, key: &ScopeKey) -> bool {
    a.scope == key.kind().as_str()
        && a.scope_id == key.id()
        && a.tenant_id.as_deref() == key.tenant().map(TenantId::as_str)
}

/// This month's days up to today with their spend: from `b` when its range `from..=to`
/// covers them, else read.
pub async fn month_so_far(
    state: &AppState,
    f: &Filter,
    (from, to): (Date, Date),
    b: &Breakdown,
) -> Result<Vec<(Date, Money)>, StoreError> {
    let cal = &state.guard.ledger().policy().calendar;
    let today = cal.date_of(state.guard.now());
    let first = today.first_of_month();
    let pick = |b: &Breakdown| -> Vec<(Date, Money)> {
        b.days
            .iter()
            .filter(|(d, _)| *d >= first && *d <= today)
            .map(|(d, t)| (*d, t.cost))
            .collect()
    };
    if from <= first && to >= today {
        return Ok(pick(b));
    }
    let plain =
        f.company.is_none() && f.user.is_none() && f.model.is_none() && f.endpoint.is_none();
    if plain {
        // Only the days: the report API's grouping by day, one query.
        let by_day = state
            .guard
            .store()
            .report(&ReportQuery {
                from_day: cal.date_start(first),
                to_day: cal.date_start(today),
                tenant: f.tenant.clone(),
                group_by: GroupBy::Day,
                limit: None,
                whole_months: Vec::new(),
            })
            .await?;
        return Ok(every_day(cal, first, today, &by_day)
            .into_iter()
            .map(|(d, t)| (d, t.cost))
            .collect());
    }
    Ok(pick(&breakdown(state, first, today, f, Some(1)).await?))
}
