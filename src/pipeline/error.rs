//! Why a pipeline run stopped. Each variant is one kind of failure the command line turns
//! into an exit code (`cli::exit_code`).

use datafusion::error::DataFusionError;

use crate::sink::SubmitError;
use crate::sql::EnrichError;

use super::diagnostic::Diagnostic;
use super::load::LoadError;
use super::output::OutputError;

/// A run that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pipeline file could not be read or has problems.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Problems found while checking the pipeline against its data.
    #[error("{} problem(s) in the pipeline", .0.len())]
    Invalid(Vec<Diagnostic>),
    /// The data broke a step (a value that cannot be read or converted).
    #[error("{0}")]
    Data(String),
    /// A setting cannot work (environment, state directory, embedded server).
    #[error("{0}")]
    Config(String),
    /// The API refused the credentials.
    #[error("{0}")]
    Auth(String),
    /// The API failed (after retries) or answered something unusable.
    #[error("{0}")]
    Api(String),
    /// Local or object storage failed (state files, outputs).
    #[error("{0}")]
    Storage(String),
}

impl RunError {
    /// The one-line problems to print, one per line.
    pub fn lines(&self) -> Vec<String> {
        match self {
            RunError::Load(LoadError::Invalid(d)) | RunError::Invalid(d) => {
                d.iter().map(ToString::to_string).collect()
            }
            other => vec![format!("error: {}", shorten(&other.to_string()))],
        }
    }

    /// Classifies a failure of step `step` while it executed.
    pub fn from_step(step: &str, e: DataFusionError) -> RunError {
        let text = format!("step `{step}`: {}", first_line(&e.strip_backtrace()));
        if let Some(enrich) = EnrichError::find(&e) {
            let text = format!("step `{step}`: {enrich}");
            return match enrich.client_error() {
                Some(c) if c.is_auth() => {
                    RunError::Auth(format!("{text} — check PARALLEL_API_KEY"))
                }
                Some(_) => RunError::Api(text),
                None => match enrich {
                    EnrichError::Submit {
                        source: SubmitError::Input(_) | SubmitError::Source(_),
                        ..
                    } => RunError::Data(text),
                    EnrichError::Submit {
                        source:
                            SubmitError::Spill(_) | SubmitError::Ledger(_) | SubmitError::Pending { .. },
                        ..
                    }
                    | EnrichError::Ledger { .. }
                    // An internal failure (a task that panicked): exit 1, like storage.
                    | EnrichError::Stopped(_)
                    | EnrichError::Results {
                        source:
                            crate::results::JoinError::Ledger(_) | crate::results::JoinError::Spill(_),
                        ..
                    } => RunError::Storage(text),
                    _ => RunError::Api(text),
                },
            };
        }
        match find_root(&e) {
            DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => {
                RunError::Storage(text)
            }
            _ => RunError::Data(text),
        }
    }
}

impl From<OutputError> for RunError {
    fn from(e: OutputError) -> Self {
        match e {
            OutputError::Query { ref source, .. } => match find_root(source) {
                DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => {
                    RunError::Storage(format!("output {e}"))
                }
                _ => RunError::Data(format!("output {e}")),
            },
            other => RunError::Storage(format!("output {other}")),
        }
    }
}

/// The innermost DataFusion error of a chain of contexts and shared wrappers.
fn find_root(e: &DataFusionError) -> &DataFusionError {
    match e {
        DataFusionError::Context(_, inner) => find_root(inner),
        DataFusionError::Shared(inner) => find_root(inner),
        DataFusionError::Diagnostic(_, inner) => find_root(inner),
        other => other,
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Longest error line printed; API errors that list one problem per input are cut here.
const MAX_LINE_CHARS: usize = 600;

fn shorten(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= MAX_LINE_CHARS {
        return line;
    }
    let cut: String = line.chars().take(MAX_LINE_CHARS).collect();
    format!("{cut}…")
}
