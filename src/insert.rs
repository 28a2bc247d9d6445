//! The SPI consumer of the distinct stream: a [`Sink`] that inserts each batch in one
//! transaction together with the job's checkpoint, so a crash at any instant loses
//! nothing and repeats nothing; and that records rejects, file outcomes and progress.
//!
//! Two prepared statements per job: a plain `INSERT … SELECT unnest($1::text[])` for
//! keys proven new (the target was empty when the job began and the stream is
//! distinct), and the same with `ON CONFLICT DO NOTHING` for everything else. A unique
//! violation on the fast path (a concurrent writer) redoes that batch on the safe path
//! and keeps the job there. Transient errors are retried with exponential backoff.
//! Both statements are prepared and run as the job's owner in a security-restricted
//! operation. The checkpoint update carries the claim number: a worker whose claim was
//! taken over by another finds no row to update, and stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use store_engine::batch::Texts;
use store_engine::scan::{FileCounts, FileOutcome, Reject};
use store_engine::walk::FileEntry;
use store_engine::{limits, Flow, Phase, Progress, Sink};

use crate::error::{Result, StoreError};
use crate::job::{reload_on_sighup, shutdown_requested, Job, Plan};
use crate::security::as_role;
use crate::txn::transaction;

/// Retries of a batch after a transient error (serialization failure, deadlock, lock
/// timeout), waiting 100 ms, 200 ms, 400 ms.
const RETRIES: u32 = 3;

/// Rejects are stored in batches of this many (and at every file's end).
const REJECT_FLUSH: usize = 1000;

/// How often the job's counters are written to `store.jobs` (and a cancel looked for
/// while scanning).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// One reject, waiting to be stored.
struct RejectRow {
    file: String,
    line: i64,
    offset: i64,
    reason: &'static str,
    raw: Vec<u8>,
}

pub struct Inserter {
    job: Job,
    fast_sql: String,
    safe_sql: String,
    fast: Option<OwnedPreparedStatement>,
    safe: Option<OwnedPreparedStatement>,
    fast_path: bool,
    progress: Arc<Progress>,
    rejects: Vec<RejectRow>,
    last_status: Instant,
    batch_size: i32,
    /// Records the merge is expected to hand over: what inserting has to get through.
    insert_total: u64,
    inserted_so_far: u64,
    /// Largest private resident memory seen at a status write (bytes).
    memory_peak: u64,
}

impl Inserter {
    pub fn new(job: &Job, plan: &Plan, progress: Arc<Progress>) -> Inserter {
        let fast_sql = format!(
            "INSERT INTO {} ({}) SELECT pg_catalog.unnest($1::pg_catalog.text[])",
            plan.target.name,
            plan.target.quoted_column()
        );
        let safe_sql = format!("{fast_sql} ON CONFLICT DO NOTHING");
        Inserter {
            job: job.clone(),
            fast_sql,
            safe_sql,
            fast: None,
            safe: None,
            fast_path: plan.fast_path,
            progress,
            rejects: Vec::new(),
            last_status: Instant::now(),
            batch_size: 0,
            insert_total: 0,
            inserted_so_far: 0,
            memory_peak: 0,
        }
    }

    /// Insert `batch` and move the checkpoint to `key`, in one transaction (with a status
    /// write when one is due, else a look at `cancel_requested`).
    fn commit(&mut self, batch: &Texts, key: Option<&str>) -> Result<()> {
        let mut attempt = 0;
        loop {
            let fast = self.fast_path;
            match self.try_commit(batch, key, fast) {
                Ok(()) => return Ok(()),
                Err(e) if fast && e.is_unique_violation() => {
                    log!(
                        "pg_store job {}: a key was already present; switching to ON CONFLICT DO NOTHING",
                        self.job.id
                    );
                    self.fast_path = false;
                }
                Err(e) if e.is_query_canceled() && crate::job::cancel_requested(self.job.id) => {
                    return Err(StoreError::Cancelled)
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

    fn try_commit(&mut self, batch: &Texts, key: Option<&str>, fast: bool) -> Result<()> {
        let (job, claim, owner) = (self.job.id, self.job.claim, self.job.owner);
        let due = self.status_due();
        transaction(|| {
            let (sql, slot) = if fast { (&self.fast_sql, &mut self.fast) } else { (&self.safe_sql, &mut self.safe) };
            let recs: Vec<&str> = batch.iter().collect();
            // Prepared (so planned, with any of the owner's functions a plan folds) and
            // run as the owner, in a security-restricted operation.
            let inserted = as_role(owner, || -> Result<u64> {
                if slot.is_none() {
                    let stmt = Spi::connect(|c| {
                        c.prepare_mut(sql.as_str(), &[PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID)]).map(|s| s.keep())
                    })?;
                    *slot = Some(stmt);
                }
                let stmt = slot.as_ref().expect("prepared above");
                Ok(Spi::connect_mut(|c| c.update(stmt, None, &[recs.into()]).map(|t| t.len() as u64))?)
            })?;
            let present = batch.len() as u64 - inserted;
            let fenced = Spi::get_one_with_args::<bool>(
                "WITH c AS (UPDATE store.checkpoints SET last_key = coalesce($3, last_key), inserted = inserted + $4, \
                   already_present = already_present + $5, batches = batches + 1, fast_path = $6, updated_at = pg_catalog.now() \
                   WHERE job = $1 AND attempt = $2 RETURNING 1) SELECT NOT EXISTS (SELECT FROM c)",
                &[job.into(), claim.into(), key.into(), (inserted as i64).into(), (present as i64).into(), fast.into()],
            )?;
            if fenced != Some(false) {
                return Err(StoreError::Fenced);
            }
            self.inserted_so_far += batch.len() as u64;
            self.batch_size = batch.len() as i32;
            let cancel = if due { self.write_status()? } else { self.cancel_requested()? };
            if cancel {
                return Err(StoreError::Cancelled);
            }
            Ok(())
        })
    }

    fn status_due(&self) -> bool {
        self.last_status.elapsed() >= STATUS_EVERY
    }

    fn percent(&self, phase: Phase, bytes_read: u64, bytes_total: u64) -> f32 {
        match phase {
            Phase::Scanning | Phase::Sorting => 60.0 * bytes_read as f32 / bytes_total.max(1) as f32,
            Phase::Merging | Phase::Inserting => {
                60.0 + 40.0 * (self.inserted_so_far as f32 / self.insert_total.max(1) as f32).min(1.0)
            }
            Phase::Done => 100.0,
        }
    }

    /// Write the counters (inside the caller's transaction); returns `cancel_requested`.
    pub fn write_status(&mut self) -> Result<bool> {
        self.last_status = Instant::now();
        let p = self.progress.snapshot();
        let percent = self.percent(p.phase, p.bytes_read, p.bytes_total);
        self.memory_peak = self.memory_peak.max(limits::private_rss().unwrap_or(0));
        let mem = Some(self.memory_peak as i64).filter(|&m| m > 0);
        let n = |v: u64| v as i64;
        let cancel = Spi::get_one_with_args::<bool>(
            "UPDATE store.jobs SET phase = $2, files_done = $3, bytes_read = $4, records = $5, empty = $6, rejected = $7, \
             filtered = $8, duplicates = $9, percent = $10, batch_size = $11, memory_peak = $12, \
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
                percent.into(),
                self.batch_size.into(),
                mem.into(),
                n(p.temp_peak).into(),
                self.job.claim.into(),
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

    /// Store the rejects held back. Each attempt's plan deleted the job's earlier ones,
    /// so a resumed scan reports each reject once.
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

    fn batch(&mut self, batch: &Texts, resume_key: Option<&str>) -> Result<Flow> {
        Self::interrupted()?;
        self.commit(batch, resume_key)?;
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

    fn phase(&mut self, phase: Phase, progress: &Progress) -> Result<Flow> {
        if phase == Phase::Inserting {
            let p = progress.snapshot();
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
        if !self.status_due() {
            return Ok(Flow::Continue);
        }
        self.status_now()
    }
}
