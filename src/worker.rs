//! The background workers: registered at preload time (`store.workers` of them), each
//! connects to `store.database`, claims queued or orphaned jobs one at a time and runs
//! them.
//!
//! A claim, in one transaction: look at the open jobs, fairest first (owners with fewer
//! running jobs, then the oldest); skip those a live process works on (the
//! [`registry`] in shared memory, which only workers write); lock the first row left
//! (`FOR UPDATE SKIP LOCKED`: only that row) and look at the registry again under the
//! lock; bump `attempts` — the claim number — in the job and its checkpoint; enter the
//! registry, and commit. A worker that dies leaves the registry with its process (or
//! with shared memory, after a crash): its job is claimed again and resumes from its
//! checkpoint. Every batch checks the claim number in its checkpoint update, so a worker
//! whose claim was taken over stops without writing (see [`crate::insert`]). A job
//! claimed `store.max_attempts` times without ending fails instead of crashing its
//! workers forever.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;

use crate::error::{Result, StoreError};
use crate::job::{self, shutdown_requested, Ended};
use crate::txn::transaction;
use crate::{gucs, registry};

pub fn register() {
    for i in 0..gucs::WORKERS.get() {
        BackgroundWorkerBuilder::new(&format!("pg_store worker {i}"))
            .set_type("pg_store worker")
            .set_library("pg_store")
            .set_function("pg_store_worker_main")
            .set_argument(i.into_datum())
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_store_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the argument registered above.
    let index = unsafe { i32::from_datum(arg, false) }.unwrap_or(0);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    registry::clean_up_at_exit();
    pin_search_path();
    log!("pg_store worker {index} started (pid {})", std::process::id());
    if index == 0 {
        remove_orphans();
    }
    loop {
        if shutdown_requested() {
            // Non-zero: the postmaster restarts a static worker that exits this way.
            // SAFETY: ends the process the way PostgreSQL expects.
            unsafe { pg_sys::proc_exit(1) };
        }
        job::reload_on_sighup();
        match claim() {
            Ok(Some((id, claim))) => {
                run_claimed(id, claim);
                continue;
            }
            Ok(None) => {}
            Err(e) if e.is_undefined_object() => {} // extension not created yet in this database
            Err(e) => log!("pg_store worker {index}: could not look for jobs: {e}"),
        }
        BackgroundWorker::wait_latch(Some(Duration::from_secs(1)));
    }
}

/// The worker's own SQL runs as a superuser: it resolves names in `pg_catalog` (and
/// `pg_temp`, last) only, never in a schema a user can create objects in.
fn pin_search_path() {
    // SAFETY: sets a session GUC from the main thread before any transaction.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
}

/// Remove what jobs that no longer run left under `store.temp_dir`: the directory of a
/// job that is neither queued nor running (its worker died after the job ended, or its
/// row was deleted), and directories of the per-worker layout older versions used.
/// Only worker 0 does this, when it starts; a kept sort of a job that is still open is
/// what its next attempt resumes from, and stays.
fn remove_orphans() {
    let Ok(settings) = gucs::Settings::read() else { return };
    let Ok(entries) = std::fs::read_dir(&settings.temp_dir) else { return };
    let mut ids: Vec<(i64, std::path::PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_prefix("job-").and_then(|n| n.parse().ok()) {
            ids.push((id, e.path()));
        } else if name == "jobs" {
            for old in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let _ = store_engine::sorted::remove_orphans(&old.path());
                let _ = std::fs::remove_dir(old.path());
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
    if ids.is_empty() {
        return;
    }
    let all: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    let open = transaction(|| {
        Ok(Spi::get_one_with_args::<Vec<i64>>(
            "SELECT coalesce(pg_catalog.array_agg(id), '{}') FROM store.jobs WHERE id = ANY($1) AND state IN ('queued', 'running')",
            &[all.into()],
        )?)
    });
    let Ok(open) = open else { return };
    let open = open.unwrap_or_default();
    for (id, dir) in ids.into_iter().filter(|(id, _)| !open.contains(id)) {
        if std::fs::remove_dir_all(&dir).is_ok() {
            log!("pg_store: removed the temporary directory of job {id}, which no longer runs: {}", dir.display());
        }
    }
}

/// Open jobs looked at per claim, fairest first.
const CANDIDATES: i64 = 64;

/// Claim the fairest job that is queued, or running without a live worker: its id and
/// the claim number.
fn claim() -> Result<Option<(i64, i32)>> {
    let mut entered: Option<i64> = None;
    let res = transaction(|| {
        let ids: Vec<i64> = Spi::connect(|c| {
            let t = c.select(
                "SELECT j.id FROM store.jobs j WHERE j.state IN ('queued', 'running') \
                 ORDER BY (SELECT pg_catalog.count(*) FROM store.jobs r WHERE r.state = 'running' AND r.owner = j.owner), j.id \
                 LIMIT $1",
                None,
                &[CANDIDATES.into()],
            )?;
            t.map(|r| r.get::<i64>(1).map(Option::unwrap_or_default)).collect::<Result<Vec<_>, _>>()
        })?;
        for id in ids {
            if registry::is_live(id) {
                continue;
            }
            let row = Spi::get_two_with_args::<i64, i32>(
                "SELECT (SELECT id FROM store.jobs WHERE id = $1 AND state IN ('queued', 'running') FOR UPDATE SKIP LOCKED), \
                        (SELECT attempts FROM store.jobs WHERE id = $1)",
                &[id.into()],
            )?;
            let (Some(_), Some(attempts)) = row else { continue };
            // Under the row lock: a worker that claimed it meanwhile has committed, and
            // is in the registry.
            if registry::is_live(id) {
                continue;
            }
            let max = gucs::MAX_ATTEMPTS.get();
            if attempts >= max {
                let e = StoreError::refused(
                    ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!("gave up after {attempts} attempts: each one ended with its worker gone (store.max_attempts = {max})"),
                );
                Spi::run_with_args(
                    "UPDATE store.jobs SET state = 'failed', error = $2, sqlstate = $3, finished_at = pg_catalog.now(), \
                     updated_at = pg_catalog.now() WHERE id = $1",
                    &[id.into(), e.to_string().into(), e.sqlstate().into()],
                )?;
                log!("pg_store job {id}: {e}");
                continue;
            }
            let claim = Spi::get_one_with_args::<i32>(
                "UPDATE store.jobs SET state = 'running', attempts = attempts + 1, worker_pid = pg_catalog.pg_backend_pid(), \
                 started_at = coalesce(started_at, pg_catalog.now()), updated_at = pg_catalog.now(), error = NULL, sqlstate = NULL \
                 WHERE id = $1 RETURNING attempts",
                &[id.into()],
            )?
            .ok_or_else(|| StoreError::internal(format!("job {id} vanished while being claimed")))?;
            // The fence: a worker still running an older claim of this job finds its claim
            // number gone at its next batch, and stops.
            Spi::run_with_args(
                "INSERT INTO store.checkpoints (job, range, attempt) VALUES ($1, 0, $2) \
                 ON CONFLICT (job, range) DO UPDATE SET attempt = excluded.attempt",
                &[id.into(), claim.into()],
            )?;
            Spi::run_with_args("UPDATE store.checkpoints SET attempt = $2 WHERE job = $1", &[id.into(), claim.into()])?;
            if !registry::enter(id, claim, 0) {
                return Err(StoreError::internal("the pg_store registry of running jobs is full"));
            }
            entered = Some(id);
            return Ok(Some((id, claim)));
        }
        Ok(None)
    });
    if res.is_err() {
        // The claim did not commit: this process does not run the job.
        if let Some(id) = entered {
            registry::leave(id);
        }
    }
    res
}

fn run_claimed(id: i64, claim: i32) {
    let outcome = std::panic::catch_unwind(|| job::run(id, claim))
        .unwrap_or_else(|p| Err(StoreError::from(store_engine::Error::panicked("the job", &*p))));
    // A panic may have left a transaction open.
    // SAFETY: aborts whatever the job left open.
    unsafe {
        if pg_sys::IsTransactionState() {
            pg_sys::AbortCurrentTransaction();
        }
    }
    let (state, error): (&str, Option<StoreError>) = match outcome {
        Ok(Ended::Done) => ("done", None),
        Ok(Ended::Partial) => ("partial", None),
        Err(StoreError::Shutdown) => {
            log!("pg_store job {id}: stopping for shutdown; it resumes when a worker starts again");
            // SAFETY: ends the process the way PostgreSQL expects; the lock dies with it.
            unsafe { pg_sys::proc_exit(1) };
        }
        Err(StoreError::Fenced) => {
            log!("pg_store job {id}: another worker claimed it; leaving it to that worker");
            registry::leave(id);
            return;
        }
        Err(StoreError::Cancelled) => ("cancelled", None),
        // store_cancel signals the worker, which interrupts whatever statement it was in.
        Err(e) if e.is_query_canceled() && job::cancel_requested(id) => ("cancelled", None),
        Err(e) => {
            log!("pg_store job {id} failed: {e} (SQLSTATE {})", e.sqlstate());
            ("failed", Some(e))
        }
    };
    // The job is over: its sorted runs are of no more use.
    if let Ok(settings) = gucs::Settings::read() {
        let _ = std::fs::remove_dir_all(job::job_dir(&settings, id));
    }
    if state != "done" && state != "partial" {
        let res = transaction(|| {
            Ok(Spi::run_with_args(
                "UPDATE store.jobs SET state = $3, error = $4, sqlstate = $5, finished_at = pg_catalog.now(), updated_at = pg_catalog.now() \
                 WHERE id = $1 AND attempts = $2",
                &[id.into(), claim.into(), state.into(), error.as_ref().map(|e| e.to_string()).into(), error.as_ref().map(|e| e.sqlstate()).into()],
            )?)
        });
        if let Err(e) = res {
            log!("pg_store job {id}: could not record its end: {e}");
        }
    }
    registry::leave(id);
}

/// An inserter: a dynamic background worker the job's worker starts for one key range
/// (its argument; `job claim database` in its extra). It enters the registry for that
/// range, inserts it from its checkpoint to its end, and records an error in the range's
/// checkpoint, where the job's worker finds it.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_store_inserter_main(arg: pg_sys::Datum) {
    // SAFETY: the argument the job's worker registered.
    let range = unsafe { i32::from_datum(arg, false) }.unwrap_or(-1);
    let extra = BackgroundWorker::get_extra().to_string();
    let mut it = extra.split(' ').map(|v| v.parse::<i64>().ok());
    let (Some(Some(id)), Some(Some(claim)), Some(Some(db))) = (it.next(), it.next(), it.next()) else {
        log!("pg_store inserter: bad arguments {extra:?}");
        return;
    };
    let claim = claim as i32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db as u32)), None);
    registry::clean_up_at_exit();
    pin_search_path();
    if !registry::enter(id, claim, range) {
        return;
    }
    let outcome = std::panic::catch_unwind(|| job::run_range(id, claim, range))
        .unwrap_or_else(|p| Err(StoreError::from(store_engine::Error::panicked("the inserter", &*p))));
    // SAFETY: aborts whatever the range left open.
    unsafe {
        if pg_sys::IsTransactionState() {
            pg_sys::AbortCurrentTransaction();
        }
    }
    match outcome {
        Ok(()) | Err(StoreError::Shutdown | StoreError::Fenced | StoreError::Cancelled) => {}
        Err(e) if e.is_query_canceled() && job::cancel_requested(id) => {}
        Err(e) => {
            log!("pg_store job {id}: the inserter of range {range} failed: {e} (SQLSTATE {})", e.sqlstate());
            let res = transaction(|| {
                Ok(Spi::run_with_args(
                    "UPDATE store.checkpoints SET error = $4, sqlstate = $5 WHERE job = $1 AND range = $2 AND attempt = $3",
                    &[id.into(), range.into(), claim.into(), e.to_string().into(), e.sqlstate().into()],
                )?)
            });
            if let Err(e) = res {
                log!("pg_store job {id}: could not record the failure of range {range}: {e}");
            }
        }
    }
    registry::leave(id);
}
