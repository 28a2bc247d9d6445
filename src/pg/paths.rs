//! Which paths a job may read: absolute, canonicalised (so `..` and symbolic links are
//! resolved before any check), not a pseudo-file system, a regular file or a
//! directory, and inside `store.allowed_dirs` when that is set. Plain Rust, so the
//! rules are unit-tested without a server.

use std::path::{Path, PathBuf};

/// Why a path is refused, with the SQLSTATE the SQL layer raises.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

pub fn check(path: &str, allowed: &[PathBuf]) -> Result<PathBuf, Refused> {
    let refuse = |sqlstate, message: String, hint: Option<&str>| Refused { sqlstate, message, hint: hint.map(str::to_string) };
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(refuse("22023", format!("path \"{path}\" is not absolute"), Some("Give the full path of a file or directory on the database server.")));
    }
    let canon = std::fs::canonicalize(p).map_err(|e| {
        let state = if e.kind() == std::io::ErrorKind::PermissionDenied { "42501" } else { "58P01" };
        refuse(state, format!("could not access \"{path}\": {e}"), None)
    })?;
    if PSEUDO.iter().any(|d| canon.starts_with(d)) {
        return Err(refuse("42501", format!("refusing to read \"{}\": pseudo-file system", canon.display()), None));
    }
    let meta = std::fs::metadata(&canon).map_err(|e| refuse("58P01", format!("could not stat \"{}\": {e}", canon.display()), None))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(refuse("22023", format!("\"{}\" is not a regular file or directory", canon.display()), None));
    }
    if !allowed.is_empty() {
        let inside = allowed.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| canon.starts_with(&d));
        if !inside {
            let list = allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(refuse(
                "42501",
                format!("path \"{}\" is outside store.allowed_dirs", canon.display()),
                Some(&format!("store.allowed_dirs is {list}; a superuser can change it.")),
            ));
        }
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
            assert_eq!(e.sqlstate, "42501", "{bad:?}: {e:?}");
            assert!(e.message.contains("outside store.allowed_dirs") && e.hint.is_some());
        }
        assert!(check(out.join("secret").to_str().unwrap(), &[]).is_ok(), "no allowed_dirs: anywhere");
        assert_eq!(check("relative/path", &[]).unwrap_err().sqlstate, "22023");
        let missing = check(d.path().join("nope").to_str().unwrap(), &[]).unwrap_err();
        assert_eq!(missing.sqlstate, "58P01");
        assert!(missing.message.contains("No such file or directory"));
        for pseudo in ["/proc/self/environ", "/dev/zero", "/sys/kernel"] {
            assert_eq!(check(pseudo, &[]).unwrap_err().sqlstate, "42501", "{pseudo}");
        }
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(check(fifo.to_str().unwrap(), &[]).unwrap_err().message.contains("not a regular file"));
    }
}
