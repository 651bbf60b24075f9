//! `groupflow serve`: its flags and the command itself.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::{FaultConfig, ServerConfig, ServerError, SimConfig};

/// Flags of `groupflow serve`.
#[derive(Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:8700")]
    pub addr: SocketAddr,
    /// SQLite file holding the server's state (created if missing), with the runs' outputs in
    /// PATH-outputs beside it; state is in a temporary folder without it.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Require this key in the `x-api-key` header of every request.
    #[arg(long, env = "GROUPFLOW_SERVER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most runs executing at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Latency of each simulated run in milliseconds: `N` or a range `MIN..MAX`
    /// (each run's point in the range is fixed by its input). With 0 (the default), runs
    /// added to a group end as they are added, and the add-runs answer shows them ended.
    #[arg(long, default_value = "0", value_parser = parse_latency, value_name = "MS|MIN..MAX")]
    pub sim_latency_ms: RangeInclusive<Duration>,
    /// Fraction of simulated runs that fail, chosen deterministically by input.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub sim_failure_rate: f64,
    /// Fraction of requests answered 429 with `Retry-After` (fault injection).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_429_rate: f64,
    /// Fraction of requests answered 500 (fault injection).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_500_rate: f64,
    /// Fraction of add-runs requests whose runs are stored but whose connection is then
    /// dropped without a response (fault injection).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_drop_add_runs_rate: f64,
    /// Fraction of SSE streams cut part-way through (fault injection).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_cut_streams_rate: f64,
    /// Seconds sent in `Retry-After` with injected 429s.
    #[arg(long, default_value_t = 1)]
    pub fault_retry_after_secs: u64,
    /// Idle seconds after which open streams send a `: ping` comment.
    #[arg(long, default_value_t = 15.0)]
    pub keepalive_secs: f64,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key is left out: it must never reach logs.
        f.debug_struct("ServeArgs")
            .field("addr", &self.addr)
            .field("db", &self.db)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number between 0 and 1"))?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("`{s}` is not between 0 and 1"))
    }
}

fn parse_latency(s: &str) -> Result<RangeInclusive<Duration>, String> {
    let ms = |t: &str| -> Result<Duration, String> {
        t.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("`{t}` is not a whole number of milliseconds"))
    };
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (ms(a)?, ms(b.trim_start_matches('='))?),
        None => (ms(s)?, ms(s)?),
    };
    if hi < lo {
        return Err(format!("latency range `{s}` ends before it starts"));
    }
    Ok(lo..=hi)
}

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Result<ServerConfig, ServerError> {
        if !(self.keepalive_secs.is_finite() && self.keepalive_secs > 0.0) {
            return Err(ServerError::Config(format!(
                "--keepalive-secs must be positive, got {}",
                self.keepalive_secs
            )));
        }
        Ok(ServerConfig {
            addr: self.addr,
            db: self.db.clone(),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            concurrency: self.concurrency,
            max_body_bytes: self.max_body_bytes,
            sim: SimConfig {
                latency: self.sim_latency_ms.clone(),
                failure_rate: self.sim_failure_rate,
            },
            faults: FaultConfig {
                rate_429: self.fault_429_rate,
                rate_500: self.fault_500_rate,
                drop_add_runs: self.fault_drop_add_runs_rate,
                cut_streams: self.fault_cut_streams_rate,
                retry_after_secs: self.fault_retry_after_secs,
            },
            keepalive_interval: Duration::from_secs_f64(self.keepalive_secs),
        })
    }
}

/// Runs `groupflow serve` until Ctrl-C or SIGTERM, then stops gracefully.
pub async fn serve(args: ServeArgs) -> Result<(), ServerError> {
    let config = args.config()?;
    let state = config
        .db
        .as_ref()
        .map_or_else(|| "in memory".to_string(), |p| p.display().to_string());
    let auth = if config.api_key.is_some() {
        "x-api-key required"
    } else {
        "no API key required"
    };
    let handle = super::start(config).await?;
    println!(
        "groupflow serve: listening on {} (state: {state}; {auth})",
        handle.base_url()
    );
    wait_for_signal().await;
    eprintln!("groupflow serve: stopping");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_and_rate_flags_parse() {
        assert_eq!(
            parse_latency("1000..3000").unwrap(),
            Duration::from_millis(1000)..=Duration::from_millis(3000)
        );
        assert_eq!(
            parse_latency("5").unwrap(),
            Duration::from_millis(5)..=Duration::from_millis(5)
        );
        assert!(parse_latency("3..1").unwrap_err().contains("ends before"));
        assert!(parse_latency("x").is_err());
        assert_eq!(parse_rate("0.1").unwrap(), 0.1);
        assert!(parse_rate("1.5").is_err());
    }
}
