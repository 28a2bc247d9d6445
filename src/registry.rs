//! Which jobs are being run right now, and by which process: a table in shared memory
//! that only pg_store's workers write.
//!
//! A job whose row says `running` but has no entry here lost its worker (a crash, a
//! `kill -9`, a shutdown): it may be claimed again. Nothing a user can call touches this
//! table — unlike an advisory lock, which any role can take (stalling a job forever) or
//! release from inside a trigger (letting a second worker run it). An entry is removed
//! when its job ends, when its process exits (a `before_shmem_exit` callback), and with
//! the whole of shared memory when the server restarts after a crash.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

/// Processes that can run a part of a job at once: far more than `max_worker_processes`
/// allows on any real server.
const SLOTS: usize = 256;

/// One process working on one part (`range`) of a job, under claim number `claim`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Entry {
    pub job: i64,
    pub pid: i32,
    pub claim: i32,
    pub range: i32,
    /// The database the job lives in.
    pub database: u32,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Registry {
    entries: [Entry; SLOTS],
}

impl Default for Registry {
    fn default() -> Self {
        Registry { entries: [Entry::default(); SLOTS] }
    }
}

// SAFETY: plain integers, no pointers.
unsafe impl PGRXSharedMemory for Registry {}

pub static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_store registry") };

fn my_database() -> u32 {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether a live process is working on `job` of this database.
pub fn is_live(job: i64) -> bool {
    let db = my_database();
    REGISTRY.share().entries.iter().any(|e| e.pid != 0 && e.job == job && e.database == db)
}

/// Whether a live process is working on `range` of `job` of this database.
pub fn range_is_live(job: i64, range: i32) -> bool {
    let db = my_database();
    REGISTRY.share().entries.iter().any(|e| e.pid != 0 && e.job == job && e.range == range && e.database == db)
}

/// The processes working on `job` of this database.
pub fn pids_of(job: i64) -> Vec<i32> {
    let db = my_database();
    REGISTRY.share().entries.iter().filter(|e| e.pid != 0 && e.job == job && e.database == db).map(|e| e.pid).collect()
}

/// Record that this process works on `range` of `job` under `claim`; false if another
/// live process already does (or the table is full).
pub fn enter(job: i64, claim: i32, range: i32) -> bool {
    let db = my_database();
    let pid = std::process::id() as i32;
    let mut r = REGISTRY.exclusive();
    if r.entries.iter().any(|e| e.pid != 0 && e.job == job && e.database == db && e.range == range && e.pid != pid) {
        return false;
    }
    match r.entries.iter_mut().find(|e| e.pid == 0) {
        Some(slot) => {
            *slot = Entry { job, pid, claim, range, database: db };
            true
        }
        None => false,
    }
}

/// This process no longer works on `job`.
pub fn leave(job: i64) {
    let pid = std::process::id() as i32;
    for e in REGISTRY.exclusive().entries.iter_mut().filter(|e| e.pid == pid && e.job == job) {
        *e = Entry::default();
    }
}

/// This process no longer works on `range` of `job` (it goes on with the job).
pub fn leave_range(job: i64, range: i32) {
    let pid = std::process::id() as i32;
    for e in REGISTRY.exclusive().entries.iter_mut().filter(|e| e.pid == pid && e.job == job && e.range == range) {
        *e = Entry::default();
    }
}

/// Remove every entry of this process: registered to run when it exits.
#[pg_guard]
unsafe extern "C-unwind" fn leave_all(_code: i32, _arg: pg_sys::Datum) {
    let pid = std::process::id() as i32;
    for e in REGISTRY.exclusive().entries.iter_mut().filter(|e| e.pid == pid) {
        *e = Entry::default();
    }
}

/// Call once in each worker before it claims anything.
pub fn clean_up_at_exit() {
    // SAFETY: registers a callback PostgreSQL runs as the process exits.
    unsafe { pg_sys::before_shmem_exit(Some(leave_all), pg_sys::Datum::from(0)) };
}

/// Reserve the table in shared memory (from `_PG_init`, while preloading).
pub fn init() {
    pgrx::pg_shmem_init!(REGISTRY);
}
