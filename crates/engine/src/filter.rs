//! The optional filter stage, applied to records that passed normalisation: keep a
//! record if it matches `include`, does not match `exclude`, and its length in bytes
//! lies within `[min_len, max_len]`. Records it drops are counted as `filtered`.
//!
//! Patterns use the `regex` crate: linear time in the input whatever the pattern, so a
//! hostile pattern cannot stall a job; its compiled size is capped as well.

use regex::{Regex, RegexBuilder};

use super::error::{Error, Result};

/// Cap on a compiled pattern (1 MiB): enough for any sane filter, refuses blow-ups.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Which valid records a run keeps: those that match an `include` pattern, match no
/// `exclude` pattern, and whose length in bytes lies within `[min_len, max_len]`. The
/// default keeps every record. Made by [`Filter::parse`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    include: Option<Regex>,
    exclude: Option<Regex>,
    min_len: usize,
    max_len: Option<usize>,
}

impl Filter {
    pub(crate) fn new(
        include: Option<&str>,
        exclude: Option<&str>,
        min_len: usize,
        max_len: Option<usize>,
    ) -> Result<Filter> {
        if let Some(max) = max_len {
            if max < min_len {
                return Err(Error::Config(format!("filter max length {max} is below min length {min_len}")));
            }
        }
        Ok(Filter { include: compile(include)?, exclude: compile(exclude)?, min_len, max_len })
    }

    /// Parse the SQL-facing filter spec: `key=value` pairs separated by `;`, keys
    /// `include`, `exclude` (regular expressions), `min_len`, `max_len` (bytes), or a
    /// bare regular expression to include.
    ///
    /// A spec is read as pairs when every part between `;` starts with a word and `=`
    /// and at least one of those words is a key; then every word must be a key, once.
    /// So `include=^a;minlen=3` is refused (naming `min_len`) instead of becoming one
    /// pattern that matches nothing, while `u=admin` stays a pattern.
    pub fn parse(spec: &str) -> Result<Filter> {
        let parts: Vec<(&str, &str)> =
            match spec.split(';').filter(|p| !p.trim().is_empty()).map(word_and_value).collect::<Option<Vec<_>>>() {
                Some(parts) if parts.iter().any(|(k, _)| KEYS.contains(k)) => parts,
                // `minlen=3`: no known key, but one a typo away from one — a spec
                // misspelt, not a pattern (which would drop every line without it).
                Some(parts) if parts.iter().any(|(k, _)| near_a_key(k)) => {
                    let k = parts.iter().map(|(k, _)| *k).find(|k| near_a_key(k)).unwrap_or_default();
                    return Err(unknown_key(k));
                }
                _ => return Filter::new(Some(spec), None, 0, None),
            };
        let (mut inc, mut exc, mut min, mut max) = (None, None, 0, None);
        let mut seen: Vec<&str> = Vec::new();
        for (k, v) in parts {
            if seen.contains(&k) {
                return Err(Error::Config(format!("filter key {k} is given twice")));
            }
            seen.push(k);
            let num =
                || v.trim().parse::<usize>().map_err(|_| Error::Config(format!("filter {k}: not a number: {v:?}")));
            match k {
                "include" => inc = Some(v),
                "exclude" => exc = Some(v),
                "min_len" => min = num()?,
                "max_len" => max = Some(num()?),
                _ => return Err(unknown_key(k)),
            }
        }
        Filter::new(inc, exc, min, max)
    }

    #[inline]
    pub(crate) fn keep(&self, rec: &str) -> bool {
        rec.len() >= self.min_len
            && self.max_len.is_none_or(|m| rec.len() <= m)
            && self.include.as_ref().is_none_or(|r| r.is_match(rec))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(rec))
    }
}

/// The keys of a filter spec.
const KEYS: [&str; 4] = ["include", "exclude", "min_len", "max_len"];

/// A part of a spec that looks like `word=value` (an identifier, optional spaces, `=`):
/// the word and the value, as written after the `=`.
fn word_and_value(part: &str) -> Option<(&str, &str)> {
    let (k, v) = part.split_once('=')?;
    let k = k.trim();
    let word = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    word.then_some((k, v))
}

/// Whether `word` is within two edits of a key (and not a key).
fn near_a_key(word: &str) -> bool {
    !KEYS.contains(&word) && KEYS.iter().any(|key| edit_distance(word, key) <= 2)
}

/// The error for a word that is not a key, with the closest key when it looks like a
/// typo of one (at most two edits away).
fn unknown_key(k: &str) -> Error {
    let closest = KEYS.iter().map(|key| (edit_distance(k, key), *key)).min_by_key(|(d, _)| *d);
    let hint = match closest {
        Some((d, key)) if d <= 2 => format!(" (did you mean {key}?)"),
        _ => String::new(),
    };
    Error::Config(format!("unknown filter key {k:?}{hint}; the keys are {}", KEYS.join(", ")))
}

/// Levenshtein distance, in characters: the edits (insert, delete, replace) from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn compile(p: Option<&str>) -> Result<Option<Regex>> {
    p.map(|p| {
        RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| Error::Config(format!("filter pattern {p:?}: {e}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_exclude_and_lengths() {
        let f = Filter::new(Some("@"), Some("^admin"), 3, Some(10)).unwrap();
        assert!(f.keep("a@b"));
        assert!(!f.keep("a@"), "too short");
        assert!(!f.keep("abcdef@ghijk"), "too long");
        assert!(!f.keep("admin@x"), "excluded");
        assert!(!f.keep("nobody"), "not included");
        assert!(Filter::default().keep(""));
    }

    #[test]
    fn parses_specs_and_refuses_bad_ones() {
        assert!(Filter::parse("example\\.com$").unwrap().keep("x@example.com"));
        let f = Filter::parse("include=@;exclude=test;min_len=4").unwrap();
        assert!(f.keep("ab@cd") && !f.keep("a@b") && !f.keep("test@x"));
        // An `=` inside a bare pattern does not make it a spec.
        assert!(Filter::parse("u=admin").unwrap().keep("https://x/?u=admin"));
        // But a key misspelt on its own is not taken for a pattern.
        for typo in ["minlen=3", "maxlen=9", "includes=^a", " exlude = x"] {
            assert!(config_error(typo).contains("did you mean"), "{typo}");
        }
        assert!(Filter::parse("(").is_err());
        assert!(Filter::parse("min_len=x").is_err());
        assert!(Filter::parse("min_len=5;max_len=2").is_err());
        assert!(Filter::parse("a{1000}{1000}{1000}").is_err(), "pattern blow-up is refused");
    }

    fn config_error(spec: &str) -> String {
        match Filter::parse(spec) {
            Err(Error::Config(m)) => m,
            other => panic!("{spec:?} should be refused: {other:?}"),
        }
    }

    #[test]
    fn a_typo_in_a_key_is_refused_with_the_key_it_looks_like() {
        let m = config_error("include=^a;minlen=3");
        assert!(m.contains("\"minlen\"") && m.contains("did you mean min_len?"), "{m}");
        assert!(m.contains("include, exclude, min_len, max_len"), "{m}");
        let m = config_error("exclude=x; Include =y");
        assert!(m.contains("\"Include\"") && m.contains("did you mean include?"), "{m}");
        let m = config_error("max_len=9;colour=red");
        assert!(m.contains("\"colour\"") && !m.contains("did you mean"), "too far from any key: {m}");
        let m = config_error("include=a;include=b");
        assert!(m.contains("include is given twice"), "{m}");
        let m = config_error("min_len=1;max_len=5;min_len=2");
        assert!(m.contains("min_len is given twice"), "{m}");
        // Spaces around the key, an empty part, and a value with `=` in it.
        let f = Filter::parse(" include =u=admin;; max_len = 20 ;").unwrap();
        assert!(f.keep("https://x/?u=admin") && !f.keep("u=root"));
    }

    #[test]
    fn a_spec_without_a_known_key_or_not_all_pairs_is_a_pattern() {
        // No part names a key, nor comes within two edits of one: one regular expression.
        assert!(Filter::parse("a=b").unwrap().keep("xa=by"));
        assert!(Filter::parse("max-len=9").unwrap().keep("max-len=9"));
        assert!(Filter::parse("user=admin;role=root").unwrap().keep("user=admin;role=root"));
        // A part that is not `word=`: the whole spec is a pattern, `;` and all.
        assert!(Filter::parse("include=a;b").unwrap().keep("include=a;b"));
        assert!(Filter::parse("x-y=1;min_len=2").unwrap().keep("x-y=1;min_len=2"));
        assert!(Filter::parse("1a=b;include=c").unwrap().keep("1a=b;include=c"));
    }

    #[test]
    fn edit_distance_counts_characters() {
        assert_eq!(edit_distance("minlen", "min_len"), 1);
        assert_eq!(edit_distance("max_lne", "max_len"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("exclude", "exclude"), 0);
        assert_eq!(edit_distance("é", "e"), 1);
    }
}
