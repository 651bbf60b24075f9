//! Single-run endpoints: create, retrieve, input, result.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;
use tokio::time::Instant;

use super::groups::{json_response, parse_run};
use super::{ApiError, AppState, Params, parse_json, read_body};
use crate::server::processor;
use crate::server::store::{NewRun, RunRow, SpecChoice};
use crate::server::validate::{self, Issues, Loc};
use crate::server::wire::StatusCode as Run;

/// How long `/result` waits when the request does not say.
const DEFAULT_RESULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Loads a run, or answers 404.
pub async fn load_run(state: &AppState, id: &str) -> Result<RunRow, ApiError> {
    let (seq, tag) = parse_run(id)?;
    state
        .blocking(move |s| Ok(s.run(seq, &tag)?))
        .await?
        .ok_or(ApiError::NotFound("Run id not found"))
}

/// `POST /v1/tasks/runs` — 202 with the queued run.
pub async fn create(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let row = state
        .blocking(move |s| {
            let mut issues = Issues::default();
            let Some(v) = parse_json(&bytes, &mut issues) else {
                return Err(ApiError::InvalidRun(issues));
            };
            if let Some(p) = v.get("processor").and_then(Value::as_str)
                && !processor::is_documented(p)
            {
                return Err(ApiError::Forbidden(format!(
                    "Forbidden: invalid processor in request: `{p}`"
                )));
            }
            let Some(checked) = validate::run_input(v, &[Loc::from("body")], None, &mut issues)
            else {
                return Err(ApiError::InvalidRun(issues));
            };
            Ok(s.create_run(NewRun {
                processor: checked.input.processor,
                metadata: checked.input.metadata.map(|m| Value::Object(m).to_string()),
                input: checked.text,
                spec: checked.own_spec.map_or(SpecChoice::None, SpecChoice::Own),
                outcome: None,
            })?)
        })
        .await?;
    state.wake.notify_one();
    state.changed();
    Ok(json_response(StatusCode::ACCEPTED, row.run_json()))
}

/// `GET /v1/tasks/runs/{id}`
pub async fn retrieve(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &run_id).await?;
    Ok(json_response(StatusCode::OK, run.run_json()))
}

/// `GET /v1/tasks/runs/{id}/input` — the input as sent, with the effective task spec.
pub async fn input(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    let run = load_run(&state, &run_id).await?;
    let mut input: Value = serde_json::from_str(&run.input)
        .map_err(|e| ApiError::Internal(format!("stored input of {run_id}: {e}")))?;
    if let (Some(obj), Some(spec)) = (input.as_object_mut(), run.spec.as_deref())
        && !obj.contains_key("task_spec")
        && let Ok(spec) = serde_json::from_str::<Value>(spec)
    {
        obj.insert("task_spec".to_string(), spec);
    }
    Ok(json_response(StatusCode::OK, input.to_string()))
}

/// `GET /v1/tasks/runs/{id}/result` — waits up to `timeout` seconds for the run to end.
pub async fn result(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut issues = Issues::default();
    let timeout = Params::parse(query.as_deref())
        .seconds("timeout", &mut issues)
        .unwrap_or(DEFAULT_RESULT_TIMEOUT);
    if !issues.is_empty() {
        return Err(ApiError::InvalidRun(issues));
    }
    let deadline = Instant::now() + timeout;
    let mut changes = state.changes.subscribe();
    let mut shutdown = state.shutdown.clone();
    loop {
        changes.borrow_and_update();
        let run = load_run(&state, &run_id).await?;
        match run.status {
            Run::Completed => {
                let mut out = String::from("{\"run\":");
                run.view().write_json(&mut out);
                out.push_str(",\"output\":");
                out.push_str(run.output.as_deref().unwrap_or("null"));
                out.push('}');
                return Ok(json_response(StatusCode::OK, out));
            }
            Run::Failed | Run::Cancelled => {
                let why = run
                    .error
                    .as_deref()
                    .and_then(|e| serde_json::from_str::<Value>(e).ok())
                    .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| run.status.as_str().to_string());
                return Err(ApiError::RunFailed(format!("Run failed: {why}")));
            }
            _ => {}
        }
        if Instant::now() >= deadline || *shutdown.borrow() {
            return Err(ApiError::Timeout("Request timed out; run still active"));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() {
                return Err(ApiError::Timeout("Request timed out; run still active"));
            },
            _ = tokio::time::sleep_until(deadline) => {}
            r = shutdown.changed() => if r.is_err() {
                return Err(ApiError::Timeout("Request timed out; run still active"));
            },
        }
    }
}
