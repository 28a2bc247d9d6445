//! The adaptive batcher: how many records the consumer should take next. It aims each
//! batch at `target` latency, as measured and reported by the consumer, from the
//! throughput of the last three batches, within `[min, max]` records. A step never more
//! than doubles or halves the size, so one slow outlier (a checkpoint, autovacuum)
//! cannot swing it to an extreme.

use std::collections::VecDeque;
use std::time::Duration;

use super::error::{Error, Result};

pub const DEFAULT_BATCH_MIN: usize = 100;
pub const DEFAULT_BATCH_MAX: usize = 5000;
pub const DEFAULT_BATCH_TARGET: Duration = Duration::from_millis(100);
/// How many recent batches the next size is computed from.
const WINDOW: usize = 3;

#[derive(Debug, Clone)]
pub struct AdaptiveBatcher {
    min: usize,
    max: usize,
    target: Duration,
    size: usize,
    recent: VecDeque<(usize, Duration)>,
}

impl AdaptiveBatcher {
    /// Starts at `min`: the first batches probe the consumer cheaply.
    pub fn new(min: usize, max: usize, target: Duration) -> AdaptiveBatcher {
        let min = min.max(1);
        let max = max.max(min);
        AdaptiveBatcher { min, max, target, size: min, recent: VecDeque::with_capacity(WINDOW) }
    }

    /// Records to put in the next batch.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Report that a batch of `rows` records took `elapsed`; resizes the next batch.
    pub fn observe(&mut self, rows: usize, elapsed: Duration) {
        if rows == 0 {
            return;
        }
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((rows, elapsed));
        let rows: usize = self.recent.iter().map(|r| r.0).sum();
        let secs: f64 = self.recent.iter().map(|r| r.1.as_secs_f64()).sum::<f64>().max(1e-6);
        let ideal = (rows as f64 / secs * self.target.as_secs_f64()).round() as usize;
        let step = ideal.clamp(self.size / 2, self.size.saturating_mul(2));
        self.size = step.clamp(self.min, self.max);
    }
}

impl Default for AdaptiveBatcher {
    fn default() -> Self {
        AdaptiveBatcher::new(DEFAULT_BATCH_MIN, DEFAULT_BATCH_MAX, DEFAULT_BATCH_TARGET)
    }
}

/// A batch of records in one buffer: cheap to fill, to hand to another thread, and to
/// turn into a `text[]` parameter.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    pub fn push(&mut self, rec: &[u8]) {
        self.data.extend_from_slice(rec);
        self.ends.push(self.data.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The batch's greatest record (records arrive sorted): its checkpoint key.
    pub fn last(&self) -> Option<&[u8]> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
}

/// A batch whose records are proven to be valid UTF-8 without NUL bytes: what a
/// consumer may hand to PostgreSQL as `text` without looking again. The only way to
/// make one is [`Texts::new`], which checks; records re-read from temporary runs pass
/// through it, so a damaged run is an error, never invalid text in the database.
#[derive(Debug, Default)]
pub struct Texts {
    batch: Batch,
}

impl Texts {
    /// Check every record of `batch`: one SIMD pass over its buffer, a NUL scan, and a
    /// look at each record boundary (valid UTF-8 cut in the middle of a character would
    /// still be valid as a whole).
    pub fn new(batch: Batch) -> Result<Texts> {
        let data = &batch.data;
        if simdutf8::basic::from_utf8(data).is_err() {
            return Err(Error::Corrupt("a record is not valid UTF-8".into()));
        }
        if memchr::memchr(0, data).is_some() {
            return Err(Error::Corrupt("a record holds a NUL byte".into()));
        }
        // A record starts at 0 or at the end of the previous one: never on a
        // continuation byte (0b10xx_xxxx).
        if batch.ends.iter().any(|&e| e < data.len() && (data[e] as i8) < -0x40) {
            return Err(Error::Corrupt("a record boundary splits a character".into()));
        }
        Ok(Texts { batch })
    }

    /// A batch of the given strings (for consumers' tests).
    pub fn of<'a>(recs: impl IntoIterator<Item = &'a str>) -> Texts {
        let mut batch = Batch::default();
        for r in recs {
            batch.push(r.as_bytes());
        }
        Texts { batch }
    }

    pub fn len(&self) -> usize {
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Bytes of text held.
    pub fn bytes(&self) -> usize {
        self.batch.bytes()
    }

    pub fn get(&self, i: usize) -> &str {
        // SAFETY: `new` checked that every record is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(self.batch.get(i)) }
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The last record: in exact mode the greatest, the batch's checkpoint key.
    pub fn last(&self) -> Option<&str> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    /// Give the buffer back, emptied, for the next batch.
    pub fn into_batch(mut self) -> Batch {
        self.batch.clear();
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_toward_target_and_stays_in_bounds() {
        let mut b = AdaptiveBatcher::default();
        assert_eq!(b.size(), 100);
        // 10 µs a row: 100 ms is 10,000 rows, above max.
        for _ in 0..10 {
            let n = b.size();
            b.observe(n, Duration::from_micros(10 * n as u64));
        }
        assert_eq!(b.size(), 5000);
        // Now 100 µs a row: 1,000 rows hit the target; the window takes 3 batches to see it.
        for _ in 0..10 {
            let n = b.size();
            b.observe(n, Duration::from_micros(100 * n as u64));
        }
        assert_eq!(b.size(), 1000);
        // Very slow: down to min and no lower.
        for _ in 0..20 {
            let n = b.size();
            b.observe(n, 1000 * MS);
        }
        assert_eq!(b.size(), 100);
    }

    #[test]
    fn one_outlier_moves_size_at_most_by_half() {
        let mut b = AdaptiveBatcher::new(10, 100_000, 100 * MS);
        for _ in 0..20 {
            let n = b.size();
            b.observe(n, Duration::from_micros(20 * n as u64));
        }
        let steady = b.size();
        assert_eq!(steady, 5000);
        b.observe(steady, 10_000 * MS);
        assert_eq!(b.size(), steady / 2);
    }

    #[test]
    fn batch_holds_records_in_one_buffer() {
        let mut b = Batch::default();
        assert_eq!(b.last(), None);
        for r in ["a", "", "ccc"] {
            b.push(r.as_bytes());
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), [&b"a"[..], b"", b"ccc"]);
        assert_eq!(b.last(), Some(&b"ccc"[..]));
        assert_eq!((b.len(), b.bytes()), (3, 4));
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn texts_refuse_what_is_not_text() {
        let of = |recs: &[&[u8]]| {
            let mut b = Batch::default();
            for r in recs {
                b.push(r);
            }
            Texts::new(b)
        };
        let t = of(&[b"a", "é".as_bytes(), b""]).unwrap();
        assert_eq!(t.iter().collect::<Vec<_>>(), ["a", "é", ""]);
        assert_eq!(t.last(), Some(""));
        assert!(of(&[b"a\xff"]).is_err());
        assert!(of(&[b"a\0b"]).is_err());
        // "é" cut in two: the whole buffer is valid UTF-8, each record is not.
        assert!(of(&[b"x\xc3", b"\xa9y"]).is_err());
        assert_eq!(Texts::of(["p", "q"]).len(), 2);
    }
}
