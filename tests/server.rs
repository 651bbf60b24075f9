//! The local Task Group server over real HTTP on a loopback port: every endpoint, the wire
//! shapes, SSE framing, cursors, validation, auth, limits, fault injection, and durability
//! across `kill -9` of the real binary.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use groupflow::api::{StreamEvent, TaskGroup, TaskGroupRunResponse, TaskRun, TaskRunResult};
use groupflow::server::{self, FaultConfig, ServerConfig, ServerHandle};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Safety limit for waits, so a broken server fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Api {
    base: String,
    http: reqwest::Client,
    key: Option<String>,
}

impl Api {
    fn new(base: String) -> Api {
        Api {
            base,
            http: reqwest::Client::new(),
            key: None,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.header("x-api-key", k),
            None => r,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.req(reqwest::Method::GET, path).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    /// Reads a whole SSE response and checks its framing.
    async fn sse(&self, path: &str) -> Sse {
        let r = tokio::time::timeout(PATIENCE, async {
            let r = self.req(reqwest::Method::GET, path).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()["content-type"], "text/event-stream");
            r.text().await.unwrap()
        })
        .await
        .expect("stream ended");
        Sse::parse(&r)
    }

    async fn create_group(&self) -> String {
        let (s, g) = self.post("/v1/tasks/groups", json!({})).await;
        assert_eq!(s, StatusCode::OK);
        g["taskgroup_id"].as_str().unwrap().to_string()
    }

    async fn add_runs(&self, group: &str, body: Value) -> TaskGroupRunResponse {
        let (s, v) = self
            .post(&format!("/v1/tasks/groups/{group}/runs"), body)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn wait_inactive(&self, group: &str) -> TaskGroup {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let (_, v) = self.get(&format!("/v1/tasks/groups/{group}")).await;
                let g: TaskGroup = serde_json::from_value(v).unwrap();
                if !g.status.is_active {
                    return g;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("group finished")
    }
}

/// A parsed SSE body: (event name, data) pairs and the comment lines seen.
struct Sse {
    events: Vec<(String, Value)>,
    comments: Vec<String>,
}

impl Sse {
    /// Parses and checks the framing: `event:` then one `data:` line of JSON whose `type`
    /// equals the event name, a blank line after each message, and no `id:` lines at all.
    fn parse(text: &str) -> Sse {
        let mut events = Vec::new();
        let mut comments = Vec::new();
        for block in text.split("\n\n").filter(|b| !b.is_empty()) {
            let lines: Vec<&str> = block.lines().collect();
            if lines.iter().all(|l| l.starts_with(':')) {
                comments.extend(lines.iter().map(|l| l.to_string()));
                continue;
            }
            assert_eq!(
                lines.len(),
                2,
                "one event line and one data line: {block:?}"
            );
            let name = lines[0].strip_prefix("event: ").expect("event line");
            let data = lines[1].strip_prefix("data: ").expect("data line");
            let v: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(v["type"], name, "event name equals JSON type");
            events.push((name.to_string(), v));
        }
        assert!(
            !text.lines().any(|l| l.starts_with("id:")),
            "no id: lines ever"
        );
        assert!(
            text.is_empty() || text.ends_with("\n\n"),
            "ends with a blank line"
        );
        Sse { events, comments }
    }

    fn typed(&self) -> Vec<StreamEvent> {
        self.events
            .iter()
            .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
            .collect()
    }

    fn last_id(&self) -> String {
        self.events.last().unwrap().1["event_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

async fn start(config: ServerConfig) -> (ServerHandle, Api) {
    let handle = server::start(config).await.unwrap();
    let api = Api::new(handle.base_url());
    (handle, api)
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

const RUN_KEYS: [&str; 11] = [
    "run_id",
    "interaction_id",
    "status",
    "is_active",
    "processor",
    "metadata",
    "taskgroup_id",
    "warnings",
    "error",
    "created_at",
    "modified_at",
];
const STATUS_KEYS: [&str; 5] = [
    "num_task_runs",
    "task_run_status_counts",
    "is_active",
    "status_message",
    "modified_at",
];

fn company_spec() -> Value {
    json!({
        "input_schema": {"type": "json", "json_schema": {"type": "object",
            "properties": {"company": {"type": "string"}}, "required": ["company"]}},
        "output_schema": {"type": "json", "json_schema": {"type": "object", "properties": {
            "summary": {"type": "string"},
            "founded_year": {"type": "integer", "minimum": 1900, "maximum": 2024},
            "tags": {"type": "array", "items": {"type": "string"}}
        }, "required": ["summary", "founded_year", "tags"]}}
    })
}

fn companies(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"input": {"company": format!("Company {i}")}, "processor": "core", "metadata": {"row": i}}))
        .collect()
}

fn is_rfc3339_micros(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z') && s.len() == 27
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_endpoints_have_the_reference_wire_shapes() {
    let (h, api) = start(ServerConfig::for_tests()).await;
    for prefix in ["/v1", "/v1beta"] {
        let (s, g) = api.post(&format!("{prefix}/tasks/groups"), json!({})).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            keys(&g),
            set(&["taskgroup_id", "status", "created_at", "metadata"])
        );
        assert_eq!(keys(&g["status"]), set(&STATUS_KEYS));
        let id = g["taskgroup_id"].as_str().unwrap();
        assert!(id.starts_with("tgrp_") && id.len() == 37, "{id}");
        assert_eq!(g["status"]["task_run_status_counts"], json!({}));
        assert_eq!(
            g["status"]["is_active"], false,
            "an empty group is inactive"
        );
        assert!(is_rfc3339_micros(g["created_at"].as_str().unwrap()));

        let (_, first) = api
            .post(
                &format!("{prefix}/tasks/groups/{id}/runs"),
                json!({"default_task_spec": company_spec(), "inputs": companies(3)}),
            )
            .await;
        assert_eq!(
            keys(&first),
            set(&["status", "run_ids", "run_cursor", "event_cursor"])
        );
        assert_eq!(
            first["run_cursor"],
            Value::Null,
            "first batch has no cursor"
        );
        assert_eq!(first["event_cursor"], Value::Null);
        assert_eq!(first["status"]["num_task_runs"], 3);
        let ids: Vec<&str> = first["run_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|r| r.starts_with("trun_") && r.len() == 37));

        let (_, second) = api
            .post(
                &format!("{prefix}/tasks/groups/{id}/runs?refresh_status=false"),
                json!({"default_task_spec": company_spec(), "inputs": companies(2), "refresh_status": true}),
            )
            .await;
        assert!(second["run_cursor"].is_string() && second["event_cursor"].is_string());
        assert_eq!(second["status"]["num_task_runs"], 5);

        let g = api.wait_inactive(id).await;
        assert_eq!(g.status.num_task_runs, 5);
        let (_, raw) = api.get(&format!("{prefix}/tasks/groups/{id}")).await;
        assert_eq!(
            raw["status"]["task_run_status_counts"],
            json!({"completed": 5}),
            "only non-zero counts"
        );
        assert_eq!(raw["status"]["status_message"], "");

        let (s, run) = api
            .get(&format!("{prefix}/tasks/groups/{id}/runs/{}", ids[1]))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(keys(&run), set(&RUN_KEYS));
        assert_eq!(run["run_id"], ids[1]);
        assert_eq!(run["interaction_id"], ids[1]);
        assert_eq!(run["taskgroup_id"], id);
        assert_eq!(run["metadata"], json!({"row": 1}));
        assert_eq!(run["status"], "completed");
        assert_eq!(run["is_active"], false);
        assert_eq!(run["warnings"], Value::Null);
        assert_eq!(run["error"], Value::Null);
        assert!(is_rfc3339_micros(run["modified_at"].as_str().unwrap()));
    }
    let (_, g) = api
        .post(
            "/v1/tasks/groups",
            json!({"metadata": {"team": "data", "n": 3, "x": 1.5, "ok": true}}),
        )
        .await;
    assert_eq!(
        g["metadata"],
        json!({"team": "data", "n": 3, "x": 1.5, "ok": true})
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stream_frames_filters_and_resumes() {
    let mut config = ServerConfig::for_tests();
    config.sim.failure_rate = 0.5;
    let (h, api) = start(config).await;
    let g = api.create_group().await;
    let added = api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(40)}),
        )
        .await;
    api.wait_inactive(&g).await;

    let plain = api
        .sse(&format!(
            "/v1/tasks/groups/{g}/runs?last_event_id=&beta=true"
        ))
        .await;
    let ids: Vec<String> = plain
        .typed()
        .into_iter()
        .map(|e| match e {
            StreamEvent::RunState(e) => e.run.run_id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids, added.run_ids, "every run, in the order added");
    for (_, v) in &plain.events {
        assert_eq!(
            keys(v),
            set(&["type", "event_id", "run", "input", "output"])
        );
        assert_eq!(keys(&v["run"]), set(&RUN_KEYS));
        assert_eq!(v["input"], Value::Null);
        assert_eq!(v["output"], Value::Null);
    }

    let full = api
        .sse(&format!(
            "/v1beta/tasks/groups/{g}/runs?include_input=true&include_output=true"
        ))
        .await;
    let (mut completed, mut failed) = (0, 0);
    for e in full.typed() {
        let StreamEvent::RunState(e) = e else {
            panic!("only run events")
        };
        let input = e.input.expect("input included");
        assert!(input.input["company"].is_string());
        assert_eq!(input.processor, "core");
        match e.run.status.as_str() {
            "completed" => {
                completed += 1;
                let output = e.output.expect("completed runs carry output");
                assert_eq!(output.basis().len(), 3, "one basis entry per field");
            }
            "failed" => {
                failed += 1;
                assert!(e.output.is_none());
                let err = e.run.error.expect("failed runs carry an error");
                assert!(!err.ref_id.is_empty() && err.message.contains("Simulated failure"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(completed + failed, 40);
    assert!(
        completed > 0 && failed > 0,
        "{completed} completed, {failed} failed"
    );

    let only_failed = api
        .sse(&format!("/v1/tasks/groups/{g}/runs?status=failed"))
        .await;
    assert_eq!(only_failed.events.len(), failed);
    assert!(
        only_failed
            .events
            .iter()
            .all(|(_, v)| v["run"]["status"] == "failed")
    );

    let cursor = plain.events[16].1["event_id"].as_str().unwrap();
    let rest = api
        .sse(&format!("/v1/tasks/groups/{g}/runs?last_event_id={cursor}"))
        .await;
    let rest_ids: Vec<&str> = rest
        .events
        .iter()
        .map(|(_, v)| v["run"]["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest_ids,
        added.run_ids[17..]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let end = api
        .sse(&format!(
            "/v1/tasks/groups/{g}/runs?last_event_id={}",
            plain.last_id()
        ))
        .await;
    assert!(end.events.is_empty(), "nothing after the last run");

    let second = api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(2)}),
        )
        .await;
    let tail = api
        .sse(&format!(
            "/v1/tasks/groups/{g}/runs?last_event_id={}",
            second.run_cursor.as_deref().unwrap()
        ))
        .await;
    let tail_ids: Vec<&str> = tail
        .events
        .iter()
        .map(|(_, v)| v["run"]["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        tail_ids,
        second
            .run_ids
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    let (s, v) = api
        .get(&format!("/v1/tasks/groups/{g}/runs?status=sleeping"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["detail"][0]["loc"], json!(["query", "status"]));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_replays_stays_open_while_active_and_closes() {
    let mut config = ServerConfig::for_tests();
    config.sim.latency = Duration::from_millis(400)..=Duration::from_millis(600);
    config.keepalive_interval = Duration::from_millis(100);
    config.concurrency = 2;
    let (h, api) = start(config).await;
    let g = api.create_group().await;
    let added = api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(3)}),
        )
        .await;
    // Opened while the group is active: it follows the runs and closes when they are done.
    let live = api.sse(&format!("/v1/tasks/groups/{g}/events")).await;
    assert!(
        live.comments.iter().any(|c| c == ": ping"),
        "keep-alives are comments"
    );
    let events = live.typed();
    let StreamEvent::GroupStatus(first) = &events[0] else {
        panic!("starts with the status written when runs were added")
    };
    assert_eq!(first.status.num_task_runs, 3);
    let StreamEvent::GroupStatus(last) = events.last().unwrap() else {
        panic!("ends with the group's final status")
    };
    assert!(!last.status.is_active);
    assert_eq!(last.status.count(&groupflow::api::RunStatus::Completed), 3);
    let mut transitions: HashMap<String, Vec<String>> = HashMap::new();
    for e in &events {
        if let StreamEvent::RunState(e) = e {
            assert!(
                e.output.is_none() && e.input.is_none(),
                "no outputs on /events"
            );
            transitions
                .entry(e.run.run_id.clone())
                .or_default()
                .push(e.run.status.to_string());
        }
    }
    for id in &added.run_ids {
        assert_eq!(transitions[id], ["running", "completed"], "{id}");
    }
    for (_, v) in &live.events {
        match v["type"].as_str().unwrap() {
            "task_group_status" => {
                assert_eq!(keys(v), set(&["type", "event_id", "status"]));
                assert_eq!(keys(&v["status"]), set(&STATUS_KEYS));
            }
            _ => assert_eq!(
                keys(v),
                set(&["type", "event_id", "run", "input", "output"])
            ),
        }
    }

    // Opened after the group finished: the full replay, then the end.
    let replay = api
        .sse(&format!("/v1beta/tasks/groups/{g}/events?last_event_id="))
        .await;
    assert_eq!(replay.events, live.events);
    let mid = live.events[2].1["event_id"].as_str().unwrap();
    let resumed = api
        .sse(&format!("/v1/tasks/groups/{g}/events?last_event_id={mid}"))
        .await;
    assert_eq!(resumed.events[..], live.events[3..]);

    let more = api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(1)}),
        )
        .await;
    let from_cursor = api
        .sse(&format!(
            "/v1/tasks/groups/{g}/events?last_event_id={}",
            more.event_cursor.as_deref().unwrap()
        ))
        .await;
    let StreamEvent::GroupStatus(s) = &from_cursor.typed()[0] else {
        panic!("event_cursor starts at the new batch's status")
    };
    assert_eq!(s.status.num_task_runs, 4);

    // `timeout` bounds an active stream: it closes cleanly with the group still active.
    let _ = api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(2)}),
        )
        .await;
    let bounded = api
        .sse(&format!(
            "/v1/tasks/groups/{g}/events?timeout=0&last_event_id={}",
            live.last_id()
        ))
        .await;
    assert!(!bounded.events.is_empty());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_run_endpoints() {
    let (h, api) = start(ServerConfig::for_tests()).await;
    let body = json!({
        "input": {"company": "Acme"},
        "processor": "ultra8x-fast",
        "metadata": {"k": "v"},
        "task_spec": company_spec()
    });
    let (s, run) = api.post("/v1/tasks/runs?beta=true", body.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(keys(&run), set(&RUN_KEYS));
    assert_eq!(run["status"], "queued");
    assert_eq!(run["is_active"], true);
    assert_eq!(run["taskgroup_id"], Value::Null);
    let id = run["run_id"].as_str().unwrap();

    let (s, result) = api
        .get(&format!("/v1/tasks/runs/{id}/result?timeout=30"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let result: TaskRunResult = serde_json::from_value(result).unwrap();
    assert_eq!(result.run.status.as_str(), "completed");
    let groupflow::api::TaskRunOutput::Json { content, basis, .. } = &result.output else {
        panic!("json output")
    };
    assert!(content["founded_year"].is_i64() && content["tags"].is_array());
    assert_eq!(basis.len(), 3);

    let (_, again) = api.post("/v1/tasks/runs", body).await;
    let (_, again) = api
        .get(&format!(
            "/v1/tasks/runs/{}/result",
            again["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        serde_json::to_value(&result.output).unwrap(),
        again["output"],
        "same input, same output"
    );

    let (s, r) = api.get(&format!("/v1/tasks/runs/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    let r: TaskRun = serde_json::from_value(r).unwrap();
    assert_eq!(r.metadata.unwrap()["k"], "v");

    let (_, input) = api.get(&format!("/v1/tasks/runs/{id}/input")).await;
    assert_eq!(input["input"], json!({"company": "Acme"}));
    assert_eq!(input["processor"], "ultra8x-fast");
    assert!(input["task_spec"]["output_schema"]["json_schema"].is_object());

    for prefix in ["/v1", "/v1beta"] {
        let events = api.sse(&format!("{prefix}/tasks/runs/{id}/events")).await;
        let (_, last) = events.events.last().unwrap();
        assert_eq!(last["type"], "task_run.state");
        assert_eq!(last["event_id"], Value::Null);
        assert_eq!(last["run"]["status"], "completed");
        assert!(last["output"]["content"].is_object());
    }
    h.shutdown().await;

    // A slow run: `/result` answers 408 while it is active; its events follow it to the end.
    let mut config = ServerConfig::for_tests();
    config.sim.latency = Duration::from_millis(800)..=Duration::from_millis(800);
    let (h, api) = start(config).await;
    let (_, run) = api
        .post(
            "/v1/tasks/runs",
            json!({"input": "slow", "processor": "lite"}),
        )
        .await;
    let id = run["run_id"].as_str().unwrap();
    let (s, err) = api
        .get(&format!("/v1/tasks/runs/{id}/result?timeout=0"))
        .await;
    assert_eq!(s, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(keys(&err), set(&["type", "error"]));
    let events = api.sse(&format!("/v1/tasks/runs/{id}/events")).await;
    let statuses: Vec<&str> = events
        .events
        .iter()
        .map(|(_, v)| v["run"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"completed"));
    assert!(statuses.len() >= 2, "{statuses:?}");
    h.shutdown().await;

    // A failed run: `/result` answers 404 with the run's error.
    let mut config = ServerConfig::for_tests();
    config.sim.failure_rate = 1.0;
    let (h, api) = start(config).await;
    let (_, run) = api
        .post(
            "/v1/tasks/runs",
            json!({"input": "doomed", "processor": "pro"}),
        )
        .await;
    let id = run["run_id"].as_str().unwrap();
    let (s, err) = api
        .get(&format!("/v1/tasks/runs/{id}/result?timeout=30"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Run failed")
    );
    let (_, run) = api.get(&format!("/v1/tasks/runs/{id}")).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(keys(&run["error"]), set(&["ref_id", "message", "detail"]));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_422_naming_the_field() {
    let (h, api) = start(ServerConfig::for_tests()).await;
    let g = api.create_group().await;
    let path = format!("/v1/tasks/groups/{g}/runs");
    let issue = |v: &Value| -> (Value, String) {
        let d = &v["detail"][0];
        assert_eq!(keys(d), set(&["loc", "msg", "type"]));
        (d["loc"].clone(), d["msg"].as_str().unwrap().to_string())
    };

    let (s, v) = api.post(&path, json!({"inputs": companies(1001)})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (loc, msg) = issue(&v);
    assert_eq!(loc, json!(["body", "inputs"]));
    assert!(msg.contains("at most 1000"), "{msg}");

    let spec = |schema: Value| json!({"output_schema": {"type": "json", "json_schema": schema}});
    let deep = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "object", "properties": {"d": {"type": "string"}}}}}}}}});
    let wide: serde_json::Map<String, Value> = (0..101)
        .map(|i| (format!("f{i}"), json!({"type": "string"})))
        .collect();
    for (schema, needle) in [
        (json!({"type": "string"}), "type \"object\""),
        (deep, "4 levels"),
        (
            json!({"type": "object", "properties": wide}),
            "101 properties",
        ),
    ] {
        let (s, v) = api
            .post(
                &path,
                json!({"default_task_spec": spec(schema), "inputs": companies(1)}),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        let (loc, msg) = issue(&v);
        assert_eq!(
            loc,
            json!(["body", "default_task_spec", "output_schema", "json_schema"])
        );
        assert!(msg.contains(needle), "{msg}");
    }

    let (s, v) = api
        .post(
            &path,
            json!({"default_task_spec": company_spec(), "inputs": [
                {"input": {"company": "ok"}, "processor": "core"},
                {"input": {"name": "no company"}, "processor": "core"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        issue(&v).0,
        json!(["body", "inputs", 1, "input", "company"])
    );

    let (s, v) = api
        .post(
            &path,
            json!({"inputs": [{"input": "x", "processor": "core",
                "metadata": {"a_very_long_key_name": 1, "v": "x".repeat(513), "o": [1]}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let locs: Vec<&Value> = v["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["loc"])
        .collect();
    assert_eq!(locs.len(), 3, "{v}");
    assert!(locs.contains(&&json!([
        "body",
        "inputs",
        0,
        "metadata",
        "a_very_long_key_name"
    ])));

    let (s, v) = api
        .post(
            &path,
            json!({"inputs": [{"input": "x", "processor": "gpt-9"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(issue(&v).0, json!(["body", "inputs", 0, "processor"]));

    let (s, v) = api.post(&path, json!({"inputs": "nope"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(issue(&v).0, json!(["body", "inputs"]));

    let (s, v) = api
        .post(
            "/v1/tasks/groups",
            json!({"metadata": {"k": {"nested": 1}}}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(issue(&v).0, json!(["body", "metadata", "k"]));

    // Nothing was stored by the rejected requests.
    let (_, group) = api.get(&format!("/v1/tasks/groups/{g}")).await;
    assert_eq!(group["status"]["num_task_runs"], 0);

    // Single runs answer with the error body; an unknown processor is 403.
    let (s, v) = api
        .post(
            "/v1/tasks/runs",
            json!({"input": "x", "processor": "gpt-9"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid processor")
    );
    let (s, v) = api
        .post("/v1/tasks/runs", json!({"input": 7, "processor": "core"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(keys(&v), set(&["type", "error"]));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("body.input")
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_groups_and_runs_are_404_with_the_error_body() {
    let (h, api) = start(ServerConfig::for_tests()).await;
    let g = api.create_group().await;
    let other = api.create_group().await;
    let added = api
        .add_runs(
            &other,
            json!({"inputs": [{"input": "x", "processor": "core"}]}),
        )
        .await;
    let run = &added.run_ids[0];
    let missing_group = "tgrp_0123456789abcdef0000000000000999";
    let missing_run = "trun_0123456789abcdef0000000000000999";
    for path in [
        format!("/v1/tasks/groups/{missing_group}"),
        "/v1beta/tasks/groups/not-an-id".to_string(),
        format!("/v1/tasks/groups/{missing_group}/runs"),
        format!("/v1/tasks/groups/{missing_group}/events"),
        format!("/v1/tasks/groups/{g}/runs/{missing_run}"),
        format!("/v1/tasks/groups/{g}/runs/{run}"),
        format!("/v1/tasks/runs/{missing_run}"),
        format!("/v1/tasks/runs/{missing_run}/input"),
        format!("/v1/tasks/runs/{missing_run}/result"),
        format!("/v1/tasks/runs/{missing_run}/events"),
        "/v2/elsewhere".to_string(),
    ] {
        let (s, v) = api.get(&path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(v["type"], "error", "{path}");
        assert_eq!(keys(&v["error"]), set(&["ref_id", "message", "detail"]));
    }
    let (s, _) = api
        .post(
            &format!("/v1/tasks/groups/{missing_group}/runs"),
            json!({"inputs": []}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .get(&format!("/v1/tasks/groups/{other}/runs/{run}"))
        .await;
    assert_eq!(s, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_body_limit() {
    let mut config = ServerConfig::for_tests();
    config.api_key = Some("s3cret".into());
    config.max_body_bytes = 2_000;
    assert!(
        !format!("{config:?}").contains("s3cret"),
        "the key is redacted"
    );
    let (h, mut api) = start(config).await;
    for key in [None, Some("wrong")] {
        api.key = key.map(str::to_string);
        let (s, v) = api.post("/v1/tasks/groups", json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(v["type"], "error");
        assert!(!v.to_string().contains("s3cret"));
    }
    api.key = Some("s3cret".into());
    let g = api.create_group().await;
    let big = json!({"inputs": [{"input": "x".repeat(3_000), "processor": "core"}]});
    let (s, v) = api
        .post(&format!("/v1/tasks/groups/{g}/runs"), big.clone())
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["type"], "error");
    // Without Content-Length (chunked), the limit holds while reading.
    let chunks = futures::stream::iter(
        big.to_string()
            .into_bytes()
            .chunks(500)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    // The server answers before the body ends and then closes the connection: it must not
    // go back to the pool, or the next request may be sent on it as it closes.
    let r = api
        .req(reqwest::Method::POST, &format!("/v1/tasks/groups/{g}/runs"))
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (_, group) = api.get(&format!("/v1/tasks/groups/{g}")).await;
    assert_eq!(group["status"]["num_task_runs"], 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_injected_at_the_configured_rates() {
    let faulty = |faults: FaultConfig| {
        let mut c = ServerConfig::for_tests();
        c.faults = faults;
        c
    };
    let (h, api) = start(faulty(FaultConfig {
        rate_429: 1.0,
        retry_after_secs: 7,
        ..FaultConfig::default()
    }))
    .await;
    for _ in 0..20 {
        let r = api
            .http
            .post(format!("{}/v1/tasks/groups", api.base))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "7");
    }
    h.shutdown().await;

    let (h, api) = start(faulty(FaultConfig {
        rate_500: 1.0,
        ..FaultConfig::default()
    }))
    .await;
    let (s, v) = api.get("/v1/tasks/groups/tgrp_x").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(v["type"], "error");
    h.shutdown().await;

    let (h, api) = start(faulty(FaultConfig {
        rate_429: 0.5,
        ..FaultConfig::default()
    }))
    .await;
    let mut limited = 0;
    for _ in 0..200 {
        let r = api
            .http
            .get(format!("{}/v1/tasks/groups/tgrp_x", api.base))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!((40..160).contains(&limited), "{limited} of 200 at rate 0.5");
    h.shutdown().await;

    // Dropped add-runs: no response at all, yet the runs were stored.
    let (h, api) = start(faulty(FaultConfig {
        drop_add_runs: 1.0,
        ..FaultConfig::default()
    }))
    .await;
    let g = api.create_group().await;
    let sent = api
        .http
        .post(format!("{}/v1/tasks/groups/{g}/runs", api.base))
        .json(&json!({"inputs": companies(5)}))
        .send()
        .await;
    let outcome = match sent {
        Err(e) => Err(e),
        Ok(r) => r.bytes().await.map(|_| ()),
    };
    assert!(outcome.is_err(), "the connection was dropped");
    let g = api.wait_inactive(&g).await;
    assert_eq!(g.status.num_task_runs, 5);
    h.shutdown().await;

    // Cut streams: some events arrive, then the connection breaks before the end.
    let (h, api) = start(faulty(FaultConfig {
        cut_streams: 1.0,
        ..FaultConfig::default()
    }))
    .await;
    let g = api.create_group().await;
    api.add_runs(&g, json!({"inputs": companies(60)})).await;
    api.wait_inactive(&g).await;
    for path in [
        format!("/v1/tasks/groups/{g}/runs"),
        format!("/v1/tasks/groups/{g}/events"),
    ] {
        let r = api
            .http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        let mut body = r.bytes_stream();
        let mut text = Vec::new();
        let mut broke = false;
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            match chunk {
                Ok(c) => text.extend_from_slice(&c),
                Err(_) => {
                    broke = true;
                    break;
                }
            }
        }
        assert!(broke, "{path}: the stream was cut");
        let text = String::from_utf8(text).unwrap();
        let n = Sse::parse(&text).events.len();
        assert!(
            (1..=20).contains(&n),
            "{path}: {n} whole events before the cut"
        );
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_keeps_concurrency_and_add_order() {
    let mut config = ServerConfig::for_tests();
    config.concurrency = 3;
    config.sim.latency = Duration::from_millis(5)..=Duration::from_millis(40);
    let (h, api) = start(config).await;
    let g = api.create_group().await;
    let added = api.add_runs(&g, json!({"inputs": companies(30)})).await;
    api.wait_inactive(&g).await;
    let events = api.sse(&format!("/v1/tasks/groups/{g}/events")).await;
    let mut running = BTreeSet::new();
    let mut started = Vec::new();
    let mut most = 0;
    for e in events.typed() {
        if let StreamEvent::RunState(e) = e {
            match e.run.status.as_str() {
                "running" => {
                    started.push(e.run.run_id.clone());
                    running.insert(e.run.run_id);
                }
                _ => {
                    assert!(running.remove(&e.run.run_id), "finished after it started");
                }
            }
            most = most.max(running.len());
        }
    }
    assert!(most <= 3, "at most 3 running at once, saw {most}");
    assert_eq!(started, added.run_ids, "runs start in the order added");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_left_running_finish_after_a_restart_with_lower_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    // Eight runs start and cannot finish before the server stops.
    let mut config = ServerConfig::for_tests();
    config.db = Some(db.clone());
    config.concurrency = 8;
    config.sim.latency = Duration::from_secs(600)..=Duration::from_secs(600);
    let (h, api) = start(config).await;
    let g = api.create_group().await;
    api.add_runs(&g, json!({"inputs": companies(20)})).await;
    tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, v) = api.get(&format!("/v1/tasks/groups/{g}")).await;
            if v["status"]["task_run_status_counts"]["running"].as_u64() == Some(8) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("eight runs started");
    h.shutdown().await;
    // Restarted with room for two: the eight it finds running are run again first, and
    // the rest wait for free room (more running than the limit must not stop the server).
    let mut config = ServerConfig::for_tests();
    config.db = Some(db);
    config.concurrency = 2;
    config.sim.latency = Duration::from_millis(5)..=Duration::from_millis(20);
    // The database's lock can outlive the shutdown by a moment (once in CI, cause not
    // found; a child process another test forks at that instant holds a copy of it until
    // it execs), so a refusal for that reason is tried again.
    let started = std::time::Instant::now();
    let h = loop {
        match server::start(config.clone()).await {
            Err(e) if e.is_in_use() && started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other.unwrap(),
        }
    };
    let api = Api::new(h.base_url());
    let group = api.wait_inactive(&g).await;
    assert_eq!(
        group.status.task_run_status_counts.get("completed"),
        Some(&20)
    );
    h.shutdown().await;
}

/// The real binary, serving a database file.
struct Served {
    child: Child,
    api: Api,
}

impl Served {
    fn start(db: &std::path::Path, port: u16) -> Served {
        let child = Command::new(env!("CARGO_BIN_EXE_groupflow"))
            .args([
                "serve",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--db",
                db.to_str().unwrap(),
                "--concurrency",
                "4",
                "--sim-latency-ms",
                "20..80",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start groupflow serve");
        common::wait_for_port(port, PATIENCE);
        Served {
            child,
            api: Api::new(format!("http://127.0.0.1:{port}")),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_group_loses_nothing_and_cursors_still_resume() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    let port = common::free_port();
    let mut served = Served::start(&db, port);
    let g = served.api.create_group().await;
    let mut run_ids = Vec::new();
    for _ in 0..3 {
        let added = served
            .api
            .add_runs(
                &g,
                json!({"default_task_spec": company_spec(), "inputs": companies(100)}),
            )
            .await;
        run_ids.extend(added.run_ids);
    }
    // Let some runs finish, then kill the server without warning.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, v) = served.api.get(&format!("/v1/tasks/groups/{g}")).await;
            if v["status"]["task_run_status_counts"]["completed"]
                .as_u64()
                .unwrap_or(0)
                >= 20
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("runs progressed");
    let before = served
        .api
        .sse(&format!("/v1/tasks/groups/{g}/events?timeout=0"))
        .await;
    let runs_before = served.api.sse(&format!("/v1/tasks/groups/{g}/runs")).await;
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    let served = Served::start(&db, port);
    let done = served.api.wait_inactive(&g).await;
    assert_eq!(done.status.num_task_runs, 300);
    assert_eq!(
        done.status.count(&groupflow::api::RunStatus::Completed),
        300
    );

    let runs = served.api.sse(&format!("/v1/tasks/groups/{g}/runs")).await;
    let ids: Vec<&str> = runs
        .events
        .iter()
        .map(|(_, v)| v["run"]["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        run_ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "none lost"
    );
    assert!(
        runs.events
            .iter()
            .all(|(_, v)| v["run"]["status"] == "completed")
    );
    let old_cursor = runs_before.events[99].1["event_id"].as_str().unwrap();
    let resumed = served
        .api
        .sse(&format!(
            "/v1/tasks/groups/{g}/runs?last_event_id={old_cursor}"
        ))
        .await;
    assert_eq!(resumed.events.len(), 200, "an old runs cursor resumes");

    let after = served
        .api
        .sse(&format!(
            "/v1/tasks/groups/{g}/events?last_event_id={}",
            before.last_id()
        ))
        .await;
    let mut finished: HashMap<String, usize> = HashMap::new();
    for e in before.typed().into_iter().chain(after.typed()) {
        if let StreamEvent::RunState(e) = e
            && e.run.status.is_terminal()
        {
            *finished.entry(e.run.run_id).or_default() += 1;
        }
    }
    assert_eq!(finished.len(), 300, "every run finished");
    assert!(finished.values().all(|n| *n == 1), "no run finished twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_stored_in_the_database_by_older_versions_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    let port = common::free_port();
    let mut served = Served::start(&db, port);
    let g = served.api.create_group().await;
    let added = served
        .api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(20)}),
        )
        .await;
    served.api.wait_inactive(&g).await;
    let runs_path = format!("/v1/tasks/groups/{g}/runs?include_output=true");
    let result_paths: Vec<String> = [2, 3]
        .iter()
        .map(|i| format!("/v1/tasks/runs/{}/result", added.run_ids[*i]))
        .collect();
    let runs = served.api.sse(&runs_path).await;
    let mut results = Vec::new();
    for path in &result_paths {
        results.push(served.api.get(path).await.1);
    }
    assert_eq!(runs.events.len(), 20);
    assert!(
        runs.events
            .iter()
            .all(|(_, v)| v["output"]["content"].is_object())
    );
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    // Outputs go to the outputs file; move them back where older versions kept them: the
    // even runs' into the `run_outputs` table, the odd ones' into the runs table itself.
    let outputs = std::fs::read(dir.path().join("state.sqlite-outputs")).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let stored: Vec<(i64, i64, i64)> = conn
        .prepare("SELECT seq, out_at, out_len FROM runs ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored.len(), 20);
    let in_db: i64 = conn
        .query_row(
            "SELECT (SELECT count(output) FROM runs) + (SELECT count(*) FROM run_outputs)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_db, 0, "new outputs are not written into the database");
    for (seq, at, len) in stored {
        let (at, len) = (at as usize, len as usize);
        let text = std::str::from_utf8(&outputs[at + 4..at + 4 + len]).unwrap();
        let sql = if seq % 2 == 0 {
            "INSERT INTO run_outputs (seq, output) VALUES (?1, ?2)"
        } else {
            "UPDATE runs SET output = ?2 WHERE seq = ?1"
        };
        conn.execute(sql, rusqlite::params![seq, text]).unwrap();
    }
    conn.execute_batch(
        "ALTER TABLE runs DROP COLUMN out_at; ALTER TABLE runs DROP COLUMN out_len;
         DROP TABLE outputs_file;",
    )
    .unwrap();
    drop(conn);
    std::fs::remove_file(dir.path().join("state.sqlite-outputs")).unwrap();

    let served = Served::start(&db, port);
    let again = served.api.sse(&runs_path).await;
    assert_eq!(
        again.events.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        runs.events.iter().map(|(_, v)| v).collect::<Vec<_>>()
    );
    for (path, result) in result_paths.iter().zip(&results) {
        assert_eq!(&served.api.get(path).await.1, result);
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_whose_outputs_never_reached_the_disk_run_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    let outputs = dir.path().join("state.sqlite-outputs");
    let port = common::free_port();
    let mut served = Served::start(&db, port);
    let g = served.api.create_group().await;
    served
        .api
        .add_runs(
            &g,
            json!({"default_task_spec": company_spec(), "inputs": companies(60)}),
        )
        .await;
    served.api.wait_inactive(&g).await;
    let runs_path = format!("/v1/tasks/groups/{g}/runs?include_output=true");
    let outputs_of = |sse: &Sse| -> Vec<(String, Value)> {
        sse.events
            .iter()
            .map(|(_, v)| (v["run"]["run_id"].to_string(), v["output"].clone()))
            .collect()
    };
    let before = outputs_of(&served.api.sse(&runs_path).await);
    served.child.kill().unwrap();
    served.child.wait().unwrap();

    // As after a power loss that kept the commits but not the file's last 40 KB (about 15
    // outputs), and damaged one byte of an output before those.
    let len = std::fs::metadata(&outputs).unwrap().len();
    assert!(len / 3 < len - 40_000, "outputs of {len} bytes in all");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&outputs)
        .unwrap();
    file.set_len(len - 40_000).unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, len / 3).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[!byte[0]], len / 3).unwrap();
    drop(file);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let cut: i64 = conn
        .query_row(
            "SELECT count(*) FROM runs WHERE out_at + 4 + out_len > ?1 OR ?2 BETWEEN out_at AND out_at + 3 + out_len",
            [len as i64 - 40_000, len as i64 / 3],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert!(cut > 10, "{cut} outputs cut off or damaged");

    let served = Served::start(&db, port);
    let done = served.api.wait_inactive(&g).await;
    assert_eq!(done.status.count(&groupflow::api::RunStatus::Completed), 60);
    let after = outputs_of(&served.api.sse(&runs_path).await);
    assert_eq!(
        after, before,
        "the runs ran again and gave the same outputs"
    );
    let events = served
        .api
        .sse(&format!("/v1/tasks/groups/{g}/events?timeout=0"))
        .await;
    let completed = events
        .events
        .iter()
        .filter(|(_, v)| v["type"] == "task_run.state" && v["run"]["status"] == "completed")
        .count();
    assert_eq!(completed as i64, 60 + cut, "the lost ones completed twice");

    // With the file gone altogether, every run is queued again, and the restarted server
    // still runs at most its 4 at a time.
    let mut served = served;
    served.child.kill().unwrap();
    served.child.wait().unwrap();
    std::fs::remove_file(&outputs).unwrap();
    let served = Served::start(&db, port);
    let (_, group) = served.api.get(&format!("/v1/tasks/groups/{g}")).await;
    let counts = &group["status"]["task_run_status_counts"];
    assert!(counts["running"].as_u64().unwrap_or(0) <= 4, "{counts}");
    served.api.wait_inactive(&g).await;
    let again = outputs_of(&served.api.sse(&runs_path).await);
    assert_eq!(again, before);
}

/// With no latency the sim's outputs are ready at once, so runs are stored ended by the
/// add-runs transaction itself. They must end exactly as the scheduler would end them:
/// the same outputs byte for byte, the same runs failing, one event each, and the counts
/// of the add-runs answer already final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_an_instant_processor_ends_on_arrival_end_as_the_scheduler_ends_them() {
    let mut own = companies(4);
    for run in &mut own {
        let mut spec = company_spec();
        spec["output_schema"]["json_schema"]["properties"]["ceo"] = json!({"type": "string"});
        run["task_spec"] = spec;
    }
    let mut inputs = companies(40);
    inputs.extend(own);
    let body = json!({"default_task_spec": company_spec(), "inputs": inputs});
    // What each run ended with (status, output, error message), in the order added.
    let mut ended = Vec::new();
    for latency in [Duration::ZERO, Duration::from_millis(1)] {
        let mut config = ServerConfig::for_tests();
        config.sim.failure_rate = 0.3;
        config.sim.latency = latency..=latency;
        let (h, api) = start(config).await;
        let g = api.create_group().await;
        let added = api.add_runs(&g, body.clone()).await;
        let counts = &added.status.task_run_status_counts;
        if latency.is_zero() {
            assert!(!added.status.is_active, "nothing left to run");
            assert_eq!(counts.get("queued").copied().unwrap_or(0), 0);
            assert_eq!(counts["completed"] + counts["failed"], 44);
        }
        api.wait_inactive(&g).await;
        let runs = api
            .sse(&format!(
                "/v1beta/tasks/groups/{g}/runs?include_output=true"
            ))
            .await;
        let mut these = Vec::new();
        for (_, v) in &runs.events {
            let output = v["output"].to_string();
            let error = v["run"]["error"]["message"].to_string();
            these.push((v["run"]["status"].to_string(), output, error));
        }
        assert_eq!(these.len(), 44);
        ended.push(these);
        let events = api.sse(&format!("/v1/tasks/groups/{g}/events")).await;
        let run_events: Vec<(String, String)> = events
            .typed()
            .into_iter()
            .filter_map(|e| match e {
                StreamEvent::RunState(e) => Some((e.run.run_id, e.run.status.as_str().to_string())),
                _ => None,
            })
            .collect();
        if latency.is_zero() {
            let ids: Vec<&String> = run_events.iter().map(|(id, _)| id).collect();
            assert_eq!(
                ids,
                added.run_ids.iter().collect::<Vec<_>>(),
                "one event per run"
            );
            assert!(
                run_events
                    .iter()
                    .all(|(_, s)| s == "completed" || s == "failed")
            );
        } else {
            assert_eq!(run_events.len(), 88, "running, then ended");
        }
        h.shutdown().await;
    }
    let failed = ended[0].iter().filter(|e| e.0 == "\"failed\"").count();
    assert!((4..=24).contains(&failed), "about 30% fail: {failed}");
    assert_eq!(ended[0], ended[1]);
}
