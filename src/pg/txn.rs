//! Transactions in a background worker, with errors caught instead of killing the
//! process. `BackgroundWorker::transaction` lets an ERROR unwind through it; here an
//! error aborts the transaction, leaves the worker in a clean state and comes back as
//! a value the caller can retry, record or report.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

/// An error raised inside a transaction, with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct PgError {
    pub sqlstate: String,
    pub message: String,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

impl PgError {
    /// Serialization failure, deadlock, lock timeout: worth a retry.
    pub fn is_transient(&self) -> bool {
        matches!(self.sqlstate.as_str(), "40001" | "40P01" | "55P03")
    }

    pub fn is_unique_violation(&self) -> bool {
        self.sqlstate == "23505"
    }

    pub fn other(message: impl Into<String>) -> PgError {
        PgError { sqlstate: "XX000".into(), message: message.into() }
    }
}

/// For `map_err` on SPI results: an SPI error as an internal error.
pub fn spi_err(e: impl std::fmt::Display) -> PgError {
    PgError::other(e.to_string())
}

/// The five-character SQLSTATE of an error code.
pub fn sqlstate_text(code: i32) -> String {
    // MAKE_SQLSTATE packs five 6-bit characters, first character lowest.
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

fn from_caught(e: CaughtError) -> PgError {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
            PgError { sqlstate: sqlstate_text(r.sql_error_code() as i32), message: r.message().to_string() }
        }
    }
}

/// Run `f` in its own transaction; commit on success, abort on any error (including a
/// failure at commit).
pub fn transaction<R>(f: impl FnOnce() -> Result<R, PgError>) -> Result<R, PgError> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = std::panic::AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let r = f();
        if r.is_ok() {
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
        }
        r
    })
    .catch_others(|e| Err(from_caught(e)))
    .execute();
    if result.is_err() && unsafe { pg_sys::IsTransactionState() } {
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqlstate_unpacks() {
        // ERRCODE_UNIQUE_VIOLATION = MAKE_SQLSTATE('2','3','5','0','5')
        let pack = |s: &str| s.bytes().enumerate().map(|(i, c)| ((c - b'0') as i32 & 0x3F) << (6 * i)).sum::<i32>();
        assert_eq!(super::sqlstate_text(pack("23505")), "23505");
        assert_eq!(super::sqlstate_text(pack("40P01")), "40P01");
    }
}
