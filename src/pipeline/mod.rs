//! Pipeline files: YAML model, validation, `${VAR}` substitution, runner and outputs.

pub mod diagnostic;
pub mod env;
pub mod error;
pub mod load;
pub mod model;
pub mod output;
pub mod output_schema;
pub mod progress;
pub mod runner;
pub mod schema;
pub mod state;
pub mod validate;
pub mod yaml;

pub use diagnostic::Diagnostic;
pub use error::RunError;
pub use load::{LoadError, Location, Pipeline};
pub use model::{FileFormat, OutputSpec, PipelineSpec, SourceSpec, StepSpec, TaskConfig};
pub use progress::{Progress, ProgressMode};
pub use runner::{RunOptions, Summary, dry_run, run};
pub use state::StateDir;
