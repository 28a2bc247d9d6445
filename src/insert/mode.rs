//! How the next batch of a key range goes into the target — pure logic, no database.
//!
//! * **Proven**: the target was empty when the job began and ranges are disjoint, so the
//!   keys are new: the plain path (a COPY of the whole batch), for good — unless a key is
//!   found present anyway (a concurrent writer), which sends the range to the safe path
//!   for the rest of the job.
//! * **Safe**: look up or `ON CONFLICT DO NOTHING`. After `wait` batches in a row that
//!   found nothing present, the plain path is tried again.
//! * **Optimistic**: the plain path, tried because the batches before found nothing
//!   present — the steady state of a table growing by new files. A key found present
//!   makes it wait twice as many batches as the last time before the next try (at most
//!   [`MAX_BACKOFF`]).

/// Most batches an optimistic plain path waits after failures before it tries again.
pub const MAX_BACKOFF: u32 = 64;

/// The mode of a range (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Proven,
    Safe { wait: u32, backoff: u32 },
    Optimistic { backoff: u32 },
}

impl Mode {
    /// The mode a range starts in: proven if its checkpoint says the keys are new.
    pub fn start(proven: bool) -> Mode {
        if proven {
            Mode::Proven
        } else {
            Mode::Safe { wait: 0, backoff: 1 }
        }
    }

    /// Whether the next attempt goes by the plain path; a safe mode whose wait is over
    /// turns optimistic here.
    pub fn plain(&mut self) -> bool {
        match *self {
            Mode::Proven | Mode::Optimistic { .. } => true,
            Mode::Safe { wait: 0, backoff } if backoff <= MAX_BACKOFF => {
                *self = Mode::Optimistic { backoff };
                true
            }
            Mode::Safe { .. } => false,
        }
    }

    /// A batch committed; `present` of its lines were already in the target.
    pub fn committed(&mut self, present: u64) {
        *self = match *self {
            Mode::Proven => Mode::Proven,
            Mode::Optimistic { .. } => Mode::Optimistic { backoff: 1 },
            Mode::Safe { wait, backoff } if present == 0 => Mode::Safe { wait: wait.saturating_sub(1), backoff },
            Mode::Safe { backoff, .. } => Mode::Safe { wait: backoff, backoff },
        };
    }

    /// A key the plain path expected to be new was present. Returns whether the keys had
    /// been proven new (worth a LOG line: a concurrent writer).
    pub fn conflicted(&mut self) -> bool {
        let proven = *self == Mode::Proven;
        *self = match *self {
            // Keys were to be new and are not: never again.
            Mode::Proven => Mode::Safe { wait: u32::MAX, backoff: u32::MAX },
            Mode::Optimistic { backoff } => {
                let next = (backoff * 2).min(MAX_BACKOFF);
                Mode::Safe { wait: next, backoff: next }
            }
            safe => safe,
        };
        proven
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proven_keys_go_plain_until_a_conflict_then_never_again() {
        let mut m = Mode::start(true);
        for _ in 0..100 {
            assert!(m.plain());
            m.committed(0);
        }
        assert!(m.conflicted(), "a conflict of proven keys is worth a LOG line");
        for _ in 0..1000 {
            assert!(!m.plain());
            m.committed(0);
        }
    }

    #[test]
    fn the_safe_path_tries_plain_after_batches_that_found_nothing() {
        let mut m = Mode::start(false);
        // Nothing found so far (wait 0): the very next batch tries the plain path.
        assert!(m.plain());
        assert_eq!(m, Mode::Optimistic { backoff: 1 });
        // It meets a key: two batches on the safe path, which must find nothing, then plain.
        assert!(!m.conflicted());
        assert_eq!(m, Mode::Safe { wait: 2, backoff: 2 });
        assert!(!m.plain());
        m.committed(0);
        assert!(!m.plain());
        m.committed(0);
        assert!(m.plain());
    }

    #[test]
    fn a_safe_batch_that_finds_lines_present_restarts_the_wait() {
        let mut m = Mode::Safe { wait: 1, backoff: 4 };
        assert!(!m.plain());
        m.committed(3);
        assert_eq!(m, Mode::Safe { wait: 4, backoff: 4 });
    }

    #[test]
    fn optimistic_failures_back_off_doubling_up_to_the_cap() {
        let mut m = Mode::start(false);
        let mut waits = Vec::new();
        for _ in 0..10 {
            while !m.plain() {
                m.committed(0);
            }
            m.conflicted();
            if let Mode::Safe { wait, .. } = m {
                waits.push(wait);
            }
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64, 64, 64]);
        // A plain batch that succeeds resets the backoff.
        while !m.plain() {
            m.committed(0);
        }
        m.committed(0);
        assert_eq!(m, Mode::Optimistic { backoff: 1 });
    }
}
