//! A job's plan for one attempt: check again what was checked at queueing, list the
//! files, and record the listing against the ledger and any earlier attempt.

use std::collections::HashSet;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::{check_path, path_text, walk, Config, Dedup, FileEntry, KeptSort, Listing, Tree};

use super::{config, make_job_dir, require_utf8_database, stream_spec};
use crate::error::{Result, StoreError};
use crate::gucs::{self, Settings};
use crate::security;
use crate::tables::jobs::Job;
use crate::target::{self, Target};
use crate::txn::transaction;

/// What an attempt does.
pub struct Plan {
    pub target: Target,
    pub tree: Tree,
    /// Files to read (not skipped as already ingested).
    pub files: Vec<FileEntry>,
    /// The engine's settings. Their `temp_dir` is the job's directory, where exact mode
    /// keeps its sort across attempts.
    pub cfg: Config,
    /// What decides which lines a file yields (see [`stream_spec`]); a kept sort is
    /// loaded only for the same.
    pub spec: String,
}

impl Plan {
    /// Check the job again, list its files, and record this attempt's plan.
    pub(super) fn make(job: &Job, settings: &Settings) -> Result<Plan> {
        // The path was checked when the job was queued; settings or the file system may
        // have changed since. The tree is then opened link by link from the checked path.
        require_utf8_database()?;
        let canon = check_path(&job.path, &gucs::allowed_dirs())?;
        if path_text(&canon) != job.path {
            return Err(StoreError::refused(ERRCODE_INSUFFICIENT_PRIVILEGE, format!("path \"{}\" now resolves to \"{}\"", job.path, canon.display()))
                .with_hint("A component of the path became a symbolic link after the job was queued; queue it again with the path you mean."));
        }
        let (target, fast_probe) = transaction(|| {
            let exists = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE oid = $1)",
                &[job.owner.into()],
            )?;
            if exists != Some(true) {
                return Err(StoreError::refused(
                    ERRCODE_UNDEFINED_OBJECT,
                    format!("the role that queued job {} no longer exists", job.id),
                ));
            }
            if !security::may_read_server_files(job.owner) {
                return Err(StoreError::refused(
                    ERRCODE_INSUFFICIENT_PRIVILEGE,
                    "the job's owner may no longer read server files",
                )
                .with_hint("It lost superuser or the privileges of pg_read_server_files after queueing the job."));
            }
            let t = target::check(job.target, &job.column, job.key_column.as_deref(), job.owner)?;
            let probe = target::may_select(job.target, job.owner)?;
            Ok((t, probe))
        })?;
        let cfg = config(job, settings, &target)?;
        make_job_dir(settings, job)?;
        let spec = stream_spec(job, &cfg);
        let (tree, listing) = walk(&canon)?;
        let recorded = transaction(|| record_files(job, &target, &spec, &listing, fast_probe))?;
        if recorded.restart {
            // The sort an earlier attempt kept is not of this stream.
            KeptSort::remove(&cfg.temp_dir)?;
        }
        let files = listing.files.into_iter().filter(|f| !recorded.skipped.contains(&path_text(&f.path))).collect();
        Ok(Plan { target, tree, files, spec, cfg })
    }
}

/// The storage of `target` now, as `leaf-oid/relfilenode` of each of its leaves (the
/// table itself, or every partition): what a `TRUNCATE`, a rewrite (`VACUUM FULL`,
/// `CLUSTER`, a column type change) or a partition dropped, detached or re-created
/// changes, and an insert or a partition added does not remove from.
pub(super) const STORAGE: &str = "(SELECT coalesce(pg_catalog.array_agg(t.relid::pg_catalog.oid::pg_catalog.text || '/' || c.relfilenode::pg_catalog.text \
                        ORDER BY t.relid), '{}') \
                  FROM (SELECT relid FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass) WHERE isleaf \
                        UNION ALL SELECT $1::pg_catalog.regclass \
                         WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass))) t \
                  JOIN pg_catalog.pg_class c ON c.oid = t.relid)";

/// The ledger follows the table: if some storage `target` had when files were last
/// ingested into it is gone (truncated, rewritten, a partition dropped or re-created),
/// what those files put there may be gone too, and the ledger forgets every file of the
/// target — the next run reads them again (their lines still in the table count as
/// already present). Then the storage now is recorded for the target, and, on a job's
/// first attempt, for the job: [`finish`] keeps its files out of the ledger if that
/// changes before it ends.
fn forget_if_storage_changed(job: &Job, target: &Target) -> Result<()> {
    let forgotten = Spi::get_one_with_args::<i64>(
        &format!(
            "WITH now AS (SELECT {STORAGE} AS s), \
                  stale AS (SELECT EXISTS (SELECT FROM store.target_storage w, now \
                                            WHERE w.target = $1 AND NOT w.storage OPERATOR(pg_catalog.<@) now.s) AS yes), \
                  forget AS (DELETE FROM store.ingested WHERE target = $1 AND (SELECT yes FROM stale) RETURNING 1), \
                  rec AS (INSERT INTO store.target_storage AS r (target, storage) SELECT $1, s FROM now \
                          ON CONFLICT (target) DO UPDATE SET storage = excluded.storage, recorded_at = pg_catalog.now()), \
                  mine AS (UPDATE store.jobs SET target_storage = coalesce(target_storage, (SELECT s FROM now)) WHERE id = $2) \
             SELECT CASE WHEN (SELECT yes FROM stale) THEN (SELECT pg_catalog.count(*) FROM forget) END"
        ),
        &[target.oid.into(), job.id.into()],
    )?;
    if let Some(n) = forgotten {
        log!(
            "pg_store job {}: {} was truncated, rewritten or lost a partition since files were ingested into it: \
             the ledger forgot its {n} files, which are read again",
            job.id,
            target.name
        );
    }
    Ok(())
}

/// What [`record_files`] decided.
struct Recorded {
    /// Paths (as [`path_text`]) skipped as already ingested.
    skipped: HashSet<String>,
    /// The stream starts over: its checkpoints were reset.
    restart: bool,
}

/// Record the listing in `store.files` (one statement for every file), compare it with
/// the ledger and with an earlier attempt of this job, and set up the checkpoint.
fn record_files(job: &Job, target: &Target, spec: &str, listing: &Listing, may_probe: bool) -> Result<Recorded> {
    let n = listing.files.len() + listing.failed.len();
    // Column arrays for unnest: listed files first, then the entries that failed.
    let files = listing.files.iter();
    let failed = listing.failed.iter();
    let paths: Vec<String> =
        files.clone().map(|f| &f.path).chain(failed.clone().map(|f| &f.path)).map(|p| path_text(p)).collect();
    let column = |get: fn(&FileEntry) -> i64| -> Vec<Option<i64>> {
        files.clone().map(|f| Some(get(f))).chain(failed.clone().map(|_| None)).collect()
    };
    let (size, mtime, ctime, inode) =
        (column(|f| f.size as i64), column(|f| f.mtime_ns), column(|f| f.ctime_ns), column(|f| f.inode as i64));
    let print: Vec<Option<&str>> =
        files.clone().map(|f| Some(f.fingerprint.as_str())).chain(failed.clone().map(|_| None)).collect();
    let error: Vec<Option<&str>> =
        files.clone().map(|_| None).chain(failed.clone().map(|f| Some(f.error.as_str()))).collect();
    // One statement: find the files the ledger skips (in it for this target with the same
    // identity; a row 0.1.0 wrote has no ctime or inode, and the rest must match) — they
    // get no row, only a count, so a scheduled run over an unchanged directory adds
    // nothing per file —, upsert every other listed entry as pending or failed, and say
    // whether the listing differs from the one an earlier attempt of this job recorded.
    // Rows of entries the walk skipped (hidden names, links: state skipped, no
    // fingerprint) are not part of that listing.
    forget_if_storage_changed(job, target)?;
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
                job.id.into(),
                paths.into(),
                size.into(),
                mtime.into(),
                ctime.into(),
                inode.into(),
                print.into(),
                error.into(),
                target.oid.into(),
                spec.into(),
            ],
        )?;
        let r = t.first();
        Ok::<_, pgrx::spi::SpiError>((r.get::<Vec<String>>(1)?, r.get::<i64>(2)?, r.get::<bool>(3)?))
    })?;
    // What the walk passed over inside the directory (hidden names, links, sockets, FIFOs,
    // devices), recorded with the reason, so that nothing is left out silently.
    let (hidden, why): (Vec<String>, Vec<&str>) =
        listing.skipped.iter().map(|s| (path_text(&s.path), s.reason)).unzip();
    if !hidden.is_empty() {
        Spi::run_with_args(
            "INSERT INTO store.files (job, path, state, error) SELECT $1, p, 'skipped', r FROM unnest($2::text[], $3::text[]) AS s(p, r) \
             ON CONFLICT (job, path) DO UPDATE SET state = 'skipped', error = excluded.error",
            &[job.id.into(), hidden.into(), why.into()],
        )?;
    }
    let skipped: HashSet<String> = row.0.unwrap_or_default().into_iter().collect();
    let (failed, differs) = (row.1.unwrap_or(0), row.2.unwrap_or(false));
    let first = job.claim <= 1;
    // The target's emptiness decides the fast path, once per job; probed only if the
    // job's owner may read it, and as the target's owner, inside a security-restricted
    // operation (the table's code never runs as the job's owner). (`SELECT 1`: Citus
    // deparses a shard query with an empty target list into one it cannot parse.)
    if first {
        let empty = may_probe && {
            let admission = target::admit(target.oid, &target.columns(), job.owner)?;
            security::as_role(admission.owner, || {
                Spi::get_one::<bool>(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", admission.name))
            })?
            .unwrap_or(false)
        };
        Spi::run_with_args(
            "UPDATE store.checkpoints SET fast_path = $2 WHERE job = $1",
            &[job.id.into(), empty.into()],
        )?;
    }
    // The stream an earlier attempt checkpointed is the one this attempt merges only if
    // the files are the same, each was read through then, and the spec is the same.
    let same_spec = Spi::get_one_with_args::<bool>(
        "SELECT spec IS NOT DISTINCT FROM $2 FROM store.checkpoints WHERE job = $1",
        &[job.id.into(), spec.into()],
    )?
    .unwrap_or(false);
    // Otherwise (and always in Bloom mode, which cannot resume) start over on the safe
    // path with the counters at zero, so that inserted + already_present stays the
    // distinct count of the stream that finishes. Lines the abandoned pass inserted then
    // count as already present.
    let restart = !first && (differs || !same_spec || job.dedup == Dedup::Bloom);
    Spi::run_with_args(
        "UPDATE store.checkpoints SET spec = $2 WHERE job = $1 AND range = 0",
        &[job.id.into(), spec.into()],
    )?;
    if restart {
        Spi::run_with_args("DELETE FROM store.checkpoints WHERE job = $1 AND range > 0", &[job.id.into()])?;
        Spi::run_with_args(
            "UPDATE store.checkpoints SET last_key = NULL, key_after = NULL, key_upto = NULL, fast_path = false, inserted = 0, \
               already_present = 0, duplicates = 0, done = false, error = NULL, sqlstate = NULL WHERE job = $1",
            &[job.id.into()],
        )?;
        Spi::run_with_args(
            "UPDATE store.jobs SET merge_restarts = merge_restarts + 1, ranges = 0 WHERE id = $1",
            &[job.id.into()],
        )?;
    }
    let total: i64 =
        listing.files.iter().filter(|f| !skipped.contains(&path_text(&f.path))).map(|f| f.size as i64).sum();
    Spi::run_with_args(
        "UPDATE store.jobs SET files_total = $2, files_skipped = $3, files_failed = $4, bytes_total = $5, phase = 'scanning', updated_at = pg_catalog.now() \
         WHERE id = $1",
        &[job.id.into(), (n as i64).into(), (skipped.len() as i64).into(), failed.into(), total.into()],
    )?;
    Ok(Recorded { skipped, restart })
}
