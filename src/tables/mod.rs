//! pg_store's bookkeeping tables, one module each: the SQL on `store.*` that the worker
//! and the SQL functions run.

pub mod jobs;
