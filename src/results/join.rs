//! Spilled source rows + the group's runs → result batches.
//!
//! The spill file holds the source rows in submission order with their row keys; `/runs`
//! returns runs in the order they were added, which is submission order except where POSTs
//! in flight overtook each other. Both are read sequentially: runs that arrive ahead of
//! their rows wait in a small map keyed by row key, so memory stays bounded by that
//! reordering, not by the table. Every spilled row is emitted exactly once; a row whose run
//! never shows up gets `run_status = 'missing'`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use futures::stream::{BoxStream, Stream, StreamExt};

use super::decode::ResultDecoder;
use crate::api::{RunStatus, TaskRunEvent};
use crate::client::{ClientError, ROW_KEY, row_key_value};
use crate::sink::row_key_ordinal;
use crate::sink::spill::{Spill, SpillError};

/// Rows joined (and run outputs held, parsed) at a time: the spill's batches are cut to
/// this size, which bounds the working set of parsed results.
const JOIN_ROWS: usize = 1024;

/// Why reading results stopped.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("reading the runs of group {group_id}: {source}")]
    Client {
        group_id: String,
        #[source]
        source: ClientError,
    },
    #[error("building result rows: {0}")]
    Arrow(#[from] ArrowError),
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

/// Emits one batch per spilled batch: the source columns (without the row key), then the
/// decoder's columns, under `schema`.
pub fn join_results(
    spill: Arc<Spill>,
    group_id: String,
    runs: BoxStream<'static, Result<TaskRunEvent, ClientError>>,
    mut decoder: ResultDecoder,
    schema: SchemaRef,
) -> impl Stream<Item = Result<RecordBatch, JoinError>> + Send + 'static {
    async_stream::try_stream! {
        let mut reader = spill.reader()?;
        let mut runs = runs;
        let mut runs_done = false;
        // Runs read but not yet emitted, by row key.
        let mut pending: HashMap<String, TaskRunEvent> = HashMap::new();
        let mut emitted: u64 = 0;
        while let Some(spilled) = reader.next_batch()? {
            for offset in (0..spilled.num_rows()).step_by(JOIN_ROWS) {
                let batch = spilled.slice(offset, JOIN_ROWS.min(spilled.num_rows() - offset));
                let key_col = batch.num_columns() - 1;
                let keys = batch.column(key_col).as_string::<i32>().clone();
                let mut missing = (0..keys.len())
                    .filter(|i| !pending.contains_key(keys.value(*i)))
                    .count();
                while missing > 0 && !runs_done {
                    let Some(ev) = runs.next().await else {
                        runs_done = true;
                        break;
                    };
                    let ev = ev.map_err(|source| JoinError::Client { group_id: group_id.clone(), source })?;
                    let Some(key) = run_row_key(&ev) else { continue };
                    let ordinal = row_key_ordinal(&key);
                    // A second run for a row already emitted (a double submission) is ignored.
                    if ordinal.is_some_and(|o| o < emitted) {
                        continue;
                    }
                    // Row keys start with their row's position, so the batch row is found directly.
                    let in_batch = ordinal
                        .map(|o| o - emitted)
                        .filter(|i| *i < keys.len() as u64)
                        .is_some_and(|i| keys.value(i as usize) == key);
                    match pending.get(&key) {
                        None => {
                            if in_batch {
                                missing -= 1;
                            }
                            pending.insert(key, ev);
                        }
                        Some(old) if better(&ev, old) => {
                            pending.insert(key, ev);
                        }
                        Some(_) => {}
                    }
                }
                let rows: Vec<Option<&TaskRunEvent>> =
                    (0..keys.len()).map(|i| pending.get(keys.value(i))).collect();
                let mut cols = batch.columns()[..key_col].to_vec();
                cols.extend(decoder.decode(&rows)?);
                let out = RecordBatch::try_new(schema.clone(), cols)?;
                for i in 0..keys.len() {
                    pending.remove(keys.value(i));
                }
                emitted += keys.len() as u64;
                yield out;
            }
        }
    }
}

/// Between two runs of one row, prefer a completed one, then the first seen.
fn better(new: &TaskRunEvent, old: &TaskRunEvent) -> bool {
    new.run.status == RunStatus::Completed && old.run.status != RunStatus::Completed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::OutputSchema;
    use crate::sink::row_key;
    use crate::sink::spill::SpillWriter;
    use arrow::array::{ArrayRef, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use serde_json::json;

    fn run(ordinal: u64, status: &str, n: i64) -> TaskRunEvent {
        serde_json::from_value(json!({
            "run": {"run_id": format!("trun_{ordinal}_{status}"), "status": status, "is_active": false,
                    "metadata": {ROW_KEY: row_key(ordinal, b"x")},
                    "error": if status == "failed" { json!({"ref_id": "r", "message": "no luck"}) } else { json!(null) }},
            "output": if status == "completed" {
                json!({"type": "json", "content": {"n": n}, "basis": []})
            } else { json!(null) }
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn rows_meet_their_runs_whatever_the_run_order() {
        let schema = Schema::new(vec![Field::new(
            "id",
            arrow::datatypes::DataType::Int64,
            false,
        )]);
        let mut w = SpillWriter::create(None, &schema).unwrap();
        for ids in [vec![0, 1, 2], vec![3, 4]] {
            let keys = ids.iter().map(|i| row_key(*i as u64, b"x")).collect();
            let batch = RecordBatch::try_new(
                Arc::new(schema.clone()),
                vec![Arc::new(Int64Array::from(ids)) as ArrayRef],
            )
            .unwrap();
            w.write(&batch, keys).unwrap();
        }
        let spill = Arc::new(w.finish().unwrap());
        // Out of order, a failed-then-completed duplicate, a late duplicate, row 3 missing.
        let runs: Vec<Result<TaskRunEvent, ClientError>> = vec![
            Ok(run(4, "completed", 40)),
            Ok(run(1, "failed", 0)),
            Ok(run(0, "completed", 0)),
            Ok(run(1, "completed", 10)),
            Ok(run(2, "completed", 20)),
            Ok(run(0, "completed", 99)),
        ];
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
            "tgrp_x".into(),
            futures::stream::iter(runs).boxed(),
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
        assert_eq!(n, vec![Some(0), Some(10), Some(20), None, Some(40)]);
        assert_eq!(
            run_ids,
            vec![
                Some("trun_0_completed"),
                Some("trun_1_completed"),
                Some("trun_2_completed"),
                None,
                Some("trun_4_completed")
            ]
        );
        assert_eq!(status[3], Some("missing"));
    }
}
