//! Every `store.*` setting, in one place. Values are read on the main thread only and
//! handed to the engine as plain Rust values ([`Settings`], then a
//! [`store_engine::Config`]). Numbers carry their bounds; every string setting has a
//! check hook, so a value pg_store could not use is refused where it is set (`SET`,
//! `ALTER SYSTEM`, a reload logs it and keeps the old one) rather than failing every
//! later job.

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::time::Duration;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

use store_engine::{default_threads, parse_memory, BatchLimits, Fault, LineLimit};

pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static MEMORY_LIMIT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"20%"));
pub static CPU_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static TEMP_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static BATCH_MIN: GucSetting<i32> = GucSetting::<i32>::new(BatchLimits::DEFAULT.min as i32);
pub static BATCH_MAX: GucSetting<i32> = GucSetting::<i32>::new(BatchLimits::DEFAULT.max as i32);
pub static BATCH_TARGET_MS: GucSetting<i32> = GucSetting::<i32>::new(BatchLimits::DEFAULT.target.as_millis() as i32);
pub static BLOOM_FPR: GucSetting<f64> = GucSetting::<f64>::new(0.01);
pub static MAX_LINE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(LineLimit::DEFAULT.bytes as i32);
pub static ALLOWED_DIRS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static COMPRESS_RUNS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static CHECK_TEMP_SPACE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Minutes; 30 days.
pub static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(43_200);
pub static INSERT_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static COMPACT_INDEX: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static FAULT_INJECTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Define the settings. `store.workers` caps processes the launcher starts, and there is
/// a launcher only when pg_store was preloaded: it is defined only then, and
/// `store_ingest` explains what is missing otherwise.
pub fn init(preloading: bool) {
    if preloading {
        GucRegistry::define_int_guc(
            c"store.workers",
            c"Most background workers running jobs at once, in all databases together.",
            c"A worker serves one database; the launcher starts one where jobs wait. Needs pg_store in shared_preload_libraries, and room in max_worker_processes (with the insert workers).",
            &WORKERS,
            0,
            256,
            GucContext::Sighup,
            GucFlags::default(),
        );
    }
    define_reloadable_gucs();
    // `store.wokers = 3` is a typo, not a setting of some other module: refused (with a
    // WARNING in postgresql.conf) instead of being kept as a placeholder.
    // SAFETY: called once, while the library loads.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"store".as_ptr()) };
}

fn define_reloadable_gucs() {
    GucRegistry::define_int_guc(
        c"store.retention",
        c"How long ended jobs are kept, with their files, checkpoints and rejects; 0 keeps them forever.",
        c"Workers purge older ones when idle; the ledger of ingested files is never purged.",
        &RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    // SAFETY: the hooks are `#[pg_guard]`ed and only read their argument.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"store.memory_limit",
            c"Memory budget of one job: bytes with a unit (256MB) or a share of RAM (20%).",
            c"At least 1MB; a share between 0 and 100%.",
            &MEMORY_LIMIT,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_memory_limit),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"store.cpu_limit",
        c"Sort threads of one job; 0 means half the cores.",
        c"",
        &CPU_LIMIT,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"store.temp_dir",
            c"Directory for sorted runs; default pgsql_tmp_pg_store inside the data directory.",
            c"An absolute path. Each job makes a private directory in it; a directory others may write to needs the sticky bit.",
            &TEMP_DIR,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_temp_dir),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"store.batch_min",
        c"Fewest rows per insert batch.",
        c"",
        &BATCH_MIN,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"store.batch_max",
        c"Most rows per insert batch.",
        c"",
        &BATCH_MAX,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"store.batch_target_ms",
        c"Latency each insert batch aims at (more when a batch's fixed cost is high: ten times that cost).",
        c"",
        &BATCH_TARGET_MS,
        1,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_float_guc(
        c"store.bloom_fpr",
        c"False-positive rate of the Bloom filter in dedup => 'bloom' mode.",
        c"",
        &BLOOM_FPR,
        1e-9,
        0.5,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"store.max_line_bytes",
        c"Longest record accepted, in bytes; longer ones are rejected as too_long.",
        c"",
        &MAX_LINE_BYTES,
        1,
        64 << 20,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"store.allowed_dirs",
            c"Comma-separated directories store_ingest may read; empty means any.",
            c"Absolute paths. Paths are canonicalised first, so symbolic links and .. cannot leave them.",
            &ALLOWED_DIRS,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            Some(check_allowed_dirs),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"store.compress_runs",
        c"zstd-compress sorted runs: less temporary disk, more CPU.",
        c"",
        &COMPRESS_RUNS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"store.check_temp_space",
        c"Refuse a job before reading when store.temp_dir has less free space than its input needs.",
        c"Turn off where free space is misreported (quotas, compressing file systems): a job that runs out fails with ENOSPC instead.",
        &CHECK_TEMP_SPACE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"store.insert_workers",
        c"Processes that insert one job's sorted lines, each a key range of its own; 0 means one per core (into a Citus table: cores / (1 + the worker nodes holding its shards on this host), at least one).",
        c"Inserters beyond the first are dynamic background workers: each takes a slot of max_worker_processes.",
        &INSERT_WORKERS,
        0,
        64,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"store.compact_index",
        c"A load into a local target that is empty, or whose keys all sort before the new lines, inserts as one key range, leaving an index as compact as COPY of sorted lines.",
        c"Only where the job's owner may read the target. Off: store.insert_workers ranges there too, faster where cores are many, but every range below the last splits its index pages half and half (about 1.4 times the size with two ranges).",
        &COMPACT_INDEX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"store.max_attempts",
        c"Claims of a job whose worker keeps disappearing (crash, kill, shutdown) before it fails for good.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"store.fault_injection",
            c"For tests only: a fault injected into the next jobs (merge_panic:N, corrupt_runs, short_copy_file).",
            c"",
            &FAULT_INJECTION,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_fault),
            None,
            None,
        );
    }
}

/// The value a string check hook is asked about; `None` for NULL or blank (the default).
///
/// # Safety
/// `newval` is the hook's argument: NULL or a pointer to NULL or a C string.
unsafe fn proposed<'a>(newval: *mut *mut std::ffi::c_char) -> Option<&'a str> {
    // SAFETY: as the caller promises.
    let p = unsafe { newval.as_ref().copied().filter(|p| !p.is_null())? };
    // SAFETY: a NUL-terminated string PostgreSQL owns for the duration of the hook.
    let s = unsafe { CStr::from_ptr(p) }.to_str().ok()?;
    (!s.trim().is_empty()).then_some(s)
}

/// Refuse a value: what is wrong with it goes into the error's detail.
fn refuse(why: String) -> bool {
    let why = CString::new(why.replace('\0', "")).unwrap_or_default();
    // SAFETY: the detail string PostgreSQL reports after the hook returns false,
    // allocated in the current memory context as `GUC_check_errdetail` does.
    unsafe {
        pgrx::pg_sys::GUC_check_errcode(pgrx::pg_sys::errcodes::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(why.as_ptr());
    }
    false
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_memory_limit(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the hook's own argument.
    match unsafe { proposed(newval) }.map(parse_memory) {
        None | Some(Ok(_)) => true,
        Some(Err(e)) => refuse(e.to_string()),
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_temp_dir(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the hook's own argument.
    match unsafe { proposed(newval) } {
        Some(d) if !d.trim().starts_with('/') => refuse(format!("{d:?} is not an absolute path")),
        _ => true,
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_allowed_dirs(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the hook's own argument.
    let Some(dirs) = (unsafe { proposed(newval) }) else { return true };
    match dirs.split(',').map(str::trim).find(|d| !d.is_empty() && !d.starts_with('/')) {
        Some(d) => refuse(format!("{d:?} is not an absolute path")),
        None => true,
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_fault(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the hook's own argument.
    match unsafe { proposed(newval) }.map(str::parse::<Fault>) {
        None | Some(Ok(_)) => true,
        Some(Err(e)) => refuse(e.to_string()),
    }
}

fn string(s: &GucSetting<Option<CString>>) -> Option<String> {
    s.get().map(|c| c.to_string_lossy().into_owned()).filter(|s| !s.trim().is_empty())
}

/// Allowed directories, as configured (not yet canonicalised).
pub fn allowed_dirs() -> Vec<PathBuf> {
    string(&ALLOWED_DIRS).map_or_else(Vec::new, |s| {
        s.split(',').map(|d| PathBuf::from(d.trim())).filter(|d| !d.as_os_str().is_empty()).collect()
    })
}

/// A job's settings, read once on the main thread.
#[derive(Debug, Clone)]
pub struct Settings {
    pub memory_limit: u64,
    pub threads: usize,
    pub temp_dir: PathBuf,
    pub batch_min: usize,
    pub batch_max: usize,
    pub batch_target: Duration,
    pub bloom_fpr: f64,
    pub max_line_bytes: usize,
    pub compress_runs: bool,
    pub check_temp_space: bool,
    pub fault: Option<Fault>,
    /// Processes inserting one job's ranges.
    pub insert_workers: usize,
    /// `store.insert_workers` is 0: one per core, which a Citus coordinator shares with
    /// the worker nodes on its host ([`crate::citus::insert_ranges`]).
    pub insert_workers_auto: bool,
    /// One range into an empty local target (`store.compact_index`).
    pub compact_index: bool,
}

impl Settings {
    pub fn read() -> Result<Settings, store_engine::Error> {
        let mem = string(&MEMORY_LIMIT).unwrap_or_else(|| "20%".into());
        let memory_limit =
            parse_memory(&mem).map_err(|e| store_engine::Error::Config(format!("store.memory_limit: {e}")))?;
        let fault = string(&FAULT_INJECTION).map(|f| f.parse()).transpose()?;
        let threads = match CPU_LIMIT.get() {
            0 => default_threads(),
            n => n as usize,
        };
        let temp_dir = string(&TEMP_DIR).map(PathBuf::from).unwrap_or_else(default_temp_dir);
        let (batch_min, batch_max) = (BATCH_MIN.get() as usize, BATCH_MAX.get() as usize);
        Ok(Settings {
            memory_limit,
            threads,
            temp_dir,
            batch_min: batch_min.min(batch_max),
            batch_max,
            batch_target: Duration::from_millis(BATCH_TARGET_MS.get() as u64),
            bloom_fpr: BLOOM_FPR.get(),
            max_line_bytes: MAX_LINE_BYTES.get() as usize,
            compress_runs: COMPRESS_RUNS.get(),
            check_temp_space: CHECK_TEMP_SPACE.get(),
            fault,
            insert_workers: match INSERT_WORKERS.get() {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n as usize,
            },
            insert_workers_auto: INSERT_WORKERS.get() == 0,
            compact_index: COMPACT_INDEX.get(),
        })
    }

    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits { min: self.batch_min, max: self.batch_max, target: self.batch_target, ..BatchLimits::default() }
    }
}

/// `store.temp_dir` when it is not set: inside the data directory, under a name that
/// begins with `pgsql_tmp`, which `pg_basebackup` (and `pg_rewind`) leave out, as they
/// leave out PostgreSQL's own temporary files — sorted runs are no part of a backup —
/// while a restart keeps it (PostgreSQL clears only its own `base/pgsql_tmp`), so a
/// job resumes from its kept runs.
pub fn default_temp_dir() -> PathBuf {
    data_directory().join("pgsql_tmp_pg_store")
}

/// Where `store.temp_dir` pointed by default before 0.3.0 (its job directories are
/// removed, not resumed from).
pub fn legacy_temp_dir() -> PathBuf {
    data_directory().join("pg_store_tmp")
}

/// The server's data directory.
pub fn data_directory() -> PathBuf {
    // SAFETY: DataDir is set by the postmaster before any backend or worker runs.
    let dir: &CStr = unsafe { CStr::from_ptr(pgrx::pg_sys::DataDir) };
    PathBuf::from(dir.to_string_lossy().into_owned())
}
