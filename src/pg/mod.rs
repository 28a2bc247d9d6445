//! PostgreSQL glue.
