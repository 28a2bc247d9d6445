//! `make chaos`: the reliability campaign. One local cluster (started and removed by
//! this program, like the integration tests), a seeded RNG, and one fault after another:
//! `kill -9` of the ingesting worker and `pg_ctl stop -m immediate` at random moments,
//! temporary space running out, files that change while a job runs, odd inputs,
//! concurrent jobs and DDL, cancels, terminated workers, 50 queued jobs, and hostile
//! callers. After each fault the job is left to finish (or re-run) by itself and the
//! target is compared with the project's own oracle, line by line when it differs.
//!
//! Prints one line per fault and ends with
//! `chaos: N/N faults survived, 0 records lost, 0 duplicated, 0 server crashes, M/M hostile attempts refused or harmless`;
//! exits non-zero on any loss, duplicate, crash or failed check.
//!
//! `PG_STORE_CHAOS=1` runs it (the Makefile sets it); `CHAOS_SEED` changes the seed,
//! `CHAOS_ONLY=kill9,hostile` runs some sections. Without `PG_STORE_CHAOS` it does
//! nothing, so `cargo test` and `cargo pgrx test` pass over it. Needs `make install`.
//!
//! A module per kind of fault, run in this order (the seeded draws of the RNG come in
//! that order too, so a seed replays the same campaign): [`crashes`] (the sections
//! `kill9`, `inserters`, `sort`, `merge`, `immediate`), [`space`], [`files`],
//! [`concurrency`], [`load`], [`hostile`]; [`ctx`] holds the campaign's state and checks.

#[path = "../common/mod.rs"]
mod common;
mod concurrency;
mod crashes;
mod ctx;
mod files;
mod hostile;
mod load;
mod space;

use std::fs;
use std::time::Instant;

use common::{readable_dir, shared_oracle_sha, Cluster};
use ctx::{want_of, Ctx, Tally};
use store_testkit::{generate, GenSpec, Rng};

fn main() {
    if std::env::var_os("PG_STORE_CHAOS").is_none() {
        println!("chaos: not run (`make chaos` runs it)");
        return;
    }
    let seed: u64 = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261124);
    let only: Option<Vec<String>> =
        std::env::var("CHAOS_ONLY").ok().map(|s| s.split(',').map(str::to_string).collect());
    let want_section = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let started = Instant::now();
    println!("chaos: seed {seed}");

    let c = Cluster::start(
        "chaos",
        "store.batch_max = 2000\nstore.memory_limit = '16MB'\nstore.cpu_limit = 1\nmax_connections = 120\nlog_line_prefix = '%m [%p] '",
    );
    let data = readable_dir(&c.dir.join("data-main"));
    generate(&data, &GenSpec { files: 4, size: 28 << 20, seed, nasty: true, ..GenSpec::default() }).unwrap();
    let want = want_of(&data);
    println!(
        "chaos: main data set {} files, {} records, {} distinct, {} rejected",
        want.e.files, want.e.records, want.e.distinct, want.e.rejected
    );
    match shared_oracle_sha(&data) {
        Some(sha) if sha == want.e.sha256 => {
            println!("chaos: ../shared/bench/oracle.py agrees with the project's oracle ({sha})")
        }
        Some(sha) => panic!("../shared/bench/oracle.py says {sha}, the project's oracle {}", want.e.sha256),
        None => println!("chaos: ../shared/bench/oracle.py not present: the project's oracle alone"),
    }
    let mut x = Ctx {
        c,
        rng: Rng::new(seed),
        t: Tally::default(),
        tables: 0,
        data,
        want,
        scan_s: 0.0,
        total_s: 0.0,
        our_kills: 0,
    };
    x.baseline();

    type Section = (&'static str, fn(&mut Ctx));
    let sections: [Section; 10] = [
        ("kill9", crashes::kill9_rounds),
        ("inserters", crashes::inserter_rounds),
        ("sort", crashes::sort_rounds),
        ("merge", crashes::merge_rounds),
        ("immediate", crashes::immediate_rounds),
        ("space", space::temp_space),
        ("files", files::files),
        ("concurrency", concurrency::concurrency),
        ("load", load::load),
        ("hostile", hostile::hostile),
    ];
    for (name, f) in sections {
        if want_section(name) {
            let t = Instant::now();
            f(&mut x);
            println!("chaos: section {name} took {:.0} s", t.elapsed().as_secs_f64());
        }
    }

    // Crashes: any server process that died of a signal we did not send, or a PANIC.
    let log = fs::read_to_string(x.c.dir.join("log")).unwrap_or_default();
    let signalled: Vec<&str> = log.lines().filter(|l| l.contains("was terminated by signal")).collect();
    let sigkills = signalled.iter().filter(|l| l.contains("terminated by signal 9:")).count() as u64;
    let other_signals = signalled.len() as u64 - sigkills;
    let panics = log.lines().filter(|l| l.contains("PANIC:")).count() as u64;
    x.t.crashes += other_signals + sigkills.saturating_sub(x.our_kills) + panics;
    if !x.c.running() {
        x.t.crashes += 1;
    }

    let t = &x.t;
    if !t.kill_phases.is_empty() {
        println!("chaos: status phase at the moment of each kill/stop: {:?}", t.kill_phases);
    }
    for f in &t.failures {
        println!("chaos: FAILED {f}");
    }
    println!("chaos: {:.1} minutes", started.elapsed().as_secs_f64() / 60.0);
    println!(
        "chaos: {}/{} faults survived, {} records lost, {} duplicated, {} server crashes, {}/{} hostile attempts refused or harmless",
        t.survived, t.faults, t.lost, t.duplicated, t.crashes, t.refused, t.hostile
    );
    let ok = t.survived == t.faults && t.lost == 0 && t.duplicated == 0 && t.crashes == 0 && t.refused == t.hostile;
    if !ok {
        if t.refused != t.hostile {
            println!("chaos: only {} of {} hostile attempts were refused or came to nothing", t.refused, t.hostile);
        }
        // exit() skips destructors: stop and remove the cluster first.
        drop(x);
        std::process::exit(1);
    }
}
