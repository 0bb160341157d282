//! Cluster mode's use of the ledger: counters kept outside it (a database's rows, here a
//! map), put into an instance's ledger before each operation and read back after it.
//! Several ledgers sharing counters that way must decide exactly as one ledger does.

use std::collections::BTreeMap;

use spendguard_core::*;
use uuid::Uuid;

use crate::support::*;

const CAPS: &str = r#"
[global]
usd_per_day = "3"
[tenant]
usd_per_day = "2"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1"
max_concurrent = 3
max_output_tokens = 1000
allowed_models = ["gpt-4o*"]
"#;

/// The shared rows: what a database keeps in cluster mode.
#[derive(Default)]
struct Rows {
    counters: BTreeMap<ScopeKey, ScopeCounters>,
    open: BTreeMap<Uuid, Reservation>,
}

impl Rows {
    /// Runs `op` on `l` as a cluster instance does in one transaction: the counters of
    /// `keys` put in first, the reservation `id` (if the rows hold it open) adopted, and
    /// the counters read back after.
    fn run<T>(
        &mut self,
        l: &Ledger,
        keys: &[ScopeKey],
        id: Option<Uuid>,
        op: impl FnOnce(&Ledger) -> T,
    ) -> T {
        for k in keys {
            l.put_scope_counters(k, self.counters.get(k).copied().unwrap_or_default());
        }
        if let Some(id) = id {
            match self.open.get(&id) {
                Some(r) => l.adopt_open(r.clone()),
                None => l.forget_reservation(&id),
            }
        }
        let out = op(l);
        for k in keys {
            self.counters.insert(k.clone(), l.scope_counters(k));
        }
        out
    }
}

/// A fixed pseudo-random sequence (no dependency, same on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn three_ledgers_sharing_counters_decide_exactly_as_one() {
    let instances: Vec<Ledger> = (0..3).map(|_| Ledger::new(policy(CAPS))).collect();
    let one = Ledger::new(policy(CAPS));
    let mut rows = Rows::default();
    let mut rng = Lcg(7);
    let mut made: Vec<(Uuid, Subject)> = Vec::new();
    let (mut admitted, mut denied, mut settled) = (0, 0, 0);
    for step in 0..3_000u64 {
        let now = T0 + step as i64 * (DAY / 400);
        let l = &instances[rng.next(3) as usize];
        if made.is_empty() || rng.next(2) == 0 {
            let s = subject(
                &format!("t{}", rng.next(3)),
                &format!("u{}", rng.next(5)),
                None,
            );
            let cents = 5 + rng.next(40);
            let req = reserve_req(step, s.clone(), usd(&format!("0.{cents:02}")));
            let keys = scope_keys(&s);
            let got = rows.run(l, &keys, None, |l| l.reserve(&req, now).unwrap());
            let want = one.reserve(&req, now).unwrap();
            assert_eq!(
                got.is_ok(),
                want.is_ok(),
                "step {step}: the decisions differ"
            );
            if let Ok(a) = got {
                let Some(Event::Reserved(r)) = a.event else {
                    panic!("an admission makes a reservation")
                };
                rows.open.insert(r.id, r);
                made.push((req.id, s));
                admitted += 1;
            } else {
                denied += 1;
            }
        } else {
            let (id, s) = made.swap_remove(rng.next(made.len() as u64) as usize);
            let keys = scope_keys(&s);
            if rng.next(3) == 0 {
                rows.run(l, &keys, Some(id), |l| l.release(&id, None, now).unwrap());
                one.release(&id, None, now).unwrap();
            } else {
                let c = commit_req(1_000_000 + step, usd(&format!("0.0{}", rng.next(10))));
                rows.run(l, &keys, Some(id), |l| l.commit(&id, &c, now).unwrap());
                one.commit(&id, &c, now).unwrap();
            }
            rows.open.remove(&id);
            for other in &instances {
                other.forget_reservation(&id);
            }
            settled += 1;
        }
    }
    // Every shared row equals what the one ledger holds.
    for (k, c) in &rows.counters {
        assert_eq!(*c, one.scope_counters(k), "{k:?}");
    }
    assert!(
        admitted > 100 && denied > 100 && settled > 100,
        "{admitted} {denied} {settled}"
    );
}

#[test]
fn an_expiry_on_another_instance_frees_the_estimate_once() {
    let (a, b) = (Ledger::new(policy(CAPS)), Ledger::new(policy(CAPS)));
    let mut rows = Rows::default();
    let s = subject("t", "u", None);
    let keys = scope_keys(&s);
    let req = reserve_req(1, s, usd("0.5"));
    let r = rows.run(&a, &keys, None, |l| l.reserve(&req, T0).unwrap().unwrap());
    let Some(Event::Reserved(res)) = r.event else {
        panic!()
    };
    rows.open.insert(res.id, res.clone());
    // Not due yet: nothing happens.
    assert!(
        rows.run(&b, &keys, Some(res.id), |l| l.expire_one(&res.id, T0))
            .is_none()
    );
    let late = res.expires_at;
    let ev = rows.run(&b, &keys, Some(res.id), |l| l.expire_one(&res.id, late));
    assert!(matches!(ev, Some(Event::Expired { .. })));
    let user = &rows.counters[&keys[2]];
    assert_eq!((user.day.reserved, user.in_flight), (Money::ZERO, 0));
    // A second expiry of the same reservation (another instance racing) finds it settled.
    rows.open.remove(&res.id);
    assert!(
        rows.run(&a, &keys, Some(res.id), |l| l.expire_one(&res.id, late))
            .is_none()
    );
}

/// The rows and allowances a database keeps for cluster mode's busy scopes (global and
/// tenants here): per scope its row, and per instance its allowance.
#[derive(Default)]
struct Allowances {
    rows: BTreeMap<ScopeKey, Held>,
    held: BTreeMap<(usize, ScopeKey), Held>,
}

impl Allowances {
    /// The scope's counters as the cluster holds them: its row plus its allowances.
    fn total(&self, k: &ScopeKey, day: Micros, month: Micros) -> ScopeCounters {
        let mut row = self.rows.get(k).copied().unwrap_or_default().at(day, month);
        for ((_, key), a) in &self.held {
            if key == k {
                let mut a = a.at(day, month);
                fold(&mut row, &mut a);
            }
        }
        row.counters
    }

    /// What the allowances of `k` other than instance `i`'s counted beyond their grants.
    fn debts_of_others(&self, i: usize, k: &ScopeKey, day: Micros, month: Micros) -> [Money; 2] {
        debts(
            self.held
                .iter()
                .filter(|((n, key), _)| *n != i && key == k)
                .map(|(_, h)| h),
            day,
            month,
        )
    }

    /// Folds instance `i`'s allowances into the rows (a heartbeat, a shutdown, or another
    /// instance taking them back); with `again`, grants each a part of what its row has free.
    fn fold_instance(&mut self, i: usize, l: &Ledger, day: Micros, month: Micros, again: bool) {
        let keys: Vec<ScopeKey> = self
            .held
            .keys()
            .filter(|(n, _)| *n == i)
            .map(|(_, k)| k.clone())
            .collect();
        for k in keys {
            let mut a = self.held[&(i, k.clone())].at(day, month);
            let mut row = self
                .rows
                .get(&k)
                .copied()
                .unwrap_or_default()
                .at(day, month);
            fold(&mut row, &mut a);
            if again {
                let caps = l.allowance_caps(&k).unwrap();
                let free = row.row_free(caps);
                let part =
                    free.map(|f| f.map_or(Money::ZERO, |f| Money::from_micros(f.micros() / 4)));
                let debt = self.debts_of_others(i, &k, day, month);
                grant(&mut row, &mut a, caps, part, debt);
            }
            self.rows.insert(k.clone(), row);
            self.held.insert((i, k), a);
        }
    }
}

/// Runs `op` on instance `i`'s ledger as a cluster batch does: users on their rows, busy
/// scopes on the allowance's view (topped up first with `need` from the row), and what the
/// ledger counted read back into the rows and the allowance.
#[allow(clippy::too_many_arguments)]
fn run_with_allowances<T>(
    direct: &mut Rows,
    shared: &mut Allowances,
    i: usize,
    l: &Ledger,
    keys: &[ScopeKey],
    id: Option<Uuid>,
    need: Money,
    (day, month): (Micros, Micros),
    op: impl FnOnce(&Ledger) -> T,
) -> T {
    let mut views = Vec::new();
    for k in keys {
        match l.allowance_caps(k) {
            Some(caps) if !matches!(k, ScopeKey::User(..)) => {
                let mut a = shared
                    .held
                    .get(&(i, k.clone()))
                    .copied()
                    .unwrap_or_default()
                    .at(day, month);
                let free = a.allowance_free(caps);
                if free.iter().flatten().any(|f| *f < need) {
                    let mut row = shared
                        .rows
                        .get(k)
                        .copied()
                        .unwrap_or_default()
                        .at(day, month);
                    let short = free.map(|f| f.map_or(Money::ZERO, |f| need.saturating_sub(f)));
                    let debt = shared.debts_of_others(i, k, day, month);
                    grant(&mut row, &mut a, caps, short, debt);
                    shared.rows.insert(k.clone(), row);
                }
                let v = allowance_view(&a, caps);
                l.put_scope_counters(k, v);
                views.push((k.clone(), a, v));
            }
            _ => l.put_scope_counters(k, direct.counters.get(k).copied().unwrap_or_default()),
        }
    }
    if let Some(id) = id {
        match direct.open.get(&id) {
            Some(r) => l.adopt_open(r.clone()),
            None => l.forget_reservation(&id),
        }
    }
    let out = op(l);
    for k in keys {
        match views.iter().find(|(v, _, _)| v == k) {
            Some((_, a, v)) => {
                let after = allowance_after(a, v, &l.scope_counters(k));
                shared.held.insert((i, k.clone()), after);
            }
            None => {
                direct.counters.insert(k.clone(), l.scope_counters(k));
            }
        }
    }
    out
}

/// Three instances deciding the busy scopes through allowances (topped up, folded and
/// taken back at random): every admission is one a single ledger holding everything admits
/// too (never beyond a cap), and each scope's row plus its allowances equals what that
/// ledger counts, after every step. (Commits stay under their estimates here: a commit
/// above one is the next test's.)
#[test]
fn three_ledgers_with_allowances_never_admit_beyond_a_cap_and_count_exactly() {
    let instances: Vec<Ledger> = (0..3).map(|_| Ledger::new(policy(CAPS))).collect();
    let one = Ledger::new(policy(CAPS));
    let (mut direct, mut shared) = (Rows::default(), Allowances::default());
    let mut rng = Lcg(11);
    let mut made: Vec<(Uuid, Subject)> = Vec::new();
    let (mut admitted, mut denied, mut false_denials, mut settled, mut folds) = (0, 0, 0, 0, 0);
    for step in 0..4_000u64 {
        let now = T0 + step as i64 * (DAY / 500);
        let p = one.policy().calendar.periods(now);
        let windows = (p.day.start, p.month.start);
        let i = rng.next(3) as usize;
        let l = &instances[i];
        match rng.next(10) {
            // A heartbeat (folds and takes a part again) or another instance taking a
            // lapsed instance's allowances back (folds, takes nothing).
            0 => {
                shared.fold_instance(i, l, windows.0, windows.1, rng.next(2) == 0);
                folds += 1;
            }
            n if made.is_empty() || n < 6 => {
                let s = subject(
                    &format!("t{}", rng.next(3)),
                    &format!("u{}", rng.next(5)),
                    None,
                );
                let cents = 5 + rng.next(40);
                let estimate = usd(&format!("0.{cents:02}"));
                let req = reserve_req(step, s.clone(), estimate);
                let keys = scope_keys(&s);
                let got = run_with_allowances(
                    &mut direct,
                    &mut shared,
                    i,
                    l,
                    &keys,
                    None,
                    estimate,
                    windows,
                    |l| l.reserve(&req, now).unwrap(),
                );
                if let Ok(a) = got {
                    let want = one.reserve(&req, now).unwrap();
                    assert!(
                        want.is_ok(),
                        "step {step}: admitted beyond what one ledger admits: {:?}",
                        want.err()
                    );
                    let Some(Event::Reserved(r)) = a.event else {
                        panic!("an admission makes a reservation")
                    };
                    direct.open.insert(r.id, r);
                    made.push((req.id, s));
                    admitted += 1;
                } else {
                    denied += 1;
                    if one.check(&req, now).unwrap().denial.is_none() {
                        false_denials += 1;
                    }
                }
            }
            _ => {
                let (id, s) = made.swap_remove(rng.next(made.len() as u64) as usize);
                let keys = scope_keys(&s);
                let run = |direct: &mut Rows, shared: &mut Allowances, op: &dyn Fn(&Ledger)| {
                    run_with_allowances(
                        direct,
                        shared,
                        i,
                        l,
                        &keys,
                        Some(id),
                        Money::ZERO,
                        windows,
                        op,
                    )
                };
                if rng.next(3) == 0 {
                    run(&mut direct, &mut shared, &|l| {
                        l.release(&id, None, now).unwrap();
                    });
                    one.release(&id, None, now).unwrap();
                } else {
                    let c = commit_req(1_000_000 + step, usd(&format!("0.0{}", rng.next(5))));
                    run(&mut direct, &mut shared, &|l| {
                        l.commit(&id, &c, now).unwrap();
                    });
                    one.commit(&id, &c, now).unwrap();
                }
                direct.open.remove(&id);
                for other in &instances {
                    other.forget_reservation(&id);
                }
                settled += 1;
            }
        }
        // The busy scopes: row plus allowances is exactly what the one ledger counts.
        let mut busy: Vec<ScopeKey> = shared.rows.keys().cloned().collect();
        busy.extend(shared.held.keys().map(|(_, k)| k.clone()));
        busy.sort();
        busy.dedup();
        for k in &busy {
            let want = Held {
                counters: one.scope_counters(k),
                granted: [Money::ZERO; 2],
            }
            .at(windows.0, windows.1)
            .counters;
            assert_eq!(
                shared.total(k, windows.0, windows.1),
                want,
                "step {step}: {k:?}"
            );
        }
    }
    for (k, c) in &direct.counters {
        assert_eq!(*c, one.scope_counters(k), "{k:?}");
    }
    assert!(
        admitted > 300 && denied > 100 && settled > 300 && folds > 100,
        "{admitted} {denied} {settled} {folds}"
    );
    // Capacity idle in the other instances' allowances is refused: the documented bound.
    assert!(
        false_denials > 0 && false_denials < denied,
        "{false_denials} of {denied}"
    );
}

/// A commit above its estimate, settled through one instance's allowance, is a debt of
/// that allowance until it is folded: the row never grants that capacity to another
/// instance meanwhile, so the scope holds at most its cap plus the overage (as one
/// ledger does).
#[test]
fn a_commit_above_its_estimate_through_an_allowance_is_not_granted_again() {
    let caps = [Some(usd("1")), None];
    let (day, month) = (T0, T0);
    let mut row = Held::default().at(day, month);
    let (mut a, mut b) = (row, row);
    // Each instance holds half of the day's dollar.
    grant(
        &mut row,
        &mut a,
        caps,
        [usd("0.5"), Money::ZERO],
        [Money::ZERO; 2],
    );
    grant(
        &mut row,
        &mut b,
        caps,
        [usd("0.5"), Money::ZERO],
        [Money::ZERO; 2],
    );
    // `a` admits 0.5 and the call costs 0.8: 0.3 over what it was granted.
    a.counters.day.spent = usd("0.8");
    // `b` folds (a heartbeat) and asks for all the row has free.
    fold(&mut row, &mut b);
    assert_eq!(row.row_free(caps)[0], Some(usd("0.5")));
    let moved = grant(
        &mut row,
        &mut b,
        caps,
        [usd("1"), Money::ZERO],
        debts([&a], day, month),
    );
    assert_eq!(
        moved[0],
        usd("0.2"),
        "the 0.3 over a's grant is not granted again"
    );
    // What one ledger would hold after that commit: 0.8 spent, and 0.2 left to admit.
    let held_by_b = b.granted[0];
    assert_eq!(usd("0.8").saturating_add(held_by_b), usd("1"));
    // Without counting the debt the row would grant 0.5: 1.3 in all.
    let (mut row2, mut b2) = (row, b);
    fold(&mut row2, &mut b2);
    assert_eq!(
        grant(
            &mut row2,
            &mut b2,
            caps,
            [usd("1"), Money::ZERO],
            [Money::ZERO; 2]
        )[0],
        usd("0.5")
    );
}
