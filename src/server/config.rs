//! Settings of the local server. One plain struct, filled from flags or by tests.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `groupflow serve` can be told.
#[derive(Clone)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks a free port. Loopback unless told otherwise.
    pub addr: SocketAddr,
    /// SQLite file holding the state (the runs' outputs beside it, in `<db>-outputs`); `None`
    /// keeps state in a temporary folder.
    pub db: Option<PathBuf>,
    /// When set, every request must carry this value in `x-api-key`.
    pub api_key: Option<String>,
    /// Most runs executing at once.
    pub concurrency: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The simulated processor's behaviour.
    pub sim: SimConfig,
    /// Faults to inject, for tests of clients.
    pub faults: FaultConfig,
    /// Idle time after which open streams send a `: ping` comment.
    pub keepalive_interval: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("sim", &self.sim)
            .field("faults", &self.faults)
            .field("keepalive_interval", &self.keepalive_interval)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8700)),
            db: None,
            api_key: None,
            concurrency: 64,
            max_body_bytes: 32 * 1024 * 1024,
            sim: SimConfig::default(),
            faults: FaultConfig::default(),
            keepalive_interval: Duration::from_secs(15),
        }
    }
}

impl ServerConfig {
    /// In-memory state on a free loopback port, no latency, no faults: what tests start.
    pub fn for_tests() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerConfig::default()
        }
    }
}

/// The `sim` processor: deterministic outputs from a hash of the input.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Each run takes a duration drawn from this range (deterministic per input).
    pub latency: RangeInclusive<Duration>,
    /// Fraction of runs, in [0, 1], that fail (deterministic per input).
    pub failure_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            latency: Duration::ZERO..=Duration::ZERO,
            failure_rate: 0.0,
        }
    }
}

/// Faults injected on purpose. Each rate is a fraction in [0, 1] of eligible requests.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Requests answered `429` with a `Retry-After` header instead of being served.
    pub rate_429: f64,
    /// Requests answered `500` instead of being served.
    pub rate_500: f64,
    /// Add-runs requests whose runs are stored but whose connection is then dropped
    /// without a response.
    pub drop_add_runs: f64,
    /// SSE streams cut (connection closed) part-way through.
    pub cut_streams: f64,
    /// Seconds sent in `Retry-After` with injected 429s.
    pub retry_after_secs: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            rate_429: 0.0,
            rate_500: 0.0,
            drop_add_runs: 0.0,
            cut_streams: 0.0,
            retry_after_secs: 1,
        }
    }
}
