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
use serde_json::value::RawValue;

use super::schema::{EnumRule, OutputSchema};
use crate::api::{ErrorObject, FieldBasis, RunStatus, TaskRunEvent, TaskRunOutput};
use crate::client::{RowEvent, RowOutput};

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

/// What [`ResultDecoder::decode`] reads of a run: a run as the API sends it
/// ([`TaskRunEvent`]), or as the join reads it from the ledger ([`RowEvent`]).
pub trait ResultRow {
    fn run_id(&self) -> &str;
    fn status(&self) -> &RunStatus;
    fn error(&self) -> Option<&ErrorObject>;
    /// The output's content; `None` without an output.
    fn content(&self) -> Option<Content<'_>>;
    /// The output's basis; `None` without an output.
    fn basis(&self) -> Option<&[FieldBasis]>;
}

/// An output's content: a JSON value, as a tree or as the text it came in, or text.
#[derive(Clone, Copy, Debug)]
pub enum Content<'a> {
    Tree(&'a Value),
    Json(&'a RawValue),
    Text(&'a str),
}

impl ResultRow for TaskRunEvent {
    fn run_id(&self) -> &str {
        &self.run.run_id
    }
    fn status(&self) -> &RunStatus {
        &self.run.status
    }
    fn error(&self) -> Option<&ErrorObject> {
        self.run.error.as_ref()
    }
    fn content(&self) -> Option<Content<'_>> {
        self.output.as_ref().map(|o| match o {
            TaskRunOutput::Json { content, .. } => Content::Tree(content),
            TaskRunOutput::Text { content, .. } => Content::Text(content),
        })
    }
    fn basis(&self) -> Option<&[FieldBasis]> {
        self.output.as_ref().map(TaskRunOutput::basis)
    }
}

impl ResultRow for RowEvent<'_> {
    fn run_id(&self) -> &str {
        &self.run_id
    }
    fn status(&self) -> &RunStatus {
        &self.status
    }
    fn error(&self) -> Option<&ErrorObject> {
        self.error.as_ref()
    }
    fn content(&self) -> Option<Content<'_>> {
        self.output.as_ref().map(|o| match o {
            RowOutput::Json { content, .. } => Content::Json(content),
            RowOutput::Text { content, .. } => Content::Text(content),
        })
    }
    fn basis(&self) -> Option<&[FieldBasis]> {
        self.output.as_ref().map(|o| match o {
            RowOutput::Json { basis, .. } | RowOutput::Text { basis, .. } => basis.as_slice(),
        })
    }
}

/// Turns runs into the result columns: one per output property, then [`run_fields`].
pub struct ResultDecoder {
    output: OutputSchema,
    output_columns: Fields,
    basis_schema: SchemaRef,
    /// False: the `basis` column is all nulls (nobody reads it), and is not decoded.
    with_basis: bool,
    /// JSON outputs as text, gathered for the Arrow decoder; kept from one call to the next.
    text: Vec<u8>,
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
            text: Vec::new(),
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
    pub fn decode<R: ResultRow>(
        &mut self,
        runs: &[Option<&R>],
    ) -> Result<Vec<ArrayRef>, ArrowError> {
        let n = runs.len();
        let mut status: Vec<Option<String>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
        let mut run_ids = StringBuilder::with_capacity(n, n * 40);
        // Rows whose output should be decoded, by position.
        let mut candidates: Vec<(usize, Content<'_>)> = Vec::with_capacity(n);
        for (i, run) in runs.iter().enumerate() {
            let Some(ev) = run else {
                run_ids.append_null();
                status.push(Some(STATUS_MISSING.into()));
                errors.push(Some("the group holds no run for this row".into()));
                continue;
            };
            run_ids.append_value(ev.run_id());
            match (ev.status(), ev.content()) {
                (RunStatus::Completed, Some(content)) => {
                    status.push(Some(ev.status().to_string()));
                    errors.push(None);
                    candidates.push((i, content));
                }
                (RunStatus::Completed, None) => {
                    status.push(Some(STATUS_INVALID_OUTPUT.into()));
                    errors.push(Some("the completed run has no output".into()));
                }
                (RunStatus::Failed, _) => {
                    status.push(Some(ev.status().to_string()));
                    errors.push(Some(run_error_text(ev.error())));
                }
                (other, _) => {
                    status.push(Some(other.to_string()));
                    errors.push(ev.error().map(|e| e.message.clone()));
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
        &mut self,
        n: usize,
        candidates: &[(usize, Content<'_>)],
        status: &mut [Option<String>],
        errors: &mut [Option<String>],
    ) -> Result<(Vec<ArrayRef>, Vec<bool>), ArrowError> {
        let mut has_output = vec![false; n];
        match &self.output {
            OutputSchema::Text => {
                let mut b = StringBuilder::with_capacity(n, 64 * candidates.len());
                let mut texts: Vec<Option<String>> = vec![None; n];
                for (i, content) in candidates {
                    texts[*i] = Some(match content {
                        Content::Text(t) => t.to_string(),
                        Content::Tree(v) => v.to_string(),
                        // As a tree writes it, whatever spacing the text had.
                        Content::Json(raw) => serde_json::from_str::<Value>(raw.get())
                            .map_or_else(|_| raw.get().to_string(), |v| v.to_string()),
                    });
                    has_output[*i] = true;
                }
                for t in texts {
                    b.append_option(t);
                }
                Ok((vec![Arc::new(b.finish())], has_output))
            }
            OutputSchema::Json { decode, enums } => {
                let mut rows: Vec<(usize, Content<'_>)> = Vec::with_capacity(candidates.len());
                for (i, content) in candidates {
                    let violation = match content {
                        Content::Text(_) => {
                            status[*i] = Some(STATUS_INVALID_OUTPUT.into());
                            errors[*i] = Some("expected a JSON output, got text".into());
                            continue;
                        }
                        Content::Tree(v) => enum_violation(enums, v),
                        // Parsed into a tree only when there are enum rules to check.
                        Content::Json(_) if enums.is_empty() => None,
                        Content::Json(raw) => match serde_json::from_str::<Value>(raw.get()) {
                            Ok(v) => enum_violation(enums, &v),
                            Err(e) => Some(e.to_string()),
                        },
                    };
                    match violation {
                        None => rows.push((*i, *content)),
                        Some(e) => {
                            status[*i] = Some(STATUS_INVALID_OUTPUT.into());
                            errors[*i] = Some(format!("output does not fit the schema: {e}"));
                        }
                    }
                }
                let (batch, positions) =
                    decode_tolerant(decode, &rows, status, errors, &mut self.text)?;
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

    fn decode_basis<R: ResultRow>(
        &self,
        runs: &[Option<&R>],
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
                    (Some(ev), true) => ev.basis(),
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
fn run_error_text(error: Option<&ErrorObject>) -> String {
    match error {
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

/// Decodes `rows` (JSON contents) in one pass; if any row does not fit, decodes row by row,
/// marks the rows that fail as invalid, and keeps the rest. Returns the batch and each batch
/// row's position.
fn decode_tolerant(
    schema: &SchemaRef,
    rows: &[(usize, Content<'_>)],
    status: &mut [Option<String>],
    errors: &mut [Option<String>],
    text: &mut Vec<u8>,
) -> Result<(RecordBatch, Vec<usize>), ArrowError> {
    let mut d = decoder(schema, rows.len())?;
    let whole = feed(&mut d, rows, text).and_then(|_| d.flush());
    if let Ok(batch) = whole {
        let batch = batch.unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
        return Ok((batch, rows.iter().map(|r| r.0).collect()));
    }
    let mut batches = Vec::new();
    let mut positions = Vec::new();
    for row in rows {
        // A failed decode leaves the decoder's buffer dirty: a fresh one per row.
        let mut d = decoder(schema, 1)?;
        match feed(&mut d, std::slice::from_ref(row), text).and_then(|_| d.flush()) {
            Ok(Some(b)) => {
                batches.push(b);
                positions.push(row.0);
            }
            Ok(None) => {}
            Err(e) => {
                status[row.0] = Some(STATUS_INVALID_OUTPUT.into());
                errors[row.0] = Some(format!("output does not fit the schema: {e}"));
            }
        }
    }
    Ok((concat_batches(schema, &batches)?, positions))
}

/// Hands `rows` to `d` in order: trees through `serialize`, JSON text through `decode`,
/// consecutive rows of one kind in one call (`text` gathers the text, and is left empty).
fn feed(
    d: &mut Decoder,
    rows: &[(usize, Content<'_>)],
    text: &mut Vec<u8>,
) -> Result<(), ArrowError> {
    text.clear();
    let mut trees: Vec<&Value> = Vec::new();
    for (_, content) in rows {
        match content {
            Content::Tree(v) => {
                decode_all(d, text)?;
                trees.push(v);
            }
            Content::Json(raw) => {
                if !trees.is_empty() {
                    d.serialize(&trees)?;
                    trees.clear();
                }
                text.extend_from_slice(raw.get().as_bytes());
                text.push(b'\n');
            }
            Content::Text(_) => {
                return Err(ArrowError::JsonError(
                    "expected a JSON output, got text".into(),
                ));
            }
        }
    }
    if !trees.is_empty() {
        d.serialize(&trees)?;
    }
    decode_all(d, text)
}

/// Has `d` read the JSON values in `text`, then empties it.
fn decode_all(d: &mut Decoder, text: &mut Vec<u8>) -> Result<(), ArrowError> {
    if text.is_empty() {
        return Ok(());
    }
    let read = d.decode(text)?;
    // The decoder stops once it holds as many rows as it was sized for, before the
    // separator after the last.
    if !text[read..].iter().all(u8::is_ascii_whitespace) {
        return Err(ArrowError::JsonError(
            "more outputs than the decoder was sized for".into(),
        ));
    }
    text.clear();
    Ok(())
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
    fn runs_read_with_their_content_as_text_decode_as_their_trees_do() {
        let schema = json!({"type": "object", "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "tier": {"enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "day": {"type": "string", "format": "date"}
        }, "required": ["n"]});
        let run = |id: &str, status: &str| {
            json!({"run_id": id, "status": status, "is_active": false, "metadata": {"k": 1},
                   "error": if status == "failed" { json!({"ref_id": "r", "message": "boom"}) }
                            else { json!(null) }})
        };
        let with = |id: &str, output: Value| json!({"run": run(id, "completed"), "output": output});
        let basis = json!([{"field": "n", "reasoning": "r", "confidence": "high",
                            "citations": [{"url": "https://a", "title": "t", "excerpts": ["x"]}]}]);
        let events: Vec<String> = vec![
            with(
                "trun_1",
                json!({"type": "json", "basis": basis,
                "content": {"n": 1, "x": 2.5, "tags": ["é", "😀", "a\"b"], "day": "2024-02-29"}}),
            ),
            with(
                "trun_2",
                json!({"type": "json", "basis": [], "content": {"n": "many"}}),
            ),
            with(
                "trun_3",
                json!({"type": "json", "basis": [], "content": {"tags": []}}),
            ),
            with(
                "trun_4",
                json!({"type": "json", "basis": [], "content": {"n": 5, "tier": "c"}}),
            ),
            with(
                "trun_5",
                json!({"type": "json", "basis": [], "content": {"n": 6, "tier": "b"}}),
            ),
            with(
                "trun_6",
                json!({"type": "json", "basis": [], "content": {"n": 1.0, "x": 1e2}}),
            ),
            with(
                "trun_7",
                json!({"type": "json", "basis": [], "content": [1, 2]}),
            ),
            with(
                "trun_8",
                json!({"type": "text", "basis": basis, "content": "plain words"}),
            ),
            json!({"run": run("trun_9", "failed")}),
            json!({"run": run("trun_10", "completed")}),
        ]
        .into_iter()
        .map(|v| v.to_string())
        // Spacing that a tree would not keep.
        .chain([
            r#"{"run": {"run_id": "trun_11", "status": "completed", "is_active": false},
                  "output": {"type": "json", "basis": [], "content": { "n" : 7 , "x" : 1e2 ,
                  "tags" : [ "p" , "q\u00e9" ] } }}"#
                .to_string(),
        ])
        .collect();
        for output in [
            OutputSchema::from_task_output(&schema, "output").unwrap(),
            OutputSchema::Text,
        ] {
            for basis in [true, false] {
                let as_text: Vec<_> = events
                    .iter()
                    .map(|e| crate::client::read_row_event(e, basis).expect("the usual shape"))
                    .collect();
                let as_trees: Vec<TaskRunEvent> = events
                    .iter()
                    .map(|e| crate::client::decode_run_row(e, basis).unwrap())
                    .collect();
                let mut rows_text: Vec<Option<&RowEvent<'_>>> = as_text.iter().map(Some).collect();
                let mut rows_trees: Vec<Option<&TaskRunEvent>> =
                    as_trees.iter().map(Some).collect();
                rows_text.insert(3, None);
                rows_trees.insert(3, None);
                let mut dec = ResultDecoder::new(output.clone()).with_basis(basis);
                let text = dec.decode(&rows_text).unwrap();
                let trees = dec.decode(&rows_trees).unwrap();
                let schema = Arc::new(Schema::new(dec.fields()));
                let show = |cols| {
                    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
                    pretty_format_batches(&[batch]).unwrap().to_string()
                };
                let (text, trees) = (show(text), show(trees));
                assert_eq!(text, trees);
                assert!(text.contains("missing") && text.contains("boom"), "{text}");
            }
        }
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
