//! The JSON Schema of a pipeline file, and the checker that holds pipeline files to it.
//!
//! The schema is the single description of the file's structure: `groupflow schema` prints
//! it for editors, and [`check`] runs it over the parsed YAML (with line and column
//! numbers) before anything else looks at the file, so the two cannot disagree.
//! [`check`] understands the keywords the schema uses and nothing more; a unit test keeps
//! it that way.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{Value as J, json};

use super::diagnostic::did_you_mean;
use super::yaml::{Node, Pos, Value};

/// Names of sources and steps: SQL identifiers that need no quoting (DataFusion folds
/// unquoted names to lower case, so upper-case names could not be queried unquoted).
pub const TABLE_NAME_PATTERN: &str = "^[a-z_][a-z0-9_]*$";
/// Names of tasks, as written in `enrich('name', …)`.
pub const TASK_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_.-]*$";
/// The processors the API documents; each also exists with a `-fast` suffix.
pub const PROCESSORS: &[&str] = &[
    "lite", "base", "core", "core2x", "pro", "ultra", "ultra2x", "ultra4x", "ultra8x",
];
/// The failed-row ratio a task tolerates when it does not say.
pub const DEFAULT_MAX_FAILED_RATIO: f64 = 0.1;

/// The JSON Schema (draft 2020-12) of pipeline files, version 1.
pub fn pipeline_schema() -> &'static J {
    static SCHEMA: OnceLock<J> = OnceLock::new();
    SCHEMA.get_or_init(build)
}

fn build() -> J {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/groupflow/groupflow/pipeline-v1.schema.json",
        "title": "groupflow pipeline",
        "description": "A groupflow pipeline: tables in (sources), Parallel tasks over their rows (tasks), SQL over both (steps), files out (outputs). String values may use ${VAR} and ${VAR:-default}.",
        "type": "object",
        "additionalProperties": false,
        "required": ["version", "name", "sources", "tasks", "steps", "outputs"],
        "properties": {
            "version": {"description": "Version of the pipeline format.", "const": 1},
            "name": {
                "description": "Name of the pipeline; used in the state directory and in the groups' metadata.",
                "type": "string",
                "pattern": TASK_NAME_PATTERN
            },
            "description": {"description": "Free text for people.", "type": "string"},
            "sources": {
                "description": "Tables read from files, by table name.",
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": TABLE_NAME_PATTERN},
                "additionalProperties": {"$ref": "#/$defs/source"}
            },
            "tasks": {
                "description": "Parallel tasks, by the name `enrich('name', …)` uses.",
                "type": "object",
                "propertyNames": {"pattern": TASK_NAME_PATTERN},
                "additionalProperties": {"$ref": "#/$defs/task"}
            },
            "steps": {
                "description": "SQL statements run in order; each result is a table named after its step.",
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/step"}
            },
            "outputs": {
                "description": "Files written from steps or sources when every step has run.",
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/$defs/output"}
            }
        },
        "$defs": {
            "source": {
                "type": "object",
                "additionalProperties": false,
                "required": ["path"],
                "properties": {
                    "path": {
                        "description": "A file, directory or glob on local disk (relative to the pipeline file) or s3://bucket/key.",
                        "type": "string",
                        "minLength": 1
                    },
                    "format": {
                        "description": "File format; inferred from the extension (or the first file of a directory) when absent.",
                        "enum": ["csv", "tsv", "parquet", "ndjson"]
                    },
                    "has_header": {
                        "description": "CSV/TSV: whether the first line names the columns.",
                        "type": "boolean",
                        "default": true
                    },
                    "delimiter": {
                        "description": "CSV: the one-character field delimiter.",
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 1,
                        "default": ","
                    }
                }
            },
            "task": {
                "type": "object",
                "additionalProperties": false,
                "required": ["input", "output"],
                "properties": {
                    "processor": {
                        "description": "The Parallel processor each run asks for (lite, base, core, pro, ultra, …).",
                        "type": "string",
                        "minLength": 1,
                        "default": "core",
                        "examples": ["lite", "base", "core", "core2x", "pro", "ultra", "ultra2x", "ultra4x", "ultra8x", "lite-fast", "core-fast", "pro-fast"]
                    },
                    "input": {
                        "description": "A mapping of JSON input key to column name, or a text template with {column} placeholders.",
                        "type": ["object", "string"],
                        "minProperties": 1,
                        "minLength": 1,
                        "additionalProperties": {"type": "string", "minLength": 1}
                    },
                    "output": {
                        "description": "JSON Schema of each run's result (an object at the root), or a string describing a text result.",
                        "type": ["object", "string"],
                        "minLength": 1
                    },
                    "input_schema": {
                        "description": "Optional JSON Schema (or description) of the input, sent with the task spec.",
                        "type": ["object", "string"]
                    },
                    "max_failed_ratio": {
                        "description": "Largest fraction of this task's runs that may fail before `groupflow run` exits with code 5.",
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "default": DEFAULT_MAX_FAILED_RATIO
                    }
                }
            },
            "step": {
                "type": "object",
                "additionalProperties": false,
                "required": ["name", "sql"],
                "properties": {
                    "name": {
                        "description": "The table name later steps and outputs use for this step's result.",
                        "type": "string",
                        "pattern": TABLE_NAME_PATTERN
                    },
                    "sql": {
                        "description": "One SQL query (DataFusion dialect); may call enrich('task', 'SELECT …') and task_group_runs('tgrp_…').",
                        "type": "string",
                        "minLength": 1
                    }
                }
            },
            "output": {
                "type": "object",
                "additionalProperties": false,
                "required": ["from", "path"],
                "properties": {
                    "from": {"description": "The step or source to write.", "type": "string", "minLength": 1},
                    "path": {
                        "description": "Local path (relative to the pipeline file) or s3://bucket/key. Written atomically.",
                        "type": "string",
                        "minLength": 1
                    },
                    "format": {
                        "description": "File format; inferred from the extension (.parquet, .csv, .ndjson/.jsonl) when absent.",
                        "enum": ["parquet", "csv", "ndjson"]
                    }
                }
            }
        }
    })
}

/// One way a document breaks the schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub pos: Pos,
    pub message: String,
    pub hint: String,
    /// The violation is a key the schema does not allow, written at `pos`; removing it
    /// leaves the rest of the document checkable.
    pub unknown_key: bool,
}

/// Every way `doc` breaks [`pipeline_schema`], in document order.
pub fn check(doc: &Node) -> Vec<Violation> {
    let root = pipeline_schema();
    let mut out = Vec::new();
    Checker {
        root,
        out: &mut out,
    }
    .node(doc, root, "the pipeline", doc.pos);
    out.sort_by_key(|v| v.pos);
    out
}

struct Checker<'a> {
    root: &'static J,
    out: &'a mut Vec<Violation>,
}

impl Checker<'_> {
    fn push(&mut self, pos: Pos, message: String, hint: impl Into<String>) {
        self.out.push(Violation {
            pos,
            message,
            hint: hint.into(),
            unknown_key: false,
        });
    }

    fn resolve<'s>(&self, schema: &'s J) -> &'s J {
        match schema.get("$ref").and_then(J::as_str) {
            Some(r) => r
                .strip_prefix("#/$defs/")
                .and_then(|name| self.root["$defs"].get(name))
                .unwrap_or(&J::Null),
            None => schema,
        }
    }

    /// `what` names the node in messages (``the pipeline``, `` `tasks.research` ``);
    /// `parent` is where a missing value would go.
    fn node(&mut self, node: &Node, schema: &J, what: &str, parent: Pos) {
        let schema = self.resolve(schema);
        let pos = if node.pos == Pos::default() {
            parent
        } else {
            node.pos
        };
        if let Some(c) = schema.get("const") {
            if node.to_json() != *c {
                self.push(pos, format!("{what} must be {c}"), format!("write {c}"));
            }
            return;
        }
        if let Some(J::Array(options)) = schema.get("enum") {
            if !options.contains(&node.to_json()) {
                let list = join(options.iter().map(|o| o.to_string()));
                let got = node.to_json();
                let hint = match node
                    .as_str()
                    .and_then(|s| did_you_mean(s, options.iter().filter_map(J::as_str)))
                {
                    Some(close) => format!("did you mean \"{close}\"?"),
                    None => format!("use one of {list}"),
                };
                self.push(pos, format!("{what} is {got}, not one of {list}"), hint);
            }
            return;
        }
        if let Some(types) = schema.get("type") {
            let allowed: Vec<&str> = match types {
                J::String(t) => vec![t.as_str()],
                J::Array(ts) => ts.iter().filter_map(J::as_str).collect(),
                _ => Vec::new(),
            };
            if !allowed.iter().any(|t| type_matches(t, node)) {
                let want = allowed
                    .iter()
                    .map(|t| type_word(t))
                    .collect::<Vec<_>>()
                    .join(" or ");
                let hint = if allowed.contains(&"string")
                    && !matches!(node.value, Value::Map(_) | Value::Seq(_))
                {
                    "put the value in quotes".to_string()
                } else {
                    format!("write {want} here (see `groupflow schema`)")
                };
                self.push(
                    pos,
                    format!("{what} must be {want}, not {}", article(node.kind())),
                    hint,
                );
                return;
            }
        }
        match &node.value {
            Value::Map(entries) => self.mapping(node, entries, schema, what, pos),
            Value::Seq(items) => {
                if let Some(min) = schema.get("minItems").and_then(J::as_u64)
                    && (items.len() as u64) < min
                {
                    self.push(
                        pos,
                        format!("{what} is empty"),
                        format!("add at least {min} entry"),
                    );
                }
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        let name = format!("{} #{}", trim_what(what), i + 1);
                        self.node(item, item_schema, &format!("`{name}`"), pos);
                    }
                }
            }
            Value::Str(s) => {
                if let Some(min) = schema.get("minLength").and_then(J::as_u64)
                    && (s.chars().count() as u64) < min
                {
                    self.push(pos, format!("{what} is empty"), "write a value");
                }
                if let Some(max) = schema.get("maxLength").and_then(J::as_u64)
                    && (s.chars().count() as u64) > max
                {
                    self.push(
                        pos,
                        format!("{what} {s:?} is too long"),
                        format!("write at most {max} character(s)"),
                    );
                }
                if let Some(p) = schema.get("pattern").and_then(J::as_str)
                    && !s.is_empty()
                    && !pattern(p).is_match(s)
                {
                    self.push(
                        pos,
                        if what.contains(&format!("`{s}`")) {
                            format!("{what} is not a valid name")
                        } else {
                            format!("{what} {s:?} is not a valid name")
                        },
                        pattern_hint(p),
                    );
                }
            }
            Value::Int(_) | Value::Float(_) => {
                let v = node.to_json().as_f64().unwrap_or(f64::NAN);
                let min = schema.get("minimum").and_then(J::as_f64);
                let max = schema.get("maximum").and_then(J::as_f64);
                if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) {
                    let range = format!(
                        "from {} to {}",
                        min.map_or("-∞".into(), |m| m.to_string()),
                        max.map_or("∞".into(), |m| m.to_string())
                    );
                    self.push(
                        pos,
                        format!("{what} is {v}, out of range"),
                        format!("write a number {range}"),
                    );
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn mapping(&mut self, node: &Node, entries: &[(Node, Node)], schema: &J, what: &str, pos: Pos) {
        let props = schema.get("properties").and_then(J::as_object);
        if let Some(min) = schema.get("minProperties").and_then(J::as_u64)
            && (entries.len() as u64) < min
        {
            self.push(pos, format!("{what} is empty"), "add at least one entry");
        }
        if let Some(J::Array(required)) = schema.get("required") {
            for key in required.iter().filter_map(J::as_str) {
                if node.get(key).is_none() {
                    self.push(
                        pos,
                        format!("{what} has no `{key}`"),
                        format!("add `{key}:`"),
                    );
                }
            }
        }
        let names = schema.get("propertyNames");
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.push(
                    k.pos,
                    format!("key {} in {what} is not a string", k.key_text()),
                    "use a plain name as the key",
                );
                continue;
            };
            if let Some(names) = names {
                let key_node = Node {
                    pos: k.pos,
                    value: Value::Str(key.to_string()),
                };
                self.node(&key_node, names, &format!("name `{key}` in {what}"), pos);
            }
            let path = if what == "the pipeline" {
                format!("`{key}`")
            } else {
                format!("`{}.{key}`", trim_what(what))
            };
            match props.and_then(|p| p.get(key)) {
                Some(sub) => self.node(v, sub, &path, k.pos),
                None => match schema.get("additionalProperties") {
                    Some(J::Bool(false)) => {
                        let known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        let hint = match did_you_mean(key, known.iter().copied()) {
                            Some(close) => format!("did you mean `{close}`?"),
                            None => format!("remove it; allowed keys: {}", known.join(", ")),
                        };
                        self.push(k.pos, format!("unknown key `{key}` in {what}"), hint);
                        if let Some(last) = self.out.last_mut() {
                            last.unknown_key = true;
                        }
                    }
                    Some(sub @ J::Object(_)) => self.node(v, sub, &path, k.pos),
                    _ => {}
                },
            }
        }
    }
}

fn type_matches(t: &str, node: &Node) -> bool {
    matches!(
        (t, &node.value),
        ("object", Value::Map(_))
            | ("array", Value::Seq(_))
            | ("string", Value::Str(_))
            | ("integer", Value::Int(_))
            | ("number", Value::Int(_) | Value::Float(_))
            | ("boolean", Value::Bool(_))
            | ("null", Value::Null)
    )
}

fn type_word(t: &str) -> &str {
    match t {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        other => other,
    }
}

fn article(kind: &str) -> String {
    match kind {
        "integer" => "an integer".into(),
        "null" => "empty".into(),
        k => format!("a {k}"),
    }
}

fn trim_what(what: &str) -> &str {
    what.trim_matches('`')
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn pattern(p: &str) -> Regex {
    // The schema holds two fixed patterns, so compiling on each use costs nothing that matters
    // and cannot fail (a unit test compiles every pattern in the schema).
    Regex::new(p).unwrap_or_else(|_| Regex::new("$^").expect("empty regex"))
}

fn pattern_hint(p: &str) -> String {
    match p {
        TABLE_NAME_PATTERN => {
            "use lower-case letters, digits and `_`, starting with a letter or `_`".into()
        }
        TASK_NAME_PATTERN => {
            "use letters, digits, `_`, `-` and `.`, starting with a letter or `_`".into()
        }
        other => format!("it must match {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml;

    const SUPPORTED: &[&str] = &[
        "$schema",
        "$id",
        "$ref",
        "$defs",
        "title",
        "description",
        "default",
        "examples",
        "type",
        "const",
        "enum",
        "required",
        "properties",
        "additionalProperties",
        "propertyNames",
        "minProperties",
        "items",
        "minItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
    ];

    fn keywords(schema: &J, out: &mut Vec<String>) {
        if let J::Object(m) = schema {
            for (k, v) in m {
                out.push(k.clone());
                match k.as_str() {
                    "properties" | "$defs" => v
                        .as_object()
                        .into_iter()
                        .flatten()
                        .for_each(|(_, s)| keywords(s, out)),
                    "const" | "enum" | "default" | "examples" | "required" => {}
                    _ => keywords(v, out),
                }
            }
        }
    }

    #[test]
    fn the_checker_understands_every_keyword_the_schema_uses() {
        let mut used = Vec::new();
        keywords(pipeline_schema(), &mut used);
        for k in &used {
            assert!(SUPPORTED.contains(&k.as_str()), "unsupported keyword {k}");
        }
        for p in [TABLE_NAME_PATTERN, TASK_NAME_PATTERN] {
            Regex::new(p).unwrap();
        }
    }

    fn problems(text: &str) -> Vec<String> {
        check(&yaml::parse(text).unwrap())
            .into_iter()
            .map(|v| format!("{}: {} — {}", v.pos, v.message, v.hint))
            .collect()
    }

    #[test]
    fn a_good_file_passes() {
        let p = problems(
            "version: 1\nname: x\nsources:\n  a: {path: a.csv}\ntasks:\n  t:\n    input: {k: c}\n    output: {type: object}\nsteps:\n  - {name: s, sql: SELECT 1}\noutputs:\n  - {from: s, path: o.csv}\n",
        );
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let p = problems(
            "version: 2\nname: x\nsources:\n  A: {path: a.csv, format: xls}\ntasks:\n  t:\n    input: {k: 1}\n    outptu: {}\n    max_failed_ratio: 2\nsteps: []\noutputz: []\n",
        );
        let text = p.join("\n");
        assert!(text.contains("1:10: `version` must be 1"), "{text}");
        assert!(text.contains("4:3: name `A` in `sources`"), "{text}");
        assert!(text.contains("`sources.A.format` is \"xls\""), "{text}");
        assert!(
            text.contains(
                "7:16: `tasks.t.input.k` must be a string, not an integer — put the value in quotes"
            ),
            "{text}"
        );
        assert!(
            text.contains("8:5: unknown key `outptu` in `tasks.t` — did you mean `output`?"),
            "{text}"
        );
        assert!(text.contains("`tasks.t` has no `output`"), "{text}");
        assert!(
            text.contains("`tasks.t.max_failed_ratio` is 2, out of range"),
            "{text}"
        );
        assert!(text.contains("`steps` is empty"), "{text}");
        assert!(
            text.contains("unknown key `outputz` in the pipeline — did you mean `outputs`?"),
            "{text}"
        );
        assert!(text.contains("the pipeline has no `outputs`"), "{text}");
    }
}
