//! The ledger of ingested files (`store.ingested`) and the counters of `store.status`, as
//! a DBA meets them: the ledger follows the table — a `TRUNCATE`, a partition dropped and
//! re-created make the next run read the files again, `store_forget` does it by hand —,
//! a job writes into the table it was given whatever is renamed meanwhile, a scheduled
//! run over an unchanged directory adds no row per file, every counter after a crash
//! equals an uninterrupted run's, a file is skipped only for the same column, filter,
//! mode and limits, and a file rewritten with its old size and mtime is read again.
//! Needs `make install`.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{fixtures, kill_9, num, q, readable_dir, Cluster};
use store_testkit::GenSpec;

/// Words spread over the alphabet, `n` per file, in `files` files under `dir`.
fn words(dir: &Path, files: usize, n: usize) {
    for f in 0..files {
        let body: String = (0..n).map(|i| format!("{}{}-{f}-{i}\n", (b'a' + (i % 26) as u8) as char, i * 7)).collect();
        fs::write(dir.join(format!("w{f}.txt")), body).unwrap();
    }
}

fn skipped_inserted_present(c: &Cluster, job: i64) -> String {
    q(
        c,
        &format!(
            "SELECT files_skipped || ' ' || inserted || ' ' || already_present FROM store.status WHERE id = {job}"
        ),
    )
}

fn run(c: &Cluster, args: &str) -> i64 {
    let job = c.ingest(args);
    c.wait_done(job);
    job
}

/// After a `TRUNCATE` (of a table, or of `store.lines`), or a partition of a
/// hash-partitioned target dropped and re-created, the ledger forgets what the change may
/// have taken: the next run reads the files again and the table is whole, where skipping
/// every file would leave it empty. A partition added does not make anything be read again.
#[test]
fn truncate_or_a_recreated_partition_makes_the_next_run_read_the_files_again() {
    let c = Cluster::start("ledger_truncate", "store.workers = 1");
    let dir = readable_dir(&c.dir.join("in"));
    words(&dir, 4, 500);
    let d = dir.display();
    q(&c, "CREATE TABLE t (line text PRIMARY KEY)");
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "0 2000 0");
    q(&c, "TRUNCATE t");
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "0 2000 0", "the files were skipped after TRUNCATE");
    assert_eq!(num(&c, "SELECT count(*) FROM t"), 2000);
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "4 0 0", "an unchanged table skips them again");

    // The default target.
    run(&c, &format!("'{d}'"));
    q(&c, "TRUNCATE store.lines");
    let job = run(&c, &format!("'{d}'"));
    assert_eq!(skipped_inserted_present(&c, job), "0 2000 0");

    // Hash partitions: one dropped and created again loses its rows; the next run reads
    // every file, finds the other partition's lines present, and fills the new one.
    q(
        &c,
        "CREATE TABLE h (line text PRIMARY KEY) PARTITION BY HASH (line); \
         CREATE TABLE h0 PARTITION OF h FOR VALUES WITH (MODULUS 2, REMAINDER 0); \
         CREATE TABLE h1 PARTITION OF h FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
    );
    run(&c, &format!("'{d}', 'h'"));
    let in_h1 = num(&c, "SELECT count(*) FROM h1");
    q(&c, "DROP TABLE h1; CREATE TABLE h1 PARTITION OF h FOR VALUES WITH (MODULUS 2, REMAINDER 1)");
    let job = run(&c, &format!("'{d}', 'h'"));
    assert_eq!(skipped_inserted_present(&c, job), format!("0 {in_h1} {}", 2000 - in_h1));
    assert_eq!(num(&c, "SELECT count(*) FROM h"), 2000);

    // Range partitions with a default: a partition added (for lines none of the files
    // holds) takes nothing away, and the files stay skipped.
    q(
        &c,
        "CREATE TABLE r (line text PRIMARY KEY) PARTITION BY RANGE (line); \
         CREATE TABLE r_am PARTITION OF r FOR VALUES FROM (MINVALUE) TO ('n'); \
         CREATE TABLE r_rest PARTITION OF r DEFAULT",
    );
    run(&c, &format!("'{d}', 'r'"));
    q(&c, "CREATE TABLE r_tilde PARTITION OF r FOR VALUES FROM ('~') TO (MAXVALUE)");
    let job = run(&c, &format!("'{d}', 'r'"));
    assert_eq!(skipped_inserted_present(&c, job), "4 0 0");
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(
        log.contains("was truncated, rewritten or lost a partition since files were ingested into it"),
        "not logged"
    );
}

/// A `TRUNCATE` while a job inserts removes what it removes; the job's files must then stay
/// out of the ledger, so that the next run completes the table.
#[test]
fn a_truncate_during_a_job_keeps_its_files_out_of_the_ledger() {
    let c =
        Cluster::start("ledger_truncate_mid", "store.workers = 1\nstore.batch_max = 1000\nstore.insert_workers = 1");
    let (dir, want) = fixtures(&c, "big", &GenSpec { files: 2, size: 8 << 20, seed: 41, ..GenSpec::default() });
    q(&c, "CREATE TABLE t (line text NOT NULL); CREATE UNIQUE INDEX ON t (store.line_key(line))");
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_mid_insert(job);
    q(&c, "TRUNCATE t");
    c.wait_done(job);
    assert_eq!(num(&c, &format!("SELECT count(*) FROM store.ingested WHERE job = {job}")), 0);
    let again = run(&c, &format!("'{}', 't'", dir.display()));
    assert_eq!(q(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {again}")), "0");
    assert_eq!(c.table_sha("t", "line"), want.sha256);
}

/// Rows removed by `DELETE` are the user's decision (the ledger cannot see them);
/// `store_forget` makes the next run read the files again — every file of a target, one
/// file, or a directory — and only the ledger rows its caller sees.
#[test]
fn store_forget_makes_the_next_run_read_files_again() {
    let c = Cluster::start("ledger_forget", "store.workers = 1");
    let dir = readable_dir(&c.dir.join("in"));
    words(&dir, 3, 100);
    let d = dir.display();
    q(&c, "CREATE TABLE t (line text PRIMARY KEY); CREATE ROLE loader LOGIN IN ROLE pg_read_server_files; GRANT INSERT, SELECT ON t TO loader");
    run(&c, &format!("'{d}', 't'"));
    q(&c, "DELETE FROM t");
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "3 0 0", "DELETE is not a change the ledger follows");
    assert_eq!(c.psql_as("loader", "SELECT store_forget('t')").unwrap(), "0", "another role's rows");
    assert_eq!(q(&c, &format!("SELECT store_forget('t', '{d}/w1.txt')")), "1");
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "2 100 0");
    assert_eq!(q(&c, &format!("SELECT store_forget('t', '{d}')")), "3");
    assert_eq!(q(&c, "SELECT store_forget('t')"), "0");
    let job = run(&c, &format!("'{d}', 't'"));
    assert_eq!(skipped_inserted_present(&c, job), "0 200 100");
    assert_eq!(num(&c, "SELECT count(*) FROM t"), 300);
}

/// A run adds a row to `store.files` per file it reads, fails or passes over in the
/// listing, and none for the files the ledger skips: a scheduled run over 100,000 unchanged
/// files must not add 100,000 rows each time.
#[test]
fn a_rerun_over_an_unchanged_directory_adds_no_row_per_file() {
    let c = Cluster::start("ledger_bounded", "store.workers = 1");
    let dir = readable_dir(&c.dir.join("in"));
    words(&dir, 300, 3);
    fs::write(dir.join(".hidden.tmp"), "half written\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link.txt")).unwrap();
    let d = dir.display();
    let first = run(&c, &format!("'{d}'"));
    assert_eq!(num(&c, &format!("SELECT count(*) FROM store.files WHERE job = {first} AND state = 'done'")), 300);
    // What the listing passed over is there, with why.
    assert_eq!(
        q(&c, &format!("SELECT string_agg(pg_catalog.regexp_replace(path, '.*/', '') || ': ' || error, '; ' ORDER BY path) FROM store.files WHERE job = {first} AND state = 'skipped'")),
        ".hidden.tmp: hidden: its name starts with '.'; link.txt: a symbolic link"
    );
    let rows = num(&c, "SELECT count(*) FROM store.files");
    for _ in 0..3 {
        let job = run(&c, &format!("'{d}'"));
        assert_eq!(q(&c, &format!("SELECT files_skipped FROM store.status WHERE id = {job}")), "300");
        assert_eq!(num(&c, &format!("SELECT count(*) FROM store.files WHERE job = {job}")), 2, "rows per re-run");
    }
    assert_eq!(num(&c, "SELECT count(*) FROM store.files"), rows + 6);
}

/// A job follows the table it was given: with the target renamed during the job and a new
/// table created under its old name, the rest of its lines go into the renamed table, not
/// the new one, and a re-run into the renamed one skips every file.
#[test]
fn a_job_writes_into_the_table_it_was_given_whatever_is_renamed() {
    let c = Cluster::start("ledger_rename", "store.workers = 1\nstore.batch_max = 1000\nstore.insert_workers = 1");
    let (dir, want) = fixtures(&c, "big", &GenSpec { files: 2, size: 8 << 20, seed: 42, ..GenSpec::default() });
    q(&c, "CREATE TABLE t15 (line text PRIMARY KEY)");
    let job = c.ingest(&format!("'{}', 't15'", dir.display()));
    c.wait_mid_insert(job);
    q(&c, "BEGIN; ALTER TABLE t15 RENAME TO t15_old; CREATE TABLE t15 (line text PRIMARY KEY); COMMIT");
    c.wait_done(job);
    assert_eq!(num(&c, "SELECT count(*) FROM t15"), 0, "lines went into the table that took the name");
    assert_eq!(c.table_sha("t15_old", "line"), want.sha256);
    assert_eq!(q(&c, &format!("SELECT target::text FROM store.status WHERE id = {job}")), "t15_old");
    let again = run(&c, &format!("'{}', 't15_old'", dir.display()));
    assert_eq!(skipped_inserted_present(&c, again), "2 0 0");
}

/// The counters of `job` that must not depend on how the job got to its end.
fn counters(c: &Cluster, job: i64) -> String {
    q(
        c,
        &format!(
            "SELECT concat_ws(' ', 'records', records, 'empty', empty, 'rejected', rejected, 'filtered', filtered, \
                    'duplicates', duplicates, 'inserted', inserted, 'already_present', already_present, \
                    'files_done', files_done, 'files_skipped', files_skipped) FROM store.status WHERE id = {job}"
        ),
    )
}

/// Every counter of a job killed mid-insert — the worker, then an inserter — equals an
/// uninterrupted run's (how the job got to its end does not show in what it reports), and
/// the LOG line of the job says what `store.status` says.
#[test]
fn every_counter_after_a_kill_9_equals_an_uninterrupted_runs() {
    let c = Cluster::start(
        "ledger_counters",
        "store.workers = 1\nstore.batch_max = 2000\nstore.insert_workers = 2\nstore.compact_index = off",
    );
    let (dir, _) =
        fixtures(&c, "big", &GenSpec { files: 4, size: 8 << 20, seed: 43, nasty: true, ..GenSpec::default() });
    let args = |t: &str| format!("'{}', '{t}', filter => 'exclude=^a'", dir.display());
    q(&c, "CREATE TABLE calm (line text UNIQUE); CREATE TABLE killed (line text UNIQUE); CREATE TABLE killed2 (line text UNIQUE)");
    let calm = run(&c, &args("calm"));
    let want = counters(&c, calm);
    assert!(
        !want.contains("duplicates 0 ") && !want.contains("rejected 0 ") && !want.contains("filtered 0 "),
        "{want}"
    );
    for (table, kind) in [("killed", "worker"), ("killed2", "inserter")] {
        let job = c.ingest(&args(table));
        c.wait_until(
            &format!(
                "SELECT EXISTS (SELECT FROM store.workers WHERE kind = '{kind}' AND job = {job}) \
                 AND (SELECT inserted > 20000 FROM store.status WHERE id = {job})"
            ),
            Duration::from_secs(180),
        );
        let pid: i32 = q(&c, &format!("SELECT pid FROM store.workers WHERE kind = '{kind}' AND job = {job}"))
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        kill_9(pid);
        c.wait_done(job);
        assert_eq!(counters(&c, job), want, "job {job} after a kill -9 of its {kind}");
        assert_eq!(c.table_sha(table, "line"), c.table_sha("calm", "line"));
        let line = q(
            &c,
            &format!(
                "SELECT format('pg_store job %s done: %s files read, %s skipped, %s failed; %s records, %s inserted, \
                        %s already present, %s duplicates, %s rejected, %s filtered;', id, files_done, files_skipped, \
                        files_failed, records, inserted, already_present, duplicates, rejected, filtered) \
                 FROM store.status WHERE id = {job}"
            ),
        );
        let log = fs::read_to_string(c.dir.join("log")).unwrap();
        assert!(log.contains(&line), "the LOG line of job {job} is not {line:?}");
    }
}

/// The ledger holds the spec that decided a file's lines (column, filter, mode, limits) and
/// skips the file only for the same spec: ingested into the same table with another filter,
/// column, mode or limit, the file has other lines to give. Dropping a table takes its
/// ledger rows with it.
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
    c.reload("ALTER SYSTEM SET store.max_line_bytes = 9");
    assert_eq!(run("'two', 'b'"), "0 0", "another length limit reads it again (and finds nothing new)");
    // Dropping a table takes its ledger rows with it.
    q(&c, "DROP TABLE two");
    assert_eq!(num(&c, "SELECT count(*) FROM store.ingested WHERE target::oid NOT IN (SELECT oid FROM pg_class)"), 0);
}

/// A file rewritten in the middle, its old size and mtime put back, is read again: size,
/// mtime and a fingerprint of both ends alone would have it skipped for ever.
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
