//! The worker's session on a Citus coordinator: connections to the shards' nodes kept
//! across batches, and dropped after a node failed.

use pgrx::prelude::*;

use crate::error::Result;
use crate::target::Target;
use crate::txn::transaction;

/// Settings of a process's session for a Citus target, inserting one of a job's
/// `insert_workers` ranges:
///
/// * **Within the connections the worker nodes accept.** Citus opens, per session, up
///   to `citus.max_adaptive_executor_pool_size` connections to each node (COPY and the
///   executor alike: one per shard while the pool allows, then several shards over one
///   connection), and only `citus.max_shared_pool_size` — the coordinator's
///   `max_connections` by default, whatever the workers accept — caps all sessions
///   together. Eight inserters over 32 shards on two nodes opened 128 connections to a
///   node that accepts 100: "sorry, too many clients already", and batches retried.
///   So the job's processes share half the smallest `max_connections` among the worker
///   nodes ([`pool_size`]); the other half stays for other clients and Citus itself.
/// * **Connections kept across batches**, as many as the pool: Citus closes all but one
///   per worker node at each commit by default, and reopening them cost most of a
///   batch's fixed time.
pub fn prepare_session(target: &Target, insert_workers: usize) -> Result<()> {
    if !target.citus {
        return Ok(());
    }
    let smallest = transaction(|| {
        Ok(Spi::get_one::<i32>(
            "SELECT pg_catalog.min(result::pg_catalog.int4) \
             FROM pg_catalog.run_command_on_workers('SHOW max_connections') WHERE success",
        )?)
    })
    .unwrap_or_else(|e| {
        log!("pg_store: could not read the worker nodes' max_connections ({e}); Citus's own connection limits apply");
        None
    });
    let pool = pool_size(smallest, insert_workers);
    transaction(|| {
        Ok(Spi::run(&format!(
            "SELECT pg_catalog.set_config('citus.max_adaptive_executor_pool_size', '{pool}', false), \
                    pg_catalog.set_config('citus.max_cached_conns_per_worker', '{pool}', false)"
        ))?)
    })
}

/// Citus's default `citus.max_adaptive_executor_pool_size`: the most connections to one
/// node a process of a job ever opens.
const CITUS_POOL: u32 = 16;

/// Connections to each worker node for one of `processes` processes of a job, when the
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
    use super::pool_size;

    #[test]
    fn the_processes_of_a_job_share_half_of_a_worker_nodes_connections() {
        // One or two inserters, at the server's default of 100: Citus's own default.
        assert_eq!(pool_size(Some(100), 1), 16);
        assert_eq!(pool_size(Some(100), 2), 16);
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
