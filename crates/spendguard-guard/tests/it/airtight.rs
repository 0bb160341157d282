//! The paths beside the main ones: late commits retried after memory forgot them, retries
//! racing the first attempt's write, failed writes, keyed reservations retried after the
//! ledger's retention or a restart, unpriced models, and admin writes racing each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use spendguard_core::*;
use spendguard_guard::{Guard, GuardError, GuardOptions, ManualClock};
use spendguard_store::{AnyStore, Store, StoreError, StoredReservation};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::support::*;

const T0: Micros = 1_710_028_800_000_000;
const SECOND: Micros = 1_000_000;

/// A store whose `apply` can be held: while `hold` is set, each `apply` adds a permit to
/// `entered` and then waits for a permit of `release`.
struct GatedStore<S> {
    inner: S,
    hold: AtomicBool,
    entered: Semaphore,
    release: Semaphore,
}

impl<S> GatedStore<S> {
    fn new(inner: S) -> GatedStore<S> {
        GatedStore {
            inner,
            hold: AtomicBool::new(false),
            entered: Semaphore::new(0),
            release: Semaphore::new(0),
        }
    }
}

impl<S: Store> Store for GatedStore<S> {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if self.hold.load(Ordering::SeqCst) {
            self.entered.add_permits(1);
            self.release.acquire().await.unwrap().forget();
        }
        self.inner.apply(events).await
    }
    forward_store!(inner);
}

async fn manual(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Guard<AnyStore> {
    start_with(
        sqlite(&dir.join("db")).await,
        GuardOptions::new(dir.join("spool")),
        clock.clone(),
    )
    .await
}

/// Reserves with a one-second TTL, lets it expire and lets memory forget it.
async fn expired_and_forgotten<S: Store>(g: &Guard<S>, clock: &ManualClock, user: &str) -> Uuid {
    let mut req = reserve(subject("t", user), 10_000);
    req.ttl_us = Some(SECOND);
    let id = g.reserve(req).await.unwrap().unwrap().reservation.id;
    clock.advance(2 * SECOND);
    g.sweep().await.unwrap();
    // Settled reservations are remembered for five seconds.
    clock.advance(10 * SECOND);
    g.sweep().await.unwrap();
    assert!(g.ledger().reservation_tenant(&id).is_none(), "forgotten");
    id
}

#[tokio::test]
async fn late_commit_retries_are_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let g = manual(dir.path(), &clock).await;
    let id = expired_and_forgotten(&g, &clock, "u").await;
    assert_eq!(
        g.store().usage_count().await.unwrap(),
        1,
        "the expired record"
    );
    let first = g.commit(id, commit(4000)).await.unwrap();
    assert!(first.late);
    for _ in 0..4 {
        let again = g.commit(id, commit(4000)).await.unwrap();
        assert_eq!(again.usage, first.usage);
        assert!(again.replayed);
    }
    // A retry with other usage is a conflict, not a second record.
    assert!(matches!(
        g.commit(id, commit(5000)).await,
        Err(GuardError::Ledger(LedgerError::CommitMismatch(_)))
    ));
    // Forgotten again: the store answers.
    clock.advance(10 * SECOND);
    g.sweep().await.unwrap();
    assert_eq!(g.commit(id, commit(4000)).await.unwrap().usage, first.usage);
    assert_eq!(g.store().usage_count().await.unwrap(), 2);

    // Two late commits at once.
    let id2 = expired_and_forgotten(&g, &clock, "v").await;
    let (a, b) = tokio::join!(g.commit(id2, commit(700)), g.commit(id2, commit(700)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.usage.id, b.usage.id);
    assert_eq!(g.store().usage_count().await.unwrap(), 4);
    let s = subject("t", "v");
    let spent = |g: &Guard<AnyStore>| {
        g.limits(&s.tenant, &s.user, None, None)
            .unwrap()
            .into_iter()
            .find(|l| matches!(l.scope, ScopeKey::User(..)) && l.window == Window::Day)
            .map(|l| l.used)
    };
    assert_eq!(spent(&g), Some(Amount::Usd(Money::from_micros(700))));
    assert_rollups_match(g.store()).await;
    g.shutdown().await;
    drop(g);

    // And after a restart.
    let g = manual(dir.path(), &clock).await;
    assert_eq!(g.commit(id, commit(4000)).await.unwrap().usage, first.usage);
    assert_eq!(g.commit(id2, commit(700)).await.unwrap().usage, a.usage);
    assert_eq!(g.store().usage_count().await.unwrap(), 4);
    assert_eq!(spent(&g), Some(Amount::Usd(Money::from_micros(700))));
    g.shutdown().await;
}

/// Runs `first` until its write is held in the store, then `retry`; the retry must not be
/// answered before the first attempt's write is durable.
async fn retry_waits<T: std::fmt::Debug + Send + 'static>(
    store: &Arc<GatedStore<AnyStore>>,
    first: tokio::task::JoinHandle<T>,
    retry: impl FnOnce() -> tokio::task::JoinHandle<T>,
) -> (T, T) {
    store.entered.acquire().await.unwrap().forget();
    let retry = retry();
    // Give the retry every chance to finish on its own: a retry answered from memory (or
    // from a store lookup) finishes within milliseconds. This proves that something does
    // not happen, so it needs a bound: one second, spent only when the test passes.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while !retry.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !retry.is_finished(),
        "the retry was answered before the first attempt was durable"
    );
    store.hold.store(false, Ordering::SeqCst);
    store.release.add_permits(1);
    (first.await.unwrap(), retry.await.unwrap())
}

/// An `Arc`'d store behind a guard, so the test can hold its writes.
#[derive(Clone)]
struct Shared(Arc<GatedStore<AnyStore>>);

impl Store for Shared {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        self.0.apply(events).await
    }
    forward_store!(0);
}

async fn gated(dir: &std::path::Path) -> (Arc<GatedStore<AnyStore>>, Guard<Shared>) {
    let store = Arc::new(GatedStore::new(sqlite(&dir.join("db")).await));
    let g = start(Shared(store.clone()), dir).await;
    (store, g)
}

#[tokio::test]
async fn a_commit_retry_waits_for_the_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, g) = gated(dir.path()).await;
    let r = g.reserve(reserve(subject("t", "u"), 5000)).await.unwrap();
    let id = r.unwrap().reservation.id;
    store.hold.store(true, Ordering::SeqCst);
    let g1 = g.clone();
    let first = tokio::spawn(async move { g1.commit(id, commit(3000)).await.unwrap() });
    let (a, b) = retry_waits(&store, first, || {
        let g2 = g.clone();
        tokio::spawn(async move { g2.commit(id, commit(3000)).await.unwrap() })
    })
    .await;
    assert_eq!(a.usage, b.usage);
    assert!(b.replayed);
    // The replay answers exactly what the first attempt answered.
    assert_eq!(a.reserved, b.reserved);
    g.shutdown().await;
}

#[tokio::test]
async fn a_keyed_record_retry_waits_for_the_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, g) = gated(dir.path()).await;
    let req = RecordRequest {
        id: Uuid::nil(),
        subject: subject("t", "u"),
        tokens: Tokens::default(),
        cost: Some(Money::from_micros(9)),
        status: RequestStatus::Success,
        idempotency_key: Some(IdempotencyKey::parse("rec").unwrap()),
    };
    store.hold.store(true, Ordering::SeqCst);
    let (g1, r1) = (g.clone(), req.clone());
    let first = tokio::spawn(async move { g1.record(r1).await.unwrap() });
    let (a, b) = retry_waits(&store, first, || {
        let g2 = g.clone();
        tokio::spawn(async move { g2.record(req).await.unwrap() })
    })
    .await;
    assert_eq!(a, b);
    assert_eq!(g.store().usage_count().await.unwrap(), 1);
    g.shutdown().await;
}

#[tokio::test]
async fn a_keyed_reserve_retry_waits_for_the_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, g) = gated(dir.path()).await;
    let mut req = reserve(subject("t", "u"), 5000);
    req.idempotency_key = Some(IdempotencyKey::parse("res").unwrap());
    store.hold.store(true, Ordering::SeqCst);
    let (g1, r1) = (g.clone(), req.clone());
    let first = tokio::spawn(async move { g1.reserve(r1).await.unwrap().unwrap() });
    let (a, b) = retry_waits(&store, first, || {
        let g2 = g.clone();
        tokio::spawn(async move { g2.reserve(req).await.unwrap().unwrap() })
    })
    .await;
    assert_eq!(a.reservation, b.reservation);
    assert!(b.replayed);
    g.shutdown().await;
}

#[tokio::test]
async fn a_keyed_reservation_is_answered_after_memory_forgot_it_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let g = manual(dir.path(), &clock).await;
    let mut req = reserve(subject("t", "u"), 5000);
    req.idempotency_key = Some(IdempotencyKey::parse("long-lived").unwrap());
    req.ttl_us = Some(3600 * SECOND);
    let first = g.reserve(req.clone()).await.unwrap().unwrap();
    // Past the ledger's ten minutes of memory for keys, within the reservation's hour.
    for _ in 0..3 {
        clock.advance(10 * 60 * SECOND);
        g.sweep().await.unwrap();
    }
    let again = g.reserve(req.clone()).await.unwrap().unwrap();
    assert_eq!(again.reservation.id, first.reservation.id);
    assert!(again.replayed);
    g.commit(first.reservation.id, commit(1000)).await.unwrap();
    g.shutdown().await;
    drop(g);

    // After a restart, the key of a settled (committed) reservation is still answered.
    clock.advance(60 * SECOND);
    let g = manual(dir.path(), &clock).await;
    let again = g.reserve(req.clone()).await.unwrap().unwrap();
    assert_eq!(again.reservation.id, first.reservation.id);
    assert!(again.replayed);
    // The same key with another request is a conflict.
    let mut other = req.clone();
    other.input_tokens += 1;
    assert!(matches!(
        g.reserve(other).await,
        Err(GuardError::Ledger(LedgerError::IdempotencyConflict(_)))
    ));
    assert_eq!(g.store().usage_count().await.unwrap(), 1);
    g.shutdown().await;
}

fn unpriced(tenant: &str, user: &str) -> Subject {
    Subject {
        model: ModelName::parse("house-model-7").unwrap(),
        ..subject(tenant, user)
    }
}

#[tokio::test]
async fn an_unpriced_model_is_never_charged_zero() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(sqlite(&dir.path().join("db")).await, dir.path()).await;
    // Admitted on the caller's own estimate, committed without a cost.
    let r = g
        .reserve(reserve(unpriced("t", "u"), 8000))
        .await
        .unwrap()
        .unwrap();
    let mut c = commit(0);
    c.cost = None;
    let committed = g.commit(r.reservation.id, c).await.unwrap();
    assert_eq!(committed.usage.cost, Money::from_micros(8000));
    assert_eq!(committed.usage.pricing, Pricing::Estimate);
    // A call that already happened on an unknown model is recorded at the default price.
    let rec = g
        .record(RecordRequest {
            id: Uuid::nil(),
            subject: unpriced("t", "u"),
            tokens: Tokens {
                input: 1000,
                cached_input: 0,
                output: 1000,
                ..Default::default()
            },
            cost: None,
            status: RequestStatus::Success,
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert!(rec.cost > Money::ZERO);
    assert_eq!(rec.pricing, Pricing::Default);
    let stored = g.store().usage(rec.id).await.unwrap().unwrap();
    assert_eq!(stored.pricing, Pricing::Default);
    let stored = g.store().usage(committed.usage.id).await.unwrap().unwrap();
    assert_eq!(stored.pricing, Pricing::Estimate);
    assert_rollups_match(g.store()).await;
    g.shutdown().await;
}

/// A guard whose store is down and whose spool fails on demand: writes cannot be made
/// durable at all.
async fn unwritable(
    dir: &std::path::Path,
) -> (
    Guard<FlakyStore<AnyStore>>,
    Arc<AtomicBool>,
    Arc<AtomicBool>,
) {
    let store = FlakyStore {
        inner: sqlite(&dir.join("db")).await,
        down: Default::default(),
    };
    let down = store.down.clone();
    let spool_fails = Arc::new(AtomicBool::new(false));
    let mut options = GuardOptions::new(dir.join("spool"));
    options.spool_faults = Some(spool_fails.clone());
    let g = start_with(store, options, Arc::new(spendguard_guard::SystemClock)).await;
    (g, down, spool_fails)
}

fn user_day(g: &Guard<FlakyStore<AnyStore>>, s: &Subject) -> (Amount, Amount) {
    let l = g
        .limits(&s.tenant, &s.user, None, None)
        .unwrap()
        .into_iter()
        .find(|l| matches!(l.scope, ScopeKey::User(..)) && l.window == Window::Day)
        .unwrap();
    (l.used, l.reserved)
}

const NOTHING: (Amount, Amount) = (Amount::Usd(Money::ZERO), Amount::Usd(Money::ZERO));

#[tokio::test]
async fn a_write_that_cannot_be_made_durable_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (g, down, spool_fails) = unwritable(dir.path()).await;
    let s = subject("t", "u");
    let usd = |m| Amount::Usd(Money::from_micros(m));

    // Reserve: refused, nothing held, and the key is free for the retry.
    let mut req = reserve(s.clone(), 5000);
    req.idempotency_key = Some(IdempotencyKey::parse("k1").unwrap());
    down.store(true, Ordering::SeqCst);
    spool_fails.store(true, Ordering::SeqCst);
    assert!(g.reserve(req.clone()).await.is_err());
    assert_eq!(user_day(&g, &s), NOTHING);
    assert_eq!(g.ledger().open_reservations(), 0);
    down.store(false, Ordering::SeqCst);
    spool_fails.store(false, Ordering::SeqCst);
    let r = g.reserve(req.clone()).await.unwrap().unwrap();
    assert!(!r.replayed, "the failed attempt left its key behind");
    let id = r.reservation.id;
    assert_eq!(user_day(&g, &s), (usd(0), usd(5000)));

    // Commit: refused, the reservation stays open with its estimate.
    down.store(true, Ordering::SeqCst);
    spool_fails.store(true, Ordering::SeqCst);
    assert!(g.commit(id, commit(3000)).await.is_err());
    assert_eq!(user_day(&g, &s), (usd(0), usd(5000)));
    // Release: refused likewise.
    assert!(g.release(id, None).await.is_err());
    assert_eq!(user_day(&g, &s), (usd(0), usd(5000)));
    down.store(false, Ordering::SeqCst);
    spool_fails.store(false, Ordering::SeqCst);
    let c = g.commit(id, commit(3000)).await.unwrap();
    assert!(!c.replayed);
    assert_eq!(user_day(&g, &s), (usd(3000), usd(0)));

    // Record: refused, nothing counted, the key is free.
    let rec = RecordRequest {
        id: Uuid::nil(),
        subject: s.clone(),
        tokens: Tokens::default(),
        cost: Some(Money::from_micros(70)),
        status: RequestStatus::Success,
        idempotency_key: Some(IdempotencyKey::parse("r1").unwrap()),
    };
    down.store(true, Ordering::SeqCst);
    spool_fails.store(true, Ordering::SeqCst);
    assert!(g.record(rec.clone()).await.is_err());
    assert_eq!(user_day(&g, &s), (usd(3000), usd(0)));
    down.store(false, Ordering::SeqCst);
    spool_fails.store(false, Ordering::SeqCst);
    g.record(rec).await.unwrap();
    assert_eq!(user_day(&g, &s), (usd(3070), usd(0)));
    assert_eq!(g.store().inner.usage_count().await.unwrap(), 2);
    assert_rollups_match(&g.store().inner).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_removed_tier_does_not_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let with_gold =
        format!("{POLICY}\n[tiers.gold]\nusd_per_day = \"5000\"\nallowed_models = [\"*\"]\n");
    let policy = Config::from_toml(&with_gold).unwrap().validate().unwrap();
    let options = || GuardOptions::new(dir.path().join("spool"));
    let g = Guard::start(
        sqlite(&dir.path().join("db")).await,
        policy,
        options(),
        Arc::new(spendguard_guard::SystemClock),
    )
    .await
    .unwrap();
    let s = subject("t", "u");
    let overrides = UserOverrides {
        tier: Some(TierName::parse("gold").unwrap()),
        max_concurrent: Some(3),
        ..UserOverrides::default()
    };
    g.set_user(s.tenant.clone(), s.user.clone(), overrides)
        .await
        .unwrap();
    g.shutdown().await;
    drop(g);
    // The gold tier is gone from the configuration: the user falls back to the default
    // tier and keeps the other overrides.
    let g = start(sqlite(&dir.path().join("db")).await, dir.path()).await;
    let kept = g.ledger().user_overrides(&s.tenant, &s.user).unwrap();
    assert_eq!(kept.tier, None);
    assert_eq!(kept.max_concurrent, Some(3));
    assert!(g.reserve(reserve(s, 100)).await.unwrap().is_ok());
    g.shutdown().await;
}

#[tokio::test]
async fn a_settled_reservation_names_its_tenant_after_memory_forgot_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let g = manual(dir.path(), &clock).await;
    let r = g.reserve(reserve(subject("t", "u"), 5000)).await.unwrap();
    let id = r.unwrap().reservation.id;
    g.release(id, Some("not needed".into())).await.unwrap();
    clock.advance(10 * SECOND);
    g.sweep().await.unwrap();
    assert_eq!(g.ledger().reservation_tenant(&id), None);
    assert_eq!(
        g.reservation_tenant(id).await.unwrap(),
        Some(TenantId::parse("t").unwrap())
    );
    // Releasing again still answers (released), as for the admin.
    assert!(g.release(id, None).await.is_ok());
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_admin_updates_keep_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(sqlite(&dir.path().join("db")).await, dir.path()).await;
    let n = 200;
    let mut tasks = Vec::new();
    for i in 0..n {
        let scope = ScopeKey::Tenant(TenantId::parse(&format!("t{i}")).unwrap());
        for daily in [true, false] {
            let (g, scope) = (g.clone(), scope.clone());
            tasks.push(tokio::spawn(async move {
                g.update_budget(scope, |b| {
                    // A slow change (or a preempted thread) widens the window between
                    // reading the current value and writing the new one, where an
                    // unserialized read-modify-write loses the other field.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    let m = Some(Money::from_micros(1000 + i));
                    if daily {
                        BudgetOverride { daily: m, ..b }
                    } else {
                        BudgetOverride { monthly: m, ..b }
                    }
                })
                .await
                .unwrap()
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expect = |i: i64| BudgetOverride {
        daily: Some(Money::from_micros(1000 + i)),
        monthly: Some(Money::from_micros(1000 + i)),
    };
    for i in 0..n {
        let scope = ScopeKey::Tenant(TenantId::parse(&format!("t{i}")).unwrap());
        assert_eq!(g.ledger().budget_override(&scope), Some(expect(i)));
    }
    g.shutdown().await;
    drop(g);
    // What was persisted last is the merged value too.
    let g = start(sqlite(&dir.path().join("db")).await, dir.path()).await;
    for i in 0..n {
        let scope = ScopeKey::Tenant(TenantId::parse(&format!("t{i}")).unwrap());
        assert_eq!(g.ledger().budget_override(&scope), Some(expect(i)), "t{i}");
    }
    g.shutdown().await;
}

#[tokio::test]
async fn a_changed_time_zone_is_refused_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let in_zone = |zone: &str| {
        Config::from_toml(&format!("time_zone = \"{zone}\"\n{POLICY}"))
            .unwrap()
            .validate()
            .unwrap()
    };
    let clock = ManualClock::new(T0 + 2 * 3600 * SECOND);
    let options = || GuardOptions::new(dir.path().join("spool"));
    let s = subject("t", "u");
    let g = Guard::start(sqlite(&db).await, in_zone("UTC"), options(), clock.clone())
        .await
        .unwrap();
    let r = g.reserve(reserve(s.clone(), 5000)).await.unwrap().unwrap();
    g.commit(r.reservation.id, commit(300_000)).await.unwrap();
    g.shutdown().await;
    drop(g);
    // West (today's spend would be dropped) and east (it would stop counting).
    for zone in ["America/New_York", "Asia/Tokyo"] {
        let err = Guard::start(sqlite(&db).await, in_zone(zone), options(), clock.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, GuardError::TimeZoneChanged { stored, configured } if stored == "UTC" && configured == zone),
            "{err}"
        );
    }
    // The recorded zone still starts, with today's spend.
    let g = Guard::start(sqlite(&db).await, in_zone("UTC"), options(), clock.clone())
        .await
        .unwrap();
    let used = g
        .limits(&s.tenant, &s.user, None, None)
        .unwrap()
        .into_iter()
        .find(|l| matches!(l.scope, ScopeKey::User(..)) && l.window == Window::Day)
        .unwrap()
        .used;
    assert_eq!(used, Amount::Usd(Money::from_micros(300_000)));
    g.shutdown().await;
}
