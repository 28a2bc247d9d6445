//! The predecessor's one-pass approximate mode, [`ApproxDedup`]: no sort, no spill; a
//! record whose key a Bloom filter may have seen is dropped. A false positive drops a
//! record that was new, so the run reports its *estimated* number of such wrongly
//! dropped records. Opt-in only (`dedup => 'bloom'`, `store-dedup --approximate`). A
//! fixed seed keeps runs reproducible.

use bloomfilter::Bloom;

use super::error::{Error, Result};

const SEED: [u8; 32] = *b"pg_store bloom filter seed v0001";

fn build(expected: u64, fpr: f64, max_bytes: Option<u64>) -> Result<Bloom<[u8]>> {
    if !(fpr > 0.0 && fpr < 1.0) {
        return Err(Error::Config(format!("false-positive rate {fpr} must be between 0 and 1, exclusive")));
    }
    let expected = expected.max(1) as usize;
    let mut bytes = Bloom::<[u8]>::compute_bitmap_size(expected, fpr) as u64;
    if let Some(max) = max_bytes {
        bytes = bytes.min(max.max(1));
    }
    Bloom::new_with_seed(bytes as usize, expected, &SEED).map_err(|e| Error::Config(format!("bloom filter: {e}")))
}

/// One-pass approximate deduplication.
pub(crate) struct ApproxDedup {
    bloom: Bloom<[u8]>,
    inserted: u64,
    /// Estimated share of the filter's bits that are set.
    fill: f64,
    est_false_drops: f64,
}

impl ApproxDedup {
    /// A filter for `expected` distinct records at false-positive rate `fpr`, using at
    /// most `max_bytes` (a smaller filter than asked raises the real rate, which the
    /// estimate then reflects).
    pub(crate) fn new(expected: u64, fpr: f64, max_bytes: Option<u64>) -> Result<ApproxDedup> {
        Ok(ApproxDedup { bloom: build(expected, fpr, max_bytes)?, inserted: 0, fill: 0.0, est_false_drops: 0.0 })
    }

    /// True if `rec` is (probably) new and should be kept; false if it is dropped.
    #[inline]
    pub(crate) fn offer(&mut self, rec: &[u8]) -> bool {
        if self.bloom.check(rec) {
            return false;
        }
        // A new record was kept at a fill where a new record is wrongly dropped with
        // probability p = fill^k: each kept record stands for 1/(1-p) new arrivals on
        // average, p/(1-p) of them dropped. Summed, the expected wrong drops.
        let k = self.bloom.number_of_hash_functions() as i32;
        let p = self.fill.powi(k).min(0.999);
        self.est_false_drops += p / (1.0 - p);
        // The record was a miss, so at least one of its k bits was clear: on average it
        // sets k(1-f)/(1-f^k) new bits. Tracking the fill this way stays exact where the
        // textbook (1-e^(-kn/m))^k, which ignores that conditioning, underestimates.
        self.fill += k as f64 * (1.0 - self.fill) / (1.0 - p) / self.bloom.len() as f64;
        self.fill = self.fill.min(1.0);
        self.bloom.set(rec);
        self.inserted += 1;
        true
    }

    /// Expected number of new records wrongly dropped so far.
    pub(crate) fn estimated_false_drops(&self) -> f64 {
        self.est_false_drops
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bloom.len() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximate_mode_keeps_firsts_and_estimates_its_error() {
        let n = 20_000u64;
        let mut d = ApproxDedup::new(n, 0.01, None).unwrap();
        let mut kept = 0u64;
        for round in 0..2 {
            for i in 0..n {
                let k = d.offer(format!("rec-{i}").as_bytes());
                if round == 1 {
                    assert!(!k, "a repeat is never kept");
                }
                kept += k as u64;
            }
        }
        let wrong = n - kept;
        let est = d.estimated_false_drops();
        // At 1 % for a full filter, the average rate over the fill is well below 1 %.
        assert!(wrong < n / 100, "{wrong} wrongly dropped");
        assert!(est > 0.0 && est < n as f64 / 100.0, "estimate {est}");
        assert!((wrong as f64 - est).abs() < 4.0 * est.sqrt() + 10.0, "estimate {est} vs actual {wrong}");
    }

    #[test]
    fn undersized_filter_reports_a_larger_error() {
        let mut small = ApproxDedup::new(10_000, 0.01, Some(1024)).unwrap();
        let kept = (0..10_000u32).filter(|i| small.offer(&i.to_le_bytes())).count() as f64;
        let wrong = 10_000.0 - kept;
        assert!(wrong > 1000.0);
        let est = small.estimated_false_drops();
        assert!((wrong - est).abs() < 0.25 * wrong, "estimate {est} vs actual {wrong}");
    }
}
