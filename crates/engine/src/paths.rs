//! Which paths a job may read: absolute, canonicalised (so `..` and symbolic links are
//! resolved before any check), not a pseudo-file system, a regular file or a directory,
//! and inside the allowed directories when there are any. The canonical path is then
//! opened link by link ([`crate::walk::Tree`]), so it cannot be redirected after the check.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a path is refused. The extension maps each kind to a SQLSTATE.
#[derive(Debug)]
pub enum Refusal {
    /// The path is relative.
    NotAbsolute(String),
    /// It cannot be resolved or stat'ed (missing, or a permission on the way).
    Inaccessible { path: String, error: io::Error },
    /// Under `/proc`, `/sys` or `/dev`.
    PseudoFileSystem(PathBuf),
    /// A FIFO, socket or device.
    NotFileOrDirectory(PathBuf),
    /// Outside every allowed directory.
    OutsideAllowed { path: PathBuf, allowed: Vec<PathBuf> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAbsolute(p) => write!(f, "path \"{p}\" is not absolute"),
            Refusal::Inaccessible { path, error } => write!(f, "could not access \"{path}\": {error}"),
            Refusal::PseudoFileSystem(p) => write!(f, "refusing to read \"{}\": pseudo-file system", p.display()),
            Refusal::NotFileOrDirectory(p) => write!(f, "\"{}\" is not a regular file or directory", p.display()),
            Refusal::OutsideAllowed { path, .. } => {
                write!(f, "path \"{}\" is outside store.allowed_dirs", path.display())
            }
        }
    }
}

impl Refusal {
    /// What the caller can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            Refusal::NotAbsolute(_) => Some("Give the full path of a file or directory on the database server.".into()),
            Refusal::OutsideAllowed { allowed, .. } => {
                let list = allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
                Some(format!("store.allowed_dirs is {list}; a superuser can change it."))
            }
            _ => None,
        }
    }
}

const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Check `path` and return its canonical form.
pub fn check(path: &str, allowed: &[PathBuf]) -> Result<PathBuf, Refusal> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Refusal::NotAbsolute(path.into()));
    }
    let canon = std::fs::canonicalize(p).map_err(|error| Refusal::Inaccessible { path: path.into(), error })?;
    if PSEUDO.iter().any(|d| canon.starts_with(d)) {
        return Err(Refusal::PseudoFileSystem(canon));
    }
    let meta = std::fs::metadata(&canon)
        .map_err(|error| Refusal::Inaccessible { path: canon.display().to_string(), error })?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(Refusal::NotFileOrDirectory(canon));
    }
    if !allowed.is_empty()
        && !allowed.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| canon.starts_with(&d))
    {
        return Err(Refusal::OutsideAllowed { path: canon, allowed: allowed.to_vec() });
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
        assert_eq!(check(ok.join("sub").to_str().unwrap(), &allowed).unwrap(), ok.canonicalize().unwrap().join("sub"));
        for bad in [out.join("secret"), ok.join("escape/secret"), ok.join("sub/../../out")] {
            let e = check(bad.to_str().unwrap(), &allowed).unwrap_err();
            assert!(matches!(e, Refusal::OutsideAllowed { .. }), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("outside store.allowed_dirs") && e.hint().is_some());
        }
        assert!(check(out.join("secret").to_str().unwrap(), &[]).is_ok(), "no allowed_dirs: anywhere");
        assert!(matches!(check("relative/path", &[]).unwrap_err(), Refusal::NotAbsolute(_)));
        let missing = check(d.path().join("nope").to_str().unwrap(), &[]).unwrap_err();
        assert!(matches!(&missing, Refusal::Inaccessible { error, .. } if error.kind() == io::ErrorKind::NotFound));
        assert!(missing.to_string().contains("No such file or directory"));
        for pseudo in ["/proc/self/environ", "/dev/zero", "/sys/kernel"] {
            assert!(matches!(check(pseudo, &[]).unwrap_err(), Refusal::PseudoFileSystem(_)), "{pseudo}");
        }
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(check(fifo.to_str().unwrap(), &[]).unwrap_err().to_string().contains("not a regular file"));
    }
}
