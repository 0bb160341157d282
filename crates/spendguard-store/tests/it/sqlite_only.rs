//! Tests particular to the SQLite backend.

use spendguard_core::Event;
use spendguard_store::{AnyStore, OpenOptions, SqliteStore, Store, StoreError};

use crate::support::*;

fn temp_path() -> (Db, String) {
    let dir = std::env::temp_dir().join(format!("spendguard-store-test-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("db.sqlite").to_string_lossy().into_owned();
    (
        Db::Sqlite {
            dir,
            path: path.clone(),
        },
        path,
    )
}

#[tokio::test]
async fn every_url_form_opens_the_same_file() {
    let (_db, path) = temp_path();
    let options = OpenOptions::default();
    let store = AnyStore::open(&path, &options).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    store.close().await;
    for url in [format!("sqlite:{path}"), format!("sqlite://{path}")] {
        let store = AnyStore::open(&url, &options).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        assert_eq!(store.usage_count().await.unwrap(), 1, "{url}");
        store.close().await;
    }
    assert!(std::path::Path::new(&format!("{path}.lock")).exists());
}

#[tokio::test]
async fn an_unreachable_file_is_unavailable() {
    let path = std::env::temp_dir()
        .join(format!("spendguard-missing-{}", unique()))
        .join("sub")
        .join("db.sqlite");
    let path = path.to_string_lossy();
    for take_writer_lock in [true, false] {
        let options = OpenOptions {
            take_writer_lock,
            ..OpenOptions::default()
        };
        let err = SqliteStore::open(&path, &options).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
    assert!(matches!(
        SqliteStore::open("", &OpenOptions::default()).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn the_file_has_the_documented_columns() {
    let (_db, path) = temp_path();
    let store = SqliteStore::open(
        &path,
        &OpenOptions {
            sync_every_batch: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let mut r = record(1);
    r.cost = spendguard_core::Money::from_micros(1_234_567);
    store.apply(&[Event::Recorded(r.clone())]).await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (usd, micros, created, status): (f64, i64, i64, String) = conn
        .query_row(
            "SELECT cost_usd, cost_micros, created_at, request_status FROM ai_usage",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(usd, 1.234567);
    assert_eq!(micros, 1_234_567);
    assert_eq!(created, r.created_at);
    assert_eq!(status, "success");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // The status is checked by the database too.
    let err = conn
        .execute("UPDATE ai_usage SET request_status = 'bogus'", [])
        .unwrap_err();
    assert!(err.to_string().contains("CHECK"), "{err}");
    for table in [
        "reservations",
        "rollups",
        "budget_overrides",
        "user_overrides",
        "api_keys",
        "alerts",
        "webhook_deliveries",
        "schema_migrations",
    ] {
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .unwrap();
        assert!(n >= 0);
    }
}

#[tokio::test]
async fn a_memory_database_works_without_a_lock_file() {
    let store = SqliteStore::open(":memory:", &OpenOptions::default())
        .await
        .unwrap();
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    assert_eq!(store.usage_count().await.unwrap(), 1);
    assert_eq!(
        store.rollups().await.unwrap(),
        store.recount().await.unwrap()
    );
}
