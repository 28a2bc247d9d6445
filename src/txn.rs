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

/// Flush this process's WAL statistics (`pg_stat_wal`) at most once a second, and every
/// statistic it holds (the target's rows inserted, pg_store's own tables') every
/// [`FULL_REPORT_EVERY`] or with `force`: a job forces it when it ends, and a process's
/// exit flushes the rest.
///
/// A job's rows wait, as one `COPY`'s wait for its commit: reported as they are
/// committed, batch by batch, they make autovacuum's insert threshold start passes over
/// a table still being loaded (two during a 10 GiB load), whose reads and page writes the
/// load then competes with: 322.0 and 327.7 s against 307.4 and 312.9 s with the table's
/// autovacuum off (two cores). They wait no longer than [`FULL_REPORT_EVERY`], which
/// also bounds how long autovacuum cannot see the dead rows of pg_store's own tables
/// (each batch rewrites its range's checkpoint, whose last key a long line puts in TOAST).
pub fn report_stats(force: bool) {
    thread_local!(static LAST: std::cell::Cell<[Option<std::time::Instant>; 2]> = const { std::cell::Cell::new([None; 2]) });
    let [wal, full] = LAST.with(|l| l.get());
    let since = |t: Option<std::time::Instant>, d| t.is_none_or(|t| t.elapsed() >= d);
    if force || since(full, FULL_REPORT_EVERY) {
        let now = Some(std::time::Instant::now());
        LAST.with(|l| l.set([now, now]));
        // SAFETY: called between transactions, in a backend connected to a database.
        unsafe { pg_sys::pgstat_report_stat(true) };
    } else if since(wal, std::time::Duration::from_secs(1)) {
        LAST.with(|l| l.set([Some(std::time::Instant::now()), full]));
        // SAFETY: as above; WAL statistics only.
        unsafe { pg_sys::pgstat_report_wal(true) };
    }
}

/// How long a process keeps its table statistics before it reports them (see
/// [`report_stats`]): a load shorter than this gets no autovacuum pass while it runs; a
/// longer one at most one per this interval, each over the pages added since the last.
const FULL_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

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
