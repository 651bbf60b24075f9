//! Adding runs to a group: batches of at most 1,000, a bounded number of POSTs in flight, the
//! client-side rate limit, and reconciliation of POSTs whose outcome is unknown, so that no
//! input becomes two runs.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::{BoxStream, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use super::error::ClientError;
use super::http::{Client, json_body};
use super::retry::RetryState;
use super::row_key::{ROW_KEY, check_row_key, ensure_row_key, row_key_value};
use super::streams::RunsQuery;
use crate::api::{TaskRunInput, TaskSpec};

/// The runs created for one batch of inputs, in input order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedBatch {
    /// Position of the batch's first input among all inputs submitted.
    pub offset: u64,
    /// Each input's row key (given, or derived).
    pub row_keys: Vec<String>,
    /// Each input's run id.
    pub run_ids: Vec<String>,
    /// How many of these runs were found in the group after a POST whose answer was lost,
    /// rather than returned by a POST.
    pub recovered: usize,
    /// The `event_cursor` the POST that added them answered with: a group `/events` cursor
    /// from before these runs were added (none when the answer was lost).
    pub event_cursor: Option<String>,
}

/// What every batch of one submission shares.
struct Submission {
    client: Client,
    group_id: String,
    /// The default task spec, serialized once for all batches.
    spec: Option<Box<RawValue>>,
    /// A `/runs` cursor known to precede every run not yet added: the latest `run_cursor`
    /// answered, or the last `event_id` a reconciliation read.
    cursor: Mutex<Option<String>>,
}

impl Submission {
    fn cursor(&self) -> Option<String> {
        self.cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn advance(&self, cursor: Option<String>) {
        if cursor.is_some() {
            *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
        }
    }
}

#[derive(Serialize)]
struct AddRunsBody<'a, I> {
    #[serde(skip_serializing_if = "Option::is_none")]
    default_task_spec: Option<&'a RawValue>,
    inputs: Vec<&'a I>,
}

/// A run input as add-runs sends it: a [`TaskRunInput`], or a [`PreparedRunInput`] already
/// written as JSON.
pub trait RunInputBody: Serialize + Send + 'static {
    /// The input's row key: the one its metadata gives, or one derived from its `ordinal`
    /// (and put in its metadata). An error says why a given key cannot be one.
    fn row_key(&mut self, ordinal: u64) -> Result<String, String>;
}

impl RunInputBody for TaskRunInput {
    fn row_key(&mut self, ordinal: u64) -> Result<String, String> {
        ensure_row_key(self, ordinal)
    }
}

/// A run input whose input is already JSON, with its row key and (when known) the ledger
/// row of its claim: what a pipeline submits, sent without building a tree of values.
#[derive(Clone, Debug, Serialize)]
pub struct PreparedRunInput {
    pub input: Box<RawValue>,
    pub processor: String,
    pub metadata: PreparedMetadata,
}

/// The metadata of a [`PreparedRunInput`]: its [`ROW_KEY`] and [`super::LEDGER_ROW`].
#[derive(Clone, Debug, Serialize)]
pub struct PreparedMetadata {
    #[serde(rename = "gf_row")]
    pub row_key: String,
    #[serde(rename = "gf_ledger_row", skip_serializing_if = "Option::is_none")]
    pub ledger_row: Option<i64>,
}

impl RunInputBody for PreparedRunInput {
    fn row_key(&mut self, _ordinal: u64) -> Result<String, String> {
        check_row_key(self.metadata.row_key.clone())
    }
}

impl Client {
    /// Adds any number of runs, returning their ids in input order.
    pub async fn add_runs(
        &self,
        group_id: &str,
        default_task_spec: Option<TaskSpec>,
        inputs: Vec<TaskRunInput>,
    ) -> Result<Vec<String>, ClientError> {
        let mut ids = Vec::with_capacity(inputs.len());
        let mut batches =
            self.add_runs_stream(group_id, default_task_spec, futures::stream::iter(inputs));
        while let Some(batch) = batches.next().await {
            ids.extend(batch?.run_ids);
        }
        Ok(ids)
    }

    /// Adds runs as inputs arrive: one [`AddedBatch`] per add-runs request, in input order.
    ///
    /// Inputs are read only while fewer than `max_in_flight` POSTs are outstanding and the
    /// output is being consumed, so a slow API slows the reader (backpressure). Each input
    /// gets a row key in `metadata[ROW_KEY]` unless it has one; row keys must be unique in
    /// the group. A POST whose outcome is unknown (timeout, reset, 429, 5xx) is reconciled
    /// against the group's runs, and only inputs whose keys are missing are sent again. The
    /// stream ends after the first error; dropping it abandons the POSTs in flight.
    pub fn add_runs_stream<S, I>(
        &self,
        group_id: &str,
        default_task_spec: Option<TaskSpec>,
        inputs: S,
    ) -> BoxStream<'static, Result<AddedBatch, ClientError>>
    where
        S: Stream<Item = I> + Send + 'static,
        I: RunInputBody,
    {
        let spec = match default_task_spec
            .as_ref()
            .map(serde_json::value::to_raw_value)
        {
            None => None,
            Some(Ok(raw)) => Some(raw),
            Some(Err(source)) => {
                let err = ClientError::Decode {
                    endpoint: "default task spec".into(),
                    source,
                };
                return futures::stream::once(async { Err(err) }).boxed();
            }
        };
        let submission = Arc::new(Submission {
            client: self.clone(),
            group_id: group_id.to_string(),
            spec,
            cursor: Mutex::new(None),
        });
        let submit = &self.config().submit;
        let mut offset = 0u64;
        let batches = inputs
            .chunks(submit.batch_size)
            .map(move |chunk| {
                let start = offset;
                offset += chunk.len() as u64;
                AbortOnDrop(tokio::spawn(submit_batch(submission.clone(), start, chunk)))
            })
            .buffered(submit.max_in_flight);
        async_stream::stream! {
            futures::pin_mut!(batches);
            while let Some(batch) = batches.next().await {
                let failed = batch.is_err();
                yield batch;
                if failed {
                    return;
                }
            }
        }
        .boxed()
    }

    /// Reads the group's runs after `cursor` and finds the run of each `pending` input by its
    /// row key. Returns (input index, run id) pairs and the last cursor read.
    async fn reconcile(
        &self,
        group_id: &str,
        cursor: Option<String>,
        keys: &[String],
        pending: &[usize],
    ) -> Result<(Vec<(usize, String)>, Option<String>), ClientError> {
        let mut wanted: HashMap<&str, VecDeque<usize>> = HashMap::with_capacity(pending.len());
        for &i in pending {
            wanted.entry(keys[i].as_str()).or_default().push_back(i);
        }
        let mut found = Vec::new();
        let mut last = None;
        let query = RunsQuery {
            last_event_id: cursor,
            ..RunsQuery::default()
        };
        let mut runs = self.runs_stream(group_id, query);
        while let Some(event) = runs.next().await {
            let event = event?;
            if let Some(v) = event.run.metadata.as_ref().and_then(|m| m.get(ROW_KEY)) {
                let slot = match v {
                    Value::String(s) => wanted.get_mut(s.as_str()),
                    other => row_key_value(other).and_then(|k| wanted.get_mut(k.as_str())),
                };
                if let Some(i) = slot.and_then(VecDeque::pop_front) {
                    found.push((i, event.run.run_id));
                }
            }
            if event.event_id.is_some() {
                last = event.event_id;
            }
        }
        self.note_reconciliation(found.len());
        Ok((found, last))
    }
}

/// Submits one batch until every input has a run: POST, and after an unknown outcome, find
/// what the group already has and re-send only the rest.
async fn submit_batch<I: RunInputBody>(
    s: Arc<Submission>,
    offset: u64,
    mut inputs: Vec<I>,
) -> Result<AddedBatch, ClientError> {
    let mut keys = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter_mut().enumerate() {
        let index = offset + i as u64;
        let key = input
            .row_key(index)
            .map_err(|message| ClientError::InvalidInput { index, message })?;
        keys.push(key);
    }
    let client = &s.client;
    let endpoint = format!("POST /v1/tasks/groups/{}/runs", s.group_id);
    let mut run_ids: Vec<Option<String>> = vec![None; inputs.len()];
    let mut pending: Vec<usize> = (0..inputs.len()).collect();
    let mut recovered = 0;
    let mut event_cursor = None;
    let mut retry = RetryState::new(&client.config().retry);
    // Every attempt's runs, if stored, come after this cursor: it was known before the first.
    let start_cursor = s.cursor();
    while !pending.is_empty() {
        let body = json_body(&AddRunsBody {
            default_task_spec: s.spec.as_deref(),
            inputs: pending.iter().map(|&i| &inputs[i]).collect(),
        })?;
        let err = match client.post_add_runs(&s.group_id, body).await {
            Ok(resp) => {
                if resp.run_ids.len() != pending.len() {
                    return Err(ClientError::Protocol {
                        endpoint,
                        message: format!(
                            "{} run ids for {} inputs",
                            resp.run_ids.len(),
                            pending.len()
                        ),
                    });
                }
                for (&i, id) in pending.iter().zip(resp.run_ids) {
                    run_ids[i] = Some(id);
                }
                s.advance(resp.run_cursor);
                event_cursor = resp.event_cursor;
                break;
            }
            Err(err) => err,
        };
        let delay = retry.next_delay(&err);
        if let Some(d) = delay {
            client.pause_before_retry(&endpoint, &err, d).await;
        }
        if !err.was_not_sent() && err.is_retryable() {
            let (found, last) = client
                .reconcile(&s.group_id, start_cursor.clone(), &keys, &pending)
                .await?;
            s.advance(last);
            recovered += found.len();
            for (i, id) in found {
                run_ids[i] = Some(id);
            }
            pending.retain(|&i| run_ids[i].is_none());
        }
        if delay.is_none() && !pending.is_empty() {
            return Err(err);
        }
    }
    let run_ids = run_ids
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ClientError::Protocol {
            endpoint: endpoint.clone(),
            message: "a batch ended with inputs lacking runs".into(),
        })?;
    Ok(AddedBatch {
        offset,
        row_keys: keys,
        run_ids,
        recovered,
        event_cursor,
    })
}

/// A spawned task, aborted when this is dropped (a batch when its stream is, a join's
/// fetch when its stream is).
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl Future for AbortOnDrop<Result<AddedBatch, ClientError>> {
    type Output = Result<AddedBatch, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => Err(ClientError::Protocol {
                    endpoint: "add-runs".into(),
                    message: format!("batch task ended: {e}"),
                }),
            },
        })
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
