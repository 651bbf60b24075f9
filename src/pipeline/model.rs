//! The typed pipeline file, version 1. Its structure is checked first against
//! [`super::schema::pipeline_schema`] (which reports every problem with its place); these
//! structs then take the checked document as it is.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sink::{InputMapping, TaskDefinition};

use super::schema::DEFAULT_MAX_FAILED_RATIO;

/// A whole pipeline file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Format version; always 1.
    pub version: u32,
    /// Name of the pipeline.
    pub name: String,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Tables read from files, by table name.
    pub sources: BTreeMap<String, SourceSpec>,
    /// Tasks, by the name `enrich('name', …)` uses.
    pub tasks: BTreeMap<String, TaskConfig>,
    /// SQL statements, run in order.
    pub steps: Vec<StepSpec>,
    /// Files written at the end.
    pub outputs: Vec<OutputSpec>,
}

/// A table read from files.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Local path (relative to the pipeline file), directory, glob, or `s3://…`.
    pub path: String,
    /// File format; inferred from the extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<SourceFormat>,
    /// CSV/TSV: whether the first line names the columns (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_header: Option<bool>,
    /// CSV: the field delimiter, one character (default `,`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<char>,
}

impl SourceSpec {
    /// How the source module should read this source.
    pub fn options(&self) -> crate::source::SourceOptions {
        crate::source::SourceOptions {
            format: self.format.map(|f| match f {
                SourceFormat::Csv => crate::source::Format::Csv,
                SourceFormat::Tsv => crate::source::Format::Tsv,
                SourceFormat::Parquet => crate::source::Format::Parquet,
                SourceFormat::Ndjson => crate::source::Format::NdJson,
            }),
            has_header: self.has_header,
            // Other delimiters are refused by the loader before this is used.
            delimiter: self.delimiter.filter(char::is_ascii).map(|c| c as u8),
            s3: None,
        }
    }
}

/// The formats a source can be read in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Csv,
    Tsv,
    Parquet,
    Ndjson,
}

/// A task as written in a pipeline: a [`TaskDefinition`] plus the failure policy.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Processor each run asks for.
    #[serde(default = "default_processor")]
    pub processor: String,
    /// How a row becomes a run input.
    pub input: InputMapping,
    /// JSON Schema of the result, or a description of a text result.
    pub output: Value,
    /// Optional input schema sent with the task spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Largest fraction of failed runs tolerated before the run exits with code 5.
    #[serde(default = "default_max_failed_ratio")]
    pub max_failed_ratio: f64,
}

fn default_processor() -> String {
    "core".to_string()
}

fn default_max_failed_ratio() -> f64 {
    DEFAULT_MAX_FAILED_RATIO
}

impl TaskConfig {
    /// The task as the SQL layer knows it.
    pub fn definition(&self) -> TaskDefinition {
        TaskDefinition {
            processor: self.processor.clone(),
            input: self.input.clone(),
            output: self.output.clone(),
            input_schema: self.input_schema.clone(),
        }
    }
}

/// One SQL statement whose result becomes the table `name`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    pub sql: String,
}

/// One file written from a step or a source.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The step or source written.
    pub from: String,
    /// Local path (relative to the pipeline file) or `s3://bucket/key`.
    pub path: String,
    /// File format; inferred from the extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
}

/// The file formats groupflow reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Parquet,
    Ndjson,
}

impl FileFormat {
    /// The format a path's extension names (ignoring compression suffixes is not attempted).
    pub fn from_path(path: &str) -> Option<FileFormat> {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        let ext = name.rsplit_once('.')?.1;
        match ext {
            "csv" => Some(FileFormat::Csv),
            "parquet" | "pq" => Some(FileFormat::Parquet),
            "ndjson" | "jsonl" | "json" => Some(FileFormat::Ndjson),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Csv => "csv",
            FileFormat::Parquet => "parquet",
            FileFormat::Ndjson => "ndjson",
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
