//! Crashes at seeded moments: `kill -9` of the ingesting worker, of a range's inserter,
//! during a first-pass merge and during the in-memory sort, and `pg_ctl stop -m
//! immediate`. Each job must finish by itself, exact, with every counter an undisturbed
//! run's, and leave no orphaned runs.

use std::fs;
use std::time::{Duration, Instant};

use crate::ctx::{Check, Ctx};

/// Start a job on the main data set into a fresh table and, at a random moment while
/// it runs, do `act` to it (given the job and its worker's pid). A run quicker than the
/// moment drawn is finished, dropped and tried again at an earlier moment.
pub fn interrupted(
    x: &mut Ctx,
    round: u32,
    mut act: impl FnMut(&mut Ctx, i64, i32),
) -> Result<(String, i64, String, Duration), String> {
    let mut delay = x.moment(round);
    loop {
        let t = x.target();
        let job = x.ingest(&x.data.clone(), &t);
        let phase = x.at(job, delay);
        let pid = x.worker_pid(job);
        if pid != 0 && phase.starts_with("running") {
            act(x, job, pid);
            return Ok((t, job, phase, delay));
        }
        x.done(job)?;
        x.q(&format!("DROP TABLE {t}"));
        delay /= 2;
    }
}

fn crash_round(x: &mut Ctx, round: u32, immediate: bool) -> Check {
    let (t, job, phase, delay) = interrupted(x, round, |x, _, pid| {
        if immediate {
            x.c.stop_immediate();
            x.c.pg_ctl_start();
        } else {
            x.sigkill(pid);
        }
    })?;
    *x.t.kill_phases.entry(phase.trim_start_matches("running:").to_string()).or_default() += 1;
    // No manual step: the workers come back and reclaim the job.
    x.done(job)?;
    let want = x.want.clone();
    x.exact(&t, &want, Some(job))?;
    let attempts = x.num(&format!("SELECT attempts FROM store.jobs WHERE id = {job}"));
    x.q(&format!("DROP TABLE {t}"));
    Ok(format!(
        "{} at {:.1} s ({phase}), job {job} finished exact after {attempts} attempts",
        if immediate { "stop" } else { "kill" },
        delay.as_secs_f64()
    ))
}

pub fn kill9_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 of the ingesting worker, 20 rounds");
    for r in 0..20 {
        x.fault(&format!("kill -9 #{}", r + 1), |x| crash_round(x, r, false));
    }
    // The killed workers' temporary runs were removed by the worker that resumed the jobs.
    x.fault("kill -9: no orphaned temporary runs", |x| {
        // The temporary directory is there (the jobs kept their runs in it) and empty:
        // each job's own directory went when the job ended.
        let temp = x.c.data().join("pgsql_tmp_pg_store");
        let left: Vec<_> =
            fs::read_dir(&temp).map_err(|e| format!("{}: {e}", temp.display()))?.flatten().map(|e| e.path()).collect();
        if left.is_empty() {
            Ok("nothing left in the temporary directory".into())
        } else {
            Err(format!("left behind: {left:?}"))
        }
    });
}

/// Three key ranges, two of them inserted by inserter processes: kill -9 one of those
/// at a random moment of its range. The server restarts, the job resumes from the runs
/// it kept, each range from its own checkpoint. (`store.compact_index` off: the targets
/// are empty, which would otherwise take one range.)
pub fn inserter_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 of a range's inserter (store.insert_workers = 3), 3 rounds");
    x.c.reload("ALTER SYSTEM SET store.compact_index = off");
    x.c.reload("ALTER SYSTEM SET store.insert_workers = 3");
    for r in 0..3 {
        x.fault(&format!("kill -9 of an inserter #{}", r + 1), |x| {
            let t = x.target();
            let job = x.ingest(&x.data.clone(), &t);
            let t0 = Instant::now();
            let range = 1 + (x.rng.below(2) as i32);
            let pid = loop {
                let row = x.q(&format!(
                    "SELECT coalesce((SELECT worker_pid || ' ' || inserted FROM store.ranges WHERE job = {job} AND range = {range} AND state = 'running'), '')"
                ));
                if let Some((pid, ins)) = row.split_once(' ') {
                    let ins: i64 = ins.parse().unwrap_or(0);
                    // Somewhere in the range's first half: it holds about a third of the lines.
                    if ins > 1000 + x.rng.below(200_000) as i64 {
                        break pid.parse::<i32>().unwrap();
                    }
                }
                let state = x.q(&format!("SELECT state FROM store.jobs WHERE id = {job}"));
                if t0.elapsed() > Duration::from_secs(120) || (state != "running" && state != "queued") {
                    return Err(format!("never saw range {range} of job {job} inserting"));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let kind = x.q(&format!("SELECT coalesce((SELECT backend_type FROM pg_stat_activity WHERE pid = {pid}), 'gone')"));
            x.sigkill(pid);
            *x.t.kill_phases.entry("inserting (an inserter)".into()).or_default() += 1;
            x.done(job)?;
            let want = x.want.clone();
            x.exact(&t, &want, Some(job))?;
            let resumed = fs::read_to_string(x.c.dir.join("log")).unwrap_or_default().contains(&format!("pg_store job {job}: resuming from the"));
            x.q(&format!("DROP TABLE {t}"));
            if kind != "pg_store inserter" || !resumed {
                return Err(format!("killed a {kind:?}; resumed from kept runs: {resumed}"));
            }
            Ok(format!("killed the inserter of range {range} at {:.1} s; exact, resumed from the kept runs", t0.elapsed().as_secs_f64()))
        });
    }
    x.c.reload("ALTER SYSTEM RESET store.insert_workers");
    x.c.reload("ALTER SYSTEM RESET store.compact_index");
}

/// With a 2 MB budget the main data set spills more runs than the merge's fan-in, so
/// they are first merged into longer ones (status phase `merging`): kill the worker then.
pub fn merge_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 during a multi-level merge (store.memory_limit = 2MB), 3 rounds");
    kill_in_phase(x, "merging", "2MB", 3);
}

/// With a 512 MB budget the main data set never spills: it is sorted in memory in one
/// go after the scan (status phase `sorting`), the longest sort a job does: kill then.
pub fn sort_rounds(x: &mut Ctx) {
    println!("chaos: kill -9 during the in-memory sort (store.memory_limit = 512MB), 3 rounds");
    kill_in_phase(x, "sorting", "512MB", 3);
}

/// `rounds` times: run a job on the main data set with `memory` as its budget, kill its
/// worker a moment after its status says `phase`, and check that the resumed job is exact.
fn kill_in_phase(x: &mut Ctx, phase: &str, memory: &str, rounds: u32) {
    x.c.reload(&format!("ALTER SYSTEM SET store.memory_limit = '{memory}'"));
    let wanted = format!("running:{phase}");
    for r in 0..rounds {
        x.fault(&format!("kill -9 while {phase} #{}", r + 1), |x| {
            for _attempt in 0..3 {
                let t = x.target();
                let job = x.ingest(&x.data.clone(), &t);
                let t0 = Instant::now();
                let seen = loop {
                    let p =
                        x.q(&format!("SELECT state || ':' || coalesce(phase, '') FROM store.jobs WHERE id = {job}"));
                    if p == wanted
                        || p.starts_with("done")
                        || p.ends_with("inserting")
                        || t0.elapsed() > Duration::from_secs(120)
                    {
                        break p;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                if seen != wanted {
                    // The phase went by between two looks: try again.
                    x.done(job)?;
                    x.q(&format!("DROP TABLE {t}"));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(x.rng.below(100)));
                // The phase a few milliseconds before the kill: the one it is counted in.
                let at_kill = x.q(&format!(
                    "SELECT coalesce(phase, '') || ' ' || coalesce(worker_pid, 0) FROM store.jobs WHERE id = {job}"
                ));
                let (at_kill, pid) =
                    at_kill.split_once(' ').map(|(p, w)| (p.to_string(), w.parse::<i32>().unwrap())).unwrap();
                x.sigkill(pid);
                let killed_at = t0.elapsed();
                *x.t.kill_phases.entry(at_kill.clone()).or_default() += 1;
                x.done(job)?;
                let want = x.want.clone();
                x.exact(&t, &want, Some(job))?;
                let temp =
                    x.q(&format!("SELECT pg_size_pretty(coalesce(temp_bytes, 0)) FROM store.jobs WHERE id = {job}"));
                x.q(&format!("DROP TABLE {t}"));
                return Ok(format!(
                    "killed {:.2} s after it was queued, while {at_kill}; exact after the resume (temp peak {temp})",
                    killed_at.as_secs_f64()
                ));
            }
            Err(format!("never saw the job in its {phase} phase"))
        });
    }
    x.c.reload("ALTER SYSTEM RESET store.memory_limit");
}

pub fn immediate_rounds(x: &mut Ctx) {
    println!("chaos: pg_ctl stop -m immediate, 10 rounds");
    for r in 0..10 {
        x.fault(&format!("immediate stop #{}", r + 1), |x| crash_round(x, r + 1, true));
    }
}
