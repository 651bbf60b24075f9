//! Command line: `run`, `validate`, `schema`, `serve`, `groups status|results`.
//!
//! Exit codes are decided in one place, [`exit_code`], from the error kinds of the library.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::pipeline::{self, ProgressMode, RunError, RunOptions};

/// Exit codes of every command.
pub mod exit {
    /// Everything worked.
    pub const OK: i32 = 0;
    /// Anything else: an output or state file could not be written, an internal error.
    pub const FAILURE: i32 = 1;
    /// Bad input or configuration: the pipeline file, its data, flags, environment.
    pub const INVALID: i32 = 2;
    /// The API refused the credentials.
    pub const AUTH: i32 = 3;
    /// The API failed (after retries).
    pub const API: i32 = 4;
    /// A task had more failed rows than its `max_failed_ratio` (outputs are written).
    pub const TOO_MANY_FAILED: i32 = 5;
    /// Interrupted (Ctrl-C); no output was written.
    pub const INTERRUPTED: i32 = 130;
}

/// The exit code of a run that stopped with `e`.
pub fn exit_code(e: &RunError) -> i32 {
    match e {
        RunError::Load(_) | RunError::Invalid(_) | RunError::Data(_) | RunError::Config(_) => {
            exit::INVALID
        }
        RunError::Auth(_) => exit::AUTH,
        RunError::Api(_) => exit::API,
        RunError::Storage(_) => exit::FAILURE,
    }
}

const AFTER_HELP: &str = "\
Exit codes: 0 ok; 1 other failure (e.g. an output could not be written); 2 bad input or
configuration; 3 authentication; 4 API error; 5 too many failed rows; 130 interrupted.

Environment: PARALLEL_API_KEY and PARALLEL_BASE_URL select the API (with neither, `run`
starts an embedded local server); GROUPFLOW_STATE_DIR moves the state directory; AWS_*
configure S3; RUST_LOG sets the log level (default warn).";

/// groupflow: tables in, Parallel Task Group runs out.
///
/// Reads CSV, Parquet or NDJSON (local or S3), turns rows into Parallel task runs, and
/// writes the typed results back out, as declared in a pipeline file.
#[derive(Debug, Parser)]
#[command(name = "groupflow", version, about, long_about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run a pipeline: read its sources, run its steps, write its outputs.
    ///
    /// Checks the pipeline as `validate` does, then runs each step once (a task's runs are
    /// submitted once, whatever reads the step), then writes every output atomically.
    ///
    /// With neither PARALLEL_API_KEY nor PARALLEL_BASE_URL set, the runs go to a local
    /// server started in-process (sim processor), which costs nothing. Progress goes to
    /// stderr (bars on a terminal, lines otherwise); the summary to stdout.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Check a pipeline without running it; report every problem, one per line.
    ///
    /// Checks the file's structure, names and references, the output schemas against the
    /// API's limits, each task's input mapping against its source's columns, and plans every
    /// step's SQL against the sources' schemas (nothing is executed or submitted). Each
    /// problem is one line, `file:line:column: what is wrong — what to do`; the exit code
    /// is 2 if there is any.
    #[command(after_help = AFTER_HELP)]
    Validate(ValidateArgs),
    /// Print the JSON Schema of pipeline files (for editors: yaml-language-server, VS Code).
    Schema,
    /// Run the local Task Group server (the Parallel Task Group API on this machine).
    Serve(crate::server::ServeArgs),
    /// Inspect or collect an existing task group.
    #[command(subcommand)]
    Groups(GroupsCommand),
}

/// Flags of `groupflow run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (YAML, `version: 1`).
    pub pipeline: PathBuf,
    /// State directory (embedded server database, per-run work files); default
    /// `.groupflow/` beside the pipeline file.
    #[arg(long, env = "GROUPFLOW_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print how many runs each task would submit, and on which processor; submit
    /// nothing, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How to show progress on stderr.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Submit again the rows whose runs failed in earlier runs (completed results are
    /// reused); their new results replace the failed ones in the output.
    #[arg(long)]
    pub retry_failed: bool,
    /// Do not reuse results of earlier runs: submit every distinct input again. (An
    /// interrupted run is still resumed without resubmitting what it already sent.)
    #[arg(long)]
    pub no_cache: bool,
    /// Submit again the inputs that another pipeline's interrupted run (same task, same
    /// state directory) claimed and never got a result for, instead of stopping at the
    /// first one. Those inputs are paid for again; that pipeline, run later, reuses this
    /// run's results. Inputs of a pipeline that is running now are never taken over.
    #[arg(long)]
    pub take_over_pending: bool,
}

/// Flags of `groupflow validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files to check.
    #[arg(required = true)]
    pub pipelines: Vec<PathBuf>,
}

/// `groupflow groups …`
#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Print a group's status: how many runs, and how many in each status.
    Status(GroupArgs),
    /// Write every run of a group (input, status, output, basis) to a file.
    Results(GroupResultsArgs),
}

/// Which API and group.
#[derive(Debug, Args)]
pub struct GroupArgs {
    /// The group id (`tgrp_…`).
    pub group_id: String,
    /// Without PARALLEL_API_KEY / PARALLEL_BASE_URL: the state directory whose embedded
    /// server database holds the group (default `./.groupflow`).
    #[arg(long, env = "GROUPFLOW_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Flags of `groupflow groups results`.
#[derive(Debug, Args)]
pub struct GroupResultsArgs {
    #[command(flatten)]
    pub group: GroupArgs,
    /// Where to write: a local path or s3://bucket/key; the format follows the extension
    /// (.parquet, .csv, .ndjson).
    #[arg(long, value_name = "PATH")]
    pub out: String,
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::INVALID
            } else {
                exit::OK
            };
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    let code = match cli.command {
        Commands::Serve(args) => match runtime.block_on(crate::server::serve(args)) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {e}");
                exit::INVALID
            }
        },
        Commands::Run(args) => runtime.block_on(run(args)),
        Commands::Validate(args) => runtime.block_on(validate(args)),
        Commands::Groups(cmd) => runtime.block_on(groups::main(cmd)),
        Commands::Schema => print_schema(),
    };
    // Writers on blocking threads stop as soon as their channels close; do not wait long.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

fn print_schema() -> i32 {
    match serde_json::to_string_pretty(pipeline::schema::pipeline_schema()) {
        Ok(text) => {
            println!("{text}");
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> i32 {
    let loaded = match pipeline::Pipeline::load(&args.pipeline) {
        Ok(p) => p,
        Err(e) => return report(&RunError::Load(e)),
    };
    if args.dry_run {
        return match pipeline::dry_run(&loaded).await {
            Ok(lines) => {
                if lines.is_empty() {
                    println!("no step calls enrich(): nothing would be submitted");
                }
                for line in lines {
                    println!("{line}");
                }
                println!("dry run: nothing was submitted and no output was written");
                exit::OK
            }
            Err(e) => report(&e),
        };
    }
    let state = pipeline::StateDir::for_pipeline(&args.pipeline, args.state_dir.as_deref());
    let options = RunOptions {
        state_dir: args.state_dir,
        ledger: crate::ledger::LedgerOptions {
            no_cache: args.no_cache,
            retry_failed: args.retry_failed,
            take_over_pending: args.take_over_pending,
        },
    };
    let progress = pipeline::Progress::new(args.progress);
    let interrupted = || {
        progress.finish();
        eprintln!(
            "interrupted: submitting stopped and no output was written; the runs already submitted are recorded in {} — run `groupflow run {}` again to resume without submitting them again",
            state.ledger_db().display(),
            args.pipeline.display()
        );
        exit::INTERRUPTED
    };
    // The signal handler sets a flag that stops add-runs POSTs at once; tokio's wake-up
    // below comes when its driver next runs, and ends the run.
    if let Err(e) = crate::interrupt::watch() {
        tracing::warn!("Ctrl-C will stop submitting only when the runtime sees it: {e}");
    }
    // Ctrl-C is looked at first: when it and the pipeline are both ready, the pipeline is
    // not polled again.
    let outcome = tokio::select! {
        biased;
        _ = tokio::signal::ctrl_c() => return interrupted(),
        r = pipeline::run(&loaded, &options, &progress) => r,
    };
    // The flag stopped a POST before tokio saw the signal: the same interruption.
    if outcome.is_err() && crate::interrupt::requested() {
        return interrupted();
    }
    match outcome {
        Ok(summary) => {
            print!("{summary}");
            let over = summary.over_limit();
            if over.is_empty() {
                exit::OK
            } else {
                for t in over {
                    eprintln!(
                        "error: task {}: {} of {} rows failed ({:.1}%), more than max_failed_ratio {} — outputs are written with run_status = 'failed' on those rows; raise max_failed_ratio, or run again with --retry-failed to resubmit only them",
                        t.task,
                        t.failed,
                        t.rows(),
                        t.failed_ratio() * 100.0,
                        t.max_failed_ratio
                    );
                }
                exit::TOO_MANY_FAILED
            }
        }
        Err(e) => report(&e),
    }
}

/// Prints an error's lines on stderr and returns its exit code.
fn report(e: &RunError) -> i32 {
    for line in e.lines() {
        eprintln!("{line}");
    }
    exit_code(e)
}

async fn validate(args: ValidateArgs) -> i32 {
    let mut code = exit::OK;
    for path in &args.pipelines {
        let problems = match pipeline::validate::check_file(path).await {
            Ok(problems) => problems,
            Err(pipeline::LoadError::Invalid(problems)) => problems,
            Err(e) => {
                code = code.max(report(&RunError::Load(e)));
                continue;
            }
        };
        if problems.is_empty() {
            println!("{}: ok", path.display());
            continue;
        }
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{}: {} problem(s)", path.display(), problems.len());
        code = code.max(exit::INVALID);
    }
    code
}

mod groups {
    //! `groupflow groups status|results`.

    use std::net::SocketAddr;

    use super::*;
    use crate::client::{API_KEY_ENV, BASE_URL_ENV, Client, ClientConfig};
    use crate::pipeline::output::{self, OutputTarget};
    use crate::server::{self, ServerConfig, ServerHandle};

    pub async fn main(cmd: GroupsCommand) -> i32 {
        let group = match &cmd {
            GroupsCommand::Status(g) => g,
            GroupsCommand::Results(r) => &r.group,
        };
        let (client, server) = match connect(group.state_dir.as_deref()).await {
            Ok(c) => c,
            Err(e) => return report(&e),
        };
        let result = match &cmd {
            GroupsCommand::Status(g) => status(&client, &g.group_id).await,
            GroupsCommand::Results(r) => results(&client, &r.group.group_id, &r.out).await,
        };
        if let Some(s) = server {
            s.shutdown().await;
        }
        match result {
            Ok(()) => exit::OK,
            Err(e) => report(&e),
        }
    }

    /// The configured API; without one, the embedded server's database in the state dir.
    async fn connect(state_dir: Option<&Path>) -> Result<(Client, Option<ServerHandle>), RunError> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        if set(API_KEY_ENV) || set(BASE_URL_ENV) {
            let client = Client::new(ClientConfig::from_env())
                .map_err(|e| RunError::Config(e.to_string()))?;
            return Ok((client, None));
        }
        let dir = state_dir.unwrap_or(Path::new(pipeline::state::DEFAULT_STATE_DIR));
        let db = pipeline::state::StateDir::for_pipeline(Path::new("x"), Some(dir)).server_db();
        if !db.exists() {
            return Err(RunError::Config(format!(
                "no API configured and no embedded server state at {} — set PARALLEL_API_KEY (or PARALLEL_BASE_URL), or pass --state-dir of the pipeline that made the group",
                db.display()
            )));
        }
        let handle = server::start(ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: Some(db.clone()),
            ..ServerConfig::default()
        })
        .await
        .map_err(|e| {
            RunError::Config(if e.is_in_use() {
                format!(
                    "embedded server: {} is in use by another groupflow process (a `groupflow run` in this state directory, or `groupflow serve`); try again when it ends, or set PARALLEL_BASE_URL to that server",
                    db.display()
                )
            } else {
                format!("embedded server: {e}")
            })
        })?;
        let client = Client::new(ClientConfig::new(handle.base_url()))
            .map_err(|e| RunError::Config(e.to_string()))?;
        Ok((client, Some(handle)))
    }

    fn api_error(e: crate::client::ClientError) -> RunError {
        if e.is_auth() {
            RunError::Auth(format!("{e} — check PARALLEL_API_KEY"))
        } else if e.status() == Some(404) {
            RunError::Config(e.to_string())
        } else {
            RunError::Api(e.to_string())
        }
    }

    async fn status(client: &Client, id: &str) -> Result<(), RunError> {
        let g = client.get_group(id).await.map_err(api_error)?;
        println!(
            "group {}: {} run(s), {}",
            g.taskgroup_id,
            g.status.num_task_runs,
            if g.status.is_active { "active" } else { "done" }
        );
        for (status, n) in &g.status.task_run_status_counts {
            println!("  {status}: {n}");
        }
        Ok(())
    }

    async fn results(client: &Client, id: &str, out: &str) -> Result<(), RunError> {
        let place = pipeline::load::locate(Path::new("."), out).map_err(RunError::Config)?;
        let format = pipeline::FileFormat::from_path(out).ok_or_else(|| {
            RunError::Config(format!(
                "cannot tell the format of {out:?} — end it in .parquet, .csv or .ndjson"
            ))
        })?;
        let ctx = pipeline::validate::session();
        crate::sql::register(
            &ctx,
            Default::default(),
            client.clone(),
            crate::sql::EnrichOptions::default(),
        )
        .map_err(|e| RunError::Config(e.to_string()))?;
        let literal = id.replace('\'', "''");
        let q = format!("SELECT * FROM {}('{literal}')", crate::sql::TASK_GROUP_RUNS);
        let df = ctx
            .sql(&q)
            .await
            .map_err(|e| RunError::from_step("groups results", e))?;
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| RunError::from_step("groups results", e))?;
        let staging = tempfile::tempdir().map_err(|e| RunError::Storage(e.to_string()))?;
        let target = OutputTarget {
            display: out.to_string(),
            place: place.clone(),
            format,
        };
        let staged = output::stage(&target, stream, staging.path()).await?;
        let store = match &place {
            pipeline::Location::S3(url) => Some(
                crate::source::register_object_store(&ctx, url.as_str(), None)
                    .map_err(|e| RunError::Storage(e.to_string()))?,
            ),
            pipeline::Location::Local(_) => None,
        };
        let written = staged.commit(store).await?;
        println!("{}: {} row(s)", written.display, written.rows);
        Ok(())
    }
}

/// Logs go to stderr; `RUST_LOG` sets the level (default `warn`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
