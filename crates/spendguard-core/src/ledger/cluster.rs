//! Cluster mode: the ledger as the evaluator of counters that a shared database keeps.
//!
//! In cluster mode the database's counter rows are the truth. An instance decides a batch
//! under the database's row locks: it loads the locked counters of every scope the batch
//! touches into its ledger ([`Ledger::put_scope_counters`]), makes the reservations,
//! commits and releases known to the database known to the ledger without counting them
//! again ([`Ledger::adopt_open`], [`Ledger::forget_reservation`],
//! [`Ledger::remember_settled`]), runs the usual operations (`reserve`, `commit`, ...),
//! and writes the counters back ([`Ledger::scope_counters`]) in the same transaction. The
//! limits are evaluated here and nowhere else, exactly as on one node.

use uuid::Uuid;

use super::Ledger;
pub use super::state::Counters as WindowCounters;
use super::state::{Open, ScopeState, lock};
use super::types::*;
use crate::window::Micros;

/// Everything the ledger counts for one scope: its day and month windows, the
/// reservations open against it and (users) the request rate's arrival time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScopeCounters {
    pub day: WindowCounters,
    pub month: WindowCounters,
    pub in_flight: u32,
    /// GCRA theoretical arrival time of the user's requests per minute.
    pub tat: Micros,
}

/// The scopes a subject counts in, most specific last: global, tenant, company (if any),
/// user.
pub fn scope_keys(subject: &Subject) -> Vec<ScopeKey> {
    subject
        .scope_refs()
        .iter()
        .flatten()
        .map(|r| r.to_key())
        .collect()
}

impl Ledger {
    /// The counters of `key` as the ledger holds them (zero for a scope it does not hold).
    pub fn scope_counters(&self, key: &ScopeKey) -> ScopeCounters {
        let (locked, scopes) = self.lock_scopes(Self::refs_of(key));
        let at = Self::own_index(key);
        scopes.slots[at].map_or_else(ScopeCounters::default, |slot| {
            let s = locked.shard_ref(scopes.shards[at]).state(slot);
            ScopeCounters {
                day: s.day,
                month: s.month,
                in_flight: s.in_flight,
                tat: s.tat,
            }
        })
    }

    /// Replaces the counters of `key` with `counters` (creating the scope if the ledger
    /// does not hold it). How many subjects a tenant tracks in memory stays this
    /// instance's own.
    pub fn put_scope_counters(&self, key: &ScopeKey, counters: ScopeCounters) {
        let (mut locked, mut scopes) = self.lock_scopes(Self::refs_of(key));
        self.ensure(&mut locked, &mut scopes, None);
        let at = Self::own_index(key);
        let slot = scopes.slot_refs()[at].expect("ensured just now");
        let s = locked.state_mut(slot);
        *s = ScopeState {
            day: counters.day,
            month: counters.month,
            in_flight: counters.in_flight,
            subjects: s.subjects,
            tat: counters.tat,
        };
    }

    /// Makes an open reservation known without counting it: its estimate is already in
    /// the counters put with [`Ledger::put_scope_counters`]. One held as settled in
    /// memory (settled here in a transaction that did not commit) is reopened.
    pub fn adopt_open(&self, res: Reservation) {
        let mut rs = lock(self.res_shard(&res.id));
        if rs.open(&res.id).is_some() {
            return;
        }
        rs.take_settled(&res.id);
        let (mut locked, mut scopes) = self.lock_scopes(res.subject.scope_refs());
        self.ensure(&mut locked, &mut scopes, None);
        let slots = scopes.slot_refs();
        drop(locked);
        rs.insert_open(Open { res, slots });
    }

    /// Forgets a reservation, open or settled, without changing any counter: the database
    /// says it is settled (elsewhere), or holds it no more.
    pub fn forget_reservation(&self, id: &Uuid) {
        let mut rs = lock(self.res_shard(id));
        rs.take_open(id);
        rs.take_settled(id);
    }

    /// Forgets what a cluster instance remembers past its use, without counting: settled
    /// reservations and idempotency keys past the retention, and open reservations a
    /// minute past their expiry (the database expires them; a late commit reads it back).
    /// Scope states stay: their slots may be held by reservations open elsewhere.
    pub fn forget_past(&self, now: Micros) {
        let horizon = now.saturating_sub(self.settled_retention_us);
        let overdue = now.saturating_sub(super::MICROS_PER_MINUTE);
        for shard in self.reservations.iter() {
            let mut rs = lock(shard);
            let due: Vec<Uuid> = rs.due(overdue).collect();
            for id in due {
                rs.take_open(&id);
            }
            rs.forget_settled(horizon);
        }
        self.forget_keys(now);
    }

    /// The chain of scopes a key's state is created through: its tenant first.
    pub(super) fn refs_of(key: &ScopeKey) -> [Option<ScopeRef<'_>>; 4] {
        let r = key.as_ref();
        let mut refs = [None; 4];
        match r {
            ScopeRef::Global => refs[0] = Some(r),
            ScopeRef::Tenant(_) => refs[1] = Some(r),
            ScopeRef::Company(t, _) => (refs[1], refs[2]) = (Some(ScopeRef::Tenant(t)), Some(r)),
            ScopeRef::User(t, _) => (refs[1], refs[3]) = (Some(ScopeRef::Tenant(t)), Some(r)),
        }
        refs
    }

    /// Where a key stands among [global, tenant, company, user].
    pub(super) fn own_index(key: &ScopeKey) -> usize {
        match key {
            ScopeKey::Global => 0,
            ScopeKey::Tenant(_) => 1,
            ScopeKey::Company(..) => 2,
            ScopeKey::User(..) => 3,
        }
    }
}
