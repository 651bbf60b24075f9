//! Submission: source batches → run inputs → claims → add-runs, as the input stream arrives.
//!
//! A producer task reads the source, encodes each batch of rows to JSON, claims their input
//! keys in the ledger in one transaction (which decides per row: submit, share an earlier
//! run, or reuse a stored result), hands the inputs to submit to the client's
//! `add_runs_stream` a slice at a time through a small bounded channel, and appends the rows
//! (with their keys) to the spill file. The client's
//! bounded POSTs in flight pace the producer, so neither the table nor the inputs pile up in
//! memory. The group is created only when the first input needs submitting, and recorded
//! in the ledger before any run is added to it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use datafusion::error::DataFusionError;
use futures::stream::{BoxStream, StreamExt};

use super::input::{InputEncoder, InputError};
use super::spill::{Spill, SpillError, SpillWriter};
use crate::api::{Metadata, TaskSpec};
use crate::client::{Client, ClientError, PreparedRunInput, RunsQuery};
use crate::ledger::{Claim, ClaimCounts, GroupError, LedgerError, TaskLedger};

/// Rows encoded and handed to the client at a time.
const SLICE_ROWS: usize = 1000;
/// Rows claimed in one ledger transaction (at most one source batch).
const CLAIM_ROWS: usize = 8192;
/// Encoded slices waiting between the producer and the client.
const CHANNEL_SLICES: usize = 2;

/// Why a submission stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("reading the source: {0}")]
    Source(#[source] DataFusionError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("creating the task group: {0}")]
    CreateGroup(#[source] ClientError),
    #[error("adding runs to group {group_id}: {source}")]
    Client {
        group_id: String,
        #[source]
        source: ClientError,
    },
    #[error("group {group_id}: {message}")]
    Inconsistent { group_id: String, message: String },
    /// The row's input is pending in another pipeline sharing the ledger.
    #[error("row {row}: its input {}", crate::ledger::pending_elsewhere(pipeline, *running))]
    Pending {
        row: u64,
        pipeline: String,
        running: bool,
    },
}

impl SubmitError {
    /// The API error behind this one, if any.
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            SubmitError::Client { source, .. } | SubmitError::CreateGroup(source) => Some(source),
            _ => None,
        }
    }

    /// True when the failure was the API's or the network's and a later try may succeed.
    pub fn is_retryable(&self) -> bool {
        self.client_error().is_some_and(ClientError::is_retryable)
    }
}

/// Counts reported while submitting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubmitProgress {
    /// The group, once there is one.
    pub group_id: Option<String>,
    /// Runs the API has accepted in this submission.
    pub runs_added: u64,
    /// What the rows read so far were claimed as.
    pub claims: ClaimCounts,
}

/// Where and how to submit.
#[derive(Debug)]
pub struct SubmitTarget<'a> {
    pub client: &'a Client,
    /// The task's part of the ledger: claims, the group, run ids.
    pub ledger: &'a TaskLedger,
    /// Metadata of the group, when one is created.
    pub group_metadata: Metadata,
    /// The group's `default_task_spec`.
    pub spec: TaskSpec,
    /// Encodes rows of `schema`.
    pub encoder: InputEncoder,
    /// The source's schema.
    pub schema: &'a Schema,
    /// Where the spill file goes (the system temp dir when `None`).
    pub spill_dir: Option<&'a Path>,
    /// Is handed the spill file as soon as it exists, to be read while rows are still
    /// submitted (see [`Spill::reader`]).
    pub spilled: Option<tokio::sync::oneshot::Sender<Arc<Spill>>>,
}

/// What a submission left.
#[derive(Debug)]
pub struct Submission {
    /// Every source row, in order, with its input key.
    pub spill: Arc<Spill>,
    /// This attempt's group of the task, if it has one (runs added now or before an
    /// interruption).
    pub group_id: Option<String>,
    pub claims: ClaimCounts,
    /// Runs added by this submission.
    pub runs_added: u64,
    /// An `/events` cursor from before the last runs were added (none when no POST of this
    /// submission answered): waiting for the group can start there rather than replaying
    /// every event of the runs before.
    pub event_cursor: Option<String>,
}

/// Submits every row of `input` that needs a run, spilling every row with its input key.
/// Returns once every run is added.
pub async fn submit(
    target: SubmitTarget<'_>,
    input: BoxStream<'static, Result<RecordBatch, DataFusionError>>,
    mut progress: impl FnMut(SubmitProgress),
) -> Result<Submission, SubmitError> {
    let SubmitTarget {
        client,
        ledger,
        group_metadata,
        spec,
        encoder,
        schema,
        spill_dir,
        spilled,
    } = target;
    let mut group_id = ledger.group().await?;
    if ledger.should_reconcile() {
        let found = match &group_id {
            Some(g) => match group_keys(client, g).await {
                Ok(found) => found,
                Err(e) if e.status() == Some(404) => {
                    tracing::warn!(group = %g, "the group of an interrupted run is gone; its unfinished runs are submitted again");
                    ledger.forget_group(g).await?;
                    group_id = None;
                    Vec::new()
                }
                Err(source) => {
                    return Err(SubmitError::Client {
                        group_id: g.clone(),
                        source,
                    });
                }
            },
            None => Vec::new(),
        };
        let r = ledger.reconcile(found).await?;
        tracing::info!(
            group = group_id.as_deref().unwrap_or("-"),
            found = r.found,
            dropped = r.dropped,
            "resumed: claims the group holds are kept, the others are sent again"
        );
    }

    let writer = SpillWriter::create(spill_dir, schema)?;
    if let Some(spilled) = spilled {
        let _ = spilled.send(writer.spill());
    }
    let claims = Arc::new(Mutex::new(ClaimCounts::default()));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<PreparedRunInput>>(CHANNEL_SLICES);
    let producer = tokio::spawn(produce(
        input,
        encoder,
        writer,
        ledger.clone(),
        claims.clone(),
        tx,
    ));
    let counts = || *claims.lock().unwrap_or_else(|p| p.into_inner());

    let mut runs_added = 0u64;
    let mut event_cursor = None;
    let mut failure = None;
    // The group is made when the first input to submit arrives; none when every row is
    // shared or cached.
    if let Some(first) = rx.recv().await {
        let made = ledger
            .group_or_create(|| async {
                client
                    .create_group(Some(group_metadata))
                    .await
                    .map(|g| g.taskgroup_id)
            })
            .await;
        match made {
            Ok(g) => {
                group_id = Some(g);
            }
            Err(GroupError::Ledger(e)) => failure = Some(SubmitError::Ledger(e)),
            Err(GroupError::Create(e)) => failure = Some(SubmitError::CreateGroup(e)),
        }
        if let (None, Some(g)) = (&failure, &group_id) {
            let rest = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|batch| (batch, rx))
            });
            let inputs = futures::stream::iter([first])
                .chain(rest)
                .flat_map(futures::stream::iter);
            let mut added = client.add_runs_stream(g, Some(spec), inputs);
            while let Some(batch) = added.next().await {
                let recorded = match batch {
                    Ok(b) => {
                        runs_added += b.run_ids.len() as u64;
                        if b.event_cursor.is_some() {
                            event_cursor = b.event_cursor;
                        }
                        // The runs' ids are recorded with their results. Until then the
                        // claims say enough: after an interruption the group's runs are
                        // read back, and the claims the group lacks are sent again (see
                        // `TaskLedger::reconcile`).
                        ledger
                            .pause_idle("runs.added")
                            .await
                            .map_err(SubmitError::from)
                    }
                    Err(source) => Err(SubmitError::Client {
                        group_id: g.clone(),
                        source,
                    }),
                };
                if let Err(e) = recorded {
                    failure = Some(e);
                    break;
                }
                progress(SubmitProgress {
                    group_id: Some(g.clone()),
                    runs_added,
                    claims: counts(),
                });
            }
        }
    }
    if let Some(e) = failure {
        producer.abort();
        return Err(e);
    }
    let produced = producer.await.map_err(|e| SubmitError::Inconsistent {
        group_id: group_id.clone().unwrap_or_default(),
        message: format!("the source reader stopped: {e}"),
    })?;
    let spill = produced?.finish()?;
    let claims = counts();
    progress(SubmitProgress {
        group_id: group_id.clone(),
        runs_added,
        claims,
    });
    if claims.submit != runs_added {
        return Err(SubmitError::Inconsistent {
            group_id: group_id.unwrap_or_default(),
            message: format!(
                "{} rows needed a run but {runs_added} runs were added",
                claims.submit
            ),
        });
    }
    Ok(Submission {
        spill,
        group_id,
        claims,
        runs_added,
        event_cursor,
    })
}

/// The input key of every run in `group_id`.
async fn group_keys(client: &Client, group_id: &str) -> Result<Vec<String>, ClientError> {
    let mut runs = client.runs_stream(group_id, RunsQuery::default());
    let mut found = Vec::new();
    while let Some(ev) = runs.next().await {
        let ev = ev?;
        if let Some(key) = crate::results::run_row_key(&ev) {
            found.push(key);
        }
    }
    Ok(found)
}

/// Reads, encodes, claims and spills the source; stops early when the client side hangs up.
async fn produce(
    mut input: BoxStream<'static, Result<RecordBatch, DataFusionError>>,
    encoder: InputEncoder,
    mut writer: SpillWriter,
    ledger: TaskLedger,
    counts: Arc<Mutex<ClaimCounts>>,
    tx: tokio::sync::mpsc::Sender<Vec<PreparedRunInput>>,
) -> Result<SpillWriter, SubmitError> {
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(SubmitError::Source)?;
        if batch.num_rows() == 0 {
            continue;
        }
        let first = writer.rows();
        let mut keys = Vec::with_capacity(batch.num_rows());
        let mut rows = Vec::with_capacity(batch.num_rows());
        for start in (0..batch.num_rows()).step_by(CLAIM_ROWS) {
            let part = batch.slice(start, CLAIM_ROWS.min(batch.num_rows() - start));
            // Claimed all at once: one transaction for the part's keys rewrites each page of
            // the ledger's key index they land on once, where a transaction per slice of
            // inputs would rewrite most of those pages once per slice. The rows' inputs
            // wait as the JSON they were encoded to, and go to the client a slice at a time.
            let encoded = encoder.encode_keyed(&part, first + start as u64)?;
            let part_keys: Vec<String> = encoded.iter().map(|e| e.key.clone()).collect();
            let claims = match ledger.claim_rows(part_keys.clone()).await {
                Ok(c) => c,
                Err(LedgerError::Pending {
                    key,
                    pipeline,
                    running,
                    ..
                }) => {
                    let at = part_keys.iter().position(|k| *k == key).unwrap_or(0);
                    return Err(SubmitError::Pending {
                        row: first + (start + at) as u64,
                        pipeline,
                        running,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            keys.extend(part_keys);
            rows.extend(claims.iter().map(|&(_, row)| Some(row)));
            {
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                for (claim, _) in &claims {
                    c.add(*claim);
                }
            }
            // Each run carries the ledger row of its claim, so that its result is stored
            // there without a walk down the ledger's key index.
            let mut pairs = encoded.into_iter().zip(claims);
            while pairs.len() > 0 {
                let to_submit: Vec<PreparedRunInput> = pairs
                    .by_ref()
                    .take(SLICE_ROWS)
                    .filter(|(_, (claim, _))| *claim == Claim::Submit)
                    .map(|(e, (_, row))| encoder.prepared(e, Some(row)))
                    .collect();
                if !to_submit.is_empty() && tx.send(to_submit).await.is_err() {
                    return Ok(writer);
                }
            }
        }
        writer.write_with_rows(&batch, keys, rows)?;
    }
    Ok(writer)
}
