//! The local Task Group server (`groupflow serve`): axum router, SQLite store, scheduler,
//! processors and fault injection.

mod config;

pub use config::{FaultConfig, ServerConfig, SimConfig};
