//! Cluster mode: any number of instances on one PostgreSQL database, exact across all.
//!
//! The database's counter rows (`scope_counters`) are the truth. Each instance sends its
//! operations to one task, which takes the ones waiting (up to `max_batch`) and decides
//! them in one transaction ([`PostgresStore::cluster_decide`]): the rows of every scope
//! they touch are locked, put into this instance's ledger, the ledger decides (the only
//! place a limit is evaluated, as on one node), and the changed rows and the events are
//! written and committed before anyone is answered. Two instances deciding on the same
//! scope wait for each other's row locks, so together they admit exactly what one ledger
//! would. A transaction that fails takes back in memory what it did; a deadlock or a
//! serialization failure is retried.
//!
//! Beside it, a heartbeat task keeps this instance's row in `cluster_instances` alive and
//! reloads budgets, users and tenant prices when another instance changed them (the
//! `cluster_config` version moved), and a sweeper expires the reservations of every
//! instance whose TTL passed.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use spendguard_core::{
    CheckOutcome, CommitRequest, Committed, Event, Ledger, Micros, RecordRequest, ReserveRequest,
    Reserved, ScopeKey, Settlement, Snapshot, UsageRecord, scope_keys,
};
use spendguard_store::{
    ClusterInstance, ClusterNeeds, ClusterView, ClusterWrite, PostgresStore, ReservationState,
    StoreError,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{Clock, GuardError, SpendWatch};

/// How a guard runs as one instance of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// This instance's id; a restart may keep it (or take a new one).
    pub id: Uuid,
    /// A name for people (`GET /v1/admin/cluster`), such as the host name.
    pub name: String,
    /// Where this instance serves.
    pub address: String,
    /// How often the instance beats its heart and looks for configuration changes; a
    /// change made through another instance is enforced here within this long.
    pub heartbeat: Duration,
    /// The most operations decided in one transaction.
    pub max_batch: usize,
}

impl ClusterOptions {
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> ClusterOptions {
        ClusterOptions {
            id: Uuid::now_v7(),
            name: name.into(),
            address: address.into(),
            heartbeat: Duration::from_secs(1),
            max_batch: 512,
        }
    }
}

/// Counters of cluster mode, for metrics and `GET /v1/admin/cluster`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ClusterStats {
    /// Transactions that decided a batch and committed.
    pub batches: u64,
    /// Operations decided in them.
    pub operations: u64,
    /// Batches retried after a deadlock or a serialization failure.
    pub retries: u64,
    /// Batches whose transaction failed (their callers got an error).
    pub failures: u64,
    /// Times budgets, users and prices were reloaded after another instance changed them.
    pub config_reloads: u64,
    /// The configuration version this instance enforces.
    pub config_version: i64,
    /// The last heartbeat failed.
    pub heartbeat_failing: bool,
}

#[derive(Debug, Default)]
struct Stats {
    batches: AtomicU64,
    operations: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    config_reloads: AtomicU64,
    config_version: AtomicI64,
    heartbeat_failing: AtomicBool,
}

pub(crate) enum Op {
    Reserve(ReserveRequest),
    Commit(Uuid, CommitRequest),
    Release(Uuid, Option<String>),
    Record(RecordRequest, Option<Micros>),
    Expire(Uuid),
    Admin(Event),
}

pub(crate) enum Answer {
    Reserved(Box<Result<Reserved, CheckOutcome>>),
    Committed(Committed),
    Released(Settlement),
    Recorded(UsageRecord, bool),
    Done,
}

type Reply = oneshot::Sender<Result<Answer, GuardError>>;

struct Job {
    op: Op,
    reply: Reply,
}

/// This instance's part of a cluster.
pub(crate) struct Cluster {
    pub(crate) options: ClusterOptions,
    jobs: mpsc::UnboundedSender<Job>,
    stats: Arc<Stats>,
    /// Held while the ledger holds counters put for a decision: nothing else may put
    /// counters into it meanwhile.
    turn: Arc<Mutex<()>>,
}

impl Cluster {
    /// Starts the deciding task and registers the instance. Returns the cluster and the
    /// tasks to stop at shutdown.
    pub(crate) async fn start<S: spendguard_store::Store>(
        store: Arc<S>,
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        watch: Arc<SpendWatch>,
        options: ClusterOptions,
    ) -> Result<(Cluster, Vec<tokio::task::JoinHandle<()>>), GuardError> {
        let pg = store.postgres().ok_or_else(|| {
            GuardError::Store(StoreError::Invalid(
                "cluster mode needs PostgreSQL: SQLite serves one instance only (use a \
                 postgres:// database URL, or mode = \"single\")"
                    .into(),
            ))
        })?;
        let stats = Arc::new(Stats::default());
        let periods = ledger.policy().calendar.periods(clock.now());
        if pg
            .cluster_seed(periods.day.start, periods.month.start)
            .await?
        {
            tracing::info!(
                "counter rows rebuilt from the tables (the database was written by a \
                 single-node instance)"
            );
        }
        let (version, snapshot) = pg.cluster_overrides().await?;
        apply_overrides(&ledger, snapshot);
        stats.config_version.store(version, Ordering::Relaxed);
        pg.cluster_register(&ClusterInstance {
            id: options.id,
            name: options.name.clone(),
            address: options.address.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: 0,
            heartbeat_at: 0,
            stopped_at: None,
        })
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let turn = Arc::new(Mutex::new(()));
        let decider = tokio::spawn(decide_loop(
            store.clone(),
            ledger.clone(),
            clock,
            rx,
            options.max_batch.max(1),
            stats.clone(),
            watch,
            turn.clone(),
        ));
        let beat = tokio::spawn(heartbeat_loop(
            store,
            ledger,
            options.id,
            options.heartbeat,
            stats.clone(),
        ));
        Ok((
            Cluster {
                options,
                jobs: tx,
                stats,
                turn,
            },
            vec![decider, beat],
        ))
    }

    pub(crate) fn stats(&self) -> ClusterStats {
        let s = &self.stats;
        ClusterStats {
            batches: s.batches.load(Ordering::Relaxed),
            operations: s.operations.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            config_reloads: s.config_reloads.load(Ordering::Relaxed),
            config_version: s.config_version.load(Ordering::Relaxed),
            heartbeat_failing: s.heartbeat_failing.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn run(&self, op: Op) -> Result<Answer, GuardError> {
        let rx = self.submit(op)?;
        rx.await.map_err(|_| GuardError::ShuttingDown)?
    }

    /// Queues an operation for the next batch; the answer comes on the receiver.
    fn submit(&self, op: Op) -> Result<oneshot::Receiver<Result<Answer, GuardError>>, GuardError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .map_err(|_| GuardError::ShuttingDown)?;
        Ok(rx)
    }

    /// Puts the committed counters of `scopes` into the ledger, so that what it shows
    /// (limits, checks) is what the cluster holds now rather than what this instance
    /// last decided on. Deciding never depends on it: each decision puts the locked rows.
    pub(crate) async fn refresh<S: spendguard_store::Store>(
        &self,
        store: &S,
        ledger: &Ledger,
        scopes: &[ScopeKey],
    ) -> Result<(), GuardError> {
        let Some(pg) = store.postgres() else {
            return Ok(());
        };
        let rows = pg.cluster_counters(scopes).await?;
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        for (k, c) in rows {
            ledger.put_scope_counters(&k, c);
        }
        Ok(())
    }

    /// Expires the reservations of the whole cluster whose TTL passed (a few thousand at a
    /// time), and forgets what memory keeps past its use.
    pub(crate) async fn sweep<S: spendguard_store::Store>(
        &self,
        store: &S,
        ledger: &Ledger,
        now: Micros,
    ) -> Result<(), GuardError> {
        let Some(pg) = store.postgres() else {
            return Ok(());
        };
        ledger.forget_past(now);
        let due = pg.cluster_due(now, 4096).await?;
        // All queued at once, so that they are decided in a few batches, not one each.
        let waits = due
            .into_iter()
            .map(|id| self.submit(Op::Expire(id)))
            .collect::<Result<Vec<_>, _>>()?;
        for w in waits {
            w.await.map_err(|_| GuardError::ShuttingDown)??;
        }
        Ok(())
    }
}

/// Makes the ledger's overrides the stored ones.
fn apply_overrides(ledger: &Ledger, snapshot: Snapshot) {
    match ledger.replace_overrides(snapshot.budgets, snapshot.users, snapshot.tenant_prices) {
        Ok(r) => {
            for (tenant, user, tier) in r.dropped_tiers {
                tracing::warn!(
                    tenant = %tenant,
                    user = %user,
                    tier = %tier,
                    "a stored user tier is not in the configuration; the user falls back \
                     to the default tier"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "the stored overrides could not all be applied"),
    }
}

async fn heartbeat_loop<S: spendguard_store::Store>(
    store: Arc<S>,
    ledger: Arc<Ledger>,
    id: Uuid,
    every: Duration,
    stats: Arc<Stats>,
) {
    let Some(pg) = store.postgres() else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = async {
            let version = pg.cluster_heartbeat(id).await?;
            if version != stats.config_version.load(Ordering::Relaxed) {
                let (version, snapshot) = pg.cluster_overrides().await?;
                apply_overrides(&ledger, snapshot);
                stats.config_version.store(version, Ordering::Relaxed);
                stats.config_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    version,
                    "reloaded budgets, users and prices changed elsewhere"
                );
            }
            Ok::<(), StoreError>(())
        };
        match beat.await {
            Ok(()) => {
                if stats.heartbeat_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the cluster heartbeat works again");
                }
            }
            Err(e) => {
                if !stats.heartbeat_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the cluster heartbeat failed");
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn decide_loop<S: spendguard_store::Store>(
    store: Arc<S>,
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
    stats: Arc<Stats>,
    watch: Arc<SpendWatch>,
    turn: Arc<Mutex<()>>,
) {
    let Some(pg) = store.postgres() else { return };
    let mut jobs = Vec::new();
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let batch = std::mem::take(&mut jobs);
        let Refused(batch, events, e) =
            decide_batch(pg, &ledger, &*clock, batch, &stats, &watch, &turn).await
        else {
            continue;
        };
        // A value the database cannot hold: each operation is decided alone, so that only
        // the one at fault fails (and is kept for an operator); the others go on.
        if batch.len() == 1 {
            refuse(&*store, batch, &events, &e).await;
            continue;
        }
        for job in batch {
            if let Refused(job, events, e) =
                decide_batch(pg, &ledger, &*clock, vec![job], &stats, &watch, &turn).await
            {
                refuse(&*store, job, &events, &e).await;
            }
        }
    }
}

/// What became of a batch.
enum Decided {
    /// Committed, or failed for a reason every caller was told.
    Answered,
    /// The database refused a value of the batch: nothing was written, nobody answered.
    Refused(Vec<Job>, Vec<Event>, StoreError),
}
use Decided::Refused;

/// Answers the operation the database refused for good, and keeps its events as dead
/// letters for an operator.
async fn refuse<S: spendguard_store::Store>(
    store: &S,
    jobs: Vec<Job>,
    events: &[Event],
    e: &StoreError,
) {
    let now = crate::SystemClock.now();
    let letters: Vec<spendguard_store::DeadLetter> = events
        .iter()
        .map(|ev| {
            let event = serde_json::to_string(ev).unwrap_or_default();
            spendguard_store::DeadLetter {
                id: crate::digest(&event),
                event,
                // PostgreSQL's `text` cannot hold U+0000, wherever it comes from.
                error: e.to_string().replace('\0', "\\u0000"),
                created_at: now,
            }
        })
        .collect();
    tracing::error!(error = %e, "the database refused an operation for good; kept as a dead letter");
    if let Err(err) = store.dead_letter(&letters).await {
        tracing::error!(error = %err, "the dead letter could not be kept");
    }
    for job in jobs {
        let _ = job.reply.send(Err(GuardError::Rejected(e.to_string())));
    }
}

/// Decides a batch in one transaction, retrying it after a deadlock or a serialization
/// failure; returns the batch unanswered when the database refused one of its values.
async fn decide_batch(
    pg: &PostgresStore,
    ledger: &Ledger,
    clock: &dyn Clock,
    jobs: Vec<Job>,
    stats: &Stats,
    watch: &SpendWatch,
    turn: &Mutex<()>,
) -> Decided {
    let mut needs = ClusterNeeds::default();
    for j in &jobs {
        match &j.op {
            Op::Reserve(r) => {
                needs.scopes.extend(scope_keys(&r.subject));
                if let Some(k) = &r.idempotency_key {
                    needs.keys.push((r.subject.tenant.clone(), k.clone()));
                }
            }
            Op::Record(r, _) => {
                needs.scopes.extend(scope_keys(&r.subject));
                if let Some(k) = &r.idempotency_key {
                    needs.keys.push((r.subject.tenant.clone(), k.clone()));
                }
            }
            Op::Commit(id, _) | Op::Release(id, _) | Op::Expire(id) => needs.reservations.push(*id),
            Op::Admin(_) => {}
        }
    }
    needs.scopes.sort_unstable();
    needs.scopes.dedup();
    needs.keys.sort_unstable();
    needs.keys.dedup();
    let mut attempt = 0;
    loop {
        let now = clock.now();
        let mut answers = Vec::with_capacity(jobs.len());
        let (events, done) = pg
            .cluster_decide(&needs, |view| {
                let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
                decide(ledger, &jobs, &needs, view, now, &mut answers)
            })
            .await;
        match done {
            Ok(()) => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .operations
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                watch.note(&events);
                for (job, answer) in jobs.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
                return Decided::Answered;
            }
            Err(e) => {
                for ev in events.iter().rev() {
                    ledger.revert(ev);
                }
                attempt += 1;
                if e.is_conflict() && attempt < 5 {
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if matches!(e, StoreError::Invalid(_)) {
                    return Refused(jobs, events, e);
                }
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, operations = jobs.len(), "a cluster batch failed");
                for job in jobs {
                    let err = match &e {
                        StoreError::Unavailable(_) => GuardError::Unavailable,
                        other => GuardError::Store(other.clone()),
                    };
                    let _ = job.reply.send(Err(err));
                }
                return Decided::Answered;
            }
        }
    }
}

/// Decides a batch on the locked rows in `view` (under the ledger turn).
fn decide(
    ledger: &Ledger,
    jobs: &[Job],
    needs: &ClusterNeeds,
    view: ClusterView,
    now: Micros,
    answers: &mut Vec<Result<Answer, GuardError>>,
) -> ClusterWrite {
    for (k, c) in &view.counters {
        ledger.put_scope_counters(k, *c);
    }
    // The reservations as the database holds them: open ones known without being counted
    // again (their estimates are in the counters), settled ones as settled.
    for id in &needs.reservations {
        match view.reservations.get(id) {
            Some(s) if s.state == ReservationState::Open => {
                ledger.adopt_open(s.reservation.clone())
            }
            Some(s) => {
                ledger.forget_reservation(id);
                ledger.remember_settled(
                    s.reservation.clone(),
                    s.usage.clone(),
                    view.late.get(id).cloned(),
                    now,
                );
            }
            None => ledger.forget_reservation(id),
        }
    }
    let mut events = Vec::new();
    for job in jobs {
        let answer = match &job.op {
            Op::Reserve(req) => reserve(ledger, req, &view, now, &mut events),
            Op::Commit(id, req) => ledger
                .commit(id, req, now)
                .map(|a| {
                    events.extend(a.event);
                    Answer::Committed(a.value)
                })
                .map_err(Into::into),
            Op::Release(id, reason) => ledger
                .release(id, reason.clone(), now)
                .map(|a| {
                    events.extend(a.event);
                    Answer::Released(a.value)
                })
                .map_err(Into::into),
            Op::Record(req, at) => record(ledger, req, *at, &view, now, &mut events),
            Op::Expire(id) => {
                events.extend(ledger.expire_one(id, now));
                Ok(Answer::Done)
            }
            Op::Admin(event) => {
                events.push(event.clone());
                Ok(Answer::Done)
            }
        };
        answers.push(answer);
    }
    ClusterWrite {
        counters: view
            .counters
            .iter()
            .map(|(k, _)| (k.clone(), ledger.scope_counters(k)))
            .collect(),
        events,
    }
}

fn reserve(
    ledger: &Ledger,
    req: &ReserveRequest,
    view: &ClusterView,
    now: Micros,
    events: &mut Vec<Event>,
) -> Result<Answer, GuardError> {
    // Made with this key by another instance (or before a restart): the same answer.
    if let Some(key) = &req.idempotency_key
        && !ledger.knows_key(&req.subject.tenant, key)
        && let Some(stored) = view.by_key.get(&(req.subject.tenant.clone(), key.clone()))
        && let Some(replay) = crate::replay_stored(ledger, req, stored.reservation.clone(), now)?
    {
        return Ok(Answer::Reserved(Box::new(Ok(replay))));
    }
    Ok(Answer::Reserved(Box::new(
        match ledger.reserve(req, now)? {
            Err(denied) => Err(denied),
            Ok(applied) => {
                events.extend(applied.event);
                Ok(applied.value)
            }
        },
    )))
}

fn record(
    ledger: &Ledger,
    req: &RecordRequest,
    at: Option<Micros>,
    view: &ClusterView,
    now: Micros,
    events: &mut Vec<Event>,
) -> Result<Answer, GuardError> {
    if let Some(key) = &req.idempotency_key
        && !ledger.knows_key(&req.subject.tenant, key)
        && let Some(prev) = view
            .usage_by_key
            .get(&(req.subject.tenant.clone(), key.clone()))
    {
        return crate::replay_record(prev.clone(), req, key).map(|u| Answer::Recorded(u, true));
    }
    let applied = ledger.record_at(req, at.unwrap_or(now), now)?;
    let replayed = applied.event.is_none();
    events.extend(applied.event);
    Ok(Answer::Recorded(applied.value, replayed))
}
