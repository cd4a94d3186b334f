//! Redis's clock as this process sees it. The purchase script decides the
//! sale window with Redis's own clock, the one every gateway shares; the
//! gateway's early refusals (not started, ended) use the same clock, learned
//! from `TIME`, so a gateway whose own clock is off refuses no one early.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::Utc;

use super::store::Store;

/// The early refusals leave this much room on each side of the window:
/// buyers that close to its edges go to the script, which decides exactly.
pub const WINDOW_SLACK_MS: i64 = 250;

/// The offset from this process's clock to Redis's.
#[derive(Debug, Default)]
pub struct RedisClock {
    offset_ms: AtomicI64,
}

impl RedisClock {
    /// Redis's time now, in Unix milliseconds (as of the last sync).
    pub fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Learns the offset again: Redis's `TIME` against the middle of the
    /// round trip.
    pub async fn sync(&self, store: &Store) -> redis::RedisResult<()> {
        let before = Utc::now().timestamp_millis();
        let redis_ms = store.time_ms().await?;
        let after = Utc::now().timestamp_millis();
        self.offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a sale of window [`starts_ms`, `ends_ms`) has surely not
    /// started (`Some(true)`), surely ended (`Some(false)`), or is open or
    /// too close to call (`None`: the script decides).
    pub fn outside(&self, starts_ms: i64, ends_ms: i64) -> Option<bool> {
        let now = self.now_ms();
        if now + WINDOW_SLACK_MS < starts_ms {
            Some(true)
        } else if now - WINDOW_SLACK_MS >= ends_ms {
            Some(false)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sure_verdicts_are_given_near_the_window_edges() {
        let clock = RedisClock::default();
        let now = clock.now_ms();
        assert_eq!(clock.outside(now + 10_000, now + 20_000), Some(true));
        assert_eq!(clock.outside(now + 10, now + 20_000), None);
        assert_eq!(clock.outside(now - 20_000, now - 10_000), Some(false));
        assert_eq!(clock.outside(now - 20_000, now - 10), None);
        assert_eq!(clock.outside(now - 1, now + 1_000), None);
    }
}
