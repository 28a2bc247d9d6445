//! Reading through SPI without making the transaction a writer. pgrx's `Spi::get_one`
//! and friends run their query as a data-modifying one: they have the transaction
//! assigned an ID first, which a hot standby refuses ("cannot assign TransactionIds
//! during recovery", XX000) and which costs a primary an XID for every look at a
//! status. What a standby must serve (`store.workers`, `store_wait`) and every check
//! before a refusal reads through these.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use crate::error::Result;

/// The first column of the first row of `sql` (`None` for no row or NULL).
pub fn one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid<'_>]) -> Result<Option<T>> {
    Ok(Spi::connect(|c| {
        let t = c.select(sql, Some(1), args)?;
        if t.is_empty() {
            return Ok(None);
        }
        t.first().get_one::<T>()
    })?)
}

/// Run `f` with a snapshot taken now pushed: a read-only SPI query runs on the snapshot
/// of the statement that called it, so a loop that polls (`store_wait`) would never see
/// what committed since; in READ COMMITTED each call here sees it.
pub fn fresh<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: pushes a snapshot of the current transaction; popped below, or by the
    // abort of the transaction if `f` raises an ERROR.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let r = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    r
}

/// Refuse, with SQLSTATE 25006, what would write on a hot standby: a standby's
/// `store.status` shows the primary's jobs, and its workers do not run.
pub fn require_primary(what: &str) -> Result<()> {
    // SAFETY: reads shared state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err(crate::error::StoreError::refused(
            pg_sys::errcodes::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("cannot {what} on a hot standby"),
        )
        .with_hint("Call it on the primary; store.status and store.workers work here too."));
    }
    Ok(())
}
