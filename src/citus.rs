//! The worker's session on a Citus coordinator: connections to the shards' nodes kept
//! across batches, and dropped after a node failed.

use pgrx::prelude::*;

use crate::error::Result;
use crate::target::Target;
use crate::txn::transaction;

/// Settings of the worker's session for a Citus target: keep a connection per shard
/// across batches (Citus closes all but one per worker node at each commit by default,
/// and reopening them cost most of a batch's fixed time).
pub fn prepare_session(target: &Target) -> Result<()> {
    if target.citus {
        cache_citus_connections(64)?;
    }
    Ok(())
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

fn cache_citus_connections(n: u32) -> Result<()> {
    transaction(|| {
        Ok(Spi::run(&format!("SELECT pg_catalog.set_config('citus.max_cached_conns_per_worker', '{n}', false)"))?)
    })
}
