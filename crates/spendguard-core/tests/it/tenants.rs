//! Tenants cannot hurt each other: each holds at most its share of the global budgets, and
//! keeps at most its cap of users and companies in memory, exactly, under contention.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spendguard_core::*;

use crate::support::*;

const OPEN_FREE_TIER: &str = r#"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

/// Day spent plus reserved of a scope.
fn day_total(ledger: &Ledger, scope: &ScopeKey, now: i64) -> Money {
    let ((spent, reserved), _) = ledger.scope_totals(scope, now);
    spent.checked_add(reserved).unwrap()
}

#[test]
fn each_tenant_holds_exactly_its_share_of_the_global_budget_under_contention() {
    // $8 a day globally, a quarter each: $2 per tenant, 200 calls of $0.01.
    let ledger = Arc::new(Ledger::new(policy(&format!(
        "[global]\nusd_per_day = \"8\"\n[tenant]\nmax_share_of_global = 0.25\n{OPEN_FREE_TIER}"
    ))));
    let admitted: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (ledger, admitted) = (ledger.clone(), admitted.clone());
            std::thread::spawn(move || {
                for i in 0..2_000u64 {
                    let n = t * 2_000 + i + 1;
                    let which = (n % 3) as usize;
                    let s = subject(&format!("t{which}"), &format!("u{}", n % 37), None);
                    if let Ok(r) = ledger.reserve(&reserve_req(n, s, usd("0.01")), T0).unwrap() {
                        admitted[which].fetch_add(1, Ordering::Relaxed);
                        // Half are committed, half stay reserved.
                        if n % 2 == 0 {
                            let id = r.value.reservation.id;
                            ledger.commit(&id, &commit_req(n, usd("0.01")), T0).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (which, n) in admitted.iter().enumerate() {
        assert_eq!(n.load(Ordering::Relaxed), 200, "tenant t{which}");
        let scope = ScopeKey::Tenant(tenant(&format!("t{which}")));
        assert_eq!(day_total(&ledger, &scope, T0), usd("2"));
        assert_eq!(ledger.budget_of(&scope).daily, Some(usd("2")));
    }
    assert_eq!(day_total(&ledger, &ScopeKey::Global, T0), usd("6"));
}

#[test]
fn an_admin_override_of_a_tenant_replaces_its_share_for_the_window_it_sets() {
    let ledger = Ledger::new(policy(&format!(
        "[global]\nusd_per_day = \"8\"\nusd_per_month = \"100\"\n[tenant]\nusd_per_month = \"10\"\nmax_share_of_global = 0.25\n{OPEN_FREE_TIER}"
    )));
    let scope = ScopeKey::Tenant(tenant("t0"));
    // Share of the day ($2); the smaller of the configured cap and the share for the month.
    assert_eq!(
        ledger.budget_of(&scope),
        Budget {
            daily: Some(usd("2")),
            monthly: Some(usd("10"))
        }
    );
    ledger.set_budget(
        scope.clone(),
        BudgetOverride {
            daily: Some(usd("5")),
            monthly: None,
        },
    );
    assert_eq!(ledger.budget_of(&scope).daily, Some(usd("5")));
    let s = subject("t0", "u1", None);
    assert!(
        ledger
            .reserve(&reserve_req(1, s.clone(), usd("4.5")), T0)
            .unwrap()
            .is_ok()
    );
    assert!(
        ledger
            .reserve(&reserve_req(2, s, usd("0.6")), T0)
            .unwrap()
            .is_err()
    );
}

#[test]
fn new_subjects_are_capped_exactly_under_contention() {
    const CAP: u32 = 50;
    let ledger = Arc::new(Ledger::new(policy(&format!(
        "[tenant]\nmax_tracked_subjects = {CAP}\n{OPEN_FREE_TIER}"
    ))));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (ledger, admitted, refused) = (ledger.clone(), admitted.clone(), refused.clone());
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let n = t * 500 + i + 1;
                    // Every call is a new user of t0; every tenth a direct record instead.
                    let s = subject("t0", &format!("u{n}"), None);
                    if n % 10 == 0 {
                        let rec = RecordRequest {
                            id: id(1_000_000 + n),
                            subject: s,
                            tokens: Tokens::default(),
                            cost: Some(usd("0.01")),
                            status: RequestStatus::Success,
                            idempotency_key: None,
                        };
                        ledger.record(&rec, T0).unwrap();
                        continue;
                    }
                    match ledger.reserve(&reserve_req(n, s, usd("0.01")), T0).unwrap() {
                        Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(o) => {
                            assert!(
                                matches!(
                                    o.denial,
                                    Some(Denial::TooManySubjects { limit: CAP, .. })
                                ),
                                "{o:?}"
                            );
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let t0 = tenant("t0");
    let users = ledger
        .totals(ScopeKind::User, T0)
        .into_iter()
        .filter(|(k, _, _)| k.tenant() == Some(&t0))
        .count();
    assert_eq!(users, CAP as usize);
    assert_eq!(ledger.tracked_subjects(&t0), CAP);
    assert!(admitted.load(Ordering::Relaxed) <= CAP as u64);
    assert!(refused.load(Ordering::Relaxed) > 0);
    // Every record was counted, against the tenant at least: 300 of $0.01, plus the
    // reservations' $0.01 each.
    let expected = Money::from_micros(10_000 * (300 + admitted.load(Ordering::Relaxed) as i64));
    assert_eq!(day_total(&ledger, &ScopeKey::Tenant(t0), T0), expected);
    // Another tenant is not affected.
    let s = subject("t1", "u1", Some("c1"));
    assert!(
        ledger
            .reserve(&reserve_req(9_999_999, s, usd("0.01")), T0)
            .unwrap()
            .is_ok()
    );
    assert_eq!(ledger.tracked_subjects(&tenant("t1")), 2);
}

#[test]
fn subjects_are_freed_when_their_month_ends_and_counted_on_restore() {
    let ledger = Ledger::new(policy(&format!(
        "[tenant]\nmax_tracked_subjects = 2\n{OPEN_FREE_TIER}"
    )));
    let t0 = tenant("t0");
    let s1 = subject("t0", "u1", Some("c1"));
    let r = ledger
        .reserve(&reserve_req(1, s1.clone(), usd("1")), T0)
        .unwrap()
        .unwrap();
    ledger
        .commit(&r.value.reservation.id, &commit_req(1, usd("1")), T0)
        .unwrap();
    assert_eq!(ledger.tracked_subjects(&t0), 2);
    let s2 = subject("t0", "u2", None);
    let refused = ledger
        .check(&reserve_req(2, s2.clone(), usd("1")), T0)
        .unwrap();
    assert!(
        matches!(refused.denial, Some(Denial::TooManySubjects { .. })),
        "{refused:?}"
    );
    // A direct record of a new user counts against the global and tenant scopes only.
    let rec = RecordRequest {
        id: id(3),
        subject: s2.clone(),
        tokens: Tokens::default(),
        cost: Some(usd("2")),
        status: RequestStatus::Success,
        idempotency_key: None,
    };
    let usage = ledger.record(&rec, T0).unwrap().value;
    assert_eq!(usage.cost, usd("2"));
    assert_eq!(
        day_total(&ledger, &ScopeKey::Tenant(t0.clone()), T0),
        usd("3")
    );
    assert_eq!(
        day_total(&ledger, &ScopeKey::User(t0.clone(), s2.user.clone()), T0),
        Money::ZERO
    );
    assert_eq!(ledger.tracked_subjects(&t0), 2);
    // The next month, the sweep frees them all.
    let next_month = T0 + 40 * DAY;
    ledger.expire(next_month);
    assert_eq!(ledger.tracked_subjects(&t0), 0);
    assert!(
        ledger
            .reserve(&reserve_req(4, s2.clone(), usd("1")), next_month)
            .unwrap()
            .is_ok()
    );
    assert_eq!(ledger.tracked_subjects(&t0), 1);

    // Restored counters are counted, even above the cap: persisted spend is never dropped.
    let restored = Ledger::new(policy(&format!(
        "[tenant]\nmax_tracked_subjects = 1\n{OPEN_FREE_TIER}"
    )));
    let row = |scope: ScopeKey| CounterRow {
        scope,
        window: Window::Day,
        start: T0,
        spent: usd("1"),
        requests: 1,
        tokens: 0,
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
    };
    restored
        .restore(Snapshot {
            counters: vec![
                row(ScopeKey::Tenant(t0.clone())),
                row(ScopeKey::Company(t0.clone(), s1.company.clone().unwrap())),
                row(ScopeKey::User(t0.clone(), s1.user.clone())),
            ],
            ..Snapshot::default()
        })
        .unwrap();
    assert_eq!(restored.tracked_subjects(&t0), 2);
    let refused = restored.check(&reserve_req(5, s2, usd("1")), T0).unwrap();
    assert!(
        matches!(refused.denial, Some(Denial::TooManySubjects { .. })),
        "{refused:?}"
    );
}

#[test]
fn a_tenant_named_tier_applies_only_when_allowed_and_nothing_is_stored() {
    let ledger = Ledger::new(policy("[tenant]\nallowed_tiers = [\"free\", \"pro\"]\n"));
    let tier = |t: &str| TierName::parse(t).unwrap();
    let ask = |user: &str, t: &str, trusted: bool| Subject {
        tier: Some(tier(t)),
        trusted_tier: trusted,
        model: ModelName::parse("gpt-4o-mini").unwrap(),
        ..subject("t0", user, None)
    };
    let admitted = |n: u64, s: Subject| {
        ledger
            .reserve(&reserve_req(n, s, usd("0.01")), T0)
            .unwrap()
            .unwrap()
            .value
            .reservation
            .tier
    };
    assert_eq!(admitted(1, ask("u1", "enterprise", false)), tier("free"));
    assert_eq!(admitted(2, ask("u1", "pro", false)), tier("pro"));
    assert_eq!(
        admitted(3, ask("u1", "enterprise", true)),
        tier("enterprise")
    );
    ledger
        .set_user(
            tenant("t0"),
            UserId::parse("u2").unwrap(),
            UserOverrides {
                tier: Some(tier("free")),
                ..UserOverrides::default()
            },
        )
        .unwrap();
    assert_eq!(admitted(4, ask("u2", "pro", false)), tier("free"));
    assert_eq!(admitted(5, ask("u2", "pro", true)), tier("pro"));
    // An unknown tier is an error whoever names it.
    assert_eq!(
        ledger
            .reserve(&reserve_req(6, ask("u3", "gold", false), usd("0.01")), T0)
            .unwrap_err(),
        LedgerError::UnknownTier(tier("gold"))
    );
}

/// The ceiling on one record bounds direct records; a commit may always charge its own
/// reservation's estimate (a large reservation is committed in full, never refused and left
/// to expire at $0), and exceed it by at most the ceiling.
#[test]
fn a_large_reservation_commits_in_full_and_overshoots_by_at_most_the_ceiling() {
    let l = Ledger::new(policy(&format!(
        "[global]\nusd_per_day = \"100000\"\nusd_per_month = \"100000\"\n\
         [tenant]\nmax_share_of_global = \"unlimited\"\n{OPEN_FREE_TIER}"
    )));
    let mut req = reserve_req(1, subject("t", "u", None), usd("300"));
    req.ttl_us = Some(60_000_000);
    let r = l.reserve(&req, T0).unwrap().unwrap();
    // Above the $100 ceiling of a direct record, within the estimate: charged in full.
    let c = l
        .commit(&r.value.reservation.id, &commit_req(2, usd("300")), T0)
        .unwrap();
    assert_eq!(c.value.usage.cost, usd("300"));
    // Past the estimate by more than the ceiling: refused, the reservation stays open.
    let mut req = reserve_req(3, subject("t", "u", None), usd("300"));
    req.ttl_us = Some(60_000_000);
    let big = l.reserve(&req, T0).unwrap().unwrap().value.reservation.id;
    assert!(matches!(
        l.commit(&big, &commit_req(4, usd("400.01")), T0),
        Err(LedgerError::RecordCostTooLarge { .. })
    ));
    assert!(l.reservation(&big).is_some());
    let c = l.commit(&big, &commit_req(5, usd("400")), T0).unwrap();
    assert_eq!(c.value.usage.cost, usd("400"));
    // A direct record above the ceiling is refused.
    let rec = RecordRequest {
        id: id(6),
        subject: subject("t", "u", None),
        tokens: Tokens::default(),
        cost: Some(usd("100.01")),
        status: RequestStatus::Success,
        idempotency_key: None,
    };
    assert!(matches!(
        l.record(&rec, T0),
        Err(LedgerError::RecordCostTooLarge { .. })
    ));
}
