//! The load generator: N keep-alive connections, each a task looping reserve → commit or
//! release, every HTTP request timed into an HDR histogram.
//!
//! Against several instances of one service ([`drive_many`]), task k is pinned to instance
//! k mod N; with `cross`, it settles each reservation on the next instance instead.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{INPUT_TOKENS, MAX_OUTPUT_TOKENS, MODEL, tier_of};

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Concurrent keep-alive connections, one task each.
    pub connections: usize,
    /// Stop after this long…
    pub duration: Option<Duration>,
    /// …or after this many HTTP requests (whichever comes first).
    pub requests: Option<u64>,
    /// Distinct users, spread over `tenants` tenants and the tiers of [`crate::TIERS`].
    pub users: usize,
    pub tenants: usize,
    /// The share of admitted reservations released instead of committed.
    pub release_ratio: f64,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            connections: 64,
            duration: Some(Duration::from_secs(10)),
            requests: None,
            users: 10_000,
            tenants: 20,
            release_ratio: 0.1,
            progress: true,
        }
    }
}

impl LoadOptions {
    /// The tenant, user and tier of user number `i`.
    pub fn identity(&self, i: usize) -> (String, String, String) {
        (
            format!("t{}", i % self.tenants.max(1)),
            format!("u{i}"),
            tier_of(i).name.to_owned(),
        )
    }
}

/// Which server is driven (they differ only in what a success looks like).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Spendguard,
    Baseline,
    Ceiling,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// What one load run measured.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// HTTP requests completed (reserve, commit and release each count one).
    pub requests: u64,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub latency_us: Latency,
    pub reserves: u64,
    pub admitted: u64,
    pub commits: u64,
    pub releases: u64,
    /// Refused reservations by error code (`budget_exceeded`, `rate_limited`, …).
    pub denials: BTreeMap<String, u64>,
    /// Transport failures and unexpected statuses.
    pub errors: u64,
    /// Unexpected answers, by status (at most a few examples are kept).
    pub error_examples: Vec<String>,
}

/// What one load task measured.
pub(crate) struct Worker {
    pub(crate) hist: Histogram<u64>,
    pub(crate) report: LoadReport,
}

impl Worker {
    pub(crate) fn new() -> Worker {
        Worker {
            hist: histogram(),
            report: LoadReport::default(),
        }
    }

    pub(crate) fn error(&mut self, what: String) {
        self.report.errors += 1;
        if self.report.error_examples.len() < 3 {
            self.report.error_examples.push(what);
        }
    }

    /// Counts a request sent at `t` (answered now) and ticks the progress count.
    pub(crate) fn record(&mut self, t: Instant, done: &AtomicU64) {
        self.hist
            .saturating_record((t.elapsed().as_micros() as u64).max(1));
        self.report.requests += 1;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits for the load tasks started at `start`, stops the run's limit and its progress
/// bar, and sums what the tasks measured.
pub(crate) async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Worker>>,
    start: Instant,
    limit: &RunLimit,
    bar: Option<(ProgressBar, tokio::task::JoinHandle<()>)>,
) -> anyhow::Result<LoadReport> {
    let mut hist = histogram();
    let mut report = LoadReport::default();
    for t in tasks {
        let w = t.await?;
        hist.add(&w.hist)?;
        report.merge(w.report);
    }
    let elapsed = start.elapsed().as_secs_f64();
    limit.stopped.store(true, Ordering::Relaxed);
    if let Some((bar, ticker)) = bar {
        let _ = ticker.await;
        bar.finish_and_clear();
    }
    report.finish(elapsed, &hist);
    Ok(report)
}

struct Shared {
    urls: Vec<String>,
    cross: bool,
    key: String,
    opts: LoadOptions,
    limit: Arc<RunLimit>,
    done: Arc<AtomicU64>,
}

/// When a run ends: at a time, after a number of requests, or when told to stop.
#[derive(Debug)]
pub(crate) struct RunLimit {
    pub stop_at: Option<Instant>,
    requests: Option<u64>,
    pub issued: AtomicU64,
    pub stopped: AtomicBool,
}

impl RunLimit {
    pub fn new(start: Instant, opts: &LoadOptions) -> RunLimit {
        RunLimit {
            stop_at: opts.duration.map(|d| start + d),
            requests: opts.requests,
            issued: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        }
    }

    /// Takes one request from the budget; false when the run is over.
    pub fn take(&self) -> bool {
        if self.stopped.load(Ordering::Relaxed) {
            return false;
        }
        if self.stop_at.is_some_and(|t| Instant::now() >= t) {
            self.stopped.store(true, Ordering::Relaxed);
            return false;
        }
        if let Some(n) = self.requests
            && self.issued.fetch_add(1, Ordering::Relaxed) >= n
        {
            self.stopped.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Sends one request, records its latency; the status and body, or `None` on failure.
async fn send(
    w: &mut Worker,
    s: &Shared,
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
) -> Option<(StatusCode, Value)> {
    let t = Instant::now();
    let result = async {
        let resp = client
            .post(format!("{base}{path}"))
            .bearer_auth(&s.key)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, bytes))
    }
    .await;
    w.record(t, &s.done);
    match result {
        Ok((status, bytes)) => Some((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )),
        Err(e) => {
            w.error(format!("{path}: {e}"));
            None
        }
    }
}

/// An empty histogram of latencies in microseconds, up to a minute.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn worker(s: Arc<Shared>, k: usize) -> Worker {
    let mut w = Worker {
        hist: histogram(),
        report: LoadReport::default(),
    };
    let n = s.urls.len();
    let reserve_url = s.urls[k % n].clone();
    let settle_url = s.urls[(k + usize::from(s.cross)) % n].clone();
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(300))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            w.error(format!("client: {e}"));
            return w;
        }
    };
    while s.limit.take() {
        let i = fastrand::usize(..s.opts.users.max(1));
        let (tenant, user, tier) = s.opts.identity(i);
        let body = json!({
            "tenant_id": tenant,
            "user_id": user,
            "tier": tier,
            "model": MODEL,
            "input_tokens": INPUT_TOKENS,
            "max_output_tokens": MAX_OUTPUT_TOKENS,
        });
        w.report.reserves += 1;
        let Some((status, v)) =
            send(&mut w, &s, &client, &reserve_url, "/v1/reservations", &body).await
        else {
            continue;
        };
        match status {
            StatusCode::CREATED => {}
            StatusCode::TOO_MANY_REQUESTS | StatusCode::FORBIDDEN => {
                let code = v["error"]["code"].as_str().unwrap_or("unknown").to_owned();
                *w.report.denials.entry(code).or_default() += 1;
                continue;
            }
            other => {
                w.error(format!("reserve: {other} {v}"));
                continue;
            }
        }
        w.report.admitted += 1;
        let Some(id) = v["reservation_id"].as_str().map(str::to_owned) else {
            w.error(format!("reserve: no reservation_id in {v}"));
            continue;
        };
        // The settlement of an admitted reservation always happens, even past the end, so
        // that nothing is left reserved.
        s.limit.issued.fetch_add(1, Ordering::Relaxed);
        if fastrand::f64() < s.opts.release_ratio {
            w.report.releases += 1;
            let path = format!("/v1/reservations/{id}/release");
            if let Some((st, v)) = send(&mut w, &s, &client, &settle_url, &path, &json!({})).await
                && st != StatusCode::OK
            {
                w.error(format!("release: {st} {v}"));
            }
        } else {
            w.report.commits += 1;
            let body = json!({
                "input_tokens": INPUT_TOKENS,
                "output_tokens": fastrand::u64(1..=MAX_OUTPUT_TOKENS),
            });
            let path = format!("/v1/reservations/{id}/commit");
            if let Some((st, v)) = send(&mut w, &s, &client, &settle_url, &path, &body).await
                && st != StatusCode::OK
            {
                w.error(format!("commit: {st} {v}"));
            }
        }
    }
    w
}

/// A progress bar on stderr ticking until `limit` stops, fed by `done`; `None` when
/// progress is off or stderr is not a terminal.
pub(crate) fn progress(
    opts: &LoadOptions,
    limit: Arc<RunLimit>,
    done: Arc<AtomicU64>,
    start: Instant,
    label: &str,
) -> Option<(ProgressBar, tokio::task::JoinHandle<()>)> {
    let bar = progress_bar(opts, &limit, label)?;
    let b = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let n = done.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            if limit.stop_at.is_some() {
                b.set_position(start.elapsed().as_millis() as u64);
            } else {
                b.set_position(n);
            }
            b.set_message(format!("{n} requests, {:.0} req/s", n as f64 / secs));
            if limit.stopped.load(Ordering::Relaxed) {
                break;
            }
        }
    });
    Some((bar, ticker))
}

fn progress_bar(opts: &LoadOptions, limit: &RunLimit, label: &str) -> Option<ProgressBar> {
    if !opts.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let (len, template) = match (limit.stop_at, opts.requests) {
        (Some(_), _) => (
            opts.duration.unwrap_or_default().as_millis() as u64,
            "{prefix:>18} [{bar:40}] {elapsed_precise} {msg}",
        ),
        (None, Some(n)) => (n, "{prefix:>18} [{bar:40}] {pos}/{len} {msg}"),
        (None, None) => (0, "{prefix:>18} {msg}"),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_owned());
    Some(bar)
}

/// Drives the server at `url` and returns what was measured.
pub async fn drive(
    url: &str,
    key: &str,
    workload: Workload,
    opts: &LoadOptions,
    label: &str,
) -> anyhow::Result<LoadReport> {
    drive_many(&[url.to_owned()], false, key, workload, opts, label).await
}

/// Drives several instances of one service: connection k goes to `urls[k % N]` and, with
/// `cross`, settles its reservations on `urls[(k + 1) % N]`. One report for all.
pub async fn drive_many(
    urls: &[String],
    cross: bool,
    key: &str,
    _workload: Workload,
    opts: &LoadOptions,
    label: &str,
) -> anyhow::Result<LoadReport> {
    if opts.duration.is_none() && opts.requests.is_none() {
        anyhow::bail!("give a duration or a request count");
    }
    if urls.is_empty() {
        anyhow::bail!("no URL to drive");
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        urls: urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect(),
        cross,
        key: key.to_owned(),
        opts: opts.clone(),
        limit: Arc::new(RunLimit::new(start, opts)),
        done: Arc::new(AtomicU64::new(0)),
    });
    let bar = progress(
        opts,
        shared.limit.clone(),
        shared.done.clone(),
        start,
        label,
    );
    let tasks: Vec<_> = (0..opts.connections.max(1))
        .map(|k| tokio::spawn(worker(shared.clone(), k)))
        .collect();
    gather(tasks, start, &shared.limit, bar).await
}

impl LoadReport {
    /// Adds one task's counts to the run's.
    pub(crate) fn merge(&mut self, r: LoadReport) {
        self.requests += r.requests;
        self.reserves += r.reserves;
        self.admitted += r.admitted;
        self.commits += r.commits;
        self.releases += r.releases;
        self.errors += r.errors;
        for (k, v) in r.denials {
            *self.denials.entry(k).or_default() += v;
        }
        for e in r.error_examples {
            if self.error_examples.len() < 5 {
                self.error_examples.push(e);
            }
        }
    }

    /// Sets the rate and the percentiles once every task has been merged.
    pub(crate) fn finish(&mut self, elapsed_s: f64, hist: &Histogram<u64>) {
        self.elapsed_s = elapsed_s;
        self.requests_per_s = self.requests as f64 / elapsed_s.max(1e-9);
        self.latency_us = Latency {
            p50: hist.value_at_quantile(0.50),
            p90: hist.value_at_quantile(0.90),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: hist.mean(),
        };
    }

    /// Refused reservations, all reasons.
    pub fn denied(&self) -> u64 {
        self.denials.values().sum()
    }
}
