//! Tests particular to the PostgreSQL backend.

use std::time::Duration;

use spendguard_core::Event;
use spendguard_store::{AnyStore, OpenOptions, PostgresStore, Store, StoreError};
use tokio_postgres::NoTls;

use crate::support::*;

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    for url in [
        "postgres://postgres@127.0.0.1:1/test",
        "postgresql://postgres@127.0.0.1:1/test?connect_timeout=2",
    ] {
        let err = AnyStore::open(url, &OpenOptions::default())
            .await
            .unwrap_err();
        assert!(err.is_unavailable(), "{url}: {err:?}");
        let err = PostgresStore::open(
            url,
            &OpenOptions {
                take_writer_lock: false,
                ..OpenOptions::default()
            },
        )
        .await
        .unwrap_err();
        assert!(err.is_unavailable(), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn bad_urls_are_invalid() {
    for url in [
        "postgres://postgres@127.0.0.1:1/test?sslmode=require",
        "postgres://postgres@127.0.0.1:1/test?bogus_option=1",
    ] {
        let err = AnyStore::open(url, &OpenOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{url}: {err:?}");
    }
}

/// The client of the test database.
async fn admin() -> tokio_postgres::Client {
    let url = std::env::var("SPENDGUARD_TEST_DATABASE_URL").unwrap();
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn schema(db: &Db) -> &str {
    match db {
        Db::Postgres { schema, .. } => schema,
        Db::Sqlite { .. } => unreachable!(),
    }
}

#[tokio::test]
async fn a_failing_batch_changes_nothing() {
    let Some(db) = make_pg().await else { return };
    let store = db.store().await;
    let res = reservation(1);
    let mut bad = record(2);
    // Before PostgreSQL's earliest timestamp.
    bad.created_at = -210_866_803_200_000_001;
    let err = store
        .apply(&[Event::Reserved(res.clone()), Event::Recorded(bad)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(store.reservation(res.id).await.unwrap(), None);
    assert_eq!(store.usage_count().await.unwrap(), 0);
    // The store still works.
    store.apply(&[Event::Reserved(res.clone())]).await.unwrap();
    assert!(store.reservation(res.id).await.unwrap().is_some());
}

#[tokio::test]
async fn the_tables_have_the_documented_columns() {
    let Some(db) = make_pg().await else { return };
    let store = db.store().await;
    let mut r = record(1);
    r.cost = spendguard_core::Money::from_micros(1_234_567);
    store.apply(&[Event::Recorded(r)]).await.unwrap();
    store.catch_up().await.unwrap();
    let admin = admin().await;
    let row = admin
        .query_one(
            &format!(
                "SELECT cost_usd::text, to_char(created_at AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD HH24:MI:SS'), request_status FROM {}.ai_usage",
                schema(&db)
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "1.234567");
    assert_eq!(row.get::<_, &str>(1), "2024-01-10 01:00:00");
    assert_eq!(row.get::<_, &str>(2), "success");
    let err = admin
        .execute(
            &format!(
                "UPDATE {}.ai_usage SET request_status = 'bogus'",
                schema(&db)
            ),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION),
        "{err:?}"
    );
    // The rollups hold the token split, and `usage_rollups` the dimensions that `rollups`
    // does not hold.
    let rows = admin
        .query(
            &format!(
                "SELECT scope_kind, tokens, input_tokens, cached_input_tokens, output_tokens \
                 FROM {}.rollups",
                schema(&db)
            ),
            &[],
        )
        .await
        .unwrap();
    // Global, tenant, company and user × (day, month), and the user's week.
    assert_eq!(rows.len(), 9);
    for row in &rows {
        let sums: [i64; 4] = [row.get(1), row.get(2), row.get(3), row.get(4)];
        assert_eq!(sums, [1500, 1200, 200, 300], "{}", row.get::<_, &str>(0));
    }
    let dims: Vec<String> = admin
        .query(
            &format!(
                "SELECT DISTINCT dim FROM {}.usage_rollups ORDER BY dim",
                schema(&db)
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dims, ["endpoint", "model", "user_model"]);
    let indexes: Vec<String> = admin
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 \
             AND tablename = 'rollups' ORDER BY indexname",
            &[&schema(&db)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        ["rollups_kind_window", "rollups_pkey", "rollups_window"]
    );
}

#[tokio::test]
async fn writer_locks_are_per_schema() {
    let Some(one) = make_pg().await else { return };
    let Some(two) = make_pg().await else { return };
    let a = one.store().await;
    let b = two.store().await;
    assert!(matches!(
        one.open(&OpenOptions::default()).await,
        Err(StoreError::Locked(_))
    ));
    assert!(matches!(
        two.open(&OpenOptions::default()).await,
        Err(StoreError::Locked(_))
    ));
    a.close().await;
    b.close().await;
}

/// The backend holding the writer lock of `schema`, if any.
async fn lock_holder(admin: &tokio_postgres::Client, schema: &str) -> Option<i32> {
    admin
        .query_opt(
            "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
             AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database \
             WHERE datname = current_database()) \
             AND ((l.classid::int8 << 32) | l.objid::int8) = hashtextextended( \
             'spendguard-writer:' || current_database() || '.' || $1, 0)",
            &[&schema],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn a_lost_lock_connection_is_replaced() {
    let Some(db) = make_pg().await else { return };
    let store = db.store().await;
    let admin = admin().await;
    let pid = lock_holder(&admin, schema(&db))
        .await
        .expect("the store holds the lock");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The next batches take the lock again on a new connection (terminating is asynchronous:
    // the old session may hold the lock a moment longer).
    let mut n = 0;
    loop {
        n += 1;
        store.apply(&[Event::Recorded(record(n))]).await.unwrap();
        match lock_holder(&admin, schema(&db)).await {
            Some(p) if p != pid => break,
            _ => {}
        }
        assert!(n < 100, "the lock was not taken again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        db.open(&OpenOptions::default()).await,
        Err(StoreError::Locked(_))
    ));
}

/// Cluster mode: instances claiming due webhook deliveries at the same moment never get the
/// same one (each is sent once), and a claimed delivery not finished (its instance died)
/// is due again after the lease.
#[tokio::test]
async fn concurrent_claims_of_deliveries_never_overlap() {
    use spendguard_core::{Money, ScopeKey, Window};
    use spendguard_store::{AlertKind, NewAlert};
    let Some(db) = make_pg().await else { return };
    let store = db.store().await;
    let created = JAN + 9 * DAY;
    let alerts: Vec<NewAlert> = (0..40)
        .map(|i| NewAlert {
            scope: ScopeKey::Tenant(tenant(&format!("t{i}"))),
            window: Window::Day,
            window_start: created,
            threshold_percent: 80,
            kind: AlertKind::Threshold,
            amount: Money::from_micros(8_000_000),
            limit: Money::from_micros(10_000_000),
            created_at: created,
        })
        .collect();
    let urls = vec![
        "https://one.example".to_owned(),
        "https://two.example".to_owned(),
    ];
    store.insert_alerts(&alerts, &urls).await.unwrap();
    let AnyStore::Postgres(pg) = &store else {
        unreachable!()
    };
    let lease = 60_000_000;
    let (a, b, c) = tokio::join!(
        pg.claim_due_deliveries(created, 64, lease),
        pg.claim_due_deliveries(created, 64, lease),
        pg.claim_due_deliveries(created, 64, lease),
    );
    let mut ids: Vec<i64> = [a.unwrap(), b.unwrap(), c.unwrap()]
        .into_iter()
        .flatten()
        .map(|d| d.id)
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((n, ids.len()), (80, 80), "a delivery was claimed twice");
    // Claimed: not due again before the lease ends, due again after it.
    assert!(
        pg.claim_due_deliveries(created + lease - 1, 64, lease)
            .await
            .unwrap()
            .is_empty()
    );
    let again = pg
        .claim_due_deliveries(created + lease, 100, lease)
        .await
        .unwrap();
    assert_eq!(again.len(), 80);
}

/// Reading a few scopes' cluster totals by key (as `/v1/check` and `/v1/limits` do in cluster
/// mode) looks those scopes up: it never sums every scope's row with its allowances first.
/// Checked on the plan, with sequential scans and hash and merge joins off so that it does
/// not follow the (empty) table's statistics: a view that groups before the keys can narrow
/// it has no plan that looks the keys up.
#[tokio::test]
async fn cluster_totals_are_read_by_key() {
    let Some(db) = make_pg().await else { return };
    let _store = db.store().await;
    let admin = admin().await;
    let plan: Vec<String> = admin
        .simple_query(&format!(
            "SET search_path = {}; SET enable_seqscan = off; SET enable_hashjoin = off; \
             SET enable_mergejoin = off; \
             EXPLAIN SELECT c.* FROM cluster_scope_totals AS c \
             JOIN UNNEST(ARRAY['user', 'tenant'], ARRAY['acme', 'acme'], \
             ARRAY['alice', 'acme']) AS u (k, t, i) \
             ON (c.scope_kind, c.tenant_id, c.scope_id) = (u.k, u.t, u.i)",
            schema(&db)
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("scope_kind = u.k"),
        "the keys do not reach scope_counters:\n{plan}"
    );
    assert!(
        !plan.contains("GroupAggregate") && !plan.contains("HashAggregate"),
        "every scope is summed:\n{plan}"
    );
}
