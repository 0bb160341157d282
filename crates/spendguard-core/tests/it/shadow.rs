//! Shadow mode: limits that are decided and counted but never refuse, next to enforced ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spendguard_core::*;

use crate::support::*;

/// A tier whose daily user budget ($1) is in shadow; the global budget ($10) is enforced.
const SHADOW_DAY: &str = r#"
[global]
usd_per_day = "10"
usd_per_month = "100"
[tenant]
max_share_of_global = "unlimited"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
shadow = ["usd_per_day"]
"#;

fn user_day(limits: &[LimitStatus]) -> &LimitStatus {
    limits
        .iter()
        .find(|l| l.scope.kind() == ScopeKind::User && l.window == Window::Day)
        .expect("the user's daily budget is listed")
}

#[test]
fn a_limit_in_shadow_admits_what_it_would_deny_and_enforcing_it_denies_the_next() {
    let l = Ledger::new(policy(SHADOW_DAY));
    let s = subject("t", "u", None);
    // $0.60 fits the $1 day: no would-be denial.
    let first = l
        .reserve(&reserve_req(1, s.clone(), usd("0.60")), T0)
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(first.would_deny, None);
    assert!(user_day(&first.limits).shadow);
    // Another $0.60 would exceed it: admitted, the would-be denial names that limit only.
    let second = l
        .reserve(&reserve_req(2, s.clone(), usd("0.60")), T0)
        .unwrap()
        .expect("a limit in shadow never refuses")
        .value;
    let Some(Denial::Limits(failing)) = &second.would_deny else {
        panic!("a would-be denial, got {:?}", second.would_deny);
    };
    assert_eq!(failing.len(), 1);
    assert_eq!(
        failing[0].scope,
        ScopeKey::User(s.tenant.clone(), s.user.clone())
    );
    assert!(failing[0].shadow);
    assert_eq!(
        second.would_deny.as_ref().unwrap().code(),
        "budget_exceeded"
    );
    // The decision was applied to the counters: both estimates are held.
    let day = user_day(&second.limits);
    assert_eq!(amount_usd(day.reserved), usd("1.20"));
    let limits = l.limits(&s.tenant, &s.user, None, None, T0).unwrap();
    assert_eq!(amount_usd(user_day(&limits).reserved), usd("1.20"));
    assert!(user_day(&limits).shadow);
    // `check` says the same, and changes nothing.
    let checked = l
        .check(&reserve_req(3, s.clone(), usd("0.01")), T0)
        .unwrap();
    assert!(checked.allowed());
    assert_eq!(
        checked.would_deny.as_ref().map(Denial::code),
        Some("budget_exceeded")
    );

    // Enforce it (a configuration reload): the next reservation is refused by it.
    l.set_policy(policy(
        &SHADOW_DAY.replace("shadow = [\"usd_per_day\"]", ""),
    ));
    let outcome = l
        .reserve(&reserve_req(4, s.clone(), usd("0.01")), T0)
        .unwrap()
        .expect_err("the enforced limit refuses");
    let Some(Denial::Limits(failing)) = outcome.denial else {
        panic!("a limit denial");
    };
    assert_eq!(failing.len(), 1);
    assert!(!failing[0].shadow);
    assert_eq!(outcome.would_deny, None);
    // And back in shadow: admitted again.
    l.set_policy(policy(SHADOW_DAY));
    let again = l
        .reserve(&reserve_req(5, s, usd("0.01")), T0)
        .unwrap()
        .unwrap()
        .value;
    assert!(again.would_deny.is_some());
}

#[test]
fn an_enforced_limit_refuses_even_when_a_shadow_limit_would_too() {
    let l = Ledger::new(policy(SHADOW_DAY));
    let s = subject("t", "u", None);
    // $10 global (enforced) and $1 user day (shadow): $10.01 fails both.
    let outcome = l
        .reserve(&reserve_req(1, s.clone(), usd("10.01")), T0)
        .unwrap()
        .expect_err("the enforced global budget refuses");
    let Some(Denial::Limits(failing)) = &outcome.denial else {
        panic!("a limit denial");
    };
    // Only the enforced limit is the reason; no would-be denial is reported for it.
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0].scope, ScopeKey::Global);
    assert_eq!(outcome.would_deny, None);
    // Nothing was applied.
    assert_eq!(l.open_reservations(), 0);
    let limits = l.limits(&s.tenant, &s.user, None, None, T0).unwrap();
    assert_eq!(amount_usd(user_day(&limits).reserved), Money::ZERO);
}

#[test]
fn a_whole_tier_tenant_or_the_service_in_shadow() {
    let base = r#"
[global]
usd_per_day = "1"
[tenant]
max_share_of_global = "unlimited"
[tiers.free]
requests_per_minute = 1
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "0.5"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
max_output_tokens = 100
allowed_models = ["gpt-4o"]
"#;
    let s = subject("acme", "u", None);
    let mut other_model = reserve_req(9, s.clone(), usd("0.01"));
    other_model.subject.model = ModelName::parse("claude-sonnet-4-5").unwrap();
    other_model.max_output_tokens = Some(1000);
    // A tier in shadow: its user limits and its model and output rules observe only; the
    // global budget is still enforced.
    for extra in ["shadow = true\n", "[tenants.acme]\nshadow = true\n"] {
        let l = Ledger::new(policy(&format!("{base}{extra}")));
        let r = l.reserve(&other_model, T0).unwrap().unwrap().value;
        assert_eq!(
            r.would_deny.as_ref().map(Denial::code),
            Some("model_not_allowed"),
            "{extra}"
        );
        // Over the rate and the user's day, under the global day: admitted.
        let r = l
            .reserve(&reserve_req(2, s.clone(), usd("0.6")), T0)
            .unwrap()
            .unwrap()
            .value;
        let Some(Denial::Limits(failing)) = &r.would_deny else {
            panic!("a would-be denial ({extra})");
        };
        assert_eq!(failing.len(), 2, "{extra}: {failing:?}");
        assert!(failing.iter().all(|f| f.shadow));
        // Over the global day: refused.
        let refused = l
            .reserve(&reserve_req(3, s.clone(), usd("0.5")), T0)
            .unwrap()
            .expect_err("the global budget is enforced");
        assert!(
            matches!(&refused.denial, Some(Denial::Limits(f)) if f[0].scope == ScopeKey::Global)
        );
        // Another tenant is not in shadow under `[tenants.acme]`.
        let other = l.reserve(&reserve_req(4, subject("beta", "u", None), usd("0.6")), T0);
        if extra.contains("tenants") {
            assert!(other.unwrap().is_err(), "tenant beta's users are enforced");
        }
    }
    // The whole service: the global budget too.
    let l = Ledger::new(policy(&format!("shadow = true\n{base}")));
    let r = l
        .reserve(&reserve_req(2, s.clone(), usd("5")), T0)
        .unwrap()
        .unwrap()
        .value;
    assert!(r.would_deny.is_some());
    assert!(r.limits.iter().all(|l| l.shadow));
}

#[test]
fn shadow_keys_are_checked_and_errors_name_them() {
    let err = |text: &str| {
        Config::from_toml(text)
            .and_then(|c| c.validate())
            .unwrap_err()
            .to_string()
    };
    assert!(
        err("[tiers.free]\nshadow = [\"usd_per_week\"]\n")
            .starts_with("tiers.free.shadow[0]: `usd_per_week` is not a limit of this section"),
    );
    assert!(
        err("[global]\nshadow = [\"requests_per_minute\"]\n")
            .starts_with("global.shadow[0]: `requests_per_minute` is not a limit"),
    );
    assert!(err("shadow = \"yes\"\n").starts_with("shadow: "));
    assert!(err("[tenants.acme]\nshadow = 1\n").starts_with("tenants.acme.shadow"));
    // The default: nothing in shadow.
    let l = Ledger::new(Policy::builtin());
    let s = subject("t", "u", None);
    assert!(
        l.limits(&s.tenant, &s.user, None, None, T0)
            .unwrap()
            .iter()
            .all(|l| !l.shadow)
    );
}

/// Eight threads, a global budget (enforced) that admits 1% of the calls, and a user
/// budget in shadow that every call exceeds: exactly the calls the global budget fits are
/// admitted, each with one would-be denial; every refusal is the global budget's, and none
/// is counted as admitted or as a would-be denial.
#[test]
fn shadow_limits_never_weaken_enforced_ones_under_concurrency() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 5_000;
    let ledger = Arc::new(Ledger::new(policy(
        r#"
[global]
usd_per_day = "4"
[tenant]
max_share_of_global = "unlimited"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "0.001"
usd_per_month = "unlimited"
max_concurrent = "unlimited"
allowed_models = ["*"]
shadow = ["usd_per_day"]
"#,
    )));
    let admitted = Arc::new(AtomicU64::new(0));
    let would_deny = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ledger, admitted, would_deny) =
                (ledger.clone(), admitted.clone(), would_deny.clone());
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let n = t * PER_THREAD + i + 1;
                    let s = subject(&format!("t{}", n % 5), &format!("u{}", n % 97), None);
                    match ledger.reserve(&reserve_req(n, s, usd("0.01")), T0).unwrap() {
                        Ok(r) => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            let d = r
                                .value
                                .would_deny
                                .expect("every call exceeds the shadow budget");
                            assert_eq!(d.code(), "budget_exceeded");
                            would_deny.fetch_add(1, Ordering::Relaxed);
                            let id = r.value.reservation.id;
                            ledger.commit(&id, &commit_req(n, usd("0.01")), T0).unwrap();
                        }
                        Err(outcome) => {
                            let Some(Denial::Limits(failing)) = outcome.denial else {
                                panic!("a limit denial");
                            };
                            assert!(
                                failing
                                    .iter()
                                    .all(|f| f.scope == ScopeKey::Global && !f.shadow)
                            );
                            assert_eq!(outcome.would_deny, None);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 400);
    assert_eq!(would_deny.load(Ordering::Relaxed), 400);
    let ((spent, reserved), _) = ledger.scope_totals(&ScopeKey::Global, T0);
    assert_eq!(spent, usd("4"));
    assert_eq!(reserved, Money::ZERO);
}

#[test]
fn reservation_events_written_before_shadow_mode_still_decode() {
    let l = Ledger::new(policy(SHADOW_DAY));
    let s = subject("t", "u", None);
    l.reserve(&reserve_req(1, s.clone(), usd("0.6")), T0)
        .unwrap()
        .unwrap();
    let applied = l
        .reserve(&reserve_req(2, s, usd("0.6")), T0)
        .unwrap()
        .unwrap();
    let Some(Event::Reserved(r)) = applied.event else {
        panic!("a reservation event");
    };
    assert_eq!(r.would_deny.as_deref(), Some("budget_exceeded"));
    let mut json = serde_json::to_value(Event::Reserved(r.clone())).unwrap();
    // As stored before reservations carried a would-be denial: no such field.
    json["Reserved"]
        .as_object_mut()
        .unwrap()
        .remove("would_deny");
    let old: Event = serde_json::from_value(json).unwrap();
    let Event::Reserved(old) = old else {
        panic!("a reservation event");
    };
    assert_eq!(old.would_deny, None);
    assert_eq!(
        Reservation {
            would_deny: r.would_deny.clone(),
            ..old
        },
        r
    );
}

#[test]
fn soft_budgets_are_found_for_every_scope_and_never_refuse() {
    let l = Ledger::new(policy(
        r#"
[global]
soft_usd_per_day = "900"
[tenant]
max_share_of_global = "unlimited"
soft_usd_per_day = "1"
[tenants.acme]
soft_usd_per_month = "30"
[company]
soft_usd_per_month = "7"
[tiers.free]
requests_per_minute = "unlimited"
usd_per_day = "unlimited"
usd_per_month = "unlimited"
allowed_models = ["*"]
soft_usd_per_day = "0.01"
"#,
    ));
    let t = |s: &str| TenantId::parse(s).unwrap();
    let soft = |scope: ScopeKey| l.soft_budget_for(&scope, None);
    assert_eq!(soft(ScopeKey::Global).daily, Some(usd("900")));
    // A tenant with a section of its own: its keys, else `[tenant]`'s.
    let acme = soft(ScopeKey::Tenant(t("acme")));
    assert_eq!(
        (acme.daily, acme.monthly),
        (Some(usd("1")), Some(usd("30")))
    );
    let beta = soft(ScopeKey::Tenant(t("beta")));
    assert_eq!((beta.daily, beta.monthly), (Some(usd("1")), None));
    let company = soft(ScopeKey::Company(t("acme"), CompanyId::parse("c").unwrap()));
    assert_eq!(company.monthly, Some(usd("7")));
    let user = soft(ScopeKey::User(t("acme"), UserId::parse("u").unwrap()));
    assert_eq!(user.daily, Some(usd("0.01")));
    // Far past every soft budget: admitted, with no would-be denial.
    let r = l
        .reserve(
            &reserve_req(1, subject("acme", "u", Some("c")), usd("50")),
            T0,
        )
        .unwrap()
        .expect("soft budgets never refuse")
        .value;
    assert_eq!(r.would_deny, None);
}
