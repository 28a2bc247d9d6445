//! What every integration test program shares: a real PostgreSQL 15 cluster per test —
//! its own data directory, port and socket, with pg_store and pg_cron preloaded, started
//! and stopped by the test itself (as the `postgres` user, since PostgreSQL refuses to run
//! as root) — the queries, waits and faults tests do to it ([`Cluster`]), and the data
//! sets they ingest ([`fixtures`]). Needs `make install`.
//!
//! Each test program compiles this module on its own and uses a part of it: what it
//! leaves unused is no warning.

#![allow(dead_code, unused_imports)]

mod fixtures;

pub use fixtures::{big_fixture, big_nasty_fixture, fixtures, readable_dir, shared_oracle_sha};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    out
}

fn as_postgres(args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).args(args);
    c
}

/// Run SQL as the superuser: its output, or a panic naming the statement.
pub fn q(c: &Cluster, sql: &str) -> String {
    c.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Run SQL that returns one number.
pub fn num(c: &Cluster, sql: &str) -> i64 {
    q(c, sql).parse().unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `kill -9` of a server process (a worker, an inserter): the postmaster then restarts
/// every process (crash recovery), and a worker claims the interrupted job again.
pub fn kill_9(pid: i32) {
    // SAFETY: kill(2) with a PID and a signal number; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

impl Cluster {
    /// A cluster with pg_store and pg_cron preloaded and created.
    pub fn start(name: &str, extra_conf: &str) -> Cluster {
        let cron = format!("cron.database_name = 'postgres'\ncron.host = '{}'\n", Self::dir_of(name).display());
        Self::start_with(name, "pg_store,pg_cron", &format!("{cron}{extra_conf}"), &["pg_store", "pg_cron"])
    }

    fn dir_of(name: &str) -> PathBuf {
        PathBuf::from(format!("/tmp/pg_store_it/{name}-{}", std::process::id()))
    }

    /// A cluster with `preload` in shared_preload_libraries and `extensions` created.
    pub fn start_with(name: &str, preload: &str, extra_conf: &str, extensions: &[&str]) -> Cluster {
        assert!(
            Path::new("/usr/lib/postgresql/15/lib/pg_store.so").exists(),
            "pg_store is not installed: run `make install` (make test does) before the integration tests"
        );
        let (dir, port) = Self::place(name);
        let data = dir.join("data");
        run(&mut as_postgres(&[
            &format!("{BIN}/initdb"),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-U",
            "postgres",
        ]));
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n\
             shared_preload_libraries = '{preload}'\n\
             store.memory_limit = '64MB'\nstore.cpu_limit = 2\nfsync = off\nmax_wal_size = '1GB'\n{extra_conf}\n",
            dir.display(),
        );
        let mut f = fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let c = Cluster { dir, port };
        c.pg_ctl_start();
        for e in extensions {
            c.psql(&format!("CREATE EXTENSION {e}")).unwrap();
        }
        c
    }

    /// A new cluster's directory (empty, the postgres user's) and port. Ports stay below
    /// 32768, where Linux's ephemeral ports start: a Citus cluster's nodes hold many
    /// connections to each other, and a node port among their source ports could not be
    /// bound (a cluster that failed to start, now and then).
    fn place(name: &str) -> (PathBuf, u16) {
        let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        assert!(n < 32, "more than 32 clusters in one test program");
        let port = 10000 + (std::process::id() % 700) as u16 * 32 + n;
        let dir = Self::dir_of(name);
        let _ = fs::remove_dir_all(&dir);
        readable_dir(&dir);
        run(Command::new("chown").args(["postgres", dir.to_str().unwrap()]));
        (dir, port)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A hot standby of this cluster (`pg_basebackup -R`: streaming replication), started,
    /// with its own port and socket.
    pub fn standby(&self, name: &str) -> Cluster {
        let (dir, port) = Self::place(name);
        let data = dir.join("data");
        run(&mut as_postgres(&[
            &format!("{BIN}/pg_basebackup"),
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
        ]));
        let conf = format!("port = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n", dir.display());
        let mut f = fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let c = Cluster { dir, port };
        c.pg_ctl_start();
        c
    }

    pub fn pg_ctl_start(&self) {
        run(&mut as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            self.data().to_str().unwrap(),
            "-l",
            self.dir.join("log").to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]));
    }

    pub fn stop_fast(&self) {
        run(&mut as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            "fast",
            "-w",
            "stop",
        ]));
    }

    pub fn stop_immediate(&self) {
        run(&mut as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            self.data().to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
    }

    /// An interactive psql session as `role`, its stdin open: a test writes SQL to it
    /// (a transaction it holds open, a lock) and kills or closes it.
    pub fn session(&self, role: &str) -> std::process::Child {
        std::process::Command::new(format!("{BIN}/psql"))
            .args([
                "-XAtq",
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                role,
                "-d",
                "postgres",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Run SQL as the superuser; stdout (unaligned, tuples only) or the error text.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_as("postgres", sql)
    }

    pub fn psql_as(&self, role: &str, sql: &str) -> Result<String, String> {
        self.psql_in("postgres", role, sql)
    }

    /// Run SQL in database `db` as `role`.
    pub fn psql_in(&self, db: &str, role: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(format!("{BIN}/psql"))
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-U",
                role,
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// Run a script of several statements (through stdin, so each result is printed) as `role`.
    pub fn psql_script(&self, role: &str, sql: &str) -> Result<String, String> {
        let mut child = Command::new(format!("{BIN}/psql"))
            .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h", self.dir.to_str().unwrap(), "-p", &self.port.to_string()])
            .args(["-U", role, "-d", "postgres", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), sql.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// The values of `column` in `table`, exactly (through hex: psql's printer drops
    /// some characters).
    pub fn table_lines(&self, table: &str, column: &str) -> std::collections::BTreeSet<Vec<u8>> {
        let out = self.psql(&format!("SELECT encode(convert_to({column}, 'UTF8'), 'hex') FROM {table}")).unwrap();
        out.lines()
            .map(|h| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect())
            .collect()
    }

    /// Like [`psql`](Self::psql), retrying while the server restarts (after a crash).
    pub fn psql_retry(&self, sql: &str, within: Duration) -> String {
        self.psql_retry_in("postgres", sql, within)
    }

    /// [`psql_retry`](Self::psql_retry) in database `db`.
    pub fn psql_retry_in(&self, db: &str, sql: &str, within: Duration) -> String {
        let t = Instant::now();
        loop {
            match self.psql_in(db, "postgres", sql) {
                Ok(s) => return s,
                Err(e) if t.elapsed() < within => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("{sql}: {e}"),
            }
        }
    }

    pub fn ingest(&self, args: &str) -> i64 {
        self.psql(&format!("SELECT store_ingest({args})"))
            .unwrap_or_else(|e| panic!("store_ingest({args}): {e}"))
            .parse()
            .unwrap()
    }

    /// Wait until `job` is in one of `states`; returns the state reached.
    pub fn wait_state(&self, job: i64, states: &[&str], within: Duration) -> String {
        self.wait_state_in("postgres", job, states, within)
    }

    /// [`wait_state`](Self::wait_state) for a job of database `db`.
    pub fn wait_state_in(&self, db: &str, job: i64, states: &[&str], within: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.psql_retry_in(db, &format!("SELECT state FROM store.jobs WHERE id = {job}"), within);
            if states.contains(&s.as_str()) {
                return s;
            }
            assert!(t.elapsed() < within, "job {job} still {s} after {within:?}; log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_done(&self, job: i64) {
        let s = self.wait_state(job, &["done", "failed", "cancelled"], Duration::from_secs(300));
        assert_eq!(
            s,
            "done",
            "job {job}: {}",
            self.psql(&format!("SELECT error FROM store.jobs WHERE id = {job}")).unwrap()
        );
    }

    /// Wait until `job` has committed some batches (and has more to go); fails at once
    /// if the job ends first.
    pub fn wait_mid_insert(&self, job: i64) {
        let t = Instant::now();
        loop {
            let s = self.psql_retry(
                &format!(
                    "SELECT state || ' ' || inserted || ' ' || coalesce(error, '') FROM store.status WHERE id = {job}"
                ),
                Duration::from_secs(60),
            );
            let mut it = s.splitn(3, ' ');
            let (state, inserted) = (it.next().unwrap_or(""), it.next().unwrap_or("0").parse::<i64>().unwrap_or(0));
            if state == "running" && inserted > 20_000 {
                return;
            }
            assert!(state == "running" || state == "queued", "job {job} ended before it was interrupted: {s}");
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "job {job} not inserting after 3 minutes: {s}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `sql` (an `ALTER SYSTEM`), then have the server reload its configuration, and
    /// give pg_store's processes the time to see it: they reload at their next wake-up (at
    /// most a second). Retried while the server restarts, as [`psql_retry`](Self::psql_retry).
    pub fn reload(&self, sql: &str) {
        self.psql_retry(sql, Duration::from_secs(60));
        self.psql_retry("SELECT pg_reload_conf()", Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1500));
    }

    /// `job`'s state, SQLSTATE (`-` when none) and error, in one line: what a failed job
    /// says about why.
    pub fn state_and_error(&self, job: i64) -> String {
        q(
            self,
            &format!(
                "SELECT state || ' ' || coalesce(sqlstate, '-') || ' ' || coalesce(error, '') FROM store.jobs WHERE id = {job}"
            ),
        )
    }

    /// The PID of the worker running `job`.
    /// Make every insert statement into `table` take `seconds` longer (a statement
    /// trigger that sleeps): batches that take their time, so that a test acts while a
    /// job inserts.
    pub fn slow_inserts(&self, table: &str, seconds: f64) {
        q(
            self,
            &format!(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$; \
                 CREATE TRIGGER slow AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION slow()"
            ),
        );
    }

    pub fn worker_pid(&self, job: i64) -> i32 {
        q(self, &format!("SELECT worker_pid FROM store.jobs WHERE id = {job}")).parse().unwrap()
    }

    /// `kill -9` of the worker running `job`; its PID.
    pub fn kill_worker(&self, job: i64) -> i32 {
        let pid = self.worker_pid(job);
        kill_9(pid);
        pid
    }

    /// Poll until `sql` returns "t".
    pub fn wait_until(&self, sql: &str, within: Duration) {
        let t = Instant::now();
        while self.psql_retry(sql, within) != "t" {
            assert!(t.elapsed() < within, "timed out waiting for {sql}; log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SHA-256 of the table's lines sorted bytewise, each followed by a newline (read
    /// through hex: psql's printer drops Unicode noncharacters).
    pub fn table_sha(&self, table: &str, column: &str) -> String {
        self.table_sha_in("postgres", table, column)
    }

    /// [`table_sha`](Self::table_sha) in database `db`. Hashed by the server (`sha256`
    /// over the bytewise-sorted lines, each with a newline): no line passes through
    /// psql's printer, which drops Unicode noncharacters, nor through this unoptimised
    /// test build, where decoding and hashing a chaos table took seconds each time.
    /// A server that a test has just crashed (a job may end a moment before its worker is
    /// killed) cuts the query off or refuses it until recovery ends: retried, up to a
    /// minute, as every query of the chaos campaign is.
    pub fn table_sha_in(&self, db: &str, table: &str, column: &str) -> String {
        let sql = format!(
            "SELECT pg_catalog.encode(pg_catalog.sha256(coalesce(pg_catalog.string_agg(\
             pg_catalog.convert_to({column}, 'UTF8') || '\\x0a'::bytea, ''::bytea \
             ORDER BY pg_catalog.convert_to({column}, 'UTF8')), ''::bytea)), 'hex') FROM {table}"
        );
        self.psql_retry_in(db, &sql, Duration::from_secs(60))
    }

    /// Whether the server is up (`pg_ctl status`).
    pub fn running(&self) -> bool {
        as_postgres(&[&format!("{BIN}/pg_ctl"), "-D", self.data().to_str().unwrap(), "status"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// psql as `role` with verbose errors: `Err` holds "ERROR:  SQLSTATE: message".
    pub fn psql_verbose(&self, role: &str, sql: &str) -> Result<String, String> {
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

    /// Wait until the server's log holds `needle` (a LOG line written after a commit the
    /// test saw); panics after `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) {
        let t = Instant::now();
        while !fs::read_to_string(self.dir.join("log")).unwrap_or_default().contains(needle) {
            assert!(t.elapsed() < within, "no {needle:?} in the log: {}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ =
            as_postgres(&[&format!("{BIN}/pg_ctl"), "-D", self.data().to_str().unwrap(), "-m", "immediate", "stop"])
                .output();
        if std::env::var_os("KEEP_CLUSTERS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
