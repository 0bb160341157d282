//! Reading PostgreSQL's binary `COPY … TO STDOUT (FORMAT binary)` output row by row, as it
//! arrives: no `Row` is built per row and nothing is collected before decoding, which makes
//! reading millions of rows (the counters at start-up) several times cheaper than a query.
//!
//! The format: an 11-byte signature, a 32-bit flags field and a 32-bit header-extension
//! length (then the extension); each tuple is a 16-bit field count and, per field, a 32-bit
//! length (-1 for NULL) and that many bytes; a field count of -1 ends the data. Integers are
//! big-endian; `text` is its UTF-8 bytes, `bigint` 8 bytes.

use crate::common::corrupt;
use crate::error::StoreError;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Splits a binary COPY stream, fed in chunks of any size, into tuples of `N` fields.
#[derive(Debug, Default)]
pub(crate) struct CopyReader<const N: usize> {
    /// Bytes of a tuple (or of the header) that a chunk ended in the middle of.
    pending: Vec<u8>,
    header_read: bool,
    ended: bool,
}

/// One tuple's fields (`None` for NULL).
pub(crate) type Fields<'a, const N: usize> = [Option<&'a [u8]>; N];

impl<const N: usize> CopyReader<N> {
    pub(crate) fn new() -> CopyReader<N> {
        CopyReader {
            pending: Vec::new(),
            header_read: false,
            ended: false,
        }
    }

    /// Reads the tuples `chunk` completes, calling `row` with each.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&Fields<'_, N>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            let used = self.parse(chunk, &mut row)?;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(chunk);
            let used = self.parse(&pending, &mut row)?;
            pending.drain(..used);
            self.pending = pending;
        }
        Ok(())
    }

    /// Checks that the stream ended where the format says it does.
    pub(crate) fn finish(&self) -> Result<(), StoreError> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(corrupt("the binary COPY stream ended in the middle"))
        }
    }

    /// Reads the whole tuples at the start of `buf`; returns how many bytes they took.
    fn parse(
        &mut self,
        buf: &[u8],
        row: &mut impl FnMut(&Fields<'_, N>) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let mut at = 0;
        if !self.header_read {
            let fixed = SIGNATURE.len() + 8;
            if buf.len() < fixed {
                return Ok(0);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(corrupt("not a binary COPY stream"));
            }
            let ext = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            if buf.len() < fixed + ext {
                return Ok(0);
            }
            at = fixed + ext;
            self.header_read = true;
        }
        let mut fields: Fields<'_, N> = [None; N];
        loop {
            if self.ended {
                if at < buf.len() {
                    return Err(corrupt("data after the end of a binary COPY stream"));
                }
                return Ok(at);
            }
            let Some(count) = buf.get(at..at + 2) else {
                return Ok(at);
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            if count as usize != N {
                return Err(corrupt(format!(
                    "a binary COPY tuple of {count} fields, not {N}"
                )));
            }
            let mut p = at + 2;
            let mut whole = true;
            for f in fields.iter_mut() {
                let Some(len) = buf.get(p..p + 4) else {
                    whole = false;
                    break;
                };
                let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
                p += 4;
                if len < 0 {
                    *f = None;
                    continue;
                }
                let Some(data) = buf.get(p..p + len as usize) else {
                    whole = false;
                    break;
                };
                *f = Some(data);
                p += len as usize;
            }
            if !whole {
                return Ok(at);
            }
            row(&fields)?;
            at = p;
        }
    }
}

/// A `text` field.
pub(crate) fn text<'a>(f: Option<&'a [u8]>, column: &str) -> Result<&'a str, StoreError> {
    let bytes = f.ok_or_else(|| corrupt(format!("`{column}` is NULL")))?;
    std::str::from_utf8(bytes).map_err(|_| corrupt(format!("`{column}` is not UTF-8")))
}

/// A `bigint` field.
pub(crate) fn int8(f: Option<&[u8]>, column: &str) -> Result<i64, StoreError> {
    let bytes = f.ok_or_else(|| corrupt(format!("`{column}` is NULL")))?;
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(format!("`{column}` is not a bigint")))?;
    Ok(i64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY stream of `(text, bigint)` tuples, as PostgreSQL writes it.
    fn stream(rows: &[(Option<&str>, i64)]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        for (t, n) in rows {
            out.extend_from_slice(&2i16.to_be_bytes());
            match t {
                Some(t) => {
                    out.extend_from_slice(&(t.len() as i32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn read(bytes: &[u8], chunk: usize) -> Result<Vec<(Option<String>, i64)>, StoreError> {
        let mut reader = CopyReader::<2>::new();
        let mut rows = Vec::new();
        for c in bytes.chunks(chunk) {
            reader.feed(c, |f| {
                let t = f[0]
                    .map(|_| text(f[0], "t").map(str::to_owned))
                    .transpose()?;
                rows.push((t, int8(f[1], "n")?));
                Ok(())
            })?;
        }
        reader.finish()?;
        Ok(rows)
    }

    #[test]
    fn tuples_split_anywhere_across_chunks_read_the_same() {
        let rows = [(Some("tenant-a"), 1), (None, -7), (Some(""), i64::MAX)];
        let bytes = stream(&rows);
        let want: Vec<_> = rows
            .iter()
            .map(|(t, n)| (t.map(str::to_owned), *n))
            .collect();
        for chunk in 1..=bytes.len() {
            assert_eq!(
                read(&bytes, chunk).unwrap(),
                want,
                "chunks of {chunk} bytes"
            );
        }
    }

    #[test]
    fn a_cut_stream_a_wrong_signature_or_a_wrong_width_is_an_error() {
        let bytes = stream(&[(Some("x"), 1)]);
        assert!(read(&bytes[..bytes.len() - 2], 7).is_err(), "no end marker");
        assert!(
            read(&bytes[..bytes.len() - 5], 7).is_err(),
            "cut in a tuple"
        );
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(read(&wrong, 64).is_err());
        let mut reader = CopyReader::<3>::new();
        assert!(
            reader.feed(&bytes, |_| Ok(())).is_err(),
            "two fields, not three"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(read(&trailing, 64).is_err(), "data after the end");
    }
}
