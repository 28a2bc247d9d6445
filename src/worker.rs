//! The background processes. One **launcher**, registered at preload time, connected
//! to no database: it looks at every database when it starts and every hour, and
//! whenever `store_ingest` commits somewhere (a *want* in the [`registry`]) it starts a
//! **worker** in that database — a dynamic background worker — unless one of the
//! database's workers is idle, while fewer than `store.workers` run in the whole
//! cluster. A worker leaves when the database has nothing for it for
//! [`IDLE_EXIT`] (so it does not hold `DROP DATABASE` off), when pg_store is not created
//! there, and, after a job, when another database waits for a worker and the cap is
//! reached. When idle it purges the jobs older than `store.retention`.
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

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;

use crate::error::{sqlstate_text, Result, StoreError};
use crate::job::{self, Ended};
use crate::registry::{self, Kind};
use crate::signals::{self, reload_on_sighup, shutdown_requested};
use crate::tables::checkpoints;
use crate::tables::jobs::{self, cancel_requested};
use crate::txn::transaction;
use crate::{gucs, retention};

/// How often the launcher looks at every database, for jobs nobody asked a worker for
/// (left by a worker that died) and for expired history.
const PROBE_EVERY: Duration = Duration::from_secs(3600);

/// How long a worker with nothing to do waits for more before it leaves: less than the
/// 5 s `DROP DATABASE` waits for other sessions to go, so an idle worker never makes it
/// fail.
pub const IDLE_EXIT: Duration = Duration::from_secs(3);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_store launcher")
        .set_type("pg_store launcher")
        .set_library("pg_store")
        .set_function("pg_store_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_store_launcher_main(_arg: pg_sys::Datum) {
    crate::signals::attach();
    BackgroundWorker::connect_worker_to_spi(None, None);
    registry::clean_up_at_exit();
    registry::proc_enter(Kind::Launcher);
    log!("pg_store launcher started (pid {})", std::process::id());
    remove_legacy_dirs();
    let mut started: Vec<(u32, DynamicBackgroundWorker)> = Vec::new();
    // Databases to look at (at start, hourly, after a want found the table full): served
    // after the wants, one worker each where none runs, in the launcher's own memory so
    // that they neither fill the wants table nor make busy workers give way.
    let mut probe: std::collections::VecDeque<u32> = std::collections::VecDeque::new();
    let mut last_probe: Option<Instant> = None;
    loop {
        if shutdown_requested() {
            // SAFETY: ends the process the way PostgreSQL expects.
            unsafe { pg_sys::proc_exit(1) };
        }
        reload_on_sighup();
        started.retain(|(_, h)| {
            !matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied))
        });
        if last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY) || registry::take_overflow() {
            probe = databases().into();
            last_probe = Some(Instant::now());
        }
        let cap = gucs::WORKERS.get().max(0) as usize;
        // Workers a launcher that restarted did not start count too.
        let running = |started: &Vec<(u32, DynamicBackgroundWorker)>| started.len().max(registry::workers());
        for w in registry::wants() {
            if registry::is_paused(w.database) {
                continue; // DROP EXTENSION pg_store is under way there
            }
            let here = started.iter().filter(|(db, _)| *db == w.database).count();
            if here > 0 && registry::idle_workers(w.database) > 0 {
                continue; // an idle worker there takes the job, and clears the want
            }
            if running(&started) >= cap {
                break;
            }
            if !start_worker(w.database, &mut started) {
                registry::refused(w.database);
                break;
            }
            registry::granted(w.database);
        }
        while running(&started) < cap && registry::wants().is_empty() {
            let Some(db) = probe.pop_front() else { break };
            if started.iter().any(|(d, _)| *d == db) || registry::is_paused(db) {
                continue;
            }
            if !start_worker(db, &mut started) {
                probe.push_front(db);
                break;
            }
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            // The postmaster died.
            // SAFETY: as above.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

/// Start a worker for `database` and keep its handle in `started`; false (logged) when no
/// background worker slot is free, so the caller stops starting more for now.
fn start_worker(database: u32, started: &mut Vec<(u32, DynamicBackgroundWorker)>) -> bool {
    // SAFETY: reads a backend global.
    let pid = unsafe { pg_sys::MyProcPid };
    let handle = BackgroundWorkerBuilder::new(&format!("pg_store worker for database {database}"))
        .set_type("pg_store worker")
        .set_library("pg_store")
        .set_function("pg_store_worker_main")
        .set_argument(i64::from(database).into_datum())
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(pid)
        .load_dynamic();
    match handle {
        Ok(h) => {
            started.push((database, h));
            true
        }
        Err(_) => {
            // Once a minute at most: store.status says so for each job that waits.
            thread_local!(static LOGGED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) });
            if LOGGED.with(|l| l.get().is_none_or(|t| t.elapsed() >= Duration::from_secs(60))) {
                LOGGED.with(|l| l.set(Some(Instant::now())));
                log!("pg_store launcher: could not start a worker: no background worker slot free (max_worker_processes)");
            }
            false
        }
    }
}

/// The databases a worker may connect to (not templates, not being dropped), read from
/// `pg_database` (a shared catalog, readable with no database connected).
fn databases() -> Vec<u32> {
    let mut out = Vec::new();
    // SAFETY: a catalog heap scan in a transaction of its own, on the main thread; an
    // error ends the launcher, which the postmaster starts again.
    unsafe {
        pg_sys::StartTransactionCommand();
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let db = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database);
            if db.datallowconn && !db.datistemplate && db.datconnlimit != -2 {
                out.push(db.oid.to_u32());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::CommitTransactionCommand();
    }
    out
}

/// Remove the temporary directories older versions left: 0.1.0's layout (`job-<id>`,
/// `jobs/`), which named no database, and every job directory under 0.2.0's default
/// `store.temp_dir` (`pg_store_tmp` in the data directory, which base backups copied)
/// when it is no longer the one in use. A job of that time resumes by sorting again.
/// Only what pg_store made goes: a directory of the server's OS user, private, no link.
fn remove_legacy_dirs() {
    let Ok(settings) = gucs::Settings::read() else { return };
    let old_default = gucs::legacy_temp_dir();
    let mut dirs = vec![(settings.temp_dir.clone(), false)];
    if settings.temp_dir != old_default {
        dirs.push((old_default.clone(), true));
    }
    for (dir, every_job) in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let legacy =
                name == "jobs" || name.strip_prefix("job-").is_some_and(|n| every_job || n.parse::<i64>().is_ok());
            if legacy && matches!(store_engine::private_dir::remove(&e.path()), Ok(true)) {
                log!("pg_store: removed {}, left by an older version", e.path().display());
            }
        }
        if every_job && std::fs::remove_dir(&dir).is_ok() {
            log!("pg_store: removed {}, the temporary directory of an older version", dir.display());
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_store_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the argument the launcher registered.
    let db = unsafe { i64::from_datum(arg, false) }.unwrap_or(0) as u32;
    crate::signals::attach();
    let server = server_settings();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    registry::clean_up_at_exit();
    registry::proc_enter(Kind::Worker);
    pin_session(&server);
    registry::granted(db);
    match transaction(crate::api::installed_version) {
        Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => {}
        Ok(Some(v)) => {
            log!(
                "pg_store worker: pg_store {v} is created in database {}, the library is {}: run ALTER EXTENSION pg_store UPDATE there",
                database_name(),
                env!("CARGO_PKG_VERSION")
            );
            return;
        }
        Ok(None) => return, // pg_store is not created in this database
        Err(e) => {
            log!("pg_store worker: could not look at database {}: {e}", database_name());
            return;
        }
    }
    fail_restored_jobs();
    remove_orphans(db);
    let mut idle_since = Instant::now();
    let mut purged = false;
    loop {
        if registry::is_paused(db) {
            return;
        }
        if shutdown_requested() {
            // pg_terminate_backend (of this worker alone) leaves the jobs queued here to
            // another worker; a server shutting down starts none.
            registry::want(db);
            return;
        }
        reload_on_sighup();
        if registry::workers() > gucs::WORKERS.get().max(0) as usize {
            // store.workers was lowered (a running job finishes first): leave, and ask
            // again for a worker for what waits here, which the launcher starts when
            // there is room.
            if matches!(transaction(jobs::any_queued), Ok(true)) {
                registry::want_last(db);
            }
            return;
        }
        registry::granted(db);
        match signals::busy(claim) {
            Ok(Some((id, claim))) => {
                registry::proc_job(id);
                if matches!(transaction(|| more_queued(id)), Ok(true)) {
                    registry::want(db);
                }
                run_claimed(id, claim);
                registry::proc_job(0);
                (idle_since, purged) = (Instant::now(), false);
                if registry::others_waiting(db) && registry::workers() >= gucs::WORKERS.get().max(0) as usize {
                    // Make room for a database that waits; this one asks again, behind it.
                    registry::want_last(db);
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => log!("pg_store worker: could not look for jobs: {e}"),
        }
        if !purged {
            retention::purge_expired();
            crate::txn::report_stats(true);
            purged = true;
        }
        if idle_since.elapsed() >= IDLE_EXIT || !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            return;
        }
    }
}

fn database_name() -> String {
    transaction(|| Ok(Spi::get_one::<String>("SELECT pg_catalog.current_database()::text")?))
        .ok()
        .flatten()
        .unwrap_or_else(|| "?".into())
}

/// Whether jobs besides `id` wait in this database.
fn more_queued(id: i64) -> Result<bool> {
    jobs::more_queued(id)
}

/// Jobs that were queued or running where a dump was taken, or in a database this one
/// was copied from, must not run here (their files, table and ledger were another
/// cluster's): they fail with SQLSTATE 55000, and store_ingest queues them again.
fn fail_restored_jobs() {
    let res = transaction(|| jobs::fail_restored(sqlstate_text(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE)));
    match res {
        Ok(Some(n)) if n > 0 => log!("pg_store: {n} open jobs came from another cluster or database and failed"),
        Ok(_) => {}
        Err(e) => log!("pg_store worker: could not look for restored jobs: {e}"),
    }
}

/// The worker's own SQL runs as a superuser: it resolves names in `pg_catalog` (and
/// `pg_temp`, last) only, never in a schema a user can create objects in. Settings a
/// database's owner may attach to the database (`ALTER DATABASE … SET`) reach the worker
/// too. Those a session may set are taken back to the server's (`server`, what
/// [`server_settings`] read before the process connected): a database's `lock_timeout`
/// failed other roles' jobs, its planner settings slowed them a thousandfold. Then its
/// session user and role, client encoding (which binary COPY converts text from), string
/// syntax, identifier quoting, row security and transactions are pinned to what its SQL
/// assumes. The
/// transaction defaults are pinned before its first transaction: a database made
/// serializable, read-only and deferrable kept its jobs queued (each look for work
/// failing), and held that first transaction waiting for a safe snapshot for as long as
/// serializable transactions ran anywhere in the cluster.
fn pin_session(server: &HashMap<CString, CString>) {
    let set = |name: &CStr, value: &CStr| {
        // SAFETY: sets a session GUC from the main thread; an invalid value raises an
        // ERROR, caught below.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
            )
        }
    };
    set(c"default_transaction_read_only", c"off");
    set(c"default_transaction_isolation", c"read committed");
    set(c"default_transaction_deferrable", c"off");
    set(c"search_path", c"pg_catalog, pg_temp");
    let pinned = transaction(|| {
        // The session user the worker started as (a superuser): a database's
        // `session_authorization` applies to a background worker's connection, which has
        // no login of its own to override it, and turned the worker into the owner's role.
        // SAFETY: a catalog look-up in a transaction; the name is copied at once.
        let me =
            unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetAuthenticatedUserId(), false)) }.to_owned();
        set(c"session_authorization", &me);
        // SAFETY: reads the session's user state.
        if unsafe { pg_sys::GetSessionUserId() != pg_sys::GetAuthenticatedUserId() || !pg_sys::superuser() } {
            return Err(StoreError::internal("the worker's session is not its own superuser's"));
        }
        // PL/pgSQL, loaded now rather than by the first trigger of a target, defines its
        // settings (`plpgsql.extra_errors`, `plpgsql.check_asserts`): until then the
        // database's values for them are placeholders no look at the settings sees, which
        // the library takes up when it loads.
        // SAFETY: loads a library of the server's, as a first PL/pgSQL call would.
        unsafe { pg_sys::load_file(c"$libdir/plpgsql".as_ptr(), false) };
        for (name, built_in) in settings_from_the_database()? {
            // A setting of a library the server had not loaded has no value of the server's
            // but the one the configuration files gave its placeholder: else its built-in one.
            let key = CString::new(name.as_bytes().to_ascii_lowercase()).unwrap_or_default();
            let Some(value) = server.get(&key).or(built_in.as_ref()) else { continue };
            // A value the setting refuses is a WARNING, not an ERROR that would make every
            // worker of the database exit: the database's value then stays.
            // SAFETY: as `set`; errors are reported at WARNING and return 0.
            let ok = unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_SUSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SET,
                    true,
                    pg_sys::WARNING as i32,
                    false,
                )
            };
            if ok <= 0 {
                log!("pg_store: could not give {name:?} the server's value {value:?}; the database's stays");
            }
        }
        set(c"search_path", c"pg_catalog, pg_temp");
        set(c"role", c"none");
        set(c"client_encoding", c"UTF8");
        set(c"standard_conforming_strings", c"on");
        // Index definitions are compared as pg_get_indexdef prints them.
        set(c"quote_all_identifiers", c"off");
        set(c"row_security", c"on");
        Ok(())
    });
    if let Err(e) = pinned {
        log!("pg_store: could not pin the session's settings, exiting: {e}");
        // SAFETY: ends the process the way PostgreSQL expects.
        unsafe { pg_sys::proc_exit(1) };
    }
}

/// The settings a session may set (those any user may, and those only a superuser may,
/// which `GRANT SET ON PARAMETER` may have let a database's owner attach to it:
/// `session_replication_role`, which turns off triggers and foreign keys) and the values
/// this process has for them: read before it connects to its database, they are what the
/// server gives every session (its configuration files as last loaded, `ALTER SYSTEM`,
/// its command line), and not yet what the database or a role attached.
/// Names are in lower case, as setting names compare.
fn server_settings() -> HashMap<CString, CString> {
    let mut out = HashMap::new();
    // SAFETY: this process's table of settings, read on its main thread before it
    // connects; each name and value is copied at once (a value may sit in a static buffer).
    unsafe {
        let vars = pg_sys::get_guc_variables();
        let n = usize::try_from(pg_sys::GetNumConfigOptions()).unwrap_or(0);
        for i in 0..n {
            let v = *vars.add(i);
            if v.is_null() || !matches!((*v).context, pg_sys::GucContext::PGC_USERSET | pg_sys::GucContext::PGC_SUSET) {
                continue;
            }
            let name = CStr::from_ptr((*v).name).to_bytes().to_ascii_lowercase();
            let value = if (*v).vartype == pg_sys::config_type::PGC_REAL {
                // GetConfigOption prints a real with `%g`, six digits: Rust's shortest
                // form that reads back the same number instead.
                CString::new(format!("{}", *(*v.cast::<pg_sys::config_real>()).variable)).ok()
            } else {
                let value = pg_sys::GetConfigOption((*v).name, true, false);
                (!value.is_null()).then(|| CStr::from_ptr(value).to_owned())
            };
            if let (Ok(name), Some(value)) = (CString::new(name), value) {
                out.insert(name, value);
            }
        }
    }
    out
}

/// The settings a session may set that this session took from `ALTER DATABASE … SET` (or
/// `ALTER ROLE`), each with its built-in value. Those pinned by name are left to
/// [`pin_session`], and the transaction settings (pinned before the first transaction;
/// `transaction_*` cannot change once a transaction has run a query) to it too.
fn settings_from_the_database() -> Result<Vec<(CString, Option<CString>)>> {
    let rows = Spi::connect(|c| {
        let t = c.select(
            "SELECT s.name, s.boot_val FROM pg_catalog.pg_settings s \
             WHERE s.context OPERATOR(pg_catalog.=) ANY ('{user,superuser}'::pg_catalog.text[]) \
               AND s.source OPERATOR(pg_catalog.=) ANY ('{database,user,\"database user\"}'::pg_catalog.text[]) \
               AND s.name OPERATOR(pg_catalog.<>) ALL ('{session_authorization,role}'::pg_catalog.text[]) \
               AND NOT pg_catalog.starts_with(s.name, 'transaction_') \
               AND NOT pg_catalog.starts_with(s.name, 'default_transaction_')",
            None,
            &[],
        )?;
        t.map(|r| Ok::<_, pgrx::spi::SpiError>((r.get::<String>(1)?, r.get::<String>(2)?)))
            .collect::<std::result::Result<Vec<_>, _>>()
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, boot)| Some((CString::new(name?).ok()?, boot.and_then(|b| CString::new(b).ok()))))
        .collect())
}

/// Remove what jobs of this database that no longer run left under `store.temp_dir`
/// (`job-<database>-<id>`): the directory of a job that is neither queued nor running
/// (its worker died after the job ended, or its row was deleted). A kept sort of a job
/// that is still open is what its next attempt resumes from, and stays.
fn remove_orphans(db: u32) {
    let Ok(settings) = gucs::Settings::read() else { return };
    let Ok(entries) = std::fs::read_dir(&settings.temp_dir) else { return };
    let prefix = format!("job-{db}-");
    let ids: Vec<(i64, std::path::PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            // job-<db>-<id>-<random> (or 0.2.0's job-<db>-<id>).
            let rest = e.file_name().to_str()?.strip_prefix(&prefix)?.to_string();
            let id = rest.split('-').next()?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    if ids.is_empty() {
        return;
    }
    let all: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    let open = transaction(|| jobs::open_among(all));
    let Ok(open) = open else { return };
    let open = open.unwrap_or_default();
    for (id, dir) in ids.into_iter().filter(|(id, _)| !open.contains(id)) {
        if matches!(store_engine::private_dir::remove(&dir), Ok(true)) {
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
    let mut cancelled = Vec::new();
    let res = transaction(|| {
        let ids = jobs::claim_candidates(CANDIDATES)?;
        for id in ids {
            if registry::is_live(id) {
                continue;
            }
            let row = jobs::lock_open(id)?;
            let (Some(_), Some(attempts), cancel) = row else { continue };
            // Under the row lock: a worker that claimed it meanwhile has committed, and
            // is in the registry.
            if registry::is_live(id) {
                continue;
            }
            // Its owner cancelled it, and the process that ran it is gone (the cancel's
            // grace ended a statement that caught it): cancelled, whatever attempts are left.
            if cancel == Some(true) {
                jobs::end_cancelled(id)?;
                cancelled.push(id);
                continue;
            }
            let max = gucs::MAX_ATTEMPTS.get();
            if attempts >= max {
                let e = StoreError::refused(
                    ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "gave up after {attempts} attempts: each one ended with its worker gone, not stopped (store.max_attempts = {max})"
                    ),
                );
                jobs::fail(id, e.to_string(), e.sqlstate())?;
                log!("pg_store job {id}: {e}");
                continue;
            }
            let claim = jobs::start_attempt(id)?
                .ok_or_else(|| StoreError::internal(format!("job {id} vanished while being claimed")))?;
            // The fence: a worker still running an older claim of this job finds its claim
            // number gone at its next batch, and stops.
            checkpoints::fence(id, claim)?;
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
    } else {
        cancelled.into_iter().for_each(after_end);
    }
    res
}

/// What unwound out of a job or a range: an ERROR PostgreSQL raised outside the
/// transactions that catch them (a cancel while the worker waits on its latch, say) is
/// that error, with its SQLSTATE — a `store_cancel` must end the job `cancelled`, not
/// as a panic; anything else is a panic of ours.
fn unwound(what: &str, p: Box<dyn std::any::Any + Send>) -> StoreError {
    match p.downcast::<pgrx::pg_sys::panic::CaughtError>() {
        Ok(e) => StoreError::from(*e),
        Err(p) => StoreError::from(store_engine::Error::panicked(what, &*p)),
    }
}

fn run_claimed(id: i64, claim: i32) {
    let outcome = signals::busy(|| {
        std::panic::catch_unwind(|| job::run(id, claim)).unwrap_or_else(|p| Err(unwound("the job", p)))
    });
    let outcome = match outcome {
        // The statement SIGTERM cancelled.
        Err(e) if e.is_query_canceled() && shutdown_requested() => Err(StoreError::Shutdown),
        outcome => outcome,
    };
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
            log!("pg_store job {id}: stopping (SIGTERM); it resumes when a worker starts again");
            // Only this process may have been stopped (pg_terminate_backend): ask the
            // launcher for a worker to take the job again (a server shutting down
            // starts none).
            registry::want(registry::my_database());
            if shutdown_requested() {
                // Asked to stop, not gone: the attempt does not count against
                // store.max_attempts. Committed locally: a synchronous standby that is
                // gone must not hold up the shutdown.
                let stopped = transaction(|| {
                    Spi::run("SET LOCAL synchronous_commit = local")?;
                    jobs::stopped(id, claim)
                });
                match stopped {
                    Ok(Some(_)) => {}
                    Ok(None) => log!("pg_store job {id}: claim {claim} is no longer the job's; no stop recorded"),
                    Err(e) => log!("pg_store job {id}: could not record the stop: {e}"),
                }
            }
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
        Err(e) if e.is_query_canceled() && cancel_requested(id) => ("cancelled", None),
        Err(e) => {
            log!("pg_store job {id} failed: {e} (SQLSTATE {})", e.sqlstate());
            ("failed", Some(e))
        }
    };
    if state != "done" && state != "partial" {
        let res = transaction(|| {
            jobs::end(id, claim, state, error.as_ref().map(|e| e.to_string()), error.as_ref().map(|e| e.sqlstate()))
        });
        if let Err(e) = res {
            log!("pg_store job {id}: could not record its end: {e}");
        }
    }
    // Only now, after its end is recorded, so that an inserter starting late finds the
    // job over with its sorted runs gone.
    after_end(id);
    crate::txn::report_stats(true);
    registry::leave(id);
}

/// Job `id`'s end is committed: its sorted runs are of no more use, and its LOG line is due.
fn after_end(id: i64) {
    if let Ok(settings) = gucs::Settings::read() {
        for dir in job::job_dirs(&settings, id) {
            let _ = store_engine::private_dir::remove(&dir);
        }
    }
    log_end(id);
}

/// One LOG line per job that ended, with its counts and duration, for log shippers.
fn log_end(id: i64) {
    let line = transaction(|| jobs::end_line(id));
    if let Ok(Some(line)) = line {
        log!("{line}");
    }
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
    crate::signals::attach();
    let server = server_settings();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db as u32)), None);
    registry::clean_up_at_exit();
    registry::proc_enter(Kind::Inserter);
    registry::proc_job(id);
    pin_session(&server);
    if !registry::enter(id, claim, range) {
        return;
    }
    let outcome = signals::busy(|| {
        std::panic::catch_unwind(|| job::run_range(id, claim, range))
            .unwrap_or_else(|p| Err(unwound("the inserter", p)))
    });
    // SAFETY: aborts whatever the range left open.
    unsafe {
        if pg_sys::IsTransactionState() {
            pg_sys::AbortCurrentTransaction();
        }
    }
    match outcome {
        Ok(()) | Err(StoreError::Shutdown | StoreError::Fenced | StoreError::Cancelled) => {}
        // The statement SIGTERM (or store.cancel) cancelled.
        Err(e) if e.is_query_canceled() && (shutdown_requested() || cancel_requested(id)) => {}
        Err(e) => {
            log!("pg_store job {id}: the inserter of range {range} failed: {e} (SQLSTATE {})", e.sqlstate());
            let res = transaction(|| checkpoints::record_error(id, range, claim, e.to_string(), e.sqlstate()));
            if let Err(e) = res {
                log!("pg_store job {id}: could not record the failure of range {range}: {e}");
            }
        }
    }
    registry::leave(id);
}
