//! One job, start to end, in three steps:
//!
//! 1. **plan** ([`Plan::make`]): re-check what was checked when the job was queued (the
//!    path against `store.allowed_dirs`, the target, the owner's privileges), open and
//!    list the files, and record them against the ledger and any earlier attempt in one
//!    set-based statement: which to read, which to skip, whether the stream an earlier
//!    attempt checkpointed still holds.
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

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::{private_dir, Config, Dedup, Filter, LineLimit, Progress};

use crate::error::{Result, StoreError};
use crate::gucs::Settings;
use crate::insert::{Inserter, Role};
use crate::registry;
use crate::tables::jobs::Job;
use crate::target::Target;
use crate::txn::transaction;

use plan::{Plan, STORAGE};
use ranges::run_exact;
pub use ranges::run_range;

/// How a job that ran to its end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Done,
    /// Done, but some files could not be listed, opened or read (see `store.files`).
    Partial,
}

/// The job's own directory under `store.temp_dir`: its sorted runs and their manifest,
/// kept across attempts and removed when the job ends.
pub fn job_dir(settings: &Settings, id: i64) -> PathBuf {
    settings.temp_dir.join(format!("job-{}-{id}", registry::my_database()))
}

/// Make the job's directory for this attempt, private to the server's OS user
/// ([`private_dir`]): the first attempt creates it exclusively (whatever another OS
/// user put at that name in a shared `store.temp_dir` is refused, never used); a later
/// one takes the directory an earlier attempt kept only if it is still ours, 0700 and no
/// link. `store.temp_dir` itself must not let others rename it away.
pub(super) fn make_job_dir(settings: &Settings, job: &Job) -> Result<PathBuf> {
    let parent = &settings.temp_dir;
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(private_dir::DIR_MODE)
            .create(parent)
            .map_err(|e| store_engine::Error::io("could not create", parent, e))?;
    }
    private_dir::check_parent(parent)?;
    let dir = job_dir(settings, job.id);
    if job.claim <= 1 {
        // Ours, but older than the job (a job id used again after a restore): stale.
        private_dir::remove(&dir)?;
        private_dir::create(&dir)?;
    } else {
        private_dir::ensure(&dir)?;
    }
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

/// pg_store hands PostgreSQL UTF-8 text; another server encoding would store it garbled.
pub fn require_utf8_database() -> Result<()> {
    // SAFETY: reads the database's encoding.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, "pg_store needs a database with UTF8 encoding")
            .with_hint("Lines are checked as UTF-8 and stored as such; create the database with ENCODING 'UTF8'."));
    }
    Ok(())
}

/// The engine's settings for `job`: its budget, limits, filter, mode, and its directory.
pub(super) fn config(job: &Job, settings: &Settings, target: &Target) -> Result<Config> {
    let filter = job.filter.as_deref().map(Filter::parse).transpose()?.unwrap_or_default();
    let temp_dir = job_dir(settings, job.id);
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
        },
        fault: settings.fault,
        ..Config::default()
    })
}

/// Every attempt that reads its files again reports every reject again.
pub(super) fn forget_rejects(job: &Job) -> Result<()> {
    transaction(|| Ok(Spi::run_with_args("DELETE FROM store.rejects WHERE job = $1", &[job.id.into()])?))
}

/// Run job `id` under claim `claim` to its end.
pub fn run(id: i64, claim: i32) -> Result<Ended> {
    let job = Job::load(id, claim)?;
    let settings = Settings::read()?;
    let plan = Plan::make(&job, &settings)?;
    let progress = Arc::new(Progress::default());
    Progress::add(&progress.bytes_total, plan.files.iter().map(|f| f.size).sum());
    crate::citus::prepare_session(&plan.target)?;
    let mut inserter = Inserter::new(&job, &plan.target, Role::Leader, progress.clone(), &job_dir(&settings, job.id));
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
        Spi::run_with_args(
            "UPDATE store.files SET state = 'done' WHERE job = $1 AND state = 'read'",
            &[job.id.into()],
        )?;
        // The storage the target had when the job began must still be there: a TRUNCATE
        // (or a rewrite, a partition dropped) during the job may have taken some of its
        // lines, and its files must then be read again by the next run.
        let kept = Spi::get_one_with_args::<bool>(
            &format!(
                "SELECT coalesce((SELECT target_storage FROM store.jobs WHERE id = $2) OPERATOR(pg_catalog.<@) {STORAGE}, true)"
            ),
            &[job.target.into(), job.id.into()],
        )?;
        if kept != Some(true) {
            log!(
                "pg_store job {}: the target was truncated, rewritten or lost a partition while the job ran: \
                 its files stay out of the ledger, and the next run reads them again",
                job.id
            );
        } else {
            Spi::run_with_args(
                "INSERT INTO store.ingested (target, path, spec, size, mtime_ns, ctime_ns, inode, fingerprint, job, owner) \
                 SELECT $2, path, $4, size, mtime_ns, ctime_ns, inode, fingerprint, job, $3 FROM store.files WHERE job = $1 AND state = 'done' \
                 ON CONFLICT (target, path, spec) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, \
                   inode = excluded.inode, fingerprint = excluded.fingerprint, job = excluded.job, owner = excluded.owner, ingested_at = pg_catalog.now()",
                &[job.id.into(), job.target.into(), job.owner.into(), spec.into()],
            )?;
        }
        let state = Spi::get_one_with_args::<String>(
            "UPDATE store.jobs SET state = CASE WHEN EXISTS (SELECT FROM store.files WHERE job = $1 AND state = 'failed') THEN 'partial' ELSE 'done' END, \
               phase = 'done', percent = 100, finished_at = pg_catalog.now(), updated_at = pg_catalog.now(), estimated_false_drops = $3, \
               files_done = files_total, files_failed = (SELECT pg_catalog.count(*) FROM store.files WHERE job = $1 AND state = 'failed') \
             WHERE id = $1 AND attempts = $2 RETURNING state",
            &[job.id.into(), job.claim.into(), estimated_false_drops.into()],
        )?;
        match state.as_deref() {
            Some("done") => Ok(Ended::Done),
            Some(_) => Ok(Ended::Partial),
            None => Err(StoreError::Fenced),
        }
    })
}
