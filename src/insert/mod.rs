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
use std::time::Instant;

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use store_engine::{
    private_rss, BatchInfo, FileCounts, FileEntry, FileOutcome, Flow, Phase, Progress, Reject, Sink, Texts,
};

mod mode;
mod report;
mod retry;

use mode::{Mode, MAX_BACKOFF};
use report::{RejectRow, STATUS_EVERY};
use retry::Next;

use crate::error::{Result, StoreError};
use crate::security::as_role;
use crate::signals::{reload_on_sighup, shutdown_requested};
use crate::tables::checkpoints;
use crate::tables::jobs::{self, Job};
use crate::target::{self, Admission, Target};
use crate::txn::transaction;

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

/// The job's worker, or an inserter it started for one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads the files, writes the job's status, rejects and file outcomes; inserts
    /// range 0 and any range no inserter took.
    Leader,
    /// Inserts one range; writes only that range's checkpoint.
    Helper,
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
    /// `store.fault_injection = 'short_copy_file'` (tests): that file loses its last line.
    short_copy_file: bool,
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
    /// How the next batch goes in.
    mode: Mode,
    /// The scan's counters (the leader's).
    progress: Arc<Progress>,
    rejects: Vec<RejectRow>,
    last_status: Instant,
    batch_size: i32,
    /// Records the merge is expected to hand over: what inserting has to get through.
    insert_total: u64,
    /// Largest private resident memory seen at a status write (bytes).
    memory_peak: u64,
    /// This attempt's start of inserting is recorded ([`Inserter::mark_insert_started`]).
    insert_marked: bool,
}

impl Inserter {
    /// `cfg`: the job's stream; its `temp_dir` is the job's private directory, where a
    /// Citus target's batches are written for COPY.
    pub fn new(
        job: &Job,
        target: &Target,
        role: Role,
        progress: Arc<Progress>,
        cfg: &store_engine::Config,
    ) -> Inserter {
        crate::copy_in::forget_peak_memory();
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
            copy_file: cfg.temp_dir.join(format!("batch-{}.copy", std::process::id())),
            short_copy_file: cfg.fault == Some(store_engine::Fault::ShortCopyFile),
            tried_copy: false,
            copy_stopped: false,
            rules: false,
            probe_wait: 0,
            probe_backoff: 1,
            mode: Mode::start(false),
            progress,
            rejects: Vec::new(),
            last_status: Instant::now(),
            batch_size: 0,
            insert_total: 0,
            memory_peak: 0,
            insert_marked: false,
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
        let (key, fast) = checkpoints::enter(self.job.id, range, self.job.claim)?;
        self.range = range;
        self.mode = Mode::start(fast);
        Ok(Resume { last_key: key })
    }

    /// The current range is complete (in the caller's transaction).
    pub fn range_done(&mut self) -> Result<()> {
        let memory_peak = self.sample_memory() as i64;
        checkpoints::range_done(self.job.id, self.range, self.job.claim, memory_peak)
    }

    /// The largest private memory seen: now, before a batch went in (with the batch and
    /// the merge's read-ahead held), at the end of a COPY (see
    /// [`crate::copy_in::peak_memory`]), and as the sort wrote each run.
    fn sample_memory(&mut self) -> u64 {
        self.memory_peak = self
            .memory_peak
            .max(private_rss().unwrap_or(0))
            .max(crate::copy_in::peak_memory())
            .max(self.progress.memory_peak.load(std::sync::atomic::Ordering::Relaxed));
        self.memory_peak
    }

    /// Insert `batch` and move the checkpoint to its last key, in one transaction (with a
    /// status write when one is due, else a look at `cancel_requested`); on failure, what
    /// [`retry::classify`] says.
    fn commit(&mut self, batch: &Texts, info: &BatchInfo<'_>) -> Result<()> {
        let mut retries = 0;
        // Set when the plain path failed in a way that may or may not be a key already
        // present (a Citus shard's error, which arrives as XX000): the batch is redone on
        // the safe path, and what it finds decides.
        let mut unsure = false;
        // Cleared when a line the look-up did not find was there at the insert (a
        // concurrent writer, a trigger that rewrites lines, another unique index): the
        // batch is redone with ON CONFLICT DO NOTHING.
        let mut may_probe = self.probe_sql.is_some() && self.probe_wait == 0;
        self.probe_wait = self.probe_wait.saturating_sub(1);
        loop {
            let plain = !unsure && self.mode.plain();
            let probe = !plain && may_probe;
            let e = match self.try_commit(batch, info, plain, probe) {
                Ok(present) if unsure && present > 0 => {
                    self.conflicted();
                    return Ok(());
                }
                Ok(present) => {
                    if probe {
                        self.probe_backoff = 1;
                    }
                    self.mode.committed(present);
                    return Ok(());
                }
                Err(e) => e,
            };
            let mark = crate::signals::cancel_mark();
            let attempt =
                retry::Attempt { plain, probe, copy: self.tried_copy, citus: self.citus, rules: self.rules, retries };
            let id = self.job.id;
            match retry::classify(&e, &attempt, shutdown_requested(), || jobs::cancel_requested(id)) {
                Next::PlainConflict => self.conflicted(),
                Next::ProbeAgain => retries += 1,
                Next::ProbeConflict => {
                    may_probe = false;
                    self.probe_backoff = (self.probe_backoff * 2).min(MAX_BACKOFF);
                    self.probe_wait = self.probe_backoff;
                }
                Next::CopyRefused => {
                    log!("pg_store job {id}: {e}; inserting without COPY from now on");
                    (self.copy, self.probe_sql) = (false, None);
                }
                Next::Unsure => unsure = true,
                Next::Cancelled => return Err(StoreError::Cancelled),
                Next::Shutdown => return Err(StoreError::Shutdown),
                // A node of a Citus cluster restarting: wait for it, with fresh
                // connections; every retry is on the safe path, which is idempotent.
                Next::NodeDown(wait) => {
                    std::thread::sleep(wait);
                    (retries, unsure) = (retries + 1, true);
                    if self.citus {
                        crate::citus::reconnect_citus()?;
                    }
                    log!("pg_store job {id}: retrying a batch after {e} (attempt {retries})");
                }
                Next::Transient(wait) => {
                    if e.is_query_canceled() {
                        crate::signals::cancel_outlived(mark);
                    }
                    std::thread::sleep(wait);
                    retries += 1;
                    log!("pg_store job {id}: retrying a batch after {e} (attempt {retries})");
                }
                Next::Fail => return Err(e),
            }
        }
    }

    /// A key the plain path expected to be new was present: back off from it.
    fn conflicted(&mut self) {
        if self.mode.conflicted() {
            log!("pg_store job {}: a key was already present; switching to ON CONFLICT DO NOTHING", self.job.id);
        }
    }

    /// One attempt at a batch (plain; else by probe and COPY, or ON CONFLICT DO NOTHING);
    /// the number of its lines that were already present.
    fn try_commit(&mut self, batch: &Texts, info: &BatchInfo<'_>, plain: bool, probe: bool) -> Result<u64> {
        let (job, claim, job_owner, range) = (self.job.id, self.job.claim, self.job.owner, self.range);
        let due = self.last_status.elapsed() >= STATUS_EVERY;
        let (proven, counted, citus) = (self.mode == Mode::Proven, self.citus && !plain, self.citus);
        self.tried_copy = false;
        transaction(|| {
            if !citus {
                // (A distributed commit is left as it is: its two-phase commit and
                // recovery are Citus's.)
                crate::txn::commit_without_waiting()?;
            }
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
                let lines = batch.len() - usize::from(self.short_copy_file && batch.len() > 1);
                target::write_copy_file(&self.copy_file, batch.iter().take(lines), self.target.key_column.is_some())
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
                        // Citus reports the rows it sent; a plain COPY there inserts them all or
                        // fails. Binary COPY takes a file cut at a row's end for a whole one:
                        // fewer rows than the batch's is an error, and the transaction's abort
                        // takes back what went in.
                        let rows = copied(&target.copy_sql(&self.copy_file))?;
                        if rows != recs.len() as u64 {
                            return Err(StoreError::internal(format!(
                                "COPY of a batch of {} lines from its file reported {rows} rows",
                                recs.len()
                            )));
                        }
                        Ok(rows)
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
            let counts = checkpoints::Batch {
                resume_key: info.resume_key,
                inserted: inserted as i64,
                present: present as i64,
                size: batch.len() as i32,
                proven,
                duplicates: info.duplicates as i64,
            };
            checkpoints::commit_batch(job, range, claim, &counts)?;
            self.batch_size = batch.len() as i32;
            let cancel = if due { self.write_status()? } else { self.cancel_requested()? };
            if cancel {
                return Err(StoreError::Cancelled);
            }
            Ok(present)
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
        self.sample_memory();
        self.commit(batch, info)?;
        Ok(Flow::Continue)
    }

    fn reject(&mut self, r: &Reject<'_>) -> Result<Flow> {
        self.record_reject(r)
    }

    fn file_done(&mut self, file: &FileEntry, c: &FileCounts, outcome: &FileOutcome) -> Result<Flow> {
        self.record_file(file, c, outcome)
    }

    fn phase(&mut self, phase: Phase, _: &Progress) -> Result<Flow> {
        self.enter_phase(phase)
    }

    fn tick(&mut self, _: &Progress) -> Result<Flow> {
        Self::interrupted()?;
        self.status_if_due()
    }
}
