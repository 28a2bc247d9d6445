//! Jobs interrupted and resumed, against real PostgreSQL 15 clusters these tests start
//! themselves: `kill -9` of the worker and of an inserter, `pg_ctl stop -m immediate`
//! and `-m fast` in the middle of inserting, a Bloom-mode job killed, a panic on the
//! merge thread, a file changed or unreadable between attempts, a worker that keeps
//! dying (`store.max_attempts`), a lock timeout, `make install` while a job runs. Each
//! job ends by itself with exactly the oracle's lines (no loss, no duplicate, counts
//! exact), or fails saying why with its files kept out of the ledger. Needs `make install`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{big_fixture, big_nasty_fixture, fixtures, kill_9, num, q, Cluster};
use store_testkit::{line_for, oracle, oracle_set, Expected, GenSpec};

/// Interrupt a job on [`big_nasty_fixture`] in the middle of inserting, let `interrupt`
/// bring the server back as it must, and check the job ends with exactly the oracle's
/// lines. Returns the cluster, the job and the expected result for test-specific checks.
fn interrupted_mid_insert_ends_exact(name: &str, interrupt: impl FnOnce(&Cluster, i64)) -> (Cluster, i64, Expected) {
    interrupted_mid_insert_ends_exact_with(name, "", interrupt)
}

/// [`interrupted_mid_insert_ends_exact`] with more settings.
fn interrupted_mid_insert_ends_exact_with(
    name: &str,
    conf: &str,
    interrupt: impl FnOnce(&Cluster, i64),
) -> (Cluster, i64, Expected) {
    let c = Cluster::start(name, &format!("store.batch_max = 2000\n{conf}"));
    let (dir, want) = big_nasty_fixture(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_mid_insert(job);
    interrupt(&c, job);
    c.wait_done(job);
    assert!(num(&c, &format!("SELECT attempts FROM store.jobs WHERE id = {job}")) >= 2);
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    assert_eq!(
        num(&c, &format!("SELECT inserted + already_present FROM store.status WHERE id = {job}")),
        want.distinct as i64
    );
    (c, job, want)
}

/// While `job` runs, its rate is over the time up to the moment it is read, even late
/// in a transaction (as `store.wait` reads it): its lines over that time give back no
/// more lines than were committed (give or take the 0.05 a second that rounding to 0.1
/// a second may add, and a thousandth for the moments between the two clocks read).
fn running_rate_counts_only_committed_lines(c: &Cluster, job: i64) {
    let over = q(
        c,
        &format!(
            "SELECT pg_sleep(0.5); \
             SELECT s.rows_per_second * e - (s.inserted + s.already_present) * 1.001 - 0.05 * e \
               FROM store.status s JOIN store.jobs j USING (id), \
                    LATERAL (SELECT extract(epoch FROM clock_timestamp() - j.insert_started_at) AS e) t \
              WHERE id = {job}"
        ),
    );
    // psql prints pg_sleep's empty result first.
    let over = over.lines().last().unwrap_or_default();
    assert!(over.parse::<f64>().unwrap() <= 1.0, "running rate counts {over} lines more than were committed");
}

/// After a resume, the rate of `job` (which ended with `distinct` lines, of which an
/// earlier attempt committed more than `earlier`) is its last attempt's: those lines are
/// not counted again over that attempt's time.
fn rate_is_the_last_attempts(c: &Cluster, job: i64, distinct: i64, earlier: i64) {
    let before = num(c, &format!("SELECT insert_rows_before FROM store.jobs WHERE id = {job}"));
    assert!(before > earlier, "insert_rows_before {before}: the earlier attempt's lines were not counted");
    let counted = q(
        c,
        &format!(
            "SELECT s.rows_per_second * e || ' ' || e \
               FROM store.status s JOIN store.jobs j USING (id), \
                    LATERAL (SELECT extract(epoch FROM s.finished_at - j.insert_started_at) AS e) t WHERE id = {job}"
        ),
    );
    let (counted, elapsed) = counted.split_once(' ').unwrap();
    let (counted, elapsed) = (counted.parse::<f64>().unwrap(), elapsed.parse::<f64>().unwrap());
    assert!(
        // rows_per_second is rounded to 0.1 a second.
        (counted - (distinct - before) as f64).abs() <= 1.0 + 0.05 * elapsed,
        "the resumed attempt's rate counts {counted} lines, not the {} it committed",
        distinct - before
    );
}

#[test]
fn kill_9_of_the_worker_mid_insert_resumes_with_no_loss_and_no_duplicate() {
    let (c, job, want) = interrupted_mid_insert_ends_exact("kill9", |c, job| {
        running_rate_counts_only_committed_lines(c, job);
        c.kill_worker(job);
        // The postmaster restarts everything (crash recovery); a worker reclaims the job.
    });
    rate_is_the_last_attempts(&c, job, want.distinct as i64, 20_000);
    assert_eq!(num(&c, "SELECT count(*) FROM store.rejects"), want.rejected as i64, "rejects stored once");
    // The temporary directory exists (the job kept its runs there) and holds nothing any
    // more: the job's own directory went when the job ended.
    let temp = c.data().join("pgsql_tmp_pg_store");
    let left: Vec<_> =
        fs::read_dir(&temp).unwrap_or_else(|e| panic!("{}: {e}", temp.display())).flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind in the temporary directory: {left:?}");
    // The resumed attempt read no file again: it merged the runs the first one kept.
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(
        log.contains(&format!("pg_store job {job}: resuming from the")),
        "the job sorted its files again:\n{}",
        c.log_tail()
    );
}

#[test]
fn kill_9_of_an_inserter_of_a_range_resumes_exact_without_sorting_again() {
    // Three ranges: the worker inserts the first, two inserters the others. One of the
    // inserters is killed mid-batch; the server restarts, the job is claimed again,
    // loads the runs it kept, and every range resumes from its own checkpoint.
    let (c, job, want) = interrupted_mid_insert_ends_exact_with(
        "inserter",
        "store.insert_workers = 3\nstore.compact_index = off",
        |c, job| {
            c.wait_until(
            &format!("SELECT count(*) = 2 FROM store.ranges WHERE job = {job} AND range > 0 AND inserted > 1000 AND state = 'running'"),
            Duration::from_secs(60),
        );
            let pid: i32 = q(c, &format!("SELECT worker_pid FROM store.checkpoints WHERE job = {job} AND range = 2"))
                .parse()
                .unwrap();
            let kind = q(c, &format!("SELECT backend_type FROM pg_stat_activity WHERE pid = {pid}"));
            assert_eq!(kind, "pg_store inserter");
            kill_9(pid);
        },
    );
    assert_eq!(q(&c, &format!("SELECT ranges || ' ' || ranges_done FROM store.status WHERE id = {job}")), "3 3");
    // Whether or not the worker's own range was done when the inserter died, the resumed
    // attempt recorded when it began inserting (before it waits for its inserters).
    rate_is_the_last_attempts(&c, job, want.distinct as i64, 2_000);
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains(&format!("pg_store job {job}: resuming from the")), "the job sorted its files again");
    let per_range = q(
        &c,
        &format!(
            "SELECT string_agg((inserted > 0)::text, ',' ORDER BY range) FROM store.checkpoints WHERE job = {job}"
        ),
    );
    assert_eq!(per_range, "true,true,true");
}

#[test]
fn immediate_stop_mid_insert_resumes_after_restart_with_no_loss_and_no_duplicate() {
    interrupted_mid_insert_ends_exact("immediate", |c, _| {
        c.stop_immediate();
        c.pg_ctl_start();
    });
}

/// A clean shutdown is not a worker gone: restarts, more of them than
/// `store.max_attempts`, each leave the job running, and it ends exact.
#[test]
fn fast_shutdowns_mid_insert_leave_the_job_resumable_and_do_not_use_up_its_attempts() {
    let (c, job, _) = interrupted_mid_insert_ends_exact_with("fast", "store.max_attempts = 2", |c, job| {
        for claim in 1..=3 {
            c.wait_until(
                &format!(
                    "SELECT coalesce((SELECT attempts = {claim} AND worker_pid IS NOT NULL AND state = 'running' \
                       FROM store.jobs WHERE id = {job}), false)"
                ),
                Duration::from_secs(60),
            );
            c.stop_fast();
            c.pg_ctl_start();
            assert_eq!(q(c, &format!("SELECT state FROM store.jobs WHERE id = {job}")), "running");
        }
    });
    assert_eq!(
        q(&c, &format!("SELECT attempts || ' ' || stops FROM store.status WHERE id = {job}")),
        "4 3",
        "{}",
        fs::read_to_string(c.dir.join("log")).unwrap()
    );
    // The job's LOG line comes right after its end is committed.
    c.wait_log(&format!("pg_store job {job} done: "), Duration::from_secs(30));
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(
        log.contains("4 attempts (3 of them stopped by SIGTERM: a shutdown, a restart or pg_terminate_backend)"),
        "{}",
        c.log_tail()
    );
}

/// `pg_terminate_backend` of the worker: only it stops; a new worker takes the job again
/// at once (nothing else queued asks for one), and the stop does not count as a worker gone.
#[test]
fn pg_terminate_backend_of_the_worker_mid_insert_resumes_by_itself() {
    let (c, job, _) = interrupted_mid_insert_ends_exact("terminate", |c, job| {
        assert_eq!(q(c, &format!("SELECT pg_terminate_backend(worker_pid) FROM store.jobs WHERE id = {job}")), "t");
    });
    assert_eq!(q(&c, &format!("SELECT attempts - stops FROM store.jobs WHERE id = {job}")), "1");
}

/// The same while an inserter works on another range: the worker that comes to resume
/// the job passes it by while the inserter is on it (the job is live), so the inserter,
/// leaving with the job's worker gone, asks for one (before, the job waited, `running`
/// with no process on it, for the launcher's hourly look or another job).
#[test]
fn pg_terminate_backend_of_the_worker_while_its_inserter_works_resumes_by_itself() {
    let (c, job, _) = interrupted_mid_insert_ends_exact_with(
        "terminate_ranges",
        "store.insert_workers = 2\nstore.compact_index = off",
        |c, job| {
            c.wait_until(
                &format!(
                    "SELECT count(*) = 1 FROM store.ranges WHERE job = {job} AND range > 0 AND inserted > 1000 AND state = 'running'"
                ),
                Duration::from_secs(60),
            );
            // The inserter's batches then outlast the idle time of the worker that comes.
            c.slow_inserts("store.lines", 0.5);
            assert_eq!(q(c, &format!("SELECT pg_terminate_backend(worker_pid) FROM store.jobs WHERE id = {job}")), "t");
            std::thread::sleep(Duration::from_secs(8));
            q(c, "DROP TRIGGER slow ON store.lines");
        },
    );
    assert_eq!(q(&c, &format!("SELECT attempts - stops FROM store.jobs WHERE id = {job}")), "1");
}

/// A fast shutdown while the job waits for a lock a prepared transaction holds (which
/// outlives every session the shutdown ends): the worker's SIGTERM ends that wait, the
/// server stops (it waited for good), and after the restart and the prepared
/// transaction's end the job resumes, its stop not counted as an attempt gone.
#[test]
fn a_fast_shutdown_ends_a_wait_for_a_prepared_transactions_lock() {
    let c = Cluster::start("prepared", "max_prepared_transactions = 2");
    let (dir, want) = fixtures(&c, "in", &GenSpec { files: 1, size: 1 << 20, seed: 12, ..GenSpec::default() });
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    q(&c, "BEGIN; LOCK TABLE t IN SHARE MODE; PREPARE TRANSACTION 'hold'");
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_until(
        &format!(
            "SELECT coalesce((SELECT waiting_for LIKE 'a lock held by a prepared transaction (pg_prepared_xacts): %' \
               FROM store.status WHERE id = {job}), false)"
        ),
        Duration::from_secs(60),
    );
    c.stop_fast();
    c.pg_ctl_start();
    q(&c, "ROLLBACK PREPARED 'hold'");
    c.wait_done(job);
    assert_eq!(c.table_sha("t", "line"), want.sha256);
    assert_eq!(q(&c, &format!("SELECT attempts - stops FROM store.jobs WHERE id = {job}")), "1");
}

/// A Bloom-mode job killed mid-insert cannot resume by key: it starts over on the ON
/// CONFLICT path, and ends with no line twice and none that is not in the input, within its
/// estimate of false drops, its counts adding up.
#[test]
fn a_bloom_job_killed_mid_insert_ends_without_duplicates() {
    let c = Cluster::start("bloomkill", "store.batch_max = 1000");
    let (dir, want) = big_fixture(&c);
    q(&c, "CREATE TABLE approx (line text NOT NULL); CREATE UNIQUE INDEX ON approx (store.line_key(line))");
    let job = num(&c, &format!("SELECT store_ingest('{}', 'approx', dedup => 'bloom')", dir.display()));
    c.wait_mid_insert(job);
    c.kill_worker(job);
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

/// A panic on the merge thread fails the job (XX000, saying so) and keeps its files out of
/// the ledger: taken for the end of the stream, it would end the job done with its files in
/// the ledger, and the lines never inserted would never be read again. Without the fault,
/// the same call completes the table.
#[test]
fn a_panic_on_the_merge_thread_fails_the_job_and_keeps_its_files_out_of_the_ledger() {
    let c = Cluster::start("panic", "store.batch_max = 1000");
    let (dir, want) = fixtures(&c, "in", &GenSpec { files: 2, size: 4 << 20, seed: 61, ..GenSpec::default() });
    c.reload("ALTER SYSTEM SET store.fault_injection = 'merge_panic:5000'");
    let job = c.ingest(&format!("'{}'", dir.display()));
    assert_eq!(c.wait_state(job, &["done", "partial", "failed"], Duration::from_secs(120)), "failed");
    let s = c.state_and_error(job);
    assert!(
        s.starts_with("failed XX000 ") && s.contains("merge thread panicked") && s.contains("injected fault"),
        "{s}"
    );
    assert_eq!(num(&c, "SELECT count(*) FROM store.ingested"), 0, "no file of a failed job enters the ledger");
    assert!(num(&c, "SELECT count(*) FROM store.lines") < want.distinct as i64);
    // Without the fault, the same call reads every file again and completes the table.
    c.reload("ALTER SYSTEM RESET store.fault_injection");
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    assert_eq!(c.table_sha("store.lines", "line"), want.sha256);
    assert_eq!(num(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {again}")), 0);
}

/// A file changed between attempts restarts the stream (`merge_restarts` = 1), and its
/// counters with it: inserted + already_present is the distinct count, with nothing carried
/// over from the abandoned pass.
#[test]
fn a_file_changed_between_attempts_restarts_the_stream_with_exact_counts() {
    let c = Cluster::start("restart", "store.batch_max = 1000");
    let (dir, _) = big_fixture(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_mid_insert(job);
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

/// A file that failed in an earlier attempt (a passing EIO, EACCES) and can be read on the
/// resume makes the stream start over: read only past the checkpoint, its lines before it
/// would be lost while the job ended done.
#[test]
fn a_file_that_failed_in_an_earlier_attempt_restarts_the_stream() {
    let c = Cluster::start("failedfirst", "store.batch_max = 1000");
    let (dir, _) = big_fixture(&c);
    // The last file (read last, keys everywhere in the key space) cannot be read at first.
    let locked = dir.join("part-0003.txt");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_mid_insert(job);
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

/// A job whose worker keeps dying fails after `store.max_attempts` (54000), rather than
/// being claimed again for ever, each death a crash-restart of the whole server.
#[test]
fn a_job_whose_worker_keeps_dying_fails_after_max_attempts() {
    let c = Cluster::start("attempts", "store.max_attempts = 2\nstore.batch_max = 1000");
    let (dir, _) = big_fixture(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    for _ in 0..2 {
        c.wait_until(&format!("SELECT coalesce((SELECT state = 'running' AND worker_pid IS NOT NULL AND phase IS NOT NULL FROM store.jobs WHERE id = {job}), false)"), Duration::from_secs(60));
        let pid = c.kill_worker(job);
        // Wait for the crash restart to clear the worker's pid from the row's next claim.
        c.wait_until(&format!("SELECT coalesce((SELECT worker_pid <> {pid} OR state <> 'running' FROM store.jobs WHERE id = {job}), false)"), Duration::from_secs(60));
    }
    assert_eq!(c.wait_state(job, &["failed", "done"], Duration::from_secs(60)), "failed");
    let s = c.state_and_error(job);
    assert!(s.starts_with("failed 54000 ") && s.contains("gave up after 2 attempts"), "{s}");
}

/// Transient errors (here a lock timeout while another session holds the target) are
/// retried, and the job ends exact.
#[test]
fn a_lock_timeout_mid_insert_is_retried() {
    let c = Cluster::start("retry", "store.batch_max = 1000\nlock_timeout = '150ms'");
    let (dir, want) = fixtures(&c, "in", &GenSpec { files: 2, size: 8 << 20, seed: 81, ..GenSpec::default() });
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_mid_insert(job);
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

/// `make install` while a job runs leaves the server and the job alone: it builds into a
/// staging directory, and its `install-staged` step writes each file beside the old one and
/// renames it over (a copy over the pg_store.so that server processes have mapped kills
/// them). That step is what runs here (the build step touches no installed file, and cannot
/// run inside `cargo test`, which holds the build directory's lock).
#[test]
fn make_install_while_a_job_runs_leaves_the_server_running() {
    let c = Cluster::start("install", "store.batch_max = 1000");
    let (dir, want) = big_fixture(&c);
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_mid_insert(job);
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

/// Lines spread over the alphabet, `n` per file, in `files` files under `dir`.
fn alphabet(dir: &std::path::Path, files: usize, n: usize) {
    for f in 0..files {
        let body: String = (0..n).map(|i| format!("{}{}-{f}-{i}\n", (b'a' + (i % 26) as u8) as char, i * 7)).collect();
        std::fs::write(dir.join(format!("w{f}.txt")), body).unwrap();
    }
}

/// A cancel that comes while the job's worker, its own key range done, waits for an
/// inserter's range ends the job `cancelled` (it used to end `failed`, "the job
/// panicked": the cancel interrupted the worker's wait on its latch, outside the
/// transactions that catch an ERROR).
#[test]
fn a_cancel_while_the_worker_waits_for_an_inserter_ends_the_job_cancelled() {
    let c = Cluster::start(
        "cancel_waiting",
        "store.workers = 1\nstore.insert_workers = 2\nstore.compact_index = off\nstore.batch_max = 200",
    );
    let dir = common::readable_dir(&c.dir.join("in"));
    alphabet(&dir, 4, 50_000);
    // Batches of the upper range (lines from 'n' on) take their time; the lower range's don't.
    q(
        &c,
        "CREATE TABLE t (line text UNIQUE); \
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN IF EXISTS (SELECT FROM new_rows WHERE line >= 'n') THEN PERFORM pg_sleep(0.2); END IF; RETURN NULL; END $$; \
         CREATE TRIGGER slow AFTER INSERT ON t REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION slow()",
    );
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_until(
        &format!("SELECT ranges_done = 1 AND state = 'running' FROM store.status WHERE id = {job}"),
        Duration::from_secs(120),
    );
    q(&c, &format!("SELECT store.cancel({job})"));
    let s = c.wait_state(job, &["cancelled", "failed", "done"], Duration::from_secs(60));
    let error = q(&c, &format!("SELECT coalesce(error, '') FROM store.jobs WHERE id = {job}"));
    assert_eq!(s, "cancelled", "{error}");
}
