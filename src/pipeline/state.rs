//! The state directory: what a pipeline keeps between and during runs.
//!
//! ```text
//! .groupflow/                  beside the pipeline file (or --state-dir / GROUPFLOW_STATE_DIR)
//!   ledger.sqlite              claims, groups and where each result is: resume, dedup, cache
//!   ledger.results             the results themselves, appended (see ledger/log.rs)
//!   ledger-<pipeline>.lock     held while a run of that pipeline is going
//!   server.sqlite              the embedded server's database (runs without an API configured)
//!   server.sqlite-outputs      its runs' outputs, appended (see server/outputs.rs)
//!   work/<run id>/             one run's scratch space, removed when the run ends
//!     steps/<step>.arrow       each step's result, written once and read by later steps
//!     spill/                   rows the sink keeps while their runs are out
//!     staging/                 finished outputs, moved into place or uploaded at commit
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

/// Environment variable that moves the state directory.
pub const STATE_DIR_ENV: &str = "GROUPFLOW_STATE_DIR";
/// Name of the state directory beside the pipeline file.
pub const DEFAULT_STATE_DIR: &str = ".groupflow";

/// The state directory of a pipeline.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// `explicit` when given (flag or environment), else `.groupflow/` beside `pipeline`.
    /// Nothing is created until a run needs it.
    pub fn for_pipeline(pipeline: &Path, explicit: Option<&Path>) -> StateDir {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => pipeline
                .parent()
                .unwrap_or(Path::new(""))
                .join(DEFAULT_STATE_DIR),
        };
        StateDir { root }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The embedded server's SQLite database.
    pub fn server_db(&self) -> PathBuf {
        self.root.join("server.sqlite")
    }

    /// The ledger (see [`crate::ledger`]).
    pub fn ledger_db(&self) -> PathBuf {
        self.root.join("ledger.sqlite")
    }

    /// Creates the directory and a fresh work area for one run. Work areas left by runs
    /// that were killed (their lock is free) are removed first.
    pub fn start_run(&self) -> std::io::Result<WorkDir> {
        let work = self.root.join("work");
        std::fs::create_dir_all(&work)?;
        for entry in std::fs::read_dir(&work)?.flatten() {
            let dir = entry.path();
            let abandoned = match File::open(dir.join(WORK_LOCK)) {
                Ok(f) => f.try_lock().is_ok(),
                // No lock file: a run killed before it made one.
                Err(_) => true,
            };
            if abandoned {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let id = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let root = work.join(&id);
        std::fs::create_dir_all(&root)?;
        let lock = File::create(root.join(WORK_LOCK))?;
        lock.lock()?;
        for sub in ["steps", "spill", "staging"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(WorkDir {
            id,
            root,
            _lock: lock,
        })
    }
}

/// The lock file a live run holds in its work area.
const WORK_LOCK: &str = ".lock";

/// One run's scratch space. Removed when dropped: a run that ends, however it ends, leaves
/// nothing behind in it.
#[derive(Debug)]
pub struct WorkDir {
    id: String,
    root: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// The run's id (a timestamp and a random suffix).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where step `name`'s result is materialized.
    pub fn step_file(&self, name: &str) -> PathBuf {
        self.root.join("steps").join(format!("{name}.arrow"))
    }

    /// Where the sink spills rows.
    pub fn spill_dir(&self) -> PathBuf {
        self.root.join("spill")
    }

    /// Where outputs bound for object storage are staged.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lives_beside_the_pipeline_unless_moved_and_cleans_up_work() {
        let s = StateDir::for_pipeline(Path::new("pipelines/a.yaml"), None);
        assert_eq!(s.root(), Path::new("pipelines/.groupflow"));
        let s = StateDir::for_pipeline(Path::new("a.yaml"), None);
        assert_eq!(s.root(), Path::new(".groupflow"));
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::for_pipeline(Path::new("a.yaml"), Some(tmp.path()));
        let work = s.start_run().unwrap();
        let step = work.step_file("x");
        assert!(step.parent().unwrap().is_dir());
        // A live run's work area survives the start of another; a dead run's does not.
        let dead = tmp.path().join("work/killed-run");
        std::fs::create_dir_all(dead.join("steps")).unwrap();
        let other = s.start_run().unwrap();
        assert!(step.parent().unwrap().is_dir());
        assert!(!dead.exists());
        drop(work);
        assert!(!step.parent().unwrap().exists());
        drop(other);
    }
}
