//! Backfill: `POST /v1/usage` at a past `created_at` (admin only), and importing the seed's
//! `ai_usage` rows from CSV and from PostgreSQL: each lands in its own day and month, counts
//! in the current windows only if it falls in them, and a second import changes nothing.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};
use spendguard_server::import::{self, Target};
use spendguard_store::Store;

use crate::support::*;

const CONFIG: &str = "max_record_cost_usd = \"100000\"\n\
    [tiers.free]\nusd_per_day = \"100\"\nusd_per_month = \"1000\"\n\
    requests_per_minute = \"unlimited\"\nrequests_per_day = \"unlimited\"\n\
    tokens_per_day = \"unlimited\"\n";

fn body(user: &str, cost: &str, at: Option<&str>, key: &str) -> Value {
    let mut b = json!({
        "tenant_id": "acme", "user_id": user, "model": "gpt-4o", "endpoint": "chat",
        "input_tokens": 100, "output_tokens": 10, "cost_usd": cost, "idempotency_key": key,
    });
    if let Some(at) = at {
        b["created_at"] = json!(at);
    }
    b
}

/// The user's cost limits: (window, used) in USD micros.
async fn used(s: &TestServer, user: &str) -> Vec<(String, i64)> {
    let (st, v) = s
        .get(&format!("/v1/limits?tenant_id=acme&user_id={user}"), ADMIN)
        .await;
    assert_eq!(st, 200, "{v}");
    v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["unit"] == "usd" && l["scope"] == "user")
        .map(|l| {
            (
                l["window"].as_str().unwrap().to_owned(),
                (l["used"].as_f64().unwrap() * 1e6).round() as i64,
            )
        })
        .collect()
}

/// Spend per day of acme, from the report API: (day, cost micros).
async fn days(s: &TestServer) -> Vec<(String, i64)> {
    let (st, v) = s
        .get(
            "/v1/reports/usage?from=2026-01-01&to=2026-03-10&group_by=day&tenant_id=acme",
            ADMIN,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["day"].as_str().unwrap().to_owned(),
                (r["cost_usd"].as_f64().unwrap() * 1e6).round() as i64,
            )
        })
        .collect()
}

#[tokio::test]
async fn backfilled_usage_lands_in_its_own_day_once() {
    let s = spawn(CONFIG).await;
    // Last month: no current window.
    let (st, v) = s
        .post(
            "/v1/usage",
            ADMIN,
            body("alice", "5", Some("2026-02-14T10:00:00Z"), "import:1"),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["created_at"], "2026-02-14T10:00:00Z");
    let id = v["usage_id"].clone();
    // Again: the same record.
    let (st, v) = s
        .post(
            "/v1/usage",
            ADMIN,
            body("alice", "5", Some("2026-02-14T10:00:00Z"), "import:1"),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage_id"], id);
    assert_eq!(
        used(&s, "alice").await,
        [("day".into(), 0), ("month".into(), 0)]
    );
    // Earlier this month: the month, not today.
    let (st, v) = s
        .post(
            "/v1/usage",
            ADMIN,
            body("alice", "7", Some("2026-03-02T08:00:00Z"), "import:2"),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        used(&s, "alice").await,
        [("day".into(), 0), ("month".into(), 7_000_000)]
    );
    assert_eq!(
        days(&s).await,
        [
            ("2026-02-14".into(), 5_000_000),
            ("2026-03-02".into(), 7_000_000)
        ]
    );
    // A restart restores the same counters from the rollups.
    let s = s.restart().await;
    assert_eq!(
        used(&s, "alice").await,
        [("day".into(), 0), ("month".into(), 7_000_000)]
    );
    // Only the admin backdates; not before 1970, not in the future, a real time.
    let key = s.tenant_key("acme").await;
    let (st, v) = s
        .post(
            "/v1/usage",
            &key,
            body("bob", "1", Some("2026-03-01T00:00:00Z"), "k1"),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    for bad in [
        "1969-12-31T23:59:59Z",
        "2026-03-10T13:00:00Z",
        "yesterday",
        "",
    ] {
        let (st, v) = s
            .post("/v1/usage", ADMIN, body("bob", "1", Some(bad), "k2"))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(error_code(&v), "invalid_request", "{v}");
    }
    assert_eq!(s.state.guard.store().usage_count().await.unwrap(), 2);
    s.stop().await;
}

fn target(s: &TestServer) -> Target {
    Target {
        client: reqwest::Client::new(),
        url: s.url.clone(),
        admin_key: ADMIN.to_owned(),
    }
}

/// The seed's rows, as PostgreSQL prints them: one expired, one of a company, one without
/// an endpoint, one today.
const SEED_CSV: &str = "id,user_id,company_id,tenant_id,model,endpoint,subscription_tier,\
input_tokens,cached_input_tokens,output_tokens,cost_usd,request_status,created_at\n\
0190a3c4-0000-7000-8000-000000000001,alice,,acme,gpt-4o,chat,pro,1000,0,200,1.250000,success,2026-01-20 10:00:00+00\n\
0190a3c4-0000-7000-8000-000000000002,alice,eng,acme,gpt-4o,chat,pro,1000,100,200,2.500000,error,2026-02-14 23:30:00-05\n\
0190a3c4-0000-7000-8000-000000000003,bob,,acme,claude-3,,free,10,0,5,0.000123,success,2026-03-02 08:00:00+00\n\
0190a3c4-0000-7000-8000-000000000004,bob,,acme,claude-3,chat,free,10,0,5,9.000000,expired,2026-03-03 08:00:00+00\n\
0190a3c4-0000-7000-8000-000000000005,carol,,acme,gpt-4o,chat,free,10,0,5,0.500000,cancelled,2026-03-10 09:00:00+00\n";

const SEED_DAYS: [(&str, i64); 4] = [
    ("2026-01-20", 1_250_000),
    // 23:30 at UTC-5 is the 15th in UTC.
    ("2026-02-15", 2_500_000),
    ("2026-03-02", 123),
    ("2026-03-10", 500_000),
];

fn seed_days() -> Vec<(String, i64)> {
    SEED_DAYS.iter().map(|(d, c)| (d.to_string(), *c)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_import_lands_in_the_right_days_and_a_second_changes_nothing() {
    let s = spawn(CONFIG).await;
    let summary = import::from_csv(target(&s), SEED_CSV.as_bytes(), 3, |_, _| {})
        .await
        .unwrap();
    assert_eq!(summary.imported.load(Relaxed), 4, "{summary:?}");
    assert_eq!(summary.skipped.load(Relaxed), 1);
    assert_eq!(summary.failed.load(Relaxed), 0, "{summary:?}");
    assert_eq!(days(&s).await, seed_days());
    // Today's record counts today; the rest only where their windows are current.
    assert_eq!(
        used(&s, "carol").await,
        [("day".into(), 500_000), ("month".into(), 500_000)]
    );
    assert_eq!(
        used(&s, "bob").await,
        [("day".into(), 0), ("month".into(), 123)]
    );
    let (_, v) = s
        .get(
            "/v1/reports/usage?from=2026-01-01&to=2026-03-10&group_by=company&tenant_id=acme",
            ADMIN,
        )
        .await;
    assert!(
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["company_id"] == "eng" && r["requests"] == 1),
        "{v}"
    );
    // Again: nothing new.
    let again = import::from_csv(target(&s), SEED_CSV.as_bytes(), 3, |_, _| {})
        .await
        .unwrap();
    assert_eq!(again.imported.load(Relaxed), 0, "{again:?}");
    assert_eq!(again.already.load(Relaxed), 4);
    assert_eq!(days(&s).await, seed_days());
    assert_eq!(s.state.guard.store().usage_count().await.unwrap(), 4);
    // A row the server refuses is counted and named; the others go on.
    let bad = "id,user_id,company_id,tenant_id,model,endpoint,input_tokens,cached_input_tokens,\
               output_tokens,cost_usd,request_status,created_at\n\
               r9,bad user,,acme,gpt-4o,chat,1,0,1,1,success,2026-03-01T00:00:00Z\n\
               r10,dave,,acme,gpt-4o,chat,1,0,1,1,success,2026-03-01T00:00:00Z\n";
    let summary = import::from_csv(target(&s), bad.as_bytes(), 1, |_, _| {})
        .await
        .unwrap();
    assert_eq!(summary.failed.load(Relaxed), 1);
    assert_eq!(summary.imported.load(Relaxed), 1);
    let errors = summary.errors.lock().unwrap().clone();
    assert!(errors[0].contains("row r9: 400"), "{errors:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_import_reads_the_seeds_table() {
    let Some(url) = std::env::var("SPENDGUARD_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        skipped("skipped a PostgreSQL test (the seed import)");
        return;
    };
    let schema = format!("sg_seed_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
             CREATE TABLE {schema}.ai_usage (
                 id uuid PRIMARY KEY, user_id text NOT NULL, company_id text,
                 tenant_id text NOT NULL, model text NOT NULL, endpoint text,
                 subscription_tier text NOT NULL, input_tokens integer NOT NULL,
                 cached_input_tokens integer, output_tokens integer NOT NULL,
                 cost_usd numeric(12, 6) NOT NULL, request_status text NOT NULL,
                 created_at timestamptz NOT NULL)"
        ))
        .await
        .unwrap();
    let copy = SEED_CSV
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<String> = l
                .split(',')
                .map(|v| {
                    if v.is_empty() {
                        "NULL".to_owned()
                    } else {
                        format!("'{v}'")
                    }
                })
                .collect();
            format!("INSERT INTO {schema}.ai_usage VALUES ({})", f.join(", "))
        })
        .collect::<Vec<_>>()
        .join(";\n");
    client.batch_execute(&copy).await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let seed_url = format!("{url}{sep}options=-csearch_path%3D{schema}");
    let s = spawn(CONFIG).await;
    let seen = std::sync::Mutex::new((0u64, 0u64));
    let summary = import::from_postgres(target(&s), &seed_url, None, 2, |_, read, total| {
        *seen.lock().unwrap() = (read, total);
    })
    .await
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), (5, 5));
    assert_eq!(summary.imported.load(Relaxed), 4, "{summary:?}");
    assert_eq!(summary.skipped.load(Relaxed), 1);
    assert_eq!(days(&s).await, seed_days());
    let again = import::from_postgres(target(&s), &seed_url, None, 2, |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(again.already.load(Relaxed), 4, "{again:?}");
    assert_eq!(days(&s).await, seed_days());
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
    s.stop().await;
}
