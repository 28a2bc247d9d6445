//! Transactions in a background worker, with errors caught instead of killing the
//! process. `BackgroundWorker::transaction` lets an ERROR unwind through it; here an
//! error aborts the transaction, leaves the worker in a clean state and comes back as a
//! [`StoreError`] the caller can retry, record or report.

use pgrx::pg_sys;
use pgrx::PgTryBuilder;

use crate::error::{Result, StoreError};

/// Run `f` in its own transaction; commit on success, abort on any error (including a
/// failure at commit).
pub fn transaction<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    // SAFETY: the worker is between transactions whenever it calls this.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = std::panic::AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let r = f();
        if r.is_ok() {
            // SAFETY: pops the snapshot pushed above and commits.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
        }
        r
    })
    .catch_others(|e| Err(StoreError::from(e)))
    .execute();
    // SAFETY: aborts whatever is left open after an error or an `Err` from `f`.
    if unsafe { pg_sys::IsTransactionState() } {
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    report_stats(false);
    result
}

/// Flush this process's WAL statistics (`pg_stat_wal`) at most once a second; with
/// `force`, every statistic it holds (the target's rows inserted, pg_store's own
/// tables'), as a client backend does when a statement ends. A job forces it when it
/// ends; a process's exit flushes the rest.
///
/// The rows wait for the job's end, as one `COPY`'s wait for its commit: reported as
/// they are committed, batch by batch, they make autovacuum's insert threshold trigger
/// passes over a table still being loaded (two over a 10 GiB load), whose reads and
/// page writes the load then competes with: 322.0 and 327.7 s against 307.4 and 312.9 s
/// with the table's autovacuum off (two cores). The pass still comes, once, after the
/// job. `store.status` shows a job's progress meanwhile.
pub fn report_stats(force: bool) {
    thread_local!(static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) });
    let due = LAST.with(|l| l.get().is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)));
    if force {
        // SAFETY: called between transactions, in a backend connected to a database.
        unsafe { pg_sys::pgstat_report_stat(true) };
    } else if due {
        LAST.with(|l| l.set(Some(std::time::Instant::now())));
        // SAFETY: as above; WAL statistics only.
        unsafe { pg_sys::pgstat_report_wal(true) };
    }
}

/// Run `f` in a transaction that is then rolled back, whatever `f` returns: for what
/// happens at abort (Citus, for one, closes its cached connections then).
pub fn rolled_back(f: impl FnOnce() -> Result<()>) -> Result<()> {
    // SAFETY: as in `transaction`; the abort ends what was started here.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result =
        PgTryBuilder::new(std::panic::AssertUnwindSafe(f)).catch_others(|e| Err(StoreError::from(e))).execute();
    unsafe { pg_sys::AbortCurrentTransaction() };
    result
}

/// Let the current transaction's commit return before its WAL reaches disk (or a
/// synchronous standby): `SET LOCAL synchronous_commit = off`. For a batch and its
/// checkpoint only, which commit or vanish together: a crash that loses the commit
/// loses the batch's rows with it, and the job inserts them again from the checkpoint
/// before. The job's end, its ledger and its other bookkeeping commit as the server
/// says, and each such commit makes durable every batch committed before it.
pub fn commit_without_waiting() -> Result<()> {
    Ok(pgrx::Spi::run("SET LOCAL synchronous_commit TO off")?)
}
