//! The ingest engine: everything that reads, normalises, sorts, deduplicates and
//! batches records, with no PostgreSQL in sight.
//!
//! The pipeline, stage by stage:
//!
//! ```text
//! walk ─→ read (decompress, split, normalise) ─→ filter ─┬→ sort: chunks → sorted runs ─→ merge ─→ batch
//!                                                        └→ bloom (approximate mode, one pass)
//! ```
//!
//! Nothing in this module tree may import `pgrx`: `cargo test --lib` covers it with no
//! database, and the `store-dedup` command is built from it alone. The extension
//! (`crate::pg`) drives it through [`pipeline`] and an [`Observer`](pipeline::Observer).

pub mod batch;
pub mod bloom;
pub mod error;
pub mod filter;
pub mod limits;
pub mod merge;
pub mod normalize;
pub mod pipeline;
pub mod progress;
pub mod read;
pub mod sort;
pub mod walk;

#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use pipeline::{Config, Observer};
pub use progress::{Phase, Progress, Snapshot};
