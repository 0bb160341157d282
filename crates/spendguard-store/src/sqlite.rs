//! The SQLite backend: one database file in WAL mode, one connection behind a mutex, used
//! from tokio's blocking pool. Statements are prepared once and cached. Reports and other
//! reads of analytics use a second, query-only connection, so that they never hold up the
//! writer (WAL lets it read while the writer writes).
//!
//! The single-writer lock is an exclusive advisory lock on `<database file>.lock`, held for
//! the store's life (the operating system releases it when the process ends).
//!
//! The journal (see the `journal` module) lives in a database file of its own beside the main
//! one, `<database file>.journal`, with its own connections: SQLite lets one transaction
//! write a file at a time, so an append never waits for a projection transaction on the
//! main file (see [`JournalFile`]). An in-memory database keeps its journal in the main
//! database's `journal` table.

use std::fs::File;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};
use spendguard_core::{
    BudgetOverride, CounterRow, Event, IdempotencyKey, Micros, Money, ScopeKey, Snapshot, TenantId,
    Tokens, UsageRecord, UserId,
};
use uuid::Uuid;

use crate::common::{
    Deltas, Plan, ROLLUP_COLUMN_COUNT, ROLLUP_COLUMNS, ROLLUP_CONFLICT, ReservationCols,
    RollupCols, Settle, TenantCache, USAGE_ROLLUP_CONFLICT, UsageCols, UsageDeltas, UsageKey,
    clamp_u64, corrupt, decode_tenant_prices, decode_user, encode_tenant_prices, encode_user,
    now_micros, parse_id, scope_columns, scope_from_columns, sort_rows, to_u64,
};
use crate::error::StoreError;
use crate::journal::{self, Journal};
use crate::migrations::{SQLITE as MIGRATIONS, SQLITE_REBUILD_USAGE_ROLLUPS};
use crate::{ApiKeyRecord, OpenOptions, ReservationState, Store, StoredReservation};
use crate::{COUNTER_CHUNK, CounterChunks, DeadLetter, UsageTotals};

/// A store in one SQLite database file.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// A query-only connection for analytics reads; `None` for an in-memory database (a
    /// second connection would open another database), which reads on `conn`.
    reader: Option<Arc<Mutex<Connection>>>,
    /// The locked `<path>.lock` file, when this store is the single writer.
    lock: Option<File>,
    path: String,
    journal: Arc<Journal>,
    /// The journal's own file; `None` for an in-memory database (the journal is the main
    /// database's `journal` table).
    journal_file: Option<Arc<JournalFile>>,
    /// Keep projected journal rows (see [`OpenOptions::keep_journal`]).
    keep_journal: bool,
    /// The task projecting the journal, stopped when the store is dropped.
    projector: Option<tokio::task::JoinHandle<()>>,
    /// The checkpointer thread runs while this lives.
    _checkpointer: Arc<()>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some(p) = self.projector.take() {
            p.abort();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("writer_lock", &self.lock.is_some())
            .finish()
    }
}

/// Maps rusqlite's errors to [`StoreError`]s.
pub(crate) trait Db<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(map_err)
    }
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(e.to_string())
            }
            ErrorCode::PermissionDenied
            | ErrorCode::OperationAborted
            | ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::OutOfMemory
            | ErrorCode::ReadOnly
            | ErrorCode::OperationInterrupted
            | ErrorCode::SystemIoFailure
            | ErrorCode::NotFound
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::SchemaChanged
            | ErrorCode::NoLargeFileSupport => StoreError::Unavailable(e.to_string()),
            // A table or column missing: the schema, not the data, is at fault (see the
            // PostgreSQL mapping); a writer keeps the events and retries.
            ErrorCode::Unknown
                if matches!(&e, rusqlite::Error::SqliteFailure(_, Some(m))
                    if m.starts_with("no such table") || m.starts_with("no such column")) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Invalid(e.to_string()),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Invalid(e.to_string()),
    }
}

/// Runs `f` on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(StoreError::Invalid(format!(
            "the SQLite task panicked: {e}"
        ))),
        Err(e) => Err(StoreError::Unavailable(format!(
            "the SQLite task was cancelled: {e}"
        ))),
    }
}

pub(crate) const USAGE_COLUMNS: &str = "id, tenant_id, user_id, company_id, model, endpoint, \
    subscription_tier, input_tokens, cached_input_tokens, output_tokens, cost_micros, \
    request_status, created_at, reservation_id, idempotency_key, day_start, month_start, \
    pricing, upstream, provider_request_id, cache_creation_input_tokens, \
    cache_creation_1h_input_tokens, reasoning_tokens, long_context_above";

const RESERVATION_COLUMNS: &str = "id, tenant_id, user_id, company_id, tier, admitted_tier, \
    model, endpoint, estimate_micros, estimated_tokens, created_at, expires_at, day_start, \
    month_start, idempotency_key, fingerprint";

/// A reservation, in the state the projection leaves it in: open, or settled when the
/// same projection settles it (most are). A row found open is settled as the settling update
/// would; a row found settled, or an open one given as open (a replay), is left alone.
const INSERT_RESERVATION: &str = "INSERT INTO reservations (id, tenant_id, user_id, \
    company_id, tier, admitted_tier, model, endpoint, estimate_micros, estimated_tokens, \
    created_at, expires_at, day_start, month_start, idempotency_key, fingerprint, state, \
    usage_id, reason, settled_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
    ?19, ?20) ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
    usage_id = excluded.usage_id, reason = excluded.reason, settled_at = excluded.settled_at \
    WHERE reservations.state = 'open' AND excluded.state <> 'open'";

const INSERT_WOULD_DENY: &str = "INSERT INTO would_deny (reservation_id, tenant_id, \
    day_start, reason) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (reservation_id) DO NOTHING";

const COMMIT_RESERVATION: &str = "UPDATE reservations SET state = 'committed', usage_id = ?2, \
    settled_at = ?3 WHERE id = ?1 AND state = 'open'";

const RELEASE_RESERVATION: &str = "UPDATE reservations SET state = 'released', reason = ?2, \
    settled_at = ?3 WHERE id = ?1 AND state = 'open'";

const EXPIRE_RESERVATION: &str = "UPDATE reservations SET state = 'expired', usage_id = ?2, \
    settled_at = expires_at WHERE id = ?1 AND state = 'open'";

/// The columns of an `ai_usage` insert, in binding order.
const INSERT_USAGE_COLUMNS: &str = "id, tenant_id, user_id, company_id, model, endpoint, \
    subscription_tier, input_tokens, cached_input_tokens, output_tokens, cost_micros, \
    request_status, created_at, reservation_id, idempotency_key, day_start, month_start, \
    pricing, upstream, provider_request_id, cache_creation_input_tokens, \
    cache_creation_1h_input_tokens, reasoning_tokens, long_context_above";
const USAGE_PARAMS: usize = 24;

/// Rows per multi-row statement (a statement per row is about a quarter slower).
const USAGE_CHUNK: usize = 32;
const ROLLUP_CHUNK: usize = 64;
const ROLLUP_PARAMS: usize = ROLLUP_COLUMN_COUNT;

/// `VALUES (?1, …, ?n), (…), …`: `rows` rows of `params` parameters.
fn values(rows: usize, params: usize) -> String {
    let mut sql = String::from("VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 1..=params {
            if c > 1 {
                sql.push_str(", ");
            }
            sql.push('?');
            sql.push_str(&(r * params + c).to_string());
        }
        sql.push(')');
    }
    sql
}

/// Inserts `rows` usage rows; `RETURNING` names the rows inserted.
///
/// `OR IGNORE`: a repeated id, or a direct record repeating another's idempotency key, is
/// skipped rather than failing the batch. (The other constraints, `NOT NULL` and the status
/// `CHECK`, cannot fail for rows built from typed records.) Unlike `ON CONFLICT DO NOTHING`,
/// it spares SQLite the statement journal of a multi-row statement that might abort.
fn insert_usage_sql(rows: usize) -> String {
    format!(
        "INSERT OR IGNORE INTO ai_usage ({INSERT_USAGE_COLUMNS}) {} RETURNING id",
        values(rows, USAGE_PARAMS)
    )
}

/// Adds to `rows` rollup rows, creating them if needed. (`OR IGNORE` only spares SQLite the
/// statement journal: the increments cannot violate a constraint.)
fn upsert_rollups_sql(rows: usize) -> String {
    format!(
        "INSERT OR IGNORE INTO rollups ({ROLLUP_COLUMNS}) {}{ROLLUP_CONFLICT}",
        values(rows, ROLLUP_PARAMS)
    )
}

/// Binds rollup rows as [`ROLLUP_PARAMS`] parameters each.
fn bind_rollups(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[CounterRow],
) -> Result<(), StoreError> {
    for (i, row) in rows.iter().enumerate() {
        let (kind, tenant, id) = scope_columns(&row.scope);
        let base = i * ROLLUP_PARAMS;
        stmt.raw_bind_parameter(base + 1, kind).db()?;
        stmt.raw_bind_parameter(base + 2, tenant).db()?;
        stmt.raw_bind_parameter(base + 3, id).db()?;
        stmt.raw_bind_parameter(base + 4, row.window.as_str())
            .db()?;
        stmt.raw_bind_parameter(base + 5, row.start).db()?;
        stmt.raw_bind_parameter(base + 6, row.spent.micros()).db()?;
        stmt.raw_bind_parameter(base + 7, clamp_u64(row.requests))
            .db()?;
        stmt.raw_bind_parameter(base + 8, clamp_u64(row.tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 9, clamp_u64(row.input_tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 10, clamp_u64(row.cached_input_tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 11, clamp_u64(row.output_tokens))
            .db()?;
    }
    Ok(())
}

const USAGE_ROLLUP_CHUNK: usize = 64;
const USAGE_ROLLUP_PARAMS: usize = 10;

/// Adds to `rows` `usage_rollups` rows, creating them if needed (`OR IGNORE` as in
/// [`upsert_rollups_sql`]).
fn upsert_usage_rollups_sql(rows: usize) -> String {
    format!(
        "INSERT OR IGNORE INTO usage_rollups (dim, day_start, tenant_id, key, model, requests, \
         input_tokens, cached_input_tokens, output_tokens, cost_micros) {}{USAGE_ROLLUP_CONFLICT}",
        values(rows, USAGE_ROLLUP_PARAMS)
    )
}

/// Binds `usage_rollups` rows as [`USAGE_ROLLUP_PARAMS`] parameters each.
fn bind_usage_rollups(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[(UsageKey<'_>, UsageTotals)],
) -> Result<(), StoreError> {
    for (i, ((dim, day, tenant, key, model), t)) in rows.iter().enumerate() {
        let base = i * USAGE_ROLLUP_PARAMS;
        stmt.raw_bind_parameter(base + 1, dim.as_str()).db()?;
        stmt.raw_bind_parameter(base + 2, *day).db()?;
        stmt.raw_bind_parameter(base + 3, *tenant).db()?;
        stmt.raw_bind_parameter(base + 4, *key).db()?;
        stmt.raw_bind_parameter(base + 5, *model).db()?;
        stmt.raw_bind_parameter(base + 6, clamp_u64(t.requests))
            .db()?;
        stmt.raw_bind_parameter(base + 7, clamp_u64(t.input_tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 8, clamp_u64(t.cached_input_tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 9, clamp_u64(t.output_tokens))
            .db()?;
        stmt.raw_bind_parameter(base + 10, t.cost.micros()).db()?;
    }
    Ok(())
}

static UPSERT_USAGE_ROLLUPS_ONE: LazyLock<String> = LazyLock::new(|| upsert_usage_rollups_sql(1));
static UPSERT_USAGE_ROLLUPS_CHUNK: LazyLock<String> =
    LazyLock::new(|| upsert_usage_rollups_sql(USAGE_ROLLUP_CHUNK));

static INSERT_USAGE_ONE: LazyLock<String> = LazyLock::new(|| insert_usage_sql(1));
static INSERT_USAGE_CHUNK: LazyLock<String> = LazyLock::new(|| insert_usage_sql(USAGE_CHUNK));
static UPSERT_ROLLUPS_ONE: LazyLock<String> = LazyLock::new(|| upsert_rollups_sql(1));
static UPSERT_ROLLUPS_CHUNK: LazyLock<String> = LazyLock::new(|| upsert_rollups_sql(ROLLUP_CHUNK));

const UPSERT_BUDGET: &str = "INSERT INTO budget_overrides (scope_kind, tenant_id, scope_id, \
    daily_micros, monthly_micros) VALUES (?1, ?2, ?3, ?4, ?5) \
    ON CONFLICT (scope_kind, tenant_id, scope_id) DO UPDATE SET \
    daily_micros = excluded.daily_micros, monthly_micros = excluded.monthly_micros";

const DELETE_BUDGET: &str =
    "DELETE FROM budget_overrides WHERE scope_kind = ?1 AND tenant_id = ?2 AND scope_id = ?3";

const UPSERT_USER: &str = "INSERT INTO user_overrides (tenant_id, user_id, settings) \
    VALUES (?1, ?2, ?3) ON CONFLICT (tenant_id, user_id) DO UPDATE SET \
    settings = excluded.settings";

const DELETE_USER: &str = "DELETE FROM user_overrides WHERE tenant_id = ?1 AND user_id = ?2";

const UPSERT_TENANT_PRICES: &str = "INSERT INTO tenant_prices (tenant_id, settings) \
    VALUES (?1, ?2) ON CONFLICT (tenant_id) DO UPDATE SET settings = excluded.settings";

const DELETE_TENANT_PRICES: &str = "DELETE FROM tenant_prices WHERE tenant_id = ?1";

pub(crate) fn text<'r>(row: &'r Row<'_>, idx: usize) -> Result<&'r str, StoreError> {
    row.get_ref(idx)
        .db()?
        .as_str()
        .map_err(|e| corrupt(format!("column {idx}: {e}")))
}

pub(crate) fn opt_text<'r>(row: &'r Row<'_>, idx: usize) -> Result<Option<&'r str>, StoreError> {
    row.get_ref(idx)
        .db()?
        .as_str_or_null()
        .map_err(|e| corrupt(format!("column {idx}: {e}")))
}

pub(crate) fn int(row: &Row<'_>, idx: usize) -> Result<i64, StoreError> {
    row.get::<_, i64>(idx).db()
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| corrupt(format!("bad uuid `{s}`: {e}")))
}

fn opt_uuid(row: &Row<'_>, idx: usize) -> Result<Option<Uuid>, StoreError> {
    opt_text(row, idx)?.map(parse_uuid).transpose()
}

/// Reads a row of [`USAGE_COLUMNS`].
pub(crate) fn usage_row(row: &Row<'_>) -> Result<UsageRecord, StoreError> {
    UsageCols {
        id: parse_uuid(text(row, 0)?)?,
        tenant: text(row, 1)?,
        user: text(row, 2)?,
        company: opt_text(row, 3)?,
        model: text(row, 4)?,
        endpoint: opt_text(row, 5)?,
        tier: text(row, 6)?,
        input_tokens: int(row, 7)?,
        cached_input_tokens: int(row, 8)?,
        output_tokens: int(row, 9)?,
        cost_micros: int(row, 10)?,
        status: text(row, 11)?,
        created_at: int(row, 12)?,
        reservation_id: opt_uuid(row, 13)?,
        idempotency_key: opt_text(row, 14)?,
        day_start: int(row, 15)?,
        month_start: int(row, 16)?,
        pricing: opt_text(row, 17)?,
        upstream: opt_text(row, 18)?,
        provider_request_id: opt_text(row, 19)?,
        cache_creation_input_tokens: int(row, 20)?,
        cache_creation_1h_input_tokens: int(row, 21)?,
        reasoning_tokens: int(row, 22)?,
        long_context_above: row.get::<_, Option<i64>>(23).db()?,
    }
    .decode()
}

/// Reads a row of [`RESERVATION_COLUMNS`].
fn reservation_row(row: &Row<'_>) -> Result<spendguard_core::Reservation, StoreError> {
    ReservationCols {
        id: parse_uuid(text(row, 0)?)?,
        tenant: text(row, 1)?,
        user: text(row, 2)?,
        company: opt_text(row, 3)?,
        tier: opt_text(row, 4)?,
        admitted_tier: text(row, 5)?,
        model: text(row, 6)?,
        endpoint: opt_text(row, 7)?,
        estimate_micros: int(row, 8)?,
        estimated_tokens: int(row, 9)?,
        created_at: int(row, 10)?,
        expires_at: int(row, 11)?,
        day_start: int(row, 12)?,
        month_start: int(row, 13)?,
        idempotency_key: opt_text(row, 14)?,
        fingerprint: int(row, 15)?,
    }
    .decode()
}

/// Reads a row of [`ROLLUP_COLUMNS`].
fn rollup_row(row: &Row<'_>) -> Result<CounterRow, StoreError> {
    rollup_row_with(row, &mut TenantCache::default())
}

fn rollup_row_with(row: &Row<'_>, tenants: &mut TenantCache) -> Result<CounterRow, StoreError> {
    RollupCols {
        kind: text(row, 0)?,
        tenant: text(row, 1)?,
        id: text(row, 2)?,
        window: text(row, 3)?,
        start: int(row, 4)?,
        spent: int(row, 5)?,
        requests: int(row, 6)?,
        tokens: int(row, 7)?,
        input_tokens: int(row, 8)?,
        cached_input_tokens: int(row, 9)?,
        output_tokens: int(row, 10)?,
    }
    .decode_with(tenants)
}

fn take_lock(path: &str) -> Result<File, StoreError> {
    let lock_path = format!("{path}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {lock_path}: {e}")))?;
    match <File as fs4::FileExt>::try_lock(&file) {
        Ok(()) => Ok(file),
        Err(fs4::TryLockError::WouldBlock) => Err(StoreError::locked(path)),
        Err(fs4::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "cannot lock {lock_path}: {e}"
        ))),
    }
}

/// Sets a writing connection up: WAL, `synchronous`, the checkpoint backstop, a page cache of
/// `cache_kib`.
fn configure(conn: &Connection, options: &OpenOptions, cache_kib: i64) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5)).db()?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .db()?;
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        tracing::warn!(journal_mode = %mode, "SQLite refused WAL mode");
    }
    let synchronous = if options.sync_every_batch {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.pragma_update(None, "synchronous", synchronous).db()?;
    conn.pragma_update(None, "foreign_keys", "ON").db()?;
    conn.pragma_update(None, "temp_store", "MEMORY").db()?;
    // Negative: KiB.
    conn.pragma_update(None, "cache_size", -cache_kib).db()?;
    conn.set_prepared_statement_cache_capacity(64);
    // Checkpoints (copying the WAL into the database, and fsync) are the checkpointer
    // thread's, off the writer's path. Under continuous writes the WAL was seen to start
    // over from its beginning only at the writer's own checkpoint, although the
    // checkpointer's had copied every frame: so the writer's checkpoint is set at 64 MiB,
    // the size the file is kept at (`journal_size_limit`). The checkpointer having copied
    // nearly everything, it has little to do, and starting over truncates the file by
    // little. (At 256 MiB it cut 192 MiB off the file in a writer's commit: stalls of
    // 50-80 ms every couple of seconds under load, the HTTP run's p99.9; BENCHMARKS.md.)
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)
        .db()?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)
        .db()?;

    Ok(())
}

/// Opens the query-only connection of analytics reads (after the writer made the schema).
fn open_reader(path: &str) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).db()?;
    conn.busy_timeout(Duration::from_secs(5)).db()?;
    conn.pragma_update(None, "query_only", "ON").db()?;
    conn.pragma_update(None, "temp_store", "MEMORY").db()?;
    conn.pragma_update(None, "cache_size", -65_536).db()?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// The WAL size (in pages of 4 KiB) at which the writer checkpoints itself, and so rewinds
/// the WAL: the size it is truncated to (`WAL_SIZE_LIMIT`), so rewinding truncates little.
const WAL_BACKSTOP_PAGES: i64 = WAL_SIZE_LIMIT / 4096;
/// How often the checkpointer runs a passive checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// Checkpoints the WALs every [`CHECKPOINT_EVERY`] on connections of its own, passively (it
/// never waits for a writer nor holds one up), until `alive` can no longer be upgraded (the
/// store was dropped). A passive checkpoint copies what no reader still needs; the next
/// write after a complete one starts the WAL over from its beginning.
///
/// With a journal file, it also notes in `durable` the journal cursor that a complete
/// checkpoint of the main file made durable: the WAL is synced before its frames are
/// copied, so every commit before the checkpoint, the cursor read first among them, is on
/// disk once every frame is copied (see [`JournalFile`]).
fn checkpoint_in_background(
    path: String,
    journal: Option<(String, Arc<AtomicI64>)>,
    alive: std::sync::Weak<()>,
) {
    let open = |path: &str| match Connection::open(path) {
        Ok(c) => {
            let _ = c.busy_timeout(Duration::from_millis(100));
            Some(c)
        }
        Err(e) => {
            tracing::warn!(error = %e, path, "the SQLite checkpointer cannot open a database; its writer checkpoints");
            None
        }
    };
    let main = open(&path);
    let (journal, durable) = match journal {
        Some((path, durable)) => (open(&path), Some(durable)),
        None => (None, None),
    };
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        if alive.upgrade().is_none() {
            return;
        }
        if let Some(main) = &main {
            let done = match &durable {
                Some(durable) => checkpoint_noting_durable(main, durable),
                None => checkpoint(main).db().map(drop),
            };
            if let Err(e) = done {
                tracing::debug!(error = %e, "passive checkpoint failed; retrying");
            }
        }
        if let Some(journal) = &journal
            && let Err(e) = checkpoint(journal)
        {
            tracing::debug!(error = %e, "passive checkpoint of the journal failed; retrying");
        }
    }
}

/// A passive checkpoint; whether it copied every frame of the WAL.
fn checkpoint(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let (busy, log, copied): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok(busy == 0 && copied >= log)
    })
}

/// A passive checkpoint of the main file `main`; when it copied every frame, the journal
/// cursor read before it is on disk, and is noted in `durable` (see [`JournalFile`]).
fn checkpoint_noting_durable(main: &Connection, durable: &AtomicI64) -> Result<(), StoreError> {
    let cursor = projected_cursor(main)?;
    if checkpoint(main).db()? {
        durable.fetch_max(cursor, Ordering::SeqCst);
    }
    Ok(())
}

/// The main database's page cache (64 MiB).
const MAIN_CACHE_KIB: i64 = 65_536;
/// The journal file's page cache: it holds the batches not projected yet.
const JOURNAL_CACHE_KIB: i64 = 8_192;

/// The journal's table in its own file (the same as the main database's, migration 8).
/// AUTOINCREMENT: a sequence number is never reused, even after the projected rows are
/// deleted.
const JOURNAL_FILE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL,
    events BLOB NOT NULL
) STRICT";

/// The journal's database file, `<database file>.journal` (see the module's docs), and its
/// two connections: the appender's (appends, and deletes of projected batches) and the
/// projection's reads. The projection holds the main connection while it reads here, never
/// the other way round.
///
/// A row is deleted only once the projection of its batch is durable in the main file: the
/// two files reach the disk apart (with `synchronous = NORMAL`, at their checkpoints), and a
/// journal row deleted before its batch's projection was on disk could be lost with it to a
/// power failure. The checkpointer notes in `durable` the cursor that a complete checkpoint
/// of the main file made durable; the projector deletes up to it.
pub(crate) struct JournalFile {
    appender: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// The last sequence number whose projection is on disk in the main file.
    durable: Arc<AtomicI64>,
    /// Rows up to this sequence number are deleted.
    deleted: AtomicI64,
}

impl JournalFile {
    /// Opens (creating if needed) the journal file at `path`.
    fn open(path: &str, options: &OpenOptions) -> Result<JournalFile, StoreError> {
        let appender = Connection::open(path).db()?;
        configure(&appender, options, JOURNAL_CACHE_KIB)?;
        appender.execute_batch(JOURNAL_FILE_SCHEMA).db()?;
        let reader = Connection::open(path).db()?;
        reader.busy_timeout(Duration::from_secs(5)).db()?;
        reader.pragma_update(None, "query_only", "ON").db()?;
        Ok(JournalFile {
            appender: Mutex::new(appender),
            reader: Mutex::new(reader),
            durable: Arc::default(),
            deleted: AtomicI64::new(0),
        })
    }

    fn appender(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.appender.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deletes the rows whose projection is durable (see the type's docs). A failure leaves
    /// them for the next time: the projection skips rows at or below its cursor.
    fn forget_durable(&self) {
        let durable = self.durable.load(Ordering::SeqCst);
        if durable <= self.deleted.load(Ordering::SeqCst) {
            return;
        }
        let conn = self.appender();
        match conn
            .prepare_cached("DELETE FROM journal WHERE seq <= ?1")
            .and_then(|mut stmt| stmt.execute([durable]))
        {
            Ok(_) => self.deleted.store(durable, Ordering::SeqCst),
            Err(e) => {
                tracing::debug!(error = %e, "deleting projected journal batches failed; retrying later")
            }
        }
    }
}

/// The last sequence number `conn`'s `journal` table handed out (0 before any).
fn journal_sequence(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0)",
        [],
        |r| r.get(0),
    )
    .db()
}

/// Moves the batches of the main database's `journal` table (where versions before the
/// journal file kept them) into the journal file, and makes sure the journal file never
/// hands out a sequence number at or below one the main database has seen (its cursor, its
/// table's sequence): a journal file that went missing would start again at 1, below the
/// cursor, and its batches would be taken for projected ones.
///
/// Copy first, delete after, in two commits (the files commit apart): a crash between them
/// copies again, and `OR IGNORE` keeps one row per sequence number.
fn adopt_main_journal(main: &mut Connection, file: &JournalFile) -> Result<(), StoreError> {
    let (floor, rows) = {
        let tx = main.transaction().db()?;
        let cursor = projected_cursor(&tx)?;
        let sequence = journal_sequence(&tx)?;
        let rows = tx
            .prepare("SELECT seq, created_at, events FROM journal ORDER BY seq")
            .db()?
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        (cursor.max(sequence), rows)
    };
    {
        let mut conn = file.appender();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db()?;
        for (seq, created_at, events) in &rows {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO journal (seq, created_at, events) VALUES (?1, ?2, ?3)",
            )
            .db()?
            .execute(params![seq, created_at, events])
            .db()?;
        }
        if journal_sequence(&tx)? < floor {
            tx.execute("DELETE FROM sqlite_sequence WHERE name = 'journal'", [])
                .db()?;
            tx.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('journal', ?1)",
                [floor],
            )
            .db()?;
            tracing::info!(
                from = floor + 1,
                "the journal file's sequence numbers go on after the main database's"
            );
        }
        tx.commit().db()?;
    }
    if !rows.is_empty() {
        main.execute("DELETE FROM journal", []).db()?;
        tracing::info!(
            batches = rows.len(),
            "moved the journal's batches into its own file"
        );
    }
    Ok(())
}

/// The size a WAL file is truncated to after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 64 << 20;
fn migrate_blocking(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        ) STRICT",
    )
    .db()?;
    let applied: Vec<i64> = tx
        .prepare("SELECT version FROM schema_migrations")
        .db()?
        .query_map([], |r| r.get(0))
        .db()?
        .collect::<rusqlite::Result<_>>()
        .db()?;
    let current = applied.iter().copied().max().unwrap_or(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        tracing::warn!(
            current,
            latest,
            "the SQLite schema is newer than this version of spendguard knows"
        );
    }
    // Every version not applied yet, also one below the highest applied (a migration
    // numbered before another that shipped first).
    for (version, sql) in MIGRATIONS.iter().filter(|m| !applied.contains(&m.0)) {
        tx.execute_batch(sql).db()?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now_micros()],
        )
        .db()?;
        tracing::info!(version, "applied SQLite migration");
    }
    tx.commit().db()
}

/// Splits `items` into full chunks of `size`, then single items: only two statement shapes
/// are ever prepared.
fn chunks<T>(items: &[T], size: usize) -> impl Iterator<Item = &[T]> {
    let full = items.len() / size * size;
    items[..full].chunks(size).chain(items[full..].chunks(1))
}

/// Binds one usage row's parameters after the first `base`.
fn bind_usage(
    stmt: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    u: &UsageRecord,
) -> Result<(), StoreError> {
    let mut id = Uuid::encode_buffer();
    let id = u.id.hyphenated().encode_lower(&mut id);
    let mut reservation = Uuid::encode_buffer();
    let reservation = u
        .reservation_id
        .map(|r| &*r.hyphenated().encode_lower(&mut reservation));
    stmt.raw_bind_parameter(base + 1, &*id).db()?;
    stmt.raw_bind_parameter(base + 2, u.tenant.as_str()).db()?;
    stmt.raw_bind_parameter(base + 3, u.user.as_str()).db()?;
    stmt.raw_bind_parameter(base + 4, u.company.as_ref().map(|c| c.as_str()))
        .db()?;
    stmt.raw_bind_parameter(base + 5, u.model.as_str()).db()?;
    stmt.raw_bind_parameter(base + 6, u.endpoint.as_ref().map(|e| e.as_str()))
        .db()?;
    stmt.raw_bind_parameter(base + 7, u.tier.as_str()).db()?;
    stmt.raw_bind_parameter(base + 8, clamp_u64(u.tokens.input))
        .db()?;
    stmt.raw_bind_parameter(base + 9, clamp_u64(u.tokens.cached_input))
        .db()?;
    stmt.raw_bind_parameter(base + 10, clamp_u64(u.tokens.output))
        .db()?;
    stmt.raw_bind_parameter(base + 11, u.cost.micros()).db()?;
    stmt.raw_bind_parameter(base + 12, u.status.as_str()).db()?;
    stmt.raw_bind_parameter(base + 13, u.created_at).db()?;
    stmt.raw_bind_parameter(base + 14, reservation).db()?;
    stmt.raw_bind_parameter(base + 15, u.idempotency_key.as_ref().map(|k| k.as_str()))
        .db()?;
    stmt.raw_bind_parameter(base + 16, u.day_start).db()?;
    stmt.raw_bind_parameter(base + 17, u.month_start).db()?;
    stmt.raw_bind_parameter(base + 18, u.pricing.as_str())
        .db()?;
    let origin = u.origin.as_ref();
    stmt.raw_bind_parameter(base + 19, origin.map(|o| o.upstream.as_str()))
        .db()?;
    stmt.raw_bind_parameter(base + 20, origin.and_then(|o| o.request_id.as_deref()))
        .db()?;
    stmt.raw_bind_parameter(base + 21, clamp_u64(u.tokens.cache_creation))
        .db()?;
    stmt.raw_bind_parameter(base + 22, clamp_u64(u.tokens.cache_creation_1h))
        .db()?;
    stmt.raw_bind_parameter(base + 23, clamp_u64(u.tokens.reasoning))
        .db()?;
    stmt.raw_bind_parameter(base + 24, u.long_context_above.map(clamp_u64))
        .db()?;
    Ok(())
}

/// Warns if a direct record was skipped because another record holds its idempotency key
/// (rather than because it was stored already: a replay).
fn warn_if_key_conflict(tx: &rusqlite::Transaction<'_>, u: &UsageRecord) -> Result<(), StoreError> {
    let exists = tx
        .prepare_cached("SELECT 1 FROM ai_usage WHERE id = ?1")
        .db()?
        .query_row([u.id.to_string()], |_| Ok(()))
        .optional()
        .db()?
        .is_some();
    if !exists {
        tracing::warn!(
            id = %u.id,
            tenant = %u.tenant,
            "usage record skipped: its idempotency key belongs to another record"
        );
    }
    Ok(())
}

/// Applies `events` to the tables, inside `tx` (a projection of journal batches).
fn apply_events(tx: &rusqlite::Transaction<'_>, events: &[Event]) -> Result<(), StoreError> {
    let plan = Plan::new(events);
    // A reservation made and settled in this projection (most are) takes one insert.
    let settled_in_plan = plan.settled_in_plan();
    if !plan.reserved.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_RESERVATION).db()?;
        for r in &plan.reserved {
            let s = &r.subject;
            let (state, usage_id, reason, settled_at) = match settled_in_plan.get(&r.id) {
                None => ("open", None, None, None),
                Some(Settle::Commit { usage_id, at, .. }) => {
                    ("committed", Some(usage_id.to_string()), None, Some(*at))
                }
                Some(Settle::Release { reason, at, .. }) => ("released", None, *reason, Some(*at)),
                Some(Settle::Expire { usage_id, .. }) => (
                    "expired",
                    Some(usage_id.to_string()),
                    None,
                    Some(r.expires_at),
                ),
            };
            insert
                .execute(params![
                    r.id.to_string(),
                    s.tenant.as_str(),
                    s.user.as_str(),
                    s.company.as_ref().map(|c| c.as_str()),
                    s.tier.as_ref().map(|t| t.as_str()),
                    r.tier.as_str(),
                    s.model.as_str(),
                    s.endpoint.as_ref().map(|e| e.as_str()),
                    r.estimate.micros(),
                    clamp_u64(r.estimated_tokens),
                    r.created_at,
                    r.expires_at,
                    r.day_start,
                    r.month_start,
                    r.idempotency_key.as_ref().map(|k| k.as_str()),
                    // The same bits as an i64.
                    r.fingerprint as i64,
                    state,
                    usage_id,
                    reason,
                    settled_at,
                ])
                .db()?;
        }
    }
    for r in plan.reserved.iter().filter(|r| r.would_deny.is_some()) {
        tx.prepare_cached(INSERT_WOULD_DENY)
            .db()?
            .execute(params![
                r.id.to_string(),
                r.subject.tenant.as_str(),
                r.day_start,
                r.would_deny.as_deref(),
            ])
            .db()?;
    }
    for settle in &plan.settles {
        if settled_in_plan.contains_key(&settle.id()) {
            continue;
        }
        match settle {
            Settle::Commit { id, usage_id, at } => tx
                .prepare_cached(COMMIT_RESERVATION)
                .db()?
                .execute(params![id.to_string(), usage_id.to_string(), at]),
            Settle::Release { id, reason, at } => tx
                .prepare_cached(RELEASE_RESERVATION)
                .db()?
                .execute(params![id.to_string(), reason, at]),
            Settle::Expire { id, usage_id } => tx
                .prepare_cached(EXPIRE_RESERVATION)
                .db()?
                .execute(params![id.to_string(), usage_id.to_string()]),
        }
        .db()?;
    }
    let mut deltas = Deltas::default();
    let mut usage_deltas = UsageDeltas::default();
    for chunk in chunks(&plan.usage, USAGE_CHUNK) {
        let sql = if chunk.len() == USAGE_CHUNK {
            &*INSERT_USAGE_CHUNK
        } else {
            &*INSERT_USAGE_ONE
        };
        let mut insert = tx.prepare_cached(sql).db()?;
        for (i, u) in chunk.iter().enumerate() {
            bind_usage(&mut insert, i * USAGE_PARAMS, u)?;
        }
        let mut inserted = Vec::with_capacity(chunk.len());
        let mut rows = insert.raw_query();
        while let Some(row) = rows.next().db()? {
            inserted.push(parse_uuid(text(row, 0)?)?);
        }
        drop(rows);
        for u in chunk {
            if inserted.len() == chunk.len() || inserted.contains(&u.id) {
                deltas.add(u);
                usage_deltas.add(u);
            } else if u.idempotency_key.is_some() && u.reservation_id.is_none() {
                warn_if_key_conflict(tx, u)?;
            }
        }
    }
    if !deltas.is_empty() {
        let rows = deltas.into_rows();
        for chunk in chunks(&rows, ROLLUP_CHUNK) {
            let sql = if chunk.len() == ROLLUP_CHUNK {
                &*UPSERT_ROLLUPS_CHUNK
            } else {
                &*UPSERT_ROLLUPS_ONE
            };
            let mut upsert = tx.prepare_cached(sql).db()?;
            bind_rollups(&mut upsert, chunk)?;
            upsert.raw_execute().db()?;
        }
    }
    if !usage_deltas.is_empty() {
        let rows = usage_deltas.into_rows();
        for chunk in chunks(&rows, USAGE_ROLLUP_CHUNK) {
            let sql = if chunk.len() == USAGE_ROLLUP_CHUNK {
                &*UPSERT_USAGE_ROLLUPS_CHUNK
            } else {
                &*UPSERT_USAGE_ROLLUPS_ONE
            };
            let mut upsert = tx.prepare_cached(sql).db()?;
            bind_usage_rollups(&mut upsert, chunk)?;
            upsert.raw_execute().db()?;
        }
    }
    for (scope, budget) in &plan.budgets {
        let (kind, tenant, id) = scope_columns(scope);
        if budget.daily.is_none() && budget.monthly.is_none() {
            tx.prepare_cached(DELETE_BUDGET)
                .db()?
                .execute(params![kind, tenant, id])
                .db()?;
        } else {
            tx.prepare_cached(UPSERT_BUDGET)
                .db()?
                .execute(params![
                    kind,
                    tenant,
                    id,
                    budget.daily.map(Money::micros),
                    budget.monthly.map(Money::micros),
                ])
                .db()?;
        }
    }
    for (tenant, user, overrides) in &plan.users {
        if overrides.is_empty() {
            tx.prepare_cached(DELETE_USER)
                .db()?
                .execute(params![tenant.as_str(), user.as_str()])
                .db()?;
        } else {
            tx.prepare_cached(UPSERT_USER)
                .db()?
                .execute(params![
                    tenant.as_str(),
                    user.as_str(),
                    encode_user(overrides)?
                ])
                .db()?;
        }
    }
    for (tenant, prices) in &plan.tenant_prices {
        if **prices == spendguard_core::prices::TenantPrices::default() {
            tx.prepare_cached(DELETE_TENANT_PRICES)
                .db()?
                .execute(params![tenant.as_str()])
                .db()?;
        } else {
            tx.prepare_cached(UPSERT_TENANT_PRICES)
                .db()?
                .execute(params![tenant.as_str(), encode_tenant_prices(prices)?])
                .db()?;
        }
    }
    Ok(())
}

/// Appends a batch (already encoded) to the journal and commits: the batch is durable.
fn append_blocking(conn: &mut Connection, events: &[u8]) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    tx.prepare_cached("INSERT INTO journal (created_at, events) VALUES (?1, ?2)")
        .db()?
        .execute(params![now_micros(), events])
        .db()?;
    tx.commit().db()
}

/// The most events one projection transaction applies (whole batches: it may go over by
/// one batch). A read through the writer's connection (a lookup by id, a setting) waits for
/// the projection transaction under way, so this bounds that wait (under the HTTP load of
/// BENCHMARKS.md one took 67-84 ms in the median, about 150 ms at most). Appends do not wait
/// for it: the journal has its own file. (When it shared the main file, appends waited, and
/// 256 events gave the HTTP run a better p99 than 1,024.) Fewer, larger transactions write
/// each rollup and index page once for more events: see [`journal::PROJECT_EVERY`]. An
/// in-memory database's appends do wait.
const PROJECT_EVENTS: usize = 4096;

/// Projects the next journal batches (up to about [`PROJECT_EVENTS`] events) in one
/// transaction that also moves the cursor. Returns whether batches remain. `file` is the
/// journal's file (`None`: the journal is the main database's table).
fn project_blocking(
    conn: &mut Connection,
    file: Option<&JournalFile>,
    keep: bool,
) -> Result<bool, StoreError> {
    // Plain reads first: nothing waits most of the time, and then no write lock is taken.
    let cursor = projected_cursor(conn)?;
    let waiting = match file {
        Some(f) => batches_after(&f.reader(), cursor)?,
        None => batches_after(conn, cursor)?,
    };
    if !waiting {
        return Ok(false);
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    // Read again under the write lock: another store on the file may have projected.
    let cursor = projected_cursor(&tx)?;
    let mut taken = journal::Taken::default();
    match file {
        Some(f) => take_after(&f.reader(), cursor, &mut taken)?,
        None => take_after(&tx, cursor, &mut taken)?,
    }
    let Some(last) = taken.last() else {
        return Ok(false);
    };
    tx.execute_batch("SAVEPOINT projection").db()?;
    match apply_events(&tx, &taken.events) {
        Ok(()) => tx.execute_batch("RELEASE projection").db()?,
        Err(e) if matches!(e, StoreError::Unavailable(_) | StoreError::Locked(_)) => {
            return Err(e);
        }
        Err(e) => {
            tracing::error!(error = %e, "the projection of journal batches was refused; applying them one event at a time");
            tx.execute_batch("ROLLBACK TO projection; RELEASE projection")
                .db()?;
            for (seq, i, event) in taken.each() {
                tx.execute_batch("SAVEPOINT one").db()?;
                match apply_events(&tx, std::slice::from_ref(event)) {
                    Ok(()) => tx.execute_batch("RELEASE one").db()?,
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO one; RELEASE one").db()?;
                        let letter = journal::dead_letter(seq, i, event, &e);
                        tracing::error!(error = %letter.error, dead_letter = %letter.id, "the projection refused an event for good; kept as a dead letter");
                        tx.prepare_cached(INSERT_DEAD_LETTER)
                            .db()?
                            .execute(params![
                                letter.id,
                                letter.event,
                                letter.error,
                                letter.created_at
                            ])
                            .db()?;
                    }
                }
            }
        }
    }
    tx.prepare_cached("UPDATE journal_cursor SET projected = ?1 WHERE id = 1")
        .db()?
        .execute([last])
        .db()?;
    if !keep && file.is_none() {
        tx.prepare_cached("DELETE FROM journal WHERE seq <= ?1")
            .db()?
            .execute([last])
            .db()?;
    }
    tx.commit().db()?;
    if let Some(f) = file
        && !keep
    {
        f.forget_durable();
    }
    Ok(taken.more)
}

/// The journal's cursor: the last projected sequence number.
fn projected_cursor(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT projected FROM journal_cursor WHERE id = 1")
        .db()?
        .query_row([], |r| r.get(0))
        .db()
}

/// Whether `conn`'s `journal` holds a batch after `cursor`.
fn batches_after(conn: &Connection, cursor: i64) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM journal WHERE seq > ?1)")
        .db()?
        .query_row([cursor], |r| r.get(0))
        .db()
}

/// Takes the batches after `cursor` from `conn`'s `journal`, up to about
/// [`PROJECT_EVENTS`] events.
fn take_after(
    conn: &Connection,
    cursor: i64,
    taken: &mut journal::Taken,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, events FROM journal WHERE seq > ?1 ORDER BY seq")
        .db()?;
    let mut rows = stmt.query([cursor]).db()?;
    while let Some(row) = rows.next().db()? {
        let (seq, body) = journal_row(row)?;
        if !taken.take(PROJECT_EVENTS, seq, body)? {
            break;
        }
    }
    Ok(())
}

/// A journal row's sequence number and body.
fn journal_row<'r>(row: &'r Row<'_>) -> Result<(i64, &'r [u8]), StoreError> {
    let seq: i64 = row.get(0).db()?;
    let body = row
        .get_ref(1)
        .db()?
        .as_blob()
        .map_err(|e| corrupt(format!("journal batch {seq}: {e}")))?;
    Ok((seq, body))
}

/// Projects every pending journal batch.
fn catch_up_blocking(
    conn: &mut Connection,
    file: Option<&JournalFile>,
    keep: bool,
) -> Result<(), StoreError> {
    while project_blocking(conn, file, keep)? {}
    Ok(())
}

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (id, event, error, created_at) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING";

/// [`Store::load`], the counters sent to `counters` in chunks when given.
fn load_blocking(
    conn: &mut Connection,
    day_start: Micros,
    month_start: Micros,
    counters: Option<CounterChunks>,
) -> Result<Snapshot, StoreError> {
    // One read transaction: a consistent snapshot.
    let tx = conn.transaction().db()?;
    let mut snapshot = Snapshot::default();
    {
        // Two ranges of the primary key per scope kind (see migration 6).
        let sql = format!(
            "SELECT {ROLLUP_COLUMNS} FROM rollups \
             WHERE scope_kind IN ('global', 'tenant', 'company', 'user') \
             AND \"window\" = 'day' AND window_start >= ?1 \
             UNION ALL SELECT {ROLLUP_COLUMNS} FROM rollups \
             WHERE scope_kind IN ('global', 'tenant', 'company', 'user') \
             AND \"window\" = 'month' AND window_start >= ?2"
        );
        let mut stmt = tx.prepare_cached(&sql).db()?;
        let mut rows = stmt.query(params![day_start, month_start]).db()?;
        let mut tenants = TenantCache::default();
        let mut chunk = Vec::new();
        while let Some(row) = rows.next().db()? {
            chunk.push(rollup_row_with(row, &mut tenants)?);
            if let Some(sink) = &counters
                && chunk.len() >= COUNTER_CHUNK
            {
                sink.send(std::mem::replace(
                    &mut chunk,
                    Vec::with_capacity(COUNTER_CHUNK),
                ))
                .map_err(|_| StoreError::Unavailable("start-up was abandoned".into()))?;
            }
        }
        match &counters {
            Some(sink) => sink
                .send(chunk)
                .map_err(|_| StoreError::Unavailable("start-up was abandoned".into()))?,
            None => snapshot.counters = chunk,
        }
    }
    {
        let sql = format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'open' \
             ORDER BY created_at, id"
        );
        let mut stmt = tx.prepare_cached(&sql).db()?;
        let mut rows = stmt.query([]).db()?;
        while let Some(row) = rows.next().db()? {
            snapshot.open.push(reservation_row(row)?);
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT scope_kind, tenant_id, scope_id, daily_micros, monthly_micros \
                 FROM budget_overrides ORDER BY scope_kind, tenant_id, scope_id",
            )
            .db()?;
        let mut rows = stmt.query([]).db()?;
        while let Some(row) = rows.next().db()? {
            let scope: ScopeKey = scope_from_columns(text(row, 0)?, text(row, 1)?, text(row, 2)?)?;
            let daily: Option<i64> = row.get(3).db()?;
            let monthly: Option<i64> = row.get(4).db()?;
            snapshot.budgets.push((
                scope,
                BudgetOverride {
                    daily: daily.map(Money::from_micros),
                    monthly: monthly.map(Money::from_micros),
                },
            ));
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT tenant_id, user_id, settings FROM user_overrides \
                 ORDER BY tenant_id, user_id",
            )
            .db()?;
        let mut rows = stmt.query([]).db()?;
        while let Some(row) = rows.next().db()? {
            snapshot.users.push((
                parse_id("tenant_id", text(row, 0)?, TenantId::parse)?,
                parse_id("user_id", text(row, 1)?, UserId::parse)?,
                decode_user(text(row, 2)?)?,
            ));
        }
    }
    {
        let mut stmt = tx
            .prepare_cached("SELECT tenant_id, settings FROM tenant_prices ORDER BY tenant_id")
            .db()?;
        let mut rows = stmt.query([]).db()?;
        while let Some(row) = rows.next().db()? {
            snapshot.tenant_prices.push((
                parse_id("tenant_id", text(row, 0)?, TenantId::parse)?,
                decode_tenant_prices(text(row, 1)?)?,
            ));
        }
    }
    tx.commit().db()?;
    Ok(snapshot)
}

/// The reservation that `sql` (selecting [`RESERVATION_COLUMNS`], `state` and `usage_id`)
/// finds, with its settling record.
fn stored_reservation(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<StoredReservation>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let mut rows = stmt.query(params).db()?;
    let Some(row) = rows.next().db()? else {
        return Ok(None);
    };
    let reservation = reservation_row(row)?;
    let state = text(row, 16)?;
    let state = ReservationState::parse(state)
        .ok_or_else(|| corrupt(format!("unknown reservation state `{state}`")))?;
    let usage_id = opt_uuid(row, 17)?;
    drop(rows);
    let usage = match usage_id {
        Some(u) => usage_blocking(conn, u)?,
        None => None,
    };
    Ok(Some(StoredReservation {
        reservation,
        state,
        usage,
    }))
}

fn usage_blocking(conn: &Connection, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
    let sql = format!("SELECT {USAGE_COLUMNS} FROM ai_usage WHERE id = ?1");
    let mut stmt = conn.prepare_cached(&sql).db()?;
    let mut rows = stmt.query([id.to_string()]).db()?;
    rows.next().db()?.map(usage_row).transpose()
}

fn recount_blocking(conn: &Connection) -> Result<Vec<CounterRow>, StoreError> {
    // Summed here rather than with SQL's SUM, which fails on overflow where the rollups
    // saturate.
    let mut stmt = conn
        .prepare(
            "SELECT tenant_id, user_id, company_id, cost_micros, input_tokens, \
             cached_input_tokens, output_tokens, day_start, month_start FROM ai_usage \
             WHERE request_status <> 'expired'",
        )
        .db()?;
    let mut rows = stmt.query([]).db()?;
    let mut deltas = Deltas::default();
    while let Some(row) = rows.next().db()? {
        let tenant = parse_id("tenant_id", text(row, 0)?, TenantId::parse)?;
        let user = parse_id("user_id", text(row, 1)?, UserId::parse)?;
        let company = opt_text(row, 2)?
            .map(|c| parse_id("company_id", c, spendguard_core::CompanyId::parse))
            .transpose()?;
        let tokens = Tokens {
            input: to_u64("input_tokens", int(row, 4)?)?,
            cached_input: to_u64("cached_input_tokens", int(row, 5)?)?,
            output: to_u64("output_tokens", int(row, 6)?)?,
            ..Default::default()
        };
        let scopes = [
            Some(ScopeKey::Global),
            Some(ScopeKey::Tenant(tenant.clone())),
            company.map(|c| ScopeKey::Company(tenant.clone(), c)),
            Some(ScopeKey::User(tenant, user)),
        ];
        deltas.add_parts(
            scopes.into_iter().flatten(),
            Money::from_micros(int(row, 3)?),
            &tokens,
            int(row, 7)?,
            int(row, 8)?,
        );
    }
    Ok(deltas.into_rows())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, takes the writer lock if
    /// asked, and applies pending migrations.
    pub async fn open(path: &str, options: &OpenOptions) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        let options = options.clone();
        blocking(move || SqliteStore::open_blocking(path, &options)).await
    }

    fn open_blocking(path: String, options: &OpenOptions) -> Result<SqliteStore, StoreError> {
        if path.is_empty() {
            return Err(StoreError::Invalid("the SQLite path is empty".into()));
        }
        let memory = path == ":memory:";
        let lock = if options.take_writer_lock && !memory {
            Some(take_lock(&path)?)
        } else {
            None
        };
        let mut conn = Connection::open(&path).db()?;
        configure(&conn, options, MAIN_CACHE_KIB)?;
        migrate_blocking(&mut conn)?;
        let reader = if memory {
            None
        } else {
            Some(Arc::new(Mutex::new(open_reader(&path)?)))
        };
        let journal_file = if memory {
            None
        } else {
            let file = JournalFile::open(&SqliteStore::journal_path(&path), options)?;
            adopt_main_journal(&mut conn, &file)?;
            Some(Arc::new(file))
        };
        let conn = Arc::new(Mutex::new(conn));
        let alive = Arc::new(());
        if !memory {
            let journal = journal_file
                .as_ref()
                .map(|f| (SqliteStore::journal_path(&path), f.durable.clone()));
            let (path, alive) = (path.clone(), Arc::downgrade(&alive));
            std::thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || checkpoint_in_background(path, journal, alive))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start the checkpointer: {e}"))
                })?;
        }
        let journal = Arc::new(Journal::unknown());
        let projector = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (weak, keep) = (Arc::downgrade(&conn), options.keep_journal);
            let file = journal_file.as_ref().map(Arc::downgrade);
            // It holds the connections only while projecting: it ends with the store.
            rt.spawn(journal::run_projector(journal.clone(), move || {
                let conn = weak.upgrade()?;
                let file = match &file {
                    Some(f) => Some(f.upgrade()?),
                    None => None,
                };
                Some(blocking(move || {
                    let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                    project_blocking(&mut conn, file.as_deref(), keep)
                }))
            }))
        });
        Ok(SqliteStore {
            conn,
            reader,
            lock,
            path,
            journal,
            journal_file,
            keep_journal: options.keep_journal,
            projector,
            _checkpointer: alive,
        })
    }

    /// The journal file of the database at `path`: `<path>.journal`. It holds the
    /// acknowledged batches not projected yet, so it belongs to the database: copy, move and
    /// delete the two together (with their `-wal` files), as the store is stopped.
    pub fn journal_path(path: &str) -> String {
        format!("{path}.journal")
    }

    /// Projects every pending journal batch (reads of the projected tables do it first).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        if self.lock.is_some() && !self.journal.pending() {
            return Ok(());
        }
        self.with_projected(|_| Ok(())).await
    }

    /// Every batch in the journal, oldest first (see [`AnyStore::journal`](crate::AnyStore::journal)).
    pub async fn journal(&self) -> Result<Vec<Vec<Event>>, StoreError> {
        let read = |conn: &Connection| {
            let mut stmt = conn
                .prepare("SELECT seq, events FROM journal ORDER BY seq")
                .db()?;
            let mut rows = stmt.query([]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                let (seq, body) = journal_row(row)?;
                out.push(journal::decode(seq, body)?);
            }
            Ok(out)
        };
        match &self.journal_file {
            Some(file) => {
                let file = file.clone();
                blocking(move || read(&file.reader())).await
            }
            None => self.with_conn(move |conn| read(conn)).await,
        }
    }

    /// Projects pending journal batches before a report, waiting a bounded time.
    pub(crate) async fn catch_up_for_report(&self) -> Result<(), StoreError> {
        journal::for_report(self.catch_up()).await
    }

    /// Runs `f` with the writer connection once every pending journal batch is projected.
    async fn with_projected<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (journal, keep) = (self.journal.clone(), self.keep_journal);
        let file = self.journal_file.clone();
        // A store that is not the writer cannot know what the writer appended: it looks.
        let look = self.lock.is_none();
        self.with_conn(move |conn| {
            if look || journal.pending() {
                let seen = journal.observe();
                catch_up_blocking(conn, file.as_deref(), keep)?;
                journal.projected(seen, false);
            }
            f(conn)
        })
        .await
    }

    /// The database file's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Runs `f` with the (writer) connection on tokio's blocking pool.
    pub(crate) async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
    }

    /// Runs `f` with the query-only connection (the main one for an in-memory database) on
    /// tokio's blocking pool. `f` must not write.
    pub(crate) async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.reader.as_ref().unwrap_or(&self.conn).clone();
        blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
    }

    /// Applies the migrations not applied yet (`open` does it already).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.with_conn(migrate_blocking).await
    }

    /// Recomputes `usage_rollups` from `ai_usage`, as migration 2 fills it: for repairs,
    /// tests and benchmarks (it reads every usage row).
    pub async fn rebuild_usage_rollups(&self) -> Result<(), StoreError> {
        self.with_projected(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            tx.execute_batch(SQLITE_REBUILD_USAGE_ROLLUPS).db()?;
            tx.commit().db()
        })
        .await
    }

    /// The versions of the applied migrations, ascending.
    pub async fn schema_versions(&self) -> Result<Vec<i64>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT version FROM schema_migrations ORDER BY version")
                .db()?;
            let versions = stmt
                .query_map([], |r| r.get(0))
                .db()?
                .collect::<rusqlite::Result<Vec<i64>>>()
                .db()?;
            Ok(versions)
        })
        .await
    }

    /// Projects what is pending, closes the database and releases the writer lock.
    pub async fn close(self) {
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "the journal could not be projected at close; it will be at the next start");
        }
        if let Some(file) = self.journal_file.clone()
            && !self.keep_journal
        {
            // Leaves the journal file empty when the projection can be made durable now.
            let _ = self
                .with_conn(move |conn| {
                    checkpoint_noting_durable(conn, &file.durable)?;
                    file.forget_durable();
                    Ok(())
                })
                .await;
        }
        let _ = blocking(move || {
            drop(self);
            Ok(())
        })
        .await;
    }
}

impl Store for SqliteStore {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let body = journal::encode(events, false)?;
        match &self.journal_file {
            Some(file) => {
                let file = file.clone();
                blocking(move || append_blocking(&mut file.appender(), &body)).await?;
            }
            None => {
                self.with_conn(move |conn| append_blocking(conn, &body))
                    .await?;
            }
        }
        self.journal.appended(events.len());
        Ok(())
    }

    async fn load(&self, day_start: Micros, month_start: Micros) -> Result<Snapshot, StoreError> {
        self.with_projected(move |conn| load_blocking(conn, day_start, month_start, None))
            .await
    }

    async fn load_streaming(
        &self,
        day_start: Micros,
        month_start: Micros,
        counters: CounterChunks,
    ) -> Result<Snapshot, StoreError> {
        self.with_projected(move |conn| load_blocking(conn, day_start, month_start, Some(counters)))
            .await
    }

    async fn usage(&self, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
        self.with_projected(move |conn| usage_blocking(conn, id))
            .await
    }

    async fn reservation(&self, id: Uuid) -> Result<Option<StoredReservation>, StoreError> {
        self.with_projected(move |conn| {
            let sql = format!(
                "SELECT {RESERVATION_COLUMNS}, state, usage_id FROM reservations WHERE id = ?1"
            );
            stored_reservation(conn, &sql, [id.to_string()])
        })
        .await
    }

    async fn reservation_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<StoredReservation>, StoreError> {
        let (tenant, key) = (tenant.clone(), key.clone());
        self.with_projected(move |conn| {
            let sql = format!(
                "SELECT {RESERVATION_COLUMNS}, state, usage_id FROM reservations \
                 WHERE tenant_id = ?1 AND idempotency_key = ?2 \
                 ORDER BY created_at DESC LIMIT 1"
            );
            stored_reservation(conn, &sql, [tenant.to_string(), key.to_string()])
        })
        .await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.with_conn(move |conn| {
            conn.prepare_cached("SELECT value FROM settings WHERE key = ?1")
                .db()?
                .query_row([key], |r| r.get(0))
                .optional()
                .db()
        })
        .await
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.with_conn(move |conn| {
            conn.prepare_cached(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .db()?
            .execute([key, value])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn usage_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<UsageRecord>, StoreError> {
        let tenant = tenant.clone();
        let key = key.clone();
        self.with_projected(move |conn| {
            let sql = format!(
                "SELECT {USAGE_COLUMNS} FROM ai_usage WHERE tenant_id = ?1 \
                 AND idempotency_key = ?2 AND reservation_id IS NULL"
            );
            let mut stmt = conn.prepare_cached(&sql).db()?;
            let mut rows = stmt.query([tenant.as_str(), key.as_str()]).db()?;
            rows.next().db()?.map(usage_row).transpose()
        })
        .await
    }

    async fn recount(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.with_projected(|conn| recount_blocking(conn)).await
    }

    async fn rollups(&self) -> Result<Vec<CounterRow>, StoreError> {
        self.with_projected(|conn| {
            let mut stmt = conn
                .prepare(&format!("SELECT {ROLLUP_COLUMNS} FROM rollups"))
                .db()?;
            let mut rows = stmt.query([]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                out.push(rollup_row(row)?);
            }
            sort_rows(&mut out);
            Ok(out)
        })
        .await
    }

    async fn usage_count(&self) -> Result<u64, StoreError> {
        self.with_projected(|conn| {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM ai_usage", [], |r| r.get(0))
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    async fn database_id(&self) -> Result<String, StoreError> {
        self.with_conn(|conn| {
            conn.query_row(
                "SELECT value FROM settings WHERE key = 'database_id'",
                [],
                |r| r.get(0),
            )
            .db()
        })
        .await
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let letters = letters.to_vec();
        self.with_conn(move |conn| {
            let tx = conn.transaction().db()?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO dead_letters (id, event, error, created_at) \
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
                    )
                    .db()?;
                for l in &letters {
                    stmt.execute(params![l.id, l.event, l.error, l.created_at])
                        .db()?;
                }
            }
            tx.commit().db()
        })
        .await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, event, error, created_at FROM dead_letters \
                     ORDER BY created_at, id",
                )
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(DeadLetter {
                        id: r.get(0)?,
                        event: r.get(1)?,
                        error: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                })
                .db()?;
            rows.collect::<rusqlite::Result<Vec<_>>>().db()
        })
        .await
    }
}

/// API keys (hashes only).
impl SqliteStore {
    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let key = key.clone();
        self.with_conn(move |conn| {
            conn.execute(
                "INSERT INTO api_keys (id, tenant_id, hash, prefix, created_at, revoked_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    key.id,
                    key.tenant.as_ref().map(|t| t.as_str().to_owned()),
                    key.hash,
                    key.prefix,
                    key.created_at,
                    key.revoked_at
                ],
            )
            .db()?;
            Ok(())
        })
        .await
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, tenant_id, hash, prefix, created_at, revoked_at FROM api_keys \
                     ORDER BY created_at, id",
                )
                .db()?;
            let mut rows = stmt.query([]).db()?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().db()? {
                let tenant = opt_text(row, 1)?
                    .map(|t| spendguard_core::TenantId::parse(t).map_err(crate::common::corrupt))
                    .transpose()?;
                out.push(ApiKeyRecord {
                    id: text(row, 0)?.to_owned(),
                    tenant,
                    hash: text(row, 2)?.to_owned(),
                    prefix: text(row, 3)?.to_owned(),
                    created_at: int(row, 4)?,
                    revoked_at: row.get::<_, Option<i64>>(5).db()?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Marks a key revoked; `false` when there is no such unrevoked key.
    pub async fn revoke_api_key(&self, id: &str, at: Micros) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.with_conn(move |conn| {
            let n = conn
                .execute(
                    "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                    rusqlite::params![id, at],
                )
                .db()?;
            Ok(n == 1)
        })
        .await
    }
}
