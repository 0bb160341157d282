//! Test support: databases to open (a temporary SQLite file, or a fresh PostgreSQL schema),
//! builders of events, a deterministic random generator, and a model of what the rollups
//! must hold.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use spendguard_core::{
    CompanyId, CounterRow, Endpoint, Event, IdempotencyKey, Micros, ModelName, Money, Pricing,
    RequestStatus, Reservation, ScopeKey, Subject, TenantId, TierName, Tokens, UsageRecord, UserId,
    Window,
};
use spendguard_store::{AnyStore, OpenOptions, PostgresStore, SqliteStore, StoreError};
use tokio_postgres::{Config, NoTls};
use uuid::Uuid;

pub const DAY: Micros = 86_400_000_000;
/// 2024-01-01T00:00:00Z.
pub const JAN: Micros = 1_704_067_200_000_000;
/// 2024-02-01T00:00:00Z.
pub const FEB: Micros = JAN + 31 * DAY;

/// A name no other test (or run) uses.
pub fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}_{}_{:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// A database a test can open stores on; removed when dropped.
#[derive(Debug)]
pub enum Db {
    Sqlite { dir: PathBuf, path: String },
    Postgres { base: Box<Config>, schema: String },
}

impl Db {
    pub async fn open(&self, options: &OpenOptions) -> Result<AnyStore, StoreError> {
        match self {
            Db::Sqlite { path, .. } => SqliteStore::open(path, options).await.map(AnyStore::Sqlite),
            Db::Postgres { base, schema } => {
                let mut config = (**base).clone();
                config.options(format!("-csearch_path={schema}"));
                PostgresStore::connect(config, options)
                    .await
                    .map(AnyStore::Postgres)
            }
        }
    }

    /// A store with the default options (it holds the writer lock).
    pub async fn store(&self) -> AnyStore {
        self.open(&OpenOptions::default())
            .await
            .expect("open the store")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        match self {
            Db::Sqlite { dir, .. } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Db::Postgres { base, schema } => {
                // Runs on its own thread and runtime: works during a panic and inside the
                // test's runtime alike.
                let base = (**base).clone();
                let schema = schema.clone();
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime");
                    rt.block_on(async {
                        if let Ok((client, conn)) = base.connect(NoTls).await {
                            tokio::spawn(conn);
                            // A test that failed may have left a store's connection in
                            // a transaction on this schema: its runtime is blocked here, so
                            // that transaction never ends, and the drop would wait for it
                            // for ever. It gives up instead (the schema is left behind)
                            // and the test fails as it should.
                            let _ = client
                                .batch_execute(&format!(
                                    "SET lock_timeout = '10s'; \
                                     DROP SCHEMA IF EXISTS {schema} CASCADE"
                                ))
                                .await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// The versions of every migration this build knows.
pub fn all_versions() -> Vec<i64> {
    (1..=15).collect()
}

/// Runs statements straight on the database (outside any store), e.g. to take a schema
/// back to an older version.
pub async fn execute(db: &Db, sql: &str) {
    match db {
        Db::Sqlite { path, .. } => {
            let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
            conn.execute_batch(sql).expect("run the statements");
        }
        Db::Postgres { base, schema } => {
            let mut config = (**base).clone();
            config.options(format!("-csearch_path={schema}"));
            let (client, conn) = config.connect(NoTls).await.expect("connect");
            tokio::spawn(conn);
            client.batch_execute(sql).await.expect("run the statements");
        }
    }
}

/// Runs statements straight on the database that holds the journal: SQLite's journal file
/// (see [`SqliteStore::journal_path`]), PostgreSQL's schema.
pub async fn execute_on_journal(db: &Db, sql: &str) {
    match db {
        Db::Sqlite { path, .. } => {
            let conn = rusqlite::Connection::open(SqliteStore::journal_path(path))
                .expect("open the journal file");
            conn.execute_batch(sql).expect("run the statements");
        }
        Db::Postgres { .. } => execute(db, sql).await,
    }
}

pub async fn make_sqlite() -> Option<Db> {
    let dir = std::env::temp_dir().join(format!("spendguard-store-test-{}", unique()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    let path = dir.join("spendguard.db").to_string_lossy().into_owned();
    Some(Db::Sqlite { dir, path })
}

/// The PostgreSQL server to test against, if `SPENDGUARD_TEST_DATABASE_URL` is set.
pub fn pg_url() -> Option<String> {
    match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("SKIPPED: SPENDGUARD_TEST_DATABASE_URL not set");
            // Test output is captured; CI reads this file to fail on any skip.
            if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                {
                    let _ = writeln!(f, "skipped a PostgreSQL test");
                }
            }
            None
        }
    }
}

pub async fn make_pg() -> Option<Db> {
    let url = pg_url()?;
    let base: Config = url
        .parse()
        .expect("SPENDGUARD_TEST_DATABASE_URL is a PostgreSQL URL");
    let schema = format!("sg_test_{}", unique());
    let (client, conn) = base
        .connect(NoTls)
        .await
        .expect("connect to SPENDGUARD_TEST_DATABASE_URL");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create a test schema");
    Some(Db::Postgres {
        base: Box::new(base),
        schema,
    })
}

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

pub fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

pub fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub fn company(s: &str) -> CompanyId {
    CompanyId::parse(s).unwrap()
}

pub fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::parse(s).unwrap()
}

pub fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// A direct usage record of `acme/alice` (company `eng`) on 10 January 2024.
pub fn record(n: u128) -> UsageRecord {
    UsageRecord {
        id: id(n),
        tenant: tenant("acme"),
        user: user("alice"),
        company: Some(company("eng")),
        model: ModelName::parse("gpt-4o").unwrap(),
        endpoint: Some(Endpoint::parse("/v1/chat/completions").unwrap()),
        tier: TierName::parse("pro").unwrap(),
        tokens: Tokens {
            input: 1200,
            cached_input: 200,
            output: 300,
            ..Default::default()
        },
        cost: Money::from_micros(4_250),
        pricing: Pricing::Catalog,
        long_context_above: None,
        status: RequestStatus::Success,
        created_at: JAN + 9 * DAY + 3_600_000_000,
        reservation_id: None,
        idempotency_key: None,
        day_start: JAN + 9 * DAY,
        month_start: JAN,
        origin: None,
    }
}

/// An open reservation of `acme/alice` (company `eng`) on 10 January 2024.
pub fn reservation(n: u128) -> Reservation {
    let created_at = JAN + 9 * DAY + 7_200_000_000 + n as i64;
    Reservation {
        id: id(n),
        subject: Subject {
            tenant: tenant("acme"),
            user: user("alice"),
            company: Some(company("eng")),
            tier: Some(TierName::parse("pro").unwrap()),
            trusted_tier: true,
            model: ModelName::parse("gpt-4o").unwrap(),
            endpoint: Some(Endpoint::parse("chat").unwrap()),
        },
        tier: TierName::parse("pro").unwrap(),
        estimate: Money::from_micros(90_000),
        estimated_tokens: 5_000,
        created_at,
        expires_at: created_at + 300_000_000,
        day_start: JAN + 9 * DAY,
        month_start: JAN,
        idempotency_key: Some(key(&format!("res-{n}"))),
        fingerprint: 0xdead_beef_0000_0000 | n as u64,
        would_deny: None,
    }
}

/// The usage record a commit of `res` makes.
pub fn commit_usage(res: &Reservation, usage_id: u128, cost: i64) -> UsageRecord {
    UsageRecord {
        id: id(usage_id),
        tenant: res.subject.tenant.clone(),
        user: res.subject.user.clone(),
        company: res.subject.company.clone(),
        model: res.subject.model.clone(),
        endpoint: res.subject.endpoint.clone(),
        tier: res.tier.clone(),
        tokens: Tokens {
            input: 800,
            cached_input: 0,
            output: 150,
            ..Default::default()
        },
        cost: Money::from_micros(cost),
        pricing: Pricing::Caller,
        long_context_above: None,
        status: RequestStatus::Success,
        created_at: res.created_at,
        reservation_id: Some(res.id),
        idempotency_key: res.idempotency_key.clone(),
        day_start: res.day_start,
        month_start: res.month_start,
        origin: None,
    }
}

/// The usage record of `res` expiring (as the ledger makes it: no tokens, no cost).
pub fn expired_usage(res: &Reservation) -> UsageRecord {
    UsageRecord {
        id: res.id,
        tokens: Tokens::default(),
        cost: Money::ZERO,
        status: RequestStatus::Expired,
        ..commit_usage(res, res.id.as_u128(), 0)
    }
}

// ---------------------------------------------------------------------------------------
// A deterministic generator
// ---------------------------------------------------------------------------------------

/// xorshift64*: small, fast and the same on every run.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------------------------------
// The model of the rollups
// ---------------------------------------------------------------------------------------

/// What the store must hold after a sequence of batches, computed the simple way: a usage
/// record counts once, the first time its id is seen, unless it is a direct record whose
/// (tenant, idempotency key) was taken by an earlier direct record, or it does not count.
#[derive(Debug, Default)]
pub struct Model {
    pub ids: HashSet<Uuid>,
    keys: HashSet<(TenantId, IdempotencyKey)>,
    rows: BTreeMap<(ScopeKey, Window, Micros), Sums>,
}

/// The sums of one rollup row of the [`Model`].
#[derive(Debug, Default)]
struct Sums {
    spent: i64,
    requests: u64,
    tokens: u64,
    input: u64,
    cached: u64,
    output: u64,
}

/// `a + b`, saturating at `i64::MAX` like the rollups.
fn add_count(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(i64::MAX as u64)
}

impl Model {
    pub fn apply(&mut self, events: &[Event]) {
        for event in events {
            let usage = match event {
                Event::Committed { usage, .. }
                | Event::Expired { usage, .. }
                | Event::Recorded(usage) => usage,
                _ => continue,
            };
            if self.ids.contains(&usage.id) {
                continue;
            }
            if usage.reservation_id.is_none()
                && let Some(k) = &usage.idempotency_key
                && !self.keys.insert((usage.tenant.clone(), k.clone()))
            {
                continue;
            }
            self.ids.insert(usage.id);
            if !usage.counts() {
                continue;
            }
            for scope in usage.scopes() {
                // Users also have a row per seven-day bucket of their days.
                let week = matches!(scope, ScopeKey::User(..)).then(|| {
                    let w = 7 * 86_400_000_000i64;
                    (
                        Window::Week,
                        usage.day_start - usage.day_start.rem_euclid(w),
                    )
                });
                for (w, start) in [
                    Some((Window::Day, usage.day_start)),
                    Some((Window::Month, usage.month_start)),
                    week,
                ]
                .into_iter()
                .flatten()
                {
                    let row = self.rows.entry((scope.clone(), w, start)).or_default();
                    row.spent = row.spent.saturating_add(usage.cost.micros());
                    row.requests += 1;
                    row.tokens = add_count(row.tokens, usage.tokens.total());
                    row.input = add_count(row.input, usage.tokens.input);
                    row.cached = add_count(row.cached, usage.tokens.cached_input);
                    row.output = add_count(row.output, usage.tokens.output);
                }
            }
        }
    }

    /// The rollup rows, sorted like the store returns them.
    pub fn rows(&self) -> Vec<CounterRow> {
        self.rows
            .iter()
            .map(|((scope, window, start), sums)| CounterRow {
                scope: scope.clone(),
                window: *window,
                start: *start,
                spent: Money::from_micros(sums.spent),
                requests: sums.requests,
                tokens: sums.tokens,
                input_tokens: sums.input,
                cached_input_tokens: sums.cached,
                output_tokens: sums.output,
            })
            .collect()
    }
}
