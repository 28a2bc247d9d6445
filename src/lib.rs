//! pg_store: exactly-once, deduplicating bulk ingest of huge line files into PostgreSQL.
//!
//! This crate is the PostgreSQL layer — SQL functions, background workers, SPI
//! inserts, settings — over the [`store_engine`] crate, which does the heavy work and
//! cannot reach PostgreSQL (it does not depend on pgrx).
//!
//! Who calls whom: [`api`] (the SQL functions) checks a call with [`admission`] (which
//! asks [`security`] and [`target`]) and queues a row in `store.jobs`; a [`worker`]
//! claims it and runs [`job`]: plan (the same admission check again, list files), then
//! [`store_engine::distinct`] streams batches into the [`insert::Inserter`], then
//! finish. [`error`] maps every failure to a SQLSTATE once; [`txn`] runs the worker's
//! transactions; [`gucs`] holds every setting; every statement on pg_store's own tables
//! (`store.*`) is in [`tables`], one module a table.

mod admission;
pub mod api;
mod citus;
mod copy_in;
mod ddl;
mod error;
mod gucs;
mod insert;
mod job;
mod read;
mod registry;
mod retention;
mod security;
mod signals;
mod tables;
mod target;
mod txn;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

/// Set when the library was loaded by shared_preload_libraries (inherited by every
/// backend forked afterwards): only then do the workers exist.
pub(crate) static PRELOADED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reads a postmaster global while the library loads.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    if preloading {
        PRELOADED.store(true, Ordering::Relaxed);
        registry::init();
        // pg_upgrade starts the old and the new server in binary-upgrade mode: no job may
        // run there (it would fail in the new cluster, its runs left in the old one).
        // SAFETY: reads a postmaster global set from the command line before libraries load.
        if !unsafe { pg_sys::IsBinaryUpgrade } {
            worker::register();
        }
        ddl::init();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`: settings come from `pg_test_configs/postgresql.conf`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        include_str!("../pg_test_configs/postgresql.conf")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    }
}
