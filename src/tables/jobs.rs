//! `store.jobs`: a job's row — queued, claimed, reported on, ended, purged — and its
//! cancel flag; and the `store.status` view over it, as `store_wait` and the end-of-job
//! LOG line read it.

use pgrx::datum::Interval;
use pgrx::prelude::*;
use store_engine::Dedup;

use crate::error::{Result, StoreError};
use crate::txn::transaction;

/// The states a job can be purged in.
const ENDED: &str = "('done', 'partial', 'failed', 'cancelled')";

/// Whether `store_cancel` asked job `id` to stop (in the caller's transaction).
pub fn cancel_flag(id: i64) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>("SELECT cancel_requested FROM store.jobs WHERE id = $1", &[id.into()])?
        .unwrap_or(false))
}

/// Whether `store_cancel` asked job `id` to stop (in a transaction of its own). A read
/// that fails is made once more: a cancel pending when it began (`store_cancel`'s own
/// signal, come just after a statement it did not end) fails it, and is spent by then.
pub fn cancel_requested(id: i64) -> bool {
    transaction(|| cancel_flag(id)).or_else(|_| transaction(|| cancel_flag(id))).unwrap_or(false)
}

/// A job row, as the worker needs it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    /// The claim number (`attempts`) this worker holds.
    pub claim: i32,
    pub path: String,
    pub target: pg_sys::Oid,
    pub column: String,
    pub key_column: Option<String>,
    pub dedup: Dedup,
    pub filter: Option<String>,
    pub owner: pg_sys::Oid,
}

impl Job {
    /// Job `id` as claim `claim` runs it; [`StoreError::Cancelled`] if `store_cancel` asked
    /// it to stop: a claim after a process the cancel's grace ended (a target's code that
    /// caught the cancel, `crate::signals`) must not run that code again.
    pub fn load(id: i64, claim: i32) -> Result<Job> {
        transaction(|| {
            let job = Spi::connect(|c| {
                let t = c.select(
                    "SELECT path, target::pg_catalog.oid, column_name::text, dedup, filter, owner::pg_catalog.oid, key_column::text, \
                            cancel_requested FROM store.jobs WHERE id = $1",
                    Some(1),
                    &[id.into()],
                )?;
                let r = t.first();
                Ok::<_, pgrx::spi::SpiError>((
                    r.get::<String>(1)?,
                    r.get::<pg_sys::Oid>(2)?,
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<String>(5)?,
                    r.get::<pg_sys::Oid>(6)?,
                    r.get::<String>(7)?,
                    r.get::<bool>(8)?,
                ))
            })?;
            let (Some(path), Some(target), Some(column), Some(dedup), filter, Some(owner), key_column, cancel) = job
            else {
                return Err(StoreError::internal(format!("job {id} has no row")));
            };
            if cancel == Some(true) {
                return Err(StoreError::Cancelled);
            }
            let dedup = dedup.parse::<Dedup>()?;
            Ok(Job { id, claim, path, target, column, key_column, dedup, filter, owner })
        })
    }
}

// ---- The SQL functions (as the caller, or as the bootstrap superuser where they say) ----

/// Queue a job: its id. The caller runs it as the bootstrap superuser, after every check.
pub fn queue(
    path: &str,
    target: pg_sys::Oid,
    column: &str,
    dedup: &str,
    filter: Option<&str>,
    owner: pg_sys::Oid,
    key_column: Option<&str>,
) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        "INSERT INTO store.jobs (path, target, column_name, dedup, filter, owner, key_column) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        &[path.into(), target.into(), column.into(), dedup.into(), filter.into(), owner.into(), key_column.into()],
    )?)
}

/// Whether the caller sees job `id`: row-level security hides other roles' jobs, and
/// the role test holds for a role that bypasses it. Read-only ([`crate::read::one`]).
pub fn visible(id: i64) -> Result<bool> {
    Ok(crate::read::one::<bool>(
        "SELECT EXISTS (SELECT FROM store.jobs WHERE id = $1 AND pg_catalog.pg_has_role(owner, 'USAGE'))",
        &[id.into()],
    )?
    .unwrap_or(false))
}

/// Ask job `id` to stop: a queued job is cancelled at once, a running one flagged. The
/// state it was in (`None`: it had ended, or is gone). As the bootstrap superuser.
pub fn request_cancel(id: i64) -> Result<Option<String>> {
    Ok(Spi::get_one_with_args::<String>(
        "WITH old AS (SELECT state FROM store.jobs WHERE id = $1 AND state IN ('queued', 'running') FOR NO KEY UPDATE), \
              c AS (UPDATE store.jobs j SET cancel_requested = true, \
                      state = CASE WHEN j.state = 'queued' THEN 'cancelled' ELSE j.state END, \
                      finished_at = CASE WHEN j.state = 'queued' THEN pg_catalog.now() ELSE j.finished_at END, \
                      updated_at = pg_catalog.now() \
                    FROM old WHERE j.id = $1 RETURNING old.state) \
         SELECT (SELECT state FROM c)",
        &[id.into()],
    )?)
}

/// The transaction that queued job `id` (`xmin` of its row), if the caller sees it.
pub fn xmin(id: i64) -> Result<Option<String>> {
    crate::read::one::<String>("SELECT (SELECT xmin::text FROM store.jobs WHERE id = $1)", &[id.into()])
}

/// One `store.status` row as `store_wait` reports it.
pub struct Status {
    pub state: String,
    pub phase: String,
    pub percent: f64,
    pub read: i64,
    pub total: i64,
    pub rows: i64,
    pub rate: f64,
}

/// Job `id`'s row of the `store.status` view (over `store.jobs`), as the caller sees it.
pub fn status(id: i64) -> Result<Status> {
    Ok(Spi::connect(|c| {
        let t = c.select(
            "SELECT state, coalesce(phase, ''), percent::float8, bytes_read, bytes_total, inserted + already_present, \
                    coalesce(rows_per_second, 0)::float8 \
             FROM store.status WHERE id = $1",
            Some(1),
            &[id.into()],
        )?;
        let r = t.first();
        Ok::<_, pgrx::spi::SpiError>(Status {
            state: r.get::<String>(1)?.unwrap_or_default(),
            phase: r.get::<String>(2)?.unwrap_or_default(),
            percent: r.get::<f64>(3)?.unwrap_or(0.0),
            read: r.get::<i64>(4)?.unwrap_or(0),
            total: r.get::<i64>(5)?.unwrap_or(0),
            rows: r.get::<i64>(6)?.unwrap_or(0),
            rate: r.get::<f64>(7)?.unwrap_or(0.0),
        })
    })?)
}

/// What job `id` waits for, as `store.status.waiting_for` says (for the caller).
pub fn waiting_for(id: i64) -> Result<Option<String>> {
    Ok(Spi::get_one_with_args::<String>("SELECT waiting_for FROM store.status WHERE id = $1", &[id.into()])?)
}

/// The ended jobs the caller sees (row-level security hides other roles' jobs, and the
/// role test holds for a role that bypasses it) that ended more than `older_than` ago.
pub fn visible_ended_before(older_than: Interval) -> Result<Vec<i64>> {
    Ok(Spi::get_one_with_args::<Vec<i64>>(
        &format!(
            "SELECT coalesce(pg_catalog.array_agg(id), '{{}}') FROM store.jobs \
             WHERE state IN {ENDED} AND finished_at < pg_catalog.now() - $1 \
               AND pg_catalog.pg_has_role(owner, 'USAGE')"
        ),
        &[older_than.into()],
    )?
    .unwrap_or_default())
}

/// Delete those of `ids` that are still ended (files and checkpoints go with them,
/// `ON DELETE CASCADE`): how many. As the bootstrap superuser.
pub fn delete_ended(ids: Vec<i64>) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        &format!(
            "WITH d AS (DELETE FROM store.jobs WHERE id = ANY($1) AND state IN {ENDED} RETURNING 1) \
             SELECT pg_catalog.count(*) FROM d"
        ),
        &[ids.into()],
    )?)
}

// ---- The worker: claims, ends, housekeeping ----

/// Open jobs, fairest first: owners with fewer running jobs, then the oldest; at most
/// `limit`.
pub fn claim_candidates(limit: i64) -> Result<Vec<i64>> {
    Ok(Spi::connect(|c| {
        let t = c.select(
            "SELECT j.id FROM store.jobs j WHERE j.state IN ('queued', 'running') \
             ORDER BY (SELECT pg_catalog.count(*) FROM store.jobs r WHERE r.state = 'running' AND r.owner = j.owner), j.id \
             LIMIT $1",
            None,
            &[limit.into()],
        )?;
        t.map(|r| r.get::<i64>(1).map(Option::unwrap_or_default)).collect::<Result<Vec<_>, _>>()
    })?)
}

/// Lock job `id`'s row if it is open and no one else holds it (`FOR UPDATE SKIP
/// LOCKED`: only that row): its id if locked, its claim count, and whether
/// `store_cancel` asked it to stop.
pub fn lock_open(id: i64) -> Result<(Option<i64>, Option<i32>, Option<bool>)> {
    Ok(Spi::get_three_with_args::<i64, i32, bool>(
        "SELECT (SELECT id FROM store.jobs WHERE id = $1 AND state IN ('queued', 'running') FOR UPDATE SKIP LOCKED), \
                (SELECT attempts - stops FROM store.jobs WHERE id = $1), \
                (SELECT cancel_requested FROM store.jobs WHERE id = $1)",
        &[id.into()],
    )?)
}

/// Job `id`, which `store_cancel` asked to stop and whose last claim's process is gone
/// (the cancel's grace ended it), ends `cancelled`, without another claim.
pub fn end_cancelled(id: i64) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET state = 'cancelled', finished_at = pg_catalog.now(), updated_at = pg_catalog.now() \
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[id.into()],
    )?)
}

/// Whether job `id` is running under claim `claim` and was not asked to stop.
pub fn runs_under(id: i64, claim: i32) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM store.jobs WHERE id = $1 AND attempts = $2 AND state = 'running' AND NOT cancel_requested)",
        &[id.into(), claim.into()],
    )?
    .unwrap_or(false))
}

/// Claim `claim` of job `id` ended with its worker asked to stop (a shutdown): not an
/// attempt that counts against `store.max_attempts`.
pub fn stopped(id: i64, claim: i32) -> Result<Option<i32>> {
    Ok(Spi::get_one_with_args::<i32>(
        "UPDATE store.jobs SET stops = stops + 1 WHERE id = $1 AND attempts = $2 AND state = 'running' RETURNING stops",
        &[id.into(), claim.into()],
    )?)
}

/// Job `id` fails with `error` (SQLSTATE `sqlstate`), whoever holds it.
pub fn fail(id: i64, error: String, sqlstate: String) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET state = 'failed', error = $2, sqlstate = $3, finished_at = pg_catalog.now(), \
         updated_at = pg_catalog.now() WHERE id = $1",
        &[id.into(), error.into(), sqlstate.into()],
    )?)
}

/// Claim job `id` (its row locked): running, with the next claim number, which it
/// returns (`None`: the row is gone).
pub fn start_attempt(id: i64) -> Result<Option<i32>> {
    Ok(Spi::get_one_with_args::<i32>(
        "UPDATE store.jobs SET state = 'running', attempts = attempts + 1, worker_pid = pg_catalog.pg_backend_pid(), \
         started_at = coalesce(started_at, pg_catalog.now()), updated_at = pg_catalog.now(), error = NULL, sqlstate = NULL, \
         insert_started_at = NULL \
         WHERE id = $1 RETURNING attempts",
        &[id.into()],
    )?)
}

/// Whether jobs besides `id` wait in this database.
pub fn more_queued(id: i64) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM store.jobs WHERE state = 'queued' AND id <> $1)",
        &[id.into()],
    )?
    .unwrap_or(false))
}

/// Whether a job waits in this database.
pub fn any_queued() -> Result<bool> {
    Ok(Spi::get_one::<bool>("SELECT EXISTS (SELECT FROM store.jobs WHERE state = 'queued')")?.unwrap_or(false))
}

/// Fail the open jobs that were queued in another cluster or database (their `origin`
/// is not this one's) with SQLSTATE `sqlstate`: how many.
pub fn fail_restored(sqlstate: String) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        "WITH f AS (UPDATE store.jobs SET state = 'failed', sqlstate = $1, \
             error = 'queued in another cluster or database (' || origin || '), restored or copied here: run store_ingest again', \
             finished_at = pg_catalog.now(), updated_at = pg_catalog.now() \
           WHERE state IN ('queued', 'running') AND origin <> store.origin() RETURNING 1) \
         SELECT pg_catalog.count(*) FROM f",
        &[sqlstate.into()],
    )?)
}

/// Those of `ids` that are queued or running.
pub fn open_among(ids: Vec<i64>) -> Result<Option<Vec<i64>>> {
    Ok(Spi::get_one_with_args::<Vec<i64>>(
        "SELECT coalesce(pg_catalog.array_agg(id), '{}') FROM store.jobs WHERE id = ANY($1) AND state IN ('queued', 'running')",
        &[ids.into()],
    )?)
}

/// Job `id` ended `state` (cancelled or failed, with its error), if claim `claim` still
/// holds it.
pub fn end(id: i64, claim: i32, state: &str, error: Option<String>, sqlstate: Option<String>) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET state = $3, error = $4, sqlstate = $5, finished_at = pg_catalog.now(), updated_at = pg_catalog.now() \
         WHERE id = $1 AND attempts = $2",
        &[id.into(), claim.into(), state.into(), error.into(), sqlstate.into()],
    )?)
}

/// The LOG line of a job that ended (from `store.status`); `None` while it is open.
pub fn end_line(id: i64) -> Result<Option<String>> {
    Ok(Spi::get_one_with_args::<String>(
        "SELECT (SELECT pg_catalog.format('pg_store job %s %s: %s files read, %s skipped, %s failed; %s records, %s inserted, \
                %s already present, %s duplicates, %s rejected, %s filtered; %s s, %s attempts%s%s', \
                id, state, files_done, files_skipped, files_failed, records, inserted, already_present, duplicates, \
                rejected, filtered, round(extract(epoch FROM finished_at - coalesce(started_at, created_at)), 1), \
                attempts, CASE WHEN stops > 0 THEN pg_catalog.format(' (%s of them stopped by SIGTERM: a shutdown, a restart or pg_terminate_backend)', stops) END, \
                ', SQLSTATE ' || sqlstate) \
         FROM store.status WHERE id = $1 AND state NOT IN ('queued', 'running'))",
        &[id.into()],
    )?)
}

/// Up to `limit` jobs that ended more than `minutes` ago, oldest first.
pub fn ended_before(minutes: i32, limit: i64) -> Result<Vec<i64>> {
    Ok(Spi::get_one_with_args::<Vec<i64>>(
        &format!(
            "SELECT coalesce(pg_catalog.array_agg(id ORDER BY id), '{{}}') FROM (SELECT id FROM store.jobs \
             WHERE state IN {ENDED} AND finished_at < pg_catalog.now() - pg_catalog.make_interval(mins => $1) \
             ORDER BY id LIMIT $2) j"
        ),
        &[minutes.into(), limit.into()],
    )?
    .unwrap_or_default())
}

/// Delete job `id` if it is still ended (files and checkpoints go with it, `ON DELETE
/// CASCADE`).
pub fn delete_if_ended(id: i64) -> Result<()> {
    Ok(Spi::run_with_args(&format!("DELETE FROM store.jobs WHERE id = $1 AND state IN {ENDED}"), &[id.into()])?)
}

// ---- A running job (the claim number fences every write to its row) ----

/// What the plan of an attempt found: files listed, skipped as already ingested, failed,
/// and the bytes to read; the scan begins.
pub fn record_listing(id: i64, files: i64, skipped: i64, failed: i64, bytes: i64) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET files_total = $2, files_skipped = $3, files_failed = $4, bytes_total = $5, phase = 'scanning', updated_at = pg_catalog.now() \
         WHERE id = $1",
        &[id.into(), files.into(), skipped.into(), failed.into(), bytes.into()],
    )?)
}

/// The stream starts over: one more merge restart, and its key ranges undecided.
pub fn count_restart(id: i64) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET merge_restarts = merge_restarts + 1, ranges = 0 WHERE id = $1",
        &[id.into()],
    )?)
}

/// How many key ranges the job's stream was split into (0: not yet).
pub fn ranges(id: i64) -> Result<i32> {
    Ok(Spi::get_one_with_args::<i32>("SELECT ranges FROM store.jobs WHERE id = $1", &[id.into()])?.unwrap_or(0))
}

/// Record that the job's stream is split into `n` key ranges.
pub fn set_ranges(id: i64, n: i32) -> Result<()> {
    Ok(Spi::run_with_args("UPDATE store.jobs SET ranges = $2 WHERE id = $1", &[id.into(), n.into()])?)
}

/// The leader's counters, as [`write_status`] stores them.
pub struct Counters<'a> {
    pub phase: &'a str,
    pub files_done: i64,
    pub bytes_read: i64,
    pub records: i64,
    pub empty: i64,
    pub rejected: i64,
    pub filtered: i64,
    pub duplicates: i64,
    /// The share done while scanning (0 to 60).
    pub scan_percent: f32,
    pub batch_size: i32,
    pub memory_peak: i64,
    pub temp_bytes: i64,
    /// Records the merge is expected to hand over.
    pub insert_total: i64,
}

/// Write the job's counters under claim `claim`: `cancel_requested`, or
/// [`StoreError::Fenced`] when another worker holds the job now. While inserting, the
/// share done is what every range committed together.
pub fn write_status(id: i64, claim: i32, c: &Counters<'_>) -> Result<bool> {
    let cancel = Spi::get_one_with_args::<bool>(
        "UPDATE store.jobs SET phase = $2, files_done = $3, bytes_read = $4, records = $5, empty = $6, rejected = $7, \
         filtered = $8, duplicates = $9, batch_size = $11, memory_peak = greatest(memory_peak, $12), \
         percent = CASE WHEN $2 IN ('merging', 'inserting') THEN 60 + 40 * least(1, \
             (SELECT pg_catalog.sum(inserted + already_present) FROM store.checkpoints WHERE job = $1)::float8 / greatest($15, 1)) \
           WHEN $2 = 'done' THEN 100 ELSE $10 END, \
         temp_bytes = greatest(coalesce(temp_bytes, 0), $13), updated_at = pg_catalog.now() \
         WHERE id = $1 AND attempts = $14 RETURNING cancel_requested",
        &[
            id.into(),
            c.phase.into(),
            c.files_done.into(),
            c.bytes_read.into(),
            c.records.into(),
            c.empty.into(),
            c.rejected.into(),
            c.filtered.into(),
            c.duplicates.into(),
            c.scan_percent.into(),
            c.batch_size.into(),
            c.memory_peak.into(),
            c.temp_bytes.into(),
            claim.into(),
            c.insert_total.into(),
        ],
    )?;
    // No row: another worker holds the job now.
    cancel.ok_or(StoreError::Fenced)
}

/// Inserting began now, with the lines earlier attempts committed: the status's rate
/// counts this attempt's own.
pub fn mark_insert_started(id: i64) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.jobs SET insert_started_at = pg_catalog.now(), \
           insert_rows_before = coalesce((SELECT pg_catalog.sum(inserted + already_present) \
                                            FROM store.checkpoints WHERE job = $1), 0) \
         WHERE id = $1",
        &[id.into()],
    )?)
}

/// End job `id` under claim `claim`: `partial` if some file failed, else `done`; with
/// its file counts (from `store.files`) and the Bloom filter's estimate. The state
/// written, or [`StoreError::Fenced`] when another worker holds the job now.
pub fn finish(id: i64, claim: i32, estimated_false_drops: Option<f64>) -> Result<String> {
    let state = Spi::get_one_with_args::<String>(
        "UPDATE store.jobs SET state = CASE WHEN EXISTS (SELECT FROM store.files WHERE job = $1 AND state = 'failed') THEN 'partial' ELSE 'done' END, \
           phase = 'done', percent = 100, finished_at = pg_catalog.now(), updated_at = pg_catalog.now(), estimated_false_drops = $3, \
           files_done = files_total, files_failed = (SELECT pg_catalog.count(*) FROM store.files WHERE job = $1 AND state = 'failed') \
         WHERE id = $1 AND attempts = $2 RETURNING state",
        &[id.into(), claim.into(), estimated_false_drops.into()],
    )?;
    state.ok_or(StoreError::Fenced)
}
