//! pg_store on a Citus cluster the tests start themselves: a coordinator and two workers
//! on 127.0.0.1, each with its own port and data directory, Citus and pg_store preloaded
//! everywhere. Distributed targets end exact with exact counts, long lines go through a
//! key column, crashes of the coordinator's worker, of the coordinator and of a worker
//! node mid-insert resume exactly, two nodes ingest their own files at once, and a job's
//! inserters stay within the connections the worker nodes accept.
//!
//! Needs Citus installed (`make test-citus` builds it from the tarball `CITUS_SRC` names,
//! or downloads the pinned release); without it every test says SKIPPED, and `make test`
//! prints why — except under CI, where a missing Citus fails them.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{fixtures, num, q, readable_dir, Cluster};
use store_testkit::{oracle, GenSpec};

/// Whether Citus is there to test against. Under CI (`CI` set) it must be: `make test`
/// builds it (`.ci/run` names the tarball), and a Citus test that skips there is a defect.
fn citus_installed() -> bool {
    let here = Path::new("/usr/lib/postgresql/15/lib/citus.so").exists();
    if !here {
        assert!(std::env::var_os("CI").is_none(), "CI runs the Citus tests, and Citus is not installed");
        println!(
            "SKIPPED: Citus is not installed in PostgreSQL 15 (make test-citus builds it: see tests/install-citus.sh)"
        );
    }
    here
}

/// A coordinator and two workers.
struct Citus {
    coord: Cluster,
    workers: Vec<Cluster>,
}

const NODE_CONF: &str = "listen_addresses = '127.0.0.1'\ncitus.node_conninfo = 'sslmode=disable'\n\
    citus.recover_2pc_interval = '2s'\nmax_prepared_transactions = 100\nmax_connections = 200\nstore.batch_max = 20000\n";

impl Citus {
    fn start(name: &str) -> Citus {
        Citus::start_with(name, "")
    }

    /// [`Citus::start`] with `conf` added to every node's settings.
    fn start_with(name: &str, conf: &str) -> Citus {
        let conf = format!("{NODE_CONF}{conf}");
        let node = |role: &str| Cluster::start_with(&format!("{name}-{role}"), "citus,pg_store", &conf, &["citus"]);
        let coord = node("coord");
        let workers = vec![node("w1"), node("w2")];
        q(&coord, &format!("SELECT citus_set_coordinator_host('127.0.0.1', {})", coord.port));
        for w in &workers {
            q(&coord, &format!("SELECT citus_add_node('127.0.0.1', {})", w.port));
        }
        // Created on the coordinator, propagated to the workers.
        q(&coord, "CREATE EXTENSION pg_store");
        for w in &workers {
            assert_eq!(
                q(w, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_store'"),
                "1",
                "pg_store propagated to the worker"
            );
        }
        Citus { coord, workers }
    }

    /// No prepared transaction left on any worker (Citus recovers those of a crash).
    fn no_prepared_transactions(&self) {
        for w in &self.workers {
            w.wait_until("SELECT count(*) = 0 FROM pg_prepared_xacts", Duration::from_secs(60));
        }
    }
}

#[test]
fn a_distributed_target_ends_exact_with_exact_counts() {
    if !citus_installed() {
        return;
    }
    let c = Citus::start("dist");
    let (dir, want) = fixtures(
        &c.coord,
        "in",
        &GenSpec { files: 3, size: 4 << 20, seed: 101, nasty: true, max_line_bytes: 1500, ..GenSpec::default() },
    );
    q(&c.coord, "CREATE TABLE dist (line text PRIMARY KEY); SELECT create_distributed_table('dist', 'line')");
    // Some of the lines are there already: the counts must say which.
    let (_, set) = store_testkit::oracle_set(&dir, 1500).unwrap();
    let present: Vec<String> = set.iter().step_by(50).map(|l| String::from_utf8(l.clone()).unwrap()).collect();
    for chunk in present.chunks(500) {
        let values = chunk.iter().map(|l| format!("($x${l}$x$)")).collect::<Vec<_>>().join(",");
        q(&c.coord, &format!("INSERT INTO dist VALUES {values}"));
    }
    c.coord.reload("ALTER SYSTEM SET store.max_line_bytes = 1500");
    let job = num(&c.coord, &format!("SELECT store_ingest('{}', 'dist')", dir.display()));
    c.coord.wait_done(job);
    assert_eq!(c.coord.table_sha("dist", "line"), want.sha256);
    let counts = q(&c.coord, &format!("SELECT inserted || ' ' || already_present FROM store.status WHERE id = {job}"));
    assert_eq!(
        counts,
        format!("{} {}", want.distinct as usize - present.len(), present.len()),
        "counts of rows inserted, not rows sent"
    );
    // At store.insert_workers' default (one per core) the coordinator shares this host's
    // cores with its two worker nodes: a third of them insert.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(q(&c.coord, &format!("SELECT ranges FROM store.jobs WHERE id = {job}")), (cores / 3).max(1).to_string());
    c.no_prepared_transactions();

    // A batch file cut short at a row's end: binary COPY takes it for a whole one and
    // reports fewer rows. Each such batch must be taken back and inserted again (on the
    // safe path), never counted as inserted: the table ends exact, and so do the counts.
    q(&c.coord, "CREATE TABLE short (line text PRIMARY KEY); SELECT create_distributed_table('short', 'line')");
    c.coord.reload("ALTER SYSTEM SET store.fault_injection = 'short_copy_file'");
    let job = num(&c.coord, &format!("SELECT store_ingest('{}', 'short')", dir.display()));
    c.coord.wait_done(job);
    c.coord.reload("ALTER SYSTEM RESET store.fault_injection");
    assert_eq!(c.coord.table_sha("short", "line"), want.sha256, "lines lost with the short batch files");
    let counts = q(&c.coord, &format!("SELECT inserted || ' ' || already_present FROM store.status WHERE id = {job}"));
    assert_eq!(counts, format!("{} 0", want.distinct));
    c.no_prepared_transactions();

    // A columnar target, which would work only while empty (then fail with XX000, retried
    // for a minute as if a node were down), is refused at the call.
    q(
        &c.coord,
        "CREATE EXTENSION IF NOT EXISTS citus_columnar; CREATE TABLE col (line text PRIMARY KEY) USING columnar; \
         SELECT create_distributed_table('col', 'line')",
    );
    let e = c.coord.psql(&format!("SELECT store_ingest('{}', 'col')", dir.display())).unwrap_err();
    assert!(e.contains("uses the table access method columnar"), "{e}");
    // On Citus too a target's code runs as its owner: a plain role's distributed table,
    // filled by a superuser's job as the table's owner (Citus lets only superusers COPY
    // from a file, so by INSERT), ends exact.
    q(
        &c.coord,
        "CREATE ROLE plain LOGIN; CREATE TABLE owned (line text PRIMARY KEY); ALTER TABLE owned OWNER TO plain; \
         SELECT create_distributed_table('owned', 'line')",
    );
    let job = num(&c.coord, &format!("SELECT store_ingest('{}', 'owned')", dir.display()));
    c.coord.wait_done(job);
    assert_eq!(c.coord.table_sha("owned", "line"), want.sha256);
    c.no_prepared_transactions();
}

/// Two jobs at once, six processes each, into tables of 32 shards, on worker nodes that
/// accept 40 connections: left to Citus, each process opens a connection per shard on
/// each node (16, Citus's default pool), 192 in all, and the nodes refuse connections
/// ("sorry, too many clients already"), batches retried. pg_store's processes share
/// half of what the nodes accept instead: no refused connection, no retried batch, and
/// both jobs are exact — also where the database sets Citus's polling interval to
/// twenty minutes, which the look at the nodes' `max_connections` would have waited.
#[test]
fn the_inserters_of_a_job_stay_within_the_connections_the_worker_nodes_accept() {
    if !citus_installed() {
        return;
    }
    let c = Citus::start_with(
        "conns",
        "max_connections = 40\nmax_worker_processes = 24\nstore.workers = 2\nstore.insert_workers = 6\n",
    );
    let (dir, want) = fixtures(&c.coord, "in", &GenSpec { files: 3, size: 4 << 20, seed: 103, ..GenSpec::default() });
    // A database owner's setting that made the look at the nodes' max_connections sleep
    // between polls for as long as it says, a slot of store.workers held all along.
    q(&c.coord, "ALTER DATABASE postgres SET citus.remote_task_check_interval = '20min'");
    q(
        &c.coord,
        "CREATE TABLE wide (line text PRIMARY KEY); SELECT create_distributed_table('wide', 'line', shard_count => 32); \
         CREATE TABLE wide2 (line text PRIMARY KEY); SELECT create_distributed_table('wide2', 'line', shard_count => 32)",
    );
    let jobs = q(
        &c.coord,
        &format!("SELECT store_ingest('{d}', 'wide') || ' ' || store_ingest('{d}', 'wide2')", d = dir.display()),
    );
    for (job, table) in jobs.split(' ').map(|j| j.parse::<i64>().unwrap()).zip(["wide", "wide2"]) {
        c.coord.wait_done(job);
        assert_eq!(c.coord.table_sha(table, "line"), want.sha256);
        assert_eq!(num(&c.coord, &format!("SELECT ranges FROM store.status WHERE id = {job}")), 6);
    }
    let coord_log = fs::read_to_string(c.coord.dir.join("log")).unwrap();
    assert!(!coord_log.contains("retrying a batch"), "batches were retried:\n{}", c.coord.log_tail());
    for w in &c.workers {
        let log = fs::read_to_string(w.dir.join("log")).unwrap();
        assert!(!log.contains("too many clients"), "a worker node refused connections:\n{}", w.log_tail());
    }
    c.no_prepared_transactions();
}

#[test]
fn long_lines_go_through_a_key_column_and_a_reference_table_works() {
    if !citus_installed() {
        return;
    }
    let c = Citus::start("key");
    // 64 KiB lines: the key column holds store.line_key(line), 33 bytes for them.
    let (dir, want) =
        fixtures(&c.coord, "in", &GenSpec { files: 2, size: 2 << 20, seed: 102, nasty: true, ..GenSpec::default() });
    q(&c.coord, "CREATE TABLE keyed (line text NOT NULL, key bytea PRIMARY KEY); SELECT create_distributed_table('keyed', 'key')");
    let job = num(&c.coord, &format!("SELECT store_ingest('{}', 'keyed', key_column => 'key')", dir.display()));
    c.coord.wait_done(job);
    assert_eq!(c.coord.table_sha("keyed", "line"), want.sha256);
    assert!(num(&c.coord, "SELECT max(octet_length(line)) FROM keyed") > 60_000, "the long lines are in");
    assert_eq!(num(&c.coord, "SELECT count(*) FROM keyed WHERE key <> store.line_key(line)"), 0);
    assert_eq!(num(&c.coord, &format!("SELECT inserted FROM store.status WHERE id = {job}")), want.distinct as i64);
    // The same again: every line already there, none twice.
    q(&c.coord, "DELETE FROM store.ingested");
    let again = num(&c.coord, &format!("SELECT store_ingest('{}', 'keyed', key_column => 'key')", dir.display()));
    c.coord.wait_done(again);
    assert_eq!(
        q(&c.coord, &format!("SELECT inserted || ' ' || already_present FROM store.status WHERE id = {again}")),
        format!("0 {}", want.distinct)
    );
    // A reference table (a copy on every node) takes lines too.
    q(&c.coord, "CREATE TABLE everywhere (line text NOT NULL, key bytea PRIMARY KEY); SELECT create_reference_table('everywhere')");
    let r = num(&c.coord, &format!("SELECT store_ingest('{}', 'everywhere', key_column => 'key')", dir.display()));
    c.coord.wait_done(r);
    assert_eq!(c.coord.table_sha("everywhere", "line"), want.sha256);
    c.no_prepared_transactions();
}

/// Start a job on a distributed table, do `interrupt` once it has committed some
/// batches, and check it ends exact, with no prepared transaction left behind.
fn interrupted(name: &str, interrupt: impl FnOnce(&Citus, i64)) {
    let c = Citus::start(name);
    let (dir, want) = fixtures(&c.coord, "in", &GenSpec { files: 4, size: 16 << 20, seed: 103, ..GenSpec::default() });
    q(&c.coord, "CREATE TABLE dist (line text PRIMARY KEY); SELECT create_distributed_table('dist', 'line')");
    let job = num(&c.coord, &format!("SELECT store_ingest('{}', 'dist')", dir.display()));
    c.coord.wait_mid_insert(job);
    interrupt(&c, job);
    c.coord.wait_done(job);
    assert_eq!(c.coord.table_sha("dist", "line"), want.sha256);
    assert_eq!(
        num(&c.coord, &format!("SELECT inserted + already_present FROM store.status WHERE id = {job}")),
        want.distinct as i64
    );
    c.no_prepared_transactions();
}

#[test]
fn kill_9_of_the_coordinators_worker_mid_insert_resumes_exact() {
    if !citus_installed() {
        return;
    }
    interrupted("ckill", |c, job| {
        c.coord.kill_worker(job);
    });
}

#[test]
fn an_immediate_stop_of_the_coordinator_mid_insert_resumes_exact() {
    if !citus_installed() {
        return;
    }
    interrupted("cstop", |c, _| {
        c.coord.stop_immediate();
        c.coord.pg_ctl_start();
    });
}

#[test]
fn an_immediate_stop_of_a_worker_node_mid_insert_resumes_exact() {
    if !citus_installed() {
        return;
    }
    interrupted("wstop", |c, _| {
        c.workers[0].stop_immediate();
        std::thread::sleep(Duration::from_secs(3));
        c.workers[0].pg_ctl_start();
    });
}

#[test]
fn two_nodes_ingest_their_own_files_into_one_table_at_once() {
    if !citus_installed() {
        return;
    }
    let c = Citus::start("hosts");
    let spec = |seed| GenSpec { files: 2, size: 4 << 20, seed, dup: 0.3, ..GenSpec::default() };
    let (a, _) = fixtures(&c.coord, "on-coordinator", &spec(104));
    let (b, _) = fixtures(&c.workers[0], "on-worker", &spec(105));
    let all = readable_dir(&c.coord.dir.join("all"));
    for (src, tag) in [(&a, "a"), (&b, "b")] {
        for e in fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), all.join(format!("{tag}-{}", e.file_name().to_string_lossy()))).unwrap();
        }
    }
    let want = oracle(&all, 65536).unwrap();
    q(&c.coord, "CREATE TABLE dist (line text PRIMARY KEY); SELECT create_distributed_table('dist', 'line')");
    // Each node runs its own job, on its own files, into the same distributed table.
    let ja = num(&c.coord, &format!("SELECT store_ingest('{}', 'dist')", a.display()));
    let jb = num(&c.workers[0], &format!("SELECT store_ingest('{}', 'dist')", b.display()));
    c.coord.wait_done(ja);
    c.workers[0].wait_done(jb);
    assert_eq!(c.coord.table_sha("dist", "line"), want.sha256, "one table, the union, each line once");
    let inserted = num(&c.coord, &format!("SELECT inserted FROM store.status WHERE id = {ja}"))
        + num(&c.workers[0], &format!("SELECT inserted FROM store.status WHERE id = {jb}"));
    assert_eq!(inserted, want.distinct as i64, "every line inserted by exactly one of the jobs");
    // The coordinator sees every node's jobs through store.cluster_status.
    let seen = q(&c.coord, "SELECT count(*) FROM store.cluster_status() WHERE state = 'done'");
    assert_eq!(seen, "2");
    c.no_prepared_transactions();
}
