//! The API's rules for a task's output JSON Schema, checked in the pipeline file so the
//! problem is reported at its line before any run is submitted: an object at the root, at
//! most [`MAX_SCHEMA_DEPTH`] levels of nested objects, at most [`MAX_SCHEMA_PROPERTIES`]
//! properties in all, known `type` names, `required` naming declared properties.

use crate::api::MAX_SCHEMA_DEPTH;

use super::diagnostic::did_you_mean;
use super::yaml::{Node, Pos, Value};

/// Most properties an output schema may declare, counted over all levels.
pub const MAX_SCHEMA_PROPERTIES: usize = 100;

/// Columns `enrich` adds after the output properties; a property may not take their names.
pub const RESERVED_COLUMNS: [&str; 4] = ["run_id", "run_status", "run_error", "basis"];

const TYPES: [&str; 7] = [
    "string", "number", "integer", "boolean", "object", "array", "null",
];

/// A broken rule: where, what, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pos: Pos,
    pub message: String,
    pub hint: String,
}

/// Checks the `output:` of task `task` (a JSON Schema mapping; text outputs have no rules).
pub fn check(task: &str, output: &Node) -> Vec<Problem> {
    let mut w = Walker {
        root: output,
        task,
        problems: Vec::new(),
        max_depth: 0,
        deepest: output.pos,
        properties: 0,
        refs: Vec::new(),
    };
    if !is_object_schema(output) {
        let got = output
            .get("type")
            .map_or("no `type`".to_string(), |t| format!("type {}", t.to_json()));
        w.problems.push(Problem {
            pos: output.get("type").map_or(output.pos, |t| t.pos),
            message: format!(
                "the output schema of task `{task}` has {got} at its root; the API needs an object"
            ),
            hint: "write `type: object` with `properties:`, or a string for a text output".into(),
        });
        return w.problems;
    }
    w.walk(output, 0);
    if w.max_depth > MAX_SCHEMA_DEPTH {
        w.problems.push(Problem {
            pos: w.deepest,
            message: format!(
                "the output schema of task `{task}` nests objects {} levels deep; the API allows {MAX_SCHEMA_DEPTH}",
                w.max_depth
            ),
            hint: "flatten it: move nested fields up a level".into(),
        });
    }
    if w.properties > MAX_SCHEMA_PROPERTIES {
        w.problems.push(Problem {
            pos: output.pos,
            message: format!(
                "the output schema of task `{task}` declares {} properties; the API allows {MAX_SCHEMA_PROPERTIES}",
                w.properties
            ),
            hint: "split the task in two or drop fields".into(),
        });
    }
    if let Some(props) = output.get("properties").and_then(Node::as_map) {
        for (k, _) in props {
            if let Some(name) = k.as_str()
                && RESERVED_COLUMNS.contains(&name)
            {
                w.problems.push(Problem {
                    pos: k.pos,
                    message: format!(
                        "output property `{name}` of task `{task}` collides with the column enrich() adds with that name"
                    ),
                    hint: format!("rename it (reserved: {})", RESERVED_COLUMNS.join(", ")),
                });
            }
        }
    }
    w.problems
}

fn is_object_schema(n: &Node) -> bool {
    match n.get("type").map(|t| &t.value) {
        Some(Value::Str(t)) => t == "object",
        Some(Value::Seq(ts)) => ts.iter().any(|t| t.as_str() == Some("object")),
        None => n.get("properties").is_some(),
        _ => false,
    }
}

struct Walker<'a> {
    root: &'a Node,
    task: &'a str,
    problems: Vec<Problem>,
    max_depth: usize,
    deepest: Pos,
    properties: usize,
    refs: Vec<String>,
}

impl<'a> Walker<'a> {
    fn walk(&mut self, n: &'a Node, level: usize) {
        if n.as_map().is_none() {
            return;
        }
        if let Some(r) = n.get("$ref") {
            self.follow(r, level);
            return;
        }
        let level = if is_object_schema(n) {
            level + 1
        } else {
            level
        };
        if level > self.max_depth {
            self.max_depth = level;
            self.deepest = n.pos;
        }
        if let Some(t) = n.get("type") {
            let names: Vec<&Node> = match &t.value {
                Value::Seq(items) => items.iter().collect(),
                _ => vec![t],
            };
            for name in names {
                match name.as_str() {
                    Some(s) if TYPES.contains(&s) => {}
                    other => {
                        let hint = match other.and_then(|s| did_you_mean(s, TYPES)) {
                            Some(close) => format!("did you mean `{close}`?"),
                            None => format!("use one of {}", TYPES.join(", ")),
                        };
                        self.problems.push(Problem {
                            pos: name.pos,
                            message: format!(
                                "task `{}`: {} is not a JSON Schema type",
                                self.task,
                                name.to_json()
                            ),
                            hint,
                        });
                    }
                }
            }
        }
        let props = n.get("properties").and_then(Node::as_map);
        if let Some(props) = props {
            self.properties += props.len();
            for (_, sub) in props {
                self.walk(sub, level);
            }
        }
        if let Some(Value::Seq(required)) = n.get("required").map(|r| &r.value) {
            for r in required {
                let Some(name) = r.as_str() else { continue };
                let declared =
                    props.is_some_and(|p| p.iter().any(|(k, _)| k.as_str() == Some(name)));
                if !declared {
                    let known = props
                        .map(|p| p.iter().filter_map(|(k, _)| k.as_str()).collect::<Vec<_>>())
                        .unwrap_or_default();
                    let hint = match did_you_mean(name, known.iter().copied()) {
                        Some(close) => format!("did you mean `{close}`?"),
                        None => "declare it under `properties:` or remove it".into(),
                    };
                    self.problems.push(Problem {
                        pos: r.pos,
                        message: format!(
                            "task `{}`: `required` names `{name}`, which is not a property",
                            self.task
                        ),
                        hint,
                    });
                }
            }
        }
        match n.get("items").map(|i| (i, &i.value)) {
            Some((_, Value::Seq(items))) => items.iter().for_each(|i| self.walk(i, level)),
            Some((i, _)) => self.walk(i, level),
            None => {}
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(Value::Seq(branches)) = n.get(key).map(|b| &b.value) {
                branches.iter().for_each(|b| self.walk(b, level));
            }
        }
    }

    fn follow(&mut self, r: &'a Node, level: usize) {
        let Some(target_ref) = r.as_str() else {
            return;
        };
        if self.refs.iter().any(|x| x == target_ref) {
            self.problems.push(Problem {
                pos: r.pos,
                message: format!("task `{}`: recursive $ref `{target_ref}`", self.task),
                hint: "the API does not accept recursive schemas; write the levels out".into(),
            });
            return;
        }
        let target = target_ref.strip_prefix("#/").map(|path| {
            path.split('/')
                .try_fold(self.root, |node, seg| node.get(seg))
        });
        match target.flatten() {
            Some(t) => {
                self.refs.push(target_ref.to_string());
                self.walk(t, level);
                self.refs.pop();
            }
            None => self.problems.push(Problem {
                pos: r.pos,
                message: format!(
                    "task `{}`: $ref `{target_ref}` does not point inside the output schema",
                    self.task
                ),
                hint: "use `#/$defs/name` with the definition under `$defs:`".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml;

    fn problems(schema: &str) -> Vec<String> {
        check("t", &yaml::parse(schema).unwrap())
            .into_iter()
            .map(|p| format!("{}: {}", p.pos, p.message))
            .collect()
    }

    #[test]
    fn a_nested_schema_within_limits_passes() {
        let p = problems(
            "type: object\nproperties:\n  a: {type: array, items: {type: object, properties: {b: {type: object, properties: {c: {type: string}}}}}}\n  d: {$ref: '#/$defs/x'}\nrequired: [a]\n$defs:\n  x: {type: integer}\n",
        );
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn breaking_the_rules_is_reported_in_place() {
        assert!(
            problems("type: array\nitems: {type: string}\n")[0]
                .contains("1:7: the output schema of task `t` has type \"array\"")
        );
        let deep = problems(
            "type: object\nproperties:\n  a:\n    type: object\n    properties:\n      b:\n        type: object\n        properties:\n          c: {type: object, properties: {d: {type: string}}}\n",
        );
        assert_eq!(deep.len(), 1, "{deep:?}");
        assert!(
            deep[0].starts_with("9:14: ") && deep[0].contains("4 levels deep"),
            "{deep:?}"
        );
        let many: String = (0..101)
            .map(|i| format!("  p{i}: {{type: string}}\n"))
            .collect();
        assert!(
            problems(&format!("type: object\nproperties:\n{many}"))[0].contains("101 properties")
        );
        let typo = problems(
            "type: object\nproperties:\n  a: {type: strin}\n  run_id: {type: string}\nrequired: [b]\n",
        );
        assert_eq!(typo.len(), 3, "{typo:?}");
        assert!(
            typo.iter()
                .any(|p| p.starts_with("3:13:") && p.contains("\"strin\""))
        );
        assert!(
            typo.iter()
                .any(|p| p.starts_with("5:12:") && p.contains("`b`"))
        );
        assert!(
            typo.iter()
                .any(|p| p.starts_with("4:3:") && p.contains("collides"))
        );
    }
}
