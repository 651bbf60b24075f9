//! The axum application: routes for both path families, auth, body limits, fault injection.

mod error;
mod groups;
mod runs;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use tokio::sync::{Notify, watch};

pub use error::ApiError;

use super::ServerConfig;
use super::store::Store;
use super::validate::{Issues, Loc};
use crate::api::paths::{V1, V1BETA};

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    /// What executes runs; added runs it answers at once are stored as ended.
    pub processor: Arc<dyn super::processor::Processor>,
    pub config: Arc<ServerConfig>,
    /// Bumped after every committed change; streams and `/result` wait on it.
    pub changes: Arc<watch::Sender<u64>>,
    /// Wakes the scheduler when runs are added.
    pub wake: Arc<Notify>,
    /// Becomes `true` when the server stops; long streams end then.
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Runs store work on a blocking thread.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
    }

    /// Tells streams and the scheduler that something changed.
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Draws against an injected-fault rate.
    pub fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && rand::random::<f64>() < rate
    }
}

/// The router with all routes and middleware.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    for p in [V1, V1BETA] {
        router = router
            .route(&format!("{p}/tasks/groups"), post(groups::create))
            .route(
                &format!("{p}/tasks/groups/{{group_id}}"),
                get(groups::retrieve),
            )
            .route(
                &format!("{p}/tasks/groups/{{group_id}}/runs"),
                post(groups::add_runs).get(streams::group_runs),
            )
            .route(
                &format!("{p}/tasks/groups/{{group_id}}/events"),
                get(streams::group_events),
            )
            .route(
                &format!("{p}/tasks/groups/{{group_id}}/runs/{{run_id}}"),
                get(groups::retrieve_run),
            )
            .route(&format!("{p}/tasks/runs"), post(runs::create))
            .route(&format!("{p}/tasks/runs/{{run_id}}"), get(runs::retrieve))
            .route(
                &format!("{p}/tasks/runs/{{run_id}}/input"),
                get(runs::input),
            )
            .route(
                &format!("{p}/tasks/runs/{{run_id}}/result"),
                get(runs::result),
            )
            .route(
                &format!("{p}/tasks/runs/{{run_id}}/events"),
                get(streams::run_events),
            );
    }
    router
        .fallback(|| async { ApiError::NotFound("Not found") })
        .layer(middleware::from_fn_with_state(state.clone(), faults))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Auth and early body-size check, before anything else runs.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(crate::api::API_KEY_HEADER)
            .map(|v| v.as_bytes());
        if !given.is_some_and(|g| constant_time_eq(g, key.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    if content_length(req.headers()).is_some_and(|n| n > state.config.max_body_bytes) {
        return ApiError::TooLarge(state.config.max_body_bytes).into_response();
    }
    next.run(req).await
}

/// Injected 429s and 500s, for testing clients.
async fn faults(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let f = &state.config.faults;
    if state.roll(f.rate_429) {
        return ApiError::TooManyRequests(f.retry_after_secs).into_response();
    }
    if state.roll(f.rate_500) {
        return ApiError::Injected500.into_response();
    }
    next.run(req).await
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Internal(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Parses a JSON body; an empty body reads as `{}`.
pub fn parse_json(bytes: &[u8], issues: &mut Issues) -> Option<serde_json::Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            issues.push(
                vec![Loc::from("body"), Loc::Index(e.column())],
                format!("JSON decode error: {e}"),
                "json_invalid",
            );
            None
        }
    }
}

/// Query parameters: empty values count as absent, unknown names are ignored.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Params {
        Params(
            url::form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean (`true`/`false`/`1`/`0`), recording an issue for anything else.
    pub fn bool(&self, name: &str, default: bool, issues: &mut Issues) -> bool {
        match self.get(name) {
            None => default,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    issues.push(
                        vec![Loc::from("query"), Loc::from(name)],
                        format!("Input should be a valid boolean, unable to interpret `{v}`"),
                        "bool_parsing",
                    );
                    default
                }
            },
        }
    }

    /// A non-negative number of seconds, recording an issue for anything else.
    pub fn seconds(&self, name: &str, issues: &mut Issues) -> Option<Duration> {
        let v = self.get(name)?;
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Some(Duration::from_secs_f64(x.min(1e9))),
            _ => {
                issues.push(
                    vec![Loc::from("query"), Loc::from(name)],
                    format!("Input should be a non-negative number of seconds, got `{v}`"),
                    "float_parsing",
                );
                None
            }
        }
    }
}
