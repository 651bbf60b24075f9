//! The checks that need data: sources are registered (their schemas read), the table
//! functions registered, and every step's SQL planned in order — planning never executes,
//! so nothing is submitted. Problems come back as diagnostics at their place in the file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;

use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, ObjectName, Statement, TableFactor, Value, Visit, Visitor,
};

use crate::client::Client;
use crate::results::{OutputSchema, ResultDecoder};
use crate::sink::InputMapping;
use crate::sql::{self, EnrichOptions, RegisterError};

use super::diagnostic::{Diagnostic, did_you_mean};
use super::load::{Location, Pipeline};
use super::output_schema;
use super::yaml::Pos;

/// A session set up the way pipelines need it: SQL spans collected (for error positions).
pub fn session() -> SessionContext {
    let mut config = SessionConfig::new();
    config.options_mut().sql_parser.collect_spans = true;
    // A file split into byte ranges is read range by range, and DataFusion reads an Arrow
    // IPC range (a materialized step) into memory whole: whole files stream in bounded
    // memory.
    config.options_mut().optimizer.repartition_file_scans = false;
    SessionContext::new_with_config(config)
}

/// What [`prepare`] learned about the pipeline's tables.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Each source's schema, by name.
    pub sources: BTreeMap<String, SchemaRef>,
    /// The tasks the steps call, by step index.
    pub enrich_calls: Vec<EnrichCall>,
    /// The tables each step reads (lower-cased), by step index.
    pub reads: Vec<BTreeSet<String>>,
}

impl Prepared {
    /// Whether the table `name` (a source or step) needs an enrich call to be computed.
    pub fn needs_enrich(&self, pipeline: &Pipeline, name: &str) -> bool {
        let steps = &pipeline.spec.steps;
        match steps.iter().position(|s| s.name == name) {
            Some(i) => self.step_needs_enrich(pipeline, i),
            None => false,
        }
    }

    fn step_needs_enrich(&self, pipeline: &Pipeline, i: usize) -> bool {
        let steps = &pipeline.spec.steps;
        self.enrich_calls.iter().any(|c| c.step == i)
            || self.reads.get(i).is_some_and(|reads| {
                // Only earlier steps can be read, which also keeps this from looping.
                steps[..i]
                    .iter()
                    .enumerate()
                    .any(|(j, s)| reads.contains(&s.name) && self.step_needs_enrich(pipeline, j))
            })
    }
}

/// One `enrich('task', 'source')` in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrichCall {
    pub step: usize,
    pub task: String,
    pub source: String,
}

/// Registers the sources and the table functions on `ctx`, then plans every step in order,
/// each registered as a view for the steps after it. Returns every problem found; when the
/// list is empty, `ctx` holds the sources and the steps as views.
pub async fn prepare(
    pipeline: &Pipeline,
    ctx: &SessionContext,
    client: Client,
    options: EnrichOptions,
) -> (Prepared, Vec<Diagnostic>) {
    let mut out = Vec::new();
    let mut prepared = Prepared::default();

    for (name, source) in &pipeline.spec.sources {
        let location = match pipeline.locate(&source.path) {
            Ok(Location::Local(p)) => p.display().to_string(),
            Ok(Location::S3(u)) => u.to_string(),
            Err(_) => continue, // reported by the loader
        };
        if source.delimiter.is_some_and(|c| !c.is_ascii()) {
            continue; // reported by the loader
        }
        match crate::source::register_table(ctx, name, &location, &source.options()).await {
            Ok(info) => {
                prepared.sources.insert(name.clone(), info.schema);
            }
            Err(e) => out.push(pipeline.diag(
                pipeline.pos(&["sources", name, "path"]),
                format!("cannot read source `{name}`: {e}"),
                "check the path, the format and (for s3://) the AWS_* settings",
            )),
        }
    }
    let failed_sources: BTreeSet<String> = pipeline
        .spec
        .sources
        .keys()
        .filter(|n| !prepared.sources.contains_key(*n))
        .cloned()
        .collect();

    // A task `sql::register` would refuse is reported and left out, so the other tasks and
    // the steps that do not use it are still checked.
    let mut tasks = HashMap::new();
    let mut broken_tasks = BTreeSet::new();
    for (name, task) in &pipeline.spec.tasks {
        let def = task.definition();
        // The loader has reported a schema the API would refuse; planning with it would
        // only add a second, vaguer line.
        let refused = pipeline
            .node(&["tasks", name, "output"])
            .is_some_and(|n| n.as_map().is_some() && !output_schema::check(name, n).is_empty());
        if refused {
            broken_tasks.insert(name.clone());
            continue;
        }
        match task_problem(name, &def) {
            None => {
                tasks.insert(name.clone(), def);
            }
            Some(e) => {
                out.push(register_problem(pipeline, &e));
                broken_tasks.insert(name.clone());
            }
        }
    }
    if let Err(e) = sql::register(ctx, tasks, client, options) {
        out.push(register_problem(pipeline, &e));
        return (prepared, out);
    }

    // Tables that could not be made; steps reading them are skipped, not reported again.
    let mut broken: BTreeSet<String> = failed_sources;
    let mut names: BTreeSet<&str> = pipeline.spec.sources.keys().map(String::as_str).collect();
    for (i, step) in pipeline.spec.steps.iter().enumerate() {
        let idx = i.to_string();
        let sql_pos = pipeline.pos(&["steps", &idx, "sql"]);
        if !names.insert(&step.name) {
            // A name taken twice is reported by the loader; the step cannot be registered.
            broken.insert(step.name.clone());
            continue;
        }
        let found = match scan_sql(ctx, &step.sql) {
            Ok(f) => f,
            Err(e) => {
                out.push(sql_problem(pipeline, &idx, &step.name, &e));
                broken.insert(step.name.clone());
                continue;
            }
        };
        prepared.reads.resize(i + 1, BTreeSet::new());
        prepared.reads[i] = found.relations.clone();
        if found.relations.iter().any(|r| broken.contains(r)) {
            broken.insert(step.name.clone());
            continue;
        }
        let mut call_problems = 0;
        for call in &found.calls {
            let before = out.len();
            check_enrich_call(pipeline, ctx, sql_pos, call, &mut out).await;
            call_problems += out.len() - before;
            prepared.enrich_calls.push(EnrichCall {
                step: i,
                task: call.task.clone(),
                source: call.source.clone(),
            });
        }
        if found.calls.iter().any(|c| broken_tasks.contains(&c.task)) {
            broken.insert(step.name.clone());
            continue;
        }
        match ctx.sql(&step.sql).await {
            Ok(df) => {
                if let Err(e) = ctx.register_table(step.name.as_str(), df.into_view()) {
                    out.push(sql_problem(pipeline, &idx, &step.name, &e));
                    broken.insert(step.name.clone());
                }
            }
            Err(e) => {
                // A problem already reported at the task (a missing input column, a
                // colliding property) also fails planning; say it once, where it is fixed.
                if call_problems == 0 {
                    out.push(sql_problem(pipeline, &idx, &step.name, &e));
                }
                broken.insert(step.name.clone());
            }
        }
    }
    (prepared, out)
}

/// What a step's SQL mentions.
#[derive(Debug, Default)]
struct Found {
    /// Every table name, lower-cased.
    relations: BTreeSet<String>,
    calls: Vec<Call>,
}

#[derive(Debug)]
struct Call {
    task: String,
    source: String,
}

impl Visitor for Found {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.relations.insert(relation.to_string().to_lowercase());
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            args: Some(args),
            ..
        } = factor
            && name.to_string().eq_ignore_ascii_case(sql::ENRICH)
        {
            let text = |i: usize| match args.args.get(i) {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value
                {
                    Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            };
            // Calls with other argument shapes are left to the planner, which explains them.
            if let (Some(task), Some(source)) = (text(0), text(1)) {
                self.calls.push(Call { task, source });
            }
        }
        ControlFlow::Continue(())
    }
}

/// Parses `sql` (and the source queries of its enrich calls) for the tables and calls in it.
fn scan_sql(ctx: &SessionContext, sql: &str) -> Result<Found, DataFusionError> {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let mut found = Found::default();
    let mut pending = vec![sql.to_string()];
    while let Some(text) = pending.pop() {
        let statement = state.sql_to_statement(&text, &dialect)?;
        // `SessionContext::sql` executes DDL and DML as it plans them, so anything but a
        // query is refused before it gets there.
        match &statement {
            DfStatement::Statement(s) if matches!(**s, Statement::Query(_)) => {}
            other => {
                let kind = other.to_string();
                let kind = kind
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ");
                return Err(DataFusionError::Plan(format!(
                    "a step is one query (SELECT, WITH or VALUES), not `{kind} …`"
                )));
            }
        }
        let before = found.calls.len();
        if let DfStatement::Statement(s) = &statement {
            let _ = s.visit(&mut found);
        }
        for call in &found.calls[before..] {
            if is_query(&call.source) {
                pending.push(call.source.clone());
            } else {
                found.relations.insert(call.source.trim().to_lowercase());
            }
        }
    }
    Ok(found)
}

/// Whether an enrich source is a query (rather than a table name).
pub fn is_query(source: &str) -> bool {
    let t = source.trim_start();
    let first = t
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    matches!(first.as_str(), "select" | "with" | "values") || t.starts_with('(')
}

/// The tables `sql` reads (lower-cased), including those of its enrich sources.
pub fn tables_in(ctx: &SessionContext, sql: &str) -> Result<BTreeSet<String>, DataFusionError> {
    scan_sql(ctx, sql).map(|f| f.relations)
}

/// Checks one enrich call against its source's columns: the task exists, its input
/// mapping names existing columns, and no result column takes a source column's name.
async fn check_enrich_call(
    pipeline: &Pipeline,
    ctx: &SessionContext,
    sql_pos: Pos,
    call: &Call,
    out: &mut Vec<Diagnostic>,
) {
    let Some(task) = pipeline.spec.tasks.get(&call.task) else {
        let known: Vec<&str> = pipeline.spec.tasks.keys().map(String::as_str).collect();
        let hint = match did_you_mean(&call.task, known.iter().copied()) {
            Some(close) => format!("did you mean '{close}'?"),
            None if known.is_empty() => "define it under `tasks:`".to_string(),
            None => format!("define it under `tasks:` (defined: {})", known.join(", ")),
        };
        out.push(pipeline.diag(
            sql_pos,
            format!("enrich() names task '{}', which is not defined", call.task),
            hint,
        ));
        return;
    };
    let query = if is_query(&call.source) {
        call.source.clone()
    } else {
        format!("SELECT * FROM {}", call.source)
    };
    let schema = match ctx.sql(&query).await {
        Ok(df) => df.schema().as_arrow().clone(),
        // The planner reports a bad source query when it plans the step.
        Err(_) => return,
    };
    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    // Problems of a source table itself are placed at that source's `path:`.
    let source_pos = if is_query(&call.source) {
        None
    } else {
        let name = call.source.trim();
        pipeline.node(&["sources", name, "path"]).map(|n| n.pos)
    };
    if columns.is_empty() {
        out.push(pipeline.diag(
            source_pos.unwrap_or(sql_pos),
            format!(
                "the source {:?} of task `{}` has no columns",
                call.source, call.task
            ),
            "check that the source's files are not empty",
        ));
        return;
    }
    let list = columns.join(", ");
    match &task.input {
        InputMapping::Columns(m) => {
            for (key, column) in m {
                if !columns.contains(&column.as_str()) {
                    let hint = match did_you_mean(column, columns.iter().copied()) {
                        Some(close) => format!("did you mean `{close}`? (columns: {list})"),
                        None => format!("map it to one of: {list}"),
                    };
                    out.push(pipeline.diag(
                        pipeline.pos(&["tasks", &call.task, "input", key]),
                        format!(
                            "task `{}` maps input `{key}` to column `{column}`, which source {:?} does not have",
                            call.task, call.source
                        ),
                        hint,
                    ));
                }
            }
        }
        InputMapping::Template(t) => {
            for column in crate::sink::parse_template(t)
                .into_iter()
                .flatten()
                .filter_map(|p| match p {
                    crate::sink::TemplatePart::Column(c) => Some(c),
                    crate::sink::TemplatePart::Literal(_) => None,
                })
            {
                if !columns.contains(&column.as_str()) {
                    out.push(pipeline.diag(
                        pipeline.pos(&["tasks", &call.task, "input"]),
                        format!(
                            "the input template of task `{}` uses `{{{column}}}`, a column source {:?} does not have",
                            call.task, call.source
                        ),
                        format!("use one of: {list}"),
                    ));
                }
            }
        }
    }
    let Ok(output) = OutputSchema::from_task_output(&task.output, "output") else {
        return; // reported when the task was registered
    };
    for field in ResultDecoder::new(output).fields() {
        let name = field.name();
        if columns.contains(&name.as_str()) {
            let path = [
                "tasks",
                call.task.as_str(),
                "output",
                "properties",
                name.as_str(),
            ];
            let pos = if pipeline.node(&path).is_some() {
                pipeline.key_pos(&path)
            } else {
                sql_pos
            };
            out.push(pipeline.diag(
                pos,
                format!(
                    "result column `{name}` of task `{}` collides with a column of source {:?}",
                    call.task, call.source
                ),
                "rename the output property, or leave that column out of (or alias it in) the source query",
            ));
        }
    }
}

/// What `sql::register` would say about task `name`, if anything.
fn task_problem(name: &str, def: &crate::sink::TaskDefinition) -> Option<RegisterError> {
    if let Err(e) = OutputSchema::from_task_output(&def.output, &format!("tasks.{name}.output")) {
        return Some(RegisterError::Schema(e));
    }
    def.input
        .columns()
        .err()
        .map(|source| RegisterError::Template {
            task: name.to_string(),
            source,
        })
}

/// A problem `sql::register` found in a task, placed at the part of the task it names.
fn register_problem(pipeline: &Pipeline, e: &RegisterError) -> Diagnostic {
    match e {
        RegisterError::Schema(s) => {
            let path: Vec<&str> = s.path.split('.').collect();
            pipeline.diag(
                pipeline.pos(&path),
                format!("{}: {}", s.path, s.message),
                "change the output schema (see the README's type table)",
            )
        }
        RegisterError::Template { task, source } => pipeline.diag(
            pipeline.pos(&["tasks", task, "input"]),
            format!("task `{task}`: {source}"),
            "write `{column}` for a column's value",
        ),
    }
}

/// A planning error of step `idx`, placed at the SQL's line and column when DataFusion says
/// where in the query the problem is.
fn sql_problem(pipeline: &Pipeline, idx: &str, name: &str, e: &DataFusionError) -> Diagnostic {
    let node_pos = pipeline.pos(&["steps", idx, "sql"]);
    let text = first_line(&e.strip_backtrace());
    // Planner errors carry a span when spans are collected; parser errors only say
    // "at Line: L, Column: C" in their text.
    let at = e
        .diagnostic()
        .and_then(|d| d.span)
        .filter(|s| s.start.line > 0)
        .map(|s| (s.start.line, s.start.column))
        .or_else(|| parser_position(&text));
    let pos = at
        .map(|(line, column)| sql_to_file_pos(&pipeline.text, node_pos, line, column))
        .unwrap_or(node_pos);
    let message = match e.diagnostic() {
        Some(d) => d.message.clone(),
        None => plain_message(&text),
    };
    let hint = e
        .diagnostic()
        .and_then(|d| d.helps.first().map(|h| h.message.clone()))
        .unwrap_or_else(|| "fix the query (tables: sources and earlier steps)".into());
    pipeline.diag(pos, format!("step `{name}`: {message}"), hint)
}

/// `… at Line: 3, Column: 7` in a SQL parser error.
fn parser_position(text: &str) -> Option<(u64, u64)> {
    let rest = &text[text.rfind("at Line: ")? + "at Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

/// A DataFusion error's text without the wrappers that say nothing to a pipeline author.
fn plain_message(text: &str) -> String {
    let mut t = text.trim();
    loop {
        let before = t;
        for prefix in [
            "Error during planning: ",
            "SQL error: ",
            "Schema error: ",
            "Arrow error: ",
        ] {
            t = t.strip_prefix(prefix).unwrap_or(t);
        }
        if t == before {
            break;
        }
    }
    if let Some(inner) = t
        .strip_prefix("ParserError(\"")
        .and_then(|x| x.strip_suffix("\")"))
    {
        let inner = inner.split(" at Line: ").next().unwrap_or(inner);
        return format!("syntax error: {inner}");
    }
    t.to_string()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Maps a line and column inside a step's SQL to the pipeline file. Literal blocks (`|`)
/// keep their lines, and single-line scalars their columns; for other styles (folded
/// blocks, multi-line quoted strings) the position of the value itself is the best we know.
pub fn sql_to_file_pos(text: &str, value: Pos, line: u64, column: u64) -> Pos {
    let Some(value_line) = text.lines().nth(value.line.saturating_sub(1) as usize) else {
        return value;
    };
    let rest: String = value_line
        .chars()
        .skip(value.column.saturating_sub(1) as usize)
        .collect();
    match rest.chars().next() {
        Some('|') => {
            let target = value.line + line;
            let Some(content) = text.lines().nth(target.saturating_sub(1) as usize) else {
                return value;
            };
            // The block's indentation is that of its first non-empty line.
            let indent = text
                .lines()
                .skip(value.line as usize)
                .find(|l| !l.trim().is_empty())
                .map_or(0, |l| l.len() - l.trim_start().len());
            if content.trim().is_empty() && indent == 0 {
                return value;
            }
            Pos {
                line: target,
                column: indent as u64 + column,
            }
        }
        Some('>') => value,
        Some('"' | '\'') if line == 1 => Pos {
            line: value.line,
            column: value.column + column,
        },
        Some(_) if line == 1 => Pos {
            line: value.line,
            column: value.column + column - 1,
        },
        _ => value,
    }
}

/// Everything `groupflow validate` checks: the file, then its steps against the data.
/// Returns every problem, sorted by place; empty when the pipeline is sound.
pub async fn check_file(path: &std::path::Path) -> Result<Vec<Diagnostic>, super::LoadError> {
    let (pipeline, mut problems) = Pipeline::load_with_problems(path)?;
    let client = match offline_client() {
        Ok(c) => c,
        Err(e) => {
            problems.push(Diagnostic::in_file(pipeline.file(), e.to_string()));
            return Ok(problems);
        }
    };
    let ctx = session();
    let (_, more) = prepare(&pipeline, &ctx, client, EnrichOptions::default()).await;
    // The data checks can meet a problem the file checks already explained (an unknown
    // type in an output schema): one line per problem, the more precise one.
    let lines: BTreeSet<u64> = problems
        .iter()
        .filter_map(|d| d.pos.map(|p| p.line))
        .collect();
    for d in more {
        if !d.pos.is_some_and(|p| lines.contains(&p.line)) {
            problems.push(d);
        }
    }
    problems.sort();
    Ok(problems)
}

/// The client `validate` hands to the table functions: planning never calls it.
pub fn offline_client() -> Result<Client, crate::client::ClientError> {
    Client::new(crate::client::ClientConfig::new("http://127.0.0.1:9"))
}

/// Result columns `enrich` adds to every source row, for documentation and tests.
pub fn run_columns() -> Vec<String> {
    crate::results::run_fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_positions_map_into_the_file() {
        let text = "steps:\n  - name: a\n    sql: |\n      SELECT x\n      FROM t\n  - name: b\n    sql: SELECT y FROM u\n  - name: c\n    sql: \"SELECT z\"\n";
        // literal block: line 2 col 6 of the SQL is line 5, column 6 + 6
        assert_eq!(
            sql_to_file_pos(
                text,
                Pos {
                    line: 3,
                    column: 10
                },
                2,
                6
            ),
            Pos {
                line: 5,
                column: 12
            }
        );
        assert_eq!(
            sql_to_file_pos(
                text,
                Pos {
                    line: 7,
                    column: 10
                },
                1,
                8
            ),
            Pos {
                line: 7,
                column: 17
            }
        );
        assert_eq!(
            sql_to_file_pos(
                text,
                Pos {
                    line: 9,
                    column: 10
                },
                1,
                8
            ),
            Pos {
                line: 9,
                column: 18
            }
        );
    }

    #[test]
    fn parser_errors_lose_their_wrappers_and_keep_their_place() {
        let text = r#"SQL error: ParserError("Expected: an SQL statement, found: SELEC at Line: 2, Column: 5")"#;
        assert_eq!(parser_position(text), Some((2, 5)));
        assert_eq!(
            plain_message(text),
            "syntax error: Expected: an SQL statement, found: SELEC"
        );
        assert_eq!(plain_message("Error during planning: x"), "x");
    }

    #[test]
    fn reserved_columns_match_what_enrich_adds() {
        assert_eq!(run_columns(), super::super::output_schema::RESERVED_COLUMNS);
    }
}
