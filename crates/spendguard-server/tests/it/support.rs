//! A server on port 0 over a temporary SQLite database (or a fresh PostgreSQL schema), with
//! a manual clock.

use std::sync::Arc;

use reqwest::header::HeaderMap;
use reqwest::{Client, Method};
use serde_json::Value;
use spendguard_core::Config;
use spendguard_guard::Clock;
use spendguard_guard::{Guard, GuardOptions, ManualClock};
use spendguard_server::{AlertSettings, AppState, KeyRing};
use spendguard_store::{AnyStore, OpenOptions};
use tokio::sync::oneshot;

pub const ADMIN: &str = "test-admin-key";
/// The key that may read `/metrics` and nothing else.
pub const METRICS_KEY: &str = "test-metrics-key";
/// 2026-03-10T12:00:00Z.
pub const T0: i64 = 1_773_144_000_000_000;

pub struct TestServer {
    pub url: String,
    pub client: Client,
    pub state: AppState,
    pub clock: Arc<ManualClock>,
    config: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: Arc<tempfile::TempDir>,
}

pub async fn spawn(config: &str) -> TestServer {
    spawn_with(config, |_| {}).await
}

pub async fn spawn_with(config: &str, tune: impl FnOnce(&mut GuardOptions)) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    start(dir, config, T0, tune).await
}

/// Notes a skipped test: printed (captured) and appended to `SPENDGUARD_TEST_SKIP_LOG`,
/// which CI reads to fail on any skip.
pub fn skipped(why: &str) {
    eprintln!("SKIPPED: {why}");
    if let Ok(log) = std::env::var("SPENDGUARD_TEST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{why}");
        }
    }
}

/// A server over a fresh schema `name` of the PostgreSQL database named by
/// `SPENDGUARD_TEST_DATABASE_URL`; `None`, noted in the skip log, when that is not set.
pub async fn spawn_postgres(config: &str, name: &str) -> Option<TestServer> {
    let url = match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            skipped("skipped a PostgreSQL test");
            return None;
        }
    };
    let schema = format!("sg_srv_{name}_{}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let database = format!("{url}{sep}options=-csearch_path%3D{schema}");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    Some(start_on(dir, &database, config, T0, |_| {}).await)
}

/// A server over `database` (a SQLite path or a PostgreSQL URL), its clock at `T0`.
pub async fn spawn_at(database: &str, config: &str) -> TestServer {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    start_on(dir, database, config, T0, |_| {}).await
}

/// A server over the database in `dir`, its clock at `now`, with the alert settings of
/// `config`.
async fn start(
    dir: Arc<tempfile::TempDir>,
    config: &str,
    now: i64,
    tune: impl FnOnce(&mut GuardOptions),
) -> TestServer {
    let database = dir.path().join("db").to_str().unwrap().to_owned();
    start_on(dir, &database, config, now, tune).await
}

/// A server over `database` (a SQLite path or a PostgreSQL URL), its spool in `dir`.
async fn start_on(
    dir: Arc<tempfile::TempDir>,
    database: &str,
    config: &str,
    now: i64,
    tune: impl FnOnce(&mut GuardOptions),
) -> TestServer {
    let parsed = Config::from_toml(config).unwrap();
    let policy = parsed.validate().unwrap();
    let alerts = AlertSettings::from_config(&parsed.alerts, None).unwrap();
    let store = AnyStore::open(database, &OpenOptions::default())
        .await
        .unwrap();
    let clock = ManualClock::new(now);
    let mut options = GuardOptions::new(dir.path().join("spool"));
    tune(&mut options);
    let guard = Guard::start(store, policy, options, clock.clone())
        .await
        .unwrap();
    let ring = KeyRing::load(guard.store(), Some(ADMIN))
        .await
        .unwrap()
        .with_metrics_key(Some(METRICS_KEY));
    let state = AppState::with_alerts(guard, ring, alerts)
        .with_limits(spendguard_server::ServerLimits::from_config(&parsed));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(spendguard_server::run(
        listener,
        state.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    TestServer {
        url,
        client: Client::new(),
        state,
        clock,
        config: config.to_owned(),
        stop: Some(stop),
        task: Some(task),
        _dir: dir,
    }
}

impl TestServer {
    /// The SQLite database file.
    pub fn db_path(&self) -> std::path::PathBuf {
        self._dir.path().join("db")
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, HeaderMap) {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        (status, json, headers)
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        let (s, v, _) = self.call(Method::POST, path, Some(key), Some(body)).await;
        (s, v)
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        let (s, v, _) = self.call(Method::GET, path, Some(key), None).await;
        (s, v)
    }

    /// The Prometheus exposition of `/metrics` (read with the admin key).
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(format!("{}/metrics", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// Creates a tenant key through the API.
    pub async fn tenant_key(&self, tenant: &str) -> String {
        let (s, v) = self
            .post(
                "/v1/admin/api-keys",
                ADMIN,
                serde_json::json!({ "tenant_id": tenant }),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["key"].as_str().unwrap().to_owned()
    }

    /// Projects the store's journal, so that SQL readers of the tables see every
    /// acknowledged write.
    pub async fn projected(&self) {
        self.state.guard.store().catch_up().await.unwrap();
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }

    async fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Stops the server (gracefully) and starts a new one on the same database, its clock
    /// where this one's was.
    pub async fn restart(mut self) -> TestServer {
        self.halt().await;
        let (dir, config, now) = (self._dir.clone(), self.config.clone(), self.clock.now());
        // Dropping the old state releases the database's writer lock.
        drop(self);
        start(dir, &config, now, |_| {}).await
    }
}

pub use reqwest::Method as M;

/// Asserts the error shape and returns the code.
pub fn error_code(v: &Value) -> &str {
    let e = &v["error"];
    assert!(e["message"].is_string(), "no error message in {v}");
    e["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

pub fn reserve_body(tenant: &str, user: &str) -> Value {
    serde_json::json!({
        "tenant_id": tenant,
        "user_id": user,
        "model": "gpt-4o-mini",
        "input_tokens": 1000,
        "max_output_tokens": 500,
    })
}
