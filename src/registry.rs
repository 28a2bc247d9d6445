//! Which jobs are being run right now, and by which process: a table in shared memory
//! that only pg_store's workers write. Beside it, the processes themselves (for the
//! `store.workers` view and the launcher's count) and the databases that want a worker
//! (written by `store_ingest` at commit and by busy workers, read by the launcher).
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

/// What a pg_store process is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(i32)]
pub enum Kind {
    #[default]
    Free = 0,
    Launcher = 1,
    Worker = 2,
    Inserter = 3,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Free => "free",
            Kind::Launcher => "launcher",
            Kind::Worker => "worker",
            Kind::Inserter => "inserter",
        }
    }
}

/// A live pg_store process: what it is, where, on which job (0: none) since when.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct Proc {
    pub pid: i32,
    pub kind: Kind,
    pub database: u32,
    pub job: i64,
    /// Seconds since the Unix epoch.
    pub since: f64,
}

/// A database that wants a worker: a job was queued there, or a worker left it in the
/// middle of a job. `seq` orders the wants: the launcher serves the oldest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Want {
    pub database: u32,
    pub seq: u64,
    /// The launcher found no background worker slot free for it (max_worker_processes).
    pub refused: bool,
}

const WANTS: usize = 256;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Registry {
    entries: [Entry; SLOTS],
    procs: [Proc; SLOTS],
    wants: [Want; WANTS],
    /// The next want's `seq`.
    next_seq: u64,
    /// Set when a want found the table full: the launcher looks at every database.
    overflow: bool,
    launcher: i32,
    /// Databases where `DROP EXTENSION pg_store` is under way: no worker claims a job
    /// there, and the launcher starts none, until its transaction ends.
    paused: [u32; PAUSED],
}

const PAUSED: usize = 16;

impl Default for Registry {
    fn default() -> Self {
        Registry {
            entries: [Entry::default(); SLOTS],
            procs: [Proc::default(); SLOTS],
            wants: [Want::default(); WANTS],
            next_seq: 1,
            overflow: false,
            launcher: 0,
            paused: [0; PAUSED],
        }
    }
}

// SAFETY: plain integers, no pointers.
unsafe impl PGRXSharedMemory for Registry {}

pub static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_store registry") };

pub fn my_database() -> u32 {
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

/// Send `signal` to every process working on `job` of `database` now, and to no other:
/// the registry's lock is held while signalling, and a process leaves the registry (under
/// the same lock, as it exits) before its PID can be reused — so a PID collected earlier,
/// whose process has exited since, is never signalled. Returns how many were signalled.
pub fn signal_job(database: u32, job: i64, signal: i32) -> usize {
    let r = REGISTRY.share();
    let mut n = 0;
    for e in r.entries.iter().filter(|e| e.pid != 0 && e.job == job && e.database == database) {
        // SAFETY: a signal to a live pg_store process of this server (same OS user).
        if unsafe { libc::kill(e.pid, signal) } == 0 {
            n += 1;
        }
    }
    n
}

/// Ask every pg_store process serving `database` (workers, inserters) to leave: SIGTERM,
/// which they look at between batches, and SIGINT, which ends a statement they wait in.
/// Returns how many there were.
pub fn stop_database(database: u32) -> usize {
    let r = REGISTRY.share();
    let mut n = 0;
    for p in r.procs.iter().filter(|p| p.database == database && matches!(p.kind, Kind::Worker | Kind::Inserter)) {
        // SAFETY: signals to live pg_store processes of this server; the lock held keeps
        // them in the table (a process leaves it under the lock, before its PID is free).
        unsafe {
            libc::kill(p.pid, libc::SIGTERM);
            libc::kill(p.pid, libc::SIGINT);
        }
        n += 1;
    }
    n
}

/// No worker may claim a job in `database`, and the launcher starts none there, until
/// [`unpause`]; false if too many databases are paused at once.
pub fn pause(database: u32) -> bool {
    let mut r = REGISTRY.exclusive();
    if r.paused.contains(&database) {
        return true;
    }
    match r.paused.iter_mut().find(|d| **d == 0) {
        Some(slot) => {
            *slot = database;
            true
        }
        None => false,
    }
}

/// Undo [`pause`].
pub fn unpause(database: u32) {
    for d in REGISTRY.exclusive().paused.iter_mut().filter(|d| **d == database) {
        *d = 0;
    }
}

/// Whether `database` is paused (see [`pause`]).
pub fn is_paused(database: u32) -> bool {
    REGISTRY.share().paused.contains(&database)
}

/// pg_store processes (workers, inserters) still serving `database`.
pub fn busy_in(database: u32) -> usize {
    REGISTRY
        .share()
        .procs
        .iter()
        .filter(|p| p.database == database && matches!(p.kind, Kind::Worker | Kind::Inserter))
        .count()
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
    let mut r = REGISTRY.exclusive();
    for e in r.entries.iter_mut().filter(|e| e.pid == pid) {
        *e = Entry::default();
    }
    let mut lost = None;
    let mut helped = None;
    for p in r.procs.iter_mut().filter(|p| p.pid == pid) {
        if p.kind == Kind::Worker && p.job != 0 {
            lost = Some(p.database);
        }
        if p.kind == Kind::Inserter && p.job != 0 {
            helped = Some((p.database, p.job));
        }
        *p = Proc::default();
    }
    // An inserter leaving a job whose worker is gone (`pg_terminate_backend` of the worker
    // while this process inserted its range): a worker that came meanwhile to resume the
    // job passed it by, the job being live, and nothing else would ask for one.
    if let Some((database, job)) = helped {
        if !r.procs.iter().any(|p| p.pid != 0 && p.kind == Kind::Worker && p.database == database && p.job == job) {
            lost = Some(database);
        }
    }
    // A worker leaving in the middle of a job (an error it did not survive): the
    // launcher starts another one for its database, which resumes the job.
    if let Some(database) = lost {
        r.add_want(database, false);
    }
    if r.launcher == pid {
        r.launcher = 0;
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Record this process as a `kind` in this database (none for the launcher); false if
/// the table is full.
pub fn proc_enter(kind: Kind) -> bool {
    let pid = std::process::id() as i32;
    let mut r = REGISTRY.exclusive();
    if kind == Kind::Launcher {
        r.launcher = pid;
    }
    match r.procs.iter_mut().find(|p| p.kind == Kind::Free) {
        Some(slot) => {
            *slot = Proc { pid, kind, database: my_database(), job: 0, since: now() };
            true
        }
        None => false,
    }
}

/// This process now works on `job` (0: it is idle).
pub fn proc_job(job: i64) {
    let pid = std::process::id() as i32;
    for p in REGISTRY.exclusive().procs.iter_mut().filter(|p| p.pid == pid) {
        p.job = job;
        p.since = now();
    }
}

/// The live pg_store processes.
pub fn procs() -> Vec<Proc> {
    REGISTRY.share().procs.iter().filter(|p| p.kind != Kind::Free).copied().collect()
}

/// Workers (not inserters) alive in all databases.
pub fn workers() -> usize {
    REGISTRY.share().procs.iter().filter(|p| p.kind == Kind::Worker).count()
}

/// Workers of `database` with no job: one of them takes the next job queued there.
pub fn idle_workers(database: u32) -> usize {
    REGISTRY.share().procs.iter().filter(|p| p.kind == Kind::Worker && p.database == database && p.job == 0).count()
}

impl Registry {
    /// Record a want for `database`; `last`: behind every other (a worker making room),
    /// else an earlier want of the same database keeps its place.
    fn add_want(&mut self, database: u32, last: bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(w) = self.wants.iter_mut().find(|w| w.database == database) {
            if last {
                w.seq = seq;
            }
        } else if let Some(w) = self.wants.iter_mut().find(|w| w.database == 0) {
            *w = Want { database, seq, refused: false };
        } else {
            self.overflow = true;
        }
    }
}

/// Ask the launcher for a worker in `database`, and wake it.
pub fn want(database: u32) {
    want_as(database, false);
}

/// Ask for a worker in `database` behind every database that waits already: a worker
/// that gives its place up asks this way.
pub fn want_last(database: u32) {
    want_as(database, true);
}

fn want_as(database: u32, last: bool) {
    let launcher = {
        let mut r = REGISTRY.exclusive();
        r.add_want(database, last);
        r.launcher
    };
    if launcher != 0 {
        // SAFETY: looks the launcher's PGPROC up under ProcArrayLock, and sets the latch
        // in it (shared memory); a process that has exited has no PGPROC and is skipped.
        unsafe {
            let proc = pg_sys::BackendPidGetProc(launcher);
            if !proc.is_null() {
                pg_sys::SetLatch(&mut (*proc).procLatch);
            }
        }
    }
}

/// Whether a want found the table full since the last call (then the launcher looks at
/// every database again).
pub fn take_overflow() -> bool {
    std::mem::take(&mut REGISTRY.exclusive().overflow)
}

/// The databases that want a worker, oldest want first; they stay until [`granted`].
pub fn wants() -> Vec<Want> {
    let mut w: Vec<Want> = REGISTRY.share().wants.iter().filter(|w| w.database != 0).copied().collect();
    w.sort_by_key(|w| w.seq);
    w
}

/// The launcher could not start a worker for `database`: no background worker slot.
pub fn refused(database: u32) {
    for w in REGISTRY.exclusive().wants.iter_mut().filter(|w| w.database == database) {
        w.refused = true;
    }
}

/// Why a job queued in this database is not running yet, if pg_store knows: for
/// `store.status`. `None` when a worker is about to take it.
pub fn queue_note(cap: usize) -> Option<String> {
    if cap == 0 {
        return Some(
            "store.workers is 0: no job runs until it is raised (ALTER SYSTEM SET store.workers, pg_reload_conf())"
                .into(),
        );
    }
    let db = my_database();
    let r = REGISTRY.share();
    // A worker claiming a job commits the claim before the job shows as running; with
    // the synchronous standby gone, that commit waits (the lock held: see job_wait).
    let mut claiming = r.procs.iter().filter(|p| p.kind == Kind::Worker && p.database == db && p.job == 0);
    if let Some(p) = claiming.find(|p| Wait::of(p.pid) == Some(Wait::Standby)) {
        return Some(Wait::Standby.note(p.pid));
    }
    let want = r.wants.iter().find(|w| w.database == db)?;
    if want.refused {
        return Some(
            "no background worker slot is free (max_worker_processes): the launcher tries again every second".into(),
        );
    }
    let busy = r.procs.iter().filter(|p| p.kind == Kind::Worker).count();
    (busy >= cap).then(|| format!("all store.workers ({cap}) are busy; this database is next in line"))
}

/// What a process working on `job` (in this database) waits for, where a DBA can act on
/// it: a lock another session holds, or a synchronous standby's confirmation of a
/// commit; for `store.status`. `None` while they work.
pub fn job_wait(job: i64) -> Option<(String, Option<i32>)> {
    let db = my_database();
    // The lock is held while the wait events are read: a process leaves the table under
    // it before its PGPROC and PID are free, and takes another job only after leaving
    // this one. Nothing takes it while holding ProcArrayLock.
    let r = REGISTRY.share();
    let mut procs =
        r.procs.iter().filter(|p| p.database == db && p.job == job && matches!(p.kind, Kind::Worker | Kind::Inserter));
    procs.find_map(|p| Wait::of(p.pid).map(|w| (w.note(p.pid), (w == Wait::Lock).then_some(p.pid))))
}

/// A wait of a pg_store process that a DBA can act on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// For a synchronous standby to confirm a commit.
    Standby,
    /// For a lock another session holds.
    Lock,
}

impl Wait {
    /// What process `pid` waits for, if a DBA can act on it. Waits to extend a relation,
    /// or for a page lock, are left out: a job's own inserters meet there for moments.
    fn of(pid: i32) -> Option<Wait> {
        // SAFETY: BackendPidGetProc looks the PID up under ProcArrayLock; a PGPROC stays
        // in shared memory, and its wait event is a 4-byte word read without a lock, as
        // pg_stat_activity reads it.
        let event = unsafe {
            let proc = pg_sys::BackendPidGetProc(pid);
            if proc.is_null() {
                return None;
            }
            std::ptr::addr_of!((*proc).wait_event_info).read_volatile()
        };
        let brief =
            matches!(event & 0xFFFF, pg_sys::LockTagType::LOCKTAG_RELATION_EXTEND | pg_sys::LockTagType::LOCKTAG_PAGE);
        if event == pg_sys::WaitEventIPC::WAIT_EVENT_SYNC_REP {
            Some(Wait::Standby)
        } else if event & 0xFF00_0000 == pg_sys::PG_WAIT_LOCK && !brief {
            Some(Wait::Lock)
        } else {
            None
        }
    }

    fn note(self, pid: i32) -> String {
        match self {
            Wait::Standby => format!(
                "a synchronous standby to confirm a commit of process {pid} (synchronous_standby_names, pg_stat_replication)"
            ),
            Wait::Lock => format!("a lock another session holds: pg_blocking_pids({pid}) names it"),
        }
    }
}

/// A worker of `database` is about to look at its queue, or the launcher started one.
pub fn granted(database: u32) {
    for w in REGISTRY.exclusive().wants.iter_mut().filter(|w| w.database == database) {
        *w = Want::default();
    }
}

/// Whether a database other than `database` waits for a worker.
pub fn others_waiting(database: u32) -> bool {
    REGISTRY.share().wants.iter().any(|w| w.database != 0 && w.database != database)
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
