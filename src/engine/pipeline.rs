//! The stages wired together: [`sort_distinct`] (exact mode: scan, sort chunks, spill
//! runs; then [`Sorted::merge`] streams the distinct records) and [`bloom_distinct`]
//! (approximate mode: one pass through a Bloom filter).
//!
//! Reading, normalising and filtering run on the caller's thread, which is also where
//! every [`Observer`] callback happens — the extension may call PostgreSQL from them.
//! Sorting and spilling run on a helper thread and a rayon pool, both with signals
//! blocked, overlapping with reading: while one chunk is sorted and written, the next
//! one fills.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use serde::Serialize;
use tempfile::TempDir;

use super::bloom::ApproxDedup;
use super::error::{Error, IoContext, Result};
use super::filter::Filter;
use super::limits::{self, Budget};
use super::merge::{reduce_runs, Merger};
use super::normalize::{self, Reason, Verdict, DEFAULT_MAX_LINE_BYTES};
use super::progress::{Phase, Progress};
use super::read::{self, Codec, RawLine, READ_BUFFER, REJECT_PREFIX};
use super::sort::{self, Chunk, Run};
use super::walk::FileEntry;

/// Prefix of every temporary directory a run creates, so orphans left by a crash can be
/// found and removed (see [`remove_orphans`]).
pub const TEMP_PREFIX: &str = "pg_store-";
/// Default number of runs merged at once (open files during the merge).
pub const DEFAULT_FAN_IN: usize = 128;
/// Records between two [`Observer::tick`] calls and cancel checks.
const TICK_EVERY: u64 = 4096;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Memory budget of the whole pipeline, in bytes.
    pub memory_limit: u64,
    /// Sort threads.
    pub threads: usize,
    /// Where sorted runs are spilled.
    pub temp_dir: PathBuf,
    pub max_line_bytes: usize,
    /// zstd-compress spilled runs: less temporary disk, more CPU.
    pub compress_runs: bool,
    /// Most runs merged at once.
    pub fan_in: usize,
    pub filter: Filter,
    /// Override of the chunk size derived from `memory_limit` (tests use it to force
    /// many runs).
    pub chunk_bytes: Option<usize>,
    pub read_buffer: usize,
    /// Refuse to start when the temporary directory looks too small for the spill.
    pub check_space: bool,
}

impl Default for Config {
    fn default() -> Config {
        let memory_limit = (limits::system_memory() as f64 * limits::DEFAULT_MEMORY_PERCENT / 100.0) as u64;
        Config {
            memory_limit: memory_limit.max(limits::MIN_MEMORY),
            threads: limits::default_threads(),
            temp_dir: std::env::temp_dir(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            compress_runs: false,
            fan_in: DEFAULT_FAN_IN,
            filter: Filter::default(),
            chunk_bytes: None,
            read_buffer: READ_BUFFER,
            check_space: true,
        }
    }
}

impl Config {
    pub fn budget(&self) -> Budget {
        let mut b = Budget::split(self.memory_limit, self.fan_in);
        if let Some(c) = self.chunk_bytes {
            b.chunk_bytes = c;
        }
        b
    }

    /// Fail early if the temporary directory cannot hold the spill of `input` bytes.
    /// The estimate is the decoded input size (compressed files count 4×, a typical
    /// ratio for text), halved for compressed runs; input that fits in memory needs none.
    pub fn check_temp_space(&self, files: &[FileEntry]) -> Result<()> {
        let decoded: u64 = files
            .iter()
            .map(|f| if Codec::for_path(&f.path) == Codec::Plain { f.size } else { f.size.saturating_mul(4) })
            .sum();
        if !self.check_space || decoded <= 2 * self.budget().chunk_bytes as u64 {
            return Ok(());
        }
        let need = if self.compress_runs { decoded / 2 } else { decoded };
        let free = limits::free_space(&self.temp_dir)?;
        if free < need {
            return Err(Error::NoTempSpace { path: self.temp_dir.clone(), need, free });
        }
        Ok(())
    }
}

/// A rejected record, as reported to the [`Observer`].
#[derive(Debug, Serialize)]
pub struct Reject<'a> {
    pub file: &'a Path,
    pub line: u64,
    pub offset: u64,
    pub reason: Reason,
    /// At most [`REJECT_PREFIX`] raw bytes of the record.
    #[serde(skip)]
    pub prefix: &'a [u8],
}

/// Counts for one file, and why it failed if it did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct FileCounts {
    pub records: u64,
    pub empty: u64,
    pub rejected: u64,
    pub filtered: u64,
    pub accepted: u64,
}

/// What the pipeline tells its driver, on the driver's thread.
pub trait Observer {
    /// A record was rejected. Every reject is reported, in input order.
    fn reject(&mut self, _r: &Reject<'_>) -> Result<()> {
        Ok(())
    }
    /// A file was read to the end (`error` is None) or could not be decoded.
    fn file_done(&mut self, _index: usize, _file: &FileEntry, _counts: &FileCounts, _error: Option<&str>) -> Result<()> {
        Ok(())
    }
    /// Called every few thousand records and between chunks. An error stops the run.
    fn tick(&mut self, _progress: &Progress) -> Result<()> {
        Ok(())
    }
    /// The run entered a new phase (`progress.snapshot().phase`); unlike `tick`, worth
    /// reporting at once. An error stops the run.
    fn phase_changed(&mut self, _progress: &Progress) -> Result<()> {
        Ok(())
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// Read every file, calling `accept` for each valid record that passes the filter.
fn scan(
    cfg: &Config,
    files: &[FileEntry],
    progress: &Progress,
    cancel: &AtomicBool,
    obs: &mut dyn Observer,
    accept: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    // The observer may itself raise the cancel flag (a DBA's store_cancel), so look
    // at the flag after asking it.
    let tick = |obs: &mut dyn Observer| -> Result<()> {
        obs.tick(progress)?;
        if cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        Ok(())
    };
    for (index, file) in files.iter().enumerate() {
        tick(obs)?;
        let mut counts = FileCounts::default();
        let mut flushed = FileCounts::default();
        let mut since_tick = 0u64;
        let mut input = match read::open(&file.path, &progress.bytes_read) {
            Ok(input) => input,
            // Gone, or swapped for a link or a special file, since it was listed: record
            // it and go on with the others (a DBA's log rotation must not fail the job).
            // Other errors (permission denied, I/O) stop the run.
            Err(Error::Io { source, .. }) if vanished_or_swapped(&source) => {
                Progress::add(&progress.files_failed, 1);
                Progress::add(&progress.files_done, 1);
                let why = format!("could not open {}: {source} (changed since it was listed)", file.path.display());
                obs.file_done(index, file, &FileCounts::default(), Some(&why))?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = read::split_lines(&mut *input, &file.path, cfg.max_line_bytes, cfg.read_buffer, |l: RawLine<'_>| {
            match normalize::verdict(&l, cfg.max_line_bytes) {
                Verdict::Empty => counts.empty += 1,
                Verdict::Reject(reason) => {
                    counts.records += 1;
                    counts.rejected += 1;
                    let prefix = &l.bytes[..l.bytes.len().min(REJECT_PREFIX)];
                    obs.reject(&Reject { file: &file.path, line: l.line, offset: l.offset, reason, prefix })?;
                }
                Verdict::Accept(rec) => {
                    counts.records += 1;
                    if cfg.filter.keep(rec) {
                        counts.accepted += 1;
                        accept(rec.as_bytes())?;
                    } else {
                        counts.filtered += 1;
                    }
                }
            }
            since_tick += 1;
            if since_tick == TICK_EVERY {
                since_tick = 0;
                flush(progress, &counts, &mut flushed);
                tick(obs)?;
            }
            Ok(())
        });
        drop(input);
        flush(progress, &counts, &mut flushed);
        let error = match result {
            Ok(()) => None,
            // A compressed file that does not decode is recorded and skipped; the records
            // it yielded before the damage are kept (as `zcat` prints them).
            Err(Error::Io { op, path, source }) if Codec::for_path(&file.path) != Codec::Plain && op == "could not read" => {
                Progress::add(&progress.files_failed, 1);
                Some(format!("could not decode {}: {}", path.display(), source))
            }
            Err(e) => return Err(e),
        };
        Progress::add(&progress.files_done, 1);
        obs.file_done(index, file, &counts, error.as_deref())?;
    }
    Ok(())
}

/// Whether opening a listed file failed because it is no longer the regular file that
/// was listed.
fn vanished_or_swapped(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput) || e.raw_os_error() == Some(libc::ELOOP)
}

/// Add what `counts` gained since the last flush to the shared progress.
fn flush(progress: &Progress, counts: &FileCounts, flushed: &mut FileCounts) {
    Progress::add(&progress.records, counts.records - flushed.records);
    Progress::add(&progress.empty, counts.empty - flushed.empty);
    Progress::add(&progress.rejected, counts.rejected - flushed.rejected);
    Progress::add(&progress.filtered, counts.filtered - flushed.filtered);
    *flushed = counts.clone();
}

/// The outcome of the scan-and-sort phase: sorted distinct runs on disk plus the last
/// chunk in memory, ready to merge.
pub struct Sorted {
    runs: Vec<Run>,
    mem: Option<Chunk>,
    temp: Option<TempDir>,
    cfg: Config,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
}

impl Sorted {
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Stream the distinct records in bytewise order, starting after `resume_after`.
    /// Runs beyond the fan-in are first merged in levels, which takes a while on big
    /// inputs: `obs` is told when that starts.
    pub fn merge(self, resume_after: Option<&[u8]>, obs: &mut dyn Observer) -> Result<Merger> {
        self.progress.set_phase(Phase::Merging);
        let buffer = self.cfg.budget().merge_buffer;
        let runs = match &self.temp {
            Some(t) if self.runs.len() > self.cfg.fan_in => {
                obs.phase_changed(&self.progress)?;
                reduce_runs(self.runs, self.cfg.fan_in, buffer, t.path(), self.cfg.compress_runs, &self.progress, &self.cancel)?
            }
            _ => self.runs,
        };
        Merger::new(&runs, self.mem, buffer, resume_after, self.progress, self.cancel, self.temp)
    }
}

enum Job {
    Spill(Chunk, PathBuf),
}

/// Exact mode, first phase: read `files`, sort and deduplicate in chunks, spill runs.
pub fn sort_distinct(
    cfg: &Config,
    files: &[FileEntry],
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    obs: &mut dyn Observer,
) -> Result<Sorted> {
    progress.set_phase(Phase::Scanning);
    cfg.check_temp_space(files)?;
    let budget = cfg.budget();
    let pool = limits::thread_pool(cfg.threads)?;
    let mut temp: Option<TempDir> = None;
    let mut runs = Vec::new();

    let mut current = Chunk::new(budget.chunk_bytes);
    let outcome: Result<Chunk> = std::thread::scope(|s| {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(0);
        let (back_tx, back_rx) = mpsc::sync_channel::<Result<Chunk>>(1);
        let spiller = limits::with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("pg_store-spill".into())
                .spawn_scoped(s, || spill_loop(job_rx, back_tx, &pool, cfg.compress_runs, &progress))
                .expect("spawn spill thread")
        });
        let mut spare = Some(Chunk::new(budget.chunk_bytes));
        let mut spilled = 0usize;
        let mut hand_over = |full: &mut Chunk, spare: &mut Option<Chunk>, temp: &mut Option<TempDir>| -> Result<()> {
            let next = match spare.take() {
                Some(c) => c,
                None => wait_back(&back_rx)?,
            };
            let dir = match temp {
                Some(t) => t.path().to_path_buf(),
                None => temp.insert(make_temp_dir(&cfg.temp_dir)?).path().to_path_buf(),
            };
            let path = dir.join(format!("run-{spilled:06}.run"));
            spilled += 1;
            let chunk = std::mem::replace(full, next);
            if job_tx.send(Job::Spill(chunk, path)).is_err() {
                // The spill thread quit: its error is waiting on the back channel.
                return Err(wait_back(&back_rx).err().unwrap_or(Error::Cancelled));
            }
            Ok(())
        };
        let res = scan(cfg, files, &progress, &cancel, obs, &mut |rec| {
            if !current.push(rec) {
                hand_over(&mut current, &mut spare, &mut temp)?;
                let pushed = current.push(rec);
                debug_assert!(pushed);
            }
            Ok(())
        });
        // Wait for the chunk in flight, if any, so every run is complete.
        let in_flight = spilled > 0 && spare.is_none();
        drop(job_tx);
        let back = if in_flight { wait_back(&back_rx).map(|_| ()) } else { Ok(()) };
        let spilled_runs = spiller.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        runs = spilled_runs;
        res?;
        back?;
        Ok(std::mem::take(&mut current))
    });
    let mut last = outcome?;
    progress.set_phase(Phase::Sorting);
    obs.phase_changed(&progress)?;
    if cancel.load(Relaxed) {
        return Err(Error::Cancelled);
    }
    let dups = last.sort_dedup(&pool);
    Progress::add(&progress.duplicates, dups);
    Ok(Sorted { runs, mem: Some(last), temp, cfg: cfg.clone(), progress, cancel })
}

fn wait_back(back: &Receiver<Result<Chunk>>) -> Result<Chunk> {
    back.recv().unwrap_or(Err(Error::Cancelled))
}

/// The spill thread: sort each chunk it is given, write it as a run, hand the emptied
/// chunk back. Returns the runs written; stops at the first error, after reporting it.
fn spill_loop(jobs: Receiver<Job>, back: SyncSender<Result<Chunk>>, pool: &rayon::ThreadPool, compress: bool, progress: &Progress) -> Vec<Run> {
    let mut runs = Vec::new();
    for Job::Spill(mut chunk, path) in jobs {
        let dups = chunk.sort_dedup(pool);
        Progress::add(&progress.duplicates, dups);
        match sort::spill(&chunk, &path, compress) {
            Ok(run) => {
                progress.temp_grew(run.bytes);
                Progress::add(&progress.runs_written, 1);
                runs.push(run);
                chunk.clear();
                if back.send(Ok(chunk)).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                let _ = back.send(Err(e));
                break;
            }
        }
    }
    runs
}

fn make_temp_dir(parent: &Path) -> Result<TempDir> {
    tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir_in(parent).ctx("could not create temporary directory in", parent)
}

/// Remove temporary directories left in `dir` by runs that died (`kill -9`, power
/// loss) — only call this where no live run can be using `dir`. Returns how many.
pub fn remove_orphans(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("could not list", dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(TEMP_PREFIX) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(entry.path()).ctx("could not remove orphaned temporary directory", &entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// What an approximate run adds to the counters.
#[derive(Debug, Clone, Serialize)]
pub struct BloomReport {
    /// Expected number of new records wrongly dropped as repeats.
    pub estimated_false_drops: f64,
    pub filter_bytes: u64,
    pub expected_items: u64,
}

/// Approximate mode: one pass, input order, a Bloom filter decides what is a repeat.
/// `expected` distinct records size the filter; by default one per 32 bytes of input
/// (a typical record is longer, so the filter errs on the large side), capped by the
/// memory limit.
#[allow(clippy::too_many_arguments)]
pub fn bloom_distinct(
    cfg: &Config,
    files: &[FileEntry],
    fpr: f64,
    expected: Option<u64>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
    obs: &mut dyn Observer,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<BloomReport> {
    progress.set_phase(Phase::Scanning);
    let expected = expected.unwrap_or_else(|| files.iter().map(|f| f.size).sum::<u64>() / 32).max(1024);
    let cap = cfg.memory_limit.saturating_sub(cfg.budget().merge_buffer as u64 + (8 << 20)).max(1 << 16);
    let mut dedup = ApproxDedup::new(expected, fpr, Some(cap))?;
    scan(cfg, files, &progress, &cancel, obs, &mut |rec| {
        if dedup.offer(rec) {
            Progress::add(&progress.distinct, 1);
            emit(rec)
        } else {
            Progress::add(&progress.duplicates, 1);
            Ok(())
        }
    })?;
    progress.set_phase(Phase::Done);
    Ok(BloomReport { estimated_false_drops: dedup.estimated_false_drops(), filter_bytes: dedup.bytes(), expected_items: expected })
}
