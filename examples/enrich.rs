//! Enrich a CSV with SQL, against the local Task Group server started in this process.
//!
//! ```text
//! cargo run --example enrich                      # examples/data/companies.csv
//! cargo run --release --example enrich -- FILE    # any CSV/Parquet/NDJSON with `name` and `website`
//! ```
//!
//! With `PARALLEL_BASE_URL` set it talks to that server (e.g. `groupflow serve`) instead.
//!
//! The results are streamed: the first rows are printed as a table, the rest only counted,
//! so the example also serves to measure memory on large inputs (`benches/memory.sh`).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use groupflow::client::{BASE_URL_ENV, Client, ClientConfig};
use groupflow::server::ServerConfig;
use groupflow::sink::TaskDefinition;
use serde_json::json;

/// Rows printed as a table before the rest are only counted.
const SHOWN_ROWS: usize = 10;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/companies.csv").to_string()
    });

    // The local server on a free loopback port, state in memory, the `sim` processor;
    // or the server PARALLEL_BASE_URL names.
    let (server, client) = match std::env::var_os(BASE_URL_ENV) {
        Some(_) => (None, Client::new(ClientConfig::from_env())?),
        None => {
            let server = groupflow::server::start(ServerConfig::for_tests()).await?;
            let client = Client::new(ClientConfig::new(server.base_url()))?;
            (Some(server), client)
        }
    };

    let ctx = SessionContext::new();
    groupflow::source::register_table(&ctx, "companies", &path, &Default::default()).await?;

    let task: TaskDefinition = serde_json::from_value(json!({
        "processor": "core",
        "input": {"company_name": "name", "company_website": "website"},
        "output": {
            "type": "object",
            "properties": {
                "industry": {"type": "string"},
                "founded_year": {"type": "integer"},
                "key_products": {"type": "array", "items": {"type": "string"}},
                "headquarters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"]
                }
            },
            "required": ["industry", "founded_year", "key_products", "headquarters"]
        }
    }))?;
    let tasks = HashMap::from([("research".to_string(), task)]);
    groupflow::sql::register(&ctx, tasks, client, Default::default())?;

    let started = Instant::now();
    let df = ctx
        .sql(
            "SELECT name, industry, founded_year, headquarters['city'] AS city, run_status \
             FROM enrich('research', 'SELECT name, website FROM companies')",
        )
        .await?;
    let mut stream = df.execute_stream().await?;
    let mut shown = Vec::new();
    let mut shown_rows = 0;
    let mut rows = 0usize;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows();
        let status = batch
            .column_by_name("run_status")
            .map(|c| c.as_string::<i32>().clone());
        for s in status.iter().flat_map(|a| a.iter()) {
            *by_status
                .entry(s.unwrap_or("null").to_string())
                .or_default() += 1;
        }
        if shown_rows < SHOWN_ROWS {
            let take = (SHOWN_ROWS - shown_rows).min(batch.num_rows());
            shown.push(batch.slice(0, take));
            shown_rows += take;
        }
    }
    println!("{}", pretty_format_batches(&shown)?);
    println!(
        "{rows} rows in {:.1}s; run_status: {by_status:?}",
        started.elapsed().as_secs_f64()
    );
    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(())
}
