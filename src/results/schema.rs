//! JSON Schema → Arrow schema: the typed columns a task's output becomes.
//!
//! string → Utf8 (`format: date` → Date32, `format: date-time` → Timestamp(µs, UTC)),
//! integer → Int64, number → Float64, boolean → Boolean, enum → Utf8, array → List,
//! object → Struct. A property is nullable unless it is `required` and its type excludes
//! `null` (`type: [x, "null"]`, or `anyOf`/`oneOf` with a `null` branch).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};

/// A part of a JSON Schema that has no Arrow column type; `path` is where it sits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// Dotted path in the task definition, e.g. `output.properties.people.items`.
    pub path: String,
    pub message: String,
}

fn err(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The Arrow shape of a task's output.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputSchema {
    /// A JSON Schema object: one typed column per property.
    Json {
        /// Decoding schema: a required property is non-nullable here, so output that lacks
        /// it fails to decode and the row is marked invalid.
        decode: SchemaRef,
        /// String enums reachable through objects only (not inside arrays): the property
        /// path and the allowed values. Decoding cannot check these; the decoder does.
        enums: Vec<EnumRule>,
    },
    /// A text output: one `output` Utf8 column.
    Text,
}

/// The values a string property may take, and where the property is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnumRule {
    /// Property names from the output's root, e.g. `["headquarters", "region"]`.
    pub path: Vec<String>,
    pub allowed: Vec<String>,
}

/// Name of the single column of a text output.
pub const TEXT_OUTPUT_COLUMN: &str = "output";

impl OutputSchema {
    /// Reads a task's `output`: a string is a text output, an object a JSON Schema of type
    /// `object`. `path` names the value in errors (e.g. `output` or `tasks.research.output`).
    pub fn from_task_output(output: &Value, path: &str) -> Result<OutputSchema, SchemaError> {
        match output {
            Value::String(_) => Ok(OutputSchema::Text),
            Value::Object(m) => {
                let ty = types_of(m, path)?;
                if !(ty.types.is_empty() && m.contains_key("properties")) && ty.types != ["object"]
                {
                    return Err(err(
                        path,
                        "the output schema must be `type: object` with `properties` (or a string for text output)",
                    ));
                }
                let fields = object_fields(m, path)?;
                let mut enums = Vec::new();
                collect_enums(m, &mut Vec::new(), &mut enums);
                Ok(OutputSchema::Json {
                    decode: Arc::new(Schema::new(fields)),
                    enums,
                })
            }
            other => Err(err(
                path,
                format!(
                    "expected a JSON Schema object or a text description, got {}",
                    crate::api::json_kind(other)
                ),
            )),
        }
    }

    /// The output columns as they appear in result tables: every top-level column nullable,
    /// since failed rows have no output.
    pub fn columns(&self) -> Fields {
        match self {
            OutputSchema::Json { decode, .. } => decode
                .fields()
                .iter()
                .map(|f| Arc::new(f.as_ref().clone().with_nullable(true)))
                .collect(),
            OutputSchema::Text => {
                Fields::from(vec![Field::new(TEXT_OUTPUT_COLUMN, DataType::Utf8, true)])
            }
        }
    }
}

/// Finds string `enum`s under `m`'s properties, following nested objects (also through an
/// `anyOf`/`oneOf` null union) but not arrays.
fn collect_enums(m: &Map<String, Value>, path: &mut Vec<String>, out: &mut Vec<EnumRule>) {
    let Some(Value::Object(props)) = m.get("properties") else {
        return;
    };
    for (name, schema) in props {
        let node = ["anyOf", "oneOf"]
            .iter()
            .find_map(|k| schema.get(*k).and_then(Value::as_array))
            .and_then(|branches| {
                branches
                    .iter()
                    .find(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            })
            .unwrap_or(schema);
        let Value::Object(node) = node else { continue };
        path.push(name.clone());
        if let Some(Value::Array(values)) = node.get("enum") {
            let allowed: Vec<String> = values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            if !allowed.is_empty() {
                out.push(EnumRule {
                    path: path.clone(),
                    allowed,
                });
            }
        }
        if node.contains_key("properties") {
            collect_enums(node, path, out);
        }
        path.pop();
    }
}

/// The `type` of a schema node with `null` taken out, and whether `null` was allowed.
struct Types {
    types: Vec<String>,
    nullable: bool,
}

fn types_of(m: &Map<String, Value>, path: &str) -> Result<Types, SchemaError> {
    let mut out = Types {
        types: Vec::new(),
        nullable: false,
    };
    match m.get("type") {
        None => {}
        Some(Value::String(t)) => out.types.push(t.clone()),
        Some(Value::Array(ts)) => {
            for t in ts {
                match t.as_str() {
                    Some(t) => out.types.push(t.to_string()),
                    None => return Err(err(&format!("{path}.type"), "type names must be strings")),
                }
            }
        }
        Some(other) => {
            return Err(err(
                &format!("{path}.type"),
                format!(
                    "expected a string or a list of strings, got {}",
                    crate::api::json_kind(other)
                ),
            ));
        }
    }
    if out.types.iter().any(|t| t == "null") {
        out.nullable = true;
        out.types.retain(|t| t != "null");
    }
    Ok(out)
}

fn object_fields(m: &Map<String, Value>, path: &str) -> Result<Vec<Field>, SchemaError> {
    let props = match m.get("properties") {
        Some(Value::Object(p)) => p,
        Some(_) => return Err(err(&format!("{path}.properties"), "must be an object")),
        None => {
            return Err(err(
                path,
                "an object without `properties` has no columns (free-form objects are not supported)",
            ));
        }
    };
    if props.is_empty() {
        return Err(err(&format!("{path}.properties"), "no properties"));
    }
    let required: Vec<&str> = match m.get("required") {
        None => Vec::new(),
        Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
        Some(_) => return Err(err(&format!("{path}.required"), "must be a list of names")),
    };
    props
        .iter()
        .map(|(name, schema)| {
            let p = format!("{path}.properties.{name}");
            let (dt, nullable) = node_type(schema, &p)?;
            Ok(Field::new(
                name,
                dt,
                nullable || !required.contains(&name.as_str()),
            ))
        })
        .collect()
}

/// The Arrow type of one schema node, and whether the node itself allows `null`.
fn node_type(schema: &Value, path: &str) -> Result<(DataType, bool), SchemaError> {
    let m = match schema {
        Value::Object(m) => m,
        Value::Bool(_) => return Err(err(path, "boolean schemas are not supported")),
        other => {
            return Err(err(
                path,
                format!(
                    "expected a schema object, got {}",
                    crate::api::json_kind(other)
                ),
            ));
        }
    };
    if m.contains_key("$ref") {
        return Err(err(path, "`$ref` is not supported: inline the definition"));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = m.get(key) {
            return union_type(branches, &format!("{path}.{key}"));
        }
    }
    if m.contains_key("allOf") {
        return Err(err(path, "`allOf` is not supported"));
    }
    let Types {
        mut types,
        nullable,
    } = types_of(m, path)?;
    if types.is_empty() {
        // Untyped nodes: infer from the keywords that only make sense for one type.
        if m.contains_key("properties") {
            types.push("object".into());
        } else if m.contains_key("items") {
            types.push("array".into());
        } else if let Some(Value::Array(values)) = m.get("enum")
            && values.iter().all(|v| v.is_string() || v.is_null())
        {
            types.push("string".into());
        }
    }
    let ty = match types.as_slice() {
        [t] => t.as_str(),
        [] if nullable => return Err(err(path, "a `null`-only type has no column type")),
        [] => return Err(err(path, "no `type` given")),
        many => {
            return Err(err(
                path,
                format!("unsupported type union {many:?} (only one type besides null)"),
            ));
        }
    };
    let dt = match ty {
        "string" => match m.get("format").and_then(Value::as_str) {
            Some("date") => DataType::Date32,
            Some("date-time") => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            _ => DataType::Utf8,
        },
        "integer" => DataType::Int64,
        "number" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "object" => DataType::Struct(Fields::from(object_fields(m, path)?)),
        "array" => {
            let items_path = format!("{path}.items");
            let items = match m.get("items") {
                Some(items @ Value::Object(_)) => items,
                Some(Value::Array(_)) => {
                    return Err(err(&items_path, "unsupported type \"tuple\""));
                }
                Some(_) => return Err(err(&items_path, "must be a schema object")),
                None => return Err(err(path, "an array needs `items`")),
            };
            let (item_type, item_nullable) = node_type(items, &items_path)?;
            DataType::List(Arc::new(Field::new("item", item_type, item_nullable)))
        }
        other => return Err(err(path, format!("unsupported type {other:?}"))),
    };
    Ok((dt, nullable))
}

/// `anyOf`/`oneOf`: one schema plus an optional `{type: null}` branch.
fn union_type(branches: &Value, path: &str) -> Result<(DataType, bool), SchemaError> {
    let Value::Array(branches) = branches else {
        return Err(err(path, "must be a list of schemas"));
    };
    let mut nullable = false;
    let mut typed = Vec::new();
    for (i, b) in branches.iter().enumerate() {
        if b.get("type").and_then(Value::as_str) == Some("null") {
            nullable = true;
        } else {
            typed.push((i, b));
        }
    }
    match typed.as_slice() {
        [(i, b)] => {
            let (dt, n) = node_type(b, &format!("{path}.{i}"))?;
            Ok((dt, nullable || n))
        }
        _ => Err(err(
            path,
            "unsupported union: only one schema besides `{type: null}` can be mapped to a column",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_schema(v: Value) -> SchemaRef {
        match OutputSchema::from_task_output(&v, "output").unwrap() {
            OutputSchema::Json { decode, .. } => decode,
            OutputSchema::Text => panic!("text"),
        }
    }

    #[test]
    fn maps_scalars_formats_and_nullability() {
        let s = decode_schema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "n": {"type": "integer"},
                "x": {"type": ["number", "null"]},
                "ok": {"type": "boolean"},
                "day": {"type": "string", "format": "date"},
                "at": {"type": "string", "format": "date-time"},
                "tier": {"enum": ["a", "b"]},
                "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]}
            },
            "required": ["name", "n", "x", "ok", "day", "at", "tier", "maybe"]
        }));
        let f = |n: &str| s.field_with_name(n).unwrap().clone();
        assert_eq!(f("name"), Field::new("name", DataType::Utf8, false));
        assert_eq!(f("n"), Field::new("n", DataType::Int64, false));
        assert_eq!(f("x"), Field::new("x", DataType::Float64, true));
        assert_eq!(f("ok").data_type(), &DataType::Boolean);
        assert_eq!(f("day").data_type(), &DataType::Date32);
        assert_eq!(
            f("at").data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(f("tier"), Field::new("tier", DataType::Utf8, false));
        let OutputSchema::Json { enums, .. } = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {
                "tier": {"enum": ["a", "b"]},
                "hq": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["x"]}}}
            }}),
            "output",
        )
        .unwrap() else {
            panic!("json")
        };
        assert_eq!(
            enums,
            vec![
                EnumRule {
                    path: vec!["hq".into(), "zone".into()],
                    allowed: vec!["x".into()]
                },
                EnumRule {
                    path: vec!["tier".into()],
                    allowed: vec!["a".into(), "b".into()]
                },
            ]
        );
        assert_eq!(f("maybe"), Field::new("maybe", DataType::Int64, true));
    }

    #[test]
    fn maps_nested_objects_and_arrays() {
        let s = decode_schema(json!({
            "type": "object",
            "properties": {
                "people": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name"]
                }}
            }
        }));
        // serde_json keeps object keys sorted, so properties come out in name order.
        let person = Fields::from(vec![
            Field::new("age", DataType::Int64, true),
            Field::new("name", DataType::Utf8, false),
        ]);
        assert_eq!(
            s.field(0),
            &Field::new(
                "people",
                DataType::List(Arc::new(Field::new(
                    "item",
                    DataType::Struct(person),
                    false
                ))),
                true
            )
        );
    }

    #[test]
    fn unsupported_constructs_name_their_path() {
        let e = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {"people": {"type": "array", "items": {
                "type": "object", "properties": {"age": {"type": "tuple"}}}}}}),
            "output",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "output.properties.people.items.properties.age: unsupported type \"tuple\""
        );
        let e = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}),
            "tasks.t.output",
        )
        .unwrap_err();
        assert_eq!(e.path, "tasks.t.output.properties.a");
        let e = OutputSchema::from_task_output(&json!({"type": "array", "items": {}}), "output")
            .unwrap_err();
        assert_eq!(e.path, "output");
        let e = OutputSchema::from_task_output(
            &json!({"properties": {"r": {"$ref": "#/defs/x"}}}),
            "output",
        )
        .unwrap_err();
        assert!(e.to_string().contains("$ref"), "{e}");
    }

    #[test]
    fn text_outputs_are_one_column_and_result_columns_are_nullable() {
        assert_eq!(
            OutputSchema::from_task_output(&json!("a summary"), "output").unwrap(),
            OutputSchema::Text
        );
        let s = OutputSchema::from_task_output(
            &json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
            "output",
        )
        .unwrap();
        assert!(s.columns()[0].is_nullable());
    }
}
