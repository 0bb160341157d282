//! Restore equals reserve: a ledger restored from what a store would hold (the rollups of
//! the usage records and the open reservations) answers exactly as the ledger that admitted
//! them, for every limit but the rolling request rate (which is not persisted).
//!
//! Random sequences of reserve, commit, release, record and clock advances run against one
//! ledger; a second ledger is restored from the events the first emitted, and both are
//! compared limit by limit, scope total by scope total, and reservation by reservation.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use spendguard_core::*;
use uuid::Uuid;

use crate::support::*;

const POLICY: &str = r#"
[global]
usd_per_day = "5"
usd_per_month = "20"
[tenant]
usd_per_day = "4"
[company]
usd_per_month = "9"
[tiers.free]
requests_per_minute = 5
requests_per_day = 20
tokens_per_day = 5000
usd_per_day = "2"
usd_per_month = "6"
max_concurrent = 3
allowed_models = ["*"]
"#;

#[derive(Clone, Debug)]
enum Op {
    Reserve { user: usize, est: i64, ttl_min: i64 },
    Commit { pick: usize, percent: i64 },
    Release { pick: usize },
    Record { user: usize, cost: i64 },
    Advance { micros: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..5usize, 1..1_500_000i64, 1..30i64)
            .prop_map(|(user, est, ttl_min)| Op::Reserve { user, est, ttl_min }),
        3 => (any::<usize>(), 0..=150i64).prop_map(|(pick, percent)| Op::Commit { pick, percent }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (0..5usize, 0..500_000i64).prop_map(|(user, cost)| Op::Record { user, cost }),
        2 => prop_oneof![0..120_000_000i64, 0..(2 * DAY)].prop_map(|micros| Op::Advance { micros }),
    ]
}

fn user_subject(i: usize) -> Subject {
    match i {
        0 => subject("t0", "alice", Some("acme")),
        1 => subject("t0", "bob", Some("acme")),
        2 => subject("t0", "carol", None),
        3 => subject("t1", "alice", None),
        _ => subject("t1", "dave", Some("acme")),
    }
}

/// What a store holds after applying the events: rollups and open reservations.
#[derive(Default)]
struct Store {
    rollups: BTreeMap<(ScopeKey, bool, i64), CounterRow>,
    open: HashMap<Uuid, Reservation>,
}

impl Store {
    fn apply(&mut self, event: Option<Event>) {
        let usage = match event {
            Some(Event::Reserved(r)) => {
                self.open.insert(r.id, r);
                return;
            }
            Some(Event::Released { reservation_id, .. })
            | Some(Event::Expired { reservation_id, .. }) => {
                self.open.remove(&reservation_id);
                return;
            }
            Some(Event::Committed {
                reservation_id,
                usage,
            }) => {
                self.open.remove(&reservation_id);
                usage
            }
            Some(Event::Recorded(usage)) => usage,
            _ => return,
        };
        if !usage.counts() {
            return;
        }
        for scope in usage.scopes() {
            for (is_day, start) in [(true, usage.day_start), (false, usage.month_start)] {
                let row = self
                    .rollups
                    .entry((scope.clone(), is_day, start))
                    .or_insert_with(|| CounterRow {
                        scope: scope.clone(),
                        window: if is_day { Window::Day } else { Window::Month },
                        start,
                        spent: Money::ZERO,
                        requests: 0,
                        tokens: 0,
                        input_tokens: 0,
                        cached_input_tokens: 0,
                        output_tokens: 0,
                    });
                row.spent = row.spent.checked_add(usage.cost).unwrap();
                row.requests += 1;
                row.tokens += usage.tokens.total();
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            counters: self.rollups.values().cloned().collect(),
            open: self.open.values().cloned().collect(),
            budgets: Vec::new(),
            users: Vec::new(),
            ..Default::default()
        }
    }
}

fn nonzero(mut totals: Vec<ScopeTotals>) -> Vec<ScopeTotals> {
    totals.retain(|(_, d, m)| *d != Default::default() || *m != Default::default());
    totals.sort_by(|a, b| a.0.cmp(&b.0));
    totals
}

fn run(ops: Vec<Op>) {
    let ledger = Ledger::new(policy(POLICY));
    let mut store = Store::default();
    let mut now = T0;
    let mut ids: Vec<Uuid> = Vec::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Reserve { user, est, ttl_min } => {
                next += 1;
                let mut req = reserve_req(next, user_subject(user), Money::from_micros(est));
                req.ttl_us = Some(ttl_min * MINUTE);
                if let Ok(r) = ledger.reserve(&req, now).unwrap() {
                    ids.push(r.value.reservation.id);
                    store.apply(r.event);
                }
            }
            Op::Commit { pick, percent } if !ids.is_empty() => {
                let id = ids[pick % ids.len()];
                let Some(res) = ledger.reservation(&id) else {
                    continue;
                };
                next += 1;
                let cost = Money::from_micros(res.estimate.micros() * percent / 100);
                if let Ok(c) = ledger.commit(&id, &commit_req(next, cost), now) {
                    store.apply(c.event);
                }
            }
            Op::Release { pick } if !ids.is_empty() => {
                let id = ids[pick % ids.len()];
                if let Ok(r) = ledger.release(&id, None, now) {
                    store.apply(r.event);
                }
            }
            Op::Record { user, cost } => {
                next += 1;
                let req = RecordRequest {
                    id: id(1_000_000 + next),
                    subject: user_subject(user),
                    tokens: Tokens {
                        input: 10,
                        cached_input: 0,
                        output: 10,
                        ..Default::default()
                    },
                    cost: Some(Money::from_micros(cost)),
                    status: RequestStatus::Success,
                    idempotency_key: None,
                };
                store.apply(ledger.record(&req, now).unwrap().event);
            }
            Op::Advance { micros } => {
                now += micros;
                for e in ledger.expire(now) {
                    store.apply(Some(e));
                }
            }
            _ => {}
        }
    }

    let restored = Ledger::new(policy(POLICY));
    restored.restore(store.snapshot()).unwrap();

    assert_eq!(restored.open_reservations(), ledger.open_reservations());
    for id in store.open.keys() {
        assert_eq!(restored.reservation(id), ledger.reservation(id));
    }
    for kind in [
        ScopeKind::Global,
        ScopeKind::Tenant,
        ScopeKind::Company,
        ScopeKind::User,
    ] {
        assert_eq!(
            nonzero(restored.totals(kind, now)),
            nonzero(ledger.totals(kind, now)),
            "{kind:?} totals"
        );
    }
    let not_rate = |l: &Vec<LimitStatus>| -> Vec<LimitStatus> {
        l.iter()
            .filter(|s| s.window != Window::Minute)
            .cloned()
            .collect()
    };
    for user in 0..5 {
        let s = user_subject(user);
        let limits = |l: &Ledger| {
            not_rate(
                &l.limits(&s.tenant, &s.user, s.company.as_ref(), None, now)
                    .unwrap(),
            )
        };
        assert_eq!(limits(&restored), limits(&ledger), "limits of {s:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_restored_ledger_equals_the_one_that_reserved(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

/// The simplest case, spelled out: open reservations alone, restored.
#[test]
fn restoring_open_reservations_holds_what_reserving_held() {
    let ledger = Ledger::new(policy(POLICY));
    let mut store = Store::default();
    for n in 0..6 {
        let r = ledger
            .reserve(
                &reserve_req(n, user_subject(n as usize % 5), usd("0.25")),
                T0,
            )
            .unwrap()
            .unwrap();
        store.apply(r.event);
    }
    let restored = Ledger::new(policy(POLICY));
    restored.restore(store.snapshot()).unwrap();
    for user in 0..5 {
        let s = user_subject(user);
        let l = |l: &Ledger| {
            l.limits(&s.tenant, &s.user, s.company.as_ref(), None, T0)
                .unwrap()
                .into_iter()
                .filter(|s| s.window != Window::Minute)
                .collect::<Vec<_>>()
        };
        assert_eq!(l(&restored), l(&ledger));
    }
    assert_eq!(restored.scope_count(), ledger.scope_count());
    for t in ["t0", "t1"] {
        let t = TenantId::parse(t).unwrap();
        assert_eq!(restored.tracked_subjects(&t), ledger.tracked_subjects(&t));
    }
}
