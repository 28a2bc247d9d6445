//! One job, start to end, in three steps:
//!
//! 1. **plan** ([`Plan::make`]): the admission check again, for the job's owner
//!    ([`crate::admission`]: its privileges, the path against `store.allowed_dirs`, the
//!    target), open and list the files, and record them against the ledger and any
//!    earlier attempt in one set-based statement: which to read, which to skip, whether
//!    the stream an earlier attempt checkpointed still holds.
//! 2. **consume**: in exact mode, the sort an earlier attempt kept is loaded, or the
//!    files are read and sorted into runs kept in the job's own directory
//!    ([`store_engine::KeptSort`]); the key space is split into ranges once, and
//!    each range is merged and inserted by its own process — this worker for the first,
//!    inserters it starts for the others ([`run_range`]) — each batch committed with its
//!    range's checkpoint ([`Inserter`]). In Bloom mode one stream runs through
//!    [`store_engine::distinct`].
//! 3. **finish** ([`finish`]): files read unchanged enter the ledger, and the job ends
//!    `done`, or `partial` when some file failed — in one transaction.
//!
//! Everything here runs on the main thread of its process, outside any transaction
//! except the short ones it opens itself; the engine's own threads never call PostgreSQL.

mod plan;
mod ranges;

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use pgrx::prelude::*;
use store_engine::{private_dir, Config, Dedup, Filter, LineLimit, Progress};

use crate::error::{Result, StoreError};
use crate::gucs::Settings;
use crate::insert::{Inserter, Role};
use crate::registry;
use crate::tables::jobs::{self, Job};
use crate::tables::{files, ingested, rejects, target_storage};
use crate::target::Target;
use crate::txn::transaction;

use plan::Plan;
use ranges::run_exact;
pub use ranges::run_range;

/// How a job that ran to its end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Done,
    /// Done, but some files could not be listed, opened or read (see `store.files`).
    Partial,
}

/// The directories of job `id` under `store.temp_dir` that are pg_store's (the server's
/// OS user's, private, no link): `job-<database oid>-<id>-<random>` (and 0.2.0's
/// `job-<database oid>-<id>`). The random part is chosen when the job's first attempt
/// makes its directory, so another OS user sharing `store.temp_dir` cannot take the name
/// first and keep the job from running; what such a user put there is never ours.
pub fn job_dirs(settings: &Settings, id: i64) -> Vec<PathBuf> {
    let name = format!("job-{}-{id}", registry::my_database());
    let Ok(entries) = std::fs::read_dir(&settings.temp_dir) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n == name || n.strip_prefix(&name).is_some_and(|r| r.starts_with('-')))
        })
        .map(|e| e.path())
        .filter(|p| private_dir::verify(p).is_ok())
        .collect();
    dirs.sort();
    dirs
}

/// The directory an earlier attempt of job `id` made, if one is there and ours.
pub fn job_dir(settings: &Settings, id: i64) -> Option<PathBuf> {
    job_dirs(settings, id).into_iter().next()
}

/// 64 random bits, as hex: the part of a job directory's name nobody can guess.
fn random_suffix() -> Result<String> {
    let mut b = [0u8; 8];
    // SAFETY: fills the buffer it is given, at most its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(StoreError::internal("getrandom gave no random bytes for a job directory's name"));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Make `store.temp_dir` if it is not there (private to the server's OS user), and check
/// that others cannot take what a job puts in it ([`private_dir::check_parent`]).
pub fn prepare_temp_dir(settings: &Settings) -> Result<()> {
    let parent = &settings.temp_dir;
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(private_dir::DIR_MODE)
            .create(parent)
            .map_err(|e| store_engine::Error::io("could not create", parent, e))?;
    }
    Ok(private_dir::check_parent(parent)?)
}

/// Make the job's directory for this attempt, private to the server's OS user
/// ([`private_dir`]): the first attempt creates it exclusively (whatever another OS
/// user put at that name in a shared `store.temp_dir` is refused, never used); a later
/// one takes the directory an earlier attempt kept only if it is still ours, 0700 and no
/// link. `store.temp_dir` itself must not let others rename it away.
pub(super) fn make_job_dir(settings: &Settings, job: &Job) -> Result<PathBuf> {
    let parent = &settings.temp_dir;
    prepare_temp_dir(settings)?;
    if job.claim > 1 {
        if let Some(dir) = job_dir(settings, job.id) {
            return Ok(dir);
        }
    } else {
        // Ours, but older than the job (a job id used again after a restore): stale.
        for dir in job_dirs(settings, job.id) {
            private_dir::remove(&dir)?;
        }
    }
    let dir = parent.join(format!("job-{}-{}-{}", registry::my_database(), job.id, random_suffix()?));
    private_dir::create(&dir)?;
    Ok(dir)
}

/// Everything that decides which lines of a file end up in the target, besides the file
/// itself: the column, the dedup mode, the filter, the length limits. The ledger skips a
/// file only for the same spec (a file read through a filter has not been ingested
/// for an unfiltered job), and a resumed stream starts over when the spec changed
/// between attempts (a new `store.max_line_bytes` accepts other lines).
pub fn stream_spec(job: &Job, cfg: &Config) -> String {
    let chars = cfg.limit.chars.map_or(String::new(), |c| c.to_string());
    format!(
        "column={};key={};dedup={};max_bytes={};max_chars={chars};filter={}",
        job.column,
        job.key_column.as_deref().unwrap_or(""),
        job.dedup.as_str(),
        cfg.limit.bytes,
        job.filter.as_deref().unwrap_or("")
    )
}

/// The engine's settings for `job`: its budget, limits, filter, mode, and its directory.
pub(super) fn config(job: &Job, settings: &Settings, target: &Target, temp_dir: PathBuf) -> Result<Config> {
    let filter = job.filter.as_deref().map(Filter::parse).transpose()?.unwrap_or_default();
    Ok(Config {
        memory_limit: settings.memory_limit,
        threads: settings.threads,
        temp_dir,
        limit: LineLimit { bytes: settings.max_line_bytes, chars: target.max_chars },
        compress_runs: settings.compress_runs,
        check_space: settings.check_temp_space,
        filter,
        dedup: job.dedup,
        bloom_fpr: settings.bloom_fpr,
        batch: if target.citus {
            settings.batch_limits().distributed(settings.memory_limit)
        } else {
            settings.batch_limits()
        }
        .within_memory(settings.memory_limit),
        fault: settings.fault,
        ..Config::default()
    })
}

/// Every attempt that reads its files again reports every reject again.
pub(super) fn forget_rejects(job: &Job) -> Result<()> {
    transaction(|| rejects::forget(job.id))
}

/// Run job `id` under claim `claim` to its end.
pub fn run(id: i64, claim: i32) -> Result<Ended> {
    let job = Job::load(id, claim)?;
    let settings = Settings::read()?;
    let plan = Plan::make(&job, &settings)?;
    let progress = Arc::new(Progress::default());
    Progress::add(&progress.bytes_total, plan.files.iter().map(|f| f.size).sum());
    crate::citus::prepare_session(&plan.target, job.id, settings.insert_workers)?;
    let mut inserter = Inserter::new(&job, &plan.target, Role::Leader, progress.clone(), &plan.cfg);
    let estimated_false_drops = match job.dedup {
        Dedup::Bloom => {
            forget_rejects(&job)?;
            let resume = transaction(|| inserter.enter_range(0))?;
            let report = store_engine::distinct(
                &plan.cfg,
                &plan.tree,
                &plan.files,
                resume.last_key.as_deref().map(str::as_bytes),
                &progress,
                &mut inserter,
            )?;
            transaction(|| inserter.range_done())?;
            report.bloom.map(|b| b.estimated_false_drops)
        }
        Dedup::Exact => {
            run_exact(&job, &plan, &settings, &progress, &mut inserter)?;
            None
        }
    };
    finish(&job, &plan.spec, &mut inserter, estimated_false_drops)
}

/// Files read unchanged go into the ledger, and the job ends; all in one transaction.
pub(super) fn finish(
    job: &Job,
    spec: &str,
    inserter: &mut Inserter,
    estimated_false_drops: Option<f64>,
) -> Result<Ended> {
    inserter.flush_rejects()?;
    transaction(|| {
        inserter.write_status()?;
        files::mark_done(job.id)?;
        // The storage the target had when the job began must still be there: a TRUNCATE
        // (or a rewrite, a partition dropped) during the job may have taken some of its
        // lines, and its files must then be read again by the next run.
        let kept = target_storage::kept_since(job.target, job.id)?;
        if kept != Some(true) {
            log!(
                "pg_store job {}: the target was truncated, rewritten or lost a partition while the job ran: \
                 its files stay out of the ledger, and the next run reads them again",
                job.id
            );
        } else {
            ingested::record_job(job.id, job.target, job.owner, spec)?;
        }
        match jobs::finish(job.id, job.claim, estimated_false_drops)?.as_str() {
            "done" => Ok(Ended::Done),
            _ => Ok(Ended::Partial),
        }
    })
}
