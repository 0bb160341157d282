//! Shard state: the counters of every scope, interned in slots of 64 shards, and the
//! reservations, open and recently settled.
//!
//! A request hashes each of its scopes once (from borrowed ids, cloning nothing), locks
//! their shards in ascending order and finds their slots; from then on it works with slot
//! numbers. An open reservation keeps its slots, so settling it hashes no scope at all.
//! A slot is freed only when its scope has nothing in flight (see `Ledger::forget`), so the
//! slots of an open reservation stay valid for as long as it is open.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use uuid::Uuid;

use super::types::{
    Origin, Pricing, RequestStatus, Reservation, ScopeKey, ScopeRef, Settlement, UsageRecord,
};
use super::{HashMap, Ledger, SHARDS};
use crate::money::Money;
use crate::prices::Tokens;
use crate::window::{Micros, Periods};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave it half-updated (updates are applied after
    // all checks), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of one calendar window of one scope (public as `WindowCounters`, what a
/// cluster's database keeps per scope and window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// The window's start; counters of an older window count as zero in a newer one.
    pub start: Micros,
    pub spent: Money,
    pub reserved: Money,
    pub requests: u64,
    pub requests_reserved: u64,
    pub tokens: u64,
    pub tokens_reserved: u64,
}

impl Counters {
    /// The counters as of the window starting at `start`: zero if they are of another one.
    pub(super) fn at(&self, start: Micros) -> Counters {
        if self.start == start {
            *self
        } else {
            Counters {
                start,
                ..Counters::default()
            }
        }
    }

    /// Moves to the window at `start` if that is newer than the current one. Returns the
    /// counters to update for `start`, or `None` when `start` is an older, finished window.
    pub(super) fn window_mut(&mut self, start: Micros) -> Option<&mut Counters> {
        if self.start < start {
            *self = Counters {
                start,
                ..Counters::default()
            };
        }
        (self.start == start).then_some(self)
    }

    fn hold(&mut self, estimate: Money, tokens: u64) {
        self.reserved = self.reserved.saturating_add(estimate);
        self.requests_reserved += 1;
        self.tokens_reserved = self.tokens_reserved.saturating_add(tokens);
    }

    fn unhold(&mut self, estimate: Money, tokens: u64) {
        self.reserved = self.reserved.saturating_sub(estimate);
        self.requests_reserved = self.requests_reserved.saturating_sub(1);
        self.tokens_reserved = self.tokens_reserved.saturating_sub(tokens);
    }

    pub(super) fn charge(&mut self, cost: Money, tokens: u64) {
        self.spent = self.spent.saturating_add(cost);
        self.requests += 1;
        self.tokens = self.tokens.saturating_add(tokens);
    }

    pub(super) fn uncharge(&mut self, cost: Money, tokens: u64) {
        self.spent = self.spent.saturating_sub(cost);
        self.requests = self.requests.saturating_sub(1);
        self.tokens = self.tokens.saturating_sub(tokens);
    }
}

/// The live state of one scope. Only the current windows are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ScopeState {
    pub(super) day: Counters,
    pub(super) month: Counters,
    /// Reservations open against this scope.
    pub(super) in_flight: u32,
    /// Tenant scopes only: how many user and company scopes of the tenant are held in
    /// memory (maintained where they are created and dropped).
    pub(super) subjects: u32,
    /// GCRA theoretical arrival time (users only).
    pub(super) tat: Micros,
}

/// How a change reaches the day and month counters of a scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Windows {
    /// A window newer than the one held replaces it (its counters start at zero); an
    /// older, finished one is left alone. For what adds: reservations and charges.
    Advance,
    /// Only the windows held are changed. For what takes back what was added earlier.
    Held,
}

impl ScopeState {
    /// The day and month loop, written once: calls `f` with the counters of the windows
    /// starting at `day` and `month`, as `how` says.
    pub(super) fn windows(
        &mut self,
        day: Micros,
        month: Micros,
        how: Windows,
        mut f: impl FnMut(&mut Counters),
    ) {
        for (c, start) in [(&mut self.day, day), (&mut self.month, month)] {
            let c = match how {
                Windows::Advance => c.window_mut(start),
                Windows::Held => (c.start == start).then_some(c),
            };
            if let Some(c) = c {
                f(c);
            }
        }
    }

    /// Holds a reservation: in flight, and its estimate in the windows it was admitted in.
    /// `uncharge` first takes back what a commit of it charged (when it is reopened).
    pub(super) fn hold(&mut self, res: &Reservation, uncharge: Option<(Money, u64)>) {
        self.in_flight += 1;
        self.windows(res.day_start, res.month_start, Windows::Advance, |c| {
            if let Some((cost, tokens)) = uncharge {
                c.uncharge(cost, tokens);
            }
            c.hold(res.estimate, res.estimated_tokens);
        });
    }

    /// Lets a reservation go (settled or undone); `charge` is what its commit costs.
    pub(super) fn unhold(&mut self, res: &Reservation, charge: Option<(Money, u64)>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.windows(res.day_start, res.month_start, Windows::Held, |c| {
            c.unhold(res.estimate, res.estimated_tokens);
            if let Some((cost, tokens)) = charge {
                c.charge(cost, tokens);
            }
        });
    }
}

#[derive(Debug)]
struct Slot {
    /// `None` while the slot is free.
    key: Option<ScopeKey>,
    state: ScopeState,
}

/// The scopes of one shard: their states in a slab of slots, found through a table of
/// slot numbers keyed by the scope's hash.
#[derive(Debug, Default)]
pub(super) struct Shard {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

/// The shard of a global or tenant scope, from its hash (bits the table does not use for
/// its buckets). A tenant's companies and users live in their tenant's shard: every request
/// locks its tenant's shard anyway, so this adds no contention, and a request locks two
/// shards (global and tenant) instead of four.
fn shard_of(hash: u64) -> usize {
    ((hash >> 40) as usize) % SHARDS
}

impl Shard {
    pub(super) fn find(&self, hash: u64, r: ScopeRef<'_>) -> Option<u32> {
        self.index
            .find(hash, |&i| {
                self.slots[i as usize]
                    .key
                    .as_ref()
                    .is_some_and(|k| k.as_ref() == r)
            })
            .copied()
    }

    /// Interns a new scope (that is not in the shard) and returns its slot.
    pub(super) fn insert(&mut self, hash: u64, key: ScopeKey, hasher: &RandomState) -> u32 {
        let slot = Slot {
            key: Some(key),
            state: ScopeState::default(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 scopes per shard")
            }
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, i, |&j| {
            hasher.hash_one(
                slots[j as usize]
                    .key
                    .as_ref()
                    .expect("indexed slots are used"),
            )
        });
        i
    }

    pub(super) fn state(&self, slot: u32) -> &ScopeState {
        &self.slots[slot as usize].state
    }

    pub(super) fn state_mut(&mut self, slot: u32) -> &mut ScopeState {
        &mut self.slots[slot as usize].state
    }

    fn remove(&mut self, hasher: &RandomState, slot: u32) {
        let Some(key) = self.slots[slot as usize].key.take() else {
            return;
        };
        if let Ok(e) = self.index.find_entry(hasher.hash_one(&key), |&j| j == slot) {
            e.remove();
        }
        self.slots[slot as usize].state = ScopeState::default();
        self.free.push(slot);
    }

    /// Removes the state of `key`, if there is one.
    pub(super) fn remove_key(&mut self, hasher: &RandomState, key: &ScopeKey) {
        let r = key.as_ref();
        if let Some(i) = self.find(hasher.hash_one(r), r) {
            self.remove(hasher, i);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&ScopeKey, &ScopeState)> {
        self.slots
            .iter()
            .filter_map(|s| s.key.as_ref().map(|k| (k, &s.state)))
    }

    /// Keeps the scopes for which `keep` is true, freeing the slots of the others.
    pub(super) fn retain(
        &mut self,
        hasher: &RandomState,
        mut keep: impl FnMut(&ScopeKey, &ScopeState) -> bool,
    ) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if let Some(key) = &slot.key
                && !keep(key, &slot.state)
            {
                self.remove(hasher, i as u32);
            }
        }
    }
}

/// What the limits of a request read from its scopes, in the current windows: the few
/// counters the checks and the statuses need, copied under the locks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Seen {
    /// Which of [global, tenant, company, user] the request has (it may have no company).
    pub(super) has: [bool; 4],
    /// Per scope: spent and reserved in the current day, then in the current month.
    pub(super) money: [[Money; 4]; 4],
    /// The user's requests, requests reserved, tokens and tokens reserved today.
    pub(super) user_day: [u64; 4],
    pub(super) user_in_flight: u32,
    pub(super) user_tat: Micros,
    /// How many user and company scopes the tenant tracks.
    pub(super) tenant_subjects: u32,
}

/// Where a scope's state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SlotRef {
    pub(super) shard: usize,
    pub(super) slot: u32,
}

/// The (up to four) scopes of a request, hashed once: global, tenant, company, user.
#[derive(Clone, Copy, Debug)]
pub(super) struct Resolved<'a> {
    pub(super) refs: [Option<ScopeRef<'a>>; 4],
    pub(super) hashes: [u64; 4],
    pub(super) shards: [usize; 4],
    /// The slot of each scope that exists.
    pub(super) slots: [Option<u32>; 4],
}

impl Resolved<'_> {
    /// What the limits read from the scopes in the windows of `periods` (zero for the
    /// missing scopes and for windows other than those).
    pub(super) fn seen(&self, locked: &Locked<'_>, periods: &Periods) -> Seen {
        let mut seen = Seen::default();
        for i in 0..4 {
            seen.has[i] = self.refs[i].is_some();
            let Some(slot) = self.slots[i] else { continue };
            let state = locked.shard_ref(self.shards[i]).state(slot);
            let day = state.day.at(periods.day.start);
            let month = state.month.at(periods.month.start);
            seen.money[i] = [day.spent, day.reserved, month.spent, month.reserved];
            match i {
                1 => seen.tenant_subjects = state.subjects,
                3 => {
                    seen.user_day = [
                        day.requests,
                        day.requests_reserved,
                        day.tokens,
                        day.tokens_reserved,
                    ];
                    seen.user_in_flight = state.in_flight;
                    seen.user_tat = state.tat;
                }
                _ => {}
            }
        }
        seen
    }

    /// Where each existing scope lives.
    pub(super) fn slot_refs(&self) -> [Option<SlotRef>; 4] {
        std::array::from_fn(|i| {
            self.slots[i].map(|slot| SlotRef {
                shard: self.shards[i],
                slot,
            })
        })
    }
}

/// The shards of up to four scopes, locked in ascending order.
pub(super) struct Locked<'a> {
    guards: [Option<(usize, MutexGuard<'a, Shard>)>; 4],
}

impl Locked<'_> {
    pub(super) fn shard(&mut self, idx: usize) -> &mut Shard {
        self.guards
            .iter_mut()
            .flatten()
            .find(|(i, _)| *i == idx)
            .map(|(_, g)| &mut **g)
            .expect("the shard is locked")
    }

    pub(super) fn shard_ref(&self, idx: usize) -> &Shard {
        self.guards
            .iter()
            .flatten()
            .find(|(i, _)| *i == idx)
            .map(|(_, g)| &**g)
            .expect("the shard is locked")
    }

    pub(super) fn state_mut(&mut self, at: SlotRef) -> &mut ScopeState {
        self.shard(at.shard).state_mut(at.slot)
    }
}

impl Ledger {
    /// Locks the shards (`usize::MAX`: none) in ascending order, so two operations can
    /// never deadlock.
    pub(super) fn lock_shards(&self, shards: [usize; 4]) -> Locked<'_> {
        let mut order = shards;
        order.sort_unstable();
        let mut guards: [Option<(usize, MutexGuard<'_, Shard>)>; 4] = [None, None, None, None];
        let mut last = usize::MAX;
        for (slot, &s) in order.iter().enumerate() {
            if s != usize::MAX && s != last {
                guards[slot] = Some((s, lock(&self.scopes[s])));
                last = s;
            }
        }
        Locked { guards }
    }

    /// Hashes each scope once, locks their shards and finds their slots.
    pub(super) fn lock_scopes<'s>(
        &self,
        refs: [Option<ScopeRef<'s>>; 4],
    ) -> (Locked<'_>, Resolved<'s>) {
        let mut hashes = [0u64; 4];
        let mut shards = [usize::MAX; 4];
        for (i, r) in refs.iter().enumerate() {
            if let Some(r) = r {
                hashes[i] = self.hasher.hash_one(r);
                shards[i] = match (r, refs[1]) {
                    // The tenant's shard, from the hash just made.
                    (ScopeRef::Company(..) | ScopeRef::User(..), Some(ScopeRef::Tenant(_))) => {
                        shards[1]
                    }
                    _ => self.shard_for(*r, hashes[i]),
                };
            }
        }
        let locked = self.lock_shards(shards);
        let mut slots = [None; 4];
        for (i, r) in refs.iter().enumerate() {
            if let Some(r) = r {
                slots[i] = locked.shard_ref(shards[i]).find(hashes[i], *r);
            }
        }
        (
            locked,
            Resolved {
                refs,
                hashes,
                shards,
                slots,
            },
        )
    }

    /// Creates the missing states of `scopes`, counting each new user or company scope on
    /// its tenant's state. With `cap`, a missing user or company scope is left uncreated
    /// when its tenant already tracks `cap` of them. Returns which scopes exist afterwards.
    pub(super) fn ensure(
        &self,
        locked: &mut Locked<'_>,
        scopes: &mut Resolved<'_>,
        cap: Option<u32>,
    ) -> [bool; 4] {
        let mut present = [false; 4];
        for (i, present) in present.iter_mut().enumerate() {
            let Some(r) = scopes.refs[i] else { continue };
            if scopes.slots[i].is_some() {
                *present = true;
                continue;
            }
            if matches!(r, ScopeRef::Company(..) | ScopeRef::User(..))
                && let Some(tenant) = scopes.refs[1]
            {
                // The tenant comes before its subjects, so it exists by now.
                debug_assert!(matches!(tenant, ScopeRef::Tenant(_)));
                let t = scopes.slots[1].expect("the tenant scope was created first");
                let tenant = locked.shard(scopes.shards[1]).state_mut(t);
                if cap.is_some_and(|cap| tenant.subjects >= cap) {
                    continue;
                }
                tenant.subjects += 1;
            }
            let slot =
                locked
                    .shard(scopes.shards[i])
                    .insert(scopes.hashes[i], r.to_key(), &self.hasher);
            scopes.slots[i] = Some(slot);
            *present = true;
        }
        present
    }

    /// The shard of a scope whose hash is `hash`: its tenant's for a company or a user.
    pub(super) fn shard_for(&self, r: ScopeRef<'_>, hash: u64) -> usize {
        match r {
            ScopeRef::Global | ScopeRef::Tenant(_) => shard_of(hash),
            ScopeRef::Company(t, _) | ScopeRef::User(t, _) => {
                shard_of(self.hasher.hash_one(ScopeRef::Tenant(t)))
            }
        }
    }

    pub(super) fn res_shard(&self, id: &Uuid) -> &Mutex<ResShard> {
        &self.reservations[(self.hasher.hash_one(id) as usize) % SHARDS]
    }
}

/// An open reservation and where its scopes live.
#[derive(Debug)]
pub(super) struct Open {
    pub(super) res: Reservation,
    pub(super) slots: [Option<SlotRef>; 4],
}

/// What a commit or an expiry recorded, kept without the parts its reservation already
/// holds: the usage record is rebuilt from the two ([`Charge::usage`]) when asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Charge {
    pub(super) usage_id: Uuid,
    pub(super) tokens: Tokens,
    pub(super) cost: Money,
    pub(super) pricing: Pricing,
    pub(super) long_context_above: Option<u64>,
    pub(super) status: RequestStatus,
    pub(super) origin: Option<Box<Origin>>,
}

impl Charge {
    /// The usage record of `res` settled with this charge.
    pub(super) fn usage(&self, res: &Reservation) -> UsageRecord {
        UsageRecord {
            id: self.usage_id,
            tenant: res.subject.tenant.clone(),
            user: res.subject.user.clone(),
            company: res.subject.company.clone(),
            model: res.subject.model.clone(),
            endpoint: res.subject.endpoint.clone(),
            tier: res.tier.clone(),
            tokens: self.tokens,
            cost: self.cost,
            pricing: self.pricing,
            long_context_above: self.long_context_above,
            status: self.status,
            created_at: res.created_at,
            reservation_id: Some(res.id),
            idempotency_key: res.idempotency_key.clone(),
            day_start: res.day_start,
            month_start: res.month_start,
            origin: self.origin.as_deref().cloned(),
        }
    }
}

/// How a reservation was settled.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Committed, or expired (status `expired`).
    Charged(Charge),
    Released {
        reason: Option<String>,
    },
    /// Read back from the store: the record that settled it, as stored.
    Stored(Box<UsageRecord>),
}

#[derive(Debug)]
pub(super) struct Settled {
    pub(super) outcome: Outcome,
    /// The usage recorded by a commit that arrived after expiry.
    pub(super) late: Option<Box<UsageRecord>>,
    /// The reservation that was settled: what a replay answers, and what an undone
    /// settlement reopens.
    pub(super) reservation: Reservation,
    pub(super) at: Micros,
}

impl Settled {
    /// The settlement, with its usage record (built anew).
    pub(super) fn settlement(&self) -> Settlement {
        let of = |u: UsageRecord| {
            if u.status == RequestStatus::Expired {
                Settlement::Expired(u)
            } else {
                Settlement::Committed(u)
            }
        };
        match &self.outcome {
            Outcome::Charged(c) => of(c.usage(&self.reservation)),
            Outcome::Released { reason } => Settlement::Released {
                reason: reason.clone(),
            },
            Outcome::Stored(u) => of((**u).clone()),
        }
    }

    /// What a commit charged: its cost and tokens (none for a release or an expiry).
    pub(super) fn charged(&self) -> Option<(Money, u64)> {
        let (cost, tokens, status) = match &self.outcome {
            Outcome::Charged(c) => (c.cost, c.tokens, c.status),
            Outcome::Stored(u) => (u.cost, u.tokens, u.status),
            Outcome::Released { .. } => return None,
        };
        (status != RequestStatus::Expired).then(|| (cost, tokens.total()))
    }
}

/// The reservations of one shard: the open ones by id, and the recently settled ones in a
/// ring, oldest first, found through their sequence numbers. Settling appends to the ring
/// (memory written in order, reused once the front is forgotten), and forgetting pops its
/// front: the sweep reads only what it forgets.
#[derive(Debug, Default)]
pub(super) struct ResShard {
    open: HashMap<Uuid, Open>,
    /// The sequence number of each settled reservation's place in `ring`.
    settled: HashMap<Uuid, u64>,
    /// Settled reservations in the order they were settled; `None` once one was reopened.
    ring: VecDeque<(Uuid, Option<Settled>)>,
    /// The sequence number of the ring's front.
    head: u64,
}

impl ResShard {
    pub(super) fn contains(&self, id: &Uuid) -> bool {
        self.open.contains_key(id) || self.settled.contains_key(id)
    }

    pub(super) fn open(&self, id: &Uuid) -> Option<&Open> {
        self.open.get(id)
    }

    fn place(&self, id: &Uuid) -> Option<usize> {
        let seq = *self.settled.get(id)?;
        Some((seq - self.head) as usize)
    }

    pub(super) fn settled(&self, id: &Uuid) -> Option<&Settled> {
        let at = self.place(id)?;
        self.ring.get(at)?.1.as_ref()
    }

    pub(super) fn settled_mut(&mut self, id: &Uuid) -> Option<&mut Settled> {
        let at = self.place(id)?;
        self.ring.get_mut(at)?.1.as_mut()
    }

    pub(super) fn insert_open(&mut self, open: Open) {
        self.open.insert(open.res.id, open);
    }

    pub(super) fn take_open(&mut self, id: &Uuid) -> Option<Open> {
        self.open.remove(id)
    }

    pub(super) fn insert_settled(&mut self, id: Uuid, settled: Settled) {
        let seq = self.head + self.ring.len() as u64;
        self.ring.push_back((id, Some(settled)));
        self.settled.insert(id, seq);
    }

    pub(super) fn take_settled(&mut self, id: &Uuid) -> Option<Settled> {
        let at = self.place(id)?;
        self.settled.remove(id);
        self.ring.get_mut(at)?.1.take()
    }

    /// Forgets reservations settled at or before `horizon`, oldest first.
    pub(super) fn forget_settled(&mut self, horizon: Micros) {
        let mut forgotten = 0;
        while let Some((_, front)) = self.ring.front() {
            if front.as_ref().is_some_and(|s| s.at > horizon) {
                break;
            }
            let (id, settled) = self.ring.pop_front().expect("the front exists");
            if settled.is_some() {
                self.settled.remove(&id);
                forgotten += 1;
            }
            self.head += 1;
        }
        // Removing marks some slots deleted rather than empty, and a map that runs out of
        // empty slots rehashes, growing when more than half full: refilled after being
        // emptied, the map could allocate on an admit. A map this sweep emptied is replaced
        // here, off the admit path, by a fresh one that holds as many as it held.
        if forgotten > 0 && self.settled.is_empty() {
            self.settled = HashMap::with_capacity_and_hasher(
                self.settled.capacity().max(forgotten),
                self.settled.hasher().clone(),
            );
        }
    }

    /// The ids of the open reservations that expire at or before `now`.
    pub(super) fn due(&self, now: Micros) -> impl Iterator<Item = Uuid> + '_ {
        self.open
            .values()
            .filter(move |o| o.res.expires_at <= now)
            .map(|o| o.res.id)
    }

    pub(super) fn open_count(&self) -> usize {
        self.open.len()
    }
}
