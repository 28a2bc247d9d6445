//! `store-gen`: deterministic test data for pg_store's tests, benchmarks and demo.
//!
//! ```text
//! store-gen OUT_DIR [--files 8] [--size 64M] [--dup 0.3] [--seed 1] [--nasty] [--max-line-bytes 65536] [--oracle]
//! ```
//! Prints a JSON summary; with `--oracle`, also the exact expected result of an ingest
//! of OUT_DIR (distinct count, rejects, empty records, SHA-256 of the sorted distinct set).

use std::path::PathBuf;
use std::process::ExitCode;

use pg_store::engine::limits::parse_memory;
use pg_store::testkit::{generate, oracle, GenSpec};

fn main() -> ExitCode {
    let mut spec = GenSpec::default();
    let (mut out, mut want_oracle) = (None, false);
    let mut args = std::env::args().skip(1);
    let res: Result<(), String> = (|| {
        while let Some(a) = args.next() {
            let mut val = || args.next().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--files" => spec.files = val()?.parse().map_err(|e| format!("--files: {e}"))?,
                "--size" => {
                    let v = val()?;
                    spec.size = v.parse().or_else(|_| parse_memory(&v).map_err(|e| e.to_string()))?
                }
                "--dup" => spec.dup = val()?.parse().map_err(|e| format!("--dup: {e}"))?,
                "--seed" => spec.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
                "--max-line-bytes" => spec.max_line_bytes = val()?.parse().map_err(|e| format!("--max-line-bytes: {e}"))?,
                "--nasty" => spec.nasty = true,
                "--oracle" => want_oracle = true,
                _ if out.is_none() && !a.starts_with('-') => out = Some(PathBuf::from(&a)),
                _ => return Err(format!("unexpected argument {a}")),
            }
        }
        Ok(())
    })();
    let Some(out) = out.filter(|_| res.is_ok()) else {
        eprintln!("store-gen: {}", res.err().unwrap_or_else(|| "usage: store-gen OUT_DIR [--files N] [--size 64M] [--dup 0.3] [--seed N] [--nasty] [--oracle]".into()));
        return ExitCode::from(1);
    };
    if let Err(e) = generate(&out, &spec) {
        eprintln!("store-gen: {}: {e}", out.display());
        return ExitCode::from(1);
    }
    let mut summary = serde_json::json!({ "spec": spec });
    if want_oracle {
        match oracle(&out, spec.max_line_bytes) {
            Ok(e) => summary["expected"] = serde_json::to_value(e).unwrap(),
            Err(e) => {
                eprintln!("store-gen: oracle: {e}");
                return ExitCode::from(1);
            }
        }
    }
    println!("{summary}");
    ExitCode::SUCCESS
}
