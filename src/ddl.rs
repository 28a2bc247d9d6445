//! `DROP EXTENSION pg_store` while a job runs: without help, the DBA's DROP and the
//! job's worker each held locks the other wanted (40P01, deadlock detected, for the
//! DBA), and the job went on. A `ProcessUtility` hook sees the DROP before it takes any
//! lock, stops every pg_store process working in this database (each leaves within a
//! batch; its job would resume if the DROP rolls back), waits for them, then lets the
//! DROP run.

use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::registry;

/// How long the DROP waits for the database's pg_store processes to leave.
const STOP_WAIT: Duration = Duration::from_secs(30);

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// Install the hook (from `_PG_init`, while preloading).
pub fn init() {
    // SAFETY: the postmaster sets hooks while it loads libraries, single-threaded; each
    // backend inherits them.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// PostgreSQL's own `standard_ProcessUtility`, called directly: pgrx's binding would
/// catch every ERROR of every utility statement and raise it again, through Rust.
mod raw {
    use pgrx::pg_sys;
    unsafe extern "C-unwind" {
        #[allow(clippy::too_many_arguments)]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query: *const std::ffi::c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
    }
}

/// The hook. It is not `#[pg_guard]`ed on purpose: what it does before the statement runs
/// is ([`before`]), and then it hands the statement on as its last act, holding nothing
/// that needs dropping — an ERROR the statement raises goes back to PostgreSQL as from C,
/// never caught and raised again through Rust (pgrx would add a backtrace to every DDL
/// error's detail when the server runs with `RUST_BACKTRACE` set).
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the statement PostgreSQL is about to run.
    unsafe { before(pstmt) };
    // SAFETY: hands the statement on, unchanged, as PostgreSQL would have run it.
    unsafe {
        match PREVIOUS {
            Some(previous) => previous(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => raw::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, env, dest, qc),
        }
    }
}

/// What pg_store does before a utility statement runs: for its owner's `DROP EXTENSION
/// pg_store`, stop the database's pg_store processes.
#[pg_guard]
unsafe extern "C-unwind" fn before(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the statement PostgreSQL is about to run.
    if unsafe { drops_pg_store(pstmt) } && may_drop_pg_store() {
        stop_this_database();
    }
}

/// Whether `pstmt` is a `DROP EXTENSION` naming pg_store.
///
/// # Safety
/// `pstmt` is a valid planned utility statement.
unsafe fn drops_pg_store(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: reads the parse tree as PostgreSQL laid it out (nodes/parsenodes.h).
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return false;
        }
        let drop = stmt.cast::<pg_sys::DropStmt>();
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_EXTENSION || (*drop).objects.is_null() {
            return false;
        }
        let objects = &*(*drop).objects;
        (0..objects.length as usize).any(|i| {
            let name = (*objects.elements.add(i)).ptr_value.cast::<pg_sys::String>();
            !name.is_null() && std::ffi::CStr::from_ptr((*name).sval).to_bytes() == b"pg_store"
        })
    }
}

/// Whether the role running the statement owns pg_store here (so the DROP will not be
/// refused for want of privilege): anyone else's `DROP EXTENSION pg_store` must not stop
/// anything, or a login could fail other roles' jobs by trying it again and again.
fn may_drop_pg_store() -> bool {
    // SAFETY: catalog look-ups in the statement's transaction.
    unsafe {
        let ext = pg_sys::get_extension_oid(c"pg_store".as_ptr(), true);
        ext != pg_sys::InvalidOid && pg_sys::pg_extension_ownercheck(ext, pg_sys::GetUserId())
    }
}

/// Keep workers from claiming jobs in this database until the DROP's transaction ends,
/// ask every pg_store process of it to leave, and wait (interruptibly, at most
/// [`STOP_WAIT`]) until they have. If the DROP then rolls back, the launcher is asked for
/// a worker, which resumes the jobs.
fn stop_this_database() {
    if !crate::PRELOADED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let db = registry::my_database();
    // No worker claims a job here again (a worker that leaves mid-job asks for another)
    // until the DROP's transaction ends.
    registry::pause(db);
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || registry::unpause(db));
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, move || {
        registry::unpause(db);
        registry::want(db);
    });
    let n = registry::stop_database(db);
    if n == 0 {
        return;
    }
    notice!("pg_store: stopping its {n} processes in this database before the extension is dropped");
    let started = Instant::now();
    while registry::busy_in(db) > 0 {
        if started.elapsed() > STOP_WAIT {
            warning!("pg_store: its processes in this database did not stop within {} s", STOP_WAIT.as_secs());
            return;
        }
        crate::signals::nap(100);
    }
}
