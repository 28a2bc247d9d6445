//! Reading every listed file into records: open it through the [`Tree`], decode, split,
//! normalise, filter. Each valid record that passes the filter goes to `accept`; every
//! invalid one is reported to the sink as a [`Reject`]. A file that cannot be opened or
//! read any more (vanished, swapped for a link or a FIFO, unreadable, damaged
//! compression, an I/O error) is reported as failed and the scan goes on with the next.

use std::path::Path;

use serde::Serialize;

use super::config::Config;
use super::error::Error;
use super::normalize::{self, RejectReason, Verdict};
use super::progress::{Progress, TICK_EVERY};
use super::read::{self, Codec, RawLine, REJECT_PREFIX};
use super::stream::{Halt, Sink};
use super::walk::{FileEntry, Identity, Tree};

/// A rejected record, as reported to the [`Sink`].
#[derive(Debug, Serialize)]
pub struct Reject<'a> {
    /// The file it is in.
    pub file: &'a Path,
    /// Its line number in the decoded file, from 1.
    pub line: u64,
    /// The byte offset of its first byte in the decoded file.
    pub offset: u64,
    /// Why it was rejected.
    pub reason: RejectReason,
    /// At most [`REJECT_PREFIX`] raw bytes of the record.
    #[serde(skip)]
    pub prefix: &'a [u8],
}

/// Counts for one file.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct FileCounts {
    /// Non-empty records (accepted, rejected or filtered).
    pub records: u64,
    /// Empty records, skipped.
    pub empty: u64,
    /// Invalid records, each reported.
    pub rejected: u64,
    /// Valid records the filter dropped.
    pub filtered: u64,
    /// Valid records that passed the filter (repeats included).
    pub accepted: u64,
}

/// How reading one file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    /// Read to the end, and it is still the file that was listed.
    Read,
    /// Read to the end, but it changed while (or before) it was read: its records are
    /// in, and the next run should read it again.
    Changed,
    /// Could not be opened or read to the end; the records read before the failure are in.
    Failed(String),
}

/// Whether the file read (`now`, its state when reading ended) is still the one listed.
fn outcome(listed: &FileEntry, now: std::io::Result<Identity>) -> FileOutcome {
    match now {
        Ok(id) if id == listed.identity() => FileOutcome::Read,
        _ => FileOutcome::Changed,
    }
}

/// Where a valid record that passed the filter goes; it may use the sink too.
pub(crate) type Accept<'a, S> = dyn FnMut(&[u8], &mut S) -> Result<(), Halt<<S as Sink>::Error>> + 'a;

/// Read `files` of `tree`, calling `accept` for each valid record that passes the filter.
pub(crate) fn scan<S: Sink>(
    cfg: &Config,
    tree: &Tree,
    files: &[FileEntry],
    progress: &Progress,
    sink: &mut S,
    accept: &mut Accept<'_, S>,
) -> Result<(), Halt<S::Error>> {
    for file in files {
        tick(sink, progress)?;
        let mut counts = FileCounts::default();
        let outcome = match tree.open_file(&file.path) {
            Err(e) => FileOutcome::Failed(format!(
                "could not open {}: {e} (changed since it was listed)",
                file.path.display()
            )),
            Ok(f) => match read_file(cfg, &f, file, &mut counts, progress, sink, accept) {
                Ok(()) => outcome(file, Identity::of(&f)),
                // The file's own fault (damaged compression, an I/O error on it): it
                // fails alone, keeping what was read before, as `zcat` prints it.
                Err(Halt::Engine(Error::Io { op, path, source })) if path == file.path => {
                    let op = if Codec::for_path(&file.path) != Codec::Plain && op == "could not read" {
                        "could not decode"
                    } else {
                        op
                    };
                    FileOutcome::Failed(format!("{op} {}: {source}", path.display()))
                }
                Err(e) => return Err(e),
            },
        };
        Progress::add(&progress.files_done, 1);
        match outcome {
            FileOutcome::Failed(_) => Progress::add(&progress.files_failed, 1),
            FileOutcome::Changed => Progress::add(&progress.files_changed, 1),
            FileOutcome::Read => {}
        }
        sink.file_done(file, &counts, &outcome).map_err(Halt::Sink)?.into_result()?;
    }
    Ok(())
}

/// Read one opened file through to its end.
fn read_file<S: Sink>(
    cfg: &Config,
    f: &std::fs::File,
    file: &FileEntry,
    counts: &mut FileCounts,
    progress: &Progress,
    sink: &mut S,
    accept: &mut Accept<'_, S>,
) -> Result<(), Halt<S::Error>> {
    let mut flushed = FileCounts::default();
    let mut since_tick = 0u64;
    let mut input = read::decoder(f, &file.path, &progress.bytes_read)?;
    let res = read::split_lines(&mut *input, &file.path, cfg.limit.bytes, cfg.read_buffer, |l: RawLine<'_>| {
        record(cfg, file, &l, counts, sink, accept)?;
        since_tick += 1;
        if since_tick == TICK_EVERY {
            since_tick = 0;
            flush(progress, counts, &mut flushed);
            tick(sink, progress)?;
        }
        Ok(())
    });
    flush(progress, counts, &mut flushed);
    res
}

/// Classify one raw record and pass it on.
fn record<S: Sink>(
    cfg: &Config,
    file: &FileEntry,
    l: &RawLine<'_>,
    counts: &mut FileCounts,
    sink: &mut S,
    accept: &mut Accept<'_, S>,
) -> Result<(), Halt<S::Error>> {
    match normalize::verdict(l, cfg.limit) {
        Verdict::Empty => counts.empty += 1,
        Verdict::Reject(reason) => {
            counts.records += 1;
            counts.rejected += 1;
            let prefix = &l.bytes[..l.bytes.len().min(REJECT_PREFIX)];
            let r = Reject { file: &file.path, line: l.line, offset: l.offset, reason, prefix };
            sink.reject(&r).map_err(Halt::Sink)?.into_result()?;
        }
        Verdict::Accept(rec) => {
            counts.records += 1;
            if cfg.filter.keep(rec) {
                counts.accepted += 1;
                accept(rec.as_bytes(), sink)?;
            } else {
                counts.filtered += 1;
            }
        }
    }
    Ok(())
}

fn tick<S: Sink>(sink: &mut S, progress: &Progress) -> Result<(), Halt<S::Error>> {
    sink.tick(progress).map_err(Halt::Sink)?.into_result()
}

/// Add what `counts` gained since the last flush to the shared progress.
fn flush(progress: &Progress, counts: &FileCounts, flushed: &mut FileCounts) {
    Progress::add(&progress.records, counts.records - flushed.records);
    Progress::add(&progress.empty, counts.empty - flushed.empty);
    Progress::add(&progress.rejected, counts.rejected - flushed.rejected);
    Progress::add(&progress.filtered, counts.filtered - flushed.filtered);
    *flushed = counts.clone();
}
