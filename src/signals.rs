//! The signals a background process of pg_store acts on: SIGTERM (the postmaster asks
//! it to exit; a running job stays open and resumes later), SIGUSR2 (`store.cancel`
//! asks the job to stop) and SIGHUP (reload the configuration). SIGTERM and SIGHUP are
//! looked at on the main thread, between statements; SIGTERM and SIGUSR2 also end the
//! statement a process working on a job waits in, within a grace.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;

/// This process works on a job (or claims one): SIGTERM and SIGUSR2 cancel its statement.
static BUSY: AtomicBool = AtomicBool::new(false);

/// How long a statement SIGTERM or `store.cancel` cancelled may go on: code of the
/// target's owner (a trigger) can catch a cancel and carry on, which must not hold a
/// shutdown, or a job its owner cancelled, up for good.
/// After this the process exits as a client backend does on SIGTERM (FATAL), whatever
/// it runs; a stopped job is claimed again later (that attempt counts), a cancelled one
/// ends `cancelled` at the next claim.
const GRACE_MS: u64 = 10_000;

/// When SIGTERM or SIGUSR2 cancelled the statement (`CLOCK_MONOTONIC`, ms); 0: neither did.
static CANCELLED_AT: AtomicU64 = AtomicU64::new(0);

/// The timeout that looks, every second while the process is [`busy`], whether the grace
/// is over ([`grace_tick`]); 0 until [`attach`] registers it.
static GRACE_TIMER: AtomicU32 = AtomicU32::new(0);

/// `utils/timeout.h` of PostgreSQL 15, which pgrx's bindings leave out.
mod timeout {
    /// `USER_TIMEOUT` in PostgreSQL 15's `TimeoutId`: the first an extension may register.
    pub const USER_TIMEOUT: u32 = 12;
    unsafe extern "C-unwind" {
        pub fn RegisterTimeout(id: u32, handler: Option<unsafe extern "C-unwind" fn()>) -> u32;
        pub fn enable_timeout_every(id: u32, fin_time: i64, delay_ms: std::ffi::c_int);
        pub fn disable_timeout(id: u32, keep_indicator: bool);
    }
}

/// `CLOCK_MONOTONIC` in milliseconds (async-signal-safe).
fn monotonic_ms() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000
}

/// The grace timer's handler (in the SIGALRM handler's context): once [`GRACE_MS`] have
/// passed since SIGTERM or SIGUSR2 cancelled the statement, and a statement took the
/// cancel (raised it: the flag is down) and yet the process still works on the job,
/// ask for the process's death, as PostgreSQL's own SIGTERM handler does; the next
/// `CHECK_FOR_INTERRUPTS` raises FATAL, which no PL/pgSQL exception clause catches. A
/// cancel still pending is one no statement has met yet: the process is in its own code
/// (a sort, a merge), which looks at the stop between files and ends the job cleanly.
unsafe extern "C-unwind" fn grace_tick() {
    let at = CANCELLED_AT.load(Ordering::SeqCst);
    // SAFETY: reads a flag of this process, as PostgreSQL's handlers do.
    let exiting = unsafe { std::ptr::addr_of!(pg_sys::proc_exit_inprogress).read_volatile() };
    if at != 0 && !cancel_pending() && !exiting && monotonic_ms().saturating_sub(at) >= GRACE_MS {
        // SAFETY: the flags PostgreSQL's `die()` sets, and this process's latch.
        unsafe {
            std::ptr::addr_of_mut!(pg_sys::ProcDiePending).write_volatile(1);
            std::ptr::addr_of_mut!(pg_sys::InterruptPending).write_volatile(1);
            pg_sys::SetLatch(pg_sys::MyLatch);
        }
    }
}

/// The SIGTERM handler pgrx attached: it sets the flag [`shutdown_requested`] reads.
static mut FLAG_HANDLER: pg_sys::pqsigfunc = None;

/// Attach the handlers of a pg_store background process: SIGHUP and SIGTERM set flags
/// looked at between statements, and SIGTERM, while the process is [`busy`], cancels the
/// statement it is in, as SIGINT does. A wait for a lock (one a prepared transaction
/// holds outlives every session a fast shutdown ends) or for a synchronous standby that
/// is gone would otherwise hold up the shutdown for good. The statement's error is then
/// taken for the shutdown it is ([`shutdown_requested`]), and the job resumes later.
/// SIGUSR2 (which a background worker otherwise ignores) is `store.cancel`'s: a cancel
/// with the same grace, where SIGINT (`pg_cancel_backend`) stays a plain cancel, which
/// a job outlives.
pub fn attach() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: on the main thread, before any other thread runs; the handlers are
    // async-signal-safe (flags, the latch, an atomic).
    unsafe {
        FLAG_HANDLER = pg_sys::pqsignal(libc::SIGTERM, Some(on_sigterm));
        pg_sys::pqsignal(libc::SIGUSR2, Some(cancel_with_grace));
    }
    // SAFETY: the background worker's timeouts are initialized before its main function
    // runs; this registers the first free user timeout.
    GRACE_TIMER.store(unsafe { timeout::RegisterTimeout(timeout::USER_TIMEOUT, Some(grace_tick)) }, Ordering::SeqCst);
}

unsafe extern "C-unwind" fn on_sigterm(signal: std::ffi::c_int) {
    // SAFETY: set once by `attach` before this handler was installed.
    if let Some(flag) = unsafe { FLAG_HANDLER } {
        // SAFETY: pgrx's handler, in the signal context it was written for.
        unsafe { flag(signal) };
    }
    // SAFETY: in the signal handler's context, as it expects.
    unsafe { cancel_with_grace(signal) };
}

/// `store.cancel`'s signal (SIGUSR2), and SIGTERM's second half: while the process is
/// [`busy`], cancel the statement it is in, as SIGINT does, and start the grace
/// ([`grace_tick`]) unless it runs already.
unsafe extern "C-unwind" fn cancel_with_grace(signal: std::ffi::c_int) {
    if BUSY.load(Ordering::SeqCst) {
        start_grace();
        // SAFETY: PostgreSQL's SIGINT handler (in a signal handler's context, as it
        // expects): sets the interrupt flags and the latch.
        unsafe { pg_sys::StatementCancelHandler(signal) };
    }
}

/// Run `f` (a claim, a job, a range) with SIGTERM and SIGUSR2 cancelling the statement
/// it is in, and ending the process if that statement goes on for [`GRACE_MS`]; then
/// [`job_over`].
pub fn busy<R>(f: impl FnOnce() -> R) -> R {
    struct Idle;
    impl Drop for Idle {
        fn drop(&mut self) {
            job_over();
        }
    }
    CANCELLED_AT.store(0, Ordering::SeqCst);
    BUSY.store(true, Ordering::SeqCst);
    let timer = GRACE_TIMER.load(Ordering::SeqCst);
    if timer != 0 {
        // SAFETY: a timeout this process registered, armed on its main thread.
        unsafe { timeout::enable_timeout_every(timer, pg_sys::GetCurrentTimestamp() + 1_000_000, 1000) };
    }
    let _idle = Idle;
    f()
}

/// The job's (or range's) statements are over: from here SIGTERM only sets its flag, and
/// a cancel it asked for that no statement took is forgotten — the next `CHECK_FOR_INTERRUPTS`,
/// even a LOG line's, would raise it outside any transaction, and the bookkeeping after
/// a job (its end, a stop) must not be cancelled.
fn job_over() {
    BUSY.store(false, Ordering::SeqCst);
    let timer = GRACE_TIMER.load(Ordering::SeqCst);
    if timer != 0 {
        // SAFETY: disarms this process's own timeout, on its main thread.
        unsafe { timeout::disable_timeout(timer, false) };
    }
    CANCELLED_AT.store(0, Ordering::SeqCst);
    // SAFETY: a flag of this process, cleared on its main thread.
    unsafe { std::ptr::addr_of_mut!(pg_sys::QueryCancelPending).write_volatile(0) };
}

/// The grace as it stands ([`cancel_outlived`]'s argument), read when a statement's
/// error reaches pg_store's code.
pub fn cancel_mark() -> u64 {
    CANCELLED_AT.load(Ordering::SeqCst)
}

/// A cancelled statement ended and pg_store took its error for no reason to stop (a
/// cancel not meant for the job, whose batch is retried): the grace it started, `mark`
/// when the error came, is over. One that started since stays; one whose cancel is still
/// pending starts again.
pub fn cancel_outlived(mark: u64) {
    let _ = CANCELLED_AT.compare_exchange(mark, 0, Ordering::SeqCst, Ordering::SeqCst);
    if cancel_pending() {
        start_grace();
    }
}

/// Start the grace now, unless one runs already (async-signal-safe).
fn start_grace() {
    let _ = CANCELLED_AT.compare_exchange(0, monotonic_ms().max(1), Ordering::SeqCst, Ordering::SeqCst);
}

/// Whether a cancel waits for a statement to meet it (async-signal-safe).
fn cancel_pending() -> bool {
    // SAFETY: reads a flag of this process, as the signal handlers that set it do.
    unsafe { std::ptr::addr_of!(pg_sys::QueryCancelPending).read_volatile() != 0 }
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
