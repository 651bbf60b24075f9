//! The server's JSON and SSE text, written directly from stored rows.
//!
//! Stored JSON (metadata, inputs, outputs, errors) is spliced into frames as text, never
//! re-parsed: the streams of large groups are mostly copying. Key order and explicit nulls
//! follow [`crate::api::TaskRun`] and friends; tests compare these against the serde types.

use std::fmt::Write as _;

/// A run status as stored (an integer column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum StatusCode {
    Queued = 0,
    ActionRequired = 1,
    Running = 2,
    Completed = 3,
    Failed = 4,
    Cancelling = 5,
    Cancelled = 6,
}

impl StatusCode {
    /// Reads a stored code; unknown codes (never written) read as `failed`.
    pub fn from_i64(v: i64) -> StatusCode {
        match v {
            0 => StatusCode::Queued,
            1 => StatusCode::ActionRequired,
            2 => StatusCode::Running,
            3 => StatusCode::Completed,
            5 => StatusCode::Cancelling,
            6 => StatusCode::Cancelled,
            _ => StatusCode::Failed,
        }
    }

    /// Parses a wire status name.
    pub fn parse(s: &str) -> Option<StatusCode> {
        Some(match s {
            "queued" => StatusCode::Queued,
            "action_required" => StatusCode::ActionRequired,
            "running" => StatusCode::Running,
            "completed" => StatusCode::Completed,
            "failed" => StatusCode::Failed,
            "cancelling" => StatusCode::Cancelling,
            "cancelled" => StatusCode::Cancelled,
            _ => return None,
        })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::Queued => "queued",
            StatusCode::ActionRequired => "action_required",
            StatusCode::Running => "running",
            StatusCode::Completed => "completed",
            StatusCode::Failed => "failed",
            StatusCode::Cancelling => "cancelling",
            StatusCode::Cancelled => "cancelled",
        }
    }

    /// True for queued, running and cancelling.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            StatusCode::Queued | StatusCode::Running | StatusCode::Cancelling
        )
    }

    /// True once the run can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StatusCode::Completed | StatusCode::Failed | StatusCode::Cancelled
        )
    }
}

/// A group's run counts (the statuses this server produces) and last change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupCounts {
    pub num_runs: i64,
    pub queued: i64,
    pub running: i64,
    pub completed: i64,
    pub failed: i64,
    pub modified_at: String,
}

impl GroupCounts {
    /// True while any run is queued or running.
    pub fn is_active(&self) -> bool {
        self.queued + self.running > 0
    }

    /// Writes a `TaskGroupStatus` object; only non-zero counts appear.
    pub fn write_json(&self, out: &mut String) {
        let _ = write!(
            out,
            "{{\"num_task_runs\":{},\"task_run_status_counts\":{{",
            self.num_runs
        );
        let mut first = true;
        for (name, n) in [
            ("queued", self.queued),
            ("running", self.running),
            ("completed", self.completed),
            ("failed", self.failed),
        ] {
            if n > 0 {
                if !first {
                    out.push(',');
                }
                first = false;
                let _ = write!(out, "\"{name}\":{n}");
            }
        }
        let active = self.is_active();
        // The reference shows `null` while active and `""` once done.
        let message = if active { "null" } else { "\"\"" };
        let _ = write!(
            out,
            "}},\"is_active\":{active},\"status_message\":{message},\"modified_at\":\"{}\"}}",
            self.modified_at
        );
    }
}

/// What a `TaskRun` object is made of, borrowed from a stored row.
#[derive(Clone, Copy, Debug)]
pub struct RunView<'a> {
    pub tag: &'a str,
    pub seq: i64,
    pub status: StatusCode,
    pub processor: &'a str,
    pub metadata: Option<&'a str>,
    pub group_id: Option<&'a str>,
    pub error: Option<&'a str>,
    pub created_at: &'a str,
    pub modified_at: &'a str,
}

impl RunView<'_> {
    /// Writes the `TaskRun` object.
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"run_id\":\"trun_");
        push_id_suffix(out, self.tag, self.seq);
        out.push_str("\",\"interaction_id\":\"trun_");
        push_id_suffix(out, self.tag, self.seq);
        let _ = write!(
            out,
            "\",\"status\":\"{}\",\"is_active\":{},\"processor\":",
            self.status.as_str(),
            self.status.is_active()
        );
        push_json_str(out, self.processor);
        out.push_str(",\"metadata\":");
        out.push_str(self.metadata.unwrap_or("null"));
        out.push_str(",\"taskgroup_id\":");
        match self.group_id {
            Some(g) => {
                out.push('"');
                out.push_str(g);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"warnings\":null,\"error\":");
        out.push_str(self.error.unwrap_or("null"));
        let _ = write!(
            out,
            ",\"created_at\":\"{}\",\"modified_at\":\"{}\"}}",
            self.created_at, self.modified_at
        );
    }
}

/// Writes one `task_run.state` SSE message. `event_id` is the stream's cursor.
pub fn write_run_event(
    out: &mut String,
    event_id: i64,
    run: &RunView<'_>,
    input: Option<&str>,
    output: Option<&str>,
) {
    let _ = write!(
        out,
        "event: task_run.state\ndata: {{\"type\":\"task_run.state\",\"event_id\":\"{event_id}\",\"run\":"
    );
    run.write_json(out);
    out.push_str(",\"input\":");
    out.push_str(input.unwrap_or("null"));
    out.push_str(",\"output\":");
    out.push_str(output.unwrap_or("null"));
    out.push_str("}\n\n");
}

/// Writes a `task_run.state` SSE message of a single run's stream (no cursor).
pub fn write_single_run_event(out: &mut String, run: &RunView<'_>, output: Option<&str>) {
    out.push_str(
        "event: task_run.state\ndata: {\"type\":\"task_run.state\",\"event_id\":null,\"run\":",
    );
    run.write_json(out);
    out.push_str(",\"input\":null,\"output\":");
    out.push_str(output.unwrap_or("null"));
    out.push_str("}\n\n");
}

/// Writes one `task_group_status` SSE message around a stored status object.
pub fn write_status_event(out: &mut String, event_id: i64, status_json: &str) {
    let _ = write!(
        out,
        "event: task_group_status\ndata: {{\"type\":\"task_group_status\",\"event_id\":\"{event_id}\",\"status\":{status_json}}}\n\n"
    );
}

/// Writes an `error` SSE message.
pub fn write_error_event(out: &mut String, message: &str) {
    let body = serde_json::json!({
        "type": "error",
        "error": {"ref_id": crate::api::new_ref_id(), "message": message, "detail": null}
    });
    let _ = write!(out, "event: error\ndata: {body}\n\n");
}

/// Writes `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

/// Appends `v` as 16 lowercase hex digits, as `{v:016x}` would (ids are written for every
/// run of every stream page and add-runs answer; see [`crate::api::push_hex`]).
fn push_hex16(out: &mut String, v: u64) {
    crate::api::push_hex(out, &v.to_be_bytes());
}

fn push_id_suffix(out: &mut String, tag: &str, seq: i64) {
    out.push_str(tag);
    push_hex16(out, seq as u64);
}

/// `prefix`, `tag` and `seq` in 16 hex digits: a wire id.
fn id(prefix: &str, tag: &str, seq: i64) -> String {
    let mut out = String::with_capacity(prefix.len() + tag.len() + 16);
    out.push_str(prefix);
    push_id_suffix(&mut out, tag, seq);
    out
}

/// A random 16-hex-digit tag: the unguessable half of an id.
pub fn random_tag() -> String {
    let mut out = String::with_capacity(16);
    push_hex16(&mut out, rand::random::<u64>());
    out
}

/// The wire id of run `seq`.
pub fn run_id(tag: &str, seq: i64) -> String {
    id("trun_", tag, seq)
}

/// The wire id of group `gseq`.
pub fn group_id(tag: &str, gseq: i64) -> String {
    id("tgrp_", tag, gseq)
}

/// Splits an id with the given prefix into (sequence, tag); `None` if it is not ours.
pub fn parse_id<'a>(id: &'a str, prefix: &str) -> Option<(i64, &'a str)> {
    let rest = id.strip_prefix(prefix)?;
    if rest.len() != 32 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (tag, seq) = rest.split_at(16);
    let seq = i64::try_from(u64::from_str_radix(seq, 16).ok()?).ok()?;
    Some((seq, tag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{TaskGroupStatus, TaskRun};

    #[test]
    fn run_json_matches_the_serde_type() {
        let view = RunView {
            tag: "00112233445566ff",
            seq: 42,
            status: StatusCode::Failed,
            processor: "co\"re",
            metadata: Some(r#"{"k":1}"#),
            group_id: Some("tgrp_x"),
            error: Some(r#"{"ref_id":"r","message":"m","detail":null}"#),
            created_at: "2026-01-01T00:00:00.000000Z",
            modified_at: "2026-01-01T00:00:01.000000Z",
        };
        let mut s = String::new();
        view.write_json(&mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let run: TaskRun = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(run.run_id, run_id("00112233445566ff", 42));
        assert_eq!(run.processor, "co\"re");
        assert!(!run.is_active);
        let back = serde_json::to_value(&run).unwrap();
        assert_eq!(v, back, "same keys and values as the serde type writes");
    }

    #[test]
    fn status_json_lists_only_nonzero_counts() {
        let c = GroupCounts {
            num_runs: 3,
            queued: 0,
            running: 1,
            completed: 2,
            failed: 0,
            modified_at: "2026-01-01T00:00:00.000000Z".into(),
        };
        let mut text = String::new();
        c.write_json(&mut text);
        let s: TaskGroupStatus = serde_json::from_str(&text).unwrap();
        assert_eq!(s.task_run_status_counts.len(), 2);
        assert!(s.is_active);
        assert_eq!(s.status_message, None);
    }

    #[test]
    fn ids_round_trip_and_reject_foreign_ids() {
        for v in [0, 7, 0x0123_4567_89ab_cdef, u64::MAX, rand::random::<u64>()] {
            let mut out = String::new();
            push_hex16(&mut out, v);
            assert_eq!(out, format!("{v:016x}"));
        }
        assert_eq!(
            group_id("00000000000000ff", 0x1a),
            "tgrp_00000000000000ff000000000000001a"
        );
        let id = run_id(&random_tag(), 7);
        assert_eq!(id.len(), 37);
        let (seq, tag) = parse_id(&id, "trun_").unwrap();
        assert_eq!((seq, tag), (7, &id[5..21]));
        assert!(parse_id("trun_123", "trun_").is_none());
        assert!(parse_id(&id, "tgrp_").is_none());
        assert!(parse_id("trun_zz112233445566ff0000000000000007", "trun_").is_none());
    }
}
