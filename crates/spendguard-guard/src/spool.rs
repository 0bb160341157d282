//! The spool: a local append-only file of event batches that could not be written to the
//! store (PostgreSQL unreachable). It starts with a header naming the database it belongs
//! to; each batch is then one frame:
//!
//! ```text
//! header: [magic "SGSPOOL\n"][format: u16 LE][id length: u16 LE][database id: UTF-8]
//!         [CRC-32 of everything before: u32 LE]
//! frame:  [frame version: u8][payload length: u32 LE][CRC-32 of version and payload: u32 LE]
//!         [payload: JSON array of events]
//! ```
//!
//! - A frame is synced to disk before its batch is acknowledged. An append that fails is
//!   cut off again (and synced) before the error is answered, so no torn frame is ever
//!   followed by acknowledged ones.
//! - Only a torn *tail* is cut when opening: an incomplete last frame, from a crash in the
//!   middle of an append, which was never acknowledged. Any other damage (a bad checksum,
//!   an unknown frame version, a payload this version cannot decode, a spool of another
//!   database) refuses the open with the file and the byte offset, so nothing acknowledged
//!   is dropped; `spendguard spool inspect` and `spendguard spool export` read such a file.
//! - Frames are replayed in order and marked applied one by one; the file is emptied only
//!   when every frame was applied. Replaying is safe more than once (a crash before the
//!   file was emptied) because the store applies events idempotently.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use spendguard_core::Event;

/// The largest frame accepted when reading (a guard against a corrupt length).
const MAX_FRAME: u32 = 256 * 1024 * 1024;
/// The first bytes of every spool file.
const MAGIC: &[u8; 8] = b"SGSPOOL\n";
/// The file format this version writes and reads.
pub const FORMAT: u16 = 1;
/// The frame version this version writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Version, length, checksum.
const FRAME_HEADER: usize = 9;

/// Failure injection for tests: while `fail_appends` is set, an append writes half of its
/// frame and then fails, as a full disk would.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub fail_appends: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Faults {
    fn append_fails(&self) -> bool {
        self.fail_appends.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The spool file's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub format: u16,
    pub database_id: String,
    /// Its length in bytes: the offset of the first frame.
    pub len: u64,
}

/// One valid frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameInfo {
    pub offset: u64,
    /// Header and payload.
    pub len: u64,
    pub version: u8,
    pub events: Vec<Event>,
}

/// What stops a scan before the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// An incomplete last frame (a crash in the middle of an append; never acknowledged).
    TornTail { offset: u64 },
    /// Damage that may hide acknowledged batches: the spool must not be used as it is.
    Bad { offset: u64, reason: String },
}

/// Everything a spool file holds, read without changing it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scan {
    /// `None` for an empty file (or one cut before its header was complete).
    pub header: Option<Header>,
    pub frames: Vec<FrameInfo>,
    /// The end of the last valid frame (or of the header).
    pub valid_len: u64,
    pub file_len: u64,
    pub problem: Option<Problem>,
}

/// Reads a spool file from start to end (or to its first problem), changing nothing.
pub fn scan(path: &Path) -> io::Result<Scan> {
    let data = std::fs::read(path)?;
    Ok(scan_bytes(&data))
}

fn scan_bytes(data: &[u8]) -> Scan {
    let mut scan = Scan {
        file_len: data.len() as u64,
        ..Scan::default()
    };
    let header = match parse_header(data) {
        Ok(Some(h)) => h,
        Ok(None) => return scan,
        Err(reason) => {
            if let Some(legacy) = scan_legacy(data) {
                return legacy;
            }
            scan.problem = Some(Problem::Bad { offset: 0, reason });
            return scan;
        }
    };
    let mut at = header.len as usize;
    scan.valid_len = header.len;
    scan.header = Some(header);
    while at < data.len() {
        match parse_frame(data, at) {
            Ok(frame) => {
                at += frame.len as usize;
                scan.valid_len = at as u64;
                scan.frames.push(frame);
            }
            Err(problem) => {
                scan.problem = Some(problem);
                break;
            }
        }
    }
    scan
}

/// Reads a spool of the first format (frames `[length][CRC-32][JSON]`, no header), as left
/// by an earlier version; `None` if the file does not start with such a frame. Its frames
/// have version 0 and no database is named.
fn scan_legacy(data: &[u8]) -> Option<Scan> {
    let mut scan = Scan {
        file_len: data.len() as u64,
        ..Scan::default()
    };
    let mut at = 0usize;
    while at < data.len() {
        let offset = at as u64;
        let rest = &data[at..];
        if rest.len() < 8 {
            if at == 0 {
                return None;
            }
            scan.problem = Some(Problem::TornTail { offset });
            break;
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let end = 8 + len as usize;
        if len > MAX_FRAME || rest.len() < end {
            if at == 0 {
                return None;
            }
            scan.problem = Some(Problem::TornTail { offset });
            break;
        }
        let payload = &rest[8..end];
        let events = (crc32fast::hash(payload) == crc)
            .then(|| serde_json::from_slice::<Vec<Event>>(payload).ok())
            .flatten();
        let Some(events) = events else {
            if at == 0 {
                return None;
            }
            scan.problem = Some(Problem::Bad {
                offset,
                reason: "a frame of the first spool format is damaged or cannot be decoded".into(),
            });
            break;
        };
        scan.frames.push(FrameInfo {
            offset,
            len: end as u64,
            version: 0,
            events,
        });
        at += end;
        scan.valid_len = at as u64;
    }
    Some(scan)
}

/// Rewrites a spool of the first format in the current one (for `database_id`), through a
/// temporary file renamed over it, so a crash leaves either the old or the new file.
fn upgrade_legacy(path: &Path, scan: &Scan, database_id: &str) -> io::Result<()> {
    let mut data = encode_header(database_id)?;
    for f in &scan.frames {
        data.extend_from_slice(&encode_frame(&f.events)?);
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".upgrading");
    let tmp = path.with_file_name(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(&data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(path);
    Ok(())
}

fn encode_frame(events: &[Event]) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(events).map_err(io::Error::other)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("batch too large for the spool"))?;
    let mut frame = Vec::with_capacity(payload.len() + FRAME_HEADER);
    frame.push(FRAME_VERSION);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&frame_crc(FRAME_VERSION, &payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// `Ok(None)`: an empty file, or a header cut short by a crash while the file was created.
fn parse_header(data: &[u8]) -> Result<Option<Header>, String> {
    if data.is_empty() {
        return Ok(None);
    }
    let n = data.len().min(MAGIC.len());
    if data[..n] != MAGIC[..n] {
        return Err("not a spendguard spool of this format (no SGSPOOL header)".into());
    }
    if data.len() < MAGIC.len() + 4 {
        return Ok(None);
    }
    let format = u16::from_le_bytes([data[8], data[9]]);
    if format != FORMAT {
        return Err(format!(
            "spool format {format}; this version of spendguard reads format {FORMAT}"
        ));
    }
    let id_len = u16::from_le_bytes([data[10], data[11]]) as usize;
    let end = 12 + id_len;
    if data.len() < end + 4 {
        return Ok(None);
    }
    let crc = u32::from_le_bytes(data[end..end + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&data[..end]) != crc {
        return Err("the header's checksum does not match".into());
    }
    let database_id = std::str::from_utf8(&data[12..end])
        .map_err(|_| "the header's database id is not UTF-8".to_owned())?
        .to_owned();
    Ok(Some(Header {
        format,
        database_id,
        len: (end + 4) as u64,
    }))
}

fn encode_header(database_id: &str) -> io::Result<Vec<u8>> {
    let id_len = u16::try_from(database_id.len())
        .map_err(|_| io::Error::other("database id too long for the spool header"))?;
    let mut h = Vec::with_capacity(16 + database_id.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT.to_le_bytes());
    h.extend_from_slice(&id_len.to_le_bytes());
    h.extend_from_slice(database_id.as_bytes());
    h.extend_from_slice(&crc32fast::hash(&h).to_le_bytes());
    Ok(h)
}

fn parse_frame(data: &[u8], at: usize) -> Result<FrameInfo, Problem> {
    let offset = at as u64;
    let bad = |reason: String| Problem::Bad { offset, reason };
    let rest = &data[at..];
    let version = rest[0];
    if version != FRAME_VERSION {
        return Err(bad(format!(
            "frame version {version}; this version of spendguard reads version {FRAME_VERSION}"
        )));
    }
    if rest.len() < FRAME_HEADER {
        return Err(Problem::TornTail { offset });
    }
    let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(rest[5..9].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(bad(format!(
            "frame length {len} is larger than any spool frame"
        )));
    }
    let end = FRAME_HEADER + len as usize;
    if rest.len() < end {
        return Err(Problem::TornTail { offset });
    }
    let payload = &rest[FRAME_HEADER..end];
    if frame_crc(version, payload) != crc {
        return Err(bad("the frame's checksum does not match".into()));
    }
    let events = serde_json::from_slice::<Vec<Event>>(payload)
        .map_err(|e| bad(format!("the frame's events cannot be decoded: {e}")))?;
    Ok(FrameInfo {
        offset,
        len: end as u64,
        version,
        events,
    })
}

fn frame_crc(version: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[version]);
    h.update(payload);
    h.finalize()
}

fn refused(path: &Path, offset: u64, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the spool {} cannot be used: {reason} (at byte {offset}); nothing was removed. \
             Read it with `spendguard spool inspect {0}` and `spendguard spool export {0}`",
            path.display()
        ),
    )
}

/// An open spool file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: File,
    /// The end of the header: the length of an empty spool.
    header_len: u64,
    /// The end of the last acknowledged frame.
    bytes: u64,
    frames: u64,
    /// Frames before this offset were applied to the store (`applied` of them).
    cursor: u64,
    applied: u64,
    /// An append failed and its bytes may not have been cut off yet.
    dirty: bool,
    faults: Faults,
}

impl Spool {
    /// Opens (or creates) the spool at `path` for the database `database_id`. A torn tail
    /// is cut off; any other damage, or pending frames of another database, refuse the open
    /// with an error naming the file and the byte offset.
    pub fn open(path: &Path, database_id: &str) -> io::Result<Spool> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let scan = scan_bytes(&data);
        let mut valid = scan.valid_len;
        match &scan.problem {
            Some(Problem::Bad { offset, reason }) => {
                return Err(refused(path, *offset, reason));
            }
            Some(Problem::TornTail { offset }) => {
                tracing::warn!(
                    path = %path.display(),
                    offset,
                    cut_bytes = scan.file_len - offset,
                    "cutting an incomplete last frame (never acknowledged) off the spool"
                );
            }
            None => {}
        }
        if scan.header.is_none() && !scan.frames.is_empty() {
            tracing::warn!(
                path = %path.display(),
                batches = scan.frames.len(),
                "upgrading a spool of the first format; it names no database, so it is \
                 replayed into this one"
            );
            drop(file);
            upgrade_legacy(path, &scan, database_id)?;
            return Spool::open(path, database_id);
        }
        let header_len = match &scan.header {
            Some(h) if h.database_id == database_id => h.len,
            Some(h) if !scan.frames.is_empty() => {
                return Err(refused(
                    path,
                    0,
                    &format!(
                        "it holds {} batches for database {}, not for this database ({database_id}); \
                         replaying them here would put another database's records in this one",
                        scan.frames.len(),
                        h.database_id
                    ),
                ));
            }
            // Empty or no header yet: (re)write the header for this database.
            _ => {
                let header = encode_header(database_id)?;
                file.set_len(0)?;
                file.write_all(&header)?;
                file.sync_all()?;
                valid = header.len() as u64;
                header.len() as u64
            }
        };
        if valid < file.metadata()?.len() {
            file.set_len(valid)?;
            file.sync_all()?;
        }
        sync_dir(path);
        Ok(Spool {
            path: path.to_owned(),
            file,
            header_len,
            bytes: valid,
            frames: scan.frames.len() as u64,
            cursor: header_len,
            applied: 0,
            dirty: false,
            faults: Faults::default(),
        })
    }

    /// Injects failures (tests).
    #[doc(hidden)]
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Complete batches waiting to be applied.
    pub fn depth(&self) -> u64 {
        self.frames - self.applied
    }

    pub fn is_empty(&self) -> bool {
        self.depth() == 0
    }

    /// Appends one batch and syncs it to disk. On failure the partial frame is cut off
    /// again before the error is returned (and before any later append).
    pub fn append(&mut self, events: &[Event]) -> io::Result<()> {
        self.cut_failed_append()?;
        let frame = encode_frame(events)?;
        self.dirty = true;
        let written = if self.faults.append_fails() {
            self.file
                .write_all(&frame[..frame.len() / 2])
                .and(Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected spool failure",
                )))
        } else {
            self.file
                .write_all(&frame)
                .and_then(|()| self.file.sync_data())
        };
        if let Err(e) = written {
            if let Err(cut) = self.cut_failed_append() {
                tracing::error!(
                    error = %cut,
                    path = %self.path.display(),
                    "cannot cut a failed append off the spool; retrying before the next append"
                );
            }
            return Err(e);
        }
        self.dirty = false;
        self.frames += 1;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    fn cut_failed_append(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.set_len(self.bytes)?;
            self.file.sync_all()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The oldest batch not applied yet, with the offset just past it (for
    /// [`Spool::mark_applied`]). Reads that one frame only.
    pub fn next_pending(&mut self) -> io::Result<Option<(u64, Vec<Event>)>> {
        if self.is_empty() {
            return Ok(None);
        }
        self.file.seek(SeekFrom::Start(self.cursor))?;
        let mut head = [0u8; FRAME_HEADER];
        self.file.read_exact(&mut head)?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        if len > MAX_FRAME || self.cursor + (FRAME_HEADER as u64) + u64::from(len) > self.bytes {
            return Err(refused(
                &self.path,
                self.cursor,
                "a frame's length is damaged",
            ));
        }
        let mut data = vec![0u8; FRAME_HEADER + len as usize];
        data[..FRAME_HEADER].copy_from_slice(&head);
        self.file.read_exact(&mut data[FRAME_HEADER..])?;
        match parse_frame(&data, 0) {
            Ok(frame) => Ok(Some((self.cursor + frame.len, frame.events))),
            Err(Problem::Bad { reason, .. }) => Err(refused(&self.path, self.cursor, &reason)),
            Err(Problem::TornTail { .. }) => {
                Err(refused(&self.path, self.cursor, "a frame is incomplete"))
            }
        }
    }

    /// Records that the batch before `end` reached the store; empties the file once every
    /// batch has.
    pub fn mark_applied(&mut self, end: u64) -> io::Result<()> {
        self.cursor = end;
        self.applied += 1;
        if self.applied == self.frames {
            self.clear()?;
        }
        Ok(())
    }

    /// Every pending batch, oldest first.
    pub fn read_all(&mut self) -> io::Result<Vec<Vec<Event>>> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut data = Vec::new();
        (&mut self.file).take(self.bytes).read_to_end(&mut data)?;
        let scan = scan_bytes(&data);
        if let Some(Problem::Bad { offset, reason }) = &scan.problem {
            return Err(refused(&self.path, *offset, reason));
        }
        Ok(scan
            .frames
            .into_iter()
            .filter(|f| f.offset >= self.cursor)
            .map(|f| f.events)
            .collect())
    }

    /// Empties the spool (keeping its header).
    fn clear(&mut self) -> io::Result<()> {
        self.cut_failed_append()?;
        self.file.set_len(self.header_len)?;
        self.file.sync_all()?;
        self.frames = 0;
        self.applied = 0;
        self.bytes = self.header_len;
        self.cursor = self.header_len;
        Ok(())
    }
}

/// Syncs the directory holding `path`, so a newly created spool file survives a power loss.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_core::{BudgetOverride, ScopeKey};

    const DB: &str = "db-1";

    fn event(n: i64) -> Event {
        Event::BudgetSet {
            scope: ScopeKey::Global,
            budget: BudgetOverride {
                daily: Some(spendguard_core::Money::from_micros(n)),
                monthly: None,
            },
        }
    }

    fn drain(s: &mut Spool) -> Vec<Vec<Event>> {
        let mut out = Vec::new();
        while let Some((end, events)) = s.next_pending().unwrap() {
            out.push(events);
            s.mark_applied(end).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        s.append(&[event(1), event(2)]).unwrap();
        s.append(&[event(3)]).unwrap();
        assert_eq!(s.depth(), 2);
        drop(s);
        // A crash in the middle of a third frame.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[FRAME_VERSION, 200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut s = Spool::open(&path, DB).unwrap();
        assert_eq!(s.depth(), 2);
        assert_eq!(
            s.read_all().unwrap(),
            vec![vec![event(1), event(2)], vec![event(3)]]
        );
        s.append(&[event(4)]).unwrap();
        assert_eq!(s.read_all().unwrap().len(), 3);
        assert_eq!(drain(&mut s).len(), 3);
        assert!(s.is_empty());
        assert_eq!(s.next_pending().unwrap(), None);
        assert!(Spool::open(&path, DB).unwrap().is_empty());
    }

    #[test]
    fn only_applied_frames_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        s.append(&[event(1)]).unwrap();
        s.append(&[event(2)]).unwrap();
        let (end, first) = s.next_pending().unwrap().unwrap();
        assert_eq!(first, vec![event(1)]);
        s.mark_applied(end).unwrap();
        // The store failed before the second: it stays, and later appends follow it.
        s.append(&[event(3)]).unwrap();
        assert_eq!(s.depth(), 2);
        assert_eq!(drain(&mut s), vec![vec![event(2)], vec![event(3)]]);
        // A crash before the first was removed from the file replays it (idempotent).
        drop(s);
        let s = Spool::open(&path, DB).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn a_failed_append_leaves_no_torn_frame_before_later_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        let faults = Faults::default();
        s.set_faults(faults.clone());
        s.append(&[event(1)]).unwrap();
        faults
            .fail_appends
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(s.append(&[event(2)]).is_err());
        faults
            .fail_appends
            .store(false, std::sync::atomic::Ordering::SeqCst);
        s.append(&[event(3)]).unwrap();
        assert_eq!(s.read_all().unwrap(), vec![vec![event(1)], vec![event(3)]]);
        drop(s);
        let mut s = Spool::open(&path, DB).unwrap();
        assert_eq!(s.depth(), 2);
        assert_eq!(s.read_all().unwrap(), vec![vec![event(1)], vec![event(3)]]);
    }

    #[test]
    fn a_bad_frame_before_others_refuses_to_open_naming_the_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        s.append(&[event(1)]).unwrap();
        let second = std::fs::metadata(&path).unwrap().len();
        s.append(&[event(2)]).unwrap();
        s.append(&[event(3)]).unwrap();
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = second as usize + 12;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = Spool::open(&path, DB).expect_err("a damaged spool was opened");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("byte {second}")), "{message}");
        // Nothing was cut.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        // The scan still shows the good frame before it.
        let scan = scan(&path).unwrap();
        assert_eq!(scan.frames.len(), 1);
        assert!(matches!(scan.problem, Some(Problem::Bad { offset, .. }) if offset == second));
    }

    #[test]
    fn a_complete_last_frame_with_a_bad_checksum_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        s.append(&[event(1)]).unwrap();
        s.append(&[event(2)]).unwrap();
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Spool::open(&path, DB).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn an_unknown_frame_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        let first = s.header_len as usize;
        s.append(&[event(1)]).unwrap();
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first] = FRAME_VERSION + 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Spool::open(&path, DB).unwrap_err().to_string();
        assert!(err.contains("frame version 2"), "{err}");
        assert!(err.contains(&format!("byte {first}")), "{err}");
    }

    #[test]
    fn a_spool_of_another_database_is_refused_unless_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, DB).unwrap();
        s.append(&[event(1)]).unwrap();
        drop(s);
        let err = Spool::open(&path, "db-2").unwrap_err().to_string();
        assert!(err.contains("db-1") && err.contains("db-2"), "{err}");
        assert_eq!(Spool::open(&path, DB).unwrap().depth(), 1);
        // Once empty, it may serve another database.
        let mut s = Spool::open(&path, DB).unwrap();
        drain(&mut s);
        drop(s);
        assert!(Spool::open(&path, "db-2").unwrap().is_empty());
        assert_eq!(scan(&path).unwrap().header.unwrap().database_id, "db-2");
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        std::fs::write(&path, b"[1,2,3]").unwrap();
        assert!(Spool::open(&path, DB).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"[1,2,3]");
    }

    #[test]
    fn a_spool_of_the_first_format_is_upgraded_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut old = Vec::new();
        for batch in [vec![event(1), event(2)], vec![event(3)]] {
            let payload = serde_json::to_vec(&batch).unwrap();
            old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            old.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            old.extend_from_slice(&payload);
        }
        old.extend_from_slice(&[9, 0]); // a torn tail
        std::fs::write(&path, &old).unwrap();
        assert_eq!(scan(&path).unwrap().frames.len(), 2);
        let mut s = Spool::open(&path, DB).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![vec![event(1), event(2)], vec![event(3)]]
        );
        assert_eq!(scan(&path).unwrap().header.unwrap().database_id, DB);
    }
}
