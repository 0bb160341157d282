//! `--mode gateway`: what the gateway adds to a model call.
//!
//! The mock upstream (`spendguard_gateway::mock`) serves on its own port, and an in-process
//! spendguard with the gateway mounted (temporary SQLite database, durable answers) in front
//! of it. The same load — N keep-alive connections, each a task sending one chat completion
//! after another for random users — is sent directly to the mock and through the gateway, in
//! alternating runs of the same session, for whole answers and for streamed ones (time to
//! first byte measured too). What the gateway adds is the difference of each pair of adjacent
//! runs; the medians over the rounds are reported.
//!
//! By default each connection sends its next call as soon as the last one is answered (a
//! closed loop: the gateway runs flat out, and at saturation its latency is mostly
//! queueing). With a rate, calls are sent on a fixed schedule spread over the connections
//! (an open loop); a call that has to wait for its connection's previous one counts from its
//! scheduled time, so a stall is not hidden by the calls it delayed.
//!
//! After the runs every call through the gateway must have been charged: the usage report's
//! request count is compared with the calls it answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};
use spendguard_core::Config;
use spendguard_gateway::Gateway;
use spendguard_gateway::mock::{MockUpstream, PROVIDER_KEY};
use spendguard_server::{AppState, KeyRing};
use tokio::sync::oneshot;

use crate::load::{Latency, LoadOptions, RunLimit};

/// The mock's model every call asks for: a normal answer with usage.
pub const GATEWAY_MODEL: &str = "gpt-4o-mock";
/// `max_tokens` of every call (the gateway reserves it).
pub const GATEWAY_MAX_TOKENS: u64 = 1000;

/// The in-process server's configuration: no budget binds (what is measured is the
/// gateway's work, not refusals), the mock's model priced, one OpenAI upstream.
pub fn gateway_config(mock: &MockUpstream) -> String {
    format!(
        r#"default_tier = "bench"
[global]
usd_per_day = "unlimited"
usd_per_month = "unlimited"
[tenant]
max_share_of_global = "unlimited"
max_tracked_subjects = "unlimited"
[tiers.bench]
max_output_tokens = 4096
allowed_models = ["*"]
[prices."{GATEWAY_MODEL}"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[gateway]
[[gateway.upstreams]]
name = "mock"
kind = "openai"
base_url = "{base}"
api_key_env = "BENCH_MOCK_KEY"
models = ["gpt-*"]
"#,
        base = mock.openai_base()
    )
}

/// Whole answers or streamed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Chat,
    Stream,
}

impl Variant {
    fn as_str(self) -> &'static str {
        match self {
            Variant::Chat => "chat",
            Variant::Stream => "chat stream",
        }
    }
}

/// Straight to the mock, or through the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    Direct,
    Gateway,
}

/// One run of one variant on one path.
#[derive(Debug, Serialize)]
pub struct CallRun {
    pub round: usize,
    pub variant: Variant,
    pub path: Path,
    pub requests: u64,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    /// Request sent to the last byte of the answer.
    pub latency_us: Latency,
    /// Streams: request sent to the first byte of the answer's body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_us: Option<Latency>,
    /// Transport failures, statuses other than 200, answers cut short.
    pub errors: u64,
    pub error_examples: Vec<String>,
}

/// What the gateway added to one variant: medians over the rounds of each adjacent pair's
/// difference (gateway minus direct), in microseconds, and of their throughput ratio.
#[derive(Debug, Serialize)]
pub struct Overhead {
    pub variant: Variant,
    pub rounds: usize,
    pub direct_p50_us: u64,
    pub direct_p99_us: u64,
    pub gateway_p50_us: u64,
    pub gateway_p99_us: u64,
    pub added_p50_us: i64,
    pub added_p99_us: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_ttfb_p50_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_ttfb_p99_us: Option<i64>,
    pub direct_requests_per_s: f64,
    pub gateway_requests_per_s: f64,
    /// Gateway throughput over direct throughput.
    pub throughput_ratio: f64,
}

/// What `--mode gateway` measured.
#[derive(Debug, Serialize)]
pub struct GatewayReport {
    /// Open loop: the calls per second sent; `None`: a closed loop.
    pub rate: Option<f64>,
    pub runs: Vec<CallRun>,
    pub overhead: Vec<Overhead>,
    /// Calls answered 200 through the gateway (the warm-up's included), and calls its usage
    /// report counts.
    pub gateway_calls: u64,
    pub charged_calls: u64,
    /// Calls the mock answered (direct and through the gateway).
    pub mock_calls: u64,
}

impl GatewayReport {
    /// True when a gateway call went uncharged (or was charged twice), or a call failed.
    pub fn failed(&self) -> bool {
        self.gateway_calls != self.charged_calls || self.runs.iter().any(|r| r.errors > 0)
    }
}

/// The in-process spendguard with the gateway in front of `mock`.
struct Server {
    url: String,
    admin: String,
    key: String,
    gateway: Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start_server(mock: &MockUpstream) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let config = Config::from_toml(&gateway_config(mock))?;
    let guard = crate::temporary_guard(&dir, config.validate()?).await?;
    let admin = crate::random_key();
    let ring = KeyRing::load(guard.store(), Some(&admin)).await?;
    let tenant = spendguard_core::TenantId::parse("bench").map_err(anyhow::Error::msg)?;
    let now = guard.now();
    let (key, _) = spendguard_server::auth::create_key(guard.store(), &ring, Some(tenant), now)
        .await
        .map_err(|e| anyhow::anyhow!("creating the tenant key: {e}"))?;
    let state = AppState::new(guard, ring);
    // As `spendguard serve` runs: the alert engine too.
    state.alerts.spawn();
    let gateway = Gateway::with_env(state.clone(), &config.gateway, &|name| {
        (name == "BENCH_MOCK_KEY").then(|| PROVIDER_KEY.to_owned())
    })
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, rx) = oneshot::channel::<()>();
    let settle = {
        let g = gateway.clone();
        async move { g.idle().await }
    };
    let task = tokio::spawn(spendguard_server::run_with(
        listener,
        state,
        Some(gateway.router()),
        async move {
            let _ = rx.await;
        },
        settle,
    ));
    Ok(Server {
        url,
        admin,
        key,
        gateway,
        stop: Some(stop),
        task,
        _dir: dir,
    })
}

impl Server {
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await??;
        Ok(())
    }

    /// Calls the usage report counts, today and the 30 days before.
    async fn charged_calls(&self) -> anyhow::Result<u64> {
        self.gateway.idle().await;
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/reports/usage", self.url))
            .bearer_auth(&self.admin)
            .query(&[("group_by", "tenant")])
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if status != StatusCode::OK {
            anyhow::bail!("GET /v1/reports/usage answered {status}: {body}");
        }
        body["totals"]["requests"]
            .as_u64()
            .with_context(|| format!("no request count in {body}"))
    }
}

/// Where one run sends its calls.
struct Target {
    url: String,
    key: String,
}

impl Target {
    fn of(path: Path, mock: &MockUpstream, server: &Server) -> Target {
        match path {
            Path::Direct => Target {
                url: mock.openai_base(),
                key: PROVIDER_KEY.to_owned(),
            },
            Path::Gateway => Target {
                url: format!("{}/openai/v1", server.url),
                key: server.key.clone(),
            },
        }
    }
}

struct Shared {
    target: Target,
    /// Open loop: the time between two calls of one connection.
    interval: Option<Duration>,
    start: Instant,
    body: Vec<u8>,
    stream: bool,
    opts: LoadOptions,
    limit: RunLimit,
}

struct Worker {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    requests: u64,
    errors: u64,
    error_examples: Vec<String>,
}

impl Worker {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_examples.len() < 3 {
            self.error_examples.push(what);
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn percentiles(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}

/// One call: its status checked, its body read to the end (a stream must end with
/// `[DONE]`); the time to its first body byte and to its last.
async fn call(
    s: &Shared,
    client: &reqwest::Client,
    user: &str,
    t: Instant,
) -> Result<(Duration, Duration), String> {
    let mut resp = client
        .post(format!("{}/chat/completions", s.target.url))
        .bearer_auth(&s.target.key)
        .header("content-type", "application/json")
        .header("x-spendguard-user", user)
        .body(s.body.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        first.get_or_insert_with(|| t.elapsed());
        // Only the end is checked: keep the last few bytes.
        tail.extend_from_slice(&chunk);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    let total = t.elapsed();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&tail)));
    }
    if s.stream && !tail.ends_with(b"data: [DONE]\n\n") {
        return Err(format!(
            "a stream ended without [DONE]: …{}",
            String::from_utf8_lossy(&tail)
        ));
    }
    Ok((first.unwrap_or(total), total))
}

async fn worker(s: Arc<Shared>, index: usize) -> Worker {
    let mut w = Worker {
        latency: histogram(),
        ttfb: histogram(),
        requests: 0,
        errors: 0,
        error_examples: Vec::new(),
    };
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
    // Open loop: connection `index` of N sends at start + (index / N + k) × interval.
    let mut next = s
        .interval
        .map(|i| s.start + i.mul_f64(index as f64 / s.opts.connections.max(1) as f64));
    // When the last call of this connection was answered.
    let mut free_at = s.start;
    while s.limit.take() {
        let user = format!("u{}", fastrand::usize(..s.opts.users.max(1)));
        let t = match (next, s.interval) {
            (Some(at), Some(interval)) => {
                tokio::time::sleep_until(at.into()).await;
                next = Some(at + interval);
                // Late because the last call was still running: the wait counts. Late only
                // because the timer wakes on whole milliseconds: it does not.
                if free_at > at { at } else { Instant::now() }
            }
            _ => Instant::now(),
        };
        w.requests += 1;
        let answered = call(&s, &client, &user, t).await;
        free_at = Instant::now();
        match answered {
            Ok((first, total)) => {
                w.ttfb.saturating_record((first.as_micros() as u64).max(1));
                w.latency
                    .saturating_record((total.as_micros() as u64).max(1));
            }
            Err(e) => w.error(e),
        }
    }
    w
}

/// Sends the load of `opts` to `target` and measures it.
async fn drive(
    target: Target,
    variant: Variant,
    opts: &LoadOptions,
    rate: Option<f64>,
) -> anyhow::Result<(u64, f64, Histogram<u64>, Histogram<u64>, u64, Vec<String>)> {
    if opts.duration.is_none() && opts.requests.is_none() {
        anyhow::bail!("give a duration or a request count");
    }
    let stream = variant == Variant::Stream;
    let mut body = json!({
        "model": GATEWAY_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "What does a budget guard for model calls do?"}
        ],
        "max_tokens": GATEWAY_MAX_TOKENS,
    });
    if stream {
        body["stream"] = json!(true);
    }
    let start = Instant::now();
    let interval = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(opts.connections.max(1) as f64 / r));
    let shared = Arc::new(Shared {
        target,
        interval,
        start,
        body: serde_json::to_vec(&body)?,
        stream,
        opts: opts.clone(),
        limit: RunLimit::new(start, opts),
    });
    let tasks: Vec<_> = (0..opts.connections.max(1))
        .map(|i| tokio::spawn(worker(shared.clone(), i)))
        .collect();
    let (mut latency, mut ttfb) = (histogram(), histogram());
    let (mut requests, mut errors, mut examples) = (0, 0, Vec::new());
    for t in tasks {
        let w = t.await?;
        latency.add(&w.latency)?;
        ttfb.add(&w.ttfb)?;
        requests += w.requests;
        errors += w.errors;
        for e in w.error_examples {
            if examples.len() < 5 {
                examples.push(e);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((requests, elapsed, latency, ttfb, errors, examples))
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Runs `rounds` rounds; in each, every variant directly and through the gateway (which
/// goes first alternates from round to round). `rate`: calls per second in all, on a fixed
/// schedule; `None`: each connection as fast as it is answered.
pub async fn run(
    load: &LoadOptions,
    rounds: usize,
    rate: Option<f64>,
) -> anyhow::Result<GatewayReport> {
    let rounds = rounds.max(1);
    let mock = MockUpstream::start().await;
    let server = start_server(&mock).await?;
    // Warm-up, not measured: connections opened, the tokenizer's tables loaded (about a
    // second), the store's first pages in memory.
    let warmup = LoadOptions {
        duration: None,
        requests: Some(load.connections.max(1) as u64 * 4),
        ..load.clone()
    };
    let mut warmup_calls = 0;
    for variant in [Variant::Chat, Variant::Stream] {
        for path in [Path::Direct, Path::Gateway] {
            let (requests, _, _, _, errors, examples) =
                drive(Target::of(path, &mock, &server), variant, &warmup, None).await?;
            if errors > 0 {
                anyhow::bail!("the warm-up failed: {examples:?}");
            }
            if path == Path::Gateway {
                warmup_calls += requests;
            }
        }
    }
    let mut runs = Vec::new();
    for round in 0..rounds {
        for variant in [Variant::Chat, Variant::Stream] {
            let order = if round % 2 == 0 {
                [Path::Direct, Path::Gateway]
            } else {
                [Path::Gateway, Path::Direct]
            };
            for path in order {
                let target = Target::of(path, &mock, &server);
                if load.progress {
                    eprintln!(
                        "round {}/{rounds}: {} {:?}",
                        round + 1,
                        variant.as_str(),
                        path
                    );
                }
                let (requests, elapsed, latency, ttfb, errors, error_examples) =
                    drive(target, variant, load, rate).await?;
                runs.push(CallRun {
                    round,
                    variant,
                    path,
                    requests,
                    elapsed_s: elapsed,
                    requests_per_s: (requests - errors) as f64 / elapsed.max(1e-9),
                    latency_us: percentiles(&latency),
                    ttfb_us: (variant == Variant::Stream).then(|| percentiles(&ttfb)),
                    errors,
                    error_examples,
                });
            }
        }
    }
    let gateway_calls = warmup_calls
        + runs
            .iter()
            .filter(|r| r.path == Path::Gateway)
            .map(|r| r.requests - r.errors)
            .sum::<u64>();
    let charged_calls = server.charged_calls().await?;
    let mock_calls = mock.calls();
    server.stop().await?;
    let overhead = [Variant::Chat, Variant::Stream]
        .into_iter()
        .map(|v| overhead(&runs, v, rounds))
        .collect();
    Ok(GatewayReport {
        rate,
        runs,
        overhead,
        gateway_calls,
        charged_calls,
        mock_calls,
    })
}

fn overhead(runs: &[CallRun], variant: Variant, rounds: usize) -> Overhead {
    let pick = |round: usize, path: Path| {
        runs.iter()
            .find(|r| r.round == round && r.variant == variant && r.path == path)
            .expect("every round runs both paths")
    };
    let pairs: Vec<(&CallRun, &CallRun)> = (0..rounds)
        .map(|i| (pick(i, Path::Direct), pick(i, Path::Gateway)))
        .collect();
    let added = |f: &dyn Fn(&CallRun) -> u64| {
        median(
            pairs
                .iter()
                .map(|(d, g)| f(g) as i64 - f(d) as i64)
                .collect(),
        )
    };
    let ttfb = variant == Variant::Stream;
    Overhead {
        variant,
        rounds,
        direct_p50_us: median(pairs.iter().map(|(d, _)| d.latency_us.p50).collect()),
        direct_p99_us: median(pairs.iter().map(|(d, _)| d.latency_us.p99).collect()),
        gateway_p50_us: median(pairs.iter().map(|(_, g)| g.latency_us.p50).collect()),
        gateway_p99_us: median(pairs.iter().map(|(_, g)| g.latency_us.p99).collect()),
        added_p50_us: added(&|r| r.latency_us.p50),
        added_p99_us: added(&|r| r.latency_us.p99),
        added_ttfb_p50_us: ttfb.then(|| added(&|r| r.ttfb_us.as_ref().map_or(0, |t| t.p50))),
        added_ttfb_p99_us: ttfb.then(|| added(&|r| r.ttfb_us.as_ref().map_or(0, |t| t.p99))),
        direct_requests_per_s: median(pairs.iter().map(|(d, _)| d.requests_per_s).collect()),
        gateway_requests_per_s: median(pairs.iter().map(|(_, g)| g.requests_per_s).collect()),
        throughput_ratio: median(
            pairs
                .iter()
                .map(|(d, g)| {
                    if d.requests_per_s > 0.0 {
                        g.requests_per_s / d.requests_per_s
                    } else {
                        0.0
                    }
                })
                .collect(),
        ),
    }
}

/// The gateway report as text tables.
pub fn render(out: &mut String, g: &GatewayReport) {
    use std::fmt::Write;
    let _ = match g.rate {
        Some(r) => writeln!(
            out,
            "open loop: {r:.0} calls/s in all; a call held up by its connection's last one is timed from its scheduled time"
        ),
        None => writeln!(
            out,
            "closed loop: each connection sends its next call when the last is answered"
        ),
    };
    let _ = writeln!(
        out,
        "{:<5} {:<12} {:<8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
        "round",
        "variant",
        "path",
        "requests",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "ttfb p50",
        "ttfb p99",
        "errors"
    );
    for r in &g.runs {
        let (t50, t99) = r
            .ttfb_us
            .as_ref()
            .map_or(("-".to_owned(), "-".to_owned()), |t| {
                (t.p50.to_string(), t.p99.to_string())
            });
        let _ = writeln!(
            out,
            "{:<5} {:<12} {:<8} {:>9} {:>9.0} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
            r.round + 1,
            r.variant.as_str(),
            format!("{:?}", r.path).to_lowercase(),
            r.requests,
            r.requests_per_s,
            r.latency_us.p50,
            r.latency_us.p99,
            r.latency_us.p999,
            t50,
            t99,
            r.errors
        );
        for e in &r.error_examples {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "medians over the rounds, gateway minus direct in each round:"
    );
    let _ = writeln!(
        out,
        "{:<12} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "variant",
        "direct p50",
        "direct p99",
        "gw p50",
        "gw p99",
        "+p50 µs",
        "+p99 µs",
        "+ttfb p50",
        "+ttfb p99",
        "gw/dir"
    );
    for o in &g.overhead {
        let opt = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
        let _ = writeln!(
            out,
            "{:<12} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>10} {:>10} {:>8.3}",
            o.variant.as_str(),
            o.direct_p50_us,
            o.direct_p99_us,
            o.gateway_p50_us,
            o.gateway_p99_us,
            o.added_p50_us,
            o.added_p99_us,
            opt(o.added_ttfb_p50_us),
            opt(o.added_ttfb_p99_us),
            o.throughput_ratio
        );
    }
    let _ = writeln!(
        out,
        "gateway calls answered: {}, charged (usage report): {}; the mock answered {} calls in all",
        g.gateway_calls, g.charged_calls, g.mock_calls
    );
}
