//! The adaptive batcher: how many records the consumer should take next. It aims each
//! batch at `target` latency, as measured and reported by the consumer, from the
//! throughput of the last three batches, within `[min, max]` records. A step never more
//! than doubles or halves the size, so one slow outlier (a checkpoint, autovacuum)
//! cannot swing it to an extreme.

use std::collections::VecDeque;
use std::time::Duration;

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
}
