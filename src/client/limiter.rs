//! Client-side pacing of run-creating POSTs: a token bucket.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket holding up to `burst` tokens, refilled at `rate` tokens a second.
///
/// Each caller takes its token at once, even into debt, and then sleeps off the debt, so
/// waiters are served in arrival order and the number of tokens handed out by time `t`
/// never exceeds `burst + rate * t`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    burst: f64,
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// At most `per_minute` tokens in any 60 seconds, `burst` of them back to back.
    pub(crate) fn per_minute(per_minute: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let rate = (f64::from(per_minute) - burst).max(1.0) / 60.0;
        TokenBucket {
            burst,
            rate,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token, waiting until it is due.
    pub(crate) async fn acquire(&self) {
        let wait = {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, last) = &mut *guard;
            let now = Instant::now();
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
            *last = now;
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / self.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn never_hands_out_more_than_burst_plus_rate() {
        // 660 a minute with a burst of 60: refills 10 a second.
        let bucket = Arc::new(TokenBucket::per_minute(660, 60));
        let taken = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (bucket, taken) = (bucket.clone(), taken.clone());
            tasks.push(tokio::spawn(async move {
                bucket.acquire().await;
                taken.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(taken.load(Ordering::SeqCst), 60, "the burst goes at once");
        tokio::time::sleep_until(start + Duration::from_millis(5050)).await;
        assert_eq!(taken.load(Ordering::SeqCst), 110, "then 10 a second");
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(14) && elapsed < Duration::from_millis(14_100));
    }
}
