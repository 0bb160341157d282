//! Start-up: loading a snapshot of persisted state into an empty ledger.
//!
//! Open reservations are applied through [`Ledger::admit`], the very code that applies an
//! admitted reservation in `reserve`, so a restored ledger holds exactly what the ledger
//! that admitted them held (rolling request rates aside).

use std::collections::HashSet;

use super::Ledger;
use super::state::{Outcome, Settled, lock};
use super::types::*;
use crate::ids::{TenantId, UserId};
use crate::policy::UserOverrides;
use crate::prices::TenantPrices;
use crate::window::{Micros, Window};

impl Ledger {
    /// Loads persisted state into an empty ledger at start-up: the counters of the current
    /// windows, the open reservations (their estimates become reserved again) and the
    /// overrides. Rolling request rates are not persisted: after a restart each user may
    /// send one fresh burst.
    ///
    /// A stored user tier that the configuration no longer has is dropped (the user falls
    /// back to the default tier, keeping the other overrides) and reported, so that removing
    /// a tier from the configuration never stops start-up.
    pub fn restore(&self, snapshot: Snapshot) -> Result<Restored, LedgerError> {
        let restored =
            self.replace_overrides(snapshot.budgets, snapshot.users, snapshot.tenant_prices)?;
        self.restore_counters(snapshot.counters);
        for res in snapshot.open {
            if let Some(k) = &res.idempotency_key {
                let until = res
                    .created_at
                    .saturating_add(self.retention_us)
                    .max(res.expires_at);
                Self::remember_key(
                    &mut lock(self.idem_shard(&res.subject.tenant, k)),
                    &res,
                    until,
                );
            }
            let mut rs = lock(self.res_shard(&res.id));
            let (mut locked, mut scopes) = self.lock_scopes(res.subject.scope_refs());
            self.admit(&mut locked, &mut scopes, &mut rs, res.clone(), None);
        }
        Ok(restored)
    }

    /// Adds persisted counters of the current windows to an empty ledger: part of
    /// [`Ledger::restore`], which a caller may instead feed in chunks as they are read (the
    /// counters are sums: the order and the chunks do not matter, nor whether the
    /// overrides are restored before or after).
    pub fn restore_counters(&self, rows: impl IntoIterator<Item = CounterRow>) {
        for row in rows {
            // A scope is created as a reservation or a record creates it (a new user or
            // company counted on its tenant), at its place among the four. Persisted spend
            // is restored whole, even above a tenant's subject cap (new reservations for
            // new subjects are then refused until scopes are freed).
            let at = Self::own_index(&row.scope);
            let (mut locked, mut scopes) = self.lock_scopes(Self::refs_of(&row.scope));
            self.ensure(&mut locked, &mut scopes, None);
            let Some(slot) = scopes.slot_refs()[at] else {
                continue;
            };
            let state = locked.state_mut(slot);
            let c = match row.window {
                Window::Day => &mut state.day,
                Window::Month => &mut state.month,
                Window::Minute | Window::Week | Window::None => continue,
            };
            if let Some(c) = c.window_mut(row.start) {
                c.spent = c.spent.saturating_add(row.spent);
                c.requests = c.requests.saturating_add(row.requests);
                c.tokens = c.tokens.saturating_add(row.tokens);
            }
        }
    }

    /// Makes the admin overrides (budgets, users, tenant prices) exactly these: the ones
    /// given are set, the others cleared. At start-up, and in cluster mode when another
    /// instance changed them. A stored user tier that the configuration no longer has is
    /// dropped (the user falls back to the default tier, keeping the other overrides) and
    /// reported.
    pub fn replace_overrides(
        &self,
        budgets: Vec<(ScopeKey, BudgetOverride)>,
        users: Vec<(TenantId, UserId, UserOverrides)>,
        tenant_prices: Vec<(TenantId, TenantPrices)>,
    ) -> Result<Restored, LedgerError> {
        let mut restored = Restored::default();
        let kept: HashSet<&ScopeKey> = budgets.iter().map(|(k, _)| k).collect();
        for (scope, _) in self.budget_overrides() {
            if !kept.contains(&scope) {
                self.set_budget(scope, BudgetOverride::default());
            }
        }
        for (scope, budget) in budgets {
            self.set_budget(scope, budget);
        }
        let kept: HashSet<&TenantId> = tenant_prices.iter().map(|(t, _)| t).collect();
        for (tenant, _) in self.all_tenant_prices() {
            if !kept.contains(&tenant) {
                self.set_tenant_prices(tenant, TenantPrices::default())?;
            }
        }
        for (tenant, prices) in tenant_prices {
            self.set_tenant_prices(tenant, prices)?;
        }
        let kept: HashSet<(&TenantId, &UserId)> = users.iter().map(|(t, u, _)| (t, u)).collect();
        for (tenant, user, _) in self.all_user_overrides() {
            if !kept.contains(&(&tenant, &user)) {
                self.set_user(tenant, user, UserOverrides::default())?;
            }
        }
        let policy = self.policy();
        for (tenant, user, mut overrides) in users {
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
        Ok(restored)
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
        let outcome = match usage {
            Some(u) => Outcome::Stored(Box::new(u)),
            None => Outcome::Released { reason: None },
        };
        let mut rs = lock(self.res_shard(&id));
        if rs.contains(&id) {
            return;
        }
        rs.insert_settled(
            id,
            Settled {
                outcome,
                late: late.map(Box::new),
                reservation,
                at: now,
            },
        );
    }
}
