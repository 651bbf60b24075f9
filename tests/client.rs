//! The client against the real local server on a loopback port: every endpoint, errors,
//! auth, retries honouring `Retry-After`, the POST limiter, resumable streams, and 10,000
//! runs submitted through injected 429s, 500s, dropped responses and cut streams.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt, TryStreamExt};
use groupflow::api::{RunStatus, StreamEvent, TaskRunInput, TaskRunOutput, TaskSpec};
use groupflow::client::{
    AddedBatch, Client, ClientConfig, ClientError, ROW_KEY, RetryConfig, RunsQuery, SubmitConfig,
    row_key_of,
};
use groupflow::server::{self, FaultConfig, ServerConfig, ServerHandle};
use serde_json::json;

/// Safety limit, so a broken client or server fails a test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(300);

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .expect("gave up waiting")
}

async fn start(config: ServerConfig) -> ServerHandle {
    server::start(config).await.expect("start the server")
}

fn faulty(faults: FaultConfig) -> ServerConfig {
    ServerConfig {
        faults,
        ..ServerConfig::for_tests()
    }
}

/// Fast retries, so fault-heavy tests finish quickly.
fn quick_retry() -> RetryConfig {
    RetryConfig {
        max_attempts: 30,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(100),
        max_elapsed: Duration::from_secs(120),
        ..RetryConfig::default()
    }
}

fn client_for(server: &ServerHandle) -> Client {
    Client::new(ClientConfig::new(server.base_url()).with_retry(quick_retry())).unwrap()
}

fn spec() -> TaskSpec {
    serde_json::from_value(json!({"output_schema": {"type": "json", "json_schema": {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["summary", "year"]
    }}}))
    .unwrap()
}

fn inputs(n: usize) -> Vec<TaskRunInput> {
    (0..n)
        .map(|i| TaskRunInput::new(json!({"company": format!("Company {i}")}), "lite"))
        .collect()
}

#[test]
fn client_is_shareable() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<Client>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_inputs_through_faults_become_exactly_ten_thousand_runs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    let server = start(ServerConfig {
        db: Some(db.clone()),
        ..faulty(FaultConfig {
            rate_429: 0.10,
            rate_500: 0.05,
            drop_add_runs: 0.05,
            cut_streams: 0.05,
            retry_after_secs: 0,
        })
    })
    .await;
    let client = Client::new(
        ClientConfig::new(server.base_url())
            .with_retry(quick_retry())
            .with_submit(SubmitConfig {
                batch_size: 50,
                ..SubmitConfig::default()
            }),
    )
    .unwrap();
    let group = within(client.create_group(None))
        .await
        .unwrap()
        .taskgroup_id;

    let all = inputs(10_000);
    let ids = within(client.add_runs(&group, Some(spec()), all.clone()))
        .await
        .unwrap();
    assert_eq!(ids.len(), 10_000);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 10_000, "every input has its own run");
    let stats = client.stats();
    assert!(stats.reconciliations > 0, "{stats:?}");
    assert!(
        stats.runs_recovered > 0,
        "dropped answers were recovered: {stats:?}"
    );

    let mut updates = 0;
    let done = within(client.wait(&group, |_| updates += 1)).await.unwrap();
    assert!(!done.is_active && updates >= 1);
    assert_eq!(done.num_task_runs, 10_000);

    let query = RunsQuery {
        expected: Some(10_000),
        ..RunsQuery::with_results()
    };
    let results: Vec<_> = within(client.runs_stream(&group, query).try_collect::<Vec<_>>())
        .await
        .unwrap();
    let with_output: HashSet<&str> = results
        .iter()
        .filter(|e| matches!(e.output, Some(TaskRunOutput::Json { .. })))
        .map(|e| e.run.run_id.as_str())
        .collect();
    assert_eq!(results.len(), 10_000);
    assert_eq!(with_output.len(), 10_000, "10,000 distinct results");
    eprintln!("through faults: {:?}", client.stats());
    server.shutdown().await;

    // Read the same state back through a server without faults.
    let server = start(ServerConfig {
        db: Some(db),
        ..ServerConfig::for_tests()
    })
    .await;
    let client =
        Client::new(ClientConfig::new(server.base_url()).with_retry(RetryConfig::none())).unwrap();
    let g = client.get_group(&group).await.unwrap();
    assert_eq!(g.status.num_task_runs, 10_000);
    assert_eq!(g.status.count(&RunStatus::Completed), 10_000);
    let runs: Vec<_> = within(
        client
            .runs_stream(&group, RunsQuery::default())
            .try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let keys: HashSet<String> = runs
        .iter()
        .filter_map(|e| e.run.metadata.as_ref()?.get(ROW_KEY).cloned())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 10_000);
    assert_eq!(keys.len(), 10_000, "no row key twice");
    let stored: HashSet<&String> = runs.iter().map(|e| &e.run.run_id).collect();
    assert_eq!(stored, distinct, "the ids returned are the runs stored");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_add_runs_answers_are_reconciled_not_resent() {
    let server = start(faulty(FaultConfig {
        drop_add_runs: 0.5,
        ..FaultConfig::default()
    }))
    .await;
    let client = Client::new(
        ClientConfig::new(server.base_url())
            .with_retry(quick_retry())
            .with_submit(SubmitConfig {
                batch_size: 50,
                max_in_flight: 3,
                ..SubmitConfig::default()
            }),
    )
    .unwrap();
    let group = client.create_group(None).await.unwrap().taskgroup_id;
    let ids = within(client.add_runs(&group, Some(spec()), inputs(1000)))
        .await
        .unwrap();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1000);
    let g = client.get_group(&group).await.unwrap();
    assert_eq!(g.status.num_task_runs, 1000, "no run was created twice");
    let stats = client.stats();
    assert!(
        stats.runs_recovered > 0 && stats.reconciliations > 0,
        "{stats:?}"
    );
    // Every POST beyond the 20 batches was caused by a lost answer.
    assert!(stats.posts >= 20, "{stats:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_submission_maps_row_keys_to_run_ids_in_order() {
    let server = start(ServerConfig::for_tests()).await;
    let client = Client::new(
        ClientConfig::new(server.base_url()).with_submit(SubmitConfig {
            batch_size: 100,
            max_in_flight: 2,
            ..SubmitConfig::default()
        }),
    )
    .unwrap();
    let group = client.create_group(None).await.unwrap().taskgroup_id;

    // The caller feeds inputs through a bounded channel as its rows arrive.
    let (mut tx, rx) = futures::channel::mpsc::channel::<TaskRunInput>(8);
    let feeder = tokio::spawn(async move {
        for (i, mut input) in inputs(1234).into_iter().enumerate() {
            if i % 2 == 0 {
                input.metadata = Some(
                    serde_json::from_value(json!({ROW_KEY: format!("row-{i}"), "n": i})).unwrap(),
                );
            }
            tx.send(input).await.unwrap();
        }
    });
    let batches: Vec<AddedBatch> = within(
        client
            .add_runs_stream(&group, Some(spec()), rx)
            .try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    feeder.await.unwrap();

    assert_eq!(batches.len(), 13);
    let mut next = 0u64;
    for b in &batches {
        assert_eq!(b.offset, next, "batches come in input order");
        assert!(b.run_ids.len() <= 100 && b.run_ids.len() == b.row_keys.len());
        assert_eq!(b.recovered, 0);
        next += b.run_ids.len() as u64;
    }
    assert_eq!(next, 1234);
    assert_eq!(client.stats().posts, 13);
    // Each answer's event cursor precedes its runs: a wait from the last one sees the end.
    let last = batches[12].event_cursor.clone();
    assert!(last.is_some());
    let done = within(client.wait_from(&group, last, |_| {}))
        .await
        .unwrap();
    assert_eq!((done.num_task_runs, done.is_active), (1234, false));
    assert_eq!(batches[0].row_keys[0], "row-0");
    assert!(batches[0].row_keys[1].starts_with('h'), "derived key");
    // The run behind a row key carries that key.
    let b = &batches[7];
    let run = client.get_group_run(&group, &b.run_ids[5]).await.unwrap();
    let key = run.metadata.unwrap()[ROW_KEY].as_str().unwrap().to_string();
    assert_eq!(key, b.row_keys[5]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_resume_after_cuts_without_gap_or_duplicate() {
    let server = start(faulty(FaultConfig {
        cut_streams: 0.5,
        ..FaultConfig::default()
    }))
    .await;
    let client = client_for(&server);
    let group = client.create_group(None).await.unwrap().taskgroup_id;
    let ids = within(client.add_runs(&group, Some(spec()), inputs(300)))
        .await
        .unwrap();
    within(client.wait(&group, |_| {})).await.unwrap();

    for _ in 0..20 {
        let before = client.stats().reconnects;
        let runs: Vec<_> = within(
            client
                .runs_stream(&group, RunsQuery::with_results())
                .try_collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        let read: Vec<&String> = runs.iter().map(|e| &e.run.run_id).collect();
        assert_eq!(
            read,
            ids.iter().collect::<Vec<_>>(),
            "all runs, in order, once"
        );
        assert!(runs.iter().all(|e| e.input.is_some() && e.output.is_some()));

        let events: Vec<_> = within(client.events_stream(&group, None).try_collect::<Vec<_>>())
            .await
            .unwrap();
        // Each run reports `running`, then its end; every state once.
        let states: Vec<(&str, &RunStatus)> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::RunState(r) => Some((r.run.run_id.as_str(), &r.run.status)),
                _ => None,
            })
            .collect();
        let distinct: HashSet<_> = states.iter().collect();
        assert_eq!(distinct.len(), states.len(), "no state twice");
        let finished: HashSet<&str> = states
            .iter()
            .filter(|(_, s)| s.is_terminal())
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(finished.len(), 300);
        let cursors: Vec<&str> = events.iter().filter_map(|e| e.event_id()).collect();
        assert_eq!(cursors.iter().collect::<HashSet<_>>().len(), cursors.len());
        assert!(matches!(events.last(), Some(StreamEvent::GroupStatus(s)) if !s.status.is_active));
        if client.stats().reconnects > before {
            server.shutdown().await;
            return;
        }
    }
    panic!("no stream was cut in 20 rounds at a cut rate of 0.5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_events_stream_until_inactive() {
    let server = start(ServerConfig {
        sim: server::SimConfig {
            latency: Duration::from_millis(200)..=Duration::from_millis(400),
            failure_rate: 0.1,
        },
        ..ServerConfig::for_tests()
    })
    .await;
    let client = client_for(&server);
    let group = client.create_group(None).await.unwrap().taskgroup_id;
    // A first batch that finishes, then a second: a replayed "inactive" from between the
    // two must not end the wait.
    client.add_runs(&group, None, inputs(20)).await.unwrap();
    within(client.wait(&group, |_| {})).await.unwrap();
    client.add_runs(&group, None, inputs(200)).await.unwrap();
    let requests_before = client.stats().requests;
    let mut seen = Vec::new();
    let status = within(client.wait(&group, |s| seen.push(s.clone())))
        .await
        .unwrap();
    assert!(!status.is_active);
    assert_eq!(status.num_task_runs, 220);
    let finished = status.count(&RunStatus::Completed) + status.count(&RunStatus::Failed);
    assert_eq!(finished, 220);
    assert!(
        status.count(&RunStatus::Failed) > 0,
        "the sim fails some runs"
    );
    assert_eq!(seen.last(), Some(&status));
    let done = |s: &groupflow::api::TaskGroupStatus| {
        s.count(&RunStatus::Completed) + s.count(&RunStatus::Failed)
    };
    assert!(
        seen.windows(2).all(|w| done(&w[0]) <= done(&w[1])),
        "progress never goes backwards"
    );
    // A handful of requests, not a polling loop.
    let requests = client.stats().requests - requests_before;
    assert!(requests <= 5, "{requests} requests");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_group_waits_at_once_and_streams_nothing() {
    let server = start(ServerConfig::for_tests()).await;
    let client = client_for(&server);
    let mut metadata = serde_json::Map::new();
    metadata.insert("team".into(), json!("data"));
    let group = client.create_group(Some(metadata)).await.unwrap();
    assert_eq!(group.metadata.as_ref().unwrap()["team"], "data");
    let id = group.taskgroup_id;
    let status = within(client.wait(&id, |_| {})).await.unwrap();
    assert!(!status.is_active);
    assert_eq!(status.num_task_runs, 0);
    let runs: Vec<_> = within(
        client
            .runs_stream(&id, RunsQuery::default())
            .try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(runs.is_empty());
    let events: Vec<_> = within(client.events_stream(&id, None).try_collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, StreamEvent::RunState(_)))
    );
    assert_eq!(
        client.add_runs(&id, None, Vec::new()).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(client.stats().posts, 0, "nothing to add, nothing sent");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_runs_and_group_runs_round_trip() {
    let server = start(ServerConfig::for_tests()).await;
    let client = client_for(&server);
    let mut input = TaskRunInput::new(json!({"company": "Acme"}), "core");
    input.task_spec = Some(spec());
    input.metadata = Some(serde_json::from_value(json!({"source": "test"})).unwrap());
    let run = client.create_run(&input).await.unwrap();
    assert!(run.run_id.starts_with("trun_"));
    assert_eq!(
        client.get_run(&run.run_id).await.unwrap().run_id,
        run.run_id
    );
    let back = client.get_run_input(&run.run_id).await.unwrap();
    assert_eq!(
        (back.input, back.processor),
        (input.input.clone(), input.processor.clone())
    );
    let result = within(client.get_run_result(&run.run_id, Some(Duration::from_secs(30))))
        .await
        .unwrap();
    assert_eq!(result.run.status, RunStatus::Completed);
    let TaskRunOutput::Json { content, .. } = &result.output else {
        panic!("json output expected: {:?}", result.output)
    };
    assert!(
        content["summary"].is_string() && content["year"].is_i64(),
        "{content}"
    );

    let events: Vec<_> = within(client.run_events(&run.run_id).try_collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        matches!(events.last(), Some(StreamEvent::RunState(r)) if r.run.status == RunStatus::Completed)
    );

    let group = client.create_group(None).await.unwrap().taskgroup_id;
    let ids = client
        .add_runs(&group, Some(spec()), inputs(3))
        .await
        .unwrap();
    let r = client.get_group_run(&group, &ids[1]).await.unwrap();
    assert_eq!(r.taskgroup_id.as_deref(), Some(group.as_str()));
    assert!(row_key_of(&client.get_run_input(&ids[1]).await.unwrap()).is_some());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_an_auth_error_that_never_shows_the_key() {
    const SECRET: &str = "sk-wrong-4f1c9e-never-print-me";
    let server = start(ServerConfig {
        api_key: Some("sk-right-key".into()),
        ..ServerConfig::for_tests()
    })
    .await;
    let config = ClientConfig::new(server.base_url()).with_api_key(SECRET);
    let client = Client::new(config.clone()).unwrap();
    let err = client.create_group(None).await.unwrap_err();
    assert!(err.is_auth() && !err.is_retryable(), "{err:?}");
    assert_eq!(err.status(), Some(401));
    let streamed = client
        .runs_stream("tgrp_x", RunsQuery::default())
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert!(streamed.is_auth());
    for text in [
        err.to_string(),
        format!("{err:?}"),
        streamed.to_string(),
        format!("{streamed:?}"),
        format!("{client:?}"),
        format!("{config:?}"),
    ] {
        assert!(!text.contains(SECRET), "the key leaked: {text}");
    }
    assert_eq!(client.stats().retries, 0, "auth failures are not retried");

    let no_key = client_for(&server);
    assert!(no_key.get_group("tgrp_x").await.unwrap_err().is_auth());
    let right =
        Client::new(ClientConfig::new(server.base_url()).with_api_key("sk-right-key")).unwrap();
    let g = right.create_group(None).await.unwrap();
    assert_eq!(
        right.get_group(&g.taskgroup_id).await.unwrap().taskgroup_id,
        g.taskgroup_id
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_group_and_run_are_404_with_message_and_ref_id() {
    let server = start(ServerConfig::for_tests()).await;
    let client = client_for(&server);
    let missing = "tgrp_00000000000000000000000000000000";
    let err = client.get_group(missing).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert!(!err.is_retryable() && !err.is_auth());
    assert!(err.ref_id().is_some_and(|r| !r.is_empty()), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("404") && text.contains("TaskGroup not found"),
        "{text}"
    );
    assert!(text.contains(err.ref_id().unwrap()), "{text}");

    let err = client
        .runs_stream(missing, RunsQuery::default())
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(
        client.wait(missing, |_| {}).await.unwrap_err().status(),
        Some(404)
    );
    let err = client.add_runs(missing, None, inputs(2)).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    let err = client
        .get_run("trun_00000000000000000000000000000000")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(client.stats().retries, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_surface_with_their_detail() {
    let server = start(ServerConfig::for_tests()).await;
    let client = client_for(&server);
    let group = client.create_group(None).await.unwrap().taskgroup_id;

    // Group endpoint: FastAPI's {"detail":[…]} body.
    let mut bad = inputs(3);
    bad[1].processor = "gpt-4".into();
    let err = client.add_runs(&group, None, bad).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    let api = err.api_error().unwrap();
    assert!(
        api.message.starts_with("body.inputs.1.processor: "),
        "{}",
        api.message
    );
    assert!(api.message.contains("gpt-4"), "{}", api.message);
    assert!(api.detail.as_ref().is_some_and(|d| d.is_array()));
    assert_eq!(
        client.get_group(&group).await.unwrap().status.num_task_runs,
        0
    );

    // Run endpoint: the {"type":"error","error":{…}} body with a ref_id.
    let mut long_key = TaskRunInput::new(json!("q"), "lite");
    long_key.metadata = Some(serde_json::from_value(json!({"a_key_longer_than_16": 1})).unwrap());
    let err = client.create_run(&long_key).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.ref_id().is_some(), "{err:?}");
    assert!(err.to_string().contains("a_key_longer_than_16"), "{err}");
    // An unknown processor is refused as the API does, with 403.
    let err = client
        .create_run(&TaskRunInput::new(json!("q"), "gpt-4"))
        .await
        .unwrap_err();
    assert!(err.is_auth() && err.to_string().contains("gpt-4"), "{err}");

    // Caught before sending: a row key that is not a scalar.
    let mut odd = TaskRunInput::new(json!("q"), "lite");
    odd.metadata = Some(serde_json::from_value(json!({ROW_KEY: {"a": 1}})).unwrap());
    let err = client.add_runs(&group, None, vec![odd]).await.unwrap_err();
    assert!(
        matches!(err, ClientError::InvalidInput { index: 0, .. }),
        "{err:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_as_long_as_retry_after_says() {
    let server = start(faulty(FaultConfig {
        rate_429: 0.5,
        retry_after_secs: 1,
        ..FaultConfig::default()
    }))
    .await;
    // Computed backoff is a few milliseconds, so any second-long wait is the server's.
    let client = Client::new(
        ClientConfig::new(server.base_url()).with_retry(RetryConfig {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            jitter: false,
            max_attempts: 30,
            ..RetryConfig::default()
        }),
    )
    .unwrap();
    let started = Instant::now();
    let group = within(client.create_group(None))
        .await
        .unwrap()
        .taskgroup_id;
    for _ in 0..30 {
        if client.stats().retries > 0 {
            break;
        }
        within(client.get_group(&group)).await.unwrap();
    }
    let stats = client.stats();
    assert!(stats.retries > 0, "no 429 in 30 requests at rate 0.5");
    let asked = Duration::from_secs(stats.retries);
    assert!(stats.retry_wait >= asked, "{stats:?}");
    assert!(started.elapsed() >= asked);
    server.shutdown().await;

    // A wait longer than the client accepts surfaces at once.
    let server = start(faulty(FaultConfig {
        rate_429: 1.0,
        retry_after_secs: 3600,
        ..FaultConfig::default()
    }))
    .await;
    let client = client_for(&server);
    let err = client.get_group("tgrp_x").await.unwrap_err();
    assert_eq!(err.status(), Some(429));
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(client.stats().retries, 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_bounds_the_post_rate() {
    let server = start(ServerConfig::for_tests()).await;
    // 3 POSTs at once, then 60 a minute (one a second).
    let client = Client::new(
        ClientConfig::new(server.base_url()).with_submit(SubmitConfig {
            batch_size: 1,
            max_in_flight: 4,
            posts_per_minute: 60,
            burst: 3,
        }),
    )
    .unwrap();
    let group = client.create_group(None).await.unwrap().taskgroup_id;
    let started = Instant::now();
    let submitting = {
        let (client, group) = (client.clone(), group.clone());
        tokio::spawn(async move { client.add_runs(&group, None, inputs(40)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let posts = client.stats().posts;
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 3 + (elapsed + 1e-6).floor() as u64;
    assert!(posts >= 3, "the burst goes out at once: {posts}");
    assert!(
        posts <= allowed,
        "{posts} POSTs in {elapsed:.2}s; at most {allowed} allowed"
    );
    submitting.abort();
    let _ = submitting.await;
    let g = client.get_group(&group).await.unwrap();
    assert!(
        g.status.num_task_runs <= allowed,
        "{}",
        g.status.num_task_runs
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_of_a_slow_run_times_out_with_408() {
    let server = start(ServerConfig {
        sim: server::SimConfig {
            latency: Duration::from_secs(30)..=Duration::from_secs(30),
            failure_rate: 0.0,
        },
        ..ServerConfig::for_tests()
    })
    .await;
    let client = client_for(&server);
    let run = client
        .create_run(&TaskRunInput::new(json!("slow"), "lite"))
        .await
        .unwrap();
    let err = client
        .get_run_result(&run.run_id, Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(408), "{err:?}");
    assert_eq!(
        client.stats().retries,
        0,
        "408 from /result means still running"
    );
    let status = client.get_run(&run.run_id).await.unwrap().status;
    assert!(status.is_active(), "{status}");
    server.shutdown().await;
}
