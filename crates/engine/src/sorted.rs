//! Exact mode's first phase: scan every file into fixed-budget chunks; sort and spill
//! each full chunk as a run on a helper thread while the next one fills; sort the last
//! chunk in memory. [`Sorted::merge`] then opens the k-way merge over all of them.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use tempfile::TempDir;

use super::config::{Config, Fault};
use super::error::{Error, IoContext, Result};
use super::limits;
use super::merge::{reduce_runs, Merger};
use super::progress::{Phase, Progress};
use super::scan::scan;
use super::sort::{self, Chunk, Run};
use super::stream::{Halt, Sink};
use super::walk::{FileEntry, Tree};

/// Prefix of every temporary directory a run creates, so orphans left by a crash can be
/// found and removed (see [`remove_orphans`]).
pub const TEMP_PREFIX: &str = "pg_store-";

/// The outcome of the scan-and-sort phase: sorted distinct runs on disk plus the last
/// chunk in memory, ready to merge.
pub struct Sorted {
    runs: Vec<Run>,
    mem: Option<Chunk>,
    temp: Option<TempDir>,
    cfg: Config,
    progress: Arc<Progress>,
    /// Raised to stop the merge's threads early.
    stop: Arc<AtomicBool>,
}

impl Sorted {
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Open the merge of every source, starting after `resume_after`. Runs beyond the
    /// fan-in are first merged in levels, which takes a while on big inputs: the sink
    /// is told when that starts.
    pub(crate) fn merge<S: Sink>(
        self,
        resume_after: Option<&[u8]>,
        sink: &mut S,
    ) -> Result<(Merger, Arc<AtomicBool>), Halt<S::Error>> {
        let buffer = self.cfg.budget().merge_buffer;
        let runs = match &self.temp {
            Some(t) if self.runs.len() > self.cfg.fan_in => {
                announce(&self.progress, Phase::Merging, sink)?;
                reduce_runs(
                    self.runs,
                    self.cfg.fan_in,
                    buffer,
                    t.path(),
                    self.cfg.compress_runs,
                    &self.progress,
                    &self.stop,
                )?
            }
            _ => self.runs,
        };
        let m = Merger::new(&runs, self.mem, buffer, resume_after, self.progress, self.stop.clone(), self.temp)?;
        Ok((m, self.stop))
    }
}

/// Set the phase and tell the sink.
pub(crate) fn announce<S: Sink>(progress: &Progress, phase: Phase, sink: &mut S) -> Result<(), Halt<S::Error>> {
    progress.set_phase(phase);
    sink.phase(phase, progress).map_err(Halt::Sink)?.into_result()
}

/// Read `files`, sort and deduplicate in chunks, spill runs.
pub(crate) fn sort_distinct<S: Sink>(
    cfg: &Config,
    tree: &Tree,
    files: &[FileEntry],
    progress: &Arc<Progress>,
    sink: &mut S,
) -> Result<Sorted, Halt<S::Error>> {
    cfg.check_temp_space(files)?;
    let budget = cfg.budget();
    let pool = limits::thread_pool(cfg.threads)?;
    let mut temp: Option<TempDir> = None;
    let mut runs = Vec::new();
    let mut current = Chunk::new(budget.chunk_bytes);
    let outcome: Result<(), Halt<S::Error>> = std::thread::scope(|s| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(Chunk, PathBuf)>(0);
        let (back_tx, back_rx) = mpsc::sync_channel::<Result<Chunk>>(1);
        let (pool, corrupt) = (&pool, cfg.fault == Some(Fault::CorruptRuns));
        let spiller = limits::spawn_scoped(s, "pg_store-spill", move || {
            spill_loop(job_rx, back_tx, pool, cfg.compress_runs, corrupt, progress)
        })?;
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
            if job_tx.send((chunk, path)).is_err() {
                // The spill thread quit: its error is waiting on the back channel.
                return Err(wait_back(&back_rx).err().unwrap_or(Error::Stopped));
            }
            Ok(())
        };
        let res = scan(cfg, tree, files, progress, sink, &mut |rec, _| {
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
        runs = spiller.join().map_err(|p| Error::panicked("the spill thread", &*p))?;
        res?;
        back?;
        Ok(())
    });
    outcome?;
    announce(progress, Phase::Sorting, sink)?;
    let dups = current.sort_dedup(&pool);
    Progress::add(&progress.duplicates, dups);
    Ok(Sorted { runs, mem: Some(current), temp, cfg: cfg.clone(), progress: progress.clone(), stop: Arc::default() })
}

fn wait_back(back: &Receiver<Result<Chunk>>) -> Result<Chunk> {
    back.recv().unwrap_or(Err(Error::Stopped))
}

/// The spill thread: sort each chunk it is given, write it as a run, hand the emptied
/// chunk back. Returns the runs written; stops at the first error, after reporting it.
fn spill_loop(
    jobs: Receiver<(Chunk, PathBuf)>,
    back: SyncSender<Result<Chunk>>,
    pool: &rayon::ThreadPool,
    compress: bool,
    corrupt: bool,
    progress: &Progress,
) -> Vec<Run> {
    let mut runs = Vec::new();
    for (mut chunk, path) in jobs {
        let dups = chunk.sort_dedup(pool);
        Progress::add(&progress.duplicates, dups);
        let spilled = sort::spill(&chunk, &path, compress).and_then(|run| {
            if corrupt {
                corrupt_first_byte(&run.path)?;
            }
            Ok(run)
        });
        match spilled {
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

/// [`Fault::CorruptRuns`]: overwrite a run's first byte, the first byte of a record.
fn corrupt_first_byte(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).ctx("could not open temporary run", path)?;
    f.write_all_at(&[0xFF], 0).ctx("could not write temporary run", path)
}

fn make_temp_dir(parent: &Path) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(parent)
        .ctx("could not create temporary directory in", parent)
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
            std::fs::remove_dir_all(entry.path())
                .ctx("could not remove orphaned temporary directory", &entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}
