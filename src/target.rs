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
//! Whose privileges a target's code runs with ([`admit`], in every batch's transaction):
//! the target's **owner**'s, in a security-restricted operation — the way PostgreSQL runs
//! `ANALYZE`, `VACUUM` and `REINDEX` — never the job owner's. Triggers, rules, defaults,
//! generated columns, domain and check constraints, index expressions and predicates,
//! partition routing and row-level-security policies are code the table's owner (or
//! roles it trusts) chose; run as the job's owner (a superuser's pg_cron schedule, a
//! member of `pg_read_server_files`) they would lend it that role's privileges. The job
//! owner's own rights are checked instead: INSERT on the columns pg_store fills (SELECT
//! for the look-up of present keys), and a target whose row-level security would apply
//! to the job's owner is refused — its policies are the table owner's code, and cannot
//! be applied as anyone else. A partitioned target whose partitions have other owners is
//! refused too: their triggers would run as the target's owner.
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
    /// How a row `t` of the target matches a line `x.l` through its unique index
    /// ([`probe_condition`]), for [`Target::probe_sql`]: for a local target that takes
    /// COPY and that the job's owner may read.
    pub probe: Option<String>,
    /// Batches on the plain path may go by COPY when it started: see [`Admission::copy`],
    /// which each batch decides again.
    pub copy: bool,
}

impl Target {
    /// The columns pg_store fills: the line's, and the key column's.
    pub fn columns(&self) -> Vec<&str> {
        std::iter::once(self.column.as_str()).chain(self.key_column.as_deref()).collect()
    }

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
    /// The statement that returns the ordinals (an `int8[]`, NULL for none) of the lines
    /// of a batch (`$1`, a `text[]`) that the target already holds, through its unique
    /// index: a probe per line, in the batch's (sorted) order. `OFFSET 0` keeps the
    /// `EXISTS` a sub-plan run per line: never a hash join that reads the whole target,
    /// whatever a cached generic plan guesses of the batch.
    pub fn probe_sql(&self) -> Option<String> {
        self.probe.as_ref().map(|cond| {
            format!(
                "SELECT pg_catalog.array_agg(x.i) FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS x(l, i) \
                 WHERE EXISTS (SELECT FROM {} t WHERE {cond} OFFSET 0)",
                self.name
            )
        })
    }

    /// Whether no key the target holds sorts at or after `$1` (a line), through its unique
    /// index (an index range scan that stops at the first key found): the
    /// [`probe`](Self::probe) condition with `>=` for `=`. For a local target the job's
    /// owner may read, as the probe.
    pub fn all_below_sql(&self) -> Option<String> {
        self.probe.as_ref().map(|cond| {
            format!(
                "SELECT NOT EXISTS (SELECT FROM {} t, (SELECT $1::pg_catalog.text AS l) x WHERE {})",
                self.name,
                cond.replace("OPERATOR(pg_catalog.=)", "OPERATOR(pg_catalog.>=)")
            )
        })
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

/// Write `lines` as a COPY file in binary format ([`crate::copy_in::encode`]) for a
/// Citus target, whose COPY must name a file: created exclusively (never a file or link
/// that is there already), mode 0600, in the job's private directory.
pub fn write_copy_file<'a>(
    file: &std::path::Path,
    lines: impl Iterator<Item = &'a str>,
    key_column: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)?;
    // Written as it is encoded: no second copy of the batch in memory.
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    crate::copy_in::encode_into(&mut w, lines, key_column)?;
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
    if let Some(k) = key_column {
        let (_, key_typ, _) = attribute(oid, k, &name)?;
        if key_typ != pg_sys::BYTEAOID {
            return Err(StoreError::refused(
                ERRCODE_DATATYPE_MISMATCH,
                format!("key column \"{k}\" of \"{name}\" must be of type bytea"),
            )
            .with_hint("pg_store fills it with store.line_key(line)."));
        }
    }
    if !has_unique_index(oid, column, key_column)? {
        let partitioned = kind == "p";
        let hint = match key_column {
            // A unique index on a partitioned table must hold its partition key, and
            // cannot be on an expression: the line itself must be that key.
            None if partitioned => format!(
                "pg_store deduplicates through a unique index on the line alone, and on a partitioned table such an index \
                 must contain the partition key: partition by the line (PARTITION BY HASH ({col}) or RANGE ({col})) and \
                 CREATE UNIQUE INDEX ON {name} ({col}); or use a key column; or a table that is not partitioned.",
                col = quote_identifier(column)
            ),
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
    let columns: Vec<&str> = std::iter::once(column).chain(key_column).collect();
    refuse_unworkable(oid, &name, &columns)?;
    let citus = is_citus_table(oid)?;
    let copy = citus || rights(oid, &columns, role)?.copy;
    let probe = match !citus && may_select(oid, role)? {
        false => None,
        true => probe_condition(oid, column, attnum, key_column)?,
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

/// The target `$1` and, if it is partitioned, every partition below it, each with
/// whether it is a leaf (holds rows), read from the catalog without locking any of them:
/// `pg_partition_tree` takes a lock on every partition, so a call queueing a job would
/// wait behind a session holding one partition (an `ALTER TABLE`, a `VACUUM FULL`).
/// Recursion follows partitioned tables only, as `pg_partition_tree` does: the
/// inheritance children of a plain table are not its rows.
const TREE: &str = "WITH RECURSIVE tree (relid, isleaf) AS (\
                      SELECT c.oid, c.relkind <> 'p' FROM pg_catalog.pg_class c WHERE c.oid = $1 \
                      UNION ALL SELECT i.inhrelid, k.relkind <> 'p' \
                        FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.relid \
                        JOIN pg_catalog.pg_class k ON k.oid = i.inhrelid WHERE NOT tree.isleaf)";

/// Refuse, when the job is queued, a target every batch would fail on: a deferrable
/// unique or exclusion constraint (ON CONFLICT, which skips the lines a table holds,
/// does not support them), a trigger that fires deferred on insert (PostgreSQL refuses
/// to fire one inside the security-restricted operation a batch runs in, and it would
/// run at commit, outside it), a table access method other than heap (columnar cannot
/// do the speculative insertion ON CONFLICT needs), and a NOT NULL column without a
/// default besides the ones pg_store fills — NOT NULL in the table or in any partition:
/// a row routed through the table takes the table's defaults, not the partition's.
fn refuse_unworkable(oid: pg_sys::Oid, name: &str, columns: &[&str]) -> Result<()> {
    let row = Spi::connect(|c| {
        let t = c.select(
            &format!(
                "{TREE} \
             SELECT (SELECT pg_catalog.format('constraint %I of %s', n.conname, n.conrelid::pg_catalog.regclass) \
                       FROM pg_catalog.pg_constraint n WHERE n.conrelid IN (SELECT relid FROM tree) \
                        AND n.contype IN ('u', 'p', 'x') AND n.condeferrable LIMIT 1), \
                    (SELECT pg_catalog.format('%s on %s', coalesce((SELECT pg_catalog.format('constraint %I', n.conname) \
                              FROM pg_catalog.pg_constraint n WHERE n.oid = g.tgconstraint), pg_catalog.format('trigger %I', g.tgname)), \
                              g.tgrelid::pg_catalog.regclass) \
                       FROM pg_catalog.pg_trigger g WHERE g.tgrelid IN (SELECT relid FROM tree) AND g.tginitdeferred \
                        AND (g.tgtype::pg_catalog.int4 & 4) <> 0 LIMIT 1), \
                    (SELECT pg_catalog.format('%s uses the table access method %I', p.oid::pg_catalog.regclass, a.amname) \
                       FROM tree JOIN pg_catalog.pg_class p ON p.oid = tree.relid JOIN pg_catalog.pg_am a ON a.oid = p.relam \
                      WHERE tree.isleaf AND a.amhandler <> 'pg_catalog.heap_tableam_handler'::pg_catalog.regproc LIMIT 1), \
                    (SELECT pg_catalog.string_agg(DISTINCT CASE WHEN a.attrelid = $1 THEN pg_catalog.quote_ident(a.attname) \
                              ELSE pg_catalog.format('%I (NOT NULL in partition %s)', a.attname, a.attrelid::pg_catalog.regclass) END, ', ') \
                       FROM tree JOIN pg_catalog.pg_attribute a ON a.attrelid = tree.relid \
                       JOIN pg_catalog.pg_attribute r ON r.attrelid = $1 AND r.attname = a.attname \
                      WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull \
                        AND NOT r.atthasdef AND r.attgenerated = '' AND r.attidentity = '' \
                        AND a.attname::pg_catalog.text <> ALL ($2::pg_catalog.text[]))"
            ),
            Some(1),
            &[oid.into(), columns.to_vec().into()],
        )?;
        let r = t.first();
        Ok::<_, pgrx::spi::SpiError>((
            r.get::<String>(1)?,
            r.get::<String>(2)?,
            r.get::<String>(3)?,
            r.get::<String>(4)?,
        ))
    })?;
    if let (Some(what), _, _, _) = &row {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, format!("{what} is deferrable"))
            .with_hint("pg_store skips the lines a table holds with ON CONFLICT DO NOTHING, which does not support deferrable unique or exclusion constraints: make it NOT DEFERRABLE (drop it and add it again)."));
    }
    if let (_, Some(what), _, _) = &row {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, format!("{what} is INITIALLY DEFERRED"))
            .with_hint("pg_store inserts in a security-restricted operation, where PostgreSQL refuses to fire deferred triggers: make it INITIALLY IMMEDIATE."));
    }
    if let (_, _, Some(what), _) = &row {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, format!("target {what}"))
            .with_hint("pg_store needs a heap table: ON CONFLICT DO NOTHING, which skips the lines a table holds, needs speculative insertion, which other access methods (columnar) do not implement."));
    }
    if let (_, _, _, Some(cols)) = &row {
        return Err(StoreError::refused(
            ERRCODE_NOT_NULL_VIOLATION,
            format!(
                "column(s) {cols} of \"{name}\" are NOT NULL without a default, and pg_store fills only {}",
                columns.join(", ")
            ),
        )
        .with_hint("Give them a default in the table itself (a partition's default does not apply to a row inserted through the table), or drop NOT NULL, or ingest into a table of the line (and key) alone."));
    }
    Ok(())
}

/// What a batch may do with the target, decided by [`admit`] in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The target's owner: the role its code runs as.
    pub owner: pg_sys::Oid,
    /// That owner is a superuser (Citus's COPY from a file requires one).
    pub owner_is_superuser: bool,
    /// The target's qualified name now: a rename during the job changes it, and the
    /// statements that name the table must follow the table, not the name.
    pub name: String,
    /// COPY may fill it: it has no rules (which COPY does not apply) and no row-level
    /// security that applies to its owner (which COPY cannot apply).
    pub copy: bool,
    /// It has rules, which `ON CONFLICT` refuses: the safe path is then a look-up and a
    /// plain INSERT of the lines not found.
    pub rules: bool,
    /// The job's owner may read the whole table: the look-up of a batch's keys is allowed
    /// (it tells which lines the table holds), and an error's detail (a failing row's
    /// values) may be kept for it.
    pub may_select: bool,
}

/// Lock the target by OID with the lock an insert takes — held to the end of the
/// transaction, so no rename, change of owner, rule or policy comes between this look
/// and the batch — and decide [`Admission`] for a job of `job_owner`, checking again
/// that it may insert into `columns`.
pub fn admit(oid: pg_sys::Oid, columns: &[&str], job_owner: pg_sys::Oid) -> Result<Admission> {
    // It accepts the invalidations that came before it, so the catalog rows read below
    // are current.
    lock_as_insert(oid);
    // On a snapshot taken now, after the lock: one taken before would still see the row
    // of a table dropped while this waited for it.
    crate::read::fresh(|| {
        let admission = rights(oid, columns, job_owner)?;
        // Dropped during the job, the index would let ON CONFLICT and the look-up find
        // nothing, and every batch insert lines the table holds.
        let (column, key_column) = (columns[0], columns.get(1).copied());
        if !has_unique_index(oid, column, key_column)? {
            return Err(StoreError::refused(
                ERRCODE_INVALID_COLUMN_REFERENCE,
                format!("\"{}\" no longer has a unique index on column \"{}\"", admission.name, key_column.unwrap_or(column)),
            )
            .with_hint("It was dropped during the job (DROP INDEX, or a constraint dropped to be added again): pg_store skips the lines a table holds through it. The batches committed before stay; queue the job again once the table has a valid unique index."));
        }
        Ok(admission)
    })
}

/// An index `i` of the target `$1` that pg_store can deduplicate through: unique, valid,
/// not partial, on one column or expression.
const UNIQUE_INDEX: &str =
    "i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indnkeyatts = 1";

/// Index `i` is on `store.line_key` of the line column `$2`: its definition compared as
/// `pg_get_indexdef` prints it, with the session's `quote_all_identifiers`, which `%I`
/// follows too.
const ON_LINE_KEY: &str = "i.indkey[0] = 0 \
    AND pg_catalog.pg_get_indexdef(i.indexrelid, 1, false) = pg_catalog.format('%I.%I(%I)', 'store', 'line_key', $2::text)";

/// Whether `oid` has the unique index pg_store deduplicates through ([`UNIQUE_INDEX`]):
/// on the key column, or, without one, on the line column or `store.line_key` of it.
fn has_unique_index(oid: pg_sys::Oid, column: &str, key_column: Option<&str>) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        &format!(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE {UNIQUE_INDEX} \
               AND (i.indkey[0] = (SELECT a.attnum FROM pg_catalog.pg_attribute a \
                                    WHERE a.attrelid = $1 AND a.attname = coalesce($3, $2) AND NOT a.attisdropped) \
                    OR ($3 IS NULL AND {ON_LINE_KEY})))"
        ),
        &[oid.into(), column.into(), key_column.into()],
    )?
    .unwrap_or(false))
}

/// Take on the target the lock an insert takes (`RowExclusiveLock`), held to the end of
/// the transaction.
pub fn lock_as_insert(oid: pg_sys::Oid) {
    // SAFETY: takes a lock in the current transaction.
    unsafe { pg_sys::LockRelationOid(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
}

/// The checks of [`admit`], without the lock (a caller queueing a job takes none).
fn rights(oid: pg_sys::Oid, columns: &[&str], role: pg_sys::Oid) -> Result<Admission> {
    let row = Spi::connect(|c| {
        let t = c.select(
            &format!(
                "{TREE} \
             SELECT c.relowner, c.oid::pg_catalog.regclass::pg_catalog.text, c.relhasrules, \
                    (SELECT pg_catalog.array_agg(a) FROM pg_catalog.unnest($3::pg_catalog.text[]) a \
                      WHERE NOT pg_catalog.has_column_privilege($2, c.oid, a, 'INSERT')), \
                    (SELECT pg_catalog.format('%s (owned by %s)', p.oid::pg_catalog.regclass, p.relowner::pg_catalog.regrole) \
                       FROM tree t JOIN pg_catalog.pg_class p ON p.oid = t.relid \
                      WHERE p.relowner <> c.relowner LIMIT 1), \
                    pg_catalog.has_schema_privilege($2, c.relnamespace, 'USAGE'), \
                    c.relnamespace::pg_catalog.regnamespace::pg_catalog.text, \
                    pg_catalog.has_table_privilege($2, c.oid, 'SELECT') \
             FROM pg_catalog.pg_class c WHERE c.oid = $1"
            ),
            Some(1),
            &[oid.into(), role.into(), columns.to_vec().into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok::<_, pgrx::spi::SpiError>(Some((
            r.get::<pg_sys::Oid>(1)?,
            r.get::<String>(2)?,
            r.get::<bool>(3)?,
            r.get::<Vec<String>>(4)?,
            r.get::<String>(5)?,
            r.get::<bool>(6)?,
            r.get::<String>(7)?,
            r.get::<bool>(8)?,
        )))
    })?;
    let Some((Some(owner), Some(name), rules, denied, foreign_partition, usage, schema, may_select)) = row else {
        return Err(StoreError::refused(
            ERRCODE_UNDEFINED_TABLE,
            format!("the target (OID {}) no longer exists", oid.to_u32()),
        )
        .with_hint("It was dropped, or replaced by a table with a new OID (as Citus's alter_distributed_table and undistribute_table do): queue the job again."));
    };
    // What INSERT by name would check first: USAGE on the table's schema (a job queued
    // with the table's OID never names it).
    if usage != Some(true) {
        return Err(StoreError::refused(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for schema {}", schema.unwrap_or_default()),
        ));
    }
    if let Some(c) = denied.unwrap_or_default().first() {
        return Err(StoreError::refused(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to insert into \"{name}\".\"{c}\""),
        ));
    }
    if let Some(p) = foreign_partition {
        return Err(StoreError::refused(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("partition {p} of \"{name}\" is not owned by the owner of \"{name}\""),
        )
        .with_hint("pg_store runs a target's code (its partitions' triggers too) as the target's owner: give every partition the same owner (ALTER TABLE … OWNER TO)."));
    }
    let rls = |r: pg_sys::Oid| {
        // SAFETY: a catalog look-up in a transaction; `noError` returns instead of raising.
        unsafe { pg_sys::check_enable_rls(oid, r, true) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 }
    };
    if role != owner && rls(role) {
        return Err(StoreError::refused(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("row-level security on \"{name}\" applies to the role that queues the job"),
        )
        .with_hint("pg_store runs a target's code, its policies too, as the table's owner, never as the job's owner, so it cannot apply another role's policies: ingest as the table's owner or as a role with BYPASSRLS."));
    }
    // SAFETY: a catalog look-up.
    let owner_is_superuser = unsafe { pg_sys::superuser_arg(owner) };
    let rules = rules == Some(true);
    Ok(Admission {
        owner,
        owner_is_superuser,
        name,
        copy: !rules && !rls(owner),
        rules,
        may_select: may_select == Some(true),
    })
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
        &format!(
            "SELECT CASE WHEN i.indkey[0] = $3 \
                  THEN pg_catalog.format('t.%I OPERATOR(pg_catalog.=) (x.l COLLATE %s)', $2::text, \
                                         i.indcollation[0]::pg_catalog.regcollation) \
                  ELSE pg_catalog.format('store.line_key(t.%I) OPERATOR(pg_catalog.=) store.line_key(x.l)', $2::text) END \
         FROM pg_catalog.pg_index i WHERE {UNIQUE_INDEX} AND (i.indkey[0] = $3 OR ({ON_LINE_KEY})) \
           AND EXISTS (SELECT FROM pg_catalog.pg_amop o JOIN pg_catalog.pg_opclass c ON c.opcfamily = o.amopfamily \
                WHERE c.oid = i.indclass[0] AND o.amopstrategy = 3 \
                  AND o.amopopr IN ('pg_catalog.=(text,text)'::pg_catalog.regoperator, 'pg_catalog.=(bytea,bytea)'::pg_catalog.regoperator)) \
         ORDER BY i.indkey[0] = 0 LIMIT 1"
        ),
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
