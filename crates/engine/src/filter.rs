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

#[derive(Debug, Clone, Default)]
pub struct Filter {
    include: Option<Regex>,
    exclude: Option<Regex>,
    min_len: usize,
    max_len: Option<usize>,
}

impl Filter {
    pub fn new(include: Option<&str>, exclude: Option<&str>, min_len: usize, max_len: Option<usize>) -> Result<Filter> {
        if let Some(max) = max_len {
            if max < min_len {
                return Err(Error::Config(format!("filter max length {max} is below min length {min_len}")));
            }
        }
        Ok(Filter { include: compile(include)?, exclude: compile(exclude)?, min_len, max_len })
    }

    /// Parse the SQL-facing filter spec: `key=value` pairs separated by `;`, keys
    /// `include`, `exclude` (regular expressions), `min_len`, `max_len` (bytes). A bare
    /// spec without `=` is an include pattern.
    pub fn parse(spec: &str) -> Result<Filter> {
        if !spec.contains('=') || !spec.split(';').all(|p| p.trim().is_empty() || key_of(p).is_some()) {
            return Filter::new(Some(spec), None, 0, None);
        }
        let (mut inc, mut exc, mut min, mut max) = (None, None, 0, None);
        for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').expect("checked by key_of");
            let num =
                || v.trim().parse::<usize>().map_err(|_| Error::Config(format!("filter {k}: not a number: {v:?}")));
            match k.trim() {
                "include" => inc = Some(v),
                "exclude" => exc = Some(v),
                "min_len" => min = num()?,
                "max_len" => max = Some(num()?),
                _ => unreachable!("checked by key_of"),
            }
        }
        Filter::new(inc, exc, min, max)
    }

    #[inline]
    pub fn keep(&self, rec: &str) -> bool {
        rec.len() >= self.min_len
            && self.max_len.is_none_or(|m| rec.len() <= m)
            && self.include.as_ref().is_none_or(|r| r.is_match(rec))
            && !self.exclude.as_ref().is_some_and(|r| r.is_match(rec))
    }
}

fn key_of(part: &str) -> Option<&str> {
    let k = part.split_once('=')?.0.trim();
    ["include", "exclude", "min_len", "max_len"].contains(&k).then_some(k)
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
        assert!(Filter::parse("(").is_err());
        assert!(Filter::parse("min_len=x").is_err());
        assert!(Filter::parse("min_len=5;max_len=2").is_err());
        assert!(Filter::parse("a{1000}{1000}{1000}").is_err(), "pattern blow-up is refused");
    }
}
