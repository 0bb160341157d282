//! The seed design, faithfully: every reserve runs four aggregate queries over `ai_usage`
//! (the user's requests this minute, the user's cost today, the global cost today and this
//! month), compares them with the limits, then INSERTs the usage row. No reservation, no
//! lock: read-then-write, so concurrent requests all see the same spend and may all pass.
//! Commit and release are no-ops (the row was inserted at reserve time).

use std::fmt::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::{LoadOptions, TIERS, TierLimits, estimate_usd, tier_of};

const SCHEMA: &str = "CREATE TABLE ai_usage (
    id {ID},
    tenant_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_usd {REAL} NOT NULL,
    created_at BIGINT NOT NULL
)";
const INDEXES: &str = "CREATE INDEX ai_usage_user_time ON ai_usage (user_id, created_at);
CREATE INDEX ai_usage_time ON ai_usage (created_at);";

const Q_USER_MINUTE: &str = "SELECT COUNT(*) FROM ai_usage WHERE user_id = $1 AND created_at >= $2";
const Q_USER_DAY: &str =
    "SELECT COALESCE(SUM(cost_usd), 0) FROM ai_usage WHERE user_id = $1 AND created_at >= $2";
const Q_GLOBAL_SINCE: &str =
    "SELECT COALESCE(SUM(cost_usd), 0) FROM ai_usage WHERE created_at >= $1";
const INSERT: &str = "INSERT INTO ai_usage (tenant_id, user_id, model, input_tokens, output_tokens, cost_usd, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The PostgreSQL schema of the baseline's table, apart from any spendguard schema.
pub const PG_SCHEMA: &str = "spendguard_bench_baseline";

/// Global monthly budget of the baseline (never the binding one).
const GLOBAL_MONTH_USD: f64 = 1e12;

/// The database of the baseline.
#[derive(Debug)]
pub enum Db {
    Sqlite {
        pool: Arc<Mutex<Vec<Connection>>>,
        permits: Arc<Semaphore>,
    },
    Postgres {
        clients: Vec<tokio_postgres::Client>,
        next: AtomicUsize,
    },
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

const MINUTE_US: i64 = 60_000_000;
const DAY_US: i64 = 86_400_000_000;

/// The start of the UTC calendar month of `now` (civil-from-days, proleptic Gregorian).
fn month_start_us(now: i64) -> i64 {
    let days = now.div_euclid(DAY_US);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day_of_month = doy - (153 * mp + 2) / 5 + 1;
    (days - (day_of_month - 1)) * DAY_US
}

/// What the four queries saw.
#[derive(Debug, Clone, Copy)]
struct Seen {
    user_minute: i64,
    user_day: f64,
    global_day: f64,
    global_month: f64,
}

impl Db {
    /// Opens a fresh `ai_usage` table: a SQLite file in `dir` (WAL), or `database` if it is a
    /// `postgres://` URL (in the schema [`PG_SCHEMA`], where the table is dropped and recreated).
    pub async fn open(
        database: Option<&str>,
        dir: &Path,
        connections: usize,
    ) -> anyhow::Result<Db> {
        let pool_size = connections.clamp(1, 8);
        match database {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let mut clients = Vec::new();
                for _ in 0..pool_size {
                    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                        .await
                        .context("connecting to PostgreSQL")?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client
                        .batch_execute(&format!(
                            "CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}; SET search_path TO {PG_SCHEMA}"
                        ))
                        .await?;
                    clients.push(client);
                }
                let schema = SCHEMA
                    .replace("{ID}", "BIGSERIAL PRIMARY KEY")
                    .replace("{REAL}", "DOUBLE PRECISION");
                clients[0]
                    .batch_execute(&format!(
                        "DROP TABLE IF EXISTS {PG_SCHEMA}.ai_usage; {schema}"
                    ))
                    .await?;
                Ok(Db::Postgres {
                    clients,
                    next: AtomicUsize::new(0),
                })
            }
            Some(other) => {
                anyhow::bail!("the baseline needs a postgres:// URL or none, not {other}")
            }
            None => {
                let path = dir.join("baseline.db");
                let mut pool = Vec::new();
                for n in 0..pool_size {
                    let c = Connection::open(&path)?;
                    c.pragma_update(None, "journal_mode", "WAL")?;
                    c.pragma_update(None, "synchronous", "NORMAL")?;
                    c.busy_timeout(std::time::Duration::from_secs(30))?;
                    if n == 0 {
                        c.execute_batch(
                            &SCHEMA
                                .replace("{ID}", "INTEGER PRIMARY KEY")
                                .replace("{REAL}", "REAL"),
                        )?;
                    }
                    pool.push(c);
                }
                Ok(Db::Sqlite {
                    pool: Arc::new(Mutex::new(pool)),
                    permits: Arc::new(Semaphore::new(pool_size)),
                })
            }
        }
    }

    /// Runs `f` on a pooled SQLite connection, off the async threads.
    async fn with_sqlite<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let Db::Sqlite { pool, permits } = self else {
            anyhow::bail!("not SQLite");
        };
        // The blocking task owns the permit and gives the connection back itself, so a
        // request cancelled mid-query loses nothing.
        let permit = permits.clone().acquire_owned().await?;
        let pool = pool.clone();
        let conn = pool
            .lock()
            .map_err(|_| anyhow::anyhow!("pool poisoned"))?
            .pop()
            .context("pool empty")?;
        let out = tokio::task::spawn_blocking(move || {
            let out = f(&conn);
            if let Ok(mut p) = pool.lock() {
                p.push(conn);
            }
            drop(permit);
            out
        })
        .await?;
        Ok(out?)
    }

    fn pg(&self) -> Option<&tokio_postgres::Client> {
        match self {
            Db::Postgres { clients, next } => {
                Some(&clients[next.fetch_add(1, Ordering::Relaxed) % clients.len()])
            }
            Db::Sqlite { .. } => None,
        }
    }

    /// Seeds `rows` usage rows (multi-row INSERTs, 100,000 rows a transaction), then builds
    /// the indexes. The rows fall inside the windows the seed design sums, today before the
    /// last two minutes, so every one of them is read by the day's and the month's sums on any
    /// calendar date (rows spread over past days made the month's sum read a share that
    /// depended on the day of the month). They cost nothing, so the budgets the baseline
    /// checks are spent by the run alone, as without history.
    pub async fn seed(&self, rows: u64, users: usize, load: &LoadOptions) -> anyhow::Result<()> {
        let now = now_us();
        let day_start = now / DAY_US * DAY_US;
        let from = day_start;
        let until = (now - 2 * MINUTE_US).max(day_start + 1);
        let users = users.max(1);
        let mut left = rows;
        while left > 0 {
            let tx_rows = left.min(100_000);
            left -= tx_rows;
            let mut sql = String::from("BEGIN;\n");
            let mut in_stmt = 0;
            for _ in 0..tx_rows {
                if in_stmt == 0 {
                    sql.push_str("INSERT INTO ai_usage (tenant_id, user_id, model, input_tokens, output_tokens, cost_usd, created_at) VALUES ");
                } else {
                    sql.push(',');
                }
                let i = fastrand::usize(..users);
                let (tenant, user, _) = load.identity(i);
                let out = fastrand::u64(1..=crate::MAX_OUTPUT_TOKENS);
                let _ = write!(
                    sql,
                    "('{tenant}','{user}','{}',{},{out},0,{})",
                    crate::MODEL,
                    crate::INPUT_TOKENS,
                    fastrand::i64(from..until)
                );
                in_stmt += 1;
                if in_stmt == 1000 {
                    sql.push_str(";\n");
                    in_stmt = 0;
                }
            }
            if in_stmt > 0 {
                sql.push_str(";\n");
            }
            sql.push_str("COMMIT;");
            self.batch(sql).await?;
        }
        self.batch(INDEXES.to_owned()).await?;
        if let Some(c) = self.pg() {
            c.batch_execute("ANALYZE ai_usage").await?;
        } else {
            self.batch("ANALYZE".to_owned()).await?;
        }
        Ok(())
    }

    async fn batch(&self, sql: String) -> anyhow::Result<()> {
        match self.pg() {
            Some(c) => Ok(c.batch_execute(&sql).await?),
            None => self.with_sqlite(move |c| c.execute_batch(&sql)).await,
        }
    }

    /// The four aggregate queries of the seed design.
    async fn seen(&self, user: String, now: i64, month_start: i64) -> anyhow::Result<Seen> {
        let minute = now / MINUTE_US * MINUTE_US;
        let day = now / DAY_US * DAY_US;
        match self.pg() {
            Some(c) => {
                let user_minute: i64 = c.query_one(Q_USER_MINUTE, &[&user, &minute]).await?.get(0);
                let user_day: f64 = c.query_one(Q_USER_DAY, &[&user, &day]).await?.get(0);
                let global_day: f64 = c.query_one(Q_GLOBAL_SINCE, &[&day]).await?.get(0);
                let global_month: f64 = c.query_one(Q_GLOBAL_SINCE, &[&month_start]).await?.get(0);
                Ok(Seen {
                    user_minute,
                    user_day,
                    global_day,
                    global_month,
                })
            }
            None => {
                self.with_sqlite(move |c| {
                    let user_minute: i64 = c
                        .prepare_cached(Q_USER_MINUTE)?
                        .query_row(params![user, minute], |r| r.get(0))?;
                    let user_day: f64 = c
                        .prepare_cached(Q_USER_DAY)?
                        .query_row(params![user, day], |r| r.get(0))?;
                    let global_day: f64 = c
                        .prepare_cached(Q_GLOBAL_SINCE)?
                        .query_row(params![day], |r| r.get(0))?;
                    let global_month: f64 = c
                        .prepare_cached(Q_GLOBAL_SINCE)?
                        .query_row(params![month_start], |r| r.get(0))?;
                    Ok(Seen {
                        user_minute,
                        user_day,
                        global_day,
                        global_month,
                    })
                })
                .await
            }
        }
    }

    async fn insert(&self, b: ReserveBody, cost: f64, now: i64) -> anyhow::Result<i64> {
        let input = b.input_tokens as i64;
        let output = b.max_output_tokens.unwrap_or(0) as i64;
        match self.pg() {
            Some(c) => {
                let sql = format!("{INSERT} RETURNING id");
                let row = c
                    .query_one(
                        &sql,
                        &[
                            &b.tenant_id,
                            &b.user_id,
                            &b.model,
                            &input,
                            &output,
                            &cost,
                            &now,
                        ],
                    )
                    .await?;
                Ok(row.get(0))
            }
            None => {
                self.with_sqlite(move |c| {
                    c.prepare_cached(INSERT)?.execute(params![
                        b.tenant_id,
                        b.user_id,
                        b.model,
                        input,
                        output,
                        cost,
                        now
                    ])?;
                    Ok(c.last_insert_rowid())
                })
                .await
            }
        }
    }

    /// Spend per user since `since`.
    async fn spend_by_user(&self, since: i64) -> anyhow::Result<Vec<(String, f64)>> {
        let sql =
            "SELECT user_id, SUM(cost_usd) FROM ai_usage WHERE created_at >= $1 GROUP BY user_id";
        match self.pg() {
            Some(c) => Ok(c
                .query(sql, &[&since])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()),
            None => {
                self.with_sqlite(move |c| {
                    let mut st = c.prepare(sql)?;
                    let rows = st.query_map(params![since], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect()
                })
                .await
            }
        }
    }
}

/// The reserve body of the baseline: the same fields as spendguard's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    pub tenant_id: String,
    pub user_id: String,
    #[serde(default)]
    pub company_id: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
    pub model: String,
    pub input_tokens: u64,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub estimated_cost_usd: Option<f64>,
}

/// The commit body (accepted, ignored).
#[derive(Debug, Deserialize)]
pub struct CommitBody {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The baseline server's state.
#[derive(Clone, Debug)]
pub struct State {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    global_day_usd: f64,
    month_start: i64,
    day_start: i64,
}

/// How far the baseline overspent.
#[derive(Debug, Serialize)]
pub struct Overspend {
    pub global_spent_usd: f64,
    pub global_limit_usd: f64,
    /// `global_spent_usd / global_limit_usd`: above 1 the budget was overspent.
    pub global_spent_over_limit: f64,
    pub users_with_spend: usize,
    /// Users whose spend today exceeds their tier's daily budget.
    pub users_over_budget: usize,
    /// The largest spend/limit ratio of a user.
    pub worst_user_over_limit: f64,
}

impl State {
    pub fn new(db: Db, global_day_usd: f64, _users: usize) -> State {
        let now = now_us();
        State {
            inner: Arc::new(Inner {
                db,
                global_day_usd,
                month_start: month_start_us(now),
                day_start: now / DAY_US * DAY_US,
            }),
        }
    }

    /// Reads back global and per-user spend of today.
    pub async fn overspend(&self) -> anyhow::Result<Overspend> {
        let by_user = self.inner.db.spend_by_user(self.inner.day_start).await?;
        let global: f64 = by_user.iter().map(|(_, c)| c).sum();
        let mut over = 0;
        let mut worst = 0.0f64;
        for (user, spent) in &by_user {
            let i: usize = user.trim_start_matches('u').parse().unwrap_or(0);
            let ratio = spent / tier_of(i).usd_per_day;
            worst = worst.max(ratio);
            if ratio > 1.0 + 1e-9 {
                over += 1;
            }
        }
        Ok(Overspend {
            global_spent_usd: global,
            global_limit_usd: self.inner.global_day_usd,
            global_spent_over_limit: global / self.inner.global_day_usd,
            users_with_spend: by_user.len(),
            users_over_budget: over,
            worst_user_over_limit: worst,
        })
    }
}

fn deny(code: &str, message: &str) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

fn tier(name: Option<&str>) -> &'static TierLimits {
    TIERS
        .iter()
        .find(|t| Some(t.name) == name)
        .unwrap_or(&TIERS[0])
}

async fn reserve(AxState(s): AxState<State>, Json(b): Json<ReserveBody>) -> Response {
    let s = &s.inner;
    let now = now_us();
    let t = tier(b.tier.as_deref());
    let cost = b.estimated_cost_usd.unwrap_or_else(estimate_usd);
    let seen = match s.db.seen(b.user_id.clone(), now, s.month_start).await {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    if seen.user_minute as u64 + 1 > t.requests_per_minute {
        return deny("rate_limited", "user requests per minute");
    }
    if seen.user_day + cost > t.usd_per_day {
        return deny("budget_exceeded", "user usd per day");
    }
    if seen.global_day + cost > s.global_day_usd {
        return deny("budget_exceeded", "global usd per day");
    }
    if seen.global_month + cost > GLOBAL_MONTH_USD {
        return deny("budget_exceeded", "global usd per month");
    }
    match s.db.insert(b, cost, now).await {
        Ok(id) => (
            StatusCode::CREATED,
            Json(json!({ "reservation_id": id.to_string(), "estimated_cost_usd": cost })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

fn internal(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": { "code": "internal", "message": e.to_string() } })),
    )
        .into_response()
}

/// The baseline's routes: reserve does the work; commit and release answer 200.
pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/reservations", post(reserve))
        .route(
            "/v1/reservations/{id}/commit",
            post(|Json(_b): Json<CommitBody>| async { Json(json!({ "ok": true })) }),
        )
        .route(
            "/v1/reservations/{id}/release",
            post(|| async { Json(json!({ "ok": true })) }),
        )
        .with_state(state)
}
