//! The single-SQL-function limiter: a baseline in the style of TensorZero's rate limiter,
//! where every decision is one PL/pgSQL call on PostgreSQL and the database is the only state.
//!
//! In the schema [`PG_SCHEMA`] (dropped and recreated), a table of counters keyed by
//! `(key, window_start)` holds each key's spend of the day in micro-USD and its limit, and
//! two functions act on them:
//!
//! - `sg_reserve(keys, limits, amount)` creates the missing counters, locks every counter of
//!   the request in key order, and debits `amount` from all of them if every one has room,
//!   else changes nothing and returns false;
//! - `sg_settle(keys, reserved, actual)` locks the same counters and adds `actual - reserved`.
//!
//! A request's keys are the global budget, its tenant and its user: the global counter is hot,
//! every request locks it. Each load task has its own connection and runs cycles of one
//! `sg_reserve` and, when admitted, one `sg_settle` (a release settles at 0); each call counts
//! as one request, as the HTTP load counts a reserve and a commit. Budgets only: no rate or
//! concurrency limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use crate::load::{LoadReport, RunLimit, Worker, gather, progress};
use crate::{INPUT_TOKENS, LoadOptions, MAX_OUTPUT_TOKENS, tier_of};

/// The PostgreSQL schema of the function baseline.
pub const PG_SCHEMA: &str = "spendguard_bench_function";

/// The key of the global budget.
pub const GLOBAL_KEY: &str = "global";

/// The share of the global daily budget one tenant may hold, as spendguard's default
/// `[tenant] max_share_of_global`.
const TENANT_SHARE: f64 = 0.25;

const SCHEMA_SQL: &str = r#"
DROP SCHEMA IF EXISTS {S} CASCADE;
CREATE SCHEMA {S};
CREATE TABLE {S}.counters (
    key text NOT NULL,
    window_start date NOT NULL,
    spent bigint NOT NULL DEFAULT 0,
    "limit" bigint NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE FUNCTION {S}.sg_reserve(keys text[], limits bigint[], amount bigint) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    w date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    -- New counters are inserted in key order; existing ones are left alone here.
    INSERT INTO {S}.counters (key, window_start, spent, "limit")
        SELECT k, w, 0, l FROM unnest(keys, limits) AS u(k, l) ORDER BY k
        ON CONFLICT (key, window_start) DO NOTHING;
    -- Every counter of the request is locked in key order: no deadlock between requests.
    PERFORM 1 FROM {S}.counters
        WHERE window_start = w AND key = ANY (keys) ORDER BY key FOR UPDATE;
    IF EXISTS (SELECT 1 FROM {S}.counters
               WHERE window_start = w AND key = ANY (keys) AND spent + amount > "limit") THEN
        RETURN false;
    END IF;
    UPDATE {S}.counters SET spent = spent + amount
        WHERE window_start = w AND key = ANY (keys);
    RETURN true;
END
$fn$;
-- The day is taken again at settlement: a reservation open across midnight UTC is settled
-- against the new day (a benchmark run does not last that long).
CREATE FUNCTION {S}.sg_settle(keys text[], reserved bigint, actual bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    w date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM 1 FROM {S}.counters
        WHERE window_start = w AND key = ANY (keys) ORDER BY key FOR UPDATE;
    UPDATE {S}.counters SET spent = spent + (actual - reserved)
        WHERE window_start = w AND key = ANY (keys);
END
$fn$;
"#;

/// The cost of a call in micro-USD, rounded up (the prices of [`crate::MODEL`]:
/// 0.15 micro-USD per input token, 0.60 per output token).
pub fn cost_micros(input_tokens: u64, output_tokens: u64) -> i64 {
    ((input_tokens * 150 + output_tokens * 600).div_ceil(1000)) as i64
}

/// USD from the command line to the nearest micro-USD (not up: an f64 such as 0.018 is a
/// hair above its decimal).
fn usd_to_micros(usd: f64) -> i64 {
    (usd * 1e6).round() as i64
}

/// What was read back after a run.
#[derive(Debug, Default, Serialize)]
pub struct FunctionCheck {
    pub global_spent_usd: f64,
    pub global_limit_usd: f64,
    /// Counters of the day with `spent > limit`.
    pub overspent: Vec<String>,
}

/// Connects to `url` and checks the connection.
async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Drops and recreates the schema [`PG_SCHEMA`] with its table and functions.
pub async fn recreate_schema(url: &str) -> anyhow::Result<()> {
    let client = connect(url).await?;
    client
        .batch_execute(&SCHEMA_SQL.replace("{S}", PG_SCHEMA))
        .await
        .with_context(|| format!("creating the schema {PG_SCHEMA}"))?;
    Ok(())
}

struct Shared {
    opts: LoadOptions,
    global_limit: i64,
    limit: Arc<RunLimit>,
    done: Arc<AtomicU64>,
}

async fn worker(s: Arc<Shared>, client: Client) -> Worker {
    let mut w = Worker::new();
    let prepared = async {
        let reserve = client
            .prepare(&format!("SELECT {PG_SCHEMA}.sg_reserve($1, $2, $3)"))
            .await?;
        let settle = client
            .prepare(&format!("SELECT {PG_SCHEMA}.sg_settle($1, $2, $3)"))
            .await?;
        Ok::<_, tokio_postgres::Error>((reserve, settle))
    }
    .await;
    let (reserve, settle) = match prepared {
        Ok(p) => p,
        Err(e) => {
            w.error(format!("prepare: {e}"));
            return w;
        }
    };
    let tenant_limit = (s.global_limit as f64 * TENANT_SHARE) as i64;
    let amount = cost_micros(INPUT_TOKENS, MAX_OUTPUT_TOKENS);
    while s.limit.take() {
        let i = fastrand::usize(..s.opts.users.max(1));
        let (tenant, user, _) = s.opts.identity(i);
        let keys = vec![
            GLOBAL_KEY.to_owned(),
            format!("tenant:{tenant}"),
            format!("user:{user}"),
        ];
        let limits = vec![
            s.global_limit,
            tenant_limit,
            usd_to_micros(tier_of(i).usd_per_day),
        ];
        w.report.reserves += 1;
        let t = Instant::now();
        let admitted = client.query_one(&reserve, &[&keys, &limits, &amount]).await;
        w.record(t, &s.done);
        match admitted.and_then(|row| row.try_get::<_, bool>(0)) {
            Ok(true) => {}
            Ok(false) => {
                *w.report
                    .denials
                    .entry("budget_exceeded".into())
                    .or_default() += 1;
                continue;
            }
            Err(e) => {
                w.error(format!("sg_reserve: {e}"));
                continue;
            }
        }
        w.report.admitted += 1;
        // As in the HTTP load, an admitted reservation is always settled, even past the end.
        s.limit.issued.fetch_add(1, Ordering::Relaxed);
        let actual = if fastrand::f64() < s.opts.release_ratio {
            w.report.releases += 1;
            0
        } else {
            w.report.commits += 1;
            cost_micros(INPUT_TOKENS, fastrand::u64(1..=MAX_OUTPUT_TOKENS))
        };
        let t = Instant::now();
        let settled = client.execute(&settle, &[&keys, &amount, &actual]).await;
        w.record(t, &s.done);
        if let Err(e) = settled {
            w.error(format!("sg_settle: {e}"));
        }
    }
    w
}

/// Recreates the schema, runs the load with one connection per task, and reads the counters
/// back. `global_usd_per_day` is the limit of the hot global key.
pub async fn run(
    url: &str,
    global_usd_per_day: f64,
    opts: &LoadOptions,
) -> anyhow::Result<(LoadReport, FunctionCheck)> {
    if opts.duration.is_none() && opts.requests.is_none() {
        anyhow::bail!("give a duration or a request count");
    }
    recreate_schema(url).await?;
    let mut clients = Vec::new();
    for _ in 0..opts.connections.max(1) {
        clients.push(connect(url).await?);
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        opts: opts.clone(),
        global_limit: usd_to_micros(global_usd_per_day),
        limit: Arc::new(RunLimit::new(start, opts)),
        done: Arc::new(AtomicU64::new(0)),
    });
    let bar = progress(
        opts,
        shared.limit.clone(),
        shared.done.clone(),
        start,
        "function",
    );
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(worker(shared.clone(), c)))
        .collect();
    let report = gather(tasks, start, &shared.limit, bar).await?;
    let check = check(url, shared.global_limit).await?;
    Ok((report, check))
}

/// Reads the counters of the day back: the global one, and every one over its limit.
pub async fn check(url: &str, global_limit: i64) -> anyhow::Result<FunctionCheck> {
    let client = connect(url).await?;
    let day = "(now() AT TIME ZONE 'UTC')::date";
    let global = client
        .query_opt(
            &format!(
                "SELECT spent, \"limit\" FROM {PG_SCHEMA}.counters WHERE key = $1 AND window_start = {day}"
            ),
            &[&GLOBAL_KEY],
        )
        .await?;
    let (spent, limit) = match global {
        Some(row) => (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        None => (0, global_limit),
    };
    let over = client
        .query(
            &format!(
                "SELECT key, spent, \"limit\" FROM {PG_SCHEMA}.counters \
                 WHERE spent > \"limit\" ORDER BY key LIMIT 100"
            ),
            &[],
        )
        .await?;
    Ok(FunctionCheck {
        global_spent_usd: spent as f64 / 1e6,
        global_limit_usd: limit as f64 / 1e6,
        overspent: over
            .iter()
            .map(|r| {
                format!(
                    "{}: spent {} > limit {} micro-USD",
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, i64>(2)
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_costs_its_tokens_rounded_up() {
        assert_eq!(cost_micros(1000, 500), 450);
        assert_eq!(cost_micros(1000, 1), 151);
        assert_eq!(cost_micros(0, 0), 0);
    }
}
