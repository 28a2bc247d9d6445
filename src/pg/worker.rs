//! The background workers: registered at preload time (`store.workers` of them), each
//! connects to `store.database`, claims queued or orphaned jobs and runs them.
//!
//! A claim takes the job row `FOR UPDATE SKIP LOCKED` and then a session advisory lock
//! on the job id, held until the job ends. A worker that dies (kill -9, crash) loses
//! its session and so its lock: the job, still `running`, is claimed again and resumed
//! from its checkpoint.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use super::gucs;
use super::job::{self, shutdown_requested, Stop};
use super::txn::{spi_err, transaction, PgError};
use crate::engine::pipeline;

/// First key of the advisory locks on job ids ("PS").
const LOCK_CLASS: i32 = 0x5053;

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
    let index = unsafe { i32::from_datum(arg, false) }.unwrap_or(0);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    log!("pg_store worker {index} started (pid {})", std::process::id());
    if index == 0 {
        remove_orphans();
    }
    loop {
        if shutdown_requested() {
            // Non-zero: the postmaster restarts a static worker that exits this way.
            unsafe { pg_sys::proc_exit(1) };
        }
        job::reload_on_sighup();
        match claim() {
            Ok(Some(id)) => {
                run_claimed(id);
                continue;
            }
            Ok(None) => {}
            Err(e) if e.sqlstate == "42P01" => {} // extension not created yet in this database
            Err(e) => log!("pg_store worker {index}: could not look for jobs: {e}"),
        }
        BackgroundWorker::wait_latch(Some(Duration::from_secs(1)));
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
        let alive = pid.is_some_and(|p| p as u32 != std::process::id() && unsafe { libc::kill(p, 0) } == 0);
        if !alive {
            let n = pipeline::remove_orphans(&e.path()).unwrap_or(0);
            let _ = std::fs::remove_dir(e.path());
            if n > 0 {
                log!("pg_store: removed {n} orphaned temporary director{} under {}", if n == 1 { "y" } else { "ies" }, e.path().display());
            }
        }
    }
}

/// Claim the oldest job that is queued, or running without a live worker.
fn claim() -> Result<Option<i64>, PgError> {
    transaction(|| {
        let ids: Vec<i64> = Spi::connect_mut(|c| {
            let t = c.update("SELECT id FROM store.jobs WHERE state IN ('queued', 'running') ORDER BY id FOR UPDATE SKIP LOCKED", None, &[])?;
            t.map(|r| r.get::<i64>(1).map(|v| v.unwrap_or_default())).collect::<Result<Vec<_>, _>>()
        })
        .map_err(spi_err)?;
        for id in ids {
            let locked = Spi::get_one_with_args::<bool>("SELECT pg_try_advisory_lock($1, $2)", &[LOCK_CLASS.into(), (id as i32).into()])
                .map_err(spi_err)?
                .unwrap_or(false);
            if locked {
                Spi::run_with_args(
                    "UPDATE store.jobs SET state = 'running', attempts = attempts + 1, worker_pid = pg_backend_pid(), \
                     started_at = coalesce(started_at, now()), updated_at = now(), error = NULL WHERE id = $1",
                    &[id.into()],
                )
                .map_err(spi_err)?;
                return Ok(Some(id));
            }
        }
        Ok(None)
    })
}

fn run_claimed(id: i64) {
    // The job's runs live under jobs/<pid>/, so orphans can be told from live ones.
    let outcome = std::panic::catch_unwind(|| job::run(id)).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(Stop::Failed(format!("internal error: {}", msg.unwrap_or_else(|| "panic".into()))))
    });
    // A panic may have left a transaction open.
    unsafe {
        if pg_sys::IsTransactionState() {
            pg_sys::AbortCurrentTransaction();
        }
    }
    let (state, error) = match outcome {
        Ok(()) => (None, None),
        Err(Stop::Shutdown) => {
            log!("pg_store job {id}: stopping for shutdown; it resumes when a worker starts again");
            unsafe { pg_sys::proc_exit(1) };
        }
        Err(Stop::Cancelled) => (Some("cancelled"), None),
        Err(Stop::Failed(msg)) => {
            log!("pg_store job {id} failed: {msg}");
            (Some("failed"), Some(msg))
        }
    };
    let res = transaction(|| {
        if let Some(state) = state {
            Spi::run_with_args(
                "UPDATE store.jobs SET state = $2, error = $3, finished_at = now(), updated_at = now() WHERE id = $1",
                &[id.into(), state.into(), error.as_deref().into()],
            )
            .map_err(spi_err)?;
        }
        Spi::run_with_args("SELECT pg_advisory_unlock($1, $2)", &[LOCK_CLASS.into(), (id as i32).into()]).map_err(spi_err)
    });
    if let Err(e) = res {
        log!("pg_store job {id}: could not record its end: {e}");
    }
}
