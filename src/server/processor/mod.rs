//! Processors: what executes a run. The server runs every run on its configured processor,
//! whatever processor name the run asks for.

mod sim;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::api::TaskSpec;

pub use sim::Sim;
pub(crate) use sim::resolve_ref;

/// The processor names the API documents; others are rejected.
pub const DOCUMENTED_PROCESSORS: [&str; 9] = [
    "lite", "base", "core", "core2x", "pro", "ultra", "ultra2x", "ultra4x", "ultra8x",
];

/// True for a documented processor name, with or without the `-fast` suffix.
pub fn is_documented(name: &str) -> bool {
    let base = name.strip_suffix("-fast").unwrap_or(name);
    DOCUMENTED_PROCESSORS.contains(&base)
}

/// One run to execute.
#[derive(Clone, Debug)]
pub struct Job {
    /// The processor name the run asked for.
    pub processor: String,
    /// The run's `input`: a string or a JSON object.
    pub input: Value,
    /// The effective task spec (shared by the runs of a batch); `None` means automatic.
    pub spec: Option<Arc<TaskSpec>>,
}

/// Why a run failed; becomes the run's `error`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunFailure {
    pub message: String,
    pub detail: Option<Value>,
}

/// The future a processor returns: the run's output as the JSON text of a
/// [`TaskRunOutput`](crate::api::TaskRunOutput), which is stored as it is.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Result<String, RunFailure>> + Send + 'a>>;

/// Executes runs. Implementations must be safe to call concurrently.
pub trait Processor: Send + Sync + 'static {
    /// Produces the run's output, taking as long as the work takes.
    fn process<'a>(&'a self, job: &'a Job) -> ProcessFuture<'a>;

    /// The run's output at once, when it takes no time; `None` when it has to wait.
    fn process_now(&self, _job: &Job) -> Option<Result<String, RunFailure>> {
        None
    }

    /// True when every run's output is ready at once ([`Processor::process_now`] always
    /// answers): the server then records each added run as ended in the transaction that
    /// adds it, with no queue, claim or second write in between.
    fn instant(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn documented_names_and_fast_variants_are_accepted() {
        for name in ["lite", "core2x", "ultra8x-fast", "pro-fast"] {
            assert!(super::is_documented(name), "{name}");
        }
        for name in ["gpt-4", "core-slow", "", "fast"] {
            assert!(!super::is_documented(name), "{name}");
        }
    }
}
