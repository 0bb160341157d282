//! Acknowledged means durable; a restart restores exactly what was acknowledged; the spool
//! absorbs store failures and is replayed exactly once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use spendguard_core::*;
use spendguard_guard::{GuardError, GuardOptions, ManualClock, OnStoreError, StoreHealth};
use spendguard_store::{ReservationState, Store};

use crate::support::*;

#[tokio::test]
async fn acknowledged_operations_are_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(sqlite(&dir.path().join("db")).await, dir.path()).await;
    let r = g
        .reserve(reserve(subject("t", "u"), 5000))
        .await
        .unwrap()
        .unwrap();
    let id = r.reservation.id;
    assert_eq!(id.get_version_num(), 7);
    let state = g.store().reservation(id).await.unwrap().unwrap().state;
    assert_eq!(state, ReservationState::Open);
    let c = g.commit(id, commit(3000)).await.unwrap();
    let stored = g.store().usage(c.usage.id).await.unwrap().unwrap();
    assert_eq!(stored.cost, Money::from_micros(3000));
    assert_eq!(stored.reservation_id, Some(id));
    let stored = g.store().reservation(id).await.unwrap().unwrap();
    let (state, usage) = (stored.state, stored.usage);
    assert_eq!(
        (state, usage.map(|u| u.id)),
        (ReservationState::Committed, Some(c.usage.id))
    );
    let mut rec = RecordRequest {
        id: uuid::Uuid::nil(),
        subject: subject("t", "u"),
        tokens: Tokens {
            input: 1,
            cached_input: 0,
            output: 1,
            ..Default::default()
        },
        cost: Some(Money::from_micros(7)),
        status: RequestStatus::Error,
        idempotency_key: Some(IdempotencyKey::parse("rec-1").unwrap()),
    };
    let u = g.record(rec.clone()).await.unwrap();
    assert!(g.store().usage(u.id).await.unwrap().is_some());
    // The same key again: the same record, nothing new.
    assert_eq!(g.record(rec.clone()).await.unwrap().id, u.id);
    rec.cost = Some(Money::from_micros(8));
    assert!(matches!(
        g.record(rec).await,
        Err(GuardError::Ledger(LedgerError::IdempotencyConflict(_)))
    ));
    assert_eq!(g.store().usage_count().await.unwrap(), 2);
    assert_rollups_match(g.store()).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_restart_restores_counters_and_open_reservations() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let s = subject("t", "u");
    let (open_id, before) = {
        let g = start(sqlite(&db).await, dir.path()).await;
        for i in 0..20 {
            let r = g
                .reserve(reserve(s.clone(), 10_000))
                .await
                .unwrap()
                .unwrap();
            g.commit(r.reservation.id, commit(1000 + i)).await.unwrap();
        }
        let open = g
            .reserve(reserve(s.clone(), 25_000))
            .await
            .unwrap()
            .unwrap();
        g.set_budget(
            ScopeKey::Tenant(s.tenant.clone()),
            BudgetOverride {
                daily: Some(Money::from_micros(9_000_000)),
                monthly: None,
            },
        )
        .await
        .unwrap();
        let limits = g
            .limits(&s.tenant, &s.user, s.company.as_ref(), None)
            .unwrap();
        g.shutdown().await;
        (open.reservation.id, limits)
    };
    let g = start(sqlite(&db).await, dir.path()).await;
    let after = g
        .limits(&s.tenant, &s.user, s.company.as_ref(), None)
        .unwrap();
    let strip = |v: Vec<LimitStatus>| {
        v.into_iter()
            .filter(|l| l.window != Window::Minute)
            .map(|l| (l.scope, l.window, l.unit, l.limit, l.used, l.reserved))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(after), strip(before));
    // The open reservation survived and can be committed.
    let c = g.commit(open_id, commit(20_000)).await.unwrap();
    assert!(!c.late);
    g.shutdown().await;
}

#[tokio::test]
async fn reservations_that_expired_while_down_are_expired_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let clock = ManualClock::new(1_710_028_800_000_000);
    let options = || GuardOptions::new(dir.path().join("spool"));
    let id = {
        let g = start_with(sqlite(&db).await, options(), clock.clone()).await;
        let mut req = reserve(subject("t", "u"), 10_000);
        req.ttl_us = Some(60_000_000);
        let id = g.reserve(req).await.unwrap().unwrap().reservation.id;
        g.shutdown().await;
        id
    };
    clock.advance(61_000_000);
    let g = start_with(sqlite(&db).await, options(), clock.clone()).await;
    assert_eq!(g.ledger().open_reservations(), 0);
    let stored = g.store().reservation(id).await.unwrap().unwrap();
    let (state, usage) = (stored.state, stored.usage);
    assert_eq!(state, ReservationState::Expired);
    assert_eq!(usage.unwrap().status, RequestStatus::Expired);
    let s = subject("t", "u");
    let limits = g.limits(&s.tenant, &s.user, None, None).unwrap();
    assert!(
        limits
            .iter()
            .all(|l| l.reserved == Amount::Usd(Money::ZERO) || l.reserved == Amount::Count(0))
    );
    // A commit long after expiry is still recorded, from the store's answer.
    let c = g.commit(id, commit(4000)).await.unwrap();
    assert!(c.late);
    assert_eq!(
        g.store().usage(c.usage.id).await.unwrap().unwrap().cost,
        Money::from_micros(4000)
    );
    g.shutdown().await;
}

#[tokio::test]
async fn a_failing_store_is_spooled_and_replayed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore {
        inner: sqlite(&dir.path().join("db")).await,
        down: Default::default(),
    };
    let down = store.down.clone();
    let g = start(store, dir.path()).await;
    let s = subject("t", "u");
    let mut acked = Vec::new();
    for i in 0..10 {
        if i == 3 {
            down.store(true, Ordering::SeqCst);
        }
        let r = g
            .reserve(reserve(s.clone(), 10_000))
            .await
            .unwrap()
            .unwrap();
        acked.push(
            g.commit(r.reservation.id, commit(5_000))
                .await
                .unwrap()
                .usage
                .id,
        );
    }
    assert_eq!(g.health(), StoreHealth::Spooling);
    assert!(g.stats().spool_depth > 0);
    // Enforcement went on from memory.
    let used = g.limits(&s.tenant, &s.user, None, None).unwrap();
    let day = used
        .iter()
        .find(|l| {
            l.scope.kind() == ScopeKind::User && l.window == Window::Day && l.unit == Unit::Usd
        })
        .unwrap();
    assert_eq!(day.used, Amount::Usd(Money::from_micros(50_000)));
    down.store(false, Ordering::SeqCst);
    // The writer retries on its own; wait until it reports the spool empty.
    for _ in 0..200 {
        if g.health() == StoreHealth::Ok {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(g.health(), StoreHealth::Ok);
    assert_eq!(g.stats().spool_depth, 0);
    for id in &acked {
        assert!(
            g.store().inner.usage(*id).await.unwrap().is_some(),
            "lost {id}"
        );
    }
    assert_eq!(g.store().inner.usage_count().await.unwrap(), 10);
    assert_rollups_match(&g.store().inner).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_spool_left_by_a_crash_is_replayed_at_start_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let acked = {
        let store = FlakyStore {
            inner: sqlite(&db).await,
            down: Default::default(),
        };
        let down = store.down.clone();
        let g = start(store, dir.path()).await;
        down.store(true, Ordering::SeqCst);
        let r = g
            .reserve(reserve(subject("t", "u"), 10_000))
            .await
            .unwrap()
            .unwrap();
        let c = g.commit(r.reservation.id, commit(5_000)).await.unwrap();
        // Stopped while the store is still down: the spool stays on disk, as after a crash.
        g.shutdown().await;
        assert!(g.stats().spool_depth > 0);
        assert!(g.store().inner.usage(c.usage.id).await.unwrap().is_none());
        c.usage.id
    };
    let spool = dir.path().join("spool");
    std::fs::copy(&spool, dir.path().join("spool.copy")).unwrap();
    let g = start(sqlite(&db).await, dir.path()).await;
    assert!(g.store().usage(acked).await.unwrap().is_some());
    assert_eq!(g.store().usage_count().await.unwrap(), 1);
    assert_rollups_match(g.store()).await;
    g.shutdown().await;
    drop(g);
    // Emptied: only its header is left.
    let scan = spendguard_guard::spool::scan(&spool).unwrap();
    assert!(scan.frames.is_empty() && scan.header.is_some(), "{scan:?}");
    assert_eq!(scan.file_len, scan.header.unwrap().len);
    // Replaying the same spool twice (a crash before it was cleared) counts once.
    std::fs::copy(dir.path().join("spool.copy"), &spool).unwrap();
    let g = start(sqlite(&db).await, dir.path()).await;
    assert_eq!(g.store().usage_count().await.unwrap(), 1);
    g.shutdown().await;
}

#[tokio::test]
async fn deny_mode_refuses_new_reservations_while_the_store_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore {
        inner: sqlite(&dir.path().join("db")).await,
        down: Default::default(),
    };
    let down = store.down.clone();
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.on_store_error = OnStoreError::Deny;
    let g = start_with(store, options, Arc::new(spendguard_guard::SystemClock)).await;
    let open = g
        .reserve(reserve(subject("t", "u"), 10_000))
        .await
        .unwrap()
        .unwrap();
    down.store(true, Ordering::SeqCst);
    // The commit of an admitted call is spooled, not lost; it still answers.
    let c = g.commit(open.reservation.id, commit(1_000)).await.unwrap();
    assert!(!g.ready());
    assert!(matches!(
        g.reserve(reserve(subject("t", "u"), 10_000)).await,
        Err(GuardError::Unavailable)
    ));
    down.store(false, Ordering::SeqCst);
    for _ in 0..200 {
        if g.ready() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(g.ready());
    assert!(
        g.reserve(reserve(subject("t", "u"), 10_000))
            .await
            .unwrap()
            .is_ok()
    );
    assert!(g.store().inner.usage(c.usage.id).await.unwrap().is_some());
    g.shutdown().await;
}

#[tokio::test]
async fn an_unacknowledged_reservation_holds_at_once_and_is_stored_before_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let g = start(sqlite(&path).await, dir.path()).await;
    let r = g
        .reserve_unacknowledged(reserve(subject("t", "u"), 5000))
        .await
        .unwrap()
        .unwrap();
    let id = r.reservation.id;
    // Held in memory at once.
    assert_eq!(g.ledger().open_reservations(), 1);
    // The commit, acknowledged durable, comes after the reservation in the store.
    let c = g.commit(id, commit(3000)).await.unwrap();
    let stored = g.store().reservation(id).await.unwrap().unwrap();
    assert_eq!(stored.state, ReservationState::Committed);
    assert_eq!(stored.usage.map(|u| u.id), Some(c.usage.id));
    assert_rollups_match(g.store()).await;
    // One left open is made durable by the writer, and restored after a restart.
    let open = g
        .reserve_unacknowledged(reserve(subject("t", "u"), 700))
        .await
        .unwrap()
        .unwrap();
    g.shutdown().await;
    drop(g);
    let g = start(sqlite(&path).await, dir.path()).await;
    assert_eq!(
        g.ledger()
            .reservation(&open.reservation.id)
            .map(|r| r.estimate),
        Some(Money::from_micros(700))
    );
    g.shutdown().await;
}
