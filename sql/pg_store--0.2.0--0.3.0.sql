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

-- 1. What 0.2.0 could have captured from public.
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
       CASE WHEN j.insert_started_at IS NOT NULL
             AND coalesce(j.finished_at, j.updated_at) OPERATOR(pg_catalog.>) j.insert_started_at
            THEN pg_catalog.round((coalesce(c.inserted, 0) OPERATOR(pg_catalog.+) coalesce(c.already_present, 0))::numeric
                                  OPERATOR(pg_catalog./) extract(epoch FROM coalesce(j.finished_at, j.updated_at)
                                                                           OPERATOR(pg_catalog.-) j.insert_started_at), 1)
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

-- Last: jobs queued while the library was 0.3.0 but the objects still 0.2.0's (its
-- functions refused, its workers left this database alone) run now, not at the next
-- store_ingest.
SELECT store.wake();
