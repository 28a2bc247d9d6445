//! Which paths a job may read: absolute, canonicalised (so `..` and symbolic links are
//! resolved before any check), not a pseudo-file system, a regular file or a directory,
//! and inside the allowed directories when there are any. The canonical path is then
//! opened link by link ([`crate::walk::Tree`]), so it cannot be redirected after the check.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a path is refused. The extension maps each kind to a SQLSTATE.
#[derive(Debug)]
pub enum PathRefusal {
    /// The path is relative.
    NotAbsolute(String),
    /// It cannot be resolved or stat'ed (missing, or a permission on the way).
    Inaccessible {
        /// The path as given, or canonical when only the stat failed.
        path: String,
        /// What the OS said.
        error: io::Error,
    },
    /// Under `/proc`, `/sys` or `/dev`.
    PseudoFileSystem(PathBuf),
    /// A FIFO, socket or device.
    NotFileOrDirectory(PathBuf),
    /// Outside every allowed directory.
    OutsideAllowed {
        /// The canonical path.
        path: PathBuf,
        /// The allowed directories, as configured.
        allowed: Vec<PathBuf>,
    },
}

impl fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathRefusal::NotAbsolute(p) => write!(f, "path \"{p}\" is not absolute"),
            PathRefusal::Inaccessible { path, error } => write!(f, "could not access \"{path}\": {error}"),
            PathRefusal::PseudoFileSystem(p) => write!(f, "refusing to read \"{}\": pseudo-file system", p.display()),
            PathRefusal::NotFileOrDirectory(p) => write!(f, "\"{}\" is not a regular file or directory", p.display()),
            PathRefusal::OutsideAllowed { path, .. } => {
                write!(f, "path \"{}\" is outside store.allowed_dirs", path.display())
            }
        }
    }
}

impl PathRefusal {
    /// What the caller can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            PathRefusal::NotAbsolute(_) => {
                Some("Give the full path of a file or directory on the database server.".into())
            }
            PathRefusal::OutsideAllowed { allowed, .. } => {
                let list = allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
                Some(format!("store.allowed_dirs is {list}; a superuser can change it."))
            }
            _ => None,
        }
    }
}

const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Check `path` (a job's, as the user gave it) and return its canonical form, or why it
/// may not be read: it must be absolute, and once canonicalised (`..` and links
/// resolved) not under `/proc`, `/sys` or `/dev`, a regular file or a directory, and
/// inside one of `allowed` unless that is empty. Open the result with [`walk`](crate::walk),
/// which refuses links, so that it cannot be redirected after the check.
pub fn check_path(path: &str, allowed: &[PathBuf]) -> Result<PathBuf, PathRefusal> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(PathRefusal::NotAbsolute(path.into()));
    }
    let canon = std::fs::canonicalize(p).map_err(|error| PathRefusal::Inaccessible { path: path.into(), error })?;
    if PSEUDO.iter().any(|d| canon.starts_with(d)) {
        return Err(PathRefusal::PseudoFileSystem(canon));
    }
    let meta = std::fs::metadata(&canon)
        .map_err(|error| PathRefusal::Inaccessible { path: canon.display().to_string(), error })?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(PathRefusal::NotFileOrDirectory(canon));
    }
    if !allowed.is_empty()
        && !allowed.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| canon.starts_with(&d))
    {
        return Err(PathRefusal::OutsideAllowed { path: canon, allowed: allowed.to_vec() });
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalises_and_enforces_allowed_dirs() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("ok");
        let out = d.path().join("out");
        std::fs::create_dir_all(ok.join("sub")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(&out, ok.join("escape")).unwrap();
        let allowed = vec![ok.clone()];
        assert_eq!(
            check_path(ok.join("sub").to_str().unwrap(), &allowed).unwrap(),
            ok.canonicalize().unwrap().join("sub")
        );
        for bad in [out.join("secret"), ok.join("escape/secret"), ok.join("sub/../../out")] {
            let e = check_path(bad.to_str().unwrap(), &allowed).unwrap_err();
            assert!(matches!(e, PathRefusal::OutsideAllowed { .. }), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("outside store.allowed_dirs") && e.hint().is_some());
        }
        assert!(check_path(out.join("secret").to_str().unwrap(), &[]).is_ok(), "no allowed_dirs: anywhere");
        assert!(matches!(check_path("relative/path", &[]).unwrap_err(), PathRefusal::NotAbsolute(_)));
        let missing = check_path(d.path().join("nope").to_str().unwrap(), &[]).unwrap_err();
        assert!(matches!(&missing, PathRefusal::Inaccessible { error, .. } if error.kind() == io::ErrorKind::NotFound));
        assert!(missing.to_string().contains("No such file or directory"));
        for pseudo in ["/proc/self/environ", "/dev/zero", "/sys/kernel"] {
            assert!(matches!(check_path(pseudo, &[]).unwrap_err(), PathRefusal::PseudoFileSystem(_)), "{pseudo}");
        }
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(check_path(fifo.to_str().unwrap(), &[]).unwrap_err().to_string().contains("not a regular file"));
    }
}
