-- pg_store 0.2.0 to 0.3.0: ALTER EXTENSION pg_store UPDATE.
--
-- An updated database equals a fresh 0.3.0 install (tests/upgrade.sh compares their
-- schema dumps, COMMENTs and GRANTs included): each section below turns 0.2.0's objects
-- into what sql/bootstrap.sql and sql/finalize.sql create. A change to 0.3.0's schema
-- adds its section here, before the last one.
--
-- Like everything parsed at install time, this script names pg_catalog's operators and
-- functions itself (see sql/bootstrap.sql; make lint checks it): search_path is public
-- while it runs, and the database's owner may have created look-alikes there.

\echo Use "ALTER EXTENSION pg_store UPDATE" to load this file. \quit

-- 1. New in 0.3.0: what the status view below and the ledger need.
--
-- store.jobs.target_storage and store.target_storage make the ledger follow the table
-- (a TRUNCATE, a rewrite or a partition dropped makes the next run read the files
-- again); store.queue_note() and store.run_note() say in store.status why a queued job
-- waits, and what a running one waits for;
-- store.forget_files() is behind store.forget(). The function definitions are those pgrx
-- generates for a fresh install.
ALTER TABLE store.jobs ADD COLUMN target_storage text[];
COMMENT ON COLUMN store.jobs.target_storage IS 'The target''s storage when the job began (leaf-oid/relfilenode of the table or of each partition): if some of it is gone when the job ends (TRUNCATE, a rewrite, a partition dropped), its files stay out of the ledger';
-- store.jobs.insert_rows_before: store.status.rows_per_second counts the current
-- attempt's lines only (0.2.0's divided every attempt's lines by the current one's time).
ALTER TABLE store.jobs ADD COLUMN insert_rows_before bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN store.jobs.insert_rows_before IS 'Lines (inserted or already present) that earlier attempts had committed when the current one began inserting: store.status.rows_per_second counts only the current attempt''s';
-- store.jobs.stops: a clean stop (a server shutdown) is not a worker gone, and does
-- not count against store.max_attempts.
ALTER TABLE store.jobs ADD COLUMN stops integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN store.jobs.stops IS 'Attempts that ended with their worker asked to stop (a server shutdown or restart, pg_terminate_backend), each resumed by a later one: store.max_attempts counts only the attempts that ended otherwise';
-- store.jobs.memory_peak is sampled at each batch too.
COMMENT ON COLUMN store.jobs.memory_peak IS 'Largest private resident memory (RssAnon + RssFile, so not counting shared_buffers) of the worker seen during the job, sampled about once a second, before each batch and at the end of each COPY, bytes';

CREATE TABLE store.target_storage (
    target          regclass    PRIMARY KEY,
    storage         text[]      NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE store.target_storage IS 'The storage of each target when a job last began (leaf-oid/relfilenode of the table or of each partition): when some of it is gone at the next job (TRUNCATE, VACUUM FULL, a partition dropped or re-created), the ledger forgets that target''s files and they are read again';
COMMENT ON COLUMN store.target_storage.target IS 'Target table';
COMMENT ON COLUMN store.target_storage.storage IS 'leaf-oid/relfilenode of the table, or of each of its partitions';
COMMENT ON COLUMN store.target_storage.recorded_at IS 'When a job recorded it';

CREATE  FUNCTION store."queue_note"() RETURNS TEXT /* Option < String > */
STRICT STABLE PARALLEL SAFE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'queue_note_wrapper';

CREATE  FUNCTION store."run_note"(
	"job" bigint /* i64 */
) RETURNS TEXT /* Option < String > */
STRICT STABLE PARALLEL RESTRICTED 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'run_note_wrapper';

CREATE  FUNCTION store."forget_files"(
	"target" oid, /* Option < pg_sys :: Oid > */
	"path" TEXT /* Option < & str > */
) RETURNS bigint /* i64 */
VOLATILE  
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'forget_wrapper';

-- 2. What 0.2.0 could have captured from public.
--
-- 0.2.0 resolved some operators of store.status through search_path when it was
-- created: the view divides a bigint by a numeric, for which pg_catalog has no operator
-- without a cast, so an exact public./(bigint, numeric), created by the database's
-- owner, won; every reader of the view (superusers too) then ran the owner's function.
-- The view is replaced by 0.3.0's, which names pg_catalog's operators; CREATE OR
-- REPLACE keeps its columns, its row type (store_wait returns it), its comments and
-- grants, and drops its dependencies on whatever the old definition captured.
--
-- Nothing else of 0.2.0 could capture, and it stays as it is: its CHECK constraints and
-- the index of open jobs compare text columns with text literals, its policies compare
-- bigint with bigint and call pg_catalog.pg_has_role, its defaults call now() (no
-- arguments) and store.origin(), store.ranges and store.workers compare text, bigint
-- and oid each with its own type and call pg_catalog.to_timestamp, the event trigger
-- names its function, and every function body pins search_path (it is resolved when
-- called). pg_catalog has the exact match for each of these, and is searched first.
-- sql/bootstrap.sql and sql/finalize.sql now name pg_catalog for these too, which
-- resolves to the same operators and functions.
CREATE OR REPLACE VIEW store.status WITH (security_invoker = true) AS
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

-- 3. The rest of 0.3.0.
--
-- store.status gained waiting_for and stops (above; CREATE OR REPLACE VIEW may add
-- last columns). store_cancel, store_purge and store.wait_job refuse a NULL argument with
-- 22004 instead of returning NULL: no longer STRICT. store.files.error also says why
-- the listing skipped an entry; store.workers shows other roles' work only to
-- pg_read_all_stats; a dropped table takes its recorded storage with it; and
-- store.forget() is new (section 4).
COMMENT ON COLUMN store.status.rows_per_second IS 'Lines (inserted or already present) per second in the current (or last) attempt since it began inserting';
COMMENT ON COLUMN store.status.waiting_for IS 'Why a queued job does not run yet, when pg_store knows (no background worker slot free, max_worker_processes; every store.workers worker busy in other databases; the worker''s commit waiting for a synchronous standby); what a running job waits for, if a DBA can act on it (a lock another session holds, naming the holders; a synchronous standby''s confirmation of a commit). Known on the primary';
COMMENT ON COLUMN store.status.attempts IS 'Times a worker claimed the job; store.max_attempts counts them less stops';
COMMENT ON COLUMN store.status.stops IS 'Attempts that ended with their worker asked to stop (a server shutdown or restart, pg_terminate_backend), each resumed by a later one; they do not count against store.max_attempts';
COMMENT ON COLUMN store.files.error IS 'Why the file failed, with the OS error; for an entry skipped by the listing (hidden name, symbolic link, socket, FIFO, device), why';
COMMENT ON VIEW store.workers IS 'pg_store''s processes: the launcher, a worker per busy database, inserters; other roles'' work and other databases'' only to roles with the privileges of pg_read_all_stats';
COMMENT ON COLUMN store.workers.job IS 'The job it works on';

CREATE OR REPLACE FUNCTION store.forget_dropped_tables() RETURNS event_trigger
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

-- 4. The functions a user calls move to schema store, which only the extension's owner
-- may create objects in: a call store.wait(1) cannot be caught by an overload the
-- database's owner planted in public (public.store_wait(integer) matched store_wait(1)
-- better than 0.2.0's store_wait(bigint)). 0.2.0's names stay, in the extension's
-- schema, each calling its store.* function; store_cancel and store_purge, which were
-- the library's, become SQL functions (not STRICT: a NULL is refused with 22004).
DROP FUNCTION store_cancel(bigint);
DROP FUNCTION store_purge(interval);

CREATE  FUNCTION store."cancel"(
	"job" bigint /* Option < i64 > */
) RETURNS bool /* bool */
VOLATILE  
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'store_cancel_wrapper';

CREATE  FUNCTION store."purge"(
	"older_than" interval /* Option < Interval > */
) RETURNS bigint /* i64 */
VOLATILE  
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'store_purge_wrapper';

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

CREATE OR REPLACE FUNCTION store_ingest(path text, target regclass DEFAULT 'store.lines', column_name name DEFAULT 'line',
                             dedup text DEFAULT 'exact', filter text DEFAULT NULL, key_column name DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.ingest(path, target, column_name, dedup, filter, key_column) $$;
COMMENT ON FUNCTION store_ingest(text, regclass, name, text, text, name) IS 'store.ingest, by its 0.2.0 name';

CREATE OR REPLACE FUNCTION store_wait(job bigint, timeout interval DEFAULT NULL)
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

-- Last: jobs queued while the library was 0.3.0 but the objects still 0.2.0's (its
-- functions refused, its workers left this database alone) run now, not at the next
-- store_ingest.
SELECT store.wake();
