//! What an inserter reports besides its batches: the job's counters in `store.jobs` (the
//! leader's) or its range's memory peak (an inserter's), the rejects, each file's
//! outcome, and the phase; all in transactions of their own, each checking the claim.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use store_engine::{path_text, FileCounts, FileEntry, FileOutcome, Flow, Phase, Reject};

use super::{Inserter, Role};
use crate::error::{Result, StoreError};
use crate::txn::transaction;

/// Rejects are stored in batches of this many (and at every file's end).
const REJECT_FLUSH: usize = 1000;

/// How often the job's counters are written (and a cancel looked for while scanning).
pub(super) const STATUS_EVERY: Duration = Duration::from_secs(1);

/// One reject, waiting to be stored.
pub(super) struct RejectRow {
    file: String,
    line: i64,
    offset: i64,
    reason: &'static str,
    raw: Vec<u8>,
}

impl Inserter {
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

    pub(super) fn cancel_requested(&self) -> Result<bool> {
        Ok(Spi::get_one_with_args::<bool>(
            "SELECT cancel_requested FROM store.jobs WHERE id = $1",
            &[self.job.id.into()],
        )?
        .unwrap_or(false))
    }

    /// Write the status now, in its own transaction (and any rejects held back); a
    /// cancel request stops the job.
    pub(super) fn status_now(&mut self) -> Result<Flow> {
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

    /// Keep a reject, storing them a thousand at a time.
    pub(super) fn record_reject(&mut self, r: &Reject<'_>) -> Result<Flow> {
        self.rejects.push(RejectRow {
            file: path_text(r.file),
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

    /// A file's outcome and counts, in `store.files` (the rejects held back first).
    pub(super) fn record_file(&mut self, file: &FileEntry, c: &FileCounts, outcome: &FileOutcome) -> Result<Flow> {
        self.flush_rejects()?;
        let (state, error) = match outcome {
            FileOutcome::Read => ("read", None),
            FileOutcome::Changed => ("changed", None),
            FileOutcome::Failed(why) => ("failed", Some(why.as_str())),
        };
        let path = path_text(&file.path);
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

    /// The leader's phase changed: in the status at once (and when inserting begins).
    pub(super) fn enter_phase(&mut self, phase: Phase) -> Result<Flow> {
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

    /// Write the status if one is due.
    pub(super) fn status_if_due(&mut self) -> Result<Flow> {
        if self.last_status.elapsed() < STATUS_EVERY {
            return Ok(Flow::Continue);
        }
        self.status_now()
    }
}
