//! spendguard's load generator.
//!
//! Three targets answer the same reserve → commit/release routes over HTTP:
//!
//! - **spendguard**: the real service (in-process on a temporary SQLite database, or a running
//!   one given by URL), checked afterwards for overspend;
//! - **baseline**: the seed design, per reserve four aggregate SQL queries over an `ai_usage`
//!   table then an INSERT (read-then-write, no reservation, no lock), on SQLite or PostgreSQL;
//! - **ceiling**: an empty handler that parses the same body: what the machine allows.
//!
//! [`run`] drives them with N keep-alive connections and returns a [`Summary`].
//!
//! A fourth mode, **gateway** ([`gateway`]), measures what the gateway adds to a model
//! call: chat completions sent to the mock upstream directly and through the gateway.
//!
//! On PostgreSQL, three more:
//!
//! - **spendguard with `--instances N`** ([`cluster`]): N `spendguard serve` processes on one
//!   fresh database (cluster mode, or single mode for one), the load spread over them;
//! - **function** ([`function`]): a single-SQL-function limiter in the style of TensorZero's,
//!   driven directly over one PostgreSQL connection per task, no HTTP;
//! - **cluster-compare**: the function, spendguard × 1 and spendguard × N side by side.

pub mod baseline;
pub mod cluster;
pub mod function;
pub mod gateway;
pub mod load;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spendguard_core::Config;
use spendguard_guard::{Guard, GuardOptions, SystemClock};
use spendguard_server::{AppState, KeyRing};
use spendguard_store::{AnyStore, OpenOptions};
use tokio::sync::oneshot;

pub use load::{LoadOptions, LoadReport, Workload};

/// The model every generated call uses (allowed for every tier).
pub const MODEL: &str = "gpt-4o-mini";
/// Input tokens of every generated call.
pub const INPUT_TOKENS: u64 = 1000;
/// `max_output_tokens` of every generated call.
pub const MAX_OUTPUT_TOKENS: u64 = 500;
/// Price of `MODEL`, USD per million input and output tokens.
pub const PRICE_IN: f64 = 0.15;
pub const PRICE_OUT: f64 = 0.60;

/// The worst-case cost of one generated call, USD.
pub fn estimate_usd() -> f64 {
    (INPUT_TOKENS as f64 * PRICE_IN + MAX_OUTPUT_TOKENS as f64 * PRICE_OUT) / 1e6
}

/// The per-user limits of a tier, shared by the spendguard configuration and the baseline.
#[derive(Clone, Copy, Debug)]
pub struct TierLimits {
    pub name: &'static str,
    pub requests_per_minute: u64,
    pub usd_per_day: f64,
}

/// free: a small daily budget (two calls) so that budget denials happen.
pub const TIERS: [TierLimits; 3] = [
    TierLimits {
        name: "free",
        requests_per_minute: 30,
        usd_per_day: 0.001,
    },
    TierLimits {
        name: "pro",
        requests_per_minute: 60,
        usd_per_day: 20.0,
    },
    TierLimits {
        name: "enterprise",
        requests_per_minute: 600,
        usd_per_day: 500.0,
    },
];

/// The tier of user number `i`: 20% free, 50% pro, 30% enterprise.
pub fn tier_of(i: usize) -> &'static TierLimits {
    match i % 10 {
        0 | 1 => &TIERS[0],
        2..=6 => &TIERS[1],
        _ => &TIERS[2],
    }
}

/// The default global daily budget of spendguard and the function baseline, USD: it never
/// binds in a run.
pub const GLOBAL_USD_PER_DAY: f64 = 1_000_000.0;

/// The spendguard configuration of the in-process server: a global budget that never binds,
/// the tiers of [`TIERS`].
pub fn spendguard_config() -> String {
    spendguard_config_with_global(GLOBAL_USD_PER_DAY)
}

/// [`spendguard_config`] with a global daily budget of `usd_per_day` (the monthly one is
/// 31 times that, at least the default's, so it never binds first).
pub fn spendguard_config_with_global(usd_per_day: f64) -> String {
    let month = (usd_per_day * 31.0).max(GLOBAL_USD_PER_DAY * 10.0);
    let mut s =
        format!("[global]\nusd_per_day = \"{usd_per_day:.6}\"\nusd_per_month = \"{month:.6}\"\n\n");
    s.push_str(
        "[tiers.free]\nrequests_per_minute = 30\nrequests_per_day = 200\ntokens_per_day = 200000\n\
         usd_per_day = \"0.001\"\nusd_per_month = \"5\"\nmax_concurrent = 2\nmax_output_tokens = 2048\n\
         allowed_models = [\"gpt-4o-mini*\"]\n",
    );
    s.push_str("\n[tiers.pro]\nrequests_per_minute = 60\nusd_per_day = \"20\"\n");
    s.push_str("\n[tiers.enterprise]\nrequests_per_minute = 600\nusd_per_day = \"500\"\n");
    s
}

/// Which target(s) to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Spendguard,
    Baseline,
    Ceiling,
    All,
    /// The gateway in front of the mock upstream, against the mock alone.
    Gateway,
    /// The single-SQL-function limiter on PostgreSQL ([`function`]).
    Function,
    /// The function, spendguard × 1 and spendguard × N processes, side by side.
    ClusterCompare,
}

/// Everything [`run`] needs.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// A running spendguard to drive instead of an in-process one.
    pub url: Option<String>,
    /// Its API key (admin, or a tenant key when `tenants` is 1 and `tenant_prefix` matches).
    pub key: Option<String>,
    pub load: LoadOptions,
    /// Baseline history sizes (rows seeded into `ai_usage` before the run).
    pub history: Vec<u64>,
    /// The database of the baseline: `None` for a temporary SQLite file, or a `postgres://`
    /// URL (its table lives in the schema [`baseline::PG_SCHEMA`]). The in-process
    /// spendguard always runs on a temporary SQLite database. Required by the function
    /// baseline (schema [`function::PG_SCHEMA`]) and by spendguard processes
    /// ([`cluster::ClusterOptions::instances`]), which run on the database
    /// [`cluster::PG_DATABASE`] of the same server.
    pub database: Option<String>,
    /// The baseline's global daily budget in USD; `None`: the cost of `connections × 50`
    /// calls, so that it binds early in the run.
    pub baseline_budget_usd: Option<f64>,
    /// How many users' limits to read back after a spendguard run.
    pub verify_sample: usize,
    /// Gateway mode: rounds of direct and gateway runs, alternated.
    pub rounds: usize,
    /// Gateway mode: calls per second in all, on a fixed schedule; `None`: closed loop.
    pub rate: Option<f64>,
    /// spendguard processes on PostgreSQL (`--instances`), and the global budget of them and
    /// of the function baseline.
    pub cluster: cluster::ClusterOptions,
}

/// One measured run of one target.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: String,
    /// Baseline only: rows seeded before the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<u64>,
    pub load: LoadReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spendguard_check: Option<SpendguardCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_overspend: Option<baseline::Overspend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_check: Option<function::FunctionCheck>,
}

impl TargetReport {
    fn new(target: impl Into<String>, load: LoadReport) -> TargetReport {
        TargetReport {
            target: target.into(),
            history: None,
            load,
            spendguard_check: None,
            baseline_overspend: None,
            function_check: None,
        }
    }

    /// Limit entries found over their limit after the run (spendguard or function).
    pub fn overspent(&self) -> usize {
        self.spendguard_check
            .as_ref()
            .map_or(0, |c| c.overspent.len())
            + self
                .function_check
                .as_ref()
                .map_or(0, |c| c.overspent.len())
    }
}

/// The side by side of `cluster-compare`.
#[derive(Debug, Serialize)]
pub struct CompareRatios {
    pub instances: usize,
    pub function_rps: f64,
    pub one_rps: f64,
    pub many_rps: f64,
    /// spendguard × N over spendguard × 1, requests per second.
    pub many_over_one_rps: f64,
    /// spendguard × N over the function, requests per second.
    pub many_over_function_rps: f64,
}

/// The limits read back from spendguard after a run.
#[derive(Debug, Default, Serialize)]
pub struct SpendguardCheck {
    pub users_checked: usize,
    pub entries_checked: usize,
    /// Entries where `used + reserved > limit`.
    pub overspent: Vec<String>,
    /// Global daily spend and limit, USD.
    pub global_used_usd: f64,
    pub global_limit_usd: f64,
    /// Cluster mode: refusals by a budget decided through an allowance, and those of them
    /// the instances counted as false (the capacity was free across the cluster), summed
    /// over the instances (`GET /v1/admin/cluster`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowance_denials: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub false_denials: Option<u64>,
}

/// One row of the side-by-side table.
#[derive(Debug, Serialize)]
pub struct RatioRow {
    pub history: u64,
    pub ceiling_rps: f64,
    pub spendguard_rps: f64,
    pub baseline_rps: f64,
    pub spendguard_over_ceiling_rps: f64,
    pub spendguard_over_ceiling_p99: f64,
    pub spendguard_over_baseline_rps: f64,
    pub ceiling_p99_us: u64,
    pub spendguard_p99_us: u64,
    pub baseline_p99_us: u64,
    pub baseline_spent_over_limit: f64,
}

/// What [`run`] returns.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub mode: Mode,
    pub connections: usize,
    pub duration_s: Option<f64>,
    pub requests_target: Option<u64>,
    pub runs: Vec<TargetReport>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ratios: Vec<RatioRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<gateway::GatewayReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareRatios>,
}

impl Summary {
    /// True when spendguard or the function baseline overspent anywhere.
    pub fn overspent(&self) -> bool {
        self.runs.iter().any(|r| r.overspent() > 0)
    }
}

/// Runs the targets of `opts.mode`.
pub async fn run(opts: &Options) -> anyhow::Result<Summary> {
    let mut runs = Vec::new();
    let mut ratios = Vec::new();
    let mut gateway = None;
    let mut compare = None;
    if opts.cluster.instances.is_some()
        && !matches!(opts.mode, Mode::Spendguard | Mode::ClusterCompare)
    {
        bail!("--instances applies to --mode spendguard and cluster-compare only");
    }
    let history = if opts.history.is_empty() {
        vec![0]
    } else {
        opts.history.clone()
    };
    match opts.mode {
        Mode::Spendguard => match opts.cluster.instances {
            Some(n) => runs
                .push(run_instances(opts, n, opts.cluster.server_mode, opts.cluster.cross).await?),
            None => runs.push(run_spendguard(opts).await?),
        },
        Mode::Function => runs.push(run_function(opts).await?),
        Mode::ClusterCompare => {
            let n = opts.cluster.instances.unwrap_or(3);
            let f = run_function(opts).await?;
            let one = run_instances(opts, 1, opts.cluster.server_mode, false).await?;
            let many =
                run_instances(opts, n, cluster::ServerMode::Cluster, opts.cluster.cross).await?;
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
            compare = Some(CompareRatios {
                instances: n,
                function_rps: f.load.requests_per_s,
                one_rps: one.load.requests_per_s,
                many_rps: many.load.requests_per_s,
                many_over_one_rps: ratio(many.load.requests_per_s, one.load.requests_per_s),
                many_over_function_rps: ratio(many.load.requests_per_s, f.load.requests_per_s),
            });
            runs.extend([f, one, many]);
        }
        Mode::Ceiling => runs.push(run_ceiling(opts).await?),
        Mode::Gateway => {
            if opts.url.is_some() {
                bail!("--mode gateway runs in-process; --url is not supported");
            }
            gateway = Some(gateway::run(&opts.load, opts.rounds, opts.rate).await?);
        }
        Mode::Baseline => {
            for &h in &history {
                runs.push(run_baseline(opts, h).await?);
            }
        }
        Mode::All => {
            let ceiling = run_ceiling(opts).await?;
            let sg = run_spendguard(opts).await?;
            let mut base = Vec::new();
            for &h in &history {
                base.push(run_baseline(opts, h).await?);
            }
            for (b, &h) in base.iter().zip(&history) {
                let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
                ratios.push(RatioRow {
                    history: h,
                    ceiling_rps: ceiling.load.requests_per_s,
                    spendguard_rps: sg.load.requests_per_s,
                    baseline_rps: b.load.requests_per_s,
                    spendguard_over_ceiling_rps: ratio(
                        sg.load.requests_per_s,
                        ceiling.load.requests_per_s,
                    ),
                    spendguard_over_ceiling_p99: ratio(
                        sg.load.latency_us.p99 as f64,
                        ceiling.load.latency_us.p99 as f64,
                    ),
                    spendguard_over_baseline_rps: ratio(
                        sg.load.requests_per_s,
                        b.load.requests_per_s,
                    ),
                    ceiling_p99_us: ceiling.load.latency_us.p99,
                    spendguard_p99_us: sg.load.latency_us.p99,
                    baseline_p99_us: b.load.latency_us.p99,
                    baseline_spent_over_limit: b
                        .baseline_overspend
                        .as_ref()
                        .map_or(0.0, |o| o.global_spent_over_limit),
                });
            }
            runs.push(ceiling);
            runs.push(sg);
            runs.extend(base);
        }
    }
    Ok(Summary {
        mode: opts.mode,
        connections: opts.load.connections,
        duration_s: opts.load.duration.map(|d| d.as_secs_f64()),
        requests_target: opts.load.requests,
        runs,
        ratios,
        gateway,
        compare,
    })
}

/// The global daily budget of the processes and the function, USD.
fn global_usd_per_day(opts: &Options) -> f64 {
    opts.cluster
        .global_usd_per_day
        .unwrap_or(GLOBAL_USD_PER_DAY)
}

fn postgres_url(opts: &Options, what: &str) -> anyhow::Result<String> {
    match opts.database.as_deref() {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(u.to_owned())
        }
        _ => bail!("{what} needs --database postgres://…"),
    }
}

async fn run_function(opts: &Options) -> anyhow::Result<TargetReport> {
    let url = postgres_url(opts, "--mode function")?;
    let (load, check) = function::run(&url, global_usd_per_day(opts), &opts.load).await?;
    let mut report = TargetReport::new("function", load);
    report.function_check = Some(check);
    Ok(report)
}

/// spendguard as `n` processes on a fresh database of the server of `--database`.
async fn run_instances(
    opts: &Options,
    n: usize,
    mode: cluster::ServerMode,
    cross: bool,
) -> anyhow::Result<TargetReport> {
    if opts.url.is_some() {
        bail!("--instances starts its own spendguard processes; --url is not supported");
    }
    let admin_url = postgres_url(opts, "--instances")?;
    let bin = match &opts.cluster.spendguard_bin {
        Some(b) => b.clone(),
        None => cluster::default_spendguard_bin()?,
    };
    let database = cluster::recreate_database(&admin_url).await?;
    let config = format!(
        "{}{}",
        spendguard_config_with_global(global_usd_per_day(opts)),
        cluster::allowances_section(opts.cluster.allowances.as_deref())?
    );
    let instances = cluster::Instances::start(&bin, &database, n, mode, &config).await?;
    let label = match mode {
        cluster::ServerMode::Cluster => format!("spendguard x {n}"),
        cluster::ServerMode::Single => format!("spendguard x {n} single"),
    };
    let load = load::drive_many(
        &instances.urls,
        cross && n > 1,
        &instances.key,
        Workload::Spendguard,
        &opts.load,
        &label,
    )
    .await;
    let check = match &load {
        Ok(_) => Some(verify_instances(&instances.urls, &instances.key, opts).await),
        Err(_) => None,
    };
    instances.stop().await?;
    let mut report = TargetReport::new(label, load?);
    report.spendguard_check = check.transpose()?;
    Ok(report)
}

/// [`verify_spendguard`] on every instance: each reads the shared state back on its own.
async fn verify_instances(
    urls: &[String],
    key: &str,
    opts: &Options,
) -> anyhow::Result<SpendguardCheck> {
    let mut all = SpendguardCheck::default();
    for (i, url) in urls.iter().enumerate() {
        let c = verify_spendguard(url, key, &opts.load, opts.verify_sample).await?;
        all.users_checked += c.users_checked;
        all.entries_checked += c.entries_checked;
        all.overspent.extend(
            c.overspent
                .into_iter()
                .map(|o| format!("instance {i}: {o}")),
        );
        all.global_used_usd = all.global_used_usd.max(c.global_used_usd);
        all.global_limit_usd = c.global_limit_usd;
        let cluster: serde_json::Value = reqwest::Client::new()
            .get(format!("{url}/v1/admin/cluster"))
            .bearer_auth(key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let stats = &cluster["stats"];
        for (sum, name) in [
            (&mut all.allowance_denials, "allowance_denials"),
            (&mut all.false_denials, "false_denials"),
        ] {
            if let Some(n) = stats[name].as_u64() {
                *sum = Some(sum.unwrap_or(0) + n);
            }
        }
    }
    Ok(all)
}

/// A server running on this runtime until [`Served::stop`].
#[derive(Debug)]
pub struct Served {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await??;
        Ok(())
    }
}

/// Serves `router` on a free local port.
pub async fn serve_router(router: Router) -> anyhow::Result<Served> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    Ok(Served {
        url,
        stop: Some(stop),
        task,
    })
}

pub(crate) fn random_key() -> String {
    format!("bench-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

async fn run_spendguard(opts: &Options) -> anyhow::Result<TargetReport> {
    let workload = Workload::Spendguard;
    if let Some(url) = &opts.url {
        let key = opts.key.clone().context("--key is required with --url")?;
        let load = load::drive(url, &key, workload, &opts.load, "spendguard").await?;
        let check = verify_spendguard(url, &key, &opts.load, opts.verify_sample).await?;
        return Ok(TargetReport {
            target: "spendguard".into(),
            history: None,
            load,
            spendguard_check: Some(check),
            baseline_overspend: None,
            function_check: None,
        });
    }
    let dir = tempfile::tempdir()?;
    let policy = Config::from_toml(&spendguard_config())?.validate()?;
    let guard = temporary_guard(&dir, policy).await?;
    let key = random_key();
    let ring = KeyRing::load(guard.store(), Some(&key)).await?;
    let state = AppState::new(guard, ring);
    // As `spendguard serve` runs: the alert engine and the webhook dispatcher too.
    state.alerts.spawn();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(spendguard_server::run(listener, state, async move {
        let _ = rx.await;
    }));
    let served = Served {
        url: url.clone(),
        stop: Some(stop),
        task,
    };
    let load = load::drive(&url, &key, workload, &opts.load, "spendguard").await;
    let check = match &load {
        Ok(_) => Some(verify_spendguard(&url, &key, &opts.load, opts.verify_sample).await),
        Err(_) => None,
    };
    served.stop().await?;
    drop(dir);
    Ok(TargetReport {
        target: "spendguard".into(),
        history: None,
        load: load?,
        spendguard_check: check.transpose()?,
        baseline_overspend: None,
        function_check: None,
    })
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Reads back the limits of a sample of users (and so of their tenants and the global
/// scope) and lists every entry where `used + reserved > limit`.
pub async fn verify_spendguard(
    url: &str,
    key: &str,
    load: &LoadOptions,
    sample: usize,
) -> anyhow::Result<SpendguardCheck> {
    let client = reqwest::Client::new();
    let mut check = SpendguardCheck::default();
    let mut users: Vec<usize> = (0..sample.min(load.users)).collect();
    if load.users > sample {
        users = (0..sample).map(|_| fastrand::usize(..load.users)).collect();
        // Always include a few free-tier users: the ones most likely to hit their budget.
        users.extend((0..load.users.min(50)).filter(|i| tier_of(*i).name == "free"));
    }
    for i in users {
        let (tenant, user, tier) = load.identity(i);
        let resp = client
            .get(format!("{url}/v1/limits"))
            .bearer_auth(key)
            .query(&[("tenant_id", &tenant), ("user_id", &user), ("tier", &tier)])
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != StatusCode::OK {
            bail!("GET /v1/limits answered {status}: {body}");
        }
        check.users_checked += 1;
        for l in body["limits"].as_array().into_iter().flatten() {
            let (Some(limit), Some(used), Some(reserved)) =
                (num(&l["limit"]), num(&l["used"]), num(&l["reserved"]))
            else {
                continue;
            };
            check.entries_checked += 1;
            // Money crosses the wire as f64; allow for its rounding only.
            if used + reserved > limit * (1.0 + 1e-9) + 1e-9 {
                let what = format!(
                    "{} {} {}/{}: used {used} + reserved {reserved} > limit {limit}",
                    l["scope"].as_str().unwrap_or("?"),
                    l["scope_id"].as_str().unwrap_or("?"),
                    l["unit"].as_str().unwrap_or("?"),
                    l["window"].as_str().unwrap_or("?"),
                );
                if !check.overspent.contains(&what) {
                    check.overspent.push(what);
                }
            }
            if l["scope"] == "global" && l["unit"] == "usd" && l["window"] == "day" {
                check.global_used_usd = used;
                check.global_limit_usd = limit;
            }
        }
    }
    Ok(check)
}

/// The reserve body the ceiling parses: the same fields as spendguard's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct CeilingReserve {
    tenant_id: String,
    user_id: String,
    #[serde(default)]
    company_id: Option<String>,
    #[serde(default)]
    tier: Option<String>,
    model: String,
    input_tokens: u64,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    estimated_cost_usd: Option<f64>,
}

/// The commit body the ceiling parses.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
pub struct CeilingCommit {
    input_tokens: u64,
    output_tokens: u64,
}

/// The ceiling: parses the body, answers a small JSON.
pub fn ceiling_router() -> Router {
    Router::new()
        .route(
            "/v1/reservations",
            post(|Json(b): Json<CeilingReserve>| async move {
                (
                    StatusCode::CREATED,
                    Json(json!({ "reservation_id": format!("r-{}", b.input_tokens) })),
                )
            }),
        )
        .route(
            "/v1/reservations/{id}/commit",
            post(|Json(_b): Json<CeilingCommit>| async { Json(json!({ "ok": true })) }),
        )
        .route(
            "/v1/reservations/{id}/release",
            post(|| async { Json(json!({ "ok": true })) }),
        )
}

async fn run_ceiling(opts: &Options) -> anyhow::Result<TargetReport> {
    let served = serve_router(ceiling_router()).await?;
    let load = load::drive(
        &served.url,
        "none",
        Workload::Ceiling,
        &opts.load,
        "ceiling",
    )
    .await;
    served.stop().await?;
    Ok(TargetReport {
        target: "ceiling".into(),
        history: None,
        load: load?,
        spendguard_check: None,
        baseline_overspend: None,
        function_check: None,
    })
}

async fn run_baseline(opts: &Options, history: u64) -> anyhow::Result<TargetReport> {
    let budget = opts
        .baseline_budget_usd
        .unwrap_or(estimate_usd() * opts.load.connections as f64 * 50.0);
    let dir = tempfile::tempdir()?;
    let db =
        baseline::Db::open(opts.database.as_deref(), dir.path(), opts.load.connections).await?;
    let t = std::time::Instant::now();
    db.seed(history, opts.load.users, &opts.load).await?;
    let seeded = t.elapsed();
    if history > 0 {
        eprintln!(
            "baseline: seeded {history} rows in {:.1} s",
            seeded.as_secs_f64()
        );
    }
    let state = baseline::State::new(db, budget, opts.load.users);
    let served = serve_router(baseline::router(state.clone())).await?;
    let label = format!("baseline h={history}");
    let load = load::drive(&served.url, "none", Workload::Baseline, &opts.load, &label).await;
    served.stop().await?;
    let over = state.overspend().await;
    drop(state);
    drop(dir);
    Ok(TargetReport {
        target: "baseline".into(),
        history: Some(history),
        load: load?,
        spendguard_check: None,
        baseline_overspend: Some(over?),
        function_check: None,
    })
}

/// Formats a summary as text tables.
pub fn render(summary: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(g) = &summary.gateway {
        gateway::render(&mut out, g);
    }
    if summary.runs.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}  denials",
        "target", "requests", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "errors"
    );
    for r in &summary.runs {
        let name = match r.history {
            Some(h) => format!("{} h={h}", r.target),
            None => r.target.clone(),
        };
        let l = &r.load;
        let denials: BTreeMap<&str, u64> =
            l.denials.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7}  {:?}",
            name,
            l.requests,
            l.requests_per_s,
            l.latency_us.p50,
            l.latency_us.p90,
            l.latency_us.p99,
            l.latency_us.p999,
            l.errors,
            denials
        );
    }
    for r in &summary.runs {
        if let Some(c) = &r.spendguard_check {
            let _ = writeln!(
                out,
                "{} check: {} users, {} limit entries, {} overspent; global ${:.4} of ${}/day",
                r.target,
                c.users_checked,
                c.entries_checked,
                c.overspent.len(),
                c.global_used_usd,
                c.global_limit_usd
            );
            if let (Some(a), Some(f)) = (c.allowance_denials, c.false_denials) {
                let _ = writeln!(
                    out,
                    "  refused by a budget decided through an allowance: {a}, of which false \
                     (the capacity was free across the cluster): {f}"
                );
            }
            for o in c.overspent.iter().take(20) {
                let _ = writeln!(out, "  OVERSPEND {o}");
            }
        }
        if let Some(c) = &r.function_check {
            let _ = writeln!(
                out,
                "function check: {} counters overspent; global ${:.4} of ${}/day \
                 (requests: sg_reserve and sg_settle calls)",
                c.overspent.len(),
                c.global_spent_usd,
                c.global_limit_usd
            );
            for o in c.overspent.iter().take(20) {
                let _ = writeln!(out, "  OVERSPEND {o}");
            }
        }
        if let Some(o) = &r.baseline_overspend {
            let _ = writeln!(
                out,
                "baseline h={}: global spent ${:.4} of ${:.4}/day limit = {:.3}x; {} of {} users over their daily budget (worst {:.2}x)",
                r.history.unwrap_or(0),
                o.global_spent_usd,
                o.global_limit_usd,
                o.global_spent_over_limit,
                o.users_over_budget,
                o.users_with_spend,
                o.worst_user_over_limit
            );
        }
    }
    if let Some(c) = &summary.compare {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>8} {:>8} {:>9} {:>13} {:>9}",
            "target", "req/s", "p50 µs", "p99 µs", "denials", "false denials", "overspend"
        );
        for r in &summary.runs {
            let false_denials = r
                .spendguard_check
                .as_ref()
                .and_then(|c| c.false_denials)
                .map_or_else(|| "-".to_owned(), |n| n.to_string());
            let _ = writeln!(
                out,
                "{:<24} {:>10.0} {:>8} {:>8} {:>9} {:>13} {:>9}",
                r.target,
                r.load.requests_per_s,
                r.load.latency_us.p50,
                r.load.latency_us.p99,
                r.load.denied(),
                false_denials,
                r.overspent()
            );
        }
        let _ = writeln!(
            out,
            "x{n} over x1: {:.2}   x{n} over function: {:.2}",
            c.many_over_one_rps,
            c.many_over_function_rps,
            n = c.instances
        );
    }
    if !summary.ratios.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>9} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>12}",
            "history",
            "ceil r/s",
            "sg r/s",
            "base r/s",
            "sg/ceil r/s",
            "sg/ceil p99",
            "sg/base r/s",
            "base spent/lim"
        );
        for r in &summary.ratios {
            let _ = writeln!(
                out,
                "{:>9} {:>10.0} {:>10.0} {:>10.0} {:>11.3} {:>11.2} {:>11.2} {:>12.3}",
                r.history,
                r.ceiling_rps,
                r.spendguard_rps,
                r.baseline_rps,
                r.spendguard_over_ceiling_rps,
                r.spendguard_over_ceiling_p99,
                r.spendguard_over_baseline_rps,
                r.baseline_spent_over_limit
            );
        }
    }
    out
}

/// A guard over a new SQLite database (and its spool) in `dir`.
pub(crate) async fn temporary_guard(
    dir: &tempfile::TempDir,
    policy: spendguard_core::Policy,
) -> anyhow::Result<Guard<AnyStore>> {
    let db = dir
        .path()
        .join("spendguard.db")
        .to_str()
        .context("temporary path is not UTF-8")?
        .to_owned();
    let store = AnyStore::open(&db, &OpenOptions::default()).await?;
    Ok(Guard::start(
        store,
        policy,
        GuardOptions::new(dir.path().join("spool")),
        Arc::new(SystemClock),
    )
    .await?)
}
