//! Reading a pipeline file: parse, substitute `${VAR}`, check the structure against the
//! schema, then the checks that need no data (names, references, output schemas). Every
//! problem is collected; loading fails only after all of them are known.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use url::Url;

use crate::sink::parse_template;

use super::diagnostic::{Diagnostic, did_you_mean};
use super::model::{FileFormat, PipelineSpec};
use super::output_schema;
use super::yaml::{self, Node, Pos};
use super::{env, schema};

/// A pipeline file that parsed and passed every check that needs no data.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The file, as the user named it.
    pub path: PathBuf,
    /// The file's text, for mapping SQL positions back into it.
    pub text: String,
    /// The parsed document, after substitution; it holds the positions.
    pub doc: Node,
    /// The typed content.
    pub spec: PipelineSpec,
}

/// Where a source or output lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local path (already joined to the pipeline's folder when it was relative).
    Local(PathBuf),
    /// An object in S3 (or an S3-compatible store).
    S3(Url),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(u) => write!(f, "{u}"),
        }
    }
}

/// Why a pipeline could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: {source} — check the path")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file has problems; each is one line.
    #[error("{} problem(s) in the pipeline", .0.len())]
    Invalid(Vec<Diagnostic>),
}

impl Pipeline {
    /// Reads and checks the pipeline at `path`, with `${VAR}` read from the environment.
    pub fn load(path: &Path) -> Result<Pipeline, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Pipeline::from_text(path, text, &|name: &str| std::env::var(name).ok())
    }

    /// Checks pipeline text as if read from `path`, reading variables through `lookup`.
    pub fn from_text(
        path: &Path,
        text: String,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, LoadError> {
        let (pipeline, problems) = Pipeline::parse(path, text, lookup)?;
        if problems.is_empty() {
            Ok(pipeline)
        } else {
            Err(LoadError::Invalid(problems))
        }
    }

    /// Like [`Pipeline::load`], but a file whose structure is sound comes back together with
    /// the problems the data-free checks found, so later checks can add theirs.
    pub fn load_with_problems(path: &Path) -> Result<(Pipeline, Vec<Diagnostic>), LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Pipeline::parse(path, text, &|name: &str| std::env::var(name).ok())
    }

    /// Parses and checks; fails when the structure is broken, else returns the pipeline
    /// and the problems of the data-free checks.
    pub fn parse(
        path: &Path,
        text: String,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<(Pipeline, Vec<Diagnostic>), LoadError> {
        let file = path.display().to_string();
        let diag = |pos: Pos, message: String, hint: String| {
            Diagnostic::at(file.clone(), pos, message).hint(hint)
        };
        let mut doc = yaml::parse(&text).map_err(|e| {
            LoadError::Invalid(vec![diag(
                e.pos,
                format!("invalid YAML: {}", e.message),
                "fix the syntax at this place".into(),
            )])
        })?;
        let mut problems: Vec<Diagnostic> = env::substitute(&mut doc, lookup)
            .into_iter()
            .map(|p| diag(p.pos, p.message, p.hint))
            .collect();
        let violations = schema::check(&doc);
        // Unknown keys (the commonest slip) do not stop the other checks: once they are
        // reported, they are taken out and the rest of the file is checked as usual.
        let unknown: Vec<Pos> = violations
            .iter()
            .filter(|v| v.unknown_key)
            .map(|v| v.pos)
            .collect();
        problems.extend(
            violations
                .into_iter()
                .map(|v| diag(v.pos, v.message, v.hint)),
        );
        if problems.len() > unknown.len() {
            return Err(LoadError::Invalid(problems));
        }
        doc.remove_keys_at(&unknown);
        let spec: PipelineSpec = serde_json::from_value(doc.to_json()).map_err(|e| {
            // The schema check passed, so this means the schema and the structs disagree.
            LoadError::Invalid(vec![diag(
                doc.pos,
                format!("the pipeline does not fit groupflow's model: {e}"),
                "report this as a bug in groupflow".into(),
            )])
        })?;
        let pipeline = Pipeline {
            path: path.to_path_buf(),
            text,
            doc,
            spec,
        };
        problems.extend(pipeline.static_checks());
        Ok((pipeline, problems))
    }

    /// The file name used in diagnostics.
    pub fn file(&self) -> String {
        self.path.display().to_string()
    }

    /// A diagnostic at `pos` in this file.
    pub fn diag(
        &self,
        pos: Pos,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::at(self.file(), pos, message).hint(hint)
    }

    /// The node at a path of mapping keys and list indexes (`["steps", "0", "sql"]`).
    pub fn node(&self, path: &[&str]) -> Option<&Node> {
        path.iter()
            .try_fold(&self.doc, |n, seg| match seg.parse::<usize>() {
                Ok(i) if n.as_map().is_none() => n.index(i),
                _ => n.get(seg),
            })
    }

    /// Where the node at `path` starts; the closest existing parent when it is absent.
    pub fn pos(&self, path: &[&str]) -> Pos {
        (0..=path.len())
            .rev()
            .find_map(|n| self.node(&path[..n]))
            .map_or(Pos::default(), |n| n.pos)
    }

    /// Where the key `path.last()` is written (for problems about a name).
    pub fn key_pos(&self, path: &[&str]) -> Pos {
        match path.split_last() {
            Some((last, parent)) => self
                .node(parent)
                .and_then(|p| p.entry(last))
                .map_or_else(|| self.pos(path), |(k, _)| k.pos),
            None => self.doc.pos,
        }
    }

    /// The folder relative paths are resolved against: the pipeline file's folder.
    pub fn base_dir(&self) -> PathBuf {
        // A bare file name has the empty path as parent: paths then stay relative to the
        // working directory, as the user wrote them.
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Where a `path:` value points: `s3://` URLs as they are, local paths joined to
    /// [`Pipeline::base_dir`] when relative.
    pub fn locate(&self, path: &str) -> Result<Location, String> {
        locate(&self.base_dir(), path)
    }

    /// The format of output `i`: its `format:`, else its extension.
    pub fn output_format(&self, i: usize) -> Option<FileFormat> {
        let o = self.spec.outputs.get(i)?;
        o.format.or_else(|| FileFormat::from_path(&o.path))
    }

    fn static_checks(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let spec = &self.spec;

        // Sources: a place we can read, a one-byte delimiter.
        for (name, source) in &spec.sources {
            let at = ["sources", name.as_str(), "path"];
            if let Err(e) = self.locate(&source.path) {
                out.push(self.diag(self.pos(&at), e, "use a local path or s3://bucket/key"));
            }
            if let Some(c) = source.delimiter
                && !c.is_ascii()
            {
                out.push(self.diag(
                    self.pos(&["sources", name, "delimiter"]),
                    format!("delimiter {c:?} of source `{name}` is not an ASCII character"),
                    "use a one-byte delimiter such as `;` or `|`",
                ));
            }
        }

        // Tasks: processors, input mappings and output schemas.
        for (name, task) in &spec.tasks {
            if !is_known_processor(&task.processor) {
                let hint = match did_you_mean(&task.processor, schema::PROCESSORS.iter().copied()) {
                    Some(close) => format!("did you mean `{close}`?"),
                    None => format!(
                        "use one of {} (optionally with -fast)",
                        schema::PROCESSORS.join(", ")
                    ),
                };
                out.push(self.diag(
                    self.pos(&["tasks", name, "processor"]),
                    format!(
                        "task `{name}`: the API has no processor `{}`",
                        task.processor
                    ),
                    hint,
                ));
            }
            if let crate::sink::InputMapping::Template(t) = &task.input
                && let Err(e) = parse_template(t)
            {
                out.push(self.diag(
                    self.pos(&["tasks", name, "input"]),
                    format!("task `{name}`: {e}"),
                    "write `{column}` for a column's value",
                ));
            }
            if let Some(output) = self.node(&["tasks", name, "output"])
                && output.as_map().is_some()
            {
                for p in output_schema::check(name, output) {
                    out.push(self.diag(p.pos, p.message, p.hint));
                }
            }
            if let crate::sink::InputMapping::Columns(keys) = &task.input
                && let Some(required) = self
                    .node(&["tasks", name, "input_schema", "required"])
                    .and_then(|r| match &r.value {
                        super::yaml::Value::Seq(items) => Some(items),
                        _ => None,
                    })
            {
                for key in required {
                    if let Some(k) = key.as_str()
                        && !keys.contains_key(k)
                    {
                        out.push(self.diag(
                            key.pos,
                            format!(
                                "the input schema of task `{name}` requires `{k}`, which the input mapping does not fill"
                            ),
                            format!("add `{k}: <column>` under `input:`"),
                        ));
                    }
                }
            }
            if let Some(schema) = self.node(&["tasks", name, "input_schema"])
                && let Some(t) = schema.get("type")
                && t.as_str() != Some("object")
            {
                out.push(self.diag(
                    t.pos,
                    format!(
                        "the input schema of task `{name}` must have `type: object` at its root"
                    ),
                    "describe the input's keys under `properties:`",
                ));
            }
        }

        // Steps: unique table names, not shadowing sources.
        let mut tables: BTreeMap<&str, String> = spec
            .sources
            .keys()
            .map(|k| (k.as_str(), "a source".to_string()))
            .collect();
        for (i, step) in spec.steps.iter().enumerate() {
            let idx = i.to_string();
            if let Some(previous) = tables.get(step.name.as_str()) {
                out.push(self.diag(
                    self.pos(&["steps", &idx, "name"]),
                    format!("step name `{}` is already {previous}", step.name),
                    "give every source and step its own name",
                ));
            } else {
                tables.insert(&step.name, format!("step #{}", i + 1));
            }
        }

        // Outputs: from a known table, to distinct places, in a known format.
        let mut places = BTreeSet::new();
        for (i, output) in spec.outputs.iter().enumerate() {
            let idx = i.to_string();
            if !tables.contains_key(output.from.as_str()) {
                let hint = match did_you_mean(&output.from, tables.keys().copied()) {
                    Some(close) => format!("did you mean `{close}`?"),
                    None => format!(
                        "name a step or source: {}",
                        tables.keys().copied().collect::<Vec<_>>().join(", ")
                    ),
                };
                out.push(self.diag(
                    self.pos(&["outputs", &idx, "from"]),
                    format!(
                        "output #{} reads `{}`, which is no step or source",
                        i + 1,
                        output.from
                    ),
                    hint,
                ));
            }
            let at = self.pos(&["outputs", &idx, "path"]);
            match self.locate(&output.path) {
                Ok(place) => {
                    if let Location::Local(p) = &place
                        && (output.path.ends_with('/') || p.is_dir())
                    {
                        out.push(self.diag(
                            at,
                            format!("output path {:?} is a directory", output.path),
                            "name a file, e.g. out/result.parquet",
                        ));
                    } else if !places.insert(place.to_string()) {
                        out.push(self.diag(
                            at,
                            format!("output path {:?} is written twice", output.path),
                            "give each output its own path",
                        ));
                    }
                }
                Err(e) => out.push(self.diag(at, e, "use a local path or s3://bucket/key")),
            }
            if self.output_format(i).is_none() {
                out.push(self.diag(
                    at,
                    format!("cannot tell the format of output {:?}", output.path),
                    "end the path in .parquet, .csv or .ndjson, or add `format:`",
                ));
            }
        }
        out.sort();
        out
    }
}

/// A processor the API documents, with or without the `-fast` suffix.
pub fn is_known_processor(name: &str) -> bool {
    schema::PROCESSORS.contains(&name.strip_suffix("-fast").unwrap_or(name))
}

/// Resolves a `path:` value against `base`.
pub fn locate(base: &Path, path: &str) -> Result<Location, String> {
    if let Some((scheme, _)) = path.split_once("://") {
        if scheme != "s3" {
            return Err(format!("`{scheme}://` paths are not supported ({path:?})"));
        }
        let url = Url::parse(path).map_err(|e| format!("bad URL {path:?}: {e}"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{path:?} names no bucket"));
        }
        return Ok(Location::S3(url));
    }
    let p = Path::new(path);
    Ok(Location::Local(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: 1
name: demo
sources:
  companies:
    path: ${DATA:-data}/companies.csv
tasks:
  research:
    processor: lite
    input: {company_name: name}
    output:
      type: object
      properties:
        summary: {type: string}
steps:
  - name: enriched
    sql: SELECT * FROM enrich('research', 'companies')
outputs:
  - {from: enriched, path: 's3://${BUCKET}/out.parquet'}
  - {from: companies, path: out/c.csv}
";

    fn env(name: &str) -> Option<String> {
        (name == "BUCKET").then(|| "bkt".to_string())
    }

    fn load(text: &str) -> Result<Pipeline, Vec<String>> {
        Pipeline::from_text(Path::new("p/demo.yaml"), text.to_string(), &env).map_err(|e| match e {
            LoadError::Invalid(d) => d.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        })
    }

    #[test]
    fn loads_and_resolves_places() {
        let p = load(GOOD).unwrap();
        assert_eq!(
            p.spec.tasks["research"].max_failed_ratio,
            schema::DEFAULT_MAX_FAILED_RATIO
        );
        assert_eq!(
            p.locate(&p.spec.sources["companies"].path).unwrap(),
            Location::Local(PathBuf::from("p/data/companies.csv"))
        );
        assert_eq!(p.spec.outputs[0].path, "s3://bkt/out.parquet");
        assert_eq!(p.output_format(1), Some(FileFormat::Csv));
        assert_eq!(
            p.pos(&["steps", "0", "sql"]),
            Pos {
                line: 16,
                column: 10
            }
        );
        assert_eq!(
            p.key_pos(&["tasks", "research"]),
            Pos { line: 7, column: 3 }
        );
    }

    #[test]
    fn unknown_keys_do_not_hide_the_other_problems() {
        let bad = GOOD
            .replace("processor: lite", "processor: lite\n    procesor: core")
            .replace("from: companies", "from: companys");
        let errs = load(&bad).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("unknown key `procesor`"), "{errs:?}");
        assert!(errs[1].contains("reads `companys`"), "{errs:?}");
    }

    #[test]
    fn reports_reference_problems_together() {
        let bad = GOOD
            .replace("from: companies", "from: companys")
            .replace("out/c.csv", "out/c.xlsx")
            .replace("name: enriched", "name: companies")
            .replace("${BUCKET}", "${NOPE}");
        let errs = load(&bad).unwrap_err();
        assert_eq!(
            errs.len(),
            1,
            "env problems stop before references: {errs:?}"
        );
        assert!(errs[0].starts_with("p/demo.yaml:18:"), "{errs:?}");
        let errs = load(&bad.replace("${NOPE}", "b")).unwrap_err();
        let all = errs.join("\n");
        assert!(
            all.contains("step name `companies` is already a source"),
            "{all}"
        );
        assert!(
            all.contains(
                "reads `companys`, which is no step or source — did you mean `companies`?"
            ),
            "{all}"
        );
        assert!(
            all.contains("cannot tell the format of output \"out/c.xlsx\""),
            "{all}"
        );
        assert!(all.contains("output #1 reads `enriched`"), "{all}");
        assert_eq!(errs.len(), 4, "{all}");
    }
}
