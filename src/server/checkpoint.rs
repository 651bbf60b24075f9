//! Checkpoints of the store's write-ahead log, done beside the writer.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its mark: that commit
//! copies the log into the database and syncs both while the writer waits. With latency 0
//! and 100k runs, six of the scheduler's 309 transactions took 100–140 ms instead of about
//! 7 that way, while no run could finish. A [`Checkpointer`] does the same passive
//! checkpoint on a connection and thread of its own, asked for by a WAL hook on the
//! writer's connection. The log then grows past the mark while a checkpoint runs, and
//! starts over once one has caught up: it peaked at 174 MB with 100k runs and 185 MB with
//! 1M. (A second, `RESTART` checkpoint after each passive one kept it under 90 MB, but held
//! the writer up behind the streams' readers: 100k runs took 4.6–4.8 s instead of 3.5.)

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// Checkpoints the database of one writer connection until dropped.
pub(crate) struct Checkpointer {
    due: Arc<Due>,
    thread: Option<JoinHandle<()>>,
}

/// Whether a checkpoint is asked for, and whether the checkpointer is stopping.
#[derive(Default)]
struct Due {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Due {
    /// The state, also after a panic elsewhere: stopping must always get through.
    fn state(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ask(&self) {
        self.state().0 = true;
        self.changed.notify_one();
    }

    fn stop(&self) {
        self.state().1 = true;
        self.changed.notify_one();
    }

    /// Waits for a request; `false` once stopping.
    fn wait(&self) -> bool {
        let mut s = self.state();
        while !s.0 && !s.1 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0 = false;
        !s.1
    }
}

impl Checkpointer {
    /// Checkpoints the database at `path` (in WAL mode) whenever a commit of `writer` leaves
    /// at least `pages` pages in the log. This replaces SQLite's automatic checkpoint on
    /// `writer`, which stays on (at `pages`) if the thread cannot be started. `before` runs
    /// on the thread before each checkpoint.
    pub(crate) fn start(
        writer: &mut Connection,
        path: &Path,
        pages: i32,
        before: impl Fn() + Send + 'static,
    ) -> rusqlite::Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // A checkpoint syncs as the connection that runs it is told to: as the writer does.
        let synchronous: i64 = writer.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        let due = Arc::new(Due::default());
        let asked = due.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                while asked.wait() {
                    before();
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    if let Err(e) = done {
                        tracing::warn!(error = %e, "cannot checkpoint the database");
                    }
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoints stay in commits: no thread for them");
                writer.pragma_update(None, "wal_autocheckpoint", pages)?;
                return Ok(Checkpointer { due, thread: None });
            }
        };
        // Made before the hook is installed: if that fails, dropping it stops the thread.
        let checkpointer = Checkpointer {
            due: due.clone(),
            thread: Some(thread),
        };
        writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, in_log| {
            if in_log >= pages {
                due.ask();
            }
            Ok(())
        }))?;
        Ok(checkpointer)
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.due.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_log_is_copied_into_the_database_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;
             CREATE TABLE t (x TEXT NOT NULL);",
        )
        .unwrap();
        let checkpoints = Checkpointer::start(&mut c, &path, 16, || {}).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // 64 rows of 4 KB in 8 commits: the last ones leave more than 16 pages in the log.
        for _ in 0..8 {
            let tx = c.transaction().unwrap();
            for i in 0..8 {
                tx.execute(
                    "INSERT INTO t VALUES (?1)",
                    [format!("{i}{}", "x".repeat(4096))],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        // SQLite's own checkpoint (at 1000 pages) would not have run yet: only the
        // checkpointer's thread grows the file.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&path).unwrap().len() < before + 16 * 4096 {
            assert!(Instant::now() < deadline, "the log was never checkpointed");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(checkpoints);
        drop(c);
        let c = Connection::open(&path).unwrap();
        let rows: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 64);
    }
}
