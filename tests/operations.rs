//! Living with pg_store: every database of a cluster served by one launcher and its
//! workers, the `store.workers` view and the LOG line of each job, a pg_cron schedule, a
//! server that does not preload pg_store, a database that is not UTF-8, retention and
//! `store_purge`, a `pg_dump -Fc | pg_restore` into a fresh cluster, a hot standby, and
//! `DROP EXTENSION` and `pg_basebackup` while a job runs. Needs `make install`.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fixtures, num, q, readable_dir, Cluster, BIN};
use store_testkit::GenSpec;

fn qin(c: &Cluster, db: &str, sql: &str) -> String {
    c.psql_in(db, "postgres", sql).unwrap_or_else(|e| panic!("{db}: {sql}: {e}"))
}

/// Wait until `sql`, run in `db`, returns `t`.
fn wait_in(c: &Cluster, db: &str, sql: &str, within: Duration) {
    let t = Instant::now();
    while c.psql_in(db, "postgres", sql).as_deref() != Ok("t") {
        assert!(t.elapsed() < within, "{db}: timed out waiting for {sql}; log:\n{}", c.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_done_in(c: &Cluster, db: &str, job: i64) {
    wait_in(
        c,
        db,
        &format!("SELECT state NOT IN ('queued', 'running') FROM store.jobs WHERE id = {job}"),
        Duration::from_secs(300),
    );
    assert_eq!(
        qin(c, db, &format!("SELECT state || coalesce(' ' || error, '') FROM store.jobs WHERE id = {job}")),
        "done"
    );
}

#[test]
fn two_databases_ingest_at_once_and_store_workers_shows_both() {
    let c = Cluster::start("dbs", "store.workers = 2");
    let spec = GenSpec { files: 3, size: 12 << 20, seed: 301, ..GenSpec::default() };
    let (dir, want) = fixtures(&c, "in", &spec);
    for db in ["alpha", "beta"] {
        q(&c, &format!("CREATE DATABASE {db}"));
        qin(&c, db, "CREATE EXTENSION pg_store");
    }
    let a: i64 = qin(&c, "alpha", &format!("SELECT store_ingest('{}')", dir.display())).parse().unwrap();
    let b: i64 = qin(&c, "beta", &format!("SELECT store_ingest('{}')", dir.display())).parse().unwrap();
    // Both run at the same time, each in a worker of its own database.
    wait_in(
        &c,
        "alpha",
        &format!(
            "SELECT count(DISTINCT database) = 2 AND bool_or(database = 'alpha' AND job = {a}) \
             FROM store.workers WHERE kind = 'worker' AND state = 'busy'"
        ),
        Duration::from_secs(60),
    );
    wait_done_in(&c, "alpha", a);
    wait_done_in(&c, "beta", b);
    for db in ["alpha", "beta"] {
        assert_eq!(c.table_sha_in(db, "store.lines", "line"), want.sha256, "{db}");
    }
    // Once idle, the workers leave; the launcher stays.
    wait_in(&c, "alpha", "SELECT count(*) = 0 FROM store.workers WHERE kind = 'worker'", Duration::from_secs(30));
    assert_eq!(q(&c, "SELECT count(*) FROM store.workers WHERE kind = 'launcher' AND database IS NULL"), "1");
    // One LOG line per job, with its counts.
    let log = std::fs::read_to_string(c.dir.join("log")).unwrap();
    let ends: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("pg_store job {a} done: 3 files read, 0 skipped, 0 failed;")))
        .collect();
    assert_eq!(ends.len(), 2, "job {a} of alpha and job {b} of beta: {ends:?}");
    assert!(ends.iter().all(|l| l.contains(&format!(" {} inserted, 0 already present", want.distinct))), "{ends:?}");
}

#[test]
fn a_database_without_pg_store_gets_no_resident_worker() {
    let c = Cluster::start("nodb", "");
    q(&c, "CREATE DATABASE plain");
    // The launcher looked at every database when it started; none keeps a worker.
    wait_in(&c, "postgres", "SELECT count(*) = 0 FROM store.workers WHERE kind = 'worker'", Duration::from_secs(30));
    // DROP DATABASE is never held off by pg_store.
    q(&c, "DROP DATABASE plain");
}

/// Back-dated history goes; open jobs, recent jobs and the ledger stay.
#[test]
fn retention_purges_old_jobs_but_never_the_ledger() {
    let c = Cluster::start("retention", "store.retention = 0");
    let spec = GenSpec { files: 2, size: 1 << 20, seed: 302, nasty: true, max_line_bytes: 4096, ..GenSpec::default() };
    let (dir, _) = fixtures(&c, "in", &spec);
    c.reload("ALTER SYSTEM SET store.max_line_bytes = 4096");
    let old = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(old);
    assert!(
        q(&c, &format!("SELECT count(*) > 0 FROM store.rejects WHERE job = {old}")) == "t",
        "nasty input has rejects"
    );
    let files = q(&c, &format!("SELECT files_done FROM store.status WHERE id = {old}"));
    let recent = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(recent);
    q(&c, &format!("UPDATE store.jobs SET finished_at = now() - interval '2 days' WHERE id = {old}"));
    // store.retention = 0 keeps everything: a worker that went idle purged nothing.
    let again = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(again);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(q(&c, &format!("SELECT count(*) FROM store.jobs WHERE id = {old}")), "1");
    c.reload("ALTER SYSTEM SET store.retention = '1d'");
    // A worker purges when idle: give it something to do, then wait.
    let last = c.ingest(&format!("'{}'", dir.display()));
    c.wait_done(last);
    c.wait_until(&format!("SELECT count(*) = 0 FROM store.jobs WHERE id = {old}"), Duration::from_secs(30));
    for t in ["files", "rejects", "checkpoints"] {
        assert_eq!(q(&c, &format!("SELECT count(*) FROM store.{t} WHERE job = {old}")), "0", "store.{t}");
    }
    assert_eq!(q(&c, &format!("SELECT count(*) FROM store.jobs WHERE id IN ({recent}, {again}, {last})")), "3");
    // The ledger keeps the files the purged job ingested: the next run skips them.
    assert_eq!(q(&c, &format!("SELECT count(*) FROM store.ingested WHERE job = {old}")), files);
    assert_eq!(q(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {last}")), files);
    let log = std::fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains("pg_store: purged 1 jobs that ended more than store.retention"), "{}", c.log_tail());
}

#[test]
fn store_purge_deletes_only_what_its_caller_sees() {
    let c = Cluster::start("purge", "");
    let (dir, _) = fixtures(&c, "in", &GenSpec { files: 1, size: 256 << 10, seed: 303, ..GenSpec::default() });
    q(&c, "CREATE ROLE alice LOGIN IN ROLE pg_read_server_files; CREATE ROLE bob LOGIN IN ROLE pg_read_server_files");
    q(&c, "CREATE TABLE ta (line text PRIMARY KEY); CREATE TABLE tb (line text PRIMARY KEY)");
    q(&c, "GRANT INSERT, SELECT ON ta TO alice; GRANT INSERT, SELECT ON tb TO bob");
    let ja: i64 =
        c.psql_as("alice", &format!("SELECT store_ingest('{}', 'ta')", dir.display())).unwrap().parse().unwrap();
    let jb: i64 =
        c.psql_as("bob", &format!("SELECT store_ingest('{}', 'tb')", dir.display())).unwrap().parse().unwrap();
    c.wait_done(ja);
    c.wait_done(jb);
    q(&c, "UPDATE store.jobs SET finished_at = now() - interval '3 hours'");
    let e = c.psql_as("alice", "SELECT store_purge('-1 hour')").unwrap_err();
    assert!(e.contains("older_than must not be negative"), "{e}");
    assert_eq!(c.psql_as("alice", "SELECT store_purge('4 hours')").unwrap(), "0", "nothing that old");
    assert_eq!(c.psql_as("alice", "SELECT store_purge('1 hour')").unwrap(), "1", "alice's job only");
    assert_eq!(
        q(&c, &format!("SELECT string_agg(id::text, ',') FROM store.jobs WHERE id IN ({ja}, {jb})")),
        jb.to_string()
    );
    assert_eq!(q(&c, "SELECT store_purge('1 hour')"), "1", "a superuser purges anyone's");
    assert_eq!(q(&c, "SELECT count(*) FROM store.ingested"), "2", "the ledger stays");
}

/// `pg_dump -Fc | pg_restore` into a fresh cluster keeps what pg_store holds: the lines of
/// `store.lines` (an extension member, whose rows a dump would otherwise leave out), the
/// ledger, the job history with its files, rejects and checkpoints, and the job id
/// sequence. A re-run there reads no file again, and a job that was open at dump time fails
/// there (55000) instead of running.
#[test]
fn a_dump_restored_into_a_fresh_cluster_keeps_lines_ledger_and_history() {
    let src = Cluster::start("dump-src", "");
    let (dir, want) =
        fixtures(&src, "in", &GenSpec { files: 3, size: 2 << 20, seed: 304, nasty: true, ..GenSpec::default() });
    let done = src.ingest(&format!("'{}'", dir.display()));
    src.wait_done(done);
    // pg_cron (which the test clusters load) can only live in one database.
    q(&src, "DROP EXTENSION pg_cron");
    // A job left queued at dump time (no worker may run it here: store.workers = 0).
    src.reload("ALTER SYSTEM SET store.workers = 0");
    // The worker that ran the first job may still be idle in the database, and would
    // claim the queued one: wait until it has left (it does after 3 idle seconds).
    src.wait_until("SELECT count(*) = 0 FROM store.workers WHERE kind = 'worker'", Duration::from_secs(30));
    let queued: i64 = q(
        &src,
        &format!(
            "INSERT INTO store.jobs (path, target, column_name, dedup, owner) \
             SELECT path, target, column_name, dedup, owner FROM store.jobs WHERE id = {done} RETURNING id"
        ),
    )
    .parse()
    .unwrap();
    let dump = src.dir.join("db.dump");
    let out = Command::new(format!("{BIN}/pg_dump"))
        .args(["-Fc", "-h", src.dir.to_str().unwrap(), "-p", &src.port.to_string(), "-U", "postgres", "-f"])
        .arg(&dump)
        .arg("postgres")
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));

    let dst = Cluster::start_with("dump-dst", "pg_store", "", &[]);
    q(&dst, "CREATE DATABASE restored");
    let out = Command::new(format!("{BIN}/pg_restore"))
        .args([
            "-h",
            dst.dir.to_str().unwrap(),
            "-p",
            &dst.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "restored",
            "--exit-on-error",
        ])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dst.table_sha_in("restored", "store.lines", "line"), want.sha256, "the default target's lines");
    for t in ["store.ingested", "store.jobs", "store.files", "store.rejects", "store.checkpoints"] {
        let count = format!("SELECT count(*) FROM {t}");
        assert_eq!(qin(&dst, "restored", &count), q(&src, &count), "{t}");
    }
    let files = q(&src, &format!("SELECT files_done FROM store.status WHERE id = {done}"));
    assert_eq!(qin(&dst, "restored", "SELECT count(*) FROM store.ingested"), files, "the ledger");
    assert_eq!(qin(&dst, "restored", &format!("SELECT state FROM store.jobs WHERE id = {done}")), "done", "history");
    assert!(
        qin(&dst, "restored", &format!("SELECT count(*) > 0 FROM store.rejects WHERE job = {done}")) == "t",
        "rejects"
    );
    // A store_ingest wakes a worker in the restored database: it fails the job that was
    // open in the other cluster, and runs the new one, which the ledger lets skip all:
    // it reads no byte and inserts nothing.
    let rerun: i64 = qin(&dst, "restored", &format!("SELECT store_ingest('{}')", dir.display())).parse().unwrap();
    wait_done_in(&dst, "restored", rerun);
    assert_eq!(
        qin(
            &dst,
            "restored",
            &format!(
                "SELECT files_skipped || ' ' || bytes_total || ' ' || inserted FROM store.status WHERE id = {rerun}"
            )
        ),
        format!("{files} 0 0")
    );
    assert_eq!(
        qin(&dst, "restored", &format!("SELECT state || ' ' || sqlstate FROM store.jobs WHERE id = {queued}")),
        "failed 55000",
        "a job queued elsewhere does not run here"
    );
    assert!(rerun > queued, "the job sequence came along: {rerun} after {queued}");
}

/// A hot standby shows the jobs (`store.status`, `store.workers`, `store_wait`) and refuses
/// what would write (`store_ingest`, `store_cancel`, `store_purge`, `store_forget`) with
/// 25006 and a hint to use the primary — reads that wrote would fail there with XX000
/// "cannot assign TransactionIds during recovery". Waiting there for a running job needs
/// `hot_standby_feedback` (55000 without it).
#[test]
fn a_hot_standby_shows_jobs_and_refuses_writes_with_25006() {
    let c = Cluster::start("standby_primary", "");
    let (dir, _) = fixtures(&c, "in", &GenSpec { files: 1, size: 100_000, seed: 9, ..GenSpec::default() });
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    let job: i64 = q(&c, &format!("SELECT store_ingest('{}', 't')", dir.display())).parse().unwrap();
    c.wait_done(job);
    let s = c.standby("standby_replica");
    let t = Instant::now();
    while s.psql(&format!("SELECT state FROM store.status WHERE id = {job}")).as_deref() != Ok("done") {
        assert!(t.elapsed() < Duration::from_secs(60), "the standby never showed job {job}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let on_standby = |sql: &str| s.psql_script("postgres", &format!("\\set VERBOSITY verbose\n{sql};\n"));
    assert_eq!(on_standby(&format!("SELECT state FROM store_wait({job})")).unwrap(), "done");
    on_standby("SELECT * FROM store.workers").unwrap();
    on_standby("SELECT * FROM store.ranges").unwrap();
    for sql in [
        format!("SELECT store_ingest('{}', 't')", dir.display()),
        format!("SELECT store_cancel({job})"),
        "SELECT store_purge('1 day')".to_string(),
        "SELECT store_forget('t')".to_string(),
    ] {
        let e = on_standby(&sql).expect_err(&sql);
        assert!(e.contains("ERROR:  25006:") && e.contains("on a hot standby") && e.contains("primary"), "{sql}: {e}");
    }
    // A job still running: a wait there would hold back WAL replay with its snapshot, so
    // it is refused, unless the standby holds the primary's vacuum back for it.
    q(&c, "CREATE TABLE slow_t (line text UNIQUE)");
    c.slow_inserts("slow_t", 1.0);
    let running: i64 = q(&c, &format!("SELECT store_ingest('{}', 'slow_t')", dir.display())).parse().unwrap();
    c.wait_until(&format!("SELECT state = 'running' FROM store.jobs WHERE id = {running}"), Duration::from_secs(60));
    let t = Instant::now();
    while s.psql(&format!("SELECT state FROM store.status WHERE id = {running}")).as_deref() != Ok("running") {
        assert!(t.elapsed() < Duration::from_secs(60), "the standby never showed job {running} running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = on_standby(&format!("SELECT state FROM store.wait({running})")).expect_err("a wait on the standby");
    assert!(
        e.contains("ERROR:  55000:") && e.contains("hold back WAL replay") && e.contains("hot_standby_feedback"),
        "{e}"
    );
    s.reload("ALTER SYSTEM SET hot_standby_feedback = on");
    assert_eq!(on_standby(&format!("SELECT state FROM store.wait({running})")).unwrap(), "done");
}

/// `DROP EXTENSION pg_store CASCADE` during a job, by the extension's owner, stops the
/// database's pg_store processes first and succeeds, with no deadlock (40P01) between the
/// DROP and the worker; anyone else's DROP is refused by PostgreSQL and stops nothing;
/// pg_store can be created again and used at once.
#[test]
fn drop_extension_during_a_job_stops_it_and_succeeds() {
    let c =
        Cluster::start("drop_mid_job", "store.batch_max = 1000\nstore.insert_workers = 2\nstore.compact_index = off");
    let (dir, _) = fixtures(&c, "big", &GenSpec { files: 2, size: 8 << 20, seed: 10, ..GenSpec::default() });
    // Into the default target, store.lines, which the DROP drops too; batches that take
    // their time (a statement trigger sleeps), so the DROP comes while a batch's
    // transaction holds its locks, as it would on a big table.
    c.slow_inserts("store.lines", 0.3);
    let job: i64 = q(&c, &format!("SELECT store_ingest('{}')", dir.display())).parse().unwrap();
    c.wait_mid_insert(job);
    // A role that does not own pg_store: its DROP is refused, and stops nothing.
    q(&c, "CREATE ROLE nobody LOGIN");
    for _ in 0..3 {
        let e = c.psql_as("nobody", "DROP EXTENSION pg_store").unwrap_err();
        assert!(e.contains("must be owner of extension pg_store"), "{e}");
    }
    assert_eq!(
        q(&c, &format!("SELECT attempts FROM store.jobs WHERE id = {job}")),
        "1",
        "another role's DROP stopped the job"
    );
    let out = c.psql_script("postgres", "\\set VERBOSITY verbose\nDROP EXTENSION pg_store CASCADE;\n");
    assert!(out.is_ok(), "DROP EXTENSION during a job: {out:?}");
    assert_eq!(q(&c, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_store'"), "0");
    let log = std::fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(!log.contains("deadlock detected"), "a deadlock in the log");
    q(&c, "CREATE EXTENSION pg_store");
    let small = common::readable_dir(&c.dir.join("small"));
    std::fs::write(small.join("a.txt"), "x\ny\n").unwrap();
    let again: i64 = q(&c, &format!("SELECT store_ingest('{}')", small.display())).parse().unwrap();
    c.wait_done(again);
}

/// `pg_basebackup` during a job leaves the job's sorted runs out (they are about as large
/// as the input): the default `store.temp_dir` is `pgsql_tmp_pg_store` in the data
/// directory, which base backups leave out as they leave out PostgreSQL's own temporary
/// files, and which a restart keeps (the job resumes from its runs).
#[test]
fn a_base_backup_during_a_job_leaves_its_sorted_runs_out() {
    let c = Cluster::start("basebackup_runs", "store.batch_max = 1000\nstore.insert_workers = 1");
    let (dir, _) = fixtures(&c, "big", &GenSpec { files: 2, size: 8 << 20, seed: 12, ..GenSpec::default() });
    // A statement trigger that takes its time: the job lasts long enough for a backup and
    // a restart to meet it.
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    c.slow_inserts("t", 0.03);
    let job: i64 = q(&c, &format!("SELECT store_ingest('{}', 't')", dir.display())).parse().unwrap();
    c.wait_mid_insert(job);
    let runs = c.data().join("pgsql_tmp_pg_store");
    let kept = std::fs::read_dir(&runs).map(|d| d.count()).unwrap_or(0);
    assert!(kept > 0, "no job directory under {}", runs.display());
    let backup = c.dir.join("backup");
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/pg_basebackup"), "-h", c.dir.to_str().unwrap()])
        .args(["-p", &c.port.to_string(), "-U", "postgres", "-c", "fast", "-D", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!backup.join("pgsql_tmp_pg_store").exists(), "the backup holds the job's temporary directory");
    assert_eq!(q(&c, &format!("SELECT state FROM store.jobs WHERE id = {job}")), "running", "the job ended too soon");
    c.stop_immediate();
    c.pg_ctl_start();
    c.wait_done(job);
    let log = std::fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains(&format!("pg_store job {job}: resuming from the")), "the job sorted again after the restart");
}

#[test]
fn a_pg_cron_schedule_runs_an_ingest() {
    let c = Cluster::start("cron", "");
    let dir = readable_dir(&c.dir.join("drop"));
    fs::write(dir.join("a.txt"), "cron one\ncron two\n").unwrap();
    // Debian's pg_cron has minute resolution: the job fires within 60 s.
    q(&c, &format!("SELECT cron.schedule('ingest', '* * * * *', $$SELECT store_ingest('{}')$$)", dir.display()));
    c.wait_until(
        "SELECT EXISTS (SELECT FROM store.jobs WHERE state = 'done' AND files_total = 1)",
        Duration::from_secs(130),
    );
    q(&c, "SELECT cron.unschedule('ingest')");
    assert_eq!(num(&c, "SELECT count(*) FROM store.lines"), 2);
}

#[test]
fn without_preloading_store_ingest_explains_what_is_missing() {
    // A later line wins in postgresql.conf: pg_store is not preloaded here.
    let c = Cluster::start("nopreload", "shared_preload_libraries = 'pg_cron'");
    let e = c.psql("SELECT store_ingest('/tmp')").unwrap_err();
    assert!(e.contains("pg_store is not loaded through shared_preload_libraries"), "{e}");
    assert!(e.contains("HINT:  Add pg_store to shared_preload_libraries"), "{e}");
}

/// Lines are UTF-8: in a database of another encoding `store_ingest` is refused, saying so.
#[test]
fn a_database_that_is_not_utf8_is_refused() {
    let c = Cluster::start("latin1", "");
    q(&c, "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    c.psql_in("latin", "postgres", "CREATE EXTENSION pg_store").unwrap();
    let e = c.psql_in("latin", "postgres", "SELECT store_ingest('/tmp')").unwrap_err();
    assert!(e.contains("pg_store needs a database with UTF8 encoding"), "{e}");
}
