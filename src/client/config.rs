//! Client settings: where to connect, the API key, timeouts, retries and add-runs pacing.

use std::fmt;
use std::time::Duration;

use crate::api;

/// Environment variable naming the API base URL, as the official SDKs read it.
pub const BASE_URL_ENV: &str = "PARALLEL_BASE_URL";
/// Environment variable holding the API key, as the official SDKs read it.
pub const API_KEY_ENV: &str = "PARALLEL_API_KEY";

/// An API key. Its `Debug` never shows the value, and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The secret itself, for the one place that puts it in a header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How failed requests are retried: exponential backoff with jitter, bounded by attempts and
/// by total time. A server's `Retry-After` / `retry-after-ms` replaces the computed delay.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Most attempts of one request, the first included.
    pub max_attempts: usize,
    /// Delay before the first retry.
    pub min_delay: Duration,
    /// Longest computed delay between two attempts.
    pub max_delay: Duration,
    /// No retry starts after this much time has passed since the first attempt.
    pub max_elapsed: Duration,
    /// Longest `Retry-After` honoured; a longer one gives up at once.
    pub max_retry_after: Duration,
    /// Adds up to one delay of random jitter, so clients that failed together spread out.
    pub jitter: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 10,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(20),
            max_elapsed: Duration::from_secs(300),
            max_retry_after: Duration::from_secs(120),
            jitter: true,
        }
    }
}

impl RetryConfig {
    /// No retries at all: every error surfaces on the first attempt.
    pub fn none() -> Self {
        RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        }
    }
}

/// How add-runs POSTs are paced.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitConfig {
    /// Runs per add-runs POST, 1 to [`api::MAX_RUNS_PER_REQUEST`].
    pub batch_size: usize,
    /// Most add-runs POSTs in flight at once.
    pub max_in_flight: usize,
    /// Most run-creating POSTs (add-runs and single runs, retries included) in any minute,
    /// counted over a sliding window.
    pub posts_per_minute: u32,
    /// POSTs that may go out back to back; after them the rest are spread at
    /// `posts_per_minute / 60 s`. The default, `posts_per_minute`, spreads nothing: a job of
    /// up to a minute's allowance goes out at full speed, and no window of a minute ever
    /// sees more than `posts_per_minute` POSTs either way.
    pub burst: u32,
}

impl Default for SubmitConfig {
    fn default() -> Self {
        SubmitConfig {
            batch_size: api::DEFAULT_RUNS_PER_REQUEST,
            max_in_flight: 4,
            posts_per_minute: api::MAX_POSTS_PER_MINUTE,
            burst: api::MAX_POSTS_PER_MINUTE,
        }
    }
}

/// Everything a [`super::Client`] needs. Build with [`ClientConfig::new`] or
/// [`ClientConfig::from_env`], then the `with_*` setters.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Scheme, host and port of the API, e.g. `https://api.parallel.ai`.
    pub base_url: String,
    api_key: Option<ApiKey>,
    /// Longest wait to establish a connection.
    pub connect_timeout: Duration,
    /// Longest wait for a whole non-streaming request, body included.
    pub request_timeout: Duration,
    /// A stream that receives nothing for this long is dropped and resumed.
    pub stream_idle_timeout: Duration,
    /// The `User-Agent` header.
    pub user_agent: String,
    /// Retry policy of every request.
    pub retry: RetryConfig,
    /// Pacing of add-runs.
    pub submit: SubmitConfig,
}

impl ClientConfig {
    /// Talks to `base_url` with no API key and default settings.
    pub fn new(base_url: impl Into<String>) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            api_key: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(300),
            user_agent: format!("groupflow/{}", env!("CARGO_PKG_VERSION")),
            retry: RetryConfig::default(),
            submit: SubmitConfig::default(),
        }
    }

    /// Reads `PARALLEL_BASE_URL` (default `https://api.parallel.ai`) and `PARALLEL_API_KEY`.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`ClientConfig::from_env`], reading variables through `lookup`; empty values
    /// count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let config = ClientConfig::new(
            get(BASE_URL_ENV).unwrap_or_else(|| api::DEFAULT_BASE_URL.to_string()),
        );
        match get(API_KEY_ENV) {
            Some(key) => config.with_api_key(key.trim()),
            None => config,
        }
    }

    /// Sends `key` in `x-api-key` on every request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    /// Sends no API key.
    pub fn without_api_key(mut self) -> Self {
        self.api_key = None;
        self
    }

    /// True when an API key is set.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    pub(crate) fn api_key(&self) -> Option<&ApiKey> {
        self.api_key.as_ref()
    }

    /// Sets the connect and whole-request timeouts.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// Sets how long a stream may stay silent before it is resumed on a new connection.
    pub fn with_stream_idle_timeout(mut self, idle: Duration) -> Self {
        self.stream_idle_timeout = idle;
        self
    }

    /// Sets the `User-Agent` header.
    pub fn with_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the add-runs pacing.
    pub fn with_submit(mut self, submit: SubmitConfig) -> Self {
        self.submit = submit;
        self
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let url = url::Url::parse(&self.base_url)
            .map_err(|e| format!("base URL `{}`: {e}", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "base URL `{}`: scheme must be http or https",
                self.base_url
            ));
        }
        if url.query().is_some() {
            return Err(format!(
                "base URL `{}`: must not have a query",
                self.base_url
            ));
        }
        if let Some(key) = &self.api_key
            && (key.expose().is_empty()
                || reqwest::header::HeaderValue::from_str(key.expose()).is_err())
        {
            return Err("API key: empty or not a valid header value".to_string());
        }
        let s = &self.submit;
        if s.batch_size == 0 || s.batch_size > api::MAX_RUNS_PER_REQUEST {
            return Err(format!(
                "batch size {}: must be 1 to {}",
                s.batch_size,
                api::MAX_RUNS_PER_REQUEST
            ));
        }
        if s.max_in_flight == 0 {
            return Err("max in flight: must be at least 1".to_string());
        }
        if s.posts_per_minute == 0 || s.burst == 0 || s.burst > s.posts_per_minute {
            return Err(format!(
                "rate limit {} POSTs a minute with burst {}: both must be at least 1 and burst \
                 at most the rate",
                s.posts_per_minute, s.burst
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err("retry attempts: must be at least 1".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_defaults_and_overrides() {
        let c = ClientConfig::from_lookup(|_| None);
        assert_eq!(c.base_url, "https://api.parallel.ai");
        assert!(!c.has_api_key());
        assert!(c.user_agent.starts_with("groupflow/"));
        let c = ClientConfig::from_lookup(|name| match name {
            BASE_URL_ENV => Some("http://127.0.0.1:9".into()),
            API_KEY_ENV => Some("sk-secret".into()),
            _ => None,
        });
        assert_eq!(c.base_url, "http://127.0.0.1:9");
        assert_eq!(c.api_key().map(ApiKey::expose), Some("sk-secret"));
        let c = ClientConfig::from_lookup(|_| Some("  ".into()));
        assert_eq!(c.base_url, api::DEFAULT_BASE_URL);
        assert!(!c.has_api_key());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = ClientConfig::new("http://x").with_api_key("sk-very-secret-123");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-very-secret-123"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[test]
    fn validation_names_the_bad_setting() {
        assert!(ClientConfig::new("http://127.0.0.1:1").validate().is_ok());
        let err = ClientConfig::new("ftp://x").validate().unwrap_err();
        assert!(err.contains("scheme"), "{err}");
        let mut c = ClientConfig::new("http://x");
        c.submit.batch_size = 1001;
        assert!(c.validate().unwrap_err().contains("batch size 1001"));
        let c = ClientConfig::new("http://x").with_api_key("bad\nkey");
        let err = c.validate().unwrap_err();
        assert!(
            !err.contains("bad\nkey") && err.contains("API key"),
            "{err}"
        );
    }
}
