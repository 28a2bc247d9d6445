//! Temporary space running out: `store.temp_dir` on a 20 MB tmpfs. Refused up front
//! when the input cannot fit; with the check off, ENOSPC while spilling fails the job
//! cleanly (nothing left behind, the rows those of committed batches); a re-run with
//! enough space completes exactly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ctx::Ctx;

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

pub fn temp_space(x: &mut Ctx) {
    println!("chaos: store.temp_dir on a 20 MB tmpfs");
    let mnt = x.c.dir.join("tmpfs");
    fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", mnt.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        x.record("temporary space", Err("could not mount a tmpfs (root needed)".into()), Duration::ZERO);
        return;
    }
    Command::new("chown").args(["postgres", mnt.to_str().unwrap()]).status().unwrap();
    x.c.reload(&format!("ALTER SYSTEM SET store.temp_dir = '{}'", mnt.display()));
    let mut failed_tables = Vec::new();

    x.fault("temp space: refused up front when the input cannot fit", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        failed_tables.push((t, job));
        if s != "failed" || !err.contains("not enough temporary space") || !err.contains(mnt.to_str().unwrap()) {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        if rows != 0 || !files_under(&mnt).is_empty() {
            return Err(format!("{rows} rows in the target, temp files {:?}", files_under(&mnt)));
        }
        Ok(err)
    });

    x.c.reload("ALTER SYSTEM SET store.check_temp_space = off");
    x.fault("temp space: ENOSPC while spilling fails the job cleanly", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        let rows = x.num(&format!("SELECT count(*) FROM {t}"));
        let inserted = x.num(&format!("SELECT inserted FROM store.status WHERE id = {job}"));
        failed_tables.push((t, job));
        if s != "failed" || !err.contains("No space left on device") || !err.contains(mnt.to_str().unwrap()) {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        // Nothing beyond committed batches: the rows are exactly what the checkpoint counted.
        if rows != inserted {
            return Err(format!("{rows} rows in the target but {inserted} committed by the job"));
        }
        let left = files_under(&mnt);
        if !left.is_empty() {
            return Err(format!("temporary files left: {left:?}"));
        }
        Ok(format!("{err} ({rows} rows committed before it)"))
    });

    x.q("ALTER SYSTEM RESET store.check_temp_space");
    x.c.reload("ALTER SYSTEM RESET store.temp_dir");
    let _ = Command::new("umount").arg(&mnt).status();
    x.fault("temp space: re-run with enough space completes exactly", |x| {
        let want = x.want.clone();
        let mut ids = Vec::new();
        for (t, _) in failed_tables.clone() {
            let job = x.ingest(&x.data.clone(), &t);
            x.done(job)?;
            x.exact(&t, &want, None)?;
            ids.push(job);
            x.q(&format!("DROP TABLE {t}"));
        }
        Ok(format!("jobs {ids:?}"))
    });
}
