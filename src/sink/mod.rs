//! Rows to run inputs (input mapping, row keys) and their batched submission.

pub mod input;
pub mod spill;
pub mod submit;
pub mod task;

pub use input::{InputEncoder, InputError, row_key, row_key_ordinal};
pub use submit::{SubmitError, SubmitProgress, SubmitTarget, submit};
pub use task::{InputMapping, TaskDefinition, TemplateError, TemplatePart, parse_template};
