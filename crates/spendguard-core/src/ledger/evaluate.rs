//! Evaluation: a user's effective limits, and every limit of a request checked against the
//! counters of its scopes.
//!
//! One function, [`each_limit`], walks the limits of a request and says for each whether
//! it fits. Admission reads only those answers; the statuses shown to callers (on a
//! denial, on `check`, or when [`Limits`] of an admitted reservation are read) are built
//! from the same walk, so they can never disagree with the decision.

use super::gcra::Gcra;
use super::state::{ScopeState, Seen, lock};
use super::types::*;
use super::{Ledger, UserRef};
use crate::ids::{CompanyId, ModelName, TenantId, TierName, UserId};
use crate::money::Money;
use crate::policy::{Budget, Policy, ShadowMask};
use crate::prices::Tokens;
use crate::window::{Micros, Periods, Window};

/// The numeric limits of one user's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Caps {
    /// Budgets of [global, tenant, company, user].
    pub(super) budgets: [Budget; 4],
    pub(super) rpm: Option<u32>,
    pub(super) requests_per_day: Option<u64>,
    pub(super) tokens_per_day: Option<u64>,
    pub(super) max_concurrent: Option<u32>,
    /// The limits in shadow: observed, never refusing.
    pub(super) shadow: ShadowMask,
}

/// The effective limits of one user.
#[derive(Clone, Debug)]
pub(super) struct Effective {
    pub(super) tier: TierName,
    pub(super) caps: Caps,
    pub(super) max_output_tokens: Option<u64>,
    /// Whether the tier (or the user's override) allows the subject's model.
    pub(super) model_allowed: bool,
    /// The most user and company scopes the tenant may have in memory.
    pub(super) max_subjects: Option<u32>,
}

fn fits_money(used: Money, reserved: Money, add: Money, capacity: Money) -> bool {
    // `capacity` is the whole limit in single-node mode; in cluster mode it will be the
    // allowance this instance holds (see ARCHITECTURE.md, leases).
    used.checked_add(reserved)
        .and_then(|x| x.checked_add(add))
        .is_some_and(|total| total <= capacity)
}

fn fits_count(used: u64, reserved: u64, add: u64, capacity: u64) -> bool {
    used.checked_add(reserved)
        .and_then(|x| x.checked_add(add))
        .is_some_and(|total| total <= capacity)
}

/// A request against the counters of its scopes: everything a limit's answer depends on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ask<'a> {
    /// What the limits read from the scopes.
    pub(super) seen: &'a Seen,
    pub(super) caps: &'a Caps,
    pub(super) periods: &'a Periods,
    pub(super) estimate: Money,
    pub(super) tokens: u64,
    pub(super) requests: u64,
    pub(super) now: Micros,
    /// Whether the amounts are shown as they would be after admission.
    pub(super) after: bool,
}

/// One limit of a request: whether it fits, and its status without the scope's key.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limit {
    /// Index of the scope: 0 global, 1 tenant, 2 company, 3 user.
    pub(super) scope: usize,
    pub(super) ok: bool,
    /// In shadow: `ok` is reported, never enforced.
    pub(super) shadow: bool,
    window: Window,
    unit: Unit,
    limit: Amount,
    used: Amount,
    reserved: Amount,
    remaining: Amount,
    resets_at: Option<Micros>,
}

impl Limit {
    pub(super) fn status(&self, scope: ScopeKey) -> LimitStatus {
        LimitStatus {
            scope,
            window: self.window,
            unit: self.unit,
            limit: self.limit,
            used: self.used,
            reserved: self.reserved,
            remaining: self.remaining,
            resets_at: self.resets_at,
            shadow: self.shadow,
        }
    }

    /// Whether this limit refuses the request (an enforced limit that does not fit).
    pub(super) fn refuses(&self) -> bool {
        !self.ok && !self.shadow
    }

    /// Whether this limit would refuse the request were it enforced.
    pub(super) fn would_refuse(&self) -> bool {
        !self.ok && self.shadow
    }
}

/// Walks every applicable limit of `ask`, in the order statuses are listed.
#[inline]
pub(super) fn each_limit(ask: &Ask<'_>, mut f: impl FnMut(Limit)) {
    let periods = ask.periods;
    let seen = ask.seen;
    for i in 0..4 {
        if !seen.has[i] {
            continue;
        }
        let [day_spent, day_reserved, month_spent, month_reserved] = seen.money[i];
        let budget = ask.caps.budgets[i];
        for (cap, spent, reserved, window, end, monthly) in [
            (
                budget.daily,
                day_spent,
                day_reserved,
                Window::Day,
                periods.day.end,
                false,
            ),
            (
                budget.monthly,
                month_spent,
                month_reserved,
                Window::Month,
                periods.month.end,
                true,
            ),
        ] {
            let Some(cap) = cap else { continue };
            let ok = fits_money(spent, reserved, ask.estimate, cap);
            let shadow = ask.caps.shadow.contains(ShadowMask::budget(i, monthly));
            let reserved = if ask.after && (ok || shadow) {
                reserved.saturating_add(ask.estimate)
            } else {
                reserved
            };
            f(Limit {
                scope: i,
                ok,
                shadow,
                window,
                unit: Unit::Usd,
                limit: Amount::Usd(cap),
                used: Amount::Usd(spent),
                reserved: Amount::Usd(reserved),
                remaining: Amount::Usd(
                    cap.saturating_sub(spent.saturating_add(reserved))
                        .max(Money::ZERO),
                ),
                resets_at: Some(end),
            });
        }
        if i != 3 {
            continue;
        }
        let [requests, requests_reserved, tokens, tokens_reserved] = seen.user_day;
        let counts = [
            (
                ask.caps.requests_per_day,
                requests,
                requests_reserved,
                ask.requests,
                Unit::Requests,
                ShadowMask::REQUESTS_PER_DAY,
            ),
            (
                ask.caps.tokens_per_day,
                tokens,
                tokens_reserved,
                ask.tokens,
                Unit::Tokens,
                ShadowMask::TOKENS_PER_DAY,
            ),
        ];
        for (cap, used, reserved, add, unit, bit) in counts {
            let Some(cap) = cap else { continue };
            let ok = fits_count(used, reserved, add, cap);
            let shadow = ask.caps.shadow.contains(bit);
            let reserved = if ask.after && (ok || shadow) {
                reserved.saturating_add(add)
            } else {
                reserved
            };
            f(Limit {
                scope: i,
                ok,
                shadow,
                window: Window::Day,
                unit,
                limit: Amount::Count(cap),
                used: Amount::Count(used),
                reserved: Amount::Count(reserved),
                remaining: Amount::Count(cap.saturating_sub(used.saturating_add(reserved))),
                resets_at: Some(periods.day.end),
            });
        }
        if let Some(cap) = ask.caps.max_concurrent {
            let add = ask.requests as u32;
            let in_flight = seen.user_in_flight;
            let ok = in_flight.saturating_add(add) <= cap;
            let shadow = ask.caps.shadow.contains(ShadowMask::MAX_CONCURRENT);
            let level = if ask.after && (ok || shadow) {
                in_flight.saturating_add(add)
            } else {
                in_flight
            };
            f(Limit {
                scope: i,
                ok,
                shadow,
                window: Window::None,
                unit: Unit::Concurrent,
                limit: Amount::Count(cap as u64),
                used: Amount::Count(level as u64),
                reserved: Amount::Count(0),
                remaining: Amount::Count(cap.saturating_sub(level) as u64),
                resets_at: None,
            });
        }
        if let Some(rpm) = ask.caps.rpm {
            let g = Gcra::new(rpm);
            let (ok, tat_after) = g.try_admit(seen.user_tat, ask.now, ask.requests);
            let shadow = ask.caps.shadow.contains(ShadowMask::REQUESTS_PER_MINUTE);
            let tat = if ask.after && ok {
                tat_after
            } else if ask.after && shadow {
                g.counted(seen.user_tat, ask.now, ask.requests)
            } else {
                seen.user_tat
            };
            let used = g.used(tat, ask.now);
            f(Limit {
                scope: i,
                ok,
                shadow,
                window: Window::Minute,
                unit: Unit::Requests,
                limit: Amount::Count(rpm as u64),
                used: Amount::Count(used),
                reserved: Amount::Count(0),
                remaining: Amount::Count((rpm as u64).saturating_sub(used)),
                resets_at: Some(if ok {
                    tat.max(ask.now)
                } else {
                    g.next_allowed(seen.user_tat, ask.now)
                }),
            });
        }
    }
}

/// Whether every enforced limit of `ask` fits, and whether one in shadow does not.
pub(super) fn fits(ask: &Ask<'_>) -> (bool, bool) {
    let mut ok = true;
    let mut would_refuse = false;
    each_limit(ask, |l| {
        ok &= !l.refuses();
        would_refuse |= l.would_refuse();
    });
    (ok, would_refuse)
}

/// What the statuses of a request are made of, copied from its scopes under their locks:
/// a few counters, no allocation. [`LimitView::statuses`] builds the statuses later.
#[derive(Clone, Debug)]
pub(super) struct LimitView {
    tenant: TenantId,
    user: UserId,
    company: Option<CompanyId>,
    seen: Seen,
    caps: Caps,
    periods: Periods,
    estimate: Money,
    tokens: u64,
    requests: u64,
    now: Micros,
    after: bool,
}

impl LimitView {
    pub(super) fn new(subject: &Subject, ask: &Ask<'_>) -> LimitView {
        LimitView {
            tenant: subject.tenant.clone(),
            user: subject.user.clone(),
            company: subject.company.clone(),
            seen: *ask.seen,
            caps: *ask.caps,
            periods: *ask.periods,
            estimate: ask.estimate,
            tokens: ask.tokens,
            requests: ask.requests,
            now: ask.now,
            after: ask.after,
        }
    }

    fn keys(&self) -> [Option<ScopeKey>; 4] {
        [
            Some(ScopeKey::Global),
            Some(ScopeKey::Tenant(self.tenant.clone())),
            self.company
                .as_ref()
                .map(|c| ScopeKey::Company(self.tenant.clone(), c.clone())),
            Some(ScopeKey::User(self.tenant.clone(), self.user.clone())),
        ]
    }

    fn ask(&self) -> Ask<'_> {
        Ask {
            seen: &self.seen,
            caps: &self.caps,
            periods: &self.periods,
            estimate: self.estimate,
            tokens: self.tokens,
            requests: self.requests,
            now: self.now,
            after: self.after,
        }
    }

    /// Every limit's status.
    pub(super) fn statuses(&self) -> Vec<LimitStatus> {
        let keys = self.keys();
        let mut all = Vec::with_capacity(16);
        each_limit(&self.ask(), |l| {
            all.push(l.status(keys[l.scope].clone().expect("a walked scope exists")));
        });
        all
    }

    /// The statuses of the enforced limits that do not fit.
    pub(super) fn failing(&self) -> Vec<LimitStatus> {
        self.failing_where(Limit::refuses)
    }

    /// The statuses of the limits in shadow that do not fit.
    pub(super) fn failing_in_shadow(&self) -> Vec<LimitStatus> {
        self.failing_where(Limit::would_refuse)
    }

    fn failing_where(&self, pick: impl Fn(&Limit) -> bool) -> Vec<LimitStatus> {
        let keys = self.keys();
        let mut failing = Vec::new();
        each_limit(&self.ask(), |l| {
            if pick(&l) {
                failing.push(l.status(keys[l.scope].clone().expect("a walked scope exists")));
            }
        });
        failing
    }
}

/// A refusal when admitting would track more user and company scopes than the tenant may
/// have: `tracked` is the tenant's count, `missing` whether each scope is yet to be created.
pub(super) fn too_many_subjects(
    eff: &Effective,
    subject: &Subject,
    tracked: u32,
    missing: [bool; 4],
    periods: &Periods,
) -> Option<Denial> {
    let new_subjects = missing[2] as u32 + missing[3] as u32;
    match eff.max_subjects {
        Some(cap) if new_subjects > 0 && tracked.saturating_add(new_subjects) > cap => {
            Some(Denial::TooManySubjects {
                tenant: subject.tenant.clone(),
                limit: cap,
                retry_at: periods.month.end,
            })
        }
        _ => None,
    }
}

impl Ledger {
    pub(super) fn effective(
        &self,
        policy: &Policy,
        subject: &Subject,
    ) -> Result<Effective, LedgerError> {
        let o = self.overrides.read().unwrap_or_else(|e| e.into_inner());
        let stored = if o.users.is_empty() {
            None
        } else {
            o.users
                .get(&UserRef(subject.tenant.as_str(), subject.user.as_str()))
        };
        let rules = policy.tenant_rules(&subject.tenant);
        let stored_tier = stored.and_then(|(u, _)| u.tier.as_ref());
        // A trusted caller names any tier. A tenant key's tier applies only when its tenant
        // may use it and the admin stored no tier for the user: a stored tier always wins.
        let requested = match &subject.tier {
            Some(t) if policy.tier(t).is_none() => return Err(LedgerError::UnknownTier(t.clone())),
            Some(t) if subject.trusted_tier || (stored_tier.is_none() && rules.allows_tier(t)) => {
                Some(t)
            }
            _ => None,
        };
        let tier_name = requested.or(stored_tier).unwrap_or(&policy.default_tier);
        let tier = policy
            .tier(tier_name)
            .ok_or_else(|| LedgerError::UnknownTier(tier_name.clone()))?;
        let mut e = Effective {
            tier: tier_name.clone(),
            caps: Caps {
                budgets: [policy.global, policy.tenant, policy.company, tier.budget],
                rpm: tier.limits.requests_per_minute,
                requests_per_day: tier.limits.requests_per_day,
                tokens_per_day: tier.limits.tokens_per_day,
                max_concurrent: tier.limits.max_concurrent,
                shadow: policy.shadow.union(tier.shadow).union(rules.shadow),
            },
            max_output_tokens: tier.limits.max_output_tokens,
            model_allowed: true,
            max_subjects: rules.max_tracked_subjects,
        };
        let mut allowed_models = tier.limits.allowed_models.as_deref();
        if let Some((u, patterns)) = stored {
            let c = &mut e.caps;
            c.rpm = u.requests_per_minute.or(c.rpm);
            c.requests_per_day = u.requests_per_day.or(c.requests_per_day);
            c.tokens_per_day = u.tokens_per_day.or(c.tokens_per_day);
            c.max_concurrent = u.max_concurrent.or(c.max_concurrent);
            e.max_output_tokens = u.max_output_tokens.or(e.max_output_tokens);
            if patterns.is_some() {
                allowed_models = patterns.as_deref();
            }
        }
        e.model_allowed = allowed_models.is_none_or(|p| p.allows(&subject.model));
        let mut tenant_override = BudgetOverride::default();
        if !o.budgets.is_empty() {
            for (i, r) in subject.scope_refs().iter().enumerate() {
                if let Some(b) = r.as_ref().and_then(|r| o.budgets.get(r)) {
                    let budgets = &mut e.caps.budgets;
                    budgets[i].daily = b.daily.or(budgets[i].daily);
                    budgets[i].monthly = b.monthly.or(budgets[i].monthly);
                    if i == 1 {
                        tenant_override = *b;
                    }
                }
            }
        }
        let b = &mut e.caps.budgets;
        b[1] = Self::tenant_share(rules, b[1], b[0], tenant_override);
        Ok(e)
    }

    /// A tenant's caps after its share of the global caps: for each window, the admin's
    /// override of that tenant wins if it sets one; else the cap is the smaller of the
    /// configured tenant cap and `share × global cap`.
    pub(super) fn tenant_share(
        rules: &crate::policy::TenantRules,
        tenant: Budget,
        global: Budget,
        overridden: BudgetOverride,
    ) -> Budget {
        if rules.share_of_global_ppm.is_none() {
            return tenant;
        }
        Budget {
            daily: match overridden.daily {
                Some(d) => Some(d),
                None => rules.share_cap(tenant.daily, global.daily),
            },
            monthly: match overridden.monthly {
                Some(m) => Some(m),
                None => rules.share_cap(tenant.monthly, global.monthly),
            },
        }
    }

    /// Admission rules that do not depend on counters: `Err` is a refusal, `Ok(Some)` a
    /// refusal of a rule in shadow (admitted, a would-be denial).
    pub(super) fn static_denial(
        eff: &Effective,
        subject: &Subject,
        max_output: u64,
    ) -> Result<Option<Denial>, Denial> {
        let shadow = eff.caps.shadow;
        let mut would = None;
        if !eff.model_allowed {
            let d = Denial::ModelNotAllowed {
                model: subject.model.clone(),
                tier: eff.tier.clone(),
            };
            if !shadow.contains(ShadowMask::ALLOWED_MODELS) {
                return Err(d);
            }
            would = Some(d);
        }
        if let Some(max) = eff.max_output_tokens
            && max_output > max
        {
            let d = Denial::OutputTokensTooHigh {
                requested: max_output,
                max,
            };
            if !shadow.contains(ShadowMask::MAX_OUTPUT_TOKENS) {
                return Err(d);
            }
            would = would.or(Some(d));
        }
        Ok(would)
    }

    /// The worst-case cost and tokens of a reservation request.
    pub(super) fn estimate(
        &self,
        policy: &Policy,
        eff: &Effective,
        req: &ReserveRequest,
    ) -> Result<Result<(Money, u64, u64), Denial>, LedgerError> {
        let tenant_prices = match req.estimated_cost {
            Some(_) => None,
            None => self.tenant_prices(&req.subject.tenant),
        };
        let tenant = tenant_prices.as_deref();
        let max_output = req.max_output_tokens.or(eff.max_output_tokens).unwrap_or(0);
        let tokens = req
            .input_tokens
            .checked_add(max_output)
            .ok_or(LedgerError::Overflow)?;
        let cost = match req.estimated_cost {
            Some(c) => c,
            None => match policy.prices.price_for(&req.subject.model, tenant) {
                None => {
                    return Ok(Err(Denial::UnknownModel {
                        model: req.subject.model.clone(),
                    }));
                }
                Some(p) => p
                    .cost(Tokens::new(req.input_tokens, max_output))
                    .ok_or(LedgerError::Overflow)?,
            },
        };
        Ok(Ok((cost, tokens, max_output)))
    }

    /// Would this reservation be admitted now? Changes nothing.
    pub fn check(&self, req: &ReserveRequest, now: Micros) -> Result<CheckOutcome, LedgerError> {
        let policy = self.policy();
        let eff = self.effective(&policy, &req.subject)?;
        let periods = policy.calendar.periods(now);
        let (estimate, tokens, denial, would) = match self.estimate(&policy, &eff, req)? {
            Ok((c, t, max_output)) => match Self::static_denial(&eff, &req.subject, max_output) {
                Ok(would) => (c, t, None, would),
                Err(d) => (c, t, Some(d), None),
            },
            Err(d) => (Money::ZERO, req.input_tokens, Some(d), None),
        };
        let (locked, scopes) = self.lock_scopes(req.subject.scope_refs());
        let seen = scopes.seen(&locked, &periods);
        let missing =
            std::array::from_fn(|i| scopes.refs[i].is_some() && scopes.slots[i].is_none());
        drop(locked);
        let tracked = seen.tenant_subjects;
        let ask = Ask {
            seen: &seen,
            caps: &eff.caps,
            periods: &periods,
            estimate,
            tokens,
            requests: 1,
            now,
            after: false,
        };
        let view = LimitView::new(&req.subject, &ask);
        let failing = view.failing();
        let denial = denial
            .or((!failing.is_empty()).then_some(Denial::Limits(failing)))
            .or_else(|| too_many_subjects(&eff, &req.subject, tracked, missing, &periods));
        let would_deny = match denial {
            Some(_) => None,
            None => would.or_else(|| {
                let failing = view.failing_in_shadow();
                (!failing.is_empty()).then_some(Denial::Limits(failing))
            }),
        };
        Ok(CheckOutcome {
            limits: view.statuses(),
            denial,
            would_deny,
        })
    }

    /// The effective limits of a user and what remains of them, `tier` named by a trusted
    /// caller. Changes nothing.
    pub fn limits(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
        tier: Option<&TierName>,
        now: Micros,
    ) -> Result<Vec<LimitStatus>, LedgerError> {
        self.limits_as(tenant, user, company, tier, true, now)
    }

    /// The effective limits of a user, `tier` named by a trusted caller or not (see
    /// [`Subject::trusted_tier`]). Changes nothing.
    pub fn limits_as(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
        tier: Option<&TierName>,
        trusted_tier: bool,
        now: Micros,
    ) -> Result<Vec<LimitStatus>, LedgerError> {
        let policy = self.policy();
        let subject = Subject {
            tenant: tenant.clone(),
            user: user.clone(),
            company: company.cloned(),
            tier: tier.cloned(),
            trusted_tier,
            model: ModelName::parse("-").expect("valid"),
            endpoint: None,
        };
        let eff = self.effective(&policy, &subject)?;
        let periods = policy.calendar.periods(now);
        let (locked, scopes) = self.lock_scopes(subject.scope_refs());
        let seen = scopes.seen(&locked, &periods);
        drop(locked);
        let ask = Ask {
            seen: &seen,
            caps: &eff.caps,
            periods: &periods,
            estimate: Money::ZERO,
            tokens: 0,
            requests: 0,
            now,
            after: false,
        };
        Ok(LimitView::new(&subject, &ask).statuses())
    }
}

/// A scope's state by key, for the read-only queries.
pub(super) fn scope_state(ledger: &Ledger, key: &ScopeKey) -> Option<ScopeState> {
    let (hash, shard) = ledger.scope_hash(key);
    let shard = lock(&ledger.scopes[shard]);
    shard.find(hash, key.as_ref()).map(|i| *shard.state(i))
}
