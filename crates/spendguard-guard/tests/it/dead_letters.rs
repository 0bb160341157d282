//! A batch the store rejects for good (a value it cannot hold) must not stop the writer:
//! the bad event is isolated and dead-lettered, its caller gets an error, the rest of the
//! batch and every later batch are stored, and a restart works.

use std::sync::Arc;
use std::time::Duration;

use spendguard_core::*;
use spendguard_guard::{GuardOptions, StoreHealth, SystemClock};
use spendguard_store::{AnyStore, OpenOptions, Store, StoreError, StoredReservation};
use uuid::Uuid;

use crate::support::*;

/// A store that refuses, as a permanent error, every batch holding a release whose reason
/// is `poison` (as PostgreSQL refuses a NUL in `text`).
pub struct PoisonStore<S> {
    pub inner: S,
}

fn poisoned(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Released { reason: Some(r), .. } if r == "poison"))
}

impl<S: Store> Store for PoisonStore<S> {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if poisoned(events) {
            return Err(StoreError::Invalid("a value the store cannot hold".into()));
        }
        self.inner.apply(events).await
    }
    forward_store!(inner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanently_rejected_event_is_dead_lettered_and_its_batch_mates_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = PoisonStore {
        inner: sqlite(&dir.path().join("db")).await,
    };
    let g = start(store, dir.path()).await;
    let bad = g
        .reserve(reserve(subject("t", "bad"), 10_000))
        .await
        .unwrap()
        .unwrap();
    // The poisoned release and many commits, all in flight at once, so they share batches.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let r = g
                .reserve(reserve(subject("t", &format!("u{i}")), 10_000))
                .await
                .unwrap()
                .unwrap();
            g.commit(r.reservation.id, commit(1_000)).await
        }));
    }
    let released = g.release(bad.reservation.id, Some("poison".into())).await;
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(
            t.await
                .unwrap()
                .expect("a good event failed with the bad one")
                .usage
                .id,
        );
    }
    assert!(
        released.is_err(),
        "a release the store refused was acknowledged"
    );
    // Nothing waits in the spool: every good event reached the store.
    assert_eq!(
        g.stats().spool_depth,
        0,
        "good events were spooled behind the bad one"
    );
    assert_eq!(g.health(), StoreHealth::Ok);
    for id in &acked {
        assert!(
            g.store().inner.usage(*id).await.unwrap().is_some(),
            "lost {id}"
        );
    }
    // Later batches are stored too.
    let r = g
        .reserve(reserve(subject("t", "later"), 10_000))
        .await
        .unwrap()
        .unwrap();
    let c = g.commit(r.reservation.id, commit(1_000)).await.unwrap();
    assert!(g.store().inner.usage(c.usage.id).await.unwrap().is_some());
    assert_rollups_match(&g.store().inner).await;
    // The refused release is kept, with its error, and counted.
    let letters = g.store().inner.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].event.contains("poison"));
    assert!(letters[0].error.contains("cannot hold"));
    assert_eq!(g.stats().dead_letters, 1);
    assert!(g.ready());
    g.shutdown().await;
}

fn url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_release_reason_blocks_nothing_on_postgres_and_a_restart_works() {
    let Some(url) = pg_url() else { return };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = format!("sg_nul_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
    let url = url_with_schema(&url, &schema);
    let dir = tempfile::tempdir().unwrap();
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.retry_interval = Duration::from_millis(50);
    let store = AnyStore::open(&url, &OpenOptions::default()).await.unwrap();
    let g = start_with(store, options.clone(), Arc::new(SystemClock)).await;
    let bad = g
        .reserve(reserve(subject("t", "bad"), 10_000))
        .await
        .unwrap()
        .unwrap();
    let released = g
        .release(bad.reservation.id, Some("bad\0reason".into()))
        .await;
    assert!(
        released.is_err(),
        "a release PostgreSQL cannot store was acknowledged"
    );
    // The batches after it go to the store, not to the spool.
    let r = g
        .reserve(reserve(subject("t", "u"), 10_000))
        .await
        .unwrap()
        .unwrap();
    let c = g.commit(r.reservation.id, commit(1_000)).await.unwrap();
    assert_eq!(g.stats().spool_depth, 0, "later batches were spooled");
    assert!(g.store().usage(c.usage.id).await.unwrap().is_some());
    let letters = g.store().dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].event.contains("bad\\u0000reason"), "{letters:?}");
    // A value PostgreSQL cannot hold is a permanent error (SQLSTATE class 22), found before
    // the batch is journaled.
    assert!(letters[0].error.contains("22021"), "{letters:?}");
    g.shutdown().await;
    drop(g);
    // A restart works and finds the good record.
    let store = AnyStore::open(&url, &OpenOptions::default()).await.unwrap();
    let g = restart(store, options).await;
    assert!(g.store().usage(c.usage.id).await.unwrap().is_some());
    assert_rollups_match(g.store()).await;
    g.shutdown().await;
    drop(g);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

async fn restart(store: AnyStore, options: GuardOptions) -> spendguard_guard::Guard<AnyStore> {
    spendguard_guard::Guard::start(store, policy(), options, Arc::new(SystemClock))
        .await
        .expect("the guard could not start again")
}

/// Spooled during an outage, a refused event is found when the spool is replayed: it is
/// dead-lettered, the batches around it are stored and the spool is emptied, instead of the
/// replay retrying it forever with everything behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_in_the_spool_is_dead_lettered_at_replay() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = FlakyStore {
        inner: sqlite(&dir.path().join("db")).await,
        down: Default::default(),
    };
    let down = flaky.down.clone();
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.retry_interval = Duration::from_millis(20);
    let g = start_with(PoisonStore { inner: flaky }, options, Arc::new(SystemClock)).await;
    let s = subject("t", "u");
    let bad = g
        .reserve(reserve(s.clone(), 10_000))
        .await
        .unwrap()
        .unwrap();
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = g
        .reserve(reserve(s.clone(), 10_000))
        .await
        .unwrap()
        .unwrap();
    let before = g
        .commit(before.reservation.id, commit(1_000))
        .await
        .unwrap();
    // Spooled, so acknowledged: the store is not asked yet.
    g.release(bad.reservation.id, Some("poison".into()))
        .await
        .unwrap();
    let after = g
        .reserve(reserve(s.clone(), 10_000))
        .await
        .unwrap()
        .unwrap();
    let after = g.commit(after.reservation.id, commit(1_000)).await.unwrap();
    assert!(g.stats().spool_depth >= 3);
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while g.health() != StoreHealth::Ok {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spool was never drained: {:?}",
            g.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(g.stats().spool_depth, 0);
    let store = &g.store().inner.inner;
    for id in [before.usage.id, after.usage.id] {
        assert!(store.usage(id).await.unwrap().is_some(), "lost {id}");
    }
    let letters = store.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].event.contains("poison"));
    assert_eq!(g.stats().dead_letters, 1);
    assert_rollups_match(store).await;
    g.shutdown().await;
}
