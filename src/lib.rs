//! pg_store: exactly-once, deduplicating bulk ingest of huge line files into PostgreSQL.
//!
//! [`engine`] does the heavy work with no PostgreSQL dependency; [`pg`] is the thin
//! extension layer (SQL functions, background workers, SPI, GUCs) that drives it.

pub mod engine;
pub mod pg;
pub mod testkit;

::pgrx::pg_module_magic!(name, version);
