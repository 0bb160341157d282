//! Durable storage of spendguard's usage ledger.
//!
//! The in-memory [`Ledger`](spendguard_core::Ledger) returns an [`Event`] for every state
//! change; a [`Store`] persists batches of them and hands back a [`Snapshot`] at start-up.
//! Two backends implement it: [`SqliteStore`] (one file, single node) and [`PostgresStore`].
//! [`AnyStore`] picks one from a URL.
//!
//! # Tables
//! Both backends hold the same tables (see `migrations`): `ai_usage` (one immutable row per
//! usage record), `reservations`, `rollups` (per scope and calendar window: spent, requests,
//! tokens, and the input, cached input and output tokens; read at start-up and by reports),
//! `usage_rollups` (per calendar day and report dimension, model, endpoint or user and
//! model: requests, tokens, cost; read by reports), `budget_overrides`, `user_overrides`,
//! `api_keys`, `alerts`, `webhook_deliveries`, and the dashboard's `audit_log` and
//! `alert_acks` (see `browse`). Money is integer micro-USD everywhere
//! except `ai_usage.cost_usd`, which is `NUMERIC` on PostgreSQL (and a virtual column computed from
//! `cost_micros` on SQLite). Instants are `timestamptz` on PostgreSQL and integer
//! microseconds since the Unix epoch on SQLite; window starts are integer microseconds on
//! both, as they are keys.
//!
//! # The journal
//! [`Store::apply`] makes a batch durable by appending it to `journal`; a projector applies the
//! journal to the tables below off the acknowledgement path, and reads through the store
//! project what waits first (see the `journal` module).
//!
//! # Rollups
//! A usage row and its rollup increments (`rollups` and `usage_rollups`) are written in the
//! same projection transaction, and the increments are made only for rows that were actually
//! inserted.
//! Applying a batch again therefore changes nothing, `rollups` always equals the sums over
//! `ai_usage` ([`Store::recount`]), and `usage_rollups` what
//! [`AnyStore::rebuild_usage_rollups`] computes from it. Sums saturate at `i64::MAX`, like
//! the ledger's counters.

use std::future::Future;

use spendguard_core::{
    CounterRow, Event, IdempotencyKey, Micros, Reservation, Snapshot, TenantId, UsageRecord,
};
use uuid::Uuid;

mod analytics;
mod browse;
mod common;
mod error;
mod journal;
mod migrations;

/// The SQL that fills the users' week rows of a `rollups` table holding none, for tools and
/// benchmarks that fill `rollups` in bulk (the store keeps them itself).
#[doc(hidden)]
pub use migrations::{POSTGRES_FILL_WEEKS, SQLITE_FILL_WEEKS};
mod postgres;
mod postgres_analytics;
mod postgres_browse;
mod postgres_cluster;
mod postgres_copy;
mod sqlite;
mod sqlite_analytics;
mod sqlite_browse;

pub use analytics::{
    AlertKind, AlertQuery, AlertRecord, Delivery, DeliveryOutcome, DeliveryState, GroupBy,
    ModelUsage, NewAlert, Report, ReportQuery, ReportRow, UsageTotals,
};
pub use browse::{AlertAck, AuditEntry, DaySlice, RecordQuery, SliceDim};
pub use error::StoreError;

/// A stored API key: its SHA-256 (hex), never the key itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    /// `None` for an admin key.
    pub tenant: Option<spendguard_core::TenantId>,
    pub hash: String,
    /// The first characters of the key, to recognise it in listings.
    pub prefix: String,
    pub created_at: Micros,
    pub revoked_at: Option<Micros>,
}
pub use postgres::PostgresStore;
pub use postgres_cluster::{
    ClusterDecider, ClusterInstance, ClusterNeeds, ClusterView, ClusterWrite, DashboardSession,
};
pub use sqlite::SqliteStore;

/// Where [`Store::load_streaming`] sends the counters it reads, a chunk at a time.
pub type CounterChunks = tokio::sync::mpsc::UnboundedSender<Vec<CounterRow>>;

/// How many counters [`Store::load_streaming`] sends at a time.
pub(crate) const COUNTER_CHUNK: usize = 16_384;

/// The persistence interface of spendguard: every backend implements it.
pub trait Store: Send + Sync + 'static {
    /// Makes a batch of events durable, all or nothing (one journal row, projected into the
    /// tables in one transaction). Idempotent: applying the same events again (e.g. replay
    /// from a spool after an outage, or a batch retried after an error whose commit status
    /// is unknown) changes nothing in the tables.
    fn apply(&self, events: &[Event]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Start-up state: rollup counters of windows with day start >= `day_start` (window
    /// 'day') or month start >= `month_start` (window 'month'), in no particular order (a
    /// ledger restores them in any order; sorting 2 million of them was a quarter of a
    /// start-up), all open reservations, all overrides. Costs O(active scopes + open
    /// reservations), never O(history).
    fn load(
        &self,
        day_start: Micros,
        month_start: Micros,
    ) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// [`Store::load`], handing the counters to `counters` in chunks as they are read (the
    /// snapshot returned holds none), so that the caller restores them while the rest is
    /// still being read. A backend that cannot stream sends them all in one chunk.
    fn load_streaming(
        &self,
        day_start: Micros,
        month_start: Micros,
        counters: CounterChunks,
    ) -> impl Future<Output = Result<Snapshot, StoreError>> + Send {
        async move {
            let mut snapshot = self.load(day_start, month_start).await?;
            // The receiver gone means the caller gave up; the error it returns says why.
            let _ = counters.send(std::mem::take(&mut snapshot.counters));
            Ok(snapshot)
        }
    }

    /// One usage record by id.
    fn usage(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<UsageRecord>, StoreError>> + Send;

    /// A reservation as persisted: its state and the usage record that settled it, if any.
    fn reservation(
        &self,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<StoredReservation>, StoreError>> + Send;

    /// The newest reservation a tenant made with this idempotency key, for keyed retries
    /// that memory no longer knows (after a restart).
    fn reservation_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<StoredReservation>, StoreError>> + Send;

    /// A fact about the database itself (see [`settings`]), if it was ever set.
    fn setting(&self, key: &str)
    -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Sets a fact about the database itself.
    fn put_setting(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A direct usage record (one not made by a reservation) by (tenant, idempotency key),
    /// for idempotent retries older than the ledger's memory retention.
    fn usage_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> impl Future<Output = Result<Option<UsageRecord>, StoreError>> + Send;

    /// Sums straight from `ai_usage` (for tests and checks; may be slow): per scope, window
    /// and window start, spent/requests/tokens and the token split of the counting records.
    /// Sorted by scope, window and start.
    fn recount(&self) -> impl Future<Output = Result<Vec<CounterRow>, StoreError>> + Send;

    /// All rollup rows (for tests): must equal [`Store::recount`]. Sorted like it.
    fn rollups(&self) -> impl Future<Output = Result<Vec<CounterRow>, StoreError>> + Send;

    /// The number of `ai_usage` rows.
    fn usage_count(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// This database's identity, chosen at random when its schema was created. The spool
    /// carries it, so a spool is never replayed into another database.
    fn database_id(&self) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Keeps events the store refused for good in `dead_letters`. Idempotent by id.
    fn dead_letter(
        &self,
        letters: &[DeadLetter],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The dead letters, oldest first.
    fn dead_letters(&self) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// The PostgreSQL store behind this one, for cluster mode; `None` for SQLite.
    fn postgres(&self) -> Option<&PostgresStore> {
        None
    }
}

/// An event the store refused for a reason retrying cannot cure, kept for an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// A digest of `event`, so keeping the same event twice keeps one row.
    pub id: String,
    /// The event as JSON (the spool's encoding).
    pub event: String,
    /// Why the store refused it.
    pub error: String,
    pub created_at: Micros,
}

/// Keys of [`Store::setting`].
pub mod settings {
    /// The IANA time zone the database's calendar windows are counted in.
    pub const TIME_ZONE: &str = "time_zone";
    /// `single` or `cluster`: the mode of the last instance that started writing. A cluster
    /// taking over from a single node rebuilds its counter rows from the tables.
    pub const WRITER_MODE: &str = "writer_mode";
}

/// A reservation as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReservation {
    pub reservation: Reservation,
    pub state: ReservationState,
    /// The record that settled it (a commit's, or an expiry's); `None` while open and after
    /// a release.
    pub usage: Option<UsageRecord>,
}

/// The persisted state of a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReservationState {
    Open,
    Committed,
    Released,
    Expired,
}

impl ReservationState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationState::Open => "open",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<ReservationState> {
        Some(match s {
            "open" => ReservationState::Open,
            "committed" => ReservationState::Committed,
            "released" => ReservationState::Released,
            "expired" => ReservationState::Expired,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ReservationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to open a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// SQLite: `synchronous=FULL` (every committed batch survives a power loss) instead of
    /// `NORMAL` (a power loss may lose the last batches; a crash of the process loses none).
    pub sync_every_batch: bool,
    /// PostgreSQL: the most pooled connections.
    pub pool_size: usize,
    /// Take the single-writer lock: refuse to open while another instance holds it.
    pub take_writer_lock: bool,
    /// Keep the journal's batches once they are projected into the tables: a complete
    /// history of every event, from which every table can be recounted (it grows with
    /// every batch). Off by default: a projected batch is deleted as it is projected.
    pub keep_journal: bool,
    /// PostgreSQL: open as one instance of a cluster (`mode = "cluster"`): the writer lock
    /// is shared with the other cluster instances, and refused while a single-node
    /// instance holds it (and the other way round).
    pub cluster: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            sync_every_batch: false,
            pool_size: 8,
            take_writer_lock: true,
            keep_journal: false,
            cluster: false,
        }
    }
}

/// Where a store URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target<'a> {
    Postgres(&'a str),
    Sqlite(&'a str),
    /// A URL of a scheme spendguard does not speak (`mysql://…`): the scheme.
    Unsupported(&'a str),
}

/// `postgres://…` and `postgresql://…` are PostgreSQL; `sqlite://path`, `sqlite:path` and
/// plain paths are a SQLite file path; any other `scheme://` is unsupported (not a file
/// named after the URL).
fn target(url: &str) -> Target<'_> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Target::Postgres(url)
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Target::Sqlite(path)
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        Target::Sqlite(path)
    } else if let Some((scheme, _)) = url.split_once("://")
        && !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        Target::Unsupported(scheme)
    } else {
        Target::Sqlite(url)
    }
}

fn unsupported(scheme: &str) -> StoreError {
    StoreError::Invalid(format!(
        "unsupported database URL (scheme `{scheme}`): use a SQLite file path, \
         sqlite://PATH or postgres://USER@HOST:PORT/DATABASE"
    ))
}

/// A store of either backend, chosen by URL.
#[derive(Debug)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Stores a new API key (its hash).
    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.insert_api_key(key).await,
            AnyStore::Postgres(s) => s.insert_api_key(key).await,
        }
    }

    /// Every API key, revoked ones included, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.list_api_keys().await,
            AnyStore::Postgres(s) => s.list_api_keys().await,
        }
    }

    /// Revokes a key; `false` when there is no such unrevoked key.
    pub async fn revoke_api_key(&self, id: &str, at: Micros) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.revoke_api_key(id, at).await,
            AnyStore::Postgres(s) => s.revoke_api_key(id, at).await,
        }
    }

    /// A usage report from `rollups` and `usage_rollups` (see [`ReportQuery`]).
    pub async fn report(&self, query: &ReportQuery) -> Result<Report, StoreError> {
        self.report_cancellable(query, Default::default()).await
    }

    /// [`AnyStore::report`] that stops early, with [`StoreError::Unavailable`], once
    /// `cancel` is set: a caller that gives up (its request was dropped or timed out) sets
    /// it, so a SQLite read on the blocking pool does not run on for nobody. (PostgreSQL
    /// reads stop when their future is dropped.)
    pub async fn report_cancellable(
        &self,
        query: &ReportQuery,
        cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Report, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.report_cancellable(query, cancel).await,
            AnyStore::Postgres(s) => s.report(query).await,
        }
    }

    /// The usage records matching `q`, newest first: `limit` of them after the first
    /// `offset`.
    pub async fn usage_records(
        &self,
        q: &RecordQuery,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.usage_records(q, limit, offset).await,
            AnyStore::Postgres(s) => s.usage_records(q, limit, offset).await,
        }
    }

    /// The sums of the counting records (not `expired`) matching `q`, per day, tenant,
    /// model and endpoint, by day then the rest. Reads `ai_usage`: O(matching records).
    pub async fn usage_slices(&self, q: &RecordQuery) -> Result<Vec<DaySlice>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.usage_slices(q).await,
            AnyStore::Postgres(s) => s.usage_slices(q).await,
        }
    }

    /// The `usage_rollups` rows of `dim` for the days `from_day..=to_day` (of one tenant,
    /// if given), by day then the rest. O(days × groups).
    pub async fn rollup_slices(
        &self,
        dim: &SliceDim,
        from_day: Micros,
        to_day: Micros,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<DaySlice>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.rollup_slices(dim, from_day, to_day, tenant).await,
            AnyStore::Postgres(s) => s.rollup_slices(dim, from_day, to_day, tenant).await,
        }
    }

    /// Appends to the audit log; returns the entry's id.
    pub async fn insert_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.insert_audit(entry).await,
            AnyStore::Postgres(s) => s.insert_audit(entry).await,
        }
    }

    /// The audit log, newest first: `limit` entries after the first `offset`.
    pub async fn audit_log(
        &self,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.audit_log(limit, offset).await,
            AnyStore::Postgres(s) => s.audit_log(limit, offset).await,
        }
    }

    /// Marks an alert acknowledged (the first acknowledgement stays); `false` when there is
    /// no such alert.
    pub async fn acknowledge_alert(
        &self,
        alert_id: i64,
        actor: &str,
        at: Micros,
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.acknowledge_alert(alert_id, actor, at).await,
            AnyStore::Postgres(s) => s.acknowledge_alert(alert_id, actor, at).await,
        }
    }

    /// The acknowledgements of the alerts `ids` (those that have one), by alert id.
    pub async fn alert_acks(&self, ids: &[i64]) -> Result<Vec<AlertAck>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.alert_acks(ids).await,
            AnyStore::Postgres(s) => s.alert_acks(ids).await,
        }
    }

    /// One user's usage on the day starting at `day_start`, per model, by cost descending.
    pub async fn user_day(
        &self,
        tenant: &TenantId,
        user: &spendguard_core::UserId,
        day_start: Micros,
    ) -> Result<Vec<ModelUsage>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.user_day(tenant, user, day_start).await,
            AnyStore::Postgres(s) => s.user_day(tenant, user, day_start).await,
        }
    }

    /// Persists alerts, each at most once ever (a second insert of the same (scope, window,
    /// window start, threshold, kind) does nothing, also concurrently and from several
    /// instances). For each alert actually inserted, one pending delivery per webhook URL is
    /// created in the same transaction, due at once. Returns the alerts actually inserted.
    pub async fn insert_alerts(
        &self,
        alerts: &[NewAlert],
        webhook_urls: &[String],
    ) -> Result<Vec<AlertRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.insert_alerts(alerts, webhook_urls).await,
            AnyStore::Postgres(s) => s.insert_alerts(alerts, webhook_urls).await,
        }
    }

    /// Would-be denials (reservations admitted that a limit in shadow would have refused)
    /// of the days from `from_day` to `to_day` (window starts, both included), of one
    /// tenant or all, counted by reason, sorted by reason.
    pub async fn would_deny_counts(
        &self,
        from_day: Micros,
        to_day: Micros,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.would_deny_counts(from_day, to_day, tenant).await,
            AnyStore::Postgres(s) => s.would_deny_counts(from_day, to_day, tenant).await,
        }
    }

    /// Alerts, newest first (see [`AlertQuery`]).
    pub async fn alerts(&self, query: &AlertQuery) -> Result<Vec<AlertRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.alerts(query).await,
            AnyStore::Postgres(s) => s.alerts(query).await,
        }
    }

    /// Pending deliveries due at `now` (`next_attempt_at <= now`), soonest first.
    pub async fn due_deliveries(
        &self,
        now: Micros,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.due_deliveries(now, limit).await,
            AnyStore::Postgres(s) => s.due_deliveries(now, limit).await,
        }
    }

    /// Records the outcome of an attempt (and counts the attempt).
    pub async fn finish_delivery(
        &self,
        id: i64,
        outcome: &DeliveryOutcome,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.finish_delivery(id, outcome).await,
            AnyStore::Postgres(s) => s.finish_delivery(id, outcome).await,
        }
    }

    /// Every delivery (any state), oldest first: for operators and tests.
    pub async fn deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.deliveries().await,
            AnyStore::Postgres(s) => s.deliveries().await,
        }
    }

    /// Recomputes `usage_rollups` from `ai_usage`, as the migration that made it filled it:
    /// for repairs, tests and benchmarks (it reads every usage row).
    pub async fn rebuild_usage_rollups(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.rebuild_usage_rollups().await,
            AnyStore::Postgres(s) => s.rebuild_usage_rollups().await,
        }
    }

    /// Opens the store at `url` and brings its schema up to date. A URL starting with
    /// `postgres://` or `postgresql://` is PostgreSQL; anything else is a SQLite file path,
    /// optionally written `sqlite://path` or `sqlite:path`.
    pub async fn open(url: &str, options: &OpenOptions) -> Result<AnyStore, StoreError> {
        Ok(match target(url) {
            Target::Postgres(url) => AnyStore::Postgres(PostgresStore::open(url, options).await?),
            Target::Sqlite(path) => AnyStore::Sqlite(SqliteStore::open(path, options).await?),
            Target::Unsupported(scheme) => return Err(unsupported(scheme)),
        })
    }

    /// Like [`AnyStore::open`], but never creates a database: a SQLite file that does not
    /// exist is an error (for readers, where a mistyped path must not answer "no usage").
    pub async fn open_existing(url: &str, options: &OpenOptions) -> Result<AnyStore, StoreError> {
        if let Target::Sqlite(path) = target(url)
            && path != ":memory:"
            && !std::path::Path::new(path).exists()
        {
            return Err(StoreError::Invalid(format!(
                "the SQLite database {path} does not exist (check --database or \
                 server.database; `spendguard migrate` creates it)"
            )));
        }
        AnyStore::open(url, options).await
    }

    /// Projects every journal batch not projected yet into the tables (reads through the
    /// store do it themselves; a reader of the tables in SQL may want it first).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.catch_up().await,
            AnyStore::Postgres(s) => s.catch_up().await,
        }
    }

    /// Every batch in the journal, oldest first: with
    /// [`OpenOptions::keep_journal`], every batch ever acknowledged (else only those not
    /// projected yet). Reads the whole journal.
    pub async fn journal(&self) -> Result<Vec<Vec<Event>>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.journal().await,
            AnyStore::Postgres(s) => s.journal().await,
        }
    }

    /// Applies the migrations not applied yet (`open` does it already).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.migrate().await,
            AnyStore::Postgres(s) => s.migrate().await,
        }
    }

    /// The versions of the applied migrations, ascending.
    pub async fn schema_versions(&self) -> Result<Vec<i64>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.schema_versions().await,
            AnyStore::Postgres(s) => s.schema_versions().await,
        }
    }

    /// Closes the store and releases the writer lock at once (dropping it releases the lock
    /// too, but PostgreSQL may notice a dropped connection a moment later).
    pub async fn close(self) {
        match self {
            AnyStore::Sqlite(s) => s.close().await,
            AnyStore::Postgres(s) => s.close().await,
        }
    }

    /// The backend's name: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

impl Store for AnyStore {
    async fn apply(&self, events: &[Event]) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.apply(events).await,
            AnyStore::Postgres(s) => s.apply(events).await,
        }
    }

    async fn load(&self, day_start: Micros, month_start: Micros) -> Result<Snapshot, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.load(day_start, month_start).await,
            AnyStore::Postgres(s) => s.load(day_start, month_start).await,
        }
    }

    async fn load_streaming(
        &self,
        day_start: Micros,
        month_start: Micros,
        counters: CounterChunks,
    ) -> Result<Snapshot, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.load_streaming(day_start, month_start, counters).await,
            AnyStore::Postgres(s) => s.load_streaming(day_start, month_start, counters).await,
        }
    }

    async fn usage(&self, id: Uuid) -> Result<Option<UsageRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.usage(id).await,
            AnyStore::Postgres(s) => s.usage(id).await,
        }
    }

    async fn reservation(&self, id: Uuid) -> Result<Option<StoredReservation>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.reservation(id).await,
            AnyStore::Postgres(s) => s.reservation(id).await,
        }
    }

    async fn reservation_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<StoredReservation>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.reservation_by_key(tenant, key).await,
            AnyStore::Postgres(s) => s.reservation_by_key(tenant, key).await,
        }
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.setting(key).await,
            AnyStore::Postgres(s) => s.setting(key).await,
        }
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.put_setting(key, value).await,
            AnyStore::Postgres(s) => s.put_setting(key, value).await,
        }
    }

    async fn usage_by_key(
        &self,
        tenant: &TenantId,
        key: &IdempotencyKey,
    ) -> Result<Option<UsageRecord>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.usage_by_key(tenant, key).await,
            AnyStore::Postgres(s) => s.usage_by_key(tenant, key).await,
        }
    }

    async fn recount(&self) -> Result<Vec<CounterRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.recount().await,
            AnyStore::Postgres(s) => s.recount().await,
        }
    }

    async fn rollups(&self) -> Result<Vec<CounterRow>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.rollups().await,
            AnyStore::Postgres(s) => s.rollups().await,
        }
    }

    async fn usage_count(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.usage_count().await,
            AnyStore::Postgres(s) => s.usage_count().await,
        }
    }

    async fn database_id(&self) -> Result<String, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.database_id().await,
            AnyStore::Postgres(s) => s.database_id().await,
        }
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.dead_letter(letters).await,
            AnyStore::Postgres(s) => s.dead_letter(letters).await,
        }
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.dead_letters().await,
            AnyStore::Postgres(s) => s.dead_letters().await,
        }
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        match self {
            AnyStore::Sqlite(_) => None,
            AnyStore::Postgres(s) => Some(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_backend() {
        assert_eq!(
            target("postgres://u@h/db"),
            Target::Postgres("postgres://u@h/db")
        );
        assert_eq!(
            target("postgresql://u@h/db"),
            Target::Postgres("postgresql://u@h/db")
        );
        assert_eq!(
            target("sqlite:///var/db.sqlite"),
            Target::Sqlite("/var/db.sqlite")
        );
        assert_eq!(target("sqlite://db.sqlite"), Target::Sqlite("db.sqlite"));
        assert_eq!(target("sqlite:db.sqlite"), Target::Sqlite("db.sqlite"));
        assert_eq!(
            target("./data/db.sqlite"),
            Target::Sqlite("./data/db.sqlite")
        );
        assert_eq!(target("mysql://h/db"), Target::Unsupported("mysql"));
        assert_eq!(target("data/x://y"), Target::Sqlite("data/x://y"));
    }

    #[test]
    fn reservation_states_round_trip() {
        for s in [
            ReservationState::Open,
            ReservationState::Committed,
            ReservationState::Released,
            ReservationState::Expired,
        ] {
            assert_eq!(ReservationState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ReservationState::parse("gone"), None);
    }
}
