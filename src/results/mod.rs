//! Run results to typed Arrow record batches; JSON Schema to Arrow schema.

pub mod decode;
pub mod join;
pub mod schema;

pub use decode::{BASIS, ResultDecoder, basis_type, run_fields};
pub use join::{
    JoinError, ReadError, Reading, RunsRead, Until, join_results, reading_ended, run_row_key,
    store_results,
};
pub use schema::{OutputSchema, SchemaError};
