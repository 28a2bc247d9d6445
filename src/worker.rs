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

/// Remove temporary directories left by jobs of workers that died. Only worker 0 does
/// this, when it starts: a restart of worker 0 happens only with the whole server
/// (crash recovery) or after it exited, when no job of its is running; other workers'
/// directories carry their pid, and live workers are alive.
fn remove_orphans() {
    let Ok(settings) = gucs::Settings::read() else { return };
    let dir = settings.temp_dir.join("jobs");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        // jobs/<pid>/ holds the runs of the worker with that pid.
        let pid: Option<i32> = e.file_name().to_str().and_then(|s| s.parse().ok());
        // SAFETY: kill with signal 0 only probes whether the process exists.
        let alive = pid.is_some_and(|p| p as u32 != std::process::id() && unsafe { libc::kill(p, 0) } == 0);
        if !alive {
            let n = store_engine::sorted::remove_orphans(&e.path()).unwrap_or(0);
            let _ = std::fs::remove_dir(e.path());
            if n > 0 {
                log!(
                    "pg_store: removed {n} orphaned temporary director{} under {}",
                    if n == 1 { "y" } else { "ies" },
                    e.path().display()
                );
            }
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
                "INSERT INTO store.checkpoints (job, attempt) VALUES ($1, $2) ON CONFLICT (job) DO UPDATE SET attempt = excluded.attempt",
                &[id.into(), claim.into()],
            )?;
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
