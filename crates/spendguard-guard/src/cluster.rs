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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use spendguard_core::{
    CheckOutcome, CommitRequest, Committed, Denial, Event, Held, Ledger, Micros, Money,
    RecordRequest, ReserveRequest, Reserved, ScopeCounters, ScopeKey, Settlement, Snapshot,
    UsageRecord, allowance_after, allowance_view, debts, fold, grant, scope_keys,
};
use spendguard_store::{
    ClusterDecider, ClusterInstance, ClusterNeeds, ClusterView, ClusterWrite, PostgresStore,
    ReservationState, StoreError,
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
    /// Which kinds of scope are decided through allowances (busy scopes shared by many
    /// users); the others on their rows.
    pub allowances: AllowanceScopes,
    /// How long after its last heartbeat an instance's allowances are taken back by the
    /// others (and an instance counts as live).
    pub lease: Duration,
}

/// Which kinds of scope a cluster decides through allowances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllowanceScopes {
    pub global: bool,
    pub tenant: bool,
    pub company: bool,
}

impl Default for AllowanceScopes {
    /// The global scope and tenants: every request of a tenant counts in both.
    fn default() -> AllowanceScopes {
        AllowanceScopes {
            global: true,
            tenant: true,
            company: false,
        }
    }
}

impl AllowanceScopes {
    pub const NONE: AllowanceScopes = AllowanceScopes {
        global: false,
        tenant: false,
        company: false,
    };

    pub fn covers(&self, key: &ScopeKey) -> bool {
        match key {
            ScopeKey::Global => self.global,
            ScopeKey::Tenant(_) => self.tenant,
            ScopeKey::Company(..) => self.company,
            ScopeKey::User(..) => false,
        }
    }
}

impl ClusterOptions {
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> ClusterOptions {
        ClusterOptions {
            id: Uuid::now_v7(),
            name: name.into(),
            address: address.into(),
            heartbeat: Duration::from_secs(1),
            max_batch: 512,
            allowances: AllowanceScopes::default(),
            lease: Duration::from_secs(10),
        }
    }
}

/// One instance's allowance of a busy scope, as `GET /v1/admin/cluster` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AllowanceOut {
    pub instance: Uuid,
    pub scope: ScopeKey,
    /// Capacity moved from the scope's row to the instance, in the current windows.
    pub granted_usd_day: Money,
    pub granted_usd_month: Money,
    /// What the instance can still admit against it (none for a window without a cap).
    pub free_usd_day: Option<Money>,
    pub free_usd_month: Option<Money>,
    /// Reservations it admitted minus those it settled (may be below zero: it settled
    /// some another instance admitted).
    pub open_reservations: i64,
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
    /// Batches that moved capacity from a scope's row to this instance's allowance.
    pub allowance_top_ups: u64,
    /// Times this instance folded its allowances into the rows and gave back what it did
    /// not need (each heartbeat, and at shutdown).
    pub allowance_returns: u64,
    /// Allowances of lapsed instances this instance took back.
    pub allowance_reclaims: u64,
    /// Reservations refused by a budget decided through an allowance: the cluster may have
    /// had the capacity, idle in another live instance's allowance (the bound of false
    /// denials, docs/cluster.md).
    pub allowance_denials: u64,
    /// Of those, refusals while the cluster had the capacity free (idle in another
    /// instance's allowance), as the batch saw it when it locked the row for a top-up.
    pub false_denials: u64,
    /// Live instances, as of the last heartbeat.
    pub live_instances: i64,
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
    allowance_top_ups: AtomicU64,
    allowance_returns: AtomicU64,
    allowance_reclaims: AtomicU64,
    allowance_denials: AtomicU64,
    false_denials: AtomicU64,
    live: AtomicI64,
}

/// How much each busy scope needs, learnt from what this instance admitted.
#[derive(Clone, Debug, Default)]
struct Rates {
    /// Estimates admitted through each allowance since the last heartbeat, and the
    /// largest of them.
    admitted: HashMap<ScopeKey, (Money, Money)>,
    /// What to hold per scope beyond what a batch needs: twice what was admitted in the
    /// last heartbeat period, and the largest estimate admitted then.
    target: HashMap<ScopeKey, (Money, Money)>,
    /// Busy scopes near their budget's edge: what their row has free would not fund an
    /// extra. Every batch that needs capacity of such a scope locks its row and folds the
    /// allowance into it first, so it decides on all that is free (what settlements freed
    /// in the allowance included), until a heartbeat finds room again.
    edge: std::collections::HashSet<ScopeKey>,
}

impl Rates {
    /// Whether a row with `free` left (net of debts) among `live` instances is at the edge
    /// for requests like those seen (the largest estimate admitted in the last period, else
    /// the batch's `need`).
    fn at_edge(&self, k: &ScopeKey, free: Money, live: i64, need: Money) -> bool {
        let largest = self.target.get(k).map_or(need, |t| t.1);
        share(free, 2 * live) < largest
    }

    /// Capacity to take beyond a batch's need, from a row with `free` left among `live`
    /// instances: the target, at most a fair share of what is free, and nothing when that
    /// would not fund one more request (near a budget's edge every instance then takes
    /// only what it needs, so the last dollars go to whoever asks, exactly).
    fn extra(&self, k: &ScopeKey, free: Money, live: i64) -> Money {
        let Some((target, largest)) = self.target.get(k).copied() else {
            return Money::ZERO;
        };
        let x = target.min(share(free, 2 * live));
        if x < largest || x <= Money::ZERO {
            Money::ZERO
        } else {
            x
        }
    }
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
    ctx: Arc<Ctx>,
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
        let ctx = Arc::new(Ctx {
            ledger,
            clock,
            stats: stats.clone(),
            watch,
            turn: Arc::new(Mutex::new(())),
            rates: Mutex::new(Rates::default()),
            id: options.id,
            allowances: options.allowances,
            lease: options.lease,
        });
        let decider = tokio::spawn(decide_loop(
            store.clone(),
            ctx.clone(),
            rx,
            options.max_batch.max(1),
        ));
        let beat = tokio::spawn(heartbeat_loop(store, ctx.clone(), options.heartbeat));
        Ok((
            Cluster {
                options,
                jobs: tx,
                stats,
                ctx,
            },
            vec![decider, beat],
        ))
    }

    /// Folds this instance's allowances into the rows and gives back all their capacity
    /// (a clean shutdown).
    pub(crate) async fn give_back_all<S: spendguard_store::Store>(
        &self,
        store: &S,
    ) -> Result<(), StoreError> {
        match store.postgres() {
            Some(pg) => self.ctx.give_back(pg, true).await,
            None => Ok(()),
        }
    }

    /// Every instance's allowances (`GET /v1/admin/cluster`).
    pub(crate) async fn allowances<S: spendguard_store::Store>(
        &self,
        store: &S,
    ) -> Result<Vec<AllowanceOut>, StoreError> {
        let Some(pg) = store.postgres() else {
            return Ok(Vec::new());
        };
        let (day, month) = self.ctx.windows(self.ctx.clock.now());
        Ok(pg
            .cluster_allowance_list()
            .await?
            .into_iter()
            .map(|(instance, scope, a)| {
                let a = a.at(day, month);
                let caps = self
                    .ctx
                    .ledger
                    .allowance_caps(&scope)
                    .unwrap_or([None, None]);
                let free = a.allowance_free(caps);
                AllowanceOut {
                    instance,
                    scope,
                    granted_usd_day: a.granted[0],
                    granted_usd_month: a.granted[1],
                    free_usd_day: free[0],
                    free_usd_month: free[1],
                    open_reservations: i64::from(a.counters.in_flight as i32),
                }
            })
            .collect())
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
            allowance_top_ups: s.allowance_top_ups.load(Ordering::Relaxed),
            allowance_returns: s.allowance_returns.load(Ordering::Relaxed),
            allowance_reclaims: s.allowance_reclaims.load(Ordering::Relaxed),
            allowance_denials: s.allowance_denials.load(Ordering::Relaxed),
            false_denials: s.false_denials.load(Ordering::Relaxed),
            live_instances: s.live.load(Ordering::Relaxed),
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
        self.put(ledger, pg.cluster_counters(scopes).await?);
        Ok(())
    }

    /// Puts counters read from the database into the ledger, between decisions.
    fn put(&self, ledger: &Ledger, rows: Vec<(ScopeKey, ScopeCounters)>) {
        let _turn = lock(&self.ctx.turn);
        for (k, c) in rows {
            ledger.put_scope_counters(&k, c);
        }
    }

    /// [`Cluster::refresh`] for the global scope and every tenant.
    pub(crate) async fn refresh_shared<S: spendguard_store::Store>(
        &self,
        store: &S,
        ledger: &Ledger,
    ) -> Result<(), GuardError> {
        let Some(pg) = store.postgres() else {
            return Ok(());
        };
        self.put(
            ledger,
            pg.cluster_counters_of_kinds(&["global", "tenant"]).await?,
        );
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

async fn heartbeat_loop<S: spendguard_store::Store>(store: Arc<S>, ctx: Arc<Ctx>, every: Duration) {
    let Some(pg) = store.postgres() else { return };
    let (ledger, stats) = (&ctx.ledger, &ctx.stats);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = async {
            let (version, live) = pg
                .cluster_heartbeat(ctx.id, ctx.lease.as_secs_f64())
                .await?;
            stats.live.store(live, Ordering::Relaxed);
            // What each busy scope needs until the next beat: twice what it took in the
            // last period (nothing, for a scope idle since).
            {
                let mut rates = lock(&ctx.rates);
                let admitted = std::mem::take(&mut rates.admitted);
                rates.target = admitted
                    .into_iter()
                    .map(|(k, (sum, largest))| (k, (sum.saturating_add(sum), largest)))
                    .collect();
            }
            ctx.give_back(pg, false).await?;
            ctx.reclaim(pg).await?;
            if version != stats.config_version.load(Ordering::Relaxed) {
                let (version, snapshot) = pg.cluster_overrides().await?;
                apply_overrides(ledger, snapshot);
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

/// What the deciding task and the heartbeat work with.
pub(crate) struct Ctx {
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    watch: Arc<SpendWatch>,
    /// Held while the ledger holds counters put for a decision: nothing else may put
    /// counters into it meanwhile.
    turn: Arc<Mutex<()>>,
    rates: Mutex<Rates>,
    id: Uuid,
    allowances: AllowanceScopes,
    lease: Duration,
}

impl Ctx {
    /// The current day's and month's starts.
    fn windows(&self, now: Micros) -> (Micros, Micros) {
        let p = self.ledger.policy().calendar.periods(now);
        (p.day.start, p.month.start)
    }

    fn live(&self) -> i64 {
        self.stats.live.load(Ordering::Relaxed).max(1)
    }

    /// Folds this instance's allowances into their rows and, unless `stop`, takes again
    /// what each scope's target says (at most a share of what the row has free); with
    /// `stop` the allowances are deleted.
    async fn give_back(&self, pg: &PostgresStore, stop: bool) -> Result<(), StoreError> {
        let rates = lock(&self.rates).clone();
        let mut roomy = Vec::new();
        let (day, month) = self.windows(self.clock.now());
        let live = self.live();
        let n = pg
            .cluster_fold(self.id, stop, |items, others| {
                fold_back(items, day, month);
                if stop {
                    return;
                }
                for (k, row, a) in items.iter_mut() {
                    let Some(caps) = self.ledger.allowance_caps(k) else {
                        continue;
                    };
                    let free = row.row_free(caps);
                    let amount = std::array::from_fn(|w| {
                        free[w].map_or(Money::ZERO, |f| rates.extra(k, f, live))
                    });
                    let debt = debts(
                        others.iter().filter(|(o, _)| o == k).map(|(_, h)| h),
                        day,
                        month,
                    );
                    grant(row, a, caps, amount, debt);
                    let left = row.row_free(caps);
                    if (0..2).all(|w| {
                        left[w].is_none_or(|l| {
                            !rates.at_edge(k, l.saturating_sub(debt[w]), live, Money::ZERO)
                        })
                    }) {
                        roomy.push(k.clone());
                    }
                }
            })
            .await?;
        if n > 0 {
            self.stats.allowance_returns.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.rates).edge.retain(|k| !roomy.contains(k));
        Ok(())
    }

    /// Takes back the allowances of instances whose lease lapsed (or that stopped).
    async fn reclaim(&self, pg: &PostgresStore) -> Result<(), StoreError> {
        for dead in pg.cluster_lapsed(self.lease.as_secs_f64()).await? {
            if dead == self.id {
                continue;
            }
            let (day, month) = self.windows(self.clock.now());
            let n = pg
                .cluster_fold(dead, true, |items, _| fold_back(items, day, month))
                .await?;
            if n > 0 {
                self.stats
                    .allowance_reclaims
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(instance = %dead, scopes = n, "took back the allowances of a lapsed instance");
            }
        }
        Ok(())
    }
}

/// Folds each allowance into its row, both at the windows starting at `day` and `month`.
fn fold_back(items: &mut [(ScopeKey, Held, Held)], day: Micros, month: Micros) {
    for (_, row, a) in items.iter_mut() {
        *row = row.at(day, month);
        *a = a.at(day, month);
        fold(row, a);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `amount / parts`, in micro-USD.
fn share(amount: Money, parts: i64) -> Money {
    Money::from_micros(amount.micros() / parts.max(1))
}

async fn decide_loop<S: spendguard_store::Store>(
    store: Arc<S>,
    ctx: Arc<Ctx>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    max_batch: usize,
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
        let Refused(batch, events, e) = decide_batch(pg, &ctx, batch).await else {
            continue;
        };
        // A value the database cannot hold: each operation is decided alone, so that only
        // the one at fault fails (and is kept for an operator); the others go on.
        if batch.len() == 1 {
            refuse(&*store, batch, &events, &e).await;
            continue;
        }
        for job in batch {
            if let Refused(job, events, e) = decide_batch(pg, &ctx, vec![job]).await {
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
async fn decide_batch(pg: &PostgresStore, ctx: &Ctx, jobs: Vec<Job>) -> Decided {
    let mut needs = ClusterNeeds {
        instance: Some(ctx.id),
        ..ClusterNeeds::default()
    };
    // What the batch's reservations may hold in each busy scope, to top up for.
    let mut need: HashMap<ScopeKey, Money> = HashMap::new();
    for j in &jobs {
        match &j.op {
            Op::Reserve(r) => {
                let keys = scope_keys(&r.subject);
                let busy = keys.iter().any(|k| ctx.allowances.covers(k));
                if let Some(e) = busy.then(|| ctx.ledger.estimate_of(r)).flatten() {
                    for k in keys.iter().filter(|k| ctx.allowances.covers(k)) {
                        let n = need.entry(k.clone()).or_default();
                        *n = n.saturating_add(e);
                    }
                }
                needs.scopes.extend(keys);
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
        let now = ctx.clock.now();
        let (day, month) = ctx.windows(now);
        let mut batch = Batch {
            ctx,
            jobs: &jobs,
            needs: &needs,
            need: &need,
            now,
            day,
            month,
            answers: Vec::with_capacity(jobs.len()),
        };
        let (events, done) = pg.cluster_decide(&needs, &mut batch).await;
        let answers = batch.answers;
        match done {
            Ok(()) => {
                let stats = &ctx.stats;
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .operations
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                ctx.watch.note(&events);
                for (job, answer) in jobs.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
                return Decided::Answered;
            }
            Err(e) => {
                for ev in events.iter().rev() {
                    ctx.ledger.revert(ev);
                }
                attempt += 1;
                if e.is_conflict() && attempt < 5 {
                    ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if matches!(e, StoreError::Invalid(_)) {
                    return Refused(jobs, events, e);
                }
                ctx.stats.failures.fetch_add(1, Ordering::Relaxed);
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

/// One attempt at deciding a batch, called by the store under the batch's locks.
struct Batch<'a> {
    ctx: &'a Ctx,
    jobs: &'a [Job],
    needs: &'a ClusterNeeds,
    need: &'a HashMap<ScopeKey, Money>,
    now: Micros,
    day: Micros,
    month: Micros,
    answers: Vec<Result<Answer, GuardError>>,
}

impl Batch<'_> {
    fn need(&self, k: &ScopeKey) -> Money {
        self.need.get(k).copied().unwrap_or_default()
    }
}

impl ClusterDecider for Batch<'_> {
    fn through_allowance(&self, scope: &ScopeKey) -> bool {
        self.ctx.allowances.covers(scope) && self.ctx.ledger.allowance_caps(scope).is_some()
    }

    fn top_ups(&mut self, allowances: &[(ScopeKey, Held)]) -> Vec<ScopeKey> {
        let rates = lock(&self.ctx.rates);
        allowances
            .iter()
            .filter(|(k, a)| {
                let Some(caps) = self.ctx.ledger.allowance_caps(k) else {
                    return false;
                };
                if rates.edge.contains(k) && self.need(k) > Money::ZERO {
                    return true;
                }
                let target = rates.target.get(k).map_or(Money::ZERO, |t| t.0);
                let low = self.need(k).saturating_add(share(target, 2));
                a.at(self.day, self.month)
                    .allowance_free(caps)
                    .iter()
                    .flatten()
                    .any(|free| *free < low)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn decide(&mut self, view: ClusterView) -> ClusterWrite {
        let _turn = lock(&self.ctx.turn);
        decide(self, view)
    }
}

/// Decides a batch on the locked rows and allowances in `view` (under the ledger turn).
fn decide(b: &mut Batch<'_>, view: ClusterView) -> ClusterWrite {
    let ledger = &*b.ctx.ledger;
    let now = b.now;
    for (k, c) in &view.counters {
        ledger.put_scope_counters(k, *c);
    }
    // Busy scopes: capacity moved from the rows locked for it, then the ledger decides on
    // each allowance's view (its free capacity is the allowance's).
    let live = b.ctx.live();
    let mut rows = Vec::with_capacity(view.rows.len());
    let mut held: Vec<(ScopeKey, Held, ScopeCounters)> = Vec::with_capacity(view.allowances.len());
    {
        let mut rates = lock(&b.ctx.rates);
        for (k, a) in &view.allowances {
            let caps = ledger.allowance_caps(k).unwrap_or([None, None]);
            let mut a = a.at(b.day, b.month);
            if let Some((_, row)) = view.rows.iter().find(|(r, _)| r == k) {
                let mut row = row.at(b.day, b.month);
                let need = b.need(k);
                if rates.edge.contains(k) {
                    fold(&mut row, &mut a);
                }
                let (free, row_free) = (a.allowance_free(caps), row.row_free(caps));
                // What the batch needs (all the row has, if less), and beyond it what
                // `Rates::extra` says.
                let amount = std::array::from_fn(|w| match (free[w], row_free[w]) {
                    (Some(f), Some(rf)) => {
                        let short = need.saturating_sub(f).max(Money::ZERO);
                        let extra = rates.extra(k, rf.saturating_sub(short), live);
                        short.saturating_add(extra)
                    }
                    _ => Money::ZERO,
                });
                let debt = debts(
                    view.others.iter().filter(|(o, _)| o == k).map(|(_, h)| h),
                    b.day,
                    b.month,
                );
                let moved = grant(&mut row, &mut a, caps, amount, debt);
                if moved.iter().any(|m| *m > Money::ZERO) {
                    b.ctx
                        .stats
                        .allowance_top_ups
                        .fetch_add(1, Ordering::Relaxed);
                }
                let left = row.row_free(caps);
                if (0..2).any(|w| {
                    left[w].is_some_and(|l| rates.at_edge(k, l.saturating_sub(debt[w]), live, need))
                }) {
                    rates.edge.insert(k.clone());
                }
                rows.push((k.clone(), row));
            }
            let v = allowance_view(&a, caps);
            ledger.put_scope_counters(k, v);
            held.push((k.clone(), a, v));
        }
    }
    // The reservations as the database holds them: open ones known without being counted
    // again (their estimates are in the counters), settled ones as settled.
    for id in &b.needs.reservations {
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
    let mut admitted: Vec<(ScopeKey, Money)> = Vec::new();
    let through = |k: &ScopeKey| held.iter().any(|(h, _, _)| h == k);
    for job in b.jobs {
        let answer = match &job.op {
            Op::Reserve(req) => {
                let answer = reserve(ledger, req, &view, now, &mut events);
                if let Ok(Answer::Reserved(r)) = &answer {
                    match &**r {
                        Ok(r) if !r.replayed => {
                            let res = &r.reservation;
                            for k in scope_keys(&res.subject).into_iter().filter(through) {
                                admitted.push((k, res.estimate));
                            }
                        }
                        Err(CheckOutcome {
                            denial: Some(Denial::Limits(l)),
                            ..
                        }) if l.iter().any(|s| through(&s.scope)) => {
                            let stats = &b.ctx.stats;
                            stats.allowance_denials.fetch_add(1, Ordering::Relaxed);
                            let estimate = ledger.estimate_of(req).unwrap_or_default();
                            let false_denial = l.iter().all(|s| {
                                cluster_free(ledger, b, &rows, &view.others, s)
                                    .is_some_and(|f| f >= estimate)
                            });
                            if false_denial {
                                stats.false_denials.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {}
                    }
                }
                answer
            }
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
        b.answers.push(answer);
    }
    if !admitted.is_empty() {
        let mut rates = lock(&b.ctx.rates);
        for (k, e) in admitted {
            let (sum, largest) = rates.admitted.entry(k).or_default();
            *sum = sum.saturating_add(e);
            *largest = (*largest).max(e);
        }
    }
    ClusterWrite {
        counters: view
            .counters
            .iter()
            .map(|(k, _)| (k.clone(), ledger.scope_counters(k)))
            .collect(),
        allowances: held
            .iter()
            .map(|(k, a, v)| (k.clone(), allowance_after(a, v, &ledger.scope_counters(k))))
            .collect(),
        rows,
        events,
    }
}

/// What the cluster had free, as this batch saw it, under the busy limit `s` that refused a
/// reservation: this instance's allowance, the row's free capacity net of the other
/// allowances' debts, and what the other allowances held idle (read when the row was
/// locked for a top-up). `None` for a limit decided on its row, or a row not locked.
fn cluster_free(
    ledger: &Ledger,
    b: &Batch<'_>,
    rows: &[(ScopeKey, Held)],
    others: &[(ScopeKey, Held)],
    s: &spendguard_core::LimitStatus,
) -> Option<Money> {
    let w = match s.window {
        spendguard_core::Window::Day => 0,
        spendguard_core::Window::Month => 1,
        _ => return None,
    };
    let caps = ledger.allowance_caps(&s.scope)?;
    let cap = caps[w]?;
    let row = rows.iter().find(|(k, _)| *k == s.scope)?.1;
    let mine = ledger.scope_counters(&s.scope);
    let mine = if w == 0 { mine.day } else { mine.month };
    let own = cap.saturating_sub(mine.spent).saturating_sub(mine.reserved);
    let theirs = others.iter().filter(|(k, _)| *k == s.scope).map(|(_, h)| h);
    let debt = debts(theirs.clone(), b.day, b.month)[w];
    let idle = theirs.fold(Money::ZERO, |sum, h| {
        let free = h.at(b.day, b.month).allowance_free(caps)[w].unwrap_or_default();
        sum.saturating_add(free.max(Money::ZERO))
    });
    Some(
        row.row_free(caps)[w]?
            .saturating_sub(debt)
            .saturating_add(idle)
            .saturating_add(own.max(Money::ZERO)),
    )
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
