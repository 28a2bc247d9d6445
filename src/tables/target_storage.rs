//! `store.target_storage`: the storage each target had when files were last ingested
//! into it; and the storage a job's target had when the job began (`store.jobs`'s
//! `target_storage` column). The ledger follows the table: a `TRUNCATE`, a rewrite or a
//! partition dropped makes it forget the target's files.

use pgrx::prelude::*;

use crate::error::Result;

/// The storage of the target `$1` now, as `leaf-oid/relfilenode` of each of its leaves
/// (the table itself, or every partition): what a `TRUNCATE`, a rewrite (`VACUUM FULL`,
/// `CLUSTER`, a column type change) or a partition dropped, detached or re-created
/// changes, and an insert or a partition added does not remove from.
const STORAGE: &str = "(SELECT coalesce(pg_catalog.array_agg(t.relid::pg_catalog.oid::pg_catalog.text || '/' || c.relfilenode::pg_catalog.text \
                        ORDER BY t.relid), '{}') \
                  FROM (SELECT relid FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass) WHERE isleaf \
                        UNION ALL SELECT $1::pg_catalog.regclass \
                         WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass))) t \
                  JOIN pg_catalog.pg_class c ON c.oid = t.relid)";

/// If some storage `target` had when files were last ingested into it is gone, forget
/// every file of the target in the ledger (`store.ingested`); then record the storage
/// now for the target, and, on a job's first attempt, for job `job` (`store.jobs`). How
/// many files the ledger forgot, `None` if the storage was kept.
///
/// The target itself is locked first, as an insert locks it, before [`STORAGE`] reads
/// its partitions (`pg_partition_tree` locks each of them): in the order `INSERT`,
/// `COPY`, `TRUNCATE` and `LOCK TABLE` take, so that a session truncating or locking the
/// table while a partition is busy waits behind the job, or the job behind it, instead
/// of a deadlock failing the job (40P01). The lock also waits out a `TRUNCATE` in
/// progress, whose new storage the read must see. [`kept_since`] does the same.
pub fn refresh(target: pg_sys::Oid, job: i64) -> Result<Option<i64>> {
    crate::target::lock_as_insert(target);
    Ok(Spi::get_one_with_args::<i64>(
        &format!(
            "WITH now AS (SELECT {STORAGE} AS s), \
                  stale AS (SELECT EXISTS (SELECT FROM store.target_storage w, now \
                                            WHERE w.target = $1 AND NOT w.storage OPERATOR(pg_catalog.<@) now.s) AS yes), \
                  forget AS (DELETE FROM store.ingested WHERE target = $1 AND (SELECT yes FROM stale) RETURNING 1), \
                  rec AS (INSERT INTO store.target_storage AS r (target, storage) SELECT $1, s FROM now \
                          ON CONFLICT (target) DO UPDATE SET storage = excluded.storage, recorded_at = pg_catalog.now()), \
                  mine AS (UPDATE store.jobs SET target_storage = coalesce(target_storage, (SELECT s FROM now)) WHERE id = $2) \
             SELECT CASE WHEN (SELECT yes FROM stale) THEN (SELECT pg_catalog.count(*) FROM forget) END"
        ),
        &[target.into(), job.into()],
    )?)
}

/// Whether the storage `target` had when job `job` began (recorded in its `store.jobs`
/// row by [`refresh`]) is all still there: a `TRUNCATE` (or a rewrite, a partition
/// dropped) during the job may have taken some of its lines.
pub fn kept_since(target: pg_sys::Oid, job: i64) -> Result<Option<bool>> {
    crate::target::lock_as_insert(target);
    Ok(Spi::get_one_with_args::<bool>(
        &format!(
            "SELECT coalesce((SELECT target_storage FROM store.jobs WHERE id = $2) OPERATOR(pg_catalog.<@) {STORAGE}, true)"
        ),
        &[target.into(), job.into()],
    )?)
}
