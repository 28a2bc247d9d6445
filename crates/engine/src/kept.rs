//! The resumable sort: exact mode in two phases behind one type, [`KeptSort`], for a
//! caller that must survive a crash between them or drain the key space in parallel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::Config;
use super::error::{Error, Result};
use super::merge::KeyRange;
use super::progress::{Phase, Progress};
use super::sorted::{announce, remove_kept, sort_distinct, Keep, Sorted};
use super::stream::{finish, stream_range, Halt, Report, Sink};
use super::walk::{FileEntry, Tree};

/// Exact mode's sort, kept on disk: the files are read, sorted and spilled once into a
/// directory of the caller's ([`KeptSort::sort`]); that directory then holds every run,
/// flushed, and a manifest of them, the files they came from and the scan's counters. A
/// later attempt (after a crash, in another process) reopens it ([`KeptSort::load`])
/// instead of reading and sorting its files again, splits the key space
/// ([`KeptSort::ranges`]) and merges each range into a sink from its last committed key
/// ([`KeptSort::drain`]).
///
/// The caller owns the directory: it creates it ([`private_dir::create`], or the sort
/// does), empties it when the sort is of no more use ([`KeptSort::remove`]), and removes
/// it when the job ends ([`private_dir::remove`]). It is trusted only while it is the
/// caller's own, mode 0700 and no link: anyone who could write in it could hand a later
/// attempt runs of their choosing, so otherwise loading, sorting and emptying refuse
/// with [`Error::Insecure`].
///
/// [`private_dir::create`]: crate::private_dir::create
/// [`private_dir::remove`]: crate::private_dir::remove
pub struct KeptSort {
    sorted: Sorted,
}

impl KeptSort {
    /// Read every file of `files` (listed in `tree`), sort, spill everything (the last
    /// chunk too), flush, and describe the runs in a manifest in `dir` under `spec` —
    /// everything besides the files that decides which records the runs hold (limits,
    /// filter, …). A manifest already there goes first. If a file failed or changed
    /// while it was read, no manifest is written: such a sort is not worth resuming from,
    /// and [`KeptSort::load`] will not find it. The sink is told the phases, every
    /// reject and every file's end; a stop it asks for is [`Error::Stopped`].
    pub fn sort<S: Sink>(
        dir: &Path,
        spec: &str,
        cfg: &Config,
        tree: &Tree,
        files: &[FileEntry],
        progress: &Arc<Progress>,
        sink: &mut S,
    ) -> Result<KeptSort, S::Error> {
        let keep = keep(dir, spec);
        let res = announce(progress, Phase::Scanning, sink)
            .and_then(|()| sort_distinct(cfg, tree, files, Some(&keep), progress, sink));
        match res {
            Ok(sorted) => Ok(KeptSort { sorted }),
            Err(Halt::Stop) => Err(Error::Stopped.into()),
            Err(Halt::Engine(e)) => Err(e.into()),
            Err(Halt::Sink(e)) => Err(e),
        }
    }

    /// The sort kept in `dir`, if it is there, complete, and made under the same `spec`
    /// (and from these very `files`, when given); its scan's counters go into
    /// `progress`. `cfg` is the run's, as for [`KeptSort::sort`]. A directory that is
    /// there but not private is an error ([`Error::Insecure`]), never a sort to load.
    pub fn load(
        dir: &Path,
        spec: &str,
        files: Option<&[FileEntry]>,
        cfg: &Config,
        progress: &Progress,
    ) -> Result<Option<KeptSort>> {
        Ok(Sorted::load(&keep(dir, spec), files, cfg, progress)?.map(|sorted| KeptSort { sorted }))
    }

    /// Empty the kept sort in `dir` (the manifest first, so a crash halfway leaves nothing
    /// that looks complete); links in it are removed, never followed. Nothing there is
    /// fine; a directory that is not private is an error, and is left alone.
    pub fn remove(dir: &Path) -> Result<()> {
        remove_kept(dir)
    }

    /// Sorted runs the merge reads (at most the fan-in).
    pub fn runs(&self) -> usize {
        self.sorted.runs()
    }

    /// Runs the scan spilled (tests compare it with the counters).
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> usize {
        self.sorted.spilled()
    }

    /// Split the key space into at most `n` ranges of about the same amount of data;
    /// fewer when the data is too small to split. Together they cover every key, in
    /// order: the first opens below, the last above.
    pub fn ranges(&self, n: usize) -> Result<Vec<KeyRange>> {
        self.sorted.ranges(n)
    }

    /// The smallest record of the stream, or a prefix of it when it is long (at or below
    /// every record, then), when the runs say (plain runs mark their first record;
    /// compressed ones have no marks): with [`KeptSort::ranges`], what the
    /// extension needs to see whether the stream sorts after everything a target holds.
    pub fn first_key(&self) -> Option<&str> {
        self.sorted.first_key()
    }

    /// `merges` ranges of this sort will be drained at once, each by its own process: they
    /// share the memory the budget leaves for the merges to work ahead.
    pub fn share(&mut self, merges: usize) {
        self.sorted.share(merges);
    }

    /// Stream the distinct records of `range` into `sink`, after `resume_after` (the
    /// last key a previous drain of the range committed). The merge's own counters
    /// (distinct records, repeats met across runs) go into `progress` as the merge finds
    /// them, ahead of the batches the sink has taken: what belongs to a committed batch
    /// is in its [`BatchInfo`](crate::BatchInfo). Any range may be drained any number of
    /// times; the runs stay.
    pub fn drain<S: Sink>(
        &mut self,
        range: &KeyRange,
        resume_after: Option<&[u8]>,
        progress: &Arc<Progress>,
        sink: &mut S,
    ) -> Result<Report, S::Error> {
        let cfg = self.sorted.cfg().clone();
        let report = Report { runs: self.sorted.spilled(), ..Report::default() };
        finish(stream_range(&cfg, &mut self.sorted, range, resume_after, progress, sink), report)
    }
}

fn keep(dir: &Path, spec: &str) -> Keep {
    Keep { dir: PathBuf::from(dir), spec: spec.to_string() }
}
