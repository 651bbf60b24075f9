//! A YAML document as a tree of nodes that remember their line and column, so every later
//! check (schema, references, SQL) can point at the exact place in the file.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter, Spanned};

/// A 1-based line and column in the pipeline file; `0:0` when unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One YAML node and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The value of a node. Mapping keys are nodes too, so their positions are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax error: where, and the parser's message.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one YAML document. Booleans are only `true`/`false` (not `yes`/`on`) and numbers
/// with leading zeros stay strings, so values like `0755` or `no` are never reinterpreted.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let e = e.without_snippet();
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or_default();
        let message = serde_saphyr::UserMessageFormatter.format_message(e);
        SyntaxError {
            pos,
            message: message.trim().to_string(),
        }
    })
}

impl Node {
    /// The kind of value, in the words of error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Seq(_) => "list",
            Value::Map(_) => "mapping",
        }
    }

    /// The string value, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries, if this is a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The value of `key`, if this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and value node of `key`, if this is a mapping that has it.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, v)| (k, v))
    }

    /// The `i`-th element, if this is a list that long.
    pub fn index(&self, i: usize) -> Option<&Node> {
        match &self.value {
            Value::Seq(items) => items.get(i),
            _ => None,
        }
    }

    /// The same data as JSON. Mapping keys that are not strings are written as their text.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.key_text(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The text of a mapping key.
    pub fn key_text(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => "null".to_string(),
            Value::Seq(_) | Value::Map(_) => format!("<{}>", self.kind()),
        }
    }

    /// Removes, anywhere in the tree, the mapping entries whose key starts at one of `keys`.
    pub fn remove_keys_at(&mut self, keys: &[Pos]) {
        match &mut self.value {
            Value::Map(entries) => {
                entries.retain(|(k, _)| !keys.contains(&k.pos));
                entries.iter_mut().for_each(|(_, v)| v.remove_keys_at(keys));
            }
            Value::Seq(items) => items.iter_mut().for_each(|n| n.remove_keys_at(keys)),
            _ => {}
        }
    }

    /// Calls `f` on every string scalar (not keys), depth first, in document order.
    pub fn visit_strings_mut(&mut self, f: &mut impl FnMut(Pos, &mut String)) {
        let pos = self.pos;
        match &mut self.value {
            Value::Str(s) => f(pos, s),
            Value::Seq(items) => items.iter_mut().for_each(|n| n.visit_strings_mut(f)),
            Value::Map(entries) => entries.iter_mut().for_each(|(_, v)| v.visit_strings_mut(f)),
            _ => {}
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `Spanned` only records positions when it is deserialized straight from the YAML
        // deserializer, which is why `Value` recurses through `Node` and not through itself.
        let spanned = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            pos: Pos {
                line: spanned.referenced.line(),
                column: spanned.referenced.column(),
            },
            value: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let v = map.next_value::<Node>()?;
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_keep_positions_and_scalars_keep_their_text() {
        let doc = parse("a: 1\nb:\n  - x\n  - 0755\nc: no\nd: |\n  two\n  lines\n").unwrap();
        let (k, v) = doc.entry("a").unwrap();
        assert_eq!(
            (k.pos, v.pos),
            (Pos { line: 1, column: 1 }, Pos { line: 1, column: 4 })
        );
        assert_eq!(v.value, Value::Int(1));
        let b = doc.get("b").unwrap();
        assert_eq!(b.index(1).unwrap().as_str(), Some("0755"));
        assert_eq!(b.index(1).unwrap().pos, Pos { line: 4, column: 5 });
        assert_eq!(doc.get("c").unwrap().as_str(), Some("no"));
        assert_eq!(doc.get("d").unwrap().as_str(), Some("two\nlines\n"));
        assert_eq!(doc.to_json()["b"][0], "x");
    }

    #[test]
    fn syntax_errors_have_a_position_and_one_line() {
        let e = parse("a: [1,\nb: c\n").unwrap_err();
        assert_eq!(e.pos.line, 1);
        assert!(!e.message.contains('\n'), "{}", e.message);
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, column: 1 });
        assert!(e.message.contains("duplicate"), "{}", e.message);
    }
}
