//! Run results → typed Arrow columns, with arrow-json's decoder.
//!
//! Every run becomes exactly one row. A failed run, a run missing from the group, and an
//! output that does not fit the schema all become rows with `run_status`/`run_error` set
//! and null output columns: nothing is dropped and nothing panics.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::json::ReaderBuilder;
use arrow::json::reader::Decoder;
use serde::Serialize;
use serde_json::Value;

use super::schema::{EnumRule, OutputSchema};
use crate::api::{FieldBasis, RunStatus, TaskRunEvent, TaskRunOutput};

/// `run_status` of a completed run whose output does not fit the output schema.
pub const STATUS_INVALID_OUTPUT: &str = "invalid_output";
/// `run_status` of a source row for which the group holds no run.
pub const STATUS_MISSING: &str = "missing";

/// The columns every result row ends with, after the output columns.
pub const RUN_ID: &str = "run_id";
pub const RUN_STATUS: &str = "run_status";
pub const RUN_ERROR: &str = "run_error";
pub const BASIS: &str = "basis";

/// `List<Struct{url, title, excerpts List<Utf8>}>`.
pub fn citations_type() -> DataType {
    let citation = Fields::from(vec![
        Field::new("url", DataType::Utf8, true),
        Field::new("title", DataType::Utf8, true),
        Field::new(
            "excerpts",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]);
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(citation),
        true,
    )))
}

/// The `basis` column: `List<Struct{field, reasoning, confidence, citations}>`.
pub fn basis_type() -> DataType {
    let entry = Fields::from(vec![
        Field::new("field", DataType::Utf8, true),
        Field::new("reasoning", DataType::Utf8, true),
        Field::new("confidence", DataType::Utf8, true),
        Field::new("citations", citations_type(), true),
    ]);
    DataType::List(Arc::new(Field::new("item", DataType::Struct(entry), true)))
}

/// `run_id`, `run_status`, `run_error`, `basis`.
pub fn run_fields() -> Vec<Field> {
    vec![
        Field::new(RUN_ID, DataType::Utf8, true),
        Field::new(RUN_STATUS, DataType::Utf8, true),
        Field::new(RUN_ERROR, DataType::Utf8, true),
        Field::new(BASIS, basis_type(), true),
    ]
}

/// Turns runs into the result columns: one per output property, then [`run_fields`].
pub struct ResultDecoder {
    output: OutputSchema,
    output_columns: Fields,
    basis_schema: SchemaRef,
    /// False: the `basis` column is all nulls (nobody reads it), and is not decoded.
    with_basis: bool,
}

impl std::fmt::Debug for ResultDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultDecoder")
            .field("output_columns", &self.output_columns)
            .finish()
    }
}

#[derive(Serialize)]
struct BasisRow<'a> {
    basis: Option<&'a [FieldBasis]>,
}

impl ResultDecoder {
    /// A decoder for results of a task with this output.
    pub fn new(output: OutputSchema) -> Self {
        let output_columns = output.columns();
        let basis_schema = Arc::new(Schema::new(vec![Field::new(BASIS, basis_type(), true)]));
        ResultDecoder {
            output,
            output_columns,
            basis_schema,
            with_basis: true,
        }
    }

    /// The same decoder, decoding the `basis` column or (false) leaving it all nulls, for
    /// readers that do not select it: the basis is most of a result's bytes, and decoding it
    /// most of the work.
    pub fn with_basis(mut self, with_basis: bool) -> Self {
        self.with_basis = with_basis;
        self
    }

    /// Whether the `basis` column is decoded.
    pub fn decodes_basis(&self) -> bool {
        self.with_basis
    }

    /// The fields of the columns [`Self::decode`] returns.
    pub fn fields(&self) -> Vec<Field> {
        let mut fields: Vec<Field> = self
            .output_columns
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(run_fields());
        fields
    }

    /// One row per entry of `runs`, in order; `None` is a row with no run in the group.
    pub fn decode(&mut self, runs: &[Option<&TaskRunEvent>]) -> Result<Vec<ArrayRef>, ArrowError> {
        let n = runs.len();
        let mut status: Vec<Option<String>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
        let mut run_ids = StringBuilder::with_capacity(n, n * 40);
        // Rows whose output should be decoded, by position.
        let mut candidates: Vec<(usize, &TaskRunOutput)> = Vec::with_capacity(n);
        for (i, run) in runs.iter().enumerate() {
            let Some(ev) = run else {
                run_ids.append_null();
                status.push(Some(STATUS_MISSING.into()));
                errors.push(Some("the group holds no run for this row".into()));
                continue;
            };
            run_ids.append_value(&ev.run.run_id);
            match (&ev.run.status, &ev.output) {
                (RunStatus::Completed, Some(out)) => {
                    status.push(Some(ev.run.status.to_string()));
                    errors.push(None);
                    candidates.push((i, out));
                }
                (RunStatus::Completed, None) => {
                    status.push(Some(STATUS_INVALID_OUTPUT.into()));
                    errors.push(Some("the completed run has no output".into()));
                }
                (RunStatus::Failed, _) => {
                    status.push(Some(ev.run.status.to_string()));
                    errors.push(Some(run_error_text(ev)));
                }
                (other, _) => {
                    status.push(Some(other.to_string()));
                    errors.push(ev.run.error.as_ref().map(|e| e.message.clone()));
                }
            }
        }

        let (output_columns, decoded_rows) =
            self.decode_outputs(n, &candidates, &mut status, &mut errors)?;
        let basis = self.decode_basis(runs, &decoded_rows)?;

        let mut cols = output_columns;
        cols.push(Arc::new(run_ids.finish()));
        cols.push(Arc::new(arrow::array::StringArray::from(status)));
        cols.push(Arc::new(arrow::array::StringArray::from(errors)));
        cols.push(basis);
        Ok(cols)
    }

    /// Output columns for `n` rows, and which rows got an output.
    fn decode_outputs(
        &self,
        n: usize,
        candidates: &[(usize, &TaskRunOutput)],
        status: &mut [Option<String>],
        errors: &mut [Option<String>],
    ) -> Result<(Vec<ArrayRef>, Vec<bool>), ArrowError> {
        let mut has_output = vec![false; n];
        match &self.output {
            OutputSchema::Text => {
                let mut b = StringBuilder::with_capacity(n, 64 * candidates.len());
                let mut texts: Vec<Option<String>> = vec![None; n];
                for (i, out) in candidates {
                    texts[*i] = Some(match out {
                        TaskRunOutput::Text { content, .. } => content.clone(),
                        TaskRunOutput::Json { content, .. } => content.to_string(),
                    });
                    has_output[*i] = true;
                }
                for t in texts {
                    b.append_option(t);
                }
                Ok((vec![Arc::new(b.finish())], has_output))
            }
            OutputSchema::Json { decode, enums } => {
                let mut rows: Vec<(usize, &Value)> = Vec::with_capacity(candidates.len());
                for (i, out) in candidates {
                    match out {
                        TaskRunOutput::Json { content, .. } => match enum_violation(enums, content)
                        {
                            None => rows.push((*i, content)),
                            Some(e) => {
                                status[*i] = Some(STATUS_INVALID_OUTPUT.into());
                                errors[*i] = Some(format!("output does not fit the schema: {e}"));
                            }
                        },
                        TaskRunOutput::Text { .. } => {
                            status[*i] = Some(STATUS_INVALID_OUTPUT.into());
                            errors[*i] = Some("expected a JSON output, got text".into());
                        }
                    }
                }
                let (batch, positions) = decode_tolerant(decode, &rows, status, errors)?;
                // Scatter the decoded rows back to their positions; other rows get nulls.
                let mut index: Vec<Option<u32>> = vec![None; n];
                for (k, pos) in positions.iter().enumerate() {
                    index[*pos] = Some(k as u32);
                    has_output[*pos] = true;
                }
                let index = UInt32Array::from(index);
                let cols = batch
                    .columns()
                    .iter()
                    .map(|c| take(c.as_ref(), &index, None))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((cols, has_output))
            }
        }
    }

    fn decode_basis(
        &self,
        runs: &[Option<&TaskRunEvent>],
        has_output: &[bool],
    ) -> Result<ArrayRef, ArrowError> {
        if !self.with_basis {
            return Ok(arrow::array::new_null_array(&basis_type(), runs.len()));
        }
        let rows: Vec<BasisRow> = runs
            .iter()
            .zip(has_output)
            .map(|(r, ok)| BasisRow {
                basis: match (r, ok) {
                    (Some(ev), true) => ev.output.as_ref().map(TaskRunOutput::basis),
                    _ => None,
                },
            })
            .collect();
        let mut d = decoder(&self.basis_schema, rows.len())?;
        d.serialize(&rows)?;
        match d.flush()? {
            Some(b) => Ok(b.column(0).clone()),
            None => Ok(arrow::array::new_null_array(&basis_type(), 0)),
        }
    }
}

/// The first enum rule `content` breaks, as a message.
fn enum_violation(rules: &[EnumRule], content: &Value) -> Option<String> {
    rules.iter().find_map(|rule| {
        let mut v = content;
        for key in &rule.path {
            v = v.get(key)?;
        }
        let s = v.as_str()?;
        (!rule.allowed.iter().any(|a| a == s)).then(|| {
            format!(
                "`{}` is {s:?}, not one of {:?}",
                rule.path.join("."),
                rule.allowed
            )
        })
    })
}

/// The text of a failed run's `run_error`.
fn run_error_text(ev: &TaskRunEvent) -> String {
    match &ev.run.error {
        Some(e) if !e.message.is_empty() => e.message.clone(),
        _ => "the run failed without an error message".into(),
    }
}

/// A decoder sized for `rows` rows (it preallocates for its batch size).
fn decoder(schema: &SchemaRef, rows: usize) -> Result<Decoder, ArrowError> {
    ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.max(1))
        .build_decoder()
}

/// Decodes `rows` in one pass; if any row does not fit, decodes row by row, marks the rows
/// that fail as invalid, and keeps the rest. Returns the batch and each batch row's position.
fn decode_tolerant(
    schema: &SchemaRef,
    rows: &[(usize, &Value)],
    status: &mut [Option<String>],
    errors: &mut [Option<String>],
) -> Result<(RecordBatch, Vec<usize>), ArrowError> {
    let values: Vec<&Value> = rows.iter().map(|r| r.1).collect();
    let mut d = decoder(schema, values.len())?;
    let whole = d.serialize(&values).and_then(|_| d.flush());
    if let Ok(batch) = whole {
        let batch = batch.unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
        return Ok((batch, rows.iter().map(|r| r.0).collect()));
    }
    let mut batches = Vec::new();
    let mut positions = Vec::new();
    for (pos, value) in rows {
        // A failed decode leaves the decoder's buffer dirty: a fresh one per row.
        let mut d = decoder(schema, 1)?;
        match d
            .serialize(std::slice::from_ref(value))
            .and_then(|_| d.flush())
        {
            Ok(Some(b)) => {
                batches.push(b);
                positions.push(*pos);
            }
            Ok(None) => {}
            Err(e) => {
                status[*pos] = Some(STATUS_INVALID_OUTPUT.into());
                errors[*pos] = Some(format!("output does not fit the schema: {e}"));
            }
        }
    }
    Ok((concat_batches(schema, &batches)?, positions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::util::pretty::pretty_format_batches;
    use serde_json::json;

    fn event(v: Value) -> TaskRunEvent {
        serde_json::from_value(v).unwrap()
    }

    fn completed(id: &str, content: Value) -> TaskRunEvent {
        event(json!({
            "run": {"run_id": id, "status": "completed", "is_active": false},
            "output": {"type": "json", "content": content, "basis": [
                {"field": "n", "reasoning": "r", "confidence": "high",
                 "citations": [{"url": "https://a", "excerpts": ["x"]}]}
            ]}
        }))
    }

    fn table(dec: &mut ResultDecoder, runs: &[Option<&TaskRunEvent>]) -> String {
        let cols = dec.decode(runs).unwrap();
        let schema = Arc::new(Schema::new(dec.fields()));
        let batch = RecordBatch::try_new(schema, cols).unwrap();
        pretty_format_batches(&[batch]).unwrap().to_string()
    }

    #[test]
    fn bad_rows_become_error_rows_and_good_rows_decode() {
        let output = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {
                "n": {"type": "integer"},
                "tier": {"enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "day": {"type": "string", "format": "date"}
            }, "required": ["n"]}),
            "output",
        )
        .unwrap();
        let mut dec = ResultDecoder::new(output);
        let ok = completed(
            "trun_1",
            json!({"n": 1, "tags": ["é", "😀"], "day": "2024-02-29"}),
        );
        let bad = completed("trun_2", json!({"n": "many"}));
        let missing_required = completed("trun_3", json!({"tags": []}));
        let bad_enum = completed("trun_5", json!({"n": 5, "tier": "c"}));
        let failed = event(json!({
            "run": {"run_id": "trun_4", "status": "failed", "is_active": false,
                    "error": {"ref_id": "x", "message": "boom"}}
        }));
        let t = table(
            &mut dec,
            &[
                Some(&ok),
                Some(&bad),
                None,
                Some(&missing_required),
                Some(&failed),
                Some(&bad_enum),
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[3].contains("| 1 ")
                && lines[3].contains("[é, 😀]")
                && lines[3].contains("2024-02-29"),
            "{t}"
        );
        assert!(
            lines[3].contains("completed") && lines[3].contains("https://a"),
            "{t}"
        );
        assert!(
            lines[4].contains("invalid_output") && lines[4].contains("many"),
            "{t}"
        );
        assert!(lines[5].contains("missing"), "{t}");
        assert!(lines[6].contains("invalid_output"), "{t}");
        assert!(
            lines[7].contains("failed") && lines[7].contains("boom"),
            "{t}"
        );
        assert!(
            lines[8].contains("invalid_output") && lines[8].contains("`tier` is \"c\""),
            "{t}"
        );
    }

    #[test]
    fn text_outputs_fill_the_output_column() {
        let mut dec = ResultDecoder::new(OutputSchema::Text);
        let ev = event(json!({
            "run": {"run_id": "trun_1", "status": "completed", "is_active": false},
            "output": {"type": "text", "content": "hello", "basis": []}
        }));
        let t = table(&mut dec, &[Some(&ev)]);
        assert!(t.contains("| hello "), "{t}");
    }
}
