//! `store-dedup`: the engine as a command. A bounded-memory, parallel `sort -u` for
//! line files, with the ingest's normalisation, a reject log and a JSON summary.
//!
//! Distinct accepted records go to stdout, one per line, bytewise sorted (input order in
//! approximate mode); the counters go to stderr as one JSON object. Exit status: 0 on
//! success, 1 on error, 2 if some file could not be read to the end (the rest was
//! processed and its records are in the output).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use store_engine::{
    default_threads, distinct, peak_rss, walk, BatchInfo, BatchLimits, Config, Dedup, Error, FileCounts, FileEntry,
    FileOutcome, Filter, Flow, LineLimit, Progress, Reject, Sink, Texts,
};

/// Deduplicate line files like `LC_ALL=C sort -u`, in bounded memory, with pg_store's
/// normalisation: a BOM and one trailing CR dropped, empty lines skipped, invalid UTF-8,
/// NUL bytes and over-long lines rejected (and logged with --rejects). *.gz and *.zst
/// are decompressed. A summary goes to stderr as JSON.
#[derive(Parser, Debug)]
#[command(name = "store-dedup", version, about, max_term_width = 100)]
struct Args {
    /// A file, or a directory read recursively (hidden names and symbolic links inside it are skipped).
    path: PathBuf,
    /// Memory budget: bytes, a size (256M, 1G) or a share of RAM (20%).
    #[arg(long, default_value = "20%", value_parser = parse_memory)]
    memory_limit: u64,
    /// Sort threads [default: half the cores].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    /// Directory for sorted runs [default: $TMPDIR].
    #[arg(long)]
    temp_dir: Option<PathBuf>,
    /// Longest record accepted, in bytes; longer ones are rejected as too_long.
    #[arg(long, default_value_t = LineLimit::DEFAULT.bytes)]
    max_line_bytes: usize,
    /// zstd-compress the sorted runs: less temporary disk, more CPU.
    #[arg(long)]
    compress_runs: bool,
    /// Most runs merged at once (open files during the merge).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(2..))]
    fan_in: u64,
    /// Keep only matching records: a regular expression, or include=RE;exclude=RE;min_len=N;max_len=N.
    #[arg(long, value_parser = parse_filter)]
    filter: Option<Filter>,
    /// Do not refuse to start when the temporary directory looks too small.
    #[arg(long)]
    no_space_check: bool,
    /// One pass through a Bloom filter instead of a sort: approximate (may drop a new line), input order.
    #[arg(long)]
    approximate: bool,
    /// False-positive rate of the Bloom filter (--approximate).
    #[arg(long, default_value_t = 0.01, requires = "approximate")]
    fpr: f64,
    /// Distinct lines to size the Bloom filter for (--approximate) [default: one per 32 bytes of input].
    #[arg(long, requires = "approximate")]
    expected: Option<u64>,
    /// Write every rejected record here, one JSON object per line.
    #[arg(long)]
    rejects: Option<PathBuf>,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    store_engine::parse_memory(s).map_err(|e| e.to_string())
}

fn parse_filter(s: &str) -> Result<Filter, String> {
    Filter::parse(s).map_err(|e| e.to_string())
}

/// Writes records to stdout, rejects as JSON lines, and remembers failed files.
struct Cli<W: Write> {
    out: W,
    rejects: Option<(BufWriter<File>, PathBuf)>,
    failed: Vec<String>,
}

fn write_error(path: &str, e: io::Error) -> Error {
    Error::io("could not write", std::path::Path::new(path), e)
}

impl<W: Write> Sink for Cli<W> {
    type Error = Error;

    fn batch(&mut self, batch: &Texts, _: &BatchInfo<'_>) -> Result<Flow, Error> {
        for rec in batch.iter() {
            match self.out.write_all(rec.as_bytes()).and_then(|_| self.out.write_all(b"\n")) {
                Ok(()) => {}
                // `store-dedup … | head`: the reader is gone, stop quietly.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Flow::Stop),
                Err(e) => return Err(write_error("<stdout>", e)),
            }
        }
        Ok(Flow::Continue)
    }

    fn reject(&mut self, r: &Reject<'_>) -> Result<Flow, Error> {
        if let Some((w, path)) = &mut self.rejects {
            let mut v = serde_json::to_value(r).expect("a reject serialises");
            v["prefix_hex"] = r.prefix.iter().map(|b| format!("{b:02x}")).collect::<String>().into();
            writeln!(w, "{v}").map_err(|e| Error::io("could not write", path, e))?;
        }
        Ok(Flow::Continue)
    }

    fn file_done(&mut self, file: &FileEntry, _: &FileCounts, outcome: &FileOutcome) -> Result<Flow, Error> {
        if let FileOutcome::Failed(why) = outcome {
            eprintln!("store-dedup: {why}");
            self.failed.push(file.path.display().to_string());
        }
        Ok(Flow::Continue)
    }
}

fn run(args: Args) -> Result<ExitCode, Error> {
    let started = Instant::now();
    let cfg = Config {
        memory_limit: args.memory_limit,
        threads: args.threads.map_or_else(default_threads, |t| t as usize),
        temp_dir: args.temp_dir.clone().unwrap_or_else(std::env::temp_dir),
        limit: LineLimit::bytes(args.max_line_bytes),
        compress_runs: args.compress_runs,
        fan_in: args.fan_in as usize,
        filter: args.filter.clone().unwrap_or_default(),
        dedup: if args.approximate { Dedup::Bloom } else { Dedup::Exact },
        bloom_fpr: args.fpr,
        bloom_expected: args.expected,
        // Writing to a pipe has no per-batch cost worth adapting to.
        batch: BatchLimits { min: 8192, max: 8192, ..BatchLimits::default() },
        check_space: !args.no_space_check,
        ..Config::default()
    };
    let path = std::fs::canonicalize(&args.path).map_err(|e| Error::io("could not open", &args.path, e))?;
    let (tree, listing) = walk(&path)?;
    let progress = Arc::new(Progress::default());
    Progress::add(&progress.files_total, (listing.files.len() + listing.failed.len()) as u64);
    Progress::add(&progress.bytes_total, listing.total_bytes());
    Progress::add(&progress.entries_ignored, listing.skipped.len() as u64);
    let rejects = match &args.rejects {
        Some(p) => Some((BufWriter::new(File::create(p).map_err(|e| Error::io("could not create", p, e))?), p.clone())),
        None => None,
    };
    let stdout = io::stdout();
    let mut cli = Cli { out: BufWriter::with_capacity(1 << 20, stdout.lock()), rejects, failed: Vec::new() };
    for f in &listing.failed {
        eprintln!("store-dedup: {}", f.error);
        cli.failed.push(f.path.display().to_string());
    }
    let report = distinct(&cfg, &tree, &listing.files, None, &progress, &mut cli)?;
    match cli.out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(write_error("<stdout>", e)),
        _ => {}
    }
    if let Some((w, p)) = &mut cli.rejects {
        w.flush().map_err(|e| Error::io("could not write", p, e))?;
    }
    let mut summary = serde_json::to_value(progress.snapshot()).expect("a snapshot serialises");
    let obj = summary.as_object_mut().expect("an object");
    obj.insert("mode".into(), cfg.dedup.as_str().into());
    if let Some(b) = &report.bloom {
        obj.insert("bloom".into(), serde_json::to_value(b).expect("a report serialises"));
    }
    obj.insert("failed_files".into(), cli.failed.clone().into());
    obj.insert("elapsed_s".into(), started.elapsed().as_secs_f64().into());
    obj.insert("peak_rss_bytes".into(), peak_rss().into());
    obj.insert("memory_limit".into(), cfg.memory_limit.into());
    obj.insert("threads".into(), cfg.threads.into());
    eprintln!("{summary}");
    Ok(if cli.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("store-dedup: {e}");
            ExitCode::from(1)
        }
    }
}
