//! The `Guard`: spendguard's service layer. It owns the in-memory [`Ledger`] (where every
//! decision is made) and a group-commit writer that makes each decision durable before the
//! caller is answered.
//!
//! - **Durable answers.** `reserve`, `commit`, `release` and `record` return only once their
//!   event is committed to the store (or, while the store is unreachable, synced to the
//!   spool). Events queued while a batch is being written form the next batch: one
//!   transaction per batch keeps throughput high without weakening durability.
//! - **Outages.** When the store fails, batches go to the [`spool`] (checksummed, synced), the
//!   ledger keeps enforcing exactly from memory, and the writer replays the spool, in order,
//!   once the store answers again. The store applies events idempotently, so a batch replayed
//!   twice (a crash between replay and truncation) counts once. A batch the store refuses
//!   for good (a value it cannot hold) is split until the refused events are alone; they
//!   become dead letters and their callers get [`GuardError::Rejected`], the rest is stored,
//!   and nothing waits behind them. With
//!   `on_store_error = "deny"`, new reservations are refused (503) while the store is
//!   unreachable; acknowledged spend is still spooled, never lost.
//! - **Failures are visible.** The expiry sweeper survives its errors (logged, counted,
//!   retried); [`Guard::problems`] reports a failing spool, a stopped writer or a failing
//!   sweeper, for `/readyz`.
//! - **Start-up.** The spool is replayed first (a damaged spool, or one of another
//!   database, refuses the start and is left as it is), then the current windows' counters and the
//!   open reservations are loaded (O(active scopes)); reservations whose TTL passed while the
//!   service was down are expired at once.

pub mod cluster;
mod inflight;
pub mod spool;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use spendguard_core::{
    BudgetOverride, CheckOutcome, CommitRequest, Committed, CompanyId, Event, IdempotencyKey,
    LedgerError, LimitStatus, Micros, Policy, RecordRequest, ReserveRequest, Reserved, ScopeKey,
    Settlement, Snapshot, TenantId, TierName, UsageRecord, UserId, UserOverrides, late_usage_id,
    reserve_fingerprint,
};
use spendguard_store::{DeadLetter, ReservationState, Store, StoreError, settings};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use spendguard_core::Ledger;

use crate::cluster::{Answer, Cluster, ClusterOptions, ClusterStats, Op};
use crate::inflight::{InFlight, OpKey, Ticket};
use crate::spool::Spool;
pub use crate::watch::SpendWatch;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Microseconds since the Unix epoch.
    fn now(&self) -> Micros;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        d.as_micros() as Micros
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now: Micros) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(now)))
    }
    pub fn set(&self, now: Micros) {
        self.0.store(now, Ordering::SeqCst);
    }
    pub fn advance(&self, micros: Micros) {
        self.0.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
}

pub use spendguard_core::config::OnStoreError;

/// Options of a guard.
#[derive(Clone, Debug)]
pub struct GuardOptions {
    pub on_store_error: OnStoreError,
    /// Where to spool events while the store is unreachable.
    pub spool_path: PathBuf,
    /// The most events in one store transaction.
    pub max_batch: usize,
    /// How often reservations are checked for expiry.
    pub sweep_interval: Duration,
    /// How often the spool is retried while the store is down.
    pub retry_interval: Duration,
    /// Fault injection for tests: while set, every spool append fails as if the disk did.
    pub spool_faults: Option<Arc<AtomicBool>>,
    /// Run as one instance of a cluster on PostgreSQL (see [`cluster`]); `None`: the
    /// single-node service.
    pub cluster: Option<ClusterOptions>,
}

impl GuardOptions {
    pub fn new(spool_path: impl Into<PathBuf>) -> GuardOptions {
        GuardOptions {
            on_store_error: OnStoreError::Spool,
            spool_path: spool_path.into(),
            max_batch: 4096,
            sweep_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(500),
            spool_faults: None,
            cluster: None,
        }
    }
}

/// Errors of guard operations.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// `on_store_error = "deny"` and the store cannot be written.
    #[error("the usage store is unavailable; new reservations are refused until it is back")]
    Unavailable,
    #[error("the usage store failed: {0}")]
    Store(#[from] StoreError),
    #[error("the spool could not be written: {0}")]
    Spool(std::io::Error),
    /// The spool cannot be used as it is (damaged, another database's, another format);
    /// the message names the file and the byte offset. Nothing was removed from it.
    #[error("{0}")]
    SpoolRefused(std::io::Error),
    /// The store refused this change for a reason retrying cannot cure (a value it cannot
    /// hold). It was not stored; it was kept as a dead letter with the error.
    #[error("the store refused this change, which was kept as a dead letter: {0}")]
    Rejected(String),
    #[error("spendguard is shutting down")]
    ShuttingDown,
    /// The configured time zone is not the one the database's windows are counted in.
    #[error(
        "the database counts its days and months in time zone `{stored}`, but the configuration \
         says `{configured}`. Changing it in place would miscount the current day and month \
         (moving east stops counting today's spend, moving west drops it), so spendguard does \
         not start. Set time_zone back to `{stored}`; or, to switch knowing that the current \
         day's and month's budgets then count only spend from the switch on, run \
         `spendguard migrate --time-zone {configured}` first"
    )]
    TimeZoneChanged { stored: String, configured: String },
}

/// The health of the write path, for `/readyz` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreHealth {
    /// Batches reach the store.
    Ok,
    /// The store failed; events are spooled and decisions go on from memory.
    Spooling,
}

/// Counters of the write path.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct WriterStats {
    pub health: StoreHealth,
    pub on_store_error: OnStoreError,
    /// Batches waiting in the spool.
    pub spool_depth: u64,
    pub batches: u64,
    pub events: u64,
    pub last_batch_size: u64,
    pub store_errors: u64,
    /// Events the store refused for good, kept as dead letters since start.
    pub dead_letters: u64,
    /// Spool appends (or reads) that failed since start.
    pub spool_failures: u64,
    /// The last spool append or read failed (the service is not ready).
    pub spool_failing: bool,
    /// The writer task is running.
    pub writer_running: bool,
    /// Expiry sweeps that failed since start.
    pub sweep_failures: u64,
    /// Expiry sweeps that failed in a row (0 when the last one worked).
    pub sweeps_failing: u64,
}

/// Sweeps that fail in a row before the service reports itself not ready.
const SWEEP_FAILURES_NOT_READY: u64 = 3;

#[derive(Debug, Default)]
struct Stats {
    health: AtomicU8,
    spool_depth: AtomicU64,
    batches: AtomicU64,
    events: AtomicU64,
    last_batch: AtomicU64,
    store_errors: AtomicU64,
    dead_letters: AtomicU64,
    spool_failures: AtomicU64,
    spool_failing: AtomicBool,
    writer_running: AtomicBool,
    sweep_failures: AtomicU64,
    sweeps_failing: AtomicU64,
}

/// Marks the writer as stopped when its task ends, also by a panic.
struct Running(Arc<Stats>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.writer_running.store(false, Ordering::SeqCst);
    }
}

type Ack = oneshot::Sender<Result<(), GuardError>>;

enum Write {
    /// Events to persist, who waits for them, and the ticket that holds back retries of the
    /// same operation until they are durable (or undone).
    Events(Vec<Event>, Option<Ack>, Option<Ticket>),
    Close,
}

/// An event the store refused for good: its index in the batch and the error.
type Refused = (usize, StoreError);

/// The ledger plus its durable writer. Clone it freely (it is an `Arc`).
pub struct Guard<S: Store> {
    inner: Arc<Inner<S>>,
}

impl<S: Store> Clone for Guard<S> {
    fn clone(&self) -> Self {
        Guard {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Store> std::fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    ledger: Arc<Ledger>,
    store: Arc<S>,
    /// Operations whose write is in flight, by what a retry would repeat.
    inflight: Arc<InFlight>,
    /// Serializes admin writes (budgets, user overrides): each reads, changes, persists and,
    /// if persisting fails, restores under it, so no update is lost and the store keeps
    /// the last value memory has.
    admin: tokio::sync::Mutex<()>,
    /// When this guard started: keyed reservations made before it are answered from the
    /// store for as long as they can be retried.
    started_at: Micros,
    clock: Arc<dyn Clock>,
    writes: mpsc::UnboundedSender<Write>,
    stats: Arc<Stats>,
    options: GuardOptions,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    watch: Arc<SpendWatch>,
    /// Would-be denials since start, by reason (see [`WOULD_DENY_REASONS`]).
    would_deny: [AtomicU64; WOULD_DENY_REASONS.len()],
    /// This instance's part of a cluster, in cluster mode.
    cluster: Option<Cluster>,
}

/// The reasons a would-be denial is counted under: the error code a limit in shadow would
/// have refused with. Unknown models and too many subjects are never in shadow.
pub const WOULD_DENY_REASONS: [&str; 4] = [
    "budget_exceeded",
    "rate_limited",
    "model_not_allowed",
    "max_output_tokens_exceeded",
];

impl<S: Store> Guard<S> {
    /// Replays the spool, restores the ledger from the store and starts the writer and the
    /// expiry sweeper. Must run inside a Tokio runtime.
    pub async fn start(
        store: S,
        policy: Policy,
        options: GuardOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Guard<S>, GuardError> {
        let store = Arc::new(store);
        check_time_zone(&*store, &policy).await?;
        let database_id = store.database_id().await?;
        let mut spool =
            Spool::open(&options.spool_path, &database_id).map_err(GuardError::SpoolRefused)?;
        if let Some(fail) = &options.spool_faults {
            spool.set_faults(spool::Faults {
                fail_appends: fail.clone(),
            });
        }
        let stats = Arc::new(Stats::default());
        if !spool.is_empty() {
            tracing::info!(
                batches = spool.depth(),
                path = %spool.path().display(),
                "replaying the spool into the store"
            );
            match drain_spool(&*store, &mut spool, &stats).await {
                Drain::Empty => {}
                Drain::StoreDown(e) => return Err(e.into()),
                Drain::Failed(e) => return Err(GuardError::SpoolRefused(e)),
            }
        }
        let now = clock.now();
        let periods = policy.calendar.periods(now);
        let ledger = Arc::new(Ledger::new(policy));
        let (snapshot, counters) = if options.cluster.is_some() {
            // The counters and open reservations live in the shared rows, read as each
            // batch is decided; the overrides are loaded by the cluster.
            (Snapshot::default(), 0)
        } else {
            // A cluster taking over later must rebuild its counter rows from the tables.
            if store.postgres().is_some() {
                store.put_setting(settings::WRITER_MODE, "single").await?;
            }
            // The counters (two per active scope: millions) are restored on another thread
            // as they are read, instead of after the last is read.
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<spendguard_core::CounterRow>>();
            let restorer = {
                let ledger = ledger.clone();
                tokio::task::spawn_blocking(move || {
                    let mut n = 0;
                    while let Some(chunk) = rx.blocking_recv() {
                        n += chunk.len();
                        ledger.restore_counters(chunk);
                    }
                    n
                })
            };
            let snapshot = store
                .load_streaming(periods.day.start, periods.month.start, tx)
                .await;
            let counters = restorer.await.map_err(|e| {
                GuardError::Store(spendguard_store::StoreError::Invalid(format!(
                    "restoring the counters failed: {e}"
                )))
            })?;
            (snapshot?, counters)
        };
        tracing::info!(
            counters,
            open_reservations = snapshot.open.len(),
            "restored the ledger"
        );
        let restored = ledger.restore(snapshot)?;
        for (tenant, user, tier) in &restored.dropped_tiers {
            tracing::warn!(
                tenant = %tenant,
                user = %user,
                tier = %tier,
                "a stored user tier is not in the configuration; the user falls back to the \
                 default tier until the tier is configured again or the user is updated"
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        stats.writer_running.store(true, Ordering::SeqCst);
        let watch = Arc::new(SpendWatch::default());
        let (cluster, cluster_tasks) = match options.cluster.clone() {
            Some(o) => {
                let (c, tasks) = Cluster::start(
                    store.clone(),
                    ledger.clone(),
                    clock.clone(),
                    watch.clone(),
                    o,
                )
                .await?;
                (Some(c), tasks)
            }
            None => (None, Vec::new()),
        };
        let writer = tokio::spawn(writer(
            store.clone(),
            ledger.clone(),
            spool,
            rx,
            stats.clone(),
            options.clone(),
            watch.clone(),
        ));
        let guard = Guard {
            inner: Arc::new(Inner {
                ledger,
                store,
                inflight: Arc::default(),
                admin: tokio::sync::Mutex::new(()),
                started_at: now,
                clock,
                writes: tx,
                stats,
                options,
                tasks: Mutex::new(std::iter::once(writer).chain(cluster_tasks).collect()),
                watch,
                would_deny: Default::default(),
                cluster,
            }),
        };
        // Reservations that expired while we were down.
        guard.sweep().await?;
        let weak = Arc::downgrade(&guard.inner);
        let every = guard.inner.options.sweep_interval;
        // The sweeper never gives up: a failed sweep is logged, counted and retried at the
        // next tick (the writer reopened the expiries it could not persist).
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let g = Guard { inner };
                let stats = &g.inner.stats;
                match g.sweep().await {
                    Ok(()) => {
                        if stats.sweeps_failing.swap(0, Ordering::Relaxed) > 0 {
                            tracing::info!("the expiry sweep works again");
                        }
                    }
                    Err(GuardError::ShuttingDown) => return,
                    Err(e) => {
                        stats.sweep_failures.fetch_add(1, Ordering::Relaxed);
                        let in_a_row = stats.sweeps_failing.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::warn!(
                            error = %e,
                            in_a_row,
                            "the expiry sweep failed; retrying at the next tick"
                        );
                    }
                }
            }
        });
        guard
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sweeper);
        Ok(guard)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn store(&self) -> &S {
        &self.inner.store
    }

    pub fn now(&self) -> Micros {
        self.inner.clock.now()
    }

    /// The scopes whose spend changed: off until [`SpendWatch::enable`] is called (the alert
    /// engine does), so an unwatched guard pays nothing for it.
    pub fn spend_watch(&self) -> &Arc<SpendWatch> {
        &self.inner.watch
    }

    pub fn stats(&self) -> WriterStats {
        let s = &self.inner.stats;
        WriterStats {
            health: self.health(),
            on_store_error: self.inner.options.on_store_error,
            spool_depth: s.spool_depth.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            last_batch_size: s.last_batch.load(Ordering::Relaxed),
            store_errors: s.store_errors.load(Ordering::Relaxed),
            dead_letters: s.dead_letters.load(Ordering::Relaxed),
            spool_failures: s.spool_failures.load(Ordering::Relaxed),
            spool_failing: s.spool_failing.load(Ordering::Relaxed),
            writer_running: s.writer_running.load(Ordering::Relaxed),
            sweep_failures: s.sweep_failures.load(Ordering::Relaxed),
            sweeps_failing: s.sweeps_failing.load(Ordering::Relaxed),
        }
    }

    pub fn health(&self) -> StoreHealth {
        match self.inner.stats.health.load(Ordering::Relaxed) {
            0 => StoreHealth::Ok,
            _ => StoreHealth::Spooling,
        }
    }

    /// True when the service can admit reservations and make them durable: no entry in
    /// [`Guard::problems`]. (Only the first problem, the store down in `deny` mode, refuses
    /// reservations; the others are reported, and the next write that works clears a spool
    /// failure.)
    pub fn ready(&self) -> bool {
        self.problems().is_empty()
    }

    /// Why the service is not ready, if it is not: the store is down in `deny` mode, the
    /// last spool append (or read) failed, the writer stopped, or the expiry sweep failed
    /// several times in a row.
    pub fn problems(&self) -> Vec<&'static str> {
        let s = self.stats();
        let mut problems = Vec::new();
        if s.health == StoreHealth::Spooling && s.on_store_error == OnStoreError::Deny {
            problems.push("the store is unavailable and on_store_error is \"deny\"");
        }
        if s.spool_failing {
            problems.push("the spool cannot be written or read");
        }
        if !s.writer_running {
            problems.push("the writer is not running");
        }
        if s.sweeps_failing >= SWEEP_FAILURES_NOT_READY {
            problems.push("the expiry sweep keeps failing");
        }
        if self.cluster().is_some_and(|(_, c)| c.heartbeat_failing) {
            problems.push("the cluster's database cannot be reached (the heartbeat fails)");
        }
        problems
    }

    /// Hands an event to the writer and waits until it is durable. The ticket, if any, is
    /// released by the writer once the event is durable or, when it cannot be made durable,
    /// once memory is undone; either way before this returns.
    async fn persist(
        &self,
        event: Option<Event>,
        ticket: Option<Ticket>,
    ) -> Result<(), GuardError> {
        let Some(event) = event else { return Ok(()) };
        if let Some(c) = &self.inner.cluster {
            // Admin changes: written (and announced to the other instances) in a batch.
            drop(ticket);
            c.run(Op::Admin(event)).await?;
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .writes
            .send(Write::Events(vec![event], Some(tx), ticket))
            .map_err(|_| GuardError::ShuttingDown)?;
        rx.await.map_err(|_| GuardError::ShuttingDown)?
    }

    /// Waits until no other operation on `key` is in flight, and takes its ticket.
    async fn enter(&self, key: OpKey) -> Ticket {
        self.inner.inflight.enter(key).await
    }

    /// The ticket of a keyed operation (none without a key).
    async fn enter_key(&self, tenant: &TenantId, key: Option<&IdempotencyKey>) -> Option<Ticket> {
        match key {
            Some(k) => Some(self.enter(OpKey::Key(tenant.clone(), k.clone())).await),
            None => None,
        }
    }

    /// Expires overdue reservations and persists the `expired` records. If they cannot be
    /// made durable, the writer reopens them in memory, so the next sweep expires them again.
    pub async fn sweep(&self) -> Result<(), GuardError> {
        if let Some(c) = &self.inner.cluster {
            return c
                .sweep(&*self.inner.store, &self.inner.ledger, self.now())
                .await;
        }
        let events = self.inner.ledger.expire(self.now());
        if events.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .writes
            .send(Write::Events(events, Some(tx), None))
            .map_err(|_| GuardError::ShuttingDown)?;
        rx.await.map_err(|_| GuardError::ShuttingDown)?
    }

    /// Reserves budget. The reservation id is assigned here (UUID v7). A retry with the
    /// same idempotency key waits for the first attempt to be durable and answers the same
    /// reservation, also after memory forgot the key (a restart).
    pub async fn reserve(
        &self,
        mut req: ReserveRequest,
    ) -> Result<Result<Reserved, CheckOutcome>, GuardError> {
        self.refuse_new_while_spooling()?;
        if let Some(c) = &self.inner.cluster {
            req.id = Uuid::now_v7();
            let Answer::Reserved(r) = c.run(Op::Reserve(req)).await? else {
                unreachable!("a reservation is answered with a reservation")
            };
            if let Ok(v) = &*r {
                self.note_would_deny(v);
            }
            return Ok(*r);
        }
        let ticket = self
            .enter_key(&req.subject.tenant, req.idempotency_key.as_ref())
            .await;
        if let Some(answer) = self.reserved_in_store(&req).await? {
            return Ok(Ok(answer));
        }
        req.id = Uuid::now_v7();
        match self.inner.ledger.reserve(&req, self.now())? {
            Err(denied) => Ok(Err(denied)),
            Ok(applied) => {
                // Not durable: the writer takes it back (and frees the key) before this
                // returns, so memory and store agree.
                self.persist(applied.event, ticket).await?;
                self.note_would_deny(&applied.value);
                Ok(Ok(applied.value))
            }
        }
    }

    /// Counts and logs an admission that a limit in shadow would have refused: once per
    /// admitted reservation (a replay carries no would-be denial).
    fn note_would_deny(&self, reserved: &Reserved) {
        let Some(d) = &reserved.would_deny else {
            return;
        };
        let reason = d.code();
        if let Some(i) = WOULD_DENY_REASONS.iter().position(|r| *r == reason) {
            self.inner.would_deny[i].fetch_add(1, Ordering::Relaxed);
        }
        let r = &reserved.reservation;
        let limits = match d {
            spendguard_core::Denial::Limits(l) => l
                .iter()
                .map(|l| {
                    format!(
                        "{} {} {:?}/{}",
                        l.scope.kind().as_str(),
                        l.scope.id(),
                        l.unit,
                        l.window.as_str()
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        };
        tracing::info!(
            reservation = %r.id,
            tenant = r.subject.tenant.as_str(),
            user = r.subject.user.as_str(),
            model = r.subject.model.as_str(),
            reason,
            limits,
            estimate_micros = r.estimate.micros(),
            "would deny (shadow): admitted"
        );
    }

    /// Would-be denials since start, by reason (in the order of [`WOULD_DENY_REASONS`]).
    pub fn would_deny_counts(&self) -> [(&'static str, u64); WOULD_DENY_REASONS.len()] {
        std::array::from_fn(|i| {
            (
                WOULD_DENY_REASONS[i],
                self.inner.would_deny[i].load(Ordering::Relaxed),
            )
        })
    }

    /// Replaces the policy the ledger enforces (a configuration reload): counters,
    /// reservations and run-time overrides are kept, and the next decision uses it. The
    /// time zone cannot change this way (it would miscount the current windows).
    pub fn set_policy(&self, policy: Policy) -> Result<(), GuardError> {
        let current = self.inner.ledger.policy();
        if current.calendar.time_zone_name() != policy.calendar.time_zone_name() {
            return Err(GuardError::TimeZoneChanged {
                stored: current.calendar.time_zone_name().to_owned(),
                configured: policy.calendar.time_zone_name().to_owned(),
            });
        }
        self.inner.ledger.set_policy(policy);
        Ok(())
    }

    /// [`Guard::reserve`] answered as soon as it is decided, before it is durable: the
    /// reservation holds the budget in memory at once, and the writer stores it in order,
    /// before anything sent after it (such as its commit). For a caller whose own answer
    /// waits for the commit to be durable, like the gateway, whose caller sees the provider's
    /// answer only after its usage is stored: the reservation's record matters only if the
    /// process dies mid-call, and then the call's spend is lost with or without it (an
    /// expired reservation is recorded at $0). If the reservation cannot be written at all
    /// (store and spool failing), the writer takes it back and its commit fails.
    /// A keyed request waits for durability, as [`Guard::reserve`] does.
    pub async fn reserve_unacknowledged(
        &self,
        mut req: ReserveRequest,
    ) -> Result<Result<Reserved, CheckOutcome>, GuardError> {
        if req.idempotency_key.is_some() || self.inner.cluster.is_some() {
            return self.reserve(req).await;
        }
        self.refuse_new_while_spooling()?;
        req.id = Uuid::now_v7();
        match self.inner.ledger.reserve(&req, self.now())? {
            Err(denied) => Ok(Err(denied)),
            Ok(applied) => {
                if let Some(event) = applied.event {
                    self.inner
                        .writes
                        .send(Write::Events(vec![event], None, None))
                        .map_err(|_| GuardError::ShuttingDown)?;
                }
                self.note_would_deny(&applied.value);
                Ok(Ok(applied.value))
            }
        }
    }

    /// `on_store_error = "deny"`: no new reservation while the store cannot be written.
    fn refuse_new_while_spooling(&self) -> Result<(), GuardError> {
        if self.health() == StoreHealth::Spooling
            && self.inner.options.on_store_error == OnStoreError::Deny
        {
            return Err(GuardError::Unavailable);
        }
        Ok(())
    }

    /// A keyed reservation that memory does not know but the store may: one made before
    /// this guard started (start-up restores the open ones only). A reservation can be
    /// retried until its key would have been forgotten (its expiry, or the key retention if
    /// longer), and lives at most `max_reservation_ttl`, so the store is asked only during
    /// that long after start-up.
    async fn reserved_in_store(
        &self,
        req: &ReserveRequest,
    ) -> Result<Option<Reserved>, GuardError> {
        let Some(key) = &req.idempotency_key else {
            return Ok(None);
        };
        let ledger = &self.inner.ledger;
        let now = self.now();
        let horizon = ledger
            .policy()
            .max_reservation_ttl_us
            .max(ledger.key_retention());
        if now >= self.inner.started_at.saturating_add(horizon)
            || ledger.knows_key(&req.subject.tenant, key)
        {
            return Ok(None);
        }
        let Some(stored) = self
            .inner
            .store
            .reservation_by_key(&req.subject.tenant, key)
            .await?
        else {
            return Ok(None);
        };
        replay_stored(ledger, req, stored.reservation, now)
    }

    /// Commits a reservation's actual usage. The usage id is assigned here. A retry waits
    /// for the first attempt to be durable and answers exactly what it answered; a commit
    /// after expiry is recorded once, however often it is retried.
    pub async fn commit(&self, id: Uuid, mut req: CommitRequest) -> Result<Committed, GuardError> {
        req.usage_id = Uuid::now_v7();
        if let Some(c) = &self.inner.cluster {
            let Answer::Committed(v) = c.run(Op::Commit(id, req)).await? else {
                unreachable!("a commit is answered with a commit")
            };
            return Ok(v);
        }
        let ticket = self.enter(OpKey::Reservation(id)).await;
        let now = self.now();
        let applied = match self.inner.ledger.commit(&id, &req, now) {
            // Settled longer ago than memory remembers: the store knows.
            Err(LedgerError::NotFound(_)) if self.remember_from_store(id, now).await? => {
                self.inner.ledger.commit(&id, &req, now)?
            }
            r => r?,
        };
        self.persist(applied.event, Some(ticket)).await?;
        Ok(applied.value)
    }

    /// Puts a reservation that memory forgot back among the settled ones, as the store has
    /// it (with the record of a late commit, if one was stored), so that a retry is answered
    /// exactly as the first attempt was. `false` when the store knows no settled
    /// reservation of that id.
    async fn remember_from_store(&self, id: Uuid, now: Micros) -> Result<bool, GuardError> {
        let Some(stored) = self.inner.store.reservation(id).await? else {
            return Ok(false);
        };
        let late = match stored.state {
            ReservationState::Open => return Ok(false),
            ReservationState::Expired => self.inner.store.usage(late_usage_id(&id)).await?,
            ReservationState::Committed | ReservationState::Released => None,
        };
        self.inner
            .ledger
            .remember_settled(stored.reservation, stored.usage, late, now);
        Ok(true)
    }

    /// Releases a reservation whose call never happened.
    pub async fn release(
        &self,
        id: Uuid,
        reason: Option<String>,
    ) -> Result<Settlement, GuardError> {
        if let Some(c) = &self.inner.cluster {
            let Answer::Released(v) = c.run(Op::Release(id, reason)).await? else {
                unreachable!("a release is answered with a release")
            };
            return Ok(v);
        }
        let ticket = self.enter(OpKey::Reservation(id)).await;
        let now = self.now();
        let applied = match self.inner.ledger.release(&id, reason.clone(), now) {
            Err(LedgerError::NotFound(_)) if self.remember_from_store(id, now).await? => {
                self.inner.ledger.release(&id, reason, now)?
            }
            r => r?,
        };
        self.persist(applied.event, Some(ticket)).await?;
        Ok(applied.value)
    }

    /// Records usage of a call that was not reserved. The record id is assigned here.
    pub async fn record(&self, req: RecordRequest) -> Result<UsageRecord, GuardError> {
        Ok(self.record_replayable(req).await?.0)
    }

    /// [`Guard::record`], also saying whether the answer is an earlier record with the same
    /// idempotency key (`true`) rather than a new one. A retry with the same key waits for
    /// the first attempt to be durable.
    pub async fn record_replayable(
        &self,
        req: RecordRequest,
    ) -> Result<(UsageRecord, bool), GuardError> {
        self.record_replayable_at(req, None).await
    }

    /// [`Guard::record_replayable`] of a call made at `at` (backfill; `None`: now). See
    /// [`Ledger::record_at`](spendguard_core::Ledger::record_at).
    pub async fn record_replayable_at(
        &self,
        mut req: RecordRequest,
        at: Option<Micros>,
    ) -> Result<(UsageRecord, bool), GuardError> {
        req.id = Uuid::now_v7();
        if let Some(c) = &self.inner.cluster {
            let Answer::Recorded(u, replayed) = c.run(Op::Record(req, at)).await? else {
                unreachable!("a record is answered with a record")
            };
            return Ok((u, replayed));
        }
        let ticket = self
            .enter_key(&req.subject.tenant, req.idempotency_key.as_ref())
            .await;
        if let Some(key) = &req.idempotency_key
            && !self.inner.ledger.knows_key(&req.subject.tenant, key)
            && let Some(prev) = self
                .inner
                .store
                .usage_by_key(&req.subject.tenant, key)
                .await?
        {
            return replay_record(prev, &req, key).map(|u| (u, true));
        }
        let now = self.now();
        let applied = self.inner.ledger.record_at(&req, at.unwrap_or(now), now)?;
        // The ledger answers a key it remembers with the first record and no event.
        let replayed = applied.event.is_none();
        self.persist(applied.event, ticket).await?;
        Ok((applied.value, replayed))
    }

    /// The tenant of a reservation, from memory or the store. `None` when unknown.
    pub async fn reservation_tenant(&self, id: Uuid) -> Result<Option<TenantId>, GuardError> {
        if let Some(t) = self.inner.ledger.reservation_tenant(&id) {
            return Ok(Some(t));
        }
        Ok(self
            .inner
            .store
            .reservation(id)
            .await?
            .map(|r| r.reservation.subject.tenant))
    }

    /// Cluster mode: brings what this instance shows of a subject's scopes (limits,
    /// checks) up to what the cluster holds now. Nothing on one node.
    pub async fn refresh(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
    ) -> Result<(), GuardError> {
        let Some(c) = &self.inner.cluster else {
            return Ok(());
        };
        let mut scopes = vec![ScopeKey::Global, ScopeKey::Tenant(tenant.clone())];
        if let Some(co) = company {
            scopes.push(ScopeKey::Company(tenant.clone(), co.clone()));
        }
        scopes.push(ScopeKey::User(tenant.clone(), user.clone()));
        c.refresh(&*self.inner.store, &self.inner.ledger, &scopes)
            .await
    }

    /// Cluster mode: brings what this instance shows of the global scope and of every
    /// tenant (metrics) up to what the cluster holds now. Nothing on one node.
    pub async fn refresh_shared(&self) -> Result<(), GuardError> {
        match &self.inner.cluster {
            Some(c) => {
                c.refresh_shared(&*self.inner.store, &self.inner.ledger)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Every instance's allowances of busy scopes (cluster mode; empty otherwise).
    pub async fn cluster_allowances(&self) -> Result<Vec<cluster::AllowanceOut>, GuardError> {
        match &self.inner.cluster {
            Some(c) => Ok(c.allowances(&*self.inner.store).await?),
            None => Ok(Vec::new()),
        }
    }

    /// Cluster mode: this instance's id, options and counters.
    pub fn cluster(&self) -> Option<(&ClusterOptions, ClusterStats)> {
        self.inner.cluster.as_ref().map(|c| (&c.options, c.stats()))
    }

    /// Would this reservation be admitted? Changes nothing.
    pub fn check(&self, req: &ReserveRequest) -> Result<CheckOutcome, GuardError> {
        Ok(self.inner.ledger.check(req, self.now())?)
    }

    /// A user's effective limits and what remains.
    pub fn limits(
        &self,
        tenant: &TenantId,
        user: &UserId,
        company: Option<&CompanyId>,
        tier: Option<&TierName>,
    ) -> Result<Vec<LimitStatus>, GuardError> {
        Ok(self
            .inner
            .ledger
            .limits(tenant, user, company, tier, self.now())?)
    }

    /// Sets a scope's budget override; durable when this returns.
    pub async fn set_budget(
        &self,
        scope: ScopeKey,
        budget: BudgetOverride,
    ) -> Result<(), GuardError> {
        self.update_budget(scope, |_| budget).await.map(|_| ())
    }

    /// Changes a scope's budget override from its current value (`change` gets the current
    /// override, or the empty one); durable when this returns. Updates are serialized, so
    /// two partial updates racing each other both take effect. Returns the new override.
    pub async fn update_budget(
        &self,
        scope: ScopeKey,
        change: impl FnOnce(BudgetOverride) -> BudgetOverride,
    ) -> Result<BudgetOverride, GuardError> {
        let _admin = self.inner.admin.lock().await;
        let ledger = &self.inner.ledger;
        let before = ledger.budget_override(&scope).unwrap_or_default();
        let after = change(before);
        let applied = ledger.set_budget(scope.clone(), after);
        if let Err(e) = self.persist(applied.event, None).await {
            ledger.set_budget(scope, before);
            return Err(e);
        }
        Ok(after)
    }

    /// Sets a user's tier and overrides; durable when this returns.
    pub async fn set_user(
        &self,
        tenant: TenantId,
        user: UserId,
        overrides: UserOverrides,
    ) -> Result<(), GuardError> {
        let _admin = self.inner.admin.lock().await;
        let ledger = &self.inner.ledger;
        let before = ledger.user_overrides(&tenant, &user).unwrap_or_default();
        let applied = ledger.set_user(tenant.clone(), user.clone(), overrides)?;
        if let Err(e) = self.persist(applied.event, None).await {
            // The previous value was valid when it was set; a tier removed since is dropped.
            let _ = ledger.set_user(tenant, user, before);
            return Err(e);
        }
        Ok(())
    }

    /// Sets (or, when empty, clears) a tenant's price overrides; durable when this returns.
    pub async fn set_tenant_prices(
        &self,
        tenant: TenantId,
        prices: spendguard_core::prices::TenantPrices,
    ) -> Result<(), GuardError> {
        let _admin = self.inner.admin.lock().await;
        let ledger = &self.inner.ledger;
        let before = ledger
            .tenant_prices(&tenant)
            .map(|p| (*p).clone())
            .unwrap_or_default();
        let applied = ledger.set_tenant_prices(tenant.clone(), prices)?;
        if let Err(e) = self.persist(applied.event, None).await {
            let _ = ledger.set_tenant_prices(tenant, before);
            return Err(e);
        }
        Ok(())
    }

    /// Stops the sweeper, writes everything queued and stops the writer.
    pub async fn shutdown(&self) {
        if let Some(c) = &self.inner.cluster
            && let Some(pg) = self.inner.store.postgres()
        {
            if let Err(e) = c.give_back_all(&*self.inner.store).await {
                tracing::warn!(
                    error = %e,
                    "could not give back this instance's allowances; the others take them \
                     back when its lease lapses"
                );
            }
            if let Err(e) = pg.cluster_stopped(c.options.id).await {
                tracing::warn!(error = %e, "could not mark this cluster instance stopped");
            }
        }
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = self.inner.writes.send(Write::Close);
        // The first task is the writer, which ends at `Close`; the sweeper is stopped.
        let mut tasks = tasks.into_iter();
        let writer = tasks.next();
        for sweeper in tasks {
            sweeper.abort();
            // Wait until it is gone: it may hold the guard (and so the store) mid-sweep.
            let _ = sweeper.await;
        }
        if let Some(writer) = writer
            && let Err(e) = writer.await
        {
            tracing::error!(error = %e, "the writer failed");
        }
    }
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// The database keeps the time zone its windows are counted in: recorded at the first start,
/// and a start with another one is refused (see [`GuardError::TimeZoneChanged`]).
async fn check_time_zone<S: Store>(store: &S, policy: &Policy) -> Result<(), GuardError> {
    let configured = policy.calendar.time_zone_name();
    match store.setting(settings::TIME_ZONE).await? {
        None => {
            store.put_setting(settings::TIME_ZONE, configured).await?;
            Ok(())
        }
        Some(stored) if stored == configured => Ok(()),
        Some(stored) => Err(GuardError::TimeZoneChanged {
            stored,
            configured: configured.to_owned(),
        }),
    }
}

/// The group-commit writer: one store transaction per batch of queued events.
async fn writer<S: Store>(
    store: Arc<S>,
    ledger: Arc<Ledger>,
    mut spool: Spool,
    mut rx: mpsc::UnboundedReceiver<Write>,
    stats: Arc<Stats>,
    options: GuardOptions,
    watch: Arc<SpendWatch>,
) {
    let _running = Running(stats.clone());
    let mut closing = false;
    let mut retry = tokio::time::interval(options.retry_interval);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !closing {
        let first = tokio::select! {
            w = rx.recv() => w,
            _ = retry.tick(), if !spool.is_empty() => {
                drain_spool(&*store, &mut spool, &stats).await;
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut events = Vec::new();
        // Each caller's events: the range they fill in `events`.
        let mut acks: Vec<(std::ops::Range<usize>, Ack)> = Vec::new();
        let mut tickets = Vec::new();
        let mut take = |w: Write, events: &mut Vec<Event>, acks: &mut Vec<_>| match w {
            Write::Events(e, ack, ticket) => {
                let start = events.len();
                events.extend(e);
                if let Some(ack) = ack {
                    acks.push((start..events.len(), ack));
                }
                tickets.extend(ticket);
                false
            }
            Write::Close => true,
        };
        closing = take(first, &mut events, &mut acks);
        while !closing && events.len() < options.max_batch {
            match rx.try_recv() {
                Ok(w) => closing = take(w, &mut events, &mut acks),
                Err(_) => break,
            }
        }
        if events.is_empty() {
            continue;
        }
        let result = write_batch(&*store, &mut spool, &stats, &events).await;
        match &result {
            // Durable now: the alert engine may look at these scopes.
            Ok(refused) if refused.is_empty() => watch.note(&events),
            // The refused events are not in the store: memory goes back for them too (but
            // an expiry stays: reopening it would only be refused again at the next sweep).
            Ok(refused) => {
                let mut stored = Vec::with_capacity(events.len());
                for (i, event) in events.iter().enumerate() {
                    if !refused.iter().any(|(r, _)| *r == i) {
                        stored.push(event.clone());
                    } else if !matches!(event, Event::Expired { .. }) {
                        ledger.revert(event);
                    }
                }
                watch.note(&stored);
            }
            // Neither in the store nor in the spool: memory goes back to what is durable
            // before anyone is answered, so no answer or retry sees spend that is not there.
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "a batch could not be made durable; undoing it in memory");
                for event in &events {
                    ledger.revert(event);
                }
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        stats
            .last_batch
            .store(events.len() as u64, Ordering::Relaxed);
        for (range, ack) in acks {
            let r = match &result {
                Ok(refused) => match refused.iter().find(|(i, _)| range.contains(i)) {
                    None => Ok(()),
                    Some((_, e)) => Err(GuardError::Rejected(e.to_string())),
                },
                Err(e) => Err(GuardError::Spool(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))),
            };
            let _ = ack.send(r);
        }
        // Retries of these operations may go on now.
        drop(tickets);
    }
    // Last attempt to leave the spool empty at shutdown.
    if !spool.is_empty() {
        drain_spool(&*store, &mut spool, &stats).await;
    }
}

/// Store errors that a retry may cure: the events are kept (spooled) and retried. Any other
/// error means the store will never take the batch as it is.
fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Locked(_))
}

/// Applies `events`, in order; when the store refuses a part for good, splits it in halves
/// until each refused event is alone, and applies all the others. Returns the refused
/// events (index and error), or the first transient error (after which the caller keeps
/// the whole batch: re-applying the part already stored changes nothing).
async fn apply_isolating<S: Store>(
    store: &S,
    events: &[Event],
) -> Result<Vec<Refused>, StoreError> {
    let mut refused = Vec::new();
    // Ranges still to apply, the next on top: halves are pushed right first, so events
    // are applied in their order.
    let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
    todo.push(0..events.len());
    while let Some(range) = todo.pop() {
        match store.apply(&events[range.clone()]).await {
            Ok(()) => {}
            Err(e) if transient(&e) => return Err(e),
            Err(e) if range.len() == 1 => refused.push((range.start, e)),
            Err(_) => {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
    }
    Ok(refused)
}

/// Keeps refused events as dead letters: in the store's `dead_letters` table, or, if the
/// store cannot take even that, in a JSON-lines file beside the spool (synced). Counted in
/// [`WriterStats::dead_letters`] and logged at error.
async fn dead_letter<S: Store>(
    store: &S,
    spool: &Spool,
    stats: &Stats,
    events: &[Event],
    refused: &[Refused],
) -> std::io::Result<()> {
    let now = SystemClock.now();
    let letters: Vec<DeadLetter> = refused
        .iter()
        .map(|(i, e)| {
            let event = serde_json::to_string(&events[*i]).unwrap_or_default();
            DeadLetter {
                id: digest(&event),
                event,
                // PostgreSQL's `text` cannot hold U+0000, wherever it comes from.
                error: e.to_string().replace('\0', "\\u0000"),
                created_at: now,
            }
        })
        .collect();
    for l in &letters {
        tracing::error!(
            error = %l.error,
            dead_letter = %l.id,
            "the store refused an event for good; kept as a dead letter"
        );
    }
    if let Err(e) = store.dead_letter(&letters).await {
        let path = dead_letter_path(spool.path());
        tracing::error!(
            error = %e,
            path = %path.display(),
            "the store cannot keep the dead letters; writing them to a file"
        );
        append_dead_letters(&path, &letters)?;
    }
    stats
        .dead_letters
        .fetch_add(letters.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// The answer to a keyed reservation retried after memory forgot it (a restart, or another
/// cluster instance made it): the stored reservation while its key may still be retried
/// (until it expires, or the key retention if longer), `None` after; a conflict when the
/// retry asks for something else.
pub(crate) fn replay_stored(
    ledger: &Ledger,
    req: &ReserveRequest,
    r: spendguard_core::Reservation,
    now: Micros,
) -> Result<Option<Reserved>, GuardError> {
    let until = r
        .created_at
        .saturating_add(ledger.key_retention())
        .max(r.expires_at);
    if until <= now {
        return Ok(None);
    }
    if r.fingerprint != reserve_fingerprint(req) {
        let key = req.idempotency_key.clone().expect("a keyed request");
        return Err(LedgerError::IdempotencyConflict(key).into());
    }
    let s = &req.subject;
    let limits = ledger.limits(&s.tenant, &s.user, s.company.as_ref(), s.tier.as_ref(), now)?;
    Ok(Some(Reserved {
        reservation: r,
        limits: limits.into(),
        replayed: true,
        would_deny: None,
    }))
}

/// The stored direct record a keyed record retries, if the retry asks for the same usage;
/// a conflict otherwise.
pub(crate) fn replay_record(
    prev: UsageRecord,
    req: &RecordRequest,
    key: &IdempotencyKey,
) -> Result<UsageRecord, GuardError> {
    let same = prev.user == req.subject.user
        && prev.model == req.subject.model
        && prev.tokens == req.tokens
        && prev.status == req.status
        && req.cost.is_none_or(|c| c == prev.cost);
    if !same {
        return Err(LedgerError::IdempotencyConflict(key.clone()).into());
    }
    Ok(prev)
}

/// Where dead letters go when the store cannot keep them: beside the spool.
pub fn dead_letter_path(spool: &std::path::Path) -> PathBuf {
    let mut name = spool.file_name().unwrap_or_default().to_owned();
    name.push(".dead-letters");
    spool.with_file_name(name)
}

fn append_dead_letters(path: &std::path::Path, letters: &[DeadLetter]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut text = String::new();
    for l in letters {
        let line = serde_json::json!({
            "id": l.id,
            "event": serde_json::from_str::<serde_json::Value>(&l.event).unwrap_or_default(),
            "error": l.error,
            "created_at": l.created_at,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// The SHA-256 of `text`, in hex.
fn digest(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes one batch: to the store when the spool is empty (keeping order), else to the spool.
/// Returns the events the store refused for good (dead-lettered; the rest are stored).
/// Spool writes are synchronous file I/O on this task; they happen only during an outage.
async fn write_batch<S: Store>(
    store: &S,
    spool: &mut Spool,
    stats: &Stats,
    events: &[Event],
) -> Result<Vec<Refused>, std::io::Error> {
    if spool.is_empty() {
        match apply_isolating(store, events).await {
            Ok(refused) => {
                let kept = refused.is_empty()
                    || match dead_letter(store, spool, stats, events, &refused).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot keep dead letters; spooling the batch");
                            false
                        }
                    };
                if kept {
                    stats.spool_failing.store(false, Ordering::Relaxed);
                    return Ok(refused);
                }
            }
            Err(e) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, events = events.len(), "store write failed; spooling");
            }
        }
    }
    if let Err(e) = spool.append(events) {
        stats.spool_failures.fetch_add(1, Ordering::Relaxed);
        stats.spool_failing.store(true, Ordering::Relaxed);
        tracing::error!(
            error = %e,
            path = %spool.path().display(),
            events = events.len(),
            "cannot write to the spool; the batch's callers get an error"
        );
        return Err(e);
    }
    stats.spool_failing.store(false, Ordering::Relaxed);
    stats.health.store(1, Ordering::Relaxed);
    stats.spool_depth.store(spool.depth(), Ordering::Relaxed);
    Ok(Vec::new())
}

/// How a replay of the spool ended.
enum Drain {
    /// Every batch reached the store (refused events as dead letters).
    Empty,
    /// The store is still unavailable; the rest of the spool waits.
    StoreDown(StoreError),
    /// The spool (or the dead-letter file) cannot be read or written.
    Failed(std::io::Error),
}

/// Replays the spool into the store, oldest batch first, marking each applied batch; only
/// what was applied is removed. While the store is down only the first pending batch is
/// read and tried, so a long outage does not re-read a large spool at every retry.
async fn drain_spool<S: Store>(store: &S, spool: &mut Spool, stats: &Stats) -> Drain {
    let mut replayed = 0u64;
    let path = spool.path().to_owned();
    let failed = |e: std::io::Error, what: &str| {
        stats.spool_failures.fetch_add(1, Ordering::Relaxed);
        stats.spool_failing.store(true, Ordering::Relaxed);
        tracing::error!(error = %e, path = %path.display(), "{what}");
        Drain::Failed(e)
    };
    loop {
        let (end, events) = match spool.next_pending() {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(e) => return failed(e, "cannot read the spool"),
        };
        match apply_isolating(store, &events).await {
            Ok(refused) => {
                if !refused.is_empty()
                    && let Err(e) = dead_letter(store, spool, stats, &events, &refused).await
                {
                    return failed(e, "cannot keep dead letters from the spool");
                }
            }
            Err(e) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "store still unavailable");
                return Drain::StoreDown(e);
            }
        }
        if let Err(e) = spool.mark_applied(end) {
            return failed(e, "cannot empty the spool");
        }
        replayed += 1;
        stats.spool_depth.store(spool.depth(), Ordering::Relaxed);
    }
    tracing::info!(batches = replayed, "spool replayed; the store is back");
    stats.spool_failing.store(false, Ordering::Relaxed);
    stats.spool_depth.store(0, Ordering::Relaxed);
    stats.health.store(0, Ordering::Relaxed);
    Drain::Empty
}
