//! Write throughput of the stores: batches of 1000 direct usage records (10 tenants, 10,000
//! users, 100 companies) into a temporary SQLite file and, when
//! `SPENDGUARD_TEST_DATABASE_URL` is set, into a fresh PostgreSQL schema.
//!
//! Run with `cargo bench -p spendguard-store`; throughput is reported in records per second:
//! `apply_1000_records` is the acknowledged rate (batches appended to the journal, the
//! projector running behind), `apply_and_project_1000_records` the rate end to end (the
//! batches applied, then the journal caught up: every record in `ai_usage` and the rollups).
//! `reserve_commit_and_project` is the service's mix end to end: batches of 500 reservations
//! and 500 commits (of the previous batch's reservations), in records per second.

use std::future::Future;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use spendguard_core::{
    CompanyId, Endpoint, Event, ModelName, Money, Pricing, RequestStatus, Reservation, Subject,
    TenantId, TierName, Tokens, UsageRecord, UserId,
};
use spendguard_store::{OpenOptions, PostgresStore, SqliteStore, Store, StoreError};
use tokio::runtime::Runtime;
use uuid::Uuid;

const BATCH: usize = 1000;
const TENANTS: u64 = 10;
const USERS: u64 = 10_000;
const COMPANIES: u64 = 100;
/// 2024-05-17T00:00:00Z and 2024-05-01T00:00:00Z.
const DAY_START: i64 = 1_715_904_000_000_000;
const MONTH_START: i64 = 1_714_521_600_000_000;

/// The names of the tenants, users and companies, made once.
struct Names {
    tenants: Vec<TenantId>,
    users: Vec<UserId>,
    companies: Vec<CompanyId>,
    model: ModelName,
    endpoint: Endpoint,
    tier: TierName,
}

impl Names {
    fn new() -> Names {
        Names {
            tenants: (0..TENANTS)
                .map(|i| TenantId::parse(&format!("tenant-{i}")).unwrap())
                .collect(),
            users: (0..USERS)
                .map(|i| UserId::parse(&format!("user-{i}@example.com")).unwrap())
                .collect(),
            companies: (0..COMPANIES)
                .map(|i| CompanyId::parse(&format!("company-{i}")).unwrap())
                .collect(),
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            endpoint: Endpoint::parse("/v1/chat/completions").unwrap(),
            tier: TierName::parse("pro").unwrap(),
        }
    }
}

/// Deterministic batches of records with time-ordered ids (like UUID v7).
struct Workload {
    names: Names,
    next: u64,
    rng: u64,
    /// Reservations made by the last reserve-and-commit batch, committed by the next.
    open: Vec<Reservation>,
}

impl Workload {
    fn new() -> Workload {
        Workload {
            names: Names::new(),
            next: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            open: Vec::new(),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn batch(&mut self) -> Vec<Event> {
        (0..BATCH).map(|_| Event::Recorded(self.record())).collect()
    }

    /// The next direct record: a random user of a random tenant, a time-ordered id.
    fn record(&mut self) -> UsageRecord {
        self.next += 1;
        let r = self.random();
        let user = r % USERS;
        let tenant = user % TENANTS;
        let company = (user % 3 != 0).then_some((user / 3) % COMPANIES);
        let at = DAY_START + self.next as i64 * 1_000;
        let names = &self.names;
        UsageRecord {
            id: Uuid::from_u128(((at as u128) << 64) | (0x7000 << 48) | r as u128 >> 16),
            tenant: names.tenants[tenant as usize].clone(),
            user: names.users[user as usize].clone(),
            company: company.map(|c| names.companies[c as usize].clone()),
            model: names.model.clone(),
            endpoint: Some(names.endpoint.clone()),
            tier: names.tier.clone(),
            tokens: Tokens {
                input: 500 + r % 2_000,
                cached_input: 0,
                output: 100 + (r >> 20) % 800,
                ..Default::default()
            },
            cost: Money::from_micros(100 + (r % 20_000) as i64),
            pricing: Pricing::Catalog,
            long_context_above: None,
            status: RequestStatus::Success,
            created_at: at,
            reservation_id: None,
            idempotency_key: None,
            day_start: DAY_START,
            month_start: MONTH_START,
            origin: None,
        }
    }

    /// Half a batch of commits (of the reservations the previous call made) and half a
    /// batch of new reservations, as the service's batches mix them.
    fn reserve_commit_batch(&mut self) -> Vec<Event> {
        let mut batch: Vec<Event> = std::mem::take(&mut self.open)
            .into_iter()
            .map(|res| {
                let mut usage = self.record();
                usage.reservation_id = Some(res.id);
                usage.tenant = res.subject.tenant.clone();
                usage.user = res.subject.user.clone();
                usage.company = res.subject.company.clone();
                Event::Committed {
                    reservation_id: res.id,
                    usage,
                }
            })
            .collect();
        for _ in 0..BATCH / 2 {
            let u = self.record();
            let res = Reservation {
                id: Uuid::from_u128(u.id.as_u128() ^ 1),
                subject: Subject {
                    tenant: u.tenant,
                    user: u.user,
                    company: u.company,
                    tier: Some(u.tier.clone()),
                    trusted_tier: true,
                    model: u.model,
                    endpoint: u.endpoint,
                },
                tier: u.tier,
                estimate: Money::from_micros(20_000),
                estimated_tokens: 3_000,
                created_at: u.created_at,
                expires_at: u.created_at + 300_000_000,
                day_start: DAY_START,
                month_start: MONTH_START,
                idempotency_key: None,
                fingerprint: u.id.as_u128() as u64,
                would_deny: None,
            };
            self.open.push(res.clone());
            batch.push(Event::Reserved(res));
        }
        batch
    }
}

/// Two figures per store: how fast batches are acknowledged (appended to the journal; the
/// projector runs behind, as in the service), and how fast they are acknowledged and
/// projected into the tables, end to end (batches applied, then the journal caught up).
fn bench_store<S: Store, F: Future<Output = Result<(), StoreError>>>(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    store: &S,
    catch_up: impl Fn() -> F,
) {
    let mut group = c.benchmark_group("apply_1000_records");
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut workload = Workload::new();
    group.bench_function(name, |b| {
        b.iter_batched(
            || workload.batch(),
            |batch| rt.block_on(store.apply(black_box(&batch))).unwrap(),
            BatchSize::SmallInput,
        )
    });
    rt.block_on(catch_up()).unwrap();
    group.finish();
    let mut group = c.benchmark_group("apply_and_project_1000_records");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let batches: Vec<Vec<Event>> = (0..iters).map(|_| workload.batch()).collect();
            end_to_end(rt, store, &catch_up, &batches)
        })
    });
    group.finish();
    let mut group = c.benchmark_group("reserve_commit_and_project");
    // Records (one a commit) per second: a batch commits the previous batch's reservations.
    group.throughput(Throughput::Elements(BATCH as u64 / 2));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let batches: Vec<Vec<Event>> = (0..iters)
                .map(|_| workload.reserve_commit_batch())
                .collect();
            end_to_end(rt, store, &catch_up, &batches)
        })
    });
    group.finish();
}

/// Applies `batches`, then catches the journal up: how long it took, end to end.
fn end_to_end<S: Store, F: Future<Output = Result<(), StoreError>>>(
    rt: &Runtime,
    store: &S,
    catch_up: &impl Fn() -> F,
    batches: &[Vec<Event>],
) -> Duration {
    let start = Instant::now();
    rt.block_on(async {
        for batch in batches {
            store.apply(black_box(batch)).await.unwrap();
        }
        catch_up().await.unwrap();
    });
    start.elapsed()
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    for (name, sync_every_batch) in [("sqlite", false), ("sqlite_sync_full", true)] {
        let dir = std::env::temp_dir().join(format!(
            "spendguard-store-bench-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.db").to_string_lossy().into_owned();
        let options = OpenOptions {
            sync_every_batch,
            ..OpenOptions::default()
        };
        let store = rt.block_on(SqliteStore::open(&path, &options)).unwrap();
        bench_store(c, &rt, name, &store, || store.catch_up());
        rt.block_on(store.close());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn postgres(c: &mut Criterion) {
    let Ok(url) = std::env::var("SPENDGUARD_TEST_DATABASE_URL") else {
        println!("SKIPPED postgres: SPENDGUARD_TEST_DATABASE_URL not set");
        return;
    };
    let rt = runtime();
    let base: tokio_postgres::Config = url.parse().unwrap();
    let schema = format!("sg_bench_{}", std::process::id());
    let admin = rt.block_on(async {
        let (client, conn) = base.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .await
            .unwrap();
        client
    });
    let mut config = base.clone();
    config.options(format!("-csearch_path={schema}"));
    let store = rt
        .block_on(PostgresStore::connect(config, &OpenOptions::default()))
        .unwrap();
    bench_store(c, &rt, "postgres", &store, || store.catch_up());
    rt.block_on(async {
        store.close().await;
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    });
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

criterion_group!(benches, sqlite, postgres);
criterion_main!(benches);
