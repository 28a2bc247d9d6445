//! The reader and the normaliser against the naive oracle of `store_testkit`.
//!
//! The input is one file's bytes plus three control bytes: the record-length limit,
//! the read-buffer size, and the sizes in which a hostile `Read` hands the bytes over
//! (1 byte at a time up to whole). Whatever the bytes and however they are split, the
//! accepted records, the empty/rejected counts and every reject — its line number, byte
//! offset, reason and kept prefix — must equal what the oracle derives from the whole
//! file at once.

#![no_main]

use std::io::Read;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use store_engine::lines::{split_lines, verdict, Verdict, REJECT_PREFIX};
use store_engine::LineLimit;
use store_testkit::{oracle_of, oracle_rejects, OracleReject};

/// A reader that returns at most `step` bytes per call, cycling through `steps`.
struct Trickle<'a> {
    data: &'a [u8],
    steps: &'a [u8],
    i: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let step = self.steps.get(self.i % self.steps.len().max(1)).map_or(usize::MAX, |&s| s as usize + 1);
        self.i += 1;
        let n = self.data.len().min(out.len()).min(step);
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    // Limits up to 2,000 bytes, so that both the reader's cut at max + 5 and the 1 KiB
    // prefix cap are reached.
    let max_line = 1 + (input[0] as usize * 8) % 2000;
    let buf_size = 1 + input[1] as usize * 4;
    let nsteps = input[2] as usize % 8;
    let rest = &input[3..];
    let (steps, data) = rest.split_at(nsteps.min(rest.len()));

    let mut accepted = std::collections::BTreeSet::new();
    let mut rejects = Vec::new();
    let (mut records, mut empty) = (0u64, 0u64);
    let mut last_line = 0u64;
    let mut reader = Trickle { data, steps, i: 0 };
    split_lines::<_, store_engine::Error>(&mut reader, Path::new("fuzz"), max_line, buf_size, |l| {
        assert!(l.line > last_line, "line numbers increase");
        last_line = l.line;
        assert!(l.offset as usize <= data.len());
        match verdict(&l, LineLimit::bytes(max_line)) {
            Verdict::Empty => empty += 1,
            Verdict::Reject(reason) => {
                records += 1;
                let prefix = l.bytes[..l.bytes.len().min(REJECT_PREFIX)].to_vec();
                rejects.push(OracleReject { line: l.line, offset: l.offset, reason: reason.as_str(), prefix });
            }
            Verdict::Accept(s) => {
                records += 1;
                assert!(!s.is_empty() && s.len() <= max_line && !s.contains('\n') && !s.contains('\0'));
                accepted.insert(s.as_bytes().to_vec());
            }
        }
        Ok(())
    })
    .expect("an in-memory read cannot fail");

    let (want, set) = oracle_of([data], max_line);
    assert_eq!((records, empty, rejects.len() as u64), (want.records, want.empty, want.rejected), "counts");
    assert_eq!(accepted, set, "accepted records");
    assert_eq!(rejects, oracle_rejects(data, max_line), "rejects: line, offset, reason, prefix");
});
