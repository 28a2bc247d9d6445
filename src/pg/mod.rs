//! PostgreSQL glue: SQL functions, background workers, SPI inserts, settings. Thin by
//! design — the heavy work is in [`crate::engine`].

pub mod api;
pub mod gucs;
pub mod insert;
pub mod job;
pub mod paths;
pub mod txn;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;

/// Set when the library was loaded by shared_preload_libraries (inherited by every
/// backend forked afterwards): only then do the workers exist.
pub static PRELOADED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    if preloading {
        PRELOADED.store(true, Ordering::Relaxed);
        worker::register();
    }
}
