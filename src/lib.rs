//! groupflow: tables in, Parallel Task Group runs out.
//!
//! Rows from CSV, Parquet or NDJSON (local or S3) become runs of a Task Group; their results
//! come back as typed Arrow record batches that SQL can join and write out. A local server
//! speaks the same API so everything runs on one machine.

pub mod api;
pub mod cli;
pub mod client;
pub mod interrupt;
pub mod ledger;
pub mod pipeline;
pub mod results;
pub mod server;
pub mod sink;
pub mod source;
pub mod sql;
