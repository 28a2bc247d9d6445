//! `store-dedup`: the engine as a command. A bounded-memory, parallel `sort -u` for
//! line files, with the ingest's normalisation, a reject log and a JSON summary.
//!
//! ```text
//! store-dedup [--memory-limit 256M|20%] [--threads N] [--temp-dir DIR] [--max-line-bytes N]
//!             [--compress-runs] [--fan-in N] [--filter SPEC] [--no-space-check]
//!             [--approximate [--fpr 0.01] [--expected N]] [--rejects FILE] PATH
//! ```
//!
//! Distinct accepted records go to stdout, one per line, bytewise sorted (input order in
//! approximate mode); the counters go to stderr as one JSON object. Exit status: 0 on
//! success, 1 on error, 2 if some compressed file could not be decoded (the rest was
//! processed and its records are in the output).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use pg_store::engine::filter::Filter;
use pg_store::engine::pipeline::{self, Config, FileCounts, Reject};
use pg_store::engine::walk::{walk, FileEntry};
use pg_store::engine::{limits, Error, Observer, Progress};

const USAGE: &str = "usage: store-dedup [--memory-limit 256M|20%] [--threads N] [--temp-dir DIR] \
[--max-line-bytes N] [--compress-runs] [--fan-in N] [--filter SPEC] [--no-space-check] \
[--approximate [--fpr 0.01] [--expected N]] [--rejects FILE] PATH";

struct Args {
    cfg: Config,
    approximate: bool,
    fpr: f64,
    expected: Option<u64>,
    rejects: Option<PathBuf>,
    path: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut cfg = Config::default();
    let (mut approximate, mut fpr, mut expected, mut rejects, mut path) = (false, 0.01, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v}"));
        match flag.as_str() {
            "--memory-limit" => cfg.memory_limit = limits::parse_memory(&value()?).map_err(|e| e.to_string())?,
            "--threads" => cfg.threads = num(value()?)?.max(1) as usize,
            "--temp-dir" => cfg.temp_dir = PathBuf::from(value()?),
            "--max-line-bytes" => cfg.max_line_bytes = num(value()?)? as usize,
            "--fan-in" => cfg.fan_in = num(value()?)?.max(2) as usize,
            "--compress-runs" => cfg.compress_runs = true,
            "--no-space-check" => cfg.check_space = false,
            "--filter" => cfg.filter = Filter::parse(&value()?).map_err(|e| e.to_string())?,
            "--approximate" => approximate = true,
            "--fpr" => fpr = value()?.parse().map_err(|_| "--fpr: not a number".to_string())?,
            "--expected" => expected = Some(num(value()?)?),
            "--rejects" => rejects = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            f if f.starts_with('-') && f.len() > 1 => return Err(format!("unknown option {f}\n{USAGE}")),
            _ if path.is_none() => path = Some(PathBuf::from(a)),
            _ => return Err(format!("only one PATH, please\n{USAGE}")),
        }
    }
    let path = path.ok_or(USAGE.to_string())?;
    Ok(Args { cfg, approximate, fpr, expected, rejects, path })
}

/// Writes rejects as JSON lines and remembers failed files.
struct Cli {
    rejects: Option<BufWriter<File>>,
    rejects_path: Option<PathBuf>,
    failed: Vec<String>,
}

impl Observer for Cli {
    fn reject(&mut self, r: &Reject<'_>) -> pg_store::engine::Result<()> {
        if let (Some(w), Some(path)) = (&mut self.rejects, &self.rejects_path) {
            let mut v = serde_json::to_value(r).expect("reject serialises");
            v["prefix_hex"] = r.prefix.iter().map(|b| format!("{b:02x}")).collect::<String>().into();
            writeln!(w, "{v}").map_err(|e| Error::io("could not write", path, e))?;
        }
        Ok(())
    }

    fn file_done(&mut self, _: usize, file: &FileEntry, _: &FileCounts, error: Option<&str>) -> pg_store::engine::Result<()> {
        if let Some(e) = error {
            eprintln!("store-dedup: {e}");
            self.failed.push(file.path.display().to_string());
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<ExitCode, Error> {
    let started = Instant::now();
    let listing = walk(&args.path)?;
    let progress = Arc::new(Progress::default());
    Progress::add(&progress.files_total, listing.files.len() as u64);
    Progress::add(&progress.bytes_total, listing.total_bytes());
    Progress::add(&progress.files_skipped, listing.skipped);
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cli = Cli {
        rejects: args.rejects.as_ref().map(|p| File::create(p).map(BufWriter::new)).transpose().map_err(|e| {
            Error::io("could not create", args.rejects.as_deref().unwrap(), e)
        })?,
        rejects_path: args.rejects.clone(),
        failed: Vec::new(),
    };
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let stdout_path = PathBuf::from("<stdout>");
    let mut extra = serde_json::Map::new();
    if args.approximate {
        let report = pipeline::bloom_distinct(&args.cfg, &listing.files, args.fpr, args.expected, progress.clone(), cancel, &mut cli, &mut |rec| {
            out.write_all(rec).and_then(|_| out.write_all(b"\n")).map_err(|e| Error::io("could not write", &stdout_path, e))
        })?;
        extra.insert("mode".into(), "approximate".into());
        extra.insert("bloom".into(), serde_json::to_value(report).unwrap());
    } else {
        let sorted = pipeline::sort_distinct(&args.cfg, &listing.files, progress.clone(), cancel, &mut cli)?;
        extra.insert("sort_s".into(), started.elapsed().as_secs_f64().into());
        let mut merger = sorted.merge(None, &mut cli)?;
        while let Some(rec) = merger.next_record()? {
            out.write_all(rec).and_then(|_| out.write_all(b"\n")).map_err(|e| Error::io("could not write", &stdout_path, e))?;
        }
        extra.insert("mode".into(), "exact".into());
    }
    out.flush().map_err(|e| Error::io("could not write", &stdout_path, e))?;
    if let (Some(w), Some(p)) = (cli.rejects.as_mut(), &args.rejects) {
        w.flush().map_err(|e| Error::io("could not write", p, e))?;
    }
    progress.set_phase(pg_store::engine::Phase::Done);
    let mut summary = serde_json::to_value(progress.snapshot()).unwrap();
    let obj = summary.as_object_mut().unwrap();
    obj.append(&mut extra);
    obj.insert("failed_files".into(), cli.failed.clone().into());
    obj.insert("elapsed_s".into(), started.elapsed().as_secs_f64().into());
    obj.insert("peak_rss_bytes".into(), limits::peak_rss().into());
    obj.insert("memory_limit".into(), args.cfg.memory_limit.into());
    obj.insert("threads".into(), args.cfg.threads.into());
    eprintln!("{summary}");
    Ok(if cli.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("store-dedup: {msg}");
            return ExitCode::from(1);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store-dedup: {e}");
            ExitCode::from(1)
        }
    }
}
