//! Exactly once across crashes: `groupflow run` killed with SIGKILL at fixed points and at
//! random moments, interrupted with Ctrl-C, re-run with `--retry-failed`, re-run with the
//! result cache on and off, and run through an API that drops, refuses and cuts requests.
//!
//! Every case runs the real binary against `groupflow serve` (a child process on a loopback
//! port, SQLite file), and counts the runs in that server's own database afterwards: one
//! run per distinct input, never more, and every source row in the output.
//!
//! Kill points are made deterministic with `GROUPFLOW_PAUSE_AT=NAME:N`: the process stops
//! itself (SIGSTOP) the N-th time it passes that point, and the test then kills it with
//! SIGKILL, so it dies exactly there.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{SortOptions, concat_batches, sort_to_indices, take_record_batch};
use arrow::datatypes::{DataType, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_groupflow");

/// Source rows, and how many distinct inputs they hold: rows `DISTINCT..ROWS` repeat the
/// inputs of rows `0..ROWS - DISTINCT`.
const ROWS: usize = 3000;
const DISTINCT: usize = 2400;

const AMBIENT: &[&str] = &[
    "PARALLEL_API_KEY",
    "PARALLEL_BASE_URL",
    "GROUPFLOW_STATE_DIR",
    "GROUPFLOW_PAUSE_AT",
];

/// `groupflow serve` with a SQLite file, as a child process; killed when dropped.
struct Serve {
    url: String,
    db: PathBuf,
    _server: common::Serve,
}

impl Serve {
    fn start(db: &Path, extra: &[&str]) -> Serve {
        let db_arg = db.display().to_string();
        let mut args = vec!["--db", &db_arg];
        args.extend_from_slice(extra);
        let server = common::Serve::start(&args);
        Serve {
            url: server.url.clone(),
            db: db.to_path_buf(),
            _server: server,
        }
    }

    /// Runs stored by the server: (all, distinct inputs), read from its own database.
    fn runs(&self) -> (u64, u64) {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row(
            "SELECT count(*), count(DISTINCT input) FROM runs",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
        .unwrap()
    }

    /// How many times each input was submitted, for the inputs submitted more than once.
    fn repeated_inputs(&self) -> BTreeMap<String, u64> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut s = conn
            .prepare("SELECT input, count(*) FROM runs GROUP BY input HAVING count(*) > 1")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

/// A folder with the test pipeline and its CSV (`ROWS` rows, `DISTINCT` distinct inputs).
fn project(processor: &str, max_failed_ratio: f64) -> tempfile::TempDir {
    project_sized(processor, max_failed_ratio, ROWS, DISTINCT)
}

/// The test pipeline over `rows` rows holding `distinct` distinct inputs.
fn project_sized(
    processor: &str,
    max_failed_ratio: f64,
    rows: usize,
    distinct: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("id,name,website\n");
    for i in 0..rows {
        let c = i % distinct;
        csv.push_str(&format!("{i},Company {c},https://company-{c}.example\n"));
    }
    std::fs::write(dir.path().join("companies.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("research.yaml"),
        format!(
            "version: 1
name: research
sources:
  companies: {{ path: companies.csv }}
tasks:
  research:
    processor: {processor}
    input: {{ company_name: name, company_website: website }}
    output:
      type: object
      properties:
        founded_year: {{ type: integer }}
        summary: {{ type: string }}
      required: [founded_year, summary]
    max_failed_ratio: {max_failed_ratio}
steps:
  - name: enriched
    sql: SELECT * FROM enrich('research', 'companies')
  - name: by_company
    sql: SELECT name, count(*) AS n, min(run_status) AS status FROM enriched GROUP BY name ORDER BY name
outputs:
  - {{ from: enriched, path: out/enriched.parquet }}
  - {{ from: by_company, path: out/by_company.csv }}
"
        ),
    )
    .unwrap();
    dir
}

fn run_command(dir: &Path, server: &Serve, args: &[&str], env: &[(&str, &str)]) -> Command {
    pipeline_command(dir, server, "research.yaml", args, env)
}

/// `groupflow run` of the pipeline file `pipeline` in `dir`.
fn pipeline_command(
    dir: &Path,
    server: &Serve,
    pipeline: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .args(["--progress", "lines", pipeline])
        .args(args)
        .current_dir(dir);
    for k in AMBIENT {
        cmd.env_remove(k);
    }
    cmd.env("PARALLEL_BASE_URL", &server.url);
    cmd.envs(env.iter().copied());
    cmd
}

fn run(dir: &Path, server: &Serve, args: &[&str]) -> Output {
    run_command(dir, server, args, &[])
        .output()
        .expect("run groupflow")
}

/// Runs the pipeline to the end, expecting exit 0; returns its summary (stdout).
fn run_ok(dir: &Path, server: &Serve, args: &[&str]) -> String {
    let out = run(dir, server, args);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    stdout(&out)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The result log files of the project in `dir`, by name.
fn result_logs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(".groupflow"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ledger.results"))
        .collect();
    names.sort();
    names
}

/// Starts a run that stops itself at `point` and returns once it has stopped there: the
/// child, its stderr (still open), and what it printed up to the pause.
fn start_paused(
    dir: &Path,
    server: &Serve,
    point: &str,
) -> (Child, BufReader<ChildStderr>, String) {
    let mut child = run_command(dir, server, &[], &[("GROUPFLOW_PAUSE_AT", point)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let marker = format!("groupflow: paused at {point}");
    let mut seen = String::new();
    while !seen.contains(&marker) {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!("groupflow ended ({status}) before `{marker}`:\n{seen}");
        }
        seen.push_str(&line);
    }
    wait_stopped(child.id());
    (child, stderr, seen)
}

/// Starts a run that stops itself at `point`, and kills it there (SIGKILL). Returns what
/// it printed on stderr.
fn kill_at(dir: &Path, server: &Serve, point: &str) -> String {
    let (mut child, _stderr, seen) = start_paused(dir, server, point);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal:\n{seen}");
    seen
}

/// Waits until process `pid` is stopped (it prints its pause line just before stopping).
fn wait_stopped(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&stat).unwrap();
        // The state follows the parenthesized command name.
        let state = text.rsplit_once(") ").unwrap().1.chars().next();
        if state == Some('T') {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The enriched output, sorted by id.
fn enriched(dir: &Path) -> RecordBatch {
    enriched_at(dir, "out/enriched.parquet")
}

/// The enriched output at `file` in `dir`, sorted by id.
fn enriched_at(dir: &Path, file: &str) -> RecordBatch {
    let path = dir.join(file);
    let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let all = concat_batches(&batches[0].schema(), &batches).unwrap();
    let order = sort_to_indices(
        all.column_by_name("id").unwrap(),
        Some(SortOptions::default()),
        None,
    )
    .unwrap();
    take_record_batch(&all, &order).unwrap()
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<Option<String>> {
    let a = arrow::compute::cast(batch.column_by_name(column).unwrap(), &DataType::Utf8).unwrap();
    let a = a.as_string::<i32>();
    (0..a.len())
        .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
        .collect()
}

/// Every row's run completed.
fn assert_all_completed(batch: &RecordBatch) {
    let status = strings(batch, "run_status");
    assert!(
        status.iter().all(|s| s.as_deref() == Some("completed")),
        "{} row(s) not completed",
        status
            .iter()
            .filter(|s| s.as_deref() != Some("completed"))
            .count()
    );
}

/// The output without `run_id` (which names runs of one particular server).
fn without_run_ids(batch: &RecordBatch) -> RecordBatch {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|i| batch.schema().field(*i).name() != "run_id")
        .collect();
    batch.project(&keep).unwrap()
}

/// The output of one uninterrupted run on a fresh server, made once per test process.
fn reference() -> &'static RecordBatch {
    static REFERENCE: OnceLock<RecordBatch> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = project("core", 0.1);
        let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
        let out = run(dir.path(), &server, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        without_run_ids(&enriched(dir.path()))
    })
}

/// Every source row once, in id order, each completed, equal to the uninterrupted run's
/// output; identical inputs carry the same run.
fn assert_complete_output(dir: &Path) {
    let out = enriched(dir);
    assert_eq!(out.num_rows(), ROWS);
    let ids: Vec<i64> = out
        .column_by_name("id")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(ids, (0..ROWS as i64).collect::<Vec<_>>());
    assert_all_completed(&out);
    let run_ids = strings(&out, "run_id");
    for i in DISTINCT..ROWS {
        assert_eq!(
            run_ids[i],
            run_ids[i - DISTINCT],
            "rows {i} and {}",
            i - DISTINCT
        );
    }
    assert_eq!(
        run_ids.iter().collect::<BTreeSet<_>>().len(),
        DISTINCT,
        "one run per distinct input"
    );
    assert_eq!(&without_run_ids(&out), reference());
    let by_company = std::fs::read_to_string(dir.join("out/by_company.csv")).unwrap();
    assert_eq!(by_company.lines().count(), DISTINCT + 1);
}

/// The server's run count once it has not changed for half a second.
fn settled_runs(server: &Serve) -> u64 {
    let mut last = server.runs().0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = server.runs().0;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Kills a run at `point`, runs it again to the end, and checks that the server holds
/// exactly one run per distinct input and the output is whole.
fn kill_and_resume(point: &str, outputs_before: usize) {
    let dir = project("core", 0.1);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let seen = kill_at(dir.path(), &server, point);
    let written: Vec<bool> = ["out/enriched.parquet", "out/by_company.csv"]
        .iter()
        .map(|p| dir.path().join(p).exists())
        .collect();
    assert_eq!(
        written.iter().filter(|w| **w).count(),
        outputs_before,
        "outputs in place when killed at {point}: {written:?}\n{seen}"
    );
    // POSTs the run had sent before it stopped may still be landing: wait until the
    // server's count holds still.
    let runs_then = settled_runs(&server);
    assert!(runs_then <= DISTINCT as u64, "{runs_then} runs at the kill");

    let out = run(dir.path(), &server, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("resuming the interrupted run of research"),
        "{stderr}"
    );
    assert_eq!(
        stderr.contains("outputs it had committed (out/enriched.parquet)"),
        outputs_before == 1,
        "{stderr}"
    );
    assert_eq!(
        server.runs(),
        (DISTINCT as u64, DISTINCT as u64),
        "killed at {point}: repeated inputs {:?}",
        server.repeated_inputs()
    );
    // The resumed run submitted only what the killed one had not.
    let summary = stdout(&out);
    let submitted = DISTINCT as u64 - runs_then;
    assert!(
        summary.contains(&format!("runs submitted {submitted},")),
        "killed at {point} with {runs_then} runs out:\n{summary}"
    );
    assert_complete_output(dir.path());
    // A finished run leaves no work files, and the next run starts a new attempt.
    let work = dir.path().join(".groupflow/work");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
}

#[test]
fn killed_after_the_group_is_recorded_before_any_run() {
    kill_and_resume("group.recorded:1", 0);
}

#[test]
fn killed_after_claiming_rows_whose_post_was_never_sent() {
    kill_and_resume("runs.claimed:1", 0);
}

#[test]
fn killed_early_in_submission() {
    kill_and_resume("runs.added:1", 0);
}

#[test]
fn killed_late_in_submission() {
    kill_and_resume("runs.added:4", 0);
}

#[test]
fn killed_while_results_stream_in() {
    kill_and_resume("results.stored:2", 0);
}

#[test]
fn killed_with_results_in_the_log_but_not_yet_linked_to_their_runs() {
    kill_and_resume("results.logged:2", 0);
}

#[test]
fn killed_after_the_enrich_step_is_materialized() {
    kill_and_resume("step.done:1", 0);
}

#[test]
fn killed_with_every_output_staged_and_none_committed() {
    kill_and_resume("output.staged:1", 0);
}

#[test]
fn killed_between_two_output_commits() {
    kill_and_resume("output.committed:1", 1);
}

/// Kills at moments chosen by a clock, not by the code: three kills, then a run to the end.
#[test]
fn killed_at_random_moments_three_times() {
    let dir = project("core", 0.1);
    // Runs take 0–20 ms each, so the whole job lasts long enough to be hit anywhere.
    let server = Serve::start(
        &dir.path().join("server.sqlite"),
        &["--sim-latency-ms", "0..20", "--concurrency", "16"],
    );
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut delays = Vec::new();
    for k in 0..3u64 {
        let delay = Duration::from_millis(150 + (seed.wrapping_mul(k + 7) >> 3) % 1500);
        delays.push(delay);
        let mut child = run_command(dir.path(), &server, &[], &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        child.wait().unwrap();
    }
    let out = run(dir.path(), &server, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "kills after {delays:?}: {}",
        show(&out)
    );
    assert_eq!(
        server.runs(),
        (DISTINCT as u64, DISTINCT as u64),
        "kills after {delays:?}: repeated inputs {:?}",
        server.repeated_inputs()
    );
    assert_complete_output(dir.path());
}

#[test]
fn ctrl_c_stops_submitting_writes_nothing_and_the_next_run_resumes() {
    // 40 batches of 500: Ctrl-C lands with most of them still to send.
    let (rows, distinct) = (20_000, 20_000);
    let dir = project_sized("core", 0.1, rows, distinct);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    // Stopped right after its second batch of runs was added; Ctrl-C arrives as it wakes.
    let (mut child, mut stderr, seen) = start_paused(dir.path(), &server, "runs.added:2");
    for signal in ["-INT", "-CONT"] {
        common::signal(child.id(), signal);
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{seen}{rest}");
    assert!(
        rest.contains("again to resume without submitting them again"),
        "{rest}"
    );
    assert!(rest.contains("ledger.sqlite"), "{rest}");
    assert!(!dir.path().join("out").exists(), "no output at all");
    // Submitting stopped far short of the 40 batches: the 2 recorded and at most the 4 in
    // flight. The signal handler's flag stops every later POST, however long the runtime
    // takes to see the signal (without it, 7 batches landed under load).
    let at_exit = settled_runs(&server);
    assert!(at_exit <= 6 * 500, "{at_exit} runs after Ctrl-C");

    let summary = run_ok(dir.path(), &server, &[]);
    assert!(
        summary.contains(&format!("runs submitted {},", distinct as u64 - at_exit)),
        "{summary}"
    );
    assert_eq!(server.runs(), (distinct as u64, distinct as u64));
    let enriched = enriched(dir.path());
    assert_eq!(enriched.num_rows(), rows);
    assert_all_completed(&enriched);
}

#[test]
fn identical_rows_share_a_run_and_reruns_reuse_stored_results() {
    let dir = project("core", 0.1);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let first = run_ok(dir.path(), &server, &[]);
    let dup = ROWS - DISTINCT;
    assert!(
        first.contains(&format!(
            "rows in {ROWS}, runs submitted {DISTINCT}, runs saved {dup} (0 cached, {dup} shared by identical rows, 0 resumed)"
        )),
        "{}",
        first
    );
    assert_eq!(server.runs(), (DISTINCT as u64, DISTINCT as u64));
    assert_complete_output(dir.path());
    let before = enriched(dir.path());

    // Unchanged: every result comes from the ledger; nothing is submitted.
    let again = run_ok(dir.path(), &server, &[]);
    assert!(
        again.contains(&format!(
            "rows in {ROWS}, runs submitted 0, runs saved {ROWS} ({ROWS} cached, 0 shared"
        )),
        "{}",
        again
    );
    assert_eq!(server.runs().0, DISTINCT as u64);
    // The same rows, down to the run ids.
    assert!(enriched(dir.path()) == before, "the output changed");

    assert_eq!(result_logs(dir.path()), ["ledger.results"]);

    // --no-cache: every distinct input again, still shared between identical rows.
    let out = run(dir.path(), &server, &["--no-cache"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let fresh = stdout(&out);
    assert!(
        fresh.contains(&format!("runs submitted {DISTINCT},")),
        "{}",
        fresh
    );
    assert_eq!(server.runs().0, 2 * DISTINCT as u64);
    // The results it replaced were half the result log: the log is rewritten without them,
    // and a run after that reads every result it kept from the new one.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state: result log compacted"),
        "{}",
        show(&out)
    );
    assert_eq!(result_logs(dir.path()), ["ledger.results.1"]);
    let replaced = enriched(dir.path());
    let again = run_ok(dir.path(), &server, &[]);
    assert!(
        again.contains(&format!(
            "runs submitted 0, runs saved {ROWS} ({ROWS} cached"
        )),
        "{}",
        again
    );
    assert!(enriched(dir.path()) == replaced, "the output changed");
    assert_eq!(server.runs().0, 2 * DISTINCT as u64);

    // Another processor is another task: nothing is reused.
    let yaml = dir.path().join("research.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(&yaml, text.replace("processor: core", "processor: base")).unwrap();
    let other = run_ok(dir.path(), &server, &[]);
    assert!(
        other.contains(&format!("runs submitted {DISTINCT},")),
        "{}",
        other
    );
    assert_eq!(server.runs().0, 3 * DISTINCT as u64);
}

#[test]
fn retry_failed_submits_only_the_failed_inputs_and_merges_their_results() {
    let dir = project("core", 1.0);
    let db = dir.path().join("server.sqlite");
    // A third of the runs fail (chosen by input, so every try of one input fails alike).
    let failing = Serve::start(&db, &["--sim-failure-rate", "0.3"]);
    run_ok(dir.path(), &failing, &[]);
    let out = enriched(dir.path());
    let status = strings(&out, "run_status");
    let names = strings(&out, "name");
    let failed_rows = status
        .iter()
        .filter(|s| s.as_deref() == Some("failed"))
        .count();
    let failed_inputs: BTreeSet<&Option<String>> = names
        .iter()
        .zip(&status)
        .filter(|(_, s)| s.as_deref() == Some("failed"))
        .map(|(n, _)| n)
        .collect();
    assert!(failed_rows > 0 && failed_rows < ROWS, "{failed_rows}");
    let completed_before: BTreeMap<i64, Option<String>> = (0..out.num_rows())
        .filter(|i| status[*i].as_deref() == Some("completed"))
        .map(|i| {
            (
                out.column_by_name("id")
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .value(i),
                strings(&out, "run_id")[i].clone(),
            )
        })
        .collect();
    drop(failing);

    // The same server database, now without failures.
    let server = Serve::start(&db, &[]);
    // A plain rerun reuses the failed results too: nothing is submitted.
    let plain = run_ok(dir.path(), &server, &[]);
    assert!(plain.contains("runs submitted 0,"), "{}", plain);
    assert_eq!(server.runs().0, DISTINCT as u64);

    let retry = run_ok(dir.path(), &server, &["--retry-failed"]);
    assert!(
        retry.contains(&format!("runs submitted {},", failed_inputs.len())),
        "{} failed inputs: {}",
        failed_inputs.len(),
        retry
    );
    // Exactly the failed inputs ran a second time.
    let repeated = server.repeated_inputs();
    assert_eq!(repeated.len(), failed_inputs.len());
    assert!(repeated.values().all(|n| *n == 2));
    assert_eq!(
        server.runs(),
        ((DISTINCT + failed_inputs.len()) as u64, DISTINCT as u64)
    );
    // Completed rows kept their runs; the failed ones now completed.
    let merged = enriched(dir.path());
    let ids = merged
        .column_by_name("id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let run_ids = strings(&merged, "run_id");
    for (i, run_id) in run_ids.iter().enumerate() {
        if let Some(before) = completed_before.get(&ids.value(i)) {
            assert_eq!(run_id, before, "row {}", ids.value(i));
        }
    }
    assert_all_completed(&merged);
    assert_eq!(&without_run_ids(&merged), reference());
}

/// The client issue's fault case, through a whole pipeline: 10,000 inputs through 10% 429s,
/// 5% 500s, 5% add-runs answers dropped after the runs were stored, 5% of streams cut.
#[test]
fn faults_in_the_api_cost_no_extra_runs_and_lose_no_rows() {
    let rows = 10_000;
    let dir = project_sized("core", 0.1, rows, rows);
    let server = Serve::start(
        &dir.path().join("server.sqlite"),
        &[
            "--fault-429-rate",
            "0.1",
            "--fault-500-rate",
            "0.05",
            "--fault-drop-add-runs-rate",
            "0.05",
            "--fault-cut-streams-rate",
            "0.05",
            "--fault-retry-after-secs",
            "0",
        ],
    );
    run_ok(dir.path(), &server, &[]);
    assert_eq!(
        server.runs(),
        (rows as u64, rows as u64),
        "repeated inputs {:?}",
        server.repeated_inputs()
    );
    let enriched = enriched(dir.path());
    assert_eq!(enriched.num_rows(), rows);
    assert_all_completed(&enriched);
    let run_ids: BTreeSet<Option<String>> = strings(&enriched, "run_id").into_iter().collect();
    assert_eq!(run_ids.len(), rows, "10,000 distinct results");
}

/// `other.yaml` beside `research.yaml` in `dir`: the same pipeline named `other`, writing
/// to `out2/`, with each (from, to) of `edits` applied as well.
fn other_pipeline(dir: &Path, edits: &[(&str, &str)]) {
    let yaml = std::fs::read_to_string(dir.join("research.yaml")).unwrap();
    let mut other = yaml
        .replace("name: research\n", "name: other\n")
        .replace("out/", "out2/");
    for (from, to) in edits {
        assert!(other.contains(from), "{from} is not in the pipeline");
        other = other.replace(from, to);
    }
    assert!(other.contains("name: other\n") && other.contains("out2/"));
    std::fs::write(dir.join("other.yaml"), other).unwrap();
}

#[test]
fn two_pipelines_share_a_state_directory_and_its_ledger_at_the_same_time() {
    // Two pipelines beside each other share `.groupflow/` (one ledger, one results file).
    // The second runs its task on another processor, so the two tasks differ.
    let dir = project("core", 0.1);
    other_pipeline(dir.path(), &[("processor: core", "processor: base")]);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let spawn = |file: &str| {
        pipeline_command(dir.path(), &server, file, &[], &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("research.yaml"), spawn("other.yaml"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    }
    assert_complete_output(dir.path());
    let other = enriched_at(dir.path(), "out2/enriched.parquet");
    assert_eq!(other.num_rows(), ROWS);
    assert_all_completed(&other);
    // Each pipeline paid once per distinct input of its own task.
    assert_eq!(server.runs().0, 2 * DISTINCT as u64);
    assert!(dir.path().join(".groupflow/ledger.results").exists());
}

#[test]
fn a_pipeline_never_pays_again_for_inputs_another_pipeline_has_pending() {
    // `other` runs the same task on the same rows under another name, beside `research`:
    // same state directory, so the same ledger. An input `research` has submitted and not
    // yet got back must not be paid for again, whether `research` is still running or
    // was interrupted; its results are reused once it has finished.
    let dir = project("core", 0.1);
    other_pipeline(dir.path(), &[]);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let run_other = || {
        pipeline_command(dir.path(), &server, "other.yaml", &[], &[])
            .output()
            .unwrap()
    };
    let refused = |out: &Output, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{}", show(out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{err}");
        assert!(err.contains("row "), "the row is named: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(!dir.path().join("out2").exists());
    };
    // Stopped with its first batch added: it holds its lock, its claims are pending.
    let (mut first, stderr, _) = start_paused(dir.path(), &server, "runs.added:1");
    assert!(server.runs().0 > 0);
    refused(
        &run_other(),
        ": its input belongs to a run of pipeline research that has started and not yet ended",
    );
    // Killed there, it is interrupted: its claims wait for it to be run again.
    first.kill().unwrap();
    first.wait().unwrap();
    drop(stderr);
    refused(
        &run_other(),
        ": its input was claimed by pipeline research, whose run was interrupted",
    );
    assert!(
        server.repeated_inputs().is_empty(),
        "no input submitted twice"
    );
    // research resumes and ends; other then takes every result from the ledger.
    run_ok(dir.path(), &server, &[]);
    assert_complete_output(dir.path());
    let out = run_other();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mine = enriched_at(dir.path(), "out2/enriched.parquet");
    assert_eq!(mine.num_rows(), ROWS);
    assert_all_completed(&mine);
    assert_eq!(
        without_run_ids(&mine),
        without_run_ids(&enriched(dir.path()))
    );
    assert_eq!(server.runs().0, DISTINCT as u64, "each input paid for once");
    assert!(server.repeated_inputs().is_empty());
}

#[test]
fn take_over_pending_pays_again_only_for_what_an_interrupted_pipeline_left_pending() {
    // research is killed once its first results are stored. other (the same task on the
    // same rows, in the same state directory) takes over the inputs research left pending
    // and reuses the results it stored; research, run again, then reuses other's.
    let dir = project("core", 0.1);
    other_pipeline(dir.path(), &[]);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let (mut first, stderr, _) = start_paused(dir.path(), &server, "results.stored:1");
    first.kill().unwrap();
    first.wait().unwrap();
    drop(stderr);
    let paid = server.runs().0;
    let out = pipeline_command(
        dir.path(),
        &server,
        "other.yaml",
        &["--take-over-pending"],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let summary = stdout(&out);
    let submitted = number_after(&summary, "runs submitted ");
    let saved = &summary[summary.find("runs saved").unwrap()..];
    let cached = number_after(saved, "(");
    // Fewer runs than --no-cache would pay for (every distinct input), and of research's
    // runs only those without a stored result are paid for twice.
    assert!(cached > 0 && submitted > 0, "{summary}");
    assert!(submitted < DISTINCT as u64, "{summary}");
    assert_eq!(server.runs().0, paid + submitted);
    let twice = server.repeated_inputs().len() as u64;
    assert!(twice > 0 && twice < paid, "{twice} of {paid}");
    let mine = enriched_at(dir.path(), "out2/enriched.parquet");
    assert_eq!(mine.num_rows(), ROWS);

    let again = run_ok(dir.path(), &server, &[]);
    assert!(again.contains("runs submitted 0,"), "{again}");
    assert_eq!(server.runs().0, paid + submitted);
    assert_complete_output(dir.path());
    assert_eq!(
        without_run_ids(&mine),
        without_run_ids(&enriched(dir.path()))
    );
}

/// The number written right after `before` in `text`.
fn number_after(text: &str, before: &str) -> u64 {
    let at = text
        .find(before)
        .unwrap_or_else(|| panic!("no {before:?} in {text}"))
        + before.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {before:?} in {text}"))
}

#[test]
fn two_runs_of_one_pipeline_cannot_share_a_state_directory() {
    let dir = project("core", 0.1);
    let server = Serve::start(&dir.path().join("server.sqlite"), &[]);
    let (mut first, _stderr, _) = start_paused(dir.path(), &server, "runs.added:1");
    let second = run(dir.path(), &server, &[]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(1), "{}", show(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another `groupflow run` of pipeline research is using this state directory"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_step_that_reads_a_few_rows_still_keeps_every_result_it_paid_for() {
    const N: usize = 20_000;
    let dir = project_sized("core", 0.0, N, N);
    // 20,000 runs of 50–150 ms, 500 at a time: about 4 s. The filter passes rows on 8,192 at
    // a time, so the step has its one row once about 9,000 runs have ended, and stops
    // reading while the rest run.
    let server = Serve::start(
        &dir.path().join("server.sqlite"),
        &["--sim-latency-ms", "50..150", "--concurrency", "500"],
    );
    let research = std::fs::read_to_string(dir.path().join("research.yaml")).unwrap();
    let (head, _) = research.split_once("steps:").unwrap();
    let first = head.replace("name: research", "name: first")
        + "steps:
  - name: one
    sql: SELECT id, founded_year FROM enrich('research', 'companies') WHERE founded_year > 0 LIMIT 1
outputs:
  - { from: one, path: out/one.csv }
";
    std::fs::write(dir.path().join("first.yaml"), first).unwrap();
    let out = pipeline_command(dir.path(), &server, "first.yaml", &[], &[])
        .output()
        .expect("run groupflow");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let one = std::fs::read_to_string(dir.path().join("out/one.csv")).unwrap();
    assert_eq!(one.lines().count(), 2, "{one}");
    assert_eq!(server.runs(), (N as u64, N as u64));
    // Every run it paid for has its result: the whole pipeline pays for nothing more.
    let all = run_ok(dir.path(), &server, &[]);
    assert!(
        all.contains(&format!(
            "rows in {N}, runs submitted 0, runs saved {N} ({N} cached"
        )),
        "{all}"
    );
    assert_eq!(server.runs().0, N as u64);
}
