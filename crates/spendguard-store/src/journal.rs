//! The journal: how a batch is made durable, and how it reaches the tables.
//!
//! [`Store::apply`](crate::Store::apply) appends a batch to `journal` as one row (its events
//! as a JSON array, the spool's encoding) and commits: one B-tree append per batch, whatever
//! it holds, so acknowledging costs the same for a reserve as for a thousand commits.
//! A projector then applies the journal to the tables that reports and SQL users read
//! (`ai_usage`, `reservations`, `rollups`, `usage_rollups`, the overrides) in larger
//! transactions, off the acknowledgement path:
//! - each projection transaction applies whole batches in journal order and moves the
//!   cursor (`journal_cursor.projected`, the last projected `seq`) in the same transaction,
//!   so a crash at any moment leaves every batch either projected with the cursor past it,
//!   or not projected with the cursor before it;
//! - applying a batch twice changes nothing (see the crate's docs on rollups), so even a
//!   cursor behind its tables would be harmless;
//! - every read of projected tables ([`Store::load`](crate::Store::load), the lookups by
//!   id or key, recounts, reports) first projects what is pending, so it sees every
//!   acknowledged batch;
//! - projected batches are deleted in the same transaction, unless
//!   [`OpenOptions::keep_journal`](crate::OpenOptions::keep_journal) keeps them (a complete
//!   history of events, from which every table can be recounted).
//!
//! A value a table cannot hold is refused before the append (PostgreSQL's `text` cannot
//! hold U+0000), so the caller hears of it as before. Should the projection still refuse
//! an event, it is applied alone and, refused again, kept as a dead letter; the events
//! after it are projected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use spendguard_core::Event;
use tokio::sync::Notify;

use crate::DeadLetter;
use crate::error::StoreError;

/// How often the projector looks for batches when nobody wakes it. Larger projections
/// write each rollup and index page once for more events: at 200 ms and [`PROJECT_AT`]
/// 4,096 (projections of up to 4,096 events) a SQLite projection took 0.72x the CPU per event
/// it took at 50 ms, 2,048 and 1,024 under the HTTP load (BENCHMARKS.md, with its one insert
/// per reservation settled in the same projection). A read of the projected tables
/// projects what is pending first, so this also bounds what such a read waits for.
pub(crate) const PROJECT_EVERY: Duration = Duration::from_millis(200);
/// How long a report waits for the projection of pending batches before it reads what is
/// projected (the writer may be held up: reports never wait long for it).
pub(crate) const REPORT_CATCH_UP: Duration = Duration::from_secs(1);
/// Pending events that wake the projector before [`PROJECT_EVERY`].
const PROJECT_AT: u64 = 4096;

/// What the appender and the projector share: whether batches may wait for their
/// projection (so that reads project first), and when to wake the projector.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    /// Batches this store appended (counted once each is committed).
    appends: AtomicU64,
    /// The value of `appends` seen before a projection that left nothing behind: every batch
    /// counted up to it is projected.
    caught: AtomicU64,
    /// Events appended since the projector last left nothing behind (a hint for waking it).
    waiting: AtomicU64,
    wake: Notify,
}

impl Journal {
    /// A journal that may hold batches from before this process: the projector looks at
    /// once, and the first read projects.
    pub fn unknown() -> Journal {
        Journal {
            appends: AtomicU64::new(1),
            ..Journal::default()
        }
    }

    /// Notes a committed append of `n` events, waking the projector when enough wait.
    pub fn appended(&self, n: usize) {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let before = self.waiting.fetch_add(n as u64, Ordering::Relaxed);
        if before < PROJECT_AT && before + n as u64 >= PROJECT_AT {
            self.wake.notify_one();
        }
    }

    /// What a projection must note when it finishes: taken before it reads the journal, so
    /// that an append committed after the read keeps the journal pending.
    pub fn observe(&self) -> u64 {
        self.appends.load(Ordering::SeqCst)
    }

    /// Notes that a projection that began at `observed` left batches behind (`more`) or none.
    pub fn projected(&self, observed: u64, more: bool) {
        if !more {
            self.caught.fetch_max(observed, Ordering::SeqCst);
            self.waiting.store(0, Ordering::Relaxed);
        }
    }

    /// Whether batches may wait for their projection.
    pub fn pending(&self) -> bool {
        self.appends.load(Ordering::SeqCst) > self.caught.load(Ordering::SeqCst)
    }

    /// Waits until the projector should look again.
    pub async fn wait(&self) {
        let _ = tokio::time::timeout(PROJECT_EVERY, self.wake.notified()).await;
    }
}

/// The projector: waits until batches may wait, then runs `project` (one projection
/// transaction, answering whether batches remain; `None` once the store is gone, which ends
/// the loop) and goes on at once while batches remain.
pub(crate) async fn run_projector<F, P>(journal: Arc<Journal>, mut project: F)
where
    F: FnMut() -> Option<P>,
    P: std::future::Future<Output = Result<bool, StoreError>>,
{
    let mut more = false;
    loop {
        if more {
            // Let appends waiting for the connection in first.
            tokio::task::yield_now().await;
        } else {
            journal.wait().await;
            if !journal.pending() {
                continue;
            }
        }
        let seen = journal.observe();
        let Some(projection) = project() else { return };
        more = match projection.await {
            Ok(more) => {
                journal.projected(seen, more);
                more
            }
            Err(e) => {
                tracing::warn!(error = %e, "projecting the journal failed; retrying");
                false
            }
        };
    }
}

/// Runs `catch_up` for a report: at most [`REPORT_CATCH_UP`], then the report reads what
/// is projected.
pub(crate) async fn for_report(
    catch_up: impl std::future::Future<Output = Result<(), StoreError>>,
) -> Result<(), StoreError> {
    match tokio::time::timeout(REPORT_CATCH_UP, catch_up).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!("the journal's projection is held up; reporting what is projected");
            Ok(())
        }
    }
}

/// A batch as a journal row: a JSON array of its events. With `nul_free`, a string holding
/// U+0000 refuses the batch (as PostgreSQL's `text` would at projection).
pub(crate) fn encode(events: &[Event], nul_free: bool) -> Result<Vec<u8>, StoreError> {
    let bytes = serde_json::to_vec(events)
        .map_err(|e| StoreError::Invalid(format!("cannot encode a batch: {e}")))?;
    if nul_free && holds_nul(&bytes) {
        return Err(StoreError::Invalid(
            "a text value holds U+0000, which PostgreSQL's text cannot store \
             (SQLSTATE 22021, character_not_in_repertoire)"
                .into(),
        ));
    }
    Ok(bytes)
}

/// Journal batches taken for one projection, in journal order: whole batches, until about a
/// limit of events.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Every event taken, in order.
    pub events: Vec<Event>,
    /// Each batch's sequence number and where its events are in `events`.
    batches: Vec<(i64, std::ops::Range<usize>)>,
    /// Batches were left for the next projection.
    pub more: bool,
}

impl Taken {
    /// Takes the batch of row `seq` unless `limit` events are taken already (then notes
    /// that more remain and returns `false`: stop reading).
    pub fn take(&mut self, limit: usize, seq: i64, body: &[u8]) -> Result<bool, StoreError> {
        if self.events.len() >= limit {
            self.more = true;
            return Ok(false);
        }
        let start = self.events.len();
        self.events.extend(decode(seq, body)?);
        self.batches.push((seq, start..self.events.len()));
        Ok(true)
    }

    /// The sequence number of the last batch taken.
    pub fn last(&self) -> Option<i64> {
        self.batches.last().map(|(seq, _)| *seq)
    }

    /// Every event taken with its batch's sequence number and its index in the batch.
    pub fn each(&self) -> impl Iterator<Item = (i64, usize, &Event)> {
        self.batches.iter().flat_map(|(seq, range)| {
            self.events[range.clone()]
                .iter()
                .enumerate()
                .map(|(i, e)| (*seq, i, e))
        })
    }
}

/// A journal row's events.
pub(crate) fn decode(seq: i64, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("journal batch {seq} cannot be read: {e}")))
}

/// Whether JSON text holds the escape of U+0000 (`\u0000` after an even run of backslashes,
/// so that an escaped backslash followed by `u0000` is not one).
fn holds_nul(json: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = memchr_backslash(&json[i..]) {
        let start = i + at;
        let mut end = start;
        while end < json.len() && json[end] == b'\\' {
            end += 1;
        }
        // An odd run: its last backslash starts an escape.
        if (end - start) % 2 == 1 && json[end..].starts_with(b"u0000") {
            return true;
        }
        i = end;
    }
    false
}

/// An event the projection refused for good, as a dead letter named after its place in the
/// journal (so projecting it again keeps one row).
pub(crate) fn dead_letter(seq: i64, index: usize, event: &Event, error: &StoreError) -> DeadLetter {
    DeadLetter {
        id: format!("journal-{seq}-{index}"),
        event: serde_json::to_string(event).unwrap_or_default(),
        // PostgreSQL's `text` cannot hold U+0000, wherever it comes from.
        error: error.to_string().replace('\0', "\\u0000"),
        created_at: crate::common::now_micros(),
    }
}

fn memchr_backslash(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(holds_nul(br#"["a\u0000"]"#));
        assert!(holds_nul(br#"["\\\u0000"]"#));
        assert!(!holds_nul(br#"["\\u0000"]"#));
        assert!(!holds_nul(br#"["\u0001", "\\"]"#));
        assert!(!holds_nul(b"[]"));
        let text = serde_json::to_vec(&["x\0y".to_string()]).unwrap();
        assert!(holds_nul(&text));
        let text = serde_json::to_vec(&["x\\u0000y".to_string()]).unwrap();
        assert!(!holds_nul(&text));
    }

    #[test]
    fn pending_until_a_projection_that_began_after_the_append_finds_nothing() {
        let j = Journal::default();
        assert!(!j.pending());
        j.appended(3);
        assert!(j.pending());
        let seen = j.observe();
        j.projected(seen, true);
        assert!(
            j.pending(),
            "batches remained: the projector must look again"
        );
        // A projection that read the journal before an append committed does not clear it.
        let seen = j.observe();
        j.appended(1);
        j.projected(seen, false);
        assert!(j.pending(), "the later append was not projected");
        let seen = j.observe();
        j.projected(seen, false);
        assert!(!j.pending());
        assert!(Journal::unknown().pending());
    }
}
