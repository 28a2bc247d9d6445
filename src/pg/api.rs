//! The SQL surface: `store_ingest` (through `store.enqueue`), `store_cancel`,
//! `store.wait_job` (behind `store_wait`) and `store.line_key`. Each validates and
//! queues; the work itself happens in the background workers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgLogLevel;

use super::{gucs, paths, PRELOADED};
use crate::engine::filter::Filter;

extension_sql_file!("../../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../../sql/finalize.sql", name = "finalize", finalize);

/// Raise an ERROR with a SQLSTATE, a message and an optional hint.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<String>) -> ! {
    let mut r = ErrorReport::new(code, message.into(), "pg_store");
    if let Some(h) = hint {
        r = r.set_hint(h);
    }
    r.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

fn code_of(sqlstate: &str) -> PgSqlErrorCode {
    match sqlstate {
        "42501" => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        "58P01" => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
        "22023" => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        _ => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
    }
}

/// The role outside any SECURITY DEFINER function: who really called us.
fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

fn spi_bool(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> bool {
    Spi::get_one_with_args::<bool>(sql, args).unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), None)).unwrap_or(false)
}

#[pg_schema]
mod store {
    use pgrx::prelude::*;

    /// The unique key of a line: its bytes up to 2,000 bytes, else 0xFF + SHA-256.
    #[pg_extern(immutable, strict, parallel_safe)]
    fn line_key(line: &str) -> Vec<u8> {
        crate::pg::insert::line_key(line.as_bytes())
    }

    /// Validate and queue an ingest job; `store_ingest` is the SQL face of this.
    #[pg_extern(security_definer, volatile)]
    #[search_path(pg_catalog)]
    fn enqueue(path: &str, target: pg_sys::Oid, column_name: &str, dedup: &str, filter: Option<&str>) -> i64 {
        super::enqueue(path, target, column_name, dedup, filter)
    }

    /// Block until `job` ends (or `timeout` passes), with a progress NOTICE every few
    /// seconds. Returns the job's state.
    #[pg_extern(security_definer, volatile)]
    #[search_path(pg_catalog)]
    fn wait_job(job: i64, timeout: Option<pgrx::datum::Interval>) -> String {
        super::wait_job(job, timeout)
    }
}

fn enqueue(path: &str, target: pg_sys::Oid, column: &str, dedup: &str, filter: Option<&str>) -> i64 {
    if !PRELOADED.load(Ordering::Relaxed) {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_store is not loaded through shared_preload_libraries",
            Some("Add pg_store to shared_preload_libraries in postgresql.conf and restart PostgreSQL: the background workers that run jobs start only then.".into()),
        );
    }
    if gucs::WORKERS.get() == 0 {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "store.workers is 0: no worker would run this job", None);
    }
    let db = gucs::database();
    let here = Spi::get_one::<String>("SELECT current_database()::text").ok().flatten().unwrap_or_default();
    if here != db {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("store_ingest must be called in database \"{db}\", not \"{here}\""),
            Some("The pg_store workers serve the database named by store.database.".into()),
        );
    }
    let who = caller();
    if !spi_bool("SELECT pg_has_role($1, 'pg_read_server_files', 'USAGE')", &[who.into()]) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to ingest server files",
            Some("As for COPY FROM a file: only superusers and roles with the privileges of pg_read_server_files may call store_ingest.".into()),
        );
    }
    let canon = paths::check(path, &gucs::allowed_dirs()).unwrap_or_else(|r| raise(code_of(r.sqlstate), r.message, r.hint));
    check_target(who, target, column);
    if dedup != "exact" && dedup != "bloom" {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("dedup must be 'exact' or 'bloom', not '{dedup}'"), None);
    }
    if let Some(f) = filter {
        if let Err(e) = Filter::parse(f) {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string(), Some("A filter is a regular expression, or include=RE;exclude=RE;min_len=N;max_len=N.".into()));
        }
    }
    let canon = canon.to_string_lossy().into_owned();
    Spi::get_one_with_args::<i64>(
        "INSERT INTO store.jobs (path, target, column_name, dedup, filter, owner) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        &[canon.as_str().into(), target.into(), column.into(), dedup.into(), filter.into(), who.into()],
    )
    .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), None))
    .expect("RETURNING id")
}

/// The target must be a table, `column` a text column of it with a unique index (on
/// the column or on `store.line_key(column)`), and the caller must be allowed to insert.
fn check_target(who: pg_sys::Oid, target: pg_sys::Oid, column: &str) {
    let row = Spi::get_three_with_args::<String, pg_sys::Oid, i16>(
        "SELECT c.relkind::text, a.atttypid, a.attnum FROM pg_class c \
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.oid = $1",
        &[target.into(), column.into()],
    );
    let (kind, typ, attnum) = match row {
        Ok((Some(k), t, n)) => (k, t, n),
        _ => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("target relation with OID {} does not exist", target.to_u32()), None),
    };
    let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[target.into()]).ok().flatten().unwrap_or_default();
    if kind != "r" && kind != "p" {
        raise(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("target \"{name}\" is not a table"), None);
    }
    if spi_bool("SELECT relpersistence = 't' FROM pg_class WHERE oid = $1", &[target.into()]) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("target \"{name}\" is a temporary table"),
            Some("A background worker inserts the lines, and it cannot see this session's temporary tables: use an ordinary or UNLOGGED table.".into()),
        );
    }
    let Some(attnum) = attnum else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN, format!("column \"{column}\" of relation \"{name}\" does not exist"), None)
    };
    if !matches!(typ.map(|t| t.to_u32()), Some(25) | Some(1043)) {
        raise(PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH, format!("column \"{column}\" of \"{name}\" must be of type text"), None);
    }
    let unique = spi_bool(
        "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid \
           AND i.indpred IS NULL AND i.indnkeyatts = 1 \
           AND (i.indkey[0] = $3 OR (i.indkey[0] = 0 AND pg_get_indexdef(i.indexrelid, 1, false) \
                IN (format('store.line_key(%I)', $2::text), format('line_key(%I)', $2::text)))))",
        &[target.into(), column.into(), attnum.into()],
    );
    if !unique {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("\"{name}\" has no unique index on column \"{column}\""),
            Some(format!(
                "pg_store deduplicates against what the table holds through a unique index: CREATE UNIQUE INDEX ON {name} ({col}), \
                 or, for lines longer than about 2,000 bytes, CREATE UNIQUE INDEX ON {name} (store.line_key({col})).",
                col = spi::quote_identifier(column)
            )),
        );
    }
    if !spi_bool("SELECT has_column_privilege($1, $2, $3, 'INSERT')", &[who.into(), target.into(), column.into()]) {
        raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("permission denied to insert into \"{name}\".\"{column}\""), None);
    }
}

/// `store_cancel`: ask a job to stop. A queued job is cancelled at once; a running one
/// within a second or a batch. Only the job's owner (or a role with its privileges, or
/// a superuser) may cancel it.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog)]
fn store_cancel(job: i64) -> bool {
    let owner = Spi::get_one_with_args::<pg_sys::Oid>("SELECT (SELECT owner FROM store.jobs WHERE id = $1)", &[job.into()]).ok().flatten();
    let Some(owner) = owner else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no pg_store job {job}"), None)
    };
    if !spi_bool("SELECT pg_has_role($1, $2, 'USAGE')", &[caller().into(), owner.into()]) {
        raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("permission denied to cancel job {job}"), Some("Only the role that queued a job, or a superuser, may cancel it.".into()));
    }
    let changed = Spi::get_one_with_args::<i64>(
        "WITH c AS (UPDATE store.jobs SET cancel_requested = true, \
              state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, \
              finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END, updated_at = now() \
           WHERE id = $1 AND state IN ('queued', 'running') RETURNING 1) SELECT count(*) FROM c",
        &[job.into()],
    );
    matches!(changed, Ok(Some(n)) if n > 0)
}

/// Poll the job's status row with a fresh snapshot each time (READ COMMITTED).
fn wait_job(job: i64, timeout: Option<pgrx::datum::Interval>) -> String {
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        raise(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, "store_wait needs READ COMMITTED isolation: a snapshot would never see the job progress", None);
    }
    let xmin = Spi::get_one_with_args::<String>("SELECT (SELECT xmin::text FROM store.jobs WHERE id = $1)", &[job.into()]).ok().flatten();
    let Some(xmin) = xmin.and_then(|x| x.parse::<u32>().ok()) else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no pg_store job {job}"), None)
    };
    // SAFETY: plain lookup of a transaction id against this backend's own.
    if unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin)) } {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("job {job} was queued by this transaction and cannot start before it commits"),
            Some("Call store_ingest and store_wait in separate transactions, e.g. SELECT store_ingest(...) \\gset then SELECT * FROM store_wait(:store_ingest).".into()),
        );
    }
    let limit = timeout.map(|t| Duration::from_micros(t.as_micros().max(0) as u64));
    let started = Instant::now();
    let mut last_notice = Instant::now();
    loop {
        let row = Spi::connect_mut(|c| {
            let t = c.update(
                "SELECT state, coalesce(phase, ''), percent::float8, bytes_read, bytes_total, inserted + already_present, \
                        coalesce(rows_per_second, 0)::float8 \
                 FROM store.status WHERE id = $1",
                Some(1),
                &[job.into()],
            )?;
            let r = t.first();
            Ok::<_, pgrx::spi::SpiError>((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<f64>(3)?.unwrap_or(0.0),
                r.get::<i64>(4)?.unwrap_or(0),
                r.get::<i64>(5)?.unwrap_or(0),
                r.get::<i64>(6)?.unwrap_or(0),
                r.get::<f64>(7)?.unwrap_or(0.0),
            ))
        })
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), None));
        let (state, phase, pct, read, total, rows, rate) = row;
        if matches!(state.as_str(), "done" | "failed" | "cancelled") {
            return state;
        }
        if limit.is_some_and(|l| started.elapsed() >= l) {
            pgrx::notice!("store_wait: timed out, job {job} is still {state}");
            return state;
        }
        if last_notice.elapsed() >= Duration::from_secs(3) {
            last_notice = Instant::now();
            pgrx::notice!("{}", progress_line(job, &state, &phase, pct, read, total, rows, rate, started.elapsed()));
        }
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                250,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

/// `job 7 [#########-----------]  45.0%  inserting  1.2 GB/2.6 GB  310,000 rows/s  ETA 0:42`
#[allow(clippy::too_many_arguments)]
pub fn progress_line(job: i64, state: &str, phase: &str, pct: f64, read: i64, total: i64, rows: i64, rate: f64, waited: Duration) -> String {
    let filled = ((pct / 5.0).round() as usize).min(20);
    let bar: String = "#".repeat(filled) + &"-".repeat(20 - filled);
    let eta = if pct > 1.0 && pct < 100.0 {
        let secs = waited.as_secs_f64() * (100.0 - pct) / pct;
        format!("ETA {}:{:02}", (secs / 60.0) as u64, secs as u64 % 60)
    } else {
        "ETA ?".into()
    };
    let gb = |b: i64| format!("{:.2} GB", b as f64 / 1e9);
    let phase = if phase.is_empty() { state } else { phase };
    format!("job {job} [{bar}] {pct:5.1}%  {phase}  {}/{}  {rows} rows  {rate:.0} rows/s  {eta}", gb(read), gb(total))
}
