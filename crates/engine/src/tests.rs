//! Whole-pipeline tests: the engine against the naive oracle of [`store_testkit`],
//! on random bytes (proptest) and on the cases that break external sorts: many runs,
//! multi-level merges, compressed inputs, stopping, failures, panics, cleanup.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::batch::Texts;
use super::config::{Config, Dedup, Fault};
use super::scan::{FileCounts, FileOutcome, Reject};
use super::stream::{distinct, BatchInfo, Collect, Flow, Report, Sink};
use super::walk::{walk, FileEntry, Identity, Tree};
use super::{Error, Phase, Progress, Result, Snapshot};
use store_testkit::{generate, oracle, oracle_of, oracle_rejects, sha256_lines, GenSpec};

/// A sink that collects, and can stop, fail or panic after a number of ticks or batches.
#[derive(Default)]
struct Probe {
    got: Collect,
    ticks: u64,
    stop_at_tick: Option<u64>,
    fail_at_tick: Option<u64>,
    panic_at_tick: Option<u64>,
    stop_at_batch: Option<usize>,
    /// `Progress::duplicates` when the stream started: the scan's repeats.
    duplicates_scanned: Option<u64>,
}

impl Sink for Probe {
    type Error = Error;
    fn batch(&mut self, b: &Texts, info: &BatchInfo<'_>) -> Result<Flow> {
        self.got.batch(b, info)?;
        Ok(if self.stop_at_batch.is_some_and(|n| self.got.batches >= n) { Flow::Stop } else { Flow::Continue })
    }
    fn reject(&mut self, r: &Reject<'_>) -> Result<Flow> {
        self.got.reject(r)
    }
    fn file_done(&mut self, f: &FileEntry, c: &FileCounts, o: &FileOutcome) -> Result<Flow> {
        self.got.file_done(f, c, o)
    }
    fn phase(&mut self, p: Phase, progress: &Progress) -> Result<Flow> {
        if p == Phase::Inserting {
            self.duplicates_scanned = Some(progress.snapshot().duplicates);
        }
        self.got.phase(p, progress)
    }
    fn tick(&mut self, _: &Progress) -> Result<Flow> {
        self.ticks += 1;
        if self.fail_at_tick.is_some_and(|n| self.ticks >= n) {
            return Err(Error::Config("the sink failed".into()));
        }
        if self.panic_at_tick.is_some_and(|n| self.ticks >= n) {
            panic!("the sink panicked");
        }
        Ok(if self.stop_at_tick.is_some_and(|n| self.ticks >= n) { Flow::Stop } else { Flow::Continue })
    }
}

struct Outcome {
    records: Vec<Vec<u8>>,
    progress: Snapshot,
    report: Report,
    got: Collect,
    duplicates_scanned: Option<u64>,
}

fn run_with(cfg: &Config, path: &Path, resume_after: Option<&[u8]>, mut sink: Probe) -> Result<Outcome> {
    let (tree, listing) = walk(&path.canonicalize().unwrap())?;
    let progress = Arc::new(Progress::default());
    let report = distinct(cfg, &tree, &listing.files, resume_after, &progress, &mut sink)?;
    let records = sink.got.records.iter().map(|r| r.as_bytes().to_vec()).collect();
    Ok(Outcome {
        records,
        progress: progress.snapshot(),
        report,
        got: sink.got,
        duplicates_scanned: sink.duplicates_scanned,
    })
}

fn run_exact(cfg: &Config, path: &Path, resume_after: Option<&[u8]>) -> Result<Outcome> {
    run_with(cfg, path, resume_after, Probe::default())
}

fn tiny(temp: &Path) -> Config {
    Config {
        temp_dir: temp.to_path_buf(),
        chunk_bytes: Some(256),
        fan_in: 3,
        read_buffer: 7,
        threads: 2,
        ..Config::default()
    }
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
        // Longer than a reject's 1 KiB prefix, so the prefix cap is exercised.
        1 => (1000usize..2500).prop_map(|n| vec![b'L'; n]),
    ];
    prop::collection::vec(piece, 0..60).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn exact_mode_equals_the_oracle(
        files in prop::collection::vec(content(), 1..5),
        max_line in prop_oneof![1usize..24, Just(2000usize), Just(5000usize)],
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
        let cfg = Config { limit: super::normalize::LineLimit::bytes(max_line), chunk_bytes: Some(chunk), read_buffer: read_buf, compress_runs: compress, ..tiny(&temp) };
        let out = run_exact(&cfg, &input, None).unwrap();
        let (want, set) = oracle_of(files.iter().map(|f| f.as_slice()), max_line);
        let want_recs: Vec<Vec<u8>> = set.into_iter().collect();
        prop_assert_eq!(&out.records, &want_recs);
        let p = &out.progress;
        prop_assert_eq!((p.records, p.empty, p.rejected, p.distinct), (want.records, want.empty, want.rejected, want.distinct));
        prop_assert_eq!(p.duplicates, p.records - p.rejected - p.distinct);
        // Every reject, with its line, offset, reason and prefix (at most 1 KiB, cut
        // where the oracle cuts it), in input order.
        let want_rejects: Vec<_> = files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| oracle_rejects(f, max_line).into_iter().map(move |r| (format!("f{i}"), r)))
            .collect();
        let got_rejects: Vec<_> = out
            .got
            .rejects
            .iter()
            .map(|r| (r.0.file_name().unwrap().to_str().unwrap().to_string(), store_testkit::OracleReject { line: r.1, offset: r.2, reason: r.3, prefix: r.4.clone() }))
            .collect();
        prop_assert_eq!(got_rejects, want_rejects);
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
        let cfg = Config { limit: super::normalize::LineLimit::bytes(max_line), dedup: Dedup::Bloom, bloom_expected: Some(1000), ..tiny(dir.path()) };
        let out = run_exact(&cfg, dir.path(), None).unwrap();
        let (want, set) = oracle_of(files.iter().map(|f| f.as_slice()), max_line);
        let mut sorted = out.records.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), out.records.len(), "a repeat was kept");
        prop_assert!(out.records.iter().all(|r| set.contains(r)));
        let est = out.report.bloom.as_ref().unwrap().estimated_false_drops;
        prop_assert!(want.distinct - out.records.len() as u64 <= 1 + 2 * est.ceil() as u64);
        prop_assert_eq!(out.progress.rejected, want.rejected);
        prop_assert_eq!(out.got.duplicates, 0, "Bloom mode counts its repeats in the scan");
    }
}

#[test]
fn tiny_budget_forces_many_runs_and_a_multi_level_merge() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(
        &input,
        &GenSpec { files: 3, size: 40_000, nasty: true, max_line_bytes: 300, seed: 5, ..GenSpec::default() },
    )
    .unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let cfg = Config {
        chunk_bytes: Some(4096),
        fan_in: 4,
        read_buffer: 1000,
        limit: super::normalize::LineLimit::bytes(300),
        ..tiny(&temp)
    };
    let out = run_exact(&cfg, &input, None).unwrap();
    let want = oracle(&input, 300).unwrap();
    assert!(out.report.runs > 16, "only {} runs: fan-in 4 needs two merge levels above 16", out.report.runs);
    assert!(out.progress.runs_written as usize > out.report.runs, "intermediate runs were written");
    assert_eq!(sha256_lines(out.records.iter().map(|r| r.as_slice())), want.sha256);
    assert_eq!((out.progress.rejected, out.progress.empty), (want.rejected, want.empty));
    // Inputs of each intermediate merge are removed as soon as it is written.
    assert!(out.progress.temp_bytes < out.progress.temp_peak, "{:?}", out.progress);
    // Each phase is announced once, in order; sorting only after every file was read.
    let n = out.got.files.len();
    assert!(n >= 3);
    assert_eq!(
        out.got.phases,
        vec![(Phase::Scanning, 0), (Phase::Sorting, n), (Phase::Merging, n), (Phase::Inserting, n), (Phase::Done, n)]
    );
    assert!(out.got.batches > 1, "the stream came in several batches");
    assert!(temp_is_empty(&temp));
}

#[test]
fn records_longer_than_a_merge_message_pass_whole_in_order_and_counted() {
    // The merge thread hands records over in messages of about 64 KiB, and up to a
    // batch's bytes of them ahead of the sink; a longer record goes alone.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    fs::create_dir(&input).unwrap();
    let mut files = Vec::new();
    for f in 0..3u32 {
        // Files 0 and 2 are the same: every record of one repeats in the other.
        let g = f % 2;
        let mut s = Vec::new();
        for i in 0..300u32 {
            let len = match (i + g) % 7 {
                0 => 70_000 + i as usize * 13,
                3 => 200_000,
                _ => 20 + (i % 50) as usize,
            };
            s.extend(std::iter::repeat_n(b'a' + ((i * 7 + g) % 26) as u8, len));
            s.extend_from_slice(format!("{i}\n").as_bytes());
        }
        fs::write(input.join(format!("f{f}")), &s).unwrap();
        files.push(s);
    }
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let limit = super::normalize::LineLimit::bytes(300_000);
    let cfg = Config { limit, chunk_bytes: Some(1 << 20), fan_in: 4, ..tiny(&temp) };
    let out = run_exact(&cfg, &input, None).unwrap();
    let (want, set) = oracle_of(files.iter().map(|f| f.as_slice()), 300_000);
    assert_eq!(out.records, set.into_iter().collect::<Vec<_>>());
    assert_eq!((out.progress.distinct, out.progress.duplicates), (want.distinct, want.records - want.distinct));
    assert!(out.got.batches > 1, "the stream came in several batches");
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
    let cfg = Config { limit: super::normalize::LineLimit::bytes(100), ..tiny(dir.path()) };
    let out = run_exact(&cfg, &p, None).unwrap();
    assert_eq!(out.records, [b"last".to_vec(), b"ok".to_vec()]);
    let r = &out.got.rejects;
    assert_eq!(r.len(), 3);
    assert_eq!((r[0].1, r[0].2, r[0].3, r[0].4.as_slice()), (2, 7, "invalid_utf8", &b"bad\xff"[..]));
    assert_eq!((r[1].1, r[1].2, r[1].3), (4, 13, "nul_byte"));
    assert_eq!((r[2].1, r[2].2, r[2].3, r[2].4.len()), (5, 19, "too_long", 105));
    assert_eq!(out.progress.empty, 1);
    let (_, counts, outcome) = &out.got.files[0];
    assert_eq!((counts.records, counts.accepted, counts.rejected, counts.empty), (5, 2, 3, 1));
    assert_eq!(*outcome, FileOutcome::Read);
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

    let out = run_exact(&tiny(dir.path()), &d, None).unwrap();
    let got: Vec<&str> = out.records.iter().map(|r| std::str::from_utf8(r).unwrap()).collect();
    // d.zst is cut short: what decoded before the damage (y1) is kept, as zcat prints it.
    assert_eq!(got, ["g1", "g2", "g3", "plain", "y1", "z1", "z2"]);
    let failed: Vec<_> = out
        .got
        .files
        .iter()
        .filter_map(|f| match &f.2 {
            FileOutcome::Failed(why) => Some((f.0.file_name().unwrap().to_str().unwrap(), why.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), ["c.gz", "d.zst"]);
    assert!(failed[0].1.contains("could not decode") && failed[0].1.contains("c.gz"), "{}", failed[0].1);
    assert_eq!((out.progress.files_failed, out.progress.files_done), (2, 5));
}

#[test]
fn filter_counts_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    fs::write(&p, "a@x\nb@y\nadmin@x\nzz\na@x\n").unwrap();
    let cfg = Config { filter: super::filter::Filter::parse("include=@;exclude=^admin").unwrap(), ..tiny(dir.path()) };
    let out = run_exact(&cfg, &p, None).unwrap();
    assert_eq!(out.records, [b"a@x".to_vec(), b"b@y".to_vec()]);
    assert_eq!((out.progress.filtered, out.progress.duplicates, out.progress.records), (2, 1, 5));
}

#[test]
fn a_character_limit_rejects_what_a_varchar_column_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    fs::write(&p, "äöü\nabcd\nok\n").unwrap();
    let cfg = Config { limit: super::normalize::LineLimit { bytes: 100, chars: Some(3) }, ..tiny(dir.path()) };
    let out = run_exact(&cfg, &p, None).unwrap();
    assert_eq!(out.records, [b"ok".to_vec(), "äöü".as_bytes().to_vec()]);
    assert_eq!(out.got.rejects.iter().map(|r| (r.1, r.3)).collect::<Vec<_>>(), [(2, "too_long")]);
}

#[test]
fn resumed_merge_emits_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 20_000, seed: 9, ..GenSpec::default() }).unwrap();
    let cfg = Config { chunk_bytes: Some(2048), ..tiny(dir.path()) };
    let all = run_exact(&cfg, &input, None).unwrap().records;
    for cut in [0, 1, all.len() / 3, all.len() - 1] {
        let rest = run_exact(&cfg, &input, Some(&all[cut])).unwrap().records;
        assert_eq!(rest, all[cut + 1..], "resume after record {cut}");
    }
}

/// Data with many repeats, within chunks and across them.
fn repetitive(dir: &Path) -> std::path::PathBuf {
    let input = dir.canonicalize().unwrap().join("in");
    generate(&input, &GenSpec { files: 3, size: 60_000, dup: 0.6, seed: 11, ..GenSpec::default() }).unwrap();
    input
}

#[test]
fn each_batch_carries_the_merge_repeats_of_its_records_across_a_stop_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let input = repetitive(dir.path());
    let want = oracle(&input, 65536).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    // Small chunks: many runs, and a last chunk merged from memory; batches of 40.
    let cfg = Config {
        chunk_bytes: Some(16 << 10),
        fan_in: 64,
        read_buffer: 4096,
        batch: super::config::BatchLimits { min: 40, max: 40, ..Default::default() },
        ..tiny(&temp)
    };
    let full = run_exact(&cfg, &input, None).unwrap();
    assert!(full.report.runs > 4, "{} runs", full.report.runs);
    let scanned = full.duplicates_scanned.unwrap();
    let merged = full.got.duplicates;
    assert!(scanned > 0 && merged > 0, "repeats within chunks ({scanned}) and across them ({merged})");
    assert_eq!(scanned + merged, full.progress.duplicates, "the batches carry what the merge counted");
    assert_eq!(full.progress.duplicates, want.records - want.rejected - want.distinct);

    for stop in [1, 3, full.got.batches - 1] {
        let a = run_with(&cfg, &input, None, Probe { stop_at_batch: Some(stop), ..Probe::default() }).unwrap();
        assert!(a.report.stopped);
        let key = a.got.resume_key.clone().unwrap();
        let b = run_exact(&cfg, &input, Some(key.as_bytes())).unwrap();
        assert_eq!([a.records, b.records].concat(), full.records, "stopped after {stop} batches");
        assert_eq!(a.got.duplicates + b.got.duplicates, merged, "stopped after {stop} batches");
    }
}

#[test]
fn each_range_of_a_kept_sort_resumes_with_the_exact_repeats_of_what_is_left() {
    use super::{KeptSort, KeyRange};
    let dir = tempfile::tempdir().unwrap();
    let input = repetitive(dir.path());
    let want = oracle(&input, 65536).unwrap();
    let total = want.records - want.rejected - want.distinct;
    let (tree, listing) = walk(&input).unwrap();
    // A fan-in of 64 merges every run at once; one of 4 merges them in levels first,
    // whose repeats are the scan's.
    for (i, fan_in) in [64, 4].into_iter().enumerate() {
        let keep = dir.path().join(format!("job-{i}"));
        let cfg = Config {
            chunk_bytes: Some(16 << 10),
            fan_in,
            read_buffer: 4096,
            batch: super::config::BatchLimits { min: 25, max: 25, ..Default::default() },
            ..tiny(dir.path())
        };
        let scan = Arc::new(Progress::default());
        let mut sorted =
            KeptSort::sort(&keep, "s", &cfg, &tree, &listing.files, &scan, &mut Collect::default()).unwrap();
        let scanned = scan.snapshot().duplicates;

        let drained = |sorted: &mut KeptSort, range: &KeyRange, after: Option<&str>, stop: Option<usize>| {
            let live = Arc::new(Progress::default());
            let mut sink = Probe { stop_at_batch: stop, ..Probe::default() };
            let report = sorted.drain(range, after.map(str::as_bytes), &live, &mut sink).unwrap();
            assert_eq!(report.stopped, stop.is_some());
            if !report.stopped {
                assert_eq!(sink.got.duplicates, live.snapshot().duplicates, "a whole drain carries what it counted");
            }
            sink.got
        };
        let whole = drained(&mut sorted, &KeyRange::all(), None, None);
        assert!(whole.duplicates > 0);
        assert_eq!(scanned + whole.duplicates, total, "fan-in {fan_in}");

        let ranges = sorted.ranges(3).unwrap();
        assert!(ranges.len() >= 2, "{ranges:?}");
        let mut sum = 0;
        for r in &ranges {
            let full = drained(&mut sorted, r, None, None);
            sum += full.duplicates;
            // Stopped after the first batch, halfway, and after the last.
            for stop in [1, full.batches.div_ceil(2), full.batches] {
                let a = drained(&mut sorted, r, None, Some(stop));
                let key = a.resume_key.clone().unwrap();
                let b = drained(&mut sorted, r, Some(&key), None);
                assert_eq!([a.records, b.records].concat(), full.records, "{r:?} stopped after {stop}");
                assert_eq!(a.duplicates + b.duplicates, full.duplicates, "{r:?} stopped after {stop}");
            }
        }
        assert_eq!(sum, whole.duplicates, "the ranges' repeats add up to the whole stream's");
    }
}

#[test]
fn stop_error_and_panic_of_the_sink_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 600_000, seed: 2, ..GenSpec::default() }).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let cfg = Config { chunk_bytes: Some(8192), read_buffer: 4096, ..tiny(&temp) };

    let out = run_with(&cfg, &input, None, Probe { stop_at_tick: Some(3), ..Probe::default() }).unwrap();
    assert!(out.report.stopped && out.records.is_empty());
    assert!(temp_is_empty(&temp));

    let r = run_with(&cfg, &input, None, Probe { fail_at_tick: Some(3), ..Probe::default() });
    assert!(
        matches!(&r, Err(Error::Config(m)) if m == "the sink failed"),
        "the sink's own error comes back: {:?}",
        r.err()
    );
    assert!(temp_is_empty(&temp));

    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_with(&cfg, &input, None, Probe { panic_at_tick: Some(3), ..Probe::default() })
    }));
    assert!(r.is_err());
    assert!(temp_is_empty(&temp));

    // Stopped while the merge thread is streaming: it is joined and the runs removed.
    let cfg_small =
        Config { batch: super::config::BatchLimits { min: 10, max: 10, ..Default::default() }, ..cfg.clone() };
    let out = run_with(&cfg_small, &input, None, Probe { stop_at_batch: Some(2), ..Probe::default() }).unwrap();
    assert!(out.report.stopped);
    assert_eq!(out.records.len(), 20);
    assert!(temp_is_empty(&temp));
}

#[test]
fn a_panic_on_the_merge_thread_fails_the_run_instead_of_ending_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 200_000, seed: 4, ..GenSpec::default() }).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    let cfg = Config {
        chunk_bytes: Some(8192),
        read_buffer: 4096,
        fault: Some(Fault::MergePanic { after: 2500 }),
        ..tiny(&temp)
    };
    let err = run_exact(&cfg, &input, None).err().expect("the run must fail");
    assert!(
        matches!(&err, Error::Internal(m) if m.contains("merge thread panicked") && m.contains("injected fault")),
        "{err}"
    );
    assert!(temp_is_empty(&temp));
}

#[test]
fn records_damaged_in_a_temporary_run_are_refused_not_passed_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 200_000, seed: 4, ..GenSpec::default() }).unwrap();
    let temp = dir.path().join("tmp");
    fs::create_dir(&temp).unwrap();
    for compress in [false, true] {
        let cfg = Config {
            chunk_bytes: Some(8192),
            read_buffer: 4096,
            compress_runs: compress,
            fault: Some(Fault::CorruptRuns),
            ..tiny(&temp)
        };
        let err = run_exact(&cfg, &input, None).err().expect("a damaged run must fail the run");
        assert!(matches!(&err, Error::Corrupt(_)) || (compress && matches!(&err, Error::Io { .. })), "{err}");
        assert!(temp_is_empty(&temp));
    }
}

#[test]
fn io_errors_name_the_path_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 1, size: 50_000, seed: 2, ..GenSpec::default() }).unwrap();
    let cfg = Config { chunk_bytes: Some(4096), temp_dir: dir.path().join("no/such/dir"), ..Config::default() };
    let err = run_exact(&cfg, &input, None).err().unwrap().to_string();
    assert!(err.contains("no/such/dir") && err.contains("No such file or directory"), "{err}");
}

#[test]
fn files_that_vanish_or_are_swapped_after_listing_are_recorded_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let input = base.join("in");
    fs::create_dir(&input).unwrap();
    let secret = base.join("secret.txt");
    fs::write(&secret, "outside allowed_dirs\n").unwrap();
    for name in ["a", "b", "c", "d", "e", "f"] {
        fs::write(input.join(format!("{name}.txt")), format!("{name} one\n{name} two\n")).unwrap();
    }
    let (tree, listing) = walk(&input).unwrap();
    fs::remove_file(input.join("b.txt")).unwrap();
    fs::remove_file(input.join("c.txt")).unwrap();
    std::os::unix::fs::symlink(&secret, input.join("c.txt")).unwrap();
    fs::remove_file(input.join("d.txt")).unwrap();
    let fifo = std::ffi::CString::new(input.join("d.txt").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // f.txt is rewritten after listing: read, but marked changed.
    fs::write(input.join("f.txt"), "f one\nf two\nf three\n").unwrap();

    let temp = base.join("tmp");
    fs::create_dir(&temp).unwrap();
    let progress = Arc::new(Progress::default());
    let mut got = Collect::default();
    distinct(&tiny(&temp), &tree, &listing.files, None, &progress, &mut got).unwrap();
    assert_eq!(
        got.records,
        ["a one", "a two", "e one", "e two", "f one", "f three", "f two"],
        "the secret behind the link and the FIFO were not read"
    );
    let outcomes: Vec<_> =
        got.files.iter().map(|(p, _, o)| (p.file_name().unwrap().to_str().unwrap().to_string(), o.clone())).collect();
    assert_eq!(outcomes.len(), 6, "every listed file is reported");
    for (name, o) in &outcomes {
        match name.as_str() {
            "b.txt" | "c.txt" | "d.txt" => {
                assert!(
                    matches!(o, FileOutcome::Failed(e) if e.contains(name.as_str()) && e.contains("changed since it was listed")),
                    "{name}: {o:?}"
                )
            }
            "f.txt" => assert_eq!(*o, FileOutcome::Changed, "{name}"),
            _ => assert_eq!(*o, FileOutcome::Read, "{name}"),
        }
    }
    assert_eq!(progress.snapshot().files_failed, 3);
}

#[test]
fn a_file_rewritten_with_its_old_size_and_mtime_has_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.txt");
    fs::write(&p, "aaaa\n").unwrap();
    let before = Identity::of(&fs::File::open(&p).unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&p, "bbbb\n").unwrap();
    // Put the old mtime back, as `touch -r` or a careless copy tool would.
    let f = fs::File::options().write(true).open(&p).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(before.mtime_ns as u64);
    f.set_modified(t).unwrap();
    let after = Identity::of(&f).unwrap();
    assert_eq!((after.size, after.mtime_ns), (before.size, before.mtime_ns));
    assert_ne!(after, before, "the inode change time tells them apart");
}

#[test]
fn too_little_temporary_space_fails_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().canonicalize().unwrap().join("x");
    fs::write(&p, "x\n").unwrap();
    let tree = Tree::open(&p).unwrap();
    let huge = vec![FileEntry::new(p, Identity { size: u64::MAX / 4, mtime_ns: 0, ctime_ns: 0, inode: 0 })];
    let err = distinct(&tiny(dir.path()), &tree, &huge, None, &Arc::default(), &mut Collect::default()).err().unwrap();
    assert!(matches!(err, Error::NoTempSpace { .. }), "{err}");
    assert!(err.to_string().contains("not enough temporary space"));
}

#[test]
fn a_kept_sort_is_loaded_again_and_its_ranges_partition_the_stream() {
    use super::KeptSort;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().canonicalize().unwrap().join("in");
    generate(&input, &GenSpec { files: 3, size: 1 << 20, seed: 8, nasty: true, ..GenSpec::default() }).unwrap();
    let want = oracle(&input, 65536).unwrap();
    let keep = dir.path().join("job-1");
    let cfg = Config { chunk_bytes: Some(256 << 10), fan_in: 32, ..tiny(dir.path()) };
    let (tree, listing) = walk(&input).unwrap();
    let progress = Arc::new(Progress::default());
    let mut got = Collect::default();
    let sorted = KeptSort::sort(&keep, "spec-a", &cfg, &tree, &listing.files, &progress, &mut got).unwrap();
    assert!(
        sorted.runs() > 2 && sorted.spilled() == progress.snapshot().runs_written as usize,
        "{} runs, {} spilled, {:?}",
        sorted.runs(),
        sorted.spilled(),
        progress.snapshot()
    );
    assert!(keep.join(super::sorted::MANIFEST).exists());
    let scanned = progress.snapshot();
    drop(sorted);

    // Another process (or attempt) loads it, with the scan's counters, and merges ranges.
    let again = Arc::new(Progress::default());
    let mut sorted =
        KeptSort::load(&keep, "spec-a", Some(&listing.files), &cfg, &again).unwrap().expect("the kept sort loads");
    assert_eq!((again.snapshot().records, again.snapshot().rejected), (scanned.records, scanned.rejected));
    let ranges = sorted.ranges(3).unwrap();
    assert_eq!(ranges.len(), 3);
    let mut all = Vec::new();
    for r in &ranges {
        let mut part = Collect::default();
        sorted.drain(r, None, &Arc::default(), &mut part).unwrap();
        assert!(!part.records.is_empty(), "{r:?} is empty");
        all.extend(part.records);
    }
    assert_eq!(
        sha256_lines(all.iter().map(|r| r.as_bytes())),
        want.sha256,
        "the ranges together are the whole stream, in order"
    );
    assert_eq!(sorted.first_key(), all.first().map(String::as_str), "the runs know the stream's first key");
    // Resuming a range inside it.
    let r = &ranges[1];
    let mut whole = Collect::default();
    sorted.drain(r, None, &Arc::default(), &mut whole).unwrap();
    let cut = whole.records[whole.records.len() / 2].clone();
    let mut rest = Collect::default();
    sorted.drain(r, Some(cut.as_bytes()), &Arc::default(), &mut rest).unwrap();
    assert_eq!(rest.records, whole.records[whole.records.len() / 2 + 1..]);

    // Not loaded for another spec, other files, or a damaged run.
    assert!(KeptSort::load(&keep, "spec-b", None, &cfg, &Progress::default()).unwrap().is_none());
    let fewer = &listing.files[1..];
    assert!(KeptSort::load(&keep, "spec-a", Some(fewer), &cfg, &Progress::default()).unwrap().is_none());
    let run = std::fs::read_dir(&keep)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".run"))
        .unwrap();
    std::fs::OpenOptions::new().append(true).open(run.path()).unwrap().write_all(b"x").unwrap();
    assert!(
        KeptSort::load(&keep, "spec-a", None, &cfg, &Progress::default()).unwrap().is_none(),
        "a run of another size"
    );
}

#[test]
fn a_sort_with_a_failed_file_is_not_kept() {
    use super::KeptSort;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().canonicalize().unwrap().join("in");
    fs::create_dir(&input).unwrap();
    fs::write(input.join("a.txt"), "a\nb\n").unwrap();
    fs::write(input.join("b.gz"), "not gzip\n").unwrap();
    let keep = dir.path().join("job-2");
    let cfg = tiny(dir.path());
    let (tree, listing) = walk(&input).unwrap();
    let mut got = Collect::default();
    KeptSort::sort(&keep, "s", &cfg, &tree, &listing.files, &Arc::default(), &mut got).unwrap();
    assert!(!keep.join(super::sorted::MANIFEST).exists(), "a resume must read the failed file again");
    assert!(KeptSort::load(&keep, "s", Some(&listing.files), &cfg, &Progress::default()).unwrap().is_none());
}

/// Records that share a head longer than a mark keeps (300 bytes of JSON, and 5,000
/// bytes before a random part): the ranges still split the stream evenly, and together
/// they are the whole of it.
#[test]
fn ranges_split_records_that_share_a_long_head() {
    use super::KeptSort;
    for (head, n) in [(format!("{{\"source\":\"{}\",\"id\":", "x".repeat(300)), 60_000u32), ("H".repeat(5000), 1_500)] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().canonicalize().unwrap().join("in");
        fs::create_dir(&input).unwrap();
        let mut text = String::new();
        let mut x: u64 = 7;
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(&format!("{head}{:016x}{}\n", x, "y".repeat(if n < 10_000 { 1000 } else { 0 })));
        }
        fs::write(input.join("a.txt"), &text).unwrap();
        let want = oracle(&input, 65536).unwrap();
        let cfg = Config { chunk_bytes: Some(2 << 20), ..tiny(dir.path()) };
        let (tree, listing) = walk(&input).unwrap();
        let mut scanned = Collect::default();
        let keep = dir.path().join("job-1");
        let mut sorted =
            KeptSort::sort(&keep, "spec", &cfg, &tree, &listing.files, &Arc::default(), &mut scanned).unwrap();
        let ranges = sorted.ranges(4).unwrap();
        assert_eq!(ranges.len(), 4, "{ranges:?}");
        let mut all = Vec::new();
        for r in &ranges {
            let mut part = Collect::default();
            sorted.drain(r, None, &Arc::default(), &mut part).unwrap();
            let got = part.records.len() as u32;
            assert!((n / 8..=n * 3 / 8).contains(&got), "a range of {got} records of {n}, head {}", head.len());
            all.extend(part.records);
        }
        assert_eq!(sha256_lines(all.iter().map(|r| r.as_bytes())), want.sha256);
    }
}

/// Runs smaller than a mark's interval (a small `store.memory_limit`): each used to have
/// one mark, its lowest key, and the ranges were cut among those — the first range got
/// a fraction of a percent of the lines. Marks now come closer in a small run, and each
/// weighs the bytes it stands for.
#[test]
fn ranges_split_evenly_when_the_runs_are_small() {
    use super::KeptSort;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().canonicalize().unwrap().join("in");
    fs::create_dir(&input).unwrap();
    let n = 200_000u32;
    let mut text = String::new();
    let mut x: u64 = 11;
    for _ in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        text.push_str(&format!("{:016x}\n", x));
    }
    fs::write(input.join("a.txt"), &text).unwrap();
    let want = oracle(&input, 65536).unwrap();
    // Chunks of 512 KiB (a `store.memory_limit` of about 1 MB): about a dozen runs, each
    // barely larger than MARK_EVERY; merged at once.
    let cfg = Config { chunk_bytes: Some(512 << 10), fan_in: 64, ..tiny(dir.path()) };
    let (tree, listing) = walk(&input).unwrap();
    let keep = dir.path().join("job-1");
    let mut sorted =
        KeptSort::sort(&keep, "spec", &cfg, &tree, &listing.files, &Arc::default(), &mut Collect::default()).unwrap();
    assert!(sorted.runs() >= 5, "{} runs", sorted.runs());
    for parts in [2u32, 4] {
        let ranges = sorted.ranges(parts as usize).unwrap();
        assert_eq!(ranges.len(), parts as usize, "{ranges:?}");
        let mut all = Vec::new();
        for r in &ranges {
            let mut part = Collect::default();
            sorted.drain(r, None, &Arc::default(), &mut part).unwrap();
            let got = part.records.len() as u32;
            let even = n / parts;
            assert!(
                (even * 3 / 4..=even * 5 / 4).contains(&got),
                "a range of {got} of {n} lines in {parts}: {ranges:?}"
            );
            all.extend(part.records);
        }
        assert_eq!(sha256_lines(all.iter().map(|r| r.as_bytes())), want.sha256);
    }
}
