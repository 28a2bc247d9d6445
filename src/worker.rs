//! The background workers: registered at preload time (`store.workers` of them), each
//! connects to `store.database`, claims queued or orphaned jobs one at a time and runs
//! them.
//!
//! A claim, in one transaction: pick the oldest job that is queued, or running with no
//! live worker (nobody holds its advisory lock), locking only that row (`LIMIT 1 FOR
//! UPDATE SKIP LOCKED`); bump its `attempts` — the claim number — in the job and in its
//! checkpoint; then take the session advisory lock on the job, last, so that a claim
//! that cannot commit leaves no lock behind. A worker that dies loses its session and
//! so its lock: the job is claimed again and resumes from its checkpoint. Every batch
//! checks the claim number in its checkpoint update, so a worker whose claim was taken
//! over stops without writing (see [`crate::insert`]).

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::error::{Result, StoreError};
use crate::gucs;
use crate::job::{self, shutdown_requested, Ended};
use crate::txn::transaction;

/// High 16 bits of the first advisory-lock key of a job ("PS"); its low 16 bits and the
/// second key hold the 48 low bits of the job id.
const LOCK_CLASS: u32 = 0x5053_0000;

/// The two advisory-lock keys of job `id` (ids stay below 2^48: 281 trillion jobs).
fn lock_keys(id: i64) -> (i32, i32) {
    let id = id as u64;
    ((LOCK_CLASS | ((id >> 32) as u32 & 0xFFFF)) as i32, id as u32 as i32)
}

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
/// live jobs hold their advisory lock, and their directories carry their pid.
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

/// Claim the oldest job that is queued, or running without a live worker: its id and
/// the claim number.
fn claim() -> Result<Option<(i64, i32)>> {
    let mut locked: Option<i64> = None;
    let res = transaction(|| {
        let (k1, k2) = (LOCK_CLASS as i64, 0xFFFF_FFFFi64);
        let id = Spi::get_one_with_args::<i64>(
            "SELECT (SELECT j.id FROM store.jobs j WHERE j.state IN ('queued', 'running') \
               AND NOT EXISTS (SELECT FROM pg_catalog.pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
                     AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()) \
                     AND l.classid = ($1 | ((j.id >> 32) & 65535))::pg_catalog.oid AND l.objid = (j.id & $2)::pg_catalog.oid) \
             ORDER BY j.id LIMIT 1 FOR UPDATE SKIP LOCKED)",
            &[k1.into(), k2.into()],
        )?;
        let Some(id) = id else { return Ok(None) };
        if id >= 1 << 48 {
            return Err(StoreError::internal(format!("job id {id} is beyond the 48 bits an advisory lock key holds")));
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
        let (a, b) = lock_keys(id);
        if Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_try_advisory_lock($1, $2)", &[a.into(), b.into()])?
            != Some(true)
        {
            // Another worker got there between our look and now: leave it the job.
            return Err(StoreError::Fenced);
        }
        locked = Some(id);
        Ok(Some((id, claim)))
    });
    match res {
        Err(StoreError::Fenced) => Ok(None),
        Err(e) => {
            // The claim did not commit: do not keep the lock it took.
            if let Some(id) = locked {
                unlock(id);
            }
            Err(e)
        }
        ok => ok,
    }
}

fn unlock(id: i64) {
    let (a, b) = lock_keys(id);
    if let Err(e) =
        transaction(|| Ok(Spi::run_with_args("SELECT pg_catalog.pg_advisory_unlock($1, $2)", &[a.into(), b.into()])?))
    {
        log!("pg_store job {id}: could not release its advisory lock: {e}");
    }
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
            unlock(id);
            return;
        }
        Err(StoreError::Cancelled) => ("cancelled", None),
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
    unlock(id);
}
