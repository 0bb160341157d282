//! A spendguard server with the gateway mounted, in front of the mock upstream, on port 0.

use std::sync::Arc;

use serde_json::Value;
use spendguard_core::{Config, Money};
use spendguard_gateway::Gateway;
use spendguard_gateway::mock::{MockUpstream, PROVIDER_KEY};
use spendguard_guard::{Guard, GuardOptions, ManualClock};
use spendguard_server::{AppState, KeyRing};
use spendguard_store::{AnyStore, OpenOptions};
use tokio::sync::oneshot;

pub const ADMIN: &str = "test-admin-key-0123456789abcdef0123";
/// 2026-03-10T12:00:00Z.
pub const T0: i64 = 1_773_144_000_000_000;

/// Prices of the mock's models, USD per million tokens: whole micro-dollars per token, so
/// expected costs are easy to state exactly.
pub const PRICES: &str = r#"
[prices."gpt-4o-mock"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[prices."gpt-4o-mock-slow"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[prices."gpt-4o-mock-cut"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[prices."gpt-4o-mock-error"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[prices."gpt-4o-mock-held"]
input = "1.00"
cached_input = "1.00"
output = "2.00"
[prices."text-embedding-3-mock"]
input = "0.02"
cached_input = "0.02"
output = "0.02"
[prices."claude-mock"]
input = "3.00"
cached_input = "0.30"
output = "15.00"
[prices."claude-mock-cache"]
input = "3.00"
cached_input = "0.30"
cache_write = "3.75"
cache_write_1h = "6.00"
output = "15.00"
[prices."claude-mock-slow"]
input = "3.00"
cached_input = "0.30"
output = "15.00"
[prices."gpt-4o-mock-stall"]
input = "2.50"
cached_input = "1.25"
output = "10.00"
[prices."claude-mock-cut"]
input = "3.00"
cached_input = "0.30"
output = "15.00"
"#;

/// A generous tier every test user is in unless a test says otherwise.
pub const TIER: &str = r#"
default_tier = "gw"
[tiers.gw]
requests_per_minute = 100000
usd_per_day = "100"
max_output_tokens = 4096
max_concurrent = 10000
allowed_models = ["*"]
"#;

/// One `ai_usage` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub user: String,
    pub model: String,
    pub endpoint: Option<String>,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub cost: Money,
    pub status: String,
    pub pricing: Option<String>,
    pub upstream: Option<String>,
    pub request_id: Option<String>,
    pub cache_creation: u64,
    pub cache_creation_1h: u64,
    pub reasoning: u64,
}

pub struct Harness {
    pub url: String,
    pub database: String,
    pub client: reqwest::Client,
    pub mock: MockUpstream,
    pub state: AppState,
    pub gateway: Gateway,
    /// A key of tenant `acme`.
    pub key: String,
    /// The server's clock (tests that move time).
    #[allow(dead_code)]
    pub clock: Arc<ManualClock>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// The gateway configuration over `mock`, with `extra` TOML merged over it key by key.
pub fn config(mock: &MockUpstream, extra: &str) -> String {
    let base = format!(
        r#"{TIER}
[gateway]
[[gateway.upstreams]]
name = "openai-mock"
kind = "openai"
base_url = "{openai}"
api_key_env = "MOCK_OPENAI_KEY"
models = ["gpt-*", "text-embedding-*"]
[[gateway.upstreams]]
name = "anthropic-mock"
kind = "anthropic"
base_url = "{anthropic}"
api_key_env = "MOCK_ANTHROPIC_KEY"
models = ["claude-*"]
{PRICES}
"#,
        openai = mock.openai_base(),
        anthropic = mock.anthropic_base(),
    );
    let mut table: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra.parse().unwrap();
    merge(&mut table, extra);
    toml::to_string(&table).unwrap()
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A server over a temporary SQLite database with the gateway on, `extra` added to its
/// configuration.
pub async fn start(extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("db").to_str().unwrap().to_owned();
    start_on(dir, &database, extra).await
}

pub async fn start_on(dir: tempfile::TempDir, database: &str, extra: &str) -> Harness {
    let mock = MockUpstream::start().await;
    let text = config(&mock, extra);
    let parsed = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let policy = parsed.validate().unwrap();
    let store = AnyStore::open(database, &OpenOptions::default())
        .await
        .unwrap();
    let clock = ManualClock::new(T0);
    let guard = Guard::start(
        store,
        policy,
        GuardOptions::new(dir.path().join("spool")),
        clock.clone(),
    )
    .await
    .unwrap();
    let ring = KeyRing::load(guard.store(), Some(ADMIN)).await.unwrap();
    let (key, _) = spendguard_server::auth::create_key(
        guard.store(),
        &ring,
        Some(spendguard_core::TenantId::parse("acme").unwrap()),
        T0,
    )
    .await
    .unwrap();
    let state = AppState::new(guard, ring);
    let gateway = Gateway::with_env(state.clone(), &parsed.gateway, &|name| {
        matches!(name, "MOCK_OPENAI_KEY" | "MOCK_ANTHROPIC_KEY").then(|| PROVIDER_KEY.to_owned())
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let router = gateway.router();
    let settle = {
        let g = gateway.clone();
        async move { g.idle().await }
    };
    let task = tokio::spawn(spendguard_server::run_with(
        listener,
        state.clone(),
        Some(router),
        async move {
            let _ = rx.await;
        },
        settle,
    ));
    Harness {
        url,
        database: database.to_owned(),
        client: reqwest::Client::new(),
        mock,
        state,
        gateway,
        key,
        clock,
        stop: Some(tx),
        task: Some(task),
        _dir: dir,
    }
}

impl Harness {
    /// `POST {url}{path}` with the tenant key as a bearer token and user `u1`.
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .header("x-spendguard-user", "u1")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Every usage row, oldest first, once no stream is being settled and the journal is
    /// projected.
    pub async fn records(&self) -> Vec<Row> {
        self.gateway.idle().await;
        // Acknowledged batches reach `ai_usage` through the journal's projection.
        self.state.guard.store().catch_up().await.unwrap();
        let conn = rusqlite::Connection::open(&self.database).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT user_id, model, endpoint, input_tokens, cached_input_tokens, \
                 output_tokens, cost_micros, request_status, pricing, upstream, \
                 provider_request_id, cache_creation_input_tokens, \
                 cache_creation_1h_input_tokens, reasoning_tokens FROM ai_usage \
                 ORDER BY created_at, rowid",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok(Row {
                user: r.get(0)?,
                model: r.get(1)?,
                endpoint: r.get(2)?,
                input: r.get::<_, i64>(3)? as u64,
                cached: r.get::<_, i64>(4)? as u64,
                output: r.get::<_, i64>(5)? as u64,
                cost: Money::from_micros(r.get(6)?),
                status: r.get(7)?,
                pricing: r.get(8)?,
                upstream: r.get(9)?,
                request_id: r.get(10)?,
                cache_creation: r.get::<_, i64>(11)? as u64,
                cache_creation_1h: r.get::<_, i64>(12)? as u64,
                reasoning: r.get::<_, i64>(13)? as u64,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// The cost of `tokens` at a price (USD per million), as the ledger computes it: each part
/// rounded up to the micro-dollar.
pub fn cost(input_uncached: u64, cached: u64, output: u64, prices: (&str, &str, &str)) -> Money {
    let price = spendguard_core::Price {
        cached_input: Some(Money::parse_usd(prices.1).unwrap()),
        ..spendguard_core::Price::simple(
            Money::parse_usd(prices.0).unwrap(),
            Money::parse_usd(prices.2).unwrap(),
        )
    };
    price
        .cost(spendguard_core::Tokens {
            input: input_uncached + cached,
            cached_input: cached,
            output,
            ..Default::default()
        })
        .unwrap()
}
