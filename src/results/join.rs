//! Spilled source rows + the ledger's stored results → result batches.
//!
//! A group's ended runs are stored in the ledger ([`store_results`]), keyed by input key;
//! the spill file, which holds the source rows in order with their input keys, is read back
//! a slice at a time and each slice's results are looked up by key. While runs are still
//! being stored ([`Reading::Going`]), a slice waits for its missing results, so the join
//! runs beside the group instead of after it. Rows
//! with the same input get the same result (dedup fans out), results of earlier runs serve
//! as well as new ones (the cache), and memory stays bounded by one slice. Every spilled
//! row is emitted exactly once; a row without a stored result gets
//! `run_status = 'missing'`.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use futures::stream::{BoxStream, Stream, StreamExt};

use super::decode::ResultDecoder;
use crate::api::{RunStatus, TaskRunEvent};
use crate::client::{
    AbortOnDrop, ClientError, ROW_KEY, RawRun, RowEvent, decode_run_row, read_row_event,
    row_key_value,
};
use crate::ledger::{LedgerError, StoredResult, TaskLedger};
use crate::sink::spill::{Spill, SpillError};

/// Rows joined (and run outputs held, parsed) at a time: the spill's batches are cut to
/// this size, which bounds the working set of parsed results.
const JOIN_ROWS: usize = 1024;
/// Results written to the ledger per transaction.
const STORE_ROWS: usize = 1000;

/// Why the storing of a group's results (beside the join) failed.
pub type ReadError = Arc<dyn std::error::Error + Send + Sync>;

/// Whether the results a join needs are still being stored.
#[derive(Clone, Debug, Default)]
pub enum Reading {
    /// Runs are still being stored: a result missing now may come.
    #[default]
    Going,
    /// Every result there will be is stored.
    Done,
    /// Storing stopped with this error: the join fails with it.
    Failed(ReadError),
}

/// Why reading results stopped.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("reading the runs of group {group_id}: {source}")]
    Client {
        group_id: String,
        #[source]
        source: ClientError,
    },
    #[error("building result rows: {0}")]
    Arrow(#[from] ArrowError),
    #[error("the stored result of input {key}: {message}")]
    Stored { key: String, message: String },
    /// Storing the results failed (see [`Reading::Failed`]).
    #[error("{0}")]
    Reading(ReadError),
    /// The reading of results ended without saying how (its task panicked or was dropped).
    #[error("the reading of results stopped without a word")]
    ReadingLost,
}

impl JoinError {
    /// True when the failure was the API's or the network's and a later try may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JoinError::Client { source, .. } if source.is_retryable())
    }
}

/// The row key a run carries in its metadata.
pub fn run_row_key(ev: &TaskRunEvent) -> Option<String> {
    ev.run
        .metadata
        .as_ref()?
        .get(ROW_KEY)
        .and_then(row_key_value)
}

/// How far a read of a group's runs got.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunsRead {
    /// Runs stored in the ledger.
    pub stored: u64,
    /// With [`Until::Active`]: the runs before `cursor` (all of them ended), which a later
    /// read from `cursor` will not see again.
    pub passed: u64,
    /// With [`Until::Active`]: the `event_id` of the last run passed.
    pub cursor: Option<String>,
}

/// Where a read of a group's runs stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// At the end of the stream; runs still active are skipped, left for a later read.
    End,
    /// At the first run still active (or without a cursor): what came before it is a
    /// prefix of the group that a later read can resume after.
    Active,
}

/// Reads the ended runs of `group_id` (with their outputs, as the JSON they came in) into
/// the ledger, a slice at a time. A slice is stored while the next one is read: storing
/// (packing and writing) and reading (the stream's JSON) each take about half the time, and
/// the store runs on a thread of its own. Slices are stored in the order they were read.
pub async fn store_results(
    runs: BoxStream<'static, Result<RawRun, ClientError>>,
    group_id: &str,
    ledger: &TaskLedger,
    until: Until,
) -> Result<RunsRead, JoinError> {
    let mut runs = runs;
    let mut read = RunsRead::default();
    let mut storing: Option<futures::future::BoxFuture<'_, Result<(), LedgerError>>> = None;
    loop {
        let next = read_slice(&mut runs, group_id, until, &mut read);
        let (slice, more) = match storing.take() {
            Some(store) => {
                let (slice, stored) = futures::join!(next, store);
                stored?;
                slice?
            }
            None => next.await?,
        };
        if !slice.is_empty() {
            read.stored += slice.len() as u64;
            storing = Some(Box::pin(ledger.store_results(slice)));
        }
        if !more {
            break;
        }
    }
    if let Some(store) = storing {
        store.await?;
    }
    Ok(read)
}

/// The next slice of up to [`STORE_ROWS`] ended runs to store, and whether the read goes
/// on after it (false at the end of the stream, or, with [`Until::Active`], at the first
/// run still active). `read` follows the runs passed.
async fn read_slice(
    runs: &mut BoxStream<'static, Result<RawRun, ClientError>>,
    group_id: &str,
    until: Until,
    read: &mut RunsRead,
) -> Result<(Vec<StoredResult>, bool), JoinError> {
    let mut slice = Vec::with_capacity(STORE_ROWS);
    while slice.len() < STORE_ROWS {
        let Some(ev) = runs.next().await else {
            return Ok((slice, false));
        };
        let run = ev.map_err(|source| JoinError::Client {
            group_id: group_id.to_string(),
            source,
        })?;
        if until == Until::Active {
            if !run.status.is_terminal() || run.event_id.is_none() {
                return Ok((slice, false));
            }
            read.passed += 1;
            read.cursor.clone_from(&run.event_id);
        }
        if !run.status.is_terminal() {
            continue;
        }
        let Some(input_key) = run.row_key else {
            continue;
        };
        // Stored as it came: the output is decoded when the rows are joined.
        slice.push(StoredResult {
            input_key,
            row: run.ledger_row,
            completed: run.status == RunStatus::Completed,
            json: run.data,
            basis: run.basis,
        });
    }
    Ok((slice, true))
}

/// Slices fetched ahead of the one being decoded.
const FETCH_AHEAD: usize = 2;

/// One slice of spilled rows with the stored result of each (`None` where there is none).
type Fetched = (RecordBatch, Vec<String>, Vec<Option<String>>);

/// Where a spilled batch's row keys are (the ledger rows follow, last).
fn key_column(batch: &RecordBatch) -> usize {
    batch.num_columns() - 2
}

/// Emits one batch per slice of spilled rows: the source columns (without the key), then
/// the decoder's columns, under `schema`. While `reading` says results are still being
/// stored, a slice with rows whose result is missing waits for it; the stream ends only
/// once reading is done, and fails if it failed.
///
/// Reading the spill and the ledger runs in a task of its own, a few slices ahead of the
/// JSON decoding, so the two use both cores; it stops when the stream is dropped.
pub fn join_results(
    spill: Arc<Spill>,
    ledger: TaskLedger,
    reading: tokio::sync::watch::Receiver<Reading>,
    mut decoder: ResultDecoder,
    schema: SchemaRef,
) -> impl Stream<Item = Result<RecordBatch, JoinError>> + Send + 'static {
    let with_basis = decoder.decodes_basis();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Fetched, JoinError>>(FETCH_AHEAD);
    let fetch = async move {
        let fetched = fetch_stored(&spill, &ledger, with_basis, reading, &tx).await;
        if let Err(e) = fetched {
            let _ = tx.send(Err(e)).await;
        }
    };
    async_stream::try_stream! {
        // Aborted when the stream is dropped: a fetch waiting for results would not notice.
        let fetching = AbortOnDrop(tokio::spawn(fetch));
        while let Some(fetched) = rx.recv().await {
            let (batch, keys, stored) = fetched?;
            let mut cols = batch.columns()[..key_column(&batch)].to_vec();
            cols.extend(decode_stored(&mut decoder, &keys, stored, with_basis).map_err(|e| *e)?);
            yield RecordBatch::try_new(schema.clone(), cols)?;
        }
        drop(fetching);
    }
}

/// The decoder's columns for one slice of stored results (`None`: no result), each read
/// with its output's content as the text it is stored as (the results are dropped here, not
/// kept while the batch is used); if any is not of the usual shape,
/// the whole slice is read as [`TaskRunEvent`]s instead, which names what is wrong with a
/// result that cannot be read at all.
fn decode_stored(
    decoder: &mut ResultDecoder,
    keys: &[String],
    stored: Vec<Option<String>>,
    with_basis: bool,
) -> Result<Vec<arrow::array::ArrayRef>, Box<JoinError>> {
    let lean: Option<Vec<Option<RowEvent<'_>>>> = stored
        .iter()
        .map(|json| match json {
            Some(j) => read_row_event(j, with_basis).map(Some),
            None => Some(None),
        })
        .collect();
    if let Some(rows) = lean {
        let rows: Vec<Option<&RowEvent<'_>>> = rows.iter().map(Option::as_ref).collect();
        return decoder.decode(&rows).map_err(|e| Box::new(e.into()));
    }
    let mut events = Vec::with_capacity(stored.len());
    for (key, json) in keys.iter().zip(stored) {
        events.push(match json {
            Some(j) => Some(decode_run_row(&j, with_basis).map_err(|e| {
                Box::new(JoinError::Stored {
                    key: key.clone(),
                    message: e.to_string(),
                })
            })?),
            None => None,
        });
    }
    let rows: Vec<Option<&TaskRunEvent>> = events.iter().map(Option::as_ref).collect();
    decoder.decode(&rows).map_err(|e| Box::new(e.into()))
}

/// Whether every result is stored (`reading` is done); the error once storing failed.
fn reading_done(reading: &tokio::sync::watch::Receiver<Reading>) -> Result<bool, ReadError> {
    match &*reading.borrow() {
        Reading::Going => Ok(false),
        Reading::Done => Ok(true),
        Reading::Failed(e) => Err(e.clone()),
    }
}

/// Waits for `reading` to end: its error if it failed, `None` if it ended without a word.
pub async fn reading_ended(
    reading: &mut tokio::sync::watch::Receiver<Reading>,
) -> Result<(), Option<ReadError>> {
    while !reading_done(reading).map_err(Some)? {
        reading.changed().await.map_err(|_| None)?;
    }
    Ok(())
}

/// Sends the spill's rows a slice at a time, each with its keys and stored results (their
/// basis only when `basis` is set), until the spill ends or the receiver is gone; then
/// waits for `reading` to end.
async fn fetch_stored(
    spill: &Spill,
    ledger: &TaskLedger,
    basis: bool,
    mut reading: tokio::sync::watch::Receiver<Reading>,
    tx: &tokio::sync::mpsc::Sender<Result<Fetched, JoinError>>,
) -> Result<(), JoinError> {
    let mut stored_changes = ledger.stored_changes();
    let mut reader = spill.reader()?;
    loop {
        let spilled = match reader.next_batch().await {
            Ok(Some(b)) => b,
            Ok(None) => break,
            // The submission writing the spill stopped: its error ends the reading too.
            Err(e @ SpillError::Abandoned { .. }) => {
                return Err(match reading_ended(&mut reading).await {
                    Err(Some(failed)) => JoinError::Reading(failed),
                    _ => e.into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        for offset in (0..spilled.num_rows()).step_by(JOIN_ROWS) {
            let batch = spilled.slice(offset, JOIN_ROWS.min(spilled.num_rows() - offset));
            let keys: Vec<String> = batch
                .column(key_column(&batch))
                .as_string::<i32>()
                .iter()
                .map(|k| k.unwrap_or_default().to_string())
                .collect();
            let rows: Vec<Option<i64>> = batch
                .column(key_column(&batch) + 1)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .collect();
            // Row `i`'s key and ledger row, as `results_by_row` takes them.
            let lookup = |i: usize| (keys[i].clone(), rows[i]);
            stored_changes.mark_unchanged();
            let mut ended = reading_done(&reading).map_err(JoinError::Reading)?;
            let mut stored = ledger
                .results_by_row((0..keys.len()).map(lookup).collect(), basis)
                .await?;
            // Until every result is stored, the missing ones are looked up again after each
            // change: a store or the end of reading after `mark_unchanged` wakes this.
            while !ended && stored.iter().any(Option::is_none) {
                tokio::select! {
                    _ = stored_changes.changed() => {}
                    changed = reading.changed() => changed.map_err(|_| JoinError::ReadingLost)?,
                }
                stored_changes.mark_unchanged();
                ended = reading_done(&reading).map_err(JoinError::Reading)?;
                let missing: Vec<usize> =
                    (0..keys.len()).filter(|&i| stored[i].is_none()).collect();
                let found = ledger
                    .results_by_row(missing.iter().map(|&i| lookup(i)).collect(), basis)
                    .await?;
                for (i, r) in missing.into_iter().zip(found) {
                    stored[i] = r;
                }
            }
            if tx.send(Ok((batch, keys, stored))).await.is_err() {
                return Ok(());
            }
        }
    }
    // Every row is out, but reading may still be going (runs no row here needs, an error
    // still to come): the stream ends with it.
    reading_ended(&mut reading)
        .await
        .map_err(|e| e.map_or(JoinError::ReadingLost, JoinError::Reading))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use crate::results::OutputSchema;
    use crate::sink::input_key;
    use crate::sink::spill::SpillWriter;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use serde_json::json;

    fn run(key: &str, status: &str, n: i64) -> TaskRunEvent {
        serde_json::from_value(json!({
            "event_id": "e1",
            "run": {"run_id": format!("trun_{key}_{status}"), "status": status, "is_active": false,
                    "metadata": {ROW_KEY: key},
                    "error": if status == "failed" { json!({"ref_id": "r", "message": "no luck"}) } else { json!(null) }},
            "output": if status == "completed" {
                json!({"type": "json", "content": {"n": n}, "basis": []})
            } else { json!(null) }
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_read_until_active_stores_the_ended_prefix_and_says_where_it_stopped() {
        let ledger = Ledger::temporary().unwrap();
        let task = ledger.task("t", "fp").await.unwrap();
        let keys: Vec<String> = (0..4).map(|i| input_key(&[i])).collect();
        task.claim(keys.clone()).await.unwrap();
        let raw = |i: usize, status: &str| {
            let mut ev = run(&keys[i], status, i as i64);
            ev.event_id = Some(format!("e{i}"));
            Ok(RawRun::from_data(serde_json::to_string(&ev).unwrap()).unwrap())
        };
        let runs = || {
            futures::stream::iter(vec![
                raw(0, "completed"),
                raw(1, "failed"),
                raw(2, "running"),
                raw(3, "completed"),
            ])
            .boxed()
        };
        let read = store_results(runs(), "tgrp_x", &task, Until::Active)
            .await
            .unwrap();
        assert_eq!(
            read,
            RunsRead {
                stored: 2,
                passed: 2,
                cursor: Some("e1".into()),
            }
        );
        let stored = task.results(keys.clone()).await.unwrap();
        assert_eq!(
            stored.iter().map(Option::is_some).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        // Read to the end, the active run is skipped and the ones after it are stored.
        let read = store_results(runs(), "tgrp_x", &task, Until::End)
            .await
            .unwrap();
        assert_eq!((read.stored, read.passed, read.cursor), (3, 0, None));
        assert!(task.results(keys).await.unwrap()[3].is_some());
    }

    #[tokio::test]
    async fn a_read_of_many_slices_stores_every_run_in_the_order_read() {
        let ledger = Ledger::temporary().unwrap();
        let task = ledger.task("t", "fp").await.unwrap();
        let n = 2 * STORE_ROWS + 1;
        let keys: Vec<String> = (0..n).map(|i| input_key(&i.to_le_bytes())).collect();
        task.claim(keys.clone()).await.unwrap();
        // Key 0 completes twice, in the first slice and in the last: the first result
        // stays, as it would if the slices were stored one after the other. Key 1 fails in
        // the first slice and completes in the second.
        let mut runs: Vec<TaskRunEvent> = (0..n)
            .map(|i| {
                run(
                    &keys[i],
                    if i == 1 { "failed" } else { "completed" },
                    i as i64,
                )
            })
            .collect();
        runs.insert(STORE_ROWS + 5, run(&keys[1], "completed", 1000001));
        runs.push(run(&keys[0], "completed", 1000000));
        let raw = runs
            .iter()
            .map(|ev| Ok(RawRun::from_data(serde_json::to_string(ev).unwrap()).unwrap()));
        let read = store_results(
            futures::stream::iter(raw.collect::<Vec<_>>()).boxed(),
            "tgrp_x",
            &task,
            Until::End,
        )
        .await
        .unwrap();
        assert_eq!(read.stored, n as u64 + 2);
        let stored = task.results(keys.clone()).await.unwrap();
        let n_of = |json: &str| {
            let ev = decode_run_row(json, false).unwrap();
            match ev.output {
                Some(crate::api::TaskRunOutput::Json { content, .. }) => content["n"].as_i64(),
                _ => None,
            }
        };
        let found: Vec<Option<i64>> = stored.iter().map(|r| r.as_deref().and_then(n_of)).collect();
        assert_eq!((found[0], found[1]), (Some(0), Some(1000001)));
        let others: Vec<usize> = (2..n).filter(|&i| found[i] != Some(i as i64)).collect();
        assert!(others.is_empty(), "keys stored wrong: {others:?}");
    }

    #[tokio::test]
    async fn rows_meet_their_stored_results_and_duplicates_share_one() {
        let ledger = Ledger::temporary().unwrap();
        let task = ledger.task("t", "fp").await.unwrap();
        let schema = Schema::new(vec![Field::new(
            "id",
            arrow::datatypes::DataType::Int64,
            false,
        )]);
        // Rows 0..5; rows 1 and 4 have the same input, row 3 never gets a run.
        let key = |i: i64| input_key(format!("{}", if i == 4 { 1 } else { i }).as_bytes());
        let mut w = SpillWriter::create(None, &schema).unwrap();
        for ids in [vec![0i64, 1, 2], vec![3, 4]] {
            let keys = ids.iter().map(|i| key(*i)).collect();
            let batch = RecordBatch::try_new(
                Arc::new(schema.clone()),
                vec![Arc::new(Int64Array::from(ids)) as ArrayRef],
            )
            .unwrap();
            w.write(&batch, keys).unwrap();
        }
        let spill = w.finish().unwrap();
        let claims = task.claim((0..5).map(key).collect()).await.unwrap();
        assert_eq!(
            claims
                .iter()
                .filter(|c| **c == crate::ledger::Claim::Submit)
                .count(),
            4
        );
        // Out of order, a failed-then-completed double submission, a run still running.
        let runs: Vec<Result<TaskRunEvent, ClientError>> = vec![
            Ok(run(&key(2), "completed", 20)),
            Ok(run(&key(1), "failed", 0)),
            Ok(run(&key(0), "completed", 0)),
            Ok(run(&key(1), "completed", 10)),
            Ok(run(&key(3), "running", 0)),
        ];
        let runs = runs
            .into_iter()
            .map(|r| r.map(|ev| RawRun::from_data(serde_json::to_string(&ev).unwrap()).unwrap()));
        let read = store_results(
            futures::stream::iter(runs).boxed(),
            "tgrp_x",
            &task,
            Until::End,
        )
        .await
        .unwrap();
        assert_eq!(read.stored, 4);
        let output = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            "output",
        )
        .unwrap();
        let decoder = ResultDecoder::new(output);
        let mut fields = vec![Field::new("id", arrow::datatypes::DataType::Int64, false)];
        fields.extend(decoder.fields());
        let out_schema = Arc::new(Schema::new(fields));
        let batches: Vec<RecordBatch> = join_results(
            spill,
            task,
            tokio::sync::watch::channel(Reading::Done).1,
            decoder,
            out_schema,
        )
        .map(|b| b.unwrap())
        .collect()
        .await;
        let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        let ids: Vec<i64> = all
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .values()
            .to_vec();
        let n: Vec<Option<i64>> = all
            .column(1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .iter()
            .collect();
        let run_ids: Vec<Option<&str>> = all.column(2).as_string::<i32>().iter().collect();
        let status: Vec<Option<&str>> = all.column(3).as_string::<i32>().iter().collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        assert_eq!(n, vec![Some(0), Some(10), Some(20), None, Some(10)]);
        let k1 = format!("trun_{}_completed", key(1));
        assert_eq!(run_ids[1], Some(k1.as_str()));
        assert_eq!(run_ids[4], Some(k1.as_str()));
        assert_eq!(status[3], Some("missing"));
    }
}
