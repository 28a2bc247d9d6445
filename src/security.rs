//! Who is acting, and running code as someone else.
//!
//! * [`executing_role`] is the role actually running the current SQL function —
//!   inside a `SECURITY DEFINER` function its owner, inside a maintenance command
//!   (`ANALYZE`, `REINDEX`, …) the table's owner — never the session's role, which a
//!   superuser's maintenance command would lend to a table owner's index expression.
//! * [`as_role`] runs code on a user's objects as the job's owner inside a
//!   security-restricted operation, and undoes any setting that code changed, so a
//!   trigger cannot leave a `search_path` behind for the worker's own (superuser) SQL.
//! * [`as_superuser`] runs pg_store's own bookkeeping (writing `store.jobs`) from a
//!   function called by an ordinary role, which has no privileges on those tables.

use pgrx::pg_sys;

/// The role running the current function: what `COPY FROM` a file checks.
pub fn executing_role() -> pg_sys::Oid {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::GetUserId() }
}

/// Inside a security-restricted operation: maintenance commands and index expressions
/// run user code this way, and nothing reading server files belongs there.
pub fn in_restricted_operation() -> bool {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::InSecurityRestrictedOperation() }
}

/// Whether `role` has the privileges of `pg_read_server_files` (superusers do).
pub fn may_read_server_files(role: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups in a transaction.
    unsafe { pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES)) }
}

/// Restores the user and security context saved when it was made, if the code it
/// guards unwinds instead of returning (an abort also restores them; this covers a Rust
/// panic that is caught before any abort).
struct Restore {
    user: pg_sys::Oid,
    ctx: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: puts back what GetUserIdAndSecContext returned.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.ctx) };
    }
}

fn switch(role: pg_sys::Oid, extra: u32) -> Restore {
    let mut user = pg_sys::Oid::INVALID;
    let mut ctx = 0;
    // SAFETY: plain reads and writes of the backend's user id and security context.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut ctx);
        pg_sys::SetUserIdAndSecContext(role, ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | extra as i32);
    }
    Restore { user, ctx }
}

/// Run `f` as `role` in a security-restricted operation: no `SET ROLE` back to the
/// worker's superuser, no temporary objects; settings `f` changed (say, a trigger's
/// `set_config('search_path', …)`) are rolled back when it returns. An ERROR aborts the
/// transaction, which restores user, context and settings by itself.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level opened here is closed below, or by the abort.
    let nest = unsafe { pg_sys::NewGUCNestLevel() };
    let restore = switch(role, pg_sys::SECURITY_RESTRICTED_OPERATION);
    let r = f();
    // SAFETY: pops the nest level opened above, undoing its settings.
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    drop(restore);
    r
}

/// Run `f` as the bootstrap superuser, for writes to pg_store's own tables.
pub fn as_superuser<R>(f: impl FnOnce() -> R) -> R {
    let _restore = switch(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), 0);
    f()
}
