//! `kill -9` under load: a real process writes reservations and commits through the Guard
//! into SQLite and prints each acknowledged id; it is killed with SIGKILL at pseudo-random
//! moments over several rounds and restarted. Every acknowledged record and reservation
//! must be in the store, the rollups must equal a recount of the records, and the restored
//! ledger's counters must equal the records' sums.
//!
//! The writer acknowledges a batch once it is in the journal and projects the journal into
//! the tables behind; the kills fall while batches wait for their projection (counted) or
//! while one is being projected. After the last round, the tables that the crashed and
//! restarted projections made must equal a fresh projection of the whole journal into an
//! empty database.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spendguard_core::*;
use spendguard_store::Store;
use uuid::Uuid;

use crate::support::*;

const CHILD_ENV: &str = "SPENDGUARD_CRASH_CHILD_DB";

/// The writer process. Runs only when started by the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of kill_9_under_load_loses_nothing_acknowledged"]
async fn crash_child_writer() {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return;
    };
    let db = std::path::PathBuf::from(db);
    let g = start(sqlite_keeping_journal(&db).await, db.parent().unwrap()).await;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let g = g.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let s = subject(&format!("t{}", w % 4), &format!("u{}", (w * 7 + n) % 50));
                let r = g.reserve(reserve(s, 10_000)).await.unwrap().unwrap();
                let id = r.reservation.id;
                say(&out, &format!("reserved {id}"));
                if n % 5 == 0 {
                    continue; // left open
                }
                let c = g.commit(id, commit(1_000 + (n % 7) as i64)).await.unwrap();
                say(&out, &format!("committed {id} {}", c.usage.id));
            }
        }));
    }
    // The workers never end; the parent kills this process.
    drop(tasks);
    std::future::pending::<()>().await;
}

fn say(out: &Mutex<std::io::Stdout>, line: &str) {
    use std::io::Write;
    let mut o = out.lock().unwrap();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let mut reserved: Vec<Uuid> = Vec::new();
    let mut committed: Vec<(Uuid, Uuid)> = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pending_at_kill = 0;
    for round in 0..4 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash::crash_child_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.push(line);
            }
            lines
        });
        // Let it write for a while: between 0.4 and 1.6 seconds after it started.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = 400 + seed % 1200;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = committed.len();
        for line in lines {
            let parts: Vec<_> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["reserved", id] => reserved.push(id.parse().unwrap()),
                ["committed", id, usage] => {
                    committed.push((id.parse().unwrap(), usage.parse().unwrap()))
                }
                _ => {}
            }
        }
        assert!(
            committed.len() > before,
            "round {round}: the writer acknowledged nothing"
        );

        // Batches acknowledged but not projected when the process died.
        let (projected, appended) = journal_position(&db);
        if appended > projected {
            pending_at_kill += 1;
        }

        // Every acknowledged operation is in the store.
        let store = sqlite_keeping_journal(&db).await;
        for id in &reserved {
            assert!(
                store.reservation(*id).await.unwrap().is_some(),
                "round {round}: lost reservation {id}"
            );
        }
        for (id, usage) in &committed {
            let u = store.usage(*usage).await.unwrap();
            assert_eq!(
                u.map(|u| u.reservation_id),
                Some(Some(*id)),
                "round {round}: lost commit {usage}"
            );
        }
        assert_rollups_match(&store).await;
        drop(store);
    }
    assert!(
        pending_at_kill > 0,
        "no kill fell while batches waited for their projection"
    );

    // The projection, crashed and restarted, equals a fresh projection of the journal.
    let store = sqlite_keeping_journal(&db).await;
    let journal = store.journal().await.unwrap();
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = sqlite(&fresh_dir.path().join("fresh.db")).await;
    for batch in &journal {
        fresh.apply(batch).await.unwrap();
    }
    fresh.close().await;
    store.close().await;
    let fresh_db = fresh_dir.path().join("fresh.db");
    for table in [
        "ai_usage",
        "reservations",
        "rollups",
        "usage_rollups",
        "budget_overrides",
        "user_overrides",
    ] {
        let (crashed, recounted) = (dump(&db, table), dump(&fresh_db, table));
        assert!(
            crashed == recounted,
            "{table}: the projection differs from a fresh one ({} rows against {})",
            crashed.len(),
            recounted.len()
        );
    }
    assert!(
        dump(&db, "ai_usage").len() >= committed.len(),
        "the records are not all there"
    );

    // The restored ledger's counters equal the records' sums (the recount).
    let dir2 = tempfile::tempdir().unwrap();
    let g = start(sqlite(&db).await, dir2.path()).await;
    let now = g.now();
    let periods = policy().calendar.periods(now);
    let recount = g.store().recount().await.unwrap();
    let mut checked = 0;
    for row in recount
        .iter()
        .filter(|r| r.window == Window::Day && r.start == periods.day.start)
    {
        let ScopeKey::User(t, u) = &row.scope else {
            continue;
        };
        let limits = g.limits(t, u, None, None).unwrap();
        let day = limits
            .iter()
            .find(|l| l.scope == row.scope && l.window == Window::Day && l.unit == Unit::Usd)
            .unwrap();
        assert_eq!(day.used, Amount::Usd(row.spent), "{:?}", row.scope);
        checked += 1;
    }
    assert!(checked > 10, "too few users checked: {checked}");
    g.shutdown().await;
}

/// The journal's cursor and its last sequence number, read straight from the files (before
/// any store opens them and projects).
fn journal_position(db: &std::path::Path) -> (i64, i64) {
    let projected = rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT projected FROM journal_cursor", [], |r| r.get(0))
        .unwrap();
    let journal = spendguard_store::SqliteStore::journal_path(&db.to_string_lossy());
    let appended = rusqlite::Connection::open(journal)
        .unwrap()
        .query_row("SELECT coalesce(max(seq), 0) FROM journal", [], |r| {
            r.get(0)
        })
        .unwrap();
    (projected, appended)
}

/// Every row of `table`, each as text, sorted.
fn dump(db: &std::path::Path, table: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare(&format!("SELECT * FROM {table}")).unwrap();
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let values: Vec<String> = (0..columns)
            .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
            .collect();
        out.push(values.join("|"));
    }
    out.sort();
    out
}
