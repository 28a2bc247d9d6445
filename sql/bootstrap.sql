-- pg_store's own objects: the job queue, per-file state, rejects, checkpoints and the
-- idempotency ledger. Everything lives in schema "store"; the SQL-facing functions
-- live in the extension's schema (public by default).
--
-- Every role may read these tables, and row-level security shows each role its own
-- jobs (and those of roles whose privileges it has); superusers see all. Only
-- pg_store's functions and workers write them.
--
-- Columns added since 0.1.0 come last in each table, in the order
-- sql/pg_store--0.1.0--0.2.0.sql adds them: an upgraded and a fresh install are the
-- same (tests/upgrade.sh compares them).
--
-- What is parsed here, and stored (a default, a CHECK constraint, an index predicate, a
-- policy), names pg_catalog's operators and functions itself. While CREATE EXTENSION
-- runs, search_path is the extension's schema (public by default), with pg_catalog
-- searched first: an operator whose operands need a cast to match pg_catalog's, or a
-- function whose arguments do, would resolve to an exact match that the database's owner
-- created in public, and every reader would run it. Hence OPERATOR(pg_catalog.=) and
-- pg_catalog.now(); `x IN ('a', 'b')` stays, since it compares text with text, which
-- pg_catalog has an exact operator for. Function bodies pin search_path instead: they
-- are resolved when called. tests/lint_sql.py (make lint) checks this file.

CREATE SCHEMA IF NOT EXISTS store;
COMMENT ON SCHEMA store IS 'pg_store: ingest jobs, their files, rejects and checkpoints';

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

CREATE TABLE store.jobs (
    id              bigserial PRIMARY KEY,
    path            text        NOT NULL,
    target          regclass    NOT NULL,
    column_name     name        NOT NULL,
    dedup           text        NOT NULL CHECK (dedup IN ('exact', 'bloom')),
    filter          text,
    owner           regrole     NOT NULL,
    state           text        NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'done', 'partial', 'failed', 'cancelled')),
    phase           text        CHECK (phase IN ('scanning', 'sorting', 'merging', 'inserting', 'done')),
    cancel_requested boolean    NOT NULL DEFAULT false,
    attempts        integer     NOT NULL DEFAULT 0,
    worker_pid      integer,
    files_total     bigint      NOT NULL DEFAULT 0,
    files_done      bigint      NOT NULL DEFAULT 0,
    files_skipped   bigint      NOT NULL DEFAULT 0,
    bytes_total     bigint      NOT NULL DEFAULT 0,
    bytes_read      bigint      NOT NULL DEFAULT 0,
    records         bigint      NOT NULL DEFAULT 0,
    empty           bigint      NOT NULL DEFAULT 0,
    rejected        bigint      NOT NULL DEFAULT 0,
    filtered        bigint      NOT NULL DEFAULT 0,
    duplicates      bigint      NOT NULL DEFAULT 0,
    percent         real        NOT NULL DEFAULT 0,
    batch_size      integer,
    memory_peak     bigint,
    temp_bytes      bigint,
    estimated_false_drops double precision,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    started_at      timestamptz,
    insert_started_at timestamptz,
    updated_at      timestamptz,
    finished_at     timestamptz,
    error           text,
    -- since 0.2.0
    files_failed    bigint      NOT NULL DEFAULT 0,
    merge_restarts  integer     NOT NULL DEFAULT 0,
    ranges          integer     NOT NULL DEFAULT 0,
    sqlstate        text,
    key_column      name,
    origin          text        NOT NULL DEFAULT store.origin(),
    -- since 0.3.0
    target_storage  text[],
    insert_rows_before bigint   NOT NULL DEFAULT 0,
    stops           integer     NOT NULL DEFAULT 0
);
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
COMMENT ON COLUMN store.jobs.memory_peak IS 'Largest private resident memory (RssAnon + RssFile, so not counting shared_buffers) of the worker seen during the job, sampled about once a second, before each batch and at the end of each COPY, bytes';
COMMENT ON COLUMN store.jobs.temp_bytes IS 'Largest temporary disk use of the job, bytes';
COMMENT ON COLUMN store.jobs.estimated_false_drops IS 'bloom mode: expected new records wrongly dropped as repeats';
COMMENT ON COLUMN store.jobs.merge_restarts IS 'Times the stream started over because files changed between attempts (its counters restart with it)';
COMMENT ON COLUMN store.jobs.ranges IS 'Key ranges the sorted stream is inserted in, one process each (0 until the sort is done)';
COMMENT ON COLUMN store.jobs.created_at IS 'When store_ingest queued the job';
COMMENT ON COLUMN store.jobs.started_at IS 'When a worker first started the job';
COMMENT ON COLUMN store.jobs.insert_started_at IS 'When the current attempt began inserting';
COMMENT ON COLUMN store.jobs.insert_rows_before IS 'Lines (inserted or already present) that earlier attempts had committed when the current one began inserting: store.status.rows_per_second counts only the current attempt''s';
COMMENT ON COLUMN store.jobs.stops IS 'Attempts that ended with their worker asked to stop (a server shutdown or restart, pg_terminate_backend), each resumed by a later one: store.max_attempts counts only the attempts that ended otherwise';
COMMENT ON COLUMN store.jobs.updated_at IS 'Last progress update';
COMMENT ON COLUMN store.jobs.finished_at IS 'When the job reached done, partial, failed or cancelled';
COMMENT ON COLUMN store.jobs.error IS 'Why the job failed, with the SQL error text where there is one';
COMMENT ON COLUMN store.jobs.origin IS 'store.origin() where the job was queued: a restored open job (another cluster or database) fails with SQLSTATE 55000 instead of running';
COMMENT ON COLUMN store.jobs.sqlstate IS 'SQLSTATE of the error that failed the job, for programs (e.g. 42501 permission denied, 53100 disk full)';
COMMENT ON COLUMN store.jobs.target_storage IS 'The target''s storage when the job began (leaf-oid/relfilenode of the table or of each partition): if some of it is gone when the job ends (TRUNCATE, a rewrite, a partition dropped), its files stay out of the ledger';

CREATE INDEX jobs_open ON store.jobs (id) WHERE state IN ('queued', 'running');

CREATE TABLE store.checkpoints (
    job             bigint      NOT NULL REFERENCES store.jobs ON DELETE CASCADE,
    last_key        text,
    inserted        bigint      NOT NULL DEFAULT 0,
    already_present bigint      NOT NULL DEFAULT 0,
    batches         bigint      NOT NULL DEFAULT 0,
    fast_path       boolean     NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- since 0.2.0
    range           integer     NOT NULL DEFAULT 0,
    attempt         integer     NOT NULL,
    spec            text,
    key_after       text,
    key_upto        text,
    duplicates      bigint      NOT NULL DEFAULT 0,
    batch_size      integer,
    done            boolean     NOT NULL DEFAULT false,
    worker_pid      integer,
    memory_peak     bigint,
    error           text,
    sqlstate        text,
    PRIMARY KEY (job, range)
);
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

CREATE TABLE store.files (
    job             bigint      NOT NULL REFERENCES store.jobs ON DELETE CASCADE,
    path            text        NOT NULL,
    size            bigint,
    mtime           timestamptz,
    mtime_ns        bigint,
    fingerprint     text,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'skipped', 'read', 'failed', 'changed', 'done')),
    records         bigint,
    empty           bigint,
    rejected        bigint,
    filtered        bigint,
    accepted        bigint,
    error           text,
    -- since 0.2.0
    ctime_ns        bigint,
    inode           bigint,
    PRIMARY KEY (job, path)
);
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
COMMENT ON COLUMN store.files.error IS 'Why the file failed, with the OS error; for an entry skipped by the listing (hidden name, symbolic link, socket, FIFO, device), why';

CREATE TABLE store.ingested (
    target          regclass    NOT NULL,
    path            text        NOT NULL,
    size            bigint      NOT NULL,
    mtime_ns        bigint      NOT NULL,
    fingerprint     text        NOT NULL,
    job             bigint      NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- since 0.2.0
    spec            text        NOT NULL,
    ctime_ns        bigint,
    inode           bigint,
    owner           regrole     NOT NULL,
    PRIMARY KEY (target, path, spec)
);
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

-- since 0.3.0: what makes the ledger follow the table. Not dumped: OIDs and
-- relfilenodes mean nothing in another cluster, and a restored table holds what the
-- restored ledger says it holds.
CREATE TABLE store.target_storage (
    target          regclass    PRIMARY KEY,
    storage         text[]      NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE store.target_storage IS 'The storage of each target when a job last began (leaf-oid/relfilenode of the table or of each partition): when some of it is gone at the next job (TRUNCATE, VACUUM FULL, a partition dropped or re-created), the ledger forgets that target''s files and they are read again';
COMMENT ON COLUMN store.target_storage.target IS 'Target table';
COMMENT ON COLUMN store.target_storage.storage IS 'leaf-oid/relfilenode of the table, or of each of its partitions';
COMMENT ON COLUMN store.target_storage.recorded_at IS 'When a job recorded it';

CREATE TABLE store.rejects (
    job             bigint      NOT NULL REFERENCES store.jobs ON DELETE CASCADE,
    file            text        NOT NULL,
    line            bigint      NOT NULL,
    byte_offset     bigint      NOT NULL,
    reason          text        NOT NULL CHECK (reason IN ('invalid_utf8', 'nul_byte', 'too_long')),
    raw             bytea       NOT NULL,
    PRIMARY KEY (job, file, line)
);
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
