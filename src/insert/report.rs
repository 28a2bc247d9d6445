//! What an inserter reports besides its batches: the job's counters in `store.jobs` (the
//! leader's) or its range's memory peak (an inserter's), the rejects, each file's
//! outcome, and the phase; all in transactions of their own, each checking the claim.

use std::time::{Duration, Instant};

use store_engine::{path_text, FileCounts, FileEntry, FileOutcome, Flow, Phase, Reject};

use super::{Inserter, Role};
use crate::error::{Result, StoreError};
use crate::tables::{checkpoints, files, jobs, rejects};
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
            checkpoints::note_memory(self.job.id, self.range, mem)?;
            return self.cancel_requested();
        }
        let p = self.progress.snapshot();
        let scan_percent = 60.0 * p.bytes_read as f32 / p.bytes_total.max(1) as f32;
        let n = |v: u64| v as i64;
        let counters = jobs::Counters {
            phase: p.phase.as_str(),
            files_done: n(p.files_done),
            bytes_read: n(p.bytes_read),
            records: n(p.records),
            empty: n(p.empty),
            rejected: n(p.rejected),
            filtered: n(p.filtered),
            duplicates: n(p.duplicates),
            scan_percent,
            batch_size: self.batch_size,
            memory_peak: mem,
            temp_bytes: n(p.temp_peak),
            insert_total: n(self.insert_total),
        };
        jobs::write_status(self.job.id, self.job.claim, &counters)
    }

    pub(super) fn cancel_requested(&self) -> Result<bool> {
        jobs::cancel_flag(self.job.id)
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
            rejects::insert(job, claim, files, lines, offsets, reasons, raws)
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
        let o = files::Outcome {
            state,
            records: n(c.records),
            empty: n(c.empty),
            rejected: n(c.rejected),
            filtered: n(c.filtered),
            accepted: n(c.accepted),
            error,
        };
        transaction(|| files::record_outcome(self.job.id, self.job.claim, &path, &o))?;
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
            self.mark_insert_started()?;
        }
        self.status_now()
    }

    /// This attempt begins inserting: recorded once (by the leader), with the lines
    /// earlier attempts committed, for the status's rate. A leader whose ranges are all
    /// with inserters records it before it waits for them.
    pub fn mark_insert_started(&mut self) -> Result<()> {
        if self.role == Role::Helper || self.insert_marked {
            return Ok(());
        }
        self.insert_marked = true;
        let id = self.job.id;
        transaction(|| jobs::mark_insert_started(id))
    }

    /// Write the status if one is due.
    pub(super) fn status_if_due(&mut self) -> Result<Flow> {
        if self.last_status.elapsed() < STATUS_EVERY {
            return Ok(Flow::Continue);
        }
        self.status_now()
    }
}
