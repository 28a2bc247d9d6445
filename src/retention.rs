//! Retention: jobs that ended more than `store.retention` ago are deleted with their
//! files, checkpoints and rejects — never an open job, never the ledger of ingested
//! files (`store.ingested`), which is what makes a later run skip them. A worker does
//! it when it has nothing else to do, a few rows per transaction; `store_purge` does it
//! by hand, for the jobs its caller sees.

use pgrx::datum::Interval;
use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;

use crate::error::{Result, StoreError};
use crate::tables::{jobs, rejects};
use crate::txn::transaction;
use crate::{gucs, registry, security};

/// Rejects deleted per transaction.
const REJECTS_PER_TRANSACTION: i64 = 10_000;
/// Jobs looked up per statement.
const JOBS_PER_LOOK: i64 = 100;

/// Delete the jobs of this database that ended more than `store.retention` ago (in the
/// worker, between jobs). Stops early at a shutdown, when a job is queued here, or when
/// another database waits for a worker; the next idle worker goes on.
pub fn purge_expired() {
    let minutes = gucs::RETENTION.get();
    if minutes <= 0 {
        return;
    }
    match purge_older_than(minutes) {
        Ok(0) => {}
        Ok(n) => log!("pg_store: purged {n} jobs that ended more than store.retention ({minutes} min) ago"),
        Err(e) => log!("pg_store: could not purge expired jobs: {e}"),
    }
}

fn purge_older_than(minutes: i32) -> Result<usize> {
    let mut purged = 0;
    loop {
        let ids = transaction(|| jobs::ended_before(minutes, JOBS_PER_LOOK))?;
        if ids.is_empty() {
            return Ok(purged);
        }
        for id in ids {
            // Give way to a job here, or to a database waiting for a worker.
            if crate::signals::shutdown_requested() || queued()? || registry::others_waiting(registry::my_database()) {
                return Ok(purged);
            }
            purge_job(id)?;
            purged += 1;
        }
    }
}

fn queued() -> Result<bool> {
    transaction(jobs::any_queued)
}

/// One job: its rejects a chunk per transaction, then the row (files and checkpoints
/// go with it, `ON DELETE CASCADE`), if it is still ended.
fn purge_job(id: i64) -> Result<()> {
    loop {
        let n = transaction(|| rejects::delete_some(id, REJECTS_PER_TRANSACTION))?;
        if n < REJECTS_PER_TRANSACTION {
            break;
        }
    }
    transaction(|| jobs::delete_if_ended(id))
}

/// Delete the jobs the caller sees (its own, and those of roles whose privileges it
/// has; a superuser's: all) that ended more than `older_than` ago, with their files,
/// checkpoints and rejects; never an open job, never the ledger. Returns how many.
#[pg_extern(volatile, schema = "store", name = "purge")]
#[search_path(pg_catalog, pg_temp)]
fn store_purge(older_than: Option<Interval>) -> i64 {
    crate::api::required(older_than, "store.purge", "older_than").and_then(purge).unwrap_or_else(|e| e.raise())
}

fn purge(older_than: Interval) -> Result<i64> {
    crate::api::require_current_version()?;
    crate::read::require_primary("purge jobs")?;
    let negative = Spi::get_one_with_args::<bool>("SELECT $1 < '0'::pg_catalog.interval", &[older_than.into()])?;
    if negative == Some(true) {
        return Err(StoreError::refused(ERRCODE_INVALID_PARAMETER_VALUE, "older_than must not be negative"));
    }
    // Read as the caller: row-level security hides other roles' jobs, and the role test
    // holds for a role that bypasses it.
    let ids = jobs::visible_ended_before(older_than)?;
    let n = security::as_superuser(|| jobs::delete_ended(ids))?;
    Ok(n.unwrap_or(0))
}
