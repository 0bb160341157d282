//! Behaviour of each ledger operation, example by example.

use spendguard_core::*;

use crate::support::*;

const CAPS: &str = r#"
[global]
usd_per_day = "10"
usd_per_month = "100"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1"
usd_per_month = "5"
max_concurrent = "unlimited"
max_output_tokens = 1000
allowed_models = ["gpt-4o*"]
"#;

fn ledger() -> Ledger {
    Ledger::new(policy(CAPS))
}

fn user_day(l: &Ledger, tenant: &str, user: &str, now: i64) -> LimitStatus {
    let s = subject(tenant, user, None);
    l.limits(&s.tenant, &s.user, None, None, now)
        .unwrap()
        .into_iter()
        .find(|x| {
            x.scope.kind() == ScopeKind::User && x.window == Window::Day && x.unit == Unit::Usd
        })
        .unwrap()
}

#[test]
fn reserve_then_commit_below_estimate_releases_the_rest() {
    let l = ledger();
    let r = l
        .reserve(&reserve_req(1, subject("t", "u", None), usd("0.40")), T0)
        .unwrap()
        .unwrap();
    assert!(matches!(r.event, Some(Event::Reserved(_))));
    let day = user_day(&l, "t", "u", T0);
    assert_eq!(
        (amount_usd(day.used), amount_usd(day.reserved)),
        (Money::ZERO, usd("0.40"))
    );
    let c = l
        .commit(&id(1), &commit_req(101, usd("0.25")), T0 + 1)
        .unwrap();
    assert_eq!(c.value.usage.cost, usd("0.25"));
    assert_eq!(c.value.usage.reservation_id, Some(id(1)));
    assert!(matches!(c.event, Some(Event::Committed { .. })));
    let day = user_day(&l, "t", "u", T0);
    assert_eq!(
        (amount_usd(day.used), amount_usd(day.reserved)),
        (usd("0.25"), Money::ZERO)
    );
    assert_eq!(amount_usd(day.remaining), usd("0.75"));
}

#[test]
fn commit_above_estimate_is_charged_in_full() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("t", "u", None), usd("0.10")), T0)
        .unwrap()
        .unwrap();
    let c = l.commit(&id(1), &commit_req(101, usd("0.90")), T0).unwrap();
    assert_eq!(c.value.usage.cost, usd("0.90"));
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).used), usd("0.90"));
}

#[test]
fn a_denial_is_all_or_nothing_and_lists_every_failing_limit() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("t", "u", None), usd("0.80")), T0)
        .unwrap()
        .unwrap();
    // 0.30 more breaks the user's day (1.00) but not the month (5.00) or the global caps.
    let denied = l
        .reserve(&reserve_req(2, subject("t", "u", None), usd("0.30")), T0)
        .unwrap()
        .unwrap_err();
    let Some(Denial::Limits(failing)) = &denied.denial else {
        panic!("{denied:?}")
    };
    assert_eq!(failing.len(), 1);
    assert_eq!(
        (failing[0].scope.kind(), failing[0].window),
        (ScopeKind::User, Window::Day)
    );
    assert_eq!(failing[0].resets_at, Some(T0 + DAY));
    assert!(denied.denial.as_ref().unwrap().is_budget());
    // Nothing was applied to any scope.
    let after = l
        .limits(
            &subject("t", "u", None).tenant,
            &subject("t", "u", None).user,
            None,
            None,
            T0,
        )
        .unwrap();
    for s in &after {
        if s.unit == Unit::Usd {
            assert_eq!(amount_usd(s.reserved), usd("0.80"), "{s:?}");
        }
    }
    // Over both the user's day and month at once: both are listed.
    let denied = l
        .reserve(&reserve_req(3, subject("t", "u", None), usd("6")), T0)
        .unwrap()
        .unwrap_err();
    let Some(Denial::Limits(failing)) = &denied.denial else {
        panic!()
    };
    let windows: Vec<_> = failing.iter().map(|f| (f.scope.kind(), f.window)).collect();
    assert!(windows.contains(&(ScopeKind::User, Window::Day)));
    assert!(windows.contains(&(ScopeKind::User, Window::Month)));
    assert_eq!(l.open_reservations(), 1);
}

#[test]
fn exact_fit_is_admitted_and_one_micro_more_is_not() {
    let l = ledger();
    assert!(
        l.reserve(&reserve_req(1, subject("t", "u", None), usd("1")), T0)
            .unwrap()
            .is_ok()
    );
    let more = reserve_req(2, subject("t", "u", None), Money::from_micros(1));
    assert!(l.reserve(&more, T0).unwrap().is_err());
    // `check` agrees and changes nothing.
    assert!(!l.check(&more, T0).unwrap().allowed());
    assert_eq!(l.open_reservations(), 1);
}

#[test]
fn release_frees_the_estimate_and_is_idempotent() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("t", "u", None), usd("1")), T0)
        .unwrap()
        .unwrap();
    let r = l
        .release(&id(1), Some("user went away".into()), T0)
        .unwrap();
    assert!(matches!(r.event, Some(Event::Released { .. })));
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).reserved), Money::ZERO);
    assert_eq!(l.release(&id(1), None, T0).unwrap().event, None);
    assert!(matches!(
        l.commit(&id(1), &commit_req(5, usd("0.1")), T0),
        Err(LedgerError::AlreadySettled {
            state: "released",
            ..
        })
    ));
    assert!(matches!(
        l.release(&id(99), None, T0),
        Err(LedgerError::NotFound(_))
    ));
}

#[test]
fn commit_is_idempotent_and_refuses_a_different_body() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("t", "u", None), usd("0.5")), T0)
        .unwrap()
        .unwrap();
    let first = l.commit(&id(1), &commit_req(101, usd("0.2")), T0).unwrap();
    let again = l
        .commit(&id(1), &commit_req(101, usd("0.2")), T0 + 5)
        .unwrap();
    assert_eq!(again.value.usage, first.value.usage);
    assert!(again.value.replayed);
    assert_eq!(again.event, None);
    // Exactly the first answer, the reservation's estimate included.
    assert_eq!(again.value.reserved, first.value.reserved);
    assert_eq!(first.value.reserved, usd("0.5"));
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).used), usd("0.2"));
    assert!(matches!(
        l.commit(&id(1), &commit_req(101, usd("0.3")), T0),
        Err(LedgerError::CommitMismatch(_))
    ));
    assert!(matches!(
        l.release(&id(1), None, T0),
        Err(LedgerError::AlreadySettled {
            state: "committed",
            ..
        })
    ));
}

#[test]
fn expiry_releases_records_expired_and_a_late_commit_is_still_charged() {
    let l = ledger();
    let mut req = reserve_req(1, subject("t", "u", None), usd("0.5"));
    req.ttl_us = Some(MINUTE);
    l.reserve(&req, T0).unwrap().unwrap();
    assert!(l.expire(T0 + MINUTE - 1).is_empty());
    let events = l.expire(T0 + MINUTE);
    let [Event::Expired { usage, .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(
        (usage.status, usage.cost),
        (RequestStatus::Expired, Money::ZERO)
    );
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).reserved), Money::ZERO);
    assert!(l.expire(T0 + MINUTE + 1).is_empty(), "expired twice");
    // The call did happen: its spend is recorded once, never dropped.
    let late = l
        .commit(&id(1), &commit_req(101, usd("0.3")), T0 + 2 * MINUTE)
        .unwrap();
    assert!(late.value.late);
    assert!(matches!(late.event, Some(Event::Recorded(_))));
    let again = l
        .commit(&id(1), &commit_req(101, usd("0.3")), T0 + 3 * MINUTE)
        .unwrap();
    assert_eq!(again.event, None);
    assert_eq!(again.value.usage, late.value.usage);
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).used), usd("0.3"));
}

#[test]
fn ttl_bounds_are_enforced() {
    let l = ledger();
    let mut req = reserve_req(1, subject("t", "u", None), usd("0.1"));
    req.ttl_us = Some(0);
    assert!(matches!(
        l.reserve(&req, T0),
        Err(LedgerError::InvalidTtl { .. })
    ));
    req.ttl_us = Some(2 * DAY);
    assert!(matches!(
        l.reserve(&req, T0),
        Err(LedgerError::InvalidTtl {
            max_seconds: 86_400
        })
    ));
}

#[test]
fn idempotent_reserve_returns_the_same_reservation() {
    let l = ledger();
    let mut req = reserve_req(1, subject("t", "u", None), usd("0.3"));
    req.idempotency_key = Some(IdempotencyKey::parse("k1").unwrap());
    let a = l.reserve(&req, T0).unwrap().unwrap();
    let mut retry = req.clone();
    retry.id = id(2); // a retry gets a fresh id from the caller's side
    let b = l.reserve(&retry, T0 + 10).unwrap().unwrap();
    assert!(b.value.replayed);
    assert_eq!(b.value.reservation.id, a.value.reservation.id);
    assert_eq!(b.event, None);
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).reserved), usd("0.3"));
    let mut other = retry.clone();
    other.estimated_cost = Some(usd("0.4"));
    assert!(matches!(
        l.reserve(&other, T0),
        Err(LedgerError::IdempotencyConflict(_))
    ));
    // The same key in another tenant is another key.
    let mut elsewhere = req.clone();
    elsewhere.id = id(3);
    elsewhere.subject = subject("t2", "u", None);
    assert!(!l.reserve(&elsewhere, T0).unwrap().unwrap().value.replayed);
}

#[test]
fn record_is_counted_never_refused_and_idempotent() {
    let l = ledger();
    let rec = RecordRequest {
        id: id(1),
        subject: subject("t", "u", None),
        tokens: Tokens {
            input: 10,
            cached_input: 0,
            output: 10,
            ..Default::default()
        },
        cost: Some(usd("3")), // three times the user's daily cap
        status: RequestStatus::Success,
        idempotency_key: Some(IdempotencyKey::parse("r1").unwrap()),
    };
    let a = l.record(&rec, T0).unwrap();
    assert!(matches!(a.event, Some(Event::Recorded(_))));
    let b = l
        .record(
            &RecordRequest {
                id: id(2),
                ..rec.clone()
            },
            T0,
        )
        .unwrap();
    assert_eq!((b.value.id, b.event), (id(1), None));
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).used), usd("3"));
    let different = RecordRequest {
        id: id(3),
        cost: Some(usd("4")),
        ..rec.clone()
    };
    assert!(matches!(
        l.record(&different, T0),
        Err(LedgerError::IdempotencyConflict(_))
    ));
    // Now over the cap, further reservations are refused.
    assert!(
        l.reserve(&reserve_req(9, subject("t", "u", None), usd("0.01")), T0)
            .unwrap()
            .is_err()
    );
}

#[test]
fn record_without_cost_uses_the_price_table_and_the_fallback_for_unpriced_models() {
    let l = ledger();
    let mut rec = RecordRequest {
        id: id(1),
        subject: subject("t", "u", None),
        tokens: Tokens {
            input: 1_000_000,
            cached_input: 0,
            output: 0,
            ..Default::default()
        },
        cost: None,
        status: RequestStatus::Success,
        idempotency_key: None,
    };
    let listed = l.record(&rec, T0).unwrap().value;
    assert_eq!(
        (listed.cost, listed.pricing),
        (usd("2.50"), Pricing::Catalog)
    );
    // A call on a model without a price already happened: it is recorded, at the
    // conservative fallback price (no `default_price` is configured), and marked so.
    rec.subject.model = ModelName::parse("mystery-model").unwrap();
    rec.id = id(2);
    let unlisted = l.record(&rec, T0).unwrap().value;
    assert_eq!(
        (unlisted.cost, unlisted.pricing),
        (usd("15.00"), Pricing::Default)
    );
}

#[test]
fn tier_rules_models_output_tokens_and_unknown_models() {
    let l = ledger();
    let mut req = reserve_req(1, subject("t", "u", None), usd("0.1"));
    req.subject.model = ModelName::parse("claude-opus-4").unwrap();
    let d = l.reserve(&req, T0).unwrap().unwrap_err();
    assert!(matches!(d.denial, Some(Denial::ModelNotAllowed { .. })));
    let mut req = reserve_req(2, subject("t", "u", None), usd("0.1"));
    req.max_output_tokens = Some(1001);
    let d = l.reserve(&req, T0).unwrap().unwrap_err();
    assert_eq!(
        d.denial,
        Some(Denial::OutputTokensTooHigh {
            requested: 1001,
            max: 1000
        })
    );
    // Unknown model without a caller's estimate: denied by default.
    let open = Ledger::new(policy("[tiers.free]\nallowed_models = [\"*\"]"));
    let mut req = reserve_req(3, subject("t", "u", None), usd("0.1"));
    req.estimated_cost = None;
    req.subject.model = ModelName::parse("mystery").unwrap();
    let d = open.reserve(&req, T0).unwrap().unwrap_err();
    assert!(matches!(d.denial, Some(Denial::UnknownModel { .. })));
    // A priced model without an estimate: input + max output at list price.
    req.subject.model = ModelName::parse("gpt-4o-2024-08-06").unwrap();
    req.max_output_tokens = Some(1000);
    req.input_tokens = 1000;
    let r = open.reserve(&req, T0).unwrap().unwrap();
    assert_eq!(r.value.reservation.estimate, usd("0.0125"));
    assert_eq!(r.value.reservation.estimated_tokens, 2000);
}

#[test]
fn overrides_apply_at_once() {
    let l = ledger();
    let s = subject("t", "u", None);
    l.set_budget(
        ScopeKey::User(s.tenant.clone(), s.user.clone()),
        BudgetOverride {
            daily: Some(usd("0.1")),
            monthly: None,
        },
    );
    assert!(
        l.reserve(&reserve_req(1, s.clone(), usd("0.2")), T0)
            .unwrap()
            .is_err()
    );
    l.set_budget(
        ScopeKey::User(s.tenant.clone(), s.user.clone()),
        BudgetOverride::default(),
    );
    assert!(
        l.reserve(&reserve_req(2, s.clone(), usd("0.2")), T0)
            .unwrap()
            .is_ok()
    );
    // A tenant cap binds all its users.
    l.set_budget(
        ScopeKey::Tenant(s.tenant.clone()),
        BudgetOverride {
            daily: Some(usd("0.3")),
            monthly: None,
        },
    );
    assert!(
        l.reserve(&reserve_req(3, subject("t", "other", None), usd("0.2")), T0)
            .unwrap()
            .is_err()
    );
    // User overrides: tier and limits.
    let e = l.set_user(
        s.tenant.clone(),
        s.user.clone(),
        UserOverrides {
            tier: Some(TierName::parse("gold").unwrap()),
            ..Default::default()
        },
    );
    assert!(matches!(e, Err(LedgerError::UnknownTier(_))));
    l.set_user(
        s.tenant.clone(),
        s.user.clone(),
        UserOverrides {
            max_output_tokens: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let d = l
        .reserve(&reserve_req(4, s.clone(), usd("0.01")), T0)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        d.denial,
        Some(Denial::OutputTokensTooHigh {
            requested: 100,
            max: 10
        })
    );
}

#[test]
fn users_of_different_tenants_are_different_scopes() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("a", "u", None), usd("1")), T0)
        .unwrap()
        .unwrap();
    assert!(
        l.reserve(&reserve_req(2, subject("b", "u", None), usd("1")), T0)
            .unwrap()
            .is_ok()
    );
}

#[test]
fn windows_roll_over_at_local_midnight_without_a_reset_job() {
    let l = Ledger::new(policy(&format!("time_zone = \"America/New_York\"\n{CAPS}")));
    // 2024-03-10T04:00Z is 23:00 on 9 March in New York.
    let late_evening = T0 + 4 * 60 * MINUTE;
    l.reserve(
        &reserve_req(1, subject("t", "u", None), usd("1")),
        late_evening,
    )
    .unwrap()
    .unwrap();
    assert!(
        l.reserve(
            &reserve_req(2, subject("t", "u", None), usd("0.5")),
            late_evening
        )
        .unwrap()
        .is_err()
    );
    // 01:00 local on 10 March: a new day; the month (March) still holds the first reservation.
    let next_day = late_evening + 2 * 60 * MINUTE;
    assert!(
        l.reserve(
            &reserve_req(3, subject("t", "u", None), usd("0.5")),
            next_day
        )
        .unwrap()
        .is_ok()
    );
    // Committing the old reservation charges the old day, not the new one.
    l.commit(&id(1), &commit_req(101, usd("1")), next_day)
        .unwrap();
    let day = user_day(&l, "t", "u", next_day);
    assert_eq!(
        (amount_usd(day.used), amount_usd(day.reserved)),
        (Money::ZERO, usd("0.5"))
    );
    let month = l
        .limits(
            &subject("t", "u", None).tenant,
            &subject("t", "u", None).user,
            None,
            None,
            next_day,
        )
        .unwrap()
        .into_iter()
        .find(|x| x.scope.kind() == ScopeKind::User && x.window == Window::Month)
        .unwrap();
    assert_eq!(
        (amount_usd(month.used), amount_usd(month.reserved)),
        (usd("1"), usd("0.5"))
    );
}

#[test]
fn gcra_allows_a_burst_of_the_limit_then_one_per_interval() {
    let l = Ledger::new(policy(
        "[tiers.free]\nrequests_per_minute = 6\nrequests_per_day = \"unlimited\"\nmax_concurrent = \"unlimited\"\nallowed_models = [\"*\"]",
    ));
    let s = subject("t", "u", None);
    let mut n = 0;
    let mut admit = |now: i64| {
        n += 1;
        let ok = l
            .reserve(&reserve_req(n, s.clone(), usd("0.0001")), now)
            .unwrap();
        if let Ok(r) = &ok {
            l.commit(
                &r.value.reservation.id,
                &commit_req(1000 + n, usd("0.0001")),
                now,
            )
            .unwrap();
        }
        ok.map(|_| ()).map_err(|d| d.denial.unwrap())
    };
    for _ in 0..6 {
        assert!(admit(T0).is_ok());
    }
    let Err(Denial::Limits(f)) = admit(T0) else {
        panic!()
    };
    assert_eq!((f[0].window, f[0].unit), (Window::Minute, Unit::Requests));
    // Emission interval 10 s: the next request fits exactly 10 s later, not before.
    assert_eq!(f[0].resets_at, Some(T0 + 10_000_000));
    assert!(admit(T0 + 9_999_999).is_err());
    assert!(admit(T0 + 10_000_000).is_ok());
    assert!(admit(T0 + 10_000_000).is_err());
}

#[test]
fn concurrency_and_daily_request_and_token_limits() {
    let l = Ledger::new(policy(
        "[tiers.free]\nrequests_per_minute = \"unlimited\"\nmax_concurrent = 2\nrequests_per_day = 3\ntokens_per_day = 1000\nallowed_models = [\"*\"]",
    ));
    let s = subject("t", "u", None);
    l.reserve(&reserve_req(1, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap();
    l.reserve(&reserve_req(2, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap();
    let d = l
        .reserve(&reserve_req(3, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap_err();
    let Some(Denial::Limits(f)) = d.denial else {
        panic!()
    };
    assert!(f.iter().any(|x| x.unit == Unit::Concurrent));
    l.commit(&id(1), &commit_req(11, usd("0.001")), T0).unwrap();
    l.release(&id(2), None, T0).unwrap();
    // One committed request and a released one: two more requests fit the day (3).
    l.reserve(&reserve_req(4, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap();
    l.commit(&id(4), &commit_req(14, usd("0.001")), T0).unwrap();
    let mut big = reserve_req(5, s.clone(), usd("0.001"));
    big.input_tokens = 800; // 800 + 100 + the 300 already used > 1000 tokens
    let d = l.reserve(&big, T0).unwrap().unwrap_err();
    let Some(Denial::Limits(f)) = d.denial else {
        panic!()
    };
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].unit, Unit::Tokens);
    l.reserve(&reserve_req(6, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap();
    let d = l
        .reserve(&reserve_req(7, s.clone(), usd("0.001")), T0)
        .unwrap()
        .unwrap_err();
    let Some(Denial::Limits(f)) = d.denial else {
        panic!()
    };
    assert_eq!((f[0].unit, f[0].window), (Unit::Requests, Window::Day));
}

#[test]
fn finished_windows_are_dropped_from_memory() {
    let l = ledger();
    for u in 0..50 {
        let r = reserve_req(u, subject("t", &format!("u{u}"), None), usd("0.01"));
        l.reserve(&r, T0).unwrap().unwrap();
        l.commit(&id(u), &commit_req(1000 + u, usd("0.01")), T0)
            .unwrap();
    }
    assert_eq!(l.scope_count(), 52); // 50 users, the tenant, global
    l.expire(T0 + DAY); // a new day, same month: month counters still needed
    assert_eq!(l.scope_count(), 52);
    l.expire(T0 + 31 * DAY); // April: everything finished
    assert_eq!(l.scope_count(), 0);
}

#[test]
fn restore_rebuilds_counters_and_open_reservations() {
    let a = ledger();
    let s = subject("t", "u", Some("c"));
    let mut events = Vec::new();
    let mut keyed = reserve_req(1, s.clone(), usd("0.3"));
    keyed.idempotency_key = Some(IdempotencyKey::parse("k").unwrap());
    events.extend(a.reserve(&keyed, T0).unwrap().unwrap().event);
    events.extend(
        a.reserve(&reserve_req(2, s.clone(), usd("0.2")), T0)
            .unwrap()
            .unwrap()
            .event,
    );
    events.extend(
        a.commit(&id(2), &commit_req(102, usd("0.15")), T0)
            .unwrap()
            .event,
    );
    a.set_budget(
        ScopeKey::Tenant(s.tenant.clone()),
        BudgetOverride {
            daily: Some(usd("7")),
            monthly: None,
        },
    );

    // What a store would keep: rollups of counted usage, open reservations, overrides.
    let mut snapshot = Snapshot::default();
    for e in events {
        match e {
            Event::Reserved(r) => snapshot.open.push(r),
            Event::Committed {
                reservation_id,
                usage,
            } => {
                snapshot.open.retain(|r| r.id != reservation_id);
                for scope in usage.scopes() {
                    for (window, start) in [
                        (Window::Day, usage.day_start),
                        (Window::Month, usage.month_start),
                    ] {
                        snapshot.counters.push(CounterRow {
                            scope: scope.clone(),
                            window,
                            start,
                            spent: usage.cost,
                            requests: 1,
                            tokens: usage.tokens.total(),
                            input_tokens: usage.tokens.input,
                            cached_input_tokens: usage.tokens.cached_input,
                            output_tokens: usage.tokens.output,
                        });
                    }
                }
            }
            other => panic!("{other:?}"),
        }
    }
    snapshot.budgets.push((
        ScopeKey::Tenant(s.tenant.clone()),
        a.budget_override(&ScopeKey::Tenant(s.tenant.clone()))
            .unwrap(),
    ));

    let b = ledger();
    b.restore(snapshot).unwrap();
    let limits = |l: &Ledger| {
        l.limits(&s.tenant, &s.user, s.company.as_ref(), None, T0 + 5)
            .unwrap()
    };
    assert_eq!(limits(&a), limits(&b));
    assert_eq!(b.open_reservations(), 1);
    // The restored reservation can be committed, and its idempotency key still replays.
    let mut retry = keyed.clone();
    retry.id = id(50);
    assert!(b.reserve(&retry, T0 + 6).unwrap().unwrap().value.replayed);
    b.commit(&id(1), &commit_req(101, usd("0.3")), T0 + 7)
        .unwrap();
    assert_eq!(amount_usd(user_day(&b, "t", "u", T0).used), usd("0.45"));
}

#[test]
fn scope_totals_and_budget_for_report_what_alerts_compare() {
    let l = Ledger::new(policy(&format!(
        "{CAPS}\n[tiers.pro]\nusd_per_day = \"20\"\nusd_per_month = \"200\"\n"
    )));
    let s = subject("t", "u", None);
    let user = ScopeKey::User(s.tenant.clone(), s.user.clone());
    let spent = |scope: &ScopeKey, now| {
        let ((day, _), (month, _)) = l.scope_totals(scope, now);
        (day, month)
    };
    assert_eq!(spent(&user, T0), (Money::ZERO, Money::ZERO));
    l.reserve(&reserve_req(1, s.clone(), usd("0.40")), T0)
        .unwrap()
        .unwrap();
    // Reserved is not spent.
    assert_eq!(spent(&user, T0), (Money::ZERO, Money::ZERO));
    assert_eq!(l.scope_totals(&user, T0).0, (Money::ZERO, usd("0.40")));
    l.commit(&id(1), &commit_req(101, usd("0.25")), T0 + 1)
        .unwrap();
    assert_eq!(spent(&user, T0 + 1), (usd("0.25"), usd("0.25")));
    assert_eq!(spent(&ScopeKey::Global, T0 + 1), (usd("0.25"), usd("0.25")));
    // The next day: the day's spend starts again, the month's stays.
    let next_day = T0 + 86_400_000_000;
    assert_eq!(spent(&user, next_day), (Money::ZERO, usd("0.25")));

    // A user's caps follow the tier the spend was made under, then overrides.
    let free = TierName::parse("free").unwrap();
    let pro = TierName::parse("pro").unwrap();
    assert_eq!(l.budget_for(&user, Some(&free)).daily, Some(usd("1")));
    assert_eq!(l.budget_for(&user, Some(&pro)).daily, Some(usd("20")));
    // No tier given: the default tier, or the user's stored tier.
    assert_eq!(l.budget_for(&user, None).monthly, Some(usd("5")));
    l.set_user(
        s.tenant.clone(),
        s.user.clone(),
        UserOverrides {
            tier: Some(pro.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(l.budget_for(&user, None).monthly, Some(usd("200")));
    assert_eq!(l.budget_for(&user, Some(&free)).monthly, Some(usd("5")));
    l.set_budget(
        user.clone(),
        BudgetOverride {
            daily: Some(usd("3")),
            monthly: None,
        },
    );
    let b = l.budget_for(&user, Some(&pro));
    assert_eq!((b.daily, b.monthly), (Some(usd("3")), Some(usd("200"))));
    assert_eq!(l.budget_for(&ScopeKey::Global, None).daily, Some(usd("10")));
}

#[test]
fn a_truncated_commit_without_a_cost_is_charged_at_least_its_estimate() {
    let l = ledger();
    l.reserve(&reserve_req(1, subject("t", "u", None), usd("0.40")), T0)
        .unwrap()
        .unwrap();
    let mut cut = commit_req(101, usd("0"));
    cut.cost = None;
    cut.status = RequestStatus::Truncated;
    cut.origin = Some(Origin {
        upstream: "openai".into(),
        request_id: Some("req_1".into()),
    });
    let c = l.commit(&id(1), &cut, T0 + 1).unwrap();
    // The listed price of 100 + 50 tokens is far below the estimate.
    assert_eq!(c.value.usage.cost, usd("0.40"));
    assert_eq!(c.value.usage.pricing, Pricing::Estimate);
    assert_eq!(c.value.usage.status, RequestStatus::Truncated);
    assert_eq!(c.value.usage.origin, cut.origin);
    assert_eq!(amount_usd(user_day(&l, "t", "u", T0).used), usd("0.40"));
    // A truncated commit that names its cost is charged that cost.
    l.reserve(&reserve_req(2, subject("t", "u", None), usd("0.40")), T0)
        .unwrap()
        .unwrap();
    let mut named = commit_req(102, usd("0.05"));
    named.status = RequestStatus::Truncated;
    assert_eq!(
        l.commit(&id(2), &named, T0 + 1).unwrap().value.usage.cost,
        usd("0.05")
    );
}
