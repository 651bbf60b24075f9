//! Throughput of the local Task Group server over real HTTP on loopback:
//! ingest of 100k runs in add-runs requests of 1,000, then the runs stream with
//! `include_output=true` over the 100k completed runs. Prints figures; run with
//! `cargo bench --bench server` (targets on a 2-core machine: ≥20,000 runs/s ingested,
//! ≥50,000 events/s streamed).

use std::time::{Duration, Instant};

use groupflow::server::{self, ServerConfig};
use serde_json::{Value, json};

const RUNS: usize = 100_000;
const PER_REQUEST: usize = 1_000;
const STREAM_ROUNDS: usize = 3;

fn spec() -> Value {
    json!({
        "input_schema": {"type": "json", "json_schema": {"type": "object",
            "properties": {"company": {"type": "string"}, "website": {"type": "string"}},
            "required": ["company"]}},
        "output_schema": {"type": "json", "json_schema": {"type": "object", "properties": {
            "market_position": {"type": "string"},
            "founded_year": {"type": "integer"},
            "key_insights": {"type": "array", "items": {"type": "string"}},
            "public": {"type": "boolean"}
        }, "required": ["market_position", "founded_year", "key_insights", "public"]}}
    })
}

/// The add-runs bodies, serialized before timing so the figure is the server's.
fn bodies() -> Vec<Vec<u8>> {
    (0..RUNS / PER_REQUEST)
        .map(|b| {
            let inputs: Vec<Value> = (0..PER_REQUEST)
                .map(|i| {
                    let n = b * PER_REQUEST + i;
                    json!({
                        "input": {"company": format!("Company {n}"), "website": format!("https://c{n}.example.com")},
                        "processor": "core",
                        "metadata": {"row": n}
                    })
                })
                .collect();
            serde_json::to_vec(&json!({"default_task_spec": spec(), "inputs": inputs})).unwrap()
        })
        .collect()
}

async fn bench(label: &str, config: ServerConfig) {
    let handle = server::start(config).await.expect("start server");
    let base = handle.base_url();
    let http = reqwest::Client::new();
    let group: Value = http
        .post(format!("{base}/v1/tasks/groups"))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let gid = group["taskgroup_id"].as_str().unwrap().to_string();
    let bodies = bodies();

    let started = Instant::now();
    for body in bodies {
        let r = http
            .post(format!(
                "{base}/v1/tasks/groups/{gid}/runs?refresh_status=false"
            ))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.bytes().await.unwrap();
    }
    let ingest = started.elapsed();

    let started = Instant::now();
    loop {
        let g: Value = http
            .get(format!("{base}/v1/tasks/groups/{gid}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !g["status"]["is_active"].as_bool().unwrap() {
            assert_eq!(g["status"]["task_run_status_counts"]["completed"], RUNS);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = started.elapsed();

    let mut best = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..STREAM_ROUNDS {
        let started = Instant::now();
        let text = http
            .get(format!(
                "{base}/v1/tasks/groups/{gid}/runs?include_output=true"
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let took = started.elapsed();
        let events = text.windows(7).filter(|w| w == b"event: ").count();
        assert_eq!(events, RUNS);
        bytes = text.len();
        best = best.min(took);
    }
    handle.shutdown().await;

    println!("{label}");
    println!(
        "  ingest : {RUNS} runs in {} requests of {PER_REQUEST}: {:.2} s = {:.0} runs/s",
        RUNS / PER_REQUEST,
        ingest.as_secs_f64(),
        RUNS as f64 / ingest.as_secs_f64()
    );
    println!(
        "  execute: all {RUNS} runs completed {:.2} s after the last add",
        drain.as_secs_f64()
    );
    println!(
        "  stream : /runs?include_output=true, {RUNS} events ({:.1} MB), best of {STREAM_ROUNDS}: {:.2} s = {:.0} events/s",
        bytes as f64 / 1e6,
        best.as_secs_f64(),
        RUNS as f64 / best.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag and
    // should stay quick, so only the real invocation does the work.
    if !std::env::args().any(|a| a == "--bench") {
        println!("server bench: run with `cargo bench --bench server`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = ServerConfig::for_tests();
        config.concurrency = 1000;
        bench(
            "state in memory (temporary SQLite, synchronous=OFF)",
            config.clone(),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        config.db = Some(dir.path().join("bench.sqlite"));
        bench("state in a file (SQLite WAL, synchronous=NORMAL)", config).await;
    });
}
