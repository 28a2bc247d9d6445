//! Exact mode's first phase: scan every file into fixed-budget chunks; sort and spill
//! each full chunk as a run on a helper thread while the next one fills; sort the last
//! chunk; merge runs beyond the fan-in in levels. [`Sorted::merge`] then opens the
//! k-way merge over what is left, for the whole key space or one [`KeyRange`] of it.
//!
//! Kept sorts ([`Keep`]) spill the last chunk too, flush every run to disk and write a
//! manifest: the runs, their sparse indexes, the files they were read from and the
//! scan's counters. A later attempt of the same job loads them ([`Sorted::load`]) instead
//! of reading and sorting its files again — after a crash, only the batch in flight and
//! reopening the runs are lost — and parallel inserters each merge their own key range
//! of them. A kept directory is trusted only once [`private_dir::verify`] has passed:
//! anyone who could write in it could hand a later attempt runs of their choosing.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use super::config::{Config, Fault};
use super::error::{Error, IoContext, Result};
use super::limits;
use super::merge::{reduce_runs, KeyRange, Merger};
use super::private_dir;
use super::progress::{Phase, Progress};
use super::scan::scan;
use super::sort::{self, Chunk, Mark, Run};
use super::stream::{Halt, Sink};
use super::walk::{FileEntry, Tree};

/// Prefix of every temporary directory a run creates, so that one left by a crash is
/// recognised as pg_store's.
pub(crate) const TEMP_PREFIX: &str = "pg_store-";
/// The manifest of a kept sort, in its directory.
pub(crate) const MANIFEST: &str = "manifest.json";
/// 2: marks may keep a prefix of their record (`Mark::cut`). A library that knows only
/// version 1 would take such a prefix for the record and could seek past lines, so it
/// must not read these; version 1's marks are whole records, which this one reads.
const MANIFEST_VERSION: u32 = 2;
const MANIFEST_VERSIONS_READ: [u32; 2] = [1, 2];

/// Bytes of a record a range's cut keeps at most (the default `store.max_line_bytes`):
/// a cut is stored with its range and read back at each attempt, and a record may be as
/// long as `store.max_line_bytes` allows. Records that share a longer head than this
/// fall into one range (exact, but not split).
const CUT_BYTES: usize = 64 << 10;

/// Where and under which spec a sort is kept across attempts. The caller owns the
/// directory: it creates it ([`private_dir::create`], or the sort does), and removes it
/// when the job ends ([`private_dir::remove`]). It must pass [`private_dir::verify`]
/// (ours, mode 0700, not a link) before anything in it is read or written.
#[derive(Debug, Clone)]
pub(crate) struct Keep {
    pub dir: PathBuf,
    /// Everything besides the files that decides which records the runs hold (limits,
    /// filter, …): a kept sort is loaded only for the same spec.
    pub spec: String,
}

/// The scan's counters, kept with the runs so a resumed job reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub files_done: u64,
    pub files_failed: u64,
    pub bytes_read: u64,
    pub records: u64,
    pub empty: u64,
    pub rejected: u64,
    pub filtered: u64,
    pub duplicates: u64,
    pub temp_peak: u64,
}

impl Counts {
    fn of(p: &Progress) -> Counts {
        let s = p.snapshot();
        Counts {
            files_done: s.files_done,
            files_failed: s.files_failed,
            bytes_read: s.bytes_read,
            records: s.records,
            empty: s.empty,
            rejected: s.rejected,
            filtered: s.filtered,
            duplicates: s.duplicates,
            temp_peak: s.temp_peak,
        }
    }

    fn restore(&self, p: &Progress) {
        for (counter, v) in [
            (&p.files_done, self.files_done),
            (&p.files_failed, self.files_failed),
            (&p.bytes_read, self.bytes_read),
            (&p.records, self.records),
            (&p.empty, self.empty),
            (&p.rejected, self.rejected),
            (&p.filtered, self.filtered),
            (&p.duplicates, self.duplicates),
        ] {
            counter.store(v, std::sync::atomic::Ordering::Relaxed);
        }
        p.temp_peak.fetch_max(self.temp_peak, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    spec: String,
    files: Vec<FileEntry>,
    /// Runs, with paths relative to the manifest's directory.
    runs: Vec<Run>,
    counts: Counts,
}

/// Where the runs live: a temporary directory removed with the merge, or a kept one.
enum Store {
    None,
    Temp(TempDir),
    Kept(PathBuf),
}

/// The outcome of the scan-and-sort phase: sorted distinct runs on disk (at most the
/// fan-in), plus the last chunk in memory unless the sort is kept.
pub(crate) struct Sorted {
    runs: Vec<Run>,
    /// Runs the scan spilled, before any were merged into longer ones.
    spilled: usize,
    mem: Option<Chunk>,
    store: Store,
    cfg: Config,
}

impl Sorted {
    /// Runs the final merge reads (at most the fan-in).
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }

    /// The settings it was made (or loaded) with.
    pub(crate) fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// `merges` merges of this sort will run at once (see [`Config::merges`]).
    pub(crate) fn share(&mut self, merges: usize) {
        self.cfg.merges = merges.max(1);
    }

    /// Runs the scan spilled.
    pub(crate) fn spilled(&self) -> usize {
        self.spilled
    }

    /// The stream's smallest record, or a prefix of it when that record is long: the
    /// least of the runs' first marks (a plain run marks its first record). `None` for
    /// compressed runs (no marks) or no runs.
    pub(crate) fn first_key(&self) -> Option<&str> {
        self.runs.iter().filter_map(|r| r.index.first()).map(|m| m.key.as_str()).min()
    }

    /// Split the key space into at most `n` ranges of about the same amount of data,
    /// from the runs' sparse indexes. A mark at offset `o` of a run says that `o` of its
    /// bytes sort below its key, and the run's next mark that fewer than the next offset
    /// do: the bytes at or below a key are taken as halfway between, and each mark weighs
    /// what it adds to that (a run's first mark, its lowest key, half of its first
    /// stretch). Fewer ranges when the data is too small to split. A cut is a record's first
    /// [`CUT_BYTES`] at most (read from its run where the mark keeps less, and marks
    /// that keep the same prefix are ordered by those heads), so records that share a
    /// head longer than a mark's still split evenly. Any increasing cuts partition
    /// the keys; the cuts only decide how evenly.
    pub(crate) fn ranges(&self, n: usize) -> Result<Vec<KeyRange>> {
        // Each mark with the key it sorts by (its own, or, where several cut marks keep
        // the same prefix — records sharing a long head —, the head read from its run)
        // and its weight.
        let mut marks: Vec<(Cow<'_, str>, &Mark, &Run, u64)> = self
            .runs
            .iter()
            .flat_map(|r| {
                let offset = |j: usize| r.index.get(j).map_or(r.bytes, |m| m.offset);
                r.index.iter().enumerate().map(move |(j, m)| {
                    let before = if j == 0 { 0 } else { offset(j - 1) };
                    (Cow::Borrowed(m.key.as_str()), m, r, offset(j + 1).saturating_sub(before) / 2)
                })
            })
            .collect();
        marks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut i = 0;
        while i < marks.len() {
            let tied = marks[i..].iter().take_while(|t| t.0 == marks[i].0).count();
            if tied > 1 && marks[i..i + tied].iter().any(|t| t.1.cut) {
                for t in &mut marks[i..i + tied] {
                    if t.1.cut {
                        t.0 = Cow::Owned(t.2.record_at(t.1, CUT_BYTES)?);
                    }
                }
                marks[i..i + tied].sort_unstable_by(|a, b| a.0.cmp(&b.0));
            }
            i += tied;
        }
        // Cut i at the first mark with i/n of the weight at or below it (the weights leave
        // out half of each run's last stretch, above its last mark: with the runs' bytes
        // as the whole, the last cuts could fall beyond every mark).
        let total: u128 = marks.iter().map(|t| u128::from(t.3)).sum();
        let mut below: u128 = 0;
        let mut at = Vec::with_capacity(n);
        for (k, t) in marks.iter().enumerate() {
            below += u128::from(t.3);
            // (Never at the lowest mark, the stream's first record: a range of one line.)
            while k > 0 && at.len() + 1 < n.max(1) && below * n as u128 >= (at.len() as u128 + 1) * total {
                at.push(k);
            }
        }
        let mut cuts: Vec<String> = Vec::new();
        for k in at {
            let (key, m, run, _) = &marks[k];
            cuts.push(match key {
                Cow::Owned(k) => k.clone(),
                Cow::Borrowed(_) if m.cut => run.record_at(m, CUT_BYTES)?,
                Cow::Borrowed(k) => k.to_string(),
            });
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ranges = Vec::with_capacity(cuts.len() + 1);
        let mut after = None;
        for c in cuts {
            ranges.push(KeyRange { after: after.clone(), upto: Some(c.clone()) });
            after = Some(c);
        }
        ranges.push(KeyRange { after, upto: None });
        Ok(ranges)
    }

    /// Open the merge of `range`, starting after `resume_after` when that is further.
    /// A temporary sort's directory goes with the merger; only a sort that is not kept
    /// can be merged once.
    pub(crate) fn merge(
        &mut self,
        range: &KeyRange,
        resume_after: Option<&[u8]>,
        progress: Arc<Progress>,
        stop: Arc<AtomicBool>,
    ) -> Result<Merger> {
        let buffer = self.cfg.budget().merge_buffer;
        let temp = match std::mem::replace(&mut self.store, Store::None) {
            Store::Temp(t) => Some(t),
            Store::Kept(d) => {
                self.store = Store::Kept(d);
                None
            }
            Store::None => None,
        };
        let upto = range.upto.as_deref().map(str::as_bytes);
        Merger::new(&self.runs, self.mem.take(), buffer, range.start(resume_after), upto, progress, stop, temp)
    }

    /// The sort kept in `keep.dir`, if it is there, complete, and made under the same
    /// spec (and from these very files, when given); its counters go into `progress`.
    /// A directory that is there but fails [`private_dir::verify`] is an error
    /// ([`Error::Insecure`]), never a sort to load.
    pub(crate) fn load(
        keep: &Keep,
        files: Option<&[FileEntry]>,
        cfg: &Config,
        progress: &Progress,
    ) -> Result<Option<Sorted>> {
        match private_dir::verify(&keep.dir) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            res => res?,
        }
        let path = keep.dir.join(MANIFEST);
        let text = match private_dir::open_file(&path).and_then(|mut f| {
            let mut t = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut t).map(|_| t)
        }) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("could not read", &path, e)),
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&text) else { return Ok(None) };
        if !MANIFEST_VERSIONS_READ.contains(&m.version) || m.spec != keep.spec || files.is_some_and(|f| m.files != f) {
            return Ok(None);
        }
        let mut runs = m.runs;
        for r in &mut runs {
            // A run is a plain file beside the manifest: a name of one component, not a
            // path that leads out of the directory, and not a link.
            let mut parts = r.path.components();
            if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
                return Ok(None);
            }
            r.path = keep.dir.join(&r.path);
            match std::fs::symlink_metadata(&r.path) {
                Ok(meta) if meta.is_file() && meta.len() == r.bytes => {}
                _ => return Ok(None),
            }
        }
        m.counts.restore(progress);
        Ok(Some(Sorted {
            spilled: runs.len(),
            runs,
            mem: None,
            store: Store::Kept(keep.dir.clone()),
            cfg: cfg.clone(),
        }))
    }
}

/// Set the phase and tell the sink.
pub(crate) fn announce<S: Sink>(progress: &Progress, phase: Phase, sink: &mut S) -> Result<(), Halt<S::Error>> {
    progress.set_phase(phase);
    sink.phase(phase, progress).map_err(Halt::Sink)?.into_result()
}

/// Read `files`, sort and deduplicate in chunks, spill runs; keep them under `keep`.
pub(crate) fn sort_distinct<S: Sink>(
    cfg: &Config,
    tree: &Tree,
    files: &[FileEntry],
    keep: Option<&Keep>,
    progress: &Arc<Progress>,
    sink: &mut S,
) -> Result<Sorted, Halt<S::Error>> {
    cfg.check_temp_space(files)?;
    limits::steady_allocator();
    let budget = cfg.budget();
    let pool = limits::thread_pool(cfg.threads)?;
    let mut store = match keep {
        Some(k) => {
            private_dir::ensure(&k.dir)?;
            // A manifest left by an earlier sort no longer describes what is written now.
            remove_kept(&k.dir)?;
            Store::Kept(k.dir.clone())
        }
        None => Store::None,
    };
    let durable = keep.is_some();
    let mut runs = Vec::new();
    let mut spilled = 0usize;
    let mut current = Chunk::new(budget.chunk_bytes);
    let outcome: Result<(), Halt<S::Error>> = std::thread::scope(|s| {
        let (job_tx, job_rx) = mpsc::sync_channel::<(Chunk, PathBuf)>(0);
        let (back_tx, back_rx) = mpsc::sync_channel::<Result<Chunk>>(1);
        let (pool, corrupt) = (&pool, cfg.fault == Some(Fault::CorruptRuns));
        let spiller = limits::spawn_scoped(s, "pg_store-spill", move || {
            spill_loop(job_rx, back_tx, pool, cfg.compress_runs, durable, corrupt, progress)
        })?;
        let mut spare = Some(Chunk::new(budget.chunk_bytes));
        let mut hand_over = |full: &mut Chunk, spare: &mut Option<Chunk>, store: &mut Store| -> Result<()> {
            let next = match spare.take() {
                Some(c) => c,
                None => wait_back(&back_rx)?,
            };
            let path = run_dir(store, &cfg.temp_dir)?.join(format!("run-{spilled:06}.run"));
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
                hand_over(&mut current, &mut spare, &mut store)?;
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
    // A kept sort writes its last chunk too: the whole input is then on disk.
    let mem = if keep.is_some() && !current.is_empty() {
        let path = run_dir(&mut store, &cfg.temp_dir)?.join(format!("run-{spilled:06}.run"));
        let run = sort::spill(&current, &path, cfg.compress_runs, true)?;
        progress.temp_grew(run.bytes);
        Progress::add(&progress.runs_written, 1);
        runs.push(run);
        None
    } else {
        Some(current)
    };
    let spilled = runs.len();
    let longest: Vec<u64> = runs.iter().map(|r| r.longest).collect();
    if runs.len() > budget.merge_width(&longest, cfg.fan_in) {
        announce(progress, Phase::Merging, sink)?;
        let dir = run_dir(&mut store, &cfg.temp_dir)?;
        runs = reduce_runs(runs, cfg.fan_in, budget, &dir, cfg.compress_runs, durable, progress, &Arc::default())?;
    }
    // Only a sort of every file, each read whole and unchanged, is worth resuming from.
    let complete = progress.files_failed.load(std::sync::atomic::Ordering::Relaxed) == 0
        && progress.files_changed.load(std::sync::atomic::Ordering::Relaxed) == 0;
    if let Some(k) = keep.filter(|_| complete) {
        write_manifest(k, files, &runs, &Counts::of(progress))?;
    }
    Ok(Sorted { runs, spilled, mem, store, cfg: cfg.clone() })
}

/// The directory runs go into, made on first use for a temporary sort.
fn run_dir(store: &mut Store, parent: &Path) -> Result<PathBuf> {
    Ok(match store {
        Store::Kept(d) => d.clone(),
        Store::Temp(t) => t.path().to_path_buf(),
        Store::None => {
            let t = make_temp_dir(parent)?;
            let p = t.path().to_path_buf();
            *store = Store::Temp(t);
            p
        }
    })
}

/// Write the manifest beside the runs, atomically (rename) and durably. It is written
/// to a new file of its own first, so a name left there is never written through.
fn write_manifest(keep: &Keep, files: &[FileEntry], runs: &[Run], counts: &Counts) -> Result<()> {
    let rel: Vec<Run> = runs
        .iter()
        .map(|r| Run { path: r.path.strip_prefix(&keep.dir).unwrap_or(&r.path).to_path_buf(), ..r.clone() })
        .collect();
    let m = Manifest {
        version: MANIFEST_VERSION,
        spec: keep.spec.clone(),
        files: files.to_vec(),
        runs: rel,
        counts: counts.clone(),
    };
    let body = serde_json::to_vec(&m).map_err(|e| Error::Internal(format!("manifest: {e}")))?;
    let (f, tmp) = private_dir::create_temp_file(&keep.dir, MANIFEST)?;
    let path = keep.dir.join(MANIFEST);
    let written = std::io::Write::write_all(&mut &f, &body)
        .ctx("could not write", &tmp)
        .and_then(|()| f.sync_all().ctx("could not flush", &tmp))
        // rename replaces the name, never what a link there points to.
        .and_then(|()| std::fs::rename(&tmp, &path).ctx("could not rename into", &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(&keep.dir).and_then(|d| d.sync_all()).ctx("could not flush", &keep.dir)
}

/// Empty a kept sort's directory (the manifest first, so a crash halfway leaves nothing
/// that looks complete); a subdirectory (a temporary sort's, left by a crash) goes with
/// its contents, links are removed and never followed. Nothing there is fine; a
/// directory that fails [`private_dir::verify`] is an error, and is left alone.
pub(crate) fn remove_kept(dir: &Path) -> Result<()> {
    match private_dir::verify(dir) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        res => res?,
    }
    match std::fs::remove_file(dir.join(MANIFEST)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("could not remove", &dir.join(MANIFEST), e))
        }
        _ => {}
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("could not list", dir, e)),
    };
    for e in entries.flatten() {
        let path = e.path();
        // The entry's own type: a link to a directory is a link.
        let res = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        res.ctx("could not remove", &path)?;
    }
    Ok(())
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
    durable: bool,
    corrupt: bool,
    progress: &Progress,
) -> Vec<Run> {
    let mut runs = Vec::new();
    for (mut chunk, path) in jobs {
        let dups = chunk.sort_dedup(pool);
        Progress::add(&progress.duplicates, dups);
        let spilled = sort::spill(&chunk, &path, compress, durable).and_then(|run| {
            if corrupt {
                corrupt_first_byte(&run.path)?;
            }
            Ok(run)
        });
        match spilled {
            Ok(run) => {
                // The run written from a full chunk while the scan fills the next one.
                progress.note_memory();
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
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx("could not open temporary run", path)?;
    f.write_all_at(&[0xFF], 0).ctx("could not write temporary run", path)
}

/// A new directory for a sort that is not kept: a fresh random name made by `mkdir`,
/// mode 0700.
fn make_temp_dir(parent: &Path) -> Result<TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .permissions(std::fs::Permissions::from_mode(private_dir::DIR_MODE))
        .tempdir_in(parent)
        .ctx("could not create temporary directory in", parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kept::KeptSort;
    use crate::stream::Collect;
    use crate::walk::walk;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// A kept sort of a small input under `dir/job`.
    fn kept(dir: &Path) -> (Keep, Config, Vec<FileEntry>) {
        let input = dir.canonicalize().unwrap().join("in");
        std::fs::create_dir(&input).unwrap();
        let text: String = (0..2000).map(|i| format!("line {}\n", i % 700)).collect();
        std::fs::write(input.join("a.txt"), text).unwrap();
        let keep = Keep { dir: dir.join("job"), spec: "s".into() };
        let cfg = Config { temp_dir: dir.to_path_buf(), chunk_bytes: Some(4096), ..Config::default() };
        let (tree, listing) = walk(&input).unwrap();
        KeptSort::sort(&keep.dir, &keep.spec, &cfg, &tree, &listing.files, &Arc::default(), &mut Collect::default())
            .unwrap();
        (keep, cfg, listing.files)
    }

    #[test]
    fn a_kept_sort_is_private_and_loaded_only_from_a_private_directory() {
        let d = tempfile::tempdir().unwrap();
        let (keep, cfg, files) = kept(d.path());
        assert_eq!(mode_of(&keep.dir), 0o700);
        let names: Vec<_> = std::fs::read_dir(&keep.dir).unwrap().flatten().map(|e| e.path()).collect();
        assert!(names.len() > 2 && names.iter().any(|p| p.ends_with(MANIFEST)), "{names:?}");
        for p in &names {
            assert_eq!(mode_of(p), 0o600, "{}", p.display());
        }
        assert!(Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).unwrap().is_some());

        // Opened up to others: refused, not loaded, not emptied.
        std::fs::set_permissions(&keep.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).err().unwrap();
        assert!(matches!(err, Error::Insecure { .. }), "{err}");
        assert!(matches!(remove_kept(&keep.dir), Err(Error::Insecure { .. })));
        assert!(keep.dir.join(MANIFEST).exists());

        // A link in place of the directory: refused too, even to a private one.
        std::fs::set_permissions(&keep.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let moved = d.path().join("moved");
        std::fs::rename(&keep.dir, &moved).unwrap();
        symlink(&moved, &keep.dir).unwrap();
        let err = Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).err().unwrap();
        assert!(matches!(err, Error::Insecure { .. }) && err.to_string().contains("symbolic link"), "{err}");
        let input = d.path().canonicalize().unwrap().join("in");
        let (tree, listing) = walk(&input).unwrap();
        let r = KeptSort::sort(
            &keep.dir,
            &keep.spec,
            &cfg,
            &tree,
            &listing.files,
            &Arc::default(),
            &mut Collect::default(),
        );
        assert!(matches!(r, Err(Error::Insecure { .. })), "a sort is not written through a link");

        // Gone: nothing to load, nothing to empty.
        std::fs::remove_file(&keep.dir).unwrap();
        assert!(Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).unwrap().is_none());
        remove_kept(&keep.dir).unwrap();
    }

    #[test]
    fn a_manifest_naming_a_run_outside_its_directory_or_a_link_is_not_loaded() {
        let d = tempfile::tempdir().unwrap();
        let (keep, cfg, files) = kept(d.path());
        let path = keep.dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut m: Manifest = serde_json::from_str(&text).unwrap();
        let first = m.runs[0].path.clone();
        let outside = d.path().join("outside.run");
        std::fs::copy(keep.dir.join(&first), &outside).unwrap();
        for bad in [outside.clone(), PathBuf::from("../outside.run")] {
            m.runs[0].path = bad;
            std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
            assert!(Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).unwrap().is_none());
        }
        // The run's own name, but a link there.
        m.runs[0].path = first.clone();
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        std::fs::remove_file(keep.dir.join(&first)).unwrap();
        symlink(&outside, keep.dir.join(&first)).unwrap();
        assert!(Sorted::load(&keep, Some(&files), &cfg, &Progress::default()).unwrap().is_none());
    }

    #[test]
    fn the_manifest_is_replaced_never_written_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let (keep, _, files) = kept(d.path());
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let path = keep.dir.join(MANIFEST);
        std::fs::remove_file(&path).unwrap();
        symlink(&victim, &path).unwrap();
        write_manifest(&keep, &files, &[], &Counts::default()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(mode_of(&path), 0o600);
    }

    #[test]
    fn a_temporary_sort_directory_is_private_and_named_as_ours() {
        let d = tempfile::tempdir().unwrap();
        let t = make_temp_dir(d.path()).unwrap();
        assert_eq!(mode_of(t.path()), 0o700);
        assert!(t.path().file_name().unwrap().to_str().unwrap().starts_with(TEMP_PREFIX));
    }
}
