//! Endpoint paths, in one place. `prefix` is `/v1` (GA) or `/v1beta` (beta) for groups.

/// The GA prefix; the client speaks it.
pub const V1: &str = "/v1";
/// The beta prefix; the server serves it beside `/v1` for older clients.
pub const V1BETA: &str = "/v1beta";

pub fn groups(prefix: &str) -> String {
    format!("{prefix}/tasks/groups")
}

pub fn group(prefix: &str, group_id: &str) -> String {
    format!("{prefix}/tasks/groups/{group_id}")
}

pub fn group_runs(prefix: &str, group_id: &str) -> String {
    format!("{prefix}/tasks/groups/{group_id}/runs")
}

pub fn group_events(prefix: &str, group_id: &str) -> String {
    format!("{prefix}/tasks/groups/{group_id}/events")
}

pub fn group_run(prefix: &str, group_id: &str, run_id: &str) -> String {
    format!("{prefix}/tasks/groups/{group_id}/runs/{run_id}")
}

pub fn runs() -> String {
    "/v1/tasks/runs".to_string()
}

pub fn run(run_id: &str) -> String {
    format!("/v1/tasks/runs/{run_id}")
}

pub fn run_input(run_id: &str) -> String {
    format!("/v1/tasks/runs/{run_id}/input")
}

pub fn run_result(run_id: &str) -> String {
    format!("/v1/tasks/runs/{run_id}/result")
}

pub fn run_events(prefix: &str, run_id: &str) -> String {
    format!("{prefix}/tasks/runs/{run_id}/events")
}
