//! Backoff for accept loops. When `accept` fails — most often because the process is
//! out of file descriptors — retrying at once spins a core and floods the log while
//! nothing can improve; waiting a little longer after each consecutive failure lets
//! connections close and descriptors come back. Pure: the loop sleeps for what it says.

use std::time::{Duration, Instant};

/// First wait after an accept error.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between retries while errors persist.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this interval: under descriptor exhaustion accepts fail and
/// succeed in turn, and each run of failures would otherwise log again.
pub const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Consecutive-failure backoff: doubles from [`ACCEPT_BACKOFF_MIN`] up to
/// [`ACCEPT_BACKOFF_MAX`], and starts over after a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
    last_warning: Option<Instant>,
}

impl AcceptBackoff {
    /// Records a successful accept: the next failure waits the minimum again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Records a failed accept and returns how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        let wait = ACCEPT_BACKOFF_MIN.saturating_mul(1 << self.failures.min(16)).min(ACCEPT_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// Whether to log the failure just recorded as a warning: the first of a run, and
    /// not within [`ACCEPT_WARN_INTERVAL`] of the last warning. Log the rest quietly:
    /// a run is one event, not thousands.
    pub fn warn_now(&mut self, now: Instant) -> bool {
        let quiet =
            self.last_warning.is_some_and(|t| now.saturating_duration_since(t) < ACCEPT_WARN_INTERVAL);
        let warn = self.failures == 1 && !quiet;
        if warn {
            self.last_warning = Some(now);
        }
        warn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_reset_after_a_success() {
        let mut backoff = AcceptBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| backoff.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn warns_once_per_run_and_at_most_once_per_interval() {
        let start = Instant::now();
        let mut backoff = AcceptBackoff::default();
        backoff.failed();
        assert!(backoff.warn_now(start));
        backoff.failed();
        assert!(!backoff.warn_now(start), "a second failure of the same run");
        // Success and failure in turn, as when descriptors run out: quiet for a while.
        backoff.succeeded();
        backoff.failed();
        assert!(!backoff.warn_now(start + Duration::from_secs(1)));
        backoff.succeeded();
        backoff.failed();
        assert!(backoff.warn_now(start + ACCEPT_WARN_INTERVAL));
    }

    #[test]
    fn a_long_run_of_failures_does_not_overflow() {
        let mut backoff = AcceptBackoff::default();
        for _ in 0..100_000 {
            assert!(backoff.failed() <= ACCEPT_BACKOFF_MAX);
        }
    }
}
