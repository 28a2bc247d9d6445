//! What to do when an attempt at a batch failed: one classification of the error, in
//! the order its cases must be looked at, with the backoffs named. Pure logic: the
//! caller says what the attempt was and whether a cancel was asked for.

use std::time::Duration;

use crate::error::StoreError;

/// Retries of a batch after a transient error (serialization failure, deadlock, lock
/// timeout, a cancel not meant for the job), waiting [`transient_backoff`].
pub const RETRIES: u32 = 3;

/// Retries of a batch after a connection failure (a Citus node restarting), waiting
/// [`connection_backoff`]: about a minute in all.
pub const CONNECTION_RETRIES: u32 = 10;

/// 100 ms, 200 ms, 400 ms.
pub fn transient_backoff(retry: u32) -> Duration {
    Duration::from_millis(100 << retry.min(10))
}

/// 0.5, 1, 2, 4, 8 s, then 8 s each.
pub fn connection_backoff(retry: u32) -> Duration {
    Duration::from_millis(500 << retry.min(4))
}

/// What the attempt that failed was.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempt {
    /// By the plain path (keys expected new).
    pub plain: bool,
    /// By a look-up of the batch's keys and an insert of the lines not found.
    pub probe: bool,
    /// By a local COPY (so a 0A000 means COPY cannot serve the target).
    pub copy: bool,
    /// Into a Citus table.
    pub citus: bool,
    /// Into a table with rules, which ON CONFLICT refuses: a look-up is its safe path.
    pub rules: bool,
    /// Retries of this batch so far.
    pub retries: u32,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A key the plain path expected to be new was there: back off from the plain path
    /// and redo the batch.
    PlainConflict,
    /// A line the look-up did not find was there at the insert, on a table whose only safe
    /// path is the look-up (rules): look up again.
    ProbeAgain,
    /// A line the look-up did not find was there at the insert: redo the batch with ON
    /// CONFLICT, and look up less often for a while.
    ProbeConflict,
    /// PostgreSQL refused a COPY (0A000): insert without COPY from now on.
    CopyRefused,
    /// A Citus shard's error on the plain path, which may be a key already present
    /// (Citus reports a shard's unique violation as XX000): redo on the safe path.
    Unsure,
    /// `store_cancel` asked the job to stop.
    Cancelled,
    /// The server is shutting down: the job resumes later.
    Shutdown,
    /// A node may be restarting: wait, drop the cached connections, redo on the safe path.
    NodeDown(Duration),
    /// Worth another try after a wait.
    Transient(Duration),
    /// Give up: the job fails with this error.
    Fail,
}

/// Classify `e`, the failure of attempt `a`. `shutdown`: SIGTERM came; `cancelled`: asked
/// only for a cancelled statement, whether `store_cancel` asked the job to stop.
pub fn classify(e: &StoreError, a: &Attempt, shutdown: bool, cancelled: impl FnOnce() -> bool) -> Next {
    let node_may_be_down = e.is_connection_failure() || (a.citus && (e.is_io_error() || e.is_lost_connection()));
    if a.plain && e.is_conflict() {
        Next::PlainConflict
    } else if a.probe && e.is_conflict() && a.rules && a.retries < RETRIES {
        Next::ProbeAgain
    } else if a.probe && e.is_conflict() {
        Next::ProbeConflict
    } else if a.copy && e.is_copy_refused() {
        Next::CopyRefused
    } else if a.plain && a.citus && e.is_internal() {
        Next::Unsure
    } else if e.is_query_canceled() && cancelled() {
        Next::Cancelled
    } else if shutdown {
        Next::Shutdown
    } else if node_may_be_down && a.retries < CONNECTION_RETRIES {
        Next::NodeDown(connection_backoff(a.retries))
    } else if (e.is_transient() || e.is_query_canceled()) && a.retries < RETRIES {
        Next::Transient(transient_backoff(a.retries))
    } else {
        Next::Fail
    }
}

#[cfg(test)]
mod tests {
    use pgrx::pg_sys::errcodes::PgSqlErrorCode::{self, *};

    use super::*;

    fn sql(code: PgSqlErrorCode, message: &str) -> StoreError {
        StoreError::Sql { code, message: message.into(), detail: None, hint: None }
    }

    #[test]
    fn conflicts_decide_by_the_path_taken() {
        let unique = sql(ERRCODE_UNIQUE_VIOLATION, "duplicate key");
        let plain = Attempt { plain: true, copy: true, ..Attempt::default() };
        assert_eq!(classify(&unique, &plain, false, || false), Next::PlainConflict);
        let probe = Attempt { probe: true, ..Attempt::default() };
        assert_eq!(classify(&unique, &probe, false, || false), Next::ProbeConflict);
        let exclusion = sql(ERRCODE_EXCLUSION_VIOLATION, "conflicting key value");
        assert_eq!(classify(&exclusion, &probe, false, || false), Next::ProbeConflict);
        let rules = Attempt { rules: true, ..probe };
        assert_eq!(classify(&unique, &rules, false, || false), Next::ProbeAgain);
        assert_eq!(classify(&unique, &Attempt { retries: RETRIES, ..rules }, false, || false), Next::ProbeConflict);
        // On the ON CONFLICT path a unique violation is not a conflict it skipped: it fails.
        assert_eq!(classify(&unique, &Attempt::default(), false, || false), Next::Fail);
    }

    #[test]
    fn a_refused_copy_only_after_a_copy() {
        let refused = sql(ERRCODE_FEATURE_NOT_SUPPORTED, "COPY FROM not supported with row-level security");
        assert_eq!(
            classify(&refused, &Attempt { plain: true, copy: true, ..Attempt::default() }, false, || false),
            Next::CopyRefused
        );
        assert_eq!(classify(&refused, &Attempt { plain: true, ..Attempt::default() }, false, || false), Next::Fail);
    }

    #[test]
    fn citus_internal_errors_are_unsure_on_the_plain_path_and_retried_only_for_lost_connections() {
        let xx000 = sql(ERRCODE_INTERNAL_ERROR, "columnar_tuple_insert_speculative not implemented");
        let citus = Attempt { citus: true, ..Attempt::default() };
        assert_eq!(classify(&xx000, &Attempt { plain: true, ..citus }, false, || false), Next::Unsure);
        assert_eq!(classify(&xx000, &citus, false, || false), Next::Fail, "a permanent XX000 is not retried");
        let lost = sql(ERRCODE_INTERNAL_ERROR, "connection to the remote node localhost:9701 failed");
        assert_eq!(classify(&lost, &citus, false, || false), Next::NodeDown(connection_backoff(0)));
        assert_eq!(classify(&lost, &Attempt { retries: CONNECTION_RETRIES, ..citus }, false, || false), Next::Fail);
        let refused = sql(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, "could not connect");
        assert_eq!(classify(&refused, &Attempt::default(), false, || false), Next::NodeDown(connection_backoff(0)));
    }

    #[test]
    fn a_cancelled_statement_is_a_cancel_only_if_one_was_asked_for() {
        let cancelled = sql(ERRCODE_QUERY_CANCELED, "canceling statement due to user request");
        assert_eq!(classify(&cancelled, &Attempt::default(), false, || true), Next::Cancelled);
        assert_eq!(classify(&cancelled, &Attempt::default(), false, || false), Next::Transient(transient_backoff(0)));
        assert_eq!(
            classify(&cancelled, &Attempt { retries: RETRIES, ..Attempt::default() }, false, || false),
            Next::Fail
        );
        assert_eq!(classify(&cancelled, &Attempt::default(), true, || false), Next::Shutdown);
    }

    #[test]
    fn transient_errors_back_off_then_fail() {
        let deadlock = sql(ERRCODE_T_R_DEADLOCK_DETECTED, "deadlock detected");
        let waits: Vec<Next> = (0..=RETRIES)
            .map(|r| classify(&deadlock, &Attempt { retries: r, ..Attempt::default() }, false, || false))
            .collect();
        assert_eq!(
            waits,
            [
                Next::Transient(Duration::from_millis(100)),
                Next::Transient(Duration::from_millis(200)),
                Next::Transient(Duration::from_millis(400)),
                Next::Fail
            ]
        );
        let check = sql(ERRCODE_CHECK_VIOLATION, "violates check constraint");
        assert_eq!(classify(&check, &Attempt::default(), false, || false), Next::Fail);
    }
}
