//! `make bench-mmap`: the engine's way of reading a plain input file (4 MiB `read`
//! calls into one buffer; records split and validated in place) against a memory map of
//! the file (memmap2, `MADV_SEQUENTIAL`) doing the same splitting and validation on the
//! mapped bytes. Same files, from the page cache (one unmeasured pass first), passes
//! alternating; prints the median wall time of each and the private memory (RssAnon +
//! RssFile, what `store.memory_limit` is measured against) seen during each pass.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use memmap2::{Advice, Mmap};
use store_engine::lines::{split_lines, READ_BUFFER};
use store_engine::private_rss;

#[derive(Parser)]
#[command(about = "read() against mmap for the engine's input files")]
struct Args {
    /// A directory of plain (uncompressed) line files.
    dir: PathBuf,
    /// Timed passes of each way.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What one pass saw: records, their bytes, the largest private memory sampled.
#[derive(Debug, Default, PartialEq)]
struct Pass {
    records: u64,
    bytes: u64,
    peak_rss: u64,
}

impl Pass {
    fn sample(&mut self) {
        self.peak_rss = self.peak_rss.max(private_rss().unwrap_or(0));
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the data directory")
        .map(|e| e.expect("list the data directory").path())
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    v.sort();
    v
}

/// The engine's path: `read::split_lines` over the file, 4 MiB at a time.
fn by_read(files: &[PathBuf]) -> Pass {
    let mut pass = Pass::default();
    for path in files {
        let mut f = File::open(path).expect("open");
        let mut n = 0u64;
        split_lines::<_, store_engine::Error>(&mut f, path, 1 << 20, READ_BUFFER, |l| {
            pass.records += 1;
            pass.bytes += l.bytes.len() as u64;
            std::hint::black_box(l.clean);
            n += 1;
            if n.is_multiple_of(1 << 20) {
                pass.sample();
            }
            Ok(())
        })
        .expect("read");
        pass.sample();
    }
    pass
}

/// The same work on a memory map: each 4 MiB stretch (ending at a newline) validated
/// in one pass, then split on `\n`, records as slices of the map.
fn by_mmap(files: &[PathBuf]) -> Pass {
    let mut pass = Pass::default();
    for path in files {
        let f = File::open(path).expect("open");
        // SAFETY: the benchmark's files are not modified while mapped.
        let map = unsafe { Mmap::map(&f) }.expect("mmap");
        map.advise(Advice::Sequential).expect("madvise");
        let data = &map[..];
        let mut start = 0;
        while start < data.len() {
            let end = (start + READ_BUFFER).min(data.len());
            let end = match memchr::memrchr(b'\n', &data[start..end]) {
                Some(i) if end < data.len() => start + i + 1,
                _ => end,
            };
            let chunk = &data[start..end];
            let clean = memchr::memchr(0, chunk).is_none() && simdutf8::basic::from_utf8(chunk).is_ok();
            std::hint::black_box(clean);
            for rec in chunk.strip_suffix(b"\n").unwrap_or(chunk).split(|b| *b == b'\n') {
                pass.records += 1;
                pass.bytes += rec.len() as u64;
            }
            start = end;
            if (start / READ_BUFFER).is_multiple_of(16) {
                pass.sample();
            }
        }
        pass.sample();
    }
    pass
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let files = files(&args.dir);
    let total: u64 = files.iter().map(|p| p.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    let warm = by_read(&files);
    let (mut read_s, mut mmap_s, mut read_rss, mut mmap_rss) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let r = by_read(&files);
        read_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let m = by_mmap(&files);
        mmap_s.push(t.elapsed().as_secs_f64());
        assert_eq!((r.records, r.bytes), (warm.records, warm.bytes), "read passes differ");
        assert_eq!((m.records, m.bytes), (warm.records, warm.bytes), "mmap saw other records than read");
        read_rss = read_rss.max(r.peak_rss);
        mmap_rss = mmap_rss.max(m.peak_rss);
    }
    let (r, m) = (median(read_s), median(mmap_s));
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "{} files, {:.0} MiB, {} records; median of {} passes from the page cache",
        files.len(),
        mib(total),
        warm.records,
        args.runs.max(1)
    );
    println!("read (the engine): {r:.2} s, {:.0} MiB/s, private memory peak {:.0} MiB", mib(total) / r, mib(read_rss));
    println!("mmap:              {m:.2} s, {:.0} MiB/s, private memory peak {:.0} MiB", mib(total) / m, mib(mmap_rss));
    println!("mmap / read: time {:.2}", m / r);
}
