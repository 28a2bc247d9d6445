//! Refuse early, say why: targets every batch would fail on, arguments and settings
//! pg_store could not use, a queued job that waits for a worker and a running one that
//! waits for a lock or a synchronous standby — each refused or
//! explained where the DBA acts, with a SQLSTATE, rather than failing later or never —;
//! and what a `varchar(n)` target cannot hold, rejected line by line. Needs `make install`.

mod common;

use std::fs;
use std::io::Write;
use std::time::Duration;

use common::{num, q, readable_dir, Cluster};

/// `sql` run as the superuser must fail with `sqlstate` and a message containing `says`.
fn refused(c: &Cluster, sql: &str, sqlstate: &str, says: &str) -> String {
    let e = c.psql_script("postgres", &format!("\\set VERBOSITY verbose\n{sql};\n")).expect_err(sql);
    assert!(
        e.contains(&format!("ERROR:  {sqlstate}:")) && e.contains(says),
        "{sql}: expected {sqlstate} saying {says:?}, got {e}"
    );
    e
}

/// Targets every batch would fail on (a deferrable unique constraint: 42501 or 55000
/// mid-job; a NOT NULL column without a default: after seconds of reading and sorting) or
/// that PostgreSQL itself would never accept (a partitioned table without the line as its
/// partition key) are refused at the call, with a hint that works (not an index PostgreSQL
/// refuses).
#[test]
fn targets_that_cannot_work_are_refused_at_the_call() {
    let c = Cluster::start("targets_refused", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\ntwo\n").unwrap();
    let ingest = |t: &str| format!("SELECT store_ingest('{}', '{t}')", dir.display());
    q(
        &c,
        "CREATE TABLE deferred_u (line text, CONSTRAINT u UNIQUE (line) DEFERRABLE INITIALLY DEFERRED); \
         CREATE TABLE deferrable_u (line text, CONSTRAINT u2 UNIQUE (line) DEFERRABLE INITIALLY IMMEDIATE); \
         CREATE TABLE other_deferrable (line text UNIQUE, n int, CONSTRAINT n_u UNIQUE (n) DEFERRABLE); \
         CREATE TABLE trig (line text UNIQUE); \
         CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER later AFTER INSERT ON trig DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION nothing(); \
         CREATE TABLE parent (line text PRIMARY KEY); \
         CREATE TABLE child (line text UNIQUE REFERENCES parent DEFERRABLE INITIALLY DEFERRED); \
         CREATE TABLE nn (line text UNIQUE, source text NOT NULL); \
         CREATE TABLE nn_ok (line text UNIQUE, source text NOT NULL DEFAULT 'files', id bigint GENERATED ALWAYS AS IDENTITY); \
         CREATE TABLE byday (line text, day date NOT NULL DEFAULT current_date, UNIQUE (line, day)) PARTITION BY RANGE (day); \
         CREATE TABLE byday_2026 PARTITION OF byday FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE TABLE pn (line text PRIMARY KEY, extra int) PARTITION BY HASH (line); \
         CREATE TABLE pn0 PARTITION OF pn FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE pn1 PARTITION OF pn (extra DEFAULT 7 NOT NULL) FOR VALUES WITH (MODULUS 2, REMAINDER 1); \
         CREATE ACCESS METHOD other_heap TYPE TABLE HANDLER heap_tableam_handler",
    );
    refused(&c, &ingest("deferred_u"), "0A000", "constraint u of public.deferred_u is deferrable");
    refused(&c, &ingest("deferrable_u"), "0A000", "is deferrable");
    refused(&c, &ingest("other_deferrable"), "0A000", "constraint n_u of public.other_deferrable is deferrable");
    refused(&c, &ingest("trig"), "0A000", "constraint later on public.trig is INITIALLY DEFERRED");
    refused(&c, &ingest("child"), "0A000", "is INITIALLY DEFERRED");
    refused(&c, &ingest("nn"), "23502", "source");
    // A partition's default does not apply to a row routed through the table.
    refused(&c, &ingest("pn"), "23502", "extra (NOT NULL in partition public.pn1)");
    let e = refused(&c, &ingest("byday"), "42P10", "has no unique index on column \"line\"");
    assert!(
        e.contains("PARTITION BY HASH (line)") && !e.contains("CREATE UNIQUE INDEX ON public.byday (line)."),
        "{e}"
    );
    // A table access method that is not heap's: refused by what it is, not by its name.
    q(&c, "CREATE TABLE heapish (line text UNIQUE) USING other_heap");
    let job = q(&c, &ingest("heapish"));
    c.wait_done(job.parse().unwrap());
    let job = q(&c, &ingest("nn_ok"));
    c.wait_done(job.parse().unwrap());
    assert_eq!(q(&c, "SELECT string_agg(line || '/' || source, ',' ORDER BY line) FROM nn_ok"), "one/files,two/files");
}

/// Every NULL argument that must not be NULL is refused with 22004, naming it (not XX000
/// "argument 0 must not be null", nor a NULL result); a filter with an unknown key (a typo)
/// is refused with the key it probably meant, instead of being taken as one regular
/// expression that filters out everything.
#[test]
fn null_arguments_and_filter_typos_are_refused_naming_them() {
    let c = Cluster::start("targets_args", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\n").unwrap();
    let d = dir.display();
    refused(&c, "SELECT store.ingest(NULL)", "22004", "path of store.ingest must not be NULL");
    refused(&c, &format!("SELECT store.ingest('{d}', NULL)"), "22004", "target of store.ingest");
    refused(&c, &format!("SELECT store.ingest('{d}', column_name => NULL)"), "22004", "column_name of store.ingest");
    refused(&c, &format!("SELECT store.ingest('{d}', dedup => NULL)"), "22004", "dedup of store.ingest");
    refused(&c, "SELECT store.cancel(NULL)", "22004", "job of store.cancel");
    refused(&c, "SELECT * FROM store.wait(NULL)", "22004", "job of store.wait");
    refused(&c, "SELECT store.purge(NULL)", "22004", "older_than of store.purge");
    refused(&c, "SELECT store.forget(NULL)", "22004", "target of store.forget");
    // The same through 0.2.0's names.
    refused(&c, "SELECT store_ingest(NULL)", "22004", "path of store.ingest must not be NULL");
    refused(&c, "SELECT store_cancel(NULL)", "22004", "job of store.cancel");
    refused(&c, "SELECT * FROM store_wait(NULL)", "22004", "job of store.wait");
    refused(&c, "SELECT store_purge(NULL)", "22004", "older_than of store.purge");
    refused(&c, "SELECT store_forget(NULL)", "22004", "target of store.forget");
    let e = refused(&c, &format!("SELECT store_ingest('{d}', filter => 'include=^a;minlen=3')"), "22023", "minlen");
    assert!(e.contains("min_len"), "{e}");
    let e = refused(&c, &format!("SELECT store.ingest('{d}', filter => 'minlen=3')"), "22023", "minlen");
    assert!(e.contains("did you mean min_len"), "{e}");
}

/// Every string setting is checked where it is set: `ALTER SYSTEM SET store.memory_limit =
/// 'lots'` (also '0', '200%'), accepted, would fail every later job with 22023.
#[test]
fn settings_pg_store_could_not_use_are_refused_where_they_are_set() {
    let c = Cluster::start("targets_settings", "");
    for bad in ["lots", "0", "200%", "-5MB"] {
        refused(&c, &format!("ALTER SYSTEM SET store.memory_limit = '{bad}'"), "22023", "store.memory_limit");
    }
    refused(&c, "ALTER SYSTEM SET store.temp_dir = 'relative/dir'", "22023", "not an absolute path");
    refused(
        &c,
        "ALTER SYSTEM SET store.allowed_dirs = '/data, incoming'",
        "22023",
        "\"incoming\" is not an absolute path",
    );
    refused(&c, "SET store.fault_injection = 'explode'", "22023", "unknown fault");
    // A setting of pg_store's that does not exist is a typo, not a placeholder.
    refused(&c, "SET store.wokers = 3", "42602", "store.wokers");
    q(&c, "ALTER SYSTEM SET store.memory_limit = '128MB'");
    q(&c, "ALTER SYSTEM RESET store.memory_limit");
}

/// With no background worker slot free, a queued job's `store.status` row says why it waits
/// (`waiting_for`, naming `max_worker_processes`), rather than the job staying `queued`
/// with no reason given (the launcher's log aside); cancelled, it waits for nothing.
#[test]
fn a_job_waiting_for_a_worker_slot_says_so() {
    // The launcher and pg_cron's scheduler take both slots (the logical replication
    // launcher finds none).
    let c = Cluster::start("targets_noslot", "max_worker_processes = 2");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\n").unwrap();
    let job = c.ingest(&format!("'{}'", dir.display()));
    c.wait_until(
        &format!("SELECT waiting_for LIKE '%max_worker_processes%' FROM store.status WHERE id = {job}"),
        Duration::from_secs(30),
    );
    assert_eq!(q(&c, &format!("SELECT state FROM store.status WHERE id = {job}")), "queued");
    q(&c, &format!("SELECT store_cancel({job})"));
    assert_eq!(
        q(&c, &format!("SELECT state || ' ' || (waiting_for IS NULL) FROM store.status WHERE id = {job}")),
        "cancelled true"
    );
}

/// `store.workers` lowered to 0 while a job runs: the job finishes, and the worker then
/// leaves the next one queued, which says why; raised again, the queued job runs.
#[test]
fn store_workers_lowered_to_0_lets_the_running_job_finish_and_runs_no_other() {
    let c = Cluster::start("targets_workers0", "store.workers = 1\nstore.batch_max = 500");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), (0..20000).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    c.slow_inserts("t", 0.2);
    let running = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_until(&format!("SELECT inserted > 0 FROM store.status WHERE id = {running}"), Duration::from_secs(60));
    let queued = c.ingest(&format!("'{}', 't'", dir.display()));
    c.reload("ALTER SYSTEM SET store.workers = 0");
    c.wait_done(running);
    c.wait_until(
        &format!("SELECT state = 'queued' AND waiting_for LIKE 'store.workers is 0: %' FROM store.status WHERE id = {queued}"),
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(q(&c, &format!("SELECT state FROM store.status WHERE id = {queued}")), "queued");
    // store.wait's timeout says why (its NOTICE; the division only makes psql print it).
    let said = c.psql(&format!("SELECT store.wait({queued}, '1 second'); SELECT 1 / 0")).unwrap_err();
    assert!(said.contains(&format!("timed out, job {queued} is still queued: store.workers is 0")), "{said}");
    c.reload("ALTER SYSTEM RESET store.workers");
    c.wait_done(queued);
    // The ledger knows the file the first job read.
    assert_eq!(num(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {queued}")), 1);
}

/// A running job that waits says for what in `store.status.waiting_for`, naming what the
/// DBA acts on: first a lock another session holds on the target, then a synchronous
/// standby that never confirms the job's commits; once both are gone, it ends and waits
/// for nothing. A job queued while that standby is gone says so too.
#[test]
fn a_running_job_says_what_it_waits_for() {
    let c = Cluster::start("targets_waits", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\ntwo\none\n").unwrap();
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    // SHARE lets the job be queued and read its files, not insert.
    let mut holder = c.session("postgres");
    writeln!(holder.stdin.as_mut().unwrap(), "BEGIN; LOCK TABLE t IN SHARE MODE;").unwrap();
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 't'::regclass AND mode = 'ShareLock' AND granted)",
        Duration::from_secs(30),
    );
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    let waits = |like: &str| format!("SELECT waiting_for LIKE '{like}' FROM store.status WHERE id = {job}");
    // The note names the session holding the lock.
    let holder_pid =
        q(&c, "SELECT pid FROM pg_locks WHERE relation = 't'::regclass AND mode = 'ShareLock' AND granted");
    c.wait_until(
        &waits(&format!("a lock held by process {holder_pid}: pg_blocking_pids(%) names it")),
        Duration::from_secs(60),
    );
    assert_eq!(q(&c, &format!("SELECT state FROM store.status WHERE id = {job}")), "running");
    // The job's next commits wait for a standby that does not exist.
    c.reload("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    writeln!(holder.stdin.as_mut().unwrap(), "COMMIT;").unwrap();
    drop(holder.stdin.take());
    holder.wait().unwrap();
    c.wait_until(
        &waits(
            "a synchronous standby to confirm a commit of process % (synchronous_standby_names, pg_stat_replication)",
        ),
        Duration::from_secs(60),
    );
    assert_eq!(q(&c, &format!("SELECT state FROM store.status WHERE id = {job}")), "running");
    c.reload("ALTER SYSTEM RESET synchronous_standby_names");
    c.wait_done(job);
    // A job queued while the standby is gone: the worker's claim waits for it, and the
    // job shows queued until it comes back.
    c.reload("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    let queued: i64 = q(&c, &format!("SET synchronous_commit = local; SELECT store_ingest('{}', 't')", dir.display()))
        .parse()
        .unwrap();
    c.wait_until(
        &format!(
            "SELECT state = 'queued' AND waiting_for LIKE 'a synchronous standby to confirm a commit of process %' \
             FROM store.status WHERE id = {queued}"
        ),
        Duration::from_secs(60),
    );
    c.reload("ALTER SYSTEM RESET synchronous_standby_names");
    c.wait_done(queued);
    assert_eq!(q(&c, &format!("SELECT count(*) || ' ' || (waiting_for IS NULL) FROM t, store.status WHERE id = {job} GROUP BY waiting_for")), "2 true");
}

/// Queueing a job into a partitioned table locks none of its partitions: a call made while
/// another session holds one (an `ALTER TABLE`, a `VACUUM FULL`) returns at once — as a
/// pg_cron call must — and the job waits for the partition instead, saying so, and
/// without deadlocking with a session that then locks the whole table. A partition owned
/// by another role, at any depth, is refused at the call.
#[test]
fn a_call_into_a_partitioned_table_waits_for_no_partition() {
    let c = Cluster::start("targets_partitions", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "apple\nbanana\ncherry\napple\n").unwrap();
    q(
        &c,
        "CREATE TABLE p (line text PRIMARY KEY) PARTITION BY RANGE (line); \
         CREATE TABLE p_a PARTITION OF p FOR VALUES FROM (MINVALUE) TO ('b'); \
         CREATE TABLE p_b PARTITION OF p FOR VALUES FROM ('b') TO (MAXVALUE) PARTITION BY HASH (line); \
         CREATE TABLE p_b0 PARTITION OF p_b FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE p_b1 PARTITION OF p_b FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
    );
    let mut holder = c.session("postgres");
    writeln!(holder.stdin.as_mut().unwrap(), "BEGIN; LOCK TABLE p_b1 IN ACCESS EXCLUSIVE MODE;").unwrap();
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'p_b1'::regclass AND mode = 'AccessExclusiveLock' AND granted)",
        Duration::from_secs(30),
    );
    let job: i64 =
        q(&c, &format!("SET lock_timeout = '3s'; SELECT store_ingest('{}', 'p')", dir.display())).parse().unwrap();
    c.wait_until(
        &format!(
            "SELECT waiting_for LIKE 'a lock held by process %: pg_blocking_pids(%) names it' \
             FROM store.status WHERE id = {job}"
        ),
        Duration::from_secs(60),
    );
    // A session locking the whole table meanwhile (as TRUNCATE does) queues behind the
    // job, which locked the table before its partitions: no deadlock fails the job.
    let mut locker = c.session("postgres");
    writeln!(locker.stdin.as_mut().unwrap(), "BEGIN; LOCK TABLE p IN ACCESS EXCLUSIVE MODE;").unwrap();
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted)",
        Duration::from_secs(30),
    );
    // Past deadlock_timeout (1 s), so that the job is the one to find a deadlock, if any.
    std::thread::sleep(Duration::from_secs(2));
    for s in [&mut holder, &mut locker] {
        writeln!(s.stdin.as_mut().unwrap(), "COMMIT;").unwrap();
        drop(s.stdin.take());
        s.wait().unwrap();
    }
    c.wait_done(job);
    assert_eq!(q(&c, "SELECT string_agg(line, ',' ORDER BY line) FROM p"), "apple,banana,cherry");
    q(&c, "CREATE ROLE other; ALTER TABLE p_b0 OWNER TO other");
    refused(
        &c,
        &format!("SELECT store_ingest('{}', 'p')", dir.display()),
        "42501",
        "partition public.p_b0 (owned by other) of \"public.p\" is not owned by the owner",
    );
}

/// A `varchar(n)` target, or a domain over one, takes the lines that fit, and a line longer
/// than n characters is a `too_long` reject, recorded like any other — not a 22001 that
/// fails the job mid-insert after earlier batches committed. A domain over text with a
/// CHECK fails the job with the constraint's SQLSTATE.
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
    let s = c.state_and_error(job);
    assert!(s.starts_with("failed 23514 ") && s.contains("no_x"), "{s}");
}

/// A target dropped while its job runs: the job fails with 42P01 and says to queue it
/// again (it failed with XX000 "could not open relation with OID …", after a LOG line
/// that called the dropped table by its OID).
#[test]
fn a_target_dropped_during_a_job_fails_it_with_42p01() {
    let c = Cluster::start("targets_dropped", "store.workers = 1\nstore.insert_workers = 1\nstore.batch_max = 500");
    let (dir, _) =
        common::fixtures(&c, "in", &store_testkit::GenSpec { files: 2, size: 4 << 20, seed: 3, ..Default::default() });
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    c.slow_inserts("t", 0.1);
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_mid_insert(job);
    q(&c, "DROP TABLE t");
    assert_eq!(c.wait_state(job, &["failed", "done"], Duration::from_secs(60)), "failed");
    let e = q(&c, &format!("SELECT sqlstate || ' ' || error FROM store.jobs WHERE id = {job}"));
    assert!(e.starts_with("42P01 ") && e.contains("no longer exists"), "{e}");
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(!log.contains("; following it"), "a dropped table was taken for a renamed one");
}

/// The unique index dropped while a job inserts (a constraint dropped to be added again,
/// `DROP INDEX` then `CREATE UNIQUE INDEX CONCURRENTLY`): the job fails with 42P10 at its
/// next batch, having inserted no line twice — without the index, ON CONFLICT finds nothing
/// to conflict with, and the look-up of a batch's keys scans the whole table for each.
#[test]
fn a_unique_index_dropped_during_a_job_fails_it_with_42p10() {
    let c = Cluster::start("targets_unique_dropped", "store.insert_workers = 1\nstore.batch_max = 500");
    let (dir, _) =
        common::fixtures(&c, "in", &store_testkit::GenSpec { files: 2, size: 4 << 20, seed: 5, ..Default::default() });
    q(&c, "CREATE TABLE t (line text CONSTRAINT t_line PRIMARY KEY)");
    // Half the lines are there already: each batch must skip them.
    let first = c.ingest(&format!("'{}', 't'", dir.join("part-0000.txt").display()));
    c.wait_done(first);
    c.slow_inserts("t", 0.1);
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_mid_insert(job);
    q(&c, "ALTER TABLE t DROP CONSTRAINT t_line");
    assert_eq!(c.wait_state(job, &["failed", "done"], Duration::from_secs(60)), "failed");
    let e = q(&c, &format!("SELECT sqlstate || ' ' || error FROM store.jobs WHERE id = {job}"));
    assert!(e.starts_with("42P10 ") && e.contains("no longer has a unique index on column \"line\""), "{e}");
    assert_eq!(q(&c, "SELECT count(*) - count(DISTINCT line) FROM t"), "0");
}
