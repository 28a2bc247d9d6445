//! Resource control: how much memory and how many threads a run may use, how that
//! memory is split between the stages, and threads that never receive signals (so that
//! SIGTERM/SIGHUP sent to a PostgreSQL backend land on its main thread).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::{Error, Result};

/// Share of system RAM used when no memory limit is given, as `store.memory_limit`.
pub(crate) const DEFAULT_MEMORY_PERCENT: f64 = 20.0;
/// Smallest budget accepted (1 MiB): below that the fixed buffers dominate.
pub(crate) const MIN_MEMORY: u64 = 1 << 20;

/// Total physical memory, in bytes.
pub(crate) fn system_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory()
}

/// Parse a memory limit: plain bytes (`268435456`), a size with a binary suffix
/// (`256K`, `256M`, `1G`, `1T`, optional `B`/`iB`, any case), or a share of physical
/// RAM (`20%`).
pub fn parse_memory(spec: &str) -> Result<u64> {
    let s = spec.trim();
    let bad =
        || Error::Config(format!("memory limit {spec:?}: expected bytes, a size like 256MB, or a percentage like 20%"));
    let bytes = if let Some(pct) = s.strip_suffix('%') {
        let pct: f64 = pct.trim().parse().map_err(|_| bad())?;
        if !(pct > 0.0 && pct <= 100.0) {
            return Err(bad());
        }
        (system_memory() as f64 * pct / 100.0) as u64
    } else {
        let upper = s.to_ascii_uppercase();
        let num_end = upper.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(upper.len());
        let (num, unit) = upper.split_at(num_end);
        let num: f64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().trim_end_matches("IB").trim_end_matches('B') {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(bad()),
        };
        (num * mult as f64) as u64
    };
    if bytes < MIN_MEMORY {
        return Err(Error::Config(format!("memory limit {spec:?} is below the minimum of 1MB")));
    }
    Ok(bytes)
}

/// Default thread count: half the cores, at least one.
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1)
}

/// How a memory budget is divided. Two sort chunks are in flight (one filling, one
/// being sorted and spilled); the rest pays for read buffers, run writers and the
/// merge's per-run buffers. While the merge runs, at most one chunk is left (the last,
/// unless the sort is kept), and the other's share pays for the records the merge threads
/// work ahead (each at most a batch's `max_bytes`; the job's insert ranges share the
/// chunk's share). Everything is allocated lazily, so a small input uses little whatever
/// the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Bytes of record data plus index one chunk may hold.
    pub chunk_bytes: usize,
    /// Read buffer of each open run during the merge.
    pub merge_buffer: usize,
}

impl Budget {
    pub(crate) fn split(memory_limit: u64, fan_in: usize) -> Budget {
        let limit = memory_limit as usize;
        // 1/8 (at most 32 MiB) stays outside the chunks for buffers and the allocator.
        let reserve = (limit / 8).min(32 << 20);
        let chunk_bytes = ((limit - reserve) / 2).min(u32::MAX as usize);
        // The merge holds at most fan_in run buffers plus one chunk kept in memory.
        let merge_buffer = (reserve / 2 / fan_in.max(1)).clamp(16 << 10, 1 << 20);
        Budget { chunk_bytes, merge_buffer }
    }

    /// The buffer a run takes in a merge when its longest record is `longest` bytes: it
    /// grows to hold that record, to less than twice its size.
    pub(crate) fn run_buffer(&self, longest: u64) -> usize {
        self.merge_buffer.max(2 * (longest as usize).saturating_add(1))
    }

    /// How many runs, from the first of those whose longest records are `longest`, one
    /// merge may read at once: at most `fan_in`, their buffers together within what
    /// `fan_in` buffers of [`merge_buffer`](Self::merge_buffer) take, and two at least
    /// (the least a merge can take). Runs of short records change nothing; a run of long
    /// ones takes the room of several.
    pub(crate) fn merge_width(&self, longest: &[u64], fan_in: usize) -> usize {
        let room = self.merge_buffer * fan_in;
        let (mut k, mut used) = (0, 0);
        for &l in longest.iter().take(fan_in.max(2)) {
            used += self.run_buffer(l);
            if k >= 2 && used > room {
                break;
            }
            k += 1;
        }
        k
    }
}

/// Keep the allocator from holding on to large buffers, so that a job's peak memory
/// does not depend on what ran before it in the process (PostgreSQL's worker runs job
/// after job). glibc raises its mmap threshold to the size of each large buffer freed
/// (up to 32 MiB): the next job's sort chunks and batches then grow inside the heap,
/// copied on every doubling, instead of in mappings given back when freed. A second
/// job in the same worker peaked 35 MiB higher than the first. Pinning the threshold
/// at its default (128 KiB) stops that; free memory is given back too. It holds for the
/// rest of the process: PostgreSQL's own allocations of 128 KiB and more are mapped and
/// unmapped each time, as before any large buffer was freed.
pub(crate) fn steady_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt and malloc_trim change only the allocator's own tuning and free pages.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::malloc_trim(0);
    }
}

/// Blocks every signal in the calling thread while it lives and restores the previous
/// mask when dropped — on every path out, a panic included. Threads spawned while it
/// lives inherit the blocked mask, so signals meant for the process go to a thread that
/// did not block them: the caller's (in a PostgreSQL backend, the one that may handle
/// SIGTERM and SIGHUP).
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    pub(crate) fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is plain data; pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked { old }
        }
    }
}

impl Default for SignalsBlocked {
    fn default() -> Self {
        SignalsBlocked::new()
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Run `f` with every signal blocked in the calling thread; the mask is restored
/// however `f` ends.
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    let _blocked = SignalsBlocked::new();
    f()
}

/// Start a named thread that never receives signals. Failing to start one (no memory,
/// a process limit) is an error, not a panic.
pub(crate) fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let _blocked = SignalsBlocked::new();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Internal(format!("could not start thread {name}: {e}")))
}

/// [`spawn`] inside a [`std::thread::scope`].
pub(crate) fn spawn_scoped<'scope, 'env, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Result<std::thread::ScopedJoinHandle<'scope, T>> {
    let _blocked = SignalsBlocked::new();
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, f)
        .map_err(|e| Error::Internal(format!("could not start thread {name}: {e}")))
}

/// A rayon pool of `threads` workers whose threads have all signals blocked.
pub(crate) fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    with_signals_blocked(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("pg_store-sort-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("could not start {threads} sort threads: {e}")))
    })
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
pub(crate) fn free_space(dir: &Path) -> Result<u64> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::Config(format!("bad path {dir:?}")))?;
    // SAFETY: statvfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(Error::io("could not statvfs", dir, std::io::Error::last_os_error()));
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Sum of the given `/proc/self/status` fields (kB lines), in bytes.
fn proc_status_bytes(fields: &[&str]) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let mut total = 0;
    for f in fields {
        let line = status.lines().find(|l| l.starts_with(f))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    }
    Some(total)
}

/// Peak resident set size of this process, in bytes (VmHWM), if /proc tells.
pub fn peak_rss() -> Option<u64> {
    proc_status_bytes(&["VmHWM:"])
}

/// Resident memory of this process that is its own (anonymous and file pages), leaving
/// out shared memory: in a PostgreSQL backend VmRSS also counts every page of
/// shared_buffers it has touched, which says nothing about what the process needs.
pub fn private_rss() -> Option<u64> {
    proc_status_bytes(&["RssAnon:", "RssFile:"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_specs() {
        assert_eq!(parse_memory("256M").unwrap(), 256 << 20);
        assert_eq!(parse_memory("256MB").unwrap(), 256 << 20);
        assert_eq!(parse_memory(" 1GiB ").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("2097152").unwrap(), 2 << 20);
        let ram = system_memory();
        let pct = parse_memory("20%").unwrap();
        assert!(pct > 0 && pct.abs_diff(ram / 5) < ram / 1000, "{pct} vs {ram}");
        for bad in ["", "abc", "12Q", "0%", "150%", "-1M", "100K"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn budget_keeps_chunks_within_the_limit() {
        for limit in [1u64 << 20, 64 << 20, 256 << 20, 8 << 30] {
            let b = Budget::split(limit, 128);
            assert!(2 * b.chunk_bytes as u64 + 128 * b.merge_buffer as u64 <= limit + (2 << 20), "{limit}: {b:?}");
            assert!(b.chunk_bytes as u64 >= limit / 3);
        }
    }

    #[test]
    fn long_records_narrow_the_merge_to_what_the_budget_holds() {
        let b = Budget::split(16 << 20, 128);
        // Records that fit a buffer: the configured fan-in.
        assert_eq!(b.merge_width(&[0; 200], 128), 128);
        assert_eq!(b.merge_width(&[b.merge_buffer as u64 / 2 - 1; 200], 128), 128);
        assert_eq!(b.merge_width(&[10; 5], 128), 5);
        // 2 MiB records at 16 MB: two at a time, the least a merge can take.
        assert_eq!(b.merge_width(&[2 << 20; 50], 128), 2);
        // One run of 60 KB records among short ones takes the room of a few, no more.
        let mut mixed = vec![100; 40];
        mixed[7] = 60_000;
        assert_eq!(b.merge_width(&mixed, 128), 40);
        let b = Budget::split(1 << 30, 128);
        let w = b.merge_width(&[1 << 20; 200], 128);
        assert!(w < 128 && w * b.run_buffer(1 << 20) <= 128 * b.merge_buffer, "{w}");
    }

    fn sigterm_blocked() -> bool {
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, libc::SIGTERM) == 1
        }
    }

    #[test]
    fn the_signal_mask_is_restored_when_the_blocked_section_panics() {
        // On a thread of its own, so the test harness's thread keeps its mask whatever happens.
        std::thread::spawn(|| {
            assert!(!sigterm_blocked());
            let r = std::panic::catch_unwind(|| with_signals_blocked(|| panic!("spawn failed")));
            assert!(r.is_err());
            assert!(!sigterm_blocked(), "SIGTERM stayed blocked after a panic inside with_signals_blocked");
            let h = spawn("t", sigterm_blocked).unwrap();
            assert!(h.join().unwrap(), "the spawned thread has signals blocked");
            assert!(!sigterm_blocked(), "and the spawner got its mask back");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn pool_threads_do_not_take_signals() {
        let pool = thread_pool(2).unwrap();
        let blocked = pool.install(|| unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, libc::SIGTERM) == 1 && libc::sigismember(&cur, libc::SIGHUP) == 1
        });
        assert!(blocked);
        assert!(free_space(Path::new("/")).unwrap() > 0);
        assert!(peak_rss().unwrap() > 0);
        assert!(private_rss().unwrap() > 0 && private_rss().unwrap() <= peak_rss().unwrap() + (64 << 20));
    }
}
