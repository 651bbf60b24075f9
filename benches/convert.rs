//! The two conversions every enriched row goes through, without the network:
//! rows → run-input JSON (what add-runs POSTs carry), and result JSON (what `/runs` streams)
//! → typed Arrow columns. Each is measured in rows/s and in MB/s of JSON.
//!
//! `cargo bench --bench convert`

use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use groupflow::api::TaskRunEvent;
use groupflow::results::{OutputSchema, ResultDecoder};
use groupflow::sink::{InputEncoder, TaskDefinition};
use serde_json::{Value, json};

/// Rows per measured batch (DataFusion's default batch size).
const ROWS: usize = 8192;

fn source_batch() -> RecordBatch {
    let mut tags = ListBuilder::new(StringBuilder::new());
    for i in 0..ROWS {
        for t in 0..(i % 4) {
            tags.values().append_value(format!("tag-{t}"));
        }
        tags.append(true);
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from_iter_values(0..ROWS as i64))),
        (
            "name",
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|i| format!("Company number {i} Ltd.")),
            )),
        ),
        (
            "website",
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|i| format!("https://company-{i}.example")),
            )),
        ),
        (
            "employees",
            Arc::new(Int64Array::from_iter(
                (0..ROWS).map(|i| (i % 7 != 0).then_some(i as i64 * 3)),
            )),
        ),
        (
            "founded",
            Arc::new(Date32Array::from_iter_values(
                (0..ROWS).map(|i| (i % 20000) as i32),
            )),
        ),
        ("tags", Arc::new(tags.finish())),
    ];
    RecordBatch::try_from_iter(cols).expect("batch")
}

fn output_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "industry": {"type": "string"},
            "founded_year": {"type": "integer"},
            "revenue_musd": {"type": ["number", "null"]},
            "public": {"type": "boolean"},
            "products": {"type": "array", "items": {"type": "string"}},
            "headquarters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                "required": ["city", "country"]
            }
        },
        "required": ["industry", "founded_year", "revenue_musd", "public", "products", "headquarters"]
    })
}

/// `/runs?include_output=true` events as the client receives them: one JSON text per run.
fn result_events() -> Vec<String> {
    (0..ROWS)
        .map(|i| {
            let basis: Vec<Value> = ["industry", "founded_year", "headquarters"]
                .iter()
                .map(|f| {
                    json!({
                        "field": f,
                        "reasoning": format!("Found on the company's site and in two filings ({i})."),
                        "confidence": "high",
                        "citations": [
                            {"url": format!("https://company-{i}.example/about"), "title": "About us",
                             "excerpts": ["Founded in 1999 in Lyon.", "We make widgets."]},
                            {"url": format!("https://registry.example/{i}"), "title": null, "excerpts": null}
                        ]
                    })
                })
                .collect();
            json!({
                "type": "task_run.state",
                "event_id": format!("{i}"),
                "run": {
                    "run_id": format!("trun_{i:032x}"), "interaction_id": format!("trun_{i:032x}"),
                    "status": "completed", "is_active": false, "processor": "core",
                    "metadata": {"gf_row": format!("{i}:{i:016x}")}, "taskgroup_id": "tgrp_x",
                    "warnings": null, "error": null,
                    "created_at": "2026-01-01T00:00:00.000000Z", "modified_at": "2026-01-01T00:00:01.000000Z"
                },
                "input": null,
                "output": {
                    "type": "json",
                    "content": {
                        "industry": format!("Industrial widgets #{i}"),
                        "founded_year": 1900 + (i % 120),
                        "revenue_musd": if i % 5 == 0 { Value::Null } else { json!(i as f64 * 1.25) },
                        "public": i % 2 == 0,
                        "products": ["Widget", "Gadget", format!("Sprocket {i}")],
                        "headquarters": {"city": "Lyon", "country": "France"}
                    },
                    "basis": basis
                }
            })
            .to_string()
        })
        .collect()
}

fn rows_to_inputs(c: &mut Criterion) {
    let batch = source_batch();
    let task: TaskDefinition = serde_json::from_value(json!({
        "input": {"company_name": "name", "website": "website", "staff": "employees",
                  "founded": "founded", "tags": "tags"},
        "output": output_schema()
    }))
    .expect("task");
    let encoder = InputEncoder::new(&task, &batch.schema()).expect("encoder");
    // What a pipeline does: rows to input JSON with their keys, then the add-runs inputs
    // written as they were encoded.
    let run = || {
        let inputs: Vec<_> = encoder
            .encode_keyed(&batch, 0)
            .expect("encode")
            .into_iter()
            .map(|e| encoder.prepared(e, None))
            .collect();
        serde_json::to_vec(&inputs).expect("json")
    };
    let bytes = run().len() as u64;
    let mut g = c.benchmark_group("rows_to_run_inputs");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("rows", |b| b.iter(|| black_box(run())));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("json_bytes", |b| b.iter(|| black_box(run())));
    g.finish();
}

fn results_to_arrow(c: &mut Criterion) {
    let events = result_events();
    let bytes: u64 = events.iter().map(|e| e.len() as u64).sum();
    let output = OutputSchema::from_task_output(&output_schema(), "output").expect("schema");
    let mut decoder = ResultDecoder::new(output);
    let mut run = || {
        let parsed: Vec<TaskRunEvent> = events
            .iter()
            .map(|e| serde_json::from_str(e).expect("event"))
            .collect();
        let rows: Vec<Option<&TaskRunEvent>> = parsed.iter().map(Some).collect();
        decoder.decode(&rows).expect("decode")
    };
    let mut g = c.benchmark_group("results_to_arrow");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("rows", |b| b.iter(|| black_box(run())));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("json_bytes", |b| b.iter(|| black_box(run())));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = rows_to_inputs, results_to_arrow
}
criterion_main!(benches);
