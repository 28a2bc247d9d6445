//! Concurrency: 4 jobs into one target, 2 jobs on one directory, `TRUNCATE`, `ADD
//! COLUMN` and `RENAME COLUMN` of the target while a job inserts, `store_cancel` and
//! `pg_terminate_backend` at seeded moments.

use std::time::{Duration, Instant};

use crate::common::readable_dir;
use crate::crashes::interrupted;
use crate::ctx::{union, want_of, Ctx, Lines};
use store_testkit::{generate, GenSpec};

pub fn concurrency(x: &mut Ctx) {
    println!("chaos: concurrency");
    let spec = |seed| GenSpec { files: 2, size: 3 << 20, seed, dup: 0.3, ..GenSpec::default() };
    let a = readable_dir(&x.c.dir.join("conc-a"));
    let b = readable_dir(&x.c.dir.join("conc-b"));
    let d = readable_dir(&x.c.dir.join("conc-d"));
    generate(&a, &spec(51)).unwrap();
    generate(&b, &spec(51)).unwrap(); // the same lines as a, other files
    generate(&d, &spec(52)).unwrap();
    let all = union(&union(&want_of(&a).lines, &want_of(&b).lines), &want_of(&d).lines);

    x.fault("4 jobs into one target at once", |x| {
        let t = x.target();
        let jobs: Vec<i64> = [&a, &b, &d, &x.data.clone()].iter().map(|p| x.ingest(p, &t)).collect();
        for j in &jobs {
            x.done(*j)?;
        }
        let expect = union(&all, &x.want.lines);
        x.bounds(&t, &expect, &expect)?;
        let ids = jobs.iter().map(|j| j.to_string()).collect::<Vec<_>>().join(",");
        let inserted = x.num(&format!("SELECT sum(inserted) FROM store.status WHERE id IN ({ids})"));
        x.q(&format!("DROP TABLE {t}"));
        if inserted != expect.len() as i64 {
            return Err(format!("the jobs counted {inserted} inserts for {} lines", expect.len()));
        }
        Ok(format!("{} lines, each inserted once", expect.len()))
    });

    x.fault("two jobs on the same directory", |x| {
        let t = x.target();
        let j1 = x.ingest(&x.data.clone(), &t);
        let j2 = x.ingest(&x.data.clone(), &t);
        x.done(j1)?;
        x.done(j2)?;
        let want = x.want.clone();
        x.exact(&t, &want, None)?;
        let inserted = x.num(&format!("SELECT sum(inserted) FROM store.status WHERE id IN ({j1},{j2})"));
        x.q(&format!("DROP TABLE {t}"));
        if inserted != want.e.distinct as i64 {
            return Err(format!("{inserted} inserts for {} lines", want.e.distinct));
        }
        Ok(String::new())
    });

    x.fault("TRUNCATE of the target while a job inserts", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        let removed = x.num(&format!(
            "BEGIN; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; SELECT count(*) FROM {t}; TRUNCATE {t}; COMMIT"
        ));
        x.done(job)?;
        let want = x.want.clone();
        let (n, rows) = x.bounds(&t, &Lines::new(), &want.lines)?;
        x.q(&format!("DROP TABLE {t}"));
        if rows + removed != want.e.distinct as i64 {
            return Err(format!("{rows} rows after + {removed} truncated != {} distinct", want.e.distinct));
        }
        Ok(format!("{removed} rows truncated, the job went on and inserted the other {n}"))
    });

    x.fault("ALTER TABLE ADD COLUMN while a job inserts", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        x.q(&format!("ALTER TABLE {t} ADD COLUMN note text DEFAULT 'added'"));
        x.done(job)?;
        let want = x.want.clone();
        x.exact(&t, &want, Some(job))?;
        x.q(&format!("DROP TABLE {t}"));
        Ok(String::new())
    });

    x.fault("ALTER TABLE RENAME COLUMN while a job inserts: clear failure, re-run exact", |x| {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        x.mid_insert(job);
        x.q(&format!("ALTER TABLE {t} RENAME COLUMN line TO renamed"));
        let s = x.end_of(job, Duration::from_secs(120))?;
        let err = x.error_of(job);
        x.q(&format!("ALTER TABLE {t} RENAME COLUMN renamed TO line"));
        let want = x.want.clone();
        x.bounds(&t, &Lines::new(), &want.lines)?;
        if s != "failed" || !err.contains("line") {
            return Err(format!("job {job} ended {s}: {err}"));
        }
        let again = x.ingest(&x.data.clone(), &t);
        x.done(again)?;
        x.exact(&t, &want, None)?;
        x.q(&format!("DROP TABLE {t}"));
        Ok(err)
    });

    for r in 0..5 {
        x.fault(&format!("store_cancel at a random moment #{}", r + 1), |x| {
            let mut ok = String::new();
            let mut t0 = Instant::now();
            let (t, job, phase, delay) = interrupted(x, r, |x, job, _| {
                ok = x.q(&format!("SELECT store_cancel({job})"));
                t0 = Instant::now();
            })?;
            let s = x.end_of(job, Duration::from_secs(60))?;
            let took = t0.elapsed();
            let want = x.want.clone();
            let (n, _) = x.bounds(&t, &Lines::new(), &want.lines)?;
            if ok != "t" || s != "cancelled" || took > Duration::from_secs(5) {
                return Err(format!("cancel {ok} at {phase}: job ended {s} after {took:?}"));
            }
            let again = x.ingest(&x.data.clone(), &t);
            x.done(again)?;
            x.exact(&t, &want, None)?;
            x.q(&format!("DROP TABLE {t}"));
            Ok(format!(
                "at {:.1} s ({phase}): {s} within {:.1} s with {n} rows committed; the re-run completed it",
                delay.as_secs_f64(),
                took.as_secs_f64()
            ))
        });
    }

    for r in 0..2 {
        x.fault(&format!("pg_terminate_backend on the worker #{}", r + 1), |x| {
            let mut killed = String::new();
            let (t, job, phase, delay) =
                interrupted(x, r + 1, |x, _, pid| killed = x.q(&format!("SELECT pg_terminate_backend({pid})")))?;
            x.done(job)?;
            let want = x.want.clone();
            x.exact(&t, &want, Some(job))?;
            let attempts = x.num(&format!("SELECT attempts FROM store.jobs WHERE id = {job}"));
            x.q(&format!("DROP TABLE {t}"));
            if killed != "t" || attempts < 2 {
                return Err(format!("terminate {killed} at {phase}, {attempts} attempts"));
            }
            Ok(format!("at {:.1} s ({phase}); resumed, exact after {attempts} attempts", delay.as_secs_f64()))
        });
    }
}
