//! Rows to run inputs (input mapping, row keys) and their batched submission.

pub mod task;

pub use task::{InputMapping, TaskDefinition, TemplateError, TemplatePart, parse_template};
