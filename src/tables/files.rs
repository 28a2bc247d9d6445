//! `store.files`: one row per file (or entry the walk passed over) of a job — pending,
//! read, changed, failed, skipped, done — with its identity and counts.

use pgrx::prelude::*;

use crate::error::Result;

/// A listing as columns for `unnest`: listed files first, then the entries that failed
/// (no identity, an error).
pub struct Columns<'a> {
    pub paths: Vec<String>,
    pub size: Vec<Option<i64>>,
    pub mtime_ns: Vec<Option<i64>>,
    pub ctime_ns: Vec<Option<i64>>,
    pub inode: Vec<Option<i64>>,
    pub fingerprint: Vec<Option<&'a str>>,
    pub error: Vec<Option<&'a str>>,
}

/// What [`record_listing`] found.
pub struct Compared {
    /// Paths the ledger skips, as already ingested.
    pub skipped: Vec<String>,
    /// Entries that failed (now, or vanished since an earlier attempt).
    pub failed: i64,
    /// The listing differs from the one an earlier attempt of this job recorded.
    pub differs: bool,
}

/// Record a job's listing, in one statement: find the files the ledger (`store.ingested`)
/// skips (in it for this target with the same identity; a row 0.1.0 wrote has no ctime
/// or inode, and the rest must match) — they get no row, only a count, so a scheduled
/// run over an unchanged directory adds nothing per file —, upsert every other listed
/// entry as pending or failed, and say whether the listing differs from the one an
/// earlier attempt of this job recorded. Rows of entries the walk skipped (hidden names,
/// links: state skipped, no fingerprint) are not part of that listing.
pub fn record_listing(job: i64, l: Columns<'_>, target: pg_sys::Oid, spec: &str) -> Result<Compared> {
    let row = Spi::connect_mut(|c| {
        let t = c.update(
            "WITH l AS (SELECT DISTINCT ON (path) * \
                          FROM unnest($2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::text[], $8::text[]) \
                          AS l(path, size, mtime_ns, ctime_ns, inode, fingerprint, error) ORDER BY path), \
                  skip AS (SELECT l.path FROM l WHERE l.error IS NULL AND EXISTS (SELECT FROM store.ingested i \
                             WHERE i.target = $9 AND i.path = l.path AND i.size = l.size AND i.mtime_ns = l.mtime_ns \
                               AND coalesce(i.ctime_ns, l.ctime_ns) = l.ctime_ns AND coalesce(i.inode, l.inode) = l.inode \
                               AND i.fingerprint = l.fingerprint AND i.spec = $10)), \
                  todo AS (SELECT * FROM l WHERE path NOT IN (SELECT path FROM skip)), \
                  prev AS (SELECT path, size, mtime_ns, ctime_ns, inode, fingerprint, state FROM store.files \
                           WHERE job = $1 AND NOT (state = 'skipped' AND fingerprint IS NULL)), \
                  up AS (INSERT INTO store.files AS f (job, path, size, mtime, mtime_ns, ctime_ns, inode, fingerprint, state, error) \
                         SELECT $1, l.path, l.size, pg_catalog.to_timestamp(l.mtime_ns / 1e9), l.mtime_ns, l.ctime_ns, l.inode, l.fingerprint, \
                                CASE WHEN l.error IS NOT NULL THEN 'failed' ELSE 'pending' END, l.error \
                         FROM todo l \
                         ON CONFLICT (job, path) DO UPDATE SET size = excluded.size, mtime = excluded.mtime, mtime_ns = excluded.mtime_ns, \
                            ctime_ns = excluded.ctime_ns, inode = excluded.inode, fingerprint = excluded.fingerprint, \
                            state = excluded.state, error = excluded.error, records = NULL, empty = NULL, rejected = NULL, \
                            filtered = NULL, accepted = NULL \
                         WHERE excluded.state <> 'pending' OR f.state NOT IN ('read', 'changed') \
                            OR (f.size, f.mtime_ns, f.ctime_ns, f.inode, f.fingerprint) \
                               IS DISTINCT FROM (excluded.size, excluded.mtime_ns, excluded.ctime_ns, excluded.inode, excluded.fingerprint) \
                         RETURNING path, state), \
                  unlisted AS (DELETE FROM store.files WHERE job = $1 AND path IN (SELECT path FROM skip) RETURNING 1), \
                  gone AS (UPDATE store.files SET state = 'failed', error = 'vanished since an earlier attempt of this job' \
                           WHERE job = $1 AND path <> ALL ($2) AND NOT (state = 'skipped' AND fingerprint IS NULL) RETURNING path) \
             SELECT (SELECT pg_catalog.array_agg(path) FROM skip), \
                    (SELECT pg_catalog.count(*) FROM up WHERE state = 'failed') + (SELECT pg_catalog.count(*) FROM gone), \
                    EXISTS (SELECT FROM prev) AND EXISTS (SELECT FROM prev FULL JOIN todo l USING (path) \
                            WHERE prev.path IS NULL OR l.path IS NULL OR prev.state IN ('failed', 'changed') \
                               OR (prev.size, prev.mtime_ns, prev.ctime_ns, prev.inode, prev.fingerprint) \
                                  IS DISTINCT FROM (l.size, l.mtime_ns, l.ctime_ns, l.inode, l.fingerprint)), \
                    (SELECT pg_catalog.count(*) FROM unlisted)",
            None,
            &[
                job.into(),
                l.paths.into(),
                l.size.into(),
                l.mtime_ns.into(),
                l.ctime_ns.into(),
                l.inode.into(),
                l.fingerprint.into(),
                l.error.into(),
                target.into(),
                spec.into(),
            ],
        )?;
        let r = t.first();
        Ok::<_, pgrx::spi::SpiError>((r.get::<Vec<String>>(1)?, r.get::<i64>(2)?, r.get::<bool>(3)?))
    })?;
    Ok(Compared { skipped: row.0.unwrap_or_default(), failed: row.1.unwrap_or(0), differs: row.2.unwrap_or(false) })
}

/// What the walk passed over inside the directory (hidden names, links, sockets, FIFOs,
/// devices), recorded with the reason.
pub fn record_skipped(job: i64, paths: Vec<String>, reasons: Vec<&str>) -> Result<()> {
    Ok(Spi::run_with_args(
        "INSERT INTO store.files (job, path, state, error) SELECT $1, p, 'skipped', r FROM unnest($2::text[], $3::text[]) AS s(p, r) \
         ON CONFLICT (job, path) DO UPDATE SET state = 'skipped', error = excluded.error",
        &[job.into(), paths.into(), reasons.into()],
    )?)
}

/// A file's outcome and counts, as the scan reported them.
pub struct Outcome<'a> {
    /// `read`, `changed` or `failed`.
    pub state: &'a str,
    pub records: i64,
    pub empty: i64,
    pub rejected: i64,
    pub filtered: i64,
    pub accepted: i64,
    pub error: Option<&'a str>,
}

/// Record file `path`'s outcome, if claim `claim` still holds the job.
pub fn record_outcome(job: i64, claim: i32, path: &str, o: &Outcome<'_>) -> Result<()> {
    Ok(Spi::run_with_args(
        "UPDATE store.files SET state = $3, records = $4, empty = $5, rejected = $6, filtered = $7, accepted = $8, error = $9 \
         WHERE job = $1 AND path = $2 AND EXISTS (SELECT FROM store.jobs WHERE id = $1 AND attempts = $10)",
        &[
            job.into(),
            path.into(),
            o.state.into(),
            o.records.into(),
            o.empty.into(),
            o.rejected.into(),
            o.filtered.into(),
            o.accepted.into(),
            o.error.into(),
            claim.into(),
        ],
    )?)
}

/// The job ends: the files read unchanged are done.
pub fn mark_done(job: i64) -> Result<()> {
    Ok(Spi::run_with_args("UPDATE store.files SET state = 'done' WHERE job = $1 AND state = 'read'", &[job.into()])?)
}
