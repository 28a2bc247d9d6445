//! The signals a background process of pg_store acts on: SIGTERM (the postmaster asks
//! it to exit; a running job stays open and resumes later) and SIGHUP (reload the
//! configuration). Both are looked at on the main thread, between statements.

use pgrx::pg_sys;

/// True once the postmaster asked this process to exit (SIGTERM).
pub fn shutdown_requested() -> bool {
    // SAFETY: reads a flag the signal handler sets.
    unsafe { std::ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() != 0 }
}

/// Reload postgresql.conf if a SIGHUP arrived (a running job keeps the settings it
/// started with; the next job sees the new ones).
pub fn reload_on_sighup() {
    if pgrx::bgworkers::BackgroundWorker::sighup_received() {
        // SAFETY: called on the main thread between statements.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// Wait on this backend's latch for at most `ms` milliseconds, then look at interrupts:
/// a cancel (`pg_cancel_backend`, a statement timeout) ends a wait of a client backend,
/// and the server's death ends the process.
pub fn nap(ms: i64) {
    // SAFETY: this backend's own latch.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}
