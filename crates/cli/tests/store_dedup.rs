//! The `store-dedup` command end to end: output and summary against the project's own
//! oracle on nasty fixtures (and against `shared/bench/oracle.py` when it is beside the
//! checkout), a full temporary disk, and bad arguments.

use std::process::{Command, Output};

use store_testkit::{generate, oracle, sha256_lines, GenSpec};

fn store_dedup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_store-dedup")).args(args).output().expect("run store-dedup")
}

fn summary(out: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON summary ({e}) in: {err}"))
}

fn sha_of_stdout(out: &Output) -> String {
    let mut recs: Vec<&[u8]> = out.stdout.split(|&b| b == b'\n').collect();
    assert_eq!(recs.pop(), Some(&b""[..]), "output ends with a newline");
    sha256_lines(recs)
}

#[test]
fn nasty_directory_matches_the_oracle_at_a_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 6, size: 2 << 20, seed: 3, nasty: true, ..GenSpec::default() }).unwrap();
    let want = oracle(&input, 65536).unwrap();
    let rejects = dir.path().join("rejects.jsonl");
    let out = store_dedup(&[
        "--memory-limit",
        "4M",
        "--threads",
        "2",
        "--compress-runs",
        "--temp-dir",
        dir.path().to_str().unwrap(),
        "--rejects",
        rejects.to_str().unwrap(),
        input.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha_of_stdout(&out), want.sha256);
    let s = summary(&out);
    assert!(s["runs_written"].as_u64().unwrap() > 2, "the 4 MiB budget spilled runs: {s}");
    for k in ["records", "empty", "rejected", "distinct"] {
        assert_eq!(s[k].as_u64().unwrap(), serde_json::to_value(&want).unwrap()[k].as_u64().unwrap(), "{k}");
    }
    let lines = std::fs::read_to_string(&rejects).unwrap();
    assert_eq!(lines.lines().count() as u64, want.rejected);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["file", "line", "offset", "reason", "prefix_hex"] {
        assert!(!first[k].is_null(), "reject lacks {k}: {first}");
    }
    // Only the directory's own files are left: the runs were removed.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// The cross-check, with the shared generator and oracle, when they are there.
#[test]
fn shared_generator_and_oracle_agree_when_present() {
    let Some(shared) = store_testkit::shared_dir().map(|d| d.join("bench")) else {
        println!("SKIPPED: ../shared/bench is not beside the checkout, so the cross-check with gen_lines.py and oracle.py did not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d");
    let gen = Command::new("python3")
        .arg(shared.join("gen_lines.py"))
        .args([input.to_str().unwrap(), "--nasty", "--files", "6", "--size", "8M", "--seed", "3", "--no-expected"])
        .output()
        .unwrap();
    assert!(gen.status.success());
    let oracle = Command::new("python3").arg(shared.join("oracle.py")).arg(&input).output().unwrap();
    let want: serde_json::Value = serde_json::from_slice(&oracle.stdout).unwrap();
    let out =
        store_dedup(&["--memory-limit", "16M", "--temp-dir", dir.path().to_str().unwrap(), input.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(sha_of_stdout(&out), want["sha256"].as_str().unwrap());
    let s = summary(&out);
    assert_eq!(s["rejected"], want["rejected"]);
    assert_eq!(s["empty"], want["empty"]);
}

#[test]
fn full_temporary_disk_fails_cleanly_naming_the_path() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot mount a small tmpfs, test skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    generate(&input, &GenSpec { files: 2, size: 4 << 20, seed: 4, ..GenSpec::default() }).unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    let args = |extra: &'static [&'static str]| {
        let mut a = vec!["--memory-limit", "4M", "--temp-dir", small.to_str().unwrap(), input.to_str().unwrap()];
        a.splice(0..0, extra.iter().copied());
        store_dedup(&a)
    };
    // The pre-check refuses before reading anything...
    let early = args(&[]);
    // ...and without it, the spill itself hits ENOSPC and the run stops cleanly.
    let late = args(&["--no-space-check"]);
    let left = std::fs::read_dir(&small).unwrap().count();
    Command::new("umount").arg(&small).status().unwrap();
    for (out, what) in [(&early, "not enough temporary space"), (&late, "No space left on device")] {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(small.to_str().unwrap()) && err.contains(what), "{err}");
    }
    assert!(late.stdout.is_empty(), "nothing is output from a failed run");
    assert_eq!(left, 0, "temporary files left on the full disk");
}

#[test]
fn bad_arguments_and_paths_are_clear_errors() {
    let out = store_dedup(&["--memory-limit", "lots", "/tmp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("memory limit \"lots\""));
    let out = store_dedup(&["/definitely/not/here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/not/here: No such file or directory"));
    let out = store_dedup(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage: store-dedup"));
    let out = store_dedup(&["--no-such-flag", "/tmp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--no-such-flag'"));
    let out = store_dedup(&["--fpr", "0.1", "/tmp"]);
    assert_eq!(out.status.code(), Some(1), "--fpr needs --approximate");
}

#[test]
fn help_documents_every_flag_and_version_prints() {
    let out = store_dedup(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--memory-limit",
        "--threads",
        "--temp-dir",
        "--max-line-bytes",
        "--compress-runs",
        "--fan-in",
        "--filter",
        "--no-space-check",
        "--approximate",
        "--fpr",
        "--expected",
        "--rejects",
        "--version",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}:\n{help}");
    }
    let out = store_dedup(&["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("store-dedup {}", env!("CARGO_PKG_VERSION")));
}

/// Distinct records of 60,000 bytes (under the default `--max-line-bytes`) in two
/// files, `per_file` each.
fn long_lines(dir: &std::path::Path, per_file: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x: u64 = 5;
    for f in 0..2 {
        let mut text = Vec::with_capacity(per_file * 60_000);
        for _ in 0..per_file {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.extend_from_slice(format!("{:016x}", x).as_bytes());
            text.resize(text.len() + 60_000 - 16, b'q');
            text.push(b'\n');
        }
        std::fs::write(dir.join(format!("f{f}.txt")), text).unwrap();
    }
}

/// With long records the memory a job uses stays put as the input grows: the runs'
/// sparse index keeps a prefix of each marked record, and the merge reads no more runs
/// at once than their records' buffers fit in the budget. (The index once kept whole
/// records, a fourth of the input here: twice the input took 22 MB more.)
#[test]
fn long_records_do_not_make_memory_grow_with_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for (name, per_file) in [("small", 750), ("large", 1500)] {
        let input = dir.path().join(name);
        long_lines(&input, per_file);
        let out = store_dedup(&[
            "--memory-limit",
            "8M",
            "--threads",
            "2",
            "--temp-dir",
            dir.path().to_str().unwrap(),
            input.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s = summary(&out);
        assert_eq!(s["distinct"].as_u64().unwrap(), 2 * per_file as u64, "{s}");
        assert!(s["runs_written"].as_u64().unwrap() > 10, "the 8 MiB budget spilled runs: {s}");
        peaks.push(s["peak_rss_bytes"].as_u64().unwrap());
        std::fs::remove_dir_all(&input).unwrap();
    }
    assert!(peaks[1] < peaks[0] + (6 << 20), "peak memory grew with the input: {peaks:?}");
}
