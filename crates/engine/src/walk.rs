//! Which files a path means, opened so that nothing can lead a job out of the tree it
//! was given.
//!
//! [`walk`] opens the path one component at a time from `/`, refusing a symbolic link
//! at every step, and keeps the resulting directory open as a [`Tree`]. Every file is
//! listed and later opened *relative to that descriptor*, component by component, again
//! refusing links; so a directory swapped for a link after the path was checked against
//! `store.allowed_dirs` (or after the listing) is never followed. A file swapped for a
//! FIFO or a device is refused too (opened non-blocking, then checked).
//!
//! Inside a directory, names starting with `.` (a drop directory's half-written `.tmp`
//! files), symbolic links, sockets, FIFOs and devices are skipped, and listed in
//! [`Listing::skipped`] with the reason, so a DBA can see why a file was not read. An entry
//! that vanishes or cannot be read while it is listed (a log rotation, a subdirectory
//! without permission) is recorded in [`Listing::failed`] with its OS error, and the
//! rest of the tree is listed: one bad entry does not fail a hundred good files.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, CWD};
use serde::{Deserialize, Serialize};

use super::error::{Error, IoContext, Result};

/// A path as text for the database: its bytes when they are UTF-8 (as they nearly always
/// are), else with each byte that is not part of a valid character written as `\xHH`.
/// Two different paths stay two different texts, so no two files share a row.
pub fn path_text(p: &Path) -> String {
    let mut bytes = p.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, bad) = bytes.split_at(e.valid_up_to());
                // SAFETY: `valid_up_to` bytes were just checked.
                out.push_str(unsafe { std::str::from_utf8_unchecked(good) });
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("\\x{b:02X}"));
                }
                bytes = &bad[n..];
            }
        }
    }
}

/// A path (de)serialised as its raw bytes.
mod path_bytes {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    pub(super) fn serialize<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(p.as_os_str().as_bytes(), s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes: Vec<u8> = serde::Deserialize::deserialize(d)?;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
    }
}

/// What tells one version of a file from another without reading it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Identity {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode change time, nanoseconds since the epoch: moves on every write, rename or
    /// `touch -m`, and cannot be set back by a user, so a file rewritten with its old
    /// size and mtime still shows.
    pub ctime_ns: i64,
    pub inode: u64,
}

impl Identity {
    pub(crate) fn of(file: &File) -> io::Result<Identity> {
        let m = file.metadata()?;
        Ok(Identity {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            inode: m.ino(),
        })
    }
}

/// One input file, as listed: its path, its identity and a content fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its absolute path. Serialised as its bytes: a file name need not be UTF-8.
    #[serde(with = "path_bytes")]
    pub path: PathBuf,
    /// Bytes on disk (compressed size for a compressed file).
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// A cheap content fingerprint: FNV-1a of the size and the first and last 64 KiB.
    /// With the rest it tells a file that was replaced or rewritten from one left alone.
    pub fingerprint: String,
}

impl FileEntry {
    pub(crate) fn identity(&self) -> Identity {
        Identity { size: self.size, mtime_ns: self.mtime_ns, ctime_ns: self.ctime_ns, inode: self.inode }
    }

    /// An entry for a file the caller vouches for (tests, resumed plans): no fingerprint.
    pub(crate) fn new(path: PathBuf, id: Identity) -> FileEntry {
        FileEntry {
            path,
            size: id.size,
            mtime_ns: id.mtime_ns,
            ctime_ns: id.ctime_ns,
            inode: id.inode,
            fingerprint: String::new(),
        }
    }
}

/// An entry that could not be listed or opened, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedEntry {
    /// Its path.
    pub path: PathBuf,
    /// What went wrong, with the OS error.
    pub error: String,
}

/// An entry passed over by design, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedEntry {
    /// Its path.
    pub path: PathBuf,
    /// A few words for the DBA: "hidden: its name starts with '.'", "a symbolic link",
    /// "a socket", "a FIFO", "a device" or "not a regular file or directory".
    pub reason: &'static str,
}

pub(crate) const SKIPPED_HIDDEN: &str = "hidden: its name starts with '.'";
pub(crate) const SKIPPED_LINK: &str = "a symbolic link";
pub(crate) const SKIPPED_SOCKET: &str = "a socket";
pub(crate) const SKIPPED_FIFO: &str = "a FIFO";
pub(crate) const SKIPPED_DEVICE: &str = "a device";
/// A type the OS did not name: none of the above, nor a file or a directory.
pub(crate) const SKIPPED_OTHER: &str = "not a regular file or directory";

/// The files under a path, the entries that failed, and those skipped by design.
#[derive(Debug, Default)]
pub struct Listing {
    /// The regular files, in bytewise path order.
    pub files: Vec<FileEntry>,
    /// Entries that could not be listed or opened: the rest of the tree was listed.
    pub failed: Vec<FailedEntry>,
    /// Entries passed over by design (hidden names, symbolic links, special files),
    /// in listing order. A hidden directory is one entry: nothing under it is looked at.
    pub skipped: Vec<SkippedEntry>,
}

impl Listing {
    /// Bytes of all the files, on disk.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// The opened root of a job: a directory, or the directory holding a single file.
#[derive(Debug)]
pub struct Tree {
    /// The path as given (absolute, without `..` or links: what was checked).
    root: PathBuf,
    /// The root directory (or the single file's parent), opened link by link.
    dir: OwnedFd,
    /// The single file's name when the root is a file.
    single: Option<PathBuf>,
}

fn os_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
const PATH_FLAGS: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Open a regular file in `dir`, refusing a link (`ELOOP`), a FIFO (never blocks) or a
/// device (`InvalidInput`, "not a regular file").
fn open_file_at(dir: impl AsFd, name: &Path) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = openat(dir, name, flags, Mode::empty()).map_err(os_err)?;
    let f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let flags = rustix::fs::fcntl_getfl(&f).map_err(os_err)?;
    rustix::fs::fcntl_setfl(&f, flags - OFlags::NONBLOCK).map_err(os_err)?;
    Ok(f)
}

impl Tree {
    /// Open `path` (absolute, as checked: no `..`, no links) one component at a time.
    pub(crate) fn open(path: &Path) -> Result<Tree> {
        let refused =
            |why: &str| Error::io("could not open", path, io::Error::new(io::ErrorKind::InvalidInput, why.to_string()));
        if !path.is_absolute() {
            return Err(refused("not an absolute path"));
        }
        let mut names = Vec::new();
        for c in path.components() {
            match c {
                Component::RootDir => {}
                Component::Normal(n) => names.push(n),
                _ => return Err(refused("a path with . or .. components")),
            }
        }
        let mut dir =
            openat(CWD, "/", PATH_FLAGS, Mode::empty()).map_err(os_err).ctx("could not open", Path::new("/"))?;
        let Some((last, parents)) = names.split_last() else {
            let dir = openat(CWD, "/", DIR_FLAGS, Mode::empty()).map_err(os_err).ctx("could not open", path)?;
            return Ok(Tree { root: path.to_path_buf(), dir, single: None });
        };
        for n in parents {
            // A link in any component is ELOOP (or ENOTDIR): never followed.
            dir = openat(&dir, *n, PATH_FLAGS, Mode::empty()).map_err(os_err).ctx("could not open", path)?;
        }
        let st = statat(&dir, *last, AtFlags::SYMLINK_NOFOLLOW).map_err(os_err).ctx("could not stat", path)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let d = openat(&dir, *last, DIR_FLAGS, Mode::empty()).map_err(os_err).ctx("could not open", path)?;
                Ok(Tree { root: path.to_path_buf(), dir: d, single: None })
            }
            FileType::RegularFile => Ok(Tree { root: path.to_path_buf(), dir, single: Some(PathBuf::from(last)) }),
            FileType::Symlink => Err(Error::io("could not open", path, io::Error::from_raw_os_error(libc::ELOOP))),
            _ => Err(refused("not a regular file or directory")),
        }
    }

    /// Open a listed file again, relative to the tree, refusing links at every step.
    pub(crate) fn open_file(&self, path: &Path) -> io::Result<File> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "outside the tree"))?;
        if let Some(name) = &self.single {
            if !rel.as_os_str().is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "outside the tree"));
            }
            return open_file_at(&self.dir, name);
        }
        let names: Vec<&OsStr> = rel
            .components()
            .map(|c| match c {
                Component::Normal(n) => Ok(n),
                _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "outside the tree")),
            })
            .collect::<io::Result<_>>()?;
        let Some((last, parents)) = names.split_last() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        };
        let mut cur: Option<OwnedFd> = None;
        for n in parents {
            let next = match &cur {
                Some(d) => openat(d, *n, PATH_FLAGS, Mode::empty()),
                None => openat(&self.dir, *n, PATH_FLAGS, Mode::empty()),
            };
            cur = Some(next.map_err(os_err)?);
        }
        match &cur {
            Some(d) => open_file_at(d, Path::new(last)),
            None => open_file_at(&self.dir, Path::new(last)),
        }
    }

    /// List the files of the tree, in bytewise path order.
    pub(crate) fn list(&self) -> Result<Listing> {
        let mut listing = Listing::default();
        match &self.single {
            Some(name) => {
                // The path named one file: it must be readable, or the job has nothing to do.
                let f = open_file_at(&self.dir, name).ctx("could not open", &self.root)?;
                listing.files.push(entry(self.root.clone(), &f).ctx("could not read", &self.root)?);
            }
            None => {
                let dir = rustix::io::dup(&self.dir).map_err(os_err).ctx("could not list directory", &self.root)?;
                list_dir(dir, &self.root, &mut listing).ctx("could not list directory", &self.root)?;
            }
        }
        Ok(listing)
    }
}

/// Identity and fingerprint of an open file.
fn entry(path: PathBuf, f: &File) -> io::Result<FileEntry> {
    let id = Identity::of(f)?;
    let fingerprint = fingerprint(f, id.size)?;
    Ok(FileEntry { fingerprint, ..FileEntry::new(path, id) })
}

/// List `dir` (whose path is `path`) into `listing`. Errors on the directory itself are
/// returned; errors on its entries are recorded.
fn list_dir(dir: OwnedFd, path: &Path, listing: &mut Listing) -> io::Result<()> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    for e in Dir::read_from(&dir).map_err(os_err)? {
        let e = e.map_err(os_err)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    for name in names {
        let name = OsStr::from_bytes(&name);
        let child = path.join(name);
        if name.as_bytes().starts_with(b".") {
            listing.skipped.push(SkippedEntry { path: child, reason: SKIPPED_HIDDEN });
            continue;
        }
        let mut fail = |what: &str, e: io::Error| {
            listing.failed.push(FailedEntry { error: format!("{what} {}: {e}", child.display()), path: child.clone() })
        };
        let st = match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) => {
                fail("could not stat", os_err(e));
                continue;
            }
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => match openat(&dir, name, DIR_FLAGS, Mode::empty()) {
                Ok(sub) => {
                    if let Err(e) = list_dir(sub, &child, listing) {
                        listing.failed.push(FailedEntry {
                            error: format!("could not list directory {}: {e}", child.display()),
                            path: child,
                        });
                    }
                }
                Err(e) => fail("could not open directory", os_err(e)),
            },
            FileType::RegularFile => match open_file_at(&dir, Path::new(name)).and_then(|f| entry(child.clone(), &f)) {
                Ok(fe) => listing.files.push(fe),
                Err(e) => fail("could not open", e),
            },
            other => {
                let reason = match other {
                    FileType::Symlink => SKIPPED_LINK,
                    FileType::Socket => SKIPPED_SOCKET,
                    FileType::Fifo => SKIPPED_FIFO,
                    FileType::CharacterDevice | FileType::BlockDevice => SKIPPED_DEVICE,
                    _ => SKIPPED_OTHER,
                };
                listing.skipped.push(SkippedEntry { path: child, reason });
            }
        }
    }
    Ok(())
}

/// List the files under `path` (absolute, without links or `..`): the opened tree and
/// its listing.
pub fn walk(path: &Path) -> Result<(Tree, Listing)> {
    let tree = Tree::open(path)?;
    let listing = tree.list()?;
    Ok((tree, listing))
}

/// Bytes hashed at each end of a file for its fingerprint (64 KiB).
const FINGERPRINT_SPAN: u64 = 64 << 10;

/// A cheap content fingerprint: FNV-1a (64-bit, stable across versions and platforms)
/// of the size and the first and last 64 KiB. With the identity it tells a file that
/// was replaced or rewritten from one left alone, without reading it whole.
pub(crate) fn fingerprint(mut f: &File, size: u64) -> io::Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(&size.to_le_bytes());
    let mut buf = Vec::with_capacity(FINGERPRINT_SPAN as usize);
    f.seek(SeekFrom::Start(0))?;
    f.take(FINGERPRINT_SPAN).read_to_end(&mut buf)?;
    feed(&buf);
    if size > FINGERPRINT_SPAN {
        // The last 64 KiB, or what follows the head if the file is shorter than 128 KiB.
        f.seek(SeekFrom::Start(size.saturating_sub(FINGERPRINT_SPAN).max(FINGERPRINT_SPAN)))?;
        buf.clear();
        f.take(FINGERPRINT_SPAN).read_to_end(&mut buf)?;
        feed(&buf);
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(format!("{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn names(root: &Path, l: &Listing) -> Vec<String> {
        l.files.iter().map(|f| f.path.strip_prefix(root).unwrap().to_str().unwrap().to_string()).collect()
    }

    #[test]
    fn walks_in_path_order_skipping_hidden_links_and_specials() {
        let d = tempfile::tempdir().unwrap();
        let p = &d.path().canonicalize().unwrap();
        fs::create_dir_all(p.join("b/c")).unwrap();
        fs::create_dir_all(p.join(".hidden")).unwrap();
        for f in ["z.txt", "a.txt", "b/c/x.gz", "b/y.txt", ".dot", ".hidden/h.txt"] {
            fs::write(p.join(f), b"x\n").unwrap();
        }
        std::os::unix::fs::symlink(p.join("a.txt"), p.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(p.join("b"), p.join("linkdir")).unwrap();
        let fifo = std::ffi::CString::new(p.join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let sock = std::os::unix::net::UnixListener::bind(p.join("b/sock")).unwrap();
        fs::write(p.join("b/.part.tmp"), b"half\n").unwrap();

        let (tree, l) = walk(p).unwrap();
        drop(sock);
        assert_eq!(names(p, &l), ["a.txt", "b/c/x.gz", "b/y.txt", "z.txt"]);
        let skipped: Vec<(String, &str)> = l
            .skipped
            .iter()
            .map(|s| (s.path.strip_prefix(p).unwrap().to_str().unwrap().to_string(), s.reason))
            .collect();
        let want = [
            (".dot", "hidden: its name starts with '.'"),
            (".hidden", "hidden: its name starts with '.'"),
            ("b/.part.tmp", "hidden: its name starts with '.'"),
            ("b/sock", "a socket"),
            ("fifo", "a FIFO"),
            ("link.txt", "a symbolic link"),
            ("linkdir", "a symbolic link"),
        ];
        assert_eq!(skipped, want.map(|(p, r)| (p.to_string(), r)), "in listing order, with the reason");
        assert!(l.failed.is_empty());
        assert_eq!(l.total_bytes(), 8);
        let (_, one) = walk(&p.join("a.txt")).unwrap();
        assert_eq!(one.files.len(), 1);
        assert_eq!(l.files[0].fingerprint, l.files[3].fingerprint, "same content, same fingerprint");
        let mut s = String::new();
        tree.open_file(&p.join("b/y.txt")).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "x\n");
        let err = walk(&p.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("No such file"), "{err}");
        // A device node can be made only as root.
        if unsafe { libc::geteuid() } == 0 {
            let dev = p.join("b/c/null");
            let c = std::ffi::CString::new(dev.as_os_str().as_bytes()).unwrap();
            assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) }, 0);
            let (_, l) = walk(&p.join("b/c")).unwrap();
            assert_eq!(l.skipped, [SkippedEntry { path: dev, reason: "a device" }]);
        }
    }

    #[test]
    fn paths_that_are_not_utf8_become_distinct_texts() {
        use std::os::unix::ffi::OsStrExt;
        let a = Path::new(OsStr::from_bytes(b"/d/a\xff.txt"));
        let b = Path::new(OsStr::from_bytes(b"/d/a\xfe.txt"));
        assert_eq!(path_text(a), "/d/a\\xFF.txt");
        assert_ne!(path_text(a), path_text(b));
        assert_eq!(path_text(Path::new("/d/é.txt")), "/d/é.txt");
    }

    #[test]
    fn fingerprint_sees_a_change_at_either_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        fs::write(&p, &big).unwrap();
        let fp = |p: &Path| {
            let f = File::open(p).unwrap();
            fingerprint(&f, f.metadata().unwrap().len()).unwrap()
        };
        let before = fp(&p);
        let mut tail = big.clone();
        *tail.last_mut().unwrap() ^= 1;
        fs::write(&p, &tail).unwrap();
        assert_ne!(before, fp(&p), "a change in the last 64 KiB shows");
    }

    #[test]
    fn a_directory_swapped_for_a_link_after_listing_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let p = &d.path().canonicalize().unwrap();
        let root = p.join("allowed");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("sub/a.txt"), "a\n").unwrap();
        fs::create_dir_all(p.join("secret")).unwrap();
        fs::write(p.join("secret/a.txt"), "secret\n").unwrap();
        let (tree, l) = walk(&root).unwrap();
        assert_eq!(l.files.len(), 1);
        // After listing: sub becomes a link to the secret directory.
        fs::rename(root.join("sub"), p.join("old-sub")).unwrap();
        std::os::unix::fs::symlink(p.join("secret"), root.join("sub")).unwrap();
        let e = tree.open_file(&l.files[0].path).unwrap_err();
        assert!(e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR), "{e}");
        // The root itself swapped for a link between the check and the walk: refused too.
        fs::rename(&root, p.join("old-root")).unwrap();
        std::os::unix::fs::symlink(p.join("secret"), &root).unwrap();
        let e = walk(&root).unwrap_err().to_string();
        assert!(e.contains("symbolic links") || e.contains("Not a directory") || e.contains("os error 40"), "{e}");
        // And a link above the root.
        let e = walk(&root.join("a.txt")).unwrap_err().to_string();
        assert!(e.contains("os error 40") || e.contains("Not a directory") || e.contains("symbolic links"), "{e}");
    }

    /// Runs the listing of a tree with an unreadable subdirectory and file as a user
    /// the permission bits apply to: itself when not root, else a copy of this test
    /// binary running as `nobody`.
    #[test]
    fn unreadable_entries_are_recorded_and_the_rest_listed() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        if let Some(p) = std::env::var_os("PG_STORE_WALK_AS_NOBODY") {
            let p = PathBuf::from(p);
            let (_, l) = walk(&p).unwrap();
            assert_eq!(names(&p, &l), ["ok.txt"]);
            let failed: Vec<_> =
                l.failed.iter().map(|f| f.path.file_name().unwrap().to_str().unwrap().to_string()).collect();
            assert_eq!(failed, ["locked", "noread.txt"]);
            assert!(l.failed.iter().all(|f| f.error.contains("Permission denied")), "{:?}", l.failed);
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().canonicalize().unwrap();
        fs::create_dir_all(p.join("locked")).unwrap();
        fs::write(p.join("ok.txt"), "ok\n").unwrap();
        fs::write(p.join("locked/x.txt"), "x\n").unwrap();
        fs::write(p.join("noread.txt"), "n\n").unwrap();
        fs::set_permissions(p.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(p.join("noread.txt"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "walk::tests::unreadable_entries_are_recorded_and_the_rest_listed", "--nocapture"]);
        cmd.env("PG_STORE_WALK_AS_NOBODY", &p);
        if unsafe { libc::geteuid() } == 0 {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    }
}
