-- Objects that need the extension's functions: the default target, the status view,
-- store_wait, and the grants.

CREATE TABLE store.lines (
    line text NOT NULL
);
-- A plain btree on text fails above about 2.7 KB; store.line_key keeps lines up to
-- 2,000 bytes as they are (bytewise order, so sorted input appends) and replaces longer
-- ones with 0xFF followed by their SHA-256 (0xFF never starts UTF-8, so the two kinds
-- of key cannot meet).
CREATE UNIQUE INDEX lines_line_key ON store.lines (store.line_key(line));
COMMENT ON TABLE store.lines IS 'Default ingest target: one distinct line per row';
COMMENT ON COLUMN store.lines.line IS 'A distinct, valid UTF-8 record (unique through store.line_key)';

CREATE VIEW store.status AS
SELECT j.id,
       j.path,
       j.target,
       j.state,
       j.phase,
       j.files_done,
       j.files_total,
       j.files_skipped,
       j.bytes_read,
       j.bytes_total,
       CASE WHEN j.state = 'done' THEN 100.0 ELSE round(j.percent::numeric, 1) END AS percent,
       j.records,
       j.empty,
       j.rejected,
       j.filtered,
       j.duplicates,
       coalesce(c.inserted, 0) AS inserted,
       coalesce(c.already_present, 0) AS already_present,
       j.batch_size,
       CASE WHEN j.insert_started_at IS NOT NULL AND coalesce(j.finished_at, j.updated_at) > j.insert_started_at
            THEN round(((coalesce(c.inserted, 0) + coalesce(c.already_present, 0))
                 / extract(epoch FROM coalesce(j.finished_at, j.updated_at) - j.insert_started_at))::numeric, 1)
       END AS rows_per_second,
       j.memory_peak,
       j.temp_bytes,
       j.dedup,
       j.estimated_false_drops,
       j.attempts,
       j.created_at,
       j.started_at,
       j.updated_at,
       j.finished_at,
       j.error
  FROM store.jobs j
  LEFT JOIN store.checkpoints c ON c.job = j.id;
COMMENT ON VIEW store.status IS 'One row per job: state, phase and live progress';

CREATE FUNCTION store_wait(job bigint, timeout interval DEFAULT NULL)
RETURNS SETOF store.status
LANGUAGE sql VOLATILE
AS $$
    SELECT store.wait_job(job, timeout);
    SELECT * FROM store.status WHERE id = job;
$$;
COMMENT ON FUNCTION store_wait(bigint, interval) IS 'Wait (interruptibly) for a job to end, with a progress NOTICE every few seconds; returns its final status row';

GRANT USAGE ON SCHEMA store TO PUBLIC;
-- Reading server files takes what COPY FROM a file takes: those roles may watch jobs
-- and use the default target. store_ingest and store_cancel check privileges themselves.
GRANT SELECT ON store.status, store.jobs, store.files, store.rejects, store.checkpoints TO pg_read_server_files;
GRANT SELECT, INSERT ON store.lines TO pg_read_server_files;

CREATE FUNCTION store_ingest(path text, target regclass DEFAULT 'store.lines', column_name name DEFAULT 'line',
                             dedup text DEFAULT 'exact', filter text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT store.enqueue(path, target::oid, column_name::text, dedup, filter) $$;
COMMENT ON FUNCTION store_ingest(text, regclass, name, text, text) IS 'Queue an ingest of a file or directory on the server into target(column_name); returns the job id at once. The job starts when the calling transaction commits.';
