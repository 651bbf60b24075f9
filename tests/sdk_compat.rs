//! Parallel's official Python SDK, unmodified, against the real `groupflow serve` binary.
//! The venvs come from `scripts/setup-test-env`; the scripts live in `tests/compat/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const API_KEY: &str = "compat-test-key";

/// `groupflow serve` on a free loopback port, killed when dropped.
struct Served {
    child: Child,
    base_url: String,
}

impl Served {
    fn start(extra: &[&str]) -> Served {
        let port = common::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_groupflow"))
            .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
            .args(["--api-key", API_KEY, "--concurrency", "16"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start groupflow serve");
        common::wait_for_port(port, Duration::from_secs(60));
        Served {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs a script of `tests/compat/` with a venv's Python; returns its stdout.
    fn run_script(&self, venv: &str, script: &str) -> String {
        let python = common::test_env_program(venv, "python");
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/compat")
            .join(script);
        let out = Command::new(python)
            .arg(&path)
            .env("PARALLEL_BASE_URL", &self.base_url)
            .env("PARALLEL_API_KEY", API_KEY)
            .env("PYTHONUNBUFFERED", "1")
            .output()
            .expect("run python");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script} on {venv} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sdk_1_3_7_groups_and_runs() {
    let served = Served::start(&[]);
    let out = served.run_script("sdk-1.3.7", "sdk_1_3_7.py");
    assert!(out.contains("sdk 1.3.7 compatibility: ok"), "{out}");
}

#[test]
fn docs_complete_example_on_sdk_0_2_2() {
    // No latency: the example polls every 10 s, so the group should be done at its first look.
    let served = Served::start(&["--sim-latency-ms", "0"]);
    let out = served.run_script("sdk-0.2.2", "seed_complete_example.py");
    assert!(out.contains("Created taskgroup id tgrp_"), "{out}");
    assert!(out.contains("Added 3 runs to taskgroup"), "{out}");
    assert!(out.contains("All tasks completed!"), "{out}");
    assert!(out.contains("Successfully processed 3 companies"), "{out}");
}
