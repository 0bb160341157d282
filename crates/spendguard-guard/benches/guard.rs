//! Benchmarks of the Guard on SQLite: history size against decision latency, and start-up
//! time against the number of active users.
//!
//! ```sh
//! cargo bench -p spendguard-guard --bench guard -- [--history ROWS] [--users N] [--startup-only] [--keep DIR]
//! cargo bench -p spendguard-guard --bench guard -- --startup-only --url postgres://USER@HOST/DB [--schema NAME]
//! ```
//!
//! 1. Seeds a database with `--history` usage rows (default 10,000,000) spread over the
//!    previous 60 days, then measures reserve+commit through the Guard (durable
//!    acknowledgements) with 64 concurrent clients, and the in-memory decision alone,
//!    against the same measurements on an empty database. Prints medians and p99.
//! 2. Seeds `--users` (default 1,000,000) users' counters in the current windows and times
//!    `Guard::start` (restore). With `--url`, on PostgreSQL: in a fresh schema of that
//!    database, dropped afterwards; with `--schema NAME`, in that schema, kept, and reused
//!    without seeding when it already holds the tables (to time start-up again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use spendguard_core::*;
use spendguard_guard::{Guard, GuardOptions, SystemClock};
use spendguard_store::{AnyStore, OpenOptions, Store};
use uuid::Uuid;

const DAY: i64 = 86_400_000_000;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn policy() -> Policy {
    Config::from_toml(
        "default_tier = \"enterprise\"\n[global]\nusd_per_day = \"1000000000\"\nusd_per_month = \"1000000000\"\n\
         [tiers.enterprise]\nrequests_per_minute = \"unlimited\"\nrequests_per_day = \"unlimited\"\n\
         tokens_per_day = \"unlimited\"\nusd_per_day = \"unlimited\"\nusd_per_month = \"unlimited\"\nmax_concurrent = \"unlimited\"",
    )
    .unwrap()
    .validate()
    .unwrap()
}

fn subject(i: u64) -> Subject {
    Subject {
        tenant: TenantId::parse(&format!("tenant-{}", i % 10)).unwrap(),
        user: UserId::parse(&format!("user-{i}")).unwrap(),
        company: Some(CompanyId::parse(&format!("company-{}", i % 100)).unwrap()),
        tier: None,
        trusted_tier: true,
        model: ModelName::parse("gpt-4o-mini").unwrap(),
        endpoint: None,
    }
}

fn usage(i: u64, at: i64, periods_of: &Calendar) -> UsageRecord {
    let p = periods_of.periods(at);
    let s = subject(i % 100_000);
    UsageRecord {
        id: Uuid::from_u64_pair(0xbe, i),
        tenant: s.tenant,
        user: s.user,
        company: s.company,
        model: s.model,
        endpoint: None,
        tier: TierName::parse("enterprise").unwrap(),
        tokens: Tokens {
            input: 300,
            cached_input: 0,
            output: 200,
            ..Default::default()
        },
        cost: Money::from_micros(165),
        pricing: Pricing::Catalog,
        long_context_above: None,
        status: RequestStatus::Success,
        created_at: at,
        reservation_id: None,
        idempotency_key: None,
        day_start: p.day.start,
        month_start: p.month.start,
        origin: None,
    }
}

async fn seed_history(store: &AnyStore, rows: u64, now: i64) {
    let cal = Calendar::utc();
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..rows {
        // Spread over the 60 days before today.
        let at = now - DAY - (i as i64 * 7_919) % (59 * DAY);
        batch.push(Event::Recorded(usage(i, at, &cal)));
        if batch.len() == 10_000 {
            store.apply(&batch).await.unwrap();
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.apply(&batch).await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {rows} history rows in {secs:.1} s ({:.0} rows/s)",
        rows as f64 / secs
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// Durable reserve+commit latency with 64 concurrent clients, and the in-memory decision.
async fn measure(label: &str, store: AnyStore, dir: &std::path::Path) {
    let g = Guard::start(
        store,
        policy(),
        GuardOptions::new(dir.join("spool")),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let per_client = 2_000u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64u64 {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client as usize);
            for n in 0..per_client {
                let req = ReserveRequest {
                    id: Uuid::nil(),
                    subject: subject(c * 1000 + n % 1000),
                    input_tokens: 300,
                    max_output_tokens: Some(500),
                    estimated_cost: None,
                    idempotency_key: None,
                    ttl_us: None,
                };
                let t = Instant::now();
                let r = g.reserve(req).await.unwrap().unwrap();
                let commit = CommitRequest {
                    usage_id: Uuid::nil(),
                    tokens: Tokens {
                        input: 300,
                        cached_input: 0,
                        output: 200,
                        ..Default::default()
                    },
                    cost: None,
                    status: RequestStatus::Success,
                    origin: None,
                };
                g.commit(r.reservation.id, commit).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort();
    // The decision alone: `check` evaluates every limit in memory.
    let mut decide = Vec::with_capacity(100_000);
    for n in 0..100_000u64 {
        let req = ReserveRequest {
            id: Uuid::nil(),
            subject: subject(n % 10_000),
            input_tokens: 300,
            max_output_tokens: Some(500),
            estimated_cost: None,
            idempotency_key: None,
            ttl_us: None,
        };
        let t = Instant::now();
        std::hint::black_box(g.check(&req).unwrap());
        decide.push(t.elapsed());
    }
    decide.sort();
    let stats = g.stats();
    println!(
        "{label}: writer batches {} events {} (mean batch {:.1})",
        stats.batches,
        stats.events,
        stats.events as f64 / stats.batches.max(1) as f64
    );
    println!(
        "{label}: durable reserve+commit p50 {:?} p99 {:?} ({:.0} pairs/s, 64 clients); in-memory decision p50 {:?} p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len() as f64 / wall,
        percentile(&decide, 0.5),
        percentile(&decide, 0.99),
    );
    g.shutdown().await;
}

/// A PostgreSQL schema made for the start-up bench, and the connection that drops it.
struct PgSchema {
    admin: tokio_postgres::Client,
    name: String,
    config: tokio_postgres::Config,
    /// Named with `--schema`: kept afterwards, and reused (not seeded again) when it exists.
    kept: bool,
    existed: bool,
}

async fn pg_schema(url: &str) -> PgSchema {
    let base: tokio_postgres::Config = url.parse().expect("a PostgreSQL URL");
    let kept = std::env::args().skip_while(|a| a != "--schema").nth(1);
    let name = kept
        .clone()
        .unwrap_or_else(|| format!("sg_startup_bench_{}", std::process::id()));
    assert!(
        name.chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
        "--schema takes lower-case letters, digits and underscores"
    );
    let (admin, conn) = base.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let existed = admin
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = $1 AND table_name = 'rollups'",
            &[&name],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0;
    admin
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {name}"))
        .await
        .unwrap();
    let mut config = base;
    config.options(format!("-csearch_path={name}"));
    PgSchema {
        admin,
        name,
        config,
        kept: kept.is_some(),
        existed,
    }
}

async fn open_startup_store(path: &std::path::Path, pg: Option<&PgSchema>) -> AnyStore {
    match pg {
        Some(pg) => AnyStore::Postgres(
            spendguard_store::PostgresStore::connect(pg.config.clone(), &OpenOptions::default())
                .await
                .unwrap(),
        ),
        None => AnyStore::open(path.to_str().unwrap(), &OpenOptions::default())
            .await
            .unwrap(),
    }
}

async fn startup(users: u64) {
    let dir = tempfile::tempdir().unwrap();
    // `--keep DIR`: build the database there and leave it (to look at it afterwards, or to
    // time start-up again without seeding: a kept database is reused).
    let path = match std::env::args().skip_while(|a| a != "--keep").nth(1) {
        Some(keep) => std::path::PathBuf::from(keep).join("startup.db"),
        None => dir.path().join("startup.db"),
    };
    let pg = match std::env::args().skip_while(|a| a != "--url").nth(1) {
        Some(url) => Some(pg_schema(&url).await),
        None => None,
    };
    // A kept database (or schema) is seeded once and reused.
    let seeded = match &pg {
        Some(pg) => pg.existed,
        None => path.exists(),
    };
    let store = open_startup_store(&path, pg.as_ref()).await;
    let now = SystemClock.now_micros();
    let cal = Calendar::utc();
    let mut batch = Vec::with_capacity(10_000);
    for i in (0..users).filter(|_| !seeded) {
        let mut u = usage(i, now, &cal);
        u.user = UserId::parse(&format!("user-{i}")).unwrap();
        batch.push(Event::Recorded(u));
        if batch.len() == 10_000 {
            store.apply(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.apply(&batch).await.unwrap();
    // Everything projected before timing (the journal's projection runs behind appends).
    store.catch_up().await.unwrap();
    store.close().await;
    let store = open_startup_store(&path, pg.as_ref()).await;
    // Where start-up goes: reading the snapshot, then restoring it into a ledger.
    let periods = cal.periods(now);
    let t = Instant::now();
    let snapshot = store
        .load(periods.day.start, periods.month.start)
        .await
        .unwrap();
    let load = t.elapsed();
    let rows = snapshot.counters.len();
    let t = Instant::now();
    let ledger = spendguard_core::Ledger::new(policy());
    ledger.restore(snapshot).unwrap();
    let restore = t.elapsed();
    drop(ledger);
    println!(
        "  of which: loading {rows} rollup rows {:.2} s, restoring them {:.2} s",
        load.as_secs_f64(),
        restore.as_secs_f64()
    );
    let t = Instant::now();
    let g = Guard::start(
        store,
        policy(),
        GuardOptions::new(dir.path().join("spool")),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let took = t.elapsed();
    println!(
        "start-up with {users} active users' counters: {:.2} s ({} scopes in memory)",
        took.as_secs_f64(),
        g.ledger().scope_count()
    );
    g.shutdown().await;
    if let Some(pg) = pg.filter(|pg| !pg.kept) {
        pg.admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", pg.name))
            .await
            .unwrap();
    }
}

trait NowMicros {
    fn now_micros(&self) -> i64;
}

impl NowMicros for SystemClock {
    fn now_micros(&self) -> i64 {
        spendguard_guard::Clock::now(self)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; ignore it.
    let history = arg("--history", 10_000_000);
    let users = arg("--users", 1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if std::env::args().any(|a| a == "--startup-only") {
            startup(users).await;
            return;
        }
        let now = SystemClock.now_micros();
        let empty = tempfile::tempdir().unwrap();
        let store = AnyStore::open(
            empty.path().join("empty.db").to_str().unwrap(),
            &OpenOptions::default(),
        )
        .await
        .unwrap();
        measure("empty database", store, empty.path()).await;
        let full = tempfile::tempdir().unwrap();
        let path = full.path().join("history.db");
        let store = AnyStore::open(path.to_str().unwrap(), &OpenOptions::default())
            .await
            .unwrap();
        seed_history(&store, history, now).await;
        measure(&format!("{history} history rows"), store, full.path()).await;
        startup(users).await;
    });
}
