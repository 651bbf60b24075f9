//! `task_group_runs(id)`: any existing group's runs as a table, in the order they were
//! added: `run_id`, `run_status`, `run_error`, `row_key`, `input` (JSON), `output` (JSON for
//! JSON outputs, the text for text outputs), `basis`, `processor`, `created_at`,
//! `modified_at`.

use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr, PlanProperties,
};
use futures::stream::StreamExt;

use super::{EnrichError, TASK_GROUP_RUNS, string_arg};
use crate::api::TaskRunEvent;
use crate::client::{Client, RunsQuery};
use crate::results::join::run_row_key;
use crate::results::{JoinError, OutputSchema, ResultDecoder};

/// Runs per emitted batch.
const BATCH_ROWS: usize = 1024;

/// The columns of `task_group_runs(id)`.
pub fn group_runs_schema() -> SchemaRef {
    let utf8 = |name: &str| Field::new(name, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        utf8("run_id"),
        utf8("run_status"),
        utf8("run_error"),
        utf8("row_key"),
        utf8("input"),
        utf8("output"),
        Field::new("basis", crate::results::basis_type(), true),
        utf8("processor"),
        utf8("created_at"),
        utf8("modified_at"),
    ]))
}

/// The `task_group_runs` table function.
#[derive(Debug)]
pub struct TaskGroupRunsFunction {
    client: Client,
}

impl TaskGroupRunsFunction {
    pub(crate) fn new(client: Client) -> Self {
        TaskGroupRunsFunction { client }
    }
}

impl TableFunctionImpl for TaskGroupRunsFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        if args.exprs().len() != 1 {
            return Err(DataFusionError::Plan(format!(
                "{TASK_GROUP_RUNS}(group_id) takes 1 argument, got {}",
                args.exprs().len()
            )));
        }
        let group_id = string_arg(TASK_GROUP_RUNS, args.exprs(), 0, "group id")?;
        Ok(Arc::new(GroupRunsTable {
            client: self.client.clone(),
            group_id,
        }))
    }
}

struct GroupRunsTable {
    client: Client,
    group_id: String,
}

impl fmt::Debug for GroupRunsTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupRunsTable")
            .field("group_id", &self.group_id)
            .finish()
    }
}

#[async_trait]
impl TableProvider for GroupRunsTable {
    fn schema(&self) -> SchemaRef {
        group_runs_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(group_runs_schema().project(p)?),
            None => group_runs_schema(),
        };
        Ok(Arc::new(GroupRunsExec {
            client: self.client.clone(),
            group_id: self.group_id.clone(),
            projection: projection.cloned(),
            properties: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(schema.clone()),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
            schema,
        }))
    }
}

/// Streams a group's runs as batches.
struct GroupRunsExec {
    client: Client,
    group_id: String,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for GroupRunsExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupRunsExec")
            .field("group_id", &self.group_id)
            .finish()
    }
}

impl DisplayAs for GroupRunsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GroupRunsExec: group={}", self.group_id)
    }
}

impl ExecutionPlan for GroupRunsExec {
    fn name(&self) -> &str {
        "GroupRunsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "GroupRunsExec has one partition, asked for {partition}"
            )));
        }
        let group_id = self.group_id.clone();
        let projection = self.projection.clone();
        let runs = self.client.runs_stream(
            &self.group_id,
            RunsQuery {
                include_input: true,
                include_output: true,
                ..RunsQuery::default()
            },
        );
        let stream = runs.chunks(BATCH_ROWS).map(move |chunk| {
            let fail = |source| {
                DataFusionError::External(Box::new(EnrichError::GroupRuns {
                    group_id: group_id.clone(),
                    source,
                }))
            };
            let events = chunk
                .into_iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|source| {
                    fail(JoinError::Client {
                        group_id: group_id.clone(),
                        source,
                    })
                })?;
            let batch = runs_batch(&events).map_err(|e| fail(JoinError::Arrow(e)))?;
            match &projection {
                Some(p) => Ok(batch.project(p)?),
                None => Ok(batch),
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

/// One batch of [`group_runs_schema`] rows.
fn runs_batch(
    events: &[TaskRunEvent],
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    // A text decoder gives the output as text (JSON outputs as their JSON), with the run
    // columns and basis decoded the same way `enrich` does.
    let mut decoder = ResultDecoder::new(OutputSchema::Text);
    let rows: Vec<Option<&TaskRunEvent>> = events.iter().map(Some).collect();
    let decoded = decoder.decode(&rows)?;
    let [output, run_id, run_status, run_error, basis]: [ArrayRef; 5] = decoded
        .try_into()
        .map_err(|_| arrow::error::ArrowError::SchemaError("unexpected decoder columns".into()))?;
    let n = events.len();
    let mut row_key = StringBuilder::with_capacity(n, n * 24);
    let mut input = StringBuilder::with_capacity(n, n * 64);
    let mut processor = StringBuilder::with_capacity(n, n * 8);
    let mut created = StringBuilder::with_capacity(n, n * 27);
    let mut modified = StringBuilder::with_capacity(n, n * 27);
    for ev in events {
        row_key.append_option(run_row_key(ev));
        input.append_option(ev.input.as_ref().map(|i| i.input.to_string()));
        processor.append_value(&ev.run.processor);
        created.append_option(ev.run.created_at.as_deref());
        modified.append_option(ev.run.modified_at.as_deref());
    }
    RecordBatch::try_new(
        group_runs_schema(),
        vec![
            run_id,
            run_status,
            run_error,
            Arc::new(row_key.finish()),
            Arc::new(input.finish()),
            output,
            basis,
            Arc::new(processor.finish()),
            Arc::new(created.finish()),
            Arc::new(modified.finish()),
        ],
    )
}
