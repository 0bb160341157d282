//! `spendguard-bench`: drives spendguard, the seed design it replaces (the baseline) and an
//! empty handler (the ceiling) with the same HTTP load, and prints throughput, latency,
//! denials and overspend.
//!
//! ```sh
//! # all three side by side, 64 connections, 10 s each, baseline with 0 and 100,000 history rows
//! cargo run --release -p spendguard-bench -- --mode all --connections 64 --duration 10 --history 0,100000
//! # only spendguard, in-process on a temporary SQLite database, 50,000 requests, JSON summary
//! cargo run --release -p spendguard-bench -- --mode spendguard --requests 50000 --json
//! # a running spendguard (the key must be allowed to act on tenants t0..t19, e.g. the admin key)
//! cargo run --release -p spendguard-bench -- --mode spendguard --url http://127.0.0.1:8080 --key "$KEY"
//! # the gateway in front of a mock upstream, against the mock alone: 3 alternated rounds
//! cargo run --release -p spendguard-bench -- --mode gateway --connections 64 --duration 10
//! # the same at a fixed 1,170 calls/s (an open loop) instead of flat out
//! cargo run --release -p spendguard-bench -- --mode gateway --connections 64 --duration 10 --rate 1170
//! # the baseline on PostgreSQL (schema `spendguard_bench_baseline`, its table recreated)
//! cargo run --release -p spendguard-bench -- --mode baseline --database postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! On PostgreSQL, spendguard as separate `spendguard serve` processes (the binary next to the
//! bench's, so build both) and the single-SQL-function limiter:
//!
//! ```sh
//! cargo build --release -p spendguard -p spendguard-bench
//! DB=postgres://postgres@127.0.0.1:5432/test
//! # 3 cluster-mode processes on the fresh database `spendguard_bench_cluster`, connection k
//! # pinned to process k mod 3; --cross settles each reservation on the next process
//! target/release/spendguard-bench --mode spendguard --instances 3 --database $DB
//! # one ordinary (single-mode) process on the same kind of database, for the side by side
//! target/release/spendguard-bench --mode spendguard --instances 1 --server-mode single --database $DB
//! # the function baseline (schema `spendguard_bench_function`, recreated), no HTTP
//! target/release/spendguard-bench --mode function --database $DB
//! # the function, spendguard x 1 and spendguard x 3 side by side, with a global budget
//! target/release/spendguard-bench --mode cluster-compare --instances 3 --database $DB --global-usd-per-day 500
//! ```
//!
//! The exit status is non-zero if spendguard (or the function baseline) overspent any limit
//! read back after the run.

/// mimalloc: the service allocates many small, short-lived objects per request (JSON,
/// HTTP); it spends markedly less time in the allocator than the system's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use spendguard_bench::cluster::{ClusterOptions, ServerMode};
use spendguard_bench::{LoadOptions, Mode, Options};

/// spendguard's load generator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// spendguard, baseline (seed design), ceiling (empty handler), all three side by side,
    /// gateway (the gateway in front of a mock upstream against the mock alone), function
    /// (a single-SQL-function limiter on PostgreSQL, driven directly), or cluster-compare
    /// (the function, spendguard x 1 and spendguard x N processes side by side).
    #[arg(long, value_enum, default_value = "spendguard")]
    mode: Mode,
    /// Drive a running spendguard at this URL instead of an in-process one.
    #[arg(long)]
    url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "SPENDGUARD_BENCH_KEY")]
    key: Option<String>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds per target (default 10 unless --requests is given).
    #[arg(long)]
    duration: Option<f64>,
    /// HTTP requests per target.
    #[arg(long)]
    requests: Option<u64>,
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Tenants the users are spread over.
    #[arg(long, default_value_t = 20)]
    tenants: usize,
    /// Share of admitted reservations released instead of committed.
    #[arg(long, default_value_t = 0.1)]
    release_ratio: f64,
    /// Baseline history sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    history: Vec<u64>,
    /// Database of the baseline: a postgres:// URL (default: temporary SQLite). Its table
    /// `ai_usage` lives in the schema `spendguard_bench_baseline`, dropped and recreated.
    /// Required by --instances (which recreate the database `spendguard_bench_cluster` on
    /// the same server), function (schema `spendguard_bench_function`) and cluster-compare.
    #[arg(long)]
    database: Option<String>,
    /// Run spendguard as this many `spendguard serve` processes on PostgreSQL, connection k
    /// pinned to process k mod N; cluster-compare: the N of "spendguard x N" (default 3).
    #[arg(long)]
    instances: Option<usize>,
    /// The spendguard binary for --instances (default: `spendguard` next to this executable).
    #[arg(long)]
    spendguard_bin: Option<PathBuf>,
    /// How the processes of --instances run: cluster (`--mode cluster`, any number) or single
    /// (the ordinary mode, one process). cluster-compare: the mode of its x 1 run.
    #[arg(long, value_enum, default_value = "cluster")]
    server_mode: ServerMode,
    /// --instances: settle each reservation on the process after the one that made it.
    #[arg(long)]
    cross: bool,
    /// Global daily budget, USD, of the spendguard processes and the function baseline
    /// (default 1,000,000: does not bind).
    #[arg(long)]
    global_usd_per_day: Option<f64>,
    /// --instances in cluster mode: the kinds of scope decided through allowances, as
    /// `[cluster] allowances` takes them, comma-separated (`global,tenant`), or `none`
    /// (every scope on its row). Default: spendguard's (the global scope and tenants).
    #[arg(long)]
    allowances: Option<String>,
    /// Global daily budget of the baseline, USD (default: the cost of connections × 50 calls).
    #[arg(long)]
    baseline_budget: Option<f64>,
    /// Users whose limits are read back after a spendguard run.
    #[arg(long, default_value_t = 200)]
    verify_sample: usize,
    /// Gateway mode: rounds, each running every variant directly and through the gateway.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Gateway mode: send this many calls per second in all, on a fixed schedule (a call
    /// held up by its connection's previous one is timed from its scheduled time); default:
    /// each connection as fast as it is answered.
    #[arg(long)]
    rate: Option<f64>,
    /// Print a machine-readable JSON summary instead of tables.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let duration = match (a.duration, a.requests) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let opts = Options {
        mode: a.mode,
        url: a.url,
        key: a.key,
        load: LoadOptions {
            connections: a.connections,
            duration,
            requests: a.requests,
            users: a.users,
            tenants: a.tenants,
            release_ratio: a.release_ratio,
            progress: !a.quiet && !a.json,
        },
        history: a.history,
        database: a.database,
        baseline_budget_usd: a.baseline_budget,
        verify_sample: a.verify_sample,
        rounds: a.rounds,
        rate: a.rate,
        cluster: ClusterOptions {
            instances: a.instances,
            spendguard_bin: a.spendguard_bin,
            server_mode: a.server_mode,
            cross: a.cross,
            global_usd_per_day: a.global_usd_per_day,
            allowances: a.allowances,
        },
    };
    let summary = match spendguard_bench::run(&opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&summary) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", spendguard_bench::render(&summary));
    }
    if summary.overspent() {
        eprintln!("FAIL: a limit was overspent");
        return ExitCode::FAILURE;
    }
    if summary.gateway.as_ref().is_some_and(|g| g.failed()) {
        eprintln!("FAIL: a gateway call failed or was not charged exactly once");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
