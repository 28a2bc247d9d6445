//! The distinct stream: one entry point, [`distinct`], for both dedup modes. It reads
//! the files, sorts and merges (or runs one Bloom pass), sizes batches, and hands them to
//! a [`Sink`] — the SPI inserter in the extension, stdout in `store-dedup`, a `Vec` in
//! tests. Everything the sink is told happens on the caller's thread; the engine's own
//! threads (spill, sort pool, merge) have signals blocked and never call the sink.
//!
//! Errors come back typed: the sink's error type must take the engine's
//! (`S::Error: From<Error>`), so [`distinct`] returns the sink's own error whether the
//! sink or the engine failed — the shape of ripgrep's `Sink`.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::batch::{AdaptiveBatcher, Batch, Texts};
use super::bloom::ApproxDedup;
use super::config::{Config, Dedup, Fault};
use super::error::{Error, Result};
use super::limits;
use super::merge::{KeyRange, Merger};
use super::progress::{Phase, Progress};
use super::scan::{scan, FileCounts, FileOutcome, Reject};
use super::sorted::{announce, sort_distinct, Sorted};
use super::walk::{FileEntry, Tree};

/// What the sink wants after a call: more, or nothing more (the run stops early and
/// cleanly, and [`distinct`] returns a report marked `stopped`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop here, cleanly.
    Stop,
}

impl Flow {
    pub(crate) fn into_result<E>(self) -> Result<(), Halt<E>> {
        match self {
            Flow::Continue => Ok(()),
            Flow::Stop => Err(Halt::Stop),
        }
    }
}

/// What the sink is told with each batch besides its records: what it must store with
/// the batch, in the same transaction, to resume exactly after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo<'a> {
    /// Exact mode: the batch's last record — a run restarted with it as `resume_after`
    /// emits exactly what follows. `None` in Bloom mode, which cannot resume.
    pub resume_key: Option<&'a str>,
    /// Exact mode: the repeats of this batch's records that the final merge dropped
    /// (copies in other runs, beyond the first). Summed over the batches of a drain
    /// that starts after a key, it is the merge's repeats of every later key of the
    /// range; over a whole drain, all the merge dropped. Repeats inside one chunk, and
    /// those dropped by merges of more runs than the fan-in, are the scan's (counted in
    /// [`Progress::duplicates`] before the stream starts, and kept in a kept sort's
    /// counters). Always 0 in Bloom mode, whose repeats are all counted by the scan.
    pub duplicates: u64,
}

/// The consumer of a run. Every method runs on the thread that called [`distinct`].
pub trait Sink {
    /// The sink's error; engine errors are turned into it.
    type Error: From<Error>;

    /// The next batch of distinct records: bytewise ascending in exact mode (across
    /// batches too), input order in Bloom mode; see [`BatchInfo`] for what comes with it.
    fn batch(&mut self, batch: &Texts, info: &BatchInfo<'_>) -> Result<Flow, Self::Error>;

    /// A record was rejected. Every reject is reported, in input order.
    fn reject(&mut self, _r: &Reject<'_>) -> Result<Flow, Self::Error> {
        Ok(Flow::Continue)
    }

    /// A file ended: read, changed while read, or failed.
    fn file_done(
        &mut self,
        _file: &FileEntry,
        _counts: &FileCounts,
        _outcome: &FileOutcome,
    ) -> Result<Flow, Self::Error> {
        Ok(Flow::Continue)
    }

    /// The run entered a new phase: worth reporting at once.
    fn phase(&mut self, _phase: Phase, _progress: &Progress) -> Result<Flow, Self::Error> {
        Ok(Flow::Continue)
    }

    /// Called every few thousand records and between files while reading.
    fn tick(&mut self, _progress: &Progress) -> Result<Flow, Self::Error> {
        Ok(Flow::Continue)
    }
}

/// Why a run stops early, inside the engine: its own error, the sink's, or the sink's
/// wish. Public only in the sink-facing signatures; [`distinct`] resolves it.
#[derive(Debug)]
pub(crate) enum Halt<E> {
    Engine(Error),
    Sink(E),
    Stop,
}

impl<E> From<Error> for Halt<E> {
    fn from(e: Error) -> Self {
        Halt::Engine(e)
    }
}

/// What a run did beyond its counters (which are in the shared [`Progress`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The sink asked to stop before the end.
    pub stopped: bool,
    /// Exact mode: sorted runs spilled by the scan (before merges of more than the fan-in).
    pub runs: usize,
    /// Bloom mode: the filter and its expected error.
    pub bloom: Option<BloomReport>,
}

/// What an approximate run adds to the counters.
#[derive(Debug, Clone, Serialize)]
pub struct BloomReport {
    /// Expected number of new records wrongly dropped as repeats.
    pub estimated_false_drops: f64,
    /// Size of the filter.
    pub filter_bytes: u64,
    /// Distinct records it was sized for.
    pub expected_items: u64,
}

/// Run `files` of `tree` through the configured dedup mode into `sink`. In exact mode
/// the stream starts after `resume_after` (the last key a previous run committed).
/// Temporary files are gone when this returns, however it ends.
pub fn distinct<S: Sink>(
    cfg: &Config,
    tree: &Tree,
    files: &[FileEntry],
    resume_after: Option<&[u8]>,
    progress: &Arc<Progress>,
    sink: &mut S,
) -> Result<Report, S::Error> {
    let mut report = Report::default();
    let res = announce(progress, Phase::Scanning, sink).and_then(|()| match cfg.dedup {
        Dedup::Exact => {
            let mut sorted = sort_distinct(cfg, tree, files, None, progress, sink)?;
            report.runs = sorted.spilled();
            stream_range(cfg, &mut sorted, &KeyRange::all(), resume_after, progress, sink)
        }
        Dedup::Bloom => bloom(cfg, tree, files, progress, sink, &mut report),
    });
    let res = res.and_then(|()| announce(progress, Phase::Done, sink));
    finish(res, report)
}

/// A run's outcome as its caller sees it: a stop the sink asked for is a report marked
/// `stopped`; an error is the sink's own type.
pub(crate) fn finish<E: From<Error>>(res: Result<(), Halt<E>>, report: Report) -> Result<Report, E> {
    match res {
        Ok(()) => Ok(report),
        Err(Halt::Stop) => Ok(Report { stopped: true, ..report }),
        Err(Halt::Engine(e)) => Err(e.into()),
        Err(Halt::Sink(e)) => Err(e),
    }
}

/// Merge `range` of `sorted` and hand it over in batches.
pub(crate) fn stream_range<S: Sink>(
    cfg: &Config,
    sorted: &mut Sorted,
    range: &KeyRange,
    resume_after: Option<&[u8]>,
    progress: &Arc<Progress>,
    sink: &mut S,
) -> Result<(), Halt<S::Error>> {
    let stop = Arc::new(AtomicBool::new(false));
    let merger = sorted.merge(range, resume_after, progress.clone(), stop.clone())?;
    announce(progress, Phase::Inserting, sink)?;
    drain_merger(cfg, merger, stop, sink)
}

/// Bytes of records the merge thread hands over at a time, in one channel message (a
/// longer record goes alone).
const BLOCK_BYTES: usize = 64 << 10;
/// Records in one message at most.
const BLOCK: usize = 2048;
/// The memory one message holds: its records' buffer, their ends and repeats.
const BLOCK_FOOTPRINT: usize = BLOCK_BYTES + BLOCK * 2 * std::mem::size_of::<u64>();

/// How far ahead of the consumer the merge thread may work: the memory of the messages
/// it sent and the consumer has not finished with, at most a batch's `max_bytes` (and at
/// most this merge's share of a sort chunk, `merges` sharing it), so that it merges most
/// of the next batch while the sink inserts this one. With four messages of 1,024
/// records it merged only while the consumer filled a batch, and each batch's merge time
/// added to its insert time. The share of the scan's second sort chunk, free while the
/// merge runs, pays for it (see `Budget`).
fn read_ahead(cfg: &Config) -> usize {
    cfg.batch.max_bytes.min(cfg.budget().chunk_bytes / cfg.merges.max(1)).max(BLOCK_FOOTPRINT)
}

/// The memory held by messages sent and not yet consumed, kept under a limit: the sender
/// waits while the next message would pass it. One message always goes, so a record
/// longer than the limit passes too (alone).
struct Gate {
    held: Mutex<usize>,
    taken: Condvar,
    limit: usize,
}

impl Gate {
    fn new(limit: usize) -> Gate {
        Gate { held: Mutex::new(0), taken: Condvar::new(), limit }
    }

    /// Wait for room for `bytes`, then hold them; false if `stop` was set meanwhile (the
    /// consumer is gone).
    fn enter(&self, bytes: usize, stop: &AtomicBool) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while *held > 0 && *held + bytes > self.limit {
            if stop.load(Relaxed) {
                return false;
            }
            held = self.taken.wait_timeout(held, Duration::from_millis(20)).unwrap_or_else(PoisonError::into_inner).0;
        }
        *held += bytes;
        true
    }

    /// The consumer is done with a message of `bytes`.
    fn leave(&self, bytes: usize) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        *held = held.saturating_sub(bytes);
        self.taken.notify_one();
    }
}

/// The memory a message's buffers hold: its records, and the repeats of each.
fn footprint((records, repeats): &(Batch, Vec<u64>)) -> usize {
    records.footprint() + repeats.capacity() * std::mem::size_of::<u64>()
}

/// A message's buffers, allocated once at their full size.
fn block() -> (Batch, Vec<u64>) {
    (Batch::with_capacity(BLOCK_BYTES, BLOCK), Vec::with_capacity(BLOCK))
}

enum Msg {
    /// Records, the repeats the merge dropped of each, and the memory both hold.
    Block(Batch, Vec<u64>, usize),
    /// The merge reached its end: without it, a closed channel means the thread died.
    End,
}

/// Run the merge on its own thread and feed its records to the sink in batches.
fn drain_merger<S: Sink>(
    cfg: &Config,
    mut merger: Merger,
    stop: Arc<AtomicBool>,
    sink: &mut S,
) -> Result<(), Halt<S::Error>> {
    limits::steady_allocator();
    // Unbounded: the gate bounds what is in it.
    let (tx, rx) = mpsc::channel::<Result<Msg>>();
    let gate = Arc::new(Gate::new(read_ahead(cfg)));
    let fault = cfg.fault;
    let (gate_in, stopped, block_tx) = (gate.clone(), stop.clone(), tx.clone());
    let send = move |msg: (Batch, Vec<u64>)| {
        let bytes = footprint(&msg);
        gate_in.enter(bytes, &stopped) && block_tx.send(Ok(Msg::Block(msg.0, msg.1, bytes))).is_ok()
    };
    let producer = limits::spawn("pg_store-merge", move || {
        let mut emitted = 0u64;
        let mut msg = block();
        loop {
            match merger.next_record() {
                Ok(Some((r, n))) => {
                    // Send the message before the record would overflow it.
                    let records = &msg.0;
                    let full =
                        records.len() == BLOCK || (!records.is_empty() && records.bytes() + r.len() > BLOCK_BYTES);
                    if full && !send(std::mem::replace(&mut msg, block())) {
                        return;
                    }
                    msg.0.push(r);
                    msg.1.push(n);
                    emitted += 1;
                    if fault == Some(Fault::MergePanic { after: emitted }) {
                        panic!("injected fault: the merge thread panics after {emitted} records");
                    }
                }
                Ok(None) => {
                    if !msg.0.is_empty() && !send(msg) {
                        return;
                    }
                    let _ = tx.send(Ok(Msg::End));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    })?;
    let mut batcher = cfg.batch.batcher();
    let consumed = (|| -> Result<(), Halt<S::Error>> {
        let mut batch = Batch::default();
        let mut duplicates = 0u64;
        loop {
            match rx.recv() {
                Ok(Ok(Msg::Block(block, repeats, bytes))) => {
                    for (r, n) in block.iter().zip(&repeats) {
                        batch.push(r);
                        duplicates += n;
                        if batch.len() >= batcher.size() || batch.bytes() >= cfg.batch.max_bytes {
                            batch = hand_over(batch, Some(duplicates), &mut batcher, sink)?;
                            duplicates = 0;
                        }
                    }
                    drop((block, repeats));
                    gate.leave(bytes);
                }
                Ok(Ok(Msg::End)) => {
                    hand_over(batch, Some(duplicates), &mut batcher, sink)?;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(Halt::Engine(e)),
                Err(mpsc::RecvError) => {
                    return Err(Halt::Engine(Error::Internal("the merge thread ended before the merge did".into())))
                }
            }
        }
    })();
    stop.store(true, Relaxed);
    drop(rx);
    // A panic on the merge thread is the cause of whatever the consumer saw: report it,
    // never a stream that merely looks complete.
    match producer.join() {
        Err(panic) => Err(Halt::Engine(Error::panicked("the merge thread", &*panic))),
        Ok(()) => consumed,
    }
}

/// Check `batch`, give it to the sink, time it for the batcher; returns the emptied buffer.
/// `exact` carries the merge's repeats of the batch's records (exact mode, which also
/// gives a resume key); `None` in Bloom mode.
fn hand_over<S: Sink>(
    batch: Batch,
    exact: Option<u64>,
    batcher: &mut AdaptiveBatcher,
    sink: &mut S,
) -> Result<Batch, Halt<S::Error>> {
    if batch.is_empty() {
        return Ok(batch);
    }
    let texts = Texts::new(batch)?;
    let info = BatchInfo { resume_key: exact.and(texts.last()), duplicates: exact.unwrap_or(0) };
    let started = Instant::now();
    let flow = sink.batch(&texts, &info).map_err(Halt::Sink)?;
    batcher.observe(texts.len(), started.elapsed());
    flow.into_result()?;
    Ok(texts.into_batch())
}

/// Approximate mode: one pass, input order, a Bloom filter decides what is a repeat.
/// The filter is sized for `bloom_expected` distinct records, by default one per 32
/// bytes of input (a typical record is longer, so it errs on the large side), capped
/// by the memory limit.
fn bloom<S: Sink>(
    cfg: &Config,
    tree: &Tree,
    files: &[FileEntry],
    progress: &Arc<Progress>,
    sink: &mut S,
    report: &mut Report,
) -> Result<(), Halt<S::Error>> {
    let expected = cfg.bloom_expected.unwrap_or_else(|| files.iter().map(|f| f.size).sum::<u64>() / 32).max(1024);
    let cap = cfg.memory_limit.saturating_sub(cfg.budget().merge_buffer as u64 + (8 << 20)).max(1 << 16);
    let mut dedup = ApproxDedup::new(expected, cfg.bloom_fpr, Some(cap))?;
    let mut batcher = cfg.batch.batcher();
    let mut batch = Some(Batch::default());
    scan(cfg, tree, files, progress, sink, &mut |rec, sink| {
        if !dedup.offer(rec) {
            Progress::add(&progress.duplicates, 1);
            return Ok(());
        }
        Progress::add(&progress.distinct, 1);
        let b = batch.as_mut().expect("a batch buffer between hand-overs");
        b.push(rec);
        if b.len() >= batcher.size() || b.bytes() >= cfg.batch.max_bytes {
            batch = Some(hand_over(batch.take().expect("checked"), None, &mut batcher, sink)?);
        }
        Ok(())
    })?;
    hand_over(batch.take().unwrap_or_default(), None, &mut batcher, sink)?;
    report.bloom = Some(BloomReport {
        estimated_false_drops: dedup.estimated_false_drops(),
        filter_bytes: dedup.bytes(),
        expected_items: expected,
    });
    Ok(())
}

/// A sink that keeps everything it is given, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Collect {
    pub records: Vec<String>,
    /// (file, line, offset, reason, prefix) of each reject.
    pub rejects: Vec<(std::path::PathBuf, u64, u64, &'static str, Vec<u8>)>,
    pub files: Vec<(std::path::PathBuf, FileCounts, FileOutcome)>,
    /// Each phase announced, with the number of files done by then.
    pub phases: Vec<(Phase, usize)>,
    pub batches: usize,
    /// The sum of the batches' [`BatchInfo::duplicates`].
    pub duplicates: u64,
    /// The last batch's resume key.
    pub resume_key: Option<String>,
}

#[cfg(test)]
impl Sink for Collect {
    type Error = Error;

    fn batch(&mut self, batch: &Texts, info: &BatchInfo<'_>) -> Result<Flow> {
        assert_eq!(info.resume_key, info.resume_key.and(batch.last()), "the resume key is the batch's last record");
        self.records.extend(batch.iter().map(str::to_string));
        self.batches += 1;
        self.duplicates += info.duplicates;
        self.resume_key = info.resume_key.map(str::to_string);
        Ok(Flow::Continue)
    }

    fn reject(&mut self, r: &Reject<'_>) -> Result<Flow> {
        self.rejects.push((r.file.to_path_buf(), r.line, r.offset, r.reason.as_str(), r.prefix.to_vec()));
        Ok(Flow::Continue)
    }

    fn file_done(&mut self, f: &FileEntry, c: &FileCounts, o: &FileOutcome) -> Result<Flow> {
        self.files.push((f.path.clone(), c.clone(), o.clone()));
        Ok(Flow::Continue)
    }

    fn phase(&mut self, phase: Phase, _: &Progress) -> Result<Flow> {
        self.phases.push((phase, self.files.len()));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    use std::time::Duration;

    use super::{read_ahead, Gate, BLOCK_FOOTPRINT};
    use crate::config::{BatchLimits, Config};

    #[test]
    fn merges_run_at_once_share_the_read_ahead_the_budget_leaves() {
        let mib = 1usize << 20;
        let batch = BatchLimits { max_bytes: 32 * mib, ..BatchLimits::default() };
        let cfg = Config { memory_limit: 256 << 20, batch, ..Config::default() };
        // A sort chunk is (256 - 32) / 2 = 112 MiB: one merge works a batch ahead.
        assert_eq!(read_ahead(&cfg), 32 * mib);
        // Four ranges at once: 28 MiB each, 112 in all; sixteen: 7 MiB each.
        assert_eq!(read_ahead(&Config { merges: 4, ..cfg.clone() }), 28 * mib);
        assert_eq!(read_ahead(&Config { merges: 16, ..cfg.clone() }), 7 * mib);
        // Never less than one message.
        assert_eq!(read_ahead(&Config { merges: 100_000, ..cfg }), BLOCK_FOOTPRINT);
    }

    #[test]
    fn the_gate_holds_the_sender_to_its_limit_lets_one_long_message_pass_and_opens_on_stop() {
        let gate = Arc::new(Gate::new(100));
        let stop = Arc::new(AtomicBool::new(false));
        // One message longer than the limit goes, alone.
        assert!(gate.enter(500, &stop));
        let (g, s) = (gate.clone(), stop.clone());
        let waiter = std::thread::spawn(move || g.enter(60, &s));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "a second message waits while the first is held");
        gate.leave(500);
        assert!(waiter.join().unwrap());
        assert!(gate.enter(40, &stop), "60 + 40 fit in 100");
        let (g, s) = (gate.clone(), stop.clone());
        let waiter = std::thread::spawn(move || g.enter(1, &s));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the limit is reached");
        stop.store(true, Relaxed);
        assert!(!waiter.join().unwrap(), "a stop releases a waiting sender, without room");
    }
}
