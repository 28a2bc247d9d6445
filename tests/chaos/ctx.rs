//! The campaign's state and its checks: the cluster, the seeded RNG, the tally of faults
//! and losses, the main data set and what it must produce; how a fault is run and
//! recorded, and how a target is compared with the oracle (by checksum, then line by line
//! to count what was lost and what should not be there).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{kill_9, Cluster, BIN};
use store_testkit::{oracle_set, Expected, Rng};

/// Distinct lines, as bytes.
pub type Lines = BTreeSet<Vec<u8>>;

/// What a directory must produce: the oracle's counts and its distinct lines.
#[derive(Clone)]
pub struct Want {
    pub e: Expected,
    pub lines: Lines,
}

/// What `dir` must produce, by the oracle.
pub fn want_of(dir: &Path) -> Want {
    let (e, lines) = oracle_set(dir, 65536).unwrap();
    Want { e, lines }
}

/// What the campaign counts, for its summary line.
#[derive(Default)]
pub struct Tally {
    pub faults: u32,
    pub survived: u32,
    pub lost: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub hostile: u32,
    pub refused: u32,
    pub failures: Vec<String>,
    pub kill_phases: BTreeMap<String, u32>,
}

/// The campaign: its cluster, seeded RNG, tally and main data set.
pub struct Ctx {
    pub c: Cluster,
    pub rng: Rng,
    pub t: Tally,
    pub tables: u32,
    /// The main fault data set and its expected result.
    pub data: PathBuf,
    pub want: Want,
    /// Seconds from start to first insert, and start to end, of an undisturbed job.
    pub scan_s: f64,
    pub total_s: f64,
    /// Deliberate SIGKILLs, so the log's "terminated by signal 9" lines can be told apart.
    pub our_kills: u64,
}

/// A fault's outcome: what happened (`Ok`), or what went wrong.
pub type Check = Result<String, String>;

impl Ctx {
    pub fn q(&self, sql: &str) -> String {
        self.c.psql_retry(sql, Duration::from_secs(60))
    }

    pub fn num(&self, sql: &str) -> i64 {
        let s = self.q(sql);
        s.parse().unwrap_or_else(|e| panic!("{sql}: {s:?}: {e}"))
    }

    /// A fresh target with the line_key unique index, as store.lines has.
    pub fn target(&mut self) -> String {
        self.tables += 1;
        let t = format!("chaos_{}", self.tables);
        self.q(&format!("CREATE TABLE {t} (line text NOT NULL); CREATE UNIQUE INDEX ON {t} (store.line_key(line))"));
        t
    }

    pub fn ingest(&self, dir: &Path, table: &str) -> i64 {
        self.q(&format!("SELECT store_ingest('{}', '{table}')", dir.display())).parse().unwrap()
    }

    /// Wait for a job that loses a file on the way: it must end `partial`.
    pub fn partial(&self, job: i64) -> Result<(), String> {
        match self.end_of(job, Duration::from_secs(300))?.as_str() {
            "partial" => Ok(()),
            s => Err(format!("job {job} ended {s}, not partial: {}", self.error_of(job))),
        }
    }

    /// Wait for a job to end; its final state.
    pub fn end_of(&self, job: i64, within: Duration) -> Result<String, String> {
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

    pub fn done(&self, job: i64) -> Result<(), String> {
        match self.end_of(job, Duration::from_secs(300))?.as_str() {
            "done" => Ok(()),
            s => Err(format!("job {job} ended {s}: {}", self.error_of(job))),
        }
    }

    /// The table's lines and its row count.
    pub fn lines(&self, table: &str) -> (Lines, i64) {
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
    pub fn bounds(&mut self, table: &str, lower: &Lines, upper: &Lines) -> Result<(usize, i64), String> {
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
    pub fn exact(&mut self, table: &str, want: &Want, job: Option<i64>) -> Result<(), String> {
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

    pub fn record(&mut self, name: &str, r: Check, took: Duration) {
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
    pub fn fault(&mut self, name: &str, f: impl FnOnce(&mut Ctx) -> Check) {
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

    pub fn baseline(&mut self) {
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
    pub fn moment(&mut self, round: u32) -> Duration {
        let s = if round.is_multiple_of(3) {
            self.rng.unit() * self.scan_s
        } else {
            self.scan_s + self.rng.unit() * (self.total_s - self.scan_s) * 0.9
        };
        Duration::from_secs_f64(s)
    }

    /// Wait until `job` runs, then `delay` more; the status phase then.
    pub fn at(&self, job: i64, delay: Duration) -> String {
        let t = Instant::now();
        while self.q(&format!("SELECT state FROM store.jobs WHERE id = {job}")) == "queued" {
            assert!(t.elapsed() < Duration::from_secs(60), "job {job} was never claimed");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(delay);
        self.q(&format!("SELECT state || ':' || coalesce(phase, 'claimed') FROM store.jobs WHERE id = {job}"))
    }

    pub fn error_of(&self, job: i64) -> String {
        self.q(&format!("SELECT coalesce(error, '') FROM store.jobs WHERE id = {job}"))
    }

    /// Wait until `job` has committed some batches (and has more to go).
    pub fn mid_insert(&self, job: i64) {
        self.c.wait_until(
            &format!("SELECT coalesce((SELECT inserted > 20000 FROM store.status WHERE id = {job}), false)"),
            Duration::from_secs(120),
        );
    }

    /// `kill -9` a server process, counted so the log's crash lines can be told apart.
    pub fn sigkill(&mut self, pid: i32) {
        kill_9(pid);
        self.our_kills += 1;
    }

    pub fn worker_pid(&self, job: i64) -> i32 {
        self.q(&format!("SELECT coalesce(worker_pid, 0) FROM store.jobs WHERE id = {job}")).parse().unwrap()
    }
}

/// The lines of both.
pub fn union(a: &Lines, b: &Lines) -> Lines {
    a.union(b).cloned().collect()
}
