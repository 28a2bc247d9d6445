//! The SPI consumer of the distinct stream: a [`Sink`] that inserts each batch of a key
//! range in one transaction together with that range's checkpoint, so a crash at any
//! instant loses nothing and repeats nothing; and, in the job's worker (the leader),
//! records rejects, file outcomes and the job's progress.
//!
//! Two prepared statements per process: a plain `INSERT … SELECT unnest($1::text[])`
//! and the same with `ON CONFLICT DO NOTHING`. The plain one is used while keys are
//! proven new (the target was empty when the job began, and ranges are disjoint), and,
//! optimistically, when the batches before came back without a single line already
//! present — the steady state of a table growing by new files. A unique violation on the
//! plain path redoes that batch on the safe path; an optimistic attempt that fails waits
//! twice as many batches before the next (at most 64), a proven one never tries again.
//! The plain path is a binary COPY of the batch: on a local table straight from this
//! process's memory ([`crate::copy_in`]), which takes the rows page by page (heap
//! multi-insert, one WAL record a page instead of one a row: 1 GiB into an empty table
//! took 0.8× the time of the INSERT); on Citus from a file in the job's private
//! directory, since Citus routes COPY rows straight to their shards, where it collects
//! the rows of `INSERT … SELECT` on the coordinator first (and only where the target's
//! owner is a superuser: Citus refuses COPY from a file to anyone else). A target with
//! rules (which COPY would not apply) or row-level security that applies to its owner
//! (which COPY cannot apply) keeps the INSERT.
//!
//! Every batch first locks the target by OID and checks it again ([`target::admit`]):
//! the job's owner may still insert, and the name the statements use is still the
//! table's (a rename makes them follow the table). Then everything that touches it —
//! the statements, the look-up, the COPY — is prepared and run as the **target's owner**
//! in a security-restricted operation, so the table's own code never runs with the job
//! owner's privileges. Transient errors are retried with exponential backoff. The
//! checkpoint update carries the claim number: a process whose claim was taken over
//! finds no row to update, and stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use store_engine::batch::Texts;
use store_engine::scan::{FileCounts, FileOutcome, Reject};
use store_engine::walk::FileEntry;
use store_engine::{limits, BatchInfo, Flow, Phase, Progress, Sink};

use crate::error::{Result, StoreError};
use crate::job::{reload_on_sighup, shutdown_requested, Job};
use crate::security::as_role;
use crate::target::{self, Admission, Target};
use crate::txn::transaction;

/// Retries of a batch after a transient error (serialization failure, deadlock, lock
/// timeout), waiting 100 ms, 200 ms, 400 ms.
const RETRIES: u32 = 3;

/// Retries of a batch after a connection failure (a Citus node down), waiting 0.5, 1, 2,
/// 4, 8 s and then 8 s each: about a minute in all.
const CONNECTION_RETRIES: u32 = 10;

/// Rejects are stored in batches of this many (and at every file's end).
const REJECT_FLUSH: usize = 1000;

/// How often the job's counters are written (and a cancel looked for while scanning).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Most batches an optimistic plain INSERT waits after failures before it tries again.
const MAX_BACKOFF: u32 = 64;

/// The safe path where the job's owner may read the target: find which of `recs` the
/// target holds (an index probe per line, in sorted order), and insert the others — by
/// `insert`, a COPY or, where COPY may not serve, the plain INSERT. Cheaper than ON
/// CONFLICT DO NOTHING, which inserts row by row, each speculatively, and the only safe
/// path for a target with rules, which ON CONFLICT refuses. A line another writer
/// inserts in between fails the insert with a unique violation, and the caller redoes
/// the batch. Returns the number of rows inserted.
fn probe_then(
    slot: &mut Option<OwnedPreparedStatement>,
    sql: &str,
    recs: &[&str],
    insert: impl FnOnce(Vec<&str>) -> Result<u64>,
) -> Result<u64> {
    let stmt = prepared(slot, sql)?;
    let found = Spi::connect(|c| c.select(stmt, None, &[recs.to_vec().into()])?.first().get_one::<Vec<i64>>())?;
    let mut present = vec![false; recs.len()];
    for i in found.unwrap_or_default() {
        if let Some(p) = usize::try_from(i - 1).ok().and_then(|i| present.get_mut(i)) {
            *p = true;
        }
    }
    if present.iter().all(|p| *p) {
        return Ok(0);
    }
    insert(recs.iter().zip(&present).filter(|(_, p)| !**p).map(|(l, _)| *l).collect())
}

/// Run the prepared statement `stmt` on `recs`: the rows it inserted (or, `counted`, the
/// count it returns).
fn run_statement(stmt: &OwnedPreparedStatement, recs: Vec<&str>, counted: bool) -> Result<u64> {
    Ok(Spi::connect_mut(|c| {
        let t = c.update(stmt, None, &[recs.into()])?;
        if counted {
            Ok(t.first().get_one::<i64>()?.unwrap_or(0) as u64)
        } else {
            Ok::<_, pgrx::spi::SpiError>(t.len() as u64)
        }
    })?)
}

/// The statement in `slot`, prepared from `sql` (one `text[]` parameter) on first use
/// and kept for the process.
fn prepared<'a>(slot: &'a mut Option<OwnedPreparedStatement>, sql: &str) -> Result<&'a OwnedPreparedStatement> {
    if slot.is_none() {
        let stmt =
            Spi::connect(|c| c.prepare_mut(sql, &[PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID)]).map(|s| s.keep()))?;
        *slot = Some(stmt);
    }
    Ok(slot.as_ref().expect("prepared above"))
}

/// Run a COPY statement (Citus); the rows it reported.
fn copied(sql: &str) -> Result<u64> {
    Ok(Spi::connect_mut(|c| c.update(sql, None, &[]).map(|t| t.len() as u64))?)
}

/// How one attempt at a batch inserts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// A COPY of the whole batch (the plain path).
    Copy,
    /// A look-up of the batch's keys, then a COPY of the lines not found (the safe path).
    Probe,
    /// The prepared INSERT, plain or ON CONFLICT DO NOTHING.
    Statement,
}

/// One reject, waiting to be stored.
struct RejectRow {
    file: String,
    line: i64,
    offset: i64,
    reason: &'static str,
    raw: Vec<u8>,
}

/// The job's worker, or an inserter it started for one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads the files, writes the job's status, rejects and file outcomes; inserts
    /// range 0 and any range no inserter took.
    Leader,
    /// Inserts one range; writes only that range's checkpoint.
    Helper,
}

/// How the next batch is inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Plain INSERT: keys proven new.
    Proven,
    /// ON CONFLICT DO NOTHING, trying a plain INSERT again after `wait` batches.
    Safe { wait: u32, backoff: u32 },
    /// A plain INSERT tried because the batches before found nothing present.
    Optimistic { backoff: u32 },
}

/// Where a range resumes.
pub struct Resume {
    pub last_key: Option<String>,
}

pub struct Inserter {
    job: Job,
    role: Role,
    range: i32,
    /// The target as the job checked it; its name follows a rename ([`Inserter::follow`]).
    target: Target,
    /// A Citus target: its `ON CONFLICT` statement returns the count of rows it inserted,
    /// and shard errors may arrive without their SQLSTATE.
    citus: bool,
    fast_sql: String,
    safe_sql: String,
    fast: Option<OwnedPreparedStatement>,
    safe: Option<OwnedPreparedStatement>,
    /// The safe path as a probe of the batch's keys and a COPY of the lines not found
    /// ([`Target::probe_sql`]), where the target allows it.
    probe_sql: Option<String>,
    probe: Option<OwnedPreparedStatement>,
    /// COPY may serve the target (each batch's [`Admission::copy`] decides too); cleared
    /// for the rest of the job when PostgreSQL refused a COPY (0A000).
    copy: bool,
    /// Where a Citus target's COPY reads a batch from: in the job's private directory.
    copy_file: std::path::PathBuf,
    /// Whether the last attempt went by a local COPY (its 0A000 disables COPY).
    tried_copy: bool,
    /// The last batch found that COPY may not serve the target (logged when that starts).
    copy_stopped: bool,
    /// The target had rules at the last attempt: ON CONFLICT cannot serve it, so a look-up
    /// that met a conflict is tried again rather than given up for ON CONFLICT.
    rules: bool,
    /// Batches to go by ON CONFLICT before the next probe, after probes whose COPY met
    /// a conflict anyway (doubling, at most [`MAX_BACKOFF`]).
    probe_wait: u32,
    probe_backoff: u32,
    path: Path,
    /// The scan's counters (the leader's).
    progress: Arc<Progress>,
    rejects: Vec<RejectRow>,
    last_status: Instant,
    batch_size: i32,
    /// Records the merge is expected to hand over: what inserting has to get through.
    insert_total: u64,
    /// Largest private resident memory seen at a status write (bytes).
    memory_peak: u64,
}

impl Inserter {
    /// `dir`: the job's private directory, where a Citus target's batches are written for
    /// COPY.
    pub fn new(job: &Job, target: &Target, role: Role, progress: Arc<Progress>, dir: &std::path::Path) -> Inserter {
        Inserter {
            job: job.clone(),
            role,
            range: 0,
            target: target.clone(),
            citus: target.citus,
            fast_sql: target.insert_sql(false),
            safe_sql: target.insert_sql(true),
            fast: None,
            safe: None,
            probe_sql: target.probe_sql(),
            probe: None,
            copy: target.copy,
            copy_file: dir.join(format!("batch-{}.copy", std::process::id())),
            tried_copy: false,
            copy_stopped: false,
            rules: false,
            probe_wait: 0,
            probe_backoff: 1,
            path: Path::Safe { wait: 0, backoff: 1 },
            progress,
            rejects: Vec::new(),
            last_status: Instant::now(),
            batch_size: 0,
            insert_total: 0,
            memory_peak: 0,
        }
    }

    /// The target was renamed since the statements were made: make them again with the
    /// name it has now (its OID is what the job was given; a table that took the old name
    /// is not it).
    fn follow(&mut self, admission: &Admission) {
        if admission.name == self.target.name {
            return;
        }
        log!(
            "pg_store job {}: the target {} is now called {}; following it",
            self.job.id,
            self.target.name,
            admission.name
        );
        self.target.name = admission.name.clone();
        self.fast_sql = self.target.insert_sql(false);
        self.safe_sql = self.target.insert_sql(true);
        self.probe_sql = self.probe_sql.as_ref().and(self.target.probe_sql());
        (self.fast, self.safe, self.probe) = (None, None, None);
    }

    /// Work on `range` from now on (in the caller's transaction): where it resumes.
    pub fn enter_range(&mut self, range: i32) -> Result<Resume> {
        let (key, fast) = Spi::get_two_with_args::<String, bool>(
            "SELECT last_key, fast_path FROM store.checkpoints WHERE job = $1 AND range = $2 AND attempt = $3",
            &[self.job.id.into(), range.into(), self.job.claim.into()],
        )?;
        let Some(fast) = fast else { return Err(StoreError::Fenced) };
        Spi::run_with_args(
            "UPDATE store.checkpoints SET worker_pid = pg_catalog.pg_backend_pid(), error = NULL, sqlstate = NULL \
             WHERE job = $1 AND range = $2",
            &[self.job.id.into(), range.into()],
        )?;
        self.range = range;
        self.path = if fast { Path::Proven } else { Path::Safe { wait: 0, backoff: 1 } };
        Ok(Resume { last_key: key })
    }

    /// The current range is complete (in the caller's transaction).
    pub fn range_done(&mut self) -> Result<()> {
        let fenced = Spi::get_one_with_args::<bool>(
            "WITH c AS (UPDATE store.checkpoints SET done = true, memory_peak = greatest(memory_peak, $4), \
                 updated_at = pg_catalog.now() \
               WHERE job = $1 AND range = $2 AND attempt = $3 RETURNING 1) SELECT NOT EXISTS (SELECT FROM c)",
            &[self.job.id.into(), self.range.into(), self.job.claim.into(), (self.sample_memory() as i64).into()],
        )?;
        if fenced != Some(false) {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }

    fn sample_memory(&mut self) -> u64 {
        self.memory_peak = self.memory_peak.max(limits::private_rss().unwrap_or(0));
        self.memory_peak
    }

    /// Insert `batch` and move the checkpoint to `key`, in one transaction (with a status
    /// write when one is due, else a look at `cancel_requested`).
    fn commit(&mut self, batch: &Texts, info: &BatchInfo<'_>) -> Result<()> {
        let mut attempt = 0;
        // Set when the plain path failed in a way that may or may not be a key already
        // present (a Citus shard's error, which arrives as XX000): the batch is redone on
        // the safe path, and what it finds decides.
        let mut unsure = false;
        // Cleared when a line the probe did not find was there at the COPY (a concurrent
        // writer, a trigger that rewrites lines, another unique index): the batch is
        // redone with ON CONFLICT DO NOTHING.
        let mut may_probe = self.probe_sql.is_some() && self.probe_wait == 0;
        self.probe_wait = self.probe_wait.saturating_sub(1);
        loop {
            let plain = !unsure
                && match self.path {
                    Path::Proven | Path::Optimistic { .. } => true,
                    Path::Safe { wait, backoff } if wait == 0 && backoff <= MAX_BACKOFF => {
                        // The batches before found nothing present: try the plain path.
                        self.path = Path::Optimistic { backoff };
                        true
                    }
                    Path::Safe { .. } => false,
                };
            let probe = !plain && may_probe;
            match self.try_commit(batch, info, plain, probe) {
                Ok(present) if unsure && present > 0 => {
                    self.plain_path_conflicted();
                    return Ok(());
                }
                Ok(present) => {
                    if probe {
                        self.probe_backoff = 1;
                    }
                    self.path = match self.path {
                        Path::Proven => Path::Proven,
                        Path::Optimistic { .. } => Path::Optimistic { backoff: 1 },
                        Path::Safe { wait, backoff } if present == 0 => {
                            Path::Safe { wait: wait.saturating_sub(1), backoff }
                        }
                        Path::Safe { backoff, .. } => Path::Safe { wait: backoff, backoff },
                    };
                    return Ok(());
                }
                Err(e) if plain && e.is_conflict() => self.plain_path_conflicted(),
                Err(e) if probe && e.is_conflict() && self.rules && attempt < RETRIES => attempt += 1,
                Err(e) if probe && e.is_conflict() => {
                    may_probe = false;
                    self.probe_backoff = (self.probe_backoff * 2).min(MAX_BACKOFF);
                    self.probe_wait = self.probe_backoff;
                }
                Err(e) if self.tried_copy && e.is_copy_refused() => {
                    log!("pg_store job {}: {e}; inserting without COPY from now on", self.job.id);
                    (self.copy, self.probe_sql) = (false, None);
                }
                Err(e) if plain && self.citus && e.is_internal() => unsure = true,
                Err(e) if e.is_query_canceled() && crate::job::cancel_requested(self.job.id) => {
                    return Err(StoreError::Cancelled)
                }
                // A node of a Citus cluster restarting (Citus reports most failures of
                // its connections as XX000 or 58030): wait for it, up to about a minute.
                // Every retry is on the safe path, which is idempotent.
                Err(_) if shutdown_requested() => return Err(StoreError::Shutdown),
                Err(e) if self.node_may_be_down(&e) && attempt < CONNECTION_RETRIES => {
                    std::thread::sleep(Duration::from_millis(500 << attempt.min(4)));
                    attempt += 1;
                    unsure = true;
                    if self.citus {
                        crate::job::reconnect_citus()?;
                    }
                    log!("pg_store job {}: retrying a batch after {e} (attempt {attempt})", self.job.id);
                }
                // A deadlock, a lock timeout, or a cancel not meant for this job (someone's
                // pg_cancel_backend): worth another try.
                Err(e) if (e.is_transient() || e.is_query_canceled()) && attempt < RETRIES => {
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                    attempt += 1;
                    log!("pg_store job {}: retrying a batch after {e} (attempt {attempt})", self.job.id);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A key the plain path expected to be new was present: back off from it.
    fn plain_path_conflicted(&mut self) {
        self.path = match self.path {
            Path::Proven => {
                log!("pg_store job {}: a key was already present; switching to ON CONFLICT DO NOTHING", self.job.id);
                // Keys were to be new and are not (a concurrent writer): never again.
                Path::Safe { wait: u32::MAX, backoff: u32::MAX }
            }
            Path::Optimistic { backoff } => {
                let next = (backoff * 2).min(MAX_BACKOFF);
                Path::Safe { wait: next, backoff: next }
            }
            safe => safe,
        };
    }

    /// Whether `e` may come from a node that is restarting.
    fn node_may_be_down(&self, e: &StoreError) -> bool {
        e.is_connection_failure() || (self.citus && (e.is_io_error() || e.is_lost_connection()))
    }

    /// One attempt at a batch (plain; else by probe and COPY, or ON CONFLICT DO NOTHING);
    /// the number of its lines that were already present.
    fn try_commit(&mut self, batch: &Texts, info: &BatchInfo<'_>, plain: bool, probe: bool) -> Result<u64> {
        let (job, claim, job_owner, range) = (self.job.id, self.job.claim, self.job.owner, self.range);
        let due = self.last_status.elapsed() >= STATUS_EVERY;
        let (proven, counted, citus) = (self.path == Path::Proven, self.citus && !plain, self.citus);
        self.tried_copy = false;
        transaction(|| {
            let admission = target::admit(self.target.oid, &self.target.columns(), job_owner)?;
            self.follow(&admission);
            if self.copy && !admission.copy && !self.copy_stopped {
                // Rules or row-level security came to the target during the job: COPY
                // would ignore the one and cannot apply the other.
                log!(
                    "pg_store job {}: the target has rules or row-level security now; inserting without COPY",
                    self.job.id
                );
            }
            self.copy_stopped = !admission.copy;
            let copy = self.copy && admission.copy;
            let way = if plain && copy && (!citus || admission.owner_is_superuser) {
                Way::Copy
            } else if probe && !citus && self.probe_sql.is_some() && admission.may_select && (copy || admission.rules) {
                Way::Probe
            } else {
                Way::Statement
            };
            self.tried_copy = !citus && (way == Way::Copy || (way == Way::Probe && copy));
            self.rules = admission.rules;
            if way == Way::Copy && citus {
                target::write_copy_file(&self.copy_file, batch.iter(), self.target.key_column.is_some())
                    .map_err(|e| store_engine::Error::io("could not write", &self.copy_file, e))?;
            }
            let recs: Vec<&str> = batch.iter().collect();
            // Prepared (so planned, with any of the owner's functions a plan folds) and
            // run as the target's owner, in a security-restricted operation.
            let target = &self.target;
            let may_read = admission.may_select;
            let inserted = as_role(admission.owner, || -> Result<u64> {
                match way {
                    Way::Copy if citus => {
                        copied(&target.copy_sql(&self.copy_file))?;
                        // Citus reports the rows it sent; a plain COPY there inserts them all or fails.
                        Ok(recs.len() as u64)
                    }
                    Way::Copy => crate::copy_in::copy(
                        target.oid,
                        &target.columns(),
                        &crate::copy_in::encode(recs.iter().copied(), target.key_column.is_some()),
                    ),
                    Way::Probe => {
                        let (fast, fast_sql) = (&mut self.fast, &self.fast_sql);
                        probe_then(&mut self.probe, self.probe_sql.as_deref().unwrap_or_default(), &recs, |new| {
                            if copy {
                                let data = crate::copy_in::encode(new.into_iter(), target.key_column.is_some());
                                crate::copy_in::copy(target.oid, &target.columns(), &data)
                            } else {
                                run_statement(prepared(fast, fast_sql)?, new, false)
                            }
                        })
                    }
                    Way::Statement => {
                        let (sql, slot) =
                            if plain { (&self.fast_sql, &mut self.fast) } else { (&self.safe_sql, &mut self.safe) };
                        run_statement(prepared(slot, sql)?, recs.clone(), counted)
                    }
                }
            })
            .map_err(|e| if may_read { e } else { e.without_detail() })?;
            let present = batch.len() as u64 - inserted;
            let fenced = Spi::get_one_with_args::<bool>(
                "WITH c AS (UPDATE store.checkpoints SET last_key = coalesce($4, last_key), inserted = inserted + $5, \
                   already_present = already_present + $6, batches = batches + 1, batch_size = $7, fast_path = $8, \
                   duplicates = duplicates + $9, updated_at = pg_catalog.now() \
                   WHERE job = $1 AND range = $2 AND attempt = $3 RETURNING 1) SELECT NOT EXISTS (SELECT FROM c)",
                &[
                    job.into(),
                    range.into(),
                    claim.into(),
                    info.resume_key.into(),
                    (inserted as i64).into(),
                    (present as i64).into(),
                    (batch.len() as i32).into(),
                    proven.into(),
                    (info.duplicates as i64).into(),
                ],
            )?;
            if fenced != Some(false) {
                return Err(StoreError::Fenced);
            }
            self.batch_size = batch.len() as i32;
            let cancel = if due { self.write_status()? } else { self.cancel_requested()? };
            if cancel {
                return Err(StoreError::Cancelled);
            }
            Ok(present)
        })
    }

    /// Write the counters (inside the caller's transaction); returns `cancel_requested`.
    /// The leader writes the job's row; an inserter its range's memory peak.
    pub fn write_status(&mut self) -> Result<bool> {
        self.last_status = Instant::now();
        let mem = self.sample_memory() as i64;
        if self.role == Role::Helper {
            Spi::run_with_args(
                "UPDATE store.checkpoints SET memory_peak = greatest(memory_peak, $3) WHERE job = $1 AND range = $2",
                &[self.job.id.into(), self.range.into(), mem.into()],
            )?;
            return self.cancel_requested();
        }
        let p = self.progress.snapshot();
        let scan_percent = 60.0 * p.bytes_read as f32 / p.bytes_total.max(1) as f32;
        let n = |v: u64| v as i64;
        // While inserting, the share done is what every range committed together.
        let cancel = Spi::get_one_with_args::<bool>(
            "UPDATE store.jobs SET phase = $2, files_done = $3, bytes_read = $4, records = $5, empty = $6, rejected = $7, \
             filtered = $8, duplicates = $9, batch_size = $11, memory_peak = greatest(memory_peak, $12), \
             percent = CASE WHEN $2 IN ('merging', 'inserting') THEN 60 + 40 * least(1, \
                 (SELECT pg_catalog.sum(inserted + already_present) FROM store.checkpoints WHERE job = $1)::float8 / greatest($15, 1)) \
               WHEN $2 = 'done' THEN 100 ELSE $10 END, \
             temp_bytes = greatest(coalesce(temp_bytes, 0), $13), updated_at = pg_catalog.now() \
             WHERE id = $1 AND attempts = $14 RETURNING cancel_requested",
            &[
                self.job.id.into(),
                p.phase.as_str().into(),
                n(p.files_done).into(),
                n(p.bytes_read).into(),
                n(p.records).into(),
                n(p.empty).into(),
                n(p.rejected).into(),
                n(p.filtered).into(),
                n(p.duplicates).into(),
                scan_percent.into(),
                self.batch_size.into(),
                mem.into(),
                n(p.temp_peak).into(),
                self.job.claim.into(),
                n(self.insert_total).into(),
            ],
        )?;
        // No row: another worker holds the job now.
        cancel.ok_or(StoreError::Fenced)
    }

    fn cancel_requested(&self) -> Result<bool> {
        Ok(Spi::get_one_with_args::<bool>(
            "SELECT cancel_requested FROM store.jobs WHERE id = $1",
            &[self.job.id.into()],
        )?
        .unwrap_or(false))
    }

    /// Write the status now, in its own transaction (and any rejects held back); a
    /// cancel request stops the job.
    fn status_now(&mut self) -> Result<Flow> {
        self.flush_rejects()?;
        if transaction(|| self.write_status())? {
            return Err(StoreError::Cancelled);
        }
        Ok(Flow::Continue)
    }

    /// Store the rejects held back. An attempt that reads its files again deleted the
    /// job's earlier ones first, so each reject is stored once.
    pub fn flush_rejects(&mut self) -> Result<()> {
        if self.rejects.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rejects);
        let (job, claim) = (self.job.id, self.job.claim);
        transaction(|| {
            let files: Vec<&str> = rows.iter().map(|r| r.file.as_str()).collect();
            let lines: Vec<i64> = rows.iter().map(|r| r.line).collect();
            let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
            let reasons: Vec<&str> = rows.iter().map(|r| r.reason).collect();
            let raws: Vec<&[u8]> = rows.iter().map(|r| r.raw.as_slice()).collect();
            Ok(Spi::run_with_args(
                "INSERT INTO store.rejects (job, file, line, byte_offset, reason, raw) \
                 SELECT $1, * FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[], $6::bytea[]) \
                 WHERE EXISTS (SELECT FROM store.jobs WHERE id = $1 AND attempts = $7) ON CONFLICT DO NOTHING",
                &[job.into(), files.into(), lines.into(), offsets.into(), reasons.into(), raws.into(), claim.into()],
            )?)
        })
    }

    fn interrupted() -> Result<()> {
        if shutdown_requested() {
            return Err(StoreError::Shutdown);
        }
        reload_on_sighup();
        Ok(())
    }
}

impl Sink for Inserter {
    type Error = StoreError;

    fn batch(&mut self, batch: &Texts, info: &BatchInfo<'_>) -> Result<Flow> {
        Self::interrupted()?;
        self.commit(batch, info)?;
        Ok(Flow::Continue)
    }

    fn reject(&mut self, r: &Reject<'_>) -> Result<Flow> {
        self.rejects.push(RejectRow {
            file: store_engine::walk::path_text(r.file),
            line: r.line as i64,
            offset: r.offset as i64,
            reason: r.reason.as_str(),
            raw: r.prefix.to_vec(),
        });
        if self.rejects.len() >= REJECT_FLUSH {
            self.flush_rejects()?;
        }
        Ok(Flow::Continue)
    }

    fn file_done(&mut self, file: &FileEntry, c: &FileCounts, outcome: &FileOutcome) -> Result<Flow> {
        self.flush_rejects()?;
        let (state, error) = match outcome {
            FileOutcome::Read => ("read", None),
            FileOutcome::Changed => ("changed", None),
            FileOutcome::Failed(why) => ("failed", Some(why.as_str())),
        };
        let path = store_engine::walk::path_text(&file.path);
        let n = |v: u64| v as i64;
        transaction(|| {
            Ok(Spi::run_with_args(
                "UPDATE store.files SET state = $3, records = $4, empty = $5, rejected = $6, filtered = $7, accepted = $8, error = $9 \
                 WHERE job = $1 AND path = $2 AND EXISTS (SELECT FROM store.jobs WHERE id = $1 AND attempts = $10)",
                &[
                    self.job.id.into(),
                    path.as_str().into(),
                    state.into(),
                    n(c.records).into(),
                    n(c.empty).into(),
                    n(c.rejected).into(),
                    n(c.filtered).into(),
                    n(c.accepted).into(),
                    error.into(),
                    self.job.claim.into(),
                ],
            )?)
        })?;
        Ok(Flow::Continue)
    }

    fn phase(&mut self, phase: Phase, _: &Progress) -> Result<Flow> {
        if self.role == Role::Helper {
            return Ok(Flow::Continue);
        }
        // The merge announces its phases on its own counters; the job's status shows them.
        self.progress.set_phase(phase);
        if phase == Phase::Inserting && self.insert_total == 0 {
            let p = self.progress.snapshot();
            self.insert_total = p.records - p.rejected - p.filtered - p.duplicates;
            let id = self.job.id;
            transaction(|| {
                Ok(Spi::run_with_args(
                    "UPDATE store.jobs SET insert_started_at = pg_catalog.now() WHERE id = $1",
                    &[id.into()],
                )?)
            })?;
        }
        self.status_now()
    }

    fn tick(&mut self, _: &Progress) -> Result<Flow> {
        Self::interrupted()?;
        if self.last_status.elapsed() < STATUS_EVERY {
            return Ok(Flow::Continue);
        }
        self.status_now()
    }
}
