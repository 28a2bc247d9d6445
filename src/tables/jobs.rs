//! `store.jobs`: a job's row as the worker reads it, and its cancel flag.

use pgrx::prelude::*;
use store_engine::Dedup;

use crate::error::{Result, StoreError};
use crate::txn::transaction;

/// Whether `store_cancel` asked job `id` to stop (in a transaction of its own).
pub fn cancel_requested(id: i64) -> bool {
    transaction(|| {
        Ok(Spi::get_one_with_args::<bool>("SELECT cancel_requested FROM store.jobs WHERE id = $1", &[id.into()])?)
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// A job row, as the worker needs it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    /// The claim number (`attempts`) this worker holds.
    pub claim: i32,
    pub path: String,
    pub target: pg_sys::Oid,
    pub column: String,
    pub key_column: Option<String>,
    pub dedup: Dedup,
    pub filter: Option<String>,
    pub owner: pg_sys::Oid,
}

impl Job {
    pub fn load(id: i64, claim: i32) -> Result<Job> {
        transaction(|| {
            let job = Spi::connect(|c| {
                let t = c.select(
                    "SELECT path, target::pg_catalog.oid, column_name::text, dedup, filter, owner::pg_catalog.oid, key_column::text \
                     FROM store.jobs WHERE id = $1",
                    Some(1),
                    &[id.into()],
                )?;
                let r = t.first();
                Ok::<_, pgrx::spi::SpiError>((
                    r.get::<String>(1)?,
                    r.get::<pg_sys::Oid>(2)?,
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<String>(5)?,
                    r.get::<pg_sys::Oid>(6)?,
                    r.get::<String>(7)?,
                ))
            })?;
            let (Some(path), Some(target), Some(column), Some(dedup), filter, Some(owner), key_column) = job else {
                return Err(StoreError::internal(format!("job {id} has no row")));
            };
            let dedup = dedup.parse::<Dedup>()?;
            Ok(Job { id, claim, path, target, column, key_column, dedup, filter, owner })
        })
    }
}
