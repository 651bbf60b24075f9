//! What a task is: the processor, how a row becomes a run input, and the output's JSON Schema.
//! Written in pipeline YAML under `tasks:`, or built in code for [`crate::sql::register`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{Schema, TaskSpec};

/// One task: rows in, runs of `processor` out, results shaped by `output`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDefinition {
    /// The processor each run asks for (`lite`, `base`, `core`, `pro`, …).
    #[serde(default = "default_processor")]
    pub processor: String,
    /// How a source row becomes a run's `input`.
    pub input: InputMapping,
    /// The output: a JSON Schema object (typed columns), or a string describing a text output.
    pub output: Value,
    /// Optional JSON Schema (or description string) of the input, sent in the task spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
}

fn default_processor() -> String {
    "core".to_string()
}

impl TaskDefinition {
    /// A task on the `core` processor.
    pub fn new(input: InputMapping, output: Value) -> Self {
        TaskDefinition {
            processor: default_processor(),
            input,
            output,
            input_schema: None,
        }
    }

    /// The task spec sent as the group's `default_task_spec`.
    pub fn task_spec(&self) -> TaskSpec {
        TaskSpec {
            output_schema: schema_of(&self.output),
            input_schema: self.input_schema.as_ref().map(schema_of),
        }
    }
}

/// A string is a text schema with that description; anything else is the JSON Schema itself.
fn schema_of(v: &Value) -> Schema {
    match v {
        Value::String(s) => Schema::Text {
            description: Some(s.clone()),
        },
        other => Schema::Json {
            json_schema: other.clone(),
        },
    }
}

/// How a row becomes a run input: named columns, or a text template.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum InputMapping {
    /// A JSON object input: input key → column name.
    Columns(BTreeMap<String, String>),
    /// A string input: `{column}` is replaced by the row's value (`{{` and `}}` are braces).
    Template(String),
}

impl InputMapping {
    /// The columns this mapping reads, in first-use order, each once.
    pub fn columns(&self) -> Result<Vec<String>, TemplateError> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |c: &str| {
            if !out.iter().any(|o| o == c) {
                out.push(c.to_string());
            }
        };
        match self {
            InputMapping::Columns(m) => m.values().for_each(|c| push(c)),
            InputMapping::Template(t) => {
                for part in parse_template(t)? {
                    if let TemplatePart::Column(c) = part {
                        push(&c);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A piece of a parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplatePart {
    /// Text copied as is.
    Literal(String),
    /// The value of this column.
    Column(String),
}

/// A template that cannot be parsed; `offset` is the character position in the template.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("input template, character {offset}: {message}")]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
}

/// Splits `"Research {name} at {website}"` into literals and column references.
pub fn parse_template(template: &str) -> Result<Vec<TemplatePart>, TemplateError> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = template.chars().enumerate().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(TemplateError {
                        offset: i,
                        message: "`{` is never closed (write `{{` for a literal brace)".into(),
                    });
                }
                let name = name.trim();
                if name.is_empty() {
                    return Err(TemplateError {
                        offset: i,
                        message: "empty `{}` (write `{{}}` for literal braces)".into(),
                    });
                }
                if !literal.is_empty() {
                    parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                }
                parts.push(TemplatePart::Column(name.to_string()));
            }
            '}' => {
                return Err(TemplateError {
                    offset: i,
                    message: "`}` without `{` (write `}}` for a literal brace)".into(),
                });
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        parts.push(TemplatePart::Literal(literal));
    }
    Ok(parts)
}

impl fmt::Display for InputMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputMapping::Columns(m) => {
                let pairs: Vec<String> = m.iter().map(|(k, c)| format!("{k}: {c}")).collect();
                write!(f, "{{{}}}", pairs.join(", "))
            }
            InputMapping::Template(t) => write!(f, "{t:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definition_reads_both_mappings_and_defaults_the_processor() {
        let t: TaskDefinition = serde_json::from_value(json!({
            "input": {"company_name": "name"},
            "output": {"type": "object", "properties": {"a": {"type": "string"}}}
        }))
        .unwrap();
        assert_eq!(t.processor, "core");
        assert_eq!(t.input.columns().unwrap(), vec!["name"]);
        assert!(matches!(t.task_spec().output_schema, Schema::Json { .. }));

        let t: TaskDefinition = serde_json::from_value(json!({
            "processor": "lite", "input": "Research {name} at {website}", "output": "a summary"
        }))
        .unwrap();
        assert_eq!(t.input.columns().unwrap(), vec!["name", "website"]);
        assert!(matches!(t.task_spec().output_schema, Schema::Text { .. }));

        let err = serde_json::from_value::<TaskDefinition>(json!({
            "input": "x", "output": "y", "outptu": 1
        }))
        .unwrap_err();
        assert!(err.to_string().contains("outptu"), "{err}");
    }

    #[test]
    fn templates_parse_columns_escapes_and_report_errors() {
        assert_eq!(
            parse_template("a {x} {{b}} {y}").unwrap(),
            vec![
                TemplatePart::Literal("a ".into()),
                TemplatePart::Column("x".into()),
                TemplatePart::Literal(" {b} ".into()),
                TemplatePart::Column("y".into()),
            ]
        );
        assert_eq!(parse_template("ab {x").unwrap_err().offset, 3);
        assert!(parse_template("{}").is_err());
        assert!(parse_template("a } b").is_err());
    }
}
