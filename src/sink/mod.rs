//! Rows to run inputs (input mapping, row keys) and their batched submission.

pub mod input;
pub mod task;

pub use input::{InputEncoder, InputError, row_key, row_key_ordinal};
pub use task::{InputMapping, TaskDefinition, TemplateError, TemplatePart, parse_template};
