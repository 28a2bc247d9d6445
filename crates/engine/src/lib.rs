//! pg_store's ingest engine: everything that reads, normalises, sorts, deduplicates and
//! batches records. It has no PostgreSQL in it — this crate does not depend on pgrx, so
//! the extension, `store-dedup`, `store-gen` and the fuzz targets all build on it, and
//! `cargo test -p store-engine` needs no PostgreSQL headers.
//!
//! The pipeline, stage by stage:
//!
//! ```text
//! paths (check) ─→ walk (open link-free, list) ─→ scan: read (decompress, split) ─→ normalize ─→ filter
//!     ─┬→ sorted: chunks → sort → spilled runs ─→ merge ─┬→ batch ─→ Sink
//!      └→ bloom (approximate mode, one pass) ────────────┘
//! ```
//!
//! [`stream::distinct`] runs it for either mode and hands batches to a [`Sink`];
//! [`KeptSort`] runs exact mode in two phases, resumable between them.

pub mod batch;
pub mod bloom;
pub mod config;
pub mod error;
pub mod filter;
mod kept;
pub mod key;
pub mod limits;
pub mod merge;
pub mod normalize;
pub mod paths;
pub mod private_dir;
pub mod progress;
pub mod read;
pub mod scan;
pub mod sort;
pub mod sorted;
pub mod stream;
pub mod walk;

#[cfg(test)]
mod tests;

pub use config::{Config, Dedup};
pub use error::{Error, Result};
pub use kept::KeptSort;
pub use progress::{Phase, Progress, Snapshot};
pub use stream::{distinct, BatchInfo, Flow, Sink};
