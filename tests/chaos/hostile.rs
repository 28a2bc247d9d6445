//! Hostile callers: roles that try to queue, read, write or cancel what is not theirs,
//! to borrow a superuser's identity or the worker's session, to spoof the catalogs, and
//! to lead a job out of `store.allowed_dirs`. Each attempt must be refused with the
//! expected SQLSTATE, or shown to come to nothing (no job queued, nothing read, nothing
//! run as a superuser).

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::common::readable_dir;
use crate::ctx::{Check, Ctx};
use crate::files::{slow_dir, wait_scanning};

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

/// What the attempts aim at, made by [`scene`].
struct Scene {
    /// `allowed/`, in `store.allowed_dirs`, as text: one file, a link out (`escape`) and a
    /// FIFO (`pipe`).
    o: String,
    /// A directory outside `store.allowed_dirs`, with a secret in it.
    outside: PathBuf,
    /// The FIFO in `allowed/`.
    fifo: PathBuf,
    /// The main data set, allowed too: some attempts need a long job.
    data: PathBuf,
    /// A superuser's job and one of chaos_reader's, both done.
    theirs: i64,
    readers: i64,
    /// How many jobs there were before the first attempt.
    jobs_before: i64,
}

pub fn hostile(x: &mut Ctx) {
    println!("chaos: hostile callers");
    let s = scene(x);
    refusals(x, &s);
    identity_borrowing(x, &s);
    catalog_spoofing(x, &s);
    target_turned_into_a_view(x, &s);
    other_roles_rows(x);
    triggers_on_the_target(x, &s);
    directory_swapped_for_a_link(x, &s);
    let jobs_before = s.jobs_before;
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
    x.c.reload("ALTER SYSTEM RESET store.allowed_dirs");
}

/// The roles, schemas and tables the attempts use, the allowed directory with a link out
/// of it and a FIFO, and a job of a superuser's and one of chaos_reader's.
fn scene(x: &mut Ctx) -> Scene {
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
    x.c.reload(&format!("ALTER SYSTEM SET store.allowed_dirs = '{},{}'", ok.display(), data.display()));
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
    Scene { o, outside, fifo, data, theirs, readers, jobs_before }
}

/// Calls refused with a SQLSTATE: queueing without the privileges, writes to pg_store's
/// tables, others' jobs, settings, paths out of `store.allowed_dirs` or into `/proc`, `/dev`
/// and a FIFO, injections through every argument, targets that are not tables.
fn refusals(x: &mut Ctx, s: &Scene) {
    let (o, fifo, theirs, readers) = (&s.o, &s.fifo, s.theirs, s.readers);
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
}

/// Code of chaos_plain's, run by a superuser's command, tries to queue a job.
fn identity_borrowing(x: &mut Ctx, s: &Scene) {
    let o = &s.o;
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
}

/// Relations in the temporary schema named like catalogs try to pass checks.
fn catalog_spoofing(x: &mut Ctx, s: &Scene) {
    let o = &s.o;
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
}

/// A queued target becomes a view before the worker starts.
fn target_turned_into_a_view(x: &mut Ctx, s: &Scene) {
    let o = &s.o;
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
}

/// A role reads pg_store's tables for others' rows.
fn other_roles_rows(x: &mut Ctx) {
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
}

/// Triggers on the job owner's target try to reach the worker's session.
fn triggers_on_the_target(x: &mut Ctx, s: &Scene) {
    let (o, data) = (&s.o, &s.data);
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
}

/// A directory leads the job out of `store.allowed_dirs` after the listing.
fn directory_swapped_for_a_link(x: &mut Ctx, s: &Scene) {
    let outside = &s.outside;
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
        std::os::unix::fs::symlink(outside, &sub).unwrap();
        x.partial(job)?;
        let file = x.q(&format!("SELECT state || ': ' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%/sub/b.txt'"));
        let leaked = x.num(&format!("SELECT count(*) FROM {t} WHERE line LIKE '%secret%'"));
        fs::remove_dir_all(&dir).unwrap();
        if leaked != 0 || !file.starts_with("failed: ") {
            return Err(format!("{leaked} secret rows; sub/b.txt {file}"));
        }
        Ok(file)
    });
}
