//! Shared helpers: stores, policies, requests, and a store that fails on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use spendguard_core::*;
use spendguard_guard::{Clock, Guard, GuardOptions, SystemClock};
use spendguard_store::{AnyStore, DeadLetter, OpenOptions, Store, StoreError, StoredReservation};
use uuid::Uuid;

pub const POLICY: &str = r#"
[global]
usd_per_day = "1000000"
usd_per_month = "1000000"
[tiers.free]
requests_per_minute = "unlimited"
requests_per_day = "unlimited"
tokens_per_day = "unlimited"
usd_per_day = "1000"
usd_per_month = "1000"
max_concurrent = "unlimited"
allowed_models = ["*"]
"#;

pub fn policy() -> Policy {
    Config::from_toml(POLICY).unwrap().validate().unwrap()
}

pub fn subject(tenant: &str, user: &str) -> Subject {
    Subject {
        tenant: TenantId::parse(tenant).unwrap(),
        user: UserId::parse(user).unwrap(),
        company: Some(CompanyId::parse("acme").unwrap()),
        tier: None,
        trusted_tier: true,
        model: ModelName::parse("gpt-4o-mini").unwrap(),
        endpoint: None,
    }
}

pub fn reserve(subject: Subject, micros: i64) -> ReserveRequest {
    ReserveRequest {
        id: Uuid::nil(),
        subject,
        input_tokens: 100,
        max_output_tokens: Some(100),
        estimated_cost: Some(Money::from_micros(micros)),
        idempotency_key: None,
        ttl_us: None,
    }
}

pub fn commit(micros: i64) -> CommitRequest {
    CommitRequest {
        usage_id: Uuid::nil(),
        tokens: Tokens {
            input: 100,
            cached_input: 0,
            output: 40,
            ..Default::default()
        },
        cost: Some(Money::from_micros(micros)),
        status: RequestStatus::Success,
        origin: None,
    }
}

pub async fn sqlite(path: &std::path::Path) -> AnyStore {
    AnyStore::open(path.to_str().unwrap(), &OpenOptions::default())
        .await
        .unwrap()
}

/// A SQLite store that keeps its journal's batches once projected (a complete history).
pub async fn sqlite_keeping_journal(path: &std::path::Path) -> AnyStore {
    let options = OpenOptions {
        keep_journal: true,
        ..OpenOptions::default()
    };
    AnyStore::open(path.to_str().unwrap(), &options)
        .await
        .unwrap()
}

pub async fn start<S: Store>(store: S, dir: &std::path::Path) -> Guard<S> {
    start_with(
        store,
        GuardOptions::new(dir.join("spool")),
        Arc::new(SystemClock),
    )
    .await
}

pub async fn start_with<S: Store>(
    store: S,
    options: GuardOptions,
    clock: Arc<dyn Clock>,
) -> Guard<S> {
    Guard::start(store, policy(), options, clock).await.unwrap()
}

/// Sorted, for comparisons.
pub fn sorted(mut rows: Vec<CounterRow>) -> Vec<CounterRow> {
    rows.sort_by(|a, b| {
        (a.scope.clone(), a.window, a.start).cmp(&(b.scope.clone(), b.window, b.start))
    });
    rows
}

/// Rollups equal a recount of the usage rows: nothing lost, nothing doubled.
pub async fn assert_rollups_match<S: Store>(store: &S) {
    let rollups = sorted(store.rollups().await.unwrap());
    let recount = sorted(store.recount().await.unwrap());
    assert_eq!(rollups, recount);
}

/// The `Store` methods a test wrapper passes on unchanged to its field `$field` (all but
/// `apply`, which each wrapper writes itself): `forward_store!(inner);`.
macro_rules! forward_store {
    ($field:tt) => {
        async fn load(
            &self,
            day_start: Micros,
            month_start: Micros,
        ) -> Result<Snapshot, StoreError> {
            self.$field.load(day_start, month_start).await
        }
        async fn usage(&self, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
            self.$field.usage(id).await
        }
        async fn reservation(&self, id: Uuid) -> Result<Option<StoredReservation>, StoreError> {
            self.$field.reservation(id).await
        }
        async fn reservation_by_key(
            &self,
            tenant: &TenantId,
            key: &IdempotencyKey,
        ) -> Result<Option<StoredReservation>, StoreError> {
            self.$field.reservation_by_key(tenant, key).await
        }
        async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.$field.setting(key).await
        }
        async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
            self.$field.put_setting(key, value).await
        }
        async fn usage_by_key(
            &self,
            tenant: &TenantId,
            key: &IdempotencyKey,
        ) -> Result<Option<UsageRecord>, StoreError> {
            self.$field.usage_by_key(tenant, key).await
        }
        async fn recount(&self) -> Result<Vec<CounterRow>, StoreError> {
            self.$field.recount().await
        }
        async fn rollups(&self) -> Result<Vec<CounterRow>, StoreError> {
            self.$field.rollups().await
        }
        async fn usage_count(&self) -> Result<u64, StoreError> {
            self.$field.usage_count().await
        }
        async fn database_id(&self) -> Result<String, StoreError> {
            self.$field.database_id().await
        }
        async fn dead_letter(
            &self,
            letters: &[spendguard_store::DeadLetter],
        ) -> Result<(), StoreError> {
            self.$field.dead_letter(letters).await
        }
        async fn dead_letters(&self) -> Result<Vec<spendguard_store::DeadLetter>, StoreError> {
            self.$field.dead_letters().await
        }
    };
}
pub(crate) use forward_store;

/// A store whose writes fail while `down` is set.
pub struct FlakyStore<S> {
    pub inner: S,
    pub down: Arc<AtomicBool>,
}

impl<S: Store> FlakyStore<S> {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        Ok(())
    }
}

impl<S: Store> Store for FlakyStore<S> {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.apply(events).await
    }
    async fn load(&self, day_start: Micros, month_start: Micros) -> Result<Snapshot, StoreError> {
        self.check()?;
        self.inner.load(day_start, month_start).await
    }
    async fn usage(&self, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
        self.check()?;
        self.inner.usage(id).await
    }
    async fn reservation(&self, id: Uuid) -> Result<Option<StoredReservation>, StoreError> {
        self.check()?;
        self.inner.reservation(id).await
    }
    async fn reservation_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<StoredReservation>, StoreError> {
        self.check()?;
        self.inner.reservation_by_key(tenant, key).await
    }
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.check()?;
        self.inner.setting(key).await
    }
    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put_setting(key, value).await
    }
    async fn usage_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<UsageRecord>, StoreError> {
        self.check()?;
        self.inner.usage_by_key(tenant, key).await
    }
    async fn recount(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.inner.recount().await
    }
    async fn rollups(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.inner.rollups().await
    }
    async fn usage_count(&self) -> Result<u64, StoreError> {
        self.inner.usage_count().await
    }
    async fn database_id(&self) -> Result<String, StoreError> {
        self.check()?;
        self.inner.database_id().await
    }
    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.dead_letter(letters).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters().await
    }
}

/// `SPENDGUARD_TEST_DATABASE_URL`, or `None` after printing that the test is skipped.
pub fn pg_url() -> Option<String> {
    match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
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
