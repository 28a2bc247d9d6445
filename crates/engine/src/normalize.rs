//! The normalisation contract, as one pure function over one raw record.
//!
//! Records are split on `\n` (see [`crate::read`]); then, in this order:
//! a UTF-8 BOM at the very start of a file is dropped, one trailing `\r` is dropped,
//! an empty record is skipped (counted, not rejected), a record longer than
//! `max_line_bytes` is rejected as `too_long`, one holding a NUL byte as `nul_byte`,
//! one that is not valid UTF-8 as `invalid_utf8`. Nothing else is changed: no
//! trimming, no case folding. This is exactly what `shared/bench/oracle.py` does.

use serde::Serialize;

/// The UTF-8 byte order mark, dropped at the very start of a file.
pub(crate) const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Why a record was rejected; the names are the ones stored in `store.rejects.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not valid UTF-8.
    InvalidUtf8,
    /// Holds a NUL byte, which `text` cannot.
    NulByte,
    /// Longer than the [`LineLimit`].
    TooLong,
}

impl RejectReason {
    /// The name stored in `store.rejects.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::NulByte => "nul_byte",
            RejectReason::TooLong => "too_long",
        }
    }
}

/// How long an accepted record may be: bytes, and characters when the target column
/// counts them (`varchar(n)`), so that a record the column would refuse is rejected as
/// `too_long` at the scan instead of failing an insert batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineLimit {
    /// Bytes at most.
    pub bytes: usize,
    /// Characters at most, when the target column counts them.
    pub chars: Option<usize>,
}

impl LineLimit {
    /// The default: 64 KiB, characters not counted (`store.max_line_bytes`).
    pub const DEFAULT: LineLimit = LineLimit { bytes: 64 << 10, chars: None };

    /// A limit in bytes only.
    pub fn bytes(bytes: usize) -> LineLimit {
        LineLimit { bytes, chars: None }
    }

    /// Whether a record (valid UTF-8 when `chars` is set) is over the limit. Characters
    /// are counted only when there are more bytes than the character limit.
    #[inline]
    pub(crate) fn exceeded_by(&self, rec: &[u8]) -> bool {
        rec.len() > self.bytes || self.chars.is_some_and(|n| rec.len() > n && char_count(rec) > n)
    }
}

/// Characters in UTF-8 bytes: the bytes that are not continuation bytes.
fn char_count(rec: &[u8]) -> usize {
    rec.iter().filter(|&&b| (b as i8) >= -0x40).count()
}

/// The verdict on one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Valid: the normalised bytes, guaranteed UTF-8 without NUL or newline.
    Accept(&'a str),
    /// Empty once a BOM and a trailing `\r` are dropped: skipped, and counted.
    Empty,
    /// Invalid: reported, and counted.
    Reject(RejectReason),
}

/// Drop a BOM if `first` (the record starts the file), then one trailing `\r`.
pub(crate) fn strip(mut raw: &[u8], first: bool) -> &[u8] {
    if first && raw.starts_with(BOM) {
        raw = &raw[BOM.len()..];
    }
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

/// Classify one raw record (without its `\n`).
pub(crate) fn classify(raw: &[u8], first: bool, limit: LineLimit) -> Verdict<'_> {
    let rec = strip(raw, first);
    if rec.is_empty() {
        return Verdict::Empty;
    }
    if rec.len() > limit.bytes {
        return Verdict::Reject(RejectReason::TooLong);
    }
    if memchr::memchr(0, rec).is_some() {
        return Verdict::Reject(RejectReason::NulByte);
    }
    match std::str::from_utf8(rec) {
        Ok(_) if limit.exceeded_by(rec) => Verdict::Reject(RejectReason::TooLong),
        Ok(s) => Verdict::Accept(s),
        Err(_) => Verdict::Reject(RejectReason::InvalidUtf8),
    }
}

/// The verdict on one record as the reader split it: over-long records were cut short
/// by the reader, and records of a buffer validated whole skip the UTF-8 check.
pub fn verdict<'a>(l: &super::read::RawLine<'a>, limit: LineLimit) -> Verdict<'a> {
    if l.truncated {
        Verdict::Reject(RejectReason::TooLong)
    } else if l.clean {
        classify_clean(l.bytes, l.line == 1, limit)
    } else {
        classify(l.bytes, l.line == 1, limit)
    }
}

/// [`classify`] for a record already known to be valid UTF-8 without NUL.
#[inline]
pub(crate) fn classify_clean(raw: &[u8], first: bool, limit: LineLimit) -> Verdict<'_> {
    let rec = strip(raw, first);
    if rec.is_empty() {
        Verdict::Empty
    } else if limit.exceeded_by(rec) {
        Verdict::Reject(RejectReason::TooLong)
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
        assert_eq!(classify(b"abc", false, LineLimit::bytes(10)), Verdict::Accept("abc"));
        assert_eq!(classify(b"abc\r", false, LineLimit::bytes(10)), Verdict::Accept("abc"));
        assert_eq!(classify(b"abc\r\r", false, LineLimit::bytes(10)), Verdict::Accept("abc\r"));
        assert_eq!(classify(b"\r", false, LineLimit::bytes(10)), Verdict::Empty);
        assert_eq!(classify(b"", false, LineLimit::bytes(10)), Verdict::Empty);
        assert_eq!(classify(b" a ", false, LineLimit::bytes(10)), Verdict::Accept(" a "));
        assert_eq!(classify(b"\xEF\xBB\xBFx", true, LineLimit::bytes(10)), Verdict::Accept("x"));
        // A BOM that is not at the start of the file is data.
        assert_eq!(classify(b"\xEF\xBB\xBFx", false, LineLimit::bytes(10)), Verdict::Accept("\u{feff}x"));
        assert_eq!(classify(b"\xEF\xBB\xBF\r", true, LineLimit::bytes(10)), Verdict::Empty);
        assert_eq!(classify(b"a\0b", false, LineLimit::bytes(10)), Verdict::Reject(RejectReason::NulByte));
        assert_eq!(classify(b"a\xffb", false, LineLimit::bytes(10)), Verdict::Reject(RejectReason::InvalidUtf8));
        // The limit applies after the CR and BOM are gone, and too_long wins over the rest.
        assert_eq!(classify(b"0123456789\r", false, LineLimit::bytes(10)), Verdict::Accept("0123456789"));
        assert_eq!(classify(b"\xEF\xBB\xBF0123456789", true, LineLimit::bytes(10)), Verdict::Accept("0123456789"));
        assert_eq!(classify(b"0123456789\xff", false, LineLimit::bytes(10)), Verdict::Reject(RejectReason::TooLong));
        assert_eq!(classify(b"\0\xff", false, LineLimit::bytes(10)), Verdict::Reject(RejectReason::NulByte));
    }

    #[test]
    fn a_character_limit_counts_characters_not_bytes() {
        let varchar3 = LineLimit { bytes: 100, chars: Some(3) };
        assert_eq!(classify("äöü".as_bytes(), false, varchar3), Verdict::Accept("äöü"), "6 bytes, 3 characters");
        assert_eq!(classify("äöüx".as_bytes(), false, varchar3), Verdict::Reject(RejectReason::TooLong));
        assert_eq!(classify(b"abcd", false, varchar3), Verdict::Reject(RejectReason::TooLong));
        assert_eq!(classify_clean("東京".as_bytes(), false, varchar3), Verdict::Accept("東京"));
        assert_eq!(classify_clean("東京都庁".as_bytes(), false, varchar3), Verdict::Reject(RejectReason::TooLong));
        // Invalid UTF-8 stays invalid_utf8 whatever its length in characters would be.
        assert_eq!(
            classify(b"ab\xff", false, LineLimit { bytes: 100, chars: Some(1) }),
            Verdict::Reject(RejectReason::InvalidUtf8)
        );
    }
}
