//! The normalisation contract, as one pure function over one raw record.
//!
//! Records are split on `\n` (see [`crate::engine::read`]); then, in this order:
//! a UTF-8 BOM at the very start of a file is dropped, one trailing `\r` is dropped,
//! an empty record is skipped (counted, not rejected), a record longer than
//! `max_line_bytes` is rejected as `too_long`, one holding a NUL byte as `nul_byte`,
//! one that is not valid UTF-8 as `invalid_utf8`. Nothing else is changed: no
//! trimming, no case folding. This is exactly what `shared/bench/oracle.py` does.

use serde::Serialize;

pub const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Default limit on an accepted record, in bytes (64 KiB), as `store.max_line_bytes`.
pub const DEFAULT_MAX_LINE_BYTES: usize = 65536;

/// Why a record was rejected; the names are the ones stored in `store.rejects.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    InvalidUtf8,
    NulByte,
    TooLong,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::NulByte => "nul_byte",
            Reason::TooLong => "too_long",
        }
    }
}

/// The verdict on one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Valid: the normalised bytes, guaranteed UTF-8 without NUL or newline.
    Accept(&'a str),
    Empty,
    Reject(Reason),
}

/// Drop a BOM if `first` (the record starts the file), then one trailing `\r`.
pub fn strip(mut raw: &[u8], first: bool) -> &[u8] {
    if first && raw.starts_with(BOM) {
        raw = &raw[BOM.len()..];
    }
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

/// Classify one raw record (without its `\n`).
pub fn classify(raw: &[u8], first: bool, max_line_bytes: usize) -> Verdict<'_> {
    let rec = strip(raw, first);
    if rec.is_empty() {
        return Verdict::Empty;
    }
    if rec.len() > max_line_bytes {
        return Verdict::Reject(Reason::TooLong);
    }
    if memchr::memchr(0, rec).is_some() {
        return Verdict::Reject(Reason::NulByte);
    }
    match std::str::from_utf8(rec) {
        Ok(s) => Verdict::Accept(s),
        Err(_) => Verdict::Reject(Reason::InvalidUtf8),
    }
}

/// The verdict on one record as the reader split it: over-long records were cut short
/// by the reader, and records of a buffer validated whole skip the UTF-8 check.
pub fn verdict<'a>(l: &super::read::RawLine<'a>, max_line_bytes: usize) -> Verdict<'a> {
    if l.truncated {
        Verdict::Reject(Reason::TooLong)
    } else if l.clean {
        classify_clean(l.bytes, l.line == 1, max_line_bytes)
    } else {
        classify(l.bytes, l.line == 1, max_line_bytes)
    }
}

/// [`classify`] for a record already known to be valid UTF-8 without NUL.
#[inline]
pub fn classify_clean(raw: &[u8], first: bool, max_line_bytes: usize) -> Verdict<'_> {
    let rec = strip(raw, first);
    if rec.is_empty() {
        Verdict::Empty
    } else if rec.len() > max_line_bytes {
        Verdict::Reject(Reason::TooLong)
    } else {
        debug_assert!(std::str::from_utf8(rec).is_ok() && !rec.contains(&0));
        // SAFETY: the caller validated the whole buffer this record lies in.
        Verdict::Accept(unsafe { std::str::from_utf8_unchecked(rec) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_cases() {
        assert_eq!(classify(b"abc", false, 10), Verdict::Accept("abc"));
        assert_eq!(classify(b"abc\r", false, 10), Verdict::Accept("abc"));
        assert_eq!(classify(b"abc\r\r", false, 10), Verdict::Accept("abc\r"));
        assert_eq!(classify(b"\r", false, 10), Verdict::Empty);
        assert_eq!(classify(b"", false, 10), Verdict::Empty);
        assert_eq!(classify(b" a ", false, 10), Verdict::Accept(" a "));
        assert_eq!(classify(b"\xEF\xBB\xBFx", true, 10), Verdict::Accept("x"));
        // A BOM that is not at the start of the file is data.
        assert_eq!(classify(b"\xEF\xBB\xBFx", false, 10), Verdict::Accept("\u{feff}x"));
        assert_eq!(classify(b"\xEF\xBB\xBF\r", true, 10), Verdict::Empty);
        assert_eq!(classify(b"a\0b", false, 10), Verdict::Reject(Reason::NulByte));
        assert_eq!(classify(b"a\xffb", false, 10), Verdict::Reject(Reason::InvalidUtf8));
        // The limit applies after the CR and BOM are gone, and too_long wins over the rest.
        assert_eq!(classify(b"0123456789\r", false, 10), Verdict::Accept("0123456789"));
        assert_eq!(classify(b"\xEF\xBB\xBF0123456789", true, 10), Verdict::Accept("0123456789"));
        assert_eq!(classify(b"0123456789\xff", false, 10), Verdict::Reject(Reason::TooLong));
        assert_eq!(classify(b"\0\xff", false, 10), Verdict::Reject(Reason::NulByte));
    }
}
