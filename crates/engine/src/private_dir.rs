//! Private directories and files for temporary data.
//!
//! `store.temp_dir` may be a world-writable sticky directory such as `/tmp`, where
//! another OS user can create a name before we do: a directory of their own where a
//! job's directory should be, or a symbolic link where a run file should be, to read
//! what the job spills or to make it write over one of our files. So every directory
//! the engine makes is created with `mkdir` (never "create unless it exists") mode
//! 0700, every file with `O_CREAT | O_EXCL | O_NOFOLLOW` mode 0600, and a directory
//! that already exists (a kept sort from an earlier attempt) is trusted only after
//! [`verify`] has looked at it without following links: ours, 0700, a real directory.
//! The sticky bit on the parent, which [`check_parent`] insists on, keeps others from
//! renaming a verified directory away afterwards.
//!
//! Everything here that refuses a path for what it is (rather than failing on an OS
//! error) returns [`Error::Insecure`].

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::{Error, IoContext, Result};

/// Mode of every directory the engine creates: the owner only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the engine creates: the owner only.
pub(crate) const FILE_MODE: u32 = 0o600;

fn insecure(path: &Path, reason: impl Into<String>) -> Error {
    Error::Insecure { path: path.to_path_buf(), reason: reason.into() }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Create the directory `path` for a job: mode 0700, and only if nothing is there yet.
/// A name that exists already (a directory, a link, a file) is refused, whoever made
/// it: another user may have put it there to read or redirect what the job writes.
pub fn create(path: &Path) -> Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => verify(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(insecure(path, "exists and was not created by this job"))
        }
        Err(e) => Err(Error::io("could not create directory", path, e)),
    }
}

/// Create the directory `path` as [`create`] does, or take the one that is there if
/// [`verify`] passes: for a directory an earlier attempt of the same job made (a kept
/// sort to resume from).
pub fn ensure(path: &Path) -> Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => verify(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => verify(path),
        Err(e) => Err(Error::io("could not create directory", path, e)),
    }
}

/// Check that `path` itself (not what a link there points to) is a directory owned by
/// this process's effective user, with no permission for group or others. A missing
/// path is an [`Error::Io`] (`NotFound`); anything else wrong is [`Error::Insecure`].
pub fn verify(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).ctx("could not stat", path)?;
    check_private(path, &meta)
}

fn check_private(path: &Path, meta: &Metadata) -> Result<()> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(insecure(path, "a symbolic link, not a directory"));
    }
    if !kind.is_dir() {
        return Err(insecure(path, "not a directory"));
    }
    let me = euid();
    if meta.uid() != me {
        return Err(insecure(path, format!("owned by uid {}, not by this process's uid {me}", meta.uid())));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(insecure(path, format!("mode {mode:04o} lets group or others in (it must be {DIR_MODE:04o})")));
    }
    Ok(())
}

/// Check the directory that holds job directories (`store.temp_dir`), and every
/// directory above it: each must belong to root or to this process's user, and one that
/// others may write to must have the sticky bit. Whoever may rename entries of any of
/// them could swap the job's directory, or the temporary directory itself, for one of
/// their own between two of the job's opens (the owner of a directory may rename in it,
/// sticky bit or not). Links on the way are followed: they are the administrator's
/// choice, and the directories they lead to are the ones checked.
pub fn check_parent(dir: &Path) -> Result<()> {
    let meta = fs::metadata(dir).ctx("could not stat", dir)?;
    if !meta.is_dir() {
        return Err(insecure(dir, "not a directory"));
    }
    let real = fs::canonicalize(dir).ctx("could not resolve", dir)?;
    let me = euid();
    for d in real.ancestors() {
        let meta = fs::metadata(d).ctx("could not stat", d)?;
        let what = |why: String| {
            let of = if d == real { String::new() } else { format!(" (above {})", dir.display()) };
            insecure(d, format!("{why}{of}"))
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
            return Err(what(format!(
                "mode {mode:04o}: writable by group or others without the sticky bit (chmod +t), so they could rename job directories away"
            )));
        }
        if meta.uid() != 0 && meta.uid() != me {
            return Err(what(format!(
                "owned by uid {}, neither root nor this process's uid {me}: its owner could rename job directories away",
                meta.uid()
            )));
        }
    }
    Ok(())
}

/// Remove the job directory `path` and everything in it, if [`verify`] passes; links
/// inside are removed, never followed (`std::fs::remove_dir_all` opens each level with
/// `O_NOFOLLOW` since Rust 1.58.1, CVE-2022-21658). `Ok(false)` when nothing is there
/// or it is not ours to remove (another owner, a link, open to others).
pub fn remove(path: &Path) -> Result<bool> {
    match verify(path) {
        Ok(()) => {}
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(Error::Insecure { .. }) => return Ok(false),
        Err(e) => return Err(e),
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("could not remove", path, e)),
    }
}

/// Create the file `path` for writing: mode 0600, failing if any name is there
/// already (a link included, which is never followed).
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(FILE_MODE)
        .open(path)
}

/// Create a new file in `dir` named after `stem`, for a file to be renamed over
/// another one when complete: a name of its own, so a leftover of a crash (or a name
/// someone else made) is stepped around, never written through.
pub(crate) fn create_temp_file(dir: &Path, stem: &str) -> Result<(File, PathBuf)> {
    let pid = std::process::id();
    for attempt in 0..1000 {
        let path = dir.join(format!(".{stem}.{pid}.{attempt}.tmp"));
        match create_file(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("could not create", &path, e)),
        }
    }
    Err(insecure(dir, format!("a thousand names for a new {stem} are taken")))
}

/// Open a file the engine wrote, for reading, refusing a link in its place.
pub(crate) fn open_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink, PermissionsExt};

    const NOBODY: u32 = 65534;

    fn is_root() -> bool {
        euid() == 0
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn refused(r: Result<impl std::fmt::Debug>, path: &Path, says: &str) {
        match r {
            Err(e @ Error::Insecure { .. }) => {
                let m = e.to_string();
                assert!(m.contains(path.to_str().unwrap()) && m.contains(says), "{m}");
            }
            other => panic!("{} should be refused ({says}): {other:?}", path.display()),
        }
    }

    #[test]
    fn create_makes_a_private_directory_and_refuses_any_name_already_there() {
        let d = tempfile::tempdir().unwrap();
        let job = d.path().join("job-1");
        create(&job).unwrap();
        assert_eq!(mode_of(&job), 0o700);
        verify(&job).unwrap();
        // Pre-existing: a directory (even our own), a link (even a dangling one), a file.
        refused(create(&job), &job, "exists and was not created by this job");
        let link = d.path().join("job-2");
        symlink(d.path().join("elsewhere"), &link).unwrap();
        refused(create(&link), &link, "exists and was not created by this job");
        assert!(!d.path().join("elsewhere").exists(), "the link was not followed");
        let file = d.path().join("job-3");
        fs::write(&file, "x").unwrap();
        refused(create(&file), &file, "exists and was not created by this job");
        // ensure takes what is there only if it passes verify.
        ensure(&job).unwrap();
        refused(ensure(&link), &link, "symbolic link");
        let fresh = d.path().join("job-4");
        ensure(&fresh).unwrap();
        assert_eq!(mode_of(&fresh), 0o700);
    }

    #[test]
    fn verify_refuses_links_files_open_modes_and_other_owners() {
        let d = tempfile::tempdir().unwrap();
        let ours = d.path().join("ours");
        create(&ours).unwrap();
        let link = d.path().join("link");
        symlink(&ours, &link).unwrap();
        refused(verify(&link), &link, "a symbolic link, not a directory");
        let file = d.path().join("file");
        fs::write(&file, "x").unwrap();
        refused(verify(&file), &file, "not a directory");
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        refused(verify(&open), &open, "mode 0777");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o710)).unwrap();
        refused(verify(&open), &open, "mode 0710");
        let missing = d.path().join("missing");
        assert!(
            matches!(verify(&missing), Err(Error::Io { ref source, .. }) if source.kind() == io::ErrorKind::NotFound)
        );
        if is_root() {
            let theirs = d.path().join("theirs");
            create(&theirs).unwrap();
            chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
            refused(verify(&theirs), &theirs, "owned by uid 65534");
        }
    }

    #[test]
    fn check_parent_wants_a_directory_that_others_cannot_rename_in() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("store");
        fs::create_dir(&p).unwrap();
        for (mode, ok) in [(0o755, true), (0o700, true), (0o1777, true), (0o777, false), (0o775, false)] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            match ok {
                true => check_parent(&p).unwrap(),
                false => refused(check_parent(&p), &p, "without the sticky bit"),
            }
        }
        // A link to a good directory is the administrator's choice.
        let link = d.path().join("link");
        symlink(&p, &link).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o1777)).unwrap();
        check_parent(&link).unwrap();
        let file = d.path().join("file");
        fs::write(&file, "x").unwrap();
        refused(check_parent(&file), &file, "not a directory");
        assert!(matches!(check_parent(&d.path().join("missing")), Err(Error::Io { .. })));
        if is_root() {
            chown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
            refused(check_parent(&p), &p, "owned by uid 65534");
            chown(&p, Some(0), Some(0)).unwrap();
            check_parent(&p).unwrap();
            // A directory of ours inside one another user owns: they could swap it.
            let theirs = d.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
            let runs = theirs.join("runs");
            fs::create_dir(&runs).unwrap();
            fs::set_permissions(&runs, fs::Permissions::from_mode(0o700)).unwrap();
            refused(check_parent(&runs), &theirs, "owned by uid 65534");
        }
        // A parent others may write to without the sticky bit, above a good directory.
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let inner = open.join("runs");
        fs::create_dir(&inner).unwrap();
        refused(check_parent(&inner), &open, "without the sticky bit");
    }

    #[test]
    fn remove_takes_only_our_directories_and_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), "keep me").unwrap();

        let ours = d.path().join("ours");
        create(&ours).unwrap();
        fs::create_dir(ours.join("sub")).unwrap();
        fs::write(ours.join("sub/run"), "x").unwrap();
        symlink(&outside, ours.join("to-outside")).unwrap();
        symlink(outside.join("precious"), ours.join("sub/to-file")).unwrap();
        assert!(remove(&ours).unwrap());
        assert!(!ours.exists());
        assert_eq!(fs::read_to_string(outside.join("precious")).unwrap(), "keep me", "links inside were not followed");

        assert!(!remove(&ours).unwrap(), "nothing there");
        let link = d.path().join("link");
        let target = d.path().join("target");
        create(&target).unwrap();
        symlink(&target, &link).unwrap();
        assert!(!remove(&link).unwrap(), "a link is not ours to remove");
        assert!(target.exists() && fs::symlink_metadata(&link).is_ok());
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!remove(&open).unwrap());
        assert!(open.exists());
        let file = d.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(!remove(&file).unwrap());
        assert!(file.exists());
        if is_root() {
            let theirs = d.path().join("theirs");
            create(&theirs).unwrap();
            chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
            assert!(!remove(&theirs).unwrap());
            assert!(theirs.exists());
        }
    }

    #[test]
    fn files_are_created_exclusively_private_and_never_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run");
        drop(create_file(&p).unwrap());
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(create_file(&p).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let victim = d.path().join("victim");
        fs::write(&victim, "keep me").unwrap();
        let link = d.path().join("link");
        symlink(&victim, &link).unwrap();
        assert!(create_file(&link).is_err());
        assert!(open_file(&link).is_err(), "a link is not read through either");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
        // A temporary name steps around what is there.
        let (_, a) = create_temp_file(d.path(), "manifest.json").unwrap();
        let (_, b) = create_temp_file(d.path(), "manifest.json").unwrap();
        assert_ne!(a, b);
        assert_eq!(mode_of(&a), 0o600);
    }
}
