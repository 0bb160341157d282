//! Report latency over a large usage history: builds a database of N usage records
//! (default 10,000,000) over 90 days (January, February and 30 days of March 2024), 100
//! tenants, 10,000 users, about 1,000 companies (and users without one), 8 models and 4
//! endpoints, then times every report grouping over the last 30 days and all 90, for all
//! tenants and for one; the groupings read from `rollups` over the 90 days with January
//! and February read as whole months; the top 10 users of the last 30 days and of February
//! (from its days, and as a whole month); and one user's day.
//!
//! The records are inserted by bulk SQL straight into `ai_usage` (going through `apply`
//! would take hours); `rollups` is then filled from them by one set-based statement (the
//! sums a recount makes) with the users' week rows summed from their days as migration 12
//! does, and `usage_rollups` built by the same statements as the
//! migration that made it.
//!
//! ```text
//! cargo bench -p spendguard-store --bench report -- [--records N] [--runs N] [--url URL] [--schema NAME] [--scattered]
//! ```
//!
//! Without `--url` the database is a SQLite file in a temporary directory; with
//! `--url postgres://…` it is a fresh schema of that PostgreSQL database (dropped after),
//! or with `--schema NAME` that schema, kept afterwards and reused as it is when it exists
//! (to time the reports again, or two builds alternately, on the same data). PostgreSQL's
//! `rollups` rows are laid out in the order the service creates them (by window start);
//! `--scattered` leaves them in the order the bulk fill gives, each day's rows spread over
//! the whole table.

use std::time::{Duration, Instant};

use spendguard_core::{TenantId, UserId};
use spendguard_store::{
    AnyStore, GroupBy, OpenOptions, POSTGRES_FILL_WEEKS, PostgresStore, ReportQuery,
    SQLITE_FILL_WEEKS, SqliteStore,
};
use tokio_postgres::NoTls;

#[path = "common/seed.rs"]
mod seed;

use seed::*;

struct Args {
    records: u64,
    runs: usize,
    url: Option<String>,
    schema: Option<String>,
    scattered: bool,
}

fn args() -> Args {
    let mut out = Args {
        records: 10_000_000,
        runs: 20,
        url: None,
        schema: None,
        scattered: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--records" => out.records = it.next().and_then(|v| v.parse().ok()).expect("N"),
            "--runs" => out.runs = it.next().and_then(|v| v.parse().ok()).expect("N"),
            "--url" => out.url = it.next(),
            "--schema" => out.schema = it.next(),
            "--scattered" => out.scattered = true,
            // `cargo bench` passes `--bench`; other options are not ours.
            _ => {}
        }
    }
    out
}

/// Where the data lives, to clean up after.
enum Place {
    Sqlite(std::path::PathBuf),
    Postgres(tokio_postgres::Client, String),
}

async fn build(args: &Args) -> (AnyStore, Place) {
    let started = Instant::now();
    let (store, place) = match &args.url {
        Some(url) if url.starts_with("postgres") => {
            let base: tokio_postgres::Config = url.parse().expect("a PostgreSQL URL");
            let schema = args
                .schema
                .clone()
                .unwrap_or_else(|| format!("sg_report_bench_{}", std::process::id()));
            assert!(
                schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "--schema takes lower-case letters, digits and underscores"
            );
            let (admin, conn) = base.connect(NoTls).await.expect("connect");
            tokio::spawn(conn);
            let kept = admin
                .query_one(
                    "SELECT count(*) FROM information_schema.tables \
                     WHERE table_schema = $1 AND table_name = 'usage_rollups'",
                    &[&schema],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                > 0;
            admin
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .unwrap();
            let mut config = base.clone();
            config.options(format!("-csearch_path={schema}"));
            let store = PostgresStore::connect(config.clone(), &OpenOptions::default())
                .await
                .expect("open the store");
            if kept {
                eprintln!("reusing the kept schema {schema}");
                return (AnyStore::Postgres(store), Place::Postgres(admin, schema));
            }
            let (client, conn) = config.connect(NoTls).await.expect("connect");
            tokio::spawn(conn);
            client
                .batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
            let mut start = 0;
            while start < args.records {
                let end = (start + CHUNK).min(args.records);
                let (s, e) = (start as i64, end as i64);
                client
                    .execute(POSTGRES_INSERT, &[&s, &e, &FIRST_DAY, &DAY])
                    .await
                    .unwrap();
                eprintln!("inserted {end} records ({:.0?})", started.elapsed());
                start = end;
            }
            client.batch_execute("ANALYZE ai_usage").await.unwrap();
            let fill = Instant::now();
            client
                .batch_execute(&fill_rollups_sql("(cost_usd * 1000000)::int8"))
                .await
                .unwrap();
            client.batch_execute(POSTGRES_FILL_WEEKS).await.unwrap();
            if !args.scattered {
                // The rows in the order the service creates them: a day's (and a week's and
                // a month's) rows on their first day, so a range of days is a range of
                // pages. Filled as above they come in the order of a hash aggregate, each
                // day's rows spread over the whole table (`--scattered` keeps that).
                client
                    .batch_execute(
                        "CREATE TEMP TABLE rollups_fill AS SELECT * FROM rollups; \
                         TRUNCATE rollups; \
                         INSERT INTO rollups SELECT * FROM rollups_fill \
                         ORDER BY window_start, tenant_id, scope_id, scope_kind, \"window\"; \
                         DROP TABLE rollups_fill",
                    )
                    .await
                    .unwrap();
            }
            eprintln!("filled rollups in {:.1?}", fill.elapsed());
            (AnyStore::Postgres(store), Place::Postgres(admin, schema))
        }
        other => {
            let dir = match other {
                Some(path) => std::path::PathBuf::from(path),
                None => std::env::temp_dir()
                    .join(format!("spendguard-report-bench-{}", std::process::id())),
            };
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("report.db").to_string_lossy().into_owned();
            let store = SqliteStore::open(&path, &OpenOptions::default())
                .await
                .expect("open the store");
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -1048576;")
                .unwrap();
            let mut start = 0;
            while start < args.records {
                let end = (start + CHUNK).min(args.records);
                let (s, e) = (start as i64, end as i64);
                conn.execute(SQLITE_INSERT, rusqlite::params![s, e, FIRST_DAY, DAY])
                    .unwrap();
                eprintln!("inserted {end} records ({:.0?})", started.elapsed());
                start = end;
            }
            let fill = Instant::now();
            conn.execute_batch(&fill_rollups_sql("cost_micros"))
                .unwrap();
            conn.execute_batch(SQLITE_FILL_WEEKS).unwrap();
            eprintln!("filled rollups in {:.1?}", fill.elapsed());
            (AnyStore::Sqlite(store), Place::Sqlite(dir))
        }
    };
    let rebuild = Instant::now();
    store.rebuild_usage_rollups().await.expect("rebuild");
    eprintln!(
        "built usage_rollups in {:.1?} (total {:.1?})",
        rebuild.elapsed(),
        started.elapsed()
    );
    if let Place::Postgres(admin, schema) = &place {
        admin
            .batch_execute(&format!(
                "ANALYZE {schema}.usage_rollups; ANALYZE {schema}.rollups"
            ))
            .await
            .unwrap();
    }
    (store, place)
}

/// The row count of each group of `table`: `sql` selects `(group, count)`.
async fn row_counts(place: &Place, table: &str, sql: &str) -> Vec<(String, i64)> {
    match place {
        Place::Sqlite(dir) => {
            let conn = rusqlite::Connection::open(dir.join("report.db")).unwrap();
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        Place::Postgres(admin, schema) => admin
            .query(&sql.replace(table, &format!("{schema}.{table}")), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// Median and 95th percentile.
fn stats(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort_unstable();
    let p95 = (times.len() * 95).div_ceil(100).max(1) - 1;
    (ms(times[times.len() / 2]), ms(times[p95]))
}

#[tokio::main]
async fn main() {
    let args = args();
    let (store, place) = build(&args).await;
    let last = FIRST_DAY + (DAYS - 1) * DAY;
    let tenant = TenantId::parse("tenant-7").unwrap();

    // January and February 2024 (of 31 and 29 days) are whole; March has 30 days of data.
    let february = FIRST_DAY + 31 * DAY;
    let march = february + 29 * DAY;
    let whole_months = vec![(FIRST_DAY, february), (february, march)];

    // The Day report counts every counting record once, and so does every grouping read
    // from whole months.
    let all = store
        .report(&ReportQuery {
            from_day: FIRST_DAY,
            to_day: last,
            ..ReportQuery::default()
        })
        .await
        .unwrap();
    let want = counting(args.records);
    assert_eq!(all.totals.requests, want, "counting records");
    assert_eq!(all.groups, DAYS.min(args.records as i64) as usize);
    for group_by in [GroupBy::Tenant, GroupBy::Company, GroupBy::User] {
        let query = ReportQuery {
            from_day: FIRST_DAY,
            to_day: last,
            group_by,
            ..ReportQuery::default()
        };
        let by_days = store.report(&query).await.unwrap();
        let by_months = store
            .report(&ReportQuery {
                whole_months: whole_months.clone(),
                ..query
            })
            .await
            .unwrap();
        assert_eq!(by_days.totals, all.totals, "{group_by:?}");
        assert_eq!(by_months, by_days, "{group_by:?}");
    }

    for (table, sql) in [
        (
            "rollups",
            "SELECT scope_kind || ' ' || \"window\", count(*) FROM rollups \
             GROUP BY scope_kind, \"window\" ORDER BY scope_kind, \"window\"",
        ),
        (
            "usage_rollups",
            "SELECT dim, count(*) FROM usage_rollups GROUP BY dim ORDER BY dim",
        ),
    ] {
        let rows = row_counts(&place, table, sql).await;
        let total: i64 = rows.iter().map(|r| r.1).sum();
        println!(
            "{total} {table} rows: {}",
            rows.iter()
                .map(|(d, n)| format!("{d} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("{} records ({want} counting)", args.records);
    println!("backend: {}, {} runs each", store.backend(), args.runs);
    println!(
        "{:<40} {:>8} {:>10} {:>10}",
        "query", "groups", "median ms", "p95 ms"
    );

    let mut cases: Vec<(String, ReportQuery)> = Vec::new();
    for (period, from) in [("30d", last - 29 * DAY), ("90d", FIRST_DAY)] {
        for (who, t) in [("admin", None), ("tenant", Some(tenant.clone()))] {
            for g in GroupBy::ALL {
                cases.push((
                    format!("{} {period} {who}", g.as_str()),
                    ReportQuery {
                        from_day: from,
                        to_day: last,
                        tenant: t.clone(),
                        group_by: g,
                        limit: (g != GroupBy::Day).then_some(100),
                        ..ReportQuery::default()
                    },
                ));
            }
        }
    }
    for (who, t) in [("admin", None), ("tenant", Some(tenant.clone()))] {
        for g in [GroupBy::Tenant, GroupBy::Company, GroupBy::User] {
            cases.push((
                format!("{} 90d {who}, 2 whole months", g.as_str()),
                ReportQuery {
                    from_day: FIRST_DAY,
                    to_day: last,
                    tenant: t.clone(),
                    group_by: g,
                    limit: Some(100),
                    whole_months: whole_months.clone(),
                },
            ));
        }
    }
    cases.push((
        "top 10 users 30d admin".into(),
        ReportQuery {
            from_day: last - 29 * DAY,
            to_day: last,
            group_by: GroupBy::User,
            limit: Some(10),
            ..ReportQuery::default()
        },
    ));
    let in_february = ReportQuery {
        from_day: february,
        to_day: march - DAY,
        group_by: GroupBy::User,
        limit: Some(10),
        ..ReportQuery::default()
    };
    cases.push((
        "top 10 users Feb (29 days) admin".into(),
        in_february.clone(),
    ));
    cases.push((
        "top 10 users Feb (whole month)".into(),
        ReportQuery {
            whole_months: vec![(february, march)],
            ..in_february.clone()
        },
    ));
    assert_eq!(
        store.report(&cases[cases.len() - 1].1).await.unwrap(),
        store.report(&in_february).await.unwrap(),
        "February from its days and as a whole month"
    );
    for (name, query) in &cases {
        let mut times = Vec::with_capacity(args.runs);
        let mut groups = 0;
        for _ in 0..args.runs {
            let t = Instant::now();
            let report = store.report(query).await.unwrap();
            times.push(t.elapsed());
            groups = report.groups;
        }
        let (median, p95) = stats(times);
        println!("{name:<40} {groups:>8} {median:>10.2} {p95:>10.2}");
    }
    let user = UserId::parse("user-77@example.com").unwrap();
    let owner = TenantId::parse("tenant-77").unwrap();
    let mut times = Vec::with_capacity(args.runs);
    let mut models = 0;
    for _ in 0..args.runs {
        let t = Instant::now();
        models = store.user_day(&owner, &user, last).await.unwrap().len();
        times.push(t.elapsed());
    }
    let (median, p95) = stats(times);
    println!("{:<40} {models:>8} {median:>10.2} {p95:>10.2}", "user_day");

    store.close().await;
    match place {
        Place::Sqlite(dir) => {
            if args.url.is_none() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Place::Postgres(_, _) if args.schema.is_some() => {}
        Place::Postgres(admin, schema) => {
            admin
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
        }
    }
}
