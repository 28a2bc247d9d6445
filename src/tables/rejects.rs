//! `store.rejects`: the lines a job could not take, with where they were and why.

use pgrx::prelude::*;

use crate::error::Result;

/// Forget the job's rejects: every attempt that reads its files again reports every
/// reject again.
pub fn forget(job: i64) -> Result<()> {
    Ok(Spi::run_with_args("DELETE FROM store.rejects WHERE job = $1", &[job.into()])?)
}

/// Store rejects (as columns), if claim `claim` still holds the job; a reject already
/// stored is kept.
pub fn insert(
    job: i64,
    claim: i32,
    files: Vec<&str>,
    lines: Vec<i64>,
    offsets: Vec<i64>,
    reasons: Vec<&str>,
    raws: Vec<&[u8]>,
) -> Result<()> {
    Ok(Spi::run_with_args(
        "INSERT INTO store.rejects (job, file, line, byte_offset, reason, raw) \
         SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::bytea[]) \
         WHERE EXISTS (SELECT FROM store.jobs WHERE id = $1 AND attempts = $7) ON CONFLICT DO NOTHING",
        &[job.into(), files.into(), lines.into(), offsets.into(), reasons.into(), raws.into(), claim.into()],
    )?)
}

/// Delete up to `limit` of the job's rejects: how many.
pub fn delete_some(job: i64, limit: i64) -> Result<i64> {
    Ok(Spi::get_one_with_args::<i64>(
        "WITH d AS (DELETE FROM store.rejects WHERE (job, file, line) IN \
           (SELECT job, file, line FROM store.rejects WHERE job = $1 LIMIT $2) RETURNING 1) \
         SELECT pg_catalog.count(*) FROM d",
        &[job.into(), limit.into()],
    )?
    .unwrap_or(0))
}
