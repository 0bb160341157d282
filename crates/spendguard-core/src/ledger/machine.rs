//! The state machine: reserve, commit, release, expire, record, and the undo of each.

use super::evaluate::{Ask, LimitView, fits, too_many_subjects};
use super::gcra::Gcra;
use super::idempotency::{
    IdemEntry, Remembered, late_usage_id, record_fingerprint, reserve_fingerprint,
};
use super::state::{
    Charge, Locked, Open, Outcome, ResShard, Resolved, ScopeState, Settled, Windows, lock,
};
use super::types::*;
use super::{Ledger, MICROS_PER_MINUTE};
use crate::ids::{ModelName, TenantId};
use crate::money::Money;
use crate::policy::Policy;
use crate::prices::{Priced, Source, TenantPrices, Tokens};
use crate::window::Micros;
use uuid::Uuid;

impl Ledger {
    /// Reserves a worst-case estimate against every applicable limit, all or nothing.
    ///
    /// `Ok(Err(outcome))` is a denial (nothing changed); `Err` is a bad request.
    pub fn reserve(
        &self,
        req: &ReserveRequest,
        now: Micros,
    ) -> Result<Result<Applied<Reserved>, CheckOutcome>, LedgerError> {
        let policy = self.policy();
        let eff = self.effective(&policy, &req.subject)?;
        let ttl = req.ttl_us.unwrap_or(policy.reservation_ttl_us);
        if ttl <= 0 || ttl > policy.max_reservation_ttl_us {
            return Err(LedgerError::InvalidTtl {
                max_seconds: policy.max_reservation_ttl_us / 1_000_000,
            });
        }
        let fp = req
            .idempotency_key
            .as_ref()
            .map_or(0, |_| reserve_fingerprint(req));
        // Idempotency: the key's shard stays locked for the whole operation, so two retries
        // racing each other admit once.
        let mut idem = req
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(&req.subject.tenant, k))));
        if let Some((k, shard)) = &idem
            && let Some(e) = shard.keys.get(&(req.subject.tenant.clone(), (*k).clone()))
        {
            if e.fingerprint != fp {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            }
            let Remembered::Reservation(reservation) = &e.result else {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            };
            let reservation = (**reservation).clone();
            let s = &req.subject;
            let limits = self.limits_as(
                &s.tenant,
                &s.user,
                s.company.as_ref(),
                s.tier.as_ref(),
                s.trusted_tier,
                now,
            )?;
            return Ok(Ok(Applied {
                value: Reserved {
                    reservation,
                    limits: limits.into(),
                    replayed: true,
                    would_deny: None,
                },
                event: None,
            }));
        }
        let (estimate, tokens, max_output) = match self.estimate(&policy, &eff, req)? {
            Ok(v) => v,
            Err(d) => {
                return Ok(Err(CheckOutcome {
                    limits: Vec::new(),
                    denial: Some(d),
                    would_deny: None,
                }));
            }
        };
        let static_would_deny = match Self::static_denial(&eff, &req.subject, max_output) {
            Ok(would) => would,
            Err(d) => {
                return Ok(Err(CheckOutcome {
                    limits: Vec::new(),
                    denial: Some(d),
                    would_deny: None,
                }));
            }
        };
        if estimate > policy.large_reservation && ttl > policy.large_reservation_max_ttl_us {
            return Err(LedgerError::LargeReservationTtl {
                threshold: policy.large_reservation,
                max_seconds: policy.large_reservation_max_ttl_us / 1_000_000,
            });
        }
        let periods = policy.calendar.periods(now);
        let mut rs = lock(self.res_shard(&req.id));
        let (mut locked, mut scopes) = self.lock_scopes(req.subject.scope_refs());
        let seen = scopes.seen(&locked, &periods);
        let ask = Ask {
            seen: &seen,
            caps: &eff.caps,
            periods: &periods,
            estimate,
            tokens,
            requests: 1,
            now,
            after: true,
        };
        let (admitted, shadow_refuses) = fits(&ask);
        let missing =
            std::array::from_fn(|i| scopes.refs[i].is_some() && scopes.slots[i].is_none());
        let too_many = if admitted {
            too_many_subjects(&eff, &req.subject, seen.tenant_subjects, missing, &periods)
        } else {
            None
        };
        let view = LimitView::new(&req.subject, &ask);
        if !admitted {
            return Ok(Err(CheckOutcome {
                limits: view.statuses(),
                denial: Some(Denial::Limits(view.failing())),
                would_deny: None,
            }));
        }
        if let Some(d) = too_many {
            return Ok(Err(CheckOutcome {
                limits: view.statuses(),
                denial: Some(d),
                would_deny: None,
            }));
        }
        if rs.contains(&req.id) {
            return Err(LedgerError::DuplicateId(req.id));
        }
        // Only a request that a limit in shadow would have refused pays for building the
        // would-be denial; without one, admitting allocates nothing more.
        let would_deny = if shadow_refuses {
            static_would_deny.or_else(|| Some(Denial::Limits(view.failing_in_shadow())))
        } else {
            static_would_deny
        };
        let rate = eff.caps.rpm.map(|rpm| (Gcra::new(rpm), now));
        let reservation = Reservation {
            id: req.id,
            subject: req.subject.clone(),
            tier: eff.tier,
            estimate,
            estimated_tokens: tokens,
            created_at: now,
            expires_at: now.saturating_add(ttl),
            day_start: periods.day.start,
            month_start: periods.month.start,
            idempotency_key: req.idempotency_key.clone(),
            fingerprint: fp,
            would_deny: would_deny.as_ref().map(|d| d.code().to_owned()),
        };
        self.admit(&mut locked, &mut scopes, &mut rs, reservation.clone(), rate);
        drop(locked);
        drop(rs);
        if let Some((_, shard)) = &mut idem {
            let until = now
                .saturating_add(self.retention_us)
                .max(reservation.expires_at);
            Self::remember_key(shard, &reservation, until);
        }
        Ok(Ok(Applied {
            value: Reserved {
                reservation: reservation.clone(),
                limits: Limits::lazy(view),
                replayed: false,
                would_deny,
            },
            event: Some(Event::Reserved(reservation)),
        }))
    }

    /// Applies an admitted reservation, under the locks of its scopes and of its
    /// reservation shard: creates its missing scopes (each new user or company counted on
    /// its tenant), holds its estimate in flight and in the windows it was admitted in, and
    /// keeps it open. `reserve` and `restore` both go through here; only `reserve` passes
    /// `rate` (the user's GCRA and the time), as rolling rates are not restored.
    pub(super) fn admit(
        &self,
        locked: &mut Locked<'_>,
        scopes: &mut Resolved<'_>,
        rs: &mut ResShard,
        res: Reservation,
        rate: Option<(Gcra, Micros)>,
    ) {
        self.ensure(locked, scopes, None);
        let slots = scopes.slot_refs();
        for (i, at) in slots.iter().enumerate() {
            let Some(at) = at else { continue };
            let state = locked.state_mut(*at);
            state.hold(&res, None);
            if i == 3
                && let Some((g, now)) = rate
            {
                // Counted even past the rate when the rate is in shadow (capped at a
                // full burst); the same arrival time as `try_admit` when it fits.
                state.tat = g.counted(state.tat, now, 1);
            }
        }
        rs.insert_open(Open { res, slots });
    }

    /// Settles an open reservation, its reservation shard locked in `rs`: under the locks
    /// of its scopes (found through the slots it keeps: no scope is hashed), lets it go in
    /// every scope (charging a commit's cost and tokens) and keeps it among the settled ones
    /// with `outcome`. Returns what `answer` makes of the reservation and the outcome, or
    /// `None` when it is not open.
    fn settle_locked<R>(
        &self,
        rs: &mut ResShard,
        id: &Uuid,
        now: Micros,
        outcome: Outcome,
        answer: impl FnOnce(&Reservation, &Outcome) -> R,
    ) -> Option<R> {
        let mut locked = self.lock_slots(rs.open(id)?);
        let open = rs.take_open(id)?;
        let charge = match &outcome {
            Outcome::Charged(c) if c.status != RequestStatus::Expired => {
                Some((c.cost, c.tokens.total()))
            }
            _ => None,
        };
        for at in open.slots.iter().flatten() {
            locked.state_mut(*at).unhold(&open.res, charge);
        }
        drop(locked);
        let answer = answer(&open.res, &outcome);
        rs.insert_settled(
            *id,
            Settled {
                outcome,
                late: None,
                reservation: open.res,
                at: now,
            },
        );
        Some(answer)
    }

    /// The usage record of a reservation settled with a charge.
    fn charged_usage(res: &Reservation, outcome: &Outcome) -> UsageRecord {
        match outcome {
            Outcome::Charged(c) => c.usage(res),
            _ => unreachable!("settled with a charge"),
        }
    }

    /// Locks the scope shards of an open reservation.
    fn lock_slots(&self, open: &Open) -> Locked<'_> {
        self.lock_shards(open.slots.map(|s| s.map_or(usize::MAX, |s| s.shard)))
    }

    /// Refuses a usage record larger than any real model call (`max_record_cost_usd`,
    /// `max_record_tokens`), so no caller can charge a budget an arbitrary amount. A commit
    /// (`floor` is its reservation's estimate) may always charge its estimate, and exceed it
    /// by at most `max_record_cost_usd`: a large reservation is committed in full, and one
    /// call's overshoot past its estimate stays bounded.
    fn within_record_ceiling(
        policy: &Policy,
        cost: Money,
        tokens: Tokens,
        floor: Option<Money>,
    ) -> Result<(), LedgerError> {
        let max = floor.map_or(policy.max_record_cost, |estimate| {
            estimate.saturating_add(policy.max_record_cost)
        });
        if cost > max {
            return Err(LedgerError::RecordCostTooLarge { cost, max });
        }
        let total = tokens.total();
        if total > policy.max_record_tokens {
            return Err(LedgerError::RecordTokensTooLarge {
                tokens: total,
                max: policy.max_record_tokens,
            });
        }
        Ok(())
    }

    /// The cost of a finished call and how it was found: the caller's cost, else the price
    /// table. A model without a price is never charged zero by accident: a reserved call
    /// (`floor` is its estimate) pays at least its estimate, or the default price when that
    /// is more (`unknown_model = "default_cost"`); a direct record pays the default price
    /// ([`PriceTable::fallback`](crate::prices::PriceTable::fallback)). Only
    /// `unknown_model = "free"` charges nothing, as configured.
    ///
    /// Also returns the long-context tier a listed price was charged at, if any.
    fn price_call(
        &self,
        policy: &Policy,
        tenant: &TenantId,
        model: &ModelName,
        tokens: Tokens,
        given: Option<Money>,
        floor: Option<Money>,
    ) -> Result<(Money, Pricing, Option<u64>), LedgerError> {
        let priced = match given {
            Some(c) => (c, Pricing::Caller, None),
            None => {
                let prices = self.tenant_prices(tenant);
                Self::price_listed(policy, prices.as_deref(), model, tokens, floor)?
            }
        };
        Self::within_record_ceiling(policy, priced.0, tokens, floor)?;
        Ok(priced)
    }

    /// A truncated call without a caller's cost is charged at least its estimate: its real
    /// usage is unknown, and the estimate is the worst case it was admitted for. A call
    /// charged its estimate was priced at no long-context tier.
    fn at_least_estimate_if_truncated(
        commit: &CommitRequest,
        estimate: Money,
        priced: (Money, Pricing, Option<u64>),
    ) -> (Money, Pricing, Option<u64>) {
        if commit.status == RequestStatus::Truncated && commit.cost.is_none() && priced.0 < estimate
        {
            (estimate, Pricing::Estimate, None)
        } else {
            priced
        }
    }

    /// [`Ledger::price_call`] without a caller's cost.
    fn price_listed(
        policy: &Policy,
        tenant: Option<&TenantPrices>,
        model: &ModelName,
        tokens: Tokens,
        floor: Option<Money>,
    ) -> Result<(Money, Pricing, Option<u64>), LedgerError> {
        let at = |p: crate::prices::Price| p.cost(tokens).ok_or(LedgerError::Overflow);
        let (cost, pricing) = match (policy.prices.price_for(model, tenant), floor) {
            (Some(Priced::Listed(q)), _) => {
                let cost = q.cost(tokens).ok_or(LedgerError::Overflow)?;
                let pricing = match q.source {
                    Source::Catalog => Pricing::Catalog,
                    Source::Config => Pricing::Config,
                    Source::TenantOverride => Pricing::TenantOverride,
                };
                return Ok((cost, pricing, q.price.tier_for(tokens.input)));
            }
            (Some(Priced::Free), _) => (Money::ZERO, Pricing::Free),
            (Some(Priced::Default(p)), Some(estimate)) => {
                let cost = at(p)?;
                if cost >= estimate {
                    (cost, Pricing::Default)
                } else {
                    (estimate, Pricing::Estimate)
                }
            }
            (Some(Priced::Default(p)), None) => (at(p)?, Pricing::Default),
            (None, Some(estimate)) => (estimate, Pricing::Estimate),
            (None, None) => (at(policy.prices.fallback())?, Pricing::Default),
        };
        Ok((cost, pricing, None))
    }

    /// Commits the actual usage of a reservation. Below the estimate, the rest is released;
    /// above it, the whole actual cost is charged. Committing the same usage again returns
    /// the same record; a commit after expiry is recorded on its own (never dropped).
    pub fn commit(
        &self,
        id: &Uuid,
        commit: &CommitRequest,
        now: Micros,
    ) -> Result<Applied<Committed>, LedgerError> {
        if commit.status == RequestStatus::Expired {
            return Err(LedgerError::ExpiredStatus);
        }
        // The common case first: an open reservation. Settled ones are answered below.
        let policy = self.policy();
        let mut rs = lock(self.res_shard(id));
        let Some(open) = rs.open(id) else {
            drop(rs);
            return self
                .settled_answer(id, commit, now)?
                .ok_or(LedgerError::NotFound(*id));
        };
        let estimate = open.res.estimate;
        let priced = self.price_call(
            &policy,
            &open.res.subject.tenant,
            &open.res.subject.model,
            commit.tokens,
            commit.cost,
            Some(estimate),
        )?;
        let (cost, pricing, tier) = Self::at_least_estimate_if_truncated(commit, estimate, priced);
        let charge = Charge {
            usage_id: commit.usage_id,
            tokens: commit.tokens,
            cost,
            pricing,
            long_context_above: tier,
            status: commit.status,
            origin: commit.origin.clone().map(Box::new),
        };
        let settled = self.settle_locked(&mut rs, id, now, Outcome::Charged(charge), |res, o| {
            (res.estimate, Self::charged_usage(res, o))
        });
        drop(rs);
        let (estimate, usage) =
            settled.expect("an open reservation is settled under its shard's lock");
        Ok(Applied {
            value: Committed {
                usage: usage.clone(),
                reserved: estimate,
                replayed: false,
                late: false,
            },
            event: Some(Event::Committed {
                reservation_id: *id,
                usage,
            }),
        })
    }

    /// Whether `usage` is what `commit` recorded, as [`CommitRequest::same_usage`] compares
    /// commits: the same tokens, status and caller's cost (a record carries the caller's
    /// cost exactly when it was priced `caller`). A settled reservation keeps its record,
    /// not the commit that made it.
    fn commits(usage: &UsageRecord, commit: &CommitRequest) -> bool {
        usage.tokens == commit.tokens
            && usage.status == commit.status
            && (usage.pricing == Pricing::Caller).then_some(usage.cost) == commit.cost
    }

    /// The answer for a commit of an already settled reservation, if it is settled.
    fn settled_answer(
        &self,
        id: &Uuid,
        commit: &CommitRequest,
        now: Micros,
    ) -> Result<Option<Applied<Committed>>, LedgerError> {
        let (expired, estimate) = {
            let rs = lock(self.res_shard(id));
            let Some(s) = rs.settled(id) else {
                return Ok(None);
            };
            match s.settlement() {
                Settlement::Committed(usage) => {
                    if !Self::commits(&usage, commit) {
                        return Err(LedgerError::CommitMismatch(*id));
                    }
                    // Exactly the first answer.
                    return Ok(Some(Applied {
                        value: Committed {
                            usage,
                            reserved: s.reservation.estimate,
                            replayed: true,
                            late: false,
                        },
                        event: None,
                    }));
                }
                Settlement::Released { .. } => {
                    return Err(LedgerError::AlreadySettled {
                        id: *id,
                        state: "released",
                    });
                }
                Settlement::Expired(usage) => (usage, s.reservation.estimate),
            }
        };
        // Expired, yet the call happened after all: its real spend is recorded on its own,
        // in the current windows, exactly once, under an id derived from the reservation's.
        let policy = self.policy();
        let record = RecordRequest {
            id: late_usage_id(id),
            subject: expired.subject(),
            tokens: commit.tokens,
            cost: commit.cost,
            status: commit.status,
            idempotency_key: None,
        };
        let mut usage = self.build_record(&policy, &record, now, Some(estimate))?;
        (usage.cost, usage.pricing, usage.long_context_above) =
            Self::at_least_estimate_if_truncated(
                commit,
                estimate,
                (usage.cost, usage.pricing, usage.long_context_above),
            );
        usage.reservation_id = Some(*id);
        usage.origin = commit.origin.clone();
        let first = {
            let mut rs = lock(self.res_shard(id));
            let Some(s) = rs.settled_mut(id) else {
                return Ok(None);
            };
            match &s.late {
                None => {
                    s.late = Some(Box::new(usage.clone()));
                    true
                }
                Some(late) if Self::commits(late, commit) => {
                    usage = (**late).clone();
                    false
                }
                Some(_) => return Err(LedgerError::CommitMismatch(*id)),
            }
        };
        if first {
            self.charge_usage(&usage);
        }
        Ok(Some(Applied {
            value: Committed {
                usage: usage.clone(),
                reserved: Money::ZERO,
                replayed: !first,
                late: true,
            },
            event: first.then_some(Event::Recorded(usage)),
        }))
    }

    /// Releases a reservation whose call never happened. Releasing twice is harmless.
    pub fn release(
        &self,
        id: &Uuid,
        reason: Option<String>,
        now: Micros,
    ) -> Result<Applied<Settlement>, LedgerError> {
        let mut rs = lock(self.res_shard(id));
        let outcome = Outcome::Released {
            reason: reason.clone(),
        };
        let settled = self.settle_locked(&mut rs, id, now, outcome, |_, _| ());
        if settled.is_some() {
            return Ok(Applied {
                value: Settlement::Released {
                    reason: reason.clone(),
                },
                event: Some(Event::Released {
                    reservation_id: *id,
                    reason,
                    at: now,
                }),
            });
        }
        match rs.settled(id).map(Settled::settlement) {
            None => Err(LedgerError::NotFound(*id)),
            Some(Settlement::Committed(_)) => Err(LedgerError::AlreadySettled {
                id: *id,
                state: "committed",
            }),
            Some(s) => Ok(Applied {
                value: s.clone(),
                event: None,
            }),
        }
    }

    /// Releases every reservation whose TTL has passed, recording each as `expired` (no
    /// tokens, no cost), and forgets settled reservations, idempotency keys and finished
    /// windows older than the retention. Call it periodically.
    pub fn expire(&self, now: Micros) -> Vec<Event> {
        let mut due = Vec::new();
        let horizon = now.saturating_sub(self.settled_retention_us);
        for shard in self.reservations.iter() {
            let mut rs = lock(shard);
            due.extend(rs.due(now));
            rs.forget_settled(horizon);
        }
        let events = due
            .iter()
            .filter_map(|id| self.expire_one(id, now))
            .collect();
        // Dropping finished windows scans every scope: once a minute is plenty.
        let last = self.last_forget.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= MICROS_PER_MINUTE || now < last {
            self.last_forget
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.forget(now);
        }
        events
    }

    /// Expires one open reservation whose TTL has passed, recording it as `expired` (no
    /// tokens, no cost); `None` when it is not open or not due.
    pub fn expire_one(&self, id: &Uuid, now: Micros) -> Option<Event> {
        let mut rs = lock(self.res_shard(id));
        if rs.open(id)?.res.expires_at > now {
            return None;
        }
        let charge = Charge {
            usage_id: *id,
            tokens: Tokens::default(),
            cost: Money::ZERO,
            pricing: Pricing::Catalog,
            long_context_above: None,
            status: RequestStatus::Expired,
            origin: None,
        };
        let usage = self.settle_locked(
            &mut rs,
            id,
            now,
            Outcome::Charged(charge),
            Self::charged_usage,
        )?;
        Some(Event::Expired {
            reservation_id: *id,
            usage,
        })
    }

    /// Drops idempotency keys past the retention.
    pub(super) fn forget_keys(&self, now: Micros) {
        for shard in self.idempotency.iter() {
            lock(shard).keys.retain(|_, e| e.until > now);
        }
    }

    /// Drops idempotency keys past the retention and scope states of finished windows.
    fn forget(&self, now: Micros) {
        self.forget_keys(now);
        let periods = self.policy().calendar.periods(now);
        let keep = |s: &ScopeState| {
            s.in_flight > 0
                || s.subjects > 0
                || s.month.start >= periods.month.start
                || s.day.start >= periods.day.start
                || s.tat > now
        };
        let mut dropped: Vec<TenantId> = Vec::new();
        for shard in self.scopes.iter() {
            lock(shard).retain(&self.hasher, |key, s| {
                let kept = keep(s);
                if !kept && let ScopeKey::User(t, _) | ScopeKey::Company(t, _) = key {
                    dropped.push(t.clone());
                }
                kept
            });
            // Each tenant's count is lowered after its subjects' shard is unlocked (one lock
            // at a time, so no lock order is needed). Meanwhile the count is too high, which
            // can only refuse, never admit, a new subject. A finished tenant state whose
            // last subject went is dropped too.
            for t in dropped.drain(..) {
                let tkey = ScopeKey::Tenant(t);
                let (hash, idx) = self.scope_hash(&tkey);
                let mut tshard = lock(&self.scopes[idx]);
                if let Some(slot) = tshard.find(hash, tkey.as_ref()) {
                    let s = tshard.state_mut(slot);
                    s.subjects = s.subjects.saturating_sub(1);
                    if !keep(s) {
                        tshard.remove_key(&self.hasher, &tkey);
                    }
                }
            }
        }
    }

    /// Counts usage of a call that was not reserved. Never refused by limits.
    pub fn record(
        &self,
        req: &RecordRequest,
        now: Micros,
    ) -> Result<Applied<UsageRecord>, LedgerError> {
        self.record_at(req, now, now)
    }

    /// [`Ledger::record`] of a call made at `at` (backfill of history; a time after `now` is
    /// taken as `now`). The record belongs to the calendar day and month of `at`: it counts
    /// in the current windows only if it falls in them (a record of an earlier day this month
    /// counts in the month, not in today), and its rollups are those of its own windows.
    pub fn record_at(
        &self,
        req: &RecordRequest,
        at: Micros,
        now: Micros,
    ) -> Result<Applied<UsageRecord>, LedgerError> {
        let at = at.min(now);
        if req.status == RequestStatus::Expired {
            return Err(LedgerError::ExpiredStatus);
        }
        let policy = self.policy();
        let fp = req
            .idempotency_key
            .as_ref()
            .map_or(0, |_| record_fingerprint(req));
        let tenant = &req.subject.tenant;
        let mut idem = req
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(tenant, k))));
        if let Some((k, shard)) = &idem
            && let Some(e) = shard.keys.get(&(tenant.clone(), (*k).clone()))
        {
            if e.fingerprint != fp {
                return Err(LedgerError::IdempotencyConflict((*k).clone()));
            }
            if let Remembered::Usage(u) = &e.result {
                return Ok(Applied {
                    value: (**u).clone(),
                    event: None,
                });
            }
            return Err(LedgerError::IdempotencyConflict((*k).clone()));
        }
        let usage = self.build_record(&policy, req, at, None)?;
        self.charge_usage(&usage);
        if let Some((k, shard)) = &mut idem {
            shard.keys.insert(
                (tenant.clone(), (*k).clone()),
                IdemEntry {
                    fingerprint: fp,
                    result: Remembered::Usage(Box::new(usage.clone())),
                    until: now.saturating_add(self.retention_us),
                },
            );
        }
        Ok(Applied {
            value: usage.clone(),
            event: Some(Event::Recorded(usage)),
        })
    }

    /// The usage record of a direct record at `now` (pure). `floor` is the estimate of the
    /// reservation a late commit belonged to (see [`Ledger::price_call`]).
    fn build_record(
        &self,
        policy: &Policy,
        req: &RecordRequest,
        now: Micros,
        floor: Option<Money>,
    ) -> Result<UsageRecord, LedgerError> {
        let eff = self.effective(policy, &req.subject)?;
        let (cost, pricing, long_context_above) = self.price_call(
            policy,
            &req.subject.tenant,
            &req.subject.model,
            req.tokens,
            req.cost,
            floor,
        )?;
        let periods = policy.calendar.periods(now);
        Ok(UsageRecord {
            id: req.id,
            tenant: req.subject.tenant.clone(),
            user: req.subject.user.clone(),
            company: req.subject.company.clone(),
            model: req.subject.model.clone(),
            endpoint: req.subject.endpoint.clone(),
            tier: eff.tier,
            tokens: req.tokens,
            cost,
            pricing,
            long_context_above,
            status: req.status,
            created_at: now,
            reservation_id: None,
            idempotency_key: req.idempotency_key.clone(),
            day_start: periods.day.start,
            month_start: periods.month.start,
            origin: None,
        })
    }

    /// Adds a usage record to the counters of its windows, in every scope.
    ///
    /// Usage of a user or company the tenant cannot track any more (its
    /// `max_tracked_subjects` are all in memory) is counted against the global and tenant
    /// scopes (and whichever of the others are tracked) only: the record itself is kept whole.
    fn charge_usage(&self, usage: &UsageRecord) {
        let cap = self
            .policy()
            .tenant_rules(&usage.tenant)
            .max_tracked_subjects;
        let (mut locked, mut scopes) = self.lock_scopes(usage.scope_refs());
        self.ensure(&mut locked, &mut scopes, cap);
        let tokens = usage.tokens.total();
        for at in scopes.slot_refs().iter().flatten() {
            locked.state_mut(*at).windows(
                usage.day_start,
                usage.month_start,
                Windows::Advance,
                |c| c.charge(usage.cost, tokens),
            );
        }
    }

    /// Undoes in memory what an event did, when the event could not be made durable (the
    /// store and the spool both failed): memory goes back to what the store holds, and a
    /// retry starts afresh. A reservation is taken back (its key forgotten), a settlement
    /// reopens its reservation, a record is uncounted. Admin events are not undone here (the
    /// caller knows the previous value). Events that no longer match memory (already undone,
    /// or forgotten) change nothing.
    pub fn revert(&self, event: &Event) {
        match event {
            Event::Reserved(res) => self.unreserve(res),
            Event::Committed {
                reservation_id,
                usage,
            } => self.reopen(
                reservation_id,
                |s| matches!(s.settlement(), Settlement::Committed(u) if u.id == usage.id),
            ),
            Event::Released { reservation_id, .. } => self.reopen(reservation_id, |s| {
                matches!(s.outcome, Outcome::Released { .. })
            }),
            Event::Expired { reservation_id, .. } => self.reopen(reservation_id, |s| {
                matches!(s.settlement(), Settlement::Expired(_))
            }),
            Event::Recorded(usage) => self.unrecord(usage),
            Event::BudgetSet { .. } | Event::UserSet { .. } | Event::TenantPricesSet { .. } => {}
        }
    }

    /// Undoes an admitted reservation that is still open.
    fn unreserve(&self, res: &Reservation) {
        let mut idem = res
            .idempotency_key
            .as_ref()
            .map(|k| (k, lock(self.idem_shard(&res.subject.tenant, k))));
        {
            let mut rs = lock(self.res_shard(&res.id));
            let Some(open) = rs.open(&res.id) else {
                return;
            };
            let mut locked = self.lock_slots(open);
            let open = rs.take_open(&res.id).expect("checked just now");
            for at in open.slots.iter().flatten() {
                locked.state_mut(*at).unhold(&open.res, None);
            }
        }
        if let Some((k, shard)) = &mut idem {
            let key = (res.subject.tenant.clone(), (*k).clone());
            if matches!(shard.keys.get(&key), Some(IdemEntry { result: Remembered::Reservation(r), .. }) if r.id == res.id)
            {
                shard.keys.remove(&key);
            }
        }
    }

    /// Reopens a settled reservation whose settlement `is_it` recognises: its estimate is
    /// reserved again and a commit's charge is taken back.
    fn reopen(&self, id: &Uuid, is_it: impl FnOnce(&Settled) -> bool) {
        let mut rs = lock(self.res_shard(id));
        if !rs.settled(id).is_some_and(is_it) {
            return;
        }
        let Some(settled) = rs.take_settled(id) else {
            return;
        };
        let (mut locked, mut scopes) = self.lock_scopes(settled.reservation.subject.scope_refs());
        let charged = settled.charged();
        self.ensure(&mut locked, &mut scopes, None);
        let slots = scopes.slot_refs();
        for at in slots.iter().flatten() {
            locked.state_mut(*at).hold(&settled.reservation, charged);
        }
        rs.insert_open(Open {
            res: settled.reservation,
            slots,
        });
    }

    /// Uncounts a record: a direct one (its key forgotten) or a late commit (its
    /// reservation's late usage cleared).
    fn unrecord(&self, usage: &UsageRecord) {
        if let Some(rid) = usage.reservation_id {
            let mut rs = lock(self.res_shard(&rid));
            let Some(s) = rs.settled_mut(&rid) else {
                return;
            };
            if s.late.as_ref().is_none_or(|l| l.id != usage.id) {
                return;
            }
            s.late = None;
        } else if let Some(k) = &usage.idempotency_key {
            let mut shard = lock(self.idem_shard(&usage.tenant, k));
            let key = (usage.tenant.clone(), k.clone());
            match shard.keys.get(&key) {
                Some(IdemEntry {
                    result: Remembered::Usage(u),
                    ..
                }) if u.id == usage.id => {
                    shard.keys.remove(&key);
                }
                _ => return,
            }
        }
        let (mut locked, scopes) = self.lock_scopes(usage.scope_refs());
        let tokens = usage.tokens.total();
        for at in scopes.slot_refs().iter().flatten() {
            locked
                .state_mut(*at)
                .windows(usage.day_start, usage.month_start, Windows::Held, |c| {
                    c.uncharge(usage.cost, tokens)
                });
        }
    }
}
