//! The admission check: may this role ingest this path into this target? Run when a
//! job is queued, for the caller ([`Asker::Caller`]), and again when a worker starts
//! each attempt, for the job's owner ([`Asker::Owner`]): settings, the file system, the
//! table and the role's privileges may have changed in between. The same checks in the
//! same order, so a job is refused at start for what would have refused it at queueing;
//! what differs is who asks, the words of the refusals, and two checks that only make
//! sense later (the role still exists; the path still resolves to itself).

use std::path::PathBuf;

use pgrx::pg_sys::errcodes::PgSqlErrorCode::*;
use pgrx::prelude::*;
use store_engine::path_text;

use crate::error::{Result, StoreError};
use crate::target::{self, Target};
use crate::{gucs, security};

/// Who asks to ingest.
#[derive(Debug, Clone, Copy)]
pub enum Asker {
    /// The role calling `store_ingest`, queueing a job.
    Caller(pg_sys::Oid),
    /// The owner of job `job`, which a worker starts (the path is the canonical one
    /// checked at queueing).
    Owner { role: pg_sys::Oid, job: i64 },
}

impl Asker {
    fn role(self) -> pg_sys::Oid {
        match self {
            Asker::Caller(role) | Asker::Owner { role, .. } => role,
        }
    }
}

/// What was admitted: the path, canonical, and the target.
pub struct Admitted {
    pub path: PathBuf,
    pub target: Target,
}

/// pg_store hands PostgreSQL UTF-8 text; another server encoding would store it garbled.
fn require_utf8_database() -> Result<()> {
    // SAFETY: reads the database's encoding.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        return Err(StoreError::refused(ERRCODE_FEATURE_NOT_SUPPORTED, "pg_store needs a database with UTF8 encoding")
            .with_hint("Lines are checked as UTF-8 and stored as such; create the database with ENCODING 'UTF8'."));
    }
    Ok(())
}

/// Check that `asker` may ingest `path` into `column` (and `key_column`) of `target`:
/// the database is UTF-8; the role (still) exists and may read server files, as for
/// `COPY FROM` a file; the path is under `store.allowed_dirs` (and, at start, still
/// resolves to the path checked at queueing: the tree is then opened link by link from
/// it); the target is a table the role may insert into ([`target::check`]). In a
/// transaction (the catalog look-ups).
pub fn check(
    asker: Asker,
    path: &str,
    target: pg_sys::Oid,
    column: &str,
    key_column: Option<&str>,
) -> Result<Admitted> {
    require_utf8_database()?;
    let role = asker.role();
    if let Asker::Owner { job, .. } = asker {
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE oid = $1)",
            &[role.into()],
        )?;
        if exists != Some(true) {
            return Err(StoreError::refused(
                ERRCODE_UNDEFINED_OBJECT,
                format!("the role that queued job {job} no longer exists"),
            ));
        }
    }
    if !security::may_read_server_files(role) {
        return Err(match asker {
            Asker::Caller(_) => StoreError::refused(ERRCODE_INSUFFICIENT_PRIVILEGE, "permission denied to ingest server files").with_hint(
                "As for COPY FROM a file: only superusers and roles with the privileges of pg_read_server_files may call store_ingest.",
            ),
            Asker::Owner { .. } => StoreError::refused(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "the job's owner may no longer read server files",
            )
            .with_hint("It lost superuser or the privileges of pg_read_server_files after queueing the job."),
        });
    }
    let canon = store_engine::check_path(path, &gucs::allowed_dirs())?;
    if matches!(asker, Asker::Owner { .. }) && path_text(&canon) != path {
        return Err(StoreError::refused(ERRCODE_INSUFFICIENT_PRIVILEGE, format!("path \"{}\" now resolves to \"{}\"", path, canon.display()))
            .with_hint("A component of the path became a symbolic link after the job was queued; queue it again with the path you mean."));
    }
    let target = target::check(target, column, key_column, role)?;
    Ok(Admitted { path: canon, target })
}
