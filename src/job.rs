//! One job, start to end, in three steps:
//!
//! 1. **plan** ([`Plan::make`]): re-check what was checked when the job was queued (the
//!    path against `store.allowed_dirs`, the target, the owner's privileges), open and
//!    list the files, and record them against the ledger and any earlier attempt in one
//!    set-based statement: which to read, which to skip, whether the stream an earlier
//!    attempt checkpointed still holds.
//! 2. **consume**: in exact mode, the sort an earlier attempt kept is loaded, or the
//!    files are read and sorted into runs kept in the job's own directory
//!    ([`store_engine::stream::prepare`]); the key space is split into ranges once, and
//!    each range is merged and inserted by its own process — this worker for the first,
//!    inserters it starts for the others ([`run_range`]) — each batch committed with its
//!    range's checkpoint ([`Inserter`]). In Bloom mode one stream runs through
//!    [`store_engine::distinct`].
//! 3. **finish** ([`finish`]): files read unchanged enter the ledger, and the job ends
//!    `done`, or `partial` when some file failed — in one transaction.
//!
//! Everything here runs on the main thread of its process, outside any transaction
//! except the short ones it opens itself; the engine's own threads never call PostgreSQL.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::config::Config;
use store_engine::filter::Filter;
use store_engine::merge::KeyRange;
use store_engine::normalize::LineLimit;
use store_engine::sorted::{Keep, Sorted};
use store_engine::walk::{path_text, walk, FileEntry, Tree};
use store_engine::{private_dir, Dedup, Progress};

use crate::error::{Result, StoreError};
use crate::gucs::{self, Settings};
use crate::insert::{Inserter, Role};
use crate::target::{self, Target};
use crate::txn::transaction;
use crate::{registry, security};

/// How a job that ran to its end ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Done,
    /// Done, but some files could not be listed, opened or read (see `store.files`).
    Partial,
}

/// True once the postmaster asked this process to exit (SIGTERM).
pub fn shutdown_requested() -> bool {
    // SAFETY: reads a flag the signal handler sets.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Reload postgresql.conf if a SIGHUP arrived (a running job keeps the settings it
/// started with; the next job sees the new ones).
pub fn reload_on_sighup() {
    if pgrx::bgworkers::BackgroundWorker::sighup_received() {
        // SAFETY: called on the main thread between statements.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// Whether `store_cancel` asked job `id` to stop (in a transaction of its own).
pub fn cancel_requested(id: i64) -> bool {
    transaction(|| {
        Ok(Spi::get_one_with_args::<bool>("SELECT cancel_requested FROM store.jobs WHERE id = $1", &[id.into()])?)
    })
    .ok()
    .flatten()
    .unwrap_or(false)
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
    fn load(id: i64, claim: i32) -> Result<Job> {
        transaction(|| {
            let job = Spi::connect(|c| {
                let t = c.select(
                    "SELECT path, target::pg_catalog.oid, column_name::text, dedup, filter, owner::pg_catalog.oid, key_column::text \
                     FROM store.jobs WHERE id = $1",
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
                ))
            })?;
            let (Some(path), Some(target), Some(column), Some(dedup), filter, Some(owner), key_column) = job else {
                return Err(StoreError::internal(format!("job {id} has no row")));
            };
            let dedup = dedup.parse::<Dedup>()?;
            Ok(Job { id, claim, path, target, column, key_column, dedup, filter, owner })
        })
    }
}

/// What an attempt does.
pub struct Plan {
    pub target: Target,
    pub tree: Tree,
    /// Files to read (not skipped as already ingested).
    pub files: Vec<FileEntry>,
    pub cfg: Config,
    /// What decides which lines a file yields (see [`stream_spec`]).
    pub spec: String,
    /// Exact mode: where the job's sort is kept across attempts.
    pub keep: Keep,
}

/// The directories of job `id` under `store.temp_dir` that are pg_store's (the server's
/// OS user's, private, no link): `job-<database oid>-<id>-<random>` (and 0.2.0's
/// `job-<database oid>-<id>`). The random part is chosen when the job's first attempt
/// makes its directory, so another OS user sharing `store.temp_dir` cannot take the name
/// first and keep the job from running; what such a user put there is never ours.
pub fn job_dirs(settings: &Settings, id: i64) -> Vec<PathBuf> {
    let name = format!("job-{}-{id}", registry::my_database());
    let Ok(entries) = std::fs::read_dir(&settings.temp_dir) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n == name || n.strip_prefix(&name).is_some_and(|r| r.starts_with('-')))
        })
        .map(|e| e.path())
        .filter(|p| private_dir::verify(p).is_ok())
        .collect();
    dirs.sort();
    dirs
}

/// The directory an earlier attempt of job `id` made, if one is there and ours.
pub fn job_dir(settings: &Settings, id: i64) -> Option<PathBuf> {
    job_dirs(settings, id).into_iter().next()
}

/// 64 random bits, as hex: the part of a job directory's name nobody can guess.
fn random_suffix() -> Result<String> {
    let mut b = [0u8; 8];
    // SAFETY: fills the buffer it is given, at most its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(StoreError::internal("getrandom gave no random bytes for a job directory's name"));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Make the job's directory for this attempt, private to the server's OS user
/// ([`private_dir`]): the first attempt creates it exclusively (whatever another OS
/// user put at that name in a shared `store.temp_dir` is refused, never used); a later
/// one takes the directory an earlier attempt kept only if it is still ours, 0700 and no
/// link. `store.temp_dir` itself must not let others rename it away.
fn make_job_dir(settings: &Settings, job: &Job) -> Result<PathBuf> {
    let parent = &settings.temp_dir;
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(private_dir::DIR_MODE)
            .create(parent)
            .map_err(|e| store_engine::Error::io("could not create", parent, e))?;
    }
    private_dir::check_parent(parent)?;
    if job.claim > 1 {
        if let Some(dir) = job_dir(settings, job.id) {
            return Ok(dir);
        }
    } else {
        // Ours, but older than the job (a job id used again after a restore): stale.
        for dir in job_dirs(settings, job.id) {
            private_dir::remove(&dir)?;
        }
    }
    let dir = parent.join(format!("job-{}-{}-{}", registry::my_database(), job.id, random_suffix()?));
    private_dir::create(&dir)?;
    Ok(dir)
}

/// Everything that decides which lines of a file end up in the target, besides the file
/// itself: the column, the dedup mode, the filter, the length limits. The ledger skips a
/// file only for the same spec (a file read through a filter has not been ingested
/// for an unfiltered job), and a resumed stream starts over when the spec changed
/// between attempts (a new `store.max_line_bytes` accepts other lines).
pub fn stream_spec(job: &Job, cfg: &Config) -> String {
    let chars = cfg.limit.chars.map_or(String::new(), |c| c.to_string());
    format!(
        "column={};key={};dedup={};max_bytes={};max_chars={chars};filter={}",
        job.column,
        job.key_column.as_deref().unwrap_or(""),
        job.dedup.as_str(),
        cfg.limit.bytes,
        job.filter.as_deref().unwrap_or("")
    )
}

/// pg_store hands PostgreSQL UTF-8 text; another server encoding would store it garbled.
pub fn require_utf8_database() -> Result<()> {
    // SAFETY: reads the database's encoding.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, "pg_store needs a database with UTF8 encoding")
            .with_hint("Lines are checked as UTF-8 and stored as such; create the database with ENCODING 'UTF8'."));
    }
    Ok(())
}

impl Plan {
    /// Check the job again, list its files, and record this attempt's plan.
    fn make(job: &Job, settings: &Settings) -> Result<Plan> {
        // The path was checked when the job was queued; settings or the file system may
        // have changed since. The tree is then opened link by link from the checked path.
        require_utf8_database()?;
        let canon = store_engine::paths::check(&job.path, &gucs::allowed_dirs())?;
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
        let cfg = config(job, settings, &target, make_job_dir(settings, job)?)?;
        let spec = stream_spec(job, &cfg);
        let keep = Keep { dir: cfg.temp_dir.clone(), spec: spec.clone() };
        let (tree, listing) = walk(&canon)?;
        let recorded = transaction(|| record_files(job, &target, &spec, &listing, fast_probe))?;
        if recorded.restart {
            // The sort an earlier attempt kept is not of this stream.
            store_engine::sorted::remove_kept(&keep.dir)?;
        }
        let files = listing.files.into_iter().filter(|f| !recorded.skipped.contains(&path_text(&f.path))).collect();
        Ok(Plan { target, tree, files, spec, keep, cfg })
    }
}

/// The engine's settings for `job`: its budget, limits, filter, mode, and its directory.
fn config(job: &Job, settings: &Settings, target: &Target, temp_dir: PathBuf) -> Result<Config> {
    let filter = job.filter.as_deref().map(Filter::parse).transpose()?.unwrap_or_default();
    Ok(Config {
        memory_limit: settings.memory_limit,
        threads: settings.threads,
        temp_dir,
        limit: LineLimit { bytes: settings.max_line_bytes, chars: target.max_chars },
        compress_runs: settings.compress_runs,
        check_space: settings.check_temp_space,
        filter,
        dedup: job.dedup,
        bloom_fpr: settings.bloom_fpr,
        batch: if target.citus {
            settings.batch_limits().distributed(settings.memory_limit)
        } else {
            settings.batch_limits()
        },
        fault: settings.fault,
        ..Config::default()
    })
}

/// Settings of the worker's session for a Citus target: keep a connection per shard
/// across batches (Citus closes all but one per worker node at each commit by default,
/// and reopening them cost most of a batch's fixed time).
fn prepare_session(target: &Target) -> Result<()> {
    if target.citus {
        cache_citus_connections(64)?;
    }
    Ok(())
}

/// Close every connection to Citus nodes this session keeps: after a node failed, some
/// are broken without knowing it, and each would fail a retry. Citus closes the cached
/// connections beyond `citus.max_cached_conns_per_worker` at every abort; the setting
/// is rolled back with the transaction.
pub fn reconnect_citus() -> Result<()> {
    crate::txn::rolled_back(|| {
        Spi::run("SELECT pg_catalog.set_config('citus.max_cached_conns_per_worker', '0', false)")?;
        Ok(())
    })
}

fn cache_citus_connections(n: u32) -> Result<()> {
    transaction(|| {
        Ok(Spi::run(&format!("SELECT pg_catalog.set_config('citus.max_cached_conns_per_worker', '{n}', false)"))?)
    })
}

/// The storage of `target` now, as `leaf-oid/relfilenode` of each of its leaves (the
/// table itself, or every partition): what a `TRUNCATE`, a rewrite (`VACUUM FULL`,
/// `CLUSTER`, a column type change) or a partition dropped, detached or re-created
/// changes, and an insert or a partition added does not remove from.
const STORAGE: &str = "(SELECT coalesce(pg_catalog.array_agg(t.relid::pg_catalog.oid::pg_catalog.text || '/' || c.relfilenode::pg_catalog.text \
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
fn record_files(
    job: &Job,
    target: &Target,
    spec: &str,
    listing: &store_engine::walk::Listing,
    may_probe: bool,
) -> Result<Recorded> {
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

/// Every attempt that reads its files again reports every reject again.
fn forget_rejects(job: &Job) -> Result<()> {
    transaction(|| Ok(Spi::run_with_args("DELETE FROM store.rejects WHERE job = $1", &[job.id.into()])?))
}

/// Run job `id` under claim `claim` to its end.
pub fn run(id: i64, claim: i32) -> Result<Ended> {
    let job = Job::load(id, claim)?;
    let settings = Settings::read()?;
    let plan = Plan::make(&job, &settings)?;
    let progress = Arc::new(Progress::default());
    Progress::add(&progress.bytes_total, plan.files.iter().map(|f| f.size).sum());
    prepare_session(&plan.target)?;
    let mut inserter = Inserter::new(&job, &plan.target, Role::Leader, progress.clone(), &plan.cfg.temp_dir);
    let estimated_false_drops = match job.dedup {
        Dedup::Bloom => {
            forget_rejects(&job)?;
            let resume = transaction(|| inserter.enter_range(0))?;
            let report = store_engine::distinct(
                &plan.cfg,
                &plan.tree,
                &plan.files,
                resume.last_key.as_deref().map(str::as_bytes),
                &progress,
                &mut inserter,
            )?;
            transaction(|| inserter.range_done())?;
            report.bloom.map(|b| b.estimated_false_drops)
        }
        Dedup::Exact => {
            run_exact(&job, &plan, &settings, &progress, &mut inserter)?;
            None
        }
    };
    finish(&job, &plan.spec, &mut inserter, estimated_false_drops)
}

/// Exact mode: the sorted runs (kept from an earlier attempt, or made now), the key
/// ranges, an inserter process for each range but the first, the first here, then any
/// range no inserter finished.
fn run_exact(
    job: &Job,
    plan: &Plan,
    settings: &Settings,
    progress: &Arc<Progress>,
    inserter: &mut Inserter,
) -> Result<()> {
    let mut sorted = match Sorted::load(&plan.keep, Some(&plan.files), &plan.cfg, progress)? {
        Some(sorted) => {
            log!("pg_store job {}: resuming from the {} sorted runs an earlier attempt kept", job.id, sorted.runs());
            sorted
        }
        None => {
            forget_rejects(job)?;
            store_engine::stream::prepare(&plan.cfg, &plan.tree, &plan.files, &plan.keep, progress, inserter)?
        }
    };
    let ranges = transaction(|| split(job, &sorted, settings.insert_workers))?;
    let mut helpers = Vec::new();
    for r in ranges.iter().filter(|r| r.range > 0 && !r.done) {
        match start_inserter(job, r.range) {
            Ok(h) => helpers.push(h),
            Err(e) => {
                log!("pg_store job {}: could not start an inserter for range {} ({e}); doing it here", job.id, r.range)
            }
        }
    }
    let mut first = true;
    loop {
        // This process's share: range 0 first, then whatever no inserter is (still) on.
        let next = if first {
            ranges.iter().find(|r| r.range == 0 && !r.done).cloned()
        } else {
            wait_for_inserters(job, inserter, &mut helpers)?;
            transaction(|| open_ranges(job))?.into_iter().find(|r| !registry::range_is_live(job.id, r.range))
        };
        first = false;
        let Some(r) = next else {
            if helpers.is_empty() && transaction(|| open_ranges(job))?.is_empty() {
                return Ok(());
            }
            continue;
        };
        if r.range != 0 && !registry::enter(job.id, job.claim, r.range) {
            continue;
        }
        let res = drain_range(&plan.cfg, job, &mut sorted, &r, inserter);
        if r.range != 0 {
            registry::leave_range(job.id, r.range);
        }
        res?;
    }
}

/// Insert range `r` of `sorted` in this process, from its checkpoint on.
fn drain_range(cfg: &Config, job: &Job, sorted: &mut Sorted, r: &RangeRow, inserter: &mut Inserter) -> Result<()> {
    let resume = transaction(|| inserter.enter_range(r.range))?;
    let merged = Arc::new(Progress::default());
    let report = store_engine::stream::drain(
        cfg,
        sorted,
        &r.keys,
        resume.last_key.as_deref().map(str::as_bytes),
        &merged,
        inserter,
    )?;
    if report.stopped {
        return Err(StoreError::internal(format!("the merge of range {} of job {} stopped early", r.range, job.id)));
    }
    transaction(|| inserter.range_done())
}

/// One key range of a job, as its checkpoint row has it.
#[derive(Debug, Clone)]
pub struct RangeRow {
    pub range: i32,
    pub keys: KeyRange,
    pub done: bool,
}

fn ranges_of(job: &Job, only_open: bool) -> Result<Vec<RangeRow>> {
    Spi::connect(|c| {
        let t = c.select(
            "SELECT range, key_after, key_upto, done FROM store.checkpoints WHERE job = $1 AND (NOT $2 OR NOT done) ORDER BY range",
            None,
            &[job.id.into(), only_open.into()],
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

fn open_ranges(job: &Job) -> Result<Vec<RangeRow>> {
    ranges_of(job, true)
}

/// The job's key ranges: those an earlier attempt of this stream decided, else a split
/// of `sorted` into `workers` ranges of about equal size, recorded once.
fn split(job: &Job, sorted: &Sorted, workers: usize) -> Result<Vec<RangeRow>> {
    let decided =
        Spi::get_one_with_args::<i32>("SELECT ranges FROM store.jobs WHERE id = $1", &[job.id.into()])?.unwrap_or(0);
    if decided == 0 {
        let ranges = sorted.ranges(workers);
        let fenced = Spi::get_one_with_args::<bool>(
            "WITH c AS (UPDATE store.checkpoints SET key_after = NULL, key_upto = $3 WHERE job = $1 AND range = 0 AND attempt = $2 RETURNING 1) \
             SELECT NOT EXISTS (SELECT FROM c)",
            &[job.id.into(), job.claim.into(), ranges[0].upto.clone().into()],
        )?;
        if fenced != Some(false) {
            return Err(StoreError::Fenced);
        }
        for (i, r) in ranges.iter().enumerate().skip(1) {
            Spi::run_with_args(
                "INSERT INTO store.checkpoints (job, range, attempt, spec, key_after, key_upto, fast_path) \
                 SELECT job, $2, attempt, spec, $3, $4, fast_path FROM store.checkpoints WHERE job = $1 AND range = 0",
                &[job.id.into(), (i as i32).into(), r.after.clone().into(), r.upto.clone().into()],
            )?;
        }
        Spi::run_with_args(
            "UPDATE store.jobs SET ranges = $2 WHERE id = $1",
            &[job.id.into(), (ranges.len() as i32).into()],
        )?;
    }
    ranges_of(job, false)
}

/// Start an inserter process for `range` of `job`.
fn start_inserter(job: &Job, range: i32) -> std::result::Result<pgrx::bgworkers::DynamicBackgroundWorker, String> {
    // SAFETY: reads backend globals.
    let (db, pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    pgrx::bgworkers::BackgroundWorkerBuilder::new(&format!("pg_store inserter {} of job {}", range, job.id))
        .set_type("pg_store inserter")
        .set_library("pg_store")
        .set_function("pg_store_inserter_main")
        .set_argument(range.into_datum())
        .set_extra(&format!("{} {} {}", job.id, job.claim, db.to_u32()))
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(pid)
        .load_dynamic()
        .map_err(|_| "no background worker slot free (max_worker_processes)".to_string())
}

/// Wait until every inserter this process started has exited, watching for a cancel,
/// a shutdown, and keeping the job's status current.
fn wait_for_inserters(
    job: &Job,
    inserter: &mut Inserter,
    helpers: &mut Vec<pgrx::bgworkers::DynamicBackgroundWorker>,
) -> Result<()> {
    loop {
        helpers.retain(|h| h.pid().is_ok());
        if helpers.is_empty() {
            return Ok(());
        }
        if shutdown_requested() {
            return Err(StoreError::Shutdown);
        }
        reload_on_sighup();
        if transaction(|| inserter.write_status())? {
            return Err(StoreError::Cancelled);
        }
        if let Some(e) = transaction(|| failed_range(job))? {
            return Err(e);
        }
        if !pgrx::bgworkers::BackgroundWorker::wait_latch(Some(Duration::from_millis(250))) {
            return Err(StoreError::Shutdown); // the postmaster died
        }
    }
}

/// The error an inserter of `job` recorded, if one did.
fn failed_range(job: &Job) -> Result<Option<StoreError>> {
    let row = Spi::get_three_with_args::<i32, String, String>(
        "SELECT (SELECT range FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1), \
                (SELECT error FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1), \
                (SELECT sqlstate FROM store.checkpoints WHERE job = $1 AND error IS NOT NULL ORDER BY range LIMIT 1)",
        &[job.id.into()],
    )?;
    Ok(match row {
        (Some(r), Some(message), code) => Some(StoreError::Sql {
            code: code.as_deref().map_or(ERRCODE_INTERNAL_ERROR, crate::error::code_of_sqlstate),
            message: format!("range {r}: {message}"),
            detail: None,
            hint: None,
        }),
        _ => None,
    })
}

/// An inserter process's share of a job: one range, from its checkpoint to its end.
pub fn run_range(id: i64, claim: i32, range: i32) -> Result<()> {
    let job = Job::load(id, claim)?;
    let settings = Settings::read()?;
    let target = transaction(|| target::check(job.target, &job.column, job.key_column.as_deref(), job.owner))?;
    let dir = job_dir(&settings, id)
        .ok_or_else(|| StoreError::internal(format!("job {id} has no temporary directory of its own")))?;
    let cfg = config(&job, &settings, &target, dir)?;
    let keep = Keep { dir: cfg.temp_dir.clone(), spec: stream_spec(&job, &cfg) };
    let mut sorted = Sorted::load(&keep, None, &cfg, &Progress::default())?.ok_or_else(|| {
        StoreError::internal(format!("the sorted runs of job {id} are gone from {}", keep.dir.display()))
    })?;
    let row = transaction(|| ranges_of(&job, false))?.into_iter().find(|r| r.range == range);
    let Some(row) = row.filter(|r| !r.done) else { return Ok(()) };
    prepare_session(&target)?;
    let mut inserter = Inserter::new(&job, &target, Role::Helper, Arc::new(Progress::default()), &cfg.temp_dir);
    drain_range(&cfg, &job, &mut sorted, &row, &mut inserter)
}

/// Files read unchanged go into the ledger, and the job ends; all in one transaction.
fn finish(job: &Job, spec: &str, inserter: &mut Inserter, estimated_false_drops: Option<f64>) -> Result<Ended> {
    inserter.flush_rejects()?;
    transaction(|| {
        inserter.write_status()?;
        Spi::run_with_args(
            "UPDATE store.files SET state = 'done' WHERE job = $1 AND state = 'read'",
            &[job.id.into()],
        )?;
        // The storage the target had when the job began must still be there: a TRUNCATE
        // (or a rewrite, a partition dropped) during the job may have taken some of its
        // lines, and its files must then be read again by the next run.
        let kept = Spi::get_one_with_args::<bool>(
            &format!(
                "SELECT coalesce((SELECT target_storage FROM store.jobs WHERE id = $2) OPERATOR(pg_catalog.<@) {STORAGE}, true)"
            ),
            &[job.target.into(), job.id.into()],
        )?;
        if kept != Some(true) {
            log!(
                "pg_store job {}: the target was truncated, rewritten or lost a partition while the job ran: \
                 its files stay out of the ledger, and the next run reads them again",
                job.id
            );
        } else {
            Spi::run_with_args(
                "INSERT INTO store.ingested (target, path, spec, size, mtime_ns, ctime_ns, inode, fingerprint, job, owner) \
                 SELECT $2, path, $4, size, mtime_ns, ctime_ns, inode, fingerprint, job, $3 FROM store.files WHERE job = $1 AND state = 'done' \
                 ON CONFLICT (target, path, spec) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, \
                   inode = excluded.inode, fingerprint = excluded.fingerprint, job = excluded.job, owner = excluded.owner, ingested_at = pg_catalog.now()",
                &[job.id.into(), job.target.into(), job.owner.into(), spec.into()],
            )?;
        }
        let state = Spi::get_one_with_args::<String>(
            "UPDATE store.jobs SET state = CASE WHEN EXISTS (SELECT FROM store.files WHERE job = $1 AND state = 'failed') THEN 'partial' ELSE 'done' END, \
               phase = 'done', percent = 100, finished_at = pg_catalog.now(), updated_at = pg_catalog.now(), estimated_false_drops = $3, \
               files_done = files_total, files_failed = (SELECT pg_catalog.count(*) FROM store.files WHERE job = $1 AND state = 'failed') \
             WHERE id = $1 AND attempts = $2 RETURNING state",
            &[job.id.into(), job.claim.into(), estimated_false_drops.into()],
        )?;
        match state.as_deref() {
            Some("done") => Ok(Ended::Done),
            Some(_) => Ok(Ended::Partial),
            None => Err(StoreError::Fenced),
        }
    })
}
