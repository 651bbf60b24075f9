//! Rows to run inputs (input mapping, row keys) and their batched submission.

pub mod input;
pub mod spill;
pub mod submit;
pub mod task;

pub use input::{InputEncoder, InputError, input_key};
pub use submit::{Submission, SubmitError, SubmitProgress, SubmitTarget, submit};
pub use task::{InputMapping, TaskDefinition, TemplateError, TemplatePart, parse_template};
