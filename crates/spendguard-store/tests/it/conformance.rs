//! The conformance suite: written once against the `Store` trait, run on every backend by
//! the `conformance!` macro in `main.rs`.

use std::time::Duration;

use spendguard_core::window::week_bucket;
use spendguard_core::{
    BudgetOverride, Event, Money, Pricing, RequestStatus, ScopeKey, Snapshot, Tokens, UsageRecord,
    UserOverrides, Window,
};
use spendguard_store::{AnyStore, OpenOptions, ReservationState, Store, StoreError};
use uuid::Uuid;

use crate::support::*;

/// Everything observable about a store, for before/after comparisons.
async fn state(
    store: &AnyStore,
    ids: &[uuid::Uuid],
) -> (Vec<spendguard_core::CounterRow>, u64, Snapshot, Vec<String>) {
    let rollups = store.rollups().await.unwrap();
    assert_eq!(
        rollups,
        store.recount().await.unwrap(),
        "rollups == recount"
    );
    let count = store.usage_count().await.unwrap();
    let snapshot = sorted(store.load(JAN, JAN).await.unwrap());
    let mut reservations = Vec::new();
    for id in ids {
        reservations.push(format!("{:?}", store.reservation(*id).await.unwrap()));
    }
    (rollups, count, snapshot, reservations)
}

/// A reservation's stored state and settling record.
async fn state_of(store: &impl Store, id: Uuid) -> Option<(ReservationState, Option<UsageRecord>)> {
    store
        .reservation(id)
        .await
        .unwrap()
        .map(|r| (r.state, r.usage))
}

pub async fn applies_each_event_kind(db: &Db) {
    let store = db.store().await;

    // Reserved.
    let res = reservation(1);
    store.apply(&[Event::Reserved(res.clone())]).await.unwrap();
    assert_eq!(
        state_of(&store, res.id).await,
        Some((ReservationState::Open, None))
    );
    assert_eq!(store.load(JAN, JAN).await.unwrap().open, vec![res.clone()]);
    assert_eq!(store.reservation(id(999)).await.unwrap(), None);
    assert_eq!(
        store
            .reservation(res.id)
            .await
            .unwrap()
            .unwrap()
            .reservation,
        res
    );

    // Committed.
    let used = commit_usage(&res, 101, 61_234);
    store
        .apply(&[Event::Committed {
            reservation_id: res.id,
            usage: used.clone(),
        }])
        .await
        .unwrap();
    assert_eq!(
        state_of(&store, res.id).await,
        Some((ReservationState::Committed, Some(used.clone())))
    );
    assert_eq!(store.usage(used.id).await.unwrap(), Some(used.clone()));
    assert!(store.load(JAN, JAN).await.unwrap().open.is_empty());
    let rollups = store.rollups().await.unwrap();
    // 4 scopes (global, tenant, company, user) × (day, month), and the user's week.
    assert_eq!(rollups.len(), 9);
    for row in &rollups {
        assert_eq!(row.spent, Money::from_micros(61_234));
        assert_eq!(row.requests, 1);
        assert_eq!(row.tokens, 950);
        let start = match row.window {
            Window::Day => used.day_start,
            Window::Week => week_bucket(used.day_start),
            _ => used.month_start,
        };
        assert_eq!(row.start, start);
    }
    assert!(rollups.iter().any(
        |r| r.scope == ScopeKey::User(tenant("acme"), user("alice")) && r.window == Window::Day
    ));
    assert!(
        rollups
            .iter()
            .any(|r| r.scope == ScopeKey::Global && r.window == Window::Month)
    );

    // Released.
    let res2 = reservation(2);
    store
        .apply(&[
            Event::Reserved(res2.clone()),
            Event::Released {
                reservation_id: res2.id,
                reason: Some("the caller gave up".into()),
                at: res2.created_at + 5_000_000,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        state_of(&store, res2.id).await,
        Some((ReservationState::Released, None))
    );

    // Expired.
    let res3 = reservation(3);
    let gone = expired_usage(&res3);
    store.apply(&[Event::Reserved(res3.clone())]).await.unwrap();
    store
        .apply(&[Event::Expired {
            reservation_id: res3.id,
            usage: gone.clone(),
        }])
        .await
        .unwrap();
    assert_eq!(
        state_of(&store, res3.id).await,
        Some((ReservationState::Expired, Some(gone.clone())))
    );

    // Recorded, with an idempotency key, without a company or endpoint.
    let mut direct = record(200);
    direct.company = None;
    direct.endpoint = None;
    direct.idempotency_key = Some(key("k-1"));
    direct.status = RequestStatus::Error;
    store
        .apply(&[Event::Recorded(direct.clone())])
        .await
        .unwrap();
    assert_eq!(store.usage(direct.id).await.unwrap(), Some(direct.clone()));
    assert_eq!(
        store
            .usage_by_key(&tenant("acme"), &key("k-1"))
            .await
            .unwrap(),
        Some(direct.clone())
    );
    assert_eq!(
        store
            .usage_by_key(&tenant("other"), &key("k-1"))
            .await
            .unwrap(),
        None
    );
    // Records made by reservations are not direct records.
    assert_eq!(
        store
            .usage_by_key(&tenant("acme"), &key("res-1"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.usage(id(4242)).await.unwrap(), None);

    // Budgets: set, change, clear.
    let eng = ScopeKey::Company(tenant("acme"), company("eng"));
    let five = BudgetOverride {
        daily: Some(Money::from_micros(5_000_000)),
        monthly: None,
    };
    let global = BudgetOverride {
        daily: None,
        monthly: Some(Money::from_micros(1_000_000_000)),
    };
    store
        .apply(&[
            Event::BudgetSet {
                scope: eng.clone(),
                budget: BudgetOverride::default(),
            },
            Event::BudgetSet {
                scope: eng.clone(),
                budget: five,
            },
            Event::BudgetSet {
                scope: ScopeKey::Global,
                budget: global,
            },
        ])
        .await
        .unwrap();
    let budgets = store.load(JAN, JAN).await.unwrap().budgets;
    assert_eq!(budgets.len(), 2);
    assert!(budgets.contains(&(eng.clone(), five)));
    assert!(budgets.contains(&(ScopeKey::Global, global)));
    store
        .apply(&[Event::BudgetSet {
            scope: eng.clone(),
            budget: BudgetOverride::default(),
        }])
        .await
        .unwrap();
    assert_eq!(
        store.load(JAN, JAN).await.unwrap().budgets,
        vec![(ScopeKey::Global, global)]
    );

    // User overrides: set, clear.
    let overrides = UserOverrides {
        tier: Some(spendguard_core::TierName::parse("enterprise").unwrap()),
        requests_per_minute: Some(120),
        tokens_per_day: Some(u64::MAX),
        allowed_models: Some(vec!["gpt-4o*".into(), "claude-?".into()]),
        ..UserOverrides::default()
    };
    store
        .apply(&[Event::UserSet {
            tenant: tenant("acme"),
            user: user("bob"),
            overrides: overrides.clone(),
        }])
        .await
        .unwrap();
    assert_eq!(
        store.load(JAN, JAN).await.unwrap().users,
        vec![(tenant("acme"), user("bob"), overrides)]
    );
    store
        .apply(&[Event::UserSet {
            tenant: tenant("acme"),
            user: user("bob"),
            overrides: UserOverrides::default(),
        }])
        .await
        .unwrap();
    assert!(store.load(JAN, JAN).await.unwrap().users.is_empty());

    // The commit, the expiry and the record; only the commit and the record count.
    assert_eq!(store.usage_count().await.unwrap(), 3);
    let mut model = Model::default();
    model.apply(&[
        Event::Recorded(used),
        Event::Recorded(gone),
        Event::Recorded(direct),
    ]);
    assert_eq!(store.rollups().await.unwrap(), model.rows());
    assert_eq!(store.recount().await.unwrap(), model.rows());
    assert!(store.apply(&[]).await.is_ok());
}

/// A batch with every kind of event (and one record twice).
fn mixed_batch() -> Vec<Event> {
    let a = reservation(10);
    let b = reservation(11);
    let c = reservation(12);
    let mut direct = record(30);
    direct.idempotency_key = Some(key("once"));
    let mut conflicting = record(31);
    conflicting.idempotency_key = Some(key("once"));
    conflicting.cost = Money::from_micros(777);
    let mut other_user = record(32);
    other_user.user = user("bob");
    other_user.company = None;
    vec![
        Event::Reserved(a.clone()),
        Event::Reserved(b.clone()),
        Event::Reserved(c.clone()),
        Event::Committed {
            reservation_id: a.id,
            usage: commit_usage(&a, 20, 40_000),
        },
        Event::Released {
            reservation_id: b.id,
            reason: None,
            at: b.created_at + 1,
        },
        Event::Expired {
            reservation_id: c.id,
            usage: expired_usage(&c),
        },
        Event::Recorded(direct.clone()),
        Event::Recorded(direct),
        Event::Recorded(conflicting),
        Event::Recorded(other_user),
        Event::BudgetSet {
            scope: ScopeKey::Tenant(tenant("acme")),
            budget: BudgetOverride {
                daily: Some(Money::from_micros(1)),
                monthly: Some(Money::from_micros(2)),
            },
        },
        Event::UserSet {
            tenant: tenant("acme"),
            user: user("alice"),
            overrides: UserOverrides {
                max_concurrent: Some(3),
                ..UserOverrides::default()
            },
        },
    ]
}

pub async fn reapplying_changes_nothing(db: &Db) {
    let store = db.store().await;
    let batch = mixed_batch();
    let ids = [id(10), id(11), id(12)];
    store.apply(&batch).await.unwrap();
    let first = state(&store, &ids).await;
    // A commit, an expiry and two direct records (one given twice, one skipped: its
    // idempotency key was taken).
    assert_eq!(first.1, 4);
    let mut model = Model::default();
    model.apply(&batch);
    assert_eq!(first.0, model.rows());
    assert_eq!(first.2.open, vec![]);
    assert_eq!(first.2.budgets.len(), 1);
    assert_eq!(first.2.users.len(), 1);

    // The same batch again (a retry whose commit status was unknown).
    store.apply(&batch).await.unwrap();
    assert_eq!(state(&store, &ids).await, first);
    // Each event on its own again, in reverse order (a spool replayed badly).
    for event in batch.iter().rev() {
        store.apply(std::slice::from_ref(event)).await.unwrap();
    }
    assert_eq!(state(&store, &ids).await, first);
    // Overlapping halves.
    store.apply(&batch[4..]).await.unwrap();
    store.apply(&batch[..8]).await.unwrap();
    assert_eq!(state(&store, &ids).await, first);
}

/// A random but reproducible workload: reservations opened and settled every way, direct
/// records with colliding idempotency keys, replays of earlier events, over several
/// tenants, users, companies, days and two months.
fn random_batches(seed: u64, batches: usize) -> Vec<Vec<Event>> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Vec<Event>> = Vec::new();
    let mut open = Vec::new();
    let mut next_id: u128 = 1_000;
    let tenants = ["acme", "globex", "initech"];
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let companies = [None, Some("c1"), Some("c2")];
    let days = [JAN + 30 * DAY, FEB, FEB + DAY, FEB + 2 * DAY];
    for _ in 0..batches {
        let mut batch = Vec::new();
        let n = 1 + rng.below(60);
        for _ in 0..n {
            next_id += 1;
            let day = days[rng.below(days.len() as u64) as usize];
            let month = if day >= FEB { FEB } else { JAN };
            match rng.below(10) {
                0..=2 => {
                    let mut r = reservation(next_id);
                    r.subject.tenant = tenant(tenants[rng.below(3) as usize]);
                    r.subject.user = user(users[rng.below(5) as usize]);
                    r.subject.company = companies[rng.below(3) as usize].map(company);
                    r.day_start = day;
                    r.month_start = month;
                    r.created_at = day + 1;
                    r.expires_at = day + 2;
                    open.push(r.clone());
                    batch.push(Event::Reserved(r));
                }
                3 | 4 if !open.is_empty() => {
                    let r = open.swap_remove(rng.below(open.len() as u64) as usize);
                    let mut u = commit_usage(&r, next_id, rng.below(5_000_000) as i64);
                    u.status = [
                        RequestStatus::Success,
                        RequestStatus::Error,
                        RequestStatus::Cancelled,
                    ][rng.below(3) as usize];
                    u.tokens = Tokens {
                        input: rng.below(10_000),
                        cached_input: 0,
                        output: rng.below(2_000),
                        ..Default::default()
                    };
                    batch.push(Event::Committed {
                        reservation_id: r.id,
                        usage: u,
                    });
                }
                5 if !open.is_empty() => {
                    let r = open.swap_remove(rng.below(open.len() as u64) as usize);
                    batch.push(Event::Released {
                        reservation_id: r.id,
                        reason: rng.chance(50).then(|| "released".to_string()),
                        at: r.created_at + 1,
                    });
                }
                6 if !open.is_empty() => {
                    let r = open.swap_remove(rng.below(open.len() as u64) as usize);
                    batch.push(Event::Expired {
                        reservation_id: r.id,
                        usage: expired_usage(&r),
                    });
                }
                7 if !out.is_empty() => {
                    // Replay an earlier event.
                    let old = &out[rng.below(out.len() as u64) as usize];
                    if !old.is_empty() {
                        batch.push(old[rng.below(old.len() as u64) as usize].clone());
                    }
                }
                _ => {
                    let mut u = record(next_id);
                    u.tenant = tenant(tenants[rng.below(3) as usize]);
                    u.user = user(users[rng.below(5) as usize]);
                    u.company = companies[rng.below(3) as usize].map(company);
                    u.day_start = day;
                    u.month_start = month;
                    u.created_at = day + 10;
                    u.cost = Money::from_micros(rng.below(3_000_000) as i64);
                    if rng.chance(30) {
                        u.idempotency_key = Some(key(&format!("key-{}", rng.below(8))));
                    }
                    batch.push(Event::Recorded(u));
                }
            }
        }
        out.push(batch);
    }
    out
}

pub async fn rollups_equal_recount_after_random_batches(db: &Db) {
    let store = db.store().await;
    let mut model = Model::default();
    for (i, batch) in random_batches(0x5eed, 40).iter().enumerate() {
        store.apply(batch).await.unwrap();
        model.apply(batch);
        if i % 8 == 7 {
            let rollups = store.rollups().await.unwrap();
            assert_eq!(rollups, store.recount().await.unwrap(), "after batch {i}");
            assert_eq!(rollups, model.rows(), "after batch {i}");
        }
    }
    assert_eq!(store.rollups().await.unwrap(), model.rows());
    assert_eq!(store.recount().await.unwrap(), model.rows());
    assert_eq!(store.usage_count().await.unwrap(), model.ids.len() as u64);
    // Current windows only.
    let snapshot = sorted(store.load(FEB + DAY, FEB).await.unwrap());
    let current: Vec<_> = model
        .rows()
        .into_iter()
        .filter(|r| match r.window {
            Window::Day => r.start >= FEB + DAY,
            Window::Month => r.start >= FEB,
            _ => false,
        })
        .collect();
    assert_eq!(snapshot.counters, current);
}

/// Start-up's streaming load: the counters come in chunks (more than one here), the rest in
/// the snapshot, and together they are what `load` returns.
pub async fn load_streaming_sends_what_load_returns(db: &Db) {
    let store = db.store().await;
    // 9,000 users: 18,000 user rows and more, over one chunk of counters.
    let mut events: Vec<Event> = (0..9_000u128)
        .map(|n| {
            let mut r = record(n + 1);
            r.user = user(&format!("u{n}"));
            Event::Recorded(r)
        })
        .collect();
    events.push(Event::Reserved(reservation(100_000)));
    events.push(Event::BudgetSet {
        scope: ScopeKey::Tenant(tenant("acme")),
        budget: BudgetOverride {
            daily: Some(Money::from_micros(10)),
            monthly: None,
        },
    });
    store.apply(&events).await.unwrap();
    let whole = sorted(store.load(JAN + 9 * DAY, JAN).await.unwrap());
    assert!(whole.counters.len() > 18_000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut streamed = store.load_streaming(JAN + 9 * DAY, JAN, tx).await.unwrap();
    assert!(
        streamed.counters.is_empty(),
        "the counters go to the channel"
    );
    let mut chunks = Vec::new();
    while let Some(chunk) = rx.recv().await {
        chunks.push(chunk);
    }
    assert!(chunks.len() > 1, "{} chunk(s)", chunks.len());
    streamed.counters = chunks.concat();
    assert_eq!(sorted(streamed), whole);
}

pub async fn load_returns_current_state(db: &Db) {
    let store = db.store().await;
    // Spend in December, early January, and today (10 January).
    let mut december = record(1);
    december.day_start = JAN - DAY;
    december.month_start = JAN - 31 * DAY;
    december.created_at = JAN - DAY + 5;
    let mut early = record(2);
    early.day_start = JAN + DAY;
    early.created_at = JAN + DAY + 5;
    let today = record(3);
    // Open reservations with every optional field set, and with none.
    let mut full = reservation(10);
    full.fingerprint = u64::MAX - 5;
    full.estimated_tokens = 1 << 40;
    let mut bare = reservation(11);
    bare.subject.company = None;
    bare.subject.tier = None;
    bare.subject.endpoint = None;
    bare.idempotency_key = None;
    bare.fingerprint = 0;
    bare.estimate = Money::ZERO;
    bare.created_at = full.created_at + 1;
    let settled = reservation(12);
    let events = vec![
        Event::Recorded(december.clone()),
        Event::Recorded(early.clone()),
        Event::Recorded(today.clone()),
        Event::Reserved(full.clone()),
        Event::Reserved(bare.clone()),
        Event::Reserved(settled.clone()),
        Event::Released {
            reservation_id: settled.id,
            reason: None,
            at: settled.created_at + 1,
        },
        Event::BudgetSet {
            scope: ScopeKey::User(tenant("acme"), user("alice")),
            budget: BudgetOverride {
                daily: Some(Money::from_micros(10)),
                monthly: None,
            },
        },
        Event::UserSet {
            tenant: tenant("acme"),
            user: user("alice"),
            overrides: UserOverrides {
                max_output_tokens: Some(4096),
                ..UserOverrides::default()
            },
        },
    ];
    store.apply(&events).await.unwrap();
    let snapshot = sorted(store.load(JAN + 9 * DAY, JAN).await.unwrap());
    let mut model = Model::default();
    model.apply(&events);
    let current: Vec<_> = model
        .rows()
        .into_iter()
        .filter(|r| match r.window {
            Window::Day => r.start >= JAN + 9 * DAY,
            Window::Month => r.start >= JAN,
            _ => false,
        })
        .collect();
    // Today's day rows (4 scopes) and January's month rows (4 scopes, 2 records).
    assert_eq!(current.len(), 8);
    assert_eq!(snapshot.counters, current);
    for row in snapshot
        .counters
        .iter()
        .filter(|r| r.window == Window::Month)
    {
        assert_eq!(row.requests, 2);
        assert_eq!(row.spent, Money::from_micros(2 * 4_250));
    }
    assert_eq!(snapshot.open, vec![full, bare]);
    assert_eq!(snapshot.budgets.len(), 1);
    assert_eq!(snapshot.users.len(), 1);
    // Everything, from the beginning of time (the ledger counts in days and months only).
    let all = sorted(store.load(i64::MIN, i64::MIN).await.unwrap());
    let days_and_months: Vec<_> = model
        .rows()
        .into_iter()
        .filter(|r| r.window != Window::Week)
        .collect();
    assert_eq!(all.counters, days_and_months);
    // Nothing yet in the future.
    assert!(store.load(FEB, FEB).await.unwrap().counters.is_empty());
    // The same after reopening.
    drop(store);
    let store = reopen(db).await;
    assert_eq!(
        sorted(store.load(JAN + 9 * DAY, JAN).await.unwrap()),
        snapshot
    );
}

pub async fn expired_rows_do_not_count(db: &Db) {
    let store = db.store().await;
    let res = reservation(1);
    // Even an expiry that carried cost and tokens does not count.
    let mut gone = expired_usage(&res);
    gone.cost = Money::from_micros(5_000);
    gone.tokens.input = 10;
    let mut direct = record(2);
    direct.status = RequestStatus::Expired;
    store
        .apply(&[
            Event::Reserved(res.clone()),
            Event::Expired {
                reservation_id: res.id,
                usage: gone.clone(),
            },
            Event::Recorded(direct.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(store.usage_count().await.unwrap(), 2);
    assert_eq!(store.usage(gone.id).await.unwrap(), Some(gone));
    assert_eq!(store.usage(direct.id).await.unwrap(), Some(direct));
    assert!(store.rollups().await.unwrap().is_empty());
    assert!(store.recount().await.unwrap().is_empty());
    assert!(store.load(JAN, JAN).await.unwrap().counters.is_empty());
}

/// A gateway call's record: its upstream and provider request id, and a truncated one.
pub async fn origins_and_truncated_records_round_trip(db: &Db) {
    let store = db.store().await;
    let mut forwarded = record(1);
    forwarded.origin = Some(spendguard_core::Origin {
        upstream: "openai-main".into(),
        request_id: Some("req_0123abc".into()),
    });
    let mut cut = record(2);
    cut.status = RequestStatus::Truncated;
    cut.pricing = Pricing::Estimate;
    cut.origin = Some(spendguard_core::Origin {
        upstream: "anthropic".into(),
        request_id: None,
    });
    store
        .apply(&[
            Event::Recorded(forwarded.clone()),
            Event::Recorded(cut.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(store.usage(forwarded.id).await.unwrap(), Some(forwarded));
    assert_eq!(store.usage(cut.id).await.unwrap(), Some(cut));
    // A truncated record counts, like any call that happened.
    assert_eq!(
        store.rollups().await.unwrap(),
        store.recount().await.unwrap()
    );
    assert!(!store.rollups().await.unwrap().is_empty());
}

/// Every token kind, every pricing and the long-context tier round-trip; a tenant's price
/// overrides are set, replaced, loaded and cleared.
pub async fn token_kinds_pricings_and_tenant_prices_round_trip(db: &Db) {
    use spendguard_core::prices::TenantPrices;
    let store = db.store().await;
    let pricings = [
        Pricing::Catalog,
        Pricing::Config,
        Pricing::TenantOverride,
        Pricing::Caller,
        Pricing::Estimate,
        Pricing::Default,
        Pricing::Free,
    ];
    let mut records = Vec::new();
    for (i, pricing) in pricings.into_iter().enumerate() {
        let mut r = record(100 + i as u128);
        r.tokens = Tokens {
            input: 300_000 + i as u64,
            cached_input: 1_000,
            output: 4_000,
            cache_creation: 20_000,
            cache_creation_1h: 5_000 + i as u64,
            reasoning: 1_500,
        };
        r.pricing = pricing;
        r.long_context_above = (i % 2 == 0).then_some(200_000);
        records.push(r);
    }
    let events: Vec<Event> = records.iter().cloned().map(Event::Recorded).collect();
    store.apply(&events).await.unwrap();
    for r in &records {
        assert_eq!(store.usage(r.id).await.unwrap().as_ref(), Some(r));
    }

    let price = spendguard_core::Price {
        cache_write: Some(Money::from_micros(3_750_000)),
        ..spendguard_core::Price::simple(
            Money::from_micros(3_000_000),
            Money::from_micros(15_000_000),
        )
    };
    let first = TenantPrices {
        multiplier_ppm: Some(850_000),
        models: [("claude-sonnet-4-5".to_owned(), price)].into(),
    };
    let second = TenantPrices {
        multiplier_ppm: Some(900_000),
        models: Default::default(),
    };
    store
        .apply(&[
            Event::TenantPricesSet {
                tenant: tenant("acme"),
                prices: first.clone(),
            },
            Event::TenantPricesSet {
                tenant: tenant("beta"),
                prices: first.clone(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        store.load(JAN, JAN).await.unwrap().tenant_prices,
        vec![
            (tenant("acme"), first.clone()),
            (tenant("beta"), first.clone())
        ]
    );
    // In one batch the last event of a tenant wins; an empty one clears.
    store
        .apply(&[
            Event::TenantPricesSet {
                tenant: tenant("acme"),
                prices: second.clone(),
            },
            Event::TenantPricesSet {
                tenant: tenant("beta"),
                prices: TenantPrices::default(),
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        store.load(JAN, JAN).await.unwrap().tenant_prices,
        vec![(tenant("acme"), second)]
    );
}

pub async fn large_money_values_round_trip(db: &Db) {
    let store = db.store().await;
    let mut huge = record(1);
    huge.cost = Money::MAX;
    huge.tokens = Tokens {
        input: i64::MAX as u64,
        cached_input: i64::MAX as u64,
        output: 5,
        ..Default::default()
    };
    let mut small = record(2);
    small.cost = Money::from_micros(1);
    let mut odd = record(3);
    odd.cost = Money::from_micros(123_456_789_012);
    let mut res = reservation(4);
    res.estimate = Money::from_micros(i64::MAX - 1);
    res.estimated_tokens = i64::MAX as u64;
    res.fingerprint = u64::MAX;
    store
        .apply(&[
            Event::Recorded(huge.clone()),
            Event::Recorded(small.clone()),
            Event::Recorded(odd.clone()),
            Event::Reserved(res.clone()),
            Event::BudgetSet {
                scope: ScopeKey::Global,
                budget: BudgetOverride {
                    daily: Some(Money::MAX),
                    monthly: Some(Money::from_micros(i64::MAX - 7)),
                },
            },
        ])
        .await
        .unwrap();
    assert_eq!(store.usage(huge.id).await.unwrap(), Some(huge));
    assert_eq!(store.usage(small.id).await.unwrap(), Some(small));
    assert_eq!(store.usage(odd.id).await.unwrap(), Some(odd));
    let snapshot = store.load(JAN, JAN).await.unwrap();
    assert_eq!(snapshot.open, vec![res]);
    assert_eq!(
        snapshot.budgets,
        vec![(
            ScopeKey::Global,
            BudgetOverride {
                daily: Some(Money::MAX),
                monthly: Some(Money::from_micros(i64::MAX - 7)),
            }
        )]
    );
    // The sums saturate, in the rollups and in the recount alike.
    let rollups = store.rollups().await.unwrap();
    assert_eq!(rollups, store.recount().await.unwrap());
    for row in &rollups {
        assert_eq!(row.spent, Money::MAX);
        assert_eq!(row.requests, 3);
        assert_eq!(row.tokens, i64::MAX as u64);
    }
    // More on top still saturates.
    let mut more = record(5);
    more.cost = Money::from_micros(i64::MAX / 2);
    store.apply(&[Event::Recorded(more)]).await.unwrap();
    let rollups = store.rollups().await.unwrap();
    assert_eq!(rollups, store.recount().await.unwrap());
    assert!(
        rollups
            .iter()
            .all(|r| r.spent == Money::MAX && r.requests == 4)
    );
}

async fn reopen(db: &Db) -> AnyStore {
    // PostgreSQL notices a dropped session a moment later: wait for its lock to go.
    for _ in 0..100 {
        match db.open(&OpenOptions::default()).await {
            Ok(store) => return store,
            Err(StoreError::Locked(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("reopening failed: {e}"),
        }
    }
    panic!("the writer lock was not released");
}

pub async fn writer_lock_is_exclusive(db: &Db) {
    let first = db.store().await;
    let err = db.open(&OpenOptions::default()).await.unwrap_err();
    match &err {
        StoreError::Locked(msg) => {
            assert!(
                msg.starts_with("another spendguard instance is writing to ")
                    && msg.contains("; only one single-node instance may run per database (several need mode = \"cluster\""),
                "{msg}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(!err.is_unavailable());
    // A store that does not take the lock may still open (e.g. to read).
    let reader = db
        .open(&OpenOptions {
            take_writer_lock: false,
            ..OpenOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(reader.usage_count().await.unwrap(), 0);
    // The writer still writes.
    first.apply(&[Event::Recorded(record(1))]).await.unwrap();
    assert_eq!(reader.usage_count().await.unwrap(), 1);

    // Dropping the writer releases the lock.
    drop(first);
    let second = reopen(db).await;
    assert_eq!(second.usage_count().await.unwrap(), 1);
    assert!(matches!(
        db.open(&OpenOptions::default()).await,
        Err(StoreError::Locked(_))
    ));
    // Closing releases it at once.
    second.close().await;
    let third = db.store().await;
    third.close().await;
}

pub async fn migrations_are_versioned(db: &Db) {
    let store = db.store().await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    store.close().await;
    let store = db.store().await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    assert_eq!(store.usage_count().await.unwrap(), 1);
}

pub async fn database_id_is_stable_and_dead_letters_are_kept_once(db: &Db) {
    let store = db.store().await;
    let id = store.database_id().await.unwrap();
    assert!(id.len() >= 16, "{id}");
    let letter = spendguard_store::DeadLetter {
        id: "d1".into(),
        event: r#"{"released":{"reason":"a\u0000b"}}"#.into(),
        error: "invalid byte sequence (22021)".into(),
        created_at: 1_700_000_000_000_000,
    };
    store
        .dead_letter(std::slice::from_ref(&letter))
        .await
        .unwrap();
    // Kept again (a replay): still one.
    store
        .dead_letter(std::slice::from_ref(&letter))
        .await
        .unwrap();
    store.close().await;
    let store = db.store().await;
    assert_eq!(store.database_id().await.unwrap(), id);
    assert_eq!(store.dead_letters().await.unwrap(), vec![letter]);
    store.close().await;
}

/// A migration numbered below one already applied (3 landing after 4) is applied later.
pub async fn a_gap_in_the_migrations_is_filled_later(db: &Db) {
    let store = db.store().await;
    store.close().await;
    // Undo migration 2 (as if it had not shipped yet), keeping 4.
    execute(
        db,
        "DROP TABLE usage_rollups; DROP INDEX webhook_deliveries_alert_url; \
         ALTER TABLE webhook_deliveries DROP COLUMN delivered_at; \
         DROP INDEX IF EXISTS rollups_kind_window; \
         ALTER TABLE rollups DROP COLUMN input_tokens; \
         ALTER TABLE rollups DROP COLUMN cached_input_tokens; \
         ALTER TABLE rollups DROP COLUMN output_tokens; \
         DELETE FROM schema_migrations WHERE version = 2",
    )
    .await;
    let store = db.store().await;
    assert_eq!(store.schema_versions().await.unwrap(), all_versions());
    store.close().await;
}

/// A writer spools and retries transient errors and dead-letters permanent ones: a schema
/// an operator broke (a table missing) is no event's fault, so it must be transient.
/// (Permanent errors: `postgres_only::a_failing_batch_changes_nothing`, the NUL test of the
/// guard.)
///
/// A batch is made durable in the journal, and projected into `ai_usage` after: a broken
/// journal refuses the batch (transiently); a broken `ai_usage` holds up the projection, and
/// the reads that need it, until it is repaired, and nothing is lost meanwhile.
pub async fn a_broken_schema_is_a_transient_error(db: &Db) {
    let store = db.store().await;
    execute_on_journal(db, "ALTER TABLE journal RENAME TO journal_moved").await;
    let err = store
        .apply(&[Event::Recorded(record(1))])
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    execute_on_journal(db, "ALTER TABLE journal_moved RENAME TO journal").await;
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    assert!(store.usage(record(1).id).await.unwrap().is_some());

    execute(db, "ALTER TABLE ai_usage RENAME TO ai_usage_moved").await;
    store.apply(&[Event::Recorded(record(2))]).await.unwrap();
    let err = store.usage(record(2).id).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    execute(db, "ALTER TABLE ai_usage_moved RENAME TO ai_usage").await;
    assert_eq!(store.usage(record(2).id).await.unwrap(), Some(record(2)));
    assert_eq!(store.usage_count().await.unwrap(), 2);
    assert_eq!(
        store.recount().await.unwrap(),
        store.rollups().await.unwrap()
    );
    store.close().await;
}

pub async fn concurrent_batches_are_serializable(db: &Db) {
    let store = std::sync::Arc::new(db.store().await);
    // Without idempotency keys: which of two records with one key wins depends on the order.
    let batches: Vec<Vec<Event>> = random_batches(0xc0ffee, 48)
        .into_iter()
        .map(|batch| {
            batch
                .into_iter()
                .map(|e| match e {
                    Event::Recorded(mut u) => {
                        u.idempotency_key = None;
                        Event::Recorded(u)
                    }
                    other => other,
                })
                .collect()
        })
        .collect();
    let mut model = Model::default();
    for batch in &batches {
        model.apply(batch);
    }
    // Reservations are settled by later batches, so apply the reservations first, then
    // everything (again) from several tasks at once, in different orders.
    let reserved: Vec<Event> = batches
        .iter()
        .flatten()
        .filter(|e| matches!(e, Event::Reserved(_)))
        .cloned()
        .collect();
    store.apply(&reserved).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let store = store.clone();
        let mut mine = batches.clone();
        if t % 2 == 1 {
            mine.reverse();
        }
        tasks.push(tokio::spawn(async move {
            for batch in &mine {
                store.apply(batch).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Every record counted once, whatever the order.
    assert_eq!(store.rollups().await.unwrap(), model.rows());
    assert_eq!(store.recount().await.unwrap(), model.rows());
    assert_eq!(store.usage_count().await.unwrap(), model.ids.len() as u64);
}

pub async fn large_batches_count_each_record_once(db: &Db) {
    let store = db.store().await;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    let make = |n: u128| {
        let mut r = record(n);
        r.user = user(users[n as usize % users.len()]);
        r.cost = Money::from_micros(1_000 + n as i64);
        if n % 10 == 0 {
            r.idempotency_key = Some(key(&format!("k-{}", n % 30)));
        }
        Event::Recorded(r)
    };
    let first: Vec<Event> = (1..=70).map(make).collect();
    // Half of it again, new records, and keys that are already taken.
    let second: Vec<Event> = (36..=170).map(make).collect();
    let mut model = Model::default();
    for batch in [&first, &second, &first] {
        store.apply(batch).await.unwrap();
        model.apply(batch);
        assert_eq!(store.rollups().await.unwrap(), model.rows());
        assert_eq!(store.usage_count().await.unwrap(), model.ids.len() as u64);
    }
    assert_eq!(store.recount().await.unwrap(), model.rows());
    // 170 records, less those whose key was taken: 17 records have keys, of 3 distinct ones.
    assert_eq!(model.ids.len(), 170 - 14);
}

/// API keys: stored by hash, listed oldest first, revoked once.
pub async fn api_keys_round_trip(db: &Db) {
    let store = db.store().await;
    let tenant = spendguard_core::TenantId::parse("acme").unwrap();
    let admin = spendguard_store::ApiKeyRecord {
        id: "k1".into(),
        tenant: None,
        hash: "aa".repeat(32),
        prefix: "sg_0123abcd".into(),
        created_at: 1_700_000_000_000_000,
        revoked_at: None,
    };
    let scoped = spendguard_store::ApiKeyRecord {
        id: "k2".into(),
        tenant: Some(tenant),
        hash: "bb".repeat(32),
        created_at: 1_700_000_000_000_001,
        ..admin.clone()
    };
    store.insert_api_key(&admin).await.unwrap();
    store.insert_api_key(&scoped).await.unwrap();
    // The same hash twice is refused.
    assert!(
        store
            .insert_api_key(&spendguard_store::ApiKeyRecord {
                id: "k3".into(),
                ..admin.clone()
            })
            .await
            .is_err()
    );
    assert_eq!(
        store.list_api_keys().await.unwrap(),
        vec![admin.clone(), scoped.clone()]
    );
    assert!(
        store
            .revoke_api_key("k2", 1_700_000_000_000_002)
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_key("k2", 1_700_000_000_000_003)
            .await
            .unwrap()
    );
    assert!(!store.revoke_api_key("missing", 1).await.unwrap());
    let keys = store.list_api_keys().await.unwrap();
    assert_eq!(keys[1].revoked_at, Some(1_700_000_000_000_002));
    assert_eq!(keys[0].revoked_at, None);
}

/// Keyed reservations are found by (tenant, key), newest first, with their settlement;
/// settings persist; how a record was priced round-trips.
pub async fn keyed_reservations_and_settings_round_trip(db: &Db) {
    let store = db.store().await;
    let older = reservation(41);
    let mut newer = reservation(42);
    newer.idempotency_key = older.idempotency_key.clone();
    newer.created_at = older.created_at + 1;
    let key = older.idempotency_key.clone().unwrap();
    let mut used = commit_usage(&newer, 142, 1_000);
    used.pricing = Pricing::Estimate;
    store
        .apply(&[
            Event::Reserved(older.clone()),
            Event::Reserved(newer.clone()),
            Event::Committed {
                reservation_id: newer.id,
                usage: used.clone(),
            },
        ])
        .await
        .unwrap();
    let found = store
        .reservation_by_key(&tenant("acme"), &key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.reservation, newer);
    assert_eq!(found.state, ReservationState::Committed);
    assert_eq!(found.usage, Some(used.clone()));
    assert_eq!(found.usage.unwrap().pricing, Pricing::Estimate);
    assert_eq!(
        store
            .reservation_by_key(&tenant("other"), &key)
            .await
            .unwrap(),
        None
    );
    for p in [
        Pricing::Catalog,
        Pricing::Caller,
        Pricing::Default,
        Pricing::Free,
    ] {
        let mut r = record(300 + p as u128);
        r.pricing = p;
        store.apply(&[Event::Recorded(r.clone())]).await.unwrap();
        assert_eq!(store.usage(r.id).await.unwrap().unwrap().pricing, p);
    }
    assert_eq!(store.setting("time_zone").await.unwrap(), None);
    store.put_setting("time_zone", "Asia/Tokyo").await.unwrap();
    store
        .put_setting("time_zone", "Europe/Paris")
        .await
        .unwrap();
    assert_eq!(
        store.setting("time_zone").await.unwrap().as_deref(),
        Some("Europe/Paris")
    );
}

/// A snapshot with its counters sorted by scope, window and start (a store returns them in
/// no particular order).
fn sorted(mut snapshot: Snapshot) -> Snapshot {
    snapshot
        .counters
        .sort_by(|a, b| (&a.scope, a.window, a.start).cmp(&(&b.scope, b.window, b.start)));
    snapshot
}
