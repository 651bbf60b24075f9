//! The [`Client`]: one `reqwest::Client`, auth, retries, and the plain request/response
//! endpoints of groups and runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use super::config::ClientConfig;
use super::error::{ClientError, api_error_from_parts};
use super::limiter::Limiter;
use super::retry::RetryState;
use crate::api::{
    self, CreateTaskGroupRequest, Metadata, TaskGroup, TaskGroupRunResponse, TaskRun, TaskRunInput,
    TaskRunResult, paths,
};

/// Client of the Task Group API (Parallel, or `groupflow serve`). Cheap to clone; clones
/// share one connection pool, one rate limiter and one set of counters.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    key: Option<HeaderValue>,
    config: ClientConfig,
    limiter: Limiter,
    counters: Counters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.base)
            .field("api_key", &self.inner.key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// What the client has done so far, for progress reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// HTTP requests sent (every attempt counts).
    pub requests: u64,
    /// Run-creating POSTs sent (add-runs and single runs, every attempt counts).
    pub posts: u64,
    /// Attempts that followed a failed one.
    pub retries: u64,
    /// Add-runs POSTs with an unknown outcome that were checked against the group's runs.
    pub reconciliations: u64,
    /// Runs found by those checks (created by a POST whose answer was lost).
    pub runs_recovered: u64,
    /// SSE streams resumed on a new connection.
    pub reconnects: u64,
    /// Total time spent waiting between attempts.
    pub retry_wait: Duration,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    posts: AtomicU64,
    retries: AtomicU64,
    reconciliations: AtomicU64,
    runs_recovered: AtomicU64,
    reconnects: AtomicU64,
    retry_wait_us: AtomicU64,
}

/// Which failures a request may be repeated after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Any retryable failure: reads, and writes whose repetition is harmless.
    Retryable,
    /// Like `Retryable` but not 408, which `/result` uses for "still running".
    RetryableBut408,
    /// Only failures that prove nothing was created: no connection, or 429.
    Unsent,
}

impl Repeat {
    fn allows(self, err: &ClientError) -> bool {
        match self {
            Repeat::Retryable => true,
            Repeat::RetryableBut408 => err.status() != Some(408),
            Repeat::Unsent => err.was_not_sent() || err.status() == Some(429),
        }
    }
}

impl Client {
    /// Builds a client; fails when the configuration cannot work.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        config.validate().map_err(ClientError::Config)?;
        let key = match config.api_key() {
            Some(k) => {
                let mut v = HeaderValue::from_str(k.expose()).map_err(|_| {
                    ClientError::Config("API key is not a valid header value".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))?;
        let limiter = Limiter::per_minute(config.submit.posts_per_minute, config.submit.burst);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base: config.base_url.trim_end_matches('/').to_string(),
                key,
                config,
                limiter,
                counters: Counters::default(),
            }),
        })
    }

    /// A client configured from `PARALLEL_BASE_URL` and `PARALLEL_API_KEY`.
    pub fn from_env() -> Result<Client, ClientError> {
        Client::new(ClientConfig::from_env())
    }

    /// The settings this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed),
            posts: c.posts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            reconciliations: c.reconciliations.load(Ordering::Relaxed),
            runs_recovered: c.runs_recovered.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            retry_wait: Duration::from_micros(c.retry_wait_us.load(Ordering::Relaxed)),
        }
    }

    // ---- groups -------------------------------------------------------------------------

    /// `POST /v1/tasks/groups`: a new, empty group.
    pub async fn create_group(&self, metadata: Option<Metadata>) -> Result<TaskGroup, ClientError> {
        let body = json_body(&CreateTaskGroupRequest { metadata })?;
        // A repeated create can at worst leave an empty group behind, so retry freely.
        self.call(
            Method::POST,
            &paths::groups(paths::V1),
            &[],
            Some(body),
            Repeat::Retryable,
        )
        .await
    }

    /// `GET /v1/tasks/groups/{id}`: the group and its status counts.
    pub async fn get_group(&self, group_id: &str) -> Result<TaskGroup, ClientError> {
        let path = paths::group(paths::V1, &segment(group_id));
        self.call(Method::GET, &path, &[], None, Repeat::Retryable)
            .await
    }

    /// `GET /v1/tasks/groups/{id}/runs/{run_id}`: one run of a group.
    pub async fn get_group_run(
        &self,
        group_id: &str,
        run_id: &str,
    ) -> Result<TaskRun, ClientError> {
        let path = paths::group_run(paths::V1, &segment(group_id), &segment(run_id));
        self.call(Method::GET, &path, &[], None, Repeat::Retryable)
            .await
    }

    // ---- single runs --------------------------------------------------------------------

    /// `POST /v1/tasks/runs`: one run outside any group.
    ///
    /// Repeated only when nothing can have been created (no connection, or 429): a single
    /// run has no group to reconcile against, so a lost answer surfaces as an error.
    pub async fn create_run(&self, input: &TaskRunInput) -> Result<TaskRun, ClientError> {
        let body = json_body(input)?;
        self.call_limited(
            Method::POST,
            &paths::runs(),
            &[],
            Some(body),
            Repeat::Unsent,
        )
        .await
    }

    /// `GET /v1/tasks/runs/{id}`.
    pub async fn get_run(&self, run_id: &str) -> Result<TaskRun, ClientError> {
        let path = paths::run(&segment(run_id));
        self.call(Method::GET, &path, &[], None, Repeat::Retryable)
            .await
    }

    /// `GET /v1/tasks/runs/{id}/input`.
    pub async fn get_run_input(&self, run_id: &str) -> Result<TaskRunInput, ClientError> {
        let path = paths::run_input(&segment(run_id));
        self.call(Method::GET, &path, &[], None, Repeat::Retryable)
            .await
    }

    /// `GET /v1/tasks/runs/{id}/result`, waiting up to `timeout` (the server's default, 600 s,
    /// when `None`) for the run to finish. A run still active then is an error with status
    /// 408; a failed run is a 404.
    pub async fn get_run_result(
        &self,
        run_id: &str,
        timeout: Option<Duration>,
    ) -> Result<TaskRunResult, ClientError> {
        let path = paths::run_result(&segment(run_id));
        let mut query = Vec::new();
        if let Some(t) = timeout {
            query.push(("timeout", t.as_secs_f64().ceil().to_string()));
        }
        let wait = timeout.unwrap_or(Duration::from_secs(600));
        self.call_with(
            Method::GET,
            &path,
            &query,
            None,
            Repeat::RetryableBut408,
            false,
            Some(wait + self.inner.config.request_timeout),
        )
        .await
    }

    // ---- plumbing -----------------------------------------------------------------------

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        repeat: Repeat,
    ) -> Result<T, ClientError> {
        self.call_with(method, path, query, body, repeat, false, None)
            .await
    }

    async fn call_limited<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        repeat: Repeat,
    ) -> Result<T, ClientError> {
        self.call_with(method, path, query, body, repeat, true, None)
            .await
    }

    /// Sends a request until it succeeds, fails for good, or the retry budget is spent, and
    /// decodes the JSON answer.
    #[allow(clippy::too_many_arguments)]
    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        repeat: Repeat,
        limited: bool,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let endpoint = format!("{method} {path}");
        let mut retry = RetryState::new(&self.inner.config.retry);
        loop {
            if limited {
                self.acquire_post().await;
            }
            let mut req = self
                .request(method.clone(), path)
                .query(query)
                .timeout(timeout.unwrap_or(self.inner.config.request_timeout));
            if let Some(b) = &body {
                req = req.header(CONTENT_TYPE, "application/json").body(b.clone());
            }
            let outcome = match self.send(req, &endpoint).await {
                Ok(resp) => match resp.bytes().await {
                    Ok(bytes) => {
                        return serde_json::from_slice(&bytes).map_err(|source| {
                            ClientError::Decode {
                                endpoint: endpoint.clone(),
                                source,
                            }
                        });
                    }
                    Err(e) => ClientError::from_reqwest(&endpoint, e),
                },
                Err(e) => e,
            };
            if !repeat.allows(&outcome) {
                return Err(outcome);
            }
            match retry.next_delay(&outcome) {
                Some(delay) => self.pause_before_retry(&endpoint, &outcome, delay).await,
                None => return Err(outcome),
            }
        }
    }

    /// A request to `path` with the API key attached.
    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut req = self
            .inner
            .http
            .request(method, format!("{}{path}", self.inner.base));
        if let Some(k) = &self.inner.key {
            req = req.header(api::API_KEY_HEADER, k.clone());
        }
        req
    }

    /// Sends once; a non-2xx answer becomes [`ClientError::Api`] with its body parsed.
    pub(crate) async fn send(
        &self,
        req: RequestBuilder,
        endpoint: &str,
    ) -> Result<Response, ClientError> {
        self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::from_reqwest(endpoint, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::from_reqwest(endpoint, e))?;
        Err(self.scrub(ClientError::Api {
            endpoint: endpoint.to_string(),
            error: Box::new(api_error_from_parts(status.as_u16(), &headers, &body)),
        }))
    }

    /// Removes the API key from what a server wrote into an error.
    pub(crate) fn scrub(&self, err: ClientError) -> ClientError {
        match self.inner.config.api_key() {
            Some(k) => err.scrubbed(k.expose()),
            None => err,
        }
    }

    /// One add-runs POST of an already serialized body, with `refresh_status=false`.
    pub(crate) async fn post_add_runs(
        &self,
        group_id: &str,
        body: Bytes,
    ) -> Result<TaskGroupRunResponse, ClientError> {
        let path = paths::group_runs(paths::V1, &segment(group_id));
        let endpoint = format!("POST {path}");
        self.acquire_post().await;
        // Looked at after the rate limiter's wait, the last moment before sending: a run
        // added after Ctrl-C is a run the user asked not to pay for.
        if crate::interrupt::requested() {
            return Err(ClientError::Interrupted { endpoint });
        }
        let req = self
            .request(Method::POST, &path)
            .query(&[("refresh_status", "false")])
            .timeout(self.inner.config.request_timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let resp = self.send(req, &endpoint).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::from_reqwest(&endpoint, e))?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { endpoint, source })
    }

    /// Opens an SSE response, retrying the connection itself within `retry`.
    pub(crate) async fn open_sse(
        &self,
        path: &str,
        query: &[(&str, String)],
        retry: &mut RetryState,
    ) -> Result<Response, ClientError> {
        let endpoint = format!("GET {path}");
        loop {
            let req = self
                .request(Method::GET, path)
                .query(query)
                .header(ACCEPT, "text/event-stream");
            // Only the wait for the headers is bounded here; the body is bounded per read.
            let outcome = match tokio::time::timeout(
                self.inner.config.request_timeout,
                self.send(req, &endpoint),
            )
            .await
            {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => e,
                Err(_) => ClientError::StreamCut {
                    endpoint: endpoint.clone(),
                    reason: "no response headers in time".into(),
                },
            };
            match retry.next_delay(&outcome) {
                Some(delay) => self.pause_before_retry(&endpoint, &outcome, delay).await,
                None => return Err(outcome),
            }
        }
    }

    async fn acquire_post(&self) {
        self.inner.limiter.acquire().await;
        self.inner.counters.posts.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs, counts and sleeps before another attempt.
    pub(crate) async fn pause_before_retry(
        &self,
        endpoint: &str,
        err: &ClientError,
        delay: Duration,
    ) {
        tracing::debug!(%endpoint, error = %err, delay_ms = delay.as_millis() as u64, "retrying");
        let c = &self.inner.counters;
        c.retries.fetch_add(1, Ordering::Relaxed);
        c.retry_wait_us
            .fetch_add(delay.as_micros() as u64, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
    }

    pub(crate) fn note_reconnect(&self) {
        self.inner
            .counters
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_reconciliation(&self, recovered: usize) {
        let c = &self.inner.counters;
        c.reconciliations.fetch_add(1, Ordering::Relaxed);
        c.runs_recovered
            .fetch_add(recovered as u64, Ordering::Relaxed);
    }
}

/// Serializes a request body once, so every attempt sends the same bytes.
pub(crate) fn json_body<T: serde::Serialize + ?Sized>(value: &T) -> Result<Bytes, ClientError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|source| ClientError::Decode {
            endpoint: "request body".into(),
            source,
        })
}

/// Percent-encodes an id for use as one path segment (ids are opaque and may hold anything).
pub(crate) fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_single_segments() {
        assert_eq!(segment("tgrp_abc-1.2"), "tgrp_abc-1.2");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn debug_redacts_the_key() {
        let c = Client::new(ClientConfig::new("http://127.0.0.1:1").with_api_key("sk-hidden-77"))
            .unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("sk-hidden-77") && dbg.contains("<redacted>"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_config_is_refused() {
        let err = Client::new(ClientConfig::new("not a url")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("client configuration: base URL"),
            "{err}"
        );
    }
}
