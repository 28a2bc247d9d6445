//! One error type for the engine. Every I/O error carries the path it happened on,
//! because "No space left on device" alone does not tell a DBA which disk to look at.

use std::io;
use std::path::{Path, PathBuf};

/// A result whose error is the engine's, unless said otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine. A consumer's own errors are its own type
/// ([`Sink::Error`](crate::Sink::Error)), into which these convert.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an input file, or writing/reading a temporary run, failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done: "could not open", "could not write", …
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A setting is out of range or malformed (memory limit, regular expression, ...).
    #[error("invalid setting: {0}")]
    Config(String),
    /// The temporary directory cannot hold the spill this run needs.
    #[error("not enough temporary space in {path}: need about {need} bytes, {free} bytes free")]
    NoTempSpace {
        /// The temporary directory.
        path: PathBuf,
        /// Bytes the spill is estimated to need.
        need: u64,
        /// Bytes free there.
        free: u64,
    },
    /// Data the engine wrote itself came back damaged (a temporary run with invalid
    /// UTF-8, a NUL byte or a cut record): a disk error or a bug, never the input's fault.
    #[error("corrupt temporary data: {0}")]
    Corrupt(String),
    /// A temporary directory or file is not one the engine may trust: a name it was
    /// about to create exists already, or a directory is a link, belongs to another
    /// user or lets others in, or the directory holding job directories lets others
    /// rename them (see [`private_dir`](crate::private_dir)). Another user may be after
    /// a job's data: the extension reports it as insufficient privilege (SQLSTATE 42501).
    #[error("unsafe temporary directory {path}: {reason}")]
    Insecure {
        /// The directory or file refused.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A thread of the engine died (a panic) or could not be started.
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine's own threads were told to stop because the run is ending early.
    #[error("stopped")]
    Stopped,
}

impl Error {
    /// An I/O error: doing `op` to `path` failed with `source`.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io { op, path: path.to_path_buf(), source }
    }

    /// An error for a thread that panicked, with the panic's message when it has one.
    pub fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> Error {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Error::Internal(format!("{what} panicked: {msg}"))
    }
}

/// Attach an operation and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
