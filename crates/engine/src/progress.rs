//! Live counters of a run. Every field is an atomic so that another thread (a status
//! reporter, the extension's main loop) can read a consistent-enough snapshot at any
//! time without locking the pipeline.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use serde::Serialize;

/// Records between two progress ticks (and chances for the consumer to stop the run).
pub(crate) const TICK_EVERY: u64 = 4096;

/// Where a run is, in the order a run passes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the files (and, in exact mode, sorting and spilling full chunks).
    Scanning,
    /// Sorting the last chunk.
    Sorting,
    /// Merging more runs than the fan-in into fewer, longer ones.
    Merging,
    /// Handing batches to the sink.
    Inserting,
    /// Finished.
    Done,
}

impl Phase {
    const ALL: [Phase; 5] = [Phase::Scanning, Phase::Sorting, Phase::Merging, Phase::Inserting, Phase::Done];

    /// The phase's name, as `store.jobs.phase` has it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Scanning => "scanning",
            Phase::Sorting => "sorting",
            Phase::Merging => "merging",
            Phase::Inserting => "inserting",
            Phase::Done => "done",
        }
    }
}

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Counters shared between the pipeline and its observers.
        #[derive(Debug, Default)]
        pub struct Progress {
            phase: AtomicU8,
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        /// A plain copy of [`Progress`] at one instant.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        pub struct Snapshot {
            /// The phase.
            pub phase: Phase,
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Progress {
            /// Every counter, read now (each on its own: a consistent-enough view).
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { phase: self.phase(), $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    files_total: "Input files found.",
    files_done: "Input files read to the end (or failed).",
    files_failed: "Files that could not be decoded, or had vanished or been swapped since listed; the run went on without them.",
    files_changed: "Files read to the end that had changed since they were listed.",
    entries_ignored: "Entries the walk passes over by design: hidden names, symbolic links, special files.",
    bytes_total: "Bytes of input on disk (compressed size for compressed files).",
    bytes_read: "Bytes of input read so far, on disk.",
    records: "Non-empty records seen (accepted + rejected).",
    empty: "Empty records skipped.",
    rejected: "Records rejected as invalid (each one reported).",
    filtered: "Valid records dropped by the filter stage.",
    duplicates: "Valid records dropped as repeats of another one.",
    distinct: "Distinct records emitted.",
    runs_written: "Sorted runs spilled to temporary files (including intermediate merge levels).",
    temp_bytes: "Bytes currently held in temporary files.",
    temp_peak: "Largest number of bytes held in temporary files at once.",
    memory_peak: "Largest private memory of the process (RssAnon + RssFile) when the sort held the most: as each run was written.",
}

impl Progress {
    /// The phase the run is in.
    pub fn phase(&self) -> Phase {
        Phase::ALL[self.phase.load(Relaxed) as usize]
    }

    /// Move the run to phase `p`. The engine does it as it goes; a consumer may mark a
    /// phase of its own (the extension's, after the engine's `Done`).
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }

    /// Add `n` to one of the counters (`Progress::add(&progress.bytes_total, n)`).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Temporary files grew by `n` bytes.
    pub(crate) fn temp_grew(&self, n: u64) {
        let now = self.temp_bytes.fetch_add(n, Relaxed) + n;
        self.temp_peak.fetch_max(now, Relaxed);
    }

    /// Note the process's private memory now, where the pipeline holds the most.
    pub(crate) fn note_memory(&self) {
        self.memory_peak.fetch_max(crate::limits::private_rss().unwrap_or(0), Relaxed);
    }

    /// Temporary files shrank by `n` bytes.
    pub(crate) fn temp_shrank(&self, n: u64) {
        let _ = self.temp_bytes.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_serialises_and_tracks_temp_peak() {
        let p = Progress::default();
        p.set_phase(Phase::Merging);
        Progress::add(&p.records, 5);
        p.temp_grew(10);
        p.temp_grew(5);
        p.temp_shrank(12);
        let s = p.snapshot();
        assert_eq!((s.phase, s.records, s.temp_bytes, s.temp_peak), (Phase::Merging, 5, 3, 15));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"phase\":\"merging\"") && json.contains("\"temp_peak\":15"), "{json}");
    }
}
