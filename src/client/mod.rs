//! HTTP client of the Task Group API: auth, retries with backoff, chunked add-runs with
//! reconciliation, and SSE streams that resume from the last `event_id`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), groupflow::client::ClientError> {
//! use groupflow::api::TaskRunInput;
//! use groupflow::client::{Client, ClientConfig};
//!
//! let client = Client::new(ClientConfig::from_env())?;
//! let group = client.create_group(None).await?;
//! let inputs = vec![TaskRunInput::new(serde_json::json!({"q": "hello"}), "lite")];
//! let run_ids = client.add_runs(&group.taskgroup_id, None, inputs).await?;
//! let status = client.wait(&group.taskgroup_id, |s| println!("{s:?}")).await?;
//! # let _ = (run_ids, status);
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod http;
mod limiter;
mod retry;
mod row_key;
mod sse;
mod streams;
mod submit;

pub use config::{API_KEY_ENV, ApiKey, BASE_URL_ENV, ClientConfig, RetryConfig, SubmitConfig};
pub use error::{ApiError, ClientError};
pub use http::{Client, ClientStats};
pub use row_key::{LEDGER_ROW, ROW_KEY, derive_row_key, row_key_of, row_key_value};
pub use streams::{
    RawRun, RowEvent, RowOutput, RunsQuery, decode_run_row, decode_run_state,
    decode_run_state_without_basis, read_row_event,
};
pub(crate) use submit::AbortOnDrop;
pub use submit::{AddedBatch, PreparedMetadata, PreparedRunInput, RunInputBody};
