//! Running a pipeline: check it against its data, run each step once (materializing its
//! result in the run's work folder), stage every output, then commit them all.
//!
//! ```text
//!  load ─► check offline (as `validate`) ─► connect (API, embedded server, or none)
//!       ─► prepare (sources, table functions, plan every step)
//!       ─► step 1 … step n   each: execute once ─► <work>/steps/<name>.arrow ─► table <name>
//!       ─► stage outputs (temp files) ─► commit outputs (rename / upload) ─► summary
//! ```
//!
//! A step runs exactly once: later steps and outputs read its file, never its plan, so an
//! `enrich` in it submits its runs one time however many readers it has.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::file_format::options::ArrowReadOptions;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::client::{API_KEY_ENV, BASE_URL_ENV, Client, ClientConfig};
use crate::ledger::{ClaimCounts, Ledger, LedgerOptions, pause_point};
use crate::server::{self, ServerConfig, ServerHandle};
use crate::sql::EnrichOptions;

use super::error::RunError;
use super::load::{Location, Pipeline};
use super::output::{self, OutputTarget, Written};
use super::progress::{Progress, TaskReport};
use super::state::StateDir;
use super::validate;

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The state directory, when not `.groupflow/` beside the pipeline.
    pub state_dir: Option<PathBuf>,
    /// Results of earlier runs: reused (default), or ignored with `no_cache`; failed ones
    /// submitted again with `retry_failed`.
    pub ledger: LedgerOptions,
}

/// Which API a run talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTarget {
    /// `PARALLEL_BASE_URL` (or the production default) with the key from `PARALLEL_API_KEY`.
    Remote { base_url: String },
    /// The local server started in-process for this run.
    Embedded { base_url: String, db: PathBuf },
    /// None: no step calls the API (plain SQL pipelines, dry runs).
    None,
}

/// What one task did in a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSummary {
    pub task: String,
    pub processor: String,
    pub group_ids: Vec<String>,
    /// Source rows, and what each was claimed as: a new run, a run shared with an
    /// identical row, a run submitted before an interruption, a stored result.
    pub claims: ClaimCounts,
    /// Rows whose `run_status` is not `completed` (failed, cancelled, invalid output,
    /// missing).
    pub failed: u64,
    pub max_failed_ratio: f64,
}

impl TaskSummary {
    /// Rows in.
    pub fn rows(&self) -> u64 {
        self.claims.rows()
    }

    /// Failed rows as a fraction of rows (0 with no rows).
    pub fn failed_ratio(&self) -> f64 {
        if self.rows() == 0 {
            0.0
        } else {
            self.failed as f64 / self.rows() as f64
        }
    }

    /// True when more rows failed than the task tolerates.
    pub fn over_limit(&self) -> bool {
        self.failed_ratio() > self.max_failed_ratio
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub pipeline: String,
    pub api: ApiTarget,
    /// Rows each step produced, in order.
    pub steps: Vec<(String, u64)>,
    pub tasks: Vec<TaskSummary>,
    pub outputs: Vec<Written>,
    pub elapsed: Duration,
}

impl Summary {
    /// The tasks whose failed runs exceed their `max_failed_ratio`.
    pub fn over_limit(&self) -> Vec<&TaskSummary> {
        self.tasks.iter().filter(|t| t.over_limit()).collect()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pipeline {}: done in {:.1}s",
            self.pipeline,
            self.elapsed.as_secs_f64()
        )?;
        for t in &self.tasks {
            let c = &t.claims;
            writeln!(
                f,
                "  task {} [{}]: rows in {}, runs submitted {}, runs saved {} ({} cached, {} shared by identical rows, {} resumed), completed {}, failed {} ({:.1}%, limit {:.1}%), group {}",
                t.task,
                t.processor,
                t.rows(),
                c.submit,
                c.saved(),
                c.cached,
                c.duplicate,
                c.resumed,
                t.rows().saturating_sub(t.failed),
                t.failed,
                t.failed_ratio() * 100.0,
                t.max_failed_ratio * 100.0,
                if t.group_ids.is_empty() {
                    "-".to_string()
                } else {
                    t.group_ids.join(", ")
                }
            )?;
        }
        for o in &self.outputs {
            writeln!(
                f,
                "  output {}: rows out {}, {} bytes",
                o.display, o.rows, o.bytes
            )?;
        }
        Ok(())
    }
}

/// What a dry run found: per enrich call, the runs it would submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunLine {
    pub step: String,
    pub task: String,
    pub processor: String,
    /// `None` when the source depends on another task's results, unknown until they exist.
    pub runs: Option<u64>,
}

impl fmt::Display for DryRunLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.runs {
            Some(n) => write!(
                f,
                "step {}: task {} would submit {n} run(s) on processor {}",
                self.step, self.task, self.processor
            ),
            None => write!(
                f,
                "step {}: task {} on processor {}: run count unknown (its source needs another task's results)",
                self.step, self.task, self.processor
            ),
        }
    }
}

/// The API of a run, and the embedded server when there is one.
struct Api {
    client: Client,
    target: ApiTarget,
    server: Option<ServerHandle>,
}

impl Api {
    /// The configured API, or — with neither `PARALLEL_API_KEY` nor `PARALLEL_BASE_URL`
    /// set — a local server started in-process, reached over HTTP like the real one, its
    /// database in the (existing) state directory.
    async fn connect(state: &StateDir) -> Result<Api, RunError> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        if set(API_KEY_ENV) || set(BASE_URL_ENV) {
            let config = ClientConfig::from_env();
            let base_url = config.base_url.clone();
            let client = Client::new(config).map_err(|e| RunError::Config(e.to_string()))?;
            return Ok(Api {
                client,
                target: ApiTarget::Remote { base_url },
                server: None,
            });
        }
        let db = state.server_db();
        let config = ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: Some(db.clone()),
            ..ServerConfig::default()
        };
        // Pipelines beside each other share the state directory and its server database,
        // which one server uses at a time: this one waits for the other run to end.
        let mut waiting = false;
        let handle = loop {
            match server::start(config.clone()).await {
                Ok(h) => break h,
                Err(e) if e.is_in_use() => {
                    if !waiting {
                        waiting = true;
                        eprintln!(
                            "groupflow: waiting for another run in this state directory to end: {} is in use by another groupflow process (that run's embedded server, or `groupflow serve`)",
                            db.display()
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(RunError::Config(format!("embedded server: {e}"))),
            }
        };
        let base_url = handle.base_url();
        let client = Client::new(ClientConfig::new(base_url.clone()))
            .map_err(|e| RunError::Config(e.to_string()))?;
        Ok(Api {
            client,
            target: ApiTarget::Embedded { base_url, db },
            server: Some(handle),
        })
    }

    async fn shutdown(self) {
        if let Some(s) = self.server {
            s.shutdown().await;
        }
    }
}

/// Runs `pipeline`. The summary is returned even when tasks exceeded their failure limit
/// (the caller decides the exit code); an error means the run did not complete and no
/// output was committed.
pub async fn run(
    pipeline: &Pipeline,
    options: &RunOptions,
    progress: &Progress,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    // Everything `validate` checks is checked before the API is touched or the state
    // directory created, so a broken pipeline leaves nothing behind.
    let offline = validate::offline_client().map_err(|e| RunError::Config(e.to_string()))?;
    let (prepared, problems) = validate::prepare(
        pipeline,
        &validate::session(),
        offline.clone(),
        EnrichOptions::default(),
    )
    .await;
    if !problems.is_empty() {
        return Err(RunError::Invalid(problems));
    }
    let state = StateDir::for_pipeline(&pipeline.path, options.state_dir.as_deref());
    // A pipeline of plain SQL needs no API: no server is started, no key is needed.
    let needs_api = !prepared.enrich_calls.is_empty()
        || prepared
            .reads
            .iter()
            .any(|r| r.contains(crate::sql::TASK_GROUP_RUNS));
    // The ledger is opened (and its lock taken) before any server starts or request is
    // made: a second run of the pipeline is refused before it does anything.
    let ledger = if needs_api {
        std::fs::create_dir_all(state.root()).map_err(|e| state_error(&state, e))?;
        Some(
            Ledger::open(&state.ledger_db(), &pipeline.spec.name, options.ledger)
                .map_err(|e| RunError::Storage(e.to_string()))?,
        )
    } else {
        None
    };
    let api = if needs_api {
        Api::connect(&state).await?
    } else {
        Api {
            client: offline,
            target: ApiTarget::None,
            server: None,
        }
    };
    if let Some(l) = ledger.as_ref().filter(|l| l.resumed()) {
        eprintln!(
            "groupflow: resuming the interrupted run of {} (ledger {}): runs it submitted are not submitted again",
            pipeline.spec.name,
            l.path().display()
        );
        let committed = l.committed_outputs().await.unwrap_or_default();
        if !committed.is_empty() {
            eprintln!(
                "groupflow: outputs it had committed ({}) are written again, with the same rows",
                committed.join(", ")
            );
        }
    }
    match &api.target {
        ApiTarget::Embedded { base_url, db } => eprintln!(
            "groupflow: PARALLEL_API_KEY and PARALLEL_BASE_URL are not set: running tasks on the embedded local server at {base_url} (sim processor; state in {})",
            db.display()
        ),
        ApiTarget::Remote { base_url } => progress.println(format!("groupflow: API at {base_url}")),
        ApiTarget::None => {}
    }
    let result = run_with(pipeline, &state, &api, ledger.clone(), progress, started).await;
    api.shutdown().await;
    result
}

/// A state directory that could not be created or written.
fn state_error(state: &StateDir, e: std::io::Error) -> RunError {
    RunError::Storage(format!("state directory {}: {e}", state.root().display()))
}

async fn run_with(
    pipeline: &Pipeline,
    state: &StateDir,
    api: &Api,
    ledger: Option<std::sync::Arc<Ledger>>,
    progress: &Progress,
    started: Instant,
) -> Result<Summary, RunError> {
    let work = state.start_run().map_err(|e| state_error(state, e))?;
    let ctx = validate::session();
    let readings = crate::sql::Readings::default();
    let options = EnrichOptions {
        spill_dir: Some(work.spill_dir()),
        on_progress: Some(progress.enrich_callback()),
        ledger: ledger.clone(),
        readings: readings.clone(),
    };
    let (prepared, problems) = validate::prepare(pipeline, &ctx, api.client.clone(), options).await;
    if !problems.is_empty() {
        return Err(RunError::Invalid(problems));
    }
    let steps = &pipeline.spec.steps;
    // The views `prepare` planned are replaced, one by one, by the steps' materialized files.
    for step in steps {
        ctx.deregister_table(step.name.as_str())
            .map_err(|e| RunError::from_step(&step.name, e))?;
    }
    let mut step_rows = Vec::with_capacity(steps.len());
    // Rows of a step with one enrich call whose `run_status` is not `completed`: besides
    // failed runs, this counts rows whose output did not fit the schema or had no run.
    let mut failed_by_task: BTreeMap<String, u64> = BTreeMap::new();
    // Outputs written while their step runs, by output.
    let mut early: BTreeMap<
        usize,
        tokio::task::JoinHandle<Result<output::StagedOutput, output::OutputError>>,
    > = BTreeMap::new();
    for (i, step) in steps.iter().enumerate() {
        progress.step_started(i, steps.len(), &step.name);
        let t = Instant::now();
        let df = ctx
            .sql(&step.sql)
            .await
            .map_err(|e| RunError::from_step(&step.name, e))?;
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| RunError::from_step(&step.name, e))?;
        let path = work.step_file(&step.name);
        // An output of this step is written from its batches as it runs, rather than read
        // back from the step's file once that is whole: the output's encoding then runs
        // beside the step instead of after it.
        let mut tees = Vec::new();
        for (j, out) in pipeline.spec.outputs.iter().enumerate() {
            if out.from != step.name {
                continue;
            }
            let target = output_target(pipeline, j)?;
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let batches = RecordBatchStreamAdapter::new(
                stream.schema(),
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
                ),
            );
            let dir = work.staging_dir();
            early.insert(
                j,
                tokio::spawn(async move { output::stage(&target, Box::pin(batches), &dir).await }),
            );
            tees.push(tx);
        }
        let rows = materialize(&step.name, stream, path.clone(), tees).await?;
        // A step that stopped reading an enrich(...) early (a LIMIT) left its results still
        // being stored: every run paid for keeps its result, and a failure fails the step.
        readings.wait().await.map_err(|e| {
            RunError::from_step(
                &step.name,
                datafusion::error::DataFusionError::External(Box::new(e)),
            )
        })?;
        ctx.register_arrow(
            step.name.as_str(),
            &path.display().to_string(),
            ArrowReadOptions::default(),
        )
        .await
        .map_err(|e| RunError::from_step(&step.name, e))?;
        progress.step_done(i, steps.len(), &step.name, rows, t.elapsed());
        pause_point("step.done");
        step_rows.push((step.name.clone(), rows));
        let calls: Vec<_> = prepared
            .enrich_calls
            .iter()
            .filter(|c| c.step == i)
            .collect();
        if let [call] = calls.as_slice() {
            let failed = failed_rows(&ctx, &step.name).await?;
            *failed_by_task.entry(call.task.clone()).or_default() += failed;
        }
    }

    // Every step is done, so every result is stored: the ledger's log is copied into its
    // database while the outputs are written, on the core they leave idle, rather than by
    // the ledger's last close once they are.
    let checkpoint = ledger
        .clone()
        .map(|l| tokio::spawn(async move { l.checkpoint().await }));
    let mut staged = Vec::new();
    for (i, out) in pipeline.spec.outputs.iter().enumerate() {
        if let Some(written) = early.remove(&i) {
            let written = written
                .await
                .map_err(|e| RunError::Storage(format!("output {}: {e}", out.path)))?;
            staged.push(written?);
            continue;
        }
        let target = output_target(pipeline, i)?;
        let df = ctx
            .table(out.from.as_str())
            .await
            .map_err(|e| RunError::from_step(&out.from, e))?;
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| RunError::from_step(&out.from, e))?;
        staged.push(output::stage(&target, stream, &work.staging_dir()).await?);
    }
    if let Some(c) = checkpoint {
        c.await
            .map_err(|e| RunError::Storage(format!("ledger checkpoint: {e}")))?
            .map_err(|e| RunError::Storage(e.to_string()))?;
    }
    pause_point("output.staged");
    for s in &staged {
        s.prepare()?;
    }
    let mut written = Vec::new();
    for s in staged {
        let store = match &s.target().place {
            Location::S3(url) => Some(
                crate::source::register_object_store(&ctx, url.as_str(), None).map_err(|e| {
                    RunError::Storage(format!("output {}: {e}", s.target().display))
                })?,
            ),
            Location::Local(_) => None,
        };
        let w = s.commit(store).await?;
        if let Some(l) = &ledger {
            l.record_output(&w.display, w.rows)
                .await
                .map_err(|e| RunError::Storage(e.to_string()))?;
        }
        written.push(w);
        pause_point("output.committed");
    }
    // Every output is in place: this attempt is done, its results the cache of the next.
    if let Some(l) = &ledger {
        l.finish()
            .await
            .map_err(|e| RunError::Storage(e.to_string()))?;
        // Results replaced in this run may leave the log mostly unused bytes. The run's
        // work is done and kept either way, so a failed compaction is only reported.
        match l.compact().await {
            Ok(Some((before, after))) => progress.println(format!(
                "state: result log compacted, {:.1} MB → {:.1} MB (results replaced by later runs dropped)",
                before as f64 / 1e6,
                after as f64 / 1e6
            )),
            Ok(None) => {}
            Err(e) => progress.println(format!(
                "groupflow: the result log was not compacted (the run's results are kept): {e}"
            )),
        }
    }
    for w in &written {
        progress.println(format!("output {}: {} row(s) written", w.display, w.rows));
    }
    let reports = progress.finish();
    Ok(Summary {
        pipeline: pipeline.spec.name.clone(),
        api: api.target.clone(),
        steps: step_rows,
        tasks: task_summaries(pipeline, &reports, &failed_by_task),
        outputs: written,
        elapsed: started.elapsed(),
    })
}

/// Every task the pipeline defines, with what it did (tasks never called show zeros).
fn task_summaries(
    pipeline: &Pipeline,
    reports: &[TaskReport],
    failed_rows: &BTreeMap<String, u64>,
) -> Vec<TaskSummary> {
    let by_task: BTreeMap<&str, &TaskReport> =
        reports.iter().map(|r| (r.task.as_str(), r)).collect();
    pipeline
        .spec
        .tasks
        .iter()
        .map(|(name, task)| {
            let r = by_task.get(name.as_str());
            TaskSummary {
                task: name.clone(),
                processor: task.processor.clone(),
                group_ids: r.map(|r| r.group_ids.clone()).unwrap_or_default(),
                claims: r.map(|r| r.claims).unwrap_or_default(),
                failed: failed_rows.get(name).copied().unwrap_or(0),
                max_failed_ratio: task.max_failed_ratio,
            }
        })
        .collect()
}

/// Rows of materialized step `step` whose `run_status` is not `completed` (0 when the step
/// has no such column).
async fn failed_rows(ctx: &SessionContext, step: &str) -> Result<u64, RunError> {
    let df = ctx
        .table(step)
        .await
        .map_err(|e| RunError::from_step(step, e))?;
    if df
        .schema()
        .field_with_unqualified_name("run_status")
        .is_err()
    {
        return Ok(0);
    }
    let failed = df
        .filter({
            use datafusion::prelude::{col, lit};
            col("run_status")
                .not_eq(lit("completed"))
                .or(col("run_status").is_null())
        })
        .map_err(|e| RunError::from_step(step, e))?
        .count()
        .await
        .map_err(|e| RunError::from_step(step, e))?;
    Ok(failed as u64)
}

/// Where and how output `i` is written.
pub fn output_target(pipeline: &Pipeline, i: usize) -> Result<OutputTarget, RunError> {
    let out = &pipeline.spec.outputs[i];
    let place = pipeline
        .locate(&out.path)
        .map_err(|e| RunError::Config(format!("output {}: {e}", out.path)))?;
    let format = pipeline
        .output_format(i)
        .ok_or_else(|| RunError::Config(format!("output {}: unknown format", out.path)))?;
    Ok(OutputTarget {
        display: out.path.clone(),
        place,
        format,
    })
}

/// Writes a step's result to an Arrow IPC file (via a temporary name, so a file under the
/// final name is always whole), and hands each batch to `tees` as well (the outputs
/// written as the step runs; a failed step hands them an error). Returns the rows written.
async fn materialize(
    step: &str,
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    path: PathBuf,
    tees: Vec<Tee>,
) -> Result<u64, RunError> {
    let schema: SchemaRef = stream.schema();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(2);
    let storage = |e: &dyn fmt::Display| RunError::Storage(format!("step `{step}`: {e}"));
    let tmp = path.with_extension("arrow.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| storage(&e))?;
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let mut w = arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)
            .map_err(|e| e.to_string())?;
        let mut rows = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            rows += batch.num_rows() as u64;
            w.write(&batch).map_err(|e| e.to_string())?;
        }
        w.finish().map_err(|e| e.to_string())?;
        Ok(rows)
    });
    let mut failure = None;
    while let Some(batch) = stream.next().await {
        match batch {
            Ok(b) => {
                // An output whose writing failed says so when it is awaited.
                for t in &tees {
                    let _ = t.send(Ok(b.clone())).await;
                }
                if tx.send(b).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                for t in &tees {
                    let _ = t
                        .send(Err(datafusion::error::DataFusionError::Execution(format!(
                            "step `{step}` failed"
                        ))))
                        .await;
                }
                failure = Some(RunError::from_step(step, e));
                break;
            }
        }
    }
    drop(tx);
    let rows = writer.await.map_err(|e| storage(&e))?;
    if let Some(e) = failure {
        return Err(e);
    }
    let rows = rows.map_err(|e| storage(&e))?;
    std::fs::rename(&tmp, &path).map_err(|e| storage(&e))?;
    Ok(rows)
}

/// Where a step's batches go besides its file: an output written as the step runs.
type Tee = tokio::sync::mpsc::Sender<datafusion::error::Result<RecordBatch>>;

/// Counts what each enrich call would submit, without an API and without running any
/// task: the source of each call is counted when it does not need another task's results.
pub async fn dry_run(pipeline: &Pipeline) -> Result<Vec<DryRunLine>, RunError> {
    let ctx: SessionContext = validate::session();
    let client = validate::offline_client().map_err(|e| RunError::Config(e.to_string()))?;
    let (prepared, problems) =
        validate::prepare(pipeline, &ctx, client, EnrichOptions::default()).await;
    if !problems.is_empty() {
        return Err(RunError::Invalid(problems));
    }
    let mut lines = Vec::new();
    for call in &prepared.enrich_calls {
        let step = &pipeline.spec.steps[call.step];
        let processor = pipeline
            .spec
            .tasks
            .get(&call.task)
            .map(|t| t.processor.clone())
            .unwrap_or_default();
        let query = if validate::is_query(&call.source) {
            call.source.clone()
        } else {
            format!("SELECT * FROM {}", call.source)
        };
        let reads_enrich = validate::tables_in(&ctx, &query)
            .map_err(|e| RunError::from_step(&step.name, e))?
            .iter()
            .any(|t| prepared.needs_enrich(pipeline, t));
        let runs = if reads_enrich {
            None
        } else {
            let df = ctx
                .sql(&query)
                .await
                .map_err(|e| RunError::from_step(&step.name, e))?;
            Some(
                df.count()
                    .await
                    .map_err(|e| RunError::from_step(&step.name, e))? as u64,
            )
        };
        lines.push(DryRunLine {
            step: step.name.clone(),
            task: call.task.clone(),
            processor,
            runs,
        });
    }
    Ok(lines)
}
