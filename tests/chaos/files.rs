//! Files that change while a job runs (appended, truncated, deleted, replaced, swapped
//! for a symlink after the listing), files that cannot be read, and odd input.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{readable_dir, BIN};
use crate::ctx::{union, want_of, Check, Ctx, Want};
use store_testkit::{generate, line_for, GenSpec};

/// A directory whose first file takes the job a while to read (many repeats of few
/// lines: long to scan, quick to insert), so a later file can be changed after the
/// job listed it and before it reads it.
pub fn slow_dir(x: &Ctx, name: &str) -> PathBuf {
    let dir = readable_dir(&x.c.dir.join(name));
    let mut block = Vec::new();
    for i in 0..20_000u64 {
        block.extend(line_for(i, 99));
        block.push(b'\n');
    }
    let mut big = Vec::with_capacity(200 << 20);
    while big.len() < 200 << 20 {
        big.extend_from_slice(&block);
    }
    fs::write(dir.join("a-big.txt"), &big).unwrap();
    dir
}

fn victim(dir: &Path, seed: u64, n: u64) -> PathBuf {
    let p = dir.join("z-victim.txt");
    let mut v = Vec::new();
    for i in 0..n {
        v.extend(line_for(i, seed));
        v.push(b'\n');
    }
    fs::write(&p, v).unwrap();
    p
}

/// Where to write a replacement before renaming it over `v` (hidden: never listed).
fn replacement_path(v: &Path) -> PathBuf {
    v.parent().unwrap().join(".replacement")
}

pub fn wait_scanning(x: &Ctx, job: i64) {
    let t = Instant::now();
    while x.q(&format!("SELECT coalesce(phase, '') FROM store.jobs WHERE id = {job}")).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "job {job} never started scanning");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Change the victim after the job listed it; the job must record it, and a re-run
/// must leave the table between "everything now there" and "everything ever there".
fn mutation(x: &mut Ctx, dir: &Path, what: &str, change: impl FnOnce(&Path)) -> Check {
    let v = victim(dir, 1000 + x.tables as u64, 5000);
    let before = want_of(dir);
    let t = x.target();
    let job = x.ingest(dir, &t);
    wait_scanning(x, job);
    change(&v);
    if what == "deleted" {
        x.partial(job)?;
    } else {
        x.done(job)?;
    }
    let state = x.q(&format!(
        "SELECT state || ':' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%z-victim.txt'"
    ));
    let expect = if what == "deleted" { "failed:" } else { "changed:" };
    if !state.starts_with(expect) {
        return Err(format!("victim recorded as {state:?}, expected {expect}"));
    }
    let after = want_of(dir);
    let again = x.ingest(dir, &t);
    x.done(again)?;
    let reread = x.q(&format!("SELECT coalesce(string_agg(state, ','), '') FROM store.files WHERE job = {again} AND path LIKE '%z-victim.txt'"));
    let (n, _) = x.bounds(&t, &after.lines, &union(&before.lines, &after.lines))?;
    if what != "deleted" && reread != "done" {
        return Err(format!("the re-run recorded the victim as {reread:?}, not done (read)"));
    }
    x.q(&format!("DROP TABLE {t}"));
    let _ = fs::remove_file(&v);
    Ok(format!("recorded {state}; after the re-run {n} lines, all of the file as it is now"))
}

fn exact_dir(x: &mut Ctx, dir: &Path) -> Result<(i64, Want), String> {
    let want = want_of(dir);
    let t = x.target();
    let job = x.ingest(dir, &t);
    x.done(job)?;
    x.exact(&t, &want, Some(job))?;
    x.q(&format!("DROP TABLE {t}"));
    Ok((job, want))
}

pub fn files(x: &mut Ctx) {
    println!("chaos: files that change, odd files");
    let secret = changing(x);
    odd(x, &secret);
}

/// Files changed after the job listed them and before it read them (a file outside the
/// directory, `secret.txt`, is the target of a symlink swapped in): recorded, and a
/// re-run holds the files as they are now. Returns the secret file's path.
fn changing(x: &mut Ctx) -> PathBuf {
    let dir = slow_dir(x, "slow");
    x.fault("file appended to after listing", |x| {
        mutation(x, &dir, "appended", |v| {
            let mut extra = Vec::new();
            for i in 0..3000u64 {
                extra.extend(line_for(i, 777));
                extra.push(b'\n');
            }
            let mut f = fs::OpenOptions::new().append(true).open(v).unwrap();
            std::io::Write::write_all(&mut f, &extra).unwrap();
        })
    });
    x.fault("file truncated after listing", |x| {
        mutation(x, &dir, "truncated", |v| {
            let f = fs::OpenOptions::new().write(true).open(v).unwrap();
            f.set_len(fs::metadata(v).unwrap().len() / 3).unwrap();
        })
    });
    x.fault("file deleted after listing", |x| mutation(x, &dir, "deleted", |v| fs::remove_file(v).unwrap()));
    x.fault("file replaced (rename over) after listing", |x| {
        mutation(x, &dir, "replaced", |v| {
            // New content written beside it, then renamed over it (a new inode).
            let tmp = replacement_path(v);
            let mut body = Vec::new();
            for i in 0..4000u64 {
                body.extend(line_for(i, 4242));
                body.push(b'\n');
            }
            fs::write(&tmp, body).unwrap();
            fs::rename(&tmp, v).unwrap();
        })
    });
    let secret = x.c.dir.join("secret.txt");
    fs::write(&secret, "a secret line outside the directory\n").unwrap();
    x.fault("file swapped for a symlink out of the directory after listing", |x| {
        let v = victim(&dir, 5, 2000);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        wait_scanning(x, job);
        fs::remove_file(&v).unwrap();
        std::os::unix::fs::symlink(&secret, &v).unwrap();
        x.partial(job)?;
        let state = x.q(&format!("SELECT state || ':' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%z-victim.txt'"));
        let leaked = x.num(&format!("SELECT count(*) FROM {t} WHERE line LIKE 'a secret%'"));
        fs::remove_file(&v).unwrap();
        x.q(&format!("DROP TABLE {t}"));
        if leaked != 0 || !state.starts_with("failed:") {
            return Err(format!("secret rows {leaked}, victim {state}"));
        }
        Ok(state)
    });
    fs::remove_dir_all(&dir).unwrap();
    secret
}

/// Files that cannot be read, and odd input: many tiny files, none, an empty file, a
/// binary, one huge record, links and a FIFO (to `secret`, `/dev/zero`) inside the
/// directory, a filter that would backtrack catastrophically.
fn odd(x: &mut Ctx, secret: &Path) {
    x.fault("unreadable file: recorded failed, the rest ingested (partial); re-run after chmod is exact", |x| {
        let dir = readable_dir(&x.c.dir.join("unreadable"));
        generate(&dir, &GenSpec { files: 3, size: 200_000, seed: 31, ..GenSpec::default() }).unwrap();
        let locked = dir.join("locked.txt");
        fs::write(&locked, "locked one\nlocked two\n").unwrap();
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let without = want_of(&dir);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        let s = x.end_of(job, Duration::from_secs(60))?;
        let err = x.q(&format!("SELECT state || ': ' || coalesce(error, '') FROM store.files WHERE job = {job} AND path LIKE '%locked.txt'"));
        if s != "partial" || !err.starts_with("failed: ") || !err.contains("Permission denied") {
            return Err(format!("job {job} ended {s}; locked.txt {err}"));
        }
        let mut rest = without.lines.clone();
        rest.remove(&b"locked one"[..]);
        rest.remove(&b"locked two"[..]);
        x.bounds(&t, &rest, &rest)?;
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let want = want_of(&dir);
        let again = x.ingest(&dir, &t);
        x.done(again)?;
        x.exact(&t, &want, None)?;
        let read = x.q(&format!("SELECT files_skipped || ' skipped, ' || inserted || ' inserted' FROM store.status WHERE id = {again}"));
        Ok(format!("{err}; the re-run: {read}"))
    });

    x.fault("10,000 tiny files", |x| {
        let dir = readable_dir(&x.c.dir.join("tiny"));
        for i in 0..10_000u64 {
            let body = format!("{}\n{}\nshared line {}\n", String::from_utf8(line_for(i, 3)).unwrap(), i, i % 100);
            fs::write(dir.join(format!("f{i:05}.txt")), body).unwrap();
        }
        let t0 = Instant::now();
        let (job, want) = exact_dir(x, &dir)?;
        let files = x.num(&format!("SELECT count(*) FROM store.files WHERE job = {job} AND state = 'done'"));
        fs::remove_dir_all(&dir).unwrap();
        if files != 10_000 {
            return Err(format!("{files} files recorded read"));
        }
        Ok(format!("{} distinct lines in {:.1} s", want.e.distinct, t0.elapsed().as_secs_f64()))
    });

    x.fault("empty directory", |x| {
        let dir = readable_dir(&x.c.dir.join("empty"));
        let (job, _) = exact_dir(x, &dir)?;
        Ok(format!(
            "job {job}: {}",
            x.q(&format!("SELECT files_total || ' files, ' || inserted || ' rows' FROM store.status WHERE id = {job}"))
        ))
    });

    x.fault("0-byte file", |x| {
        let dir = readable_dir(&x.c.dir.join("zero"));
        fs::write(dir.join("empty.txt"), "").unwrap();
        let (job, _) = exact_dir(x, &dir)?;
        let st = x.q(&format!("SELECT state FROM store.files WHERE job = {job}"));
        if st != "done" {
            return Err(format!("file recorded {st}"));
        }
        Ok(String::new())
    });

    x.fault("binary file (an ELF executable)", |x| {
        let dir = readable_dir(&x.c.dir.join("elf"));
        fs::copy(format!("{BIN}/postgres"), dir.join("postgres.bin")).unwrap();
        let (_, want) = exact_dir(x, &dir)?;
        Ok(format!(
            "{} records: {} rejected (recorded), {} distinct valid lines stored",
            want.e.records, want.e.rejected, want.e.distinct
        ))
    });

    x.fault("one 200 MB record with no newline", |x| {
        let dir = readable_dir(&x.c.dir.join("oneline"));
        fs::write(dir.join("one.txt"), vec![b'x'; 200 << 20]).unwrap();
        let t = x.target();
        let job = x.ingest(&dir, &t);
        x.done(job)?;
        let row = x.q(&format!(
            "SELECT reason || ' ' || line || ' ' || octet_length(raw) FROM store.rejects WHERE job = {job}"
        ));
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        let peak = x.num(&format!("SELECT coalesce(memory_peak, 0) FROM store.jobs WHERE id = {job}"));
        fs::remove_dir_all(&dir).unwrap();
        if row != "too_long 1 1024" || rows != 0 {
            return Err(format!("reject {row:?}, {rows} rows"));
        }
        if peak > 200 << 20 {
            return Err(format!("the worker's memory peaked at {} MiB", peak >> 20));
        }
        Ok(format!("rejected as too_long (line 1, 1 KiB prefix kept); worker peak {} MiB", peak >> 20))
    });

    x.fault("symlink inside the directory pointing out of it is not followed", |x| {
        let dir = readable_dir(&x.c.dir.join("links"));
        fs::write(dir.join("a.txt"), "inside\n").unwrap();
        std::os::unix::fs::symlink(secret, dir.join("b.txt")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("c.txt")).unwrap();
        let fifo = std::ffi::CString::new(dir.join("d.fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let t = x.target();
        let job = x.ingest(&dir, &t);
        x.done(job)?;
        let lines = x.q(&format!("SELECT string_agg(line, ',') FROM {t}"));
        if lines != "inside" {
            return Err(format!("read {lines:?}"));
        }
        Ok(x.q(&format!(
            "SELECT files_total || ' file read, links and the FIFO skipped' FROM store.status WHERE id = {job}"
        )))
    });

    x.fault("catastrophic-backtracking filter runs in linear time", |x| {
        let dir = readable_dir(&x.c.dir.join("regex"));
        let mut body = Vec::new();
        for i in 0..2000 {
            body.extend(vec![b'a'; 30_000 + i]);
            body.extend(b"!\n");
        }
        fs::write(dir.join("a.txt"), body).unwrap();
        x.q("CREATE TABLE chaos_regex (line text UNIQUE)");
        let t0 = Instant::now();
        let job: i64 = x
            .q(&format!("SELECT store_ingest('{}', 'chaos_regex', filter => '^(a+)+$')", dir.display()))
            .parse()
            .unwrap();
        x.done(job)?;
        let secs = t0.elapsed().as_secs_f64();
        let filtered = x.num(&format!("SELECT filtered FROM store.status WHERE id = {job}"));
        if filtered != 2000 || secs > 60.0 {
            return Err(format!("filtered {filtered} in {secs:.1} s"));
        }
        Ok(format!("2,000 lines of 30 KB against ^(a+)+$ in {secs:.1} s"))
    });
}
