//! Group endpoints: create, retrieve, add runs, retrieve one run of a group.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::sync::Arc;

use serde_json::Value;

use super::{ApiError, AppState, Params, parse_json, read_body};
use crate::api::{MAX_RUNS_PER_REQUEST, Metadata, TaskRunInput, TaskSpec, json_kind};
use crate::server::processor::{self, Job, Processor};
use crate::server::scheduler::outcome_of;
use crate::server::store::{GroupRow, NewRun, SpecChoice};
use crate::server::validate::{self, Issues, Loc};
use crate::server::wire;

/// A JSON answer from ready text.
pub fn json_response(status: StatusCode, text: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// Splits a group id, or answers 404.
pub fn parse_group(id: &str) -> Result<(i64, String), ApiError> {
    wire::parse_id(id, "tgrp_")
        .map(|(s, t)| (s, t.to_string()))
        .ok_or(ApiError::NotFound("TaskGroup not found"))
}

/// Splits a run id, or answers 404.
pub fn parse_run(id: &str) -> Result<(i64, String), ApiError> {
    wire::parse_id(id, "trun_")
        .map(|(s, t)| (s, t.to_string()))
        .ok_or(ApiError::NotFound("Run id not found"))
}

/// Loads a group, or answers 404.
pub async fn load_group(state: &AppState, id: &str) -> Result<GroupRow, ApiError> {
    let (gseq, tag) = parse_group(id)?;
    state
        .blocking(move |s| Ok(s.group(gseq, &tag)?))
        .await?
        .ok_or(ApiError::NotFound("TaskGroup not found"))
}

fn group_json(g: &GroupRow) -> String {
    let mut out = String::with_capacity(300);
    out.push_str("{\"taskgroup_id\":\"");
    out.push_str(&g.id());
    out.push_str("\",\"status\":");
    g.counts.write_json(&mut out);
    out.push_str(",\"created_at\":\"");
    out.push_str(&g.created_at);
    out.push_str("\",\"metadata\":");
    out.push_str(g.metadata.as_deref().unwrap_or("null"));
    out.push('}');
    out
}

/// `POST {p}/tasks/groups`
pub async fn create(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let mut issues = Issues::default();
    let Some(v) = parse_json(&bytes, &mut issues) else {
        return Err(ApiError::Invalid(issues));
    };
    let metadata = match &v {
        Value::Object(m) => m.get("metadata").cloned().unwrap_or(Value::Null),
        other => {
            issues.push(
                vec![Loc::from("body")],
                format!(
                    "Input should be a valid dictionary, got {}",
                    json_kind(other)
                ),
                "dict_type",
            );
            Value::Null
        }
    };
    validate::metadata(
        &metadata,
        &[Loc::from("body"), Loc::from("metadata")],
        &mut issues,
    );
    if !issues.is_empty() {
        return Err(ApiError::Invalid(issues));
    }
    let metadata = (!metadata.is_null()).then(|| metadata.to_string());
    let group = state
        .blocking(move |s| Ok(s.create_group(metadata)?))
        .await?;
    Ok(json_response(StatusCode::OK, group_json(&group)))
}

/// `GET {p}/tasks/groups/{id}`
pub async fn retrieve(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
) -> Result<Response, ApiError> {
    let group = load_group(&state, &group_id).await?;
    Ok(json_response(StatusCode::OK, group_json(&group)))
}

/// `GET {p}/tasks/groups/{id}/runs/{run_id}`
pub async fn retrieve_run(
    State(state): State<AppState>,
    Path((group_id, run_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (gseq, gtag) = parse_group(&group_id)?;
    let (seq, tag) = parse_run(&run_id)?;
    let run = state
        .blocking(move |s| Ok(s.run(seq, &tag)?))
        .await?
        .filter(|r| r.group_id.as_deref() == Some(wire::group_id(&gtag, gseq).as_str()))
        .ok_or(ApiError::NotFound("Run id not found"))?;
    Ok(json_response(StatusCode::OK, run.run_json()))
}

/// Validated add-runs request: the default spec as stored text, and the runs.
struct Batch {
    default_spec: Option<String>,
    runs: Vec<NewRun>,
}

/// Checks a parsed add-runs body, taking it apart: each run's strings move into its
/// [`NewRun`]. With an `instant` processor each run is executed here, on the input just
/// parsed, and is stored as ended.
fn check_batch(v: Value, instant: Option<&dyn Processor>, issues: &mut Issues) -> Option<Batch> {
    let body = [Loc::from("body")];
    let mut obj = match v {
        Value::Object(obj) => obj,
        other => {
            issues.push(
                body.to_vec(),
                format!(
                    "Input should be a valid dictionary, got {}",
                    json_kind(&other)
                ),
                "dict_type",
            );
            return None;
        }
    };
    if let Some(r) = obj.get("refresh_status")
        && !(r.is_boolean() || r.is_null())
    {
        issues.push(
            vec![Loc::from("body"), Loc::from("refresh_status")],
            format!("Input should be a valid boolean, got {}", json_kind(r)),
            "bool_type",
        );
    }
    let default_spec = match obj.get("default_task_spec") {
        None | Some(Value::Null) => None,
        Some(s) => validate::task_spec(
            s,
            &[Loc::from("body"), Loc::from("default_task_spec")],
            issues,
        ),
    };
    let inputs_loc = vec![Loc::from("body"), Loc::from("inputs")];
    let inputs = match obj.remove("inputs") {
        None => {
            issues.push(inputs_loc, "Field required", "missing");
            return None;
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            issues.push(
                inputs_loc,
                format!("Input should be a valid list, got {}", json_kind(&other)),
                "list_type",
            );
            return None;
        }
    };
    if inputs.len() > MAX_RUNS_PER_REQUEST {
        issues.push(
            inputs_loc,
            format!(
                "List should have at most {MAX_RUNS_PER_REQUEST} items after validation, not {}",
                inputs.len()
            ),
            "too_long",
        );
        return None;
    }
    let mut runs = Vec::with_capacity(inputs.len());
    // The runs that execute the default spec share one, as a claimed batch does.
    let shared_spec = instant.and(default_spec.clone()).map(Arc::new);
    for (i, item) in inputs.into_iter().enumerate() {
        let at = [Loc::from("body"), Loc::from("inputs"), Loc::Index(i)];
        let Some(checked) = validate::run_input(item, &at, default_spec.as_ref(), issues) else {
            continue;
        };
        if !issues.is_empty() {
            // The batch is refused: the rest is only checked.
            continue;
        }
        let spec = match checked.own_spec {
            Some(text) => SpecChoice::Own(text),
            None if default_spec.is_some() => SpecChoice::Default,
            None => SpecChoice::None,
        };
        runs.push(new_run(
            checked.input,
            checked.text,
            spec,
            &shared_spec,
            instant,
        ));
    }
    batch(default_spec, runs, issues)
}

/// The batch of checked `runs` under `default_spec`, unless `issues` holds a problem.
fn batch(default_spec: Option<TaskSpec>, runs: Vec<NewRun>, issues: &Issues) -> Option<Batch> {
    if !issues.is_empty() {
        return None;
    }
    let default_spec = match default_spec {
        Some(s) => Some(serde_json::to_string(&s).ok()?),
        None => None,
    };
    Some(Batch { default_spec, runs })
}

/// A checked run as stored: its input (`text`, the input as stored), and with an `instant`
/// processor its outcome, executed here.
fn new_run(
    input: TaskRunInput,
    text: String,
    spec: SpecChoice,
    shared_spec: &Option<Arc<TaskSpec>>,
    instant: Option<&dyn Processor>,
) -> NewRun {
    let (processor, outcome) = match instant {
        Some(p) => {
            let job = Job {
                spec: match &spec {
                    SpecChoice::Own(_) => input.task_spec.map(Arc::new),
                    SpecChoice::Default => shared_spec.clone(),
                    SpecChoice::None => None,
                },
                processor: input.processor,
                input: input.input,
            };
            let outcome = p.process_now(&job).map(outcome_of);
            (job.processor, outcome)
        }
        None => (input.processor, None),
    };
    NewRun {
        processor,
        // `to_string` (Display) would write the same text through the formatter.
        metadata: input.metadata.and_then(|m| serde_json::to_string(&m).ok()),
        input: text,
        spec,
        outcome,
    }
}

/// An add-runs body of the usual shape, parsed straight into what is checked: each run has
/// only `input`, `processor` and `metadata`. Any other body (another field in a run, a
/// duplicate key, a wrong type) fails to parse as this and goes through [`check_batch`],
/// which names every problem.
#[derive(serde::Deserialize)]
struct PlainBody {
    inputs: Vec<PlainRun>,
    #[serde(default)]
    default_task_spec: Option<Value>,
    /// Only its type matters (checked by parsing).
    #[serde(default, rename = "refresh_status")]
    _refresh_status: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainRun {
    input: Value,
    processor: String,
    #[serde(default)]
    metadata: Option<Metadata>,
}

/// The batch of an add-runs body of the usual shape ([`PlainBody`]) when it passes every
/// check, with what [`check_batch`] would make of it; `None` for any other body, which
/// [`check_batch`] then takes apart and reports on. Parsing into the runs' own fields skips
/// the JSON tree of the whole body and its conversion: a third of the checking's time.
fn plain_batch(bytes: &[u8], instant: Option<&dyn Processor>) -> Option<Batch> {
    let body: PlainBody = serde_json::from_slice(bytes).ok()?;
    if body.inputs.len() > MAX_RUNS_PER_REQUEST {
        return None;
    }
    // Any problem at all: the full check tells it.
    let mut issues = Issues::default();
    let default_spec = match &body.default_task_spec {
        None => None,
        Some(s) => Some(validate::task_spec(s, &[], &mut issues)?),
    };
    let shared_spec = instant.and(default_spec.clone()).map(Arc::new);
    let mut runs = Vec::with_capacity(body.inputs.len());
    for run in body.inputs {
        if !(run.input.is_string() || run.input.is_object())
            || !processor::is_documented(&run.processor)
        {
            return None;
        }
        if let Some(m) = &run.metadata {
            validate::metadata_entries(m, &[], &mut issues);
        }
        if let Some(spec) = &default_spec {
            validate::input_matches(&run.input, spec, &[], &mut issues);
        }
        if !issues.is_empty() {
            return None;
        }
        let mut input = TaskRunInput::new(run.input, run.processor);
        input.metadata = run.metadata;
        let text = serde_json::to_string(&input).ok()?;
        let spec = match default_spec {
            Some(_) => SpecChoice::Default,
            None => SpecChoice::None,
        };
        runs.push(new_run(input, text, spec, &shared_spec, instant));
    }
    batch(default_spec, runs, &issues)
}

/// `POST {p}/tasks/groups/{id}/runs`
pub async fn add_runs(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let (gseq, gtag) = parse_group(&group_id)?;
    let mut issues = Issues::default();
    // The status is read in the same transaction as the insert, so it is always fresh.
    Params::parse(query.as_deref()).bool("refresh_status", true, &mut issues);
    if !issues.is_empty() {
        return Err(ApiError::Invalid(issues));
    }
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let processor = state.processor.clone();
    let added = state
        .blocking(move |s| {
            let mut issues = Issues::default();
            let instant = processor.instant().then_some(&*processor);
            let batch = plain_batch(&bytes, instant).or_else(|| {
                parse_json(&bytes, &mut issues).and_then(|v| check_batch(v, instant, &mut issues))
            });
            let Some(batch) = batch else {
                return Err(ApiError::Invalid(issues));
            };
            s.add_runs(gseq, &gtag, batch.default_spec.as_deref(), batch.runs)?
                .ok_or(ApiError::NotFound("TaskGroup not found"))
        })
        .await?;
    // Runs that ended as they were added leave the scheduler nothing to claim.
    if added.counts.queued > 0 {
        state.wake.notify_one();
    }
    state.changed();
    if state.roll(state.config.faults.drop_add_runs) {
        return Ok(dropped_connection());
    }
    let mut out = String::with_capacity(200 + added.run_ids.len() * 40);
    out.push_str("{\"status\":");
    added.counts.write_json(&mut out);
    out.push_str(",\"run_ids\":[");
    for (i, id) in added.run_ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(id);
        out.push('"');
    }
    out.push_str("],\"run_cursor\":");
    push_opt_str(&mut out, added.run_cursor.as_deref());
    out.push_str(",\"event_cursor\":");
    push_opt_str(&mut out, added.event_cursor.as_deref());
    out.push('}');
    Ok(json_response(StatusCode::OK, out))
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => wire::push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// A response whose body fails before its first byte: hyper closes the connection, so the
/// client sees a dropped connection and cannot know whether its runs were stored.
fn dropped_connection() -> Response {
    let body = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("injected fault: response dropped"))
    });
    Response::new(Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::processor::Sim;
    use serde_json::json;

    /// The full check of `body`: its batch, or the problems it names.
    fn checked(body: &[u8], instant: Option<&dyn Processor>) -> Result<String, String> {
        let mut issues = Issues::default();
        match parse_json(body, &mut issues).and_then(|v| check_batch(v, instant, &mut issues)) {
            Some(b) => Ok(format!("{:?} {:?}", b.default_spec, b.runs)),
            None => Err(issues.summary()),
        }
    }

    fn plain(body: &[u8], instant: Option<&dyn Processor>) -> Option<String> {
        plain_batch(body, instant).map(|b| format!("{:?} {:?}", b.default_spec, b.runs))
    }

    #[test]
    fn a_plain_body_makes_the_batch_the_full_check_makes() {
        let spec = json!({
            "input_schema": {"type": "json", "json_schema": {"type": "object",
                "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["name"]}},
            "output_schema": {"type": "json", "json_schema": {"type": "object",
                "properties": {"ceo": {"type": "string", "description": "The CEO"}}}}
        });
        let runs = json!([
            {"processor": "core", "input": {"name": "Acme", "n": 3, "zeta": [1, {"b": 2, "a": 1}]},
             "metadata": {"gf_row": "00ab", "gf_ledger_row": 7, "ok": true}},
            {"input": {"name": "B\u{e9}ta \"quoted\""}, "processor": "base-fast", "metadata": null},
            {"input": {"name": "Gamma"}, "processor": "core"},
        ]);
        let sim = Sim::default();
        let bodies = [
            json!({"inputs": runs, "default_task_spec": spec}),
            json!({"inputs": runs, "default_task_spec": null, "refresh_status": true}),
            json!({"inputs": [{"input": "a question", "processor": "lite"}]}),
            json!({"inputs": []}),
        ];
        for body in bodies {
            let bytes = serde_json::to_vec(&body).unwrap();
            for instant in [None, Some(&sim as &dyn Processor)] {
                let fast = plain(&bytes, instant).expect("a plain body");
                assert_eq!(Ok(fast), checked(&bytes, instant), "{body}");
            }
        }
    }

    #[test]
    fn any_other_body_is_left_to_the_full_check() {
        let ok = json!({"input": {"name": "Acme"}, "processor": "core"});
        let spec = json!({"input_schema": {"type": "json", "json_schema": {"type": "object",
            "properties": {"name": {"type": "string"}}, "required": ["name"]}}});
        let refused = [
            json!({"inputs": [ok, {"input": 5, "processor": "core"}]}),
            json!({"inputs": [{"input": {}, "processor": "turbo"}]}),
            json!({"inputs": [{"input": {}, "processor": "core", "metadata": {"k": [1]}}]}),
            json!({"inputs": [{"input": {}, "processor": "core", "metadata": {"k": "x".repeat(600)}}]}),
            json!({"inputs": [{"input": {"name": 1}, "processor": "core"}], "default_task_spec": spec}),
            json!({"inputs": [{"input": {}, "processor": "core"}], "default_task_spec": spec}),
            json!({"inputs": [ok], "refresh_status": "yes"}),
            json!({"inputs": [ok], "default_task_spec": {"input_schema": "auto"}}),
            json!({"inputs": vec![ok.clone(); MAX_RUNS_PER_REQUEST + 1]}),
            json!({"inputs": ok}),
            json!([ok]),
        ];
        for body in refused {
            let bytes = serde_json::to_vec(&body).unwrap();
            assert_eq!(plain(&bytes, None), None, "{body}");
            assert!(checked(&bytes, None).is_err(), "{body}");
        }
        // Valid, but not of the plain shape: the full check takes it.
        let accepted = [
            json!({"inputs": [{"input": {}, "processor": "core", "enable_events": false}]}),
            json!({"inputs": [{"input": {}, "processor": "core",
                "task_spec": {"output_schema": {"type": "text"}}}]}),
        ];
        for body in accepted {
            let bytes = serde_json::to_vec(&body).unwrap();
            assert_eq!(plain(&bytes, None), None, "{body}");
            assert!(checked(&bytes, None).is_ok(), "{body}");
        }
        let twice = br#"{"inputs": [], "inputs": [{"input": {}, "processor": "core"}]}"#;
        assert_eq!(plain(twice, None), None);
        assert!(checked(twice, None).is_ok());
    }
}
