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

/// Open a file listed as regular, refusing what it may have been swapped for since:
/// a symbolic link (which could point outside `store.allowed_dirs`), a FIFO (whose
/// open would block until a writer came), a device. Errors are `InvalidInput`
/// ("not a regular file") or the OS's (`ELOOP` for a link, `ENOENT` if it vanished).
pub fn open_regular(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    // SAFETY: plain fcntl on a descriptor we own; clears O_NONBLOCK for ordinary reads.
    let fd = f.as_raw_fd();
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Bytes hashed at each end of a file for its fingerprint (64 KiB).
const FINGERPRINT_SPAN: u64 = 64 << 10;

/// A cheap content fingerprint: FNV-1a (64-bit, stable across versions and platforms)
/// of the size and the first and last 64 KiB. With size and mtime it tells a file that
/// was replaced or rewritten from one left alone, without reading it whole.
pub fn fingerprint(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = open_regular(path).ctx("could not open", path)?;
    let size = f.metadata().ctx("could not stat", path)?.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(&size.to_le_bytes());
    let mut buf = Vec::with_capacity(FINGERPRINT_SPAN as usize);
    f.by_ref().take(FINGERPRINT_SPAN).read_to_end(&mut buf).ctx("could not read", path)?;
    feed(&buf);
    if size > FINGERPRINT_SPAN {
        // The last 64 KiB, or what follows the head if the file is shorter than 128 KiB.
        f.seek(SeekFrom::Start(size.saturating_sub(FINGERPRINT_SPAN).max(FINGERPRINT_SPAN))).ctx("could not seek", path)?;
        buf.clear();
        f.take(FINGERPRINT_SPAN).read_to_end(&mut buf).ctx("could not read", path)?;
        feed(&buf);
    }
    Ok(format!("{h:016x}"))
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
        let fp = fingerprint(&p.join("a.txt")).unwrap();
        assert_eq!(fp, fingerprint(&p.join("z.txt")).unwrap(), "same content, same fingerprint");
        fs::write(p.join("a.txt"), b"y\n").unwrap();
        assert_ne!(fp, fingerprint(&p.join("a.txt")).unwrap());
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        fs::write(p.join("big"), &big).unwrap();
        let fb = fingerprint(&p.join("big")).unwrap();
        let mut tail = big.clone();
        *tail.last_mut().unwrap() ^= 1;
        fs::write(p.join("big"), &tail).unwrap();
        assert_ne!(fb, fingerprint(&p.join("big")).unwrap(), "a change in the last 64 KiB shows");
        let err = walk(&p.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("No such file"), "{err}");
    }
}
