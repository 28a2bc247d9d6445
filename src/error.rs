//! One error type for everything the extension does, and the one place where each kind
//! of failure gets its SQLSTATE: a refusal raised to a caller, an error that fails a
//! job (and is stored in `store.jobs.sqlstate`), or a transient one worth a retry.

use std::fmt;
use std::io::ErrorKind;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::PgLogLevel;
use store_engine::PathRefusal;

use PgSqlErrorCode::*;

#[derive(Debug)]
pub enum StoreError {
    /// A caller's mistake or a missing privilege, found before anything happened.
    Refused { code: PgSqlErrorCode, message: String, hint: Option<String> },
    /// An ERROR PostgreSQL raised inside one of our transactions.
    Sql { code: PgSqlErrorCode, message: String, detail: Option<String>, hint: Option<String> },
    /// The engine failed: reading, spilling, sorting.
    Engine(store_engine::Error),
    /// `store_cancel` asked the job to stop.
    Cancelled,
    /// The server is shutting down (SIGTERM): the job stays running and resumes later.
    Shutdown,
    /// Another worker claimed this job (its claim number moved on): this one must stop
    /// without touching it.
    Fenced,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub fn refused(code: PgSqlErrorCode, message: impl Into<String>) -> StoreError {
        StoreError::Refused { code, message: message.into(), hint: None }
    }

    pub fn with_hint(self, hint: impl Into<String>) -> StoreError {
        match self {
            StoreError::Refused { code, message, .. } => StoreError::Refused { code, message, hint: Some(hint.into()) },
            StoreError::Sql { code, message, detail, .. } => {
                StoreError::Sql { code, message, detail, hint: Some(hint.into()) }
            }
            other => other,
        }
    }

    /// An internal inconsistency (a query that returned nothing where a row must be).
    pub fn internal(message: impl Into<String>) -> StoreError {
        StoreError::Sql { code: ERRCODE_INTERNAL_ERROR, message: message.into(), detail: None, hint: None }
    }

    /// The SQLSTATE of this error.
    pub fn code(&self) -> PgSqlErrorCode {
        match self {
            StoreError::Refused { code, .. } | StoreError::Sql { code, .. } => *code,
            StoreError::Engine(e) => engine_code(e),
            StoreError::Cancelled => ERRCODE_QUERY_CANCELED,
            StoreError::Shutdown => ERRCODE_ADMIN_SHUTDOWN,
            StoreError::Fenced => ERRCODE_LOCK_NOT_AVAILABLE,
        }
    }

    /// The five-character SQLSTATE, as stored in `store.jobs.sqlstate`.
    pub fn sqlstate(&self) -> String {
        sqlstate_text(self.code())
    }

    /// Serialization failure, deadlock, lock timeout: worth retrying the batch.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Sql {
                code: ERRCODE_T_R_SERIALIZATION_FAILURE | ERRCODE_T_R_DEADLOCK_DETECTED | ERRCODE_LOCK_NOT_AVAILABLE,
                ..
            }
        )
    }

    /// A statement interrupted by a cancel: `store_cancel`'s SIGUSR2, SIGTERM's, or
    /// someone's `pg_cancel_backend`; a cancel of the job only if its
    /// `cancel_requested` says so.
    pub fn is_query_canceled(&self) -> bool {
        matches!(self, StoreError::Sql { code: ERRCODE_QUERY_CANCELED, .. })
    }

    /// The connection to another server failed (a Citus node restarting).
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Sql {
                code: ERRCODE_CONNECTION_EXCEPTION
                    | ERRCODE_CONNECTION_FAILURE
                    | ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
                    | ERRCODE_SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
                ..
            }
        )
    }

    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Sql { code: ERRCODE_UNIQUE_VIOLATION, .. })
    }

    /// A row a unique index or an exclusion constraint refused: what `ON CONFLICT DO
    /// NOTHING`, with no conflict target, would have skipped.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Sql { code: ERRCODE_UNIQUE_VIOLATION | ERRCODE_EXCLUSION_VIOLATION, .. })
    }

    /// COPY cannot serve the target any more: row-level security was turned on (COPY FROM
    /// refuses it), or rules were created (COPY would not apply them), during the job.
    pub fn is_copy_refused(&self) -> bool {
        matches!(
            self,
            StoreError::Sql { code: ERRCODE_FEATURE_NOT_SUPPORTED, .. }
                | StoreError::Refused { code: ERRCODE_FEATURE_NOT_SUPPORTED, .. }
        )
    }

    /// An error Citus raises without the SQLSTATE of its cause: the error a shard's COPY
    /// reported (a unique violation among them) comes back as XX000.
    pub fn is_internal(&self) -> bool {
        matches!(self, StoreError::Sql { code: ERRCODE_INTERNAL_ERROR, .. })
    }

    /// The error without its DETAIL: for an error raised while the target's owner ran a
    /// batch, whose detail may show values of columns (a failing row) the job's owner may
    /// not read; the job's owner sees the message and the SQLSTATE.
    pub fn without_detail(self) -> StoreError {
        match self {
            StoreError::Sql { code, message, hint, .. } => StoreError::Sql { code, message, detail: None, hint },
            other => other,
        }
    }

    /// An internal error (XX000) whose text says a connection to another node was lost
    /// or refused — how Citus reports most node failures. Other XX000s (a feature an
    /// access method lacks, say) are permanent and must not be retried as if a node were
    /// restarting.
    pub fn is_lost_connection(&self) -> bool {
        const SIGNS: [&str; 8] = [
            "connection",
            "could not connect",
            "server closed",
            "terminating",
            "remote node",
            "not accepting",
            "too many clients",
            "the database system is",
        ];
        match self {
            StoreError::Sql { code: ERRCODE_INTERNAL_ERROR, message, .. } => {
                let m = message.to_ascii_lowercase();
                SIGNS.iter().any(|s| m.contains(s))
            }
            _ => false,
        }
    }

    /// Citus's "failed to COPY to shard" when a node went away mid-batch (58030).
    pub fn is_io_error(&self) -> bool {
        matches!(self, StoreError::Sql { code: ERRCODE_IO_ERROR, .. })
    }

    /// The table or column a job names is gone (dropped, renamed): for a catalog probe
    /// that must say so rather than fail oddly.
    pub fn is_undefined_object(&self) -> bool {
        matches!(
            self,
            StoreError::Sql { code: ERRCODE_UNDEFINED_TABLE | ERRCODE_UNDEFINED_COLUMN | ERRCODE_UNDEFINED_OBJECT, .. }
        )
    }

    /// Raise this error to the SQL caller. Never returns.
    pub fn raise(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("an ERROR does not return")
    }
}

/// SQLSTATEs for the engine's failures: what a DBA would look up.
fn engine_code(e: &store_engine::Error) -> PgSqlErrorCode {
    use store_engine::Error as E;
    match e {
        E::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound => ERRCODE_UNDEFINED_FILE,
            ErrorKind::PermissionDenied => ERRCODE_INSUFFICIENT_PRIVILEGE,
            ErrorKind::StorageFull => ERRCODE_DISK_FULL,
            _ if source.raw_os_error() == Some(libc::EDQUOT) => ERRCODE_DISK_FULL,
            _ if source.raw_os_error() == Some(libc::ELOOP) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            _ => ERRCODE_IO_ERROR,
        },
        E::NoTempSpace { .. } => ERRCODE_DISK_FULL,
        E::Config(_) => ERRCODE_INVALID_PARAMETER_VALUE,
        E::Insecure { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
        E::Corrupt(_) => ERRCODE_DATA_CORRUPTED,
        E::Internal(_) | E::Stopped => ERRCODE_INTERNAL_ERROR,
    }
}

/// The five-character SQLSTATE of an error code.
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let code = code as i32;
    // MAKE_SQLSTATE packs five 6-bit characters, first character lowest.
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

/// The error code of a five-character SQLSTATE (one recorded by another process).
pub fn code_of_sqlstate(s: &str) -> PgSqlErrorCode {
    let b = s.as_bytes();
    if b.len() != 5 {
        return ERRCODE_INTERNAL_ERROR;
    }
    // MAKE_SQLSTATE: five 6-bit characters, first character lowest.
    let code = b.iter().enumerate().map(|(i, &c)| ((c.wrapping_sub(b'0') as i32) & 0x3F) << (6 * i)).sum::<i32>();
    PgSqlErrorCode::from(code)
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Refused { message, .. } => f.write_str(message),
            StoreError::Sql { message, detail, .. } => match detail {
                Some(d) => write!(f, "{message} ({d})"),
                None => f.write_str(message),
            },
            StoreError::Engine(e) => write!(f, "{e}"),
            StoreError::Cancelled => f.write_str("cancelled by store.cancel"),
            StoreError::Shutdown => f.write_str("stopping for server shutdown"),
            StoreError::Fenced => f.write_str("another worker claimed the job"),
        }
    }
}

impl From<store_engine::Error> for StoreError {
    fn from(e: store_engine::Error) -> Self {
        StoreError::Engine(e)
    }
}

impl From<CaughtError> for StoreError {
    fn from(e: CaughtError) -> Self {
        match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                StoreError::Sql {
                    code: r.sql_error_code(),
                    message: r.message().to_string(),
                    detail: r.detail().map(str::to_string),
                    hint: r.hint().map(str::to_string),
                }
            }
        }
    }
}

impl From<pgrx::spi::SpiError> for StoreError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        StoreError::internal(format!("SPI: {e}"))
    }
}

impl From<PathRefusal> for StoreError {
    fn from(r: PathRefusal) -> Self {
        let code = match &r {
            PathRefusal::NotAbsolute(_) | PathRefusal::NotFileOrDirectory(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            PathRefusal::Inaccessible { error, .. } => match error.kind() {
                ErrorKind::NotFound => ERRCODE_UNDEFINED_FILE,
                ErrorKind::PermissionDenied => ERRCODE_INSUFFICIENT_PRIVILEGE,
                _ => ERRCODE_IO_ERROR,
            },
            PathRefusal::PseudoFileSystem(_) | PathRefusal::OutsideAllowed { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
        };
        StoreError::Refused { code, message: r.to_string(), hint: r.hint() }
    }
}

impl From<StoreError> for ErrorReport {
    fn from(e: StoreError) -> Self {
        let code = e.code();
        let (message, detail, hint) = match e {
            StoreError::Refused { message, hint, .. } => (message, None, hint),
            StoreError::Sql { message, detail, hint, .. } => (message, detail, hint),
            other => (other.to_string(), None, None),
        };
        let mut r = ErrorReport::new(code, message, "pg_store");
        if let Some(d) = detail {
            r = r.set_detail(d);
        }
        if let Some(h) = hint {
            r = r.set_hint(h);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_unpack_and_engine_errors_map() {
        assert_eq!(sqlstate_text(ERRCODE_UNIQUE_VIOLATION), "23505");
        assert_eq!(sqlstate_text(ERRCODE_T_R_DEADLOCK_DETECTED), "40P01");
        let enospc = store_engine::Error::io(
            "could not write",
            std::path::Path::new("/t"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(StoreError::from(enospc).sqlstate(), "53100");
        let eacces = store_engine::Error::io(
            "could not open",
            std::path::Path::new("/t"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(StoreError::from(eacces).sqlstate(), "42501");
        assert_eq!(StoreError::Cancelled.sqlstate(), "57014");
        assert_eq!(code_of_sqlstate("53100"), ERRCODE_DISK_FULL);
        assert_eq!(code_of_sqlstate("nope"), ERRCODE_INTERNAL_ERROR);
    }
}
