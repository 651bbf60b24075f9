//! SSE streams of a group (`/runs`, `/events`) that resume from the last `event_id` after a
//! dropped connection, `wait` driven by the events stream, and single-run events.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::error::ClientError;
use super::http::{Client, segment};
use super::retry::RetryState;
use super::sse::{Event, Parser};
use crate::api::{
    ErrorObject, FieldBasis, RunStatus, StreamEvent, TaskGroupStatus, TaskGroupStatusEvent,
    TaskRun, TaskRunEvent, TaskRunInput, TaskRunOutput, paths,
};

/// What to read from a group's `/runs` stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunsQuery {
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Include each run's input.
    pub include_input: bool,
    /// Include each completed run's output.
    pub include_output: bool,
    /// Start after this cursor (an `event_id` or an add-runs `run_cursor`).
    pub last_event_id: Option<String>,
    /// How many runs the caller knows the stream holds: a stream that ends cleanly with
    /// fewer is treated as cut and resumed.
    pub expected: Option<u64>,
}

impl RunsQuery {
    /// Every run with its input and output.
    pub fn with_results() -> Self {
        RunsQuery {
            include_input: true,
            include_output: true,
            ..RunsQuery::default()
        }
    }
}

/// A `/runs` item kept as the JSON it came in, with what it takes to file it: the event's
/// cursor, the run's id and status and its row key. Whoever stores results as JSON keeps
/// `data` as it is, and decodes the output (with [`decode_run_state`]) only when reading it.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRun {
    pub event_id: Option<String>,
    pub run_id: String,
    pub status: RunStatus,
    /// The `gf_row` key of the run's metadata.
    pub row_key: Option<String>,
    /// The `gf_ledger_row` key of the run's metadata (see [`super::LEDGER_ROW`]).
    pub ledger_row: Option<i64>,
    /// The `task_run.state` event's data.
    pub data: String,
    /// Where the output's `basis` is in `data`, when it has one.
    pub basis: Option<Range<usize>>,
}

/// What [`RawRun`] reads of an event; the rest is only scanned.
#[derive(Deserialize)]
struct RawRunHead<'a> {
    #[serde(default)]
    event_id: Option<String>,
    run: RawRunHeadRun,
    #[serde(default, borrow)]
    output: Option<RawOutputHead<'a>>,
}

/// Of the output, only where its basis is.
#[derive(Deserialize)]
struct RawOutputHead<'a> {
    #[serde(default, borrow)]
    basis: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawRunHeadRun {
    run_id: String,
    status: RunStatus,
    #[serde(default)]
    metadata: Option<RawRunMetadata>,
}

/// Of a run's metadata, the two keys a result is filed by; the others are scanned past.
/// (Serde takes field names as literals: these are [`super::ROW_KEY`] and
/// [`super::LEDGER_ROW`].)
#[derive(Deserialize)]
struct RawRunMetadata {
    #[serde(default)]
    gf_row: Option<Value>,
    #[serde(default)]
    gf_ledger_row: Option<Value>,
}

impl RawRun {
    /// Files a `task_run.state` event's data.
    pub fn from_data(data: String) -> Result<RawRun, serde_json::Error> {
        let head: RawRunHead = serde_json::from_str(&data)?;
        // Borrowed from `data`, the basis is found by how far into it it starts.
        let basis = head.output.and_then(|o| o.basis).map(|b| {
            let start = b.get().as_ptr() as usize - data.as_ptr() as usize;
            start..start + b.get().len()
        });
        let metadata = head.run.metadata.as_ref();
        let row_key = metadata
            .and_then(|m| m.gf_row.as_ref())
            .and_then(super::row_key_value);
        let ledger_row = metadata
            .and_then(|m| m.gf_ledger_row.as_ref())
            .and_then(Value::as_i64);
        Ok(RawRun {
            event_id: head.event_id,
            run_id: head.run.run_id,
            status: head.run.status,
            row_key,
            ledger_row,
            data,
            basis,
        })
    }
}

/// The JSON of an `error` event.
#[derive(Deserialize)]
struct ErrorEventBody {
    error: ErrorObject,
}

/// One decoded frame of a group stream.
enum Frame<T> {
    Item(T),
    Failure(ErrorObject),
    Skip,
}

/// A `task_run.state` event as sent, with the output read without buffering: serde's
/// derived reader of the internally tagged [`TaskRunOutput`] first copies the whole output
/// into an intermediate tree to find its `type`, which cost more than the rest of the event.
/// `B` is how the basis is read: [`Vec<FieldBasis>`], or [`SkippedBasis`].
#[derive(Deserialize)]
struct RunEventWire<B> {
    #[serde(default)]
    event_id: Option<String>,
    run: TaskRun,
    #[serde(default)]
    input: Option<TaskRunInput>,
    #[serde(default)]
    output: Option<OutputWire<B>>,
}

/// A basis scanned past, not read: decoding it is most of the work of a run's event.
#[derive(Default)]
struct SkippedBasis;

impl<'de> Deserialize<'de> for SkippedBasis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| SkippedBasis)
    }
}

impl From<SkippedBasis> for Vec<FieldBasis> {
    fn from(_: SkippedBasis) -> Self {
        Vec::new()
    }
}

/// Both output shapes in one struct; `type` says which one it is.
#[derive(Deserialize)]
struct OutputWire<B> {
    #[serde(rename = "type")]
    kind: String,
    content: Option<Value>,
    #[serde(default)]
    basis: B,
    #[serde(default)]
    output_schema: Option<Value>,
    #[serde(default)]
    mcp_tool_calls: Option<Value>,
    #[serde(default)]
    beta_fields: Option<Value>,
}

impl<B: Into<Vec<FieldBasis>>> OutputWire<B> {
    /// The output, or `None` when it is not a well-formed JSON or text output.
    fn into_output(self) -> Option<TaskRunOutput> {
        Some(match (self.kind.as_str(), self.content?) {
            ("json", content) => TaskRunOutput::Json {
                content,
                basis: self.basis.into(),
                output_schema: self.output_schema,
                mcp_tool_calls: self.mcp_tool_calls,
                beta_fields: self.beta_fields,
            },
            ("text", Value::String(content)) => TaskRunOutput::Text {
                content,
                basis: self.basis.into(),
                mcp_tool_calls: self.mcp_tool_calls,
                beta_fields: self.beta_fields,
            },
            _ => return None,
        })
    }
}

/// Reads a `task_run.state` event's data (or a [`TaskRunEvent`] as serde writes it).
/// Anything the fast reader does not take as a well-formed event is read again by
/// [`TaskRunEvent`]'s own reader, for its exact error.
pub fn decode_run_state(data: &str) -> Result<TaskRunEvent, serde_json::Error> {
    decode_run_state_as::<Vec<FieldBasis>>(data)
}

/// [`decode_run_state`] with the output's basis left empty: for readers that do not use it.
pub fn decode_run_state_without_basis(data: &str) -> Result<TaskRunEvent, serde_json::Error> {
    decode_run_state_as::<SkippedBasis>(data)
}

/// What a result row is made of in a run's event: the run's id, status and error, and its
/// output, with the basis only when `basis` is set. The rest of the run (its metadata,
/// timestamps, processor) is scanned past and left empty, and so are `event_id` and
/// `input`. Anything the fast reader does not take is read again as by
/// [`decode_run_state`], for its exact error.
pub fn decode_run_row(data: &str, basis: bool) -> Result<TaskRunEvent, serde_json::Error> {
    fn lean<B>(data: &str) -> Option<TaskRunEvent>
    where
        B: for<'de> Deserialize<'de> + Default + Into<Vec<FieldBasis>>,
    {
        let w = serde_json::from_str::<RowEventWire<B>>(data).ok()?;
        let output = match w.output {
            None => None,
            Some(o) => Some(o.into_output()?),
        };
        let r = w.run;
        Some(TaskRunEvent {
            event_id: None,
            run: TaskRun {
                run_id: r.run_id,
                interaction_id: String::new(),
                status: r.status,
                is_active: r.is_active,
                processor: String::new(),
                metadata: None,
                taskgroup_id: None,
                warnings: None,
                error: r.error,
                created_at: None,
                modified_at: None,
            },
            input: None,
            output,
        })
    }
    let found = if basis {
        lean::<Vec<FieldBasis>>(data)
    } else {
        lean::<SkippedBasis>(data)
    };
    match found {
        Some(ev) => Ok(ev),
        None if basis => decode_run_state(data),
        None => decode_run_state_without_basis(data),
    }
}

/// A run's event as a result row reads it (see [`decode_run_row`]), with a JSON output's
/// content kept as the text it came in: the Arrow decoder reads that text itself, so the
/// content is never built into a `serde_json` tree and written out again.
#[derive(Debug)]
pub struct RowEvent<'a> {
    pub run_id: String,
    pub status: RunStatus,
    pub error: Option<ErrorObject>,
    pub output: Option<RowOutput<'a>>,
}

/// A [`RowEvent`]'s output.
#[derive(Debug)]
pub enum RowOutput<'a> {
    Json {
        content: &'a RawValue,
        basis: Vec<FieldBasis>,
    },
    Text {
        content: String,
        basis: Vec<FieldBasis>,
    },
}

/// Reads a run's event as a [`RowEvent`] (its basis only when `basis` is set); `None` when
/// the event is not of the usual shape, which [`decode_run_row`] then reads, or names the
/// problem of.
pub fn read_row_event(data: &str, basis: bool) -> Option<RowEvent<'_>> {
    fn lean<'a, B>(data: &'a str) -> Option<RowEvent<'a>>
    where
        B: Deserialize<'a> + Default + Into<Vec<FieldBasis>>,
    {
        let w = serde_json::from_str::<RowEventRawWire<'a, B>>(data).ok()?;
        let output = match w.output {
            None => None,
            Some(o) => {
                let content = o.content?;
                Some(match o.kind {
                    "json" => RowOutput::Json {
                        content,
                        basis: o.basis.into(),
                    },
                    "text" => RowOutput::Text {
                        content: serde_json::from_str(content.get()).ok()?,
                        basis: o.basis.into(),
                    },
                    _ => return None,
                })
            }
        };
        Some(RowEvent {
            run_id: w.run.run_id,
            status: w.run.status,
            error: w.run.error,
            output,
        })
    }
    if basis {
        lean::<Vec<FieldBasis>>(data)
    } else {
        lean::<SkippedBasis>(data)
    }
}

/// A run's event as [`read_row_event`] reads it.
#[derive(Deserialize)]
#[serde(bound(deserialize = "B: Deserialize<'de> + Default"))]
struct RowEventRawWire<'a, B> {
    run: RowRun,
    #[serde(default, borrow)]
    output: Option<RawOutputWire<'a, B>>,
}

/// An output with its content as text; other fields than these are scanned past.
#[derive(Deserialize)]
#[serde(bound(deserialize = "B: Deserialize<'de> + Default"))]
struct RawOutputWire<'a, B> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default)]
    basis: B,
}

/// A run's event as [`decode_run_row`] reads it.
#[derive(Deserialize)]
struct RowEventWire<B> {
    run: RowRun,
    #[serde(default)]
    output: Option<OutputWire<B>>,
}

/// Of a run, what a result row shows.
#[derive(Deserialize)]
struct RowRun {
    run_id: String,
    status: RunStatus,
    is_active: bool,
    #[serde(default)]
    error: Option<ErrorObject>,
}

fn decode_run_state_as<B>(data: &str) -> Result<TaskRunEvent, serde_json::Error>
where
    B: for<'de> Deserialize<'de> + Default + Into<Vec<FieldBasis>>,
{
    if let Ok(w) = serde_json::from_str::<RunEventWire<B>>(data) {
        let output = match w.output {
            None => Some(None),
            Some(o) => o.into_output().map(Some),
        };
        if let Some(output) = output {
            return Ok(TaskRunEvent {
                event_id: w.event_id,
                run: w.run,
                input: w.input,
                output,
            });
        }
    }
    serde_json::from_str(data)
}

/// Decodes a `/runs` frame. The SSE event name picks the type, so `task_run.state` data is
/// read straight into [`TaskRunEvent`]; frames without a known name fall back to the JSON
/// `type`.
fn decode_run(ev: &Event) -> Result<Frame<TaskRunEvent>, serde_json::Error> {
    Ok(match ev.event.as_str() {
        "task_run.state" => Frame::Item(decode_run_state(&ev.data)?),
        "error" => Frame::Failure(serde_json::from_str::<ErrorEventBody>(&ev.data)?.error),
        _ => match serde_json::from_str::<StreamEvent>(&ev.data)? {
            StreamEvent::RunState(run) => Frame::Item(*run),
            StreamEvent::Error { error } => Frame::Failure(error),
            _ => Frame::Skip,
        },
    })
}

/// [`decode_run`], keeping a run's data as it came.
fn decode_raw_run(ev: Event) -> Result<Frame<RawRun>, serde_json::Error> {
    Ok(match ev.event.as_str() {
        "task_run.state" => Frame::Item(RawRun::from_data(ev.data)?),
        _ => match decode_run(&ev)? {
            Frame::Item(run) => Frame::Item(RawRun::from_data(serde_json::to_string(&run)?)?),
            Frame::Failure(e) => Frame::Failure(e),
            Frame::Skip => Frame::Skip,
        },
    })
}

/// Decodes a group `/events` frame; with `statuses_only`, run states are skipped unparsed.
fn decode_event(ev: &Event, statuses_only: bool) -> Result<Frame<StreamEvent>, serde_json::Error> {
    Ok(match ev.event.as_str() {
        "task_group_status" => Frame::Item(StreamEvent::GroupStatus(serde_json::from_str::<
            TaskGroupStatusEvent,
        >(&ev.data)?)),
        "task_run.state" if statuses_only => Frame::Skip,
        "task_run.state" => {
            Frame::Item(StreamEvent::RunState(Box::new(decode_run_state(&ev.data)?)))
        }
        "error" => Frame::Failure(serde_json::from_str::<ErrorEventBody>(&ev.data)?.error),
        _ => match serde_json::from_str::<StreamEvent>(&ev.data)? {
            StreamEvent::Error { error } => Frame::Failure(error),
            StreamEvent::Other => Frame::Skip,
            other => Frame::Item(other),
        },
    })
}

type Body = BoxStream<'static, Result<Bytes, reqwest::Error>>;

/// One SSE connection: frames, an idle bound per read, and cut detection.
struct Connection {
    body: Body,
    parser: Parser,
    ready: VecDeque<Event>,
    idle: Duration,
    endpoint: String,
}

impl Connection {
    fn new(resp: reqwest::Response, idle: Duration, endpoint: &str) -> Self {
        Connection {
            body: resp.bytes_stream().boxed(),
            parser: Parser::default(),
            ready: VecDeque::new(),
            idle,
            endpoint: endpoint.to_string(),
        }
    }

    /// The next frame; `Ok(None)` when the body ended after a complete frame. Fails when
    /// nothing at all (not even a keep-alive comment) arrives for the idle bound.
    async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        let cut = |reason: String| ClientError::StreamCut {
            endpoint: self.endpoint.clone(),
            reason,
        };
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(Some(ev));
            }
            match tokio::time::timeout(self.idle, self.body.next()).await {
                Err(_) => return Err(cut(format!("nothing received for {:?}", self.idle))),
                Ok(Some(Ok(chunk))) => self.parser.feed(&chunk, &mut self.ready),
                Ok(Some(Err(e))) => return Err(cut(e.to_string())),
                Ok(None) if self.parser.at_boundary() => return Ok(None),
                Ok(None) => return Err(cut("body ended inside a frame".into())),
            }
        }
    }
}

impl Client {
    /// `GET /v1/tasks/groups/{id}/runs`: the group's runs in the order added, as a stream
    /// that resumes after its last `event_id` when the connection drops, and ends after the
    /// last run.
    pub fn runs_stream(
        &self,
        group_id: &str,
        query: RunsQuery,
    ) -> BoxStream<'static, Result<TaskRunEvent, ClientError>> {
        self.runs_frames(
            group_id,
            query,
            |ev| decode_run(&ev),
            |run| run.event_id.as_ref(),
        )
    }

    /// [`Self::runs_stream`] with each run kept as the JSON it came in ([`RawRun`]).
    pub fn runs_stream_raw(
        &self,
        group_id: &str,
        query: RunsQuery,
    ) -> BoxStream<'static, Result<RawRun, ClientError>> {
        self.runs_frames(group_id, query, decode_raw_run, |run| run.event_id.as_ref())
    }

    fn runs_frames<T: Send + 'static>(
        &self,
        group_id: &str,
        query: RunsQuery,
        decode: fn(Event) -> Result<Frame<T>, serde_json::Error>,
        event_id: fn(&T) -> Option<&String>,
    ) -> BoxStream<'static, Result<T, ClientError>> {
        let client = self.clone();
        let path = paths::group_runs(paths::V1, &segment(group_id));
        async_stream::stream! {
            let endpoint = format!("GET {path}");
            let idle = client.config().stream_idle_timeout;
            let mut cursor = query.last_event_id.clone();
            let mut seen: u64 = 0;
            let mut retry = RetryState::new(&client.config().retry);
            loop {
                let mut params = Vec::new();
                if let Some(c) = &cursor {
                    params.push(("last_event_id", c.clone()));
                }
                if let Some(s) = &query.status {
                    params.push(("status", s.as_str().to_string()));
                }
                if query.include_input {
                    params.push(("include_input", "true".to_string()));
                }
                if query.include_output {
                    params.push(("include_output", "true".to_string()));
                }
                let resp = match client.open_sse(&path, &params, &mut retry).await {
                    Ok(r) => r,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                let mut conn = Connection::new(resp, idle, &endpoint);
                let mut progressed = false;
                let interruption = loop {
                    let ev = match conn.next().await {
                        Ok(Some(ev)) => ev,
                        Ok(None) => match query.expected {
                            Some(n) if seen < n => break ClientError::StreamCut {
                                endpoint: endpoint.clone(),
                                reason: format!("ended after {seen} of {n} runs"),
                            },
                            _ => return,
                        },
                        Err(e) => break e,
                    };
                    match decode(ev) {
                        Ok(Frame::Item(run)) => {
                            if let Some(id) = event_id(&run) {
                                if cursor.as_ref() == Some(id) {
                                    continue;
                                }
                                cursor = Some(id.clone());
                            }
                            seen += 1;
                            progressed = true;
                            yield Ok(run);
                        }
                        Ok(Frame::Failure(error)) => {
                            yield Err(client.scrub(ClientError::StreamError { endpoint: endpoint.clone(), error }));
                            return;
                        }
                        Ok(Frame::Skip) => {}
                        Err(source) => {
                            yield Err(ClientError::Decode { endpoint: endpoint.clone(), source });
                            return;
                        }
                    }
                };
                if let Err(e) = client.reconnect_after(&endpoint, &mut retry, progressed, interruption).await {
                    yield Err(e);
                    return;
                }
            }
        }
        .boxed()
    }

    /// `GET /v1/tasks/groups/{id}/events`: status updates and run completions, from
    /// `last_event_id` (or the group's beginning), resumed after dropped connections and
    /// after the server's time limit, until the group is inactive and the server has sent
    /// everything.
    pub fn events_stream(
        &self,
        group_id: &str,
        last_event_id: Option<String>,
    ) -> BoxStream<'static, Result<StreamEvent, ClientError>> {
        self.group_events(group_id, last_event_id, false)
    }

    fn group_events(
        &self,
        group_id: &str,
        last_event_id: Option<String>,
        statuses_only: bool,
    ) -> BoxStream<'static, Result<StreamEvent, ClientError>> {
        let client = self.clone();
        let group_id = group_id.to_string();
        let path = paths::group_events(paths::V1, &segment(&group_id));
        async_stream::stream! {
            let endpoint = format!("GET {path}");
            let idle = client.config().stream_idle_timeout;
            let mut cursor = last_event_id;
            let mut retry = RetryState::new(&client.config().retry);
            let mut last_inactive = false;
            loop {
                let params: Vec<(&str, String)> =
                    cursor.iter().map(|c| ("last_event_id", c.clone())).collect();
                let resp = match client.open_sse(&path, &params, &mut retry).await {
                    Ok(r) => r,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                let mut conn = Connection::new(resp, idle, &endpoint);
                let mut progressed = false;
                let interruption = loop {
                    let ev = match conn.next().await {
                        Ok(Some(ev)) => ev,
                        Ok(None) if last_inactive => return,
                        Ok(None) => {
                            // Closed while the group looked active: the server's time limit,
                            // or a group that never reported a status. Ask the group.
                            match client.get_group(&group_id).await {
                                Err(e) => {
                                    yield Err(e);
                                    return;
                                }
                                Ok(g) if !g.status.is_active && !progressed => return,
                                Ok(_) => break ClientError::StreamCut {
                                    endpoint: endpoint.clone(),
                                    reason: "closed before the group was inactive".into(),
                                },
                            }
                        }
                        Err(e) => break e,
                    };
                    match decode_event(&ev, statuses_only) {
                        Ok(Frame::Item(event)) => {
                            if let Some(id) = event.event_id() {
                                if cursor.as_deref() == Some(id) {
                                    continue;
                                }
                                cursor = Some(id.to_string());
                            }
                            if let StreamEvent::GroupStatus(s) = &event {
                                last_inactive = !s.status.is_active;
                            }
                            progressed = true;
                            yield Ok(event);
                        }
                        Ok(Frame::Failure(error)) => {
                            yield Err(client.scrub(ClientError::StreamError { endpoint: endpoint.clone(), error }));
                            return;
                        }
                        Ok(Frame::Skip) => {}
                        Err(source) => {
                            yield Err(ClientError::Decode { endpoint: endpoint.clone(), source });
                            return;
                        }
                    }
                };
                if let Err(e) = client.reconnect_after(&endpoint, &mut retry, progressed, interruption).await {
                    yield Err(e);
                    return;
                }
            }
        }
        .boxed()
    }

    /// Waits until the group has no active run, calling `progress` with each newer status
    /// (the current one first). Driven by the events stream, not by polling.
    pub async fn wait(
        &self,
        group_id: &str,
        progress: impl FnMut(&TaskGroupStatus),
    ) -> Result<TaskGroupStatus, ClientError> {
        self.wait_from(group_id, None, progress).await
    }

    /// Like [`Client::wait`], reading the events stream after `last_event_id` (e.g. an
    /// add-runs `event_cursor`) instead of from the group's beginning.
    pub async fn wait_from(
        &self,
        group_id: &str,
        last_event_id: Option<String>,
        mut progress: impl FnMut(&TaskGroupStatus),
    ) -> Result<TaskGroupStatus, ClientError> {
        let mut last = self.get_group(group_id).await?.status;
        progress(&last);
        if !last.is_active {
            return Ok(last);
        }
        // Statuses replayed from before `last` have fewer runs or fewer finished runs; they
        // are skipped so progress never goes backwards, and a replayed "inactive" from an
        // earlier moment never ends the wait.
        let floor = last.num_task_runs;
        let mut events = self.group_events(group_id, last_event_id, true);
        while let Some(event) = events.next().await {
            let StreamEvent::GroupStatus(e) = event? else {
                continue;
            };
            let s = e.status;
            if s.num_task_runs < floor {
                continue;
            }
            if !s.is_active {
                progress(&s);
                return Ok(s);
            }
            if s.finished() >= last.finished() {
                progress(&s);
                last = s;
            }
        }
        let status = self.get_group(group_id).await?.status;
        progress(&status);
        Ok(status)
    }

    /// `GET /v1/tasks/runs/{id}/events`: a single run's progress and state. Not resumable:
    /// a cut connection ends the stream with an error.
    pub fn run_events(&self, run_id: &str) -> BoxStream<'static, Result<StreamEvent, ClientError>> {
        let client = self.clone();
        let path = paths::run_events(paths::V1, &segment(run_id));
        async_stream::stream! {
            let endpoint = format!("GET {path}");
            let mut retry = RetryState::new(&client.config().retry);
            let resp = match client.open_sse(&path, &[], &mut retry).await {
                Ok(r) => r,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let mut conn = Connection::new(resp, client.config().stream_idle_timeout, &endpoint);
            loop {
                match conn.next().await {
                    Ok(Some(ev)) => match serde_json::from_str::<StreamEvent>(&ev.data) {
                        Ok(StreamEvent::Error { error }) => {
                            yield Err(client.scrub(ClientError::StreamError { endpoint: endpoint.clone(), error }));
                            return;
                        }
                        Ok(event) => yield Ok(event),
                        Err(source) => {
                            yield Err(ClientError::Decode { endpoint: endpoint.clone(), source });
                            return;
                        }
                    },
                    Ok(None) => return,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                }
            }
        }
        .boxed()
    }
}

/// Runs that can change no more.
impl Client {
    /// After a stream was interrupted: waits out the backoff and returns `Ok` to reconnect,
    /// or hands the interruption back once the retry budget is spent. A connection that
    /// delivered events starts the budget afresh.
    async fn reconnect_after(
        &self,
        endpoint: &str,
        retry: &mut RetryState,
        progressed: bool,
        interruption: ClientError,
    ) -> Result<(), ClientError> {
        if progressed {
            retry.reset();
        }
        let Some(delay) = retry.next_delay(&interruption) else {
            return Err(interruption);
        };
        self.note_reconnect();
        self.pause_before_retry(endpoint, &interruption, delay)
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> Event {
        Event {
            event: name.into(),
            data: data.into(),
            ..Event::default()
        }
    }

    #[test]
    fn raw_runs_keep_their_data_and_file_it_by_key() {
        let data = r#"{"type":"task_run.state","event_id":"7","run":{"run_id":"trun_7","status":"completed","is_active":false,"metadata":{"gf_row":"k7","gf_ledger_row":41,"other":1}},"output":{"type":"json","content":{"n":1},"basis":[{"field":"n","reasoning":"r","citations":[],"confidence":"high"}]}}"#;
        let Ok(Frame::Item(raw)) = decode_raw_run(event("task_run.state", data)) else {
            panic!("not a run")
        };
        assert_eq!(
            raw,
            RawRun {
                event_id: Some("7".into()),
                run_id: "trun_7".into(),
                status: RunStatus::Completed,
                row_key: Some("k7".into()),
                ledger_row: Some(41),
                data: data.into(),
                basis: data.find("[{\"field").map(|at| at..data.len() - 2),
            }
        );
        assert_eq!(
            &data[raw.basis.clone().unwrap()],
            r#"[{"field":"n","reasoning":"r","citations":[],"confidence":"high"}]"#
        );
        // A ledger row that is not an integer is no hint at all.
        let odd = data.replace("\"gf_ledger_row\":41", "\"gf_ledger_row\":\"41\"");
        let Ok(Frame::Item(odd)) = decode_raw_run(event("task_run.state", &odd)) else {
            panic!("not a run")
        };
        assert_eq!((odd.row_key.as_deref(), odd.ledger_row), (Some("k7"), None));
        // Frames named only by their JSON `type` are filed too; errors stay errors.
        let Ok(Frame::Item(by_type)) = decode_raw_run(event("message", data)) else {
            panic!("not a run")
        };
        assert_eq!((by_type.run_id, by_type.row_key), (raw.run_id, raw.row_key));
        let err = r#"{"type":"error","error":{"ref_id":"r","message":"boom"}}"#;
        assert!(matches!(
            decode_raw_run(event("error", err)),
            Ok(Frame::Failure(_))
        ));
        assert!(decode_raw_run(event("task_run.state", r#"{"run":{}}"#)).is_err());

        // Without the basis, the event reads the same but for an empty basis.
        let full = decode_run_state(data).unwrap();
        let lean = decode_run_state_without_basis(data).unwrap();
        assert_eq!(full.output.as_ref().unwrap().basis().len(), 1);
        assert!(lean.output.as_ref().unwrap().basis().is_empty());
        let strip = |mut ev: TaskRunEvent| {
            if let Some(TaskRunOutput::Json { basis, .. }) = &mut ev.output {
                basis.clear();
            }
            ev
        };
        assert_eq!(strip(full.clone()), lean);

        // A result row's reading keeps the run's id, status, error and output, and leaves
        // the rest empty.
        let row_only = |mut ev: TaskRunEvent| {
            ev.event_id = None;
            ev.input = None;
            ev.run = TaskRun {
                interaction_id: String::new(),
                processor: String::new(),
                metadata: None,
                taskgroup_id: None,
                warnings: None,
                created_at: None,
                modified_at: None,
                ..ev.run
            };
            ev
        };
        assert_eq!(decode_run_row(data, true).unwrap(), row_only(full.clone()));
        assert_eq!(decode_run_row(data, false).unwrap(), row_only(lean));
        let failed = data.replace(
            r#""is_active":false"#,
            r#""is_active":false,"error":{"ref_id":"r","message":"no luck"}"#,
        );
        let failed = failed.replace(r#""status":"completed""#, r#""status":"failed""#);
        let read = decode_run_row(&failed, false).unwrap();
        assert_eq!(read.run.status, RunStatus::Failed);
        assert_eq!(read.run.error.unwrap().message, "no luck");
        // What it cannot read fails as the full reader does.
        let broken = r#"{"run":{"run_id":"trun_1"}}"#;
        assert_eq!(
            decode_run_row(broken, false).unwrap_err().to_string(),
            decode_run_state(broken).unwrap_err().to_string()
        );
    }

    #[test]
    fn decodes_frames_by_name_and_by_type() {
        let run = r#"{"type":"task_run.state","event_id":"5","run":{"run_id":"trun_1","status":"completed","is_active":false},"input":null,"output":null}"#;
        let Ok(Frame::Item(r)) = decode_run(&event("task_run.state", run)) else {
            panic!("not a run")
        };
        assert_eq!(
            (r.event_id.as_deref(), r.run.run_id.as_str()),
            (Some("5"), "trun_1")
        );
        assert!(matches!(
            decode_run(&event("message", run)),
            Ok(Frame::Item(_))
        ));
        let err = r#"{"type":"error","error":{"ref_id":"r","message":"boom"}}"#;
        assert!(
            matches!(decode_run(&event("error", err)), Ok(Frame::Failure(e)) if e.message == "boom")
        );
        let status = r#"{"type":"task_group_status","event_id":"9","status":{"num_task_runs":0,"task_run_status_counts":{},"is_active":false}}"#;
        assert!(matches!(
            decode_run(&event("task_group_status", status)),
            Ok(Frame::Skip)
        ));
        assert!(matches!(
            decode_event(&event("task_group_status", status), true),
            Ok(Frame::Item(StreamEvent::GroupStatus(_)))
        ));
        assert!(matches!(
            decode_event(&event("task_run.state", "not json"), true),
            Ok(Frame::Skip)
        ));
        assert!(decode_event(&event("task_run.state", "not json"), false).is_err());
    }

    #[test]
    fn run_states_read_the_same_as_the_derived_reader() {
        let run = r#""run":{"run_id":"trun_1","status":"completed","is_active":false}"#;
        let basis = r#""basis":[{"field":"a","reasoning":"r","citations":[{"url":"u","excerpts":["x"]}],"confidence":"high"}]"#;
        for data in [
            format!(
                r#"{{"type":"task_run.state","event_id":"5",{run},"input":{{"input":{{"a":1}},"processor":"core"}},"output":{{"type":"json","content":{{"a":[1,{{"b":null}}]}},{basis},"output_schema":{{"type":"object"}}}}}}"#
            ),
            format!(
                r#"{{"type":"task_run.state",{run},"output":{{"type":"text","content":"hello",{basis},"beta_fields":{{"x":1}}}}}}"#
            ),
            format!(r#"{{"type":"task_run.state",{run},"output":null}}"#),
            format!(r#"{{{run}}}"#),
        ] {
            let want: TaskRunEvent = serde_json::from_str(&data).unwrap();
            assert_eq!(decode_run_state(&data).unwrap(), want, "{data}");
        }
        for bad in [
            format!(r#"{{{run},"output":{{"type":"text","content":{{"not":"text"}}}}}}"#),
            format!(r#"{{{run},"output":{{"type":"json"}}}}"#),
            format!(r#"{{{run},"output":{{"type":"html","content":"x"}}}}"#),
            r#"{"output":null}"#.to_string(),
        ] {
            let want = serde_json::from_str::<TaskRunEvent>(&bad)
                .unwrap_err()
                .to_string();
            assert_eq!(
                decode_run_state(&bad).unwrap_err().to_string(),
                want,
                "{bad}"
            );
        }
    }
}
