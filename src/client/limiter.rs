//! Client-side pacing of run-creating POSTs: the API's own rule (at most N POSTs in any
//! minute) as a sliding window, optionally smoothed by a token bucket.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The window the per-minute limit is counted over: a minute, plus a second for the time a
/// request spends in transit, so the server never counts more in any minute of arrivals.
const WINDOW: Duration = Duration::from_secs(61);

/// Hands out send times so that no [`WINDOW`] holds more than `per_minute` of them, and no
/// more than `burst + rate * t` are handed out by time `t` (`rate` = `per_minute` / 60 s).
///
/// Each caller reserves its slot at once, and then sleeps until it is due, so waiters are
/// served in arrival order. With `burst == per_minute` (the default) only the window
/// applies: a job of up to `per_minute` POSTs goes out at full speed, and a longer one at
/// `per_minute` a minute on average.
#[derive(Debug)]
pub(crate) struct Limiter {
    per_minute: usize,
    burst: f64,
    rate: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The token bucket: tokens left (negative = debt) as of `last`.
    tokens: f64,
    last: Instant,
    /// The most recent `per_minute` reserved send times, oldest first (non-decreasing).
    slots: VecDeque<Instant>,
}

impl Limiter {
    /// At most `per_minute` POSTs in any minute, `burst` of them back to back.
    pub(crate) fn per_minute(per_minute: u32, burst: u32) -> Self {
        let per_minute = per_minute.max(1);
        let burst = burst.clamp(1, per_minute);
        Limiter {
            per_minute: per_minute as usize,
            burst: f64::from(burst),
            rate: f64::from(per_minute) / 60.0,
            state: Mutex::new(State {
                tokens: f64::from(burst),
                last: Instant::now(),
                slots: VecDeque::new(),
            }),
        }
    }

    /// Takes one slot, waiting until it is due.
    pub(crate) async fn acquire(&self) {
        let due = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            s.tokens =
                (s.tokens + now.duration_since(s.last).as_secs_f64() * self.rate).min(self.burst);
            s.last = now;
            s.tokens -= 1.0;
            let mut due = if s.tokens >= 0.0 {
                now
            } else {
                now + Duration::from_secs_f64(-s.tokens / self.rate)
            };
            if s.slots.len() >= self.per_minute {
                let oldest = s.slots[s.slots.len() - self.per_minute];
                due = due.max(oldest + WINDOW);
            }
            if let Some(&prev) = s.slots.back() {
                due = due.max(prev);
            }
            s.slots.push_back(due);
            while s.slots.len() > self.per_minute {
                s.slots.pop_front();
            }
            due
        };
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn take_all(
        limiter: Arc<Limiter>,
        n: usize,
    ) -> (Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<()>>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (limiter, taken) = (limiter.clone(), taken.clone());
            tasks.push(tokio::spawn(async move {
                limiter.acquire().await;
                taken.fetch_add(1, Ordering::SeqCst);
            }));
        }
        (taken, tasks)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_the_per_minute_pace() {
        // 600 a minute (10 a second) with a burst of 60.
        let limiter = Arc::new(Limiter::per_minute(600, 60));
        let start = Instant::now();
        let (taken, tasks) = take_all(limiter, 200).await;
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

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        // The default shape: the whole minute's allowance at once, then the window binds.
        let limiter = Arc::new(Limiter::per_minute(100, 100));
        let start = Instant::now();
        let (taken, tasks) = take_all(limiter, 250).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            taken.load(Ordering::SeqCst),
            100,
            "a minute's allowance at once"
        );
        tokio::time::sleep_until(start + WINDOW - Duration::from_millis(10)).await;
        assert_eq!(
            taken.load(Ordering::SeqCst),
            100,
            "nothing more inside the window"
        );
        tokio::time::sleep_until(start + WINDOW + Duration::from_millis(10)).await;
        assert_eq!(
            taken.load(Ordering::SeqCst),
            200,
            "the next allowance when it ends"
        );
        for t in tasks {
            t.await.unwrap();
        }
        assert!(start.elapsed() < 2 * WINDOW + Duration::from_millis(100));
    }
}
