//! Command line: `run`, `validate`, `serve`, `groups status|results`.

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    0
}
