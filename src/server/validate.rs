//! Request validation: what the API would reject, reported as FastAPI-style issues that
//! name the exact location (`["body", "inputs", 3, "metadata", "k"]`).

use serde::Deserialize;
use serde_json::{Map, Value};

use super::processor;
use crate::api::{
    MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS, MAX_SCHEMA_DEPTH, Schema, TaskRunInput,
    TaskSpec, ValidationIssue, json_kind,
};

/// Most properties an output schema may declare, counted over all levels. The API documents
/// no number; 100 keeps schemas well beyond the ~25 output fields of the largest processors.
pub const MAX_SCHEMA_PROPERTIES: usize = 100;

/// Collected problems of one request.
#[derive(Debug, Default)]
pub struct Issues(pub Vec<ValidationIssue>);

/// A location path element: a key or an index.
#[derive(Clone, Debug)]
pub enum Loc {
    Key(String),
    Index(usize),
}

impl From<&str> for Loc {
    fn from(s: &str) -> Loc {
        Loc::Key(s.to_string())
    }
}

impl From<usize> for Loc {
    fn from(i: usize) -> Loc {
        Loc::Index(i)
    }
}

/// Builds a location from path elements.
pub fn loc(parts: &[Loc], more: &[Loc]) -> Vec<Loc> {
    parts.iter().chain(more).cloned().collect()
}

impl Issues {
    /// Records one problem.
    pub fn push(&mut self, at: Vec<Loc>, msg: impl Into<String>, kind: &str) {
        // A request with thousands of bad inputs gets a readable answer, not a huge one.
        if self.0.len() >= 50 {
            return;
        }
        self.0.push(ValidationIssue {
            loc: at
                .into_iter()
                .map(|l| match l {
                    Loc::Key(k) => Value::String(k),
                    Loc::Index(i) => Value::from(i),
                })
                .collect(),
            msg: msg.into(),
            kind: kind.to_string(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One line per problem: `body.inputs.3.processor: message`.
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|i| {
                let path: Vec<String> = i
                    .loc
                    .iter()
                    .map(|l| match l {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                format!("{}: {}", path.join("."), i.msg)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Checks run or group metadata: an object of short keys to strings, numbers or booleans.
pub fn metadata(v: &Value, at: &[Loc], issues: &mut Issues) {
    match v {
        Value::Null => {}
        Value::Object(m) => metadata_entries(m, at, issues),
        other => issues.push(
            at.to_vec(),
            format!("metadata must be an object, got {}", json_kind(other)),
            "dict_type",
        ),
    }
}

/// Checks the entries of a metadata object (see [`metadata`]).
pub fn metadata_entries(m: &Map<String, Value>, at: &[Loc], issues: &mut Issues) {
    for (k, val) in m {
        let here = || loc(at, &[Loc::Key(k.clone())]);
        let key_chars = k.chars().count();
        if key_chars > MAX_METADATA_KEY_CHARS {
            issues.push(
                here(),
                format!(
                    "metadata key `{k}` has {key_chars} characters; at most {MAX_METADATA_KEY_CHARS} are allowed"
                ),
                "string_too_long",
            );
        }
        match val {
            Value::String(s) => {
                let n = s.chars().count();
                if n > MAX_METADATA_VALUE_CHARS {
                    issues.push(
                        here(),
                        format!(
                            "metadata value of `{k}` has {n} characters; at most {MAX_METADATA_VALUE_CHARS} are allowed"
                        ),
                        "string_too_long",
                    );
                }
            }
            Value::Number(_) | Value::Bool(_) => {}
            other => issues.push(
                here(),
                format!(
                    "metadata value of `{k}` must be a string, integer, number or boolean, got {}",
                    json_kind(other)
                ),
                "value_error",
            ),
        }
    }
}

/// Parses and checks a task spec; `None` (with issues recorded) when it is unusable.
pub fn task_spec(v: &Value, at: &[Loc], issues: &mut Issues) -> Option<TaskSpec> {
    let spec = match TaskSpec::deserialize(v) {
        Ok(s) => s,
        Err(e) => {
            issues.push(
                at.to_vec(),
                format!("invalid task spec: {e}"),
                "value_error",
            );
            return None;
        }
    };
    let before = issues.0.len();
    if let Schema::Json { json_schema } = &spec.output_schema {
        output_json_schema(
            json_schema,
            &loc(at, &["output_schema".into(), "json_schema".into()]),
            issues,
        );
    }
    match &spec.input_schema {
        Some(Schema::Auto) => issues.push(
            loc(at, &["input_schema".into()]),
            "input_schema cannot be auto",
            "value_error",
        ),
        Some(Schema::Json { json_schema }) if !json_schema.is_object() => issues.push(
            loc(at, &["input_schema".into(), "json_schema".into()]),
            "input json_schema must be an object",
            "value_error",
        ),
        _ => {}
    }
    (issues.0.len() == before).then_some(spec)
}

/// The API's limits on output JSON Schemas: an object at the root, at most
/// [`MAX_SCHEMA_DEPTH`] levels of nested objects, at most [`MAX_SCHEMA_PROPERTIES`] properties.
pub fn output_json_schema(schema: &Value, at: &[Loc], issues: &mut Issues) {
    let root_is_object = match schema.get("type") {
        Some(Value::String(t)) => t == "object",
        None => schema.get("properties").is_some(),
        _ => false,
    };
    if !root_is_object {
        let got = schema
            .get("type")
            .map_or_else(|| "no type".to_string(), |t| format!("type {t}"));
        issues.push(
            at.to_vec(),
            format!("output json_schema must have type \"object\" at its root, got {got}"),
            "value_error",
        );
        return;
    }
    let mut stats = Stats::default();
    if let Err(msg) = walk(schema, schema, 0, &mut stats, &mut Vec::new()) {
        issues.push(at.to_vec(), msg, "value_error");
        return;
    }
    if stats.depth > MAX_SCHEMA_DEPTH {
        issues.push(
            at.to_vec(),
            format!(
                "output schema nests objects {} levels deep; at most {MAX_SCHEMA_DEPTH} are allowed",
                stats.depth
            ),
            "value_error",
        );
    }
    if stats.properties > MAX_SCHEMA_PROPERTIES {
        issues.push(
            at.to_vec(),
            format!(
                "output schema declares {} properties; at most {MAX_SCHEMA_PROPERTIES} are allowed",
                stats.properties
            ),
            "value_error",
        );
    }
}

#[derive(Default)]
struct Stats {
    depth: usize,
    properties: usize,
}

fn walk(
    schema: &Value,
    root: &Value,
    level: usize,
    stats: &mut Stats,
    refs: &mut Vec<String>,
) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        return Ok(());
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        if refs.iter().any(|x| x == r) {
            return Err(format!("recursive $ref `{r}` is not supported"));
        }
        let target = super::processor::resolve_ref(root, r)
            .ok_or_else(|| format!("$ref `{r}` does not resolve inside the schema"))?;
        refs.push(r.to_string());
        walk(target, root, level, stats, refs)?;
        refs.pop();
        return Ok(());
    }
    let is_object = match obj.get("type") {
        Some(Value::String(t)) => t == "object",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
        _ => obj.contains_key("properties"),
    };
    let level = if is_object { level + 1 } else { level };
    stats.depth = stats.depth.max(level);
    if let Some(Value::Object(props)) = obj.get("properties") {
        stats.properties += props.len();
        for sub in props.values() {
            walk(sub, root, level, stats, refs)?;
        }
    }
    match obj.get("items") {
        Some(Value::Array(items)) => {
            for sub in items {
                walk(sub, root, level, stats, refs)?;
            }
        }
        Some(sub) => walk(sub, root, level, stats, refs)?,
        None => {}
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(branches)) = obj.get(key) {
            for sub in branches {
                walk(sub, root, level, stats, refs)?;
            }
        }
    }
    Ok(())
}

/// Checks a run's input against its spec's JSON `input_schema`: object shape, required
/// keys and the basic types of declared properties.
pub fn input_matches(input: &Value, spec: &TaskSpec, at: &[Loc], issues: &mut Issues) {
    let Some(Schema::Json { json_schema }) = &spec.input_schema else {
        return;
    };
    let Some(obj) = input.as_object() else {
        issues.push(
            at.to_vec(),
            format!(
                "input must be a JSON object matching input_schema, got {}",
                json_kind(input)
            ),
            "dict_type",
        );
        return;
    };
    if let Some(Value::Array(required)) = json_schema.get("required") {
        for key in required.iter().filter_map(Value::as_str) {
            if !obj.contains_key(key) {
                issues.push(
                    loc(at, &[Loc::Key(key.to_string())]),
                    format!("Field required: input_schema requires `{key}`"),
                    "missing",
                );
            }
        }
    }
    let Some(Value::Object(props)) = json_schema.get("properties") else {
        return;
    };
    for (key, value) in obj {
        let Some(prop) = props.get(key) else { continue };
        let prop = match prop.get("$ref").and_then(Value::as_str) {
            Some(r) => super::processor::resolve_ref(json_schema, r).unwrap_or(prop),
            None => prop,
        };
        let allowed: Vec<&str> = match prop.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        if !allowed.iter().any(|t| type_matches(t, value)) {
            issues.push(
                loc(at, &[Loc::Key(key.clone())]),
                format!(
                    "input `{key}` must be {}, got {}",
                    allowed.join(" or "),
                    json_kind(value)
                ),
                "type_error",
            );
        }
    }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        "null" => v.is_null(),
        _ => true,
    }
}

/// A run input that passed validation, with its stored JSON text.
#[derive(Debug)]
pub struct CheckedRun {
    pub input: TaskRunInput,
    /// The input as stored and returned by `/input` and `include_input`.
    pub text: String,
    /// The run's own task spec, as stored JSON text.
    pub own_spec: Option<String>,
}

/// Parses and checks one run input (an element of `inputs`, or a single run's body). The
/// input is taken, not borrowed: its strings move into the [`TaskRunInput`] rather than
/// being copied.
pub fn run_input(
    v: Value,
    at: &[Loc],
    default_spec: Option<&TaskSpec>,
    issues: &mut Issues,
) -> Option<CheckedRun> {
    let Some(obj) = v.as_object() else {
        issues.push(
            at.to_vec(),
            format!("each run input must be an object, got {}", json_kind(&v)),
            "dict_type",
        );
        return None;
    };
    let before = issues.0.len();
    match obj.get("input") {
        None => issues.push(loc(at, &["input".into()]), "Field required", "missing"),
        Some(Value::String(_) | Value::Object(_)) => {}
        Some(other) => issues.push(
            loc(at, &["input".into()]),
            format!(
                "input must be a string or an object, got {}",
                json_kind(other)
            ),
            "value_error",
        ),
    }
    match obj.get("processor") {
        None => issues.push(loc(at, &["processor".into()]), "Field required", "missing"),
        Some(Value::String(p)) if !processor::is_documented(p) => issues.push(
            loc(at, &["processor".into()]),
            format!(
                "invalid processor `{p}`: expected one of {} (optionally with -fast)",
                processor::DOCUMENTED_PROCESSORS.join(", ")
            ),
            "value_error",
        ),
        Some(Value::String(_)) => {}
        Some(other) => issues.push(
            loc(at, &["processor".into()]),
            format!("processor must be a string, got {}", json_kind(other)),
            "string_type",
        ),
    }
    if let Some(m) = obj.get("metadata") {
        metadata(m, &loc(at, &["metadata".into()]), issues);
    }
    let own_spec = match obj.get("task_spec") {
        None | Some(Value::Null) => None,
        Some(s) => task_spec(s, &loc(at, &["task_spec".into()]), issues),
    };
    if issues.0.len() != before {
        return None;
    }
    let input = match TaskRunInput::deserialize(v) {
        Ok(i) => i,
        Err(e) => {
            issues.push(
                at.to_vec(),
                format!("invalid run input: {e}"),
                "value_error",
            );
            return None;
        }
    };
    if let Some(spec) = own_spec.as_ref().or(default_spec) {
        input_matches(&input.input, spec, &loc(at, &["input".into()]), issues);
    }
    if issues.0.len() != before {
        return None;
    }
    let text = serde_json::to_string(&input).ok()?;
    let own_spec = match &input.task_spec {
        Some(s) => Some(serde_json::to_string(s).ok()?),
        None => None,
    };
    Some(CheckedRun {
        input,
        text,
        own_spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema_issues(schema: Value) -> Vec<String> {
        let mut issues = Issues::default();
        output_json_schema(&schema, &[], &mut issues);
        issues.0.into_iter().map(|i| i.msg).collect()
    }

    #[test]
    fn output_schema_limits() {
        assert!(
            schema_issues(json!({"type": "object", "properties": {"a": {"type": "string"}}}))
                .is_empty()
        );
        assert!(schema_issues(json!({"type": "array"}))[0].contains("type \"object\""));
        let deep = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {
            "b": {"type": "object", "properties": {"c": {"type": "object", "properties": {"d": {"type": "string"}}}}}}}}});
        assert!(schema_issues(deep)[0].contains("4 levels"));
        let three = json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object",
            "properties": {"b": {"type": "object", "properties": {"c": {"type": "string"}}}}}}}});
        assert!(schema_issues(three).is_empty());
        let props: serde_json::Map<String, Value> = (0..101)
            .map(|i| (format!("p{i}"), json!({"type": "string"})))
            .collect();
        assert!(
            schema_issues(json!({"type": "object", "properties": props}))[0]
                .contains("101 properties")
        );
        let recursive = json!({"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}},
            "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}});
        assert!(schema_issues(recursive)[0].contains("recursive"));
    }

    #[test]
    fn metadata_limits_name_the_key() {
        let mut issues = Issues::default();
        metadata(
            &json!({"ok": 1, "a_key_longer_than_16": "x", "big": "y".repeat(513), "nested": {"x": 1}, "f": 1.5, "b": true}),
            &[Loc::from("metadata")],
            &mut issues,
        );
        let s = issues.summary();
        assert_eq!(issues.0.len(), 3, "{s}");
        assert!(s.contains("metadata.a_key_longer_than_16"), "{s}");
        assert!(
            s.contains("metadata.big: metadata value of `big` has 513"),
            "{s}"
        );
        assert!(s.contains("got object"), "{s}");
    }

    #[test]
    fn inputs_are_checked_against_input_schema() {
        let spec: TaskSpec = serde_json::from_value(json!({
            "output_schema": "text",
            "input_schema": {"json_schema": {"type": "object",
                "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name"]}}
        }))
        .unwrap();
        let mut issues = Issues::default();
        let ok = run_input(
            json!({"input": {"name": "a", "n": 2}, "processor": "core"}),
            &[],
            Some(&spec),
            &mut issues,
        );
        assert!(ok.is_some() && issues.is_empty());
        run_input(
            json!({"input": {"n": "two"}, "processor": "core"}),
            &[Loc::Index(4)],
            Some(&spec),
            &mut issues,
        );
        let s = issues.summary();
        assert!(s.contains("4.input.name: Field required"), "{s}");
        assert!(
            s.contains("4.input.n: input `n` must be integer, got string"),
            "{s}"
        );
        let mut issues = Issues::default();
        run_input(
            json!({"input": "text", "processor": "gpt"}),
            &[],
            Some(&spec),
            &mut issues,
        );
        assert!(issues.summary().contains("invalid processor `gpt`"));
    }
}
