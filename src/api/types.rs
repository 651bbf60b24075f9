//! Wire types of the Task Group API, shared by the client and the local server.
//!
//! Field names are exact. Writing is strict (the server emits every required key, with
//! explicit `null` where the reference shows one); reading is lenient (unknown keys are
//! ignored, unknown enum values are kept, nullable keys may be absent).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::Deserializer;
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Run metadata: string keys to strings, integers, numbers or booleans.
pub type Metadata = Map<String, Value>;

/// Status of one task run.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunStatus {
    Queued,
    ActionRequired,
    Running,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    /// A status this version does not know, kept as sent.
    Other(String),
}

impl RunStatus {
    /// The seven statuses the reference lists, in lifecycle order.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Queued,
        RunStatus::ActionRequired,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelling,
        RunStatus::Cancelled,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::ActionRequired => "action_required",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelling => "cancelling",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "queued" => RunStatus::Queued,
            "action_required" => RunStatus::ActionRequired,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelling" => RunStatus::Cancelling,
            "cancelled" => RunStatus::Cancelled,
            other => RunStatus::Other(other.to_string()),
        }
    }

    /// True for `queued`, `running` and `cancelling` (not `action_required`).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            RunStatus::Queued | RunStatus::Running | RunStatus::Cancelling
        )
    }

    /// True once the run can change no more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RunStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RunStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(RunStatus::parse(&s))
    }
}

/// An output or input schema: JSON Schema, free text, or (output only) automatic.
///
/// On the wire this is an untagged union: `type` decides when present, else the presence of
/// `json_schema`, else text; a bare string is a text schema with that description.
#[derive(Clone, Debug, PartialEq)]
pub enum Schema {
    Json { json_schema: Value },
    Text { description: Option<String> },
    Auto,
}

impl Serialize for Schema {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = match self {
            Schema::Json { json_schema } => {
                serde_json::json!({"json_schema": json_schema, "type": "json"})
            }
            Schema::Text { description } => {
                serde_json::json!({"description": description, "type": "text"})
            }
            Schema::Auto => serde_json::json!({"type": "auto"}),
        };
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Schema {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        Schema::from_value(v).map_err(D::Error::custom)
    }
}

impl Schema {
    /// Interprets a wire value as a schema; the error says what was wrong with it.
    pub fn from_value(v: Value) -> Result<Schema, String> {
        match v {
            Value::String(s) => Ok(Schema::Text {
                description: Some(s),
            }),
            Value::Object(mut m) => {
                let ty = m.get("type").and_then(Value::as_str).map(str::to_string);
                match ty.as_deref() {
                    Some("json") | None if m.contains_key("json_schema") => {
                        let js = m.remove("json_schema").unwrap_or(Value::Null);
                        if !js.is_object() {
                            return Err("json_schema must be an object".into());
                        }
                        Ok(Schema::Json { json_schema: js })
                    }
                    Some("json") => Err("json schema requires `json_schema`".into()),
                    Some("text") | None => Ok(Schema::Text {
                        description: match m.remove("description") {
                            Some(Value::String(s)) => Some(s),
                            Some(Value::Null) | None => None,
                            Some(_) => return Err("description must be a string".into()),
                        },
                    }),
                    Some("auto") => Ok(Schema::Auto),
                    Some(other) => Err(format!(
                        "unknown schema type `{other}` (expected json, text or auto)"
                    )),
                }
            }
            other => Err(format!(
                "schema must be an object or a string, got {}",
                json_kind(&other)
            )),
        }
    }
}

/// Names the JSON kind of a value, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What a run computes: its output schema and, optionally, the shape of its input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub output_schema: Schema,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Schema>,
}

/// One run to execute: the body of `POST /v1/tasks/runs` and each element of `inputs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRunInput {
    /// A string or any JSON object.
    pub input: Value,
    pub processor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_spec: Option<TaskSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced_settings: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_interaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_events: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_scope_key: Option<String>,
}

impl TaskRunInput {
    /// A run of `processor` over `input`, with nothing else set.
    pub fn new(input: Value, processor: impl Into<String>) -> Self {
        TaskRunInput {
            input,
            processor: processor.into(),
            metadata: None,
            task_spec: None,
            source_policy: None,
            advanced_settings: None,
            previous_interaction_id: None,
            mcp_servers: None,
            enable_events: None,
            webhook: None,
            memory_scope_key: None,
        }
    }
}

/// A warning attached to a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Warning {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub detail: Option<Value>,
}

/// The error object of error bodies, error events and failed runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    #[serde(default)]
    pub ref_id: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub detail: Option<Value>,
}

/// Body of a non-2xx answer: `{"type":"error","error":{…}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    #[serde(rename = "type", default = "error_type")]
    pub kind: String,
    pub error: ErrorObject,
}

fn error_type() -> String {
    "error".to_string()
}

impl ErrorResponse {
    pub fn new(error: ErrorObject) -> Self {
        ErrorResponse {
            kind: error_type(),
            error,
        }
    }
}

/// One entry of a FastAPI-style validation error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationIssue {
    pub loc: Vec<Value>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// The 422 body of the group endpoints: `{"detail":[{loc,msg,type}]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpValidationError {
    pub detail: Vec<ValidationIssue>,
}

/// A task run as the API reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    pub run_id: String,
    #[serde(default)]
    pub interaction_id: String,
    pub status: RunStatus,
    pub is_active: bool,
    #[serde(default)]
    pub processor: String,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub taskgroup_id: Option<String>,
    #[serde(default)]
    pub warnings: Option<Vec<Warning>>,
    #[serde(default)]
    pub error: Option<ErrorObject>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub modified_at: Option<String>,
}

/// A source behind a basis entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Citation {
    pub url: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub excerpts: Option<Vec<String>>,
}

/// Why one output field has its value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldBasis {
    pub field: String,
    #[serde(default)]
    pub reasoning: String,
    #[serde(default)]
    pub citations: Vec<Citation>,
    #[serde(default)]
    pub confidence: Option<String>,
}

/// The output of a completed run, JSON or text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TaskRunOutput {
    #[serde(rename = "json")]
    Json {
        content: Value,
        #[serde(default)]
        basis: Vec<FieldBasis>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output_schema: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mcp_tool_calls: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fields: Option<Value>,
    },
    #[serde(rename = "text")]
    Text {
        content: String,
        #[serde(default)]
        basis: Vec<FieldBasis>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mcp_tool_calls: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fields: Option<Value>,
    },
}

impl TaskRunOutput {
    pub fn basis(&self) -> &[FieldBasis] {
        match self {
            TaskRunOutput::Json { basis, .. } | TaskRunOutput::Text { basis, .. } => basis,
        }
    }
}

/// `GET /v1/tasks/runs/{id}/result`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRunResult {
    pub run: TaskRun,
    pub output: TaskRunOutput,
}

/// Body of `POST {p}/tasks/groups`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateTaskGroupRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// Progress of a group: run counts by status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroupStatus {
    pub num_task_runs: u64,
    /// Only non-zero statuses appear.
    #[serde(default)]
    pub task_run_status_counts: BTreeMap<String, u64>,
    pub is_active: bool,
    #[serde(default)]
    pub status_message: Option<String>,
    #[serde(default)]
    pub modified_at: Option<String>,
}

impl TaskGroupStatus {
    /// How many runs have the given status.
    pub fn count(&self, status: &RunStatus) -> u64 {
        self.task_run_status_counts
            .get(status.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// How many runs have ended: completed, failed or cancelled.
    pub fn finished(&self) -> u64 {
        self.count(&RunStatus::Completed)
            + self.count(&RunStatus::Failed)
            + self.count(&RunStatus::Cancelled)
    }
}

/// A task group (`TaskGroupResponse`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroup {
    pub taskgroup_id: String,
    pub status: TaskGroupStatus,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// Body of `POST {p}/tasks/groups/{id}/runs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroupRunRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_task_spec: Option<TaskSpec>,
    pub inputs: Vec<TaskRunInput>,
    /// Also accepted in the body (one docs page puts it there); clients send it as a query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_status: Option<bool>,
}

/// Answer to an add-runs POST.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroupRunResponse {
    pub status: TaskGroupStatus,
    /// New run ids, in the order of `inputs`.
    pub run_ids: Vec<String>,
    #[serde(default)]
    pub run_cursor: Option<String>,
    #[serde(default)]
    pub event_cursor: Option<String>,
}

/// `task_run.state`: a run and, when asked for, its input and output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRunEvent {
    #[serde(default)]
    pub event_id: Option<String>,
    pub run: TaskRun,
    #[serde(default)]
    pub input: Option<TaskRunInput>,
    #[serde(default)]
    pub output: Option<TaskRunOutput>,
}

/// `task_group_status`: the group's counts at a moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroupStatusEvent {
    pub event_id: String,
    pub status: TaskGroupStatus,
}

/// One SSE message of a group or run stream, discriminated by its JSON `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum StreamEvent {
    #[serde(rename = "task_group_status")]
    GroupStatus(TaskGroupStatusEvent),
    #[serde(rename = "task_run.state")]
    RunState(Box<TaskRunEvent>),
    #[serde(rename = "error")]
    Error { error: ErrorObject },
    /// Progress stats and messages of single-run streams, and types this version does not know.
    #[serde(other)]
    Other,
}

impl StreamEvent {
    /// The SSE `event:` name, equal to the JSON `type`.
    pub fn event_name(&self) -> &'static str {
        match self {
            StreamEvent::GroupStatus(_) => "task_group_status",
            StreamEvent::RunState(_) => "task_run.state",
            StreamEvent::Error { .. } => "error",
            StreamEvent::Other => "other",
        }
    }

    /// The resume cursor this event carries, if any.
    pub fn event_id(&self) -> Option<&str> {
        match self {
            StreamEvent::GroupStatus(e) => Some(&e.event_id),
            StreamEvent::RunState(e) => e.event_id.as_deref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_union_reads_every_wire_form() {
        let s: Schema = serde_json::from_value(json!("a summary")).unwrap();
        assert_eq!(
            s,
            Schema::Text {
                description: Some("a summary".into())
            }
        );
        let s: Schema = serde_json::from_value(json!({"json_schema": {"type": "object"}})).unwrap();
        assert!(matches!(s, Schema::Json { .. }));
        let s: Schema = serde_json::from_value(json!({"type": "auto"})).unwrap();
        assert_eq!(s, Schema::Auto);
        let err = serde_json::from_value::<Schema>(json!({"type": "xml"})).unwrap_err();
        assert!(err.to_string().contains("unknown schema type `xml`"));
    }

    #[test]
    fn unknown_status_is_kept_and_written_back() {
        let s: RunStatus = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(s, RunStatus::Other("paused".into()));
        assert_eq!(serde_json::to_value(&s).unwrap(), json!("paused"));
        assert!(!RunStatus::ActionRequired.is_active());
        assert!(RunStatus::Cancelling.is_active());
    }

    #[test]
    fn run_writes_explicit_nulls_and_reads_leniently() {
        let run = TaskRun {
            run_id: "trun_1".into(),
            interaction_id: "trun_1".into(),
            status: RunStatus::Queued,
            is_active: true,
            processor: "core".into(),
            metadata: None,
            taskgroup_id: None,
            warnings: None,
            error: None,
            created_at: None,
            modified_at: None,
        };
        let v = serde_json::to_value(&run).unwrap();
        for key in [
            "metadata",
            "taskgroup_id",
            "warnings",
            "error",
            "created_at",
        ] {
            assert_eq!(v[key], Value::Null, "{key} must be an explicit null");
        }
        let back: TaskRun = serde_json::from_value(
            json!({"run_id": "trun_1", "status": "running", "is_active": true, "new_field": 1}),
        )
        .unwrap();
        assert_eq!(back.status, RunStatus::Running);
    }

    #[test]
    fn stream_events_dispatch_on_type() {
        let e: StreamEvent = serde_json::from_value(json!({
            "type": "task_group_status", "event_id": "7",
            "status": {"num_task_runs": 1, "task_run_status_counts": {"queued": 1}, "is_active": true}
        }))
        .unwrap();
        assert_eq!(e.event_id(), Some("7"));
        let e: StreamEvent =
            serde_json::from_value(json!({"type": "task_run.progress_stats", "progress_meter": 5}))
                .unwrap();
        assert_eq!(e, StreamEvent::Other);
        let e: StreamEvent = serde_json::from_value(
            json!({"type": "error", "error": {"ref_id": "r", "message": "m"}}),
        )
        .unwrap();
        assert_eq!(e.event_name(), "error");
    }
}
