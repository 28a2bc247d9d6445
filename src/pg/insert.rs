//! Insert batches through SPI, one transaction per batch, with the job's checkpoint
//! updated in that same transaction: a crash at any instant loses nothing and repeats
//! nothing.
//!
//! Two prepared statements per job: a plain `INSERT … SELECT unnest($1::text[])` for
//! keys proven new (the target was empty when the job began and the stream is
//! distinct), and the same with `ON CONFLICT DO NOTHING` for everything else. A unique
//! violation on the fast path (a concurrent writer) redoes that batch on the safe path
//! and keeps the job there. Transient errors are retried with exponential backoff.

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use sha2::{Digest, Sha256};

use super::txn::{transaction, PgError};
use crate::engine::batch::Batch;

/// Lines up to this many bytes are their own unique key (2,000: well below the btree
/// limit of about 2.7 KB); longer ones are keyed by their SHA-256.
pub const KEY_INLINE_MAX: usize = 2000;

/// The key `store.line_key` indexes: the line's bytes, or 0xFF + SHA-256 for a long
/// line. 0xFF never occurs in UTF-8, so the two kinds of key cannot collide.
pub fn line_key(line: &[u8]) -> Vec<u8> {
    if line.len() <= KEY_INLINE_MAX {
        return line.to_vec();
    }
    let mut k = Vec::with_capacity(33);
    k.push(0xFF);
    k.extend_from_slice(&Sha256::digest(line));
    k
}

/// Retries of a batch after a transient error (serialization failure, deadlock, lock
/// timeout), waiting 100 ms, 200 ms, 400 ms.
const RETRIES: u32 = 3;

/// Extra work done in a batch's transaction (progress, bookkeeping); returns whether
/// the job was asked to stop.
pub type InTxn<'a> = &'a mut dyn FnMut() -> Result<bool, PgError>;

pub struct Inserter {
    job: i64,
    owner: pg_sys::Oid,
    fast_sql: String,
    safe_sql: String,
    fast: Option<OwnedPreparedStatement>,
    safe: Option<OwnedPreparedStatement>,
    pub fast_path: bool,
}

/// What one committed batch did.
pub struct Committed {
    pub inserted: u64,
    pub already_present: u64,
    pub cancel_requested: bool,
}

impl Inserter {
    /// `qualified` and `column` must already be quoted identifiers.
    pub fn new(job: i64, owner: pg_sys::Oid, qualified: &str, column: &str, fast_path: bool) -> Inserter {
        let fast_sql = format!("INSERT INTO {qualified} ({column}) SELECT pg_catalog.unnest($1::pg_catalog.text[])");
        let safe_sql = format!("{fast_sql} ON CONFLICT DO NOTHING");
        Inserter { job, owner, fast_sql, safe_sql, fast: None, safe: None, fast_path }
    }

    /// Insert `batch` and move the checkpoint to `key` (exact mode), in one
    /// transaction; `extra` runs in it too.
    pub fn commit(&mut self, batch: &Batch, key: Option<&[u8]>, extra: InTxn<'_>) -> Result<Committed, PgError> {
        let mut attempt = 0;
        loop {
            let fast = self.fast_path;
            match self.try_commit(batch, key, fast, extra) {
                Ok(c) => return Ok(c),
                Err(e) if fast && e.is_unique_violation() => {
                    pgrx::log!("pg_store job {}: a key was already present; switching to ON CONFLICT DO NOTHING", self.job);
                    self.fast_path = false;
                }
                Err(e) if e.is_transient() && attempt < RETRIES => {
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                    attempt += 1;
                    pgrx::log!("pg_store job {}: retrying batch after {e} (attempt {attempt})", self.job);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_commit(&mut self, batch: &Batch, key: Option<&[u8]>, fast: bool, extra: InTxn<'_>) -> Result<Committed, PgError> {
        let job = self.job;
        let owner = self.owner;
        let (sql, slot) = if fast { (&self.fast_sql, &mut self.fast) } else { (&self.safe_sql, &mut self.safe) };
        transaction(|| {
            if slot.is_none() {
                let stmt = Spi::connect(|c| c.prepare_mut(sql.as_str(), &[PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID)]).map(|s| s.keep()))
                    .map_err(|e| PgError::other(format!("could not prepare {sql}: {e}")))?;
                *slot = Some(stmt);
            }
            let stmt = slot.as_ref().expect("prepared above");
            // Records are valid UTF-8: the engine checked every one.
            let recs: Vec<&str> = batch.iter().map(|r| unsafe { std::str::from_utf8_unchecked(r) }).collect();
            let inserted = as_role(owner, || {
                Spi::connect_mut(|c| c.update(stmt, None, &[recs.into()]).map(|t| t.len() as u64))
            })
            .map_err(|e| PgError::other(e.to_string()))?;
            let present = batch.len() as u64 - inserted;
            Spi::run_with_args(
                "UPDATE store.checkpoints SET last_key = coalesce($2, last_key), inserted = inserted + $3, \
                 already_present = already_present + $4, batches = batches + 1, fast_path = $5, updated_at = now() WHERE job = $1",
                &[job.into(), key.map(|k| unsafe { std::str::from_utf8_unchecked(k) }).into(), (inserted as i64).into(), (present as i64).into(), fast.into()],
            )
            .map_err(|e| PgError::other(e.to_string()))?;
            let cancel_requested = extra()?;
            Ok(Committed { inserted, already_present: present, cancel_requested })
        })
    }
}

/// Run `f` with `role` as the current user, in a security-restricted operation (no
/// `SET ROLE` back to the worker's superuser from a trigger). An error aborts the
/// transaction, which restores the user by itself.
fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_ctx = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let r = f();
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx) };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_get_a_hash_key_that_cannot_meet_a_short_one() {
        assert_eq!(line_key(b"abc"), b"abc");
        let long = vec![b'y'; 60 * 1024];
        let k = line_key(&long);
        assert_eq!((k.len(), k[0]), (33, 0xFF));
        assert_ne!(k, line_key(&long[1..]));
        assert_eq!(line_key(&[b'x'; KEY_INLINE_MAX]).len(), KEY_INLINE_MAX);
    }
}
