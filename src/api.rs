//! The SQL surface: `store_ingest` (through `store.enqueue`), `store_cancel`,
//! `store.wait_job` (behind `store_wait`) and `store.line_key`. Each validates and
//! queues; the work itself happens in the background workers.
//!
//! None of these functions is `SECURITY DEFINER`: they act as the role executing them
//! ([`security::executing_role`]), read `store.*` through its row-level security (a
//! role sees its own jobs), and write pg_store's bookkeeping as the bootstrap superuser
//! only after every check passed. Each pins `search_path` to `pg_catalog, pg_temp`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::{Dedup, Filter};

use crate::admission::{self, Asker};
use crate::error::{Result, StoreError};
use crate::tables::ingested;
use crate::tables::jobs::{self, Status};
use crate::{gucs, registry, security, PRELOADED};

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_schema]
mod store {
    use pgrx::prelude::*;

    /// The unique key of a line: its bytes up to 2,000 bytes, else 0xFF + SHA-256.
    #[pg_extern(immutable, strict, parallel_safe)]
    fn line_key(line: &str) -> Vec<u8> {
        store_engine::line_key(line.as_bytes())
    }

    /// Validate and queue an ingest job; `store_ingest` is the SQL face of this.
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn enqueue(
        path: Option<&str>,
        target: Option<pg_sys::Oid>,
        column_name: Option<&str>,
        dedup: Option<&str>,
        filter: Option<&str>,
        key_column: Option<&str>,
    ) -> i64 {
        let f = "store.ingest";
        (|| {
            super::enqueue(
                super::required(path, f, "path")?,
                super::required(target, f, "target")?,
                super::required(column_name, f, "column_name")?,
                super::required(dedup, f, "dedup")?,
                filter,
                key_column,
            )
        })()
        .unwrap_or_else(|e| e.raise())
    }

    /// Block until `job` ends (or `timeout` passes), with a progress NOTICE every few
    /// seconds. Returns the job's state.
    #[pg_extern(volatile)]
    #[search_path(pg_catalog, pg_temp)]
    fn wait_job(job: Option<i64>, timeout: Option<pgrx::datum::Interval>) -> String {
        super::required(job, "store.wait", "job")
            .and_then(|job| super::wait_job(job, timeout))
            .unwrap_or_else(|e| e.raise())
    }
}

/// A NULL argument, refused with SQLSTATE 22004 naming it (rather than a NULL result, or
/// an internal error from the argument's conversion).
pub fn required<T>(value: Option<T>, function: &str, argument: &str) -> Result<T> {
    value.ok_or_else(|| {
        StoreError::refused(ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{argument} of {function} must not be NULL"))
    })
}

/// This library's SQL objects must be of its own version. Between installing a new
/// library (and restarting) and `ALTER EXTENSION pg_store UPDATE`, the old version's
/// declarations call into the new code — some of 0.1.0's as SECURITY DEFINER, which
/// would make the new code see their owner as the caller: refuse instead.
pub fn require_current_version() -> Result<()> {
    match installed_version()? {
        Some(v) if v == env!("CARGO_PKG_VERSION") => Ok(()),
        v => Err(StoreError::refused(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_store {} is created in this database, but the library is {}",
                v.as_deref().unwrap_or("(none)"),
                env!("CARGO_PKG_VERSION")
            ),
        )
        .with_hint("Run ALTER EXTENSION pg_store UPDATE in this database.")),
    }
}

/// pg_store's version as created in this database, if it is.
pub fn installed_version() -> Result<Option<String>> {
    crate::read::one::<String>(
        "SELECT (SELECT extversion::text FROM pg_catalog.pg_extension WHERE extname = 'pg_store')",
        &[],
    )
}

fn enqueue(
    path: &str,
    target: pg_sys::Oid,
    column: &str,
    dedup: &str,
    filter: Option<&str>,
    key_column: Option<&str>,
) -> Result<i64> {
    require_current_version()?;
    crate::read::require_primary("queue a job")?;
    if !PRELOADED.load(Ordering::Relaxed) {
        return Err(StoreError::refused(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "pg_store is not loaded through shared_preload_libraries").with_hint(
            "Add pg_store to shared_preload_libraries in postgresql.conf and restart PostgreSQL: the background workers that run jobs start only then.",
        ));
    }
    if gucs::WORKERS.get() == 0 {
        return Err(StoreError::refused(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "store.workers is 0: no worker would run this job",
        )
        .with_hint("Set it above 0 and reload (ALTER SYSTEM SET store.workers = 2; SELECT pg_reload_conf()); jobs queued before it was set to 0 wait for that too."));
    }
    if security::in_restricted_operation() {
        return Err(StoreError::refused(ERRCODE_INSUFFICIENT_PRIVILEGE, "store.ingest cannot be called inside a security-restricted operation").with_hint(
            "Maintenance commands (ANALYZE, VACUUM, REINDEX, CREATE INDEX, REFRESH MATERIALIZED VIEW) run a table owner's index and view code this way; reading server files does not belong there.",
        ));
    }
    let who = security::executing_role();
    let admitted = admission::check(Asker::Caller(who), path, target, column, key_column)?;
    // A `store.temp_dir` no job could use refuses the job now (once the caller may queue
    // it), not once a worker has it.
    crate::job::prepare_temp_dir(&gucs::Settings::read()?).map_err(|e| {
        StoreError::refused(e.code(), format!("store.temp_dir cannot hold a job's files: {e}")).with_hint(
            "Create it, owned by the server's OS user, or point store.temp_dir at such a directory \
             (ALTER SYSTEM SET store.temp_dir = '…'; SELECT pg_reload_conf()).",
        )
    })?;
    // The arguments only a caller gives, parsed as the job will parse them.
    let dedup: Dedup = dedup
        .parse()
        .map_err(|e: store_engine::Error| StoreError::refused(ERRCODE_INVALID_PARAMETER_VALUE, e.to_string()))?;
    if let Some(f) = filter {
        Filter::parse(f).map_err(|e| {
            StoreError::refused(ERRCODE_INVALID_PARAMETER_VALUE, e.to_string())
                .with_hint("A filter is a regular expression, or include=RE;exclude=RE;min_len=N;max_len=N.")
        })?;
    }
    let canon = store_engine::path_text(&admitted.path);
    let id = security::as_superuser(|| jobs::queue(&canon, target, column, dedup.as_str(), filter, who, key_column))?;
    // Once the job is visible, ask the launcher for a worker in this database. A prepared
    // transaction would make it visible at a COMMIT PREPARED no one here sees: refused.
    let db = registry::my_database();
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || registry::want(db));
    refuse_prepare("store_ingest");
    id.ok_or_else(|| StoreError::internal("INSERT … RETURNING id returned nothing"))
}

/// Why a queued job of this database waits, for `store.status`: no background worker slot
/// free, every `store.workers` worker busy elsewhere, or the worker's commit waiting for
/// a synchronous standby; NULL when a worker is about to take it (and on a standby,
/// where jobs do not run).
#[pg_extern(stable, parallel_safe, schema = "store")]
#[search_path(pg_catalog, pg_temp)]
fn queue_note() -> Option<String> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return Some("pg_store is not in shared_preload_libraries: no worker runs jobs".into());
    }
    registry::queue_note(gucs::WORKERS.get().max(0) as usize)
}

/// What a running job of this database waits for, for `store.status`: a lock other
/// sessions hold (naming their processes), or a synchronous standby; NULL while it
/// works, and for a job the caller does not see.
#[pg_extern(stable, parallel_restricted, schema = "store")]
#[search_path(pg_catalog, pg_temp)]
fn run_note(job: i64) -> Option<String> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    let (note, waiter) = match jobs::visible(job) {
        Ok(visible) => visible.then(|| registry::job_wait(job)).flatten()?,
        Err(e) => e.raise(),
    };
    let Some(pid) = waiter else { return Some(note) };
    // Who holds the lock, read after the registry's lock is released: the lock
    // manager's own locks are taken here. None left: the wait just ended.
    // (A prepared transaction holds its locks with no process: PID 0.)
    let holders = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(CASE WHEN h OPERATOR(pg_catalog.=) 0 \
                                           THEN 'a prepared transaction (pg_prepared_xacts)' \
                                           ELSE 'process ' OPERATOR(pg_catalog.||) h END, ', ') \
           FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids($1)) h",
        &[pid.into()],
    );
    match holders {
        Ok(Some(h)) => Some(format!("a lock held by {h}: pg_blocking_pids({pid}) names it")),
        Ok(None) => None,
        Err(_) => Some(note),
    }
}

/// Behind `store.forget`: make the ledger forget files ingested into `target` — every
/// one, or `path` (a file, or a directory and everything under it) — so that the next
/// run reads them again: after rows were deleted from the target, say. Only the ledger
/// rows the caller sees (of its own jobs, or of roles whose privileges it has; a
/// superuser's: all). Returns how many it forgot.
#[pg_extern(volatile, schema = "store", name = "forget_files")]
#[search_path(pg_catalog, pg_temp)]
fn forget(target: Option<pg_sys::Oid>, path: Option<&str>) -> i64 {
    required(target, "store.forget", "target").and_then(|t| forget_files(t, path)).unwrap_or_else(|e| e.raise())
}

fn forget_files(target: pg_sys::Oid, path: Option<&str>) -> Result<i64> {
    require_current_version()?;
    crate::read::require_primary("forget ingested files")?;
    // Read as the caller: row-level security shows it its own ledger rows.
    let mine = ingested::visible(target, path)?;
    let n = security::as_superuser(|| ingested::forget(target, mine))?;
    Ok(n.unwrap_or(0))
}

/// Ask the launcher for a worker in this database once the transaction commits: the
/// last statement of an extension upgrade, so jobs queued under the old version run
/// without waiting for the next `store_ingest`.
#[pg_extern(volatile, schema = "store")]
#[search_path(pg_catalog, pg_temp)]
fn wake() {
    let db = registry::my_database();
    if PRELOADED.load(Ordering::Relaxed) {
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || registry::want(db));
    }
}

/// The live pg_store processes, for the `store.workers` view: pid, kind (launcher,
/// worker, inserter), database, whether it works on a job, the job, and since when
/// (seconds since the epoch) it does what it does. A role with the privileges of
/// pg_read_all_stats sees every process; any other role the launcher, this database's
/// idle workers and the processes working on jobs it may see (its own).
#[pg_extern(volatile, schema = "store")]
#[search_path(pg_catalog, pg_temp)]
fn worker_list() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(kind, String),
        name!(database, pg_sys::Oid),
        name!(busy, bool),
        name!(job, Option<i64>),
        name!(since, f64),
    ),
> {
    worker_rows().map(TableIterator::new).unwrap_or_else(|e| e.raise())
}

type WorkerRow = (i32, String, pg_sys::Oid, bool, Option<i64>, f64);

fn worker_rows() -> Result<std::vec::IntoIter<WorkerRow>> {
    let procs = if PRELOADED.load(Ordering::Relaxed) { registry::procs() } else { Vec::new() };
    let here = registry::my_database();
    // SAFETY: a catalog look-up for the role running this function.
    let stats = unsafe {
        pg_sys::has_privs_of_role(security::executing_role(), pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS))
    };
    let mut rows = Vec::with_capacity(procs.len());
    for p in procs {
        let visible = match p.job {
            0 => true,
            j if p.database == here => jobs::visible(j)?,
            _ => false,
        };
        // As pg_stat_activity: other roles' work, and other databases', only to roles
        // with the privileges of pg_read_all_stats. The launcher and idle workers of this
        // database are no one's.
        let shown = stats || p.kind == registry::Kind::Launcher || (p.database == here && visible);
        if shown {
            let job = (p.job != 0 && (stats || visible)).then_some(p.job);
            rows.push((p.pid, p.kind.as_str().to_string(), pg_sys::Oid::from(p.database), p.job != 0, job, p.since));
        }
    }
    Ok(rows.into_iter())
}

/// `store.cancel`: ask a job to stop. A queued job is cancelled at once; a running one
/// within a second or a batch. A role may cancel the jobs it sees: its own (or those of
/// a role whose privileges it has); a superuser any.
#[pg_extern(volatile, schema = "store", name = "cancel")]
#[search_path(pg_catalog, pg_temp)]
fn store_cancel(job: Option<i64>) -> bool {
    required(job, "store.cancel", "job").and_then(cancel).unwrap_or_else(|e| e.raise())
}

fn cancel(job: i64) -> Result<bool> {
    require_current_version()?;
    crate::read::require_primary("cancel a job")?;
    // Read as the caller: row-level security hides other roles' jobs (and the role test
    // holds for a role that bypasses it).
    if !jobs::visible(job)? {
        return Err(StoreError::refused(ERRCODE_UNDEFINED_OBJECT, format!("no pg_store job {job}")));
    }
    let was = security::as_superuser(|| jobs::request_cancel(job))?;
    if was.as_deref() == Some("running") && PRELOADED.load(Ordering::Relaxed) {
        // The worker looks at cancel_requested between batches; a batch waiting on a
        // lock, or stuck in a trigger of the target, would not get there. Once this
        // transaction commits (so the worker can see why), interrupt it as
        // pg_cancel_backend would, but by SIGUSR2 (crate::signals): a statement that
        // catches the cancel ends its process 10 s later. The worker then ends the job
        // as cancelled (or the next one to claim it does, crate::tables::jobs::Job::load).
        // Which processes is decided then, not now: one that works on the job now may
        // have exited by the commit, and its PID been given to an unrelated process.
        // A cancel a rollback to a savepoint undid signals nothing: the grace would end a
        // worker nobody asked to stop.
        let db = registry::my_database();
        let live = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        // SAFETY: reads the current transaction's state.
        let mine = unsafe { pg_sys::GetCurrentSubTransactionId() };
        let undone = live.clone();
        pgrx::register_subxact_callback(pgrx::PgSubXactCallbackEvent::AbortSub, move |aborted, _| {
            // Subtransaction ids only grow: one aborted at or below this call's is this
            // call's or an ancestor's that took it along.
            if mine >= aborted {
                undone.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        });
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            if live.load(std::sync::atomic::Ordering::Relaxed) {
                registry::signal_job(db, job, libc::SIGUSR2);
            }
        });
        // Its signal would go at this session's next commit, not at COMMIT PREPARED.
        refuse_prepare("store.cancel on a running job");
    }
    Ok(was.is_some())
}

/// The transaction that called `what` cannot be prepared: what it arranged for its commit
/// would happen at the session's next one, not at `COMMIT PREPARED`.
fn refuse_prepare(what: &'static str) {
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::PrePrepare, move || {
        StoreError::refused(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("a transaction that called {what} cannot be prepared (PREPARE TRANSACTION)"),
        )
        .raise()
    });
}

/// Poll the job's status row with a fresh snapshot each time (READ COMMITTED).
fn wait_job(job: i64, timeout: Option<pgrx::datum::Interval>) -> Result<String> {
    require_current_version()?;
    // SAFETY: reads a backend global.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(StoreError::refused(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "store.wait needs READ COMMITTED isolation: a snapshot would never see the job progress",
        ));
    }
    if timeout.as_ref().is_some_and(|t| t.as_micros() < 0) {
        return Err(StoreError::refused(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "store.wait: the timeout must not be negative",
        )
        .with_hint("Pass NULL to wait without a limit, or '0' to look once."));
    }
    let xmin = jobs::xmin(job)?;
    let Some(xmin) = xmin.and_then(|x| x.parse::<u32>().ok()) else {
        return Err(StoreError::refused(ERRCODE_UNDEFINED_OBJECT, format!("no pg_store job {job}")));
    };
    // SAFETY: plain lookup of a transaction id against this backend's own.
    if unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin)) } {
        return Err(StoreError::refused(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("job {job} was queued by this transaction and cannot start before it commits"))
            .with_hint("Call store.ingest and store.wait in separate transactions, e.g. SELECT store.ingest(...) AS job \\gset then SELECT * FROM store.wait(:job)."));
    }
    let limit = timeout.map(|t| Duration::from_micros(t.as_micros() as u64));
    let started = Instant::now();
    let mut last_notice = Instant::now();
    loop {
        let s = crate::read::fresh(|| jobs::status(job))?;
        if matches!(s.state.as_str(), "done" | "partial" | "failed" | "cancelled") {
            return Ok(s.state);
        }
        refuse_waiting_on_a_standby(job)?;
        if limit.is_some_and(|l| started.elapsed() >= l) {
            let why = crate::read::fresh(|| jobs::waiting_for(job))?.map(|w| format!(": {w}")).unwrap_or_default();
            pgrx::notice!("store.wait: timed out, job {job} is still {}{why}", s.state);
            return Ok(s.state);
        }
        if last_notice.elapsed() >= Duration::from_secs(3) {
            last_notice = Instant::now();
            pgrx::notice!("{}", progress_line(&s, job, started.elapsed()));
        }
        crate::signals::nap(250);
    }
}

/// On a hot standby, a statement that waits keeps its snapshot, and the job's updates,
/// vacuumed on the primary, conflict with it when replayed: WAL replay stops for
/// `max_standby_streaming_delay` (30 s), then cancels the wait. Unless the standby holds
/// the primary's vacuum back for it (`hot_standby_feedback`), refuse to wait there.
fn refuse_waiting_on_a_standby(job: i64) -> Result<()> {
    // SAFETY: reads shared state and a setting.
    if unsafe { pg_sys::RecoveryInProgress() && !pg_sys::hot_standby_feedback } {
        return Err(StoreError::refused(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("store.wait cannot wait for job {job} on this hot standby: its snapshot would hold back WAL replay"),
        )
        .with_hint("Poll store.status here (each query takes a new snapshot), wait on the primary, or set hot_standby_feedback = on on this standby."));
    }
    Ok(())
}

/// `job 7 [#########-----------]  45.0%  inserting  1.20 GB/2.60 GB  310000 rows  310000 rows/s  ETA 0:42`
fn progress_line(s: &Status, job: i64, waited: Duration) -> String {
    let pct = s.percent;
    let filled = ((pct / 5.0).round() as usize).min(20);
    let bar: String = "#".repeat(filled) + &"-".repeat(20 - filled);
    let eta = if pct > 1.0 && pct < 100.0 {
        let secs = waited.as_secs_f64() * (100.0 - pct) / pct;
        format!("ETA {}:{:02}", (secs / 60.0) as u64, secs as u64 % 60)
    } else {
        "ETA ?".into()
    };
    let gb = |b: i64| format!("{:.2} GB", b as f64 / 1e9);
    let phase = if s.phase.is_empty() { &s.state } else { &s.phase };
    format!(
        "job {job} [{bar}] {pct:5.1}%  {phase}  {}/{}  {} rows  {:.0} rows/s  {eta}",
        gb(s.read),
        gb(s.total),
        s.rows,
        s.rate
    )
}
