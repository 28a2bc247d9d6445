//! A job's plan for one attempt: check again what was checked at queueing, list the
//! files, and record the listing against the ledger and any earlier attempt.

use std::collections::HashSet;

use pgrx::prelude::*;
use store_engine::{path_text, walk, Config, Dedup, FileEntry, KeptSort, Listing, Tree};

use super::{config, make_job_dir, stream_spec};
use crate::admission::{self, Asker};
use crate::error::Result;
use crate::gucs::Settings;
use crate::security;
use crate::tables::jobs::{self, Job};
use crate::tables::{checkpoints, files, target_storage};
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
        // Everything was checked when the job was queued; settings, the file system, the
        // table or the owner's privileges may have changed since. The tree is then opened
        // link by link from the checked path.
        let asker = Asker::Owner { role: job.owner, job: job.id };
        let (admitted, fast_probe) = transaction(|| {
            let a = admission::check(asker, &job.path, job.target, &job.column, job.key_column.as_deref())?;
            let probe = target::may_select(job.target, job.owner)?;
            Ok((a, probe))
        })?;
        let (canon, target) = (admitted.path, admitted.target);
        let cfg = config(job, settings, &target, make_job_dir(settings, job)?)?;
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

/// The ledger follows the table: if some storage `target` had when files were last
/// ingested into it is gone (truncated, rewritten, a partition dropped or re-created),
/// what those files put there may be gone too, and the ledger forgets every file of the
/// target — the next run reads them again (their lines still in the table count as
/// already present). Then the storage now is recorded for the target, and, on a job's
/// first attempt, for the job: [`finish`] keeps its files out of the ledger if that
/// changes before it ends.
fn forget_if_storage_changed(job: &Job, target: &Target) -> Result<()> {
    let forgotten = target_storage::refresh(target.oid, job.id)?;
    if let Some(n) = forgotten.filter(|&n| n > 0) {
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
    let listed = listing.files.iter();
    let failed = listing.failed.iter();
    let paths: Vec<String> =
        listed.clone().map(|f| &f.path).chain(failed.clone().map(|f| &f.path)).map(|p| path_text(p)).collect();
    let column = |get: fn(&FileEntry) -> i64| -> Vec<Option<i64>> {
        listed.clone().map(|f| Some(get(f))).chain(failed.clone().map(|_| None)).collect()
    };
    let (size, mtime, ctime, inode) =
        (column(|f| f.size as i64), column(|f| f.mtime_ns), column(|f| f.ctime_ns), column(|f| f.inode as i64));
    let print: Vec<Option<&str>> =
        listed.clone().map(|f| Some(f.fingerprint.as_str())).chain(failed.clone().map(|_| None)).collect();
    let error: Vec<Option<&str>> =
        listed.clone().map(|_| None).chain(failed.clone().map(|f| Some(f.error.as_str()))).collect();
    // The ledger first forgets a target whose storage changed; then one statement
    // compares the listing with it and with an earlier attempt ([`files::record_listing`]).
    forget_if_storage_changed(job, target)?;
    let columns = files::Columns { paths, size, mtime_ns: mtime, ctime_ns: ctime, inode, fingerprint: print, error };
    let compared = files::record_listing(job.id, columns, target.oid, spec)?;
    // What the walk passed over inside the directory (hidden names, links, sockets, FIFOs,
    // devices), recorded with the reason, so that nothing is left out silently.
    let (hidden, why): (Vec<String>, Vec<&str>) =
        listing.skipped.iter().map(|s| (path_text(&s.path), s.reason)).unzip();
    if !hidden.is_empty() {
        files::record_skipped(job.id, hidden, why)?;
    }
    let skipped: HashSet<String> = compared.skipped.into_iter().collect();
    let (failed, differs) = (compared.failed, compared.differs);
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
        checkpoints::set_fast_path(job.id, empty)?;
    }
    // The stream an earlier attempt checkpointed is the one this attempt merges only if
    // the files are the same, each was read through then, and the spec is the same.
    let same_spec = checkpoints::same_spec(job.id, spec)?;
    // Otherwise (and always in Bloom mode, which cannot resume) start over on the safe
    // path with the counters at zero, so that inserted + already_present stays the
    // distinct count of the stream that finishes. Lines the abandoned pass inserted then
    // count as already present.
    let restart = !first && (differs || !same_spec || job.dedup == Dedup::Bloom);
    checkpoints::set_spec(job.id, spec)?;
    if restart {
        checkpoints::restart(job.id)?;
        jobs::count_restart(job.id)?;
    }
    let total: i64 =
        listing.files.iter().filter(|f| !skipped.contains(&path_text(&f.path))).map(|f| f.size as i64).sum();
    jobs::record_listing(job.id, n as i64, skipped.len() as i64, failed, total)?;
    Ok(Recorded { skipped, restart })
}
