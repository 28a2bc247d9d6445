//! The worker's session on a Citus coordinator: connections to the shards' nodes kept
//! across batches, and dropped after a node failed.

use pgrx::prelude::*;

use crate::error::Result;
use crate::target::Target;
use crate::txn::transaction;

/// Settings of a process's session for a Citus target, inserting one of job `job`'s
/// ranges (`insert_workers` until the stream is split), with up to `store.workers` jobs
/// at once:
///
/// * **Within the connections the worker nodes accept.** Citus opens, per session, up
///   to `citus.max_adaptive_executor_pool_size` connections to each node (COPY and the
///   executor alike: one per shard while the pool allows, then several shards over one
///   connection), and only `citus.max_shared_pool_size` — the coordinator's
///   `max_connections` by default, whatever the workers accept — caps all sessions
///   together. Eight inserters over 32 shards on two nodes opened 128 connections to a
///   node that accepts 100: "sorry, too many clients already", and batches retried.
///   So the processes of the `store.workers` jobs that may run at once share half the
///   smallest `max_connections` among the worker nodes ([`pool_size`]); the other half
///   stays for other clients, Citus itself, and other nodes' jobs.
/// * **Connections kept across batches**, as many as the pool: Citus closes all but one
///   per worker node at each commit by default, and reopening them cost most of a
///   batch's fixed time.
///
/// Citus's timing settings are pinned to their defaults for the session, and the look
/// at the worker nodes gets a minute: a database's owner may `ALTER DATABASE … SET` them
/// (they are USERSET), and `citus.remote_task_check_interval = '20min'` made
/// `run_command_on_workers` sleep twenty minutes between polls, holding a
/// `store.workers` slot every database shares; `citus.node_connection_timeout` would
/// hold one as long for each connection to a node that does not answer.
pub fn prepare_session(target: &Target, job: i64, insert_workers: usize) -> Result<()> {
    if !target.citus {
        return Ok(());
    }
    let smallest = transaction(|| {
        Spi::run(
            "SELECT pg_catalog.set_config('citus.remote_task_check_interval', '10', false), \
                    pg_catalog.set_config('citus.node_connection_timeout', '30000', false), \
                    pg_catalog.set_config('statement_timeout', '60000', true)",
        )?;
        Ok(Spi::get_one::<i32>(
            "SELECT pg_catalog.min(result::pg_catalog.int4) \
             FROM pg_catalog.run_command_on_workers('SHOW max_connections') WHERE success",
        )?)
    })
    .unwrap_or_else(|e| {
        log!("pg_store: could not read the worker nodes' max_connections ({e}); Citus's own connection limits apply");
        None
    });
    // The ranges the job's stream was split into, once it was; until then the setting.
    let ranges = transaction(|| crate::tables::jobs::ranges(job))?;
    let per_job = if ranges > 0 { ranges as usize } else { insert_workers.max(1) };
    let pool = pool_size(smallest, per_job * crate::gucs::WORKERS.get().max(1) as usize);
    transaction(|| {
        Ok(Spi::run(&format!(
            "SELECT pg_catalog.set_config('citus.max_adaptive_executor_pool_size', '{pool}', false), \
                    pg_catalog.set_config('citus.max_cached_conns_per_worker', '{pool}', false)"
        ))?)
    })
}

/// How many ranges job `job` splits the stream for Citus target `target` into:
/// `store.insert_workers` where it is set; at its default (one per core), the cores this
/// coordinator does not share with the worker nodes on its host that hold the target's
/// shards ([`inserters`]). Each insert worker's COPY keeps a backend busy on every node
/// it routes rows to; where those nodes run on the coordinator's cores, more inserters
/// compete with them for the same cores. The count is a tuning: if it cannot be made,
/// the setting stands. In its own transaction (the caller's is not open).
pub fn insert_ranges(job: i64, target: pg_sys::Oid, settings: &crate::gucs::Settings) -> usize {
    if !settings.insert_workers_auto {
        log!("pg_store job {job}: insert ranges: {} (store.insert_workers)", settings.insert_workers);
        return settings.insert_workers;
    }
    // The machine's own name, as a worker node may be registered under it.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    // Worker nodes holding placements of the target, named by a loopback address, by this
    // machine's name, or as the coordinator names itself.
    let local = transaction(|| {
        Ok(Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(DISTINCT n.groupid) \
             FROM pg_catalog.pg_dist_shard s \
             JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid \
             JOIN pg_catalog.pg_dist_node n ON n.groupid OPERATOR(pg_catalog.=) p.groupid \
             WHERE s.logicalrelid OPERATOR(pg_catalog.=) $1 AND n.groupid OPERATOR(pg_catalog.<>) 0 \
               AND n.isactive AND n.noderole OPERATOR(pg_catalog.=) 'primary' \
               AND (n.nodename OPERATOR(pg_catalog.=) ANY (ARRAY['localhost', '127.0.0.1', '::1', $2]) \
                    OR n.nodename OPERATOR(pg_catalog.=) ANY (SELECT c.nodename FROM pg_catalog.pg_dist_node c \
                                                              WHERE c.groupid OPERATOR(pg_catalog.=) 0))",
            &[target.into(), host.as_str().into()],
        )?
        .unwrap_or(0))
    });
    match local {
        Ok(local) => {
            let ranges = inserters(settings.insert_workers, local.max(0) as usize);
            log!(
                "pg_store job {job}: insert ranges: {ranges} ({} cores, {local} of the worker nodes holding the \
                 target's shards on this host; store.insert_workers = 0)",
                settings.insert_workers
            );
            ranges
        }
        Err(e) => {
            log!("pg_store job {job}: could not count the worker nodes on this host ({e}); one insert range per core");
            settings.insert_workers
        }
    }
}

/// Insert workers for a Citus target at `store.insert_workers`' default: the `cores` of
/// the coordinator's host shared evenly between the coordinator and the `local` worker
/// nodes that run there, at least one.
pub fn inserters(cores: usize, local: usize) -> usize {
    (cores / (1 + local)).max(1)
}

/// Citus's default `citus.max_adaptive_executor_pool_size`: the most connections to one
/// node a process of a job ever opens.
const CITUS_POOL: u32 = 16;

/// Connections to each worker node for one of `processes` processes of pg_store, when the
/// smallest `max_connections` among the worker nodes is `smallest` (unknown: Citus's
/// default): an equal share of half of it, at least one, at most [`CITUS_POOL`].
pub fn pool_size(smallest: Option<i32>, processes: usize) -> u32 {
    let Some(smallest) = smallest else { return CITUS_POOL };
    let share = (smallest.max(0) as u64 / 2) / processes.max(1) as u64;
    share.clamp(1, CITUS_POOL as u64) as u32
}

/// Close every connection to Citus nodes this session keeps: after a node failed, some
/// are broken without knowing it, and each would fail a retry. Citus closes the cached
/// connections beyond `citus.max_cached_conns_per_worker` at every abort; the setting
/// is rolled back with the transaction.
pub fn reconnect_citus() -> Result<()> {
    crate::txn::rolled_back(|| {
        Spi::run("SELECT pg_catalog.set_config('citus.max_cached_conns_per_worker', '0', false)")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::{inserters, pool_size};

    #[test]
    fn a_coordinator_shares_its_cores_with_the_worker_nodes_on_its_host() {
        // Workers on other hosts: every core inserts.
        assert_eq!(inserters(16, 0), 16);
        // Two on the same host: a third each.
        assert_eq!(inserters(16, 2), 5);
        // Two cores, two local workers (make bench-citus here): one inserter, never none.
        assert_eq!(inserters(2, 2), 1);
        assert_eq!(inserters(1, 0), 1);
        assert_eq!(inserters(0, 0), 1);
    }

    #[test]
    fn pg_stores_processes_share_half_of_a_worker_nodes_connections() {
        // One or two processes, at the server's default of 100: Citus's own default.
        assert_eq!(pool_size(Some(100), 1), 16);
        assert_eq!(pool_size(Some(100), 2), 16);
        // Two jobs of two (the defaults on two cores): 12 each, 48 of 100.
        assert_eq!(pool_size(Some(100), 4), 12);
        // Eight: 6 each, 48 of 100, where Citus alone would open 8 × 16 = 128.
        assert_eq!(pool_size(Some(100), 8), 6);
        assert_eq!(pool_size(Some(100), 64), 1);
        assert_eq!(pool_size(Some(30), 6), 2);
        // Never none, and Citus's default when the nodes could not be asked.
        assert_eq!(pool_size(Some(3), 4), 1);
        assert_eq!(pool_size(Some(0), 0), 1);
        assert_eq!(pool_size(None, 8), 16);
    }
}
