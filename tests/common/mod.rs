//! Helpers shared by the integration tests: starting the local server and the external
//! programs installed by `scripts/setup-test-env`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `signal` (as `kill` spells it: `-INT`, `-CONT`, …) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// The folder `scripts/setup-test-env` fills.
pub fn test_env() -> PathBuf {
    std::env::var_os("GROUPFLOW_TEST_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".test-env"))
}

/// A program from the test environment; panics with the fix when it is missing.
pub fn test_env_program(venv: &str, program: &str) -> PathBuf {
    let path = test_env().join(venv).join("bin").join(program);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-test-env (or scripts/test) first",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, within: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < within, "nothing listened on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A moto S3 server on a loopback port, stopped when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let program = test_env_program("moto", "moto_server");
        let port = free_port();
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        wait_for_port(port, Duration::from_secs(30));
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let status = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", self.endpoint)])
            .stdout(Stdio::null())
            .status()
            .expect("run curl");
        assert!(status.success(), "could not create bucket {bucket}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `groupflow serve` as a child process on a free loopback port, killed when dropped.
pub struct Serve {
    child: Child,
    pub url: String,
}

impl Serve {
    /// Starts `groupflow serve --addr 127.0.0.1:PORT EXTRA…` and waits until it listens.
    pub fn start(extra: &[&str]) -> Serve {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_groupflow"))
            .args(["serve", "--addr", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start groupflow serve");
        wait_for_port(port, Duration::from_secs(30));
        Serve {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
