//! The write path's failures are survived and visible: the expiry sweeper outlives a spool
//! failure and retries, `ready()` (behind `/readyz`) reports a failing spool, and a spool
//! that cannot be read whole refuses the start instead of dropping anything.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spendguard_guard::spool;
use spendguard_guard::{Clock, Guard, GuardOptions, ManualClock, SystemClock};
use spendguard_store::{ReservationState, Store};

use crate::support::*;

/// Polls `f` until it is true; fails with `what` after ten seconds.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_survives_a_spool_failure_and_readiness_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore {
        inner: sqlite(&dir.path().join("db")).await,
        down: Default::default(),
    };
    let down = store.down.clone();
    let clock = ManualClock::new(SystemClock.now());
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.sweep_interval = Duration::from_millis(10);
    options.retry_interval = Duration::from_millis(10);
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    options.spool_faults = Some(fail.clone());
    let g = start_with(store, options, clock.clone()).await;
    let mut req = reserve(subject("t", "u"), 10_000);
    req.ttl_us = Some(1_000_000);
    let a = g.reserve(req.clone()).await.unwrap().unwrap();

    // The store is down and the spool cannot be written: the sweep of `a` fails.
    down.store(true, Ordering::SeqCst);
    fail.store(true, Ordering::SeqCst);
    clock.advance(2_000_000);
    eventually("the failing spool is reported", || async { !g.ready() }).await;

    // Both heal: the sweeper is still there, retries `a` and expires what comes next.
    fail.store(false, Ordering::SeqCst);
    down.store(false, Ordering::SeqCst);
    let id = a.reservation.id;
    eventually("the expiry of `a` reaches the store", || async {
        matches!(
            g.store().inner.reservation(id).await.unwrap(),
            Some(r) if r.state == ReservationState::Expired
        )
    })
    .await;
    let b = g.reserve(req).await.unwrap().unwrap();
    clock.advance(2_000_000);
    let id = b.reservation.id;
    eventually("a later reservation expires", || async {
        matches!(
            g.store().inner.reservation(id).await.unwrap(),
            Some(r) if r.state == ReservationState::Expired
        )
    })
    .await;
    eventually("ready again", || async { g.ready() }).await;
    assert_rollups_match(&g.store().inner).await;
    g.shutdown().await;
}

#[tokio::test]
async fn a_spool_with_an_unreadable_frame_refuses_the_start_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let spool_path = dir.path().join("spool");
    // Two acknowledged batches left in the spool while the store was down.
    let (first_end, acked) = {
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
        let first_end = std::fs::metadata(&spool_path).unwrap().len();
        let c = g.commit(r.reservation.id, commit(5_000)).await.unwrap();
        g.shutdown().await;
        (first_end, c.usage.id)
    };
    // The first frame is damaged (a flipped byte inside it).
    let mut bytes = std::fs::read(&spool_path).unwrap();
    bytes[first_end as usize - 2] ^= 0x55;
    std::fs::write(&spool_path, &bytes).unwrap();

    let err = Guard::start(
        sqlite(&db).await,
        policy(),
        GuardOptions::new(&spool_path),
        Arc::new(SystemClock),
    )
    .await
    .expect_err("started over a damaged spool");
    let message = err.to_string();
    assert!(
        message.contains(&spool_path.display().to_string()),
        "the error does not name the file: {message}"
    );
    // Nothing was cut: the acknowledged commit behind the bad frame is still on disk.
    assert_eq!(std::fs::read(&spool_path).unwrap(), bytes);
    let store = sqlite(&db).await;
    assert!(store.usage(acked).await.unwrap().is_none());
    drop(store);
    // The error names the byte offset of the bad frame, the first one.
    let scan = spool::scan(&spool_path).unwrap();
    let Some(spool::Problem::Bad { offset, .. }) = scan.problem else {
        panic!("the scan found no damage: {scan:?}");
    };
    assert!(offset < first_end);
    assert!(
        message.contains(&format!("byte {offset}")),
        "the error does not name the offset: {message}"
    );
}
