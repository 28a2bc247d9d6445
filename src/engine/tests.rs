//! Whole-pipeline tests: the engine against the naive oracle of [`crate::testkit`],
//! on random bytes (proptest) and on the cases that break external sorts: many runs,
//! multi-level merges, compressed inputs, cancellation, failures, cleanup.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use proptest::prelude::*;

use super::pipeline::{bloom_distinct, sort_distinct, Config, FileCounts, Observer, Reject};
use super::walk::{walk, FileEntry};
use super::{Error, Phase, Progress, Result};
use crate::testkit::{generate, oracle, oracle_of, sha256_lines, GenSpec};

/// An observer that records what it is told.
#[derive(Default)]
struct Record {
    rejects: Vec<(PathBuf, u64, u64, &'static str, Vec<u8>)>,
    files: Vec<(PathBuf, FileCounts, Option<String>)>,
    ticks: u64,
    cancel_at_tick: Option<(u64, Arc<AtomicBool>)>,
    fail_at_tick: Option<u64>,
    panic_at_tick: Option<u64>,
    /// Each phase announced, with the number of files done by then.
    phases: Vec<(Phase, usize)>,
}

impl Observer for Record {
    fn reject(&mut self, r: &Reject<'_>) -> Result<()> {
        self.rejects.push((r.file.to_path_buf(), r.line, r.offset, r.reason.as_str(), r.prefix.to_vec()));
        Ok(())
    }
    fn file_done(&mut self, _: usize, f: &FileEntry, c: &FileCounts, e: Option<&str>) -> Result<()> {
        self.files.push((f.path.clone(), c.clone(), e.map(str::to_string)));
        Ok(())
    }
    fn tick(&mut self, _: &Progress) -> Result<()> {
        self.ticks += 1;
        if let Some((n, flag)) = &self.cancel_at_tick {
            if self.ticks >= *n {
                flag.store(true, Relaxed);
            }
        }
        if self.fail_at_tick.is_some_and(|n| self.ticks >= n) {
            return Err(Error::Config("observer failed".into()));
        }
        if self.panic_at_tick.is_some_and(|n| self.ticks >= n) {
            panic!("observer panicked");
        }
        Ok(())
    }
    fn phase_changed(&mut self, p: &Progress) -> Result<()> {
        self.phases.push((p.snapshot().phase, self.files.len()));
        Ok(())
    }
}

struct Outcome {
    records: Vec<Vec<u8>>,
    progress: super::Snapshot,
    runs: usize,
    obs: Record,
}

fn run_exact(cfg: &Config, path: &Path, resume_after: Option<&[u8]>, mut obs: Record) -> Result<Outcome> {
    let listing = walk(path)?;
    let progress = Arc::new(Progress::default());
    let cancel = obs.cancel_at_tick.as_ref().map_or_else(|| Arc::new(AtomicBool::new(false)), |c| c.1.clone());
    let sorted = sort_distinct(cfg, &listing.files, progress.clone(), cancel, &mut obs)?;
    let runs = sorted.runs();
    let mut m = sorted.merge(resume_after, &mut obs)?;
    let mut records = Vec::new();
    while let Some(r) = m.next_record()? {
        records.push(r.to_vec());
    }
    drop(m);
    Ok(Outcome { records, progress: progress.snapshot(), runs, obs })
}

fn tiny(temp: &Path) -> Config {
    Config { temp_dir: temp.to_path_buf(), chunk_bytes: Some(256), fan_in: 3, read_buffer: 7, threads: 2, ..Config::default() }
}

fn temp_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

/// Random file contents made of the pieces that matter to the contract.
fn content() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => "[a-c]{1,3}".prop_map(|s| s.into_bytes()),
        3 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"\r\n".to_vec()),
        1 => Just(b"\0".to_vec()),
        1 => Just(b"\xff".to_vec()),
        1 => Just(b"\xc3".to_vec()),
        1 => Just("é".as_bytes().to_vec()),
        1 => Just(b"\xEF\xBB\xBF".to_vec()),
        1 => (1usize..40).prop_map(|n| vec![b'z'; n]),
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn exact_mode_equals_the_oracle(
        files in prop::collection::vec(content(), 1..5),
        max_line in 1usize..24,
        chunk in 16usize..300,
        read_buf in 1usize..40,
        compress in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir(&input).unwrap();
        for (i, f) in files.iter().enumerate() {
            fs::write(input.join(format!("f{i}")), f).unwrap();
        }
        let temp = dir.path().join("tmp");
        fs::create_dir(&temp).unwrap();
        let cfg = Config { max_line_bytes: max_line, chunk_bytes: Some(chunk), read_buffer: read_buf, compress_runs: compress, ..tiny(&temp) };
        let out = run_exact(&cfg, &input, None, Record::default()).unwrap();
        let (want, set) = oracle_of(files.iter().map(|f| f.as_slice()), max_line);
        let want_recs: Vec<Vec<u8>> = set.into_iter().collect();
        prop_assert_eq!(&out.records, &want_recs);
        let p = &out.progress;
        prop_assert_eq!((p.records, p.empty, p.rejected, p.distinct), (want.records, want.empty, want.rejected, want.distinct));
        prop_assert_eq!(p.duplicates, p.records - p.rejected - p.distinct);
        prop_assert_eq!(out.obs.rejects.len() as u64, want.rejected);
        prop_assert!(out.obs.rejects.iter().all(|r| r.4.len() <= 1024));
        prop_assert!(temp_is_empty(&temp), "temporary files left behind");
    }

    #[test]
    fn approximate_mode_never_keeps_a_repeat_or_an_invalid_record(
        files in prop::collection::vec(content(), 1..4),
        max_line in 1usize..24,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (i, f) in files.iter().enumerate() {
            fs::write(dir.path().join(format!("f{i}")), f).unwrap();
        }
        let cfg = Config { max_line_bytes: max_line, ..tiny(dir.path()) };
        let listing = walk(dir.path()).unwrap();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let progress = Arc::new(Progress::default());
        let report = bloom_distinct(&cfg, &listing.files, 0.01, Some(1000), progress.clone(), Arc::new(AtomicBool::new(false)), &mut Record::default(), &mut |r| { out.push(r.to_vec()); Ok(()) }).unwrap();
        let (want, set) = oracle_of(files.iter().map(|f| f.as_slice()), max_line);
        let mut sorted = out.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), out.len(), "a repeat was kept");
        prop_assert!(out.iter().all(|r| set.contains(r)));
        prop_assert!(want.distinct - out.len() as u64 <= 1 + 2 * report.estimated_false_drops.ceil() as u64);
        prop_assert_eq!(progress.snapshot().rejected, want.rejected);
    }
}

#[test]
fn tiny_budget_forces_many_runs_and_a_multi_level_merge() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 3, size: 40_000, nasty: true, max_line_bytes: 300, seed: 5, ..GenSpec::default() }).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let cfg = Config { chunk_bytes: Some(4096), fan_in: 4, read_buffer: 1000, max_line_bytes: 300, ..tiny(&temp) };
    let out = run_exact(&cfg, &input, None, Record::default()).unwrap();
    let want = oracle(&input, 300).unwrap();
    assert!(out.runs > 16, "only {} runs: fan-in 4 needs two merge levels above 16", out.runs);
    assert!(out.progress.runs_written as usize > out.runs, "intermediate runs were written");
    assert_eq!(sha256_lines(out.records.iter().map(|r| r.as_slice())), want.sha256);
    assert_eq!((out.progress.rejected, out.progress.empty), (want.rejected, want.empty));
    // Inputs of each intermediate merge are removed as soon as it is written.
    assert!(out.progress.temp_bytes < out.progress.temp_peak, "{:?}", out.progress);
    // The final sort is announced once, after every file was read, then the first-pass
    // merge that more runs than the fan-in need.
    let n = out.obs.files.len();
    assert_eq!(out.obs.phases, vec![(Phase::Sorting, n), (Phase::Merging, n)]);
    assert!(out.obs.files.len() >= 3);
    assert!(temp_is_empty(&temp));
}

#[test]
fn rejects_carry_file_line_offset_reason_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.txt");
    let mut data = b"\xEF\xBB\xBFok\r\nbad\xff\n\nnul\0x\n".to_vec();
    data.extend(vec![b'L'; 5000]);
    data.extend(b"\nlast");
    fs::write(&p, &data).unwrap();
    let cfg = Config { max_line_bytes: 100, ..tiny(dir.path()) };
    let out = run_exact(&cfg, &p, None, Record::default()).unwrap();
    assert_eq!(out.records, [b"last".to_vec(), b"ok".to_vec()]);
    let r = &out.obs.rejects;
    assert_eq!(r.len(), 3);
    assert_eq!((r[0].1, r[0].2, r[0].3, r[0].4.as_slice()), (2, 7, "invalid_utf8", &b"bad\xff"[..]));
    assert_eq!((r[1].1, r[1].2, r[1].3), (4, 13, "nul_byte"));
    assert_eq!((r[2].1, r[2].2, r[2].3, r[2].4.len()), (5, 19, "too_long", 105));
    assert_eq!(out.progress.empty, 1);
    let (_, counts, err) = &out.obs.files[0];
    assert_eq!((counts.records, counts.accepted, counts.rejected, counts.empty), (5, 2, 3, 1));
    assert!(err.is_none());
}

#[test]
fn gzip_multi_member_and_zstd_long_window_are_read_and_corrupt_files_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("in");
    fs::create_dir(&d).unwrap();
    // Two gzip members concatenated, as `cat a.gz b.gz` makes.
    let mut gz = Vec::new();
    for part in [&b"g1\ng2\n"[..], b"g3\ng1\n"] {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).unwrap();
        gz.extend(e.finish().unwrap());
    }
    fs::write(d.join("a.gz"), &gz).unwrap();
    let mut z = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    z.long_distance_matching(true).unwrap();
    z.window_log(27).unwrap();
    z.write_all(b"z1\nz2\ng2\n").unwrap();
    fs::write(d.join("b.zst"), z.finish().unwrap()).unwrap();
    fs::write(d.join("c.gz"), b"this is not gzip\n").unwrap();
    let mut bad_zst = zstd::encode_all(&b"y1\ny2\n"[..], 1).unwrap();
    bad_zst.truncate(bad_zst.len() - 3);
    fs::write(d.join("d.zst"), bad_zst).unwrap();
    fs::write(d.join("e.txt"), b"plain\n").unwrap();

    let out = run_exact(&tiny(dir.path()), &d, None, Record::default()).unwrap();
    let got: Vec<&str> = out.records.iter().map(|r| std::str::from_utf8(r).unwrap()).collect();
    // d.zst is cut short: what decoded before the damage (y1) is kept, as zcat prints it.
    assert_eq!(got, ["g1", "g2", "g3", "plain", "y1", "z1", "z2"]);
    let failed: Vec<_> = out.obs.files.iter().filter(|f| f.2.is_some()).map(|f| f.0.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(failed, ["c.gz", "d.zst"]);
    assert!(out.obs.files[2].2.as_ref().unwrap().contains("c.gz"));
    assert_eq!((out.progress.files_failed, out.progress.files_done), (2, 5));
}

#[test]
fn filter_counts_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    fs::write(&p, "a@x\nb@y\nadmin@x\nzz\na@x\n").unwrap();
    let cfg = Config { filter: super::filter::Filter::parse("include=@;exclude=^admin").unwrap(), ..tiny(dir.path()) };
    let out = run_exact(&cfg, &p, None, Record::default()).unwrap();
    assert_eq!(out.records, [b"a@x".to_vec(), b"b@y".to_vec()]);
    assert_eq!((out.progress.filtered, out.progress.duplicates, out.progress.records), (2, 1, 5));
}

#[test]
fn resumed_merge_emits_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 20_000, seed: 9, ..GenSpec::default() }).unwrap();
    let cfg = Config { chunk_bytes: Some(2048), ..tiny(dir.path()) };
    let all = run_exact(&cfg, &input, None, Record::default()).unwrap().records;
    for cut in [0, 1, all.len() / 3, all.len() - 1] {
        let rest = run_exact(&cfg, &input, Some(&all[cut]), Record::default()).unwrap().records;
        assert_eq!(rest, all[cut + 1..], "resume after record {cut}");
    }
}

#[test]
fn cancel_error_and_panic_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 600_000, seed: 2, ..GenSpec::default() }).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let cfg = Config { chunk_bytes: Some(8192), read_buffer: 4096, ..tiny(&temp) };

    let flag = Arc::new(AtomicBool::new(false));
    let obs = Record { cancel_at_tick: Some((3, flag)), ..Record::default() };
    let r = run_exact(&cfg, &input, None, obs);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(temp_is_empty(&temp));

    let obs = Record { fail_at_tick: Some(3), ..Record::default() };
    assert!(matches!(run_exact(&cfg, &input, None, obs), Err(Error::Config(_))));
    assert!(temp_is_empty(&temp));

    let obs = Record { panic_at_tick: Some(3), ..Record::default() };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_exact(&cfg, &input, None, obs)));
    assert!(r.is_err());
    assert!(temp_is_empty(&temp));

    // Cancel during the merge.
    let listing = walk(&input).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let sorted = sort_distinct(&cfg, &listing.files, Arc::new(Progress::default()), cancel.clone(), &mut Record::default()).unwrap();
    assert!(!temp_is_empty(&temp), "runs were spilled");
    let mut m = sorted.merge(None, &mut Record::default()).unwrap();
    m.next_record().unwrap();
    cancel.store(true, Relaxed);
    let err = loop {
        match m.next_record() {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("merge finished despite cancel"),
        }
    };
    assert!(matches!(err, Error::Cancelled));
    drop(m);
    assert!(temp_is_empty(&temp));
}

#[test]
fn io_errors_name_the_path_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 1, size: 50_000, seed: 2, ..GenSpec::default() }).unwrap();
    let cfg = Config { chunk_bytes: Some(4096), temp_dir: dir.path().join("no/such/dir"), ..Config::default() };
    let err = run_exact(&cfg, &input, None, Record::default()).err().unwrap().to_string();
    assert!(err.contains("no/such/dir") && err.contains("No such file or directory"), "{err}");

}

#[test]
fn files_that_vanish_or_are_swapped_after_listing_are_recorded_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    fs::create_dir(&input).unwrap();
    let secret = dir.path().join("secret.txt");
    fs::write(&secret, "outside allowed_dirs\n").unwrap();
    for name in ["a", "b", "c", "d", "e"] {
        fs::write(input.join(format!("{name}.txt")), format!("{name} one\n{name} two\n")).unwrap();
    }
    let listing = walk(&input).unwrap();
    fs::remove_file(input.join("b.txt")).unwrap();
    fs::remove_file(input.join("c.txt")).unwrap();
    std::os::unix::fs::symlink(&secret, input.join("c.txt")).unwrap();
    fs::remove_file(input.join("d.txt")).unwrap();
    let fifo = std::ffi::CString::new(input.join("d.txt").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let progress = Arc::new(Progress::default());
    let mut obs = Record::default();
    let sorted = sort_distinct(&tiny(&temp), &listing.files, progress.clone(), Arc::default(), &mut obs).unwrap();
    let mut m = sorted.merge(None, &mut Record::default()).unwrap();
    let mut got = Vec::new();
    while let Some(r) = m.next_record().unwrap() {
        got.push(String::from_utf8(r.to_vec()).unwrap());
    }
    assert_eq!(got, ["a one", "a two", "e one", "e two"], "the secret behind the link and the FIFO were not read");
    let errors: Vec<_> = obs.files.iter().map(|(p, _, e)| (p.file_name().unwrap().to_str().unwrap().to_string(), e.clone())).collect();
    assert_eq!(errors.len(), 5, "every listed file is reported");
    for (name, e) in &errors {
        let failed = ["b.txt", "c.txt", "d.txt"].contains(&name.as_str());
        assert_eq!(e.is_some(), failed, "{name}: {e:?}");
        if let Some(e) = e {
            assert!(e.contains(name.as_str()) && e.contains("changed since it was listed"), "{e}");
        }
    }
    assert_eq!(progress.snapshot().files_failed, 3);
}

#[test]
fn too_little_temporary_space_fails_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let huge = vec![FileEntry { path: dir.path().join("x"), size: u64::MAX / 4, mtime_ns: 0 }];
    let err = sort_distinct(&tiny(dir.path()), &huge, Arc::default(), Arc::default(), &mut Record::default()).err().unwrap();
    assert!(matches!(err, Error::NoTempSpace { .. }), "{err}");
    assert!(err.to_string().contains("not enough temporary space"));
}
