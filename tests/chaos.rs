//! `make chaos`: the reliability campaign. One local cluster (started and removed by
//! this program, like the integration tests), a seeded RNG, and one fault after another:
//! `kill -9` of the ingesting worker and `pg_ctl stop -m immediate` at random moments,
//! temporary space running out, files that change while a job runs, odd inputs,
//! concurrent jobs and DDL, cancels, terminated workers, 50 queued jobs, and hostile
//! callers. After each fault the job is left to finish (or re-run) by itself and the
//! target is compared with the project's own oracle, line by line when it differs.
//!
//! Prints one line per fault and ends with
//! `chaos: N/N faults survived, 0 records lost, 0 duplicated, 0 server crashes, M/M hostile attempts refused or harmless`;
//! exits non-zero on any loss, duplicate, crash or failed check.
//!
//! `PG_STORE_CHAOS=1` runs it (the Makefile sets it); `CHAOS_SEED` changes the seed,
//! `CHAOS_ONLY=kill9,hostile` runs some sections. Without `PG_STORE_CHAOS` it does
//! nothing, so `cargo test` and `cargo pgrx test` pass over it. Needs `make install`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{readable_dir, shared_oracle_sha, Cluster, BIN};
use store_testkit::{generate, line_for, oracle_set, Expected, GenSpec, Rng};

type Lines = BTreeSet<Vec<u8>>;

/// What a directory must produce: the oracle's counts and its distinct lines.
#[derive(Clone)]
struct Want {
    e: Expected,
    lines: Lines,
}

fn want_of(dir: &Path) -> Want {
    let (e, lines) = oracle_set(dir, 65536).unwrap();
    Want { e, lines }
}

#[derive(Default)]
struct Tally {
    faults: u32,
    survived: u32,
    lost: u64,
    duplicated: u64,
    crashes: u64,
    hostile: u32,
    refused: u32,
    failures: Vec<String>,
    kill_phases: BTreeMap<String, u32>,
}

struct Ctx {
    c: Cluster,
    rng: Rng,
    t: Tally,
    tables: u32,
    /// The main fault data set and its expected result.
    data: PathBuf,
    want: Want,
    /// Seconds from start to first insert, and start to end, of an undisturbed job.
    scan_s: f64,
    total_s: f64,
    /// Deliberate SIGKILLs, so the log's "terminated by signal 9" lines can be told apart.
    our_kills: u64,
}

type Check = Result<String, String>;

fn main() {
    if std::env::var_os("PG_STORE_CHAOS").is_none() {
        println!("chaos: not run (`make chaos` runs it)");
        return;
    }
    let seed: u64 = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261124);
    let only: Option<Vec<String>> =
        std::env::var("CHAOS_ONLY").ok().map(|s| s.split(',').map(str::to_string).collect());
    let want_section = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let started = Instant::now();
    println!("chaos: seed {seed}");

    let c = Cluster::start(
        "chaos",
        "store.batch_max = 2000\nstore.memory_limit = '16MB'\nstore.cpu_limit = 1\nmax_connections = 120\nlog_line_prefix = '%m [%p] '",
    );
    let data = readable_dir(&c.dir.join("data-main"));
    generate(&data, &GenSpec { files: 4, size: 28 << 20, seed, nasty: true, ..GenSpec::default() }).unwrap();
    let want = want_of(&data);
    println!(
        "chaos: main data set {} files, {} records, {} distinct, {} rejected",
        want.e.files, want.e.records, want.e.distinct, want.e.rejected
    );
    match shared_oracle_sha(&data) {
        Some(sha) if sha == want.e.sha256 => {
            println!("chaos: ../shared/bench/oracle.py agrees with the project's oracle ({sha})")
        }
        Some(sha) => panic!("../shared/bench/oracle.py says {sha}, the project's oracle {}", want.e.sha256),
        None => println!("chaos: ../shared/bench/oracle.py not present: the project's oracle alone"),
    }
    let mut x = Ctx {
        c,
        rng: Rng::new(seed),
        t: Tally::default(),
        tables: 0,
        data,
        want,
        scan_s: 0.0,
        total_s: 0.0,
        our_kills: 0,
    };
    x.baseline();

    type Section = (&'static str, fn(&mut Ctx));
    let sections: [Section; 10] = [
        ("kill9", kill9_rounds),
        ("inserters", inserter_rounds),
        ("sort", sort_rounds),
        ("merge", merge_rounds),
        ("immediate", immediate_rounds),
        ("space", temp_space),
        ("files", files),
        ("concurrency", concurrency),
        ("load", load),
        ("hostile", hostile),
    ];
    for (name, f) in sections {
        if want_section(name) {
            let t = Instant::now();
            f(&mut x);
            println!("chaos: section {name} took {:.0} s", t.elapsed().as_secs_f64());
        }
    }

    // Crashes: any server process that died of a signal we did not send, or a PANIC.
    let log = fs::read_to_string(x.c.dir.join("log")).unwrap_or_default();
    let signalled: Vec<&str> = log.lines().filter(|l| l.contains("was terminated by signal")).collect();
    let sigkills = signalled.iter().filter(|l| l.contains("terminated by signal 9:")).count() as u64;
    let other_signals = signalled.len() as u64 - sigkills;
    let panics = log.lines().filter(|l| l.contains("PANIC:")).count() as u64;
    x.t.crashes += other_signals + sigkills.saturating_sub(x.our_kills) + panics;
    if !x.c.running() {
        x.t.crashes += 1;
    }

    let t = &x.t;
    if !t.kill_phases.is_empty() {
        println!("chaos: status phase at the moment of each kill/stop: {:?}", t.kill_phases);
    }
    for f in &t.failures {
        println!("chaos: FAILED {f}");
    }
    println!("chaos: {:.1} minutes", started.elapsed().as_secs_f64() / 60.0);
    println!(
        "chaos: {}/{} faults survived, {} records lost, {} duplicated, {} server crashes, {}/{} hostile attempts refused or harmless",
        t.survived, t.faults, t.lost, t.duplicated, t.crashes, t.refused, t.hostile
    );
    let ok = t.survived == t.faults && t.lost == 0 && t.duplicated == 0 && t.crashes == 0 && t.refused == t.hostile;
    if !ok {
        if t.refused != t.hostile {
            println!("chaos: only {} of {} hostile attempts were refused or came to nothing", t.refused, t.hostile);
        }
        // exit() skips destructors: stop and remove the cluster first.
        drop(x);
        std::process::exit(1);
    }
}

impl Cluster {
    fn running(&self) -> bool {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl"), "-D", self.data().to_str().unwrap(), "status"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// psql as `role` with verbose errors: `Err` holds "ERROR:  SQLSTATE: message".
    fn psql_verbose(&self, role: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(format!("{BIN}/psql"))
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=verbose",
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
            ])
            .args(["-U", role, "-d", "postgres", "-c", sql])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}

impl Ctx {
    fn q(&self, sql: &str) -> String {
        self.c.psql_retry(sql, Duration::from_secs(60))
    }

    fn num(&self, sql: &str) -> i64 {
        let s = self.q(sql);
        s.parse().unwrap_or_else(|e| panic!("{sql}: {s:?}: {e}"))
    }

    /// A fresh target with the line_key unique index, as store.lines has.
    fn target(&mut self) -> String {
        self.tables += 1;
        let t = format!("chaos_{}", self.tables);
        self.q(&format!("CREATE TABLE {t} (line text NOT NULL); CREATE UNIQUE INDEX ON {t} (store.line_key(line))"));
        t
    }

    fn ingest(&self, dir: &Path, table: &str) -> i64 {
        self.q(&format!("SELECT store_ingest('{}', '{table}')", dir.display())).parse().unwrap()
    }

    /// Wait for a job that loses a file on the way: it must end `partial`.
    fn partial(&self, job: i64) -> Result<(), String> {
        match self.end_of(job, Duration::from_secs(300))?.as_str() {
            "partial" => Ok(()),
            s => Err(format!("job {job} ended {s}, not partial: {}", self.error_of(job))),
        }
    }

    /// Wait for a job to end; its final state.
    fn end_of(&self, job: i64, within: Duration) -> Result<String, String> {
        let t = Instant::now();
        loop {
            let s = self.q(&format!("SELECT state FROM store.jobs WHERE id = {job}"));
            if ["done", "partial", "failed", "cancelled"].contains(&s.as_str()) {
                return Ok(s);
            }
            if t.elapsed() > within {
                return Err(format!("job {job} still {s} after {within:?}; log:\n{}", self.c.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn done(&self, job: i64) -> Result<(), String> {
        match self.end_of(job, Duration::from_secs(300))?.as_str() {
            "done" => Ok(()),
            s => Err(format!("job {job} ended {s}: {}", self.error_of(job))),
        }
    }

    /// The table's lines and its row count.
    fn lines(&self, table: &str) -> (Lines, i64) {
        let out = Command::new(format!("{BIN}/psql"))
            .args([
                "-XAtq",
                "-h",
                self.c.dir.to_str().unwrap(),
                "-p",
                &self.c.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!("SELECT line FROM {table}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut rows = 0;
        let mut set = Lines::new();
        for l in out.stdout.split(|&b| b == b'\n') {
            rows += 1;
            set.insert(l.to_vec());
        }
        // The output ends with a newline: one empty piece that is not a row.
        rows -= 1;
        set.remove(&b""[..]);
        (set, rows)
    }

    /// Lines missing below `lower`, lines beyond `upper`, and rows that repeat a line;
    /// adds them to the tally.
    fn bounds(&mut self, table: &str, lower: &Lines, upper: &Lines) -> Result<(usize, i64), String> {
        let (have, rows) = self.lines(table);
        let lost = lower.difference(&have).count() as u64;
        let extra = have.difference(upper).count() as u64;
        let repeats = (rows - have.len() as i64).max(0) as u64;
        self.t.lost += lost;
        self.t.duplicated += extra + repeats;
        if lost + extra + repeats > 0 {
            return Err(format!(
                "{table}: {lost} lines lost, {extra} lines that should not be there, {repeats} repeated rows"
            ));
        }
        Ok((have.len(), rows))
    }

    /// The table holds exactly `want`'s lines, and the job's counters add up.
    fn exact(&mut self, table: &str, want: &Want, job: Option<i64>) -> Result<(), String> {
        if self.c.table_sha(table, "line") != want.e.sha256 {
            let w = want.lines.clone();
            self.bounds(table, &w, &w)?;
            return Err(format!("{table}: checksum differs from the oracle's"));
        }
        if let Some(job) = job {
            let (rej, total) = (
                self.num(&format!("SELECT count(*) FROM store.rejects WHERE job = {job}")),
                self.num(&format!("SELECT inserted + already_present FROM store.status WHERE id = {job}")),
            );
            if rej != want.e.rejected as i64 {
                let d = rej - want.e.rejected as i64;
                if d > 0 {
                    self.t.duplicated += d as u64
                } else {
                    self.t.lost += (-d) as u64
                }
                return Err(format!("job {job}: {rej} rejects recorded, the oracle has {}", want.e.rejected));
            }
            if total != want.e.distinct as i64 {
                return Err(format!(
                    "job {job}: inserted + already_present = {total}, the oracle has {} distinct",
                    want.e.distinct
                ));
            }
            // The main data set goes into a fresh table in every round that checks a job:
            // then each counter is what an undisturbed run reports, whatever happened to
            // this one (kills, stops, a claim taken over).
            if want.e.sha256 == self.want.e.sha256 {
                let e = &want.e;
                let undisturbed = format!(
                    "records {} empty {} rejected {} filtered 0 duplicates {} inserted {} already_present 0",
                    e.records,
                    e.empty,
                    e.rejected,
                    e.records - e.rejected - e.distinct,
                    e.distinct
                );
                let have = self.q(&format!(
                    "SELECT concat_ws(' ', 'records', records, 'empty', empty, 'rejected', rejected, 'filtered', filtered, \
                            'duplicates', duplicates, 'inserted', inserted, 'already_present', already_present) \
                     FROM store.status WHERE id = {job}"
                ));
                if have != undisturbed {
                    return Err(format!("job {job}: counters {have}, an undisturbed run: {undisturbed}"));
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, name: &str, r: Check, took: Duration) {
        self.t.faults += 1;
        let took = took.as_secs_f64();
        match r {
            Ok(detail) => {
                self.t.survived += 1;
                println!("  ok   {name} ({took:.1} s){}{detail}", if detail.is_empty() { "" } else { ": " });
            }
            Err(e) => {
                println!("  FAIL {name} ({took:.1} s): {e}");
                self.t.failures.push(format!("{name}: {e}"));
            }
        }
        if !self.c.running() {
            // Nothing in the campaign leaves the server down on purpose at this point.
            self.t.crashes += 1;
            self.t.failures.push(format!("{name}: the server was down afterwards"));
            self.c.pg_ctl_start();
        }
    }

    /// Run `f` as one fault, catching its panics as failures.
    fn fault(&mut self, name: &str, f: impl FnOnce(&mut Ctx) -> Check) {
        let started = Instant::now();
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(r) => r,
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()),
        };
        self.record(name, r, started.elapsed());
    }

    fn baseline(&mut self) {
        let t = self.target();
        let job = self.ingest(&self.data.clone(), &t);
        self.done(job).expect("the undisturbed baseline job");
        let want = self.want.clone();
        self.exact(&t, &want, Some(job)).expect("the undisturbed baseline job is exact");
        let s = self.q(&format!(
            "SELECT extract(epoch FROM insert_started_at - started_at) || ' ' || extract(epoch FROM finished_at - started_at) FROM store.jobs WHERE id = {job}"
        ));
        let mut it = s.split(' ').map(|v| v.parse::<f64>().unwrap());
        (self.scan_s, self.total_s) = (it.next().unwrap(), it.next().unwrap());
        println!("chaos: undisturbed job: {:.1} s to the first insert, {:.1} s in all", self.scan_s, self.total_s);
        self.q(&format!("DROP TABLE {t}"));
    }

    /// A random moment of a job: a third of them before inserting starts.
    fn moment(&mut self, round: u32) -> Duration {
        let s = if round.is_multiple_of(3) {
            self.rng.unit() * self.scan_s
        } else {
            self.scan_s + self.rng.unit() * (self.total_s - self.scan_s) * 0.9
        };
        Duration::from_secs_f64(s)
    }

    /// Wait until `job` runs, then `delay` more; the status phase then.
    fn at(&self, job: i64, delay: Duration) -> String {
        let t = Instant::now();
        while self.q(&format!("SELECT state FROM store.jobs WHERE id = {job}")) == "queued" {
            assert!(t.elapsed() < Duration::from_secs(60), "job {job} was never claimed");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(delay);
        self.q(&format!("SELECT state || ':' || coalesce(phase, 'claimed') FROM store.jobs WHERE id = {job}"))
    }

    fn error_of(&self, job: i64) -> String {
        self.q(&format!("SELECT coalesce(error, '') FROM store.jobs WHERE id = {job}"))
    }

    /// Wait until `job` has committed some batches (and has more to go).
    fn mid_insert(&self, job: i64) {
        self.c.wait_until(
            &format!("SELECT coalesce((SELECT inserted > 20000 FROM store.status WHERE id = {job}), false)"),
            Duration::from_secs(120),
        );
    }

    /// `kill -9` a server process, counted so the log's crash lines can be told apart.
    fn sigkill(&mut self, pid: i32) {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        self.our_kills += 1;
    }

    fn worker_pid(&self, job: i64) -> i32 {
        self.q(&format!("SELECT coalesce(worker_pid, 0) FROM store.jobs WHERE id = {job}")).parse().unwrap()
    }
}

// ---------------------------------------------------------------------------------
// Crashes

/// Start a job on the main data set into a fresh table and, at a random moment while
/// it runs, do `act` to it (given the job and its worker's pid). A run quicker than the
/// moment drawn is finished, dropped and tried again at an earlier moment.
fn interrupted(
    x: &mut Ctx,
    round: u32,
    mut act: impl FnMut(&mut Ctx, i64, i32),
) -> Result<(String, i64, String, Duration), String> {
    let mut delay = x.moment(round);
    loop {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let phase = x.at(job, delay);
        let pid = x.worker_pid(job);
        if pid != 0 && phase.starts_with("running") {
            act(x, job, pid);
            return Ok((t, job, phase, delay));
        }
        x.done(job)?;
        x.q(&format!("DROP TABLE {t}"));
        delay /= 2;
    }
}

fn crash_round(x: &mut Ctx, round: u32, immediate: bool) -> Check {
    let (t, job, phase, delay) = interrupted(x, round, |x, _, pid| {
        if immediate {
            x.c.stop_immediate();
            x.c.pg_ctl_start();
        } else {
            x.sigkill(pid);
        }
    })?;
    *x.t.kill_phases.entry(phase.trim_start_matches("running:").to_string()).or_default() += 1;
    // No manual step: the workers come back and reclaim the job.
    x.done(job)?;
    let want = x.want.clone();
    x.exact(&t, &want, Some(job))?;
    let attempts = x.num(&format!("SELECT attempts FROM store.jobs WHERE id = {job}"));
    x.q(&format!("DROP TABLE {t}"));
    Ok(format!(
        "{} at {:.1} s ({phase}), job {job} finished exact after {attempts} attempts",
        if immediate { "stop" } else { "kill" },
        delay.as_secs_f64()
    ))
}

fn kill9_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 of the ingesting worker, 20 rounds");
    for r in 0..20 {
        x.fault(&format!("kill -9 #{}", r + 1), |x| crash_round(x, r, false));
    }
    // The killed workers' temporary runs were removed by the worker that resumed the jobs.
    x.fault("kill -9: no orphaned temporary runs", |x| {
        // The temporary directory is there (the jobs kept their runs in it) and empty:
        // each job's own directory went when the job ended.
        let temp = x.c.data().join("pgsql_tmp_pg_store");
        let left: Vec<_> =
            fs::read_dir(&temp).map_err(|e| format!("{}: {e}", temp.display()))?.flatten().map(|e| e.path()).collect();
        if left.is_empty() {
            Ok("nothing left in the temporary directory".into())
        } else {
            Err(format!("left behind: {left:?}"))
        }
    });
}

/// Three key ranges, two of them inserted by inserter processes: kill -9 one of those
/// at a random moment of its range. The server restarts, the job resumes from the runs
/// it kept, each range from its own checkpoint.
fn inserter_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 of a range's inserter (store.insert_workers = 3), 3 rounds");
    set_conf(x, "ALTER SYSTEM SET store.insert_workers = 3");
    for r in 0..3 {
        x.fault(&format!("kill -9 of an inserter #{}", r + 1), |x| {
            let t = x.target();
            let job = x.ingest(&x.data.clone(), &t);
            let t0 = Instant::now();
            let range = 1 + (x.rng.below(2) as i32);
            let pid = loop {
                let row = x.q(&format!(
                    "SELECT coalesce((SELECT worker_pid || ' ' || inserted FROM store.ranges WHERE job = {job} AND range = {range} AND state = 'running'), '')"
                ));
                if let Some((pid, ins)) = row.split_once(' ') {
                    let ins: i64 = ins.parse().unwrap_or(0);
                    // Somewhere in the range's first half: it holds about a third of the lines.
                    if ins > 1000 + x.rng.below(200_000) as i64 {
                        break pid.parse::<i32>().unwrap();
                    }
                }
                let state = x.q(&format!("SELECT state FROM store.jobs WHERE id = {job}"));
                if t0.elapsed() > Duration::from_secs(120) || (state != "running" && state != "queued") {
                    return Err(format!("never saw range {range} of job {job} inserting"));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let kind = x.q(&format!("SELECT coalesce((SELECT backend_type FROM pg_stat_activity WHERE pid = {pid}), 'gone')"));
            x.sigkill(pid);
            *x.t.kill_phases.entry("inserting (an inserter)".into()).or_default() += 1;
            x.done(job)?;
            let want = x.want.clone();
            x.exact(&t, &want, Some(job))?;
            let resumed = fs::read_to_string(x.c.dir.join("log")).unwrap_or_default().contains(&format!("pg_store job {job}: resuming from the"));
            x.q(&format!("DROP TABLE {t}"));
            if kind != "pg_store inserter" || !resumed {
                return Err(format!("killed a {kind:?}; resumed from kept runs: {resumed}"));
            }
            Ok(format!("killed the inserter of range {range} at {:.1} s; exact, resumed from the kept runs", t0.elapsed().as_secs_f64()))
        });
    }
    set_conf(x, "ALTER SYSTEM RESET store.insert_workers");
}

/// With a 2 MB budget the main data set spills more runs than the merge's fan-in, so
/// they are first merged into longer ones (status phase `merging`): kill the worker then.
fn merge_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 during a multi-level merge (store.memory_limit = 2MB), 3 rounds");
    kill_in_phase(x, "merging", "2MB", 3);
}

/// With a 512 MB budget the main data set never spills: it is sorted in memory in one
/// go after the scan (status phase `sorting`), the longest sort a job does: kill then.
fn sort_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 during the in-memory sort (store.memory_limit = 512MB), 3 rounds");
    kill_in_phase(x, "sorting", "512MB", 3);
}

/// `rounds` times: run a job on the main data set with `memory` as its budget, kill its
/// worker a moment after its status says `phase`, and check that the resumed job is exact.
fn kill_in_phase(x: &mut Ctx, phase: &str, memory: &str, rounds: u32) {
    set_conf(x, &format!("ALTER SYSTEM SET store.memory_limit = '{memory}'"));
    let wanted = format!("running:{phase}");
    for r in 0..rounds {
        x.fault(&format!("kill -9 while {phase} #{}", r + 1), |x| {
            for _attempt in 0..3 {
                let t = x.target();
                let job = x.ingest(&x.data.clone(), &t);
                let t0 = Instant::now();
                let seen = loop {
                    let p =
                        x.q(&format!("SELECT state || ':' || coalesce(phase, '') FROM store.jobs WHERE id = {job}"));
                    if p == wanted
                        || p.starts_with("done")
                        || p.ends_with("inserting")
                        || t0.elapsed() > Duration::from_secs(120)
                    {
                        break p;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                if seen != wanted {
                    // The phase went by between two looks: try again.
                    x.done(job)?;
                    x.q(&format!("DROP TABLE {t}"));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(x.rng.below(100)));
                // The phase a few milliseconds before the kill: the one it is counted in.
                let at_kill = x.q(&format!(
                    "SELECT coalesce(phase, '') || ' ' || coalesce(worker_pid, 0) FROM store.jobs WHERE id = {job}"
                ));
                let (at_kill, pid) =
                    at_kill.split_once(' ').map(|(p, w)| (p.to_string(), w.parse::<i32>().unwrap())).unwrap();
                x.sigkill(pid);
                let killed_at = t0.elapsed();
                *x.t.kill_phases.entry(at_kill.clone()).or_default() += 1;
                x.done(job)?;
                let want = x.want.clone();
                x.exact(&t, &want, Some(job))?;
                let temp =
                    x.q(&format!("SELECT pg_size_pretty(coalesce(temp_bytes, 0)) FROM store.jobs WHERE id = {job}"));
                x.q(&format!("DROP TABLE {t}"));
                return Ok(format!(
                    "killed {:.2} s after it was queued, while {at_kill}; exact after the resume (temp peak {temp})",
                    killed_at.as_secs_f64()
                ));
            }
            Err(format!("never saw the job in its {phase} phase"))
        });
    }
    set_conf(x, "ALTER SYSTEM RESET store.memory_limit");
}

fn immediate_rounds(x: &mut Ctx) {
    println!("chaos: pg_ctl stop -m immediate, 10 rounds");
    for r in 0..10 {
        x.fault(&format!("immediate stop #{}", r + 1), |x| crash_round(x, r + 1, true));
    }
}

// ---------------------------------------------------------------------------------
// Temporary space

fn set_conf(x: &Ctx, sql: &str) {
    x.q(sql);
    x.q("SELECT pg_reload_conf()");
    // The workers reload at their next wake-up (at most a second).
    std::thread::sleep(Duration::from_millis(1500));
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn temp_space(x: &mut Ctx) {
    println!("chaos: store.temp_dir on a 20 MB tmpfs");
    let mnt = x.c.dir.join("tmpfs");
    fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", mnt.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        x.record("temporary space", Err("could not mount a tmpfs (root needed)".into()), Duration::ZERO);
        return;
    }
    Command::new("chown").args(["postgres", mnt.to_str().unwrap()]).status().unwrap();
    set_conf(x, &format!("ALTER SYSTEM SET store.temp_dir = '{}'", mnt.display()));
    let mut failed_tables = Vec::new();

    x.fault("temp space: refused up front when the input cannot fit", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        failed_tables.push((t, job));
        if s != "failed" || !err.contains("not enough temporary space") || !err.contains(mnt.to_str().unwrap()) {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        if rows != 0 || !files_under(&mnt).is_empty() {
            return Err(format!("{rows} rows in the target, temp files {:?}", files_under(&mnt)));
        }
        Ok(err)
    });

    set_conf(x, "ALTER SYSTEM SET store.check_temp_space = off");
    x.fault("temp space: ENOSPC while spilling fails the job cleanly", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        let inserted = x.num(&format!("SELECT inserted FROM store.status WHERE id = {job}"));
        failed_tables.push((t, job));
        if s != "failed" || !err.contains("No space left on device") || !err.contains(mnt.to_str().unwrap()) {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        // Nothing beyond committed batches: the rows are exactly what the checkpoint counted.
        if rows != inserted {
            return Err(format!("{rows} rows in the target but {inserted} committed by the job"));
        }
        let left = files_under(&mnt);
        if !left.is_empty() {
            return Err(format!("temporary files left: {left:?}"));
        }
        Ok(format!("{err} ({rows} rows committed before it)"))
    });

    x.q("ALTER SYSTEM RESET store.check_temp_space");
    set_conf(x, "ALTER SYSTEM RESET store.temp_dir");
    let _ = Command::new("umount").arg(&mnt).status();
    x.fault("temp space: re-run with enough space completes exactly", |x| {
        let want = x.want.clone();
        let mut ids = Vec::new();
        for (t, _) in failed_tables.clone() {
            let job = x.ingest(&x.data.clone(), &t);
            x.done(job)?;
            x.exact(&t, &want, None)?;
            ids.push(job);
            x.q(&format!("DROP TABLE {t}"));
        }
        Ok(format!("jobs {ids:?}"))
    });
}

// ---------------------------------------------------------------------------------
// Files

/// A directory whose first file takes the job a while to read (many repeats of few
/// lines: long to scan, quick to insert), so a later file can be changed after the
/// job listed it and before it reads it.
fn slow_dir(x: &Ctx, name: &str) -> PathBuf {
    let dir = readable_dir(&x.c.dir.join(name));
    let mut block = Vec::new();
    for i in 0..20_000u64 {
        block.extend(line_for(i, 99));
        block.push(b'\n');
    }
    let mut big = Vec::with_capacity(200 << 20);
    while big.len() < 200 << 20 {
        big.extend_from_slice(&block);
    }
    fs::write(dir.join("a-big.txt"), &big).unwrap();
    dir
}

fn victim(dir: &Path, seed: u64, n: u64) -> PathBuf {
    let p = dir.join("z-victim.txt");
    let mut v = Vec::new();
    for i in 0..n {
        v.extend(line_for(i, seed));
        v.push(b'\n');
    }
    fs::write(&p, v).unwrap();
    p
}

/// Where to write a replacement before renaming it over `v` (hidden: never listed).
fn replacement_path(v: &Path) -> PathBuf {
    v.parent().unwrap().join(".replacement")
}

fn wait_scanning(x: &Ctx, job: i64) {
    let t = Instant::now();
    while x.q(&format!("SELECT coalesce(phase, '') FROM store.jobs WHERE id = {job}")).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "job {job} never started scanning");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn union(a: &Lines, b: &Lines) -> Lines {
    a.union(b).cloned().collect()
}

/// Change the victim after the job listed it; the job must record it, and a re-run
/// must leave the table between "everything now there" and "everything ever there".
fn mutation(x: &mut Ctx, dir: &Path, what: &str, change: impl FnOnce(&Path)) -> Check {
    let v = victim(dir, 1000 + x.tables as u64, 5000);
    let before = want_of(dir);
    let t = x.target();
    let job = x.ingest(dir, &t);
    wait_scanning(x, job);
    change(&v);
    if what == "deleted" {
        x.partial(job)?;
    } else {
        x.done(job)?;
    }
    let state = x.q(&format!(
        "SELECT state || ':' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%z-victim.txt'"
    ));
    let expect = if what == "deleted" { "failed:" } else { "changed:" };
    if !state.starts_with(expect) {
        return Err(format!("victim recorded as {state:?}, expected {expect}"));
    }
    let after = want_of(dir);
    let again = x.ingest(dir, &t);
    x.done(again)?;
    let reread = x.q(&format!("SELECT coalesce(string_agg(state, ','), '') FROM store.files WHERE job = {again} AND path LIKE '%z-victim.txt'"));
    let (n, _) = x.bounds(&t, &after.lines, &union(&before.lines, &after.lines))?;
    if what != "deleted" && reread != "done" {
        return Err(format!("the re-run recorded the victim as {reread:?}, not done (read)"));
    }
    x.q(&format!("DROP TABLE {t}"));
    let _ = fs::remove_file(&v);
    Ok(format!("recorded {state}; after the re-run {n} lines, all of the file as it is now"))
}

fn exact_dir(x: &mut Ctx, dir: &Path) -> Result<(i64, Want), String> {
    let want = want_of(dir);
    let t = x.target();
    let job = x.ingest(dir, &t);
    x.done(job)?;
    x.exact(&t, &want, Some(job))?;
    x.q(&format!("DROP TABLE {t}"));
    Ok((job, want))
}

fn files(x: &mut Ctx) {
    println!("chaos: files that change, odd files");
    let dir = slow_dir(x, "slow");
    x.fault("file appended to after listing", |x| {
        mutation(x, &dir, "appended", |v| {
            let mut extra = Vec::new();
            for i in 0..3000u64 {
                extra.extend(line_for(i, 777));
                extra.push(b'\n');
            }
            let mut f = fs::OpenOptions::new().append(true).open(v).unwrap();
            std::io::Write::write_all(&mut f, &extra).unwrap();
        })
    });
    x.fault("file truncated after listing", |x| {
        mutation(x, &dir, "truncated", |v| {
            let f = fs::OpenOptions::new().write(true).open(v).unwrap();
            f.set_len(fs::metadata(v).unwrap().len() / 3).unwrap();
        })
    });
    x.fault("file deleted after listing", |x| mutation(x, &dir, "deleted", |v| fs::remove_file(v).unwrap()));
    x.fault("file replaced (rename over) after listing", |x| {
        mutation(x, &dir, "replaced", |v| {
            // New content written beside it, then renamed over it (a new inode).
            let tmp = replacement_path(v);
            let mut body = Vec::new();
            for i in 0..4000u64 {
                body.extend(line_for(i, 4242));
                body.push(b'\n');
            }
            fs::write(&tmp, body).unwrap();
            fs::rename(&tmp, v).unwrap();
        })
    });
    let secret = x.c.dir.join("secret.txt");
    fs::write(&secret, "a secret line outside the directory\n").unwrap();
    x.fault("file swapped for a symlink out of the directory after listing", |x| {
        let v = victim(&dir, 5, 2000);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        wait_scanning(x, job);
        fs::remove_file(&v).unwrap();
        std::os::unix::fs::symlink(&secret, &v).unwrap();
        x.partial(job)?;
        let state = x.q(&format!("SELECT state || ':' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%z-victim.txt'"));
        let leaked = x.num(&format!("SELECT count(*) FROM {t} WHERE line LIKE 'a secret%'"));
        fs::remove_file(&v).unwrap();
        x.q(&format!("DROP TABLE {t}"));
        if leaked != 0 || !state.starts_with("failed:") {
            return Err(format!("secret rows {leaked}, victim {state}"));
        }
        Ok(state)
    });
    fs::remove_dir_all(&dir).unwrap();

    x.fault("unreadable file: recorded failed, the rest ingested (partial); re-run after chmod is exact", |x| {
        let dir = readable_dir(&x.c.dir.join("unreadable"));
        generate(&dir, &GenSpec { files: 3, size: 200_000, seed: 31, ..GenSpec::default() }).unwrap();
        let locked = dir.join("locked.txt");
        fs::write(&locked, "locked one\nlocked two\n").unwrap();
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let without = want_of(&dir);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        let s = x.end_of(job, Duration::from_secs(60))?;
        let err = x.q(&format!("SELECT state || ': ' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%locked.txt'"));
        if s != "partial" || !err.starts_with("failed: ") || !err.contains("Permission denied") {
            return Err(format!("job {job} ended {s}; locked.txt {err}"));
        }
        let mut rest = without.lines.clone();
        rest.remove(&b"locked one"[..]);
        rest.remove(&b"locked two"[..]);
        x.bounds(&t, &rest, &rest)?;
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let want = want_of(&dir);
        let again = x.ingest(&dir, &t);
        x.done(again)?;
        x.exact(&t, &want, None)?;
        let read = x.q(&format!("SELECT files_skipped || ' skipped, ' || inserted || ' inserted' FROM store.status WHERE id = {again}"));
        Ok(format!("{err}; the re-run: {read}"))
    });

    x.fault("10,000 tiny files", |x| {
        let dir = readable_dir(&x.c.dir.join("tiny"));
        for i in 0..10_000u64 {
            let body = format!("{}\n{}\nshared line {}\n", String::from_utf8(line_for(i, 3)).unwrap(), i, i % 100);
            fs::write(dir.join(format!("f{i:05}.txt")), body).unwrap();
        }
        let t0 = Instant::now();
        let (job, want) = exact_dir(x, &dir)?;
        let files = x.num(&format!("SELECT count(*) FROM store.files WHERE job = {job} AND state = 'done'"));
        fs::remove_dir_all(&dir).unwrap();
        if files != 10_000 {
            return Err(format!("{files} files recorded read"));
        }
        Ok(format!("{} distinct lines in {:.1} s", want.e.distinct, t0.elapsed().as_secs_f64()))
    });

    x.fault("empty directory", |x| {
        let dir = readable_dir(&x.c.dir.join("empty"));
        let (job, _) = exact_dir(x, &dir)?;
        Ok(format!(
            "job {job}: {}",
            x.q(&format!("SELECT files_total || ' files, ' || inserted || ' rows' FROM store.status WHERE id = {job}"))
        ))
    });

    x.fault("0-byte file", |x| {
        let dir = readable_dir(&x.c.dir.join("zero"));
        fs::write(dir.join("empty.txt"), "").unwrap();
        let (job, _) = exact_dir(x, &dir)?;
        let st = x.q(&format!("SELECT state FROM store.files WHERE job = {job}"));
        if st != "done" {
            return Err(format!("file recorded {st}"));
        }
        Ok(String::new())
    });

    x.fault("binary file (an ELF executable)", |x| {
        let dir = readable_dir(&x.c.dir.join("elf"));
        fs::copy(format!("{BIN}/postgres"), dir.join("postgres.bin")).unwrap();
        let (_, want) = exact_dir(x, &dir)?;
        Ok(format!(
            "{} records: {} rejected (recorded), {} distinct valid lines stored",
            want.e.records, want.e.rejected, want.e.distinct
        ))
    });

    x.fault("one 200 MB record with no newline", |x| {
        let dir = readable_dir(&x.c.dir.join("oneline"));
        fs::write(dir.join("one.txt"), vec![b'x'; 200 << 20]).unwrap();
        let t = x.target();
        let job = x.ingest(&dir, &t);
        x.done(job)?;
        let row = x.q(&format!(
            "SELECT reason || ' ' || line || ' ' || octet_length(raw) FROM store.rejects WHERE job = {job}"
        ));
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        let peak = x.num(&format!("SELECT coalesce(memory_peak, 0) FROM store.jobs WHERE id = {job}"));
        fs::remove_dir_all(&dir).unwrap();
        if row != "too_long 1 1024" || rows != 0 {
            return Err(format!("reject {row:?}, {rows} rows"));
        }
        if peak > 200 << 20 {
            return Err(format!("the worker's memory peaked at {} MiB", peak >> 20));
        }
        Ok(format!("rejected as too_long (line 1, 1 KiB prefix kept); worker peak {} MiB", peak >> 20))
    });

    x.fault("symlink inside the directory pointing out of it is not followed", |x| {
        let dir = readable_dir(&x.c.dir.join("links"));
        fs::write(dir.join("a.txt"), "inside\n").unwrap();
        std::os::unix::fs::symlink(&secret, dir.join("b.txt")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("c.txt")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("d.fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        x.done(job)?;
        let lines = x.q(&format!("SELECT string_agg(line, ',') FROM {t}"));
        if lines != "inside" {
            return Err(format!("read {lines:?}"));
        }
        Ok(x.q(&format!(
            "SELECT files_total || ' file read, links and the FIFO skipped' FROM store.status WHERE id = {job}"
        )))
    });

    x.fault("catastrophic-backtracking filter runs in linear time", |x| {
        let dir = readable_dir(&x.c.dir.join("regex"));
        let mut body = Vec::new();
        for i in 0..2000 {
            body.extend(vec![b'a'; 30_000 + i]);
            body.extend(b"!\n");
        }
        fs::write(dir.join("a.txt"), body).unwrap();
        x.q("CREATE TABLE chaos_regex (line text UNIQUE)");
        let t0 = Instant::now();
        let job: i64 = x
            .q(&format!("SELECT store_ingest('{}', 'chaos_regex', filter => '^(a+)+$')", dir.display()))
            .parse()
            .unwrap();
        x.done(job)?;
        let secs = t0.elapsed().as_secs_f64();
        let filtered = x.num(&format!("SELECT filtered FROM store.status WHERE id = {job}"));
        if filtered != 2000 || secs > 60.0 {
            return Err(format!("filtered {filtered} in {secs:.1} s"));
        }
        Ok(format!("2,000 lines of 30 KB against ^(a+)+$ in {secs:.1} s"))
    });
}

// ---------------------------------------------------------------------------------
// Concurrency

fn concurrency(x: &mut Ctx) {
    println!("chaos: concurrency");
    let spec = |seed| GenSpec { files: 2, size: 3 << 20, seed, dup: 0.3, ..GenSpec::default() };
    let a = readable_dir(&x.c.dir.join("conc-a"));
    let b = readable_dir(&x.c.dir.join("conc-b"));
    let d = readable_dir(&x.c.dir.join("conc-d"));
    generate(&a, &spec(51)).unwrap();
    generate(&b, &spec(51)).unwrap(); // the same lines as a, other files
    generate(&d, &spec(52)).unwrap();
    let all = union(&union(&want_of(&a).lines, &want_of(&b).lines), &want_of(&d).lines);

    x.fault("4 jobs into one target at once", |x| {
        let t = x.target();
        let jobs: Vec<i64> = [&a, &b, &d, &x.data.clone()].iter().map(|p| x.ingest(p, &t)).collect();
        for j in &jobs {
            x.done(*j)?;
        }
        let expect = union(&all, &x.want.lines);
        x.bounds(&t, &expect, &expect)?;
        let ids = jobs.iter().map(|j| j.to_string()).collect::<Vec<_>>().join(",");
        let inserted = x.num(&format!("SELECT sum(inserted) FROM store.status WHERE id IN ({ids})"));
        x.q(&format!("DROP TABLE {t}"));
        if inserted != expect.len() as i64 {
            return Err(format!("the jobs counted {inserted} inserts for {} lines", expect.len()));
        }
        Ok(format!("{} lines, each inserted once", expect.len()))
    });

    x.fault("two jobs on the same directory", |x| {
        let t = x.target();
        let j1 = x.ingest(&x.data.clone(), &t);
        let j2 = x.ingest(&x.data.clone(), &t);
        x.done(j1)?;
        x.done(j2)?;
        let want = x.want.clone();
        x.exact(&t, &want, None)?;
        let inserted = x.num(&format!("SELECT sum(inserted) FROM store.status WHERE id IN ({j1},{j2})"));
        x.q(&format!("DROP TABLE {t}"));
        if inserted != want.e.distinct as i64 {
            return Err(format!("{inserted} inserts for {} lines", want.e.distinct));
        }
        Ok(String::new())
    });

    x.fault("TRUNCATE of the target while a job inserts", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        let removed = x.num(&format!(
            "BEGIN; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; SELECT count(*) FROM {t}; TRUNCATE {t}; COMMIT"
        ));
        x.done(job)?;
        let want = x.want.clone();
        let (n, rows) = x.bounds(&t, &Lines::new(), &want.lines)?;
        x.q(&format!("DROP TABLE {t}"));
        if rows + removed != want.e.distinct as i64 {
            return Err(format!("{rows} rows after + {removed} truncated != {} distinct", want.e.distinct));
        }
        Ok(format!("{removed} rows truncated, the job went on and inserted the other {n}"))
    });

    x.fault("ALTER TABLE ADD COLUMN while a job inserts", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        x.q(&format!("ALTER TABLE {t} ADD COLUMN note text DEFAULT 'added'"));
        x.done(job)?;
        let want = x.want.clone();
        x.exact(&t, &want, Some(job))?;
        x.q(&format!("DROP TABLE {t}"));
        Ok(String::new())
    });

    x.fault("ALTER TABLE RENAME COLUMN while a job inserts: clear failure, re-run exact", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        x.q(&format!("ALTER TABLE {t} RENAME COLUMN line TO renamed"));
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        x.q(&format!("ALTER TABLE {t} RENAME COLUMN renamed TO line"));
        let want = x.want.clone();
        x.bounds(&t, &Lines::new(), &want.lines)?;
        if s != "failed" || !err.contains("line") {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        let again = x.ingest(&x.data.clone(), &t);
        x.done(again)?;
        x.exact(&t, &want, None)?;
        x.q(&format!("DROP TABLE {t}"));
        Ok(err)
    });

    for r in 0..5 {
        x.fault(&format!("store_cancel at a random moment #{}", r + 1), |x| {
            let mut ok = String::new();
            let mut t0 = Instant::now();
            let (t, job, phase, delay) = interrupted(x, r, |x, job, _| {
                ok = x.q(&format!("SELECT store_cancel({job})"));
                t0 = Instant::now();
            })?;
            let s = x.end_of(job, Duration::from_secs(60))?;
            let took = t0.elapsed();
            let want = x.want.clone();
            let (n, _) = x.bounds(&t, &Lines::new(), &want.lines)?;
            if ok != "t" || s != "cancelled" || took > Duration::from_secs(5) {
                return Err(format!("cancel {ok} at {phase}: job ended {s} after {took:?}"));
            }
            let again = x.ingest(&x.data.clone(), &t);
            x.done(again)?;
            x.exact(&t, &want, None)?;
            x.q(&format!("DROP TABLE {t}"));
            Ok(format!(
                "at {:.1} s ({phase}): {s} within {:.1} s with {n} rows committed; the re-run completed it",
                delay.as_secs_f64(),
                took.as_secs_f64()
            ))
        });
    }

    for r in 0..2 {
        x.fault(&format!("pg_terminate_backend on the worker #{}", r + 1), |x| {
            let mut killed = String::new();
            let (t, job, phase, delay) =
                interrupted(x, r + 1, |x, _, pid| killed = x.q(&format!("SELECT pg_terminate_backend({pid})")))?;
            x.done(job)?;
            let want = x.want.clone();
            x.exact(&t, &want, Some(job))?;
            let attempts = x.num(&format!("SELECT attempts FROM store.jobs WHERE id = {job}"));
            x.q(&format!("DROP TABLE {t}"));
            if killed != "t" || attempts < 2 {
                return Err(format!("terminate {killed} at {phase}, {attempts} attempts"));
            }
            Ok(format!("at {:.1} s ({phase}); resumed, exact after {attempts} attempts", delay.as_secs_f64()))
        });
    }
}

// ---------------------------------------------------------------------------------
// Load

fn load(x: &mut Ctx) {
    println!("chaos: 50 store_ingest calls at once");
    x.fault("50 jobs queued at once from 50 sessions", |x| {
        let mut dirs = Vec::new();
        for i in 0..50u64 {
            let dir = readable_dir(&x.c.dir.join(format!("q{i}")));
            generate(&dir, &GenSpec { files: 1, size: 100_000 + i * 1000, seed: 600 + i % 10, ..GenSpec::default() })
                .unwrap();
            x.q(&format!("CREATE TABLE q{i} (line text UNIQUE)"));
            dirs.push(dir);
        }
        let t0 = Instant::now();
        let jobs: Vec<i64> = std::thread::scope(|s| {
            let hs: Vec<_> = dirs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let c = &x.c;
                    s.spawn(move || {
                        c.psql(&format!("SELECT store_ingest('{}', 'q{i}')", d.display()))
                            .unwrap()
                            .parse::<i64>()
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (job, dir)) in jobs.iter().zip(&dirs).enumerate() {
            x.done(*job)?;
            let want = want_of(dir);
            x.exact(&format!("q{i}"), &want, Some(*job))?;
        }
        Ok(format!("all 50 exact, {:.1} s from the first call to the last check", t0.elapsed().as_secs_f64()))
    });
}

// ---------------------------------------------------------------------------------
// Hostile callers

/// One hostile attempt that must be refused with `state` and a message containing
/// `text`, run as `role`.
fn refused(x: &mut Ctx, role: &str, sql: &str, state: &str, text: &str) {
    x.t.hostile += 1;
    match x.c.psql_verbose(role, sql) {
        Err(e) if e.contains(&format!("ERROR:  {state}:")) && e.contains(text) => {
            x.t.refused += 1;
            println!("  refused ({role}) {sql}\n          {}", e.lines().next().unwrap_or(""));
        }
        other => {
            println!("  NOT REFUSED AS EXPECTED ({role}) {sql}: {other:?} (wanted {state} {text})");
            x.t.failures.push(format!("hostile call {sql}: {other:?}"));
        }
    }
}

/// One hostile attempt whose outcome `check` judges: `Ok` when it was refused or
/// came to nothing.
fn attempt(x: &mut Ctx, name: &str, check: impl FnOnce(&mut Ctx) -> Check) {
    x.t.hostile += 1;
    let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(x))) {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()),
    };
    match r {
        Ok(d) => {
            x.t.refused += 1;
            println!("  harmless: {name}: {d}");
        }
        Err(e) => {
            println!("  NOT HARMLESS: {name}: {e}");
            x.t.failures.push(format!("hostile attempt {name}: {e}"));
        }
    }
}

/// Jobs queued by `role` (or by anyone, with None).
fn jobs_of(x: &Ctx, role: Option<&str>) -> i64 {
    match role {
        Some(r) => x.num(&format!("SELECT count(*) FROM store.jobs WHERE owner = '{r}'::regrole")),
        None => x.num("SELECT count(*) FROM store.jobs"),
    }
}

fn hostile(x: &mut Ctx) {
    println!("chaos: hostile callers");
    let ok = readable_dir(&x.c.dir.join("allowed"));
    fs::write(ok.join("a.txt"), "allowed line\n").unwrap();
    let outside = readable_dir(&x.c.dir.join("outside"));
    fs::write(outside.join("secret.txt"), "outside secret\n").unwrap();
    std::os::unix::fs::symlink(&outside, ok.join("escape")).unwrap();
    let fifo = ok.join("pipe");
    let cfifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(cfifo.as_ptr(), 0o644) }, 0);
    // chaos_plain: a login with CREATE on a schema of its own, nothing else. chaos_reader:
    // may read server files (as COPY FROM a file requires), owns a table of its own.
    x.q("CREATE ROLE chaos_plain LOGIN; CREATE ROLE chaos_reader LOGIN IN ROLE pg_read_server_files; \
         CREATE ROLE chaos_other LOGIN IN ROLE pg_read_server_files; \
         CREATE SCHEMA evil AUTHORIZATION chaos_plain; GRANT USAGE ON SCHEMA evil TO PUBLIC; \
         CREATE TABLE evil.log (who text, what text); ALTER TABLE evil.log OWNER TO chaos_plain; GRANT INSERT, SELECT ON evil.log TO PUBLIC; \
         CREATE TABLE chaos_private (line text UNIQUE); CREATE TABLE chaos_victim (line text UNIQUE); CREATE TABLE chaos_nokey (line text); \
         INSERT INTO chaos_victim VALUES ('keep me'); CREATE VIEW chaos_view AS SELECT line FROM chaos_victim; \
         GRANT SELECT ON chaos_victim TO chaos_reader; GRANT SELECT, INSERT ON chaos_nokey TO chaos_reader; \
         CREATE SCHEMA mine AUTHORIZATION chaos_reader");
    // The main data set is allowed too: some attempts need a long job to keep the workers busy.
    let data = x.data.clone();
    set_conf(x, &format!("ALTER SYSTEM SET store.allowed_dirs = '{},{}'", ok.display(), data.display()));
    let theirs = x.ingest(&ok, "store.lines");
    let readers = x.q(&format!(
        "SET ROLE chaos_reader; CREATE TABLE mine.t (line text UNIQUE); SELECT store_ingest('{}', 'mine.t')",
        ok.display()
    ));
    let readers: i64 = readers.parse().unwrap();
    x.done(theirs).expect("a superuser's job");
    x.done(readers).expect("chaos_reader's job");
    let jobs_before = jobs_of(x, None);
    let o = ok.display().to_string();

    // Refusals with a SQLSTATE.
    let calls: Vec<(&str, String, &str, &str)> = vec![
        ("chaos_plain", format!("SELECT store_ingest('{o}')"), "42501", "permission denied to ingest server files"),
        ("chaos_plain", format!("SELECT store.enqueue('{o}', 'store.lines'::regclass, 'line', 'exact', NULL, NULL)"), "42501", "permission denied"),
        ("chaos_plain", "INSERT INTO store.jobs (path, target, column_name, dedup, owner) VALUES ('/etc', 'store.lines', 'line', 'exact', 'postgres')".into(), "42501", "permission denied for table jobs"),
        ("chaos_reader", "UPDATE store.jobs SET path = '/etc'".into(), "42501", "permission denied for table jobs"),
        ("chaos_reader", "DELETE FROM store.ingested".into(), "42501", "permission denied for table ingested"),
        ("chaos_reader", "UPDATE store.checkpoints SET last_key = NULL".into(), "42501", "permission denied for table checkpoints"),
        ("chaos_reader", format!("SELECT store_ingest('{o}', 'chaos_private')"), "42501", "permission denied to insert into"),
        ("chaos_reader", format!("SELECT store.enqueue('{o}', 'chaos_private'::regclass::oid, 'line', 'exact', NULL, NULL)"), "42501", "permission denied to insert into"),
        ("chaos_reader", format!("SELECT store_cancel({theirs})"), "42704", "no pg_store job"),
        ("chaos_reader", format!("SELECT * FROM store_wait({theirs}, '1 second')"), "42704", "no pg_store job"),
        ("chaos_plain", format!("SELECT * FROM store_wait({readers}, '1 second')"), "42704", "no pg_store job"),
        ("chaos_reader", "SET store.allowed_dirs = '/'".into(), "42501", "permission denied to set parameter"),
        ("chaos_reader", "ALTER SYSTEM SET store.allowed_dirs = '/'".into(), "42501", "permission denied"),
        ("chaos_reader", "SET store.fault_injection = 'merge_panic:1'".into(), "42501", "permission denied to set parameter"),
        ("postgres", format!("SELECT store_ingest('{o}/../outside')"), "42501", "is outside store.allowed_dirs"),
        ("postgres", format!("SELECT store_ingest('{o}/escape/secret.txt')"), "42501", "is outside store.allowed_dirs"),
        ("postgres", format!("SELECT store_ingest('{o}/escape')"), "42501", "is outside store.allowed_dirs"),
        ("postgres", "SELECT store_ingest('/proc/self/environ')".into(), "42501", "pseudo-file system"),
        ("postgres", "SELECT store_ingest('/dev/zero')".into(), "42501", "pseudo-file system"),
        ("postgres", format!("SELECT store_ingest('{}')", fifo.display()), "22023", "is not a regular file or directory"),
        ("postgres", "SELECT store_ingest('relative/../dir')".into(), "22023", "is not absolute"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_victim; DROP TABLE chaos_victim; --')"), "42602", "invalid name syntax"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_victim', 'line); DROP TABLE chaos_victim; --')"), "42703", "does not exist"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_victim', filter => 'include=(;DROP TABLE chaos_victim')"), "22023", "filter pattern"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_victim', filter => '(a{{1000}}){{1000}}{{1000}}')"), "22023", "filter pattern"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_victim', dedup => 'exact''; DROP TABLE chaos_victim; --')"), "22023", "dedup must be"),
        ("postgres", format!("SELECT store_ingest('{o}', 'chaos_view')"), "42809", "is not a table"),
        ("postgres", format!("SELECT store_ingest('{o}', 'pg_description', 'description')"), "42P10", "has no unique index"),
        ("postgres", format!("BEGIN; CREATE TEMP TABLE tt (line text UNIQUE); SELECT store_ingest('{o}', 'tt')"), "0A000", "is a temporary table"),
        ("postgres", "SELECT store_cancel(987654321)".into(), "42704", "no pg_store job"),
    ];
    for (role, sql, state, text) in calls {
        refused(x, role, &sql, state, text);
    }

    // Identity borrowing: code of chaos_plain's that a superuser's command runs. An
    // index expression runs as the table's owner inside a security-restricted operation
    // during ANALYZE, VACUUM, REINDEX, CREATE INDEX, CLUSTER; a materialized view's query
    // during REFRESH; a SECURITY DEFINER function as its owner.
    // evil.grab calls store_ingest only when a session other than chaos_plain's runs it:
    // chaos_plain can build the index and fill the table, and waits for a superuser.
    x.c.psql_as(
        "chaos_plain",
        &format!(
        "CREATE FUNCTION evil.grab(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$ BEGIN \
           IF session_user::text <> 'chaos_plain' THEN PERFORM store_ingest('{o}', 'evil.loot'); END IF; RETURN $1; END $f$; \
         CREATE TABLE evil.loot (line text UNIQUE); GRANT INSERT, SELECT ON evil.loot TO PUBLIC; \
         CREATE FUNCTION evil.sd() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS $f$ SELECT store_ingest('{o}', 'evil.loot') $f$; \
         CREATE TABLE evil.t (x int); INSERT INTO evil.t SELECT generate_series(1, 100); \
         CREATE TABLE evil.q (x int); CREATE INDEX q_grab_idx ON evil.q (evil.grab(x)); INSERT INTO evil.q SELECT generate_series(1, 100); \
         CREATE MATERIALIZED VIEW evil.mv AS SELECT evil.grab(x) AS g FROM evil.t"
        ),
    )
    .expect("chaos_plain's objects");
    for (name, sql) in [
        ("ANALYZE of a table whose index calls store_ingest", "ANALYZE evil.q"),
        ("VACUUM ANALYZE of that table", "VACUUM ANALYZE evil.q"),
        ("REINDEX of that table", "REINDEX TABLE evil.q"),
        ("CLUSTER of that table", "CLUSTER evil.q USING q_grab_idx"),
        ("CREATE INDEX by a superuser on chaos_plain's table", "CREATE INDEX ON evil.t (evil.grab(x))"),
        ("REFRESH MATERIALIZED VIEW of chaos_plain's view", "REFRESH MATERIALIZED VIEW evil.mv"),
        ("a SECURITY DEFINER function of chaos_plain's, called by a superuser", "SELECT evil.sd()"),
    ] {
        attempt(x, name, |x| {
            let before = jobs_of(x, None);
            let res = x.c.psql_verbose("postgres", sql);
            let after = jobs_of(x, None);
            if after != before {
                return Err(format!("{} job(s) queued: {res:?}", after - before));
            }
            let why = match res {
                Err(e) => e.lines().next().unwrap_or("").to_string(),
                Ok(out) => {
                    return Err(format!(
                        "the command succeeded ({out:?}): store_ingest was never reached, so nothing was tried"
                    ))
                }
            };
            if !why.contains("security-restricted operation")
                && !why.contains("permission denied to ingest server files")
            {
                return Err(format!("no job, but not refused for the right reason: {why}"));
            }
            Ok(why)
        });
    }

    // Catalog spoofing through the temporary schema: relations named like catalogs, an
    // explicit search_path that puts pg_temp first. pg_store's checks name pg_catalog.
    let spoof = "CREATE TEMP TABLE pg_class (oid oid, relkind text, relpersistence text); \
                 CREATE TEMP TABLE pg_index (indrelid oid, indisunique bool, indisvalid bool, indpred text, indnkeyatts int, indkey int[], indexrelid oid); \
                 CREATE TEMP TABLE pg_attribute (attrelid oid, attname name, attnum int, atttypid oid, atttypmod int, attisdropped bool); \
                 INSERT INTO pg_class SELECT 'chaos_view'::regclass, 'r', 'p'; \
                 INSERT INTO pg_index SELECT 'chaos_nokey'::regclass, true, true, NULL, 1, '{1}', 0; \
                 SET search_path = pg_temp, public, pg_catalog; ";
    refused(
        x,
        "chaos_reader",
        &format!("{spoof} SELECT store_ingest('{o}', 'chaos_nokey')"),
        "42P10",
        "has no unique index",
    );
    refused(x, "chaos_reader", &format!("{spoof} SELECT store_ingest('{o}', 'chaos_view')"), "42809", "is not a table");

    // A table queued as a target and turned into a view before the worker starts: the
    // worker refuses it and never reads it (the view's query would log who read it).
    attempt(x, "a target turned into a view after queueing", |x| {
        x.q("CREATE FUNCTION mine.who() RETURNS text LANGUAGE sql AS $f$ INSERT INTO evil.log VALUES (current_user, 'read the view') RETURNING 'x' $f$; \
             ALTER FUNCTION mine.who() OWNER TO chaos_reader; CREATE TABLE mine.swap (line text UNIQUE); ALTER TABLE mine.swap OWNER TO chaos_reader");
        // Both workers busy, so the job waits in the queue while its table changes.
        let holds: Vec<(String, i64)> = (0..2)
            .map(|_| {
                let t = x.target();
                let j = x.ingest(&x.data.clone(), &t);
                (t, j)
            })
            .collect();
        for (_, j) in &holds {
            x.c.wait_state(*j, &["running"], Duration::from_secs(60));
        }
        let job: i64 =
            x.c.psql_as("chaos_reader", &format!("SELECT store_ingest('{o}', 'mine.swap')"))?
                .parse()
                .map_err(|e| format!("{e}"))?;
        // A table with indexes cannot become a view, and relhasindex stays set until a VACUUM.
        x.c.psql_as("chaos_reader", "ALTER TABLE mine.swap DROP CONSTRAINT swap_line_key")?;
        x.c.psql_as("chaos_reader", "VACUUM mine.swap")?;
        x.c.psql_as(
            "chaos_reader",
            "CREATE RULE \"_RETURN\" AS ON SELECT TO mine.swap DO INSTEAD SELECT mine.who() AS line",
        )?;
        for (t, j) in holds {
            x.q(&format!("SELECT store_cancel({j})"));
            x.end_of(j, Duration::from_secs(60))?;
            x.q(&format!("DROP TABLE {t}"));
        }
        let s = x.end_of(job, Duration::from_secs(60))?;
        let why = x.q(&format!(
            "SELECT coalesce(sqlstate, '') || ' ' || coalesce(error, '') FROM store.jobs WHERE id = {job}"
        ));
        let readers = x.q("SELECT coalesce(string_agg(who, ','), '') FROM evil.log WHERE what = 'read the view'");
        if s != "failed" || !why.starts_with("42809 ") || !readers.is_empty() {
            return Err(format!("job {job} ended {s}: {why}; the view was read by {readers:?}"));
        }
        Ok(why)
    });

    // Another role's jobs, files, rejects, checkpoints and ledger are invisible.
    for table in ["store.status", "store.jobs", "store.files", "store.rejects", "store.checkpoints", "store.ingested"] {
        attempt(x, &format!("chaos_other reads {table}"), |x| {
            let n = x.c.psql_as("chaos_other", &format!("SELECT count(*) FROM {table}")).map_err(|e| e.to_string())?;
            let all = x.num(&format!("SELECT count(*) FROM {table}"));
            if n != "0" || all == 0 {
                return Err(format!("chaos_other sees {n} rows of {all}"));
            }
            Ok(format!("0 of {all} rows"))
        });
    }

    // Code of the job owner's that runs during its inserts (a trigger on its target)
    // tries to reach the worker's superuser session.
    x.q("SET ROLE chaos_reader; CREATE TABLE mine.trig (line text NOT NULL); CREATE UNIQUE INDEX ON mine.trig (store.line_key(line)); \
         CREATE TABLE mine.trig2 (line text UNIQUE); CREATE TABLE mine.trig3 (line text UNIQUE)");
    x.q("SET ROLE chaos_plain; \
         CREATE FUNCTION evil.eq(bigint, bigint) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN \
           INSERT INTO evil.log VALUES (current_user, 'operator'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$; \
         CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.eq)");
    x.q("SET ROLE chaos_reader; \
         CREATE FUNCTION mine.hijack() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
           PERFORM set_config('search_path', 'evil, pg_catalog', false); RETURN NEW; END $f$; \
         CREATE TRIGGER hijack BEFORE INSERT ON mine.trig FOR EACH ROW EXECUTE FUNCTION mine.hijack(); \
         CREATE FUNCTION mine.unlock() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
           PERFORM pg_advisory_unlock_all(); RETURN NULL; END $f$; \
         CREATE TRIGGER unlock AFTER INSERT ON mine.trig2 FOR EACH STATEMENT EXECUTE FUNCTION mine.unlock(); \
         CREATE FUNCTION mine.again() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
           PERFORM public.store_ingest('/', 'mine.trig3'); RETURN NULL; END $f$; \
         CREATE TRIGGER again AFTER INSERT ON mine.trig3 FOR EACH STATEMENT EXECUTE FUNCTION mine.again()");
    attempt(x, "a trigger on the target sets search_path to a schema with its own = operator", |x| {
        let job: i64 =
            x.c.psql_as("chaos_reader", &format!("SELECT store_ingest('{}', 'mine.trig')", data.display()))?
                .parse()
                .unwrap();
        x.done(job)?;
        let want = x.want.clone();
        x.exact("mine.trig", &want, Some(job))?;
        let ran = x.q("SELECT coalesce(string_agg(DISTINCT who, ','), '') FROM evil.log WHERE what = 'operator'");
        if !ran.is_empty() {
            return Err(format!("the hijacking operator ran as {ran}"));
        }
        Ok("the job ended exact; the operator never ran".into())
    });
    attempt(x, "a trigger on the target releases the worker's advisory lock", |x| {
        let job: i64 =
            x.c.psql_as("chaos_reader", &format!("SELECT store_ingest('{}', 'mine.trig2')", data.display()))?
                .parse()
                .unwrap();
        x.done(job)?;
        let want = x.want.clone();
        x.exact("mine.trig2", &want, Some(job))?;
        Ok(x.q(&format!("SELECT 'exact after ' || attempts || ' claim(s)' FROM store.jobs WHERE id = {job}")))
    });
    attempt(x, "a trigger on the target calls store_ingest from the worker", |x| {
        let before = jobs_of(x, Some("chaos_reader"));
        let job: i64 =
            x.c.psql_as("chaos_reader", &format!("SELECT store_ingest('{o}', 'mine.trig3')"))?.parse().unwrap();
        let s = x.end_of(job, Duration::from_secs(60))?;
        let why = x.q(&format!(
            "SELECT coalesce(sqlstate, '') || ' ' || coalesce(error, '') FROM store.jobs WHERE id = {job}"
        ));
        let queued = jobs_of(x, Some("chaos_reader")) - before;
        if s != "failed" || !why.contains("security-restricted operation") || queued != 1 {
            return Err(format!("job {job} ended {s}: {why}; {queued} jobs queued"));
        }
        Ok(why)
    });

    // A directory swapped for a link out of store.allowed_dirs after the job listed it.
    attempt(x, "a subdirectory swapped for a symbolic link after listing", |x| {
        let dir = slow_dir(x, "allowed/swap");
        let sub = readable_dir(&dir.join("sub"));
        fs::write(sub.join("b.txt"), "inside b\n").unwrap();
        fs::write(outside.join("b.txt"), "outside secret b\n").unwrap();
        let t = x.target();
        let job = x.ingest(&dir, &t);
        wait_scanning(x, job);
        fs::rename(&sub, x.c.dir.join("moved-sub")).unwrap();
        std::os::unix::fs::symlink(&outside, &sub).unwrap();
        x.partial(job)?;
        let file = x.q(&format!("SELECT state || ': ' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%/sub/b.txt'"));
        let leaked = x.num(&format!("SELECT count(*) FROM {t} WHERE line LIKE '%secret%'"));
        fs::remove_dir_all(&dir).unwrap();
        if leaked != 0 || !file.starts_with("failed: ") {
            return Err(format!("{leaked} secret rows; sub/b.txt {file}"));
        }
        Ok(file)
    });

    x.fault("hostile callers: nothing queued by them, nothing written, nothing read", |x| {
        let by_them = x.num("SELECT count(*) FROM store.jobs WHERE owner IN ('chaos_plain'::regrole, 'postgres'::regrole) AND target::text LIKE 'evil.%'");
        let victim = x.q("SELECT string_agg(line, ',') FROM chaos_victim");
        let leaked = x.num("SELECT count(*) FROM store.lines WHERE line LIKE '%secret%'");
        let loot = x.num("SELECT count(*) FROM evil.loot");
        if by_them != 0 || victim != "keep me" || leaked != 0 || loot != 0 {
            return Err(format!("{by_them} jobs into evil.*, victim table {victim:?}, {leaked} secret rows, {loot} rows of loot"));
        }
        Ok(format!("{jobs_before} jobs before the hostile calls; none into evil.*, the victim table intact"))
    });
    set_conf(x, "ALTER SYSTEM RESET store.allowed_dirs");
}
