//! Submission: source batches → run inputs → add-runs, as the input stream arrives.
//!
//! A producer task reads the source, encodes each batch, appends it (with row keys) to the
//! spill file and hands the inputs to the client's `add_runs_stream` through a small bounded
//! channel. The client's bounded POSTs in flight pace the producer, so neither the table nor
//! the inputs pile up in memory.

use std::path::Path;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use datafusion::error::DataFusionError;
use futures::stream::{BoxStream, StreamExt};

use super::input::{InputEncoder, InputError};
use super::spill::{Spill, SpillError, SpillWriter};
use crate::api::{TaskRunInput, TaskSpec};
use crate::client::{Client, ClientError, row_key_of};

/// Rows encoded at a time.
const SLICE_ROWS: usize = 1000;
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
    #[error("adding runs to group {group_id}: {source}")]
    Client {
        group_id: String,
        #[source]
        source: ClientError,
    },
    #[error("group {group_id}: {message}")]
    Inconsistent { group_id: String, message: String },
}

impl SubmitError {
    /// True when the failure was the API's or the network's and a later try may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SubmitError::Client { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

/// Counts reported while submitting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubmitProgress {
    /// Runs the API has accepted.
    pub runs_added: u64,
}

/// Where and how to submit.
#[derive(Debug)]
pub struct SubmitTarget<'a> {
    pub client: &'a Client,
    pub group_id: &'a str,
    /// The group's `default_task_spec`.
    pub spec: TaskSpec,
    /// Encodes rows of `schema`.
    pub encoder: InputEncoder,
    /// The source's schema.
    pub schema: &'a Schema,
    /// Where the spill file goes (the system temp dir when `None`).
    pub spill_dir: Option<&'a Path>,
}

/// Submits every row of `input` as a run, spilling the rows (with row keys). Returns the
/// spill once every run is added.
pub async fn submit(
    target: SubmitTarget<'_>,
    input: BoxStream<'static, Result<RecordBatch, DataFusionError>>,
    mut progress: impl FnMut(SubmitProgress),
) -> Result<Spill, SubmitError> {
    let SubmitTarget {
        client,
        group_id,
        spec,
        encoder,
        schema,
        spill_dir,
    } = target;
    let writer = SpillWriter::create(spill_dir, schema)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<TaskRunInput>>(CHANNEL_SLICES);
    let producer = tokio::spawn(produce(input, encoder, writer, tx));

    let inputs = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|batch| (batch, rx))
    })
    .flat_map(futures::stream::iter);
    let mut added = client.add_runs_stream(group_id, Some(spec), inputs);
    let mut runs_added = 0u64;
    let mut failure = None;
    while let Some(batch) = added.next().await {
        match batch {
            Ok(b) => {
                runs_added += b.run_ids.len() as u64;
                progress(SubmitProgress { runs_added });
            }
            Err(source) => {
                failure = Some(SubmitError::Client {
                    group_id: group_id.to_string(),
                    source,
                });
                break;
            }
        }
    }
    drop(added);
    if let Some(e) = failure {
        producer.abort();
        return Err(e);
    }
    let produced = producer.await.map_err(|e| SubmitError::Inconsistent {
        group_id: group_id.to_string(),
        message: format!("the source reader stopped: {e}"),
    })?;
    let spill = produced?.finish()?;
    if spill.rows() != runs_added {
        return Err(SubmitError::Inconsistent {
            group_id: group_id.to_string(),
            message: format!(
                "{} source rows were read but {runs_added} runs were added",
                spill.rows()
            ),
        });
    }
    Ok(spill)
}

/// Reads, encodes and spills the source; stops early when the client side hangs up.
async fn produce(
    mut input: BoxStream<'static, Result<RecordBatch, DataFusionError>>,
    encoder: InputEncoder,
    mut writer: SpillWriter,
    tx: tokio::sync::mpsc::Sender<Vec<TaskRunInput>>,
) -> Result<SpillWriter, SubmitError> {
    while let Some(batch) = input.next().await {
        let batch = batch.map_err(SubmitError::Source)?;
        if batch.num_rows() == 0 {
            continue;
        }
        // Encoded inputs are several times larger than their rows, so they are made and
        // handed over a slice at a time; the spill gets the whole batch once all are sent.
        let first = writer.rows();
        let mut keys = Vec::with_capacity(batch.num_rows());
        for offset in (0..batch.num_rows()).step_by(SLICE_ROWS) {
            let len = SLICE_ROWS.min(batch.num_rows() - offset);
            let inputs = encoder.encode(&batch.slice(offset, len), first + offset as u64)?;
            keys.extend(inputs.iter().map(|i| row_key_of(i).unwrap_or_default()));
            if tx.send(inputs).await.is_err() {
                return Ok(writer);
            }
        }
        writer.write(&batch, keys)?;
    }
    Ok(writer)
}
