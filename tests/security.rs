//! Who may ingest what and see whose jobs: `pg_read_server_files` and
//! `store.allowed_dirs` (links and `..` out of it included), checked at queueing and
//! again by the worker; a role sees, waits for and cancels its own jobs only; advisory
//! locks a user takes stall nothing. And who pg_store acts as, against roles that try to
//! borrow someone else's privileges: the owner of a target table whose code would run
//! when a superuser's or a `pg_read_server_files` member's job fills it, an OS user
//! sharing the temporary directory, a role watching `store.workers`, a process that
//! inherits a PID `store_cancel` collected. Needs `make install`.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{big_fixture, num, q, readable_dir, Cluster};

/// Every kind of code a table can carry, attached by its owner `plain` (a login with no
/// privileges) to a table of its own that it lets everyone fill. Each calls
/// `plain_s.spy(kind)`, which records who it runs as and, run as a superuser, makes
/// `plain` one (with `pg_read_server_files`, it would read a server file). Returns
/// (kind, table) pairs; the spy's trace is `public.trace`.
fn plant(c: &Cluster) -> Vec<(&'static str, String)> {
    q(
        c,
        "CREATE ROLE plain LOGIN; CREATE ROLE reader LOGIN IN ROLE pg_read_server_files; \
         CREATE TABLE public.trace (kind text, who name, super boolean, reads_files boolean); \
         GRANT INSERT, SELECT ON public.trace TO PUBLIC; \
         CREATE SCHEMA plain_s AUTHORIZATION plain; GRANT USAGE ON SCHEMA plain_s TO PUBLIC",
    );
    c.psql_script(
        "plain",
        r#"
        CREATE FUNCTION plain_s.spy(kind text) RETURNS boolean LANGUAGE plpgsql AS $$
        DECLARE s boolean := (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user);
        BEGIN
            INSERT INTO public.trace VALUES (kind, current_user, s,
                pg_catalog.pg_has_role(current_user, 'pg_read_server_files', 'USAGE'));
            IF s THEN EXECUTE 'ALTER ROLE plain SUPERUSER'; END IF;
            RETURN true;
        END $$;
        -- What an immutable context (an index, a generated column, a domain) may call: a
        -- volatile function called from it runs with its own volatility.
        CREATE FUNCTION plain_s.spy_imm(kind text, v text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN PERFORM plain_s.spy(kind); RETURN v; END $$;
        CREATE FUNCTION plain_s.spy_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM plain_s.spy(TG_ARGV[0]); RETURN NEW; END $$;
        CREATE DOMAIN plain_s.dline AS text CHECK (plain_s.spy_imm('domain', VALUE) IS NOT NULL);

        CREATE TABLE plain_s.t_before (line text UNIQUE);
        CREATE TRIGGER t BEFORE INSERT ON plain_s.t_before FOR EACH ROW EXECUTE FUNCTION plain_s.spy_trigger('before row trigger');
        CREATE TABLE plain_s.t_after (line text UNIQUE);
        CREATE TRIGGER t AFTER INSERT ON plain_s.t_after FOR EACH ROW EXECUTE FUNCTION plain_s.spy_trigger('after row trigger');
        CREATE TABLE plain_s.t_statement (line text UNIQUE);
        CREATE TRIGGER t AFTER INSERT ON plain_s.t_statement FOR EACH STATEMENT EXECUTE FUNCTION plain_s.spy_trigger('statement trigger');
        CREATE TABLE plain_s.t_rule (line text UNIQUE);
        CREATE RULE r AS ON INSERT TO plain_s.t_rule DO ALSO SELECT plain_s.spy('rule');
        CREATE TABLE plain_s.t_default (line text UNIQUE, extra text DEFAULT plain_s.spy_imm('column default', 'x'));
        CREATE TABLE plain_s.t_generated (line text UNIQUE, g text GENERATED ALWAYS AS (plain_s.spy_imm('generated column', line)) STORED);
        CREATE TABLE plain_s.t_domain (line plain_s.dline UNIQUE);
        CREATE TABLE plain_s.t_check (line text UNIQUE CHECK (plain_s.spy('check constraint')));
        CREATE TABLE plain_s.t_index (line text UNIQUE);
        CREATE INDEX ON plain_s.t_index (plain_s.spy_imm('index expression', line));
        CREATE TABLE plain_s.t_predicate (line text UNIQUE);
        CREATE INDEX ON plain_s.t_predicate (line) WHERE plain_s.spy_imm('index predicate', line) IS NOT NULL;
        CREATE TABLE plain_s.t_partitioned (line text PRIMARY KEY) PARTITION BY HASH (line);
        CREATE TABLE plain_s.t_part0 PARTITION OF plain_s.t_partitioned FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE plain_s.t_part1 PARTITION OF plain_s.t_partitioned FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        CREATE TRIGGER t BEFORE INSERT ON plain_s.t_part1 FOR EACH ROW EXECUTE FUNCTION plain_s.spy_trigger('partition trigger');
        CREATE TABLE plain_s.t_policy (line text UNIQUE);
        ALTER TABLE plain_s.t_policy ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
        CREATE POLICY r ON plain_s.t_policy FOR SELECT USING (true);
        CREATE POLICY w ON plain_s.t_policy FOR INSERT WITH CHECK (plain_s.spy('row-level security policy'));
        GRANT INSERT, SELECT ON ALL TABLES IN SCHEMA plain_s TO PUBLIC;
        "#,
    )
    .unwrap();
    [
        "before row trigger",
        "after row trigger",
        "statement trigger",
        "rule",
        "column default",
        "generated column",
        "domain",
        "check constraint",
        "index expression",
        "index predicate",
        "partition trigger",
        "row-level security policy",
    ]
    .iter()
    .zip([
        "t_before",
        "t_after",
        "t_statement",
        "t_rule",
        "t_default",
        "t_generated",
        "t_domain",
        "t_check",
        "t_index",
        "t_predicate",
        "t_partitioned",
        "t_policy",
    ])
    .map(|(k, t)| (*k, format!("plain_s.{t}")))
    .collect()
}

/// Every kind of code a table carries runs as the table's owner (in a security-restricted
/// operation), for a superuser's job and for a reader's, on the COPY path (an empty table),
/// the look-up path and the INSERT path (a table half filled, a table with a rule): with
/// the job owner's privileges, a trigger of a plain role's table would make the plain role
/// a superuser when a superuser's job filled it, and read server files under a
/// `pg_read_server_files` member's job. And the target stays usable: every job ends done
/// and exact.
#[test]
fn a_targets_code_never_runs_with_the_job_owners_privileges() {
    let c = Cluster::start("owner_code", "store.workers = 4");
    let kinds = plant(&c);
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\ntwo\nthree\n").unwrap();
    let more = readable_dir(&c.dir.join("more"));
    fs::write(more.join("b.txt"), "three\nfour\nfive\n").unwrap();
    for (who, dir) in [("postgres", &dir), ("reader", &more), ("postgres", &more), ("reader", &dir)] {
        let mut jobs = Vec::new();
        for (kind, t) in &kinds {
            let id = c.psql_script(
                who,
                &format!("\\set VERBOSITY verbose\nSELECT store_ingest('{}', '{t}');", dir.display()),
            );
            if who == "reader" && *kind == "row-level security policy" {
                // Its policies would apply to the reader, and they are the owner's code:
                // refused, since they cannot be applied as anyone but the caller.
                let e = id.expect_err("a reader's job into a table whose policies apply to it");
                assert!(e.contains("row-level security") && e.contains("42501"), "{e}");
                continue;
            }
            jobs.push((*kind, id.unwrap_or_else(|e| panic!("{who} into {t}: {e}")).parse::<i64>().unwrap()));
        }
        for (kind, job) in jobs {
            let s = c.wait_state(job, &["done", "failed"], Duration::from_secs(120));
            let error = q(&c, &format!("SELECT coalesce(error, '') FROM store.jobs WHERE id = {job}"));
            assert_eq!(s, "done", "{who}'s job {job} into the table with a {kind}: {error}");
        }
        let borrowed = q(
            &c,
            "SELECT string_agg(DISTINCT kind || ' as ' || who || CASE WHEN super THEN ' (superuser)' ELSE '' END, '; ') \
             FROM public.trace WHERE who <> 'plain'",
        );
        assert_eq!(borrowed, "", "after {who}'s jobs, the tables' code ran with other roles' privileges");
    }
    for (kind, t) in &kinds {
        assert_eq!(
            q(&c, &format!("SELECT string_agg(line::text, ',' ORDER BY line) FROM {t}")),
            "five,four,one,three,two",
            "{t}"
        );
        let ran_as = q(&c, &format!("SELECT string_agg(DISTINCT who, ',') FROM public.trace WHERE kind = '{kind}'"));
        assert_eq!(ran_as, "plain", "the {kind} of {t} ran as {ran_as:?}, not only as the table's owner");
    }
    assert_eq!(num(&c, "SELECT count(*) FROM public.trace WHERE super OR reads_files"), 0);
    assert_eq!(q(&c, "SELECT rolsuper FROM pg_roles WHERE rolname = 'plain'"), "f");
}

/// An unprivileged OS user of this host, created once: the one who shares `/tmp`.
fn attacker() -> &'static str {
    const NAME: &str = "pg_store_attacker";
    let exists = std::process::Command::new("id").arg(NAME).output().is_ok_and(|o| o.status.success());
    if !exists {
        let out = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NAME])
            .output()
            .expect("run useradd");
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
            "useradd {NAME}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    NAME
}

/// Run a shell command as the attacker.
fn as_attacker(script: &str) {
    let out = std::process::Command::new("runuser")
        .args(["-u", attacker(), "--", "sh", "-c", script])
        .output()
        .expect("runuser");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// With `store.temp_dir` in a world-writable sticky directory (a `/tmp`), another OS user
/// may pre-create the next job's directory with a link where a run file would go, for the
/// job to write through it over a file of the server's user. A job's directory is created
/// exclusively under a name with a random part (what another user made is neither used
/// nor able to keep the job from running), a `store.temp_dir` with a directory above it
/// that others may rename things in is refused, and the server removes only directories
/// it made.
#[test]
fn the_temporary_directory_trusts_nothing_another_os_user_put_there() {
    let c = Cluster::start("temp_attack", "store.workers = 1");
    let shared = c.dir.join("shared-tmp");
    fs::create_dir_all(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    c.reload(&format!("ALTER SYSTEM SET store.temp_dir = '{}'", shared.display()));
    let input = readable_dir(&c.dir.join("in"));
    fs::write(input.join("a.txt"), "secret line one\nsecret line two\n").unwrap();
    // A file of the server's OS user that must not be touched.
    let victim = c.dir.join("victim");
    fs::write(&victim, "the server's own data\n").unwrap();
    std::os::unix::fs::chown(&victim, Some(uid_of("postgres")), None).unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let db: u32 = num(&c, "SELECT oid FROM pg_database WHERE datname = current_database()") as u32;
    let first = c.ingest(&format!("'{}'", input.display()));
    c.wait_done(first);
    // The next job's directory, made by the attacker, with links where runs and a
    // manifest go.
    let next = first + 1;
    let dir = shared.join(format!("job-{db}-{next}"));
    as_attacker(&format!(
        "mkdir -m 0777 {d} && for f in run-000000.run run-000001.run manifest.json; do ln -s {v} {d}/$f; done",
        d = dir.display(),
        v = victim.display()
    ));
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    let job = c.ingest(&format!("'{}', 't'", input.display()));
    assert_eq!(job, next);
    let s = c.wait_state(job, &["done", "failed"], Duration::from_secs(60));
    let error = q(&c, &format!("SELECT coalesce(sqlstate || ' ' || error, '') FROM store.jobs WHERE id = {job}"));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "the server's own data\n", "written through the attacker's link");
    // The job's directory has a name nobody could guess: the attacker's is not used, and
    // cannot keep the job from running either.
    assert_eq!(s, "done", "{error}");
    assert_eq!(num(&c, "SELECT count(*) FROM t"), 2);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 3, "the job wrote into the attacker's directory");
    assert!(dir.exists(), "the attacker's directory is not pg_store's to remove");
    // A temporary directory inside one the attacker owns: the attacker could swap it (or
    // the job's) between two opens. Refused, naming the directory.
    let theirs = shared.join("theirs");
    as_attacker(&format!("mkdir -m 0755 {}", theirs.display()));
    let inside = theirs.join("runs");
    fs::create_dir(&inside).unwrap();
    std::os::unix::fs::chown(&inside, Some(uid_of("postgres")), None).unwrap();
    fs::set_permissions(&inside, fs::Permissions::from_mode(0o700)).unwrap();
    q(&c, &format!("ALTER SYSTEM SET store.temp_dir = '{}'", inside.display()));
    q(&c, "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(1500));
    let error = c.psql(&format!("SELECT store_ingest('{}', 't')", input.display())).unwrap_err();
    assert!(
        error.contains("store.temp_dir cannot hold a job's files")
            && error.contains(&theirs.display().to_string())
            && error.contains("owned by uid"),
        "{error}"
    );
    q(&c, &format!("ALTER SYSTEM SET store.temp_dir = '{}'", shared.display()));
    q(&c, "SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(1500));
    // A temporary directory others may write to without the sticky bit: refused by
    // store_ingest, and by the worker if it became so after the job was queued.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let error = c.psql(&format!("SELECT store_ingest('{}', 't')", input.display())).unwrap_err();
    assert!(error.contains("store.temp_dir cannot hold a job's files") && error.contains("sticky"), "{error}");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let mut session = c.session("postgres");
    let mut stdin = session.stdin.take().unwrap();
    writeln!(stdin, "BEGIN; SELECT store_ingest('{}', 't');", input.display()).unwrap();
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE '%store_ingest%')",
        Duration::from_secs(30),
    );
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    writeln!(stdin, "COMMIT;").unwrap();
    drop(stdin);
    session.wait().unwrap();
    let job = num(&c, "SELECT max(id) FROM store.jobs");
    assert_eq!(c.wait_state(job, &["done", "failed"], Duration::from_secs(60)), "failed");
    let error = q(&c, &format!("SELECT sqlstate || ' ' || error FROM store.jobs WHERE id = {job}"));
    assert!(error.starts_with("42501 ") && error.contains("sticky"), "{error}");
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    // Names the launcher and workers clean up (0.1.0's job-<id>, this database's
    // job-<db>-<id> of a job no longer open), made by the attacker: left alone at a restart.
    let legacy = shared.join("job-7");
    let orphan = shared.join(format!("job-{db}-{first}"));
    as_attacker(&format!(
        "mkdir -m 0755 {l} {o} && echo mine > {l}/f && echo mine > {o}/f",
        l = legacy.display(),
        o = orphan.display()
    ));
    c.stop_fast();
    c.pg_ctl_start();
    let job = c.ingest(&format!("'{}', 't'", input.display()));
    c.wait_done(job);
    assert_eq!(num(&c, "SELECT count(*) FROM t"), 2);
    assert!(legacy.join("f").exists() && orphan.join("f").exists(), "removed another user's directories");
}

fn uid_of(user: &str) -> u32 {
    let out = std::process::Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `store.workers` shows other roles' busy workers, with their timestamps, only to roles
/// with the privileges of `pg_read_all_stats` (as `pg_stat_activity` does); any other role
/// sees the launcher, idle workers and the processes of its own jobs.
#[test]
fn store_workers_shows_other_roles_work_only_to_pg_read_all_stats() {
    let c = Cluster::start("workers_view", "store.workers = 2\nstore.insert_workers = 1\nstore.batch_max = 500");
    let (dir, _) =
        common::fixtures(&c, "big", &store_testkit::GenSpec { files: 2, size: 8 << 20, seed: 5, ..Default::default() });
    q(&c, "CREATE ROLE nobody LOGIN; CREATE ROLE watcher LOGIN IN ROLE pg_read_all_stats; CREATE TABLE t (line text UNIQUE)");
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_mid_insert(job);
    let busy = |role: &str| c.psql_as(role, "SELECT count(*) FROM store.workers WHERE state = 'busy'").unwrap();
    let seen = |role: &str| c.psql_as(role, &format!("SELECT count(*) FROM store.workers WHERE job = {job}")).unwrap();
    assert_eq!((busy("nobody").as_str(), seen("nobody").as_str()), ("0", "0"), "another role's busy worker shown");
    assert_eq!(c.psql_as("nobody", "SELECT count(*) FROM store.workers WHERE kind = 'launcher'").unwrap(), "1");
    assert_eq!((busy("watcher").as_str(), seen("watcher").as_str()), ("1", "1"));
    assert_eq!((busy("postgres").as_str(), seen("postgres").as_str()), ("1", "1"));
    q(&c, &format!("SELECT store_cancel({job})"));
    c.wait_state(job, &["cancelled"], Duration::from_secs(60));
}

/// `store_cancel` signals the processes working on the job at its commit: PIDs collected
/// before the commit and signalled after could by then belong to an unrelated process of
/// the server's OS user (a process that left the job in between, its PID reused), which
/// would get the SIGINT. The test makes that happen: an inserter of the job exits while the
/// cancel is uncommitted, and a `sleep` of the postgres user is started with its PID, which
/// must outlive the commit.
#[test]
fn store_cancel_never_signals_a_process_that_left_the_job() {
    let c = Cluster::start(
        "cancel_pid",
        "store.workers = 1\nstore.insert_workers = 2\nstore.compact_index = off\nstore.batch_max = 500",
    );
    let (dir, _) =
        common::fixtures(&c, "big", &store_testkit::GenSpec { files: 4, size: 8 << 20, seed: 6, ..Default::default() });
    q(&c, "CREATE TABLE t (line text UNIQUE)");
    let job = c.ingest(&format!("'{}', 't'", dir.display()));
    c.wait_until(
        &format!("SELECT EXISTS (SELECT FROM store.workers WHERE kind = 'inserter' AND job = {job}) AND (SELECT inserted > 1000 FROM store.status WHERE id = {job})"),
        Duration::from_secs(120),
    );
    let inserter: i32 =
        q(&c, &format!("SELECT pid FROM store.workers WHERE kind = 'inserter' AND job = {job}")).parse().unwrap();
    // The cancel, left uncommitted: the inserter's PID is among the job's processes now,
    // and must not be signalled at the commit, when it has left the job.
    let mut session = c.session("postgres");
    let stdin = session.stdin.as_mut().unwrap();
    std::io::Write::write_all(stdin, format!("BEGIN;\nSELECT store_cancel({job});\n").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The inserter leaves the job: its statements are cancelled until it gives up (its
    // retries spent, it records the failure of its range and exits).
    let t = std::time::Instant::now();
    while unsafe { libc::kill(inserter, 0) } == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "the inserter {inserter} did not exit");
        let _ = c.psql(&format!("SELECT pg_cancel_backend({inserter})"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut victim = spawn_with_pid(inserter, uid_of("postgres"));
    std::io::Write::write_all(session.stdin.as_mut().unwrap(), b"COMMIT;\n").unwrap();
    drop(session.stdin.take());
    session.wait().unwrap();
    // Cancelled, or failed for its range's failure: whichever the worker sees first.
    c.wait_state(job, &["cancelled", "failed"], Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let status = victim.try_wait().unwrap();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(status.is_none(), "the process that took the inserter's PID {inserter} was signalled: {status:?}");
}

/// A `sleep` running as `uid` whose PID is `pid` (free now): the kernel's next PID is
/// set through `/proc/sys/kernel/ns_last_pid` (root), or, where that cannot be written,
/// reached by starting short-lived processes until the PIDs come round.
fn spawn_with_pid(pid: i32, uid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let last = std::path::Path::new("/proc/sys/kernel/ns_last_pid");
    let pid_max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    for attempt in 0..2 * pid_max {
        let settable = fs::write(last, (pid - 1).to_string()).is_ok();
        let child = std::process::Command::new("sleep").arg("60").uid(uid).spawn().unwrap();
        if child.id() as i32 == pid {
            return child;
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        assert!(settable || attempt < pid_max, "could not start a process with PID {pid}");
    }
    panic!("could not start a process with PID {pid}");
}

/// The functions a user calls are in schema `store`, which only the extension's owner
/// may create objects in: overloads the database's owner plants in `public` for argument
/// types that match a call better (`public.store_wait(integer)` against a call
/// `store_wait(1)`) never catch a call of `store.ingest`, `store.wait`, `store.cancel`,
/// `store.purge`, `store.forget`.
#[test]
fn overloads_the_database_owner_plants_never_catch_calls_of_the_store_functions() {
    // (A setting of a library not loaded at start, spelt as the file may spell it.)
    let c = Cluster::start("api_overloads", "lock_timeout = '5s'\nPLpgSQL.Check_Asserts = off");
    q(&c, "CREATE ROLE dbowner LOGIN");
    q(&c, "CREATE DATABASE app OWNER dbowner");
    c.psql_in("app", "postgres", "CREATE EXTENSION pg_store").unwrap();
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\ntwo\n").unwrap();
    let planted = r#"
        CREATE TABLE public.hits (what text, who name DEFAULT current_user);
        GRANT INSERT, SELECT ON public.hits TO PUBLIC;
        CREATE FUNCTION public.store_wait(job integer) RETURNS SETOF store.status LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hits (what) VALUES ('store_wait(integer)');
              RETURN QUERY SELECT * FROM store.wait(job); END $$;
        CREATE FUNCTION public.store_cancel(job integer) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hits (what) VALUES ('store_cancel(integer)'); RETURN false; END $$;
        CREATE FUNCTION public.store_ingest(path text) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hits (what) VALUES ('store_ingest(text)'); RETURN 0; END $$;
        CREATE FUNCTION public.wait(job integer) RETURNS integer LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hits (what) VALUES ('wait(integer)'); RETURN 0; END $$;
        CREATE FUNCTION public.forget(target text) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.hits (what) VALUES ('forget(text)'); RETURN 0; END $$;
    "#;
    c.psql_in("app", "dbowner", planted).unwrap();
    // Schema store takes nothing from the database's owner.
    let e = c.psql_in(
        "app",
        "dbowner",
        "CREATE FUNCTION store.wait(job integer) RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    );
    assert!(e.as_ref().is_err_and(|e| e.contains("permission denied for schema store")), "{e:?}");
    let run = |sql: &str| c.psql_in("app", "postgres", sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let job: i64 = run(&format!("SELECT store.ingest('{}')", dir.display())).parse().unwrap();
    assert_eq!(run(&format!("SELECT state FROM store.wait({job})")), "done");
    run("SELECT store.cancel(1)");
    run("SELECT store.purge('100 years')");
    run("SELECT store.forget('store.lines')");
    assert_eq!(
        run("SELECT count(*) FROM public.hits"),
        "0",
        "a planted overload ran: {}",
        run("SELECT string_agg(what, ', ') FROM public.hits")
    );
    assert_eq!(run("SELECT count(*) FROM store.lines"), "2");

    // Settings the owner attaches to a database reach its worker's connection: a database
    // made read-only (and serializable) by its owner kept every job queued, the worker's
    // look for work failing. The worker pins its transactions read-write, read committed.
    // Its session user too: `session_authorization` made it the owner's role, which saw no
    // job (all queued for good). And identifier quoting: with every identifier quoted, the
    // index on store.line_key(line) was not found, and every job into store.lines failed.
    q(&c, "CREATE DATABASE ro OWNER dbowner");
    q(&c, "GRANT SET ON PARAMETER session_replication_role TO dbowner");
    c.psql_in("ro", "postgres", "CREATE EXTENSION pg_store").unwrap();
    c.psql_in(
        "ro",
        "dbowner",
        "DO $$ BEGIN END $$; ALTER DATABASE ro SET plpgsql.check_asserts = on; \
         ALTER DATABASE ro SET default_transaction_read_only = on; \
         ALTER DATABASE ro SET default_transaction_isolation = 'serializable'; \
         ALTER DATABASE ro SET default_transaction_deferrable = on; \
         ALTER DATABASE ro SET session_authorization = 'dbowner'; \
         ALTER DATABASE ro SET quote_all_identifiers = on; \
         ALTER DATABASE ro SET lock_timeout = '1ms'; \
         ALTER DATABASE ro SET enable_indexscan = off; \
         ALTER DATABASE ro SET transaction_read_only = on; \
         ALTER DATABASE ro SET session_replication_role = replica",
    )
    .unwrap();
    // The server's value is the one it loaded: an edit of its configuration file not yet
    // reloaded is not (nor is a setting of the database, whatever the file says).
    let mut conf = fs::OpenOptions::new().append(true).open(c.dir.join("data/postgresql.conf")).unwrap();
    conf.write_all(b"lock_timeout = '9s'\n").unwrap();
    // A serializable transaction open elsewhere in the cluster: a serializable, read-only,
    // deferrable first transaction of the worker would wait for it to end (so would this
    // test's own reads in `ro`, but for a superuser of its own that is not deferrable).
    q(&c, "CREATE ROLE watcher SUPERUSER LOGIN; ALTER ROLE watcher IN DATABASE ro SET default_transaction_deferrable = off");
    let ro = |sql: &str| c.psql_in("ro", "watcher", sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let done = |job: i64| {
        let t = Instant::now();
        loop {
            let state = ro(&format!("SELECT state FROM store.status WHERE id = {job}"));
            if state != "queued" && state != "running" {
                return state;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "job {job} still {state} after 60 s; log:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut holder = c.session("postgres");
    std::io::Write::write_all(
        holder.stdin.as_mut().unwrap(),
        b"BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT pg_catalog.txid_current();\n",
    )
    .unwrap();
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND state = 'idle in transaction')",
        Duration::from_secs(30),
    );
    let job: i64 = c
        .psql_in("ro", "postgres", &format!("BEGIN READ WRITE; SELECT store.ingest('{}'); COMMIT", dir.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(done(job), "done", "a job in a database its owner set read-only");
    assert_eq!(ro("SELECT count(*) FROM store.lines"), "2");
    // The owner's table sees the server's settings, not the database's.
    c.psql_in(
        "ro",
        "dbowner",
        "BEGIN READ WRITE; CREATE TABLE public.seen (what text); CREATE TABLE public.t (line text UNIQUE); \
         CREATE FUNCTION public.look() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO public.seen SELECT current_setting('lock_timeout') || ' ' || current_setting('enable_indexscan') \
             || ' ' || current_setting('transaction_isolation') || ' ' || current_setting('session_replication_role') \
             || ' ' || current_setting('plpgsql.check_asserts'); \
           RETURN NULL; END $$; \
         CREATE TRIGGER look AFTER INSERT ON public.t FOR EACH STATEMENT EXECUTE FUNCTION public.look(); COMMIT",
    )
    .unwrap();
    let job: i64 = c
        .psql_in(
            "ro",
            "postgres",
            &format!("BEGIN READ WRITE; SELECT store.ingest('{}', 'public.t'); COMMIT", dir.display()),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(done(job), "done");
    // (A trigger does not fire under `session_replication_role = replica`, a setting a
    // superuser granted the database's owner; PL/pgSQL takes the database's
    // `check_asserts` when it loads, after the worker connected.)
    assert_eq!(ro("SELECT DISTINCT what FROM public.seen"), "5s on read committed origin off");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn refusals_are_clear_and_failures_are_recorded() {
    let c = Cluster::start("refuse", "");
    let ok = readable_dir(&c.dir.join("ok"));
    fs::write(ok.join("a.txt"), "a\n").unwrap();
    let outside = readable_dir(&c.dir.join("outside"));
    fs::write(outside.join("b.txt"), "b\n").unwrap();

    q(&c, "CREATE ROLE plain LOGIN");
    let e = c.psql_as("plain", &format!("SELECT store_ingest('{}')", ok.display())).unwrap_err();
    assert!(e.contains("permission denied to ingest server files"), "{e}");

    c.reload(&format!("ALTER SYSTEM SET store.allowed_dirs = '{}'", ok.display()));
    let e = c.psql(&format!("SELECT store_ingest('{}')", outside.display())).unwrap_err();
    assert!(e.contains("is outside store.allowed_dirs"), "{e}");
    std::os::unix::fs::symlink(&outside, ok.join("link")).unwrap();
    let e = c.psql(&format!("SELECT store_ingest('{}/link/b.txt')", ok.display())).unwrap_err();
    assert!(e.contains("is outside store.allowed_dirs"), "{e}");
    let e = c.psql(&format!("SELECT store_ingest('{}/../outside')", ok.display())).unwrap_err();
    assert!(e.contains("is outside store.allowed_dirs"), "{e}");
    let e = c.psql_as("plain", "SET store.allowed_dirs = '/'").unwrap_err();
    assert!(e.contains("permission denied"), "{e}");
    // A store.temp_dir the server cannot make: refused when the job is asked for.
    c.reload("ALTER SYSTEM SET store.temp_dir = '/nonexistent-pg-store/runs'");
    let e = c.psql(&format!("SELECT store_ingest('{}')", ok.display())).unwrap_err();
    assert!(e.contains("store.temp_dir cannot hold a job's files") && e.contains("/nonexistent-pg-store/runs"), "{e}");
    c.reload("ALTER SYSTEM RESET store.temp_dir");

    let e = c.psql(&format!("SELECT store_ingest('{}/missing')", ok.display())).unwrap_err();
    assert!(e.contains("No such file or directory"), "{e}");

    // An unreadable file in a directory is recorded as failed with the OS error; the rest
    // is ingested and the job ends `partial`. A re-run after the fix reads only it.
    let locked = ok.join("locked.txt");
    fs::write(&locked, "secret\n").unwrap();
    fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let job = c.ingest(&format!("'{}'", ok.display()));
    assert_eq!(c.wait_state(job, &["done", "partial", "failed"], Duration::from_secs(60)), "partial");
    let err =
        q(&c, &format!("SELECT state || ': ' || error FROM store.files WHERE job = {job} AND path LIKE '%locked.txt'"));
    assert!(err.starts_with("failed: ") && err.contains("Permission denied"), "{err}");
    assert_eq!(q(&c, &format!("SELECT files_failed || ' ' || inserted FROM store.status WHERE id = {job}")), "1 1");
    fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let job = c.ingest(&format!("'{}'", ok.display()));
    c.wait_done(job);
    assert_eq!(q(&c, &format!("SELECT files_skipped || ' ' || inserted FROM store.status WHERE id = {job}")), "1 1");

    // The workers reload postgresql.conf on SIGHUP: a new limit applies to the next job.
    c.reload("ALTER SYSTEM SET store.max_line_bytes = 10");
    fs::write(ok.join("long.txt"), "short\nthis line is longer than ten bytes\n").unwrap();
    let job = c.ingest(&format!("'{}'", ok.display()));
    c.wait_done(job);
    assert_eq!(q(&c, &format!("SELECT reason FROM store.rejects WHERE job = {job}")), "too_long");
}

/// The worker checks again, when it starts a job, what store_ingest checked — the path
/// against store.allowed_dirs, the owner's right to insert and to read server files, and
/// that the target is still a table —, since each can change while the job waits in the
/// queue.
#[test]
fn the_worker_checks_again_what_was_checked_at_queueing() {
    let c = Cluster::start("recheck", "store.workers = 1\nstore.batch_max = 1000");
    let (busy, _) = big_fixture(&c);
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
        c.state_and_error(job)
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
        c.reload(&format!("ALTER SYSTEM SET store.allowed_dirs = '{}'", busy.display()))
    });
    assert!(s.starts_with("failed 42501 ") && s.contains("is outside store.allowed_dirs"), "{s}");
    c.reload("ALTER SYSTEM RESET store.allowed_dirs");
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

/// Cancelling and waiting only see the caller's own jobs.
#[test]
fn a_role_sees_and_cancels_only_its_own_jobs() {
    let c = Cluster::start("visibility", "store.workers = 1\nstore.batch_max = 1000");
    let (busy, _) = big_fixture(&c);
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

/// Whether a job's worker is alive is not told by advisory locks, which any role can take:
/// a role holding the keys of the next jobs stalls none of them.
#[test]
fn advisory_locks_taken_by_a_user_do_not_stall_jobs() {
    let c = Cluster::start("advlock", "");
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), "one\n").unwrap();
    q(&c, "CREATE ROLE nobody_special LOGIN");
    let next = num(&c, "SELECT last_value + 1 FROM store.jobs_id_seq");
    // Every advisory-lock key a job's liveness could be told by for the next jobs (the
    // job id as one 32-bit key, or as a pair under pg_store's prefix), held by an idle
    // session.
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

/// A superuser's job of 5,000 lines into `a.t`, whose owner's statement trigger records
/// each call in `a.calls` and then sleeps, catching every cancel, for as long as `a.hold`
/// has a row; returned once the job's worker sleeps in it.
fn stubborn_job(c: &Cluster) -> i64 {
    let dir = readable_dir(&c.dir.join("in"));
    fs::write(dir.join("a.txt"), (0..5000).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
    q(c, "CREATE ROLE alice LOGIN; CREATE SCHEMA a AUTHORIZATION alice");
    c.psql_as(
        "alice",
        "CREATE TABLE a.t (line text UNIQUE); CREATE TABLE a.hold (); INSERT INTO a.hold DEFAULT VALUES; \
         CREATE TABLE a.calls (at timestamptz DEFAULT now()); \
         CREATE FUNCTION a.stubborn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO a.calls DEFAULT VALUES; \
           LOOP EXIT WHEN NOT EXISTS (SELECT FROM a.hold); \
             BEGIN PERFORM pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN RAISE LOG 'stubborn: caught a cancel'; END; \
           END LOOP; RETURN NULL; END $$; \
         CREATE TRIGGER s AFTER INSERT ON a.t FOR EACH STATEMENT EXECUTE FUNCTION a.stubborn()",
    )
    .unwrap();
    let job = c.ingest(&format!("'{}', 'a.t'", dir.display()));
    c.wait_until(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'pg_store worker' AND wait_event = 'PgSleep')",
        Duration::from_secs(60),
    );
    job
}

/// A trigger of the target's owner that catches the cancel SIGTERM brings, and goes on,
/// cannot hold a fast shutdown up for good: once the grace is over the worker exits as a
/// client backend would (FATAL), the server stops, and after it starts again the job
/// (the trigger now letting it through) ends exact.
#[test]
fn a_target_owners_trigger_that_catches_the_cancel_cannot_hold_up_a_fast_shutdown() {
    let c = Cluster::start("stubborn", "store.batch_max = 500");
    let job = stubborn_job(&c);
    let t = Instant::now();
    c.stop_fast();
    assert!(t.elapsed() < Duration::from_secs(40), "the fast shutdown took {:?}", t.elapsed());
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains("stubborn: caught a cancel"), "{}", c.log_tail());
    assert!(log.contains("due to administrator command"), "{}", c.log_tail());
    c.pg_ctl_start();
    c.psql_as("alice", "DELETE FROM a.hold").unwrap();
    c.wait_done(job);
    assert_eq!(num(&c, "SELECT count(*) FROM a.t"), 5000);
    assert_eq!(q(&c, &format!("SELECT state || ' ' || inserted FROM store.status WHERE id = {job}")), "done 5000");
}

/// The same trigger against `store.cancel`: the job's owner cancels it, the trigger
/// catches the cancel and carries on; 10 s later its process ends, and the job ends
/// cancelled without running the trigger again.
#[test]
fn a_target_owners_trigger_that_catches_the_cancel_cannot_hold_up_store_cancel() {
    // One attempt: the process the grace ends must not be taken for a failed attempt.
    let c = Cluster::start(
        "stubborn-cancel",
        "store.batch_max = 500\nstore.max_attempts = 1\nmax_prepared_transactions = 2",
    );
    let job = stubborn_job(&c);
    // A plain pg_cancel_backend is caught and outlived: no grace for it. Nor for a
    // store.cancel a rollback to a savepoint undid (psql's ON_ERROR_ROLLBACK, a PL/pgSQL
    // exception block): it signals nothing.
    q(&c, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_store worker' AND wait_event = 'PgSleep'");
    q(&c, &format!("BEGIN; SAVEPOINT s; SELECT store.cancel({job}); ROLLBACK TO SAVEPOINT s; COMMIT"));
    q(
        &c,
        &format!(
            "BEGIN; SAVEPOINT a; SAVEPOINT b; SELECT store.cancel({job}); RELEASE SAVEPOINT b; ROLLBACK TO SAVEPOINT a; COMMIT"
        ),
    );
    // Nor one in a transaction that is prepared: its signal would go at the session's next commit.
    let e = c.psql(&format!("BEGIN; SELECT store.cancel({job}); PREPARE TRANSACTION 'p'")).unwrap_err();
    assert!(e.contains("cannot be prepared"), "{e}");
    q(&c, "BEGIN; SELECT 1; COMMIT");
    q(
        &c,
        &format!(
            "DO $$ BEGIN PERFORM store.cancel({job}); RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END $$"
        ),
    );
    assert_eq!(q(&c, &format!("SELECT cancel_requested FROM store.jobs WHERE id = {job}")), "f");
    std::thread::sleep(Duration::from_secs(13));
    assert_eq!(q(&c, &format!("SELECT state FROM store.status WHERE id = {job}")), "running");
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains("stubborn: caught a cancel"), "{}", c.log_tail());
    assert!(!log.contains("due to administrator command"), "{}", c.log_tail());
    let t = Instant::now();
    // A cancel that stays, though a subtransaction after it rolls back.
    q(
        &c,
        &format!(
            "DO $$ BEGIN PERFORM store.cancel({job}); \
               BEGIN RAISE EXCEPTION 'later'; EXCEPTION WHEN raise_exception THEN NULL; END; END $$"
        ),
    );
    c.wait_until(&format!("SELECT state = 'cancelled' FROM store.status WHERE id = {job}"), Duration::from_secs(60));
    assert!(t.elapsed() < Duration::from_secs(40), "the cancel took {:?}", t.elapsed());
    let log = fs::read_to_string(c.dir.join("log")).unwrap();
    assert!(log.contains("due to administrator command"), "{}", c.log_tail());
    // The trigger ran for the one batch the first claim began, and its rows went with it.
    assert_eq!(num(&c, "SELECT count(*) FROM a.calls"), 0);
    assert_eq!(num(&c, "SELECT count(*) FROM a.t"), 0);
    assert_eq!(
        q(&c, &format!("SELECT state || ' ' || inserted || ' ' || attempts FROM store.status WHERE id = {job}")),
        "cancelled 0 1"
    );
    // Its LOG line, written once the end committed.
    c.wait_log(&format!("pg_store job {job} cancelled"), Duration::from_secs(10));
    assert_eq!(num(&c, "SELECT count(*) FROM store.workers WHERE job IS NOT NULL"), 0);
}
