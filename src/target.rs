//! What a target must be, checked when a job is queued (for the caller) and again when a
//! worker starts it (for the job's owner, since the table may have changed in between:
//! become a view, lost its unique index, changed a column's type, revoked a grant).
//!
//! A target is an ordinary or partitioned table (not temporary) with a column of type
//! `text` or `varchar` — or a domain over one of them — that has a unique index on
//! itself or on `store.line_key(column)`, and the role must be allowed to insert into
//! that column. Every catalog reference is schema-qualified: the callers pin
//! `search_path` to `pg_catalog, pg_temp`, and a relation named `pg_class` in some
//! schema must not stand in for the catalog.

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::error::{Result, StoreError};

/// A checked target.
#[derive(Debug, Clone)]
pub struct Target {
    pub oid: pg_sys::Oid,
    /// The relation's qualified, quoted name (`regclass` output).
    pub name: String,
    pub column: String,
    /// For a `varchar(n)` column (or a domain over one): `n`. Longer records are
    /// rejected as `too_long` at the scan, not refused by an insert mid-job.
    pub max_chars: Option<usize>,
}

impl Target {
    pub fn quoted_column(&self) -> String {
        quote_identifier(&self.column)
    }
}

/// Check that `oid`.`column` can take lines, for `role`.
pub fn check(oid: pg_sys::Oid, column: &str, role: pg_sys::Oid) -> Result<Target> {
    let row = Spi::get_three_with_args::<String, String, bool>(
        "SELECT c.relkind::text, c.oid::pg_catalog.regclass::text, c.relpersistence = 't' \
         FROM (SELECT $1::pg_catalog.oid AS oid) x LEFT JOIN pg_catalog.pg_class c ON c.oid = x.oid",
        &[oid.into()],
    )?;
    let (Some(kind), Some(name), Some(temporary)) = row else {
        return Err(StoreError::refused(
            ERRCODE_UNDEFINED_TABLE,
            format!("target relation with OID {} does not exist", oid.to_u32()),
        ));
    };
    if kind != "r" && kind != "p" {
        return Err(StoreError::refused(ERRCODE_WRONG_OBJECT_TYPE, format!("target \"{name}\" is not a table")));
    }
    if temporary {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, format!("target \"{name}\" is a temporary table")).with_hint(
            "A background worker inserts the lines, and it cannot see this session's temporary tables: use an ordinary or UNLOGGED table.",
        ));
    }
    let col = Spi::get_three_with_args::<i16, pg_sys::Oid, i32>(
        "SELECT a.attnum, a.atttypid, a.atttypmod FROM (SELECT 1) x LEFT JOIN pg_catalog.pg_attribute a \
         ON a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[oid.into(), column.into()],
    )?;
    let (Some(attnum), Some(typ), Some(typmod)) = col else {
        return Err(StoreError::refused(
            ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" of relation \"{name}\" does not exist"),
        ));
    };
    // Through domains to the base type; a domain's own typmod (varchar(n) under it) counts.
    let mut base_typmod = typmod;
    // SAFETY: a syscache lookup in a transaction.
    let base = unsafe { pg_sys::getBaseTypeAndTypmod(typ, &mut base_typmod) };
    let max_chars = match base {
        pg_sys::TEXTOID => None,
        pg_sys::VARCHAROID => {
            (base_typmod >= pg_sys::VARHDRSZ as i32).then(|| (base_typmod - pg_sys::VARHDRSZ as i32) as usize)
        }
        _ => {
            return Err(StoreError::refused(
                ERRCODE_DATATYPE_MISMATCH,
                format!("column \"{column}\" of \"{name}\" must be of type text or varchar"),
            )
            .with_hint("A domain over text or varchar works too."))
        }
    };
    let unique = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid \
           AND i.indpred IS NULL AND i.indnkeyatts = 1 \
           AND (i.indkey[0] = $3 OR (i.indkey[0] = 0 \
                AND pg_catalog.pg_get_indexdef(i.indexrelid, 1, false) = pg_catalog.format('store.line_key(%I)', $2::text))))",
        &[oid.into(), column.into(), attnum.into()],
    )?;
    if unique != Some(true) {
        return Err(StoreError::refused(ERRCODE_INVALID_COLUMN_REFERENCE, format!("\"{name}\" has no unique index on column \"{column}\"")).with_hint(format!(
            "pg_store deduplicates against what the table holds through a unique index: CREATE UNIQUE INDEX ON {name} ({col}), \
             or, for lines longer than about 2,000 bytes, CREATE UNIQUE INDEX ON {name} (store.line_key({col})).",
            col = quote_identifier(column)
        )));
    }
    let may_insert = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2, $3, 'INSERT')",
        &[role.into(), oid.into(), column.into()],
    )?;
    if may_insert != Some(true) {
        return Err(StoreError::refused(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to insert into \"{name}\".\"{column}\""),
        ));
    }
    Ok(Target { oid, name, column: column.to_string(), max_chars })
}

/// Whether `role` may read `target` (the fast path's emptiness probe needs it).
pub fn may_select(oid: pg_sys::Oid, role: pg_sys::Oid) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.has_table_privilege($1, $2, 'SELECT')",
        &[role.into(), oid.into()],
    )?
    .unwrap_or(false))
}
