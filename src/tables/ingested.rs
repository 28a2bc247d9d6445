//! `store.ingested`: the ledger — the files ingested into each target, with the identity
//! they had and the spec they were read with; a later run skips them.

use pgrx::prelude::*;

use crate::error::Result;

/// The job ends: its files read unchanged (`store.files`, state `done`) enter the ledger
/// of `target`, owned by `owner`, for `spec`.
pub fn record_job(job: i64, target: pg_sys::Oid, owner: pg_sys::Oid, spec: &str) -> Result<()> {
    Ok(Spi::run_with_args(
        "INSERT INTO store.ingested (target, path, spec, size, mtime_ns, ctime_ns, inode, fingerprint, job, owner) \
         SELECT $2, path, $4, size, mtime_ns, ctime_ns, inode, fingerprint, job, $3 FROM store.files WHERE job = $1 AND state = 'done' \
         ON CONFLICT (target, path, spec) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, \
           inode = excluded.inode, fingerprint = excluded.fingerprint, job = excluded.job, owner = excluded.owner, ingested_at = pg_catalog.now()",
        &[job.into(), target.into(), owner.into(), spec.into()],
    )?)
}

/// The ledger rows of `target` the caller sees — `path`, or everything under it; all if
/// `None` — as `[path, spec]` texts. Read as the caller: row-level security shows it its
/// own ledger rows. Read-only ([`crate::read::one`]).
pub fn visible(target: pg_sys::Oid, path: Option<&str>) -> Result<Vec<String>> {
    Ok(crate::read::one::<Vec<String>>(
        "SELECT pg_catalog.array_agg(pg_catalog.json_build_array(path, spec)::pg_catalog.text) FROM store.ingested \
          WHERE target = $1 AND pg_catalog.pg_has_role(owner, 'USAGE') \
            AND ($2::pg_catalog.text IS NULL OR path = $2 OR pg_catalog.starts_with(path, pg_catalog.rtrim($2, '/') || '/'))",
        &[target.into(), path.into()],
    )?
    .unwrap_or_default())
}

/// Forget the ledger rows of `target` among `rows` (as [`visible`] gives them): how many.
/// As the bootstrap superuser.
pub fn forget(target: pg_sys::Oid, rows: Vec<String>) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        "WITH d AS (DELETE FROM store.ingested WHERE target = $1 \
                      AND pg_catalog.json_build_array(path, spec)::pg_catalog.text = ANY ($2) RETURNING 1) \
         SELECT pg_catalog.count(*) FROM d",
        &[target.into(), rows.into()],
    )?)
}
