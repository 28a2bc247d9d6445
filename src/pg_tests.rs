//! `#[pg_test]`s: the SQL surface inside a real server (each test runs in a transaction
//! that is rolled back, so no worker ever sees these jobs). Worker behaviour is tested
//! against clusters of their own in `tests/` (`tests/ingest.rs`, `tests/recovery.rs`, …).
//!
//! The tests live in an inline `#[pg_schema] mod tests`: pgrx creates their SQL functions
//! in schema `tests`, and `cargo pgrx test pg15 tests::` selects them.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::pg_sys::panic::CaughtError;
    use pgrx::prelude::*;
    use pgrx::PgTryBuilder;

    /// Run `sql` (with `$1` = `arg`) and return the SQLSTATE and message of the error it
    /// raises. The transaction is rolled back after the test anyway.
    fn error_of(sql: &str, arg: Option<&str>) -> (String, String) {
        let sql = sql.to_string();
        let arg = arg.map(str::to_string);
        PgTryBuilder::new(move || {
            match &arg {
                Some(a) => Spi::run_with_args(&sql, &[a.as_str().into()]).unwrap(),
                None => Spi::run(&sql).unwrap(),
            }
            panic!("no error from {sql}")
        })
        .catch_others(|e| match e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) | CaughtError::RustPanic { ereport: r, .. } => {
                (crate::error::sqlstate_text(r.sql_error_code()), r.message().to_string())
            }
        })
        .execute()
    }

    fn assert_refused(sql: &str, arg: Option<&str>, sqlstate: &str, message: &str) {
        let (state, msg) = error_of(sql, arg);
        assert!(msg.contains(message), "{sql}: {msg}");
        assert_eq!(state, sqlstate, "{sql}: {msg}");
    }

    fn fixture_dir() -> String {
        let d = std::env::temp_dir().join(format!("pg_store_pg_test_{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.txt"), "x\ny\n").unwrap();
        d.to_string_lossy().into_owned()
    }

    #[pg_test]
    fn line_key_keeps_short_lines_and_hashes_long_ones() {
        assert_eq!(Spi::get_one::<Vec<u8>>("SELECT store.line_key('abc')").unwrap(), Some(b"abc".to_vec()));
        let len = Spi::get_one::<i32>("SELECT length(store.line_key(repeat('y', 61440)))").unwrap();
        assert_eq!(len, Some(33));
    }

    #[pg_test]
    fn store_lines_holds_a_60_kib_line_once() {
        Spi::run("INSERT INTO store.lines VALUES (repeat('y', 61440)), ('short') ON CONFLICT DO NOTHING").unwrap();
        Spi::run("INSERT INTO store.lines VALUES (repeat('y', 61440)), (repeat('y', 61439)) ON CONFLICT DO NOTHING")
            .unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM store.lines").unwrap(), Some(3));
    }

    #[pg_test]
    fn every_table_view_and_column_is_commented() {
        let missing = Spi::get_one::<String>(
            "SELECT string_agg(what, ', ') FROM ( \
               SELECT c.oid::regclass::text AS what FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE n.nspname = 'store' AND c.relkind IN ('r', 'v') AND obj_description(c.oid, 'pg_class') IS NULL \
               UNION ALL \
               SELECT c.oid::regclass::text || '.' || a.attname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                WHERE n.nspname = 'store' AND c.relkind IN ('r', 'v') AND col_description(c.oid, a.attnum) IS NULL) m",
        )
        .unwrap();
        assert_eq!(missing, None, "not commented");
        // The view is among them.
        assert_eq!(
            Spi::get_one::<bool>("SELECT col_description('store.status'::regclass, 1) IS NOT NULL").unwrap(),
            Some(true)
        );
    }

    #[pg_test]
    fn store_ingest_queues_a_job_and_store_cancel_cancels_it() {
        let dir = fixture_dir();
        let id = Spi::get_one_with_args::<i64>("SELECT store_ingest($1)", &[dir.as_str().into()]).unwrap().unwrap();
        let state =
            Spi::get_one_with_args::<String>("SELECT state FROM store.status WHERE id = $1", &[id.into()]).unwrap();
        assert_eq!(state.as_deref(), Some("queued"));
        assert_eq!(Spi::get_one_with_args::<bool>("SELECT store_cancel($1)", &[id.into()]).unwrap(), Some(true));
        assert_eq!(Spi::get_one_with_args::<bool>("SELECT store_cancel($1)", &[id.into()]).unwrap(), Some(false));
        let state =
            Spi::get_one_with_args::<String>("SELECT state FROM store.status WHERE id = $1", &[id.into()]).unwrap();
        assert_eq!(state.as_deref(), Some("cancelled"));
    }

    #[pg_test]
    fn relative_path_is_refused() {
        assert_refused("SELECT store_ingest('relative/dir')", None, "22023", "path \"relative/dir\" is not absolute");
    }

    #[pg_test]
    fn missing_path_is_refused() {
        assert_refused(
            "SELECT store_ingest('/no/such/dir')",
            None,
            "58P01",
            "could not access \"/no/such/dir\": No such file or directory",
        );
    }

    #[pg_test]
    fn proc_is_refused() {
        assert_refused("SELECT store_ingest('/proc/self/environ')", None, "42501", "pseudo-file system");
    }

    // One refusal per test: after an ERROR the test's transaction is unusable.
    #[pg_test]
    fn dev_is_refused() {
        assert_refused("SELECT store_ingest('/dev/zero')", None, "42501", "pseudo-file system");
    }

    #[pg_test]
    fn target_without_unique_index_is_refused() {
        Spi::run("CREATE TABLE t_nokey (line text)").unwrap();
        assert_refused(
            "SELECT store_ingest($1, 't_nokey')",
            Some(&fixture_dir()),
            "42P10",
            "\"public.t_nokey\" has no unique index on column \"line\"",
        );
    }

    #[pg_test]
    fn non_text_column_is_refused() {
        Spi::run("CREATE TABLE t_int (n int UNIQUE)").unwrap();
        assert_refused(
            "SELECT store_ingest($1, 't_int', 'n')",
            Some(&fixture_dir()),
            "42804",
            "must be of type text or varchar",
        );
    }

    #[pg_test]
    fn varchar_and_domains_over_text_are_accepted() {
        Spi::run("CREATE TABLE t_vc (v varchar(40) UNIQUE); CREATE DOMAIN d_line AS text; CREATE TABLE t_dom (l d_line UNIQUE)").unwrap();
        for (t, c) in [("t_vc", "v"), ("t_dom", "l")] {
            let id = Spi::get_one_with_args::<i64>(
                &format!("SELECT store_ingest($1, '{t}', '{c}')"),
                &[fixture_dir().as_str().into()],
            )
            .unwrap();
            assert!(id.is_some(), "{t}");
        }
    }

    #[pg_test]
    fn store_ingest_inside_a_security_restricted_operation_is_refused() {
        // An index expression that calls store_ingest: CREATE INDEX evaluates it as the
        // table's owner inside a security-restricted operation, whoever runs the command.
        Spi::run(
            "CREATE ROLE pgs_attacker; CREATE TABLE t_sro (x int); ALTER TABLE t_sro OWNER TO pgs_attacker; INSERT INTO t_sro VALUES (1); \
             CREATE FUNCTION f_sro(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN PERFORM store_ingest('/tmp'); RETURN $1; END $$",
        )
        .unwrap();
        assert_refused(
            "CREATE INDEX ON t_sro (f_sro(x))",
            None,
            "42501",
            "cannot be called inside a security-restricted operation",
        );
    }

    #[pg_test]
    fn missing_column_is_refused() {
        assert_refused(
            "SELECT store_ingest($1, 'store.lines', 'nope')",
            Some(&fixture_dir()),
            "42703",
            "column \"nope\" of relation \"store.lines\" does not exist",
        );
    }

    #[pg_test]
    fn bad_dedup_is_refused() {
        assert_refused(
            "SELECT store_ingest($1, dedup => 'fuzzy')",
            Some(&fixture_dir()),
            "22023",
            "dedup must be 'exact' or 'bloom'",
        );
    }

    #[pg_test]
    fn bad_filter_is_refused() {
        assert_refused("SELECT store_ingest($1, filter => '(')", Some(&fixture_dir()), "22023", "filter pattern \"(\"");
    }

    #[pg_test]
    fn pathological_filter_is_refused() {
        assert_refused(
            "SELECT store_ingest($1, filter => 'a{1000}{1000}{1000}')",
            Some(&fixture_dir()),
            "22023",
            "filter pattern",
        );
    }

    #[pg_test]
    fn role_without_pg_read_server_files_is_refused() {
        Spi::run("CREATE ROLE pgs_nobody").unwrap();
        Spi::run("SET ROLE pgs_nobody").unwrap();
        assert_refused(
            "SELECT store_ingest($1)",
            Some(&fixture_dir()),
            "42501",
            "permission denied to ingest server files",
        );
    }

    #[pg_test]
    fn role_without_insert_on_target_is_refused() {
        Spi::run("CREATE TABLE t_ro (line text UNIQUE)").unwrap();
        Spi::run("CREATE ROLE pgs_reader IN ROLE pg_read_server_files").unwrap();
        Spi::run("SET ROLE pgs_reader").unwrap();
        assert_refused(
            "SELECT store_ingest($1, 't_ro')",
            Some(&fixture_dir()),
            "42501",
            "permission denied to insert into \"public.t_ro\".\"line\"",
        );
    }

    #[pg_test]
    fn someone_elses_job_can_be_neither_seen_nor_cancelled() {
        let id = Spi::get_one_with_args::<i64>("SELECT store_ingest($1)", &[fixture_dir().as_str().into()])
            .unwrap()
            .unwrap();
        Spi::run("CREATE ROLE pgs_other IN ROLE pg_read_server_files").unwrap();
        Spi::run("SET ROLE pgs_other").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM store.status").unwrap(), Some(0));
        assert_refused(&format!("SELECT store_cancel({id})"), None, "42704", &format!("no pg_store job {id}"));
    }

    #[pg_test]
    fn waiting_in_the_queueing_transaction_is_refused() {
        assert_refused(
            "SELECT store_wait(store_ingest($1))",
            Some(&fixture_dir()),
            "55000",
            "was queued by this transaction and cannot start before it commits",
        );
    }

    #[pg_test]
    fn a_negative_wait_timeout_is_refused() {
        assert_refused("SELECT store.wait(1, '-1 second')", None, "22023", "the timeout must not be negative");
    }

    #[pg_test]
    fn temporary_target_is_refused() {
        Spi::run("CREATE TEMP TABLE t_tmp (line text UNIQUE)").unwrap();
        assert_refused("SELECT store_ingest($1, 't_tmp')", Some(&fixture_dir()), "0A000", "is a temporary table");
    }
}
