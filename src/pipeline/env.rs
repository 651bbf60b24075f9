//! `${VAR}` and `${VAR:-default}` in pipeline files.
//!
//! Substitution happens inside string values after the YAML is parsed, never in the raw
//! text, so every line and column the parser recorded stays true. `$${` writes a literal
//! `${`.

use super::yaml::{Node, Pos};

/// A `${…}` that could not be replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvProblem {
    /// Where the string value holding it starts.
    pub pos: Pos,
    pub message: String,
    pub hint: String,
}

/// Replaces every `${VAR}` in the string values of `node`, reading variables through
/// `lookup`. Returns every problem found (all of them, not just the first).
pub fn substitute(node: &mut Node, lookup: &impl Fn(&str) -> Option<String>) -> Vec<EnvProblem> {
    let mut problems = Vec::new();
    node.visit_strings_mut(&mut |pos, s| {
        if s.contains("${") {
            match expand(s, lookup) {
                Ok(v) => *s = v,
                Err((message, hint)) => problems.push(EnvProblem { pos, message, hint }),
            }
        }
    });
    problems
}

/// Expands one string; the error is a message and a hint.
pub fn expand(
    s: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            // `$${` is an escaped `${`.
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let body_start = i + 2;
        let Some(len) = rest[body_start..].find('}') else {
            return Err((
                format!("`${{` without a closing `}}` in {s:?}"),
                "close it, or write `$${` for a literal `${`".into(),
            ));
        };
        let body = &rest[body_start..body_start + len];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if !is_name(name) {
            return Err((
                format!("`${{{body}}}` is not a variable reference"),
                "write `${NAME}` or `${NAME:-default}` (letters, digits, `_`)".into(),
            ));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err((
                    format!("environment variable `{name}` is not set"),
                    format!("set it, or give a default: `${{{name}:-…}}`"),
                ));
            }
        }
        rest = &rest[body_start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml;

    fn env(name: &str) -> Option<String> {
        match name {
            "BUCKET" => Some("b1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_defaults_and_escapes() {
        assert_eq!(expand("s3://${BUCKET}/x", &env).unwrap(), "s3://b1/x");
        assert_eq!(expand("${NOPE:-d/e}-${BUCKET}", &env).unwrap(), "d/e-b1");
        assert_eq!(expand("${EMPTY:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(expand("$${BUCKET} $x", &env).unwrap(), "${BUCKET} $x");
        assert!(
            expand("${NOPE}", &env)
                .unwrap_err()
                .0
                .contains("`NOPE` is not set")
        );
        assert!(expand("${BUCKET", &env).is_err());
        assert!(expand("${1X}", &env).is_err());
    }

    #[test]
    fn substitutes_values_not_keys_and_reports_every_problem_in_place() {
        let mut doc = yaml::parse("${K}: ${BUCKET}\nb:\n  - ${A}\n  - ok\nc: ${B}\n").unwrap();
        let problems = substitute(&mut doc, &env);
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].pos, Pos { line: 3, column: 5 });
        assert_eq!(problems[1].pos, Pos { line: 5, column: 4 });
        assert_eq!(doc.get("${K}").unwrap().as_str(), Some("b1"));
    }
}
