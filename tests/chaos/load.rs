//! Load: 50 `store_ingest` calls from 50 sessions at once, each job exact.

use std::time::Instant;

use crate::common::readable_dir;
use crate::ctx::{want_of, Ctx};
use store_testkit::{generate, GenSpec};

pub fn load(x: &mut Ctx) {
    println!("chaos: 50 store_ingest calls at once");
    x.fault("50 jobs queued at once from 50 sessions", |x| {
        let mut dirs = Vec::new();
        for i in 0..50u64 {
            let dir = readable_dir(&x.c.dir.join(format!("q{i}")));
            generate(&dir, &GenSpec { files: 1, size: 100_000 + i * 1000, seed: 600 + i % 10, ..GenSpec::default() })
                .unwrap();
            x.q(&format!("CREATE TABLE q{i} (line text UNIQUE)"));
            dirs.push(dir);
        }
        let t0 = Instant::now();
        let jobs: Vec<i64> = std::thread::scope(|s| {
            let hs: Vec<_> = dirs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let c = &x.c;
                    s.spawn(move || {
                        c.psql(&format!("SELECT store_ingest('{}', 'q{i}')", d.display()))
                            .unwrap()
                            .parse::<i64>()
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (job, dir)) in jobs.iter().zip(&dirs).enumerate() {
            x.done(*job)?;
            let want = want_of(dir);
            x.exact(&format!("q{i}"), &want, Some(*job))?;
        }
        Ok(format!("all 50 exact, {:.1} s from the first call to the last check", t0.elapsed().as_secs_f64()))
    });
}
