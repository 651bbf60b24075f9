//! Pause points: named places in a run where a test can freeze the process to kill it
//! there (`kill -9`), deterministically.
//!
//! `GROUPFLOW_PAUSE_AT=NAME[:N]` stops the process (SIGSTOP, every thread at once) the N-th
//! time (default 1st) it passes pause point NAME, after printing
//! `groupflow: paused at NAME:N (pid P)` on stderr. Unset, a pause point costs a check of a
//! value read once.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The environment variable naming where to pause.
pub const PAUSE_ENV: &str = "GROUPFLOW_PAUSE_AT";

struct Target {
    name: String,
    nth: u64,
}

fn target() -> &'static Option<Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET.get_or_init(|| {
        let spec = std::env::var(PAUSE_ENV).ok()?;
        let spec = spec.trim();
        if spec.is_empty() {
            return None;
        }
        let (name, nth) = match spec.rsplit_once(':') {
            Some((name, n)) => (name, n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some(Target {
            name: name.to_string(),
            nth: nth.max(1),
        })
    })
}

/// Passes pause point `name` (see the module docs).
pub fn pause_point(name: &str) {
    let Some(t) = target() else { return };
    if t.name != name {
        return;
    }
    static SEEN: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    let n = {
        let mut seen = SEEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = seen.entry(name.to_string()).or_default();
        *n += 1;
        *n
    };
    if n != t.nth {
        return;
    }
    let pid = std::process::id();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "groupflow: paused at {name}:{n} (pid {pid})");
    let _ = err.flush();
    drop(err);
    // SIGSTOP freezes every thread; the test's SIGKILL then ends the process where it is.
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
}
