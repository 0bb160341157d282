//! Dashboard page render times over a large history: the generated history of the report
//! benchmark (N records, default 10,000,000, over 90 days; 100 tenants, 10,000 users), a
//! stored tier for every one of the 10,000 users (so each has budgets to meter), then each
//! page rendered through the router (`app(state).oneshot`, so the time is the server's:
//! reads, metering, HTML), 20 times; medians and p95 in ms.
//!
//! ```text
//! cargo bench -p spendguard-server --bench dashboard -- [--records N] [--runs N]
//! ```

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use spendguard_core::{Config, TenantId, TierName, UserId, UserOverrides};
use spendguard_guard::{Guard, GuardOptions, ManualClock};
use spendguard_server::{AppState, KeyRing, app};
use spendguard_store::{AnyStore, OpenOptions, SqliteStore};
use tower::ServiceExt;

#[path = "../../spendguard-store/benches/common/seed.rs"]
mod seed;

const ADMIN: &str = "dashboard-bench-admin-key-0123456789abcdef";

fn args() -> (u64, usize) {
    let (mut records, mut runs) = (10_000_000u64, 20usize);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--records" => records = it.next().and_then(|v| v.parse().ok()).expect("N"),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).expect("N"),
            _ => {}
        }
    }
    (records, runs)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let (records, runs) = args();
    let started = Instant::now();
    let dir =
        std::env::temp_dir().join(format!("spendguard-dashboard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dashboard.db").to_string_lossy().into_owned();
    {
        let store = SqliteStore::open(&path, &OpenOptions::default())
            .await
            .expect("open the store");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1048576;")
            .unwrap();
        let mut start = 0;
        while start < records {
            let end = (start + seed::CHUNK).min(records);
            conn.execute(
                seed::SQLITE_INSERT,
                rusqlite::params![start as i64, end as i64, seed::FIRST_DAY, seed::DAY],
            )
            .unwrap();
            eprintln!("inserted {end} records ({:.0?})", started.elapsed());
            start = end;
        }
        conn.execute_batch(&seed::fill_rollups_sql("cost_micros"))
            .unwrap();
        let store = AnyStore::Sqlite(store);
        store.rebuild_usage_rollups().await.expect("rebuild");
        store.close().await;
        eprintln!("built the rollups ({:.0?})", started.elapsed());
    }
    // Noon of the last of the 90 days.
    let now = seed::FIRST_DAY + (seed::DAYS - 1) * seed::DAY + 12 * 3_600_000_000;
    let config = Config::from_toml(
        "[tenant]\nusd_per_day = \"500\"\nusd_per_month = \"10000\"\n\
         [tiers.pro]\nusd_per_day = \"50\"\nusd_per_month = \"1000\"\n",
    )
    .unwrap();
    let policy = config.validate().unwrap();
    let store = AnyStore::open(&path, &OpenOptions::default())
        .await
        .unwrap();
    let guard = Guard::start(
        store,
        policy,
        GuardOptions::new(dir.join("spool")),
        ManualClock::new(now),
    )
    .await
    .unwrap();
    eprintln!("started ({:.0?})", started.elapsed());
    // Every user has a stored tier: 10,000 users with budgets to meter.
    for u in 0..10_000u32 {
        guard
            .set_user(
                TenantId::parse(&format!("tenant-{}", u % 100)).unwrap(),
                UserId::parse(&format!("user-{u}@example.com")).unwrap(),
                UserOverrides {
                    tier: Some(TierName::parse("pro").unwrap()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    eprintln!("stored 10,000 users' tiers ({:.0?})", started.elapsed());
    let keys = KeyRing::load(guard.store(), Some(ADMIN)).await.unwrap();
    let state = AppState::new(guard.clone(), keys);
    state.alerts.evaluate().await.unwrap();
    let router = app(state);
    let pages = [
        ("overview, last 30 days (the default)", "/"),
        ("overview, this month", "/?range=month"),
        ("overview, 7 days", "/?range=7d"),
        ("overview, 90 days", "/?range=90d"),
        ("overview, one model, 30 days", "/?model=model-3"),
        ("a tenant, 30 days", "/tenants/tenant-7"),
        ("a tenant, 90 days", "/tenants/tenant-7?range=90d"),
        (
            "a company, 30 days",
            "/tenants/tenant-7/companies/company-7-3",
        ),
        (
            "a user, 30 days",
            "/tenants/tenant-7/users/user-107@example.com",
        ),
        ("a model, 30 days", "/models/model-3"),
        ("alerts", "/alerts"),
        ("audit log", "/audit"),
    ];
    println!("| page | median ms | p95 ms | bytes |");
    println!("|---|---|---|---|");
    for (name, uri) in pages {
        let mut times = Vec::with_capacity(runs);
        let mut bytes = 0;
        for _ in 0..runs {
            let req = Request::get(uri)
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(Body::empty())
                .unwrap();
            let t = Instant::now();
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            times.push(t.elapsed());
            assert_eq!(status, 200, "{uri}: {}", String::from_utf8_lossy(&body));
            bytes = body.len();
        }
        times.sort();
        let median = times[times.len() / 2];
        let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
        println!("| {name} | {:.1} | {:.1} | {bytes} |", ms(median), ms(p95));
    }
    guard.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
