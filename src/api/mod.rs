//! The Task Group API as data: wire types, endpoint paths, limits, ids and timestamps.
//! Shared by [`crate::client`] and [`crate::server`].

pub mod paths;
pub mod types;

pub use types::*;

/// Most runs one add-runs POST may carry.
pub const MAX_RUNS_PER_REQUEST: usize = 1000;
/// Runs per add-runs POST when nothing else is said.
pub const DEFAULT_RUNS_PER_REQUEST: usize = 500;
/// Task and group POSTs allowed per minute.
pub const MAX_POSTS_PER_MINUTE: u32 = 2000;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 16;
/// Longest metadata string value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
/// Deepest nesting of objects an output schema may have.
pub const MAX_SCHEMA_DEPTH: usize = 3;
/// The `x-api-key` header.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Default production base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.parallel.ai";

/// A new group id: `tgrp_` and 32 hex digits.
pub fn new_group_id() -> String {
    format!("tgrp_{}", uuid::Uuid::new_v4().simple())
}

/// A new run id: `trun_` and 32 hex digits.
pub fn new_run_id() -> String {
    format!("trun_{}", uuid::Uuid::new_v4().simple())
}

/// A new error reference id (a UUID).
pub fn new_ref_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Appends `bytes` as lowercase hex digits, two per byte, by table lookup: the formatter
/// (`{:02x}`, `{:016x}`) writes a character at a time, which showed in the profiles of
/// both the ledger's keys (1.1% of a 100k-row run's client CPU) and the server's ids (1.6%
/// of its CPU).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
}

/// RFC 3339 with microseconds and `Z`, as the API writes timestamps.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The current time as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(chrono::Utc::now())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_and_times_have_the_wire_shape() {
        let g = super::new_group_id();
        assert!(g.starts_with("tgrp_") && g.len() == 37, "{g}");
        let r = super::new_run_id();
        assert!(r.starts_with("trun_") && r[5..].chars().all(|c| c.is_ascii_hexdigit()));
        let t = super::now_rfc3339();
        assert!(t.ends_with('Z') && t.len() == 27, "{t}");
    }
}
