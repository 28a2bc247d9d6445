//! What must hold for pg_store to be trusted with server files and with data: each
//! test here failed on the code before the fix it guards. A producer that dies fails its
//! job; `varchar(n)` targets reject what they cannot hold; entries that vanish or cannot
//! be read are recorded; job ids beyond 32 bits lock apart; counts stay exact when a
//! stream restarts; `make install` does not crash a running server; a dump keeps every
//! line; a rewrite that keeps size and mtime is noticed; the worker checks again what
//! was checked at queueing; transient errors are retried; failed jobs carry a SQLSTATE.
//! Needs `make install`.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fixtures, num, q, readable_dir, Cluster, BIN};
use store_testkit::{line_for, oracle, oracle_set, Expected, GenSpec};

/// About 1.6 M distinct lines: long enough to act on a job while it inserts.
fn big(c: &Cluster) -> (PathBuf, Expected) {
    fixtures(c, "big", &GenSpec { files: 4, size: 32 << 20, seed: 21, ..GenSpec::default() })
}

fn wait_mid_insert(c: &Cluster, job: i64) {
    c.wait_mid_insert(job);
}

fn reload(c: &Cluster, sql: &str) {
    q(c, sql);
    q(c, "SELECT pg_reload_conf()");
    // The workers reload at their next wake-up (at most a second).
    std::thread::sleep(Duration::from_millis(1500));
}

fn kill_worker(c: &Cluster, job: i64) {
    let pid: i32 = q(c, &format!("SELECT worker_pid FROM store.jobs WHERE id = {job}")).parse().unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

fn state_and_error(c: &Cluster, job: i64) -> String {
    q(c, &format!("SELECT state || ' ' || coalesce(sqlstate, '-') || ' ' || coalesce(error, '') FROM store.jobs WHERE id = {job}"))
}

/// Item 6: a panic on the merge thread used to end the stream as if it were complete:
/// the job was marked done and its files entered the ledger, so the lines it never
/// inserted were never read again.
#[test]
fn a_panic_on_the_merge_thread_fails_the_job_and_keeps_its_files_out_of_the_ledger() {
    let c = Cluster::start("panic", "store.batch_max = 1000");
    let (dir, want) = fixtures(&c, "in", &GenSpec { files: 2, size: 4 << 20, seed: 61, ..GenSpec::default() });
    reload(&c, "ALTER SYSTEM SET store.fault_injection = 'merge_panic:5000'");
    let job = c.ingest(&format!("'{}'", dir.display()));
    assert_eq!(c.wait_state(job, &["done", "partial", "failed"], Duration::from_secs(120)), "failed");
    let s = state_and_error(&c, job);
    assert!(
        s.starts_with("failed XX000 ") && s.contains("merge thread panicked") && s.contains("injected fault"),
        "{s}"
    );
    assert_eq!(num(&c, "SELECT count(*) FROM store.ingested"), 0, "no file of a failed job enters the ledger");
    assert!(num(&c, "SELECT count(*) FROM store.lines") < want.distinct as i64);
    // Without the fault, the same call reads every file again and completes the table.
    reload(&c, "ALTER SYSTEM RESET store.fault_injection");
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    assert_eq!(num(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {again}")), 0);
}

/// Item 9: a varchar(n) target used to be accepted and then fail the job mid-insert
/// with 22001 after earlier batches had committed. Now a line longer than n characters
/// is a `too_long` reject, recorded like any other.
#[test]
fn a_varchar_target_rejects_longer_lines_as_too_long_and_domains_work() {
    let c = Cluster::start("varchar", "store.batch_max = 500");
    let dir = readable_dir(&c.dir.join("in"));
    let mut body = String::new();
    for i in 0..3000 {
        body.push_str(&format!("short-{i}\n"));
        if i % 100 == 0 {
            body.push_str(&format!("{}-{i}\n", "ä".repeat(20)));
        }
    }
    fs::write(dir.join("a.txt"), &body).unwrap();
    q(&c, "CREATE DOMAIN short_text AS varchar(20); CREATE TABLE vc (v short_text UNIQUE); CREATE TABLE vc2 (v varchar(12) UNIQUE)");
    for t in ["vc", "vc2"] {
        let job = num(&c, &format!("SELECT store_ingest('{}', '{t}', 'v')", dir.display()));
        c.wait_done(job);
        assert_eq!(num(&c, &format!("SELECT count(*) FROM {t}")), 3000, "{t}");
        assert_eq!(
            q(
                &c,
                &format!(
                    "SELECT count(*) || ' ' || min(reason) || ' ' || max(reason) FROM store.rejects WHERE job = {job}"
                )
            ),
            "30 too_long too_long",
            "{t}: the 30 lines of 20 'ä' and a suffix are too long for it"
        );
        assert_eq!(num(&c, &format!("SELECT rejected FROM store.status WHERE id = {job}")), 30);
    }
    // A domain over text with a CHECK fails the job clearly, with the constraint's SQLSTATE.
    q(&c, "CREATE DOMAIN no_x AS text CHECK (VALUE NOT LIKE '%-2999'); CREATE TABLE checked (l no_x UNIQUE)");
    let job = num(&c, &format!("SELECT store_ingest('{}', 'checked', 'l')", dir.display()));
    assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed");
    let s = state_and_error(&c, job);
    assert!(s.starts_with("failed 23514 ") && s.contains("no_x"), "{s}");
}

/// Item 10: an entry that vanished or could not be read after the listing failed the
/// whole job. Now it is recorded as failed with the OS error; the rest is ingested and
/// the job ends `partial`.
#[test]
fn unreadable_entries_are_recorded_and_the_job_ends_partial() {
    let c = Cluster::start("partial", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "a one\na two\n").unwrap();
    let sub = readable_dir(&dir.join("locked-dir"));
    fs::write(sub.join("b.txt"), "b one\n").unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o000)).unwrap();
    fs::write(dir.join("c.txt"), "c one\n").unwrap();
    fs::set_permissions(dir.join("c.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    assert_eq!(c.wait_state(job, &["done", "partial", "failed"], Duration::from_secs(60)), "partial");
    assert_eq!(q(&c, "SELECT string_agg(line, ',' ORDER BY line) FROM store.lines"), "a one,a two");
    let failed = q(
        &c,
        &format!("SELECT string_agg(substr(path, length('{}') + 2) || ':' || (error LIKE '%Permission denied%'), ',' ORDER BY path) FROM store.files WHERE job = {job} AND state = 'failed'", dir.display()),
    );
    assert_eq!(failed, "c.txt:true,locked-dir:true");
    assert_eq!(num(&c, &format!("SELECT files_failed FROM store.status WHERE id = {job}")), 2);
    // Only the file read enters the ledger; after the fix a re-run reads the other two.
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("c.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    assert_eq!(q(&c, &format!("SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = {again}")), "1 2");
}

/// Item 11: the advisory lock was keyed on `id as i32`, so jobs 2^32 apart shared a lock
/// and the second waited for the first. Keys now hold 48 bits of the id.
#[test]
fn job_ids_2_to_the_32_apart_run_at_the_same_time() {
    let c = Cluster::start("lockkeys", "store.batch_max = 1000");
    let (dir, _) = big(&c);
    let small = readable_dir(&c.dir.join("small"));
    fs::write(small.join("a.txt"), "one\ntwo\n").unwrap();
    q(&c, "CREATE TABLE other (line text UNIQUE)");
    let first = c.ingest(&format!("'{}'", dir.display()));
    q(&c, &format!("SELECT setval('store.jobs_id_seq', {})", first + (1i64 << 32) - 1));
    let second = num(&c, &format!("SELECT store_ingest('{}', 'other')", small.display()));
    assert_eq!(second, first + (1 << 32));
    c.wait_done(second);
    assert_eq!(
        q(&c, &format!("SELECT state FROM store.jobs WHERE id = {first}")),
        "running",
        "the second job ran beside the first"
    );
    c.wait_done(first);
}

/// Item 12: after a file changed between attempts the stream restarted, but the
/// counters went on from the abandoned pass, so inserted + already_present exceeded the
/// distinct count.
#[test]
fn a_file_changed_between_attempts_restarts_the_stream_with_exact_counts() {
    let c = Cluster::start("restart", "store.batch_max = 1000");
    let (dir, _) = big(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    wait_mid_insert(&c, job);
    // A fast shutdown leaves the job running; the file changes while the server is down.
    c.stop_fast();
    let mut extra = Vec::new();
    for i in 0..5000u64 {
        extra.extend(line_for(i, 4242));
        extra.push(b'\n');
    }
    let mut f = fs::OpenOptions::new().append(true).open(dir.join("part-0001.txt")).unwrap();
    std::io::Write::write_all(&mut f, &extra).unwrap();
    drop(f);
    c.pg_ctl_start();
    c.wait_done(job);
    let want = oracle(&dir, 65536).unwrap();
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    assert_eq!(
        q(
            &c,
            &format!("SELECT (inserted + already_present) || ' ' || merge_restarts FROM store.status WHERE id = {job}")
        ),
        format!("{} 1", want.distinct)
    );
}

/// Item 13: `cargo pgrx install` overwrote pg_store.so in place, and every server that
/// had it mapped died with SIGSEGV. `make install` now builds into a staging directory
/// and its `install-staged` step writes each file beside the old one and renames it
/// over. That step is what runs here (the build step touches no installed file, and
/// cannot run inside `cargo test`, which holds the build directory's lock).
#[test]
fn make_install_while_a_job_runs_leaves_the_server_running() {
    let c = Cluster::start("install", "store.batch_max = 1000");
    let (dir, want) = big(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    wait_mid_insert(&c, job);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("make").arg("-C").arg(repo).arg("install-staged").output().unwrap();
    assert!(
        out.status.success(),
        "make install-staged: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_done(job);
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    assert_eq!(
        num(&c, &format!("SELECT attempts FROM store.jobs WHERE id = {job}")),
        1,
        "the job was never interrupted"
    );
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(!log.contains("was terminated by signal"), "a server process died:\n{}", c.log_tail());
}

/// Item 14: store.lines, the default target, is an extension member, and pg_dump wrote
/// none of its rows, nor the ledger's. A dump now keeps the lines, the ledger and the
/// job history, and a restored cluster skips the files it already has.
#[test]
fn pg_dump_and_pg_restore_keep_the_lines_the_ledger_and_the_history() {
    let a = Cluster::start("dump", "");
    let (dir, want) =
        fixtures(&a, "in", &GenSpec { files: 3, size: 1 << 20, seed: 71, nasty: true, ..GenSpec::default() });
    let job = a.ingest(&format!("'{}'", dir.display()));
    a.wait_done(job);
    let dump = a.dir.join("dump.pgc");
    let out = Command::new(format!("{BIN}/pg_dump"))
        .args([
            "-Fc",
            "-h",
            a.dir.to_str().unwrap(),
            "-p",
            &a.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    // A fresh cluster with pg_store preloaded; the dump creates the extension itself.
    let b = Cluster::start("restored", "");
    q(&b, "DROP EXTENSION pg_store CASCADE");
    let out = Command::new(format!("{BIN}/pg_restore"))
        .args([
            "-h",
            b.dir.to_str().unwrap(),
            "-p",
            &b.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "--exit-on-error",
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(b.table_sha("store.lines", "line"), want.sha256, "every ingested line came back");
    for t in ["store.ingested", "store.jobs", "store.files", "store.rejects", "store.checkpoints"] {
        assert_eq!(num(&b, &format!("SELECT count(*) FROM {t}")), num(&a, &format!("SELECT count(*) FROM {t}")), "{t}");
    }
    assert_eq!(num(&b, "SELECT count(*) FROM store.ingested"), 4);
    // The restored ledger still knows the files: a re-run reads none of them.
    let again = b.ingest(&format!("'{}'", dir.display()));
    assert!(again > job, "the job id sequence came back too");
    b.wait_done(again);
    assert_eq!(
        q(
            &b,
            &format!(
                "SELECT files_skipped || ' ' || bytes_total || ' ' || inserted FROM store.status WHERE id = {again}"
            )
        ),
        "4 0 0"
    );
}

/// Item 17: the ledger trusted size, mtime and a fingerprint of both ends; a file
/// rewritten in the middle with its old size and mtime put back was skipped forever.
#[test]
fn a_file_rewritten_with_its_old_size_and_mtime_is_read_again() {
    let c = Cluster::start("rewrite", "");
    let dir = readable_dir(&c.dir.join("in"));
    let p = dir.join("a.txt");
    let mut body: Vec<u8> = (0..20_000).flat_map(|i| format!("line-{i:06}\n").into_bytes()).collect();
    fs::write(&p, &body).unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(job);
    let mtime = fs::metadata(&p).unwrap().modified().unwrap();
    // Same length, new content in the middle (far from the fingerprinted ends).
    let mid = body.len() / 2;
    let at = mid - mid % 12;
    body[at..at + 11].copy_from_slice(b"changed-mid");
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&p, &body).unwrap();
    fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), mtime);
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    assert_eq!(q(&c, &format!("SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = {again}")), "0 1");
    assert_eq!(num(&c, "SELECT count(*) FROM store.lines WHERE line = 'changed-mid'"), 1);
}

/// Item 17: crash resume in Bloom mode (which cannot resume by key: it starts over on
/// the ON CONFLICT path) ends with no duplicate, within the estimate, counts adding up.
#[test]
fn a_bloom_job_killed_mid_insert_ends_without_duplicates() {
    let c = Cluster::start("bloomkill", "store.batch_max = 1000");
    let (dir, want) = big(&c);
    q(&c, "CREATE TABLE approx (line text NOT NULL); CREATE UNIQUE INDEX ON approx (store.line_key(line))");
    let job = num(&c, &format!("SELECT store_ingest('{}', 'approx', dedup => 'bloom')", dir.display()));
    wait_mid_insert(&c, job);
    kill_worker(&c, job);
    c.wait_done(job);
    let (_, exact) = oracle_set(&dir, 65536).unwrap();
    let rows = num(&c, "SELECT count(*) FROM approx");
    let have = c.table_lines("approx", "line");
    assert_eq!(rows, have.len() as i64, "no line twice");
    assert!(have.is_subset(&exact), "{} lines that are not in the input", have.difference(&exact).count());
    let est: f64 = q(&c, &format!("SELECT estimated_false_drops FROM store.status WHERE id = {job}")).parse().unwrap();
    assert!(
        (want.distinct as i64 - rows) as f64 <= 3.0 * est + 10.0,
        "{rows} of {}, estimated {est} false drops",
        want.distinct
    );
    assert_eq!(
        q(&c, &format!("SELECT (inserted + already_present = {rows}) || ' ' || (attempts >= 2) || ' ' || merge_restarts FROM store.status WHERE id = {job}")),
        "true true 1"
    );
}

/// Items 2 and 17: the worker checks again, when it starts a job, what store_ingest
/// checked: the path against store.allowed_dirs, the owner's right to insert and to read
/// server files, and that the target is still a table.
#[test]
fn the_worker_checks_again_what_was_checked_at_queueing() {
    let c = Cluster::start("recheck", "store.workers = 1\nstore.batch_max = 1000");
    let (busy, _) = big(&c);
    let ok = readable_dir(&c.dir.join("ok"));
    fs::write(ok.join("a.txt"), "a\n").unwrap();
    q(&c, "CREATE ROLE loader LOGIN IN ROLE pg_read_server_files; CREATE TABLE t1 (line text UNIQUE); CREATE TABLE t2 (line text UNIQUE); \
           CREATE TABLE t3 (line text UNIQUE); GRANT INSERT, SELECT ON t1, t2, t3 TO loader");
    // One worker, kept busy by a long job while the queued one waits and things change.
    let mut holds = 0;
    let mut queued_then = |queue: &dyn Fn() -> i64, change: &dyn Fn()| -> String {
        holds += 1;
        q(&c, &format!("CREATE TABLE hold{holds} (line text UNIQUE)"));
        let hold = num(&c, &format!("SELECT store_ingest('{}', 'hold{holds}')", busy.display()));
        c.wait_state(hold, &["running"], Duration::from_secs(60));
        let job = queue();
        change();
        q(&c, &format!("SELECT store_cancel({hold})"));
        assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed", "job {job}");
        state_and_error(&c, job)
    };
    let as_loader = |t: &'static str| {
        let (c, ok) = (&c, &ok);
        move || {
            c.psql_as("loader", &format!("SELECT store_ingest('{}', '{t}')", ok.display()))
                .unwrap()
                .parse::<i64>()
                .unwrap()
        }
    };
    let s = queued_then(&|| c.ingest(&format!("'{}'", ok.display())), &|| {
        reload(&c, &format!("ALTER SYSTEM SET store.allowed_dirs = '{}'", busy.display()))
    });
    assert!(s.starts_with("failed 42501 ") && s.contains("is outside store.allowed_dirs"), "{s}");
    reload(&c, "ALTER SYSTEM RESET store.allowed_dirs");
    let s = queued_then(&as_loader("t2"), &|| drop(q(&c, "REVOKE INSERT ON t2 FROM loader")));
    assert!(s.starts_with("failed 42501 ") && s.contains("permission denied to insert"), "{s}");
    // An empty table becomes a view (PostgreSQL 15 still allows this, once its index is gone).
    let s = queued_then(&as_loader("t3"), &|| {
        // relhasindex stays set until a VACUUM, and a table with indexes cannot become a view.
        q(&c, "ALTER TABLE t3 DROP CONSTRAINT t3_line_key");
        q(&c, "VACUUM t3");
        q(&c, "CREATE RULE \"_RETURN\" AS ON SELECT TO t3 DO INSTEAD SELECT 'x'::text AS line");
    });
    assert!(s.starts_with("failed 42809 ") && s.contains("is not a table"), "{s}");
    let s = queued_then(&as_loader("t1"), &|| drop(q(&c, "REVOKE pg_read_server_files FROM loader")));
    assert!(s.starts_with("failed 42501 ") && s.contains("may no longer read server files"), "{s}");
    assert_eq!(num(&c, "SELECT count(*) FROM t1") + num(&c, "SELECT count(*) FROM t2"), 0);
}

/// Item 17: transient errors (here a lock timeout while another session holds the
/// target) are retried, and the job ends exact.
#[test]
fn a_lock_timeout_mid_insert_is_retried() {
    let c = Cluster::start("retry", "store.batch_max = 1000\nlock_timeout = '150ms'");
    let (dir, want) = fixtures(&c, "in", &GenSpec { files: 2, size: 8 << 20, seed: 81, ..GenSpec::default() });
    let job = c.ingest(&format!("'{}'", dir.display()));
    wait_mid_insert(&c, job);
    q(&c, "SET lock_timeout = 0; BEGIN; LOCK TABLE store.lines IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(0.5); COMMIT");
    c.wait_done(job);
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(
        log.contains(&format!("pg_store job {job}: retrying a batch after")),
        "no retry in the log:\n{}",
        c.log_tail()
    );
}

/// A failed job says why in a form a program can read: its SQLSTATE.
#[test]
fn failed_jobs_carry_their_sqlstate() {
    let c = Cluster::start("sqlstate", "store.batch_max = 1000");
    let (dir, _) = fixtures(&c, "in", &GenSpec { files: 2, size: 16 << 20, seed: 91, ..GenSpec::default() });
    // Missing column: renamed after queueing.
    q(&c, "CREATE TABLE renamed (line text UNIQUE)");
    let script = |sql: String| c.psql_script("postgres", &sql).unwrap().parse::<i64>().unwrap();
    let job = script(format!(
        "BEGIN;\nSELECT store_ingest('{}', 'renamed');\nALTER TABLE renamed RENAME COLUMN line TO other;\nCOMMIT;\n",
        dir.display()
    ));
    assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed");
    assert!(state_and_error(&c, job).starts_with("failed 42703 "), "{}", state_and_error(&c, job));
    // Permission denied: the owner's INSERT revoked after queueing.
    q(&c, "CREATE ROLE l2 LOGIN IN ROLE pg_read_server_files; CREATE TABLE granted (line text UNIQUE); GRANT INSERT ON granted TO l2");
    let job = script(format!(
        "BEGIN;\nSET ROLE l2;\nSELECT store_ingest('{}', 'granted');\nRESET ROLE;\nREVOKE INSERT ON granted FROM l2;\nCOMMIT;\n",
        dir.display()
    ));
    assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed");
    assert!(state_and_error(&c, job).starts_with("failed 42501 "), "{}", state_and_error(&c, job));
    // Unreadable file: the job's path is one file the server cannot open.
    let locked = dir.join("part-0000.txt");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let job = c.ingest(&format!("'{}'", locked.display()));
    assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed");
    let s = state_and_error(&c, job);
    assert!(s.starts_with("failed 42501 ") && s.contains("Permission denied"), "{s}");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).unwrap();
    // Disk full: a 1 MB tmpfs for the runs, and no free-space check.
    let mnt = c.dir.join("tmpfs");
    fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(mounted.success(), "mount a tmpfs (the tests run as root)");
    Command::new("chown").arg("postgres").arg(&mnt).status().unwrap();
    reload(&c, &format!("ALTER SYSTEM SET store.temp_dir = '{}'", mnt.display()));
    reload(&c, "ALTER SYSTEM SET store.check_temp_space = off");
    reload(&c, "ALTER SYSTEM SET store.memory_limit = '4MB'");
    let job = c.ingest(&format!("'{}'", dir.display()));
    let end = c.wait_state(job, &["done", "failed"], Duration::from_secs(60));
    let s = state_and_error(&c, job);
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(end, "failed");
    assert!(s.starts_with("failed 53100 ") && s.contains("No space left on device"), "{s}");
}

/// Cancelling and waiting only see the caller's own jobs.
#[test]
fn a_role_sees_and_cancels_only_its_own_jobs() {
    let c = Cluster::start("visibility", "store.workers = 1\nstore.batch_max = 1000");
    let (busy, _) = big(&c);
    let ok = readable_dir(&c.dir.join("ok"));
    fs::write(ok.join("a.txt"), "a\n").unwrap();
    q(
        &c,
        "CREATE ROLE alice LOGIN IN ROLE pg_read_server_files; CREATE ROLE bob LOGIN IN ROLE pg_read_server_files; \
           CREATE ROLE alice_boss LOGIN IN ROLE alice",
    );
    let hold = c.ingest(&format!("'{}'", busy.display()));
    c.wait_state(hold, &["running"], Duration::from_secs(60));
    let theirs = c.psql_as("alice", &format!("SELECT store_ingest('{}')", ok.display())).unwrap();
    for t in ["store.status", "store.jobs", "store.files", "store.rejects", "store.checkpoints", "store.ingested"] {
        assert_eq!(c.psql_as("bob", &format!("SELECT count(*) FROM {t}")).unwrap(), "0", "bob sees nothing in {t}");
    }
    assert_eq!(c.psql_as("alice", "SELECT string_agg(id::text, ',') FROM store.status").unwrap(), theirs);
    assert_eq!(
        c.psql_as("alice_boss", "SELECT string_agg(id::text, ',') FROM store.status").unwrap(),
        theirs,
        "a member of alice sees alice's jobs"
    );
    let e = c.psql_as("bob", &format!("SELECT store_cancel({theirs})")).unwrap_err();
    assert!(e.contains(&format!("no pg_store job {theirs}")), "{e}");
    let e = c.psql_as("bob", &format!("SELECT * FROM store_wait({theirs}, '1 second')")).unwrap_err();
    assert!(e.contains(&format!("no pg_store job {theirs}")), "{e}");
    assert_eq!(c.psql_as("alice", &format!("SELECT store_cancel({theirs})")).unwrap(), "t");
    q(&c, &format!("SELECT store_cancel({hold})"));
    let t = Instant::now();
    c.wait_state(hold, &["cancelled"], Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// Review finding: the ledger skipped a file ingested into the same table with another
/// filter, column, mode or limit, so its other lines were never read. The ledger now
/// holds the spec that decided the lines, and skips only for the same spec.
#[test]
fn the_ledger_skips_a_file_only_for_the_same_column_filter_mode_and_limits() {
    let c = Cluster::start("spec", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "ERROR one\ninfo two\nERROR three\n").unwrap();
    q(&c, "CREATE TABLE two (a text UNIQUE, b text UNIQUE)");
    let run = |args: &str| {
        let job = num(&c, &format!("SELECT store_ingest('{}', {args})", dir.display()));
        c.wait_done(job);
        q(&c, &format!("SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = {job}"))
    };
    assert_eq!(run("'store.lines', filter => 'NOTHING MATCHES THIS'"), "0 0");
    assert_eq!(run("'store.lines'"), "0 3", "an unfiltered job reads the file a filtered one read");
    assert_eq!(run("'store.lines'"), "1 0", "and the same job again skips it");
    assert_eq!(run("'two', 'a', filter => 'ERROR'"), "0 2");
    assert_eq!(run("'two', 'b'"), "0 3", "another column of the same table is another ingest");
    reload(&c, "ALTER SYSTEM SET store.max_line_bytes = 9");
    assert_eq!(run("'two', 'b'"), "0 0", "another length limit reads it again (and finds nothing new)");
    // Dropping a table takes its ledger rows with it.
    q(&c, "DROP TABLE two");
    assert_eq!(num(&c, "SELECT count(*) FROM store.ingested WHERE target::oid NOT IN (SELECT oid FROM pg_class)"), 0);
}

/// Review finding: a file that failed in an earlier attempt (a passing EIO, EACCES)
/// and could be read on the resume was read only past the checkpoint, so its lines
/// before it were lost, and the job ended done. A resume over files that failed or
/// changed now starts the stream over.
#[test]
fn a_file_that_failed_in_an_earlier_attempt_restarts_the_stream() {
    let c = Cluster::start("failedfirst", "store.batch_max = 1000");
    let (dir, _) = big(&c);
    // The last file (read last, keys everywhere in the key space) cannot be read at first.
    let locked = dir.join("part-0003.txt");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    wait_mid_insert(&c, job);
    assert_eq!(
        q(&c, &format!("SELECT state FROM store.files WHERE job = {job} AND path LIKE '%part-0003.txt'")),
        "failed"
    );
    c.stop_fast();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o644)).unwrap();
    c.pg_ctl_start();
    c.wait_done(job);
    let want = oracle(&dir, 65536).unwrap();
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256, "every line of the file that failed at first is in");
    assert_eq!(num(&c, &format!("SELECT merge_restarts FROM store.status WHERE id = {job}")), 1);
}

/// Review finding: whether a job's worker was alive was told by an advisory lock that
/// any role can take. A role holding the keys of the next jobs stalled them forever.
#[test]
fn advisory_locks_taken_by_a_user_do_not_stall_jobs() {
    let c = Cluster::start("advlock", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\n").unwrap();
    q(&c, "CREATE ROLE nobody_special LOGIN");
    let next = num(&c, "SELECT last_value + 1 FROM store.jobs_id_seq");
    // Every key the old scheme (and the two-key scheme) would use for the next jobs,
    // held by an idle session.
    let mut hold = c.session("nobody_special");
    let stdin = hold.stdin.as_mut().unwrap();
    for id in next..next + 3 {
        writeln!(
            stdin,
            "SELECT pg_advisory_lock(20563, {id}::int); SELECT pg_advisory_lock({}, {id});",
            0x5053_0000u32 as i32
        )
        .unwrap();
    }
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let job = c.ingest(&format!("'{}'", dir.display()));
        c.wait_state(job, &["done", "failed"], Duration::from_secs(30));
    }
    let _ = hold.kill();
    let _ = hold.wait();
}

/// Review finding: a batch waiting on a lock (or stuck in a trigger) never looked at
/// cancel_requested, and the owner could not cancel its own job. store_cancel now
/// interrupts the worker's statement once it commits.
#[test]
fn cancel_interrupts_a_batch_that_waits_on_a_lock() {
    let c = Cluster::start("cancellock", "store.batch_max = 1000");
    let (dir, _) = big(&c);
    q(&c, "CREATE ROLE owner1 LOGIN IN ROLE pg_read_server_files; CREATE TABLE locked (line text UNIQUE); GRANT INSERT, SELECT ON locked TO owner1");
    let job = c
        .psql_as("owner1", &format!("SELECT store_ingest('{}', 'locked')", dir.display()))
        .unwrap()
        .parse::<i64>()
        .unwrap();
    wait_mid_insert(&c, job);
    // An idle session holds the table: the next batch waits on its lock for ever.
    let mut holder = c.session("postgres");
    writeln!(
        holder.stdin.as_mut().unwrap(),
        "BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600);"
    )
    .unwrap();
    holder.stdin.as_mut().unwrap().flush().unwrap();
    c.wait_until("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'pg_store worker' AND wait_event_type = 'Lock')", Duration::from_secs(30));
    assert_eq!(c.psql_as("owner1", &format!("SELECT store_cancel({job})")).unwrap(), "t");
    let t = Instant::now();
    assert_eq!(c.wait_state(job, &["cancelled", "failed", "done"], Duration::from_secs(20)), "cancelled");
    println!("cancelled a batch waiting on a lock in {} ms", t.elapsed().as_millis());
    assert!(t.elapsed() < Duration::from_secs(5));
    let _ = holder.kill();
    let _ = holder.wait();
}

/// Review finding: a job whose worker keeps dying was claimed again for ever, each
/// death a crash-restart of the whole server. store.max_attempts ends it.
#[test]
fn a_job_whose_worker_keeps_dying_fails_after_max_attempts() {
    let c = Cluster::start("attempts", "store.max_attempts = 2\nstore.batch_max = 1000");
    let (dir, _) = big(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    for _ in 0..2 {
        c.wait_until(&format!("SELECT coalesce((SELECT state = 'running' AND worker_pid IS NOT NULL AND phase IS NOT NULL FROM store.jobs WHERE id = {job}), false)"), Duration::from_secs(60));
        let pid: i32 = q(&c, &format!("SELECT worker_pid FROM store.jobs WHERE id = {job}")).parse().unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        // Wait for the crash restart to clear the worker's pid from the row's next claim.
        c.wait_until(&format!("SELECT coalesce((SELECT worker_pid <> {pid} OR state <> 'running' FROM store.jobs WHERE id = {job}), false)"), Duration::from_secs(60));
    }
    assert_eq!(c.wait_state(job, &["failed", "done"], Duration::from_secs(60)), "failed");
    let s = state_and_error(&c, job);
    assert!(s.starts_with("failed 54000 ") && s.contains("gave up after 2 attempts"), "{s}");
}

/// Review finding: file names that are not UTF-8 were converted lossily, so two of them
/// could collide and fail every job on the directory.
#[test]
fn file_names_that_are_not_utf8_are_kept_apart() {
    use std::os::unix::ffi::OsStrExt;
    let c = Cluster::start("names8", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join(std::ffi::OsStr::from_bytes(b"a\xff.txt")), "from ff\n").unwrap();
    fs::write(dir.join(std::ffi::OsStr::from_bytes(b"a\xfe.txt")), "from fe\n").unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(job);
    assert_eq!(q(&c, "SELECT string_agg(line, ',' ORDER BY line) FROM store.lines"), "from fe,from ff");
    let names = q(
        &c,
        &format!(
            "SELECT string_agg(substr(path, length('{}') + 2), ',' ORDER BY path) FROM store.files WHERE job = {job}",
            dir.display()
        ),
    );
    assert_eq!(names, r"a\xFE.txt,a\xFF.txt");
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    assert_eq!(q(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {again}")), "2");
}

/// Review finding: the database encoding was never checked; lines are UTF-8.
#[test]
fn a_database_that_is_not_utf8_is_refused() {
    let c = Cluster::start("latin1", "");
    q(&c, "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    c.psql_in("latin", "postgres", "CREATE EXTENSION pg_store").unwrap();
    let e = c.psql_in("latin", "postgres", "SELECT store_ingest('/tmp')").unwrap_err();
    assert!(e.contains("pg_store needs a database with UTF8 encoding"), "{e}");
}
