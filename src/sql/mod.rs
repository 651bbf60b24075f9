//! DataFusion table functions `enrich(task, source)` and `task_group_runs(id)`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::HashMap;
//! use datafusion::prelude::SessionContext;
//! use groupflow::client::{Client, ClientConfig};
//! use groupflow::sink::TaskDefinition;
//!
//! let ctx = SessionContext::new();
//! groupflow::source::register_table(&ctx, "companies", "data/companies.csv", &Default::default()).await?;
//! let task: TaskDefinition = serde_json::from_value(serde_json::json!({
//!     "input": {"company_name": "name"},
//!     "output": {"type": "object", "properties": {"founded": {"type": "integer"}}}
//! }))?;
//! let tasks = HashMap::from([("research".to_string(), task)]);
//! let client = Client::new(ClientConfig::from_env())?;
//! groupflow::sql::register(&ctx, tasks, client, Default::default())?;
//! ctx.sql("SELECT name, founded FROM enrich('research', 'companies')").await?.show().await?;
//! # Ok(())
//! # }
//! ```

mod enrich;
mod group_runs;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;

use crate::api::TaskGroupStatus;
use crate::client::{Client, ClientError};
use crate::ledger::{ClaimCounts, Ledger, LedgerError};
use crate::results::{JoinError, OutputSchema, ReadError, Reading, SchemaError, reading_ended};
use crate::sink::{SubmitError, TaskDefinition};

pub use enrich::{EnrichExec, EnrichFunction, EnrichTable};
pub use group_runs::{TaskGroupRunsFunction, group_runs_schema};

/// Name the enrich table function is registered under.
pub const ENRICH: &str = "enrich";
/// Name the group-reading table function is registered under.
pub const TASK_GROUP_RUNS: &str = "task_group_runs";
/// Group metadata key naming the task whose runs the group holds.
pub const GROUP_TASK_KEY: &str = "groupflow_task";

/// Where an enrich execution is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the source and adding runs.
    Submitting,
    /// Every run is added; waiting for the group to finish.
    Running,
    /// The group is done; results are being read and joined to the source rows.
    Reading,
}

/// A progress report of one enrich execution.
#[derive(Clone, Debug)]
pub struct EnrichProgress {
    pub task: String,
    /// Tells executions apart (unique in the process).
    pub execution: u64,
    /// The attempt's group of the task, once it has one (none when no row needs a run).
    pub group_id: Option<String>,
    pub phase: Phase,
    /// Runs added to the group so far by this execution.
    pub runs_added: u64,
    /// What the rows read so far were claimed as: new runs, shared, resumed, cached.
    pub claims: ClaimCounts,
    /// The group's latest status (while running).
    pub status: Option<TaskGroupStatus>,
}

/// A progress callback, called from the executing task; keep it quick.
pub type ProgressFn = Arc<dyn Fn(&EnrichProgress) + Send + Sync>;

/// Settings of the table functions.
#[derive(Clone, Default)]
pub struct EnrichOptions {
    /// Where spill files go (the system temp dir when `None`).
    pub spill_dir: Option<PathBuf>,
    /// Called as an execution progresses.
    pub on_progress: Option<ProgressFn>,
    /// The ledger of claims and results: dedup, resume, the result cache. `None`: a
    /// temporary ledger per registration (dedup within the session only).
    pub ledger: Option<Arc<Ledger>>,
    /// Every reading of results started by an `enrich(...)` execution.
    pub readings: Readings,
}

/// The readings of results that `enrich(...)` executions start: each waits for its group
/// and stores its results while the query joins them. A query that stops reading rows
/// early (a `LIMIT` above a filter) leaves its reading going; whoever ends the ledger's
/// attempt waits for them first, so that every run paid for has its result stored.
#[derive(Clone, Default)]
pub struct Readings(Arc<std::sync::Mutex<Vec<Followed>>>);

/// A task's name and the state of the reading of its results.
type Followed = (String, tokio::sync::watch::Receiver<Reading>);

impl Readings {
    /// Follows the reading of `task`'s results (readings already done are let go).
    pub(crate) fn follow(&self, task: &str, reading: tokio::sync::watch::Receiver<Reading>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|(_, r)| !matches!(*r.borrow(), Reading::Done));
        all.push((task.to_string(), reading));
    }

    /// Waits for every reading started so far to end; the first failure.
    pub async fn wait(&self) -> Result<(), ReadError> {
        let readings = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for (task, mut r) in readings {
            reading_ended(&mut r)
                .await
                .map_err(|e| e.unwrap_or_else(|| Arc::new(EnrichError::Stopped(task))))?;
        }
        Ok(())
    }
}

impl fmt::Debug for EnrichOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrichOptions")
            .field("spill_dir", &self.spill_dir)
            .field("on_progress", &self.on_progress.is_some())
            .field("ledger", &self.ledger)
            .finish()
    }
}

/// A task definition that cannot be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The output schema has no Arrow shape; the path starts at `tasks.NAME.output`.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("tasks.{task}.input: {source}")]
    Template {
        task: String,
        #[source]
        source: crate::sink::TemplateError,
    },
}

/// Why an enrich execution failed. Reaches callers inside
/// `DataFusionError::External`; [`EnrichError::find`] digs it out.
#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("enrich('{task}'): {source}")]
    Ledger {
        task: String,
        #[source]
        source: LedgerError,
    },
    #[error("enrich('{task}'): {source}")]
    Submit {
        task: String,
        #[source]
        source: SubmitError,
    },
    #[error("enrich('{task}'): waiting for group {group_id}: {source}")]
    Wait {
        task: String,
        group_id: String,
        #[source]
        source: ClientError,
    },
    #[error("enrich('{task}'): {source}")]
    Results {
        task: String,
        #[source]
        source: JoinError,
    },
    #[error("task_group_runs('{group_id}'): {source}")]
    GroupRuns {
        group_id: String,
        #[source]
        source: JoinError,
    },
    /// The task submitting the rows and reading their results ended without a word (it
    /// panicked), or its submission failed with no execution left to report it.
    #[error("enrich('{0}'): submitting and reading the runs stopped")]
    Stopped(String),
}

impl EnrichError {
    /// The API error behind this one, if any (for exit codes: auth vs. API failures).
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            EnrichError::Wait { source, .. } => Some(source),
            EnrichError::Submit { source, .. } => source.client_error(),
            EnrichError::Results {
                source: JoinError::Client { source, .. },
                ..
            }
            | EnrichError::GroupRuns {
                source: JoinError::Client { source, .. },
                ..
            } => Some(source),
            _ => None,
        }
    }

    /// True when a later try may succeed.
    pub fn is_retryable(&self) -> bool {
        self.client_error().is_some_and(ClientError::is_retryable)
    }

    /// The `EnrichError` inside a DataFusion error, however deeply DataFusion wrapped it.
    pub fn find(e: &DataFusionError) -> Option<&EnrichError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(found) = err.downcast_ref::<EnrichError>() {
                return Some(found);
            }
            if let Some(found) = err.downcast_ref::<Arc<EnrichError>>() {
                return Some(found.as_ref());
            }
            // A failed reading of results, as a join reports it (see `Reading::Failed`).
            if let Some(inner) = err.downcast_ref::<ReadError>() {
                cur = Some(inner.as_ref());
                continue;
            }
            cur = match err.downcast_ref::<DataFusionError>() {
                Some(DataFusionError::External(inner)) => Some(inner.as_ref()),
                Some(DataFusionError::Context(_, inner)) => Some(inner.as_ref()),
                Some(DataFusionError::Shared(inner)) => Some(inner.as_ref()),
                _ => err.source(),
            };
        }
        None
    }
}

/// A task ready to run: its definition and its output's Arrow shape.
#[derive(Debug)]
pub(crate) struct PreparedTask {
    pub name: String,
    pub def: TaskDefinition,
    pub output: OutputSchema,
}

/// Registers `enrich(task, source)` and `task_group_runs(id)` on `ctx`. Every task's
/// output schema and input template are checked here, so a bad task fails now, not when a
/// query uses it.
pub fn register(
    ctx: &SessionContext,
    tasks: HashMap<String, TaskDefinition>,
    client: Client,
    options: EnrichOptions,
) -> Result<(), RegisterError> {
    let mut prepared = HashMap::with_capacity(tasks.len());
    for (name, def) in tasks {
        let output = OutputSchema::from_task_output(&def.output, &format!("tasks.{name}.output"))?;
        def.input
            .columns()
            .map_err(|source| RegisterError::Template {
                task: name.clone(),
                source,
            })?;
        prepared.insert(name.clone(), Arc::new(PreparedTask { name, def, output }));
    }
    ctx.register_udtf(
        ENRICH,
        Arc::new(EnrichFunction::new(prepared, client.clone(), options)),
    );
    ctx.register_udtf(
        TASK_GROUP_RUNS,
        Arc::new(TaskGroupRunsFunction::new(client)),
    );
    Ok(())
}

/// The string value of a literal argument, or a planning error naming the function and
/// the argument.
pub(crate) fn string_arg(
    function: &str,
    args: &[Expr],
    index: usize,
    what: &str,
) -> datafusion::error::Result<String> {
    match args.get(index) {
        Some(Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        )) => Ok(s.clone()),
        Some(other) => Err(DataFusionError::Plan(format!(
            "{function}: argument {} ({what}) must be a string literal, got {other}",
            index + 1
        ))),
        None => Err(DataFusionError::Plan(format!(
            "{function}: argument {} ({what}) is missing",
            index + 1
        ))),
    }
}
