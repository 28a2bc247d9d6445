//! The adaptive batcher: how many records the consumer should take next, to insert as
//! many rows a second as it can without any batch taking longer than it should.
//!
//! A batch costs a fixed part (a commit; on Citus a distributed transaction, ~0.4 s) and
//! a part per row. From the last batches' sizes and latencies it fits `t = F + c·n`, and
//! aims each batch at the larger of `target` and ten times `F` — so the fixed cost stays
//! under a tenth of the time — within the `ceiling`, `[min, max]` records and `max_bytes`
//! (which the consumer checks as it fills). A step at most quadruples the size (a ramp
//! from 100 rows to a million takes seven batches, not fourteen: on a distributed target
//! each costs a distributed transaction) and at most halves it, so one slow outlier (a
//! checkpoint, autovacuum) cannot swing it to an extreme. A fixed "100 ms a batch" rule
//! would shrink batches to nothing when a transaction alone costs more than 100 ms.

use std::collections::VecDeque;
use std::time::Duration;

use super::error::{Error, Result};

pub(crate) const DEFAULT_BATCH_MIN: usize = 100;
pub(crate) const DEFAULT_BATCH_MAX: usize = 50_000;
pub(crate) const DEFAULT_BATCH_TARGET: Duration = Duration::from_millis(250);
/// No batch is aimed at more than this, however high the fixed cost.
pub(crate) const DEFAULT_BATCH_CEILING: Duration = Duration::from_secs(10);
/// Bytes of records in one batch at most (16 MiB): long lines make smaller batches.
pub(crate) const DEFAULT_BATCH_MAX_BYTES: usize = 16 << 20;
/// The first batch on a distributed target, where even one row costs a distributed
/// transaction (~0.4 s on a small Citus cluster).
pub(crate) const DISTRIBUTED_BATCH_START: usize = 10_000;
/// The most one step multiplies the batch size by.
const GROWTH: usize = 4;
/// How many recent batches the fit uses.
const WINDOW: usize = 8;

#[derive(Debug, Clone)]
pub(crate) struct AdaptiveBatcher {
    min: usize,
    max: usize,
    target: Duration,
    ceiling: Duration,
    size: usize,
    recent: VecDeque<(usize, Duration)>,
    /// The last fit of (fixed, per-row) costs; kept while batches all have one size.
    model: Option<(f64, f64)>,
}

impl AdaptiveBatcher {
    /// Starts at `min`: the first batches probe the consumer cheaply.
    pub(crate) fn new(min: usize, max: usize, target: Duration) -> AdaptiveBatcher {
        AdaptiveBatcher::starting_at(min, min, max, target)
    }

    /// Starts at `start` (within `[min, max]`): a consumer known to have a high fixed
    /// cost per batch skips the cheap probes.
    pub(crate) fn starting_at(start: usize, min: usize, max: usize, target: Duration) -> AdaptiveBatcher {
        let min = min.max(1);
        let max = max.max(min);
        AdaptiveBatcher {
            min,
            max,
            target,
            ceiling: DEFAULT_BATCH_CEILING.max(target),
            size: start.clamp(min, max),
            recent: VecDeque::with_capacity(WINDOW),
            model: None,
        }
    }

    /// Records to put in the next batch.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The fixed and per-row cost of a batch (seconds), as last fitted.
    #[cfg(test)]
    pub(crate) fn costs(&self) -> Option<(f64, f64)> {
        self.model
    }

    /// Least squares of latency on rows over the recent batches; none while they have
    /// all had one size (or latency did not grow with size).
    fn fit(&self) -> Option<(f64, f64)> {
        let n = self.recent.len() as f64;
        let xs = self.recent.iter().map(|r| r.0 as f64);
        let ys = self.recent.iter().map(|r| r.1.as_secs_f64());
        let (mx, my) = (xs.clone().sum::<f64>() / n, ys.clone().sum::<f64>() / n);
        let sxx: f64 = xs.clone().map(|x| (x - mx) * (x - mx)).sum();
        let sxy: f64 = xs.zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        if n < 2.0 || sxx < 1e-9 || sxy <= 0.0 {
            return None;
        }
        let c = sxy / sxx;
        Some(((my - c * mx).max(0.0), c))
    }

    /// Report that a batch of `rows` records took `elapsed`; resizes the next batch.
    pub(crate) fn observe(&mut self, rows: usize, elapsed: Duration) {
        if rows == 0 {
            return;
        }
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((rows, elapsed));
        self.model = match (self.fit(), self.model) {
            (Some(m), _) => Some(m),
            // Batches all of one size: keep the fixed cost learnt, and let the per-row
            // cost follow what the batches take now.
            (None, Some((fixed, _))) => {
                let n = self.recent.iter().map(|r| r.0 as f64).sum::<f64>() / self.recent.len() as f64;
                let t = self.recent.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / self.recent.len() as f64;
                let fixed = fixed.min(0.9 * t);
                Some((fixed, (t - fixed) / n))
            }
            (None, None) => None,
        };
        let ideal = match self.model {
            Some((fixed, per_row)) => {
                let aim = self.target.as_secs_f64().max(10.0 * fixed).min(self.ceiling.as_secs_f64());
                ((aim - fixed).max(0.0) / per_row).round() as usize
            }
            // Nothing to fit yet (every batch of one size): try a bigger one, unless this
            // one already took the longest a batch may take.
            None if elapsed < self.ceiling / 2 => self.size.saturating_mul(GROWTH),
            None => self.size / 2,
        };
        let step = ideal.clamp(self.size / 2, self.size.saturating_mul(GROWTH));
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
pub(crate) struct Batch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    /// An empty batch with room for `bytes` of records and `records` records.
    pub(crate) fn with_capacity(bytes: usize, records: usize) -> Batch {
        Batch { data: Vec::with_capacity(bytes), ends: Vec::with_capacity(records) }
    }

    pub(crate) fn push(&mut self, rec: &[u8]) {
        self.data.extend_from_slice(rec);
        self.ends.push(self.data.len());
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The memory its buffers hold.
    pub(crate) fn footprint(&self) -> usize {
        self.data.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    pub(crate) fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }
}

/// A batch whose records are proven to be valid UTF-8 without NUL bytes: what a
/// consumer may hand to PostgreSQL as `text` without looking again. Only the engine makes
/// them, and only through a check that every batch passes, records re-read from
/// temporary runs included: a damaged run is an error, never invalid text in the database.
#[derive(Debug, Default)]
pub struct Texts {
    batch: Batch,
}

impl Texts {
    /// Check every record of `batch`: one SIMD pass over its buffer, a NUL scan, and a
    /// look at each record boundary (valid UTF-8 cut in the middle of a character would
    /// still be valid as a whole).
    pub(crate) fn new(batch: Batch) -> Result<Texts> {
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

    /// A batch of the given strings.
    #[cfg(test)]
    pub(crate) fn of<'a>(recs: impl IntoIterator<Item = &'a str>) -> Texts {
        let mut batch = Batch::default();
        for r in recs {
            batch.push(r.as_bytes());
        }
        Texts { batch }
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Bytes of text held.
    pub fn bytes(&self) -> usize {
        self.batch.bytes()
    }

    /// Record `i` (panics past the end).
    pub fn get(&self, i: usize) -> &str {
        // SAFETY: `new` checked that every record is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(self.batch.get(i)) }
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The last record: in exact mode the greatest, the batch's checkpoint key.
    pub fn last(&self) -> Option<&str> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    /// Give the buffer back, emptied, for the next batch.
    pub(crate) fn into_batch(mut self) -> Batch {
        self.batch.clear();
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A consumer whose batch costs `fixed` plus `per_row` for each row.
    fn settle(b: &mut AdaptiveBatcher, fixed: Duration, per_row: Duration, rounds: usize) -> usize {
        for _ in 0..rounds {
            let n = b.size();
            b.observe(n, fixed + per_row * n as u32);
        }
        b.size()
    }

    #[test]
    fn grows_toward_target_and_stays_in_bounds() {
        let mut b = AdaptiveBatcher::new(100, 5000, 100 * MS);
        assert_eq!(b.size(), 100);
        // 10 µs a row, no fixed cost: 100 ms is 10,000 rows, above max.
        assert_eq!(settle(&mut b, Duration::ZERO, Duration::from_micros(10), 20), 5000);
        // Now 100 µs a row: 1,000 rows hit the target.
        assert_eq!(settle(&mut b, Duration::ZERO, Duration::from_micros(100), 20), 1000);
        // Very slow: down to min and no lower.
        assert_eq!(settle(&mut b, 1000 * MS, Duration::ZERO, 20), 100);
    }

    #[test]
    fn a_fixed_cost_per_batch_makes_batches_bigger_not_smaller() {
        // A distributed transaction: 400 ms whatever the size, then 10 µs a row. A
        // 100 ms target would shrink to the minimum; aiming at 10 × the fixed cost keeps it
        // under a tenth of the time.
        let mut b = AdaptiveBatcher::new(100, 1_000_000, 100 * MS);
        let n = settle(&mut b, 400 * MS, Duration::from_micros(10), 40);
        assert!(n > 300_000, "settled at {n} rows");
        let (fixed, per_row) = b.costs().unwrap();
        assert!((fixed - 0.4).abs() < 0.01 && (per_row - 10e-6).abs() < 1e-7, "fit {fixed} {per_row}");
        let t = 0.4 + 10e-6 * n as f64;
        assert!(n as f64 / t > 0.85 / 10e-6, "{:.0} rows/s at {n} rows", n as f64 / t);
        // The ceiling holds even so.
        let mut c = AdaptiveBatcher::new(100, 10_000_000, 100 * MS);
        let m = settle(&mut c, 5000 * MS, Duration::from_micros(10), 40);
        assert!(5.0 + 10e-6 * (m as f64) <= DEFAULT_BATCH_CEILING.as_secs_f64() + 0.5, "{m}");
    }

    #[test]
    fn a_distributed_target_ramps_up_in_a_few_batches() {
        // 400 ms a batch whatever its size, then 2 µs a row: from 10,000 rows the batcher
        // reaches a million in four batches (from 100, doubling, it took fourteen, each
        // a distributed transaction).
        let mut b = AdaptiveBatcher::starting_at(DISTRIBUTED_BATCH_START, 100, 1_000_000, 250 * MS);
        let mut sizes = vec![b.size()];
        while b.size() < 1_000_000 {
            let n = b.size();
            b.observe(n, 400 * MS + Duration::from_micros(2) * n as u32);
            sizes.push(b.size());
            assert!(sizes.len() <= 5, "sizes {sizes:?}");
        }
        assert_eq!(sizes, [10_000, 40_000, 160_000, 640_000, 1_000_000]);
        // The start stays within the limits.
        assert_eq!(AdaptiveBatcher::starting_at(10, 100, 5000, MS).size(), 100);
        assert_eq!(AdaptiveBatcher::starting_at(10_000, 100, 5000, MS).size(), 5000);
    }

    #[test]
    fn one_outlier_moves_size_at_most_by_half() {
        let mut b = AdaptiveBatcher::new(10, 100_000, 100 * MS);
        let steady = settle(&mut b, Duration::ZERO, Duration::from_micros(20), 30);
        assert_eq!(steady, 5000);
        b.observe(steady, 10_000 * MS);
        assert_eq!(b.size(), steady / 2);
    }

    #[test]
    fn batch_holds_records_in_one_buffer() {
        let mut b = Batch::default();
        for r in ["a", "", "ccc"] {
            b.push(r.as_bytes());
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), [&b"a"[..], b"", b"ccc"]);
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
