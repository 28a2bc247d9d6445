//! What a target must be, checked when a job is queued (for the caller) and again when a
//! worker starts it (for the job's owner, since the table may have changed in between:
//! become a view, lost its unique index, changed a column's type, revoked a grant).
//!
//! A target is an ordinary or partitioned table (not temporary) with a line column of
//! type `text` or `varchar` — or a domain over one of them — and a unique index that
//! decides what is a duplicate: on the line column itself, on `store.line_key(column)`,
//! or, with a key column, on that `bytea` column alone, which pg_store fills with
//! `store.line_key(line)` (the way to long lines on Citus, where a unique index must be
//! on the distribution column and that column cannot be generated). The role must be
//! allowed to insert into the columns it fills. A Citus table is recognised (its
//! inserts are counted through `RETURNING`, since Citus reports rows sent, not rows
//! inserted, and its batches are bigger: each is a distributed transaction).
//!
//! Every catalog reference is schema-qualified: the callers pin `search_path` to
//! `pg_catalog, pg_temp`, and a relation named `pg_class` in some schema must not stand
//! in for the catalog.

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
    /// A `bytea` column pg_store fills with `store.line_key(line)`, unique by itself.
    pub key_column: Option<String>,
    /// For a `varchar(n)` column (or a domain over one): `n`. Longer records are
    /// rejected as `too_long` at the scan, not refused by an insert mid-job.
    pub max_chars: Option<usize>,
    /// A Citus table (distributed, reference, or in a distributed schema).
    pub citus: bool,
    /// The statement that returns the ordinals (an `int8[]`, NULL for none) of the lines
    /// of a batch (`$1`, a `text[]`) that the target already holds, through its unique
    /// index; for a local target that takes COPY and that the role may read.
    pub probe: Option<String>,
    /// Batches on the plain path may go by COPY: the table has no rules (which COPY would
    /// not apply) and no row-level security (which COPY FROM refuses). Always on Citus,
    /// where COPY is the way rows go straight to their shards.
    pub copy: bool,
}

impl Target {
    /// The insert of a batch (`$1` a `text[]`), plain or `ON CONFLICT DO NOTHING`; on a
    /// Citus table the latter returns the count of rows it inserted (a plain insert
    /// inserts every row it sends, or fails).
    pub fn insert_sql(&self, on_conflict: bool) -> String {
        let col = quote_identifier(&self.column);
        let mut sql = match &self.key_column {
            None => format!("INSERT INTO {} ({col}) SELECT pg_catalog.unnest($1::pg_catalog.text[])", self.name),
            Some(k) => format!(
                "INSERT INTO {} ({col}, {}) SELECT l, store.line_key(l) FROM pg_catalog.unnest($1::pg_catalog.text[]) AS l",
                self.name,
                quote_identifier(k)
            ),
        };
        if on_conflict {
            sql.push_str(" ON CONFLICT DO NOTHING");
        }
        if on_conflict && self.citus {
            // Citus counts rows sent for INSERT … SELECT; RETURNING gives the ones inserted.
            sql = format!("WITH ins AS ({sql} RETURNING 1) SELECT pg_catalog.count(*) FROM ins");
        }
        sql
    }
}

impl Target {
    /// The statement behind [`Target::probe`], for a row condition from
    /// [`probe_condition`]: an index probe per line, in the batch's (sorted) order.
    /// `OFFSET 0` keeps the `EXISTS` a sub-plan run per line: never a hash join that
    /// reads the whole target, whatever a cached generic plan guesses of the batch.
    fn probe_sql(name: &str, cond: &str) -> String {
        format!(
            "SELECT pg_catalog.array_agg(x.i) FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS x(l, i) \
             WHERE EXISTS (SELECT FROM {name} t WHERE {cond} OFFSET 0)"
        )
    }

    /// The COPY of a batch written to `file` in binary format ([`write_copy_file`]): the
    /// plain path, when [`Target::copy`].
    pub fn copy_sql(&self, file: &std::path::Path) -> String {
        let cols = match &self.key_column {
            None => quote_identifier(&self.column).to_string(),
            Some(k) => format!("{}, {}", quote_identifier(&self.column), quote_identifier(k)),
        };
        let file = file.to_string_lossy().replace('\'', "''");
        format!("COPY {} ({cols}) FROM '{file}' WITH (FORMAT binary)", self.name)
    }
}

/// Write `lines` as a COPY file in binary format: one text field per row, and with a key
/// column a second, bytea, field holding `store.line_key` of the line.
pub fn write_copy_file<'a>(
    file: &std::path::Path,
    lines: impl Iterator<Item = &'a str>,
    key_column: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(file)?);
    w.write_all(b"PGCOPY\n\xff\r\n\0")?;
    w.write_all(&0i32.to_be_bytes())?; // flags
    w.write_all(&0i32.to_be_bytes())?; // header extension
    let fields: i16 = if key_column { 2 } else { 1 };
    for line in lines {
        w.write_all(&fields.to_be_bytes())?;
        w.write_all(&(line.len() as i32).to_be_bytes())?;
        w.write_all(line.as_bytes())?;
        if key_column {
            let key = store_engine::key::line_key(line.as_bytes());
            w.write_all(&(key.len() as i32).to_be_bytes())?;
            w.write_all(&key)?;
        }
    }
    w.write_all(&(-1i16).to_be_bytes())?;
    w.flush()
}

/// One column of the target: number, type, type modifier.
fn attribute(oid: pg_sys::Oid, name: &str, table: &str) -> Result<(i16, pg_sys::Oid, i32)> {
    let col = Spi::get_three_with_args::<i16, pg_sys::Oid, i32>(
        "SELECT a.attnum, a.atttypid, a.atttypmod FROM (SELECT 1) x LEFT JOIN pg_catalog.pg_attribute a \
         ON a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
        &[oid.into(), name.into()],
    )?;
    match col {
        (Some(n), Some(t), Some(m)) => Ok((n, t, m)),
        _ => Err(StoreError::refused(
            ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{name}\" of relation \"{table}\" does not exist"),
        )),
    }
}

/// Check that `oid`.`column` (and `key_column`) can take lines, for `role`.
pub fn check(oid: pg_sys::Oid, column: &str, key_column: Option<&str>, role: pg_sys::Oid) -> Result<Target> {
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
    let (attnum, typ, typmod) = attribute(oid, column, &name)?;
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
    let unique = match key_column {
        None => Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid \
               AND i.indpred IS NULL AND i.indnkeyatts = 1 \
               AND (i.indkey[0] = $3 OR (i.indkey[0] = 0 \
                    AND pg_catalog.pg_get_indexdef(i.indexrelid, 1, false) = pg_catalog.format('store.line_key(%I)', $2::text))))",
            &[oid.into(), column.into(), attnum.into()],
        )?,
        Some(k) => {
            let (key_attnum, key_typ, _) = attribute(oid, k, &name)?;
            if key_typ != pg_sys::BYTEAOID {
                return Err(StoreError::refused(ERRCODE_DATATYPE_MISMATCH, format!("key column \"{k}\" of \"{name}\" must be of type bytea"))
                    .with_hint("pg_store fills it with store.line_key(line)."));
            }
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid \
                   AND i.indpred IS NULL AND i.indnkeyatts = 1 AND i.indkey[0] = $2)",
                &[oid.into(), key_attnum.into()],
            )?
        }
    };
    if unique != Some(true) {
        let hint = match key_column {
            None => format!(
                "pg_store deduplicates against what the table holds through a unique index: CREATE UNIQUE INDEX ON {name} ({col}), \
                 or, for lines longer than about 2,000 bytes, CREATE UNIQUE INDEX ON {name} (store.line_key({col})), or a key column.",
                col = quote_identifier(column)
            ),
            Some(k) => format!("The key column must be unique by itself: CREATE UNIQUE INDEX ON {name} ({}).", quote_identifier(k)),
        };
        let on = key_column.unwrap_or(column);
        return Err(StoreError::refused(
            ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("\"{name}\" has no unique index on column \"{on}\""),
        )
        .with_hint(hint));
    }
    for c in std::iter::once(column).chain(key_column) {
        let may_insert = Spi::get_one_with_args::<bool>(
            "SELECT pg_catalog.has_column_privilege($1, $2, $3, 'INSERT')",
            &[role.into(), oid.into(), c.into()],
        )?;
        if may_insert != Some(true) {
            return Err(StoreError::refused(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to insert into \"{name}\".\"{c}\""),
            ));
        }
    }
    let citus = is_citus_table(oid)?;
    let copy = citus || copy_allowed(oid)?;
    let probe = match copy && !citus && may_select(oid, role)? {
        false => None,
        true => probe_condition(oid, column, attnum, key_column)?.map(|cond| Target::probe_sql(&name, &cond)),
    };
    Ok(Target {
        oid,
        name,
        column: column.to_string(),
        key_column: key_column.map(str::to_string),
        max_chars,
        copy,
        citus,
        probe,
    })
}

/// Whether COPY may fill `oid`: no rules (COPY would not apply them) and no row-level
/// security (COPY FROM refuses it). Checked when a job starts and after each COPY.
pub fn copy_allowed(oid: pg_sys::Oid) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT NOT (relhasrules OR relrowsecurity) FROM pg_catalog.pg_class WHERE oid = $1",
        &[oid.into()],
    )?
    .unwrap_or(false))
}

/// How a row `t` of the target matches a line `x.l` through its unique index: the
/// column under the index's collation, `store.line_key` of it, or the key column; none
/// when the index's equality is not `=` (an operator class of its own), where only ON
/// CONFLICT knows what the index calls equal. Operators are schema-qualified: the
/// owner's code may change `search_path`.
fn probe_condition(oid: pg_sys::Oid, column: &str, attnum: i16, key_column: Option<&str>) -> Result<Option<String>> {
    if let Some(k) = key_column {
        return Ok(Some(format!("t.{} OPERATOR(pg_catalog.=) store.line_key(x.l)", quote_identifier(k))));
    }
    Ok(Spi::get_one_with_args::<String>(
        "SELECT CASE WHEN i.indkey[0] = $3 \
                  THEN pg_catalog.format('t.%I OPERATOR(pg_catalog.=) (x.l COLLATE %s)', $2::text, \
                                         i.indcollation[0]::pg_catalog.regcollation) \
                  ELSE pg_catalog.format('store.line_key(t.%I) OPERATOR(pg_catalog.=) store.line_key(x.l)', $2::text) END \
         FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid \
           AND i.indpred IS NULL AND i.indnkeyatts = 1 \
           AND (i.indkey[0] = $3 OR (i.indkey[0] = 0 \
                AND pg_catalog.pg_get_indexdef(i.indexrelid, 1, false) = pg_catalog.format('store.line_key(%I)', $2::text))) \
           AND EXISTS (SELECT FROM pg_catalog.pg_amop o JOIN pg_catalog.pg_opclass c ON c.opcfamily = o.amopfamily \
                WHERE c.oid = i.indclass[0] AND o.amopstrategy = 3 \
                  AND o.amopopr IN ('pg_catalog.=(text,text)'::pg_catalog.regoperator, 'pg_catalog.=(bytea,bytea)'::pg_catalog.regoperator)) \
         ORDER BY i.indkey[0] = 0 LIMIT 1",
        &[oid.into(), column.into(), attnum.into()],
    )?)
}

/// Whether Citus knows `oid` (its metadata table exists only where Citus is installed).
fn is_citus_table(oid: pg_sys::Oid) -> Result<bool> {
    let has_citus = Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL")?;
    if has_citus != Some(true) {
        return Ok(false);
    }
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)",
        &[oid.into()],
    )?
    .unwrap_or(false))
}

/// Whether `role` may read `target` (the fast path's emptiness probe needs it).
pub fn may_select(oid: pg_sys::Oid, role: pg_sys::Oid) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.has_table_privilege($1, $2, 'SELECT')",
        &[role.into(), oid.into()],
    )?
    .unwrap_or(false))
}
