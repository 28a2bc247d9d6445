//! One error type for the engine. Every I/O error carries the path it happened on,
//! because "No space left on device" alone does not tell a DBA which disk to look at.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an input file, or writing/reading a temporary run, failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The caller asked the run to stop.
    #[error("cancelled")]
    Cancelled,
    /// A setting is out of range or malformed (memory limit, regular expression, ...).
    #[error("invalid setting: {0}")]
    Config(String),
    /// The temporary directory cannot hold the spill this run needs.
    #[error("not enough temporary space in {path}: need about {need} bytes, {free} bytes free")]
    NoTempSpace { path: PathBuf, need: u64, free: u64 },
}

impl Error {
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io { op, path: path.to_path_buf(), source }
    }
}

/// Attach an operation and a path to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
