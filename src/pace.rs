//! Waiting in background loops: a sleep that ends early on shutdown, and the
//! exponential backoff every retry loop uses.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sleeps for `duration` unless `shutdown` fires first. Returns `false` when
/// the sleep was cut short by the shutdown, so loops read
/// `while pace::sleep(every, &shutdown).await { … }`.
pub async fn sleep(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// Exponential backoff: each failure doubles the wait, up to a ceiling; a
/// success starts again from the first wait.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next attempt; the one after is twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for the next wait unless `shutdown` fires first (then `false`).
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next_wait();
        sleep(wait, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..4).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn sleep_ends_early_on_shutdown() {
        let token = CancellationToken::new();
        token.cancel();
        assert!(!sleep(Duration::from_secs(3600), &token).await);
        assert!(sleep(Duration::ZERO, &CancellationToken::new()).await);
    }
}
