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
