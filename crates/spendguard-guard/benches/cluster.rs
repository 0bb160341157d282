//! Cluster mode with many instances in one process against one PostgreSQL database: how
//! many decisions and how many locks of the hot (global) row per second the database
//! carries as instances are added. The real code: each instance is a `Guard` in cluster
//! mode with its own connection pool, as a `serve` process has.
//!
//! ```sh
//! cargo bench -p spendguard-guard --bench cluster -- --url postgres://USER@HOST/DB \
//!     [--instances 1,3,10,30] [--clients 48] [--seconds 8] [--users 10000] \
//!     [--allowances none]
//! ```
//!
//! For each instance count, in a fresh schema (dropped afterwards): `--clients` concurrent
//! clients spread over the instances run reserve→commit cycles for `--seconds`. With
//! allowances (the default: global and tenants), the global row is locked only by top-ups
//! and by each instance's fold at its heartbeat; with `--allowances none` by every batch
//! (then the batches committed per second are the locks of that hot row per second).
//! Prints operations/s, batches/s, the mean batch, top-ups and folds per second, and the
//! median and p99 of an operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spendguard_core::*;
use spendguard_guard::cluster::ClusterOptions;
use spendguard_guard::{Guard, GuardOptions, SystemClock};
use spendguard_store::{AnyStore, OpenOptions};
use uuid::Uuid;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn policy() -> Policy {
    Config::from_toml(
        "default_tier = \"enterprise\"\n[global]\nusd_per_day = \"1000000000\"\n\
         usd_per_month = \"1000000000\"\n[tenant]\nmax_share_of_global = 1.0\n\
         [tiers.enterprise]\nrequests_per_minute = \"unlimited\"\nrequests_per_day = \"unlimited\"\n\
         tokens_per_day = \"unlimited\"\nusd_per_day = \"unlimited\"\nusd_per_month = \"unlimited\"\n\
         max_concurrent = \"unlimited\"",
    )
    .unwrap()
    .validate()
    .unwrap()
}

fn request(i: u64) -> ReserveRequest {
    ReserveRequest {
        id: Uuid::nil(),
        subject: Subject {
            tenant: TenantId::parse(&format!("tenant-{}", i % 20)).unwrap(),
            user: UserId::parse(&format!("user-{i}")).unwrap(),
            company: None,
            tier: None,
            trusted_tier: true,
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            endpoint: None,
        },
        input_tokens: 100,
        max_output_tokens: Some(100),
        estimated_cost: Some(Money::from_micros(100)),
        idempotency_key: None,
        ttl_us: None,
    }
}

fn commit() -> CommitRequest {
    CommitRequest {
        usage_id: Uuid::nil(),
        tokens: Tokens {
            input: 100,
            output: 50,
            ..Default::default()
        },
        cost: Some(Money::from_micros(80)),
        status: RequestStatus::Success,
        origin: None,
    }
}

async fn run(url: &str, instances: usize, clients: usize, seconds: u64, users: u64) {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (admin, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = format!("sg_bench_cluster_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let url_in = format!("{url}{sep}options=-csearch_path%3D{schema}");
    let dir = tempfile::tempdir().unwrap();
    let mut guards = Vec::new();
    for i in 0..instances {
        let store = AnyStore::open(
            &url_in,
            &OpenOptions {
                cluster: true,
                pool_size: 3,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap();
        let mut options = GuardOptions::new(dir.path().join(format!("spool{i}")));
        let mut c = ClusterOptions::new(format!("sim-{i}"), "in-process");
        if arg("--allowances").as_deref() == Some("none") {
            c.allowances = spendguard_guard::cluster::AllowanceScopes::NONE;
        }
        options.cluster = Some(c);
        guards.push(
            Guard::start(store, policy(), options, Arc::new(SystemClock))
                .await
                .unwrap(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (g, stop) = (guards[c % instances].clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = c as u64;
                while !stop.load(Ordering::Relaxed) {
                    n += clients as u64;
                    let t = Instant::now();
                    let r = g.reserve(request(n % users)).await.unwrap();
                    lat.push(t.elapsed());
                    let Ok(r) = r else { continue };
                    let t = Instant::now();
                    g.commit(r.reservation.id, commit()).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let batches: u64 = guards.iter().map(|g| g.cluster().unwrap().1.batches).sum();
    let retries: u64 = guards.iter().map(|g| g.cluster().unwrap().1.retries).sum();
    let top_ups: u64 = guards
        .iter()
        .map(|g| g.cluster().unwrap().1.allowance_top_ups)
        .sum();
    let folds: u64 = guards
        .iter()
        .map(|g| g.cluster().unwrap().1.allowance_returns)
        .sum();
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{instances:>9} {clients:>7} {:>10.0} {:>10.0} {:>10.1} {:>9.1} {:>8.1} {:>9.2} {:>9.2} \
         {retries:>7}",
        lat.len() as f64 / secs,
        batches as f64 / secs,
        lat.len() as f64 / batches.max(1) as f64,
        top_ups as f64 / secs,
        folds as f64 / secs,
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
    );
    for g in &guards {
        g.shutdown().await;
    }
    drop(guards);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

fn main() {
    let Some(url) = arg("--url").or_else(|| std::env::var("SPENDGUARD_TEST_DATABASE_URL").ok())
    else {
        eprintln!("give --url postgres://... (or set SPENDGUARD_TEST_DATABASE_URL)");
        std::process::exit(2);
    };
    let instances: Vec<usize> = arg("--instances")
        .unwrap_or_else(|| "1,3,10,30".into())
        .split(',')
        .map(|s| s.parse().expect("--instances: numbers, comma-separated"))
        .collect();
    let clients: usize = arg("--clients").map_or(48, |s| s.parse().unwrap());
    let seconds: u64 = arg("--seconds").map_or(8, |s| s.parse().unwrap());
    let users: u64 = arg("--users").map_or(10_000, |s| s.parse().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "instances clients      ops/s  batches/s  ops/batch top-ups/s  folds/s    p50 ms    \
         p99 ms retries"
    );
    for n in instances {
        rt.block_on(run(&url, n, clients.max(n), seconds, users));
    }
}
