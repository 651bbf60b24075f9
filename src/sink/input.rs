//! Rows → run inputs: the task's input mapping applied to each row of a record batch, and
//! each row's row key.
//!
//! Column values are written with arrow-json's encoders, so numbers stay numbers, dates and
//! timestamps become ISO strings, lists and structs become JSON, and nulls become `null`
//! (an empty string in templates).

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::error::ArrowError;
use arrow::json::writer::{EncoderOptions, NullableEncoder, make_encoder};
use serde_json::Value;
use serde_json::value::RawValue;

use super::task::{InputMapping, TaskDefinition, TemplatePart, parse_template};
use crate::api::TaskRunInput;
use crate::client::{PreparedMetadata, PreparedRunInput, ROW_KEY};

/// A row that cannot become a run input, or a mapping that does not fit the source.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The mapping names a column the source does not have.
    #[error(
        "input mapping {mapping}: column `{column}` is not in the source (columns: {available})"
    )]
    UnknownColumn {
        mapping: String,
        column: String,
        available: String,
    },
    /// The template does not parse.
    #[error(transparent)]
    Template(#[from] super::task::TemplateError),
    /// A value could not be written as JSON.
    #[error("row {row}: cannot write column values as JSON: {message}")]
    Encode { row: u64, message: String },
    #[error("encoding rows: {0}")]
    Arrow(#[from] ArrowError),
}

/// The mapping with column names resolved to positions in the source schema.
#[derive(Clone, Debug)]
enum Compiled {
    /// (JSON-encoded key followed by `:`, column index).
    Object(Vec<(Vec<u8>, usize)>),
    Template(Vec<Part>),
}

#[derive(Clone, Debug)]
enum Part {
    Literal(String),
    Column(usize),
}

/// Turns record batches of one source schema into run inputs.
#[derive(Clone, Debug)]
pub struct InputEncoder {
    processor: String,
    mapping: Compiled,
    options: EncoderOptions,
}

impl InputEncoder {
    /// Resolves `task`'s input mapping against the source `schema`; an unknown column is an
    /// error naming it and the columns that exist.
    pub fn new(task: &TaskDefinition, schema: &Schema) -> Result<Self, InputError> {
        let index = |column: &str| {
            schema
                .index_of(column)
                .map_err(|_| InputError::UnknownColumn {
                    mapping: task.input.to_string(),
                    column: column.to_string(),
                    available: schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let mapping = match &task.input {
            InputMapping::Columns(m) => Compiled::Object(
                m.iter()
                    .map(|(key, column)| {
                        let mut k = serde_json::to_vec(key).unwrap_or_default();
                        k.push(b':');
                        Ok((k, index(column)?))
                    })
                    .collect::<Result<_, InputError>>()?,
            ),
            InputMapping::Template(t) => Compiled::Template(
                parse_template(t)?
                    .into_iter()
                    .map(|p| match p {
                        TemplatePart::Literal(s) => Ok(Part::Literal(s)),
                        TemplatePart::Column(c) => Ok(Part::Column(index(&c)?)),
                    })
                    .collect::<Result<_, InputError>>()?,
            ),
        };
        Ok(InputEncoder {
            processor: task.processor.clone(),
            mapping,
            options: EncoderOptions::default().with_explicit_nulls(true),
        })
    }

    /// One run input per row of `batch`; row `i` gets the row key of ordinal
    /// `first_ordinal + i` in `metadata[ROW_KEY]`.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        first_ordinal: u64,
    ) -> Result<Vec<TaskRunInput>, InputError> {
        self.encode_keyed(batch, first_ordinal)?
            .into_iter()
            .map(|e| self.input(e))
            .collect()
    }

    /// Each row of `batch` as the JSON of its input with its input key: a few bytes a row,
    /// where a [`TaskRunInput`] holds a parsed tree. [`InputEncoder::input`] makes the run
    /// input of one.
    pub fn encode_keyed(
        &self,
        batch: &RecordBatch,
        first_ordinal: u64,
    ) -> Result<Vec<EncodedInput>, InputError> {
        let schema = batch.schema();
        let fields = schema.fields();
        let mut encoders: Vec<Option<NullableEncoder>> =
            (0..batch.num_columns()).map(|_| None).collect();
        let used: Vec<usize> = match &self.mapping {
            Compiled::Object(pairs) => pairs.iter().map(|p| p.1).collect(),
            Compiled::Template(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Column(c) => Some(*c),
                    Part::Literal(_) => None,
                })
                .collect(),
        };
        for c in used {
            if encoders[c].is_none() {
                encoders[c] = Some(make_encoder(
                    &fields[c],
                    batch.column(c).as_ref(),
                    &self.options,
                )?);
            }
        }
        let mut out = Vec::with_capacity(batch.num_rows());
        let mut buf = Vec::with_capacity(256);
        for row in 0..batch.num_rows() {
            let ordinal = first_ordinal + row as u64;
            let input = match &self.mapping {
                Compiled::Object(pairs) => {
                    buf.clear();
                    buf.push(b'{');
                    for (i, (key, c)) in pairs.iter().enumerate() {
                        if i > 0 {
                            buf.push(b',');
                        }
                        buf.extend_from_slice(key);
                        write_value(encoders[*c].as_mut(), row, &mut buf);
                    }
                    buf.push(b'}');
                    serde_json::from_slice::<Box<RawValue>>(&buf).map_err(|e| {
                        InputError::Encode {
                            row: ordinal,
                            message: e.to_string(),
                        }
                    })?
                }
                Compiled::Template(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match p {
                            Part::Literal(s) => text.push_str(s),
                            Part::Column(c) => {
                                buf.clear();
                                template_value(encoders[*c].as_mut(), row, &mut buf, &mut text)
                                    .map_err(|message| InputError::Encode {
                                        row: ordinal,
                                        message,
                                    })?;
                            }
                        }
                    }
                    buf.clear();
                    buf.extend_from_slice(text.as_bytes());
                    serde_json::value::to_raw_value(&text).map_err(|e| InputError::Encode {
                        row: ordinal,
                        message: e.to_string(),
                    })?
                }
            };
            out.push(EncodedInput {
                input,
                key: input_key(&buf),
                row: ordinal,
            });
        }
        Ok(out)
    }

    /// The run input of an encoded row, its input key in `metadata[ROW_KEY]`.
    pub fn input(&self, encoded: EncodedInput) -> Result<TaskRunInput, InputError> {
        let input = serde_json::from_str(encoded.input.get()).map_err(|e| InputError::Encode {
            row: encoded.row,
            message: e.to_string(),
        })?;
        let mut run = TaskRunInput::new(input, self.processor.clone());
        let mut metadata = serde_json::Map::new();
        metadata.insert(ROW_KEY.to_string(), Value::String(encoded.key));
        run.metadata = Some(metadata);
        Ok(run)
    }

    /// The run input of an encoded row as add-runs sends it, as JSON already, with its input
    /// key and the ledger row of its claim in its metadata.
    pub fn prepared(&self, encoded: EncodedInput, ledger_row: Option<i64>) -> PreparedRunInput {
        PreparedRunInput {
            input: encoded.input,
            processor: self.processor.clone(),
            metadata: PreparedMetadata {
                row_key: encoded.key,
                ledger_row,
            },
        }
    }
}

/// A row encoded by [`InputEncoder::encode_keyed`].
#[derive(Clone, Debug)]
pub struct EncodedInput {
    /// The run's input: an object, or the text of a template.
    input: Box<RawValue>,
    /// The input key (see [`input_key`]).
    pub key: String,
    /// The row's ordinal, for errors.
    row: u64,
}

fn write_value(encoder: Option<&mut NullableEncoder>, row: usize, buf: &mut Vec<u8>) {
    match encoder {
        Some(e) if !e.is_null(row) => e.encode(row, buf),
        _ => buf.extend_from_slice(b"null"),
    }
}

/// A column value in a template: text as it is, null as nothing, anything else as JSON.
fn template_value(
    encoder: Option<&mut NullableEncoder>,
    row: usize,
    buf: &mut Vec<u8>,
    text: &mut String,
) -> Result<(), String> {
    let Some(e) = encoder else { return Ok(()) };
    if e.is_null(row) {
        return Ok(());
    }
    e.encode(row, buf);
    if buf.first() == Some(&b'"') {
        let s: String = serde_json::from_slice(buf).map_err(|e| e.to_string())?;
        text.push_str(&s);
    } else {
        text.push_str(std::str::from_utf8(buf).map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// The input key of a run whose input encodes to `content`: its 128-bit fingerprint. Rows
/// with the same input (within one task) share a key, and so a run; the ledger keys claims
/// and results by it.
pub fn input_key(content: &[u8]) -> String {
    crate::ledger::fingerprint(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, ListArray, StringArray};
    use arrow::datatypes::Int64Type;
    use serde_json::json;
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        let cols: Vec<(&str, ArrayRef)> = vec![
            (
                "name",
                Arc::new(StringArray::from(vec![Some("Zoë \"Z\""), None])),
            ),
            ("n", Arc::new(Int64Array::from(vec![Some(7), None]))),
            ("x", Arc::new(Float64Array::from(vec![1.5, f64::NAN]))),
            ("day", Arc::new(Date32Array::from(vec![Some(19782), None]))),
            (
                "tags",
                Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
                    Some(vec![Some(1), None]),
                    None,
                ])),
            ),
        ];
        RecordBatch::try_from_iter(cols).unwrap()
    }

    fn task(input: Value) -> TaskDefinition {
        serde_json::from_value(json!({"processor": "lite", "input": input, "output": "x"})).unwrap()
    }

    #[test]
    fn object_inputs_keep_types_and_nulls() {
        let b = batch();
        let t = task(json!({"who": "name", "count": "n", "x": "x", "day": "day", "tags": "tags"}));
        let enc = InputEncoder::new(&t, &b.schema()).unwrap();
        let inputs = enc.encode(&b, 10).unwrap();
        assert_eq!(
            inputs[0].input,
            json!({"who": "Zoë \"Z\"", "count": 7, "x": 1.5, "day": "2024-02-29", "tags": [1, null]})
        );
        assert_eq!(
            inputs[1].input,
            json!({"who": null, "count": null, "x": null, "day": null, "tags": null})
        );
        assert_eq!(inputs[0].processor, "lite");
        let key = inputs[1].metadata.as_ref().unwrap()[ROW_KEY]
            .as_str()
            .unwrap();
        assert_eq!(key.len(), 32);
        // Same content, wherever it is: same key; other content: another key.
        let again = enc.encode(&b.slice(1, 1), 0).unwrap();
        assert_eq!(again[0].metadata, inputs[1].metadata);
        assert_ne!(inputs[0].metadata, inputs[1].metadata);
    }

    #[test]
    fn prepared_inputs_send_what_run_inputs_send() {
        let b = batch();
        let mappings = [
            json!({"who": "name", "count": "n", "x": "x", "day": "day", "tags": "tags"}),
            json!("Research {name} ({n}) on {day}"),
        ];
        for mapping in mappings {
            let enc = InputEncoder::new(&task(mapping), &b.schema()).unwrap();
            for encoded in enc.encode_keyed(&b, 0).unwrap() {
                let mut run = enc.input(encoded.clone()).unwrap();
                let metadata = run.metadata.as_mut().unwrap();
                metadata.insert(crate::client::LEDGER_ROW.into(), 7.into());
                let prepared = enc.prepared(encoded, Some(7));
                assert_eq!(
                    serde_json::to_value(&prepared).unwrap(),
                    serde_json::to_value(&run).unwrap()
                );
            }
        }
    }

    #[test]
    fn templates_render_text_and_skip_nulls() {
        let b = batch();
        let t = task(json!("Research {name} ({n}) on {day}, tags {tags}"));
        let inputs = InputEncoder::new(&t, &b.schema())
            .unwrap()
            .encode(&b, 0)
            .unwrap();
        assert_eq!(
            inputs[0].input,
            json!("Research Zoë \"Z\" (7) on 2024-02-29, tags [1,null]")
        );
        assert_eq!(inputs[1].input, json!("Research  () on , tags "));
    }

    #[test]
    fn unknown_columns_are_named() {
        let b = batch();
        let err = InputEncoder::new(&task(json!({"a": "nope"})), &b.schema()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input mapping {a: nope}: column `nope` is not in the source (columns: name, n, x, day, tags)"
        );
        let err = InputEncoder::new(&task(json!("hi {missing}")), &b.schema()).unwrap_err();
        assert!(err.to_string().contains("`missing`"), "{err}");
    }
}
