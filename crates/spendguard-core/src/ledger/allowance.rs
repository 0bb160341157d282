//! Cluster mode's allowances: a busy scope's capacity moved from its shared row to one
//! instance, which decides against it without locking the row.
//!
//! A scope's row and an instance's allowance of it are both a [`Held`]: counters (what
//! was admitted and spent through it) and, per window, capacity granted. The scope's
//! counters are its row's plus its allowances'. Per window with a cap `C`:
//! - the row keeps `spent + reserved + granted <= C` whenever it grants capacity;
//! - an allowance keeps `spent + reserved <= granted` whenever its instance admits
//!   against it, because the ledger decides on [`allowance_view`], whose free capacity
//!   is exactly the allowance's.
//!
//! Summed, the scope never holds more than `C` at an admission (a commit above its
//! estimate or a direct record may pass it, as on one node). Settling a reservation
//! counts in the allowance of the instance that settles it, whichever funded it: its
//! counters may go below zero (two's complement in the unsigned counts), and the sum
//! stays exact. [`fold`] moves what an allowance counted into the row and gives its
//! capacity back, keeping the sum.

use super::Ledger;
use super::cluster::ScopeCounters;
use super::state::Counters;
use super::types::ScopeKey;
use crate::money::Money;
use crate::policy::ShadowMask;
use crate::window::Micros;

/// Added to the reserved counts the ledger is given for an allowance, so that settling a
/// reservation another instance admitted never saturates at zero; taken off afterwards.
const OFFSET: u64 = 1 << 40;
const OFFSET_FLIGHT: u32 = 1 << 30;

/// A scope's row, or an instance's allowance of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub counters: ScopeCounters,
    /// Capacity granted, for the day and the month windows of `counters`.
    pub granted: [Money; 2],
}

impl Held {
    /// As of the windows starting at `day` and `month`: a window that started before
    /// counts as empty, with nothing granted. (A window that started later, on the clock
    /// of another instance, stays.)
    pub fn at(mut self, day: Micros, month: Micros) -> Held {
        if self.counters.day.start < day {
            self.counters.day = self.counters.day.at(day);
            self.granted[0] = Money::ZERO;
        }
        if self.counters.month.start < month {
            self.counters.month = self.counters.month.at(month);
            self.granted[1] = Money::ZERO;
        }
        self
    }

    fn window(&self, w: usize) -> &Counters {
        if w == 0 {
            &self.counters.day
        } else {
            &self.counters.month
        }
    }

    fn window_mut(&mut self, w: usize) -> &mut Counters {
        if w == 0 {
            &mut self.counters.day
        } else {
            &mut self.counters.month
        }
    }

    /// What the row can still grant or admit per window: `cap - spent - reserved -
    /// granted` (`None` for a window without a cap).
    pub fn row_free(&self, caps: [Option<Money>; 2]) -> [Option<Money>; 2] {
        std::array::from_fn(|w| {
            caps[w].map(|c| {
                let s = self.window(w);
                c.saturating_sub(s.spent)
                    .saturating_sub(s.reserved)
                    .saturating_sub(self.granted[w])
            })
        })
    }

    /// What an allowance can still admit per window: `granted - spent - reserved`.
    pub fn allowance_free(&self, caps: [Option<Money>; 2]) -> [Option<Money>; 2] {
        std::array::from_fn(|w| {
            caps[w].map(|_| {
                let s = self.window(w);
                self.granted[w]
                    .saturating_sub(s.spent)
                    .saturating_sub(s.reserved)
            })
        })
    }
}

/// The counters the ledger decides on for a scope held through allowance `a` (at the
/// current windows): under cap `C` a window shows `spent = C - granted + a.spent`, so
/// that `spent + reserved + estimate <= C` holds exactly when the allowance has the
/// estimate free.
pub fn allowance_view(a: &Held, caps: [Option<Money>; 2]) -> ScopeCounters {
    let mut v = a.counters;
    for ((c, cap), granted) in [&mut v.day, &mut v.month]
        .into_iter()
        .zip(caps)
        .zip(a.granted)
    {
        if let Some(cap) = cap {
            c.spent = cap.saturating_sub(granted).saturating_add(c.spent);
        }
        c.requests_reserved = c.requests_reserved.wrapping_add(OFFSET);
        c.tokens_reserved = c.tokens_reserved.wrapping_add(OFFSET);
    }
    v.in_flight = v.in_flight.wrapping_add(OFFSET_FLIGHT);
    v
}

/// The allowance after the ledger decided: `a` plus whatever the ledger counted beyond
/// `view` (what [`allowance_view`] gave it).
pub fn allowance_after(a: &Held, view: &ScopeCounters, after: &ScopeCounters) -> Held {
    let mut out = *a;
    for w in 0..2 {
        let (v, n) = if w == 0 {
            (&view.day, &after.day)
        } else {
            (&view.month, &after.month)
        };
        let o = out.window_mut(w);
        o.spent = o.spent.saturating_add(n.spent.saturating_sub(v.spent));
        o.reserved = o
            .reserved
            .saturating_add(n.reserved.saturating_sub(v.reserved));
        o.requests = o.requests.wrapping_add(n.requests.wrapping_sub(v.requests));
        o.requests_reserved = o
            .requests_reserved
            .wrapping_add(n.requests_reserved.wrapping_sub(v.requests_reserved));
        o.tokens = o.tokens.wrapping_add(n.tokens.wrapping_sub(v.tokens));
        o.tokens_reserved = o
            .tokens_reserved
            .wrapping_add(n.tokens_reserved.wrapping_sub(v.tokens_reserved));
    }
    out.counters.in_flight = out
        .counters
        .in_flight
        .wrapping_add(after.in_flight.wrapping_sub(view.in_flight));
    out
}

/// What other allowances counted beyond what they were granted, per window (at `day` and
/// `month`): a commit above its estimate settled through an allowance, not yet folded into
/// the row. The row must not grant it again.
pub fn debts<'a>(
    others: impl IntoIterator<Item = &'a Held>,
    day: Micros,
    month: Micros,
) -> [Money; 2] {
    let mut out = [Money::ZERO; 2];
    for o in others {
        let o = o.at(day, month);
        for (w, d) in out.iter_mut().enumerate() {
            let s = o.window(w);
            let over = s
                .spent
                .saturating_add(s.reserved)
                .saturating_sub(o.granted[w]);
            *d = d.saturating_add(over.max(Money::ZERO));
        }
    }
    out
}

/// Moves `amount` per window from the row's free capacity to the allowance (both at the
/// current windows); never more than the row has free once the other allowances' `debts`
/// ([`debts`]) are counted. Returns what moved.
pub fn grant(
    row: &mut Held,
    a: &mut Held,
    caps: [Option<Money>; 2],
    amount: [Money; 2],
    debts: [Money; 2],
) -> [Money; 2] {
    let free = row.row_free(caps);
    std::array::from_fn(|w| {
        let Some(free) = free[w] else {
            return Money::ZERO;
        };
        let x = amount[w]
            .min(free.saturating_sub(debts[w]))
            .max(Money::ZERO);
        row.granted[w] = row.granted[w].saturating_add(x);
        a.granted[w] = a.granted[w].saturating_add(x);
        x
    })
}

/// Moves what the allowance counted into the row and gives back all it was granted (both
/// at the current windows); the allowance is empty afterwards. The scope's counters (row
/// plus allowances) and `spent + reserved + granted` of the row plus its allowances are
/// unchanged.
pub fn fold(row: &mut Held, a: &mut Held) {
    for w in 0..2 {
        let s = *a.window(w);
        let r = row.window_mut(w);
        r.spent = r.spent.saturating_add(s.spent);
        r.reserved = r.reserved.saturating_add(s.reserved);
        r.requests = r.requests.wrapping_add(s.requests);
        r.requests_reserved = r.requests_reserved.wrapping_add(s.requests_reserved);
        r.tokens = r.tokens.wrapping_add(s.tokens);
        r.tokens_reserved = r.tokens_reserved.wrapping_add(s.tokens_reserved);
        row.granted[w] = row.granted[w].saturating_sub(a.granted[w]);
    }
    row.counters.in_flight = row.counters.in_flight.wrapping_add(a.counters.in_flight);
    let (day, month) = (a.counters.day.start, a.counters.month.start);
    *a = Held::default().at(day, month);
}

impl Ledger {
    /// The cost caps of `key` that refuse requests, for deciding it through allowances;
    /// `None` when it must be decided on its row (a budget of it in shadow: would-be
    /// denials are reported against the whole scope's spend). A user's caps depend on its
    /// tier: users are always decided on their rows.
    pub fn allowance_caps(&self, key: &ScopeKey) -> Option<[Option<Money>; 2]> {
        let policy = self.policy();
        let at = Self::own_index(key);
        let shadow = match key {
            ScopeKey::Global => policy.shadow,
            ScopeKey::Tenant(t) | ScopeKey::Company(t, _) => {
                policy.shadow.union(policy.tenant_rules(t).shadow)
            }
            ScopeKey::User(..) => return None,
        };
        if shadow.intersect(ShadowMask::budgets(at)) != ShadowMask::NONE {
            return None;
        }
        let b = self.budget_of(key);
        Some([b.daily, b.monthly])
    }

    /// The worst-case cost a reservation request would hold, if it can be priced.
    pub fn estimate_of(&self, req: &super::types::ReserveRequest) -> Option<Money> {
        let policy = self.policy();
        let eff = self.effective(&policy, &req.subject).ok()?;
        match self.estimate(&policy, &eff, req) {
            Ok(Ok((cost, _, _))) => Some(cost),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(cents: i64) -> Money {
        Money::from_micros(cents * 10_000)
    }

    fn spend(h: &mut Held, w: usize, spent: i64, reserved: i64) {
        let c = h.window_mut(w);
        c.spent = c.spent.saturating_add(usd(spent));
        c.reserved = c.reserved.saturating_add(usd(reserved));
    }

    #[test]
    fn the_view_admits_exactly_the_allowance() {
        let caps = [Some(usd(1_000)), None];
        let mut a = Held {
            granted: [usd(30), Money::ZERO],
            ..Held::default()
        };
        spend(&mut a, 0, 5, 10);
        let v = allowance_view(&a, caps);
        // Free in the view: 1000 - (1000 - 30 + 5) - 10 = 15 cents, as in the allowance.
        let free = usd(1_000)
            .saturating_sub(v.day.spent)
            .saturating_sub(v.day.reserved);
        assert_eq!(free, usd(15));
        assert_eq!(a.allowance_free(caps)[0], Some(usd(15)));
        assert_eq!(a.allowance_free(caps)[1], None);
    }

    #[test]
    fn what_the_ledger_counts_lands_in_the_allowance_even_below_zero() {
        let caps = [Some(usd(100)), Some(usd(1_000))];
        let a = Held::default();
        let v = allowance_view(&a, caps);
        // Settling a reservation another instance admitted: its estimate leaves `reserved`
        // here, where it never was, and its cost arrives.
        let mut after = v;
        after.day.reserved = after.day.reserved.saturating_sub(usd(7));
        after.day.spent = after.day.spent.saturating_add(usd(4));
        after.day.requests_reserved -= 1;
        after.day.requests += 1;
        after.in_flight -= 1;
        let n = allowance_after(&a, &v, &after);
        assert_eq!(n.counters.day.reserved, usd(-7));
        assert_eq!(n.counters.day.spent, usd(4));
        assert_eq!(n.counters.day.requests_reserved as i64, -1);
        assert_eq!(n.counters.in_flight as i32, -1);
        // Folded into a row that held the estimate, the row holds it no more.
        let mut row = Held::default();
        spend(&mut row, 0, 0, 7);
        row.counters.day.requests_reserved = 1;
        row.counters.in_flight = 1;
        let mut n = n;
        fold(&mut row, &mut n);
        assert_eq!(row.counters.day.reserved, Money::ZERO);
        assert_eq!(row.counters.day.spent, usd(4));
        assert_eq!(row.counters.day.requests_reserved, 0);
        assert_eq!(row.counters.in_flight, 0);
        assert_eq!(n, Held::default());
    }

    #[test]
    fn grants_never_pass_the_row_free_capacity_and_folds_keep_the_sum() {
        let caps = [Some(usd(100)), Some(usd(150))];
        let mut row = Held::default();
        spend(&mut row, 0, 40, 10);
        spend(&mut row, 1, 90, 10);
        let mut a = Held::default();
        let moved = grant(&mut row, &mut a, caps, [usd(80), usd(80)], [Money::ZERO; 2]);
        assert_eq!(moved, [usd(50), usd(50)]);
        assert_eq!(row.row_free(caps), [Some(Money::ZERO), Some(Money::ZERO)]);
        spend(&mut a, 0, 20, 5);
        spend(&mut a, 1, 20, 5);
        fold(&mut row, &mut a);
        assert_eq!(row.granted, [Money::ZERO; 2]);
        assert_eq!(row.row_free(caps), [Some(usd(25)), Some(usd(25))]);
    }

    #[test]
    fn a_new_window_starts_empty_with_nothing_granted() {
        let mut a = Held::default().at(10, 5);
        a.granted = [usd(3), usd(3)];
        spend(&mut a, 0, 1, 1);
        let b = a.at(20, 5);
        assert_eq!(b.granted, [Money::ZERO, usd(3)]);
        assert_eq!(b.counters.day.spent, Money::ZERO);
        assert_eq!(b.counters.day.start, 20);
    }
}
