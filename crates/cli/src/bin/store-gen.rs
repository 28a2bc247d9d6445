//! `store-gen`: deterministic test data for pg_store's tests, benchmarks and demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use store_engine::parse_memory;
use store_testkit::{generate, oracle, GenSpec};

/// Write deterministic line files (credential- and URL-like records, a share of them
/// repeated) into OUT_DIR and print a JSON summary. With --oracle, also the exact result
/// an ingest of OUT_DIR must give (distinct count, rejects, empty records, SHA-256 of the
/// sorted distinct set).
#[derive(Parser, Debug)]
#[command(name = "store-gen", version, about, max_term_width = 100)]
struct Args {
    /// Directory to write the files into (created if missing).
    out_dir: PathBuf,
    /// Number of files.
    #[arg(long, default_value_t = 8)]
    files: usize,
    /// Approximate size of each file: bytes or a size like 64M.
    #[arg(long, default_value = "64M", value_parser = |s: &str| s.parse::<u64>().or_else(|_| parse_memory(s).map_err(|e| e.to_string())))]
    size: u64,
    /// Share of records that repeat an earlier one, 0 to 1.
    #[arg(long, default_value_t = 0.3)]
    dup: f64,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Add every case a real drop directory holds: CRLF files, a BOM, empty lines, invalid
    /// UTF-8, NUL bytes, over-long and long-but-legal records, no final newline, an empty file.
    #[arg(long)]
    nasty: bool,
    /// The record-length limit the nasty records are built around, in bytes.
    #[arg(long, default_value_t = 65536)]
    max_line_bytes: usize,
    /// Also compute and print the expected ingest result.
    #[arg(long)]
    oracle: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let spec = GenSpec {
        files: args.files,
        size: args.size,
        dup: args.dup,
        seed: args.seed,
        nasty: args.nasty,
        max_line_bytes: args.max_line_bytes,
    };
    if let Err(e) = generate(&args.out_dir, &spec) {
        eprintln!("store-gen: {}: {e}", args.out_dir.display());
        return ExitCode::from(1);
    }
    let mut summary = serde_json::json!({ "spec": spec });
    if args.oracle {
        match oracle(&args.out_dir, spec.max_line_bytes) {
            Ok(e) => summary["expected"] = serde_json::to_value(e).expect("a summary serialises"),
            Err(e) => {
                eprintln!("store-gen: oracle: {e}");
                return ExitCode::from(1);
            }
        }
    }
    println!("{summary}");
    ExitCode::SUCCESS
}
