//! The single-SQL-function baseline on PostgreSQL: its functions debit all keys or none, and a
//! short load under a small global budget is refused some requests and never overspends.
//!
//! Needs `SPENDGUARD_TEST_DATABASE_URL` (a postgres:// URL; the schema
//! `spendguard_bench_function` is dropped and recreated). Absent, the test prints `SKIPPED`
//! and appends a line to `SPENDGUARD_TEST_SKIP_LOG`.

use std::time::Duration;

use spendguard_bench::function::{self, PG_SCHEMA};
use spendguard_bench::{LoadOptions, Mode, Options};

fn database_url() -> Option<String> {
    match std::env::var("SPENDGUARD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let why = "spendguard-bench function baseline: SPENDGUARD_TEST_DATABASE_URL is not set";
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
            None
        }
    }
}

async fn spent(client: &tokio_postgres::Client, key: &str) -> Option<i64> {
    client
        .query_opt(
            &format!("SELECT spent FROM {PG_SCHEMA}.counters WHERE key = $1"),
            &[&key],
        )
        .await
        .expect("the counters can be read")
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_baseline_debits_all_keys_or_none_and_never_overspends() {
    let Some(url) = database_url() else {
        return;
    };

    // The functions, called directly.
    function::recreate_schema(&url)
        .await
        .expect("the schema is created");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL is reachable");
    tokio::spawn(conn);
    let reserve = format!("SELECT {PG_SCHEMA}.sg_reserve($1, $2, $3)");
    let settle = format!("SELECT {PG_SCHEMA}.sg_settle($1, $2, $3)");
    let keys = vec!["global".to_owned(), "user:a".to_owned()];
    let ok: bool = client
        .query_one(&reserve, &[&keys, &vec![1000_i64, 100], &60_i64])
        .await
        .expect("sg_reserve runs")
        .get(0);
    assert!(ok, "60 of 100 fits");
    assert_eq!(spent(&client, "global").await, Some(60));
    assert_eq!(spent(&client, "user:a").await, Some(60));
    let ok: bool = client
        .query_one(&reserve, &[&keys, &vec![1000_i64, 100], &60_i64])
        .await
        .expect("sg_reserve runs")
        .get(0);
    assert!(!ok, "120 of 100 does not fit");
    assert_eq!(
        spent(&client, "global").await,
        Some(60),
        "a refusal debits no key"
    );
    client
        .execute(&settle, &[&keys, &60_i64, &25_i64])
        .await
        .expect("sg_settle runs");
    assert_eq!(spent(&client, "global").await, Some(25));
    assert_eq!(spent(&client, "user:a").await, Some(25));

    // A short load with a global budget of about 40 calls.
    let global_usd = 40.0 * function::cost_micros(1000, 500) as f64 / 1e6;
    let opts = Options {
        mode: Mode::Function,
        url: None,
        key: None,
        load: LoadOptions {
            connections: 8,
            duration: Some(Duration::from_secs(60)),
            requests: Some(600),
            users: 200,
            tenants: 4,
            release_ratio: 0.1,
            progress: false,
        },
        history: vec![],
        database: Some(url.clone()),
        baseline_budget_usd: None,
        verify_sample: 0,
        rounds: 1,
        rate: None,
        cluster: spendguard_bench::cluster::ClusterOptions {
            global_usd_per_day: Some(global_usd),
            ..Default::default()
        },
    };
    let summary = spendguard_bench::run(&opts)
        .await
        .expect("the run completes");
    assert_eq!(summary.runs.len(), 1, "{summary:#?}");
    let run = &summary.runs[0];
    assert_eq!(run.target, "function");
    assert_eq!(run.load.errors, 0, "{run:#?}");
    assert!(run.load.admitted > 0, "{run:#?}");
    assert!(run.load.denied() > 0, "{run:#?}");
    let check = run.function_check.as_ref().expect("the counters were read");
    assert!(check.overspent.is_empty(), "{check:#?}");
    assert!(check.global_spent_usd > 0.0, "{check:#?}");
    assert!(
        check.global_spent_usd <= check.global_limit_usd,
        "{check:#?}"
    );
    assert!(!summary.overspent());
    let text = spendguard_bench::render(&summary);
    assert!(
        text.contains("function check: 0 counters overspent"),
        "{text}"
    );
}
