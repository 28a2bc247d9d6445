//! The signals a background process of pg_store acts on: SIGTERM (the postmaster asks
//! it to exit; a running job stays open and resumes later) and SIGHUP (reload the
//! configuration). Both are looked at on the main thread, between statements; SIGTERM
//! also ends the statement a process working on a job waits in.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;

/// This process works on a job (or claims one): SIGTERM cancels its statement too.
static BUSY: AtomicBool = AtomicBool::new(false);

/// The SIGTERM handler pgrx attached: it sets the flag [`shutdown_requested`] reads.
static mut FLAG_HANDLER: pg_sys::pqsigfunc = None;

/// Attach the handlers of a pg_store background process: SIGHUP and SIGTERM set flags
/// looked at between statements, and SIGTERM, while the process is [`busy`], cancels the
/// statement it is in, as SIGINT does. A wait for a lock (one a prepared transaction
/// holds outlives every session a fast shutdown ends) or for a synchronous standby that
/// is gone would otherwise hold up the shutdown for good. The statement's error is then
/// taken for the shutdown it is ([`shutdown_requested`]), and the job resumes later.
pub fn attach() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: on the main thread, before any other thread runs; the handler is
    // async-signal-safe (flags, the latch, an atomic).
    unsafe { FLAG_HANDLER = pg_sys::pqsignal(libc::SIGTERM, Some(on_sigterm)) };
}

unsafe extern "C-unwind" fn on_sigterm(signal: std::ffi::c_int) {
    // SAFETY: set once by `attach` before this handler was installed.
    if let Some(flag) = unsafe { FLAG_HANDLER } {
        // SAFETY: pgrx's handler, in the signal context it was written for.
        unsafe { flag(signal) };
    }
    if BUSY.load(Ordering::SeqCst) {
        // SAFETY: PostgreSQL's SIGINT handler: sets the interrupt flags and the latch.
        unsafe { pg_sys::StatementCancelHandler(signal) };
    }
}

/// Run `f` (a claim, a job, a range) with SIGTERM cancelling the statement it is in;
/// then [`job_over`].
pub fn busy<R>(f: impl FnOnce() -> R) -> R {
    struct Idle;
    impl Drop for Idle {
        fn drop(&mut self) {
            job_over();
        }
    }
    BUSY.store(true, Ordering::SeqCst);
    let _idle = Idle;
    f()
}

/// The job's (or range's) statements are over: from here SIGTERM only sets its flag, and
/// a cancel it asked for that no statement took is forgotten — the next `CHECK_FOR_INTERRUPTS`,
/// even a LOG line's, would raise it outside any transaction, and the bookkeeping after
/// a job (its end, a stop) must not be cancelled.
fn job_over() {
    BUSY.store(false, Ordering::SeqCst);
    // SAFETY: a flag of this process, cleared on its main thread.
    unsafe { std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(0) };
}

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
