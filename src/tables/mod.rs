//! pg_store's bookkeeping tables, one module each: every statement on `store.*` that the
//! worker and the SQL functions run, in functions named for what they do.
//!
//! Each runs in its caller's transaction (but [`jobs::cancel_requested`] and
//! [`jobs::Job::load`], which open their own) and with its caller's privileges: the SQL
//! functions read as the caller, through row-level security, and wrap their writes in
//! [`crate::security::as_superuser`]; the worker is a superuser. A write of a running job
//! carries its claim number: where another worker holds the job now it changes nothing,
//! and the functions that must say so fail with [`crate::error::StoreError::Fenced`].

pub mod checkpoints;
pub mod files;
pub mod ingested;
pub mod jobs;
pub mod rejects;
pub mod target_storage;
