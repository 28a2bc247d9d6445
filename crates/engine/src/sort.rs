//! Sort chunks: records are appended to a byte arena with a compact index until the
//! chunk's byte budget is reached; the index is then sorted in parallel, duplicates
//! inside the chunk are dropped, and the chunk is either spilled to a temporary file as
//! a sorted run or kept in memory as the merge's last source.
//!
//! Each index entry carries the record's first 8 bytes as a big-endian integer, so
//! most comparisons are one integer compare and never touch the arena. Accepted
//! records hold no NUL byte, so zero-padding short records keeps the order bytewise.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::iter::{IntoParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

use serde::{Deserialize, Serialize};

use super::error::{IoContext, Result};
use super::private_dir;

/// Index bytes per record, counted against the chunk budget.
pub(crate) const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

#[derive(Debug, Clone, Copy)]
struct Entry {
    prefix: u64,
    off: u32,
    len: u32,
}

/// A record's first 8 bytes as a big-endian integer, zero-padded.
#[inline]
pub(crate) fn prefix_of(rec: &[u8]) -> u64 {
    let mut p = [0u8; 8];
    let n = rec.len().min(8);
    p[..n].copy_from_slice(&rec[..n]);
    u64::from_be_bytes(p)
}

/// Below this many entries a tied group is sorted by plain comparison.
const SMALL_GROUP: usize = 16;

/// Sort a group of entries that agree on their first `depth` bytes, by the bytes from
/// `depth` on. Entries no longer than `depth` bytes are equal to each other (no NUL in
/// records, so zero padding cannot make two different records agree) and come first.
fn sort_group(g: &mut [Entry], data: &[u8], depth: usize) {
    if g.iter().all(|e| e.len as usize <= depth) {
        return; // all the same record
    }
    if g.len() <= SMALL_GROUP {
        let tail = |e: &Entry| &data[e.off as usize + depth.min(e.len as usize)..(e.off + e.len) as usize];
        g.sort_unstable_by(|a, b| tail(a).cmp(tail(b)));
        return;
    }
    for e in g.iter_mut() {
        let start = e.off as usize + depth.min(e.len as usize);
        let end = (e.off + e.len) as usize;
        e.prefix = prefix_of(&data[start..end]);
    }
    g.sort_unstable_by_key(|e| e.prefix);
    for sub in g.chunk_by_mut(|a, b| a.prefix == b.prefix) {
        if sub.len() > 1 {
            sort_group(sub, data, depth + 8);
        }
    }
}

/// Records in an arena, with a budget in bytes (data + index).
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    data: Vec<u8>,
    entries: Vec<Entry>,
    budget: usize,
    sorted: bool,
}

impl Chunk {
    pub(crate) fn new(budget: usize) -> Chunk {
        Chunk { data: Vec::new(), entries: Vec::new(), budget, sorted: false }
    }

    /// Bytes of data and index held.
    pub(crate) fn used(&self) -> usize {
        self.data.len() + self.entries.len() * ENTRY_BYTES
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a record; false (and nothing appended) when the budget would be exceeded.
    /// An empty chunk takes any record, so a single record larger than the budget
    /// still makes progress.
    #[inline]
    pub(crate) fn push(&mut self, rec: &[u8]) -> bool {
        if !self.entries.is_empty() && self.used() + rec.len() + ENTRY_BYTES > self.budget {
            return false;
        }
        if self.data.capacity() == 0 {
            // Reserve address space once; pages become resident only as they are written.
            self.data.reserve_exact(self.budget.max(rec.len()));
            self.entries.reserve_exact(self.budget / ENTRY_BYTES / 4);
        }
        self.entries.push(Entry { prefix: prefix_of(rec), off: self.data.len() as u32, len: rec.len() as u32 });
        self.data.extend_from_slice(rec);
        self.sorted = false;
        true
    }

    #[inline]
    fn rec(&self, e: &Entry) -> &[u8] {
        &self.data[e.off as usize..(e.off + e.len) as usize]
    }

    /// Sort bytewise on `pool` and drop repeats; returns how many were dropped.
    ///
    /// A string radix sort with 8-byte digits: entries are sorted by their 8-byte key
    /// at depth 0, then every group that ties is re-keyed with the next 8 bytes and
    /// sorted again, recursively. Records sharing long prefixes (URLs, e-mail domains)
    /// are then compared as integers a few bytes at a time instead of by `memcmp` from
    /// their first byte at every comparison. Groups are sorted in parallel.
    pub(crate) fn sort_dedup(&mut self, pool: &rayon::ThreadPool) -> u64 {
        let data = &self.data[..];
        let entries = &mut self.entries[..];
        pool.install(|| {
            entries.par_sort_unstable_by_key(|e| e.prefix);
            let groups: Vec<&mut [Entry]> =
                entries.chunk_by_mut(|a, b| a.prefix == b.prefix).filter(|g| g.len() > 1).collect();
            groups.into_par_iter().for_each(|g| sort_group(g, data, 8));
        });
        let full = |e: &Entry| &data[e.off as usize..(e.off + e.len) as usize];
        let before = self.entries.len();
        self.entries.dedup_by(|b, a| a.prefix == b.prefix && a.len == b.len && full(a) == full(b));
        self.sorted = true;
        (before - self.entries.len()) as u64
    }

    /// The records in index order (bytewise order after [`sort_dedup`](Self::sort_dedup)).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.entries.iter().map(|e| self.rec(e))
    }

    pub(crate) fn get(&self, i: usize) -> &[u8] {
        self.rec(&self.entries[i])
    }

    /// Index of the first record greater than `key` (the chunk must be sorted).
    pub(crate) fn first_after(&self, key: &[u8]) -> usize {
        debug_assert!(self.sorted);
        self.entries.partition_point(|e| self.rec(e) <= key)
    }

    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
        self.sorted = false;
    }
}

/// Bytes of a plain run between two marks of its sparse index (256 KiB): a merge that
/// starts after a key (a resumed job, a key range) seeks to the last mark at or below
/// it and reads at most this much before reaching it.
pub(crate) const MARK_EVERY: u64 = 256 << 10;

/// Marks a run of known size gets at least, as long as they stay [`MIN_MARK_EVERY`]
/// apart: they are also the sample [`crate::KeptSort::ranges`] splits the key space by,
/// and a run with one mark (one smaller than [`MARK_EVERY`]) shows only its lowest key.
const MARKS_PER_RUN: u64 = 16;

/// Fewest bytes between two marks of a run.
const MIN_MARK_EVERY: u64 = 16 << 10;

/// Bytes of a record a mark keeps at most: with long records (a mark for nearly each
/// one when they pass [`MARK_EVERY`]) the index stays a small part of the run.
pub(crate) const MARK_KEY_BYTES: usize = 256;

/// A record that starts at `offset` in a plain run: the record itself, or its first
/// [`MARK_KEY_BYTES`] at most (to a character's end) when `cut`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub key: String,
    pub offset: u64,
    /// `key` is a prefix of the record (manifests of 0.3.0's first builds have whole
    /// records, and no such field).
    #[serde(default)]
    pub cut: bool,
}

/// The first `max` bytes of `rec` at most, ending where a character does (records are
/// valid UTF-8, checked when read; a damaged one comes out lossy), and whether that is
/// less than the whole record.
fn text_head(rec: &[u8], max: usize) -> (String, bool) {
    let mut n = rec.len().min(max);
    while n < rec.len() && n > 0 && (rec[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    (String::from_utf8_lossy(&rec[..n]).into_owned(), n < rec.len())
}

impl Mark {
    pub(crate) fn of(rec: &[u8], offset: u64) -> Mark {
        let (key, cut) = text_head(rec, MARK_KEY_BYTES);
        Mark { key, offset, cut }
    }

    /// The marked record is known to sort at or below `key`: a whole one that does, or a
    /// prefix that sorts below `key` without being a prefix of it.
    fn at_or_below(&self, key: &[u8]) -> bool {
        let k = self.key.as_bytes();
        if self.cut {
            k < key && !key.starts_with(k)
        } else {
            k <= key
        }
    }
}

/// A sorted run on disk: distinct records, `\n`-terminated, optionally zstd-compressed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Run {
    pub path: PathBuf,
    pub bytes: u64,
    pub records: u64,
    pub compressed: bool,
    /// Sparse index of a plain run (empty for a compressed one, which cannot be sought).
    pub index: Vec<Mark>,
    /// Bytes of its longest record (0 in manifests of 0.3.0's first builds): a merge's
    /// buffer grows to hold it.
    #[serde(default)]
    pub longest: u64,
}

impl Run {
    /// The first `max` bytes at most (to a character's end) of the record `mark` stands
    /// for in this plain run; an error if the run does not hold it there.
    pub(crate) fn record_at(&self, mark: &Mark, max: usize) -> Result<String> {
        use std::io::{BufRead, Read, Seek};
        let mut file = private_dir::open_file(&self.path).ctx("could not open temporary run", &self.path)?;
        file.seek(std::io::SeekFrom::Start(mark.offset)).ctx("could not seek in temporary run", &self.path)?;
        let mut rec = Vec::new();
        std::io::BufReader::new(file)
            .take(max as u64 + 4)
            .read_until(b'\n', &mut rec)
            .ctx("could not read temporary run", &self.path)?;
        if rec.last() == Some(&b'\n') {
            rec.pop();
        }
        let (rec, _) = text_head(&rec, max);
        if !rec.starts_with(&mark.key) {
            return Err(crate::error::Error::Corrupt(format!(
                "{}: the record at byte {} is not the one the run's index marks there",
                self.path.display(),
                mark.offset
            )));
        }
        Ok(rec)
    }

    /// Where to start reading to find the first record after `key`: the last mark whose
    /// record is known to sort at or below `key`. Marks whose prefix `key` begins with
    /// may be above or below it; reading starts before them.
    pub(crate) fn seek_offset(&self, key: &[u8]) -> u64 {
        let below = self.index.partition_point(|m| m.key.as_bytes() <= key);
        self.index[..below].iter().rev().find(|m| m.at_or_below(key)).map_or(0, |m| m.offset)
    }
}

/// Writes one run.
pub(crate) struct RunWriter {
    out: RunSink,
    path: PathBuf,
    records: u64,
    compressed: bool,
    /// Bytes of records written so far (uncompressed).
    offset: u64,
    next_mark: u64,
    /// Bytes between two marks ([`MARK_EVERY`], less in a run known to be small).
    mark_every: u64,
    /// Bytes between the first two marks: a share of `mark_every` that differs from run
    /// to run, so that runs of the same data are not marked at the same quantiles.
    first_gap: u64,
    index: Vec<Mark>,
    longest: u64,
    sync: bool,
}

enum RunSink {
    Plain(BufWriter<File>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<File>>),
}

/// Level 1: the fastest level still halves typical text; runs are read once.
const RUN_ZSTD_LEVEL: i32 = 1;
const RUN_WRITE_BUFFER: usize = 1 << 20;

impl RunWriter {
    /// Start a run at `path`, a name that must not exist yet (created mode 0600, never
    /// through a link: see [`private_dir`](crate::private_dir)).
    pub(crate) fn create(path: PathBuf, compress: bool) -> Result<RunWriter> {
        let file = private_dir::create_file(&path).ctx("could not create temporary run", &path)?;
        let buf = BufWriter::with_capacity(RUN_WRITE_BUFFER, file);
        let out = if compress {
            RunSink::Zstd(
                zstd::stream::write::Encoder::new(buf, RUN_ZSTD_LEVEL).ctx("could not start zstd for", &path)?,
            )
        } else {
            RunSink::Plain(buf)
        };
        Ok(RunWriter {
            out,
            path,
            records: 0,
            compressed: compress,
            offset: 0,
            next_mark: 0,
            mark_every: MARK_EVERY,
            first_gap: MARK_EVERY,
            index: Vec::new(),
            longest: 0,
            sync: false,
        })
    }

    /// The run will hold about `bytes`: marks closer together than [`MARK_EVERY`] where
    /// that would leave it fewer than [`MARKS_PER_RUN`].
    /// The second mark comes after a share of that, between 1/64 and all of it, which
    /// the run's file name decides (the same on every attempt).
    pub(crate) fn sized(mut self, bytes: u64) -> RunWriter {
        self.mark_every = (bytes / MARKS_PER_RUN).clamp(MIN_MARK_EVERY, MARK_EVERY);
        let name = self.path.file_name().map_or(&[][..], |n| n.as_encoded_bytes());
        // FNV-1a, then its top bits spread by the golden ratio.
        let h = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let share = (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) + 1; // 1..=64
        self.first_gap = self.mark_every * share / 64;
        self
    }

    /// Flush the run to disk when it is finished (a run that must outlive a crash).
    pub(crate) fn durable(mut self) -> RunWriter {
        self.sync = true;
        self
    }

    /// Account for one record about to be written: its offset, and a mark every
    /// `mark_every` bytes of a plain run.
    #[inline]
    fn note(&mut self, rec: &[u8]) {
        if !self.compressed && self.offset >= self.next_mark {
            self.index.push(Mark::of(rec, self.offset));
            self.next_mark = self.offset + if self.index.len() == 1 { self.first_gap } else { self.mark_every };
        }
        self.offset += rec.len() as u64 + 1;
        self.longest = self.longest.max(rec.len() as u64);
        self.records += 1;
    }

    #[inline]
    pub(crate) fn write(&mut self, rec: &[u8]) -> Result<()> {
        self.note(rec);
        let r = match &mut self.out {
            RunSink::Plain(w) => w.write_all(rec).and_then(|_| w.write_all(b"\n")),
            RunSink::Zstd(w) => w.write_all(rec).and_then(|_| w.write_all(b"\n")),
        };
        r.ctx("could not write temporary run", &self.path)
    }

    /// Write whole `\n`-terminated records at once (the caller counts them).
    fn write_block(&mut self, block: &[u8]) -> Result<()> {
        let r = match &mut self.out {
            RunSink::Plain(w) => w.write_all(block),
            RunSink::Zstd(w) => w.write_all(block),
        };
        r.ctx("could not write temporary run", &self.path)
    }

    pub(crate) fn finish(self) -> Result<Run> {
        let path = self.path;
        let buf = match self.out {
            RunSink::Plain(w) => w,
            RunSink::Zstd(w) => w.finish().ctx("could not write temporary run", &path)?,
        };
        let file = buf.into_inner().map_err(|e| e.into_error()).ctx("could not write temporary run", &path)?;
        if self.sync {
            file.sync_all().ctx("could not flush temporary run", &path)?;
        }
        let bytes = file.metadata().ctx("could not stat temporary run", &path)?.len();
        Ok(Run {
            path,
            bytes,
            records: self.records,
            compressed: self.compressed,
            index: self.index,
            longest: self.longest,
        })
    }
}

/// Write a sorted chunk as a run at `path`. Records are gathered into large blocks
/// by hand: per-record `write_all` calls cost more than the copying itself.
/// With `durable`, the run is flushed to disk before this returns.
pub(crate) fn spill(chunk: &Chunk, path: &Path, compress: bool, durable: bool) -> Result<Run> {
    let mut w = RunWriter::create(path.to_path_buf(), compress)?.sized(chunk.used() as u64);
    if durable {
        w = w.durable();
    }
    let mut block: Vec<u8> = Vec::with_capacity(RUN_WRITE_BUFFER + (64 << 10));
    for rec in chunk.iter() {
        w.note(rec);
        block.extend_from_slice(rec);
        block.push(b'\n');
        if block.len() >= RUN_WRITE_BUFFER {
            w.write_block(&block)?;
            block.clear();
        }
    }
    w.write_block(&block)?;
    debug_assert_eq!(w.records, chunk.len() as u64);
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_bytewise_and_dedups() {
        let pool = crate::limits::thread_pool(2).unwrap();
        let mut c = Chunk::new(1 << 20);
        let recs: &[&[u8]] =
            &[b"b", b"abcdefghij", b"abcdefgh", b"abcdefghi", b"b", "é".as_bytes(), b"B", b"abcdefghij", b"a"];
        for r in recs {
            assert!(c.push(r));
        }
        assert_eq!(c.sort_dedup(&pool), 2);
        let mut want: Vec<&[u8]> = recs.to_vec();
        want.sort();
        want.dedup();
        assert_eq!(c.iter().collect::<Vec<_>>(), want);
        assert_eq!(c.first_after(b"abcdefgh"), 3);
        assert_eq!(c.first_after(b""), 0);
        assert_eq!(c.first_after("é".as_bytes()), c.len());
    }

    #[test]
    fn respects_budget_but_takes_one_oversized_record() {
        let mut c = Chunk::new(100);
        assert!(c.push(&[b'x'; 500]));
        assert!(!c.push(b"y"));
        c.clear();
        let mut n = 0;
        while c.push(b"0123") {
            n += 1;
        }
        assert_eq!(n, 100 / (4 + ENTRY_BYTES));
        assert!(c.used() <= 100);
    }

    #[test]
    fn spills_plain_and_compressed_runs() {
        let pool = crate::limits::thread_pool(1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut c = Chunk::new(1 << 20);
        for i in (0..1000).rev() {
            c.push(format!("line-{i:05}").as_bytes());
        }
        c.sort_dedup(&pool);
        for compress in [false, true] {
            let run = spill(&c, &d.path().join(format!("r{compress}")), compress, compress).unwrap();
            assert_eq!(run.records, 1000);
            assert_eq!(run.index.is_empty(), compress, "plain runs carry a sparse index");
            let raw = std::fs::read(&run.path).unwrap();
            let text = if compress { zstd::decode_all(&raw[..]).unwrap() } else { raw };
            assert!(text.starts_with(b"line-00000\nline-00001\n"));
            assert_eq!(run.bytes, std::fs::metadata(&run.path).unwrap().len());
        }
    }
}
