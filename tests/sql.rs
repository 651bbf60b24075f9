//! `enrich(...)` and `task_group_runs(...)` end to end: fixture files → DataFusion → the
//! local server over HTTP → typed result tables, compared as snapshots.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use groupflow::client::{Client, ClientConfig, LEDGER_ROW, RetryConfig, RunsQuery};
use groupflow::server::{ServerConfig, ServerHandle, SimConfig};
use groupflow::sink::TaskDefinition;
use groupflow::source::{Format, S3Config, SourceOptions, register_table};
use groupflow::sql::{EnrichError, EnrichOptions, EnrichProgress};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sql")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn task(v: Value) -> TaskDefinition {
    serde_json::from_value(v).expect("task definition")
}

/// A server, a session with the task functions registered, and the group ids each
/// enrich execution reports.
struct Env {
    server: ServerHandle,
    ctx: SessionContext,
    groups: Arc<Mutex<BTreeSet<String>>>,
}

impl Env {
    async fn start(config: ServerConfig, tasks: Vec<(&str, TaskDefinition)>) -> Env {
        Env::start_with(config, tasks, |c| c).await
    }

    async fn start_with(
        config: ServerConfig,
        tasks: Vec<(&str, TaskDefinition)>,
        client_config: impl FnOnce(ClientConfig) -> ClientConfig,
    ) -> Env {
        let server = groupflow::server::start(config).await.expect("server");
        let client =
            Client::new(client_config(ClientConfig::new(server.base_url()))).expect("client");
        let ctx = SessionContext::new();
        let groups = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = groups.clone();
        let options = EnrichOptions {
            on_progress: Some(Arc::new(move |p: &EnrichProgress| {
                if let Some(g) = &p.group_id {
                    seen.lock().unwrap().insert(g.clone());
                }
            })),
            ..EnrichOptions::default()
        };
        let tasks: HashMap<String, TaskDefinition> =
            tasks.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        groupflow::sql::register(&ctx, tasks, client, options).expect("register");
        Env {
            server,
            ctx,
            groups,
        }
    }

    async fn table(&self, name: &str, location: &str) {
        register_table(&self.ctx, name, location, &SourceOptions::default())
            .await
            .expect("register table");
    }

    async fn query(&self, sql: &str) -> Vec<RecordBatch> {
        self.ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn pretty(&self, sql: &str) -> String {
        pretty_format_batches(&self.query(sql).await)
            .unwrap()
            .to_string()
    }

    async fn error(&self, sql: &str) -> String {
        match self.ctx.sql(sql).await {
            Err(e) => e.to_string(),
            Ok(df) => match df.collect().await {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{sql} should fail"),
            },
        }
    }

    fn groups(&self) -> Vec<String> {
        self.groups.lock().unwrap().iter().cloned().collect()
    }
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

fn company_task() -> TaskDefinition {
    task(json!({
        "processor": "core",
        "input": {"company_name": "name", "website": "website", "staff": "employees"},
        "output": {
            "type": "object",
            "properties": {
                "industry": {"type": "string"},
                "founded_year": {"type": "integer"},
                "public": {"type": "boolean"},
                "revenue_musd": {"type": ["number", "null"]},
                "last_filing": {"type": "string", "format": "date"},
                "checked_at": {"type": "string", "format": "date-time"},
                "tier": {"type": "string", "enum": ["startup", "midsize", "enterprise"]},
                "headquarters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "offices": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}, "staff": {"type": "integer"}},
                            "required": ["city", "staff"]
                        }}
                    },
                    "required": ["city", "offices"]
                },
                "products": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["industry", "founded_year", "public", "revenue_musd", "last_filing",
                         "checked_at", "tier", "headquarters", "products"]
        }
    }))
}

#[tokio::test(flavor = "multi_thread")]
async fn nested_output_schemas_become_typed_columns() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;

    let df = env
        .ctx
        .sql("SELECT * FROM enrich('research', 'companies')")
        .await
        .unwrap();
    let schema = df.schema().as_arrow().clone();
    let types: Vec<(String, String)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect();
    insta::assert_debug_snapshot!("nested_schema", types);
    assert_eq!(
        schema.field_with_name("last_filing").unwrap().data_type(),
        &DataType::Date32
    );
    assert_eq!(
        schema.field_with_name("checked_at").unwrap().data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );

    let table = env
        .pretty(
            "SELECT id, name, industry, founded_year, public, revenue_musd, last_filing, checked_at, \
                    tier, headquarters, products, run_status, run_error \
             FROM enrich('research', 'companies') ORDER BY id",
        )
        .await;
    insta::assert_snapshot!("nested_outputs", table);

    let basis = env
        .pretty(
            "SELECT id, basis[1]['field'] AS field, basis[1]['confidence'] AS confidence, \
                    basis[1]['citations'][1]['url'] AS url, array_length(basis) AS entries \
             FROM enrich('research', 'companies') WHERE id <= 2 ORDER BY id",
        )
        .await;
    insta::assert_snapshot!("nested_basis", basis);
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_runs_are_rows_with_their_error() {
    let config = ServerConfig {
        sim: SimConfig {
            failure_rate: 0.5,
            ..SimConfig::default()
        },
        ..ServerConfig::for_tests()
    };
    let env = Env::start(config, vec![("research", company_task())]).await;
    env.table("companies", &fixture("companies.csv")).await;

    let table = env
        .pretty(
            "SELECT id, name, run_status, run_error, industry, headquarters['city'] AS city, \
                    basis IS NULL AS no_basis, run_id IS NOT NULL AS has_run \
             FROM enrich('research', 'companies') ORDER BY id",
        )
        .await;
    insta::assert_snapshot!("failed_runs", table);
    assert!(
        table.contains("failed") && table.contains("completed"),
        "{table}"
    );

    let counts = env
        .pretty(
            "SELECT run_status, count(*) AS n, count(industry) AS with_output, count(run_error) AS with_error \
             FROM enrich('research', 'companies') GROUP BY run_status ORDER BY run_status",
        )
        .await;
    insta::assert_snapshot!("failed_counts", counts);
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nulls_and_unicode_survive_the_round_trip() {
    let summary = task(json!({
        "processor": "lite",
        "input": "Profile {name}, age {age}, tags {tags}, home {home}",
        "output": "A short profile"
    }));
    let structured = task(json!({
        "input": {"who": "name", "age": "age", "score": "score", "tags": "tags", "home": "home"},
        "output": {"type": "object", "properties": {"nickname": {"type": "string"}}, "required": ["nickname"]}
    }));
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("summary", summary), ("structured", structured)],
    )
    .await;
    env.table("people", &fixture("people.ndjson")).await;

    let table = env
        .pretty(
            "SELECT id, name, age, score, tags, home, output, run_status \
             FROM enrich('summary', 'people') ORDER BY id",
        )
        .await;
    insta::assert_snapshot!("unicode_text_output", table);

    // The inputs as the server stored them: numbers stay numbers, nulls stay null.
    env.query("SELECT count(*) FROM enrich('structured', 'SELECT * FROM people')")
        .await;
    let groups = env.groups();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let mut inputs = Vec::new();
    for g in &groups {
        let t = env
            .pretty(&format!(
                "SELECT input, run_status FROM task_group_runs('{g}') ORDER BY input"
            ))
            .await;
        inputs.push(t);
    }
    inputs.sort();
    insta::assert_snapshot!("unicode_inputs", inputs.join("\n"));
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn enriched_rows_join_back_to_the_source() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    let table = env
        .pretty(
            "WITH e AS (SELECT id, founded_year, tier FROM enrich('research', \
                 'SELECT id, name, website, employees FROM companies WHERE id > 1')) \
             SELECT c.id, c.name, c.founded, e.founded_year, e.tier, \
                    e.founded_year > 1990 AS young \
             FROM companies c LEFT JOIN e ON c.id = e.id ORDER BY c.id",
        )
        .await;
    insta::assert_snapshot!("join_back", table);
    // Only the five selected rows were submitted, once.
    let groups = env.groups();
    assert_eq!(groups.len(), 1);
    let runs = env
        .query(&format!("SELECT * FROM task_group_runs('{}')", groups[0]))
        .await;
    assert_eq!(rows(&runs), 5);
    // Each run names the ledger row its claim found, a different one each.
    let client = Client::new(ClientConfig::new(env.server.base_url())).unwrap();
    let events: Vec<_> = client
        .runs_stream(&groups[0], RunsQuery::default())
        .try_collect()
        .await
        .unwrap();
    let ledger_rows: BTreeSet<i64> = events
        .iter()
        .filter_map(|e| e.run.metadata.as_ref()?.get(LEDGER_ROW)?.as_i64())
        .collect();
    assert_eq!(ledger_rows.len(), 5, "{events:?}");
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_limit_submits_only_the_rows_it_keeps() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    let limited = env
        .query("SELECT id, run_status FROM enrich('research', 'companies') LIMIT 2")
        .await;
    assert_eq!(rows(&limited), 2);
    let groups = env.groups();
    assert_eq!(groups.len(), 1);
    let runs = env
        .query(&format!("SELECT * FROM task_group_runs('{}')", groups[0]))
        .await;
    assert_eq!(rows(&runs), 2, "only the two kept rows were submitted");
    // Without the limit the rest follow; the first two are not submitted again.
    let all = env
        .query("SELECT id FROM enrich('research', 'companies')")
        .await;
    assert_eq!(rows(&all), 6);
    let runs = env
        .query(&format!("SELECT * FROM task_group_runs('{}')", groups[0]))
        .await;
    assert_eq!(rows(&runs), 6);
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_enrich_read_twice_submits_once() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    // The CTE is referenced twice: both readers share one submission.
    let self_join = env
        .query(
            "WITH e AS (SELECT * FROM enrich('research', 'companies')) \
             SELECT a.id FROM e a JOIN e b ON a.run_id = b.run_id",
        )
        .await;
    assert_eq!(rows(&self_join), 6);
    // A DataFrame executed twice also reuses its group.
    let df = env
        .ctx
        .sql("SELECT id, run_id FROM enrich('research', 'companies')")
        .await
        .unwrap();
    let first = pretty_format_batches(
        &df.clone()
            .sort_by(vec![datafusion::prelude::col("id")])
            .unwrap()
            .collect()
            .await
            .unwrap(),
    )
    .unwrap()
    .to_string();
    let second = pretty_format_batches(
        &df.sort_by(vec![datafusion::prelude::col("id")])
            .unwrap()
            .collect()
            .await
            .unwrap(),
    )
    .unwrap()
    .to_string();
    assert_eq!(first, second);
    // The second `enrich` reads the same inputs, so its rows share the first one's runs:
    // one group of six runs in all.
    let groups = env.groups();
    assert_eq!(groups.len(), 1, "{groups:?}");
    for g in groups {
        let runs = env
            .query(&format!("SELECT * FROM task_group_runs('{g}')"))
            .await;
        assert_eq!(rows(&runs), 6, "group {g}");
    }
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn task_group_runs_reads_a_group() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    env.query("SELECT count(*) FROM enrich('research', 'SELECT * FROM companies WHERE id <= 2')")
        .await;
    let group = env.groups().pop().unwrap();
    let table = env
        .pretty(&format!(
            "SELECT row_key, run_status, run_error, input, processor, \
                    output LIKE '{{%}}' AS output_is_json, array_length(basis) AS basis_entries \
             FROM task_group_runs('{group}') ORDER BY row_key"
        ))
        .await;
    insta::assert_snapshot!("group_runs", table);
    let err = env
        .error("SELECT * FROM task_group_runs('tgrp_nope')")
        .await;
    assert!(err.contains("tgrp_nope"), "{err}");
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_calls_fail_at_planning_with_clear_errors() {
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    let cases = [
        "SELECT * FROM enrich('nope', 'companies')",
        "SELECT * FROM enrich('research')",
        "SELECT * FROM enrich('research', 'SELECT id FROM companies')",
        "SELECT * FROM enrich('research', 'missing_table')",
        "SELECT * FROM enrich('research', 'DROP TABLE companies')",
        "SELECT * FROM enrich('research', 'SELECT *, 1 AS run_id FROM companies')",
        "SELECT * FROM task_group_runs(42)",
    ];
    let mut out = Vec::new();
    for sql in cases {
        out.push(format!("{sql}\n  -> {}", env.error(sql).await));
    }
    insta::assert_snapshot!("planning_errors", out.join("\n"));
    // Nothing was submitted.
    assert!(env.groups().is_empty());

    let bad = task(
        json!({"input": {"a": "name"}, "output": {"type": "object", "properties": {
            "people": {"type": "array", "items": {"type": "object", "properties": {"age": {"type": "tuple"}}}}
        }}}),
    );
    let ctx = SessionContext::new();
    let client = Client::new(ClientConfig::new(env.server.base_url())).unwrap();
    let err = groupflow::sql::register(
        &ctx,
        HashMap::from([("t".to_string(), bad)]),
        client,
        EnrichOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tasks.t.output.properties.people.items.properties.age: unsupported type \"tuple\""
    );
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn directories_and_globs_are_tables() {
    let env = Env::start(ServerConfig::for_tests(), vec![]).await;
    env.table("all_parts", &fixture("parts")).await;
    env.table("parts_2024", &fixture("parts/2024-*.csv")).await;
    let file_url = format!("file://{}", fixture("parts/2023-*.csv"));
    env.table("parts_2023", &file_url).await;
    let table = env
        .pretty(
            "SELECT 'all' AS t, count(*) AS n FROM all_parts UNION ALL \
             SELECT '2024', count(*) FROM parts_2024 UNION ALL \
             SELECT '2023', count(*) FROM parts_2023 ORDER BY t",
        )
        .await;
    insta::assert_snapshot!("dirs_and_globs", table);

    let err = register_table(
        &env.ctx,
        "x",
        &fixture("people.ndjson"),
        &SourceOptions {
            format: Some(Format::Parquet),
            ..SourceOptions::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("people.ndjson"), "{err}");
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_source_on_s3() {
    let moto = common::Moto::start();
    moto.create_bucket("gf-sql");
    let s3 = S3Config {
        endpoint: Some(moto.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        ..S3Config::default()
    };
    let env = Env::start(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    groupflow::source::register_object_store(&env.ctx, "s3://gf-sql/", Some(&s3)).unwrap();
    for (i, filter) in ["id <= 3", "id > 3"].iter().enumerate() {
        env.query(&format!(
            "COPY (SELECT * FROM companies WHERE {filter}) \
             TO 's3://gf-sql/companies/part-{i}.parquet' STORED AS PARQUET"
        ))
        .await;
    }

    let ctx_options = SourceOptions {
        s3: Some(s3.clone()),
        ..SourceOptions::default()
    };
    let info = register_table(
        &env.ctx,
        "remote",
        "s3://gf-sql/companies/part-*.parquet",
        &ctx_options,
    )
    .await
    .expect("s3 table");
    assert_eq!(info.format, Format::Parquet);
    let remote = env
        .pretty(
            "SELECT id, name, founded_year, tier, run_status \
             FROM enrich('research', 'SELECT id, name, website, employees FROM remote') ORDER BY id",
        )
        .await;
    let local = env
        .pretty(
            "SELECT id, name, founded_year, tier, run_status \
             FROM enrich('research', 'SELECT id, name, website, employees FROM companies') ORDER BY id",
        )
        .await;
    // Same rows in, same deterministic outputs out, whichever store they came from.
    assert_eq!(remote, local);
    insta::assert_snapshot!("s3_parquet", remote);

    // Without credentials: a clear error naming the bucket, and no request to the metadata service.
    let err = register_table(
        &env.ctx,
        "anon",
        "s3://gf-sql/companies/",
        &SourceOptions {
            s3: Some(S3Config {
                endpoint: Some(moto.endpoint.clone()),
                ..S3Config::default()
            }),
            ..SourceOptions::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("s3://gf-sql") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn api_failures_surface_as_enrich_errors() {
    let env = Env::start_with(
        ServerConfig::for_tests(),
        vec![("research", company_task())],
        |c| c.with_retry(RetryConfig::none()),
    )
    .await;
    env.table("companies", &fixture("companies.csv")).await;
    let df = env
        .ctx
        .sql("SELECT * FROM enrich('research', 'companies')")
        .await
        .unwrap();
    // The server goes away between planning and execution.
    env.server.shutdown().await;
    let err = df.collect().await.unwrap_err();
    let enrich = EnrichError::find(&err).unwrap_or_else(|| panic!("not an EnrichError: {err}"));
    assert!(
        matches!(
            enrich,
            EnrichError::Submit {
                source: groupflow::sink::SubmitError::CreateGroup(_),
                ..
            }
        ),
        "{enrich:?}"
    );
    assert!(enrich.client_error().is_some());
    assert!(err.to_string().contains("enrich('research')"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_row_appears_exactly_once_across_batches() {
    let t = task(json!({
        "processor": "lite",
        "input": "Item {id}",
        "output": {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    }));
    let config = ServerConfig {
        sim: SimConfig {
            failure_rate: 0.1,
            ..SimConfig::default()
        },
        ..ServerConfig::for_tests()
    };
    let env = Env::start(config, vec![("score", t)]).await;
    // More rows than one source batch, one encoding slice and one join slice.
    let table = env
        .pretty(
            "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(DISTINCT run_id) AS runs, \
                    sum(CASE WHEN run_status = 'completed' THEN 1 ELSE 0 END) = count(score) AS outputs_match, \
                    min(id) AS lo, max(id) AS hi \
             FROM enrich('score', 'SELECT value AS id FROM generate_series(1, 20000)')",
        )
        .await;
    insta::assert_snapshot!("many_rows", table);
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn joined_rows_come_out_while_the_group_still_runs() {
    let t = task(json!({
        "processor": "lite",
        "input": "Item {id}",
        "output": {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    }));
    // 4,096 runs of 100–300 ms, 256 at a time: about 3 s for the group, while the runs of
    // the first 1,024 rows (one joined batch) end after about 0.8 s.
    let config = ServerConfig {
        concurrency: 256,
        sim: SimConfig {
            latency: std::time::Duration::from_millis(100)..=std::time::Duration::from_millis(300),
            ..SimConfig::default()
        },
        ..ServerConfig::for_tests()
    };
    let env = Env::start(config, vec![("score", t)]).await;
    let mut stream = env
        .ctx
        .sql(
            "SELECT id, run_status, score \
             FROM enrich('score', 'SELECT value AS id FROM generate_series(1, 4096)')",
        )
        .await
        .unwrap()
        .execute_stream()
        .await
        .unwrap();
    use futures::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    let client = Client::new(ClientConfig::new(env.server.base_url())).unwrap();
    let group = env.groups().pop().expect("a group");
    let status = client.get_group(&group).await.unwrap().status;
    assert!(
        status.is_active,
        "the first rows came only once the group had ended: {status:?}"
    );
    // Those rows are whole: in order, each with its result.
    let ids = first.column_by_name("id").unwrap();
    let ids = datafusion::arrow::array::AsArray::as_primitive::<
        datafusion::arrow::datatypes::Int64Type,
    >(ids);
    assert!(first.num_rows() > 0);
    assert!(ids.values().iter().copied().eq(1..=first.num_rows() as i64));
    assert_eq!(first.column_by_name("score").unwrap().null_count(), 0);
    // The rest follow, every row once, each with its result.
    let mut n = first.num_rows();
    while let Some(batch) = stream.next().await {
        let batch = batch.unwrap();
        assert_eq!(batch.column_by_name("score").unwrap().null_count(), 0);
        n += batch.num_rows();
    }
    assert_eq!(n, 4096);
    env.server.shutdown().await;
}
