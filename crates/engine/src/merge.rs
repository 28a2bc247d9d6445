//! The k-way merge: sorted, internally distinct sources (runs on disk, and at most one
//! chunk still in memory) are merged through a binary min-heap of source indices into
//! one stream of distinct records in bytewise order. Repeats across sources meet at
//! the top of the heap and are dropped there, as soon as their record is taken, so each
//! record comes out with the number of repeats it had: a consumer that stops after a
//! record and resumes after it never loses or counts twice a repeat of it.
//!
//! More runs than the fan-in (open files) are first merged in groups into
//! intermediate runs, as many levels as needed. A merge can start after a given key —
//! the last record durably consumed before a crash — and skips everything up to and
//! including it, which is what makes the extension's checkpoints resumable.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use super::error::{Error, IoContext, Result};
use super::limits::Budget;
use super::private_dir;
use super::progress::Progress;
use super::sort::{prefix_of, Chunk, Run, RunWriter};

/// One sorted, distinct input of the merge, with its current record's first 8 bytes
/// cached as an integer: most heap comparisons never reach `memcmp`.
struct Source {
    kind: Kind,
    key: u64,
}

enum Kind {
    Run(Block),
    Mem { chunk: Chunk, pos: usize },
}

/// A run read in large blocks; the current record is a slice of the block, so records
/// are never copied one by one.
struct Block {
    reader: Box<dyn Read + Send>,
    path: PathBuf,
    buf: Vec<u8>,
    filled: usize,
    /// Current record: `buf[start..end]`; the next one starts at `next`.
    start: usize,
    end: usize,
    next: usize,
    eof: bool,
    done: bool,
}

impl Block {
    fn advance(&mut self) -> Result<()> {
        let mut next = self.next;
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[next..self.filled]) {
                self.start = next;
                self.end = next + i;
                self.next = self.end + 1;
                return Ok(());
            }
            if self.eof {
                if next < self.filled {
                    return Err(Error::io(
                        "truncated temporary run",
                        &self.path,
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                self.done = true;
                return Ok(());
            }
            // Keep the partial record, refill behind it; grow only for a record longer
            // than the whole block.
            self.buf.copy_within(next..self.filled, 0);
            self.filled -= next;
            next = 0;
            if self.filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = loop {
                match self.reader.read(&mut self.buf[self.filled..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.ctx("could not read temporary run", &self.path)?,
                }
            };
            self.filled += n;
            self.eof = n == 0;
        }
    }
}

/// A part of the key space: the records after `after` (exclusive) up to `upto`
/// (inclusive); `None` leaves that side open. Parallel inserters each merge one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// The last key before the range; `None` from the first key on.
    pub after: Option<String>,
    /// The range's last key; `None` to the last key.
    pub upto: Option<String>,
}

impl KeyRange {
    /// Every key.
    pub(crate) fn all() -> KeyRange {
        KeyRange::default()
    }

    /// Where a merge of this range starts when everything up to `resume_after` was done.
    pub(crate) fn start<'a>(&'a self, resume_after: Option<&'a [u8]>) -> Option<&'a [u8]> {
        match (self.after.as_deref().map(str::as_bytes), resume_after) {
            (Some(a), Some(r)) => Some(a.max(r)),
            (a, r) => a.or(r),
        }
    }
}

impl Source {
    /// Open a run positioned at or before its first record after `after` (a plain run
    /// seeks to the last mark of its sparse index at or below `after`).
    fn open(run: &Run, buffer: usize, after: Option<&[u8]>) -> Result<Source> {
        let mut file = private_dir::open_file(&run.path).ctx("could not open temporary run", &run.path)?;
        if let Some(key) = after.filter(|_| !run.compressed) {
            let at = run.seek_offset(key);
            file.seek(SeekFrom::Start(at)).ctx("could not seek in temporary run", &run.path)?;
        }
        let reader: Box<dyn Read + Send> = if run.compressed {
            Box::new(zstd::stream::read::Decoder::new(file).ctx("could not read temporary run", &run.path)?)
        } else {
            Box::new(file)
        };
        let block = Block {
            reader,
            path: run.path.clone(),
            buf: vec![0; buffer.max(64)],
            filled: 0,
            start: 0,
            end: 0,
            next: 0,
            eof: false,
            done: false,
        };
        let mut s = Source { kind: Kind::Run(block), key: 0 };
        s.advance()?;
        Ok(s)
    }

    #[inline]
    fn done(&self) -> bool {
        match &self.kind {
            Kind::Run(b) => b.done,
            Kind::Mem { chunk, pos } => *pos >= chunk.len(),
        }
    }

    #[inline]
    fn cur(&self) -> &[u8] {
        match &self.kind {
            Kind::Run(b) => &b.buf[b.start..b.end],
            Kind::Mem { chunk, pos } => chunk.get(*pos),
        }
    }

    #[inline]
    fn advance(&mut self) -> Result<()> {
        match &mut self.kind {
            Kind::Run(b) => b.advance()?,
            Kind::Mem { pos, .. } => *pos += 1,
        }
        if !self.done() {
            self.key = prefix_of(self.cur());
        }
        Ok(())
    }

    /// Move past every record `<= key`.
    fn skip_through(&mut self, key: &[u8]) -> Result<()> {
        if let Kind::Mem { chunk, pos } = &mut self.kind {
            *pos = chunk.first_after(key);
            if !self.done() {
                self.key = prefix_of(self.cur());
            }
            return Ok(());
        }
        while !self.done() && self.cur() <= key {
            self.advance()?;
        }
        Ok(())
    }
}

/// The merged stream of distinct records.
pub(crate) struct Merger {
    sources: Vec<Source>,
    heap: Vec<usize>,
    out: Vec<u8>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    pulled: u64,
    /// The last key of the range this merge covers.
    upto: Option<Vec<u8>>,
    // Last: the runs' directory is removed when the merger is dropped, whatever happens.
    _temp: Option<TempDir>,
}

impl Merger {
    /// Merge `runs` (at most the fan-in) and an optional sorted in-memory chunk: the
    /// records after `after` up to `upto` (inclusive).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        runs: &[Run],
        mem: Option<Chunk>,
        buffer: usize,
        after: Option<&[u8]>,
        upto: Option<&[u8]>,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
        temp: Option<TempDir>,
    ) -> Result<Merger> {
        let mut sources = runs.iter().map(|r| Source::open(r, buffer, after)).collect::<Result<Vec<_>>>()?;
        if let Some(chunk) = mem.filter(|c| !c.is_empty()) {
            let key = prefix_of(chunk.get(0));
            sources.push(Source { kind: Kind::Mem { chunk, pos: 0 }, key });
        }
        if let Some(key) = after {
            for s in &mut sources {
                s.skip_through(key)?;
            }
        }
        let mut m = Merger {
            sources,
            heap: Vec::new(),
            out: Vec::new(),
            progress,
            cancel,
            pulled: 0,
            upto: upto.map(<[u8]>::to_vec),
            _temp: temp,
        };
        m.heap = (0..m.sources.len()).filter(|&i| !m.sources[i].done()).collect();
        for i in (0..m.heap.len() / 2).rev() {
            m.sift_down(i);
        }
        Ok(m)
    }

    #[inline]
    fn less(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.sources[self.heap[a]], &self.sources[self.heap[b]]);
        a.key < b.key || (a.key == b.key && a.cur() < b.cur())
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let l = 2 * i + 1;
            if l >= n {
                return;
            }
            let r = l + 1;
            let m = if r < n && self.less(r, l) { r } else { l };
            if !self.less(m, i) {
                return;
            }
            self.heap.swap(i, m);
            i = m;
        }
    }

    /// Advance the source at the top of the heap and restore the heap.
    #[inline]
    fn advance_top(&mut self) -> Result<()> {
        let s = self.heap[0];
        self.sources[s].advance()?;
        if self.sources[s].done() {
            let last = self.heap.pop().expect("heap not empty");
            if !self.heap.is_empty() {
                self.heap[0] = last;
            }
        }
        self.sift_down(0);
        Ok(())
    }

    /// The next distinct record with the number of its repeats the merge dropped (its
    /// copies in other sources), or `None` at the end. Checks the cancel flag every
    /// 4096 records.
    ///
    /// The repeats are taken with the record, not when they reach the top of the heap
    /// after it: all copies of a record are at the head of their sources once it is the
    /// smallest, so they are all counted here, and none is left to fall after a batch
    /// boundary or a resume key.
    pub(crate) fn next_record(&mut self) -> Result<Option<(&[u8], u64)>> {
        let Some(&top) = self.heap.first() else { return Ok(None) };
        self.pulled += 1;
        if self.pulled.is_multiple_of(4096) && self.cancel.load(Relaxed) {
            return Err(Error::Stopped);
        }
        let cur = self.sources[top].cur();
        if self.upto.as_deref().is_some_and(|u| cur > u) {
            // Every source is at or past this record: the range is done.
            self.heap.clear();
            return Ok(None);
        }
        self.out.clear();
        self.out.extend_from_slice(cur);
        self.advance_top()?;
        let mut repeats = 0u64;
        while let Some(&top) = self.heap.first() {
            if self.sources[top].cur() != self.out.as_slice() {
                break;
            }
            repeats += 1;
            self.advance_top()?;
        }
        if repeats > 0 {
            Progress::add(&self.progress.duplicates, repeats);
        }
        Progress::add(&self.progress.distinct, 1);
        Ok(Some((&self.out, repeats)))
    }
}

/// Merge groups of runs into intermediate runs until one merge can read all that remain
/// ([`Budget::merge_width`]: at most `fan_in`, their buffers within the budget's).
/// A group is as wide as the budget allows, but no wider than it takes to bring the
/// count down to `fan_in`. Merged inputs are deleted as soon as their group is done, so
/// the temporary space in use stays near one copy of the data.
/// With `durable`, every intermediate run is flushed to disk.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_runs(
    mut runs: Vec<Run>,
    fan_in: usize,
    budget: Budget,
    dir: &std::path::Path,
    compress: bool,
    durable: bool,
    progress: &Arc<Progress>,
    cancel: &Arc<AtomicBool>,
) -> Result<Vec<Run>> {
    let fan_in = fan_in.max(2);
    let buffer = budget.merge_buffer;
    let mut seq = 0usize;
    loop {
        let longest: Vec<u64> = runs.iter().map(|r| r.longest).collect();
        let width = budget.merge_width(&longest, fan_in);
        if width >= runs.len() {
            break;
        }
        let k = if runs.len() > fan_in { width.min(runs.len() - fan_in + 1).max(2) } else { width };
        let group: Vec<Run> = runs.drain(..k).collect();
        let path = dir.join(format!("merge-{seq:06}.run"));
        seq += 1;
        let mut w = RunWriter::create(path, compress)?.sized(group.iter().map(|r| r.bytes).sum());
        if durable {
            w = w.durable();
        }
        {
            // A private progress: intermediate levels neither emit nor drop records
            // that the final count should see twice.
            let scratch = Arc::new(Progress::default());
            let mut m = Merger::new(&group, None, buffer, None, None, scratch.clone(), cancel.clone(), None)?;
            while let Some((rec, _)) = m.next_record()? {
                w.write(rec)?;
            }
            Progress::add(&progress.duplicates, scratch.duplicates.load(Relaxed));
        }
        let run = w.finish()?;
        progress.temp_grew(run.bytes);
        Progress::add(&progress.runs_written, 1);
        for r in group {
            std::fs::remove_file(&r.path).ctx("could not remove temporary run", &r.path)?;
            progress.temp_shrank(r.bytes);
        }
        runs.push(run);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sort::{spill, Mark, MARK_KEY_BYTES};

    fn chunk_of(pool: &rayon::ThreadPool, recs: &[&str]) -> Chunk {
        let mut c = Chunk::new(1 << 20);
        for r in recs {
            c.push(r.as_bytes());
        }
        c.sort_dedup(pool);
        c
    }

    fn collect(m: &mut Merger) -> Vec<String> {
        let mut v = Vec::new();
        while let Some((r, _)) = m.next_record().unwrap() {
            v.push(String::from_utf8(r.to_vec()).unwrap());
        }
        v
    }

    #[test]
    fn merges_runs_and_memory_dropping_cross_repeats_and_resumes() {
        let pool = crate::limits::thread_pool(1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let sets: [&[&str]; 3] = [&["b", "d", "f"], &["a", "b", "c", "f"], &["", "zz", "d"]];
        let runs: Vec<Run> = sets[..2]
            .iter()
            .enumerate()
            .map(|(i, s)| spill(&chunk_of(&pool, s), &d.path().join(i.to_string()), i == 1, false).unwrap())
            .collect();
        let p = Arc::new(Progress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let mem = || Some(chunk_of(&pool, sets[2]));
        let mut m = Merger::new(&runs, mem(), 4096, None, None, p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["", "a", "b", "c", "d", "f", "zz"]);
        assert_eq!((p.distinct.load(Relaxed), p.duplicates.load(Relaxed)), (7, 3));

        // Each record comes with its own repeats, the in-memory chunk's copy included.
        let mut m = Merger::new(&runs, mem(), 4096, None, None, Arc::default(), cancel.clone(), None).unwrap();
        let mut counted = Vec::new();
        while let Some((r, n)) = m.next_record().unwrap() {
            counted.push((String::from_utf8(r.to_vec()).unwrap(), n));
        }
        let want = [("", 0), ("a", 0), ("b", 1), ("c", 0), ("d", 1), ("f", 1), ("zz", 0)];
        assert_eq!(counted, want.map(|(r, n)| (r.to_string(), n)));
        // Resumed after "b": its repeat is not met (nor counted) again.
        let p2 = Arc::new(Progress::default());
        let mut m = Merger::new(&runs, mem(), 4096, Some(b"b"), None, p2.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["c", "d", "f", "zz"]);
        assert_eq!(p2.duplicates.load(Relaxed), 2);

        let mut m = Merger::new(&runs, mem(), 4096, Some(b"c"), None, p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["d", "f", "zz"]);
        let mut m = Merger::new(&runs, mem(), 4096, Some(b"cc"), None, p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["d", "f", "zz"]);
        let mut m = Merger::new(&runs, mem(), 4096, Some(b"zz"), None, p, cancel, None).unwrap();
        assert!(collect(&mut m).is_empty());
    }

    #[test]
    fn reduces_many_runs_in_levels() {
        let pool = crate::limits::thread_pool(1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for i in 0..23 {
            let recs: Vec<String> = (0..50).map(|j| format!("{:04}", (i * 37 + j * 11) % 300)).collect();
            let refs: Vec<&str> = recs.iter().map(|s| s.as_str()).collect();
            runs.push(spill(&chunk_of(&pool, &refs), &d.path().join(format!("r{i}")), i % 2 == 0, false).unwrap());
        }
        let p = Arc::new(Progress::default());
        p.temp_grew(runs.iter().map(|r| r.bytes).sum());
        let cancel = Arc::new(AtomicBool::new(false));
        let budget = Budget { chunk_bytes: 1 << 20, merge_buffer: 4096 };
        let runs = reduce_runs(runs, 3, budget, d.path(), true, false, &p, &cancel).unwrap();
        assert!(runs.len() <= 3);
        assert!(p.runs_written.load(Relaxed) >= 10, "at least two levels of merging");
        let mut m = Merger::new(&runs, None, 4096, None, None, p, cancel, None).unwrap();
        let got = collect(&mut m);
        let want: std::collections::BTreeSet<String> =
            (0..23).flat_map(|i| (0..50).map(move |j| format!("{:04}", (i * 37 + j * 11) % 300))).collect();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), runs.len(), "merged inputs were removed");
    }

    #[test]
    fn ranges_seek_through_the_sparse_index_and_cover_the_stream_exactly() {
        let pool = crate::limits::thread_pool(2).unwrap();
        let d = tempfile::tempdir().unwrap();
        // Three big plain runs (several marks each) and one compressed run (no marks).
        let mut runs = Vec::new();
        for i in 0..4u32 {
            let recs: Vec<String> =
                (0..60_000u32).map(|j| format!("key-{:08}-{i}", (j * 7 + i * 13) % 90_000)).collect();
            let refs: Vec<&str> = recs.iter().map(String::as_str).collect();
            let mut c = Chunk::new(64 << 20);
            for r in &refs {
                c.push(r.as_bytes());
            }
            c.sort_dedup(&pool);
            runs.push(spill(&c, &d.path().join(format!("r{i}")), i == 3, false).unwrap());
        }
        assert!(runs[0].index.len() >= 3, "{} marks", runs[0].index.len());
        let p = Arc::new(Progress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let all = collect(&mut Merger::new(&runs, None, 4096, None, None, p.clone(), cancel.clone(), None).unwrap());
        let cut1 = all[all.len() / 3].clone();
        let cut2 = all[2 * all.len() / 3].clone();
        let ranges = [
            KeyRange { after: None, upto: Some(cut1.clone()) },
            KeyRange { after: Some(cut1.clone()), upto: Some(cut2.clone()) },
            KeyRange { after: Some(cut2), upto: None },
        ];
        let mut joined = Vec::new();
        for r in &ranges {
            let start = r.start(None);
            let mut m = Merger::new(
                &runs,
                None,
                4096,
                start,
                r.upto.as_deref().map(str::as_bytes),
                p.clone(),
                cancel.clone(),
                None,
            )
            .unwrap();
            joined.extend(collect(&mut m));
        }
        assert_eq!(joined, all, "the ranges partition the stream");
        // Resuming inside the middle range starts right after the resume key.
        let resume = all[all.len() / 2].clone();
        let r = &ranges[1];
        let mut m = Merger::new(
            &runs,
            None,
            4096,
            r.start(Some(resume.as_bytes())),
            r.upto.as_deref().map(str::as_bytes),
            p,
            cancel,
            None,
        )
        .unwrap();
        let rest = collect(&mut m);
        let from = all.iter().position(|x| *x == resume).unwrap() + 1;
        let to = all.iter().position(|x| Some(x) == ranges[1].upto.as_ref()).unwrap();
        assert_eq!(rest, all[from..=to], "a resumed range starts after the key and stops at its end");
    }

    #[test]
    fn long_records_are_marked_by_a_prefix_and_seeking_by_it_misses_nothing() {
        let pool = crate::limits::thread_pool(2).unwrap();
        let d = tempfile::tempdir().unwrap();
        // Records of 64 KiB to 320 KiB that share their first 255 bytes, then an 'é' the
        // cut at 256 bytes would split, then a number: a mark for nearly every record, and
        // every mark's prefix the same.
        let head = "a".repeat(255) + "é";
        let recs: Vec<String> = (0..40u32)
            .map(|i| format!("{head}{:03}{}", (i * 7) % 40, "x".repeat(((i % 5) as usize + 1) << 16)))
            .collect();
        let refs: Vec<&str> = recs.iter().map(String::as_str).collect();
        let mut c = Chunk::new(64 << 20);
        for r in &refs {
            assert!(c.push(r.as_bytes()));
        }
        c.sort_dedup(&pool);
        let run = spill(&c, &d.path().join("long"), false, false).unwrap();
        assert!(run.index.len() >= 20, "{} marks", run.index.len());
        let kept: usize = run.index.iter().map(|m| m.key.len()).sum();
        assert!(
            run.index.iter().all(|m| m.cut && m.key.len() <= MARK_KEY_BYTES),
            "marks keep a prefix of long records"
        );
        assert!(kept <= run.index.len() * MARK_KEY_BYTES, "{kept} bytes of marks");
        let p = Arc::new(Progress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let runs = [run];
        let all = collect(&mut Merger::new(&runs, None, 4096, None, None, p.clone(), cancel.clone(), None).unwrap());
        assert_eq!(all.len(), 40);
        // After each record, after its head only, and between: exactly the records above.
        let mut keys: Vec<String> = all.clone();
        keys.extend(["a".to_string(), "a".repeat(255), head.clone(), format!("{head}017"), "b".to_string()]);
        for key in &keys {
            let want: Vec<String> = all.iter().filter(|r| r.as_bytes() > key.as_bytes()).cloned().collect();
            let mut m =
                Merger::new(&runs, None, 4096, Some(key.as_bytes()), None, p.clone(), cancel.clone(), None).unwrap();
            assert_eq!(collect(&mut m), want, "after a key of {} bytes", key.len());
        }
        // A cut reads the marked record's head back from the run, and checks it is there.
        let m = &runs[0].index[1];
        let head_back = runs[0].record_at(m, 4096).unwrap();
        assert!(
            head_back.len() <= 4096 && head_back.starts_with(&m.key) && all.iter().any(|r| r.starts_with(&head_back))
        );
        let wrong = Mark { key: "b".repeat(300), ..m.clone() };
        assert!(matches!(runs[0].record_at(&wrong, 4096), Err(Error::Corrupt(_))));
        // Short records keep whole marks, and seek as before.
        assert!(!Mark::of(b"short", 0).cut);
    }
}
