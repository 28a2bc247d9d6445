//! pg_store: exactly-once, deduplicating bulk ingest of huge line files into PostgreSQL.
//!
//! [`engine`] does the heavy work with no PostgreSQL dependency; [`pg`] is the thin
//! extension layer (SQL functions, background workers, SPI, GUCs) that drives it.

pub mod engine;
pub mod pg;
pub mod testkit;

::pgrx::pg_module_magic!(name, version);

#[cfg(feature = "pg_test")]
#[pgrx::pg_schema]
mod tests {
    include!("pg_tests.rs");
}

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
