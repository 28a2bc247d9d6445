-- Objects that need the extension's functions: the default target, the status view,
-- store.ingest, store.wait, store.forget (and their 0.2.0 names), and the grants.
--
-- As in bootstrap.sql, what is parsed here and stored (the views, an index) names
-- pg_catalog's operators and functions itself, with operands of the types they take:
-- an unqualified bigint / numeric would resolve to an operator the database's owner
-- created in public, and store.status would run it for every reader.

CREATE TABLE store.lines (
    line text NOT NULL
);
-- A plain btree on text fails above about 2.7 KB; store.line_key keeps lines up to
-- 2,000 bytes as they are (bytewise order, so sorted input appends) and replaces longer
-- ones with 0xFF followed by their SHA-256 (0xFF never starts UTF-8, so the two kinds
-- of key cannot meet).
CREATE UNIQUE INDEX lines_line_key ON store.lines (store.line_key(line));
COMMENT ON TABLE store.lines IS 'Default ingest target: one distinct line per row, shared by every role that may ingest (use a table of your own for private data)';
COMMENT ON COLUMN store.lines.line IS 'A distinct, valid UTF-8 record (unique through store.line_key)';
-- Its rows are user data: pg_dump must keep them.
SELECT pg_catalog.pg_extension_config_dump('store.lines', '');

-- security_invoker: the view reads store.jobs as the caller, so row-level security
-- shows each role its own jobs.
CREATE VIEW store.status WITH (security_invoker = true) AS
SELECT j.id,
       j.path,
       j.target,
       j.owner,
       j.state,
       j.phase,
       j.files_done,
       j.files_total,
       j.files_skipped,
       j.files_failed,
       j.bytes_read,
       j.bytes_total,
       CASE WHEN j.state IN ('done', 'partial') THEN 100.0 ELSE pg_catalog.round(j.percent::numeric, 1) END AS percent,
       j.records,
       j.empty,
       j.rejected,
       j.filtered,
       j.duplicates OPERATOR(pg_catalog.+) coalesce(c.duplicates, 0) AS duplicates,
       coalesce(c.inserted, 0) AS inserted,
       coalesce(c.already_present, 0) AS already_present,
       j.ranges,
       coalesce(c.ranges_done, 0) AS ranges_done,
       coalesce(c.batch_size, j.batch_size) AS batch_size,
       -- The current (or last) attempt's rate: the lines it committed, over the time
       -- since it began inserting, up to this moment while it runs (clock_timestamp:
       -- store.wait reads the view again and again in one transaction).
       CASE WHEN j.insert_started_at IS NOT NULL
             AND r.upto OPERATOR(pg_catalog.>) j.insert_started_at
            THEN pg_catalog.round(greatest(coalesce(c.inserted, 0) OPERATOR(pg_catalog.+) coalesce(c.already_present, 0)
                                           OPERATOR(pg_catalog.-) j.insert_rows_before, 0)::numeric
                                  OPERATOR(pg_catalog./) extract(epoch FROM r.upto OPERATOR(pg_catalog.-) j.insert_started_at), 1)
       END AS rows_per_second,
       greatest(j.memory_peak, c.memory_peak) AS memory_peak,
       j.temp_bytes,
       j.dedup,
       j.estimated_false_drops,
       j.attempts,
       j.merge_restarts,
       j.created_at,
       j.started_at,
       j.updated_at,
       j.finished_at,
       j.error,
       j.sqlstate,
       CASE WHEN j.state OPERATOR(pg_catalog.=) 'queued' THEN store.queue_note()
            WHEN j.state OPERATOR(pg_catalog.=) 'running' THEN store.run_note(j.id) END AS waiting_for,
       j.stops
  FROM store.jobs j
  LEFT JOIN (SELECT job, pg_catalog.sum(inserted)::bigint AS inserted, pg_catalog.sum(already_present)::bigint AS already_present,
                    pg_catalog.sum(duplicates)::bigint AS duplicates, pg_catalog.max(memory_peak) AS memory_peak,
                    pg_catalog.sum(batch_size)::integer AS batch_size, pg_catalog.count(*) FILTER (WHERE done)::integer AS ranges_done
               FROM store.checkpoints GROUP BY job) c ON c.job OPERATOR(pg_catalog.=) j.id
 CROSS JOIN LATERAL (SELECT CASE WHEN j.state OPERATOR(pg_catalog.=) 'running' THEN pg_catalog.clock_timestamp()
                                 ELSE coalesce(j.finished_at, j.updated_at) END AS upto) r;
COMMENT ON VIEW store.status IS 'One row per job the caller may see: state, phase and live progress';
COMMENT ON COLUMN store.status.id IS 'Job id';
COMMENT ON COLUMN store.status.path IS 'Canonical path ingested';
COMMENT ON COLUMN store.status.target IS 'Target table';
COMMENT ON COLUMN store.status.owner IS 'Role that queued the job';
COMMENT ON COLUMN store.status.state IS 'queued, running, done, partial (some files failed), failed or cancelled';
COMMENT ON COLUMN store.status.phase IS 'scanning, sorting, merging, inserting or done';
COMMENT ON COLUMN store.status.files_done IS 'Files read to the end (or failed)';
COMMENT ON COLUMN store.status.files_total IS 'Entries found under path';
COMMENT ON COLUMN store.status.files_skipped IS 'Files skipped as already ingested unchanged';
COMMENT ON COLUMN store.status.files_failed IS 'Files that could not be listed, opened or read (see store.files)';
COMMENT ON COLUMN store.status.bytes_read IS 'Bytes read so far, on disk';
COMMENT ON COLUMN store.status.bytes_total IS 'Bytes to read, on disk';
COMMENT ON COLUMN store.status.percent IS 'Estimated completion, 0-100';
COMMENT ON COLUMN store.status.records IS 'Non-empty records seen';
COMMENT ON COLUMN store.status.empty IS 'Empty records skipped';
COMMENT ON COLUMN store.status.rejected IS 'Invalid records (see store.rejects)';
COMMENT ON COLUMN store.status.filtered IS 'Records dropped by the filter';
COMMENT ON COLUMN store.status.duplicates IS 'Repeats within the input (met while sorting and while merging)';
COMMENT ON COLUMN store.status.inserted IS 'Lines inserted by the job';
COMMENT ON COLUMN store.status.already_present IS 'Lines the target already held';
COMMENT ON COLUMN store.status.ranges IS 'Key ranges inserted in parallel, one process each (see store.ranges)';
COMMENT ON COLUMN store.status.ranges_done IS 'Ranges completely inserted';
COMMENT ON COLUMN store.status.batch_size IS 'Rows in the latest insert batches of all ranges together';
COMMENT ON COLUMN store.status.rows_per_second IS 'Lines (inserted or already present) per second in the current (or last) attempt since it began inserting';
COMMENT ON COLUMN store.status.memory_peak IS 'Largest private memory of any process of the job (the worker, its inserters), bytes';
COMMENT ON COLUMN store.status.temp_bytes IS 'Largest temporary disk use, bytes';
COMMENT ON COLUMN store.status.dedup IS 'exact or bloom';
COMMENT ON COLUMN store.status.estimated_false_drops IS 'bloom mode: expected new lines wrongly dropped';
COMMENT ON COLUMN store.status.attempts IS 'Times a worker claimed the job; store.max_attempts counts them less stops';
COMMENT ON COLUMN store.status.merge_restarts IS 'Times the stream started over because files changed between attempts';
COMMENT ON COLUMN store.status.created_at IS 'When the job was queued';
COMMENT ON COLUMN store.status.started_at IS 'When a worker first started it';
COMMENT ON COLUMN store.status.updated_at IS 'Last progress update';
COMMENT ON COLUMN store.status.finished_at IS 'When it ended';
COMMENT ON COLUMN store.status.error IS 'Why it failed';
COMMENT ON COLUMN store.status.sqlstate IS 'SQLSTATE of that error';
COMMENT ON COLUMN store.status.waiting_for IS 'Why a queued job does not run yet, when pg_store knows (no background worker slot free, max_worker_processes; every store.workers worker busy in other databases; the worker''s commit waiting for a synchronous standby); what a running job waits for, if a DBA can act on it (a lock another session holds, naming the holders; a synchronous standby''s confirmation of a commit). Known on the primary';
COMMENT ON COLUMN store.status.stops IS 'Attempts that ended with their worker asked to stop (a server shutdown or restart, pg_terminate_backend), each resumed by a later one; they do not count against store.max_attempts';

CREATE VIEW store.ranges WITH (security_invoker = true) AS
SELECT c.job,
       c.range,
       CASE WHEN c.done THEN 'done' WHEN c.error IS NOT NULL THEN 'failed' WHEN j.state OPERATOR(pg_catalog.=) 'running' THEN 'running'
            ELSE j.state END AS state,
       c.key_after,
       c.key_upto,
       c.inserted,
       c.already_present,
       c.batches,
       c.batch_size,
       c.worker_pid,
       c.memory_peak,
       c.updated_at,
       c.error
  FROM store.checkpoints c JOIN store.jobs j ON j.id OPERATOR(pg_catalog.=) c.job;
COMMENT ON VIEW store.ranges IS 'Per key range of a job: who inserts it and how far it got';
COMMENT ON COLUMN store.ranges.job IS 'Job id';
COMMENT ON COLUMN store.ranges.range IS 'Range number, 0 first';
COMMENT ON COLUMN store.ranges.state IS 'running, done, failed, or the job''s state';
COMMENT ON COLUMN store.ranges.key_after IS 'The range starts after this line';
COMMENT ON COLUMN store.ranges.key_upto IS 'The range ends with this line';
COMMENT ON COLUMN store.ranges.inserted IS 'Lines inserted';
COMMENT ON COLUMN store.ranges.already_present IS 'Lines the target already held';
COMMENT ON COLUMN store.ranges.batches IS 'Batches committed';
COMMENT ON COLUMN store.ranges.batch_size IS 'Rows in the latest batch';
COMMENT ON COLUMN store.ranges.worker_pid IS 'Process inserting the range';
COMMENT ON COLUMN store.ranges.memory_peak IS 'Largest private memory of that process, bytes';
COMMENT ON COLUMN store.ranges.updated_at IS 'Commit time of the last batch';
COMMENT ON COLUMN store.ranges.error IS 'Why the range failed';

-- The live pg_store processes of the whole server, as pg_stat_activity shows backends:
-- store.worker_list() shows a role with the privileges of pg_read_all_stats every
-- process, and any other role the launcher, this database's idle workers and the
-- processes of the jobs it may see (under row-level security).
CREATE VIEW store.workers WITH (security_invoker = true) AS
SELECT w.pid,
       w.kind,
       d.datname AS database,
       CASE WHEN w.kind OPERATOR(pg_catalog.=) 'launcher' THEN NULL WHEN w.busy THEN 'busy' ELSE 'idle' END AS state,
       w.job,
       pg_catalog.to_timestamp(w.since) AS since
  FROM store.worker_list() w
  LEFT JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) w.database;
COMMENT ON VIEW store.workers IS 'pg_store''s processes: the launcher, a worker per busy database, inserters; other roles'' work and other databases'' only to roles with the privileges of pg_read_all_stats';
COMMENT ON COLUMN store.workers.pid IS 'Process id (as in pg_stat_activity)';
COMMENT ON COLUMN store.workers.kind IS 'launcher (starts workers), worker (runs jobs of one database), or inserter (one key range of a job)';
COMMENT ON COLUMN store.workers.database IS 'The database it serves; NULL for the launcher';
COMMENT ON COLUMN store.workers.state IS 'idle or busy';
COMMENT ON COLUMN store.workers.job IS 'The job it works on';
COMMENT ON COLUMN store.workers.since IS 'When it became idle or took its job';

-- Every node's jobs, for a Citus cluster where store_ingest runs on several nodes (each
-- node's store.jobs holds its own jobs). Without Citus, this node's. Row-level security
-- applies on every node: a role sees its own jobs.
CREATE FUNCTION store.cluster_status()
RETURNS TABLE (nodeid integer, id bigint, path text, target text, owner text, state text, phase text, percent numeric,
               inserted bigint, already_present bigint, rejected bigint, created_at timestamptz, finished_at timestamptz,
               error text, sqlstate text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q constant text := $q$SELECT coalesce(json_agg(json_build_object('id', id, 'path', path, 'target', target::text,
        'owner', owner::text, 'state', state, 'phase', phase, 'percent', percent, 'inserted', inserted,
        'already_present', already_present, 'rejected', rejected, 'created_at', created_at, 'finished_at', finished_at,
        'error', error, 'sqlstate', sqlstate)), '[]') FROM store.status$q$;
    r record;
    res text;
BEGIN
    IF to_regprocedure('pg_catalog.run_command_on_all_nodes(text,boolean,boolean)') IS NULL THEN
        EXECUTE q INTO res;
        RETURN QUERY SELECT 0, x.* FROM json_to_recordset(res::json) AS x(id bigint, path text, target text, owner text,
            state text, phase text, percent numeric, inserted bigint, already_present bigint, rejected bigint,
            created_at timestamptz, finished_at timestamptz, error text, sqlstate text);
        RETURN;
    END IF;
    FOR r IN EXECUTE 'SELECT nodeid, success, result FROM pg_catalog.run_command_on_all_nodes($1)' USING q LOOP
        IF r.success THEN
            RETURN QUERY SELECT r.nodeid, x.* FROM json_to_recordset(r.result::json) AS x(id bigint, path text, target text,
                owner text, state text, phase text, percent numeric, inserted bigint, already_present bigint, rejected bigint,
                created_at timestamptz, finished_at timestamptz, error text, sqlstate text);
        ELSE
            RAISE WARNING 'pg_store: node % did not answer: %', r.nodeid, r.result;
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION store.cluster_status() IS 'The jobs of every node of a Citus cluster (store.status of each, by node id); this node''s alone without Citus';

-- The functions a user calls live in schema store, which only the extension's owner
-- may create objects in: a call store.ingest(...) cannot be caught by an overload that
-- someone with CREATE on another schema (the database's owner owns public) planted for
-- argument types that match a call better (store_wait(1) against a planted
-- public.store_wait(integer)). store.cancel and store.purge are the library's.
CREATE FUNCTION store.ingest(path text, target regclass DEFAULT 'store.lines', column_name name DEFAULT 'line',
                             dedup text DEFAULT 'exact', filter text DEFAULT NULL, key_column name DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.enqueue(path, target::oid, column_name::text, dedup, filter, key_column::text) $$;
COMMENT ON FUNCTION store.ingest(text, regclass, name, text, text, name) IS 'Queue an ingest of a file or directory on the server into target(column_name); returns the job id at once. The job starts when the calling transaction commits.';

CREATE FUNCTION store.wait(job bigint, timeout interval DEFAULT NULL)
RETURNS SETOF store.status
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT store.wait_job(job, timeout);
    SELECT * FROM store.status WHERE id = job;
$$;
COMMENT ON FUNCTION store.wait(bigint, interval) IS 'Wait (interruptibly) for a job to end, with a progress NOTICE every few seconds; returns its final status row';

CREATE FUNCTION store.forget(target regclass, path text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.forget_files(target::oid, path) $$;
COMMENT ON FUNCTION store.forget(regclass, text) IS 'Make the ledger forget files ingested into target (all, or path: a file or a directory and what is under it) that the caller sees, so that the next store.ingest reads them again; returns how many';

GRANT USAGE ON SCHEMA store TO PUBLIC;
-- Row-level security limits every role to its own jobs.
GRANT SELECT ON store.status, store.ranges, store.workers, store.jobs, store.files, store.rejects, store.checkpoints, store.ingested TO PUBLIC;
-- Reading server files takes what COPY FROM a file takes: those roles may use the
-- default target. store.ingest and store.cancel check privileges themselves.
GRANT SELECT, INSERT ON store.lines TO pg_read_server_files;

-- A dropped table takes its ledger rows with it: an OID left behind would name another
-- table one day (or, dumped as a bare number, in a restored cluster) and skip its files.
CREATE FUNCTION store.forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM store.ingested
     WHERE target::oid IN (SELECT objid FROM pg_event_trigger_dropped_objects()
                            WHERE classid = 'pg_class'::regclass AND objsubid = 0);
    DELETE FROM store.target_storage
     WHERE target::oid IN (SELECT objid FROM pg_event_trigger_dropped_objects()
                            WHERE classid = 'pg_class'::regclass AND objsubid = 0);
END
$$;
REVOKE ALL ON FUNCTION store.forget_dropped_tables() FROM PUBLIC;
REVOKE ALL ON FUNCTION store.wake() FROM PUBLIC;
CREATE EVENT TRIGGER store_forget_dropped_tables ON sql_drop EXECUTE FUNCTION store.forget_dropped_tables();

-- 0.2.0's names, in the extension's schema (public by default), kept for the calls and
-- schedules written for it: each calls its store.* function. Where the database's owner
-- is not trusted, call the store.* functions: an unqualified store_wait(1) resolves among
-- whatever that schema holds.
CREATE FUNCTION store_ingest(path text, target regclass DEFAULT 'store.lines', column_name name DEFAULT 'line',
                             dedup text DEFAULT 'exact', filter text DEFAULT NULL, key_column name DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.ingest(path, target, column_name, dedup, filter, key_column) $$;
COMMENT ON FUNCTION store_ingest(text, regclass, name, text, text, name) IS 'store.ingest, by its 0.2.0 name';

CREATE FUNCTION store_wait(job bigint, timeout interval DEFAULT NULL)
RETURNS SETOF store.status
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM store.wait(job, timeout) $$;
COMMENT ON FUNCTION store_wait(bigint, interval) IS 'store.wait, by its 0.2.0 name';

CREATE FUNCTION store_cancel(job bigint)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.cancel(job) $$;
COMMENT ON FUNCTION store_cancel(bigint) IS 'store.cancel, by its 0.2.0 name';

CREATE FUNCTION store_purge(older_than interval)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.purge(older_than) $$;
COMMENT ON FUNCTION store_purge(interval) IS 'store.purge, by its 0.2.0 name';

CREATE FUNCTION store_forget(target regclass, path text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.forget(target, path) $$;
COMMENT ON FUNCTION store_forget(regclass, text) IS 'store.forget, by the name of 0.2.0''s other functions';
