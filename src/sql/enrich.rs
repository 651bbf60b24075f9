//! `enrich(task, source)`: every source row becomes a run of `task`; the result is the source
//! columns, one typed column per output property, and `run_id`, `run_status`, `run_error`,
//! `basis`.
//!
//! Planning only parses the arguments and plans the source query; all network work happens
//! when the plan executes. The table owns its submission: however many times its plan is
//! executed (a CTE read twice, a DataFrame collected twice), the rows are submitted once and
//! later executions read the same group again. A `LIMIT n` that DataFusion pushes into the
//! scan limits what is submitted: only the first `n` source rows become runs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr, PlanProperties,
};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tokio::sync::OnceCell;

use super::{
    ENRICH, EnrichError, EnrichOptions, EnrichProgress, GROUP_TASK_KEY, Phase, PreparedTask,
    string_arg,
};
use crate::api::Metadata;
use crate::client::{Client, RunsQuery};
use crate::ledger::{ClaimCounts, Ledger, TaskLedger, task_fingerprint};
use crate::results::{
    JoinError, Reading, ResultDecoder, RunsRead, Until, join_results, store_results,
};
use crate::sink::spill::Spill;
use crate::sink::{InputEncoder, Submission, SubmitTarget, submit};

/// The `enrich` table function.
#[derive(Debug)]
pub struct EnrichFunction {
    tasks: HashMap<String, Arc<PreparedTask>>,
    client: Client,
    options: EnrichOptions,
    /// The ledger used when the options name none: a temporary one, made on first use.
    fallback: Arc<OnceCell<Arc<Ledger>>>,
}

impl EnrichFunction {
    pub(crate) fn new(
        tasks: HashMap<String, Arc<PreparedTask>>,
        client: Client,
        options: EnrichOptions,
    ) -> Self {
        EnrichFunction {
            tasks,
            client,
            options,
            fallback: Arc::default(),
        }
    }
}

impl TableFunctionImpl for EnrichFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if exprs.len() != 2 {
            return Err(DataFusionError::Plan(format!(
                "{ENRICH}(task, source) takes 2 arguments, got {}",
                exprs.len()
            )));
        }
        let name = string_arg(ENRICH, exprs, 0, "task name")?;
        let source = string_arg(ENRICH, exprs, 1, "source table or query")?;
        let task = self.tasks.get(&name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
            known.sort_unstable();
            DataFusionError::Plan(format!(
                "{ENRICH}: unknown task '{name}' (tasks: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        let state = args
            .session()
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| {
                DataFusionError::Plan(format!("{ENRICH}: needs a DataFusion SessionState"))
            })?;
        let source_plan = plan_source(state, &source).map_err(|e| {
            let e = match e.find_root() {
                DataFusionError::Plan(m) => m.clone(),
                other => other.to_string(),
            };
            DataFusionError::Plan(format!("{ENRICH}('{name}'): source {source:?}: {e}"))
        })?;
        EnrichTable::try_new(
            task,
            self.client.clone(),
            self.options.clone(),
            self.fallback.clone(),
            source,
            source_plan,
        )
        .map(|t| Arc::new(t) as Arc<dyn TableProvider>)
    }
}

/// Plans `source`: a query (`SELECT`, `WITH`, `VALUES`) or a table name.
fn plan_source(state: &SessionState, source: &str) -> Result<LogicalPlan> {
    let trimmed = source.trim();
    let first = trimmed
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let sql = if matches!(first.as_str(), "select" | "with" | "values") || trimmed.starts_with('(')
    {
        trimmed.to_string()
    } else if looks_like_table_name(trimmed) {
        format!("SELECT * FROM {trimmed}")
    } else {
        return Err(DataFusionError::Plan(
            "must be a table name or a query (SELECT, WITH or VALUES)".into(),
        ));
    };
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state.sql_to_statement(&sql, &dialect)?;
    match &statement {
        DfStatement::Statement(s) if matches!(**s, Statement::Query(_)) => {}
        _ => {
            return Err(DataFusionError::Plan(
                "must be a table name or a SELECT query".into(),
            ));
        }
    }
    // Planning is async only to look tables up in catalogs; the session's catalogs hold
    // registered tables in memory, so this completes without waiting on I/O.
    futures::executor::block_on(state.statement_to_plan(statement))
}

/// A possibly qualified, possibly quoted table name: no whitespace outside double quotes.
fn looks_like_table_name(s: &str) -> bool {
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return false,
            ';' | '(' | ')' | ',' if !quoted => return false,
            _ => {}
        }
    }
    !s.is_empty() && !quoted
}

/// The table `enrich(task, source)` returns.
pub struct EnrichTable {
    shared: Arc<Shared>,
    schema: SchemaRef,
    source_plan: LogicalPlan,
}

/// What every execution of one `enrich(...)` call shares.
struct Shared {
    /// Tells this table's progress reports apart from other tables'.
    execution: u64,
    task: Arc<PreparedTask>,
    client: Client,
    options: EnrichOptions,
    fallback: Arc<OnceCell<Arc<Ledger>>>,
    source_sql: String,
    source_schema: SchemaRef,
    encoder: InputEncoder,
    schema: SchemaRef,
    /// The submission (group, spilled rows) of each row limit, made by the first execution
    /// with that limit: `LIMIT n` pushed into the scan submits only `n` rows.
    submitted: std::sync::Mutex<HashMap<Option<usize>, Arc<SubmittedCell>>>,
}

type SubmittedCell = OnceCell<std::result::Result<Arc<Submitted>, Arc<EnrichError>>>;

struct Submitted {
    /// The source rows with their keys, still being written while rows are submitted.
    spill: Arc<Spill>,
    ledger: TaskLedger,
    /// The group and the claims, once every row is submitted.
    totals: tokio::sync::watch::Receiver<Option<Totals>>,
    /// Submitting, waiting for the group and storing its results, and how that ended.
    reading: tokio::sync::watch::Receiver<Reading>,
}

/// The group (if any) and the claims of a finished submission.
type Totals = (Option<String>, ClaimCounts);

/// What submitting hands over once every row is submitted, or the error that stopped it.
type Handover = std::result::Result<Arc<Spill>, Arc<EnrichError>>;

impl fmt::Debug for EnrichTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrichTable")
            .field("task", &self.shared.task.name)
            .field("source", &self.shared.source_sql)
            .finish()
    }
}

impl EnrichTable {
    fn try_new(
        task: Arc<PreparedTask>,
        client: Client,
        options: EnrichOptions,
        fallback: Arc<OnceCell<Arc<Ledger>>>,
        source_sql: String,
        source_plan: LogicalPlan,
    ) -> Result<Self> {
        let plan_err =
            |msg: String| DataFusionError::Plan(format!("{ENRICH}('{}'): {msg}", task.name));
        let source_schema: SchemaRef = Arc::new(source_plan.schema().as_arrow().clone());
        let encoder =
            InputEncoder::new(&task.def, &source_schema).map_err(|e| plan_err(e.to_string()))?;
        let mut decoder_fields = ResultDecoder::new(task.output.clone()).fields();
        let mut fields: Vec<Field> = source_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for f in &fields {
            if !seen.insert(f.name().clone()) {
                return Err(plan_err(format!(
                    "the source has two columns named `{}`; alias one of them",
                    f.name()
                )));
            }
        }
        for f in &decoder_fields {
            if seen.contains(f.name()) {
                return Err(plan_err(format!(
                    "source column `{}` has the name of a result column; rename it in the source query",
                    f.name()
                )));
            }
        }
        fields.append(&mut decoder_fields);
        let schema = Arc::new(Schema::new(fields));
        Ok(EnrichTable {
            shared: Arc::new(Shared {
                execution: {
                    static NEXT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(1);
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                },
                task,
                client,
                options,
                fallback,
                source_sql,
                source_schema,
                encoder,
                schema: schema.clone(),
                submitted: Default::default(),
            }),
            schema,
            source_plan,
        })
    }
}

#[async_trait]
impl TableProvider for EnrichTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let source = state.create_physical_plan(&self.source_plan).await?;
        Ok(Arc::new(EnrichExec::new(
            self.shared.clone(),
            source,
            projection.cloned(),
            limit,
        )?))
    }
}

/// Runs one `enrich(...)`: submits (once), then streams the joined results as the group's runs
/// end and are stored.
pub struct EnrichExec {
    shared: Arc<Shared>,
    /// The planned source; executed partition by partition, in order, so row keys are
    /// the same every time the same data is read.
    source: Arc<dyn ExecutionPlan>,
    projection: Option<Vec<usize>>,
    /// At most this many source rows are submitted (a `LIMIT` pushed into the scan).
    limit: Option<usize>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for EnrichExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrichExec")
            .field("task", &self.shared.task.name)
            .field("projection", &self.projection)
            .finish()
    }
}

impl EnrichExec {
    fn new(
        shared: Arc<Shared>,
        source: Arc<dyn ExecutionPlan>,
        projection: Option<Vec<usize>>,
        limit: Option<usize>,
    ) -> Result<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(shared.schema.project(p)?),
            None => shared.schema.clone(),
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(EnrichExec {
            shared,
            source,
            projection,
            limit,
            schema,
            properties,
        })
    }
}

impl DisplayAs for EnrichExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "EnrichExec: task={}, source={:?}",
            self.shared.task.name, self.shared.source_sql
        )?;
        if let Some(n) = self.limit {
            write!(f, ", limit={n}")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for EnrichExec {
    fn name(&self) -> &str {
        "EnrichExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    /// The source plan is kept out of the tree on purpose: it is already optimized, and
    /// optimizer rules must not repartition or reorder what feeds the row keys.
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
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "EnrichExec has one partition, asked for {partition}"
            )));
        }
        let shared = self.shared.clone();
        let source = self.source.clone();
        let projection = self.projection.clone();
        let limit = self.limit;
        let schema = self.schema.clone();
        let results = async move {
            let submitted = shared.submitted(source, context, limit).await?;
            // The basis is decoded only when the query reads that column.
            let basis = shared.schema.index_of(crate::results::BASIS).ok();
            let with_basis = match (&projection, basis) {
                (Some(p), Some(b)) => p.contains(&b),
                _ => true,
            };
            let stream = shared.results(&submitted, with_basis);
            Ok::<_, DataFusionError>(stream.map(move |batch| match &projection {
                Some(p) => batch.and_then(|b| Ok(b.project(p)?)),
                None => batch,
            }))
        };
        let stream = futures::stream::once(results).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

fn external(e: Arc<EnrichError>) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

impl Shared {
    fn report(
        &self,
        group_id: Option<&str>,
        phase: Phase,
        runs_added: u64,
        claims: ClaimCounts,
        status: Option<&crate::api::TaskGroupStatus>,
    ) {
        if let Some(cb) = &self.options.on_progress {
            cb(&EnrichProgress {
                task: self.task.name.clone(),
                execution: self.execution,
                group_id: group_id.map(str::to_string),
                phase,
                runs_added,
                claims,
                status: status.cloned(),
            });
        }
    }

    /// The group holding this table's runs, submitting them on first use. Returns once
    /// every row is submitted; waiting for the group and storing its results go on in a
    /// task of their own, followed by [`Submitted::reading`], so that results are joined
    /// while the group runs.
    async fn submitted(
        self: &Arc<Self>,
        source: Arc<dyn ExecutionPlan>,
        context: Arc<TaskContext>,
        limit: Option<usize>,
    ) -> Result<Arc<Submitted>> {
        let cell = self
            .submitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(limit)
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            self.start(limited(sequential(source, context), limit))
                .await
                .map(Arc::new)
        })
        .await
        .clone()
        .map_err(external)
    }

    /// Starts the task that submits `input`, waits for the group and stores its results;
    /// returns once the rows start being spilled, so that they are joined while the rest
    /// are still being submitted (a submission that fails, or ends, before that answers
    /// here; one that fails after, through [`Submitted::reading`]).
    async fn start(
        self: &Arc<Self>,
        input: BoxStream<'static, Result<RecordBatch>>,
    ) -> std::result::Result<Submitted, Arc<EnrichError>> {
        let ledger = self.task_ledger().await.map_err(Arc::new)?;
        let (handover, mut handed) = tokio::sync::oneshot::channel::<Handover>();
        let (spilled, mut spill) = tokio::sync::oneshot::channel();
        let (totals_tx, totals) = tokio::sync::watch::channel(None);
        let (reading_tx, reading) = tokio::sync::watch::channel(Reading::Going);
        let (me, task_ledger) = (self.clone(), ledger.clone());
        tokio::spawn(async move {
            let read = me
                .submit_and_read(input, task_ledger, handover, spilled, totals_tx)
                .await;
            reading_tx.send_replace(match read {
                Ok(()) => Reading::Done,
                Err(e) => Reading::Failed(e),
            });
        });
        // Followed from the start: if this execution is dropped before every row is
        // submitted (another part of the query met its LIMIT), the task still submits them
        // all and stores their results, and the pipeline waits for it; a run added and
        // then forgotten would be paid for again by the next run.
        self.options
            .readings
            .follow(&self.task.name, reading.clone());
        let spill = tokio::select! {
            biased;
            Ok(spill) = &mut spill => spill,
            handed = &mut handed => match handed {
                Ok(handed) => handed?,
                Err(_) => return Err(Arc::new(EnrichError::Stopped(self.task.name.clone()))),
            },
        };
        Ok(Submitted {
            spill,
            ledger,
            totals,
            reading,
        })
    }

    /// This task's part of the ledger named by the options, or of a temporary one.
    async fn task_ledger(&self) -> std::result::Result<TaskLedger, EnrichError> {
        let task = &self.task.name;
        let ledger_err = |source| EnrichError::Ledger {
            task: task.clone(),
            source,
        };
        let ledger = match &self.options.ledger {
            Some(l) => l.clone(),
            None => self
                .fallback
                .get_or_try_init(|| async { Ledger::temporary() })
                .await
                .map_err(ledger_err)?
                .clone(),
        };
        let fp = task_fingerprint(&self.task.def.processor, &self.task.def.task_spec());
        ledger.task(task, &fp).await.map_err(ledger_err)
    }

    /// Submits `input` (handing the submission over once every row is submitted, or the
    /// error that stopped it), waits for the group and stores its results.
    async fn submit_and_read(
        &self,
        input: BoxStream<'static, Result<RecordBatch>>,
        ledger: TaskLedger,
        handover: tokio::sync::oneshot::Sender<Handover>,
        spilled: tokio::sync::oneshot::Sender<Arc<Spill>>,
        totals: tokio::sync::watch::Sender<Option<Totals>>,
    ) -> std::result::Result<(), Arc<EnrichError>> {
        let task = &self.task.name;
        let mut metadata = Metadata::new();
        metadata.insert(GROUP_TASK_KEY.into(), task.clone().into());
        let target = SubmitTarget {
            client: &self.client,
            ledger: &ledger,
            group_metadata: metadata,
            spec: self.task.def.task_spec(),
            encoder: self.encoder.clone(),
            schema: &self.source_schema,
            spill_dir: self.options.spill_dir.as_deref(),
            spilled: Some(spilled),
        };
        // Runs that have ended are read and stored from the moment the group exists, while
        // rows are still being submitted and while the group runs; `done` ends that.
        let group = OnceLock::<String>::new();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let work = async {
            let submitted = submit(target, input, |p| {
                if let Some(g) = &p.group_id {
                    let _ = group.set(g.clone());
                }
                self.report(
                    p.group_id.as_deref(),
                    Phase::Submitting,
                    p.runs_added,
                    p.claims,
                    None,
                )
            })
            .await
            .map_err(|source| EnrichError::Submit {
                task: task.clone(),
                source,
            });
            let waited = match submitted {
                Ok(s) => {
                    let Submission {
                        spill,
                        group_id,
                        claims,
                        runs_added,
                        event_cursor,
                    } = s;
                    totals.send_replace(Some((group_id.clone(), claims)));
                    let _ = handover.send(Ok(spill));
                    let to_read = self
                        .wait(
                            group_id.as_deref(),
                            runs_added,
                            claims,
                            event_cursor,
                            &ledger,
                        )
                        .await;
                    to_read
                        .map(|to_read| (group_id, runs_added, claims, to_read))
                        .map_err(Arc::new)
                }
                // To the execution still waiting for the submission, if any, and to the
                // reading, which the joins started meanwhile follow.
                Err(e) => {
                    let e = Arc::new(e);
                    let _ = handover.send(Err(e.clone()));
                    Err(e)
                }
            };
            let _ = done_tx.send(true);
            waited
        };
        let (waited, early) = futures::join!(work, self.read_ended_runs(&group, &ledger, done));
        let (group_id, runs_added, claims, to_read) = waited?;
        self.report(
            group_id.as_deref(),
            Phase::Reading,
            runs_added,
            claims,
            None,
        );
        if let (Some(g), Some(runs)) = (&group_id, to_read) {
            let runs = self.client.runs_stream_raw(
                g,
                RunsQuery {
                    include_output: true,
                    last_event_id: early.cursor,
                    expected: Some(runs.saturating_sub(early.passed)),
                    ..RunsQuery::default()
                },
            );
            store_results(runs, g, &ledger, Until::End)
                .await
                .map_err(|source| {
                    Arc::new(EnrichError::Results {
                        task: task.clone(),
                        source,
                    })
                })?;
        }
        Ok(())
    }

    /// Waits for group `group_id`, which `added` runs were just added to (`event_cursor`:
    /// from before the last), to finish. Returns how many runs the group holds for this
    /// attempt when some of them had no stored result yet (they are to be read), `None`
    /// when there is nothing to read.
    async fn wait(
        &self,
        group_id: Option<&str>,
        added: u64,
        claims: ClaimCounts,
        event_cursor: Option<String>,
        ledger: &TaskLedger,
    ) -> std::result::Result<Option<u64>, EnrichError> {
        let task = &self.task.name;
        let Some(g) = group_id else {
            return Ok(None);
        };
        let (runs, unfinished) = ledger
            .counts()
            .await
            .map_err(|source| EnrichError::Ledger {
                task: task.clone(),
                source,
            })?;
        // Nothing to wait for when every run of this attempt already has its result
        // (a second execution, a run resumed after its results were stored, or every
        // result read while the rows were submitted).
        if unfinished == 0 {
            return Ok(None);
        }
        self.report(Some(g), Phase::Running, added, claims, None);
        // Statuses before the last add are of no use: the wait starts after them.
        self.client
            .wait_from(g, event_cursor, |s| {
                self.report(Some(g), Phase::Running, added, claims, Some(s))
            })
            .await
            .map_err(|source| EnrichError::Wait {
                task: task.clone(),
                group_id: g.to_string(),
                source,
            })?;
        Ok(Some(runs))
    }

    /// From the moment the group exists until `done`, stores the runs that have ended, in
    /// the group's order up to the first one still active, so that reading results
    /// overlaps with submitting and running them. A pass starts once the group's counts
    /// show enough ended runs not yet read. Stops once `done` is set (a pause between passes
    /// ends there, so the read after the wait does not wait for it) or at the first error:
    /// the read after the wait resumes after the runs passed here, and meets any error again.
    async fn read_ended_runs(
        &self,
        group: &OnceLock<String>,
        ledger: &TaskLedger,
        mut done: tokio::sync::watch::Receiver<bool>,
    ) -> RunsRead {
        /// Ended runs (by the group's counts) not yet read that are worth a pass.
        const WORTH_A_PASS: u64 = 1000;
        const PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
        let pause = async |done: &mut tokio::sync::watch::Receiver<bool>| {
            tokio::select! {
                _ = tokio::time::sleep(PAUSE) => {}
                _ = done.wait_for(|d| *d) => {}
            }
        };
        let mut read = RunsRead::default();
        while !*done.borrow() {
            let Some(g) = group.get() else {
                pause(&mut done).await;
                continue;
            };
            let finished = match self.client.get_group(g).await {
                Ok(t) => t.status.finished(),
                Err(e) => {
                    tracing::debug!(group = %g, error = %e, "reading ended runs early stopped");
                    break;
                }
            };
            if finished < read.passed + WORTH_A_PASS {
                pause(&mut done).await;
                continue;
            }
            let runs = self.client.runs_stream_raw(
                g,
                RunsQuery {
                    include_output: true,
                    last_event_id: read.cursor.clone(),
                    ..RunsQuery::default()
                },
            );
            match store_results(runs, g, ledger, Until::Active).await {
                Ok(pass) => {
                    read.stored += pass.stored;
                    read.passed += pass.passed;
                    if pass.cursor.is_some() {
                        read.cursor = pass.cursor;
                    }
                    // Runs end out of order: the prefix may lag the counts.
                    if pass.passed < WORTH_A_PASS {
                        pause(&mut done).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(group = %g, error = %e, "reading ended runs early stopped");
                    break;
                }
            }
        }
        read
    }

    /// The joined result batches of a submission, as its results are stored.
    fn results(&self, s: &Submitted, with_basis: bool) -> BoxStream<'static, Result<RecordBatch>> {
        // While the group runs, its progress is what is shown (the reading reports this
        // phase once the group is done).
        if let (Reading::Done, Some((group_id, claims))) =
            (&*s.reading.borrow(), &*s.totals.borrow())
        {
            self.report(
                group_id.as_deref(),
                Phase::Reading,
                claims.submit,
                *claims,
                None,
            );
        }
        let task = self.task.name.clone();
        join_results(
            s.spill.clone(),
            s.ledger.clone(),
            s.reading.clone(),
            ResultDecoder::new(self.task.output.clone()).with_basis(with_basis),
            self.schema.clone(),
        )
        .map_err(move |source| match source {
            // Already the task's own error (waiting for the group, reading its runs).
            JoinError::Reading(e) => DataFusionError::External(Box::new(e)),
            JoinError::ReadingLost => external(Arc::new(EnrichError::Stopped(task.clone()))),
            source => external(Arc::new(EnrichError::Results {
                task: task.clone(),
                source,
            })),
        })
        .boxed()
    }
}

/// The first `limit` rows of `input` (all of them with no limit).
fn limited(
    input: BoxStream<'static, Result<RecordBatch>>,
    limit: Option<usize>,
) -> BoxStream<'static, Result<RecordBatch>> {
    let Some(limit) = limit else { return input };
    input
        .scan(limit, |left, batch| {
            let item = match batch {
                _ if *left == 0 => None,
                Ok(b) => {
                    let take = (*left).min(b.num_rows());
                    *left -= take;
                    Some(Ok(b.slice(0, take)))
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(item)
        })
        .boxed()
}

/// All partitions of `plan`, one after the other.
fn sequential(
    plan: Arc<dyn ExecutionPlan>,
    context: Arc<TaskContext>,
) -> BoxStream<'static, Result<RecordBatch>> {
    let partitions = plan.properties().output_partitioning().partition_count();
    futures::stream::iter(0..partitions)
        .map(move |p| plan.execute(p, context.clone()))
        .try_flatten()
        .boxed()
}
