//! The `groupflow` binary end to end: the example pipelines, the broken-pipeline corpus,
//! exit codes, atomic outputs, the state directory, and the `groups` and `schema` commands.
//! Every run talks HTTP to a real local server (embedded, or `groupflow serve` as a child
//! process) and S3 runs go to a real moto server.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_groupflow");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Environment variables that would change where a run goes; every test sets its own.
const AMBIENT: &[&str] = &[
    "PARALLEL_API_KEY",
    "PARALLEL_BASE_URL",
    "GROUPFLOW_STATE_DIR",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SKIP_SIGNATURE",
    "S3_BUCKET",
];

fn groupflow(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir);
    for k in AMBIENT {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run groupflow")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A copy of `pipelines/` (files and data) in a fresh temporary folder.
fn examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(ROOT).join("pipelines"), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "out" || name == ".groupflow" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

fn column_names(batches: &[RecordBatch]) -> Vec<String> {
    batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// The values of a string column over all batches.
fn strings(batches: &[RecordBatch], column: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for b in batches {
        let a = b.column_by_name(column).unwrap();
        let a = arrow::compute::cast(a, &DataType::Utf8).unwrap();
        let a = a.as_any().downcast_ref::<StringArray>().unwrap();
        out.extend((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_string())));
    }
    out
}

/// The group ids a run's summary names.
fn group_ids(stdout: &str) -> Vec<String> {
    stdout
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("tgrp_"))
        .map(str::to_string)
        .collect()
}

use common::Serve;

#[test]
fn company_research_runs_on_the_embedded_server() {
    let dir = examples();
    let out = groupflow(dir.path(), &["run", "company_research.yaml"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = text(&out.stderr);
    let embedded: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("embedded local server"))
        .collect();
    assert_eq!(embedded.len(), 1, "{stderr}");
    assert!(embedded[0].contains("http://127.0.0.1:"), "{stderr}");

    let enriched = read_parquet(&dir.path().join("out/companies_enriched.parquet"));
    assert_eq!(rows(&enriched), 24);
    assert_eq!(
        column_names(&enriched),
        [
            "name",
            "website",
            "country",
            "founded_year",
            "key_insights",
            "market_position",
            "run_id",
            "run_status",
            "run_error",
            "basis"
        ]
    );
    assert!(
        strings(&enriched, "run_status")
            .iter()
            .all(|s| s.as_deref() == Some("completed"))
    );
    let schema = enriched[0].schema();
    assert_eq!(
        schema.field_with_name("founded_year").unwrap().data_type(),
        &DataType::Int64
    );
    assert!(matches!(
        schema.field_with_name("key_insights").unwrap().data_type(),
        DataType::List(_)
    ));

    let summary = std::fs::read_to_string(dir.path().join("out/companies_summary.csv")).unwrap();
    let lines: Vec<&str> = summary.lines().collect();
    assert_eq!(
        lines[0],
        "name,country,founded_year,market_position,insights,run_status"
    );
    assert_eq!(lines.len(), 25);
    assert!(
        lines[1].starts_with("Adyen,NL,"),
        "sorted by name: {}",
        lines[1]
    );

    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("task research [core]: rows in 24, runs submitted 24, runs saved 0"),
        "{stdout}"
    );
    assert!(stdout.contains("completed 24, failed 0 (0.0%"), "{stdout}");
    assert!(
        stdout.contains("output out/companies_enriched.parquet: rows out 24"),
        "{stdout}"
    );
    assert_eq!(group_ids(&stdout).len(), 1, "{stdout}");

    // The state directory sits beside the pipeline and keeps no work files after a run.
    let state = dir.path().join(".groupflow");
    assert!(state.join("server.sqlite").is_file());
    let work = state.join("work");
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work files left in {}",
        work.display()
    );
    let temp: Vec<_> = files_under(&dir.path().join("out"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("groupflow-tmp"))
        .collect();
    assert!(temp.is_empty(), "{temp:?}");
}

#[test]
fn funding_rounds_writes_nested_types_to_parquet_ndjson_and_csv() {
    let dir = examples();
    let out = groupflow(
        dir.path(),
        &["run", "--progress", "lines", "funding_rounds.yaml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let profiles = read_parquet(&dir.path().join("out/startup_profiles.parquet"));
    assert_eq!(rows(&profiles), 12);
    let schema = profiles[0].schema();
    assert_eq!(
        schema.field_with_name("founded_on").unwrap().data_type(),
        &DataType::Date32
    );
    assert_eq!(
        schema.field_with_name("employees").unwrap().data_type(),
        &DataType::Int64
    );
    assert_eq!(
        schema.field_with_name("stage").unwrap().data_type(),
        &DataType::Utf8
    );
    let DataType::List(item) = schema.field_with_name("rounds").unwrap().data_type() else {
        panic!("rounds is not a list: {schema:?}");
    };
    let DataType::Struct(fields) = item.data_type() else {
        panic!("rounds items are not structs: {item:?}");
    };
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    for want in ["round", "amount_usd", "announced_on", "lead_investors"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let announced = fields.iter().find(|f| f.name() == "announced_on").unwrap();
    assert_eq!(announced.data_type(), &DataType::Date32);
    let stages = [
        "pre_seed", "seed", "series_a", "series_b", "series_c", "growth", "public",
    ];
    for s in strings(&profiles, "stage") {
        assert!(stages.contains(&s.as_deref().unwrap()), "{s:?}");
    }

    let ndjson = std::fs::read_to_string(dir.path().join("out/startup_profiles.ndjson")).unwrap();
    let first: serde_json::Value = serde_json::from_str(ndjson.lines().next().unwrap()).unwrap();
    assert_eq!(ndjson.lines().count(), 12);
    assert!(
        first["rounds"].is_array() && first["founders"][0]["role"].is_string(),
        "{first}"
    );

    let csv = std::fs::read_to_string(dir.path().join("out/funding_rounds.csv")).unwrap();
    assert_eq!(
        csv.lines().next(),
        Some("id,company,round,amount_usd,announced_on")
    );
    assert!(csv.lines().count() > 12, "one line per round:\n{csv}");

    // Not a terminal: plain progress lines, one per step at least.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("step 1/2 `profiles`: 12 row(s)"),
        "{stderr}"
    );
    assert!(stderr.contains("task funding: group tgrp_"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_example_reads_and_writes_parquet_in_s3() {
    use object_store::aws::AmazonS3Builder;
    use object_store::{ObjectStore, ObjectStoreExt};

    let moto = common::Moto::start();
    moto.create_bucket("groupflow-test");
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&moto.endpoint)
            .with_allow_http(true)
            .with_bucket_name("groupflow-test")
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap(),
    );
    let input = std::fs::read(Path::new(ROOT).join("pipelines/data/companies.parquet")).unwrap();
    store
        .put(
            &object_store::path::Path::from("input/companies.parquet"),
            input.into(),
        )
        .await
        .unwrap();

    let dir = examples();
    let path = dir.path().to_path_buf();
    let endpoint = moto.endpoint.clone();
    let run = move |args: &'static [&'static str]| {
        let path = path.clone();
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let env = [
                ("AWS_ENDPOINT_URL", endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_REGION", "us-east-1"),
                ("S3_BUCKET", "groupflow-test"),
            ];
            groupflow(&path, args, &env)
        })
    };
    let validate = run(&["validate", "s3_companies.yaml"]).await.unwrap();
    assert_eq!(validate.status.code(), Some(0), "{}", show(&validate));
    let out = run(&["run", "s3_companies.yaml"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    let key = object_store::path::Path::from("enriched/companies.parquet");
    let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows(&batches), 24);
    let names = column_names(&batches);
    for want in [
        "name",
        "industry",
        "is_public",
        "revenue_usd_millions",
        "run_status",
    ] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    // Only the two objects: no temporary or partial uploads beside the output.
    let listed: Vec<String> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        ["enriched/companies.parquet", "input/companies.parquet"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .iter()
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn every_local_example_validates_and_every_example_matches_the_printed_schema() {
    let dir = examples();
    for name in ["company_research.yaml", "funding_rounds.yaml"] {
        let out = groupflow(dir.path(), &["validate", name], &[]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", show(&out));
        assert_eq!(text(&out.stdout), format!("{name}: ok\n"));
    }

    // An independent JSON Schema validator (Python's jsonschema) checks that the schema
    // `groupflow schema` prints accepts every example and rejects the structurally broken
    // files that groupflow rejects.
    let schema = groupflow(dir.path(), &["schema"], &[]);
    assert_eq!(schema.status.code(), Some(0), "{}", show(&schema));
    let schema_path = dir.path().join("schema.json");
    std::fs::write(&schema_path, &schema.stdout).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&schema.stdout).unwrap();
    assert_eq!(
        parsed["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );

    let mut documents = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            documents.push((p, true));
        }
    }
    assert!(documents.len() >= 3, "{documents:?}");
    for case in [
        "04-unknown-top-level-key",
        "05-unknown-task-key",
        "06-missing-version",
        "07-wrong-version",
        "08-empty-sources",
        "09-uppercase-source-name",
        "14-source-unknown-format",
        "21-input-not-a-string-column",
        "29-max-failed-ratio-out-of-range",
    ] {
        documents.push((
            Path::new(ROOT).join(format!("tests/broken/{case}.yaml")),
            false,
        ));
    }
    let python = common::test_env_program("moto", "python");
    for (path, valid) in documents {
        let yaml = std::fs::read_to_string(&path).unwrap();
        let json = groupflow::pipeline::yaml::parse(&yaml).unwrap().to_json();
        let doc_path = dir.path().join("doc.json");
        std::fs::write(&doc_path, json.to_string()).unwrap();
        let check = Command::new(&python)
            .args([
                "-c",
                "import json, sys, jsonschema\n\
                 schema = json.load(open(sys.argv[1]))\n\
                 doc = json.load(open(sys.argv[2]))\n\
                 jsonschema.Draft202012Validator.check_schema(schema)\n\
                 errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))\n\
                 print(len(errors))",
            ])
            .arg(&schema_path)
            .arg(&doc_path)
            .output()
            .expect("run python");
        assert!(check.status.success(), "{}", show(&check));
        let errors: usize = text(&check.stdout).trim().parse().unwrap();
        assert_eq!(
            errors == 0,
            valid,
            "{}: jsonschema found {errors} error(s)",
            path.display()
        );
    }
}

#[test]
fn broken_pipelines_exit_2_with_their_expected_lines_and_write_nothing() {
    let corpus = Path::new(ROOT).join("tests/broken");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 25, "only {} broken pipelines", cases.len());

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&corpus, dir.path());
    let before = files_under(dir.path());
    let normalize = |s: &str| {
        let d = dir.path().display().to_string();
        s.replace(&d, "<dir>")
            .replace(d.trim_start_matches('/'), "<dir>")
    };
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        let expected_path = case.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no .expected file", name));
        let expected: Vec<&str> = expected.lines().collect();
        assert!(!expected.is_empty(), "{name}: empty .expected");

        let run = groupflow(dir.path(), &["run", "--progress", "quiet", name], &[]);
        assert_eq!(run.status.code(), Some(2), "{name}: {}", show(&run));
        let stderr = normalize(&text(&run.stderr));
        assert_eq!(stderr.lines().collect::<Vec<_>>(), expected, "{name}: run");
        assert!(run.stdout.is_empty(), "{name}: {}", show(&run));
        for line in &expected {
            assert!(
                line.starts_with(&format!("{name}:")),
                "{name}: the line does not name the file: {line}"
            );
        }

        let check = groupflow(dir.path(), &["validate", name], &[]);
        assert_eq!(check.status.code(), Some(2), "{name}: {}", show(&check));
        let stderr = normalize(&text(&check.stderr));
        let mut lines: Vec<&str> = stderr.lines().collect();
        let footer = lines.pop().unwrap_or_default();
        assert_eq!(footer, format!("{name}: {} problem(s)", lines.len()));
        assert_eq!(lines, expected, "{name}: validate");
    }
    assert_eq!(
        files_under(dir.path()),
        before,
        "the broken pipelines wrote something"
    );
}

#[test]
fn dry_run_counts_runs_per_task_and_submits_nothing() {
    let dir = examples();
    let out = groupflow(
        dir.path(),
        &["run", "--dry-run", "company_research.yaml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("step enriched: task research would submit 24 run(s) on processor core"),
        "{stdout}"
    );
    assert!(
        !dir.path().join(".groupflow").exists(),
        "a dry run made state"
    );
    assert!(!dir.path().join("out").exists(), "a dry run wrote outputs");
}

/// The company research pipeline with another failure limit.
fn research_with_limit(dir: &Path, ratio: &str) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("company_research.yaml"))
        .unwrap()
        .replace(
            "max_failed_ratio: 0.1",
            &format!("max_failed_ratio: {ratio}"),
        );
    let path = dir.join(format!("research_{ratio}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn too_many_failed_rows_exit_5_with_the_output_written_and_failed_rows_marked() {
    let server = Serve::start(&["--sim-failure-rate", "0.5"]);
    let dir = examples();
    let strict = research_with_limit(dir.path(), "0.1");
    let env = [("PARALLEL_BASE_URL", server.url.as_str())];
    let out = groupflow(dir.path(), &["run", strict.to_str().unwrap()], &env);
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    assert!(
        !text(&out.stderr).contains("embedded local server"),
        "{}",
        show(&out)
    );
    assert!(
        text(&out.stderr).contains("max_failed_ratio"),
        "{}",
        show(&out)
    );

    let enriched = read_parquet(&dir.path().join("out/companies_enriched.parquet"));
    assert_eq!(rows(&enriched), 24);
    let statuses = strings(&enriched, "run_status");
    let errors = strings(&enriched, "run_error");
    let failed: Vec<usize> = (0..statuses.len())
        .filter(|&i| statuses[i].as_deref() == Some("failed"))
        .collect();
    assert!(failed.len() > 2, "{statuses:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "completed {}, failed {} (",
            24 - failed.len(),
            failed.len()
        )),
        "the summary counts the failed rows: {stdout}"
    );
    for i in failed {
        assert!(
            errors[i].as_deref().is_some_and(|e| !e.is_empty()),
            "row {i} has no error"
        );
    }

    // A task that tolerates them all succeeds on the same server.
    let lenient = research_with_limit(dir.path(), "1");
    let out = groupflow(dir.path(), &["run", lenient.to_str().unwrap()], &env);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn a_refused_api_key_exits_3_without_showing_the_key() {
    let server = Serve::start(&["--api-key", "right-key"]);
    let dir = examples();
    let env = [
        ("PARALLEL_BASE_URL", server.url.as_str()),
        ("PARALLEL_API_KEY", "wrong-key-d41d8cd9"),
    ];
    let out = groupflow(dir.path(), &["run", "company_research.yaml"], &env);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(!show(&out).contains("wrong-key-d41d8cd9"), "{}", show(&out));
    assert!(!dir.path().join("out").exists(), "an output was written");

    let env = [
        ("PARALLEL_BASE_URL", server.url.as_str()),
        ("PARALLEL_API_KEY", "right-key"),
    ];
    let out = groupflow(dir.path(), &["run", "company_research.yaml"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn a_request_the_api_rejects_exits_4() {
    let dir = examples();
    // The server checks inputs against the task's input schema; names are not integers.
    let pipeline = "version: 1
name: rejected
sources:
  companies: { path: data/companies.csv }
tasks:
  research:
    processor: lite
    input: { company_name: name }
    input_schema:
      type: object
      properties: { company_name: { type: integer } }
      required: [company_name]
    output: { type: object, properties: { summary: { type: string } }, required: [summary] }
steps:
  - { name: enriched, sql: \"SELECT * FROM enrich('research', 'companies')\" }
outputs:
  - { from: enriched, path: out/enriched.parquet }
";
    std::fs::write(dir.path().join("rejected.yaml"), pipeline).unwrap();
    let out = groupflow(dir.path(), &["run", "rejected.yaml"], &[]);
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    let stderr = text(&out.stderr);
    let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(error.contains("422"), "{error}");
    assert!(error.chars().count() < 700, "error line not cut: {error}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn ctrl_c_exits_130_and_leaves_no_output() {
    let server = Serve::start(&["--sim-latency-ms", "60000"]);
    let dir = examples();
    // Wait until the runs are out (they take a minute each), then interrupt.
    let (child, mut stderr, seen) = spawn_until(
        dir.path(),
        "company_research.yaml",
        &[("PARALLEL_BASE_URL", &server.url)],
        "task research: running",
    );
    let mut child = KillOnDrop(Some(child));
    let child = child.0.as_mut().unwrap();
    common::signal(child.id(), "-INT");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert!(!dir.path().join("out/companies_enriched.parquet").exists());
    let leftovers: Vec<_> = if dir.path().join("out").exists() {
        files_under(&dir.path().join("out")).into_iter().collect()
    } else {
        Vec::new()
    };
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failing_output_commits_no_output_at_all() {
    let dir = examples();
    // The second output's folder is a file, so staging it fails after the first is staged.
    std::fs::write(dir.path().join("blocker"), "not a folder").unwrap();
    let blocked = std::fs::read_to_string(dir.path().join("company_research.yaml"))
        .unwrap()
        .replace("out/companies_summary.csv", "blocker/companies_summary.csv");
    std::fs::write(dir.path().join("blocked.yaml"), blocked).unwrap();
    let out = groupflow(dir.path(), &["run", "blocked.yaml"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("blocker/companies_summary.csv"),
        "{}",
        show(&out)
    );
    let written: Vec<_> = if dir.path().join("out").exists() {
        files_under(&dir.path().join("out")).into_iter().collect()
    } else {
        Vec::new()
    };
    assert!(written.is_empty(), "{written:?}");
}

/// `groupflow run` of `pipeline` in `dir` with `env` (the embedded server unless it sets
/// `PARALLEL_BASE_URL`), stderr piped and read line by line until a line holds `until`;
/// returns the child, its stderr and what it printed so far.
fn spawn_until(
    dir: &Path,
    pipeline: &str,
    env: &[(&str, &str)],
    until: &str,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    String,
) {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--progress", "lines", pipeline])
        .current_dir(dir);
    for k in AMBIENT {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains(until) {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!(
                "{pipeline} ended ({}) before `{until}`:\n{seen}",
                child.wait().unwrap()
            );
        }
        seen.push_str(&line);
    }
    (child, stderr, seen)
}

/// Kills the process when dropped before it was waited for (a failed test leaves no
/// stopped process behind).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads the rest of `stderr` and waits for `child`; returns its exit code and stderr.
fn finish(
    mut child: std::process::Child,
    mut stderr: BufReader<std::process::ChildStderr>,
) -> (Option<i32>, String) {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    (child.wait().unwrap().code(), rest)
}

#[test]
fn pipelines_beside_each_other_take_turns_on_the_embedded_server() {
    // Both pipelines keep their state in the same `.groupflow/`, so their embedded servers
    // would share one database. The first stops itself with its runs added; the second
    // waits for it instead of starting a second server on that database.
    let dir = examples();
    let (first, first_err, _) = spawn_until(
        dir.path(),
        "company_research.yaml",
        &[("GROUPFLOW_PAUSE_AT", "runs.added:1")],
        "groupflow: paused at runs.added:1",
    );
    let mut first = KillOnDrop(Some(first));
    let (second, second_err, _) = spawn_until(
        dir.path(),
        "funding_rounds.yaml",
        &[],
        "waiting for another run in this state directory to end",
    );
    let mut second = KillOnDrop(Some(second));
    // The groups commands use the same embedded server: they say so and stop.
    let busy = groupflow(
        dir.path(),
        &["groups", "status", "tgrp_any", "--state-dir", ".groupflow"],
        &[],
    );
    assert_eq!(busy.status.code(), Some(2), "{}", show(&busy));
    assert!(
        text(&busy.stderr).contains(
            "is in use by another groupflow process (a `groupflow run` in this state directory, or `groupflow serve`); try again when it ends"
        ),
        "{}",
        show(&busy)
    );
    let first = first.0.take().unwrap();
    common::signal(first.id(), "-CONT");
    let (code, err) = finish(first, first_err);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = finish(second.0.take().unwrap(), second_err);
    assert_eq!(code, Some(0), "{err}");
    let enriched = read_parquet(&dir.path().join("out/companies_enriched.parquet"));
    assert_eq!(rows(&enriched), 24);
    assert!(
        strings(&enriched, "run_status")
            .iter()
            .all(|s| s.as_deref() == Some("completed"))
    );
    let profiles = read_parquet(&dir.path().join("out/startup_profiles.parquet"));
    assert_eq!(rows(&profiles), 12);
}

#[test]
fn a_second_server_on_one_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    let db_arg = db.display().to_string();
    let _first = Serve::start(&["--db", &db_arg]);
    // Refused at once; one still running after 30 s is serving the same database.
    let second_server = |db: &str| {
        let mut second = Command::new(BIN)
            .args(["serve", "--db", db, "--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while second.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(30) {
                second.kill().unwrap();
                panic!("a second server started on {db}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        second.wait_with_output().unwrap()
    };
    let out = second_server(&db_arg);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "cannot open the state database {db_arg}: another groupflow server is using it"
        )),
        "{err}"
    );
    // Another name for the same file is the same database.
    let alias = dir.path().join("alias.sqlite");
    std::os::unix::fs::symlink(&db, &alias).unwrap();
    let out = second_server(alias.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

#[test]
fn a_step_read_twice_submits_its_runs_once() {
    let dir = examples();
    let pipeline = "version: 1
name: twice
sources:
  companies: { path: data/companies.csv }
tasks:
  research:
    processor: lite
    input: { company_name: name }
    output: { type: object, properties: { summary: { type: string } }, required: [summary] }
steps:
  - name: enriched
    sql: SELECT * FROM enrich('research', 'companies')
  - name: us
    sql: SELECT name, summary FROM enriched WHERE country = 'US'
  - name: others
    sql: SELECT name, summary FROM enriched WHERE country <> 'US'
outputs:
  - { from: enriched, path: out/all.parquet }
  - { from: enriched, path: out/all.ndjson }
  - { from: us, path: out/us.csv }
  - { from: others, path: out/others.csv }
";
    std::fs::write(dir.path().join("twice.yaml"), pipeline).unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let out = groupflow(
        dir.path(),
        &["run", "--state-dir", state_arg, "twice.yaml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let groups = group_ids(&text(&out.stdout));
    assert_eq!(groups.len(), 1, "{}", show(&out));

    let status = groupflow(
        dir.path(),
        &["groups", "status", &groups[0], "--state-dir", state_arg],
        &[],
    );
    assert_eq!(status.status.code(), Some(0), "{}", show(&status));
    assert!(
        text(&status.stdout).starts_with(&format!("group {}: 24 run(s), done", groups[0])),
        "{}",
        show(&status)
    );
    let us = std::fs::read_to_string(dir.path().join("out/us.csv")).unwrap();
    let others = std::fs::read_to_string(dir.path().join("out/others.csv")).unwrap();
    assert_eq!(us.lines().count() - 1 + others.lines().count() - 1, 24);
}

#[test]
fn the_state_directory_moves_with_the_flag_or_the_environment() {
    let dir = examples();
    let by_env = dir.path().join("by-env");
    let out = groupflow(
        dir.path(),
        &["run", "company_research.yaml"],
        &[("GROUPFLOW_STATE_DIR", by_env.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(by_env.join("server.sqlite").is_file());
    assert!(by_env.join("ledger.sqlite").is_file());
    assert!(!dir.path().join(".groupflow").exists());

    let by_flag = dir.path().join("by-flag");
    let out = groupflow(
        dir.path(),
        &[
            "run",
            "--state-dir",
            by_flag.to_str().unwrap(),
            "company_research.yaml",
        ],
        &[("GROUPFLOW_STATE_DIR", by_env.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(by_flag.join("server.sqlite").is_file());
    assert!(by_flag.join("ledger.sqlite").is_file());
    assert!(!dir.path().join(".groupflow").exists());
}

#[test]
fn groups_results_collects_a_finished_group_into_a_file() {
    let dir = examples();
    let out = groupflow(dir.path(), &["run", "company_research.yaml"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let group = group_ids(&text(&out.stdout)).remove(0);
    let state = dir.path().join(".groupflow");
    let collected = groupflow(
        dir.path(),
        &[
            "groups",
            "results",
            &group,
            "--out",
            "collected/runs.ndjson",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(collected.status.code(), Some(0), "{}", show(&collected));
    let lines = std::fs::read_to_string(dir.path().join("collected/runs.ndjson")).unwrap();
    assert_eq!(lines.lines().count(), 24);

    let missing = groupflow(
        dir.path(),
        &[
            "groups",
            "status",
            "tgrp_does_not_exist",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(missing.status.code(), Some(2), "{}", show(&missing));
}

#[test]
fn every_command_explains_itself_with_help() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["validate", "--help"],
        vec!["schema", "--help"],
        vec!["serve", "--help"],
        vec!["groups", "--help"],
        vec!["groups", "status", "--help"],
        vec!["groups", "results", "--help"],
    ] {
        let out = groupflow(dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", show(&out));
        let help = text(&out.stdout);
        assert!(help.contains("Usage: groupflow"), "{args:?}: {help}");
        assert!(help.lines().count() > 5, "{args:?}: {help}");
    }
    let run_help = text(&groupflow(dir.path(), &["run", "--help"], &[]).stdout);
    for word in [
        "--dry-run",
        "--state-dir",
        "GROUPFLOW_STATE_DIR",
        "Exit codes",
        "130",
    ] {
        assert!(run_help.contains(word), "{word}: {run_help}");
    }
    let bad = groupflow(dir.path(), &["run"], &[]);
    assert_eq!(bad.status.code(), Some(2), "{}", show(&bad));
}

/// A step that fails midway (its source breaks at row 25,000, after rows have gone on)
/// leaves no output, no temporary file and no folder made for them.
#[test]
fn a_step_failing_midway_leaves_no_output_and_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("n\n");
    for i in 0..30_000 {
        if i == 25_000 {
            csv.push_str("oops\n");
        } else {
            csv.push_str(&format!("{i}\n"));
        }
    }
    std::fs::write(dir.path().join("numbers.csv"), csv).unwrap();
    let pipeline = "version: 1
name: midway
sources:
  numbers: { path: numbers.csv }
tasks:
  unused:
    processor: lite
    input: { n: n }
    output: { type: object, properties: { s: { type: string } }, required: [s] }
steps:
  - { name: doubled, sql: \"SELECT n * 2 AS twice FROM numbers\" }
outputs:
  - { from: doubled, path: out/deeper/doubled.parquet }
  - { from: doubled, path: out/doubled.csv }
";
    std::fs::write(dir.path().join("midway.yaml"), pipeline).unwrap();
    let out = groupflow(dir.path(), &["run", "midway.yaml"], &[]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(text(&out.stderr).contains("oops"), "{}", show(&out));
    assert!(
        !dir.path().join("out").exists(),
        "{:?}",
        files_under(dir.path())
    );
}
