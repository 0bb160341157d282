//! The PostgreSQL backend: a deadpool connection pool; a batch of any size is written by a
//! handful of multi-row statements over arrays (`UNNEST`), in one transaction.
//!
//! The single-writer lock is a session advisory lock, keyed by the database and schema,
//! held by one dedicated connection for the store's life. If that connection drops, the
//! next batch takes the lock again before writing (or fails with [`StoreError::Locked`] if
//! another instance took it meanwhile).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Transaction,
};
use futures_util::StreamExt;
use spendguard_core::{
    BudgetOverride, CounterRow, Event, IdempotencyKey, Micros, Money, Reservation, Snapshot,
    TenantId, UsageRecord, UserId,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Config, IsolationLevel, NoTls, Row};
use uuid::Uuid;

use crate::common::{
    Deltas, Plan, ROLLUP_COLUMN_COUNT, ROLLUP_COLUMNS, ROLLUP_CONFLICT, ReservationCols,
    RollupCols, Settle, TenantCache, USAGE_ROLLUP_CONFLICT, UsageCols, UsageDeltas, UsageKey,
    clamp_u64, corrupt, decode_tenant_prices, decode_user, encode_tenant_prices, encode_user,
    parse_id, scope_columns, scope_from_columns, sort_rows,
};
use crate::error::StoreError;
use crate::journal::{self, Journal};
use crate::migrations::{POSTGRES as MIGRATIONS, POSTGRES_REBUILD_USAGE_ROLLUPS};
use crate::postgres_copy::{CopyReader, int8, text};
use crate::{
    ApiKeyRecord, COUNTER_CHUNK, CounterChunks, DeadLetter, OpenOptions, ReservationState, Store,
    StoredReservation, UsageTotals,
};

/// A store in a PostgreSQL database (the schema is the first of the connection's
/// `search_path`).
pub struct PostgresStore {
    pool: Pool,
    /// Boxed: a `Config` is large, and stores are moved around.
    config: Box<Config>,
    /// The connection holding the writer lock, when this store is the single writer.
    lock: Option<Box<tokio::sync::Mutex<LockConn>>>,
    name: String,
    journal: Arc<Journal>,
    keep_journal: bool,
    /// One instance of a cluster (the writer lock is shared).
    cluster: bool,
    /// Held while appending to the journal (see [`Store::apply`]).
    appending: tokio::sync::Mutex<()>,
    /// Held while projecting (the projector's and catching-up reads' turns).
    projecting: Arc<tokio::sync::Mutex<()>>,
    /// The task projecting the journal, stopped when the store is dropped.
    projector: Option<tokio::task::JoinHandle<()>>,
    /// Cluster mode: the scopes whose counter rows exist (rows are never deleted), so a
    /// batch of known scopes skips creating them.
    pub(crate) known_counters: std::sync::Mutex<HashSet<spendguard_core::ScopeKey>>,
    /// The scopes whose allowance row of this instance is known to exist (cluster mode).
    pub(crate) known_allowances: std::sync::Mutex<HashSet<spendguard_core::ScopeKey>>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(p) = self.projector.take() {
            p.abort();
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.name)
            .field("writer_lock", &self.lock.is_some())
            .finish()
    }
}

struct LockConn {
    client: tokio_postgres::Client,
}

/// Maps tokio-postgres's errors to [`StoreError`]s.
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(map_err)
    }
}

fn map_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let text = format!("{} ({code})", db.message());
        return match code.get(..2).unwrap_or("") {
            // Connection exceptions, transaction rollbacks (serialization failures,
            // deadlocks), insufficient resources (disk full), objects in use or locked,
            // operator intervention (shutdown, cancel), system errors (I/O).
            "08" | "40" | "53" | "55" | "57" | "58" => StoreError::Unavailable(text),
            // The database's set-up, not the data: a failed login, a missing database,
            // schema, table, column or privilege. No event is at fault, so a writer keeps
            // the events and retries until an operator repairs it. (Data errors, class 22,
            // and constraint violations, class 23, are permanent: `Invalid`.)
            "28" | "3D" | "3F" | "42" => StoreError::Unavailable(text),
            // A read-only transaction: a standby during a failover.
            "25" if code == "25006" => StoreError::Unavailable(text),
            "XX" if code == "XX001" || code == "XX002" => StoreError::Corrupt(text),
            "XX" => StoreError::Unavailable(text),
            _ => StoreError::Invalid(text),
        };
    }
    let mut text = e.to_string();
    // The cause ("Connection refused", "failed to lookup address") is the source's.
    if let Some(cause) = std::error::Error::source(&e) {
        text = format!("{text}: {cause}");
    }
    if text.starts_with("error deserializing") || text.starts_with("invalid column") {
        StoreError::Corrupt(text)
    } else if text.starts_with("error serializing") {
        StoreError::Invalid(text)
    } else {
        // Connecting failed, the connection closed, a timeout: the server is unreachable.
        StoreError::Unavailable(text)
    }
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => map_err(e),
        PoolError::NoRuntimeSpecified => StoreError::Invalid(e.to_string()),
        other => StoreError::Unavailable(format!("PostgreSQL connection pool: {other}")),
    }
}

/// PostgreSQL's earliest `timestamptz` (4713 BC) in microseconds since the Unix epoch (its
/// latest is past `i64::MAX`).
const PG_MIN_MICROS: Micros = -210_866_803_200_000_000;

pub(crate) fn to_time(m: Micros) -> Result<SystemTime, StoreError> {
    let out_of_range = || {
        StoreError::Invalid(format!(
            "instant {m} µs is out of PostgreSQL's timestamp range"
        ))
    };
    if m < PG_MIN_MICROS {
        return Err(out_of_range());
    }
    if m >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_micros(m as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_micros(m.unsigned_abs()))
    }
    .ok_or_else(out_of_range)
}

pub(crate) fn from_time(t: SystemTime) -> Micros {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |v| -v),
    }
}

pub(crate) fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| corrupt(format!("column {idx}: {e}")))
}

pub(crate) fn time(row: &Row, idx: usize) -> Result<Micros, StoreError> {
    get::<SystemTime>(row, idx).map(from_time)
}

pub(crate) const USAGE_COLUMNS: &str = "id, tenant_id, user_id, company_id, model, endpoint, \
    subscription_tier, input_tokens, cached_input_tokens, output_tokens, \
    (cost_usd * 1000000)::int8, request_status, created_at, reservation_id, idempotency_key, \
    day_start, month_start, pricing, upstream, provider_request_id, \
    cache_creation_input_tokens, cache_creation_1h_input_tokens, reasoning_tokens, \
    long_context_above";

pub(crate) const RESERVATION_COLUMNS: &str = "id, tenant_id, user_id, company_id, tier, admitted_tier, \
    model, endpoint, estimate_micros, estimated_tokens, created_at, expires_at, day_start, \
    month_start, idempotency_key, fingerprint";

const INSERT_RESERVATIONS: &str = "INSERT INTO reservations (id, tenant_id, user_id, \
    company_id, tier, admitted_tier, model, endpoint, estimate_micros, estimated_tokens, \
    created_at, expires_at, day_start, month_start, idempotency_key, fingerprint) \
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::timestamptz[], \
    $12::timestamptz[], $13::int8[], $14::int8[], $15::text[], $16::int8[]) \
    ON CONFLICT (id) DO NOTHING";

const INSERT_WOULD_DENY: &str = "INSERT INTO would_deny (reservation_id, tenant_id, \
    day_start, reason) VALUES ($1, $2, $3, $4) ON CONFLICT (reservation_id) DO NOTHING";

/// Locks reservations in the order given (sorted by the caller).
const LOCK_RESERVATIONS: &str = "SELECT r.id FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u (id, n) \
    JOIN reservations AS r ON r.id = u.id ORDER BY u.n FOR UPDATE OF r";

const COMMIT_RESERVATIONS: &str = "UPDATE reservations AS r SET state = 'committed', \
    usage_id = u.usage_id, settled_at = u.at \
    FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS u (id, usage_id, at) \
    WHERE r.id = u.id AND r.state = 'open'";

const RELEASE_RESERVATIONS: &str = "UPDATE reservations AS r SET state = 'released', \
    reason = u.reason, settled_at = u.at \
    FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS u (id, reason, at) \
    WHERE r.id = u.id AND r.state = 'open'";

const EXPIRE_RESERVATIONS: &str = "UPDATE reservations AS r SET state = 'expired', \
    usage_id = u.usage_id, settled_at = r.expires_at \
    FROM UNNEST($1::uuid[], $2::uuid[]) AS u (id, usage_id) \
    WHERE r.id = u.id AND r.state = 'open'";

/// `DO NOTHING` without a target: a repeated id, or a direct record repeating another's
/// idempotency key, is skipped rather than failing the batch. `RETURNING` names the rows
/// inserted, which are the ones to count.
const INSERT_USAGE: &str = "INSERT INTO ai_usage (id, tenant_id, user_id, company_id, model, \
    endpoint, subscription_tier, input_tokens, cached_input_tokens, output_tokens, cost_usd, \
    request_status, created_at, reservation_id, idempotency_key, day_start, month_start, \
    pricing, upstream, provider_request_id, cache_creation_input_tokens, \
    cache_creation_1h_input_tokens, reasoning_tokens, long_context_above) \
    SELECT u.id, u.tenant_id, u.user_id, u.company_id, u.model, u.endpoint, u.tier, u.input, \
    u.cached, u.output, u.cost * 0.000001, u.status, u.created_at, u.reservation_id, \
    u.idempotency_key, u.day_start, u.month_start, u.pricing, u.upstream, u.provider_request_id, \
    u.cache_creation, u.cache_creation_1h, u.reasoning, u.long_context_above \
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::text[], \
    $13::timestamptz[], $14::uuid[], $15::text[], $16::int8[], $17::int8[], $18::text[], \
    $19::text[], $20::text[], $21::int8[], $22::int8[], $23::int8[], $24::int8[]) \
    AS u (id, tenant_id, user_id, company_id, model, endpoint, tier, input, cached, output, \
    cost, status, created_at, reservation_id, idempotency_key, day_start, month_start, \
    pricing, upstream, provider_request_id, cache_creation, cache_creation_1h, reasoning, \
    long_context_above) \
    ON CONFLICT DO NOTHING RETURNING id";

const UPSERT_BUDGET: &str = "INSERT INTO budget_overrides (scope_kind, tenant_id, scope_id, \
    daily_micros, monthly_micros) VALUES ($1, $2, $3, $4, $5) \
    ON CONFLICT (scope_kind, tenant_id, scope_id) DO UPDATE SET \
    daily_micros = excluded.daily_micros, monthly_micros = excluded.monthly_micros";

const DELETE_BUDGET: &str =
    "DELETE FROM budget_overrides WHERE scope_kind = $1 AND tenant_id = $2 AND scope_id = $3";

const UPSERT_USER: &str = "INSERT INTO user_overrides (tenant_id, user_id, settings) \
    VALUES ($1, $2, $3::text::jsonb) ON CONFLICT (tenant_id, user_id) DO UPDATE SET \
    settings = excluded.settings";

const DELETE_USER: &str = "DELETE FROM user_overrides WHERE tenant_id = $1 AND user_id = $2";

const UPSERT_TENANT_PRICES: &str = "INSERT INTO tenant_prices (tenant_id, settings) \
    VALUES ($1, $2::text::jsonb) ON CONFLICT (tenant_id) DO UPDATE SET \
    settings = excluded.settings";

const DELETE_TENANT_PRICES: &str = "DELETE FROM tenant_prices WHERE tenant_id = $1";

/// Sums from `ai_usage`, per scope, window and window start (users' week buckets too), in
/// `numeric` (no overflow),
/// saturated at `i64::MAX` like the rollups.
const RECOUNT: &str = "WITH u AS ( \
      SELECT tenant_id, user_id, company_id, cost_usd * 1000000 AS cost, \
        LEAST(input_tokens::numeric + output_tokens, 9223372036854775807) AS tokens, \
        input_tokens AS i, cached_input_tokens AS c, output_tokens AS o, \
        day_start, month_start \
      FROM ai_usage WHERE request_status <> 'expired' \
    ), s AS ( \
      SELECT 'global' AS kind, '' AS tenant, 'global' AS id, cost, tokens, i, c, o, \
        day_start, month_start FROM u \
      UNION ALL SELECT 'tenant', tenant_id, tenant_id, cost, tokens, i, c, o, day_start, \
        month_start FROM u \
      UNION ALL SELECT 'company', tenant_id, company_id, cost, tokens, i, c, o, day_start, \
        month_start FROM u WHERE company_id IS NOT NULL \
      UNION ALL SELECT 'user', tenant_id, user_id, cost, tokens, i, c, o, day_start, \
        month_start FROM u \
    ), w AS ( \
      SELECT kind, tenant, id, 'day' AS win, day_start AS start, cost, tokens, i, c, o FROM s \
      UNION ALL SELECT kind, tenant, id, 'month', month_start, cost, tokens, i, c, o FROM s \
      UNION ALL SELECT kind, tenant, id, 'week', \
        day_start - mod(mod(day_start, 604800000000) + 604800000000, 604800000000), \
        cost, tokens, i, c, o FROM s WHERE kind = 'user' \
    ) \
    SELECT kind, tenant, id, win, start, \
      LEAST(sum(cost), 9223372036854775807)::int8, count(*)::int8, \
      LEAST(sum(tokens), 9223372036854775807)::int8, \
      LEAST(sum(i), 9223372036854775807)::int8, \
      LEAST(sum(c), 9223372036854775807)::int8, \
      LEAST(sum(o), 9223372036854775807)::int8 \
    FROM w GROUP BY kind, tenant, id, win, start";

/// Adds increments to `rollups` (arrays of [`ROLLUP_COLUMNS`], in key order).
static UPSERT_ROLLUPS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO rollups ({ROLLUP_COLUMNS}) SELECT * FROM UNNEST($1::text[], $2::text[], \
         $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], \
         $10::int8[], $11::int8[]){ROLLUP_CONFLICT}"
    )
});

/// Adds increments to `usage_rollups` (arrays of the columns, in key order).
static UPSERT_USAGE_ROLLUPS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO usage_rollups (dim, day_start, tenant_id, key, model, requests, \
         input_tokens, cached_input_tokens, output_tokens, cost_micros) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
         $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[]){USAGE_ROLLUP_CONFLICT}"
    )
});

/// The advisory-lock key of the writer: one per database and schema.
/// A single-node instance holds it exclusively; cluster instances share it, so the two
/// modes never write to one database at once.
const WRITER_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended('spendguard-writer:' \
    || current_database() || '.' || coalesce(current_schema(), ''), 0))";
const WRITER_LOCK_SHARED: &str = "SELECT pg_try_advisory_lock_shared(hashtextextended(\
    'spendguard-writer:' || current_database() || '.' || coalesce(current_schema(), ''), 0))";

/// The advisory-lock key that serializes migrations.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended(\
    'spendguard-migrate:' || current_database() || '.' || coalesce(current_schema(), ''), 0))";

pub(crate) fn usage_row(row: &Row) -> Result<UsageRecord, StoreError> {
    UsageCols {
        id: get(row, 0)?,
        tenant: get(row, 1)?,
        user: get(row, 2)?,
        company: get(row, 3)?,
        model: get(row, 4)?,
        endpoint: get(row, 5)?,
        tier: get(row, 6)?,
        input_tokens: get(row, 7)?,
        cached_input_tokens: get(row, 8)?,
        output_tokens: get(row, 9)?,
        cost_micros: get(row, 10)?,
        status: get(row, 11)?,
        created_at: time(row, 12)?,
        reservation_id: get(row, 13)?,
        idempotency_key: get(row, 14)?,
        day_start: get(row, 15)?,
        month_start: get(row, 16)?,
        pricing: get(row, 17)?,
        upstream: get(row, 18)?,
        provider_request_id: get(row, 19)?,
        cache_creation_input_tokens: get(row, 20)?,
        cache_creation_1h_input_tokens: get(row, 21)?,
        reasoning_tokens: get(row, 22)?,
        long_context_above: get(row, 23)?,
    }
    .decode()
}

pub(crate) fn reservation_row(row: &Row) -> Result<Reservation, StoreError> {
    ReservationCols {
        id: get(row, 0)?,
        tenant: get(row, 1)?,
        user: get(row, 2)?,
        company: get(row, 3)?,
        tier: get(row, 4)?,
        admitted_tier: get(row, 5)?,
        model: get(row, 6)?,
        endpoint: get(row, 7)?,
        estimate_micros: get(row, 8)?,
        estimated_tokens: get(row, 9)?,
        created_at: time(row, 10)?,
        expires_at: time(row, 11)?,
        day_start: get(row, 12)?,
        month_start: get(row, 13)?,
        idempotency_key: get(row, 14)?,
        fingerprint: get(row, 15)?,
    }
    .decode()
}

/// Reads a row of [`ROLLUP_COLUMNS`].
fn rollup_row(row: &Row) -> Result<CounterRow, StoreError> {
    rollup_row_with(row, &mut TenantCache::default())
}

fn rollup_row_with(row: &Row, tenants: &mut TenantCache) -> Result<CounterRow, StoreError> {
    RollupCols {
        kind: get(row, 0)?,
        tenant: get(row, 1)?,
        id: get(row, 2)?,
        window: get(row, 3)?,
        start: get(row, 4)?,
        spent: get(row, 5)?,
        requests: get(row, 6)?,
        tokens: get(row, 7)?,
        input_tokens: get(row, 8)?,
        cached_input_tokens: get(row, 9)?,
        output_tokens: get(row, 10)?,
    }
    .decode_with(tenants)
}

/// A read-only repeatable-read transaction: every read in it sees one snapshot.
pub(crate) async fn read_snapshot(client: &mut Object) -> Result<Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .db()
}

/// A short description of the database for messages (never the password).
fn describe(config: &Config) -> String {
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("PostgreSQL database `{db}`")
}

/// `host:port` of the servers a configuration names (never its password).
fn server_of(config: &Config) -> String {
    let ports = config.get_ports();
    let servers: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    if servers.is_empty() {
        "localhost:5432".into()
    } else {
        servers.join(", ")
    }
}

async fn take_lock(config: &Config, name: &str, cluster: bool) -> Result<LockConn, StoreError> {
    let (client, connection) = config.connect(NoTls).await.db()?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the PostgreSQL connection holding the writer lock failed");
        }
    });
    let sql = if cluster {
        WRITER_LOCK_SHARED
    } else {
        WRITER_LOCK
    };
    // A holder that just stopped (a restart) may keep its session a moment longer: the
    // lock is tried for up to 2 s before another instance is taken to hold it.
    for attempt in 0..10 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let row = client.query_one(sql, &[]).await.db()?;
        if get::<Option<bool>>(&row, 0)? == Some(true) {
            return Ok(LockConn { client });
        }
    }
    Err(if cluster {
        StoreError::Locked(format!(
            "a single-node spendguard is writing to {name}; stop it first, or run every \
             instance on this database with mode = \"cluster\""
        ))
    } else {
        StoreError::locked(name)
    })
}

async fn insert_reservations(
    tx: &Transaction<'_>,
    reserved: &[&Reservation],
) -> Result<(), StoreError> {
    let n = reserved.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut companies = Vec::with_capacity(n);
    let mut tiers = Vec::with_capacity(n);
    let mut admitted = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut endpoints = Vec::with_capacity(n);
    let mut estimates = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut days = Vec::with_capacity(n);
    let mut months = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut fingerprints = Vec::with_capacity(n);
    for r in reserved {
        let s = &r.subject;
        ids.push(r.id);
        tenants.push(s.tenant.as_str());
        users.push(s.user.as_str());
        companies.push(s.company.as_ref().map(|c| c.as_str()));
        tiers.push(s.tier.as_ref().map(|t| t.as_str()));
        admitted.push(r.tier.as_str());
        models.push(s.model.as_str());
        endpoints.push(s.endpoint.as_ref().map(|e| e.as_str()));
        estimates.push(r.estimate.micros());
        tokens.push(clamp_u64(r.estimated_tokens));
        created.push(to_time(r.created_at)?);
        expires.push(to_time(r.expires_at)?);
        days.push(r.day_start);
        months.push(r.month_start);
        keys.push(r.idempotency_key.as_ref().map(|k| k.as_str()));
        // The same bits as an i64.
        fingerprints.push(r.fingerprint as i64);
    }
    let stmt = tx.prepare_cached(INSERT_RESERVATIONS).await.db()?;
    tx.execute(
        &stmt,
        &[
            &ids,
            &tenants,
            &users,
            &companies,
            &tiers,
            &admitted,
            &models,
            &endpoints,
            &estimates,
            &tokens,
            &created,
            &expires,
            &days,
            &months,
            &keys,
            &fingerprints,
        ],
    )
    .await
    .db()?;
    Ok(())
}

async fn settle(tx: &Transaction<'_>, settles: &[Settle<'_>]) -> Result<(), StoreError> {
    let (mut commit_ids, mut commit_usage, mut commit_ats) = (Vec::new(), Vec::new(), Vec::new());
    let (mut release_ids, mut reasons, mut ats) = (Vec::new(), Vec::new(), Vec::new());
    let (mut expire_ids, mut expire_usage) = (Vec::new(), Vec::new());
    for s in settles {
        match s {
            Settle::Commit { id, usage_id, at } => {
                commit_ids.push(*id);
                commit_usage.push(*usage_id);
                commit_ats.push(to_time(*at)?);
            }
            Settle::Release { id, reason, at } => {
                release_ids.push(*id);
                reasons.push(*reason);
                ats.push(to_time(*at)?);
            }
            Settle::Expire { id, usage_id } => {
                expire_ids.push(*id);
                expire_usage.push(*usage_id);
            }
        }
    }
    // Lock every reservation to settle first, in id order: concurrent transactions settling
    // overlapping reservations (a replayed batch beside a live one) then wait for each other
    // instead of deadlocking on the updates' join order.
    let mut all: Vec<Uuid> = commit_ids
        .iter()
        .chain(&release_ids)
        .chain(&expire_ids)
        .copied()
        .collect();
    if all.len() > 1 {
        all.sort_unstable();
        let stmt = tx.prepare_cached(LOCK_RESERVATIONS).await.db()?;
        tx.execute(&stmt, &[&all]).await.db()?;
    }
    // A reservation is settled at most once per plan, so the order of these is free.
    if !commit_ids.is_empty() {
        let stmt = tx.prepare_cached(COMMIT_RESERVATIONS).await.db()?;
        tx.execute(&stmt, &[&commit_ids, &commit_usage, &commit_ats])
            .await
            .db()?;
    }
    if !release_ids.is_empty() {
        let stmt = tx.prepare_cached(RELEASE_RESERVATIONS).await.db()?;
        tx.execute(&stmt, &[&release_ids, &reasons, &ats])
            .await
            .db()?;
    }
    if !expire_ids.is_empty() {
        let stmt = tx.prepare_cached(EXPIRE_RESERVATIONS).await.db()?;
        tx.execute(&stmt, &[&expire_ids, &expire_usage])
            .await
            .db()?;
    }
    Ok(())
}

/// Inserts the usage rows; returns the ids of the rows actually inserted.
async fn insert_usage(
    tx: &Transaction<'_>,
    usage: &[&UsageRecord],
) -> Result<HashSet<Uuid>, StoreError> {
    let n = usage.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut companies = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut endpoints = Vec::with_capacity(n);
    let mut tiers = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut reservations = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut days = Vec::with_capacity(n);
    let mut months = Vec::with_capacity(n);
    let mut pricings = Vec::with_capacity(n);
    let mut upstreams = Vec::with_capacity(n);
    let mut request_ids = Vec::with_capacity(n);
    let mut cache_creations = Vec::with_capacity(n);
    let mut cache_creations_1h = Vec::with_capacity(n);
    let mut reasonings = Vec::with_capacity(n);
    let mut tiers_above = Vec::with_capacity(n);
    for u in usage {
        cache_creations.push(clamp_u64(u.tokens.cache_creation));
        cache_creations_1h.push(clamp_u64(u.tokens.cache_creation_1h));
        reasonings.push(clamp_u64(u.tokens.reasoning));
        tiers_above.push(u.long_context_above.map(clamp_u64));
        ids.push(u.id);
        tenants.push(u.tenant.as_str());
        users.push(u.user.as_str());
        companies.push(u.company.as_ref().map(|c| c.as_str()));
        models.push(u.model.as_str());
        endpoints.push(u.endpoint.as_ref().map(|e| e.as_str()));
        tiers.push(u.tier.as_str());
        inputs.push(clamp_u64(u.tokens.input));
        cached.push(clamp_u64(u.tokens.cached_input));
        outputs.push(clamp_u64(u.tokens.output));
        costs.push(u.cost.micros());
        statuses.push(u.status.as_str());
        created.push(to_time(u.created_at)?);
        reservations.push(u.reservation_id);
        keys.push(u.idempotency_key.as_ref().map(|k| k.as_str()));
        days.push(u.day_start);
        months.push(u.month_start);
        pricings.push(u.pricing.as_str());
        upstreams.push(u.origin.as_ref().map(|o| o.upstream.as_str()));
        request_ids.push(u.origin.as_ref().and_then(|o| o.request_id.as_deref()));
    }
    let stmt = tx.prepare_cached(INSERT_USAGE).await.db()?;
    let params: [&(dyn ToSql + Sync); 24] = [
        &ids,
        &tenants,
        &users,
        &companies,
        &models,
        &endpoints,
        &tiers,
        &inputs,
        &cached,
        &outputs,
        &costs,
        &statuses,
        &created,
        &reservations,
        &keys,
        &days,
        &months,
        &pricings,
        &upstreams,
        &request_ids,
        &cache_creations,
        &cache_creations_1h,
        &reasonings,
        &tiers_above,
    ];
    let rows = tx.query(&stmt, &params).await.db()?;
    let mut inserted = HashSet::with_capacity(rows.len());
    for row in &rows {
        inserted.insert(get::<Uuid>(row, 0)?);
    }
    if inserted.len() < usage.len() {
        warn_key_conflicts(tx, usage, &inserted).await?;
    }
    Ok(inserted)
}

/// Warns about direct records skipped because another record holds their idempotency key
/// (the others skipped were already stored: a replay).
async fn warn_key_conflicts(
    tx: &Transaction<'_>,
    usage: &[&UsageRecord],
    inserted: &HashSet<Uuid>,
) -> Result<(), StoreError> {
    let candidates: Vec<Uuid> = usage
        .iter()
        .filter(|u| {
            u.idempotency_key.is_some() && u.reservation_id.is_none() && !inserted.contains(&u.id)
        })
        .map(|u| u.id)
        .collect();
    if candidates.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached("SELECT id FROM ai_usage WHERE id = ANY($1::uuid[])")
        .await
        .db()?;
    let mut stored = HashSet::new();
    for row in tx.query(&stmt, &[&candidates]).await.db()? {
        stored.insert(get::<Uuid>(&row, 0)?);
    }
    for id in candidates.iter().filter(|id| !stored.contains(id)) {
        tracing::warn!(
            %id,
            "usage record skipped: its idempotency key belongs to another record"
        );
    }
    Ok(())
}

async fn upsert_rollups(tx: &Transaction<'_>, rows: Vec<CounterRow>) -> Result<(), StoreError> {
    let n = rows.len();
    let mut kinds = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut windows = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    let mut spent = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut input = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut output = Vec::with_capacity(n);
    for row in &rows {
        let (kind, tenant, id) = scope_columns(&row.scope);
        kinds.push(kind);
        tenants.push(tenant);
        ids.push(id);
        windows.push(row.window.as_str());
        starts.push(row.start);
        spent.push(row.spent.micros());
        requests.push(clamp_u64(row.requests));
        tokens.push(clamp_u64(row.tokens));
        input.push(clamp_u64(row.input_tokens));
        cached.push(clamp_u64(row.cached_input_tokens));
        output.push(clamp_u64(row.output_tokens));
    }
    let stmt = tx.prepare_cached(&UPSERT_ROLLUPS).await.db()?;
    let params: [&(dyn ToSql + Sync); 11] = [
        &kinds, &tenants, &ids, &windows, &starts, &spent, &requests, &tokens, &input, &cached,
        &output,
    ];
    tx.execute(&stmt, &params).await.db()?;
    Ok(())
}

/// Adds the increments to `usage_rollups`, creating rows as needed.
async fn upsert_usage_rollups(
    tx: &Transaction<'_>,
    rows: &[(UsageKey<'_>, UsageTotals)],
) -> Result<(), StoreError> {
    let n = rows.len();
    let mut dims = Vec::with_capacity(n);
    let mut days = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut input = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut output = Vec::with_capacity(n);
    let mut cost = Vec::with_capacity(n);
    for ((dim, day, tenant, key, model), t) in rows {
        dims.push(dim.as_str());
        days.push(*day);
        tenants.push(*tenant);
        keys.push(*key);
        models.push(*model);
        requests.push(clamp_u64(t.requests));
        input.push(clamp_u64(t.input_tokens));
        cached.push(clamp_u64(t.cached_input_tokens));
        output.push(clamp_u64(t.output_tokens));
        cost.push(t.cost.micros());
    }
    let stmt = tx.prepare_cached(&UPSERT_USAGE_ROLLUPS).await.db()?;
    let params: [&(dyn ToSql + Sync); 10] = [
        &dims, &days, &tenants, &keys, &models, &requests, &input, &cached, &output, &cost,
    ];
    tx.execute(&stmt, &params).await.db()?;
    Ok(())
}

async fn set_overrides(tx: &Transaction<'_>, plan: &Plan<'_>) -> Result<(), StoreError> {
    for (scope, budget) in &plan.budgets {
        let (kind, tenant, id) = scope_columns(scope);
        if budget.daily.is_none() && budget.monthly.is_none() {
            let stmt = tx.prepare_cached(DELETE_BUDGET).await.db()?;
            tx.execute(&stmt, &[&kind, &tenant, &id]).await.db()?;
        } else {
            let stmt = tx.prepare_cached(UPSERT_BUDGET).await.db()?;
            let daily = budget.daily.map(Money::micros);
            let monthly = budget.monthly.map(Money::micros);
            tx.execute(&stmt, &[&kind, &tenant, &id, &daily, &monthly])
                .await
                .db()?;
        }
    }
    for (tenant, user, overrides) in &plan.users {
        if overrides.is_empty() {
            let stmt = tx.prepare_cached(DELETE_USER).await.db()?;
            tx.execute(&stmt, &[&tenant.as_str(), &user.as_str()])
                .await
                .db()?;
        } else {
            let stmt = tx.prepare_cached(UPSERT_USER).await.db()?;
            let settings = encode_user(overrides)?;
            tx.execute(&stmt, &[&tenant.as_str(), &user.as_str(), &settings])
                .await
                .db()?;
        }
    }
    for (tenant, prices) in &plan.tenant_prices {
        if **prices == spendguard_core::prices::TenantPrices::default() {
            let stmt = tx.prepare_cached(DELETE_TENANT_PRICES).await.db()?;
            tx.execute(&stmt, &[&tenant.as_str()]).await.db()?;
        } else {
            let stmt = tx.prepare_cached(UPSERT_TENANT_PRICES).await.db()?;
            let settings = encode_tenant_prices(prices)?;
            tx.execute(&stmt, &[&tenant.as_str(), &settings])
                .await
                .db()?;
        }
    }
    Ok(())
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db?…`), takes
    /// the writer lock if asked, and applies pending migrations.
    pub async fn open(url: &str, options: &OpenOptions) -> Result<PostgresStore, StoreError> {
        let config: Config = url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("bad PostgreSQL URL: {e}")))?;
        PostgresStore::connect(config, options).await
    }

    /// Like [`PostgresStore::open`], from a parsed configuration (e.g. with
    /// `options("-csearch_path=…")` to use another schema).
    pub async fn connect(
        mut config: Config,
        options: &OpenOptions,
    ) -> Result<PostgresStore, StoreError> {
        if matches!(config.get_ssl_mode(), SslMode::Require) {
            return Err(StoreError::Invalid(
                "TLS connections to PostgreSQL are not supported; use sslmode=disable or \
                 sslmode=prefer"
                    .into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("spendguard");
        }
        let name = describe(&config);
        let server = server_of(&config);
        PostgresStore::connect_named(config, options, name)
            .await
            .map_err(|e| match e {
                StoreError::Unavailable(why) => {
                    StoreError::Unavailable(format!("PostgreSQL at {server}: {why}"))
                }
                other => other,
            })
    }

    async fn connect_named(
        config: Config,
        options: &OpenOptions,
        name: String,
    ) -> Result<PostgresStore, StoreError> {
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(15)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| StoreError::Invalid(format!("PostgreSQL connection pool: {e}")))?;
        let lock = if options.take_writer_lock {
            Some(Box::new(tokio::sync::Mutex::new(
                take_lock(&config, &name, options.cluster).await?,
            )))
        } else {
            None
        };
        let mut store = PostgresStore {
            pool,
            config: Box::new(config),
            lock,
            name,
            journal: Arc::new(Journal::unknown()),
            keep_journal: options.keep_journal,
            cluster: options.cluster,
            appending: tokio::sync::Mutex::new(()),
            projecting: Arc::default(),
            projector: None,
            known_counters: std::sync::Mutex::default(),
            known_allowances: std::sync::Mutex::default(),
        };
        store.migrate().await?;
        let (pool, projecting, keep) = (
            store.pool.clone(),
            store.projecting.clone(),
            store.keep_journal,
        );
        store.projector = Some(tokio::spawn(journal::run_projector(
            store.journal.clone(),
            move || {
                let (pool, projecting) = (pool.clone(), projecting.clone());
                Some(async move {
                    let _turn = projecting.lock().await;
                    project(&pool, keep).await
                })
            },
        )));
        Ok(store)
    }

    /// Every batch in the journal, oldest first (see [`AnyStore::journal`](crate::AnyStore::journal)).
    pub async fn journal(&self) -> Result<Vec<Vec<Event>>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT seq, events FROM journal ORDER BY seq", &[])
            .await
            .db()?;
        rows.iter()
            .map(|row| journal::decode(get(row, 0)?, get::<&[u8]>(row, 1)?))
            .collect()
    }

    /// Projects pending journal batches before a report, waiting a bounded time.
    pub(crate) async fn catch_up_for_report(&self) -> Result<(), StoreError> {
        journal::for_report(self.catch_up()).await
    }

    /// Projects every pending journal batch (reads of the projected tables do it first).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        // A store that is not the writer cannot know what the writer appended: it looks.
        if self.lock.is_some() && !self.journal.pending() {
            return Ok(());
        }
        let _turn = self.projecting.lock().await;
        let seen = self.journal.observe();
        loop {
            let more = project(&self.pool, self.keep_journal).await?;
            self.journal.projected(seen, more);
            if !more {
                return Ok(());
            }
        }
    }

    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Makes sure this store still holds the writer lock (if it is meant to), taking it again
    /// if the connection that held it dropped.
    async fn check_lock(&self) -> Result<(), StoreError> {
        let Some(lock) = &self.lock else {
            return Ok(());
        };
        let mut held = lock.lock().await;
        if held.client.is_closed() {
            tracing::warn!(
                database = %self.name,
                "the connection holding the writer lock closed; taking the lock again"
            );
            *held = take_lock(&self.config, &self.name, self.cluster).await?;
        }
        Ok(())
    }

    /// Applies the migrations not applied yet (`open` does it already). Concurrent
    /// migrations of the same schema wait for each other.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute(MIGRATION_LOCK, &[]).await.db()?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version bigint PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .db()?;
        let rows = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .db()?;
        let applied = rows
            .iter()
            .map(|r| get::<i64>(r, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let current = applied.iter().copied().max().unwrap_or(0);
        let latest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > latest {
            tracing::warn!(
                current,
                latest,
                "the PostgreSQL schema is newer than this version of spendguard knows"
            );
        }
        // Every version not applied yet, also one below the highest applied (a migration
        // numbered before another that shipped first).
        for (version, sql) in MIGRATIONS.iter().filter(|m| !applied.contains(&m.0)) {
            tx.batch_execute(sql).await.db()?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .db()?;
            tracing::info!(version, "applied PostgreSQL migration");
        }
        // Migration 7 puts row-level security on the tables; the role spendguard runs as
        // must not be subject to it, or it would read no counters and write no rows.
        let row = tx
            .query_one(
                "SELECT row_security_active('ai_usage'), current_user::text",
                &[],
            )
            .await
            .db()?;
        if get::<bool>(&row, 0)? {
            let role: String = get(&row, 1)?;
            return Err(StoreError::Invalid(format!(
                "row-level security applies to the role `{role}` on ai_usage, so spendguard \
                 would not see every tenant's rows: run spendguard as the role that owns its \
                 tables, or give the role BYPASSRLS (see docs/postgresql.md)"
            )));
        }
        tx.commit().await.db()
    }

    /// Recomputes `usage_rollups` from `ai_usage`, as migration 2 fills it: for repairs,
    /// tests and benchmarks (it reads every usage row). Concurrent batches wait for it.
    pub async fn rebuild_usage_rollups(&self) -> Result<(), StoreError> {
        self.catch_up().await?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.batch_execute(&format!(
            "LOCK TABLE ai_usage IN SHARE MODE; {POSTGRES_REBUILD_USAGE_ROLLUPS}"
        ))
        .await
        .db()?;
        tx.commit().await.db()
    }

    /// The versions of the applied migrations, ascending.
    pub async fn schema_versions(&self) -> Result<Vec<i64>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .db()?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    /// Projects what is pending, releases the writer lock and closes the pool.
    pub async fn close(self) {
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "the journal could not be projected at close; it will be at the next start");
        }
        if let Some(lock) = &self.lock {
            let held = lock.lock().await;
            if let Err(e) = held
                .client
                .execute("SELECT pg_advisory_unlock_all()", &[])
                .await
            {
                tracing::debug!(error = %e, "releasing the writer lock failed");
            }
        }
        self.pool.close();
    }
}

/// Reads the admin overrides (budgets, users, tenant prices) into `snapshot`.
pub(crate) async fn overrides_into(
    tx: &Transaction<'_>,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    let sql = "SELECT scope_kind, tenant_id, scope_id, daily_micros, monthly_micros \
                   FROM budget_overrides ORDER BY scope_kind, tenant_id, scope_id";
    for row in tx.query(sql, &[]).await.db()? {
        let scope = scope_from_columns(get(&row, 0)?, get(&row, 1)?, get(&row, 2)?)?;
        let daily: Option<i64> = get(&row, 3)?;
        let monthly: Option<i64> = get(&row, 4)?;
        snapshot.budgets.push((
            scope,
            BudgetOverride {
                daily: daily.map(Money::from_micros),
                monthly: monthly.map(Money::from_micros),
            },
        ));
    }
    let sql = "SELECT tenant_id, user_id, settings::text FROM user_overrides \
                   ORDER BY tenant_id, user_id";
    for row in tx.query(sql, &[]).await.db()? {
        snapshot.users.push((
            parse_id("tenant_id", get(&row, 0)?, TenantId::parse)?,
            parse_id("user_id", get(&row, 1)?, UserId::parse)?,
            decode_user(get(&row, 2)?)?,
        ));
    }
    let sql = "SELECT tenant_id, settings::text FROM tenant_prices ORDER BY tenant_id";
    for row in tx.query(sql, &[]).await.db()? {
        snapshot.tenant_prices.push((
            parse_id("tenant_id", get(&row, 0)?, TenantId::parse)?,
            decode_tenant_prices(get(&row, 1)?)?,
        ));
    }
    Ok(())
}

/// Applies `events` to the tables, inside `tx` (a projection of journal batches).
pub(crate) async fn apply_events(tx: &Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    let plan = Plan::new(events);
    if !plan.reserved.is_empty() {
        insert_reservations(tx, &plan.reserved).await?;
        for r in plan.reserved.iter().filter(|r| r.would_deny.is_some()) {
            let stmt = tx.prepare_cached(INSERT_WOULD_DENY).await.db()?;
            tx.execute(
                &stmt,
                &[
                    &r.id,
                    &r.subject.tenant.as_str(),
                    &r.day_start,
                    &r.would_deny.as_deref(),
                ],
            )
            .await
            .db()?;
        }
    }
    if !plan.settles.is_empty() {
        settle(tx, &plan.settles).await?;
    }
    if !plan.usage.is_empty() {
        let mut inserted = insert_usage(tx, &plan.usage).await?;
        let mut deltas = Deltas::default();
        let mut usage_deltas = UsageDeltas::default();
        for u in &plan.usage {
            if inserted.remove(&u.id) {
                deltas.add(u);
                usage_deltas.add(u);
            }
        }
        if !deltas.is_empty() {
            upsert_rollups(tx, deltas.into_rows()).await?;
        }
        if !usage_deltas.is_empty() {
            upsert_usage_rollups(tx, &usage_deltas.into_rows()).await?;
        }
    }
    if !plan.budgets.is_empty() || !plan.users.is_empty() || !plan.tenant_prices.is_empty() {
        set_overrides(tx, &plan).await?;
    }
    Ok(())
}

/// Refuses a batch holding an instant that `timestamptz` cannot hold, before it is
/// journaled: the projection would refuse it after its caller was told it is durable.
fn check_instants(events: &[Event]) -> Result<(), StoreError> {
    for event in events {
        match event {
            Event::Reserved(r) => {
                to_time(r.created_at)?;
                to_time(r.expires_at)?;
            }
            Event::Committed { usage, .. }
            | Event::Expired { usage, .. }
            | Event::Recorded(usage) => {
                to_time(usage.created_at)?;
            }
            Event::Released { at, .. } => {
                to_time(*at)?;
            }
            Event::BudgetSet { .. } | Event::UserSet { .. } | Event::TenantPricesSet { .. } => {}
        }
    }
    Ok(())
}

/// Journal rows one projection reads at most.
const PROJECT_ROWS: i64 = 256;
/// The most events one projection applies (whole batches). Appends do not wait for
/// projections on PostgreSQL (other connections), so they can be larger than on SQLite.
const PROJECT_EVENTS: usize = 4096;

/// Projects the next journal batches (up to about [`PROJECT_EVENTS`] events) in one
/// transaction that also moves the cursor (locked, so projections of several processes
/// take turns). Returns whether batches remain.
async fn project(pool: &Pool, keep: bool) -> Result<bool, StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let waiting = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM journal \
             WHERE seq > (SELECT projected FROM journal_cursor WHERE id = 1))",
            &[],
        )
        .await
        .db()?;
    if !get::<bool>(&waiting, 0)? {
        return Ok(false);
    }
    let tx = client.transaction().await.db()?;
    let cursor: i64 = get(
        &tx.query_one(
            "SELECT projected FROM journal_cursor WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .db()?,
        0,
    )?;
    let rows = tx
        .query(
            "SELECT seq, events FROM journal WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&cursor, &PROJECT_ROWS],
        )
        .await
        .db()?;
    let mut taken = journal::Taken::default();
    for row in &rows {
        if !taken.take(PROJECT_EVENTS, get(row, 0)?, get::<&[u8]>(row, 1)?)? {
            break;
        }
    }
    // A full page of rows may have more behind it.
    taken.more |= rows.len() as i64 == PROJECT_ROWS;
    let Some(last) = taken.last() else {
        return Ok(false);
    };
    let mut tx = tx;
    let sp = tx.savepoint("projection").await.db()?;
    match apply_events(&sp, &taken.events).await {
        Ok(()) => sp.commit().await.db()?,
        Err(e) if matches!(e, StoreError::Unavailable(_) | StoreError::Locked(_)) => {
            return Err(e);
        }
        Err(e) => {
            tracing::error!(error = %e, "the projection of journal batches was refused; applying them one event at a time");
            sp.rollback().await.db()?;
            for (seq, i, event) in taken.each() {
                let one = tx.savepoint("one").await.db()?;
                match apply_events(&one, std::slice::from_ref(event)).await {
                    Ok(()) => one.commit().await.db()?,
                    Err(e) => {
                        one.rollback().await.db()?;
                        let letter = journal::dead_letter(seq, i, event, &e);
                        tracing::error!(error = %letter.error, dead_letter = %letter.id, "the projection refused an event for good; kept as a dead letter");
                        tx.execute(
                            INSERT_DEAD_LETTER,
                            &[
                                &letter.id,
                                &letter.event,
                                &letter.error,
                                &to_time(letter.created_at)?,
                            ],
                        )
                        .await
                        .db()?;
                    }
                }
            }
        }
    }
    tx.execute(
        "UPDATE journal_cursor SET projected = $1 WHERE id = 1",
        &[&last],
    )
    .await
    .db()?;
    if !keep {
        tx.execute("DELETE FROM journal WHERE seq <= $1", &[&last])
            .await
            .db()?;
    }
    tx.commit().await.db()?;
    Ok(taken.more)
}

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (id, event, error, created_at) \
    VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";

impl Store for PostgresStore {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.check_lock().await?;
        check_instants(events)?;
        let body = journal::encode(events, true)?;
        {
            // One append at a time: sequence numbers are then committed in their order, so
            // the projector never passes a batch that commits later with a lower number.
            let _turn = self.appending.lock().await;
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO journal (created_at, events) VALUES (now(), $1)",
                    &[&body],
                )
                .await
                .db()?;
        }
        self.journal.appended(events.len());
        Ok(())
    }

    async fn load(&self, day_start: Micros, month_start: Micros) -> Result<Snapshot, StoreError> {
        self.load_into(day_start, month_start, None).await
    }

    async fn load_streaming(
        &self,
        day_start: Micros,
        month_start: Micros,
        counters: CounterChunks,
    ) -> Result<Snapshot, StoreError> {
        self.load_into(day_start, month_start, Some(&counters))
            .await
    }

    async fn usage(&self, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
        self.catch_up().await?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {USAGE_COLUMNS} FROM ai_usage WHERE id = $1"
            ))
            .await
            .db()?;
        client
            .query_opt(&stmt, &[&id])
            .await
            .db()?
            .map(|row| usage_row(&row))
            .transpose()
    }

    async fn reservation(&self, id: Uuid) -> Result<Option<StoredReservation>, StoreError> {
        self.catch_up().await?;
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS}, state, usage_id FROM reservations WHERE id = $1"
        );
        self.stored_reservation(&sql, &[&id]).await
    }

    async fn reservation_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<StoredReservation>, StoreError> {
        self.catch_up().await?;
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS}, state, usage_id FROM reservations \
             WHERE tenant_id = $1 AND idempotency_key = $2 ORDER BY created_at DESC LIMIT 1"
        );
        self.stored_reservation(&sql, &[&tenant.as_str(), &key.as_str()])
            .await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT value FROM settings WHERE key = $1")
            .await
            .db()?;
        let row = client.query_opt(&stmt, &[&key]).await.db()?;
        row.map(|r| get::<String>(&r, 0)).transpose()
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .await
            .db()?;
        client.execute(&stmt, &[&key, &value]).await.db()?;
        Ok(())
    }

    async fn usage_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<UsageRecord>, StoreError> {
        self.catch_up().await?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {USAGE_COLUMNS} FROM ai_usage WHERE tenant_id = $1 \
                 AND idempotency_key = $2 AND reservation_id IS NULL"
            ))
            .await
            .db()?;
        client
            .query_opt(&stmt, &[&tenant.as_str(), &key.as_str()])
            .await
            .db()?
            .map(|row| usage_row(&row))
            .transpose()
    }

    async fn recount(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.catch_up().await?;
        let client = self.client().await?;
        let mut out = Vec::new();
        for row in client.query(RECOUNT, &[]).await.db()? {
            out.push(rollup_row(&row)?);
        }
        sort_rows(&mut out);
        Ok(out)
    }

    async fn rollups(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.catch_up().await?;
        let client = self.client().await?;
        let mut out = Vec::new();
        let sql = format!("SELECT {ROLLUP_COLUMNS} FROM rollups");
        for row in client.query(&sql, &[]).await.db()? {
            out.push(rollup_row(&row)?);
        }
        sort_rows(&mut out);
        Ok(out)
    }

    async fn usage_count(&self) -> Result<u64, StoreError> {
        self.catch_up().await?;
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*) FROM ai_usage", &[])
            .await
            .db()?;
        let n: i64 = get(&row, 0)?;
        Ok(n as u64)
    }

    async fn database_id(&self) -> Result<String, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT value FROM settings WHERE key = 'database_id'", &[])
            .await
            .db()?;
        get(&row, 0)
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO dead_letters (id, event, error, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
            )
            .await
            .db()?;
        for l in letters {
            tx.execute(&stmt, &[&l.id, &l.event, &l.error, &to_time(l.created_at)?])
                .await
                .db()?;
        }
        tx.commit().await.db()
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, event, error, created_at FROM dead_letters \
                 ORDER BY created_at, id",
                &[],
            )
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: get(row, 0)?,
                    event: get(row, 1)?,
                    error: get(row, 2)?,
                    created_at: from_time(get(row, 3)?),
                })
            })
            .collect()
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }
}

/// API keys (hashes only).
impl PostgresStore {
    /// The reservation that `sql` (selecting [`RESERVATION_COLUMNS`], `state` and
    /// `usage_id`) finds, with its settling record.
    async fn stored_reservation(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<StoredReservation>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.db()?;
        let Some(row) = client.query_opt(&stmt, params).await.db()? else {
            return Ok(None);
        };
        let reservation = reservation_row(&row)?;
        let state: &str = get(&row, 16)?;
        let state = ReservationState::parse(state)
            .ok_or_else(|| corrupt(format!("unknown reservation state `{state}`")))?;
        let usage_id: Option<Uuid> = get(&row, 17)?;
        drop(client);
        let usage = match usage_id {
            Some(u) => self.usage(u).await?,
            None => None,
        };
        Ok(Some(StoredReservation {
            reservation,
            state,
            usage,
        }))
    }

    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO api_keys (id, tenant_id, hash, prefix, created_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &key.id,
                    &key.tenant.as_ref().map(|t| t.as_str()),
                    &key.hash,
                    &key.prefix,
                    &to_time(key.created_at)?,
                    &key.revoked_at.map(to_time).transpose()?,
                ],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, tenant_id, hash, prefix, created_at, revoked_at FROM api_keys \
                 ORDER BY created_at, id",
                &[],
            )
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let tenant: Option<String> = get(row, 1)?;
                Ok(ApiKeyRecord {
                    id: get(row, 0)?,
                    tenant: tenant
                        .map(|t| {
                            spendguard_core::TenantId::parse(&t).map_err(crate::common::corrupt)
                        })
                        .transpose()?,
                    hash: get(row, 2)?,
                    prefix: get(row, 3)?,
                    created_at: from_time(get(row, 4)?),
                    revoked_at: get::<Option<SystemTime>>(row, 5)?.map(from_time),
                })
            })
            .collect()
    }

    /// Marks a key revoked; `false` when there is no such unrevoked key.
    pub async fn revoke_api_key(&self, id: &str, at: Micros) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &to_time(at)?],
            )
            .await
            .map_err(map_err)?;
        Ok(n == 1)
    }
}

impl PostgresStore {
    /// [`Store::load`], the counters sent to `counters` in chunks when given.
    async fn load_into(
        &self,
        day_start: Micros,
        month_start: Micros,
        counters: Option<&CounterChunks>,
    ) -> Result<Snapshot, StoreError> {
        self.catch_up().await?;
        let mut client = self.client().await?;
        // One repeatable-read transaction: a consistent snapshot.
        let tx = read_snapshot(&mut client).await?;
        let mut snapshot = Snapshot::default();
        // The current windows' counters (two for each scope: a million users are two
        // million rows) through binary COPY, decoded as they arrive: a query would build a
        // `Row` for each and collect them all before the first is decoded. (COPY takes no
        // parameters; the window starts are integers. Reading the day rows and the month
        // rows on two connections at once was slower: each reads the pages of both.)
        let sql = format!(
            "COPY (SELECT {ROLLUP_COLUMNS} FROM rollups \
             WHERE (\"window\" = 'day' AND window_start >= {day_start}) \
             OR (\"window\" = 'month' AND window_start >= {month_start})) \
             TO STDOUT (FORMAT binary)"
        );
        snapshot.counters = copy_counters(&tx, &sql, counters).await?;
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'open' \
             ORDER BY created_at, id"
        );
        for row in tx.query(&sql, &[]).await.db()? {
            snapshot.open.push(reservation_row(&row)?);
        }
        overrides_into(&tx, &mut snapshot).await?;
        tx.commit().await.db()?;
        Ok(snapshot)
    }
}

/// Reads the counters a binary `COPY … TO STDOUT` of [`ROLLUP_COLUMNS`] gives, sending them
/// to `sink` in chunks when given; returns those not sent.
async fn copy_counters(
    tx: &Transaction<'_>,
    sql: &str,
    sink: Option<&CounterChunks>,
) -> Result<Vec<CounterRow>, StoreError> {
    let abandoned = |_| StoreError::Unavailable("start-up was abandoned".into());
    let mut tenants = TenantCache::default();
    let mut reader = CopyReader::<ROLLUP_COLUMN_COUNT>::new();
    let mut chunks = std::pin::pin!(tx.copy_out(sql).await.db()?);
    let mut rows = Vec::new();
    while let Some(chunk) = chunks.next().await {
        reader.feed(&chunk.db()?, |f| {
            rows.push(
                RollupCols {
                    kind: text(f[0], "scope_kind")?,
                    tenant: text(f[1], "tenant_id")?,
                    id: text(f[2], "scope_id")?,
                    window: text(f[3], "window")?,
                    start: int8(f[4], "window_start")?,
                    spent: int8(f[5], "spent_micros")?,
                    requests: int8(f[6], "requests")?,
                    tokens: int8(f[7], "tokens")?,
                    input_tokens: int8(f[8], "input_tokens")?,
                    cached_input_tokens: int8(f[9], "cached_input_tokens")?,
                    output_tokens: int8(f[10], "output_tokens")?,
                }
                .decode_with(&mut tenants)?,
            );
            Ok(())
        })?;
        if let Some(sink) = sink
            && rows.len() >= COUNTER_CHUNK
        {
            sink.send(std::mem::replace(
                &mut rows,
                Vec::with_capacity(COUNTER_CHUNK),
            ))
            .map_err(abandoned)?;
        }
    }
    reader.finish()?;
    match sink {
        Some(sink) => {
            sink.send(rows).map_err(abandoned)?;
            Ok(Vec::new())
        }
        None => Ok(rows),
    }
}
