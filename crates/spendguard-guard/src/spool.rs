//! The spool: a local append-only file of event batches that could not be written to the
//! store (PostgreSQL unreachable). Each batch is one frame:
//!
//! ```text
//! [payload length: u32 LE][CRC-32 of the payload: u32 LE][payload: JSON array of events]
//! ```
//!
//! A frame is synced to disk before the batch is acknowledged. A torn frame at the end (a
//! crash mid-write) fails its length or checksum and is ignored: it was never acknowledged.
//! Replaying is safe more than once because the store applies events idempotently.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use spendguard_core::Event;

/// The largest frame accepted when reading (a guard against a corrupt length).
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// An open spool file.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: File,
    frames: u64,
    bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool at `path` and counts the complete frames in it. A torn
    /// tail is cut off.
    pub fn open(path: &Path) -> io::Result<Spool> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let (batches, valid) = read_frames(&mut file)?;
        if valid < file.metadata()?.len() {
            tracing::warn!(path = %path.display(), kept_bytes = valid, "cutting a torn frame off the spool");
            file.set_len(valid)?;
            file.sync_all()?;
        }
        Ok(Spool {
            path: path.to_owned(),
            file,
            frames: batches.len() as u64,
            bytes: valid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Complete batches waiting to be replayed.
    pub fn depth(&self) -> u64 {
        self.frames
    }

    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Appends one batch and syncs it to disk.
    pub fn append(&mut self, events: &[Event]) -> io::Result<()> {
        let payload = serde_json::to_vec(events).map_err(io::Error::other)?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| io::Error::other("batch too large for the spool"))?;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        self.file.write_all(&frame)?;
        self.file.sync_data()?;
        self.frames += 1;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// The oldest batch, reading no further than it (a cheap probe while the store is down).
    pub fn read_first(&mut self) -> io::Result<Option<Vec<Event>>> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut header = [0u8; 8];
        if self.file.read_exact(&mut header).is_err() {
            return Ok(None);
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Ok(None);
        }
        let mut payload = vec![0u8; len as usize];
        if self.file.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&payload).ok())
    }

    /// Every complete batch, oldest first.
    pub fn read_all(&mut self) -> io::Result<Vec<Vec<Event>>> {
        Ok(read_frames(&mut self.file)?.0)
    }

    /// Empties the spool after its batches reached the store.
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.frames = 0;
        self.bytes = 0;
        Ok(())
    }
}

/// Reads complete, valid frames from the start; returns them and the length they cover.
fn read_frames(file: &mut File) -> io::Result<(Vec<Vec<Event>>, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let mut batches = Vec::new();
    let mut at = 0usize;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + 8 + len as usize;
        if len > MAX_FRAME || end > data.len() {
            break;
        }
        let payload = &data[at + 8..end];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(events) = serde_json::from_slice::<Vec<Event>>(payload) else {
            break;
        };
        batches.push(events);
        at = end;
    }
    Ok((batches, at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_core::{BudgetOverride, ScopeKey};

    fn event(n: i64) -> Event {
        Event::BudgetSet {
            scope: ScopeKey::Global,
            budget: BudgetOverride {
                daily: Some(spendguard_core::Money::from_micros(n)),
                monthly: None,
            },
        }
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path).unwrap();
        s.append(&[event(1), event(2)]).unwrap();
        s.append(&[event(3)]).unwrap();
        assert_eq!(s.depth(), 2);
        drop(s);
        // A crash in the middle of a third frame.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut s = Spool::open(&path).unwrap();
        assert_eq!(s.depth(), 2);
        assert_eq!(
            s.read_all().unwrap(),
            vec![vec![event(1), event(2)], vec![event(3)]]
        );
        s.append(&[event(4)]).unwrap();
        assert_eq!(s.read_all().unwrap().len(), 3);
        s.clear().unwrap();
        assert!(s.is_empty());
        assert_eq!(s.read_first().unwrap(), None);
        assert!(Spool::open(&path).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_frame_ends_the_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path).unwrap();
        s.append(&[event(1)]).unwrap();
        s.append(&[event(2)]).unwrap();
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let mut s = Spool::open(&path).unwrap();
        assert_eq!(s.read_all().unwrap(), vec![vec![event(1)]]);
    }
}
