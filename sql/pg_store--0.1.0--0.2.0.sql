-- pg_store 0.1.0 to 0.2.0: ALTER EXTENSION pg_store UPDATE.
--
-- Data stays: tables are altered in place, new columns appended in the order
-- sql/bootstrap.sql lists them, so an upgraded database and a fresh 0.2.0 install have
-- the same catalog (tests/upgrade.sh compares their schema dumps). Code goes: the
-- functions and views of 0.1.0 are dropped, and 0.2.0's created as a fresh install
-- creates them (the second half of this file is 0.2.0's generated SQL for them).
--
-- What happens to existing rows:
-- * jobs: open jobs stay queued or running and run under 0.2.0 (a running one starts its
--   merge over: its 0.1.0 checkpoint has no spec); origin is this cluster and database.
-- * checkpoints: range 0, claim number = the job's attempts.
-- * ingested: spec as 0.2.0 computes it for the job that ingested the file (with the
--   current store.max_line_bytes, and the varchar length of the target column), owner =
--   that job's owner: re-runs keep skipping these files. ctime and inode are unknown
--   (NULL) and not compared for these rows.
-- * store.lines, store.jobs_id_seq: unchanged.
--
-- Every operator and function this script parses is pg_catalog's, named so (see
-- sql/bootstrap.sql): search_path is public while it runs, and an operator or function
-- that the database's owner created there must not stand in for pg_catalog's, neither in
-- the UPDATEs (which run as the superuser updating) nor in the views and policies. They
-- are the operators and functions that 0.2.0's install script resolves to where public
-- holds none of its own: an updated database is a fresh 0.2.0 install's twin.

\echo Use "ALTER EXTENSION pg_store UPDATE" to load this file. \quit

DO $$
BEGIN
    RAISE NOTICE 'pg_store 0.2.0 purges ended jobs (with their files and rejects, never the ledger) older than store.retention = %; set store.retention = 0 to keep them all',
        coalesce(pg_catalog.current_setting('store.retention', true), '30d');
END
$$;

-- 0.1.0's code, to be created again below.
DROP FUNCTION store_wait(bigint, interval);
DROP VIEW store.status;
DROP FUNCTION store_ingest(text, regclass, name, text, text);
DROP FUNCTION store_cancel(bigint);
DROP FUNCTION store.enqueue(text, oid, text, text, text);
DROP FUNCTION store.wait_job(bigint, interval);
-- 0.1.0 let every member of pg_read_server_files read every job; row-level security
-- and grants to PUBLIC replace that.
REVOKE SELECT ON store.jobs, store.files, store.rejects, store.checkpoints FROM pg_read_server_files;

-- Where a job was queued: this cluster (its system identifier, which a physical replica
-- or backup keeps and pg_dump does not) and this database. A worker fails an open job
-- of another origin — restored from a dump, or copied with its database — rather than
-- resume it without the temporary files it had.
CREATE FUNCTION store.origin() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT s.system_identifier::text || '/' || d.oid::text FROM pg_control_system() s, pg_database d WHERE d.datname = current_database() $$;
COMMENT ON FUNCTION store.origin() IS 'This cluster''s system identifier and this database''s OID: where a job is queued';
REVOKE ALL ON FUNCTION store.origin() FROM PUBLIC;

ALTER TABLE store.jobs ALTER COLUMN owner TYPE regrole;
ALTER TABLE store.jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE store.jobs ADD CONSTRAINT jobs_state_check CHECK (state IN ('queued', 'running', 'done', 'partial', 'failed', 'cancelled'));
ALTER TABLE store.jobs
    ADD COLUMN files_failed    bigint      NOT NULL DEFAULT 0,
    ADD COLUMN merge_restarts  integer     NOT NULL DEFAULT 0,
    ADD COLUMN ranges          integer     NOT NULL DEFAULT 0,
    ADD COLUMN sqlstate        text,
    ADD COLUMN key_column      name,
    ADD COLUMN origin          text        NOT NULL DEFAULT store.origin();

ALTER TABLE store.checkpoints DROP CONSTRAINT checkpoints_pkey;
ALTER TABLE store.checkpoints
    ADD COLUMN range           integer     NOT NULL DEFAULT 0,
    ADD COLUMN attempt         integer     NOT NULL DEFAULT 0,
    ADD COLUMN spec            text,
    ADD COLUMN key_after       text,
    ADD COLUMN key_upto        text,
    ADD COLUMN duplicates      bigint      NOT NULL DEFAULT 0,
    ADD COLUMN batch_size      integer,
    ADD COLUMN done            boolean     NOT NULL DEFAULT false,
    ADD COLUMN worker_pid      integer,
    ADD COLUMN memory_peak     bigint,
    ADD COLUMN error           text,
    ADD COLUMN sqlstate        text;
UPDATE store.checkpoints c SET attempt = j.attempts FROM store.jobs j WHERE j.id OPERATOR(pg_catalog.=) c.job;
ALTER TABLE store.checkpoints ALTER COLUMN attempt DROP DEFAULT;
ALTER TABLE store.checkpoints ADD PRIMARY KEY (job, range);

ALTER TABLE store.files
    ALTER COLUMN size DROP NOT NULL,
    ALTER COLUMN mtime DROP NOT NULL,
    ALTER COLUMN mtime_ns DROP NOT NULL,
    ALTER COLUMN fingerprint DROP NOT NULL,
    ADD COLUMN ctime_ns        bigint,
    ADD COLUMN inode           bigint;

ALTER TABLE store.ingested
    ADD COLUMN spec            text,
    ADD COLUMN ctime_ns        bigint,
    ADD COLUMN inode           bigint,
    ADD COLUMN owner           regrole;
UPDATE store.ingested i
   SET spec = pg_catalog.format('column=%s;key=;dedup=%s;max_bytes=%s;max_chars=%s;filter=%s',
                                j.column_name, j.dedup,
                                coalesce(pg_catalog.current_setting('store.max_line_bytes', true), '65536'),
                                coalesce((SELECT (CASE WHEN t.typtype OPERATOR(pg_catalog.=) 'd' THEN t.typtypmod ELSE a.atttypmod END)
                                                 OPERATOR(pg_catalog.-) 4
                                            FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
                                           WHERE a.attrelid OPERATOR(pg_catalog.=) i.target::pg_catalog.oid
                                             AND a.attname OPERATOR(pg_catalog.=) j.column_name
                                             AND (CASE WHEN t.typtype OPERATOR(pg_catalog.=) 'd' THEN t.typbasetype ELSE t.oid END)
                                                 OPERATOR(pg_catalog.=) 'pg_catalog.varchar'::pg_catalog.regtype::pg_catalog.oid
                                             AND (CASE WHEN t.typtype OPERATOR(pg_catalog.=) 'd' THEN t.typtypmod ELSE a.atttypmod END)
                                                 OPERATOR(pg_catalog.>=) 4)::text, ''),
                                coalesce(j.filter, '')),
       owner = j.owner
  FROM store.jobs j
 WHERE j.id OPERATOR(pg_catalog.=) i.job;
-- A ledger row whose job is gone: the default spec, and the extension's owner.
UPDATE store.ingested
   SET spec = coalesce(spec, pg_catalog.format('column=line;key=;dedup=exact;max_bytes=%s;max_chars=;filter=',
                                               coalesce(pg_catalog.current_setting('store.max_line_bytes', true), '65536'))),
       owner = coalesce(owner, (SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_store')::pg_catalog.regrole)
 WHERE spec IS NULL OR owner IS NULL;
ALTER TABLE store.ingested ALTER COLUMN spec SET NOT NULL, ALTER COLUMN owner SET NOT NULL;
ALTER TABLE store.ingested DROP CONSTRAINT ingested_pkey;
ALTER TABLE store.ingested ADD PRIMARY KEY (target, path, spec);

COMMENT ON SCHEMA store IS 'pg_store: ingest jobs, their files, rejects and checkpoints';
COMMENT ON FUNCTION store.origin() IS 'This cluster''s system identifier and this database''s OID: where a job is queued';
COMMENT ON TABLE store.jobs IS 'One row per store_ingest call: the queue the background workers claim from, and each job''s live counters';
COMMENT ON COLUMN store.jobs.id IS 'Job id, as returned by store_ingest';
COMMENT ON COLUMN store.jobs.path IS 'Canonical path of the file or directory ingested';
COMMENT ON COLUMN store.jobs.target IS 'Table the distinct lines go into';
COMMENT ON COLUMN store.jobs.column_name IS 'Text column of the target that holds a line';
COMMENT ON COLUMN store.jobs.key_column IS 'A bytea column pg_store fills with store.line_key(line), unique by itself (e.g. the distribution column of a Citus table); NULL: the line column (or store.line_key of it) is the unique key';
COMMENT ON COLUMN store.jobs.dedup IS 'exact (external sort, merge) or bloom (one pass, approximate)';
COMMENT ON COLUMN store.jobs.filter IS 'Filter spec: a regular expression, or include=..;exclude=..;min_len=..;max_len=..';
COMMENT ON COLUMN store.jobs.owner IS 'Role that called store_ingest (the role executing it, not the session''s); the worker inserts as this role';
COMMENT ON COLUMN store.jobs.state IS 'queued, running, done, partial (done, but some files failed: see store.files), failed or cancelled';
COMMENT ON COLUMN store.jobs.phase IS 'While running: scanning, sorting, merging, inserting; done at the end';
COMMENT ON COLUMN store.jobs.cancel_requested IS 'Set by store_cancel; the worker stops within a second or a batch';
COMMENT ON COLUMN store.jobs.attempts IS 'How many times a worker claimed this job (more than 1 after a crash or restart); the current claim number';
COMMENT ON COLUMN store.jobs.worker_pid IS 'PID of the worker that runs or last ran the job';
COMMENT ON COLUMN store.jobs.files_total IS 'Entries found under path (files, and entries that could not be listed)';
COMMENT ON COLUMN store.jobs.files_done IS 'Files read to the end (or failed)';
COMMENT ON COLUMN store.jobs.files_skipped IS 'Files skipped as already ingested unchanged into the same target';
COMMENT ON COLUMN store.jobs.files_failed IS 'Files or directories that could not be listed, opened or read to the end (see store.files.error)';
COMMENT ON COLUMN store.jobs.bytes_total IS 'Bytes of the files to read, on disk';
COMMENT ON COLUMN store.jobs.bytes_read IS 'Bytes read so far, on disk';
COMMENT ON COLUMN store.jobs.records IS 'Non-empty records seen (accepted + rejected)';
COMMENT ON COLUMN store.jobs.empty IS 'Empty records skipped';
COMMENT ON COLUMN store.jobs.rejected IS 'Invalid records, each one in store.rejects';
COMMENT ON COLUMN store.jobs.filtered IS 'Valid records dropped by the filter';
COMMENT ON COLUMN store.jobs.duplicates IS 'Valid records dropped as repeats within the input';
COMMENT ON COLUMN store.jobs.percent IS 'Estimated completion: reading and sorting count for 60 %, inserting for 40 %';
COMMENT ON COLUMN store.jobs.batch_size IS 'Rows in the latest insert batch (adaptive)';
COMMENT ON COLUMN store.jobs.memory_peak IS 'Largest private resident memory (RssAnon + RssFile, so not counting shared_buffers) of the worker seen during the job, sampled about once a second, bytes';
COMMENT ON COLUMN store.jobs.temp_bytes IS 'Largest temporary disk use of the job, bytes';
COMMENT ON COLUMN store.jobs.estimated_false_drops IS 'bloom mode: expected new records wrongly dropped as repeats';
COMMENT ON COLUMN store.jobs.merge_restarts IS 'Times the stream started over because files changed between attempts (its counters restart with it)';
COMMENT ON COLUMN store.jobs.ranges IS 'Key ranges the sorted stream is inserted in, one process each (0 until the sort is done)';
COMMENT ON COLUMN store.jobs.created_at IS 'When store_ingest queued the job';
COMMENT ON COLUMN store.jobs.started_at IS 'When a worker first started the job';
COMMENT ON COLUMN store.jobs.insert_started_at IS 'When the current attempt began inserting';
COMMENT ON COLUMN store.jobs.updated_at IS 'Last progress update';
COMMENT ON COLUMN store.jobs.finished_at IS 'When the job reached done, partial, failed or cancelled';
COMMENT ON COLUMN store.jobs.error IS 'Why the job failed, with the SQL error text where there is one';
COMMENT ON COLUMN store.jobs.origin IS 'store.origin() where the job was queued: a restored open job (another cluster or database) fails with SQLSTATE 55000 instead of running';
COMMENT ON COLUMN store.jobs.sqlstate IS 'SQLSTATE of the error that failed the job, for programs (e.g. 42501 permission denied, 53100 disk full)';
COMMENT ON TABLE store.checkpoints IS 'Where each key range of each job stands in its merged stream; updated in the same transaction as every insert batch of that range, so a crash neither loses nor repeats a batch';
COMMENT ON COLUMN store.checkpoints.job IS 'The job';
COMMENT ON COLUMN store.checkpoints.range IS 'Key range of the job''s sorted stream, 0 first; each is inserted by one process (the worker, or an inserter it started)';
COMMENT ON COLUMN store.checkpoints.attempt IS 'Claim number of the job whose processes may commit batches; a process whose claim was taken over finds it changed and stops';
COMMENT ON COLUMN store.checkpoints.spec IS 'What decides the stream''s lines (column, dedup mode, length limits, filter): a resumed job whose spec changed starts its stream over';
COMMENT ON COLUMN store.checkpoints.key_after IS 'The range starts after this line (NULL: at the first)';
COMMENT ON COLUMN store.checkpoints.key_upto IS 'The range ends with this line (NULL: at the last)';
COMMENT ON COLUMN store.checkpoints.last_key IS 'Greatest line of the range committed so far (exact mode): a resumed merge starts after it; NULL means from the range''s start';
COMMENT ON COLUMN store.checkpoints.inserted IS 'Lines of the range inserted into the target by this job';
COMMENT ON COLUMN store.checkpoints.already_present IS 'Lines of the range the target already held';
COMMENT ON COLUMN store.checkpoints.duplicates IS 'Repeats the range''s merge met across sorted runs';
COMMENT ON COLUMN store.checkpoints.batches IS 'Insert batches committed';
COMMENT ON COLUMN store.checkpoints.batch_size IS 'Rows in the latest batch';
COMMENT ON COLUMN store.checkpoints.fast_path IS 'Batches use a plain INSERT (keys proven or found new) rather than ON CONFLICT DO NOTHING';
COMMENT ON COLUMN store.checkpoints.done IS 'Every line of the range was committed';
COMMENT ON COLUMN store.checkpoints.worker_pid IS 'PID of the process that inserts, or last inserted, the range';
COMMENT ON COLUMN store.checkpoints.memory_peak IS 'Largest private resident memory of that process, bytes';
COMMENT ON COLUMN store.checkpoints.error IS 'Why the range''s inserter failed';
COMMENT ON COLUMN store.checkpoints.sqlstate IS 'SQLSTATE of that error';
COMMENT ON COLUMN store.checkpoints.updated_at IS 'Commit time of the last batch';
COMMENT ON TABLE store.files IS 'Every file a job found (and every entry it could not list), with its identity and outcome';
COMMENT ON COLUMN store.files.job IS 'The job';
COMMENT ON COLUMN store.files.path IS 'Full path of the file (bytes that are not UTF-8 written as \xHH)';
COMMENT ON COLUMN store.files.size IS 'Size in bytes when the job listed it (NULL for an entry that could not be opened)';
COMMENT ON COLUMN store.files.mtime IS 'Modification time when the job listed it';
COMMENT ON COLUMN store.files.mtime_ns IS 'Modification time, nanoseconds since the epoch (exact comparison)';
COMMENT ON COLUMN store.files.ctime_ns IS 'Inode change time, nanoseconds since the epoch: moves on any rewrite, even one that keeps size and mtime';
COMMENT ON COLUMN store.files.inode IS 'Inode number: a file replaced by another (rename over) has another';
COMMENT ON COLUMN store.files.fingerprint IS 'Hash of the size and the first and last 64 KiB: tells a replaced file from an untouched one';
COMMENT ON COLUMN store.files.state IS 'pending, skipped (already ingested unchanged), read, failed (could not be listed, opened or read to the end; see error), changed (changed while the job ran; read again next time), done';
COMMENT ON COLUMN store.files.records IS 'Non-empty records in the file';
COMMENT ON COLUMN store.files.empty IS 'Empty records';
COMMENT ON COLUMN store.files.rejected IS 'Invalid records (see store.rejects)';
COMMENT ON COLUMN store.files.filtered IS 'Records dropped by the filter';
COMMENT ON COLUMN store.files.accepted IS 'Valid records passed on to deduplication';
COMMENT ON COLUMN store.files.error IS 'Why the file failed, with the OS error';
COMMENT ON TABLE store.ingested IS 'Files fully ingested into a target: a later job with the same spec skips a file whose size, times, inode and fingerprint are unchanged (what makes a pg_cron schedule on a drop directory safe)';
COMMENT ON COLUMN store.ingested.target IS 'Target table';
COMMENT ON COLUMN store.ingested.path IS 'Full path of the file (bytes that are not UTF-8 written as \xHH)';
COMMENT ON COLUMN store.ingested.spec IS 'What decided the lines taken from it: column, dedup mode, length limits, filter. A job with another spec reads the file again';
COMMENT ON COLUMN store.ingested.size IS 'Size when ingested';
COMMENT ON COLUMN store.ingested.mtime_ns IS 'Modification time when ingested, nanoseconds since the epoch';
COMMENT ON COLUMN store.ingested.ctime_ns IS 'Inode change time when ingested, nanoseconds since the epoch (NULL for a file pg_store 0.1.0 ingested: not compared)';
COMMENT ON COLUMN store.ingested.inode IS 'Inode number when ingested (NULL for a file pg_store 0.1.0 ingested: not compared)';
COMMENT ON COLUMN store.ingested.fingerprint IS 'Fingerprint when ingested';
COMMENT ON COLUMN store.ingested.job IS 'Job that ingested it';
COMMENT ON COLUMN store.ingested.owner IS 'Role that queued that job';
COMMENT ON COLUMN store.ingested.ingested_at IS 'When that job finished';
COMMENT ON TABLE store.rejects IS 'Every invalid record a job met: nothing is dropped silently';
COMMENT ON COLUMN store.rejects.job IS 'The job';
COMMENT ON COLUMN store.rejects.file IS 'File holding the record';
COMMENT ON COLUMN store.rejects.line IS 'Line number, 1-based, in the decoded file';
COMMENT ON COLUMN store.rejects.byte_offset IS 'Offset of the record''s first byte in the decoded file';
COMMENT ON COLUMN store.rejects.reason IS 'invalid_utf8, nul_byte or too_long (longer than store.max_line_bytes, or than n characters for a varchar(n) target)';
COMMENT ON COLUMN store.rejects.raw IS 'The record''s raw bytes, at most the first 1 KiB';

-- Row-level security: a role sees the jobs of the roles whose privileges it has (its
-- own, and those of roles it inherits from); superusers bypass it.
ALTER TABLE store.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY jobs_of_the_role ON store.jobs FOR SELECT USING (pg_catalog.pg_has_role(owner, 'USAGE'));
ALTER TABLE store.files ENABLE ROW LEVEL SECURITY;
CREATE POLICY files_of_the_role ON store.files FOR SELECT USING (job OPERATOR(pg_catalog.=) ANY (SELECT j.id FROM store.jobs j));
ALTER TABLE store.rejects ENABLE ROW LEVEL SECURITY;
CREATE POLICY rejects_of_the_role ON store.rejects FOR SELECT USING (job OPERATOR(pg_catalog.=) ANY (SELECT j.id FROM store.jobs j));
ALTER TABLE store.checkpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY checkpoints_of_the_role ON store.checkpoints FOR SELECT USING (job OPERATOR(pg_catalog.=) ANY (SELECT j.id FROM store.jobs j));
ALTER TABLE store.ingested ENABLE ROW LEVEL SECURITY;
CREATE POLICY ingested_of_the_role ON store.ingested FOR SELECT USING (pg_catalog.pg_has_role(owner, 'USAGE'));

-- pg_dump keeps the rows of these extension tables (and the job id sequence), so a
-- backup holds the ledger and the job history; see the README on restoring.
SELECT pg_catalog.pg_extension_config_dump('store.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('store.jobs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('store.checkpoints', '');
SELECT pg_catalog.pg_extension_config_dump('store.files', '');
SELECT pg_catalog.pg_extension_config_dump('store.ingested', '');
SELECT pg_catalog.pg_extension_config_dump('store.rejects', '');

-- 0.2.0's functions and views, as a fresh install creates them.

-- src/api.rs:202
-- pg_store::api::store_cancel
CREATE  FUNCTION "store_cancel"(
	"job" bigint /* i64 */
) RETURNS bool /* bool */
STRICT VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'store_cancel_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/retention.rs:97
-- pg_store::retention::store_purge
CREATE  FUNCTION "store_purge"(
	"older_than" interval /* Interval */
) RETURNS bigint /* i64 */
STRICT VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'store_purge_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:24
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:146
-- pg_store::api::wake
CREATE  FUNCTION store."wake"() RETURNS void
STRICT VOLATILE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wake_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:50
-- pg_store::api::store::wait_job
CREATE  FUNCTION store."wait_job"(
	"job" bigint, /* i64 */
	"timeout" interval /* Option < pgrx :: datum :: Interval > */
) RETURNS TEXT /* String */
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wait_job_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:29
-- pg_store::api::store::line_key
CREATE OR REPLACE FUNCTION store."line_key"(
	"line" TEXT /* & str */
) RETURNS bytea /* Vec < u8 > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'line_key_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:160
-- pg_store::api::worker_list
CREATE  FUNCTION store."worker_list"() RETURNS TABLE (
	"pid" INT,  /* i32 */
	"kind" TEXT,  /* String */
	"database" oid,  /* pg_sys :: Oid */
	"busy" bool,  /* bool */
	"job" bigint,  /* Option < i64 > */
	"since" double precision  /* f64 */
)
STRICT VOLATILE 
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_list_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:35
-- pg_store::api::store::enqueue
CREATE  FUNCTION store."enqueue"(
	"path" TEXT, /* & str */
	"target" oid, /* pg_sys :: Oid */
	"column_name" TEXT, /* & str */
	"dedup" TEXT, /* & str */
	"filter" TEXT, /* Option < & str > */
	"key_column" TEXT /* Option < & str > */
) RETURNS bigint /* i64 */
VOLATILE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'enqueue_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- src/api.rs:22
-- finalize
-- Objects that need the extension's functions: the default target, the status view,
-- store_ingest, store_wait, and the grants.

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
       CASE WHEN j.insert_started_at IS NOT NULL AND coalesce(j.finished_at, j.updated_at) OPERATOR(pg_catalog.>) j.insert_started_at
            THEN pg_catalog.round(((coalesce(c.inserted, 0) OPERATOR(pg_catalog.+) coalesce(c.already_present, 0))
                 OPERATOR(pg_catalog./) extract(epoch FROM coalesce(j.finished_at, j.updated_at) OPERATOR(pg_catalog.-) j.insert_started_at))::numeric, 1)
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
       j.sqlstate
  FROM store.jobs j
  LEFT JOIN (SELECT job, pg_catalog.sum(inserted)::bigint AS inserted, pg_catalog.sum(already_present)::bigint AS already_present,
                    pg_catalog.sum(duplicates)::bigint AS duplicates, pg_catalog.max(memory_peak) AS memory_peak,
                    pg_catalog.sum(batch_size)::integer AS batch_size, pg_catalog.count(*) FILTER (WHERE done)::integer AS ranges_done
               FROM store.checkpoints GROUP BY job) c ON c.job OPERATOR(pg_catalog.=) j.id;
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
COMMENT ON COLUMN store.status.rows_per_second IS 'Lines (inserted or already present) per second since inserting began';
COMMENT ON COLUMN store.status.memory_peak IS 'Largest private memory of any process of the job (the worker, its inserters), bytes';
COMMENT ON COLUMN store.status.temp_bytes IS 'Largest temporary disk use, bytes';
COMMENT ON COLUMN store.status.dedup IS 'exact or bloom';
COMMENT ON COLUMN store.status.estimated_false_drops IS 'bloom mode: expected new lines wrongly dropped';
COMMENT ON COLUMN store.status.attempts IS 'Times a worker claimed the job';
COMMENT ON COLUMN store.status.merge_restarts IS 'Times the stream started over because files changed between attempts';
COMMENT ON COLUMN store.status.created_at IS 'When the job was queued';
COMMENT ON COLUMN store.status.started_at IS 'When a worker first started it';
COMMENT ON COLUMN store.status.updated_at IS 'Last progress update';
COMMENT ON COLUMN store.status.finished_at IS 'When it ended';
COMMENT ON COLUMN store.status.error IS 'Why it failed';
COMMENT ON COLUMN store.status.sqlstate IS 'SQLSTATE of that error';

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

-- The live pg_store processes of the whole server. store.worker_list() shows a job
-- number only where the caller could see the job: in this database under row-level
-- security, or anywhere with the privileges of pg_read_all_stats (as pg_stat_activity
-- shows other roles' queries). Whether a process is busy shows either way.
CREATE VIEW store.workers WITH (security_invoker = true) AS
SELECT w.pid,
       w.kind,
       d.datname AS database,
       CASE WHEN w.kind OPERATOR(pg_catalog.=) 'launcher' THEN NULL WHEN w.busy THEN 'busy' ELSE 'idle' END AS state,
       w.job,
       pg_catalog.to_timestamp(w.since) AS since
  FROM store.worker_list() w
  LEFT JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) w.database;
COMMENT ON VIEW store.workers IS 'pg_store''s processes in the whole server: the launcher, a worker per busy database, inserters';
COMMENT ON COLUMN store.workers.pid IS 'Process id (as in pg_stat_activity)';
COMMENT ON COLUMN store.workers.kind IS 'launcher (starts workers), worker (runs jobs of one database), or inserter (one key range of a job)';
COMMENT ON COLUMN store.workers.database IS 'The database it serves; NULL for the launcher';
COMMENT ON COLUMN store.workers.state IS 'idle or busy';
COMMENT ON COLUMN store.workers.job IS 'The job it works on, if the caller may see it';
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

CREATE FUNCTION store_wait(job bigint, timeout interval DEFAULT NULL)
RETURNS SETOF store.status
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT store.wait_job(job, timeout);
    SELECT * FROM store.status WHERE id = job;
$$;
COMMENT ON FUNCTION store_wait(bigint, interval) IS 'Wait (interruptibly) for a job to end, with a progress NOTICE every few seconds; returns its final status row';

GRANT USAGE ON SCHEMA store TO PUBLIC;
-- Row-level security limits every role to its own jobs.
GRANT SELECT ON store.status, store.ranges, store.workers, store.jobs, store.files, store.rejects, store.checkpoints, store.ingested TO PUBLIC;
-- Reading server files takes what COPY FROM a file takes: those roles may use the
-- default target. store_ingest and store_cancel check privileges themselves.
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
END
$$;
REVOKE ALL ON FUNCTION store.forget_dropped_tables() FROM PUBLIC;
REVOKE ALL ON FUNCTION store.wake() FROM PUBLIC;
CREATE EVENT TRIGGER store_forget_dropped_tables ON sql_drop EXECUTE FUNCTION store.forget_dropped_tables();

CREATE FUNCTION store_ingest(path text, target regclass DEFAULT 'store.lines', column_name name DEFAULT 'line',
                             dedup text DEFAULT 'exact', filter text DEFAULT NULL, key_column name DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT store.enqueue(path, target::oid, column_name::text, dedup, filter, key_column::text) $$;
COMMENT ON FUNCTION store_ingest(text, regclass, name, text, text, name) IS 'Queue an ingest of a file or directory on the server into target(column_name); returns the job id at once. The job starts when the calling transaction commits.';
/* </end connected objects> */


-- Jobs queued under 0.1.0 run now, not at the next store_ingest.
SELECT store.wake();
