//! When to try again: backoff schedule (backon, exponential with jitter), the server's
//! `Retry-After`, and the bounds on attempts and total time.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use reqwest::header::HeaderMap;
use tokio::time::Instant;

use super::config::RetryConfig;
use super::error::ClientError;

/// The wait a response asks for: `retry-after-ms` (milliseconds), else `Retry-After` as
/// seconds or as an HTTP date (relative to `now`). Dates in the past mean no wait.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = header_str(headers, "retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// The retry budget of one logical request.
pub(crate) struct RetryState {
    config: RetryConfig,
    backoff: ExponentialBackoff,
    deadline: Instant,
}

impl RetryState {
    pub(crate) fn new(config: &RetryConfig) -> Self {
        RetryState {
            config: config.clone(),
            backoff: Self::schedule(config),
            deadline: Instant::now() + config.max_elapsed,
        }
    }

    fn schedule(config: &RetryConfig) -> ExponentialBackoff {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(config.min_delay)
            .with_max_delay(config.max_delay)
            .with_factor(2.0)
            .with_max_times(config.max_attempts.saturating_sub(1));
        if config.jitter {
            b = b.with_jitter();
        }
        b.build()
    }

    /// Starts the budget afresh; streams call it once a connection has made progress.
    pub(crate) fn reset(&mut self) {
        *self = RetryState::new(&self.config);
    }

    /// The wait before the next attempt after `err`, or `None` when `err` is final or the
    /// budget is spent.
    pub(crate) fn next_delay(&mut self, err: &ClientError) -> Option<Duration> {
        if !err.is_retryable() {
            return None;
        }
        let computed = self.backoff.next()?;
        let delay = match err.retry_after() {
            Some(asked) if asked > self.config.max_retry_after => return None,
            Some(asked) => asked,
            None => computed,
        };
        if Instant::now() + delay > self.deadline {
            return None;
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::error::ApiError;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_every_retry_after_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:40 GMT")]),
                now
            ),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Sun, 06 Nov 1994 08:00:00 GMT")]),
                now
            ),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
                now
            ),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    fn api(status: u16, retry_after: Option<Duration>) -> ClientError {
        ClientError::Api {
            endpoint: "POST /x".into(),
            error: Box::new(ApiError {
                status,
                message: "m".into(),
                ref_id: None,
                detail: None,
                retry_after,
            }),
        }
    }

    #[tokio::test]
    async fn bounded_by_attempts_and_honours_the_server() {
        let config = RetryConfig {
            max_attempts: 3,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            jitter: false,
            ..RetryConfig::default()
        };
        let mut s = RetryState::new(&config);
        assert_eq!(s.next_delay(&api(404, None)), None);
        assert_eq!(
            s.next_delay(&api(503, None)),
            Some(Duration::from_millis(10))
        );
        assert_eq!(
            s.next_delay(&api(429, Some(Duration::from_secs(2)))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(s.next_delay(&api(503, None)), None, "attempts are spent");
        s.reset();
        assert_eq!(
            s.next_delay(&api(503, None)),
            Some(Duration::from_millis(10))
        );
    }

    #[tokio::test]
    async fn bounded_by_total_time_and_longest_retry_after() {
        let config = RetryConfig {
            max_elapsed: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(60),
            ..RetryConfig::default()
        };
        let mut s = RetryState::new(&config);
        assert_eq!(s.next_delay(&api(429, Some(Duration::from_secs(2)))), None);
        let mut s = RetryState::new(&config);
        assert_eq!(s.next_delay(&api(429, Some(Duration::from_secs(61)))), None);
    }
}
