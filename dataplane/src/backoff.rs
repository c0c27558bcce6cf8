//! Backoff for accept loops. When `accept` fails — most often because the process is
//! out of file descriptors — retrying at once spins a core and floods the log while
//! nothing can improve; waiting a little longer after each consecutive failure lets
//! connections close and descriptors come back. Pure: the loop sleeps for what it says.

use std::time::Duration;

/// First wait after an accept error.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between retries while errors persist.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Consecutive-failure backoff: doubles from [`ACCEPT_BACKOFF_MIN`] up to
/// [`ACCEPT_BACKOFF_MAX`], and starts over after a success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
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

    /// Whether the failure just recorded is the first of a run: log those loudly, and
    /// the rest quietly (the run is one event, not thousands).
    pub fn first_failure(&self) -> bool {
        self.failures == 1
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
        assert!(!backoff.first_failure());
        backoff.succeeded();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MIN);
        assert!(backoff.first_failure());
    }

    #[test]
    fn a_long_run_of_failures_does_not_overflow() {
        let mut backoff = AcceptBackoff::default();
        for _ in 0..100_000 {
            assert!(backoff.failed() <= ACCEPT_BACKOFF_MAX);
        }
    }
}
