//! Importing history: rows of the seed's `ai_usage` table (from a CSV file or a PostgreSQL
//! query) posted to a running server's `POST /v1/usage` with the admin key, each at its own
//! `created_at`, so it lands in its own day's and month's rollups (and counts in the current
//! windows only if it falls in them).
//!
//! Idempotent: each row is sent with the idempotency key `import:<row id>`, which the
//! database remembers for good, so importing the same rows again answers each with the
//! record made the first time (counted as `already`), never a second record. Rows with
//! status `expired` are skipped (an expired reservation costs nothing and is not counted).
//! A row the server refuses (4xx) is counted as failed with its reason; the import goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// One row of the seed's `ai_usage`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedRow {
    pub id: String,
    pub user_id: String,
    pub company_id: Option<String>,
    pub tenant_id: String,
    pub model: String,
    pub endpoint: Option<String>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    /// Decimal USD, exactly as stored.
    pub cost_usd: String,
    pub request_status: String,
    /// RFC 3339.
    pub created_at: String,
}

/// The columns a CSV must have (any order; others are ignored), as the seed names them.
pub const COLUMNS: [&str; 12] = [
    "id",
    "user_id",
    "company_id",
    "tenant_id",
    "model",
    "endpoint",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "cost_usd",
    "request_status",
    "created_at",
];

/// The default query of `--postgres`: the seed's table, oldest first.
pub const DEFAULT_QUERY: &str = "SELECT id::text, user_id, company_id, tenant_id, model, \
    endpoint, input_tokens::int8, coalesce(cached_input_tokens, 0)::int8, \
    output_tokens::int8, cost_usd::text, request_status, created_at FROM ai_usage \
    ORDER BY created_at, id";

/// A time as PostgreSQL prints it (`2026-02-14 10:00:00.5+00`) or RFC 3339, as RFC 3339.
pub fn rfc3339(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.to_string());
    }
    // PostgreSQL's text form: a space for the `T`, and an offset of hours only.
    let mut t = s.replacen(' ', "T", 1);
    let tail = t.rfind(['+', '-']).filter(|i| *i > 10);
    if let Some(i) = tail
        && t[i + 1..].len() == 2
    {
        t.push_str(":00");
    }
    t.parse::<jiff::Timestamp>()
        .map(|t| t.to_string())
        .map_err(|e| format!("created_at `{s}` is not a time: {e}"))
}

fn count(name: &str, v: &str) -> Result<u64, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(0);
    }
    v.parse()
        .map_err(|_| format!("{name} `{v}` is not a whole number of tokens"))
}

fn optional(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// Reads the rows of a CSV with a header naming [`COLUMNS`]: for each, where in the input
/// it starts (for progress) and the row, or why it is not one.
pub fn read_csv<R: std::io::Read>(
    input: R,
) -> Result<impl Iterator<Item = (u64, Result<SeedRow, String>)>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(input);
    let header = reader
        .headers()
        .map_err(|e| format!("cannot read the CSV header: {e}"))?
        .clone();
    let mut at = [0usize; COLUMNS.len()];
    for (i, name) in COLUMNS.iter().enumerate() {
        at[i] = header
            .iter()
            .position(|h| h.trim() == *name)
            .ok_or_else(|| format!("the CSV has no `{name}` column"))?;
    }
    Ok(reader.into_records().map(move |r| {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let pos = e.position().map_or(0, |p| p.byte());
                return (pos, Err(format!("a bad CSV line: {e}")));
            }
        };
        let pos = r.position().map_or(0, |p| p.byte());
        let f = |i: usize| r.get(at[i]).unwrap_or("");
        let row = (|| {
            Ok(SeedRow {
                id: f(0).trim().to_owned(),
                user_id: f(1).trim().to_owned(),
                company_id: optional(f(2)),
                tenant_id: f(3).trim().to_owned(),
                model: f(4).trim().to_owned(),
                endpoint: optional(f(5)),
                input_tokens: count("input_tokens", f(6))?,
                cached_input_tokens: count("cached_input_tokens", f(7))?,
                output_tokens: count("output_tokens", f(8))?,
                cost_usd: f(9).trim().to_owned(),
                request_status: f(10).trim().to_owned(),
                created_at: rfc3339(f(11))?,
            })
        })();
        (pos, row)
    }))
}

/// What became of the rows.
#[derive(Debug, Default)]
pub struct Summary {
    /// Recorded now.
    pub imported: AtomicU64,
    /// Recorded by an earlier import (the same row id).
    pub already: AtomicU64,
    /// `expired` rows, which count nothing.
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    /// The first few failures, with their row ids.
    pub errors: std::sync::Mutex<Vec<String>>,
}

impl Summary {
    pub fn done(&self) -> u64 {
        self.imported.load(Ordering::Relaxed)
            + self.already.load(Ordering::Relaxed)
            + self.skipped.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed)
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() < 20 {
            e.push(why);
        }
    }
}

/// The body of `POST /v1/usage` for a row.
pub fn body(row: &SeedRow) -> Value {
    let mut b = json!({
        "tenant_id": row.tenant_id,
        "user_id": row.user_id,
        "model": row.model,
        "input_tokens": row.input_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "output_tokens": row.output_tokens,
        "cost_usd": row.cost_usd,
        "status": row.request_status,
        "idempotency_key": format!("import:{}", row.id),
        "created_at": row.created_at,
    });
    if let Some(c) = &row.company_id {
        b["company_id"] = json!(c);
    }
    if let Some(e) = &row.endpoint {
        b["endpoint"] = json!(e);
    }
    b
}

/// Where rows go.
#[derive(Clone, Debug)]
pub struct Target {
    pub client: reqwest::Client,
    /// The server, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub admin_key: String,
}

/// How often a row is sent again when the server cannot take it right now (5xx, 429, a
/// network error), with a growing pause.
pub const ATTEMPTS: u32 = 5;

/// Sends one row; the outcome is counted in `summary`.
pub async fn send(target: &Target, row: Result<SeedRow, String>, summary: &Summary) {
    let row = match row {
        Ok(r) => r,
        Err(why) => return summary.fail(why),
    };
    if row.request_status == "expired" {
        summary.skipped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let body = body(&row);
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let resp = target
            .client
            .post(format!("{}/v1/usage", target.url.trim_end_matches('/')))
            .bearer_auth(&target.admin_key)
            .json(&body)
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == 201 => {
                summary.imported.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) if r.status() == 200 => {
                summary.already.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                last = format!("the server answered {}", r.status());
            }
            Ok(r) => {
                let status = r.status();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let msg = v["error"]["message"].as_str().unwrap_or("").to_owned();
                return summary.fail(format!("row {}: {status} {msg}", row.id));
            }
            Err(e) => last = format!("cannot reach the server: {e}"),
        }
    }
    summary.fail(format!("row {}: {last}", row.id));
}

/// An import in progress: rows pushed to it are sent by `concurrency` workers.
#[derive(Debug)]
pub struct Import {
    tx: tokio::sync::mpsc::Sender<Result<SeedRow, String>>,
    workers: tokio::task::JoinSet<()>,
    pub summary: Arc<Summary>,
}

impl Import {
    pub fn start(target: Target, concurrency: usize) -> Import {
        let summary = Arc::new(Summary::default());
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<SeedRow, String>>(concurrency.max(1) * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let (rx, target, summary) = (rx.clone(), target.clone(), summary.clone());
            workers.spawn(async move {
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some(row) = next else { return };
                    send(&target, row, &summary).await;
                }
            });
        }
        Import {
            tx,
            workers,
            summary,
        }
    }

    /// Queues a row (waits while the workers are busy).
    pub async fn push(&self, row: Result<SeedRow, String>) {
        // The workers only stop when the sender is dropped.
        let _ = self.tx.send(row).await;
    }

    /// Waits until every queued row is sent.
    pub async fn finish(self) -> Arc<Summary> {
        let Import {
            tx,
            mut workers,
            summary,
        } = self;
        drop(tx);
        while workers.join_next().await.is_some() {}
        summary
    }
}

/// Imports the rows of a CSV; `progress(rows done, bytes read)` after each row.
pub async fn from_csv<R: std::io::Read>(
    target: Target,
    input: R,
    concurrency: usize,
    progress: impl Fn(u64, u64),
) -> Result<Arc<Summary>, String> {
    let import = Import::start(target, concurrency);
    for (pos, row) in read_csv(input)? {
        import.push(row).await;
        progress(import.summary.done(), pos);
    }
    Ok(import.finish().await)
}

fn text(row: &tokio_postgres::Row, i: usize) -> Result<Option<String>, String> {
    row.try_get::<_, Option<String>>(i)
        .map_err(|e| format!("column {i}: {e}"))
}

fn int(row: &tokio_postgres::Row, i: usize) -> Result<u64, String> {
    let v = row
        .try_get::<_, Option<i64>>(i)
        .map_err(|e| format!("column {i}: {e}"))?
        .unwrap_or(0);
    u64::try_from(v).map_err(|_| format!("column {i}: {v} is negative"))
}

/// A row of [`DEFAULT_QUERY`]'s columns (a query of one's own returns the same, in order).
pub fn postgres_row(row: &tokio_postgres::Row) -> Result<SeedRow, String> {
    let need = |i: usize, name: &str| -> Result<String, String> {
        text(row, i)?.ok_or_else(|| format!("{name} is null"))
    };
    let created_at = match row.try_get::<_, std::time::SystemTime>(11) {
        Ok(t) => {
            let micros = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| "created_at is before 1970".to_owned())?
                .as_micros();
            let micros = i64::try_from(micros).map_err(|_| "created_at is too late")?;
            jiff::Timestamp::from_microsecond(micros)
                .map_err(|e| e.to_string())?
                .to_string()
        }
        Err(_) => rfc3339(&need(11, "created_at")?)?,
    };
    Ok(SeedRow {
        id: need(0, "id")?,
        user_id: need(1, "user_id")?,
        company_id: text(row, 2)?,
        tenant_id: need(3, "tenant_id")?,
        model: need(4, "model")?,
        endpoint: text(row, 5)?,
        input_tokens: int(row, 6)?,
        cached_input_tokens: int(row, 7)?,
        output_tokens: int(row, 8)?,
        cost_usd: need(9, "cost_usd")?,
        request_status: need(10, "request_status")?,
        created_at,
    })
}

/// How many rows a cursor reads at once.
const FETCH: usize = 1000;

/// Imports the rows of `query` (default [`DEFAULT_QUERY`]) on the PostgreSQL database at
/// `url`, read through a cursor; `progress(rows done, rows read, rows in all)`.
pub async fn from_postgres(
    target: Target,
    url: &str,
    query: Option<&str>,
    concurrency: usize,
    progress: impl Fn(u64, u64, u64),
) -> Result<Arc<Summary>, String> {
    let query = query.unwrap_or(DEFAULT_QUERY);
    let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to the seed's database: {e}"))?;
    let conn = tokio::spawn(conn);
    let total: i64 = client
        .query_one(&format!("SELECT count(*) FROM ({query}) AS q"), &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(|e| format!("the query failed: {e}"))?;
    let total = u64::try_from(total).unwrap_or(0);
    let import = Import::start(target, concurrency);
    let tx = client
        .transaction()
        .await
        .map_err(|e| format!("cannot read the seed's database: {e}"))?;
    tx.batch_execute(&format!(
        "DECLARE spendguard_import NO SCROLL CURSOR FOR {query}"
    ))
    .await
    .map_err(|e| format!("the query failed: {e}"))?;
    let mut read = 0u64;
    loop {
        let rows = tx
            .query(&format!("FETCH {FETCH} FROM spendguard_import"), &[])
            .await
            .map_err(|e| format!("reading the rows failed: {e}"))?;
        for row in &rows {
            import.push(postgres_row(row)).await;
            read += 1;
            progress(import.summary.done(), read, total);
        }
        if rows.len() < FETCH {
            break;
        }
    }
    let _ = tx.commit().await;
    drop(client);
    let _ = conn.await;
    let summary = import.finish().await;
    progress(summary.done(), read, total);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_times_read_as_rfc_3339() {
        assert_eq!(
            rfc3339("2026-02-14 10:00:00+00").unwrap(),
            "2026-02-14T10:00:00Z"
        );
        assert_eq!(
            rfc3339("2026-02-14 10:00:00.25-05").unwrap(),
            "2026-02-14T15:00:00.25Z"
        );
        assert_eq!(
            rfc3339("2026-02-14T10:00:00Z").unwrap(),
            "2026-02-14T10:00:00Z"
        );
        assert!(rfc3339("yesterday").is_err());
    }

    #[test]
    fn csv_rows_are_read_by_column_name() {
        let csv = "created_at,id,user_id,company_id,tenant_id,model,endpoint,subscription_tier,\
                   input_tokens,cached_input_tokens,output_tokens,cost_usd,request_status\n\
                   2026-02-14 10:00:00+00,r1,alice,,acme,gpt-4o,chat,pro,100,,20,0.012345,success\n\
                   2026-02-15 10:00:00+00,r2,bob,eng,acme,gpt-4o,,pro,x,0,1,1,success\n";
        let rows: Vec<_> = read_csv(csv.as_bytes()).unwrap().map(|(_, r)| r).collect();
        assert_eq!(
            rows[0],
            Ok(SeedRow {
                id: "r1".into(),
                user_id: "alice".into(),
                company_id: None,
                tenant_id: "acme".into(),
                model: "gpt-4o".into(),
                endpoint: Some("chat".into()),
                input_tokens: 100,
                cached_input_tokens: 0,
                output_tokens: 20,
                cost_usd: "0.012345".into(),
                request_status: "success".into(),
                created_at: "2026-02-14T10:00:00Z".into(),
            })
        );
        assert!(rows[1].as_ref().unwrap_err().contains("input_tokens `x`"));
        let missing = read_csv("id,user_id\n".as_bytes()).err().unwrap();
        assert!(missing.contains("company_id"), "{missing}");
    }
}
