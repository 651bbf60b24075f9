//! SSE streams: a group's runs (snapshot), a group's events (live), one run's events.
//!
//! Frames are `event:` + one-line `data:`; never `id:` lines (the Python SDK would then
//! dispatch empty events after keep-alive comments). Keep-alives are `: ping` comments.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::time::Instant;

use super::groups::{load_group, parse_run};
use super::runs::load_run;
use super::{ApiError, AppState, Params};
use crate::server::store::Page;
use crate::server::validate::{Issues, Loc};
use crate::server::wire::{self, StatusCode as Run};

/// Rows read per page of a stream.
const PAGE: usize = 1000;
/// Longest life of a group events stream (the API's documented hour).
const MAX_EVENTS_STREAM: Duration = Duration::from_secs(3600);
/// Longest life of a single run's events stream (the API's 570 s).
const MAX_RUN_STREAM: Duration = Duration::from_secs(570);

type Chunk = Result<Bytes, std::io::Error>;

fn sse(stream: impl futures::Stream<Item = Chunk> + Send + 'static) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Ends a stream with an error after letting hyper flush what was sent: a cut stream
/// delivers its first events, then the connection drops.
async fn cut_error() -> std::io::Error {
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::io::Error::other("injected fault: stream cut")
}

/// Injected stream cuts: after how many more events the connection is dropped.
struct Cut(Option<usize>);

impl Cut {
    fn new(state: &AppState) -> Cut {
        Cut(state
            .roll(state.config.faults.cut_streams)
            .then(|| 1 + rand::random_range(0..20usize)))
    }

    /// The part of `page` to send, and whether to drop the connection after it.
    fn take(&mut self, page: Page) -> (Bytes, bool) {
        match self.0 {
            Some(k) if k <= page.ends.len() => {
                let end = page.ends[k - 1];
                let mut text = page.text;
                text.truncate(end);
                (Bytes::from(text), true)
            }
            Some(k) => {
                self.0 = Some(k - page.ends.len());
                (Bytes::from(page.text), false)
            }
            None => (Bytes::from(page.text), false),
        }
    }

    /// A stream about to end normally is dropped instead when a cut was planned.
    fn pending(&self) -> bool {
        self.0.is_some()
    }
}

fn cursor(params: &Params, issues: &mut Issues) -> i64 {
    match params.get("last_event_id") {
        None => 0,
        Some(v) => v.parse::<i64>().unwrap_or_else(|_| {
            issues.push(
                vec![Loc::from("query"), Loc::from("last_event_id")],
                format!("`{v}` is not an event id this server issued"),
                "value_error",
            );
            0
        }),
    }
}

fn error_chunk(message: &str) -> Chunk {
    let mut s = String::new();
    wire::write_error_event(&mut s, message);
    Ok(Bytes::from(s))
}

/// `GET {p}/tasks/groups/{id}/runs` — every run, in the order added, then the end.
pub async fn group_runs(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let group = load_group(&state, &group_id).await?;
    let params = Params::parse(query.as_deref());
    let mut issues = Issues::default();
    let include_input = params.bool("include_input", false, &mut issues);
    let include_output = params.bool("include_output", false, &mut issues);
    let status = params.get("status").and_then(|s| {
        let parsed = Run::parse(s);
        if parsed.is_none() {
            issues.push(
                vec![Loc::from("query"), Loc::from("status")],
                format!(
                    "Input should be 'queued', 'action_required', 'running', 'completed', 'failed', 'cancelling' or 'cancelled', got `{s}`"
                ),
                "enum",
            );
        }
        parsed
    });
    let mut after = cursor(&params, &mut issues);
    if !issues.is_empty() {
        return Err(ApiError::Invalid(issues));
    }
    // Runs with outputs are ≈ 2.5 KB each: smaller pages, so that a reader that hangs up
    // early (after the runs that have ended) leaves less read for nothing.
    let page_runs = if include_output { PAGE / 4 } else { PAGE };
    let mut cut = Cut::new(&state);
    let stream = async_stream::stream! {
        loop {
            let g = group.clone();
            let page = state
                .blocking(move |s| {
                    Ok(s.runs_page(&g, after, status, include_input, include_output, page_runs)?)
                })
                .await;
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = ?e, "runs stream failed");
                    yield error_chunk("Internal error while reading runs");
                    break;
                }
            };
            let n = page.ends.len();
            if let Some(last) = page.last {
                after = last;
            }
            if n > 0 {
                let (bytes, drop_now) = cut.take(page);
                yield Ok(bytes);
                if drop_now {
                    yield Err(cut_error().await);
                    return;
                }
            }
            if n < page_runs {
                break;
            }
        }
        if cut.pending() {
            yield Err(cut_error().await);
        }
    };
    Ok(sse(stream))
}

/// `GET {p}/tasks/groups/{id}/events` — the group's events from the cursor on, open while
/// the group is active, up to `timeout` seconds (at most an hour).
pub async fn group_events(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let group = load_group(&state, &group_id).await?;
    let params = Params::parse(query.as_deref());
    let mut issues = Issues::default();
    let mut after = cursor(&params, &mut issues);
    let limit = params
        .seconds("timeout", &mut issues)
        .map_or(MAX_EVENTS_STREAM, |t| t.min(MAX_EVENTS_STREAM));
    if !issues.is_empty() {
        return Err(ApiError::Invalid(issues));
    }
    let deadline = Instant::now() + limit;
    let keepalive = state.config.keepalive_interval;
    let mut cut = Cut::new(&state);
    let mut changes = state.changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    let stream = async_stream::stream! {
        let mut last_write = Instant::now();
        loop {
            changes.borrow_and_update();
            let g = group.clone();
            let page = state.blocking(move |s| Ok(s.events_page(&g, after, PAGE)?)).await;
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = ?e, "events stream failed");
                    yield error_chunk("Internal error while reading events");
                    break;
                }
            };
            let n = page.ends.len();
            let active = page.active;
            if let Some(last) = page.last {
                after = last;
            }
            if n > 0 {
                let (bytes, drop_now) = cut.take(page);
                yield Ok(bytes);
                last_write = Instant::now();
                if drop_now {
                    yield Err(cut_error().await);
                    return;
                }
                if n == PAGE {
                    continue;
                }
            }
            if !active || Instant::now() >= deadline || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(last_write + keepalive) => {
                    yield Ok(Bytes::from_static(b": ping\n\n"));
                    last_write = Instant::now();
                }
                _ = tokio::time::sleep_until(deadline) => {}
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        if cut.pending() {
            yield Err(cut_error().await);
        }
    };
    Ok(sse(stream))
}

/// `GET {p}/tasks/runs/{id}/events` — the run's state now and at every change, ending
/// with its final state (and output, when completed). Not resumable: `event_id` is null.
pub async fn run_events(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    // Subscribed before the first read, so no change between the two goes unseen.
    let mut changes = state.changes.subscribe();
    let first = load_run(&state, &run_id).await?;
    let (seq, tag) = parse_run(&run_id)?;
    let keepalive = state.config.keepalive_interval;
    let deadline = Instant::now() + MAX_RUN_STREAM;
    let mut shutdown = state.shutdown.clone();
    let stream = async_stream::stream! {
        let mut run = first;
        let mut sent: Option<Run> = None;
        let mut last_write = Instant::now();
        loop {
            if sent != Some(run.status) {
                let mut text = String::with_capacity(512);
                let output = if run.status == Run::Completed { run.output.as_deref() } else { None };
                wire::write_single_run_event(&mut text, &run.view(), output);
                yield Ok(Bytes::from(text));
                last_write = Instant::now();
                sent = Some(run.status);
            }
            if run.status.is_terminal() || Instant::now() >= deadline || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(last_write + keepalive) => {
                    yield Ok(Bytes::from_static(b": ping\n\n"));
                    last_write = Instant::now();
                }
                _ = tokio::time::sleep_until(deadline) => {}
                r = shutdown.changed() => if r.is_err() { break },
            }
            changes.borrow_and_update();
            let t = tag.clone();
            match state.blocking(move |s| Ok(s.run(seq, &t)?)).await {
                Ok(Some(r)) => run = r,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = ?e, "run events stream failed");
                    yield error_chunk("Internal error while reading the run");
                    break;
                }
            }
        }
    };
    Ok(sse(stream))
}
