//! Pipeline files: YAML model, validation, `${VAR}` substitution, runner and outputs.

pub mod diagnostic;
pub mod env;
pub mod load;
pub mod model;
pub mod output;
pub mod output_schema;
pub mod progress;
pub mod schema;
pub mod state;
pub mod validate;
pub mod yaml;

pub use diagnostic::Diagnostic;
pub use load::{LoadError, Location, Pipeline};
pub use model::{FileFormat, OutputSpec, PipelineSpec, SourceSpec, StepSpec, TaskConfig};
