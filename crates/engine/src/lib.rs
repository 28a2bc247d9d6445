//! pg_store's ingest engine: everything that reads, normalises, sorts, deduplicates and
//! batches records. It has no PostgreSQL in it — this crate does not depend on pgrx, so
//! the extension, `store-dedup`, `store-gen` and the fuzz targets all build on it, and
//! `cargo test -p store-engine` needs no PostgreSQL headers.
//!
//! The pipeline, stage by stage (each stage a private module):
//!
//! ```text
//! paths (check) ─→ walk (open link-free, list) ─→ scan: read (decompress, split) ─→ normalize ─→ filter
//!     ─┬→ sorted: chunks → sort → spilled runs ─→ merge ─┬→ batch ─→ Sink
//!      └→ bloom (approximate mode, one pass) ────────────┘
//! ```
//!
//! # The interface
//!
//! The stages are private; callers see this crate root:
//!
//! - **Settings**: a [`Config`] (its [`Default`] is the documented defaults, and
//!   [`BatchLimits::DEFAULT`] and [`LineLimit::DEFAULT`] are the same values as constants,
//!   for settings that need them at compile time), with its [`Dedup`] mode, [`Filter`],
//!   [`LineLimit`], [`BatchLimits`] and an optional test [`Fault`].
//! - **Input**: [`check_path`] decides whether a path may be read ([`PathRefusal`] says
//!   why not); [`walk`] opens it link-free as a [`Tree`] and lists it ([`Listing`],
//!   [`FileEntry`], [`FailedEntry`], [`SkippedEntry`]); [`path_text`] is a path as text.
//! - **One run**: [`distinct`] streams the distinct records of the files, in either mode,
//!   into a [`Sink`]: [`Texts`] batches with their [`BatchInfo`], each [`Reject`] (and its
//!   [`RejectReason`]), each file's [`FileCounts`] and [`FileOutcome`], the [`Phase`]s;
//!   the sink answers with a [`Flow`]. The counters are in a shared [`Progress`]
//!   ([`Snapshot`] is a copy); what else the run did is its [`Report`] ([`BloomReport`]).
//! - **A resumable sort**: [`KeptSort`] is exact mode in two phases for a caller that
//!   resumes after a crash or drains in parallel: sort once into a kept directory, reload
//!   it later, split it into [`KeyRange`]s and drain each from its last committed key.
//! - **Odds and ends**: [`line_key`] (the unique key of a line, as `store.line_key` has
//!   it), [`parse_memory`] and [`default_threads`] (settings), [`peak_rss`] and
//!   [`private_rss`] (measurements); one [`Error`] type and its [`Result`].
//!
//! Two namespaces stay public, each because its names only read right qualified:
//!
//! - [`private_dir`]: `create`, `ensure`, `remove`, `check_parent` of the private
//!   directories that hold temporary data — verbs too generic for the root, and the
//!   module's documentation is the threat model they answer.
//! - [`lines`]: the line-level contract (the reader's split and the normaliser's verdict
//!   on one raw record) for the fuzz target and the read benchmark; running a pipeline
//!   never needs it.

#![deny(missing_docs, unreachable_pub)]

mod batch;
mod bloom;
mod config;
mod error;
mod filter;
mod kept;
mod key;
mod limits;
mod merge;
mod normalize;
mod paths;
pub mod private_dir;
mod progress;
mod read;
mod scan;
mod sort;
mod sorted;
mod stream;
mod walk;

#[cfg(test)]
mod tests;

pub use batch::Texts;
pub use config::{BatchLimits, Config, Dedup, Fault};
pub use error::{Error, Result};
pub use filter::Filter;
pub use kept::KeptSort;
pub use key::line_key;
pub use limits::{default_threads, parse_memory, peak_rss, private_rss};
pub use merge::KeyRange;
pub use normalize::{LineLimit, RejectReason};
pub use paths::{check_path, PathRefusal};
pub use progress::{Phase, Progress, Snapshot};
pub use scan::{FileCounts, FileOutcome, Reject};
pub use stream::{distinct, BatchInfo, BloomReport, Flow, Report, Sink};
pub use walk::{path_text, walk, FailedEntry, FileEntry, Listing, SkippedEntry, Tree};

pub mod lines {
    //! The line-level contract, for harnesses (the fuzz target, the read benchmark): how
    //! the reader splits a stream into raw records ([`split_lines`]) and what the
    //! normaliser makes of each ([`verdict`]). A pipeline run does both inside
    //! [`distinct`](crate::distinct).

    pub use crate::normalize::{verdict, Verdict};
    pub use crate::read::{split_lines, RawLine, READ_BUFFER, REJECT_PREFIX};
}
