//! Deterministic fixtures and a naive oracle, shared by the engine's tests, the
//! integration tests, the benchmarks (`store-gen`) and `make demo`. No pgrx here.
//!
//! The generator makes the same shape of data as `shared/bench/gen_lines.py`:
//! credential- and URL-like records of about 57 bytes, a share of them repeating
//! earlier ones within and across files, and with `nasty` every case a real drop
//! directory holds (CRLF files, a BOM, empty lines, invalid UTF-8, NUL bytes,
//! over-long and long-but-legal records, no final newline, an empty file). Its own RNG
//! (splitmix64) keeps it fast and stable; it does not reproduce the script byte for
//! byte.
//!
//! The oracle reads whole files into memory and applies the normalisation contract
//! with none of the engine's code: it is the independent answer tests compare with.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

const WORDS: &[&str] = &[
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "admin",
    "user",
    "test",
    "info",
    "sales",
    "support",
    "contact",
    "hello",
    "office",
    "mail",
    "root",
    "guest",
    "dragon",
    "monkey",
    "shadow",
    "master",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "welcome",
    "login",
    "müller",
    "café",
    "naïve",
    "straße",
    "東京",
    "данные",
    "δοκιμή",
];
const DOMAINS: &[&str] = &["example.com", "mail.test", "corp.example.org", "post.example.net", "xn--bcher-kva.example"];

/// splitmix64: a cheap deterministic 64-bit scramble.
pub fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The i-th distinct record of a data set.
pub fn line_for(i: u64, seed: u64) -> Vec<u8> {
    let h = mix(i ^ (seed << 40));
    let w1 = WORDS[(h % WORDS.len() as u64) as usize];
    let w2 = WORDS[((h >> 8) % WORDS.len() as u64) as usize];
    let dom = DOMAINS[((h >> 16) % DOMAINS.len() as u64) as usize];
    let tail = mix(h) & 0xFF_FFFF_FFFF;
    let s = match (h >> 20) % 8 {
        0..=3 => format!("{w1}.{w2}{i}@{dom}:{w2}{tail:x}"),
        4 | 5 => format!("https://{dom}/{w1}/{i}?u={w2}&t={tail:x}"),
        6 => format!("{i}\t{w1} {w2}\t{tail:x}{}", " pad".repeat(((h >> 24) % 40) as usize)),
        _ => format!("{w1}{i}"),
    };
    s.into_bytes()
}

/// A small deterministic RNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GenSpec {
    pub files: usize,
    /// Approximate bytes per file.
    pub size: u64,
    /// Share of records that repeat an earlier one.
    pub dup: f64,
    pub seed: u64,
    pub nasty: bool,
    pub max_line_bytes: usize,
}

impl Default for GenSpec {
    fn default() -> Self {
        GenSpec { files: 8, size: 64 << 20, dup: 0.3, seed: 1, nasty: false, max_line_bytes: 65536 }
    }
}

/// Write the files of `spec` into `dir` (created if missing); returns their paths.
pub fn generate(dir: &Path, spec: &GenSpec) -> std::io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut rng = Rng::new(spec.seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut distinct = 0u64;
    let mut paths = Vec::new();
    for f in 0..spec.files {
        let path = dir.join(format!("part-{f:04}.txt"));
        let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(&path)?);
        let crlf = spec.nasty && f % 3 == 1;
        let nl: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let last_file = spec.nasty && f + 1 == spec.files;
        if spec.nasty && f % 4 == 2 {
            w.write_all(b"\xEF\xBB\xBF")?;
        }
        let mut written = 0u64;
        while written < spec.size {
            let i = if distinct > 0 && rng.unit() < spec.dup {
                rng.below(distinct)
            } else {
                distinct += 1;
                distinct - 1
            };
            if spec.nasty {
                let r = rng.unit();
                let max = spec.max_line_bytes;
                if r < 0.001 {
                    w.write_all(nl)?;
                } else if r < 0.0015 {
                    w.write_all(b"bad\xff\xfeutf8-")?;
                    write!(w, "{i}")?;
                    w.write_all(nl)?;
                } else if r < 0.0017 {
                    write!(w, "nul\0byte-{i}")?;
                    w.write_all(nl)?;
                } else if r < 0.00172 {
                    w.write_all(&vec![b'x'; max + 1])?;
                    w.write_all(nl)?;
                } else if r < 0.00175 {
                    write!(w, "long-{}-", i % 7)?;
                    w.write_all(&vec![b'y'; max - 16])?;
                    w.write_all(nl)?;
                }
            }
            let ln = line_for(i, spec.seed);
            w.write_all(&ln)?;
            written += (ln.len() + nl.len()) as u64;
            if !(last_file && written >= spec.size) {
                w.write_all(nl)?;
            }
        }
        w.flush()?;
        paths.push(path);
    }
    if spec.nasty && spec.files > 0 {
        let p = dir.join("empty-file.txt");
        fs::File::create(&p)?;
        paths.push(p);
    }
    Ok(paths)
}

/// The exact expected result of ingesting a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expected {
    pub files: u64,
    pub records: u64,
    pub empty: u64,
    pub rejected: u64,
    pub distinct: u64,
    /// SHA-256 of the distinct records sorted bytewise, each followed by `\n`.
    pub sha256: String,
}

/// The oracle over in-memory file contents.
pub fn oracle_of<'a>(
    files: impl IntoIterator<Item = &'a [u8]>,
    max_line_bytes: usize,
) -> (Expected, BTreeSet<Vec<u8>>) {
    let mut seen = BTreeSet::new();
    let mut e = Expected { files: 0, records: 0, empty: 0, rejected: 0, distinct: 0, sha256: String::new() };
    for data in files {
        e.files += 1;
        let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
        let mut recs: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        if recs.last() == Some(&&b""[..]) {
            recs.pop();
        }
        for r in recs {
            let r = r.strip_suffix(b"\r").unwrap_or(r);
            if r.is_empty() {
                e.empty += 1;
                continue;
            }
            e.records += 1;
            if r.len() > max_line_bytes || r.contains(&0) || std::str::from_utf8(r).is_err() {
                e.rejected += 1;
            } else {
                seen.insert(r.to_vec());
            }
        }
    }
    e.distinct = seen.len() as u64;
    e.sha256 = sha256_lines(seen.iter().map(|v| v.as_slice()));
    (e, seen)
}

/// One rejected record as the oracle sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleReject {
    /// 1-based line number in the decoded file.
    pub line: u64,
    /// Offset of the record's first byte (its BOM, for the first line) in the decoded file.
    pub offset: u64,
    pub reason: &'static str,
    /// The record's raw bytes as in the file (BOM and trailing CR included), cut at
    /// 1 KiB and at `max_line_bytes + 5` (past that a record is too long whatever follows,
    /// so no more of it is kept).
    pub prefix: Vec<u8>,
}

/// Every rejected record of one file's decoded bytes, in order, with the contract's
/// reason (too long first, then a NUL byte, then invalid UTF-8).
pub fn oracle_rejects(data: &[u8], max_line_bytes: usize) -> Vec<OracleReject> {
    let mut out = Vec::new();
    if data == b"\xEF\xBB\xBF" {
        return out;
    }
    let mut offset = 0u64;
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if pieces.last() == Some(&&b""[..]) {
        pieces.pop();
    }
    for (i, raw) in pieces.into_iter().enumerate() {
        let mut r = raw;
        if i == 0 {
            r = r.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(r);
        }
        let r = r.strip_suffix(b"\r").unwrap_or(r);
        let reason = if r.is_empty() {
            None
        } else if r.len() > max_line_bytes {
            Some("too_long")
        } else if r.contains(&0) {
            Some("nul_byte")
        } else if std::str::from_utf8(r).is_err() {
            Some("invalid_utf8")
        } else {
            None
        };
        if let Some(reason) = reason {
            let keep = raw.len().min(1024).min(max_line_bytes + 5);
            out.push(OracleReject { line: i as u64 + 1, offset, reason, prefix: raw[..keep].to_vec() });
        }
        offset += raw.len() as u64 + 1;
    }
    out
}

/// `../shared` beside the checkout (generator and oracle of the project's benchmarks),
/// when it is there. Callers that skip a cross-check without it must say so.
pub fn shared_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    d.join("bench/oracle.py").exists().then(|| d.canonicalize().unwrap_or(d))
}

/// SHA-256 of records each followed by `\n`.
pub fn sha256_lines<'a>(recs: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for r in recs {
        h.update(r);
        h.update(b"\n");
    }
    format!("{:x}", h.finalize())
}

/// The oracle over a file or directory (plain files only; compressed files are
/// decoded with flate2/zstd whole).
pub fn oracle(path: &Path, max_line_bytes: usize) -> std::io::Result<Expected> {
    Ok(oracle_set(path, max_line_bytes)?.0)
}

/// [`oracle`] with the distinct records themselves, to tell what is missing or extra.
pub fn oracle_set(path: &Path, max_line_bytes: usize) -> std::io::Result<(Expected, BTreeSet<Vec<u8>>)> {
    let mut contents = Vec::new();
    for p in files_under(path)? {
        let mut data = Vec::new();
        let f = fs::File::open(&p)?;
        match p.extension().and_then(|e| e.to_str()) {
            Some("gz") => flate2::read::MultiGzDecoder::new(f).read_to_end(&mut data)?,
            Some("zst") => zstd::stream::read::Decoder::new(f)?.read_to_end(&mut data)?,
            _ => std::io::BufReader::new(f).read_to_end(&mut data)?,
        };
        contents.push(data);
    }
    Ok(oracle_of(contents.iter().map(|c| c.as_slice()), max_line_bytes))
}

fn files_under(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut names: Vec<_> = fs::read_dir(path)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        if e.file_name().as_bytes().starts_with(b".") {
            continue;
        }
        let t = e.file_type()?;
        if t.is_dir() {
            out.extend(files_under(&e.path())?);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(out)
}
