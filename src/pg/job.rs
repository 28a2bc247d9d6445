//! Running one job in a worker: list and fingerprint the files, skip those already
//! ingested unchanged, drive the engine (scan → sort → merge, or one Bloom pass) and
//! feed its distinct records to the [`Inserter`] in adaptive batches.
//!
//! Everything here runs on the worker's main thread, outside any transaction except
//! the short ones it opens itself; the engine's own threads never call PostgreSQL.
//! The merge runs on a producer thread that hands blocks of records over a bounded
//! channel, so merging overlaps with inserting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::gucs::Settings;
use super::insert::Inserter;
use super::txn::{spi_err, transaction, PgError};
use crate::engine::batch::{AdaptiveBatcher, Batch};
use crate::engine::filter::Filter;
use crate::engine::pipeline::{self, Config, FileCounts, Observer, Reject};
use crate::engine::walk::{fingerprint, walk, FileEntry};
use crate::engine::{limits, Error, Phase, Progress, Snapshot};

/// How a job ended, when it did not succeed.
#[derive(Debug)]
pub enum Stop {
    /// `store_cancel`: the job ends as cancelled.
    Cancelled,
    /// SIGTERM: the job stays running, and is resumed when a worker starts again.
    Shutdown,
    Failed(String),
}

impl From<PgError> for Stop {
    fn from(e: PgError) -> Stop {
        Stop::Failed(e.to_string())
    }
}

/// True once the postmaster asked this process to exit (SIGTERM).
pub fn shutdown_requested() -> bool {
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Reload postgresql.conf if a SIGHUP arrived (a running job keeps the settings it
/// started with; the next job sees the new ones).
pub fn reload_on_sighup() {
    if pgrx::bgworkers::BackgroundWorker::sighup_received() {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// A job row, as the worker needs it.
struct Job {
    id: i64,
    path: String,
    target: pg_sys::Oid,
    column: String,
    dedup: String,
    filter: Option<String>,
    owner: pg_sys::Oid,
    attempts: i32,
}

fn load(id: i64) -> Result<Job, PgError> {
    transaction(|| {
        Spi::connect(|c| {
            let t = c.select(
                "SELECT path, target::oid, column_name::text, dedup, filter, owner, attempts FROM store.jobs WHERE id = $1",
                Some(1),
                &[id.into()],
            )?;
            let r = t.first();
            Ok::<_, pgrx::spi::SpiError>(Job {
                id,
                path: r.get(1)?.unwrap_or_default(),
                target: r.get(2)?.unwrap_or(pg_sys::Oid::INVALID),
                column: r.get(3)?.unwrap_or_default(),
                dedup: r.get(4)?.unwrap_or_default(),
                filter: r.get(5)?,
                owner: r.get(6)?.unwrap_or(pg_sys::Oid::INVALID),
                attempts: r.get(7)?.unwrap_or(1),
            })
        })
        .map_err(spi_err)
    })
}

/// The job's live counters, written to `store.jobs` about once a second.
struct Status {
    job: i64,
    progress: Arc<Progress>,
    last: Instant,
    batch_size: i32,
    /// Accepted records not known to be repeats when the merge began: what inserting
    /// has to get through.
    insert_total: u64,
    inserted_so_far: u64,
    /// Largest private resident memory seen at a status write (bytes).
    memory_peak: u64,
}

impl Status {
    fn percent(&self, p: &Snapshot) -> f32 {
        match p.phase {
            Phase::Scanning | Phase::Sorting => 60.0 * p.bytes_read as f32 / p.bytes_total.max(1) as f32,
            Phase::Merging | Phase::Inserting => 60.0 + 40.0 * (self.inserted_so_far as f32 / self.insert_total.max(1) as f32).min(1.0),
            Phase::Done => 100.0,
        }
    }

    /// Write the counters (inside the caller's transaction); returns cancel_requested.
    fn write(&mut self) -> Result<bool, PgError> {
        self.last = Instant::now();
        let p = self.progress.snapshot();
        let percent = self.percent(&p);
        self.memory_peak = self.memory_peak.max(limits::private_rss().unwrap_or(0));
        let mem = Some(self.memory_peak as i64).filter(|&m| m > 0);
        let n = |v: u64| v as i64;
        Spi::get_one_with_args::<bool>(
            "UPDATE store.jobs SET phase = $2, files_done = $3, bytes_read = $4, records = $5, empty = $6, rejected = $7, \
             filtered = $8, duplicates = $9, percent = $10, batch_size = $11, memory_peak = $12, \
             temp_bytes = greatest(coalesce(temp_bytes, 0), $13), updated_at = now() WHERE id = $1 RETURNING cancel_requested",
            &[
                self.job.into(),
                p.phase.as_str().into(),
                n(p.files_done).into(),
                n(p.bytes_read).into(),
                n(p.records).into(),
                n(p.empty).into(),
                n(p.rejected).into(),
                n(p.filtered).into(),
                n(p.duplicates).into(),
                percent.into(),
                self.batch_size.into(),
                mem.into(),
                n(p.temp_peak).into(),
            ],
        )
        .map(|c| c.unwrap_or(false))
        .map_err(spi_err)
    }

    fn cancel_requested(&self) -> Result<bool, PgError> {
        Spi::get_one_with_args::<bool>("SELECT cancel_requested FROM store.jobs WHERE id = $1", &[self.job.into()])
            .map(|c| c.unwrap_or(false))
            .map_err(spi_err)
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= Duration::from_secs(1)
    }
}

/// Rejects are stored in batches; their primary key (job, file, line) makes storing
/// them again after a resumed scan harmless.
const REJECT_FLUSH: usize = 1000;

/// What the engine tells the worker during the scan, turned into SQL.
struct Watch<'a> {
    status: &'a mut Status,
    rejects: Vec<(String, i64, i64, &'static str, Vec<u8>)>,
    files: &'a HashMap<PathBuf, FileEntry>,
    stop: Option<Stop>,
}

impl Watch<'_> {
    /// Write the status now (and any rejects held back); a cancel request stops the run.
    fn write_status(&mut self) -> crate::engine::Result<()> {
        self.flush_rejects().map_err(|e| self.fail(e.into()))?;
        let status = &mut *self.status;
        match transaction(|| status.write()) {
            Ok(true) => Err(self.fail(Stop::Cancelled)),
            Ok(false) => Ok(()),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    fn flush_rejects(&mut self) -> Result<(), PgError> {
        if self.rejects.is_empty() {
            return Ok(());
        }
        let job = self.status.job;
        let rows = std::mem::take(&mut self.rejects);
        transaction(|| {
            let files: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            let lines: Vec<i64> = rows.iter().map(|r| r.1).collect();
            let offsets: Vec<i64> = rows.iter().map(|r| r.2).collect();
            let reasons: Vec<&str> = rows.iter().map(|r| r.3).collect();
            let raws: Vec<&[u8]> = rows.iter().map(|r| r.4.as_slice()).collect();
            Spi::run_with_args(
                "INSERT INTO store.rejects (job, file, line, byte_offset, reason, raw) \
                 SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::bytea[]) ON CONFLICT DO NOTHING",
                &[job.into(), files.into(), lines.into(), offsets.into(), reasons.into(), raws.into()],
            )
            .map_err(spi_err)
        })
    }

    fn fail(&mut self, stop: Stop) -> Error {
        let e = match stop {
            Stop::Failed(ref m) => Error::Config(m.clone()),
            _ => Error::Cancelled,
        };
        self.stop = Some(stop);
        e
    }
}

impl Observer for Watch<'_> {
    fn reject(&mut self, r: &Reject<'_>) -> crate::engine::Result<()> {
        self.rejects.push((r.file.to_string_lossy().into_owned(), r.line as i64, r.offset as i64, r.reason.as_str(), r.prefix.to_vec()));
        if self.rejects.len() >= REJECT_FLUSH {
            self.flush_rejects().map_err(|e| self.fail(e.into()))?;
        }
        Ok(())
    }

    fn file_done(&mut self, _: usize, file: &FileEntry, c: &FileCounts, error: Option<&str>) -> crate::engine::Result<()> {
        self.flush_rejects().map_err(|e| self.fail(e.into()))?;
        // A file that changed while it was read is read again by the next run.
        let now = std::fs::metadata(&file.path).ok();
        let listed = self.files.get(&file.path);
        let changed = match (now, listed) {
            (Some(m), Some(l)) => {
                use std::os::unix::fs::MetadataExt;
                m.len() != l.size || m.mtime() * 1_000_000_000 + m.mtime_nsec() != l.mtime_ns
            }
            _ => true,
        };
        let state = if error.is_some() { "failed" } else if changed { "changed" } else { "read" };
        let job = self.status.job;
        let path = file.path.to_string_lossy().into_owned();
        let n = |v: u64| v as i64;
        transaction(|| {
            Spi::run_with_args(
                "UPDATE store.files SET state = $3, records = $4, empty = $5, rejected = $6, filtered = $7, accepted = $8, error = $9 \
                 WHERE job = $1 AND path = $2",
                &[job.into(), path.as_str().into(), state.into(), n(c.records).into(), n(c.empty).into(), n(c.rejected).into(),
                  n(c.filtered).into(), n(c.accepted).into(), error.into()],
            )
            .map_err(spi_err)
        })
        .map_err(|e| self.fail(e.into()))
    }

    fn tick(&mut self, _: &Progress) -> crate::engine::Result<()> {
        if shutdown_requested() {
            return Err(self.fail(Stop::Shutdown));
        }
        reload_on_sighup();
        if !self.status.due() {
            return Ok(());
        }
        self.write_status()
    }

    fn phase_changed(&mut self, _: &Progress) -> crate::engine::Result<()> {
        self.write_status()
    }
}

/// Run job `id` to its end. `Ok` means done.
pub fn run(id: i64) -> Result<(), Stop> {
    let job = load(id)?;
    let settings = Settings::read().map_err(Stop::Failed)?;
    // The path was checked when the job was queued; settings may have changed since.
    let canon = super::paths::check(&job.path, &super::gucs::allowed_dirs()).map_err(|r| Stop::Failed(r.message))?;
    let filter = job.filter.as_deref().map(Filter::parse).transpose().map_err(|e| Stop::Failed(e.to_string()))?.unwrap_or_default();
    // Runs go under <temp_dir>/jobs/<worker pid>/, so a starting worker can tell the
    // directories of dead workers from live ones (see worker::remove_orphans).
    let temp_dir = settings.temp_dir.join("jobs").join(std::process::id().to_string());
    std::fs::create_dir_all(&temp_dir).map_err(|e| Stop::Failed(format!("could not create {}: {e}", temp_dir.display())))?;
    let cfg = Config {
        memory_limit: settings.memory_limit,
        threads: settings.threads,
        temp_dir,
        max_line_bytes: settings.max_line_bytes,
        compress_runs: settings.compress_runs,
        check_space: settings.check_temp_space,
        filter,
        ..Config::default()
    };

    // Files: list, fingerprint, and compare with what was already ingested or, on a
    // resumed job, with what this job saw before.
    let listing = walk(&canon).map_err(|e| Stop::Failed(e.to_string()))?;
    let mut prints = Vec::with_capacity(listing.files.len());
    for f in &listing.files {
        prints.push(fingerprint(&f.path).map_err(|e| Stop::Failed(e.to_string()))?);
    }
    let (qualified, column) = transaction(|| {
        let q = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[job.target.into()]).map_err(spi_err)?;
        q.map(|q| (q, pgrx::spi::quote_identifier(&job.column))).ok_or_else(|| PgError::other("the target table no longer exists"))
    })?;
    let (to_read, resume_key, fast_path) = plan_files(&job, &qualified, &listing.files, &prints)?;
    let files: HashMap<PathBuf, FileEntry> = to_read.iter().map(|f| (f.path.clone(), f.clone())).collect();

    let progress = Arc::new(Progress::default());
    Progress::add(&progress.files_total, listing.files.len() as u64);
    Progress::add(&progress.bytes_total, to_read.iter().map(|f| f.size).sum());
    let mut status = Status { job: id, progress: progress.clone(), last: Instant::now(), batch_size: 0, insert_total: 0, inserted_so_far: 0, memory_peak: 0 };
    let cancel = Arc::new(AtomicBool::new(false));

    let mut inserter = Inserter::new(id, job.owner, &qualified, &column, fast_path);
    let mut batcher = AdaptiveBatcher::new(settings.batch_min, settings.batch_max, settings.batch_target);
    let mut watch = Watch { status: &mut status, rejects: Vec::new(), files: &files, stop: None };

    if job.dedup == "bloom" {
        let mut batch = Batch::default();
        let mut failure: Option<Stop> = None;
        let report = {
            let inserter = &mut inserter;
            let batcher = &mut batcher;
            let mut emit = |rec: &[u8]| -> crate::engine::Result<()> {
                batch.push(rec);
                if batch.len() >= batcher.size() {
                    // The scan's own status ticks cover progress in this mode.
                    insert(inserter, batcher, &mut batch, None, &mut || Ok(false)).map_err(|s| {
                        failure = Some(s);
                        Error::Cancelled
                    })?;
                }
                Ok(())
            };
            pipeline::bloom_distinct(&cfg, &to_read, settings.bloom_fpr, None, progress.clone(), cancel.clone(), &mut watch, &mut emit)
        };
        let report = report.map_err(|e| failure.take().or(watch.stop.take()).unwrap_or_else(|| Stop::Failed(e.to_string())))?;
        insert(&mut inserter, &mut batcher, &mut batch, None, &mut || Ok(false))?;
        watch.flush_rejects()?;
        return finish(&job, &mut status, Some(report.estimated_false_drops));
    }

    let sorted = pipeline::sort_distinct(&cfg, &to_read, progress.clone(), cancel.clone(), &mut watch)
        .map_err(|e| watch.stop.take().unwrap_or_else(|| Stop::Failed(e.to_string())))?;
    watch.flush_rejects()?;
    let snap = progress.snapshot();
    watch.status.insert_total = snap.records - snap.rejected - snap.filtered - snap.duplicates;
    let mut merger = sorted
        .merge(resume_key.as_deref(), &mut watch)
        .map_err(|e| watch.stop.take().unwrap_or_else(|| Stop::Failed(e.to_string())))?;
    progress.set_phase(Phase::Inserting);
    transaction(|| Spi::run_with_args("UPDATE store.jobs SET insert_started_at = now(), phase = 'inserting' WHERE id = $1", &[id.into()]).map_err(spi_err))?;

    // Producer: the merge on its own thread (signals blocked), blocks of records over a
    // bounded channel. Consumer: this thread, batching and inserting.
    const BLOCK: usize = 1024;
    let (tx, rx) = mpsc::sync_channel::<crate::engine::Result<Batch>>(4);
    let producer_cancel = cancel.clone();
    let producer = limits::with_signals_blocked(|| {
        std::thread::Builder::new()
            .name("pg_store-merge".into())
            .spawn(move || loop {
                let mut block = Batch::default();
                let res = loop {
                    match merger.next_record() {
                        Ok(Some(r)) => {
                            block.push(r);
                            if block.len() == BLOCK {
                                break Ok(true);
                            }
                        }
                        Ok(None) => break Ok(false),
                        Err(e) => break Err(e),
                    }
                };
                let more = matches!(res, Ok(true));
                let msg = res.map(|_| block);
                if tx.send(msg).is_err() || !more || producer_cancel.load(Relaxed) {
                    return;
                }
            })
            .expect("spawn merge thread")
    });

    let result = (|| -> Result<(), Stop> {
        let mut batch = Batch::default();
        for block in rx.iter() {
            let block = block.map_err(|e| Stop::Failed(e.to_string()))?;
            for r in block.iter() {
                batch.push(r);
                if batch.len() >= batcher.size() {
                    let key = batch.last().map(<[u8]>::to_vec);
                    insert_with_status(&mut inserter, &mut batcher, &mut batch, key.as_deref(), &mut status)?;
                }
            }
        }
        let key = batch.last().map(<[u8]>::to_vec);
        insert_with_status(&mut inserter, &mut batcher, &mut batch, key.as_deref(), &mut status)
    })();
    cancel.store(true, Relaxed);
    drop(rx);
    let _ = producer.join();
    result?;
    progress.set_phase(Phase::Done);
    finish(&job, &mut status, None)
}

/// Insert the pending batch (if any) with a status write in the same transaction when
/// one is due; report the latency to the batcher.
fn insert_with_status(inserter: &mut Inserter, batcher: &mut AdaptiveBatcher, batch: &mut Batch, key: Option<&[u8]>, status: &mut Status) -> Result<(), Stop> {
    if shutdown_requested() {
        return Err(Stop::Shutdown);
    }
    reload_on_sighup();
    status.batch_size = batch.len() as i32;
    status.inserted_so_far += batch.len() as u64;
    let due = status.due();
    // Every batch's transaction looks at cancel_requested (one index lookup), so a
    // cancel lands within a batch, not within the next status write.
    insert(inserter, batcher, batch, key, &mut || if due { status.write() } else { status.cancel_requested() })
}

fn insert(inserter: &mut Inserter, batcher: &mut AdaptiveBatcher, batch: &mut Batch, key: Option<&[u8]>, extra: super::insert::InTxn<'_>) -> Result<(), Stop> {
    if batch.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let c = inserter.commit(batch, key, extra)?;
    batcher.observe(batch.len(), started.elapsed());
    batch.clear();
    if c.cancel_requested {
        return Err(Stop::Cancelled);
    }
    Ok(())
}

/// What an attempt does: the files to read, the key to resume the merge after, and
/// whether batches may use the fast path.
type Plan = (Vec<FileEntry>, Option<Vec<u8>>, bool);

/// Record the files of this attempt and plan it.
fn plan_files(job: &Job, qualified: &str, files: &[FileEntry], prints: &[String]) -> Result<Plan, PgError> {
    transaction(|| {
        let mut to_read = Vec::new();
        let mut changed_since_last_attempt = false;
        let mut skipped = 0i64;
        for (f, fp) in files.iter().zip(prints) {
            let path = f.path.to_string_lossy().into_owned();
            let ingested = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM store.ingested WHERE target = $1 AND path = $2 AND size = $3 AND mtime_ns = $4 AND fingerprint = $5)",
                &[job.target.into(), path.as_str().into(), (f.size as i64).into(), f.mtime_ns.into(), fp.as_str().into()],
            )
            .map_err(spi_err)?
            .unwrap_or(false);
            let before = Spi::get_one_with_args::<bool>(
                "SELECT (SELECT size = $3 AND mtime_ns = $4 AND fingerprint = $5 FROM store.files WHERE job = $1 AND path = $2)",
                &[job.id.into(), path.as_str().into(), (f.size as i64).into(), f.mtime_ns.into(), fp.as_str().into()],
            )
            .map_err(spi_err)?;
            if job.attempts > 1 && before != Some(true) {
                changed_since_last_attempt = true;
            }
            let state = if ingested { "skipped" } else { "pending" };
            Spi::run_with_args(
                "INSERT INTO store.files (job, path, size, mtime, mtime_ns, fingerprint, state) \
                 VALUES ($1, $2, $3, to_timestamp($4 / 1e9), $4, $5, $6) \
                 ON CONFLICT (job, path) DO UPDATE SET size = excluded.size, mtime = excluded.mtime, mtime_ns = excluded.mtime_ns, \
                   fingerprint = excluded.fingerprint, state = excluded.state, error = NULL",
                &[job.id.into(), path.as_str().into(), (f.size as i64).into(), f.mtime_ns.into(), fp.as_str().into(), state.into()],
            )
            .map_err(spi_err)?;
            if ingested {
                skipped += 1;
            } else {
                to_read.push(f.clone());
            }
        }
        // The target's emptiness decides the fast path, once per job.
        let empty = Spi::get_one::<bool>(&format!("SELECT NOT EXISTS (SELECT 1 FROM {qualified})"))
        .map_err(spi_err)?
        .unwrap_or(false);
        Spi::run_with_args("INSERT INTO store.checkpoints (job, fast_path) VALUES ($1, $2) ON CONFLICT (job) DO NOTHING", &[job.id.into(), empty.into()])
            .map_err(spi_err)?;
        if changed_since_last_attempt || job.dedup == "bloom" {
            // The merged stream would differ from the one checkpointed: start it over,
            // on the safe path (ON CONFLICT makes what was inserted harmless).
            Spi::run_with_args("UPDATE store.checkpoints SET last_key = NULL, fast_path = fast_path AND $2 WHERE job = $1", &[job.id.into(), (job.attempts <= 1).into()])
                .map_err(spi_err)?;
        }
        let (key, fast) = Spi::get_two_with_args::<String, bool>("SELECT last_key, fast_path FROM store.checkpoints WHERE job = $1", &[job.id.into()])
            .map_err(spi_err)?;
        let total: i64 = to_read.iter().map(|f| f.size as i64).sum();
        Spi::run_with_args(
            "UPDATE store.jobs SET files_total = $2, files_skipped = $3, bytes_total = $4, phase = 'scanning', updated_at = now() WHERE id = $1",
            &[job.id.into(), (files.len() as i64).into(), skipped.into(), total.into()],
        )
        .map_err(spi_err)?;
        // A resumed scan reports its rejects again; the key makes that idempotent.
        Ok((to_read, key.map(String::into_bytes), fast.unwrap_or(false)))
    })
}

/// Mark the job done: files read unchanged go into the ingested ledger.
fn finish(job: &Job, status: &mut Status, estimated_false_drops: Option<f64>) -> Result<(), Stop> {
    status.progress.set_phase(Phase::Done);
    transaction(|| {
        status.write()?;
        Spi::run_with_args("UPDATE store.files SET state = 'done' WHERE job = $1 AND state = 'read'", &[job.id.into()]).map_err(spi_err)?;
        Spi::run_with_args(
            "INSERT INTO store.ingested (target, path, size, mtime_ns, fingerprint, job) \
             SELECT $2, path, size, mtime_ns, fingerprint, job FROM store.files WHERE job = $1 AND state = 'done' \
             ON CONFLICT (target, path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, \
               fingerprint = excluded.fingerprint, job = excluded.job, ingested_at = now()",
            &[job.id.into(), job.target.into()],
        )
        .map_err(spi_err)?;
        Spi::run_with_args(
            "UPDATE store.jobs SET state = 'done', phase = 'done', percent = 100, finished_at = now(), updated_at = now(), \
             estimated_false_drops = $2, files_done = files_total WHERE id = $1",
            &[job.id.into(), estimated_false_drops.into()],
        )
        .map_err(spi_err)
    })?;
    Ok(())
}
