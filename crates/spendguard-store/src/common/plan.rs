//! The plan of a batch of events: the statements that persist it and the rollup increments
//! they make, summed in memory so each row is written once.

use super::*;

/// How a reservation is settled by a batch.
#[derive(Debug)]
pub(crate) enum Settle<'a> {
    /// Settled when its record was made (so a projection made later, or again, writes the
    /// same row).
    Commit {
        id: Uuid,
        usage_id: Uuid,
        at: Micros,
    },
    Release {
        id: Uuid,
        reason: Option<&'a str>,
        at: Micros,
    },
    Expire {
        id: Uuid,
        usage_id: Uuid,
    },
}

/// A batch of events sorted into the statements that persist it. Applying the parts in
/// this order (reservations, settlements, usage rows, rollups, overrides) is equivalent to
/// applying the events one by one:
/// - a reservation is always reserved before it is settled;
/// - only the first settlement of a reservation counts (later ones find it no longer open);
/// - a usage id or reservation id seen twice is the same record seen twice;
/// - for overrides, the last event of each key wins.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub reserved: Vec<&'a Reservation>,
    pub settles: Vec<Settle<'a>>,
    pub usage: Vec<&'a UsageRecord>,
    pub budgets: Vec<(&'a ScopeKey, BudgetOverride)>,
    pub users: Vec<(&'a TenantId, &'a UserId, &'a UserOverrides)>,
    pub tenant_prices: Vec<(&'a TenantId, &'a TenantPrices)>,
}

impl<'a> Plan<'a> {
    pub fn new(events: &'a [Event]) -> Plan<'a> {
        let mut plan = Plan {
            reserved: Vec::new(),
            settles: Vec::new(),
            usage: Vec::with_capacity(events.len()),
            budgets: Vec::new(),
            users: Vec::new(),
            tenant_prices: Vec::new(),
        };
        let mut reserved = HashSet::new();
        let mut settled = HashSet::new();
        let mut usage = HashSet::with_capacity(events.len());
        let mut budgets: HashMap<&ScopeKey, usize> = HashMap::new();
        let mut users: HashMap<(&TenantId, &UserId), usize> = HashMap::new();
        let mut tenant_prices: HashMap<&TenantId, usize> = HashMap::new();
        for event in events {
            match event {
                Event::Reserved(r) => {
                    if reserved.insert(r.id) {
                        plan.reserved.push(r);
                    }
                }
                Event::Committed {
                    reservation_id,
                    usage: u,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Commit {
                            id: *reservation_id,
                            usage_id: u.id,
                            at: u.created_at,
                        });
                    }
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::Released {
                    reservation_id,
                    reason,
                    at,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Release {
                            id: *reservation_id,
                            reason: reason.as_deref(),
                            at: *at,
                        });
                    }
                }
                Event::Expired {
                    reservation_id,
                    usage: u,
                } => {
                    if settled.insert(*reservation_id) {
                        plan.settles.push(Settle::Expire {
                            id: *reservation_id,
                            usage_id: u.id,
                        });
                    }
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::Recorded(u) => {
                    if usage.insert(u.id) {
                        plan.usage.push(u);
                    }
                }
                Event::BudgetSet { scope, budget } => match budgets.get(scope) {
                    Some(&i) => plan.budgets[i].1 = *budget,
                    None => {
                        budgets.insert(scope, plan.budgets.len());
                        plan.budgets.push((scope, *budget));
                    }
                },
                Event::UserSet {
                    tenant,
                    user,
                    overrides,
                } => match users.get(&(tenant, user)) {
                    Some(&i) => plan.users[i].2 = overrides,
                    None => {
                        users.insert((tenant, user), plan.users.len());
                        plan.users.push((tenant, user, overrides));
                    }
                },
                Event::TenantPricesSet { tenant, prices } => match tenant_prices.get(tenant) {
                    Some(&i) => plan.tenant_prices[i].1 = prices,
                    None => {
                        tenant_prices.insert(tenant, plan.tenant_prices.len());
                        plan.tenant_prices.push((tenant, prices));
                    }
                },
            }
        }
        plan
    }
}

impl Settle<'_> {
    /// The reservation it settles.
    pub fn id(&self) -> Uuid {
        match self {
            Settle::Commit { id, .. } | Settle::Release { id, .. } | Settle::Expire { id, .. } => {
                *id
            }
        }
    }
}

impl<'a> Plan<'a> {
    /// The settlements of reservations this plan also makes, by reservation id. A store may
    /// write such a reservation in its final state at once (an insert that settles a row
    /// found open, rather than an insert and an update): the rows come out the same.
    pub fn settled_in_plan(&self) -> HashMap<Uuid, &Settle<'a>> {
        if self.reserved.is_empty() || self.settles.is_empty() {
            return HashMap::new();
        }
        let reserved: HashSet<Uuid> = self.reserved.iter().map(|r| r.id).collect();
        self.settles
            .iter()
            .filter(|s| reserved.contains(&s.id()))
            .map(|s| (s.id(), s))
            .collect()
    }
}

/// Rollup increments, summed in memory over a batch so each rollup row is written once.
#[derive(Debug, Default)]
pub(crate) struct Deltas {
    map: HashMap<(ScopeKey, Window, Micros), Delta>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Delta {
    spent: Money,
    requests: u64,
    tokens: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
}

/// `a + b`, saturating at `i64::MAX`, the most a column holds.
fn add_count(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(i64::MAX as u64)
}

impl Deltas {
    /// Counts a newly inserted usage record (nothing if it does not count).
    pub fn add(&mut self, usage: &UsageRecord) {
        if usage.counts() {
            self.add_parts(
                usage.scopes(),
                usage.cost,
                &usage.tokens,
                usage.day_start,
                usage.month_start,
            );
        }
    }

    /// Counts one request of `cost` and `tokens` in the day and month windows of `scopes`,
    /// and for the user scope also in the week bucket of its day ([`Window::Week`], which
    /// reports over all users read instead of seven day rows).
    pub fn add_parts(
        &mut self,
        scopes: impl Iterator<Item = ScopeKey>,
        cost: Money,
        tokens: &Tokens,
        day_start: Micros,
        month_start: Micros,
    ) {
        let total = tokens.total();
        let week = week_bucket(day_start);
        for scope in scopes {
            let windows = [
                Some((Window::Day, day_start)),
                Some((Window::Month, month_start)),
                matches!(scope, ScopeKey::User(..)).then_some((Window::Week, week)),
            ];
            for (window, start) in windows.into_iter().flatten() {
                let d = self.map.entry((scope.clone(), window, start)).or_default();
                d.spent = d.spent.saturating_add(cost);
                // Counts saturate at `i64::MAX`, the most a column holds.
                d.requests = add_count(d.requests, 1);
                d.tokens = add_count(d.tokens, total);
                d.input_tokens = add_count(d.input_tokens, tokens.input);
                d.cached_input_tokens = add_count(d.cached_input_tokens, tokens.cached_input);
                d.output_tokens = add_count(d.output_tokens, tokens.output);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The increments as counter rows, sorted by key (writers lock rows in this order).
    pub fn into_rows(self) -> Vec<CounterRow> {
        let mut rows: Vec<CounterRow> = self
            .map
            .into_iter()
            .map(|((scope, window, start), d)| CounterRow {
                scope,
                window,
                start,
                spent: d.spent,
                requests: d.requests,
                tokens: d.tokens,
                input_tokens: d.input_tokens,
                cached_input_tokens: d.cached_input_tokens,
                output_tokens: d.output_tokens,
            })
            .collect();
        sort_rows(&mut rows);
        rows
    }
}

/// Sorts counter rows by scope, window and start.
pub(crate) fn sort_rows(rows: &mut [CounterRow]) {
    // Keys are unique (the primary key), so an unstable sort gives the one order.
    rows.sort_unstable_by(|a, b| (&a.scope, a.window, a.start).cmp(&(&b.scope, b.window, b.start)));
}

/// `column = column + excluded.column`, saturating at `i64::MAX`, for an upsert into the
/// table `$table` (valid on SQLite and PostgreSQL).
macro_rules! saturating_add {
    ($table:literal, $column:literal) => {
        concat!(
            $column,
            " = CASE WHEN excluded.",
            $column,
            " <= 0 THEN ",
            $table,
            ".",
            $column,
            " + excluded.",
            $column,
            " WHEN ",
            $table,
            ".",
            $column,
            " > 9223372036854775807 - excluded.",
            $column,
            " THEN 9223372036854775807 ELSE ",
            $table,
            ".",
            $column,
            " + excluded.",
            $column,
            " END"
        )
    };
}

/// The `ON CONFLICT` clause of a rollup upsert.
pub(crate) const ROLLUP_CONFLICT: &str = concat!(
    " ON CONFLICT (scope_kind, tenant_id, scope_id, \"window\", window_start) DO UPDATE SET ",
    saturating_add!("rollups", "spent_micros"),
    ", ",
    saturating_add!("rollups", "requests"),
    ", ",
    saturating_add!("rollups", "tokens"),
    ", ",
    saturating_add!("rollups", "input_tokens"),
    ", ",
    saturating_add!("rollups", "cached_input_tokens"),
    ", ",
    saturating_add!("rollups", "output_tokens"),
);

/// A dimension of `usage_rollups` (the other report groupings read `rollups`). The
/// variants are ordered like their names, as the `dim` column sorts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Dim {
    /// Key: the endpoint, `''` without one.
    Endpoint,
    /// Key: the model.
    Model,
    /// Key: the user id; model: the model.
    UserModel,
}

impl Dim {
    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Endpoint => "endpoint",
            Dim::Model => "model",
            Dim::UserModel => "user_model",
        }
    }
}

/// The key of a `usage_rollups` row: (dim, day_start, tenant_id, key, model).
pub(crate) type UsageKey<'a> = (Dim, Micros, &'a str, &'a str, &'a str);

/// `usage_rollups` increments, summed in memory over a batch so each row is written once.
#[derive(Debug, Default)]
pub(crate) struct UsageDeltas<'a> {
    map: HashMap<UsageKey<'a>, UsageTotals>,
}

impl<'a> UsageDeltas<'a> {
    /// Counts a newly inserted usage record (nothing if it does not count).
    pub fn add(&mut self, u: &'a UsageRecord) {
        if !u.counts() {
            return;
        }
        let one = UsageTotals {
            requests: 1,
            input_tokens: u.tokens.input,
            cached_input_tokens: u.tokens.cached_input,
            output_tokens: u.tokens.output,
            cost: u.cost,
        };
        let (day, tenant, user, model) = (
            u.day_start,
            u.tenant.as_str(),
            u.user.as_str(),
            u.model.as_str(),
        );
        let endpoint = u.endpoint.as_ref().map_or("", |e| e.as_str());
        for (dim, key, model_column) in [
            (Dim::Model, model, ""),
            (Dim::Endpoint, endpoint, ""),
            (Dim::UserModel, user, model),
        ] {
            self.map
                .entry((dim, day, tenant, key, model_column))
                .or_default()
                .add(&one);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The increments, sorted by key (writers lock rows in this order). The sums saturate
    /// at `u64::MAX`; [`clamp_u64`] them when binding.
    pub fn into_rows(self) -> Vec<(UsageKey<'a>, UsageTotals)> {
        let mut rows: Vec<_> = self.map.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows
    }
}

/// The `ON CONFLICT` clause of a `usage_rollups` upsert.
pub(crate) const USAGE_ROLLUP_CONFLICT: &str = concat!(
    " ON CONFLICT (dim, day_start, tenant_id, key, model) DO UPDATE SET ",
    saturating_add!("usage_rollups", "requests"),
    ", ",
    saturating_add!("usage_rollups", "input_tokens"),
    ", ",
    saturating_add!("usage_rollups", "cached_input_tokens"),
    ", ",
    saturating_add!("usage_rollups", "output_tokens"),
    ", ",
    saturating_add!("usage_rollups", "cost_micros"),
);

/// The order in which a batch of alerts is inserted: by their unique key, so concurrent
/// inserts of overlapping batches lock rows in the same order.
pub(crate) fn alert_order(alerts: &[NewAlert]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..alerts.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&alerts[a], &alerts[b]);
        (
            scope_columns(&a.scope),
            a.window.as_str(),
            a.window_start,
            a.threshold_percent,
            a.kind.as_str(),
        )
            .cmp(&(
                scope_columns(&b.scope),
                b.window.as_str(),
                b.window_start,
                b.threshold_percent,
                b.kind.as_str(),
            ))
    });
    order
}
