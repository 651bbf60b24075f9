//! The local Task Group server (`groupflow serve`): axum router, SQLite store, scheduler,
//! processors and fault injection.
//!
//! ```text
//!  HTTP (axum) ──► validate ──► store (SQLite, one writer txn per request) ◄── scheduler
//!     ▲                              │ runs / events tables (seq = cursor)       │ claim N
//!     └── SSE pages ◄── readers ◄────┘                        processor (sim) ◄──┘ finish N
//! ```
//!
//! A processor whose runs take no time (the sim with latency 0) is run by add-runs itself:
//! the runs are stored ended, and the scheduler never sees them.

mod args;
mod checkpoint;
mod config;
mod http;
mod outputs;
mod processor;
mod scheduler;
mod store;
mod validate;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use processor::{Processor, Sim};

pub use args::{ServeArgs, serve};
pub use config::{FaultConfig, ServerConfig, SimConfig};
pub use validate::MAX_SCHEMA_PROPERTIES;

/// Why the server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the state database {path}: {source}")]
    Store {
        path: String,
        source: store::StoreError,
    },
    #[error("invalid server setting: {0}")]
    Config(String),
    #[error("the server stopped with an error: {0}")]
    Serve(std::io::Error),
}

impl ServerError {
    /// True when another server holds the state database (see [`start`]).
    pub fn is_in_use(&self) -> bool {
        matches!(
            self,
            ServerError::Store {
                source: store::StoreError::InUse(_),
                ..
            }
        )
    }
}

/// A running server. Dropping it asks the server to stop; [`ServerHandle::shutdown`] also
/// waits until it has.
pub struct ServerHandle {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
    /// Set once the state database is closed (and its lock released), every task that
    /// used it having let it go.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl ServerHandle {
    /// The address the server listens on (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`, the base URL for clients.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, ends open streams, and waits (up to 10 s) for both the
    /// HTTP server and the scheduler to stop, then (up to 10 s more) for the last request's
    /// work to let the state database go: once this returns, another server can open the
    /// same file. Runs in flight stay `running` in the database and are executed again by
    /// the next server on the same file.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in [self.server.take(), self.scheduler.take()]
            .into_iter()
            .flatten()
        {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // Work a request started on a blocking thread (an add-runs batch) is not cancelled
        // with its connection, and can hold the database a moment after the server's task
        // has ended.
        let released = std::time::Instant::now() + Duration::from_secs(10);
        while !self.closed.load(std::sync::atomic::Ordering::Acquire)
            && std::time::Instant::now() < released
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn check(config: &ServerConfig) -> Result<(), ServerError> {
    let rates = [
        ("sim failure rate", config.sim.failure_rate),
        ("429 fault rate", config.faults.rate_429),
        ("500 fault rate", config.faults.rate_500),
        ("dropped add-runs rate", config.faults.drop_add_runs),
        ("cut streams rate", config.faults.cut_streams),
    ];
    for (name, rate) in rates {
        if !(0.0..=1.0).contains(&rate) {
            return Err(ServerError::Config(format!(
                "{name} must be between 0 and 1, got {rate}"
            )));
        }
    }
    if config.concurrency == 0 {
        return Err(ServerError::Config("concurrency must be at least 1".into()));
    }
    if config.keepalive_interval.is_zero() {
        return Err(ServerError::Config(
            "keep-alive interval must be positive".into(),
        ));
    }
    Ok(())
}

/// Opens the state, binds the address and starts serving and scheduling. A state database
/// is used by one server at a time: while another holds it, this fails at once (see
/// [`ServerError::is_in_use`]).
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    check(&config)?;
    let db = config.db.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(db.as_deref()))
        .await
        .map_err(|e| ServerError::Config(format!("opening the database panicked: {e}")))?
        .map_err(|source| ServerError::Store {
            path: config
                .db
                .as_ref()
                .map_or_else(|| "(in memory)".to_string(), |p| p.display().to_string()),
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.addr,
        source,
    })?;
    let store = Arc::new(store);
    let closed = store.closed();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let changes = Arc::new(watch::Sender::new(0u64));
    let wake = Arc::new(Notify::new());
    let sim: Arc<dyn Processor> = Arc::new(Sim::new(config.sim.clone()));
    let scheduler = scheduler::Scheduler {
        store: store.clone(),
        processor: sim.clone(),
        concurrency: config.concurrency,
        wake: wake.clone(),
        changes: changes.clone(),
        shutdown: shutdown_rx.clone(),
    };
    let state = http::AppState {
        store,
        processor: sim,
        config: Arc::new(config),
        changes,
        wake,
        shutdown: shutdown_rx.clone(),
    };
    let app = http::app(state);
    let mut stop = shutdown_rx;
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %ServerError::Serve(e), "server stopped");
        }
    });
    let scheduler = tokio::spawn(scheduler.run());
    tracing::info!(%addr, "task group server listening");
    Ok(ServerHandle {
        addr,
        shutdown: shutdown_tx,
        server: Some(server),
        scheduler: Some(scheduler),
        closed,
    })
}
