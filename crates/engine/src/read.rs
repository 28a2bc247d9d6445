//! Streaming input: open a file (decompressing `*.gz` and `*.zst` by name, as `zcat`
//! users expect) and split it into raw records on `\n` without ever holding a file, or
//! an over-long record, in memory whole.
//!
//! Records that fit in the read buffer are handed out as slices of it (no copy). A
//! record that straddles two reads is assembled in a carry buffer, which is capped:
//! past `max_line_bytes` + a few bytes the record is certainly too long, so the rest of
//! it is counted and skipped, and only its prefix is kept for the reject report.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{IoContext, Result};
use super::normalize::BOM;

/// Bytes asked of the OS per read (4 MiB): large sequential reads, few syscalls.
pub const READ_BUFFER: usize = 4 << 20;
/// Longest raw prefix of a rejected record that is kept for the report (1 KiB).
pub const REJECT_PREFIX: usize = 1024;

/// How a file is decoded, chosen by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    Plain,
    Gzip,
    Zstd,
}

impl Codec {
    pub(crate) fn for_path(path: &Path) -> Codec {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Codec::Gzip,
            Some("zst") => Codec::Zstd,
            _ => Codec::Plain,
        }
    }
}

/// A reader that adds the bytes it reads to a shared counter: progress in bytes of the
/// file on disk, whether or not it is compressed.
pub(crate) struct Counting<'a, R> {
    inner: R,
    counter: &'a AtomicU64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Decode an opened input file (`path` names it and decides the codec), counting raw
/// bytes into `counter`.
pub(crate) fn decoder<'a>(file: &'a File, path: &Path, counter: &'a AtomicU64) -> Result<Box<dyn Read + 'a>> {
    let raw = Counting { inner: file, counter };
    Ok(match Codec::for_path(path) {
        Codec::Plain => Box::new(raw),
        Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, raw))),
        Codec::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(1 << 20, raw))
                .ctx("could not start zstd decoder for", path)?;
            // Long-distance matching (`zstd --long=31`): windows up to 2 GiB.
            d.window_log_max(31).ctx("could not configure zstd decoder for", path)?;
            Box::new(d)
        }
    })
}

/// One raw record as split from the stream, before normalisation.
#[derive(Debug)]
pub struct RawLine<'a> {
    /// The record's bytes without `\n`; for a `truncated` record, only its first bytes.
    pub bytes: &'a [u8],
    /// 1-based line number in the decoded file.
    pub line: u64,
    /// Byte offset of the record's first byte in the decoded file.
    pub offset: u64,
    /// The record was longer than the carry cap: certainly too long, `bytes` is a prefix.
    pub truncated: bool,
    /// `bytes` is already known to be valid UTF-8 without NUL (it lay in a read
    /// buffer that was validated whole), so per-record checks can be skipped.
    pub clean: bool,
}

/// Split `input` into raw records, calling `f` for each. `max_line_bytes` bounds the
/// memory held for one record. Read errors are reported with `path`.
pub fn split_lines<R: Read + ?Sized, E: From<super::Error>>(
    input: &mut R,
    path: &Path,
    max_line_bytes: usize,
    buf_size: usize,
    mut f: impl FnMut(RawLine<'_>) -> Result<(), E>,
) -> Result<(), E> {
    // Enough to decide "too long" after a BOM and a CR are dropped: max + 3 + 1 + 1.
    let cap = max_line_bytes.saturating_add(BOM.len() + 2);
    let mut buf = vec![0u8; buf_size.max(1)];
    let mut carry: Vec<u8> = Vec::new();
    let mut carry_total: u64 = 0; // length of the partial record, including dropped bytes
    let mut line: u64 = 1;
    let mut line_start: u64 = 0; // offset of the current record's first byte
    let mut consumed: u64 = 0; // offset of buf[0]

    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(super::Error::io("could not read", path, e).into()),
        };
        // Validate every complete record of this read in one pass: one SIMD scan over
        // megabytes costs far less than millions of per-record calls. UTF-8 survives
        // splitting at `\n` and dropping a BOM or CR, as each is a whole character.
        let clean = memchr::memrchr(b'\n', &buf[..n]).is_some_and(|last| {
            memchr::memchr(0, &buf[..last]).is_none() && simdutf8::basic::from_utf8(&buf[..last]).is_ok()
        });
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[start..n]) {
            let seg = &buf[start..start + i];
            if carry_total == 0 {
                let truncated = seg.len() > cap;
                f(RawLine {
                    bytes: &seg[..seg.len().min(cap)],
                    line,
                    offset: line_start,
                    truncated,
                    clean: clean && !truncated,
                })?;
            } else {
                append_capped(&mut carry, seg, cap);
                carry_total += seg.len() as u64;
                let truncated = carry_total > cap as u64;
                f(RawLine { bytes: &carry, line, offset: line_start, truncated, clean: false })?;
                carry.clear();
                carry_total = 0;
            }
            start += i + 1;
            line += 1;
            line_start = consumed + start as u64;
        }
        let rest = &buf[start..n];
        append_capped(&mut carry, rest, cap);
        carry_total += rest.len() as u64;
        consumed += n as u64;
    }
    // The last record has no final newline. As in the oracle, a file holding only a BOM
    // has no record at all.
    let only_bom = line == 1 && carry.as_slice() == BOM;
    if carry_total > 0 && !only_bom {
        let truncated = carry_total > cap as u64;
        f(RawLine { bytes: &carry, line, offset: line_start, truncated, clean: false })?;
    }
    Ok(())
}

fn append_capped(carry: &mut Vec<u8>, seg: &[u8], cap: usize) {
    let room = cap.saturating_sub(carry.len());
    carry.extend_from_slice(&seg[..seg.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(data: &[u8], max: usize, buf: usize) -> Vec<(Vec<u8>, u64, u64, bool)> {
        let mut out = Vec::new();
        split_lines::<_, crate::Error>(&mut &data[..], Path::new("t"), max, buf, |l| {
            if l.clean {
                assert!(std::str::from_utf8(l.bytes).is_ok() && !l.bytes.contains(&0));
            }
            out.push((l.bytes.to_vec(), l.line, l.offset, l.truncated));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn splits_across_buffer_boundaries_identically() {
        let data = b"alpha\nbeta\r\n\ngamma-delta\nlast";
        let want = split(data, 100, 1 << 20);
        assert_eq!(want.len(), 5);
        assert_eq!(want[1], (b"beta\r".to_vec(), 2, 6, false));
        assert_eq!(want[4], (b"last".to_vec(), 5, 25, false));
        for buf in 1..12 {
            assert_eq!(split(data, 100, buf), want, "buffer {buf}");
        }
    }

    #[test]
    fn over_long_record_is_streamed_past_with_a_prefix() {
        let mut data = vec![b'x'; 10_000];
        data.extend_from_slice(b"\nok\n");
        for buf in [64, 4096, 1 << 20] {
            let got = split(&data, 100, buf);
            assert_eq!(got.len(), 2);
            assert!(got[0].3, "truncated");
            assert!(got[0].0.len() <= 105);
            assert_eq!(got[1], (b"ok".to_vec(), 2, 10_001, false));
        }
    }

    #[test]
    fn bom_only_file_has_no_record() {
        assert!(split(BOM, 10, 2).is_empty());
        assert_eq!(split(b"\xEF\xBB\xBF\n", 10, 2).len(), 1);
        assert!(split(b"", 10, 2).is_empty());
        assert_eq!(split(b"\n", 10, 2).len(), 1);
    }

    #[test]
    fn codec_by_name() {
        assert_eq!(Codec::for_path(Path::new("a/b.txt.gz")), Codec::Gzip);
        assert_eq!(Codec::for_path(Path::new("b.zst")), Codec::Zstd);
        assert_eq!(Codec::for_path(Path::new("gz")), Codec::Plain);
    }
}
