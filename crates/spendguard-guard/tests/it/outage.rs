//! PostgreSQL goes away under load and comes back: decisions go on, nothing is lost,
//! nothing is doubled. The database is cut by a TCP proxy inside the test.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use spendguard_guard::{GuardOptions, StoreHealth, SystemClock};
use spendguard_store::{AnyStore, OpenOptions, Store};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::*;

/// Forwards connections to PostgreSQL until cut; while cut, drops every connection.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

async fn proxy(upstream: SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let mut rx = rx.clone();
            if *rx.borrow() {
                continue; // dropped: connection refused in effect
            }
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = rx.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Proxy { addr, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_load_loses_and_doubles_nothing() {
    let Some(url) = pg_url() else { return };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = format!("sg_outage_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();

    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let p = proxy(upstream).await;
    let user = config.get_user().unwrap_or("postgres");
    let db = config.get_dbname().unwrap_or("test");
    let via_proxy = format!(
        "postgres://{user}@{}/{db}?options=-csearch_path%3D{schema}&connect_timeout=2",
        p.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let store = AnyStore::open(&via_proxy, &OpenOptions::default())
        .await
        .unwrap();
    let mut options = GuardOptions::new(dir.path().join("spool"));
    options.retry_interval = Duration::from_millis(200);
    let g = start_with(store, options, Arc::new(SystemClock)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let g = g.clone();
        let stop = stop.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let s = subject(&format!("t{}", w % 3), &format!("u{w}-{}", n % 20));
                let r = g.reserve(reserve(s, 10_000)).await.unwrap().unwrap();
                let c = g.commit(r.reservation.id, commit(4_000)).await.unwrap();
                acked.push(c.usage.id);
                done.fetch_add(1, Ordering::Relaxed);
            }
            acked
        }));
    }
    // Each phase waits for what it is about (bounded), not for a time.
    let more = |n: u64| {
        let target = done.load(Ordering::Relaxed) + n;
        let done = done.clone();
        move || done.load(Ordering::Relaxed) >= target
    };
    wait_until("acknowledged commits before the outage", more(50)).await;
    p.cut.send(true).unwrap();
    wait_until("the outage noticed", || g.health() == StoreHealth::Spooling).await;
    // Decisions go on while the database is gone.
    wait_until("acknowledged commits during the outage", more(50)).await;
    let spooled = g.stats().spool_depth > 0;
    p.cut.send(false).unwrap();
    wait_until("the spool replayed", || {
        g.health() == StoreHealth::Ok && g.stats().spool_depth == 0
    })
    .await;
    wait_until("acknowledged commits after the outage", more(50)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.await.unwrap());
    }
    g.shutdown().await;
    assert!(spooled, "nothing was spooled during the outage");
    assert_eq!(g.stats().spool_depth, 0, "the spool was not drained");

    let store = AnyStore::open(
        &url_with_schema(&url, &schema),
        &OpenOptions {
            take_writer_lock: false,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let unique: HashSet<_> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len());
    assert_eq!(
        store.usage_count().await.unwrap(),
        acked.len() as u64,
        "lost or doubled records"
    );
    for id in acked.iter().step_by(17) {
        assert!(store.usage(*id).await.unwrap().is_some(), "lost {id}");
    }
    assert_rollups_match(&store).await;
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Polls `cond` every 10 ms until it holds; fails after 60 s (a hung test, not a slow one).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}
