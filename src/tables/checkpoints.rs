//! `store.checkpoints`: one row per key range of a job — where its inserts resume, its
//! counts, its error — each carrying the claim number (`attempt`) of the worker that
//! holds the job. A write that must not come from a worker whose claim was taken over
//! matches `attempt` and fails with [`StoreError::Fenced`] when it finds no row.

use pgrx::prelude::*;
use store_engine::KeyRange;

use crate::error::{Result, StoreError};

/// Run a fenced update (`WITH c AS (UPDATE … WHERE … AND attempt = … RETURNING 1) SELECT
/// NOT EXISTS (SELECT FROM c)`): [`StoreError::Fenced`] when it updated nothing.
fn fenced(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Result<()> {
    let fenced = Spi::get_one_with_args::<bool>(sql, args)?;
    if fenced != Some(false) {
        return Err(StoreError::Fenced);
    }
    Ok(())
}

/// The fence, when a worker claims job `job` with claim number `claim`: range 0's row
/// exists, and every range's row carries the new claim, so that a worker still running an
/// older claim of this job finds its claim number gone at its next batch, and stops.
pub fn fence(job: i64, claim: i32) -> Result<()> {
    Spi::run_with_args(
        "INSERT INTO store.checkpoints (job, range, attempt) VALUES ($1, 0, $2) \
         ON CONFLICT (job, range) DO UPDATE SET attempt = excluded.attempt",
        &[job.into(), claim.into()],
    )?;
    Ok(Spi::run_with_args("UPDATE store.checkpoints SET attempt = $2 WHERE job = $1", &[job.into(), claim.into()])?)
}

/// Whether the job's first batches may take the plain path: the target was empty when
/// the job began (decided once, on its first attempt).
pub fn set_fast_path(job: i64, empty: bool) -> Result<()> {
    Ok(Spi::run_with_args("UPDATE store.checkpoints SET fast_path = $2 WHERE job = $1", &[job.into(), empty.into()])?)
}

/// Whether the target was empty when the job began, as its first attempt found it
/// ([`set_fast_path`]): read before the first batch, while range 0's flag still says so.
pub fn target_was_empty(job: i64) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT fast_path FROM store.checkpoints WHERE job = $1 AND range = 0",
        &[job.into()],
    )?
    .unwrap_or(false))
}

/// Whether the stream an earlier attempt checkpointed had the spec `spec`.
pub fn same_spec(job: i64, spec: &str) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT spec IS NOT DISTINCT FROM $2 FROM store.checkpoints WHERE job = $1",
        &[job.into(), spec.into()],
    )?
    .unwrap_or(false))
}

/// Record the spec of the stream this attempt merges.
pub fn set_spec(job: i64, spec: &str) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.checkpoints SET spec = $2 WHERE job = $1 AND range = 0",
        &[job.into(), spec.into()],
    )?)
}

/// The stream starts over: one range, from the start, on the safe path, every counter
/// at zero.
pub fn restart(job: i64) -> Result<()> {
    Spi::run_with_args("DELETE FROM store.checkpoints WHERE job = $1 AND range > 0", &[job.into()])?;
    Ok(Spi::run_with_args(
        "UPDATE store.checkpoints SET last_key = NULL, key_after = NULL, key_upto = NULL, fast_path = false, inserted = 0, \
           already_present = 0, duplicates = 0, done = false, error = NULL, sqlstate = NULL WHERE job = $1",
        &[job.into()],
    )?)
}

/// One key range of a job, as its checkpoint row has it.
#[derive(Debug, Clone)]
pub struct RangeRow {
    pub range: i32,
    pub keys: KeyRange,
    pub done: bool,
}

/// The job's key ranges in order; `only_open`: those not done.
pub fn ranges(job: i64, only_open: bool) -> Result<Vec<RangeRow>> {
    Spi::connect(|c| {
        let t = c.select(
            "SELECT range, key_after, key_upto, done FROM store.checkpoints WHERE job = $1 AND (NOT $2 OR NOT done) ORDER BY range",
            None,
            &[job.into(), only_open.into()],
        )?;
        t.map(|row| {
            Ok(RangeRow {
                range: row.get::<i32>(1)?.unwrap_or(0),
                keys: KeyRange { after: row.get::<String>(2)?, upto: row.get::<String>(3)? },
                done: row.get::<bool>(4)?.unwrap_or(false),
            })
        })
        .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .map_err(StoreError::from)
}

/// Range 0 ends at `upto` (the first of a split), under claim `claim`.
pub fn split_first(job: i64, claim: i32, upto: Option<String>) -> Result<()> {
    fenced(
        "WITH c AS (UPDATE store.checkpoints SET key_after = NULL, key_upto = $3 WHERE job = $1 AND range = 0 AND attempt = $2 RETURNING 1) \
         SELECT NOT EXISTS (SELECT FROM c)",
        &[job.into(), claim.into(), upto.into()],
    )
}

/// Add range `range`, `(after, upto]`, with range 0's claim, spec and path.
pub fn add_range(job: i64, range: i32, after: Option<String>, upto: Option<String>) -> Result<()> {
    Ok(Spi::run_with_args(
        "INSERT INTO store.checkpoints (job, range, attempt, spec, key_after, key_upto, fast_path) \
         SELECT job, $2, attempt, spec, $3, $4, fast_path FROM store.checkpoints WHERE job = $1 AND range = 0",
        &[job.into(), range.into(), after.into(), upto.into()],
    )?)
}

/// The first error a range of the job recorded: its range, message and SQLSTATE.
pub fn first_error(job: i64) -> Result<(Option<i32>, Option<String>, Option<String>)> {
    Ok(Spi::get_three_with_args::<i32, String, String>(
        "SELECT (SELECT range FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1), \
                (SELECT error FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1), \
                (SELECT sqlstate FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1)",
        &[job.into()],
    )?)
}

/// An inserter's range failed with `error` (SQLSTATE `sqlstate`), under claim `claim`.
pub fn record_error(job: i64, range: i32, claim: i32, error: String, sqlstate: String) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.checkpoints SET error = $4, sqlstate = $5 WHERE job = $1 AND range = $2 AND attempt = $3",
        &[job.into(), range.into(), claim.into(), error.into(), sqlstate.into()],
    )?)
}

/// This process takes range `range` under claim `claim`: where it resumes (its last key)
/// and whether it starts on the plain path; [`StoreError::Fenced`] when another worker
/// holds the job now.
pub fn enter(job: i64, range: i32, claim: i32) -> Result<(Option<String>, bool)> {
    let (key, fast) = Spi::get_two_with_args::<String, bool>(
        "SELECT last_key, fast_path FROM store.checkpoints WHERE job = $1 AND range = $2 AND attempt = $3",
        &[job.into(), range.into(), claim.into()],
    )?;
    let Some(fast) = fast else { return Err(StoreError::Fenced) };
    Spi::run_with_args(
        "UPDATE store.checkpoints SET worker_pid = pg_catalog.pg_backend_pid(), error = NULL, sqlstate = NULL \
         WHERE job = $1 AND range = $2",
        &[job.into(), range.into()],
    )?;
    Ok((key, fast))
}

/// What one committed batch adds to its range's checkpoint.
pub struct Batch<'a> {
    /// The key the range resumes after (`None`: the last key stays).
    pub resume_key: Option<&'a str>,
    pub inserted: i64,
    pub present: i64,
    pub size: i32,
    /// The batch went in on the proven plain path.
    pub proven: bool,
    pub duplicates: i64,
}

/// Move range `range`'s checkpoint past a batch, under claim `claim` (in the batch's
/// transaction).
pub fn commit_batch(job: i64, range: i32, claim: i32, b: &Batch<'_>) -> Result<()> {
    fenced(
        "WITH c AS (UPDATE store.checkpoints SET last_key = coalesce($4, last_key), inserted = inserted + $5, \
           already_present = already_present + $6, batches = batches + 1, batch_size = $7, fast_path = $8, \
           duplicates = duplicates + $9, updated_at = pg_catalog.now() \
           WHERE job = $1 AND range = $2 AND attempt = $3 RETURNING 1) SELECT NOT EXISTS (SELECT FROM c)",
        &[
            job.into(),
            range.into(),
            claim.into(),
            b.resume_key.into(),
            b.inserted.into(),
            b.present.into(),
            b.size.into(),
            b.proven.into(),
            b.duplicates.into(),
        ],
    )
}

/// Range `range` is complete, under claim `claim`, with the memory peak of its process.
pub fn range_done(job: i64, range: i32, claim: i32, memory_peak: i64) -> Result<()> {
    fenced(
        "WITH c AS (UPDATE store.checkpoints SET done = true, memory_peak = greatest(memory_peak, $4), \
             updated_at = pg_catalog.now() \
           WHERE job = $1 AND range = $2 AND attempt = $3 RETURNING 1) SELECT NOT EXISTS (SELECT FROM c)",
        &[job.into(), range.into(), claim.into(), memory_peak.into()],
    )
}

/// An inserter's memory peak, in its range's row.
pub fn note_memory(job: i64, range: i32, memory_peak: i64) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.checkpoints SET memory_peak = greatest(memory_peak, $3) WHERE job = $1 AND range = $2",
        &[job.into(), range.into(), memory_peak.into()],
    )?)
}
