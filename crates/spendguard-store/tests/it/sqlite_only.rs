//! Tests particular to the SQLite backend.

use std::time::Duration;

use spendguard_core::Event;
use spendguard_store::{
    AlertQuery, AnyStore, GroupBy, OpenOptions, ReportQuery, SqliteStore, Store, StoreError,
};

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

/// A store holding the writer lock on the file at `path`.
async fn writer(path: &str) -> SqliteStore {
    SqliteStore::open(path, &OpenOptions::default())
        .await
        .unwrap()
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
    store.catch_up().await.unwrap();
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
    // The rollups hold the token split, and `usage_rollups` the dimensions that `rollups`
    // does not hold.
    let split: Vec<(String, String, i64, i64, i64, i64)> = conn
        .prepare(
            "SELECT scope_kind, \"window\", tokens, input_tokens, cached_input_tokens, \
             output_tokens FROM rollups ORDER BY scope_kind, \"window\"",
        )
        .unwrap()
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // Global, tenant, company and user × (day, month), and the user's week.
    assert_eq!(split.len(), 9);
    for (kind, window, tokens, input, cached, output) in &split {
        assert_eq!(
            (*tokens, *input, *cached, *output),
            (1500, 1200, 200, 300),
            "{kind} {window}"
        );
    }
    let dims: Vec<String> = conn
        .prepare("SELECT DISTINCT dim FROM usage_rollups ORDER BY dim")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(dims, ["endpoint", "model", "user_model"]);
    let indexes: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'rollups' \
             AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, ["rollups_tenant"]);
    // The counters are ordered by window first (migration 6): the current windows, read at
    // start-up, and a report's days are ranges of the primary key, not one lookup per row.
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT spent_micros FROM rollups \
             WHERE scope_kind IN ('global', 'tenant', 'company', 'user') \
             AND \"window\" = 'day' AND window_start >= 0",
        )
        .unwrap()
        .query_map([], |row| row.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter().any(|p| p.contains(
            "USING PRIMARY KEY (scope_kind=? AND window=? AND window_start>?)"
        )),
        "{plan:?}"
    );
    for table in [
        "reservations",
        "rollups",
        "usage_rollups",
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
    // Reads of analytics use the one connection (a second would open another database).
    let report = store.report(&day_report()).await.unwrap();
    assert_eq!(report.totals.requests, 1);
    assert_eq!(report.rows[0].day, Some(record(1).day_start));
    assert!(
        store
            .alerts(&AlertQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
}

fn day_report() -> ReportQuery {
    ReportQuery {
        from_day: i64::MIN,
        to_day: i64::MAX,
        ..ReportQuery::default()
    }
}

/// A report whose caller gave up stops instead of reading on: here the flag is set before
/// the read starts; the read checks it at every row too.
#[tokio::test]
async fn a_cancelled_report_stops() {
    let store = SqliteStore::open(":memory:", &OpenOptions::default())
        .await
        .unwrap();
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let err = store
        .report_cancellable(&day_report(), cancel)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(
        store.report(&day_report()).await.unwrap().totals.requests,
        1
    );
}

/// Reports run on their own connection: a projection waiting for the database's write lock
/// (holding the store's writer connection) does not hold them up; they wait a bounded time
/// for the projection of the journal, then report what is projected. (The batch itself is
/// acknowledged: its append needs no lock on the main file.)
#[tokio::test]
async fn reports_do_not_wait_for_the_writer() {
    let (_db, path) = temp_path();
    let store = std::sync::Arc::new(
        SqliteStore::open(&path, &OpenOptions::default())
            .await
            .unwrap(),
    );
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    store.catch_up().await.unwrap();
    // Another connection takes the write lock and keeps it.
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("BEGIN IMMEDIATE; DELETE FROM api_keys;")
        .unwrap();
    store.apply(&[Event::Recorded(record(2))]).await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(2), store.report(&day_report()))
        .await
        .expect("the report does not wait for the writer")
        .unwrap();
    assert_eq!(report.totals.requests, 1);
    tokio::time::timeout(Duration::from_secs(2), store.alerts(&AlertQuery::default()))
        .await
        .expect("listing alerts does not wait for the writer")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), store.deliveries())
        .await
        .expect("listing deliveries does not wait for the writer")
        .unwrap();
    other.execute_batch("COMMIT").unwrap();
    let report = store.report(&day_report()).await.unwrap();
    assert_eq!(report.totals.requests, 2);
}

/// `usage_rollups` rebuilt from `ai_usage` after being lost equals the maintained one.
#[tokio::test]
async fn lost_usage_rollups_are_rebuilt() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    let events: Vec<Event> = (1..=40)
        .map(|n| {
            let mut r = record(n);
            r.user = user(&format!("u{}", n % 7));
            r.day_start += (n % 3) as i64 * DAY;
            Event::Recorded(r)
        })
        .collect();
    store.apply(&events).await.unwrap();
    let mut before = Vec::new();
    for group_by in GroupBy::ALL {
        before.push(
            store
                .report(&ReportQuery {
                    group_by,
                    ..day_report()
                })
                .await
                .unwrap(),
        );
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM usage_rollups", [], |r| r.get(0))
        .unwrap();
    // 3 days × (1 model + 1 endpoint + 7 users of the model): every user is seen on every
    // day (the record numbers 1 to 40 cover every pair of remainders by 7 and by 3).
    assert_eq!(rows, 27);
    conn.execute("DELETE FROM usage_rollups", []).unwrap();
    let models = ReportQuery {
        group_by: GroupBy::Model,
        ..day_report()
    };
    assert_eq!(store.report(&models).await.unwrap().groups, 0);
    // The groupings read from `rollups` do not depend on it.
    assert_eq!(store.report(&day_report()).await.unwrap().groups, 3);
    store.rebuild_usage_rollups().await.unwrap();
    let again: i64 = conn
        .query_row("SELECT count(*) FROM usage_rollups", [], |r| r.get(0))
        .unwrap();
    assert_eq!(again, rows);
    for (group_by, want) in GroupBy::ALL.into_iter().zip(before) {
        let got = store
            .report(&ReportQuery {
                group_by,
                ..day_report()
            })
            .await
            .unwrap();
        assert_eq!(got, want, "{group_by:?}");
    }
}

/// An event the projection refuses for good (here a trigger an operator added refuses its
/// model) is applied alone and kept as a dead letter; its batch mates and every later batch
/// are projected, and the cursor moves on.
#[tokio::test]
async fn an_event_the_projection_refuses_is_dead_lettered_and_the_rest_projected() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON ai_usage WHEN NEW.model = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'poisoned model'); END;",
        )
        .unwrap();
    let mut bad = record(2);
    bad.model = spendguard_core::ModelName::parse("poison").unwrap();
    store
        .apply(&[
            Event::Recorded(record(1)),
            Event::Recorded(bad.clone()),
            Event::Recorded(record(3)),
        ])
        .await
        .unwrap();
    store.apply(&[Event::Recorded(record(4))]).await.unwrap();
    for n in [1, 3, 4] {
        assert_eq!(store.usage(record(n).id).await.unwrap(), Some(record(n)));
    }
    assert_eq!(store.usage(bad.id).await.unwrap(), None);
    assert_eq!(store.usage_count().await.unwrap(), 3);
    assert_eq!(
        store.recount().await.unwrap(),
        store.rollups().await.unwrap()
    );
    let letters = store.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].id.ends_with("-1"), "{letters:?}");
    assert!(letters[0].event.contains("poison"), "{letters:?}");
    assert!(letters[0].error.contains("poisoned model"), "{letters:?}");
    // Nothing waits: the cursor passed the refused event.
    let (projected, last) = journal_position(&path);
    assert_eq!(projected, last);
    store.close().await;
}

/// An append needs no lock on the main database file: while another connection holds its
/// write lock (as a projection transaction does), a batch is still acknowledged, and it is
/// projected once the lock is let go.
#[tokio::test]
async fn an_append_does_not_wait_for_the_main_file() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    assert!(store.usage(record(1).id).await.unwrap().is_some());

    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let appended = store.apply(&[Event::Recorded(record(2))]).await;
    holder.execute_batch("COMMIT").unwrap();
    appended.expect("the append waited for the main file's write lock");
    assert_eq!(store.usage(record(2).id).await.unwrap(), Some(record(2)));
    assert_eq!(
        store.recount().await.unwrap(),
        store.rollups().await.unwrap()
    );
    store.close().await;
}

/// The journal's cursor (in the main file) and the last sequence number the journal file
/// handed out.
fn journal_position(path: &str) -> (i64, i64) {
    let projected = rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT projected FROM journal_cursor", [], |r| r.get(0))
        .unwrap();
    let last = rusqlite::Connection::open(SqliteStore::journal_path(path))
        .unwrap()
        .query_row(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'journal'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (projected, last)
}

/// A journal file that went missing (its batches all projected) starts again after the
/// cursor: a batch numbered at or below it would be taken for a projected one and never
/// reach the tables.
#[tokio::test]
async fn a_lost_journal_file_does_not_reuse_sequence_numbers() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    for n in 1..=3 {
        store.apply(&[Event::Recorded(record(n))]).await.unwrap();
    }
    store.close().await;
    assert_eq!(journal_position(&path), (3, 3));
    let journal = SqliteStore::journal_path(&path);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{journal}{suffix}"));
    }

    let store = writer(&path).await;
    store.apply(&[Event::Recorded(record(4))]).await.unwrap();
    assert_eq!(store.usage(record(4).id).await.unwrap(), Some(record(4)));
    assert_eq!(store.usage_count().await.unwrap(), 4);
    store.close().await;
    assert_eq!(journal_position(&path), (4, 4));
    assert_eq!(
        journal_rows(&path),
        0,
        "projected batches were left in the journal file"
    );
}

/// How many batches the journal file holds.
fn journal_rows(path: &str) -> i64 {
    rusqlite::Connection::open(SqliteStore::journal_path(path))
        .unwrap()
        .query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
        .unwrap()
}

/// A database whose journal batches wait in the main file's `journal` table (where versions
/// before the journal file appended them) has them moved to the journal file at open and
/// projected, once each; later batches are numbered after them.
#[tokio::test]
async fn batches_in_the_main_files_journal_are_moved_and_projected() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    store.apply(&[Event::Recorded(record(1))]).await.unwrap();
    store.close().await;
    assert_eq!(journal_position(&path).0, 1);

    // Two batches acknowledged by an older version, not projected when it stopped.
    let conn = rusqlite::Connection::open(&path).unwrap();
    for (seq, n) in [(2, 2), (3, 3)] {
        let events = serde_json::to_vec(&[Event::Recorded(record(n))]).unwrap();
        conn.execute(
            "INSERT INTO journal (seq, created_at, events) VALUES (?1, 0, ?2)",
            rusqlite::params![seq, events],
        )
        .unwrap();
    }
    drop(conn);

    let store = writer(&path).await;
    store.apply(&[Event::Recorded(record(4))]).await.unwrap();
    for n in 1..=4 {
        assert_eq!(store.usage(record(n).id).await.unwrap(), Some(record(n)));
    }
    assert_eq!(store.usage_count().await.unwrap(), 4);
    assert_eq!(
        store.recount().await.unwrap(),
        store.rollups().await.unwrap()
    );
    store.close().await;
    assert_eq!(journal_position(&path), (4, 4));
    let left: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the main file's journal table was not emptied");
}

/// A running store deletes projected batches from the journal file once their projection is
/// on disk (after a complete checkpoint of the main file), so the file does not grow with
/// the history.
#[tokio::test]
async fn a_running_store_deletes_batches_once_their_projection_is_durable() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        store.apply(&[Event::Recorded(record(n))]).await.unwrap();
        store.catch_up().await.unwrap();
        if journal_rows(&path) < n as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no projected batch was deleted in 30 s ({n} batches)"
        );
        // The deletion follows the checkpointer's timer, which has no hook to wait on: the
        // pause only paces the batches; the loop ends on the rows counted in the file.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.usage_count().await.unwrap(), n as u64);
    store.close().await;
}

/// The stored columns of reservation `n` that do not name it: its state, whether a record
/// settled it, the reason and when it was settled (relative to when it was made).
fn settled_columns(path: &str, n: u128) -> (String, bool, Option<String>, Option<i64>) {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT state, usage_id IS NOT NULL, reason, settled_at - created_at \
             FROM reservations WHERE id = ?1",
            [id(n).to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
}

/// A reservation made and settled in one projection is written in its final state at once;
/// the row is the one a reservation settled in a later projection gets, every way it can
/// be settled, and replays (of both events, or of a settlement the row no longer takes)
/// leave it as the first settlement made it.
#[tokio::test]
async fn a_reservation_settled_in_the_projection_that_makes_it_is_stored_as_if_settled_later() {
    let (_db, path) = temp_path();
    let store = writer(&path).await;
    // n: made and settled together; n + 10: made, projected, then settled.
    let settles = |r: &spendguard_core::Reservation, kind: u128| match kind {
        0 => Event::Committed {
            reservation_id: r.id,
            usage: commit_usage(r, 500 + (r.id.as_u128() % 100), 42_000),
        },
        1 => Event::Released {
            reservation_id: r.id,
            reason: Some("the caller gave up".into()),
            at: r.created_at + 5_000_000,
        },
        _ => Event::Expired {
            reservation_id: r.id,
            usage: expired_usage(r),
        },
    };
    for kind in 0..3u128 {
        let (together, apart) = (reservation(1 + kind), reservation(11 + kind));
        store
            .apply(&[Event::Reserved(together.clone()), settles(&together, kind)])
            .await
            .unwrap();
        store
            .apply(&[Event::Reserved(apart.clone())])
            .await
            .unwrap();
        store.catch_up().await.unwrap();
        assert_eq!(settled_columns(&path, 11 + kind).0, "open");
        store.apply(&[settles(&apart, kind)]).await.unwrap();
        store.catch_up().await.unwrap();
        let row = settled_columns(&path, 1 + kind);
        assert_ne!(row.0, "open", "kind {kind}");
        assert_eq!(row, settled_columns(&path, 11 + kind), "kind {kind}");
    }
    // A replay of a reservation and a different settlement: the first one stays.
    let committed = reservation(1);
    store
        .apply(&[Event::Reserved(committed.clone()), settles(&committed, 1)])
        .await
        .unwrap();
    store.catch_up().await.unwrap();
    assert_eq!(settled_columns(&path, 1).0, "committed");
    assert_eq!(settled_columns(&path, 1), settled_columns(&path, 11));
    // A reservation projected open, then made again and settled in one projection (a
    // replayed batch beside its settlement): settled.
    let open = reservation(21);
    store.apply(&[Event::Reserved(open.clone())]).await.unwrap();
    store.catch_up().await.unwrap();
    store
        .apply(&[Event::Reserved(open.clone()), settles(&open, 0)])
        .await
        .unwrap();
    store.catch_up().await.unwrap();
    assert_eq!(settled_columns(&path, 21), settled_columns(&path, 11));
    assert_eq!(
        store.recount().await.unwrap(),
        store.rollups().await.unwrap()
    );
    store.close().await;
}
