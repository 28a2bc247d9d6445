//! Exact mode's insert phase: the sorted stream split into key ranges, each inserted by
//! one process — the job's worker for the first, an inserter it starts for each other —
//! from its checkpoint on.

use std::sync::Arc;
use std::time::Duration;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::{KeptSort, Progress};

use super::{config, forget_rejects, job_dir, stream_spec, Plan};
use crate::error::{Result, StoreError};
use crate::gucs::Settings;
use crate::insert::{Inserter, Role};
use crate::registry;
use crate::security;
use crate::signals::{reload_on_sighup, shutdown_requested};
use crate::tables::checkpoints::{self, RangeRow};
use crate::tables::jobs::{self, Job};
use crate::target;
use crate::txn::transaction;

/// Exact mode: the sorted runs (kept from an earlier attempt, or made now), the key
/// ranges, an inserter process for each range but the first, the first here, then any
/// range no inserter finished.
pub(super) fn run_exact(
    job: &Job,
    plan: &Plan,
    settings: &Settings,
    progress: &Arc<Progress>,
    inserter: &mut Inserter,
) -> Result<()> {
    let dir = &plan.cfg.temp_dir;
    let mut sorted = match KeptSort::load(dir, &plan.spec, Some(&plan.files), &plan.cfg, progress)? {
        Some(sorted) => {
            log!("pg_store job {}: resuming from the {} sorted runs an earlier attempt kept", job.id, sorted.runs());
            sorted
        }
        None => {
            forget_rejects(job)?;
            KeptSort::sort(dir, &plan.spec, &plan.cfg, &plan.tree, &plan.files, progress, inserter)?
        }
    };
    // A Citus target's number of ranges, when this stream has none yet (looked up in a
    // transaction of its own: it may fail, and the setting then stands).
    let citus = if plan.target.citus && transaction(|| jobs::ranges(job.id))? == 0 {
        Some(crate::citus::insert_ranges(job.id, plan.target.oid, settings))
    } else {
        None
    };
    let ranges = transaction(|| split(job, &sorted, plan, settings, citus))?;
    sorted.share(ranges.len());
    inserter.mark_insert_started()?;
    let mut helpers = Vec::new();
    for r in ranges.iter().filter(|r| r.range > 0 && !r.done) {
        match start_inserter(job, r.range) {
            Ok(h) => helpers.push(h),
            Err(e) => {
                log!("pg_store job {}: could not start an inserter for range {} ({e}); doing it here", job.id, r.range)
            }
        }
    }
    let mut first = true;
    loop {
        // This process's share: range 0 first, then whatever no inserter is (still) on.
        let next = if first {
            ranges.iter().find(|r| r.range == 0 && !r.done).cloned()
        } else {
            wait_for_inserters(job, inserter, &mut helpers)?;
            transaction(|| open_ranges(job))?.into_iter().find(|r| !registry::range_is_live(job.id, r.range))
        };
        first = false;
        let Some(r) = next else {
            if helpers.is_empty() && transaction(|| open_ranges(job))?.is_empty() {
                return Ok(());
            }
            continue;
        };
        if r.range != 0 && !registry::enter(job.id, job.claim, r.range) {
            continue;
        }
        let res = drain_range(job, &mut sorted, &r, inserter);
        if r.range != 0 {
            registry::leave_range(job.id, r.range);
        }
        res?;
    }
}

/// Insert range `r` of `sorted` in this process, from its checkpoint on.
pub(super) fn drain_range(job: &Job, sorted: &mut KeptSort, r: &RangeRow, inserter: &mut Inserter) -> Result<()> {
    let resume = transaction(|| inserter.enter_range(r.range))?;
    let merged = Arc::new(Progress::default());
    let report = sorted.drain(&r.keys, resume.last_key.as_deref().map(str::as_bytes), &merged, inserter)?;
    if report.stopped {
        return Err(StoreError::internal(format!("the merge of range {} of job {} stopped early", r.range, job.id)));
    }
    transaction(|| inserter.range_done())
}

fn open_ranges(job: &Job) -> Result<Vec<RangeRow>> {
    checkpoints::ranges(job.id, true)
}

/// How many ranges to split a new stream into: `store.insert_workers`, but one for a
/// local target whose keys all sort before the stream (empty when the job began, or
/// holding only smaller keys, as a table loaded by date does) while `store.compact_index`
/// is on.
///
/// nbtree splits the rightmost leaf page of a level leaving it 90 % full (the leaf
/// fillfactor), any other page half and half. One ascending stream after every key
/// fills the index only at its right edge, as COPY of sorted lines does; with several
/// ranges at once, every range below the last appends to pages that have a right
/// sibling, and each of its pages ends half full for good (two ranges: an index about
/// 1.4 times the size), which every later load into the table pays for. Where the
/// stream falls among existing keys, its inserts split pages in the middle of the
/// index whatever the number of ranges. Both looks are made only where the job's owner
/// may read the table, as the fast path's. A Citus target's number (`citus`) is
/// [`crate::citus::insert_ranges`], made before.
fn workers(job: &Job, plan: &Plan, settings: &Settings, sorted: &KeptSort, citus: Option<usize>) -> Result<usize> {
    if plan.target.citus {
        return Ok(citus.unwrap_or(settings.insert_workers));
    }
    if !settings.compact_index || settings.insert_workers <= 1 {
        return Ok(settings.insert_workers);
    }
    if checkpoints::target_was_empty(job.id)? {
        log!("pg_store job {}: one insert range, the target being empty (store.compact_index)", job.id);
        return Ok(1);
    }
    if let (Some(first), Some(sql)) = (sorted.first_key(), plan.target.all_below_sql()) {
        let admission = target::admit(plan.target.oid, &plan.target.columns(), job.owner)?;
        if admission.may_select
            && security::as_role(admission.owner, || Spi::get_one_with_args::<bool>(&sql, &[first.into()]))?
                == Some(true)
        {
            log!(
                "pg_store job {}: one insert range, every line sorting after the target's keys (store.compact_index)",
                job.id
            );
            return Ok(1);
        }
    }
    Ok(settings.insert_workers)
}

/// The job's key ranges: those an earlier attempt of this stream decided, else a split
/// of `sorted` into [`workers`] ranges of about equal size, recorded once.
fn split(
    job: &Job,
    sorted: &KeptSort,
    plan: &Plan,
    settings: &Settings,
    citus: Option<usize>,
) -> Result<Vec<RangeRow>> {
    let decided = jobs::ranges(job.id)?;
    if decided == 0 {
        let ranges = sorted.ranges(workers(job, plan, settings, sorted, citus)?)?;
        checkpoints::split_first(job.id, job.claim, ranges[0].upto.clone())?;
        for (i, r) in ranges.iter().enumerate().skip(1) {
            checkpoints::add_range(job.id, i as i32, r.after.clone(), r.upto.clone())?;
        }
        jobs::set_ranges(job.id, ranges.len() as i32)?;
    }
    checkpoints::ranges(job.id, false)
}

/// Start an inserter process for `range` of `job`.
fn start_inserter(job: &Job, range: i32) -> std::result::Result<pgrx::bgworkers::DynamicBackgroundWorker, String> {
    // SAFETY: reads backend globals.
    let (db, pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    pgrx::bgworkers::BackgroundWorkerBuilder::new(&format!("pg_store inserter {} of job {}", range, job.id))
        .set_type("pg_store inserter")
        .set_library("pg_store")
        .set_function("pg_store_inserter_main")
        .set_argument(range.into_datum())
        .set_extra(&format!("{} {} {}", job.id, job.claim, db.to_u32()))
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(pid)
        .load_dynamic()
        .map_err(|_| "no background worker slot free (max_worker_processes)".to_string())
}

/// Wait until every inserter this process started has exited, watching for a cancel,
/// a shutdown, and keeping the job's status current.
fn wait_for_inserters(
    job: &Job,
    inserter: &mut Inserter,
    helpers: &mut Vec<pgrx::bgworkers::DynamicBackgroundWorker>,
) -> Result<()> {
    loop {
        helpers.retain(|h| h.pid().is_ok());
        if helpers.is_empty() {
            return Ok(());
        }
        if shutdown_requested() {
            return Err(StoreError::Shutdown);
        }
        reload_on_sighup();
        if transaction(|| inserter.write_status())? {
            return Err(StoreError::Cancelled);
        }
        if let Some(e) = transaction(|| failed_range(job))? {
            return Err(e);
        }
        if !pgrx::bgworkers::BackgroundWorker::wait_latch(Some(Duration::from_millis(250))) {
            return Err(StoreError::Shutdown); // the postmaster died
        }
    }
}

/// The error an inserter of `job` recorded, if one did.
fn failed_range(job: &Job) -> Result<Option<StoreError>> {
    let row = checkpoints::first_error(job.id)?;
    Ok(match row {
        (Some(r), Some(message), code) => Some(StoreError::Sql {
            code: code.as_deref().map_or(ERRCODE_INTERNAL_ERROR, crate::error::code_of_sqlstate),
            message: format!("range {r}: {message}"),
            detail: None,
            hint: None,
        }),
        _ => None,
    })
}

/// An inserter process's share of a job: one range, from its checkpoint to its end.
pub fn run_range(id: i64, claim: i32, range: i32) -> Result<()> {
    let job = Job::load(id, claim)?;
    let settings = Settings::read()?;
    let target = transaction(|| target::check(job.target, &job.column, job.key_column.as_deref(), job.owner))?;
    let dir = job_dir(&settings, id)
        .ok_or_else(|| StoreError::internal(format!("job {id} has no temporary directory of its own")))?;
    let cfg = config(&job, &settings, &target, dir)?;
    let spec = stream_spec(&job, &cfg);
    let Some(mut sorted) = KeptSort::load(&cfg.temp_dir, &spec, None, &cfg, &Progress::default())? else {
        // The job's worker removes them once the job is over (cancelled, failed, or
        // done by itself before this inserter started).
        if !transaction(|| jobs::runs_under(id, claim))? {
            return Err(StoreError::Fenced);
        }
        return Err(StoreError::internal(format!(
            "the sorted runs of job {id} are gone from {}",
            cfg.temp_dir.display()
        )));
    };
    let rows = transaction(|| checkpoints::ranges(job.id, false))?;
    sorted.share(rows.len());
    let row = rows.into_iter().find(|r| r.range == range);
    let Some(row) = row.filter(|r| !r.done) else { return Ok(()) };
    crate::citus::prepare_session(&target, job.id, settings.insert_workers)?;
    let mut inserter = Inserter::new(&job, &target, Role::Helper, Arc::new(Progress::default()), &cfg);
    drain_range(&job, &mut sorted, &row, &mut inserter)
}
