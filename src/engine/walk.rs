//! Which files a path means: the file itself, or every regular file under a directory,
//! recursively, in path order. Names starting with `.` and symbolic links inside the
//! tree are skipped (and counted), as are sockets, FIFOs and devices, so a drop
//! directory's half-written `.tmp` files and stray links are never read.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{IoContext, Result};

/// One input file, with what identifies its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl FileEntry {
    fn from_meta(path: PathBuf, meta: &fs::Metadata) -> FileEntry {
        FileEntry { path, size: meta.len(), mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec() }
    }
}

/// The files under `path` and how many entries were skipped.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<FileEntry>,
    pub skipped: u64,
}

impl Listing {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// List the input files under `path`. The path itself may be a symbolic link (it was
/// named explicitly); links found inside a directory are not followed.
pub fn walk(path: &Path) -> Result<Listing> {
    let meta = fs::metadata(path).ctx("could not stat", path)?;
    let mut listing = Listing::default();
    if meta.is_dir() {
        walk_dir(path, &mut listing)?;
    } else if meta.is_file() {
        listing.files.push(FileEntry::from_meta(path.to_path_buf(), &meta));
    } else {
        return Err(super::Error::io(
            "not a regular file or directory:",
            path,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
    Ok(listing)
}

fn walk_dir(dir: &Path, listing: &mut Listing) -> Result<()> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).ctx("could not list directory", dir)? {
        let entry = entry.ctx("could not list directory", dir)?;
        entries.push(entry.path());
    }
    entries.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    for path in entries {
        let hidden = path.file_name().is_some_and(|n| n.as_bytes().starts_with(b"."));
        let meta = fs::symlink_metadata(&path).ctx("could not stat", &path)?;
        if hidden || meta.file_type().is_symlink() {
            listing.skipped += 1;
        } else if meta.is_dir() {
            walk_dir(&path, listing)?;
        } else if meta.is_file() {
            listing.files.push(FileEntry::from_meta(path, &meta));
        } else {
            listing.skipped += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_in_path_order_skipping_hidden_links_and_specials() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("b/c")).unwrap();
        fs::create_dir_all(p.join(".hidden")).unwrap();
        for f in ["z.txt", "a.txt", "b/c/x.gz", "b/y.txt", ".dot", ".hidden/h.txt"] {
            fs::write(p.join(f), b"x\n").unwrap();
        }
        std::os::unix::fs::symlink(p.join("a.txt"), p.join("link.txt")).unwrap();
        let fifo = std::ffi::CString::new(p.join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let l = walk(p).unwrap();
        let names: Vec<_> = l.files.iter().map(|f| f.path.strip_prefix(p).unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["a.txt", "b/c/x.gz", "b/y.txt", "z.txt"]);
        assert_eq!(l.skipped, 4); // .dot, .hidden, fifo, link.txt
        assert_eq!(l.total_bytes(), 8);
        assert_eq!(walk(&p.join("a.txt")).unwrap().files.len(), 1);
        let err = walk(&p.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("No such file"), "{err}");
    }
}
