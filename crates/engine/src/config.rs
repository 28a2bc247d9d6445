//! The settings of one run, as plain values: the extension reads them from its GUCs,
//! `store-dedup` from its command line.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::batch::{
    AdaptiveBatcher, DEFAULT_BATCH_MAX, DEFAULT_BATCH_MAX_BYTES, DEFAULT_BATCH_MIN, DEFAULT_BATCH_TARGET,
    DISTRIBUTED_BATCH_START,
};
use super::error::{Error, Result};
use super::filter::Filter;
use super::limits::{self, Budget};
use super::normalize::LineLimit;
use super::read::{Codec, READ_BUFFER};
use super::walk::FileEntry;

/// Default number of runs merged at once (open files during the merge).
pub(crate) const DEFAULT_FAN_IN: usize = 128;

/// How repeats are found (`store_ingest`'s `dedup`, `store-dedup --dedup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// External sort and merge: exact, output in bytewise order, resumable by key.
    Exact,
    /// One pass through a Bloom filter: approximate (may drop a new record), input order.
    Bloom,
}

impl Dedup {
    /// The mode's name, as [`Dedup::from_str`](std::str::FromStr) parses it.
    pub fn as_str(self) -> &'static str {
        match self {
            Dedup::Exact => "exact",
            Dedup::Bloom => "bloom",
        }
    }
}

impl FromStr for Dedup {
    type Err = Error;

    fn from_str(s: &str) -> Result<Dedup> {
        match s {
            "exact" => Ok(Dedup::Exact),
            "bloom" => Ok(Dedup::Bloom),
            _ => Err(Error::Config(format!("dedup must be 'exact' or 'bloom', not '{s}'"))),
        }
    }
}

/// A fault to inject, for tests of what happens when the engine itself breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The merge thread panics after emitting this many records.
    MergePanic {
        /// Records emitted before the panic.
        after: u64,
    },
    /// Every spilled run gets its first byte overwritten with 0xFF (a disk that
    /// returns garbage): the records read back must be refused, not passed on.
    CorruptRuns,
    /// For the consumer, not the engine: a batch it writes to a file for `COPY` (a Citus
    /// target's) loses its last line there, as a file cut short at a row's end would.
    ShortCopyFile,
}

impl FromStr for Fault {
    type Err = Error;

    /// `merge_panic:N`, `corrupt_runs` or `short_copy_file`.
    fn from_str(s: &str) -> Result<Fault> {
        match s {
            "corrupt_runs" => return Ok(Fault::CorruptRuns),
            "short_copy_file" => return Ok(Fault::ShortCopyFile),
            _ => {}
        }
        match s.split_once(':') {
            Some(("merge_panic", n)) => n
                .trim()
                .parse()
                .map(|after| Fault::MergePanic { after })
                .map_err(|_| Error::Config(format!("fault {s:?}"))),
            _ => Err(Error::Config(format!(
                "unknown fault {s:?}: expected merge_panic:N, corrupt_runs or short_copy_file"
            ))),
        }
    }
}

/// How the consumer's batches are sized. The engine aims each batch at a latency: from
/// the last batches' sizes and times it fits a fixed cost per batch and a cost per row,
/// and sizes the next one to take the larger of `target` and ten times the fixed cost
/// (so that the fixed cost stays under a tenth), within `[min, max]` records and
/// `max_bytes`; a step at most quadruples or halves the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Records in a batch at least (but for the last).
    pub min: usize,
    /// Records in a batch at most.
    pub max: usize,
    /// Time one batch should take the consumer.
    pub target: Duration,
    /// Bytes of records in one batch at most.
    pub max_bytes: usize,
    /// Records in the first batch (raised to `min`, lowered to `max`).
    pub start: usize,
}

impl BatchLimits {
    /// The defaults, as a constant (for settings whose defaults must be known at compile
    /// time): 100 to 50,000 records, 250 ms, 16 MiB, starting at 100.
    pub const DEFAULT: BatchLimits = BatchLimits {
        min: DEFAULT_BATCH_MIN,
        max: DEFAULT_BATCH_MAX,
        target: DEFAULT_BATCH_TARGET,
        max_bytes: DEFAULT_BATCH_MAX_BYTES,
        start: DEFAULT_BATCH_MIN,
    };

    /// The batcher that sizes batches within these limits.
    pub(crate) fn batcher(&self) -> AdaptiveBatcher {
        AdaptiveBatcher::starting_at(self.start, self.min, self.max, self.target)
    }

    /// For a distributed target, where each batch is a distributed transaction with a
    /// fixed cost of its own: starting at 10,000 rows (a ramp from 100 cost a dozen
    /// distributed transactions for the first million rows), up to a million rows, and
    /// as many bytes as an eighth of the memory budget allows (16 to 64 MiB).
    pub fn distributed(self, memory_limit: u64) -> BatchLimits {
        BatchLimits {
            start: self.start.max(DISTRIBUTED_BATCH_START),
            max: self.max.max(1_000_000),
            max_bytes: ((memory_limit / 8) as usize).clamp(16 << 20, 64 << 20),
            ..self
        }
    }
}

impl BatchLimits {
    /// No more bytes in a batch than an eighth of the memory budget (1 MiB at least):
    /// a batch is held while it goes into the target, and the merge works up to a
    /// batch's bytes ahead of it.
    pub fn within_memory(self, memory_limit: u64) -> BatchLimits {
        BatchLimits { max_bytes: self.max_bytes.min(((memory_limit / 8) as usize).max(1 << 20)), ..self }
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits::DEFAULT
    }
}

/// Settings of one run. [`Config::default`] is every documented default: a fifth of
/// physical memory, half the cores, the system's temporary directory, 64 KiB records,
/// exact mode, no filter, [`BatchLimits::DEFAULT`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Memory budget of the whole pipeline, in bytes.
    pub memory_limit: u64,
    /// Sort threads.
    pub threads: usize,
    /// Where sorted runs are spilled.
    pub temp_dir: PathBuf,
    /// Longest accepted record.
    pub limit: LineLimit,
    /// zstd-compress spilled runs: less temporary disk, more CPU.
    pub compress_runs: bool,
    /// Most runs merged at once.
    pub fan_in: usize,
    /// Which valid records are kept.
    pub filter: Filter,
    /// How repeats are found.
    pub dedup: Dedup,
    /// Bloom mode: the filter's false-positive rate.
    pub bloom_fpr: f64,
    /// Bloom mode: distinct records to size the filter for; default one per 32 bytes of input.
    pub bloom_expected: Option<u64>,
    /// How the sink's batches are sized.
    pub batch: BatchLimits,
    /// Override of the chunk size derived from `memory_limit` (tests use it to force
    /// many runs).
    pub chunk_bytes: Option<usize>,
    /// Bytes asked of the OS per read of an input file (4 MiB).
    pub read_buffer: usize,
    /// Refuse to start when the temporary directory looks too small for the spill.
    pub check_space: bool,
    /// A fault to inject (tests only).
    pub fault: Option<Fault>,
    /// Merges of one sort that run at once (a job's insert ranges, each in its process):
    /// they share the read-ahead the budget leaves for the merge, each a `1/merges` of it.
    pub merges: usize,
}

impl Default for Config {
    fn default() -> Config {
        let memory_limit = (limits::system_memory() as f64 * limits::DEFAULT_MEMORY_PERCENT / 100.0) as u64;
        Config {
            memory_limit: memory_limit.max(limits::MIN_MEMORY),
            threads: limits::default_threads(),
            temp_dir: std::env::temp_dir(),
            limit: LineLimit::DEFAULT,
            compress_runs: false,
            fan_in: DEFAULT_FAN_IN,
            filter: Filter::default(),
            dedup: Dedup::Exact,
            bloom_fpr: 0.01,
            bloom_expected: None,
            batch: BatchLimits::default(),
            chunk_bytes: None,
            read_buffer: READ_BUFFER,
            check_space: true,
            fault: None,
            merges: 1,
        }
    }
}

impl Config {
    /// How the memory limit is split between the stages.
    pub(crate) fn budget(&self) -> Budget {
        let mut b = Budget::split(self.memory_limit, self.fan_in);
        if let Some(c) = self.chunk_bytes {
            b.chunk_bytes = c;
        }
        b
    }

    /// Fail early if the temporary directory cannot hold the spill of `files`. The
    /// estimate is the decoded input size (compressed files count 4×, a typical ratio
    /// for text), halved for compressed runs; input that fits in memory needs none.
    pub(crate) fn check_temp_space(&self, files: &[FileEntry]) -> Result<()> {
        let decoded: u64 = files
            .iter()
            .map(|f| if Codec::for_path(&f.path) == Codec::Plain { f.size } else { f.size.saturating_mul(4) })
            .sum();
        if !self.check_space || decoded <= 2 * self.budget().chunk_bytes as u64 {
            return Ok(());
        }
        let need = if self.compress_runs { decoded / 2 } else { decoded };
        let free = limits::free_space(&self.temp_dir)?;
        if free < need {
            return Err(Error::NoTempSpace { path: self.temp_dir.clone(), need, free });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_faults_parse() {
        assert_eq!("exact".parse::<Dedup>().unwrap(), Dedup::Exact);
        assert_eq!("bloom".parse::<Dedup>().unwrap().as_str(), "bloom");
        assert!("fuzzy".parse::<Dedup>().unwrap_err().to_string().contains("dedup must be 'exact' or 'bloom'"));
        assert_eq!("merge_panic:10".parse::<Fault>().unwrap(), Fault::MergePanic { after: 10 });
        assert_eq!("short_copy_file".parse::<Fault>().unwrap(), Fault::ShortCopyFile);
        assert!("nope".parse::<Fault>().is_err());
    }

    #[test]
    fn batches_hold_no_more_than_an_eighth_of_the_memory_budget() {
        let d = BatchLimits::DEFAULT;
        assert_eq!(d.within_memory(256 << 20).max_bytes, d.max_bytes, "16 MiB within 256 MB");
        assert_eq!(d.within_memory(16 << 20).max_bytes, 2 << 20);
        assert_eq!(d.within_memory(1 << 20).max_bytes, 1 << 20, "1 MiB at least");
        assert_eq!(d.distributed(16 << 20).within_memory(16 << 20).max_bytes, 2 << 20);
        assert_eq!(d.distributed(1 << 30).within_memory(1 << 30).max_bytes, 64 << 20);
    }
}
