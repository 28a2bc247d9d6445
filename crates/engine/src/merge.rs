//! The k-way merge: sorted, internally distinct sources (runs on disk, and at most one
//! chunk still in memory) are merged through a binary min-heap of source indices into
//! one stream of distinct records in bytewise order. Repeats across sources meet at
//! the top of the heap and are dropped there.
//!
//! More runs than the fan-in (open files) are first merged in groups into
//! intermediate runs, as many levels as needed. A merge can start after a given key —
//! the last record durably consumed before a crash — and skips everything up to and
//! including it, which is what makes the extension's checkpoints resumable.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tempfile::TempDir;

use super::error::{Error, IoContext, Result};
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

impl Source {
    fn open(run: &Run, buffer: usize) -> Result<Source> {
        let file = File::open(&run.path).ctx("could not open temporary run", &run.path)?;
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
pub struct Merger {
    sources: Vec<Source>,
    heap: Vec<usize>,
    out: Vec<u8>,
    started: bool,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    pulled: u64,
    // Last: the runs' directory is removed when the merger is dropped, whatever happens.
    _temp: Option<TempDir>,
}

impl Merger {
    /// Merge `runs` (at most the fan-in) and an optional sorted in-memory chunk.
    pub fn new(
        runs: &[Run],
        mem: Option<Chunk>,
        buffer: usize,
        resume_after: Option<&[u8]>,
        progress: Arc<Progress>,
        cancel: Arc<AtomicBool>,
        temp: Option<TempDir>,
    ) -> Result<Merger> {
        let mut sources = runs.iter().map(|r| Source::open(r, buffer)).collect::<Result<Vec<_>>>()?;
        if let Some(chunk) = mem.filter(|c| !c.is_empty()) {
            let key = prefix_of(chunk.get(0));
            sources.push(Source { kind: Kind::Mem { chunk, pos: 0 }, key });
        }
        if let Some(key) = resume_after {
            for s in &mut sources {
                s.skip_through(key)?;
            }
        }
        let mut m = Merger {
            sources,
            heap: Vec::new(),
            out: Vec::new(),
            started: false,
            progress,
            cancel,
            pulled: 0,
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

    /// The next distinct record, or `None` at the end. Checks the cancel flag every
    /// 4096 records.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>> {
        loop {
            let Some(&top) = self.heap.first() else { return Ok(None) };
            self.pulled += 1;
            if self.pulled.is_multiple_of(4096) && self.cancel.load(Relaxed) {
                return Err(Error::Stopped);
            }
            let cur = self.sources[top].cur();
            if self.started && cur == self.out.as_slice() {
                Progress::add(&self.progress.duplicates, 1);
                self.advance_top()?;
                continue;
            }
            self.out.clear();
            self.out.extend_from_slice(cur);
            self.started = true;
            self.advance_top()?;
            Progress::add(&self.progress.distinct, 1);
            return Ok(Some(&self.out));
        }
    }
}

/// Merge groups of `fan_in` runs into intermediate runs until at most `fan_in` remain.
/// Merged inputs are deleted as soon as their group is done, so the temporary space
/// in use stays near one copy of the data.
pub fn reduce_runs(
    mut runs: Vec<Run>,
    fan_in: usize,
    buffer: usize,
    dir: &std::path::Path,
    compress: bool,
    progress: &Arc<Progress>,
    cancel: &Arc<AtomicBool>,
) -> Result<Vec<Run>> {
    let fan_in = fan_in.max(2);
    let mut seq = 0usize;
    while runs.len() > fan_in {
        let group: Vec<Run> = runs.drain(..fan_in).collect();
        let path = dir.join(format!("merge-{seq:06}.run"));
        seq += 1;
        let mut w = RunWriter::create(path, compress)?;
        {
            // A private progress: intermediate levels neither emit nor drop records
            // that the final count should see twice.
            let scratch = Arc::new(Progress::default());
            let mut m = Merger::new(&group, None, buffer, None, scratch.clone(), cancel.clone(), None)?;
            while let Some(rec) = m.next_record()? {
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
    use crate::sort::spill;

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
        while let Some(r) = m.next_record().unwrap() {
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
            .map(|(i, s)| spill(&chunk_of(&pool, s), &d.path().join(i.to_string()), i == 1).unwrap())
            .collect();
        let p = Arc::new(Progress::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let mem = || Some(chunk_of(&pool, sets[2]));
        let mut m = Merger::new(&runs, mem(), 4096, None, p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["", "a", "b", "c", "d", "f", "zz"]);
        assert_eq!((p.distinct.load(Relaxed), p.duplicates.load(Relaxed)), (7, 3));

        let mut m = Merger::new(&runs, mem(), 4096, Some(b"c"), p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["d", "f", "zz"]);
        let mut m = Merger::new(&runs, mem(), 4096, Some(b"cc"), p.clone(), cancel.clone(), None).unwrap();
        assert_eq!(collect(&mut m), ["d", "f", "zz"]);
        let mut m = Merger::new(&runs, mem(), 4096, Some(b"zz"), p, cancel, None).unwrap();
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
            runs.push(spill(&chunk_of(&pool, &refs), &d.path().join(format!("r{i}")), i % 2 == 0).unwrap());
        }
        let p = Arc::new(Progress::default());
        p.temp_grew(runs.iter().map(|r| r.bytes).sum());
        let cancel = Arc::new(AtomicBool::new(false));
        let runs = reduce_runs(runs, 3, 4096, d.path(), true, &p, &cancel).unwrap();
        assert!(runs.len() <= 3);
        assert!(p.runs_written.load(Relaxed) >= 10, "at least two levels of merging");
        let mut m = Merger::new(&runs, None, 4096, None, p, cancel, None).unwrap();
        let got = collect(&mut m);
        let want: std::collections::BTreeSet<String> =
            (0..23).flat_map(|i| (0..50).map(move |j| format!("{:04}", (i * 37 + j * 11) % 300))).collect();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), runs.len(), "merged inputs were removed");
    }
}
