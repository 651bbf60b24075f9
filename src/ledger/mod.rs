//! The ledger: what was submitted, under which group, and what came back — kept in SQLite so
//! that no input is ever paid for twice.
//!
//! ```text
//!  attempts   one per pipeline run; a run that did not finish is resumed by the next one
//!  tasks      task fingerprint (processor + task spec) → id
//!  groups     (attempt, task) → the task group holding that attempt's runs of the task
//!  runs       (task, input key) → attempt, group, run id, status, result   ← dedup + cache
//!  run_keys   (task, input key) → run row, written in sorted runs (see keys.rs)
//!  outputs    (attempt, output) → rows, when committed
//! ```
//!
//! Every row of a source is *claimed* before its run is sent: the first claim of an input
//! key in an attempt submits it; later claims share its run (dedup, and resume after a
//! crash); a finished result from an earlier attempt is reused (the result cache). A claim
//! is written before its POST, so after a crash the attempt's group is read back and
//! [`TaskLedger::reconcile`] keeps exactly the claims the server has. Pipelines sharing a
//! state directory share its ledger: an input pending in another pipeline's unfinished run
//! of the same task is refused rather than paid for twice.

mod keys;
pub(crate) mod log;
mod pause;

pub use pause::{PAUSE_ENV, pause_point};

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::types::{ToSql, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, params};

/// A ledger that cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "ledger {path}: another `groupflow run` of pipeline {pipeline} is using this state directory (lock {lock}); wait for it to end, or give this run its own --state-dir"
    )]
    Busy {
        path: PathBuf,
        pipeline: String,
        lock: PathBuf,
    },
    /// An input of this task is pending in another pipeline's unfinished run: submitting
    /// it again would pay for it twice (see [`TaskLedger::claim`]).
    #[error("ledger {path}: input {key} {}", pending_elsewhere(pipeline, *running))]
    Pending {
        path: PathBuf,
        key: String,
        /// The other pipeline.
        pipeline: String,
        /// True when that pipeline is running now; false when its run was interrupted.
        running: bool,
    },
}

/// Why an input pending in `pipeline` is not submitted again, and what to do.
pub fn pending_elsewhere(pipeline: &str, running: bool) -> String {
    if running {
        format!(
            "belongs to a run of pipeline {pipeline} that has started and not yet ended (the same task, in the same state directory; that run may itself be waiting for this one): run this pipeline again once that one has ended, and it reuses its results"
        )
    } else {
        format!(
            "was claimed by pipeline {pipeline}, whose run was interrupted before the result came back: run {pipeline} again to finish it (this pipeline then reuses its results), or pass --take-over-pending to submit again just the inputs it left pending"
        )
    }
}

/// How earlier results are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Ignore results of earlier (finished) runs: every input is submitted again.
    pub no_cache: bool,
    /// Submit again the inputs whose earlier runs failed.
    pub retry_failed: bool,
    /// Take over, and submit again, the inputs another pipeline's interrupted attempt
    /// left pending (see [`TaskLedger::claim`]).
    pub take_over_pending: bool,
}

/// What a claim decided for one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// New: submit it.
    Submit,
    /// Its input was claimed earlier in this run: the row shares that run.
    Duplicate,
    /// Its input was submitted before this run was interrupted: not sent again.
    Resumed,
    /// A finished result of an earlier run is reused.
    Cached,
}

/// Counts of claims, by decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimCounts {
    pub submit: u64,
    pub duplicate: u64,
    pub resumed: u64,
    pub cached: u64,
}

impl ClaimCounts {
    pub fn add(&mut self, c: Claim) {
        match c {
            Claim::Submit => self.submit += 1,
            Claim::Duplicate => self.duplicate += 1,
            Claim::Resumed => self.resumed += 1,
            Claim::Cached => self.cached += 1,
        }
    }

    /// Rows claimed.
    pub fn rows(&self) -> u64 {
        self.submit + self.duplicate + self.resumed + self.cached
    }

    /// Runs not paid for: rows that did not need a new run.
    pub fn saved(&self) -> u64 {
        self.duplicate + self.resumed + self.cached
    }
}

/// A run's end, as stored.
#[derive(Clone, Debug)]
pub struct StoredResult {
    pub input_key: String,
    /// The ledger row the run's claim found, when the run says (see
    /// [`TaskLedger::claim_rows`]); only a hint, checked against the key.
    pub row: Option<i64>,
    /// True for `completed`.
    pub completed: bool,
    /// The run's event (`run`, `output`) as JSON.
    pub json: String,
    /// Where the output's `basis` is in `json`, when known: the place is then stored with
    /// the result, and readers that do not ask for the basis cut it out (see
    /// [`TaskLedger::results_by_row`]).
    pub basis: Option<Range<usize>>,
}

/// What reconciling a group found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Claims the group has a run for.
    pub found: u64,
    /// Claims whose POST never reached the group: dropped, to be submitted again.
    pub dropped: u64,
}

// Rows are found by their input key, a hash: each claim, update or lookup lands on a random
// page of the key index. Small pages keep what a random update rewrites (into the log, then
// into the database) to 1 KB; a 128 MB log between checkpoints lets one checkpoint write a
// page that many transactions changed once. (At 1M rows the key index has about 25k pages,
// which a 32 MB log nearly all held once each: the client's CPU fell from 36.1 to 34.4 s
// and the run from 40.1 to 38.0 s with 128 MB, medians of three alternated pairs; 100k rows
// unchanged.) (`page_size` only applies to a new ledger.)
const SCHEMA: &str = "
PRAGMA page_size = 1024;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA cache_size = -16384;
PRAGMA wal_autocheckpoint = 131072;
CREATE TABLE IF NOT EXISTS attempts (
  attempt INTEGER PRIMARY KEY,
  pipeline TEXT NOT NULL,
  session TEXT NOT NULL,
  started_at TEXT NOT NULL,
  finished_at TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
  task_id INTEGER PRIMARY KEY,
  fingerprint TEXT NOT NULL UNIQUE,
  name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
  attempt INTEGER NOT NULL,
  task_id INTEGER NOT NULL,
  group_id TEXT NOT NULL,
  created_at TEXT NOT NULL,
  PRIMARY KEY (attempt, task_id)
);
-- `input_key` is a BLOB of 16 bytes for fingerprints, text for any other key (see DbKey).
-- `group_id` and `run_id` are only filled in ledgers written before they went unused: the
-- run id is in the stored result, the group in `groups`, and a row without them is about
-- half as wide, so claiming and linking results rewrite half as many pages.
-- This is the table as formats up to 4 have it: format 5 rebuilds it without its primary
-- key, whose index moves to `run_keys` (see keys.rs).
CREATE TABLE IF NOT EXISTS runs (
  task_id INTEGER NOT NULL,
  input_key NOT NULL,
  attempt INTEGER NOT NULL,
  session TEXT NOT NULL,
  group_id TEXT,
  run_id TEXT,
  status TEXT NOT NULL,
  result_id INTEGER,
  PRIMARY KEY (task_id, input_key)
);
-- A run's result is in the result log (`result_at`, `result_len`: see log.rs) or, in
-- ledgers written before format 2, here (`result_id`). `json` holds a run's event as
-- LZ4-compressed JSON (a BLOB); ledgers written before compression hold plain JSON text,
-- which is read as it is.
CREATE TABLE IF NOT EXISTS results (
  result_id INTEGER PRIMARY KEY,
  json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_keys (
  task_id INTEGER NOT NULL,
  input_key NOT NULL,
  row INTEGER NOT NULL,
  PRIMARY KEY (task_id, input_key)
) WITHOUT ROWID;
-- No query looks runs up by group; the index on it that older ledgers have only cost two
-- index writes per run.
DROP INDEX IF EXISTS runs_by_group;
-- `result_log`: the file name of the result log, once a compaction has replaced the first
-- one (`ledger.results`, beside the database); `unused_results`: present from the moment a
-- result in the log is replaced until a compaction has looked at the log.
CREATE TABLE IF NOT EXISTS settings (
  name TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
  attempt INTEGER NOT NULL,
  output TEXT NOT NULL,
  rows INTEGER NOT NULL,
  committed_at TEXT NOT NULL,
  PRIMARY KEY (attempt, output)
);
";

/// How long a ledger operation waits for another process sharing the ledger.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The ledger's format, kept in `PRAGMA user_version`. Format 1 stores input keys that are
/// fingerprints as their 16 bytes (format 0 stored them as hex text); format 2 appends
/// results to the result log instead of the `results` table (whose rows are still read);
/// format 3 may keep them in another log file, named in `settings` (see
/// [`Ledger::compact`]), which older versions would not look for; format 4 may store a
/// result after its basis's place (see [`Packer`]), which older versions would not read;
/// format 5 keeps the key index in `run_keys`, written in sorted runs (see [`keys`]), which
/// older versions would not keep up. Older ledgers are converted when opened.
const FORMAT: i64 = 5;

/// Converts a format-0 ledger: the keys that are fingerprints become their 16 bytes, so
/// the claims and results recorded before stay found.
const TO_FORMAT_1: &str = "UPDATE runs SET input_key = unhex(input_key)
 WHERE typeof(input_key) = 'text' AND length(input_key) = 32
   AND input_key NOT GLOB '*[^0-9a-f]*'";

/// Format 2: where a run's result starts in the result log, and its length.
const TO_FORMAT_2: &str = "ALTER TABLE runs ADD COLUMN result_at INTEGER;
 ALTER TABLE runs ADD COLUMN result_len INTEGER;";

/// An input key as the ledger binds it. A [`fingerprint`] (32 lowercase hex digits, every
/// key a pipeline makes) is stored as its 16 bytes: half the size, so each page of the key
/// index holds twice the keys and each comparison reads half the bytes (at 1M rows a claim
/// costs 11.3 µs instead of 14.4, `benches/ledger_index.py`). Any other key stays text; in
/// SQLite a BLOB never equals a TEXT, so the two kinds cannot collide.
#[derive(Clone, Copy)]
enum DbKey<'a> {
    Bytes([u8; 16]),
    Text(&'a str),
}

impl<'a> DbKey<'a> {
    fn new(key: &'a str) -> Self {
        match fingerprint_bytes(key) {
            Some(b) => DbKey::Bytes(b),
            None => DbKey::Text(key),
        }
    }
}

impl ToSql for DbKey<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            DbKey::Bytes(b) => ValueRef::Blob(b),
            DbKey::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

/// The 16 bytes of a key written as 32 lowercase hex digits (what [`fingerprint`] makes).
fn fingerprint_bytes(key: &str) -> Option<[u8; 16]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let hex = key.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Run statuses as the ledger stores them.
mod status {
    /// Claimed; its POST may or may not have reached the server.
    pub const QUEUED: &str = "queued";
    /// The server has it: found in the group's runs when an interrupted attempt resumes
    /// (see [`super::TaskLedger::reconcile`]). A run's id is recorded with its result.
    pub const SUBMITTED: &str = "submitted";
    pub const COMPLETED: &str = "completed";
    /// Failed, cancelled, or ended in any other way than completed.
    pub const FAILED: &str = "failed";
}

/// The ledger of one state directory, opened for one attempt of one pipeline.
pub struct Ledger {
    conn: Mutex<Connection>,
    /// The keys of rows not yet in `run_keys` (see [`keys`]); locked with `conn` held.
    keys: Mutex<keys::FreshKeys>,
    /// Where [`Ledger::blocking`] sends its work (see [`start_worker`]).
    worker: std::sync::mpsc::Sender<Job>,
    path: PathBuf,
    /// Results, appended (see [`log`]); used with `conn` locked, replaced by a compaction.
    log: std::sync::RwLock<log::ResultLog>,
    pipeline: String,
    attempt: i64,
    session: String,
    resumed: bool,
    options: LedgerOptions,
    /// Serializes creating a task's group, so one attempt has one group per task.
    group_creation: tokio::sync::Mutex<()>,
    /// Tasks reconciled since this resumed attempt was opened.
    reconciled: Mutex<std::collections::HashSet<i64>>,
    /// Bumped each time results are stored (see [`TaskLedger::stored_changes`]).
    stored: tokio::sync::watch::Sender<u64>,
    _lock: Option<File>,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("attempt", &self.attempt)
            .field("resumed", &self.resumed)
            .field("options", &self.options)
            .finish()
    }
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` for `pipeline`: resumes the pipeline's
    /// unfinished attempt if there is one, else starts a new attempt. Holds a lock beside
    /// the file until dropped, so two runs of one pipeline cannot share an attempt.
    pub fn open(
        path: &Path,
        pipeline: &str,
        options: LedgerOptions,
    ) -> Result<Arc<Ledger>, LedgerError> {
        let lock_path = lock_path(path, pipeline);
        let lock = File::create(&lock_path).map_err(|e| LedgerError::Io {
            path: path.to_path_buf(),
            message: format!("lock {}: {e}", lock_path.display()),
        })?;
        // Another pipeline checking whether this one runs holds the lock for an instant
        // (see `running`): a lock still held after 100 ms is another run of this pipeline.
        let started = std::time::Instant::now();
        let taken = loop {
            match lock.try_lock() {
                Err(std::fs::TryLockError::WouldBlock)
                    if started.elapsed() < std::time::Duration::from_millis(100) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other,
            }
        };
        match taken {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Busy {
                    path: path.to_path_buf(),
                    pipeline: pipeline.to_string(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LedgerError::Io {
                    path: path.to_path_buf(),
                    message: format!("lock {}: {e}", lock_path.display()),
                });
            }
        }
        Self::open_unlocked(path, pipeline, options, Some(lock), None)
    }

    /// A ledger in a temporary file, deleted when dropped: dedup within one session, no
    /// memory across processes.
    pub fn temporary() -> Result<Arc<Ledger>, LedgerError> {
        let dir = tempfile::Builder::new()
            .prefix("groupflow-ledger-")
            .tempdir()
            .map_err(|e| LedgerError::Io {
                path: std::env::temp_dir(),
                message: e.to_string(),
            })?;
        let path = dir.path().join("ledger.sqlite");
        Self::open_unlocked(&path, "session", LedgerOptions::default(), None, Some(dir))
    }

    fn open_unlocked(
        path: &Path,
        pipeline: &str,
        options: LedgerOptions,
        lock: Option<File>,
        temp: Option<tempfile::TempDir>,
    ) -> Result<Arc<Ledger>, LedgerError> {
        let err = |source| LedgerError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // Switching a new database to WAL takes its lock without waiting on the busy
        // timeout: two pipelines opening a new shared ledger at once can see "database is
        // locked" here, so that is tried again for as long as the timeout would wait.
        let started = std::time::Instant::now();
        loop {
            match conn.execute_batch(SCHEMA) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && started.elapsed() < BUSY_TIMEOUT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                done => break done.map_err(err)?,
            }
        }
        let session = uuid::Uuid::new_v4().simple().to_string();
        // Write-locked from the start (reads, then writes): a deferred transaction would
        // fail at once, not wait, when another pipeline sharing the ledger commits between.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let format: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        if format > FORMAT {
            return Err(LedgerError::Io {
                path: path.to_path_buf(),
                message: format!(
                    "written by a newer groupflow (ledger format {format}; this one reads formats up to {FORMAT}): upgrade groupflow, or give this run another --state-dir"
                ),
            });
        }
        if format < 1 {
            tx.execute(TO_FORMAT_1, []).map_err(err)?;
        }
        if format < 2 {
            tx.execute_batch(TO_FORMAT_2).map_err(err)?;
        }
        if format < 5 {
            tx.execute_batch(keys::TO_FORMAT_5).map_err(err)?;
        }
        // The keys an interrupted run left unfolded, so this one starts with none in memory.
        let folded = keys::fold(&tx).map_err(err)?;
        let mut fresh = keys::FreshKeys::default();
        fresh.folded_to(folded);
        if format < FORMAT {
            tx.execute_batch(&format!("PRAGMA user_version = {FORMAT}"))
                .map_err(err)?;
        }
        let open: Option<i64> = tx
            .query_row(
                "SELECT attempt FROM attempts WHERE pipeline = ?1 AND finished_at IS NULL
                 ORDER BY attempt DESC LIMIT 1",
                params![pipeline],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let (attempt, resumed) = match open {
            Some(a) => {
                tx.execute(
                    "UPDATE attempts SET session = ?1 WHERE attempt = ?2",
                    params![session, a],
                )
                .map_err(err)?;
                (a, true)
            }
            None => {
                tx.execute(
                    "INSERT INTO attempts (pipeline, session, started_at) VALUES (?1, ?2, ?3)",
                    params![pipeline, session, crate::api::now_rfc3339()],
                )
                .map_err(err)?;
                (tx.last_insert_rowid(), false)
            }
        };
        let log_name: Option<String> = tx
            .query_row(
                "SELECT value FROM settings WHERE name = 'result_log'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        tx.commit().map_err(err)?;
        let log_path = match log_name {
            Some(name) => path.with_file_name(name),
            None => log::path_for(path),
        };
        let log = log::ResultLog::open(log_path.clone(), temp.is_none()).map_err(|e| {
            LedgerError::Io {
                path: log_path,
                message: e.to_string(),
            }
        })?;
        let worker = start_worker().map_err(|e| LedgerError::Io {
            path: path.to_path_buf(),
            message: format!("start the ledger's thread: {e}"),
        })?;
        Ok(Arc::new(Ledger {
            conn: Mutex::new(conn),
            keys: Mutex::new(fresh),
            worker,
            path: path.to_path_buf(),
            log: std::sync::RwLock::new(log),
            pipeline: pipeline.to_string(),
            attempt,
            session,
            resumed,
            options,
            group_creation: tokio::sync::Mutex::new(()),
            reconciled: Mutex::default(),
            stored: tokio::sync::watch::Sender::new(0),
            _lock: lock,
            _temp: temp,
        }))
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this attempt continues one that was interrupted.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The ledger's view of task `name` with `fingerprint` (see [`task_fingerprint`]).
    pub async fn task(
        self: &Arc<Self>,
        name: &str,
        fingerprint: &str,
    ) -> Result<TaskLedger, LedgerError> {
        let (n, fp) = (name.to_string(), fingerprint.to_string());
        let task_id = self
            .blocking(move |c| -> rusqlite::Result<_> {
                c.execute(
                    "INSERT INTO tasks (fingerprint, name) VALUES (?1, ?2)
                     ON CONFLICT (fingerprint) DO NOTHING",
                    params![fp, n],
                )?;
                c.query_row(
                    "SELECT task_id FROM tasks WHERE fingerprint = ?1",
                    params![fp],
                    |r| r.get(0),
                )
            })
            .await?;
        Ok(TaskLedger {
            ledger: self.clone(),
            task_id,
        })
    }

    /// Records that `output` was committed with `rows` rows in this attempt.
    pub async fn record_output(
        self: &Arc<Self>,
        output: &str,
        rows: u64,
    ) -> Result<(), LedgerError> {
        let (output, attempt) = (output.to_string(), self.attempt);
        self.blocking(move |c| {
            c.execute(
                "INSERT INTO outputs (attempt, output, rows, committed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (attempt, output) DO UPDATE SET rows = ?3, committed_at = ?4",
                params![attempt, output, rows as i64, crate::api::now_rfc3339()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Outputs committed in this attempt (before an interruption, when resumed).
    pub async fn committed_outputs(self: &Arc<Self>) -> Result<Vec<String>, LedgerError> {
        let attempt = self.attempt;
        self.blocking(move |c| {
            let mut s =
                c.prepare("SELECT output FROM outputs WHERE attempt = ?1 ORDER BY output")?;
            s.query_map(params![attempt], |r| r.get(0))?.collect()
        })
        .await
    }

    /// Copies the write-ahead log into the database and empties it: done by the ledger's
    /// last close otherwise. A run's log holds every page its claims and results changed
    /// (≈ 43 MB at 100k rows), and copying it takes ≈ 0.1 s, which a pipeline spends beside
    /// writing its outputs rather than after them (see `pipeline::runner`).
    pub async fn checkpoint(self: &Arc<Self>) -> Result<(), LedgerError> {
        self.blocking(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())))
            .await
    }

    /// Ends the attempt: its results become the cache of later runs, which start anew.
    pub async fn finish(self: &Arc<Self>) -> Result<(), LedgerError> {
        let attempt = self.attempt;
        self.blocking(move |c| {
            c.execute(
                "UPDATE attempts SET finished_at = ?1 WHERE attempt = ?2",
                params![crate::api::now_rfc3339(), attempt],
            )
            .map(|_| ())
        })
        .await
    }

    /// The result log.
    fn log(&self) -> std::sync::RwLockReadGuard<'_, log::ResultLog> {
        self.log.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites the result log without the results no run points to any more — results
    /// replaced by a run with `--no-cache` or `--retry-failed`, appends a crash left behind
    /// — once some were replaced since the last look (the transaction that replaces one
    /// notes it in `settings`) and they take at least half as many bytes as the ones still
    /// used (a third of the file), and at least [`COMPACT_MIN_BYTES`].
    /// Returns the log's size before and after, or `None` when it was left as it is.
    ///
    /// Only done when no other pipeline has the ledger open (its open log file would be the
    /// old one), else left, still noted, to the next run that ends. Done holding the
    /// ledger's write lock throughout: a pipeline that starts meanwhile waits (up to the
    /// busy timeout, 30 s), then opens the new log. The copy is made durable before the
    /// transaction that points the runs and `settings.result_log` at it commits, and that
    /// commit before the old log is deleted; a crash before the commit leaves the old log
    /// in use and the copy, a crash after it the old log: either is deleted at the end of
    /// the next run that has the ledger to itself (`remove_stray_logs`).
    pub async fn compact(self: &Arc<Self>) -> Result<Option<(u64, u64)>, LedgerError> {
        let me = self.clone();
        self.blocking(move |c| -> Result<_, Fail> {
            // Without a note of results replaced (made by the transaction that replaced
            // them), the unused part is at most what a crash left (one batch at a time):
            // not worth a scan of every run.
            let noted: i64 = c.query_row(
                "SELECT count(*) FROM settings WHERE name = 'unused_results'",
                [],
                |r| r.get(0),
            )?;
            if noted == 0 {
                // What a crash left (a copy, or the old log after the commit) goes now,
                // not at the next compaction, which may be many runs away.
                if !me.shared()
                    && let Err(Fail::File(path, e)) = remove_stray_logs(&me)
                {
                    let path = path.display();
                    tracing::warn!(%path, error = %e, "a result log left by an earlier run stays");
                }
                return Ok(None);
            }
            // The commit that points the ledger at the copy must be on disk before the old
            // log is deleted: in WAL mode with `synchronous = NORMAL` a commit is synced
            // only at the next checkpoint, so a power loss could undo it and leave the
            // ledger pointing into a deleted file.
            c.execute_batch("PRAGMA synchronous = FULL")?;
            let compacted = compact_in(c, &me);
            c.execute_batch("PRAGMA synchronous = NORMAL")?;
            let compacted = match compacted {
                Err(e) => {
                    // A damaged record would fail every later try as well: the note goes,
                    // and the next run that replaces results tries again.
                    c.execute("DELETE FROM settings WHERE name = 'unused_results'", [])?;
                    return Err(e);
                }
                Ok(compacted) => compacted,
            };
            let Some((new_log, before, after)) = compacted else {
                return Ok(None);
            };
            let mut log = me.log.write().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::replace(&mut *log, new_log);
            drop(log);
            // Left behind if this fails: the next compaction deletes it.
            if let Err(e) = std::fs::remove_file(old.path()) {
                let path = old.path().display();
                tracing::warn!(%path, error = %e, "the old result log stays");
            }
            Ok(Some((before, after)))
        })
        .await
    }

    /// The folder the ledger is in (the state directory).
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// True when another pipeline has this ledger open (holds its lock beside it), or may
    /// be about to: a lock that cannot be taken for an instant counts as held.
    fn shared(&self) -> bool {
        let mine = lock_path(&self.path, &self.pipeline);
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return true;
        };
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with("ledger-") && name.ends_with(".lock"))
                || entry.path().file_name() == mine.file_name()
            {
                return false;
            }
            match File::open(entry.path()) {
                Ok(lock) => matches!(lock.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
                Err(_) => true,
            }
        })
    }

    /// Runs `f` on the connection, on the ledger's thread.
    async fn blocking<T: Send + 'static, E: Into<Fail>>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let me = self.clone();
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let mut conn = me.conn.lock().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut conn).map_err(|e| match e.into() {
                Fail::Sql(source) => LedgerError::Sqlite {
                    path: me.path.clone(),
                    source,
                },
                Fail::Log(e) => LedgerError::Io {
                    path: me.log().path().to_path_buf(),
                    message: e.to_string(),
                },
                Fail::File(path, e) => LedgerError::Io {
                    path,
                    message: e.to_string(),
                },
                Fail::Pending {
                    key,
                    pipeline,
                    running,
                } => LedgerError::Pending {
                    path: me.path.clone(),
                    key,
                    pipeline,
                    running,
                },
            });
            let _ = done.send(out);
        });
        let stopped = |what: &str| LedgerError::Io {
            path: self.path.clone(),
            message: format!("ledger thread: {what}"),
        };
        self.worker
            .send(job)
            .map_err(|_| stopped("it has stopped"))?;
        result.await.map_err(|_| stopped("the work panicked"))?
    }
}

/// Work for the ledger's thread.
type Job = Box<dyn FnOnce() + Send>;

/// Starts the thread that does all of a ledger's work with its connection, one job after
/// another, until the ledger is dropped. One thread rather than tokio's pool of blocking
/// threads: glibc's allocator gives each thread that allocates a heap of its own, and
/// what a job frees on one thread no job on another reuses. With the ledger's work spread
/// over the pool, a run of 1M rows peaked at 156 MiB of heap, against 99 MiB with one heap
/// for the whole process (`MALLOC_ARENA_MAX=1`).
fn start_worker() -> std::io::Result<std::sync::mpsc::Sender<Job>> {
    let (send, jobs) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("groupflow-ledger".into())
        .spawn(move || {
            for job in jobs {
                // A job that panics drops its reply: its caller gets the error.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
    Ok(send)
}

/// The lock a run of `pipeline` holds beside the ledger at `path` while it runs.
fn lock_path(path: &Path, pipeline: &str) -> PathBuf {
    path.with_file_name(format!(
        "ledger-{}.lock",
        &fingerprint(pipeline.as_bytes())[..16]
    ))
}

/// True while a run of `pipeline` holds its lock beside the ledger at `path`.
fn running(path: &Path, pipeline: &str) -> bool {
    let Ok(lock) = File::open(lock_path(path, pipeline)) else {
        return false;
    };
    // Taken here means nobody holds it; it is let go again at once. Another process asking
    // the same question holds it for an instant, a run for its whole life: held three times
    // over 20 ms is a run.
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match lock.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) => {}
            _ => return false,
        }
    }
    true
}

/// The pipeline of attempt `a` and whether it is running now (see [`running`]), or `None`
/// when that attempt has finished.
fn unfinished_attempt(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    a: i64,
) -> rusqlite::Result<Option<(String, bool)>> {
    let pipeline: Option<String> = tx
        .query_row(
            "SELECT pipeline FROM attempts WHERE attempt = ?1 AND finished_at IS NULL",
            params![a],
            |r| r.get(0),
        )
        .optional()?;
    Ok(pipeline.map(|p| {
        let live = running(path, &p);
        (p, live)
    }))
}

/// What went wrong inside [`Ledger::blocking`]: the database, the result log, or a claim
/// of an input pending elsewhere.
enum Fail {
    Sql(rusqlite::Error),
    /// About the result log in use.
    Log(std::io::Error),
    /// About another file (a compaction's new log, a log left over).
    File(PathBuf, std::io::Error),
    Pending {
        key: String,
        pipeline: String,
        running: bool,
    },
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Log(e)
    }
}

/// One task's part of the ledger.
#[derive(Clone, Debug)]
pub struct TaskLedger {
    ledger: Arc<Ledger>,
    task_id: i64,
}

impl TaskLedger {
    /// The group of this attempt's runs of the task, if one was created.
    pub async fn group(&self) -> Result<Option<String>, LedgerError> {
        let (attempt, task) = (self.ledger.attempt, self.task_id);
        self.ledger
            .blocking(move |c| -> rusqlite::Result<_> {
                c.query_row(
                    "SELECT group_id FROM groups WHERE attempt = ?1 AND task_id = ?2",
                    params![attempt, task],
                    |r| r.get(0),
                )
                .optional()
            })
            .await
    }

    /// This attempt's group of the task, created by `create` when there is none yet. The
    /// group is recorded before any run is added to it.
    pub async fn group_or_create<F, Fut, E>(&self, create: F) -> Result<String, GroupError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<String, E>>,
    {
        let _one = self.ledger.group_creation.lock().await;
        if let Some(g) = self.group().await? {
            return Ok(g);
        }
        let group_id = create().await.map_err(GroupError::Create)?;
        let (attempt, task, g) = (self.ledger.attempt, self.task_id, group_id.clone());
        self.ledger
            .blocking(move |c| -> rusqlite::Result<_> {
                c.execute(
                    "INSERT INTO groups (attempt, task_id, group_id, created_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![attempt, task, g, crate::api::now_rfc3339()],
                )
                .map(|_| ())
            })
            .await?;
        pause_point("group.recorded");
        Ok(group_id)
    }

    /// True the first time it is asked for a task in a resumed attempt: the claims made
    /// before the interruption must then be [reconciled](Self::reconcile) with the group.
    pub fn should_reconcile(&self) -> bool {
        self.ledger.resumed
            && self
                .ledger
                .reconciled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.task_id)
    }

    /// After an interruption: `found` are the (input key, run id) pairs the group holds.
    /// Claims of this attempt the group has are marked submitted; claims it lacks (their
    /// POST never arrived) are dropped so they are claimed and sent again.
    pub async fn reconcile(&self, found: Vec<String>) -> Result<Reconciled, LedgerError> {
        let (attempt, task) = (self.ledger.attempt, self.task_id);
        let me = self.ledger.clone();
        self.ledger
            .blocking(move |c| -> rusqlite::Result<_> {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut out = Reconciled::default();
                {
                    let mut fresh = me.keys.lock().unwrap_or_else(|p| p.into_inner());
                    fresh.sync(&tx)?;
                    let mut mark = tx.prepare(
                        "UPDATE runs SET status = ?5
                         WHERE rowid = ?1 AND task_id = ?2 AND input_key = ?3 AND attempt = ?4
                           AND status = 'queued'",
                    )?;
                    for key in &found {
                        let k = DbKey::new(key);
                        if let Some(row) = fresh.row_of(&tx, task, &k)? {
                            mark.execute(params![row, task, k, attempt, status::SUBMITTED])?;
                        }
                    }
                }
                out.dropped = tx.execute(
                    "DELETE FROM runs WHERE task_id = ?1 AND attempt = ?2 AND status = 'queued'",
                    params![task, attempt],
                )? as u64;
                out.found = tx.query_row(
                    "SELECT count(*) FROM runs WHERE task_id = ?1 AND attempt = ?2",
                    params![task, attempt],
                    |r| r.get::<_, i64>(0),
                )? as u64;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    /// The group vanished from the server (its database was reset): forget it and every
    /// claim of this attempt without a result, so they are submitted again.
    pub async fn forget_group(&self, group_id: &str) -> Result<(), LedgerError> {
        let (attempt, task, group) = (self.ledger.attempt, self.task_id, group_id.to_string());
        self.ledger
            .blocking(move |c| -> rusqlite::Result<_> {
                let tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM runs WHERE task_id = ?1 AND attempt = ?2
                       AND result_id IS NULL AND result_at IS NULL",
                    params![task, attempt],
                )?;
                tx.execute(
                    "DELETE FROM groups WHERE attempt = ?1 AND task_id = ?2 AND group_id = ?3",
                    params![attempt, task, group],
                )?;
                tx.commit()
            })
            .await
    }

    /// Claims one row per key, in order (see [`Claim`]). New claims are written before
    /// this returns, so they survive a crash that follows.
    ///
    /// Pipelines sharing a state directory share the ledger, so an input may already be
    /// claimed by another pipeline's unfinished run of the same task. Its result is
    /// reused once there is one; before that, taking the claim over would pay for the
    /// input twice (and, while the other pipeline runs, leave its row without a result),
    /// so [`LedgerError::Pending`] is returned instead and nothing of this call is kept.
    /// An interrupted pipeline's pending claims are taken over only with `no_cache` or
    /// `take_over_pending`; a running pipeline's never.
    pub async fn claim(&self, keys: Vec<String>) -> Result<Vec<Claim>, LedgerError> {
        let claims = self.claim_rows(keys).await?;
        Ok(claims.into_iter().map(|(c, _)| c).collect())
    }

    /// [`TaskLedger::claim`], with the ledger row of each claim (its `rowid`), by which
    /// [`TaskLedger::results_by_row`] finds the result without a walk of the key index.
    pub async fn claim_rows(&self, keys: Vec<String>) -> Result<Vec<(Claim, i64)>, LedgerError> {
        let l = &self.ledger;
        let (attempt, task, session, options) =
            (l.attempt, self.task_id, l.session.clone(), l.options);
        let path = l.path.clone();
        let me = self.ledger.clone();
        let claims = self
            .ledger
            .blocking(move |c| -> Result<_, Fail> {
                // Write-locked from the start: the rows other processes added are read
                // first, and none may be added between that and this claim's writes.
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut fresh = me.keys.lock().unwrap_or_else(|p| p.into_inner());
                fresh.sync(&tx)?;
                let folded = if fresh.full() {
                    Some(keys::fold(&tx)?)
                } else {
                    None
                };
                let mut next = keys::next_row(&tx)?;
                let first = next;
                // The rows this claim adds, held in memory as they are added (a key can
                // come twice in one claim), and forgotten if it does not commit.
                let mut added: Vec<(DbKey<'_>, i64)> = Vec::new();
                let done = claim_in(
                    &tx, &mut fresh, &keys, &mut next, &mut added, &path, task, attempt, &session,
                    options,
                )
                .and_then(|claims| {
                    if next != first {
                        keys::set_next_row(&tx, next)?;
                    }
                    tx.commit()?;
                    Ok(claims)
                });
                let claims = match done {
                    Ok(claims) => claims,
                    Err(e) => {
                        fresh.forget(task, &added);
                        return Err(e);
                    }
                };
                fresh.committed(next - 1);
                if let Some(f) = folded {
                    fresh.folded_to(f);
                }
                Ok(claims)
            })
            .await?;
        pause_point("runs.claimed");
        Ok(claims)
    }

    /// This attempt's runs of the task: how many, and how many still without a result.
    pub async fn counts(&self) -> Result<(u64, u64), LedgerError> {
        let (attempt, task) = (self.ledger.attempt, self.task_id);
        self.ledger
            .blocking(move |c| -> rusqlite::Result<_> {
                // A scan in row order: through the key index, which starts with task_id,
                // each row would be a random page (at 1M rows: 2.1 s and 990k cache misses).
                c.query_row(
                    "SELECT count(*), count(*) - count(coalesce(result_at, result_id))
                     FROM runs NOT INDEXED
                     WHERE task_id = ?1 AND attempt = ?2",
                    params![task, attempt],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
            })
            .await
    }

    /// Stores ended runs of this attempt's group. A completed result is never replaced by
    /// a failed one (when an input has two runs, the completed one wins).
    pub async fn store_results(&self, results: Vec<StoredResult>) -> Result<(), LedgerError> {
        let (attempt, task) = (self.ledger.attempt, self.task_id);
        let me = self.ledger.clone();
        // Compressed before the ledger is taken, on a thread of their own: compressing is
        // most of storing, and claims and the join's lookups need the ledger meanwhile. A
        // result then not kept (rare: a run read twice) costs only its compression.
        let (results, blocks, places) = tokio::task::spawn_blocking(move || {
            let mut packer = Packer::default();
            // Sized for LZ4's usual ≈ 2× on events: it seldom has to grow.
            let json_bytes: usize = results.iter().map(|r| r.json.len()).sum();
            let mut blocks = Vec::with_capacity(json_bytes / 2);
            let places: Vec<Range<usize>> = results
                .iter()
                .map(|r| {
                    let start = blocks.len();
                    packer.pack(&r.json, r.basis.clone(), &mut blocks);
                    start..blocks.len()
                })
                .collect();
            (results, blocks, places)
        })
        .await
        .map_err(|e| LedgerError::Io {
            path: self.ledger.path.clone(),
            message: format!("compressing results: {e}"),
        })?;
        self.ledger
            .blocking(move |c| -> Result<(), Fail> {
                // Write-locked from the start: another process sharing the ledger cannot
                // commit between these reads and the writes that depend on them.
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                {
                    // Each run's row is found once, by the ledger row the run names or by
                    // key (see `RunFinder`). The results it keeps go to the result log in one
                    // append, made durable before this transaction links them to their rows
                    // by rowid.
                    let mut fresh = me.keys.lock().unwrap_or_else(|p| p.into_inner());
                    let mut find = RunFinder::new(
                        &tx,
                        &mut fresh,
                        task,
                        "rowid, attempt, status, result_id, result_at",
                    )?;
                    // The results kept, each with its packed bytes' place in `blocks`.
                    let mut keep: Vec<(&StoredResult, i64, Option<i64>, Range<usize>)> =
                        Vec::with_capacity(results.len());
                    // Rows already kept in this batch (an input can have two runs).
                    let mut kept: HashMap<i64, usize> = HashMap::new();
                    type Row = (i64, i64, String, Option<i64>, Option<i64>);
                    let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                        ))
                    };
                    for (r, packed) in results.iter().zip(&places) {
                        let row: Option<Row> = find.find(&r.input_key, r.row, read)?;
                        // Only this attempt's claims, and never over a completed result.
                        let Some((row, a, st, old_id, old_at)) = row else {
                            continue;
                        };
                        let stored = old_id.is_some() || old_at.is_some();
                        if a != attempt || (stored && st == status::COMPLETED) {
                            continue;
                        }
                        if old_at.is_some() {
                            // A failed result gives way (see `Ledger::compact`).
                            note_unused(&tx)?;
                        }
                        let packed = packed.clone();
                        match kept.get(&row) {
                            // The same rule within the batch: a completed result stays.
                            Some(&i) if keep[i].0.completed => {}
                            Some(&i) => keep[i] = (r, row, old_id, packed),
                            None => {
                                kept.insert(row, keep.len());
                                keep.push((r, row, old_id, packed));
                            }
                        }
                    }
                    let owners: Vec<Vec<u8>> =
                        keep.iter().map(|k| owner(task, &k.0.input_key)).collect();
                    let records: Vec<(&[u8], &[u8])> = owners
                        .iter()
                        .zip(&keep)
                        .map(|(o, k)| (o.as_slice(), &blocks[k.3.clone()]))
                        .collect();
                    let at = me.log().append(&records)?;
                    pause_point("results.logged");
                    let mut link = tx.prepare_cached(
                        "UPDATE runs SET status = ?2, result_at = ?3, result_len = ?4,
                           result_id = NULL
                         WHERE rowid = ?1",
                    )?;
                    let mut drop_result =
                        tx.prepare_cached("DELETE FROM results WHERE result_id = ?1")?;
                    for ((r, row, old_id, _), (at, len)) in keep.iter().zip(at) {
                        let st = if r.completed {
                            status::COMPLETED
                        } else {
                            status::FAILED
                        };
                        let (at, len) = (at as i64, len as i64);
                        link.execute(params![row, st, at, len])?;
                        // A result replaced in the log stays there, unreferenced.
                        if let Some(old) = old_id {
                            drop_result.execute(params![old])?;
                        }
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.ledger.stored.send_modify(|n| *n = n.wrapping_add(1));
        pause_point("results.stored");
        Ok(())
    }

    /// Changes each time results (of any task) are stored: whoever waits for a result
    /// looks again after each change.
    pub fn stored_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ledger.stored.subscribe()
    }

    /// Passes pause point `name` (see [`pause_point`]) with the ledger idle: holding the
    /// connection, so no transaction of this process is open while it is stopped, and
    /// other pipelines sharing the ledger are not held up by it.
    pub async fn pause_idle(&self, name: &'static str) -> Result<(), LedgerError> {
        self.ledger
            .blocking(move |_| -> rusqlite::Result<()> {
                pause_point(name);
                Ok(())
            })
            .await
    }

    /// The stored result of each key (`None` where there is none).
    pub async fn results(&self, keys: Vec<String>) -> Result<Vec<Option<String>>, LedgerError> {
        self.results_by_row(keys.into_iter().map(|k| (k, None)).collect(), true)
            .await
    }

    /// [`TaskLedger::results`], each key with the ledger row its claim found (see
    /// [`TaskLedger::claim_rows`]) when known: read by that row while it is the key's, else
    /// by key (see [`RunFinder`]).
    ///
    /// Without `basis`, a result stored with its basis's place (see [`StoredResult::basis`])
    /// reads with `[]` for it, which spares parsing most of its bytes.
    pub async fn results_by_row(
        &self,
        keys: Vec<(String, Option<i64>)>,
        basis: bool,
    ) -> Result<Vec<Option<String>>, LedgerError> {
        let task = self.task_id;
        let me = self.ledger.clone();
        self.ledger
            .blocking(move |c| -> Result<Vec<Option<String>>, Fail> {
                let mut out = Vec::with_capacity(keys.len());
                // Results in the log: (index in `out`, owner, start, length).
                let mut logged = Vec::with_capacity(keys.len());
                // One read transaction for all the lookups: on its own, each lookup
                // starts and ends a transaction of its own, two file-lock calls apiece.
                let tx = c.transaction()?;
                {
                    let mut fresh = me.keys.lock().unwrap_or_else(|p| p.into_inner());
                    let mut find = RunFinder::new(
                        &tx,
                        &mut fresh,
                        task,
                        "result_at, result_len,
                           (SELECT json FROM results r WHERE r.result_id = runs.result_id)",
                    )?;
                    type Found = (Option<i64>, Option<i64>, Option<String>);
                    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Found> {
                        Ok((r.get(0)?, r.get(1)?, unpack_result(r.get_ref(2)?)?))
                    };
                    for (k, row) in &keys {
                        let found: Option<Found> = find.find(k, *row, read)?;
                        out.push(match found {
                            Some((Some(at), Some(len), _)) => {
                                logged.push((out.len(), owner(task, k), at, len));
                                None
                            }
                            Some((_, _, old)) => old,
                            None => None,
                        });
                    }
                }
                tx.commit()?;
                let wanted: Vec<(&[u8], u64, usize)> = logged
                    .iter()
                    .map(|(_, o, at, len)| (o.as_slice(), *at as u64, *len as usize))
                    .collect();
                let packed = me.log().read_many(&wanted)?;
                for ((i, _, at, _), p) in logged.iter().zip(packed) {
                    out[*i] = Some(unpack_logged(&p, *at, basis)?);
                }
                Ok(out)
            })
            .await
    }
}

/// [`TaskLedger::claim_rows`] in `tx`, which holds the write lock: new rows are numbered
/// from `next` and noted in `added` (and in `fresh`) as they are written.
#[allow(clippy::too_many_arguments)]
fn claim_in<'k>(
    tx: &rusqlite::Transaction<'_>,
    fresh: &mut keys::FreshKeys,
    keys: &'k [String],
    next: &mut i64,
    added: &mut Vec<(DbKey<'k>, i64)>,
    path: &Path,
    task: i64,
    attempt: i64,
    session: &str,
    options: LedgerOptions,
) -> Result<Vec<(Claim, i64)>, Fail> {
    // Other attempts met: (pipeline, running now), or None when finished.
    let mut others: HashMap<i64, Option<(String, bool)>> = HashMap::new();
    let mut claims = Vec::with_capacity(keys.len());
    // A result in the log is left unused (see `Ledger::compact`).
    let mut replaced = false;
    // Appended: the table has no index but the row number (see keys.rs).
    let mut add = tx.prepare_cached(
        "INSERT INTO runs (rowid, task_id, input_key, attempt, session, status)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued')",
    )?;
    let mut find = tx.prepare_cached(
        "SELECT rowid, attempt, session, status, result_id, result_at FROM runs
         WHERE rowid = ?1 AND task_id = ?2 AND input_key = ?3",
    )?;
    let mut requeue = tx.prepare_cached(
        "UPDATE runs SET attempt = ?2, session = ?3, status = 'queued',
           group_id = NULL, run_id = NULL, result_id = NULL,
           result_at = NULL, result_len = NULL
         WHERE rowid = ?1",
    )?;
    let mut drop_result = tx.prepare_cached("DELETE FROM results WHERE result_id = ?1")?;
    for key in keys {
        let k = DbKey::new(key);
        type Known = (i64, i64, String, String, Option<i64>, Option<i64>);
        let known: Option<Known> = match fresh.row_of(tx, task, &k)? {
            Some(row) => find
                .query_row(params![row, task, k], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()?,
            None => None,
        };
        let Some((row, a, s, st, old, old_at)) = known else {
            let row = *next;
            *next += 1;
            add.execute(params![row, task, k, attempt, session])?;
            fresh.add(task, &k, row);
            added.push((k, row));
            claims.push((Claim::Submit, row));
            continue;
        };
        let claim = if a == attempt && s == session {
            Claim::Duplicate
        } else if a == attempt && st != status::QUEUED {
            // Claimed before an interruption: shared if the server has its
            // run (see `reconcile`), sent again if its POST never arrived.
            Claim::Resumed
        } else if !options.no_cache
            && (st == status::COMPLETED || (!options.retry_failed && st == status::FAILED))
        {
            Claim::Cached
        } else {
            Claim::Submit
        };
        if claim == Claim::Submit && a != attempt {
            let other = match others.get(&a) {
                Some(o) => o.clone(),
                None => {
                    let o = unfinished_attempt(tx, path, a)?;
                    others.insert(a, o.clone());
                    o
                }
            };
            let pending = st == status::QUEUED || st == status::SUBMITTED;
            let take_over = options.no_cache || options.take_over_pending;
            if let Some((pipeline, live)) = other
                && (live || (pending && !take_over))
            {
                return Err(Fail::Pending {
                    key: key.clone(),
                    pipeline,
                    running: live,
                });
            }
        }
        if claim == Claim::Submit {
            if let Some(old) = old {
                drop_result.execute(params![old])?;
            }
            replaced |= old_at.is_some();
            requeue.execute(params![row, attempt, session])?;
        }
        claims.push((claim, row));
    }
    if replaced {
        note_unused(tx)?;
    }
    Ok(claims)
}

/// Finds a task's runs for [`TaskLedger::store_results`] and [`TaskLedger::results_by_row`]:
/// by the ledger row a claim found (its `rowid`; see [`TaskLedger::claim_rows`]) when that
/// row is still the key's, which in a new attempt goes through the table in about the order
/// the claims wrote it; else by key (see [`keys`]), after reading the rows other processes
/// added.
struct RunFinder<'c> {
    c: &'c Connection,
    by_row: rusqlite::CachedStatement<'c>,
    fresh: &'c mut keys::FreshKeys,
    synced: bool,
    task: i64,
}

impl<'c> RunFinder<'c> {
    /// Selects `columns` of the run.
    fn new(
        c: &'c Connection,
        fresh: &'c mut keys::FreshKeys,
        task: i64,
        columns: &str,
    ) -> rusqlite::Result<Self> {
        let by_row = c.prepare_cached(&format!(
            "SELECT {columns} FROM runs WHERE rowid = ?3 AND task_id = ?1 AND input_key = ?2"
        ))?;
        Ok(RunFinder {
            c,
            by_row,
            fresh,
            synced: false,
            task,
        })
    }

    /// The run of `key` read by `read`, looked for at `row` first when given.
    fn find<T>(
        &mut self,
        key: &str,
        row: Option<i64>,
        read: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Option<T>> {
        let key = DbKey::new(key);
        if let Some(row) = row
            && let Some(found) = self
                .by_row
                .query_row(params![self.task, key, row], &read)
                .optional()?
        {
            return Ok(Some(found));
        }
        if !self.synced {
            self.fresh.sync(self.c)?;
            self.synced = true;
        }
        match self.fresh.row_of(self.c, self.task, &key)? {
            Some(found) if Some(found) != row => self
                .by_row
                .query_row(params![self.task, key, found], &read)
                .optional(),
            _ => Ok(None),
        }
    }
}

/// [`Ledger::compact`] on the connection: the new log (committed to, not yet in use in this
/// process) and the old and new sizes, or `None` when the log stays as it is.
fn compact_in(c: &mut Connection, me: &Ledger) -> Result<Option<(log::ResultLog, u64, u64)>, Fail> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let live: i64 = tx.query_row(
        "SELECT coalesce(sum(result_len), 0) FROM runs NOT INDEXED WHERE result_at IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    let before = me.log().len()?;
    let unused = before.saturating_sub(live as u64);
    if unused < COMPACT_MIN_BYTES || unused * 2 < live as u64 {
        tx.execute("DELETE FROM settings WHERE name = 'unused_results'", [])?;
        tx.commit()?;
        return Ok(None);
    }
    // Left, noted, to the next run that ends.
    if me.shared() {
        return Ok(None);
    }
    remove_stray_logs(me)?;
    let (first, current) = log_names(me);
    let next = me
        .path
        .with_file_name(log::next_name(&first, current.as_deref().unwrap_or(&first)));
    let copied = copy_live_results(&tx, &me.log(), &next);
    let new_log = match copied {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            return Err(e);
        }
    };
    let after = new_log.len().map_err(|e| Fail::File(next.clone(), e))?;
    tx.execute(
        "INSERT OR REPLACE INTO settings (name, value) VALUES ('result_log', ?1)",
        params![next.file_name().map(|n| n.to_string_lossy())],
    )?;
    tx.execute("DELETE FROM settings WHERE name = 'unused_results'", [])?;
    tx.commit()?;
    Ok(Some((new_log, before, after)))
}

/// Deletes the result logs beside the ledger other than the one in use: copies a crash
/// left during a compaction, and old logs a crash (or a failed delete) left after one. Only
/// with no other pipeline holding the ledger open (the caller checks), under the ledger's
/// connection: no other process has a log open, and none is being written.
fn remove_stray_logs(me: &Ledger) -> Result<(), Fail> {
    let (first, current) = log_names(me);
    let dir = me.dir();
    let in_dir = |e| Fail::File(dir.clone(), e);
    for entry in std::fs::read_dir(&dir).map_err(in_dir)? {
        let name = entry.map_err(in_dir)?.file_name();
        let name = name.to_string_lossy();
        if log::is_log_name(&first, &name) && Some(&*name) != current.as_deref() {
            let path = dir.join(&*name);
            std::fs::remove_file(&path).map_err(|e| Fail::File(path, e))?;
        }
    }
    Ok(())
}

/// The file names of the ledger's first result log and of the log in use.
fn log_names(me: &Ledger) -> (String, Option<String>) {
    let first = log::path_for(&me.path);
    let first = first
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let current = me
        .log()
        .path()
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string);
    (first.to_string(), current)
}

/// Unused bytes in the result log below which [`Ledger::compact`] leaves it as it is.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// Notes in `tx` that results in the log were left unused, for [`Ledger::compact`].
fn note_unused(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO settings (name, value) VALUES ('unused_results', 'yes')",
    )?
    .execute([])
    .map(|_| ())
}

/// Copies every result a run points to from `log` into a new log at `to`, in the runs'
/// order, and points the runs at their copies (in `tx`). The copy is durable on return.
fn copy_live_results(
    tx: &rusqlite::Transaction<'_>,
    log: &log::ResultLog,
    to: &Path,
) -> Result<log::ResultLog, Fail> {
    /// Results read and written at a time.
    const CHUNK: usize = 4096;
    // Synced once at the end; later appends sync as the old log's did.
    let to_new = |e| Fail::File(to.to_path_buf(), e);
    let mut new_log = log::ResultLog::create(to.to_path_buf(), false).map_err(to_new)?;
    let mut moves: Vec<(i64, u64)> = Vec::new();
    {
        let mut s = tx.prepare(
            "SELECT rowid, task_id, input_key, result_at, result_len FROM runs NOT INDEXED
             WHERE result_at IS NOT NULL",
        )?;
        let mut rows = s.query([])?;
        let mut chunk: Vec<(i64, Vec<u8>, u64, usize)> = Vec::with_capacity(CHUNK);
        let mut flush = |chunk: &mut Vec<(i64, Vec<u8>, u64, usize)>| -> Result<(), Fail> {
            let wanted: Vec<(&[u8], u64, usize)> = chunk
                .iter()
                .map(|(_, o, at, len)| (o.as_slice(), *at, *len))
                .collect();
            let payloads = log.read_many(&wanted)?;
            let records: Vec<(&[u8], &[u8])> = chunk
                .iter()
                .zip(&payloads)
                .map(|((_, o, _, _), p)| (o.as_slice(), p.as_slice()))
                .collect();
            let at = new_log.append(&records).map_err(to_new)?;
            moves.extend(chunk.iter().zip(at).map(|((row, ..), (at, _))| (*row, at)));
            chunk.clear();
            Ok(())
        };
        while let Some(r) = rows.next()? {
            let task: i64 = r.get(1)?;
            let key = match r.get_ref(2)? {
                ValueRef::Blob(b) => hex(b),
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                other => {
                    return Err(Fail::Log(std::io::Error::other(format!(
                        "run {} has an input key of type {:?}",
                        r.get::<_, i64>(0)?,
                        other.data_type()
                    ))));
                }
            };
            let (at, len): (i64, i64) = (r.get(3)?, r.get(4)?);
            chunk.push((r.get(0)?, owner(task, &key), at as u64, len as usize));
            if chunk.len() == CHUNK {
                flush(&mut chunk)?;
            }
        }
        if !chunk.is_empty() {
            flush(&mut chunk)?;
        }
    }
    new_log.sync_all().map_err(to_new)?;
    new_log.set_sync(log.syncs());
    let mut point = tx.prepare("UPDATE runs SET result_at = ?2 WHERE rowid = ?1")?;
    for (row, at) in moves {
        point.execute(params![row, at as i64])?;
    }
    Ok(new_log)
}

/// Whose a record of the result log is: its task and input key.
fn owner(task: i64, key: &str) -> Vec<u8> {
    let mut o = Vec::with_capacity(8 + key.len());
    o.extend_from_slice(&task.to_le_bytes());
    o.extend_from_slice(key.as_bytes());
    o
}

/// A result read from the log as JSON; an error names where its record starts.
/// Without `basis`, the result's basis may read as `[]` (see [`unpack_without_basis`]).
fn unpack_logged(packed: &[u8], at: i64, basis: bool) -> std::io::Result<String> {
    let unpacked = if basis {
        unpack(packed)
    } else {
        unpack_without_basis(packed)
    };
    unpacked.map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the result stored at byte {at} cannot be read ({e}); run with --no-cache to fetch it again"
            ),
        )
    })
}

/// One result packed by a [`Packer`] of its own.
#[cfg(test)]
fn pack_result(json: &str, basis: Option<Range<usize>>) -> Vec<u8> {
    let mut out = Vec::new();
    Packer::default().pack(json, basis, &mut out);
    out
}

/// A run's event (≈ 2.5 KB of JSON, most of it the research basis) as an LZ4 block after
/// its length: about 2.5× smaller, which is what the result log has to write and read.
/// zstd shrinks it more but costs 5× the CPU on events this small.
///
/// An event whose basis is large and whose place is known (`basis`, a range of `json`) is
/// packed with that place in front, so that readers without a use for the basis cut it out
/// before parsing: a word with [`SPLIT`] set and where the basis starts, a word with where
/// it ends, then the block.
///
/// Results are packed one after another into a buffer, reusing LZ4's hash table and a
/// buffer to compress into.
#[derive(Default)]
struct Packer {
    table: lz4_flex::block::CompressTable,
    scratch: Vec<u8>,
}

impl Packer {
    /// Appends `json` packed to `out`.
    fn pack(&mut self, json: &str, basis: Option<Range<usize>>, out: &mut Vec<u8>) {
        let json = json.as_bytes();
        let split = basis.filter(|b| {
            b.len() >= SPLIT_BASIS_BYTES && (b.end as u64) < SPLIT as u64 && is_array_at(json, b)
        });
        let Some(b) = split else {
            return self.block(json, out);
        };
        out.extend_from_slice(&(SPLIT | b.start as u32).to_le_bytes());
        out.extend_from_slice(&(b.end as u32).to_le_bytes());
        self.block(json, out);
    }

    /// Appends `input` as an LZ4 block after its length, as `compress_prepend_size` writes
    /// it.
    fn block(&mut self, input: &[u8], out: &mut Vec<u8>) {
        // Compressed into a buffer kept from one block to the next, then copied, rather
        // than into `out` grown (and zeroed) to the largest size a block can take.
        let max = lz4_flex::block::get_maximum_output_size(input.len());
        if self.scratch.len() < max {
            self.scratch.resize(max, 0);
        }
        let written = lz4_flex::block::compress_into_with_table(
            input,
            &mut self.scratch[..max],
            &mut self.table,
        )
        .expect("an output of the maximum size holds any block");
        out.extend_from_slice(&(input.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.scratch[..written]);
    }
}

/// Marks a result packed with its basis's place (see [`Packer`]). One packed without it
/// starts with its length, which is always below this.
const SPLIT: u32 = 1 << 31;
/// A basis shorter than this is not worth cutting out: its place is not kept.
const SPLIT_BASIS_BYTES: usize = 256;

type UnpackError = Box<dyn std::error::Error + Send + Sync>;

/// The JSON a [`Packer`] record holds.
fn unpack(packed: &[u8]) -> Result<String, UnpackError> {
    let block = match split_parts(packed)? {
        Some((_, block)) => block,
        None => packed,
    };
    Ok(String::from_utf8(
        lz4_flex::block::decompress_size_prepended(block)?,
    )?)
}

/// The JSON a [`Packer`] record holds, with `[]` for its basis where it knows the basis's
/// place.
fn unpack_without_basis(packed: &[u8]) -> Result<String, UnpackError> {
    let Some((basis, block)) = split_parts(packed)? else {
        return unpack(packed);
    };
    let mut json = lz4_flex::block::decompress_size_prepended(block)?;
    if !is_array_at(&json, &basis) {
        return Err("its basis is not where it says".into());
    }
    json[basis.start..basis.start + 2].copy_from_slice(b"[]");
    json.drain(basis.start + 2..basis.end);
    Ok(String::from_utf8(json)?)
}

/// Whether `place` in `json` starts with `[` and ends with `]`: the check that a basis's
/// place is kept for (when packing) and still fits (when cutting it out).
fn is_array_at(json: &[u8], place: &Range<usize>) -> bool {
    place.len() >= 2
        && json.get(place.start) == Some(&b'[')
        && json.get(place.end - 1) == Some(&b']')
}

/// Where a result's basis is, and the block.
type SplitParts<'a> = (Range<usize>, &'a [u8]);

/// The parts of a result packed with its basis's place; `None` for one packed without.
fn split_parts(packed: &[u8]) -> Result<Option<SplitParts<'_>>, UnpackError> {
    let word = |at: usize| -> Result<u32, UnpackError> {
        let bytes = packed.get(at..at + 4).ok_or("it is cut short")?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    };
    let first = word(0)?;
    if first & SPLIT == 0 {
        return Ok(None);
    }
    let end = word(4)? as usize;
    Ok(Some(((first & !SPLIT) as usize..end, &packed[8..])))
}

/// A stored result as JSON: compressed (a BLOB) or, from older ledgers, plain text.
fn unpack_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::Result<Option<String>> {
    use rusqlite::types::{FromSqlError, ValueRef};
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, e)
    };
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => String::from_utf8(t.to_vec())
            .map(Some)
            .map_err(|e| bad(Box::new(e))),
        ValueRef::Blob(b) => unpack(b).map(Some).map_err(bad),
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            0,
            other.data_type(),
            Box::new(FromSqlError::InvalidType),
        )),
    }
}

/// Why a task's group could not be had.
#[derive(Debug, thiserror::Error)]
pub enum GroupError<E> {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Create(E),
}

/// A 128-bit BLAKE3 fingerprint, as 32 hex digits.
pub fn fingerprint(bytes: &[u8]) -> String {
    hex(&blake3::hash(bytes).as_bytes()[..16])
}

/// `bytes` as lowercase hex digits (a fingerprint key's text, from its stored 16 bytes).
fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    crate::api::push_hex(&mut out, bytes);
    out
}

/// The fingerprint of a task: its processor and task spec (input and output schemas).
/// Results are reused only between tasks with the same fingerprint.
pub fn task_fingerprint(processor: &str, spec: &crate::api::TaskSpec) -> String {
    let canonical = serde_json::json!({ "processor": processor, "task_spec": spec });
    fingerprint(canonical.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ks: &[&str]) -> Vec<String> {
        ks.iter().map(|k| k.to_string()).collect()
    }

    #[tokio::test]
    async fn results_go_compressed_to_the_log_and_older_ones_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let json = format!(
            "{{\"basis\":\"{}\"}}",
            "the same reasoning again ".repeat(40)
        );
        {
            let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
            let t = l.task("t", "fp").await.unwrap();
            t.claim(keys(&["a", "b", "c"])).await.unwrap();
            let a = StoredResult {
                json: json.clone(),
                ..done("a", true)
            };
            t.store_results(vec![a, done("b", true), done("c", true)])
                .await
                .unwrap();
            l.finish().await.unwrap();
        }
        // The results are in the log, compressed; the rows say where.
        let log = std::fs::read(dir.path().join("ledger.results")).unwrap();
        let c = Connection::open(&path).unwrap();
        let (at, len, id): (i64, i64, Option<i64>) = c
            .query_row(
                "SELECT result_at, result_len, result_id FROM runs WHERE input_key = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((at, id), (0, None));
        assert!(
            len as usize * 4 < json.len(),
            "{len} bytes stored for {}",
            json.len()
        );
        let record = &log[at as usize + 4..(at + len) as usize];
        assert_eq!(unpack_logged(record, at, true).unwrap(), json);
        let none: i64 = c
            .query_row("SELECT count(*) FROM results", [], |r| r.get(0))
            .unwrap();
        assert_eq!(none, 0);
        // Ledgers written before the log hold results in their table: compressed, or
        // (before compression) plain JSON text.
        c.execute_batch(
            "INSERT INTO results (result_id, json) VALUES (7, '{\"k\":\"old\"}');
             UPDATE runs SET result_id = 7, result_at = NULL, result_len = NULL
             WHERE input_key = 'b';",
        )
        .unwrap();
        c.execute(
            "INSERT INTO results (result_id, json) VALUES (8, ?1)",
            params![pack_result("{\"k\":\"lz4\"}", None)],
        )
        .unwrap();
        c.execute_batch(
            "UPDATE runs SET result_id = 8, result_at = NULL, result_len = NULL
             WHERE input_key = 'c'",
        )
        .unwrap();
        drop(c);
        let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let r = t.results(keys(&["a", "b", "c", "d"])).await.unwrap();
        assert_eq!(r[0].as_deref(), Some(json.as_str()));
        assert_eq!(r[1].as_deref(), Some("{\"k\":\"old\"}"));
        assert_eq!(r[2].as_deref(), Some("{\"k\":\"lz4\"}"));
        assert_eq!(r[3], None);
        assert_eq!(
            t.claim(keys(&["a", "b", "c"])).await.unwrap(),
            vec![Claim::Cached; 3]
        );
        drop((t, l));
        // A damaged log is an error that says where, never a wrong result.
        let mut log = std::fs::read(dir.path().join("ledger.results")).unwrap();
        log[10] ^= 0xff;
        std::fs::write(dir.path().join("ledger.results"), log).unwrap();
        let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let e = t.results(keys(&["a"])).await.unwrap_err().to_string();
        assert!(e.contains("ledger.results") && e.contains("byte 0"), "{e}");
        assert!(e.contains("checksum"), "{e}");
    }

    #[tokio::test]
    async fn a_large_basis_is_cut_out_for_readers_that_do_not_ask_for_it() {
        let l = Ledger::temporary().unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let ks = keys(&["a", "b", "c"]);
        let rows = t.claim_rows(ks.clone()).await.unwrap();
        let entry =
            r#"{"field":"n","reasoning":"because it says so","citations":[],"confidence":"high"}"#;
        let basis = format!("[{}]", [entry; 8].join(","));
        let json = format!(
            r#"{{"run":{{"run_id":"trun_a"}},"output":{{"type":"json","content":{{"n":1}},"basis":{basis},"beta_fields":null}}}}"#
        );
        let at = json.find(&basis).unwrap();
        let place = at..at + basis.len();
        // The basis's place kept: the first word says so.
        let split = pack_result(&json, Some(place.clone()));
        assert_ne!(split[3] & 0x80, 0);
        assert_eq!(pack_result(&json, None)[3] & 0x80, 0);
        let small = format!(r#"{{"output":{{"basis":{entry}}}}}"#);
        let stored = vec![
            StoredResult {
                json: json.clone(),
                basis: Some(place),
                ..done(&ks[0], true)
            },
            // Too small to be worth cutting out, and a place not known: each read whole.
            StoredResult {
                basis: Some(19..19 + entry.len()),
                json: small.clone(),
                ..done(&ks[1], true)
            },
            StoredResult {
                json: json.clone(),
                ..done(&ks[2], true)
            },
        ];
        t.store_results(stored).await.unwrap();
        let wanted: Vec<(String, Option<i64>)> = ks
            .iter()
            .cloned()
            .zip(rows.iter().map(|r| Some(r.1)))
            .collect();
        let whole = t.results_by_row(wanted.clone(), true).await.unwrap();
        assert_eq!(
            whole,
            vec![Some(json.clone()), Some(small.clone()), Some(json.clone())]
        );
        let lean = t.results_by_row(wanted, false).await.unwrap();
        assert_eq!(
            lean,
            vec![Some(json.replace(&basis, "[]")), Some(small), Some(json)]
        );
        // A record cut short, or whose basis is not where it says, is an error, never a
        // wrong result.
        assert!(unpack(&split[..6]).is_err());
        assert!(unpack_without_basis(&split[..split.len() - 3]).is_err());
        for (byte, by) in [(0, 1), (4, 1), (6, 0x7f)] {
            let mut moved = split.clone();
            moved[byte] = moved[byte].wrapping_add(by);
            assert!(unpack_without_basis(&moved).is_err(), "byte {byte} + {by}");
        }
    }

    #[tokio::test]
    async fn a_replaced_result_is_read_from_its_new_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let retry = LedgerOptions {
            retry_failed: true,
            ..LedgerOptions::default()
        };
        for (completed, want) in [(false, "first"), (true, "second")] {
            let l = Ledger::open(&path, "p", retry).unwrap();
            let t = l.task("t", "fp").await.unwrap();
            assert_eq!(t.claim(keys(&["a"])).await.unwrap(), vec![Claim::Submit]);
            assert_eq!(t.counts().await.unwrap(), (1, 1));
            let r = StoredResult {
                json: format!("{{\"k\":\"{want}\"}}"),
                ..done("a", completed)
            };
            t.store_results(vec![r]).await.unwrap();
            assert_eq!(t.counts().await.unwrap(), (1, 0));
            let read = t.results(keys(&["a"])).await.unwrap();
            assert_eq!(
                read[0].as_deref(),
                Some(format!("{{\"k\":\"{want}\"}}").as_str())
            );
            l.finish().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_checkpoint_empties_the_log_and_keeps_every_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let ks: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        t.claim(ks.clone()).await.unwrap();
        let stored = ks.iter().map(|k| done(k, true)).collect();
        t.store_results(stored).await.unwrap();
        let wal = dir.path().join("ledger.sqlite-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        l.checkpoint().await.unwrap();
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        let read = t.results(ks).await.unwrap();
        assert!(read.iter().all(Option::is_some));
        // New ledgers use small pages: a random key's update rewrites 1 KB, not 4.
        let c = Connection::open(&path).unwrap();
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        assert_eq!(page, 1024);
    }

    /// The result log files in `dir`, by name.
    fn result_logs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| log::is_log_name("ledger.results", n))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn the_result_log_is_compacted_once_replaced_results_take_much_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        // 1000 fingerprint keys and one text key, with ≈ 2 KB results that LZ4 shrinks only
        // by half (hex digits of hashes): ≈ 1.1 MB of log per round.
        let mut ks: Vec<String> = (0..1000)
            .map(|i| fingerprint(format!("{i}").as_bytes()))
            .collect();
        ks.push("a text key".into());
        let json = |k: &str, round: u32| {
            let noise: String = (0..32)
                .map(|j| fingerprint(format!("{k}/{round}/{j}").as_bytes()))
                .collect();
            format!("{{\"k\":\"{k}\",\"round\":{round},\"noise\":\"{noise}\"}}")
        };
        let no_cache = LedgerOptions {
            no_cache: true,
            ..LedgerOptions::default()
        };
        let mut sizes = Vec::new();
        for (round, options) in [(1, LedgerOptions::default()), (2, no_cache), (3, no_cache)] {
            let (l, t) = store_round(&path, &ks, options, |k| json(k, round)).await;
            if round == 3 {
                // Another pipeline has the ledger open: its log file must stay the one in use.
                let other = Ledger::open(&path, "q", LedgerOptions::default()).unwrap();
                assert_eq!(l.compact().await.unwrap(), None);
                drop((other, t, l));
                // The next run to end compacts, though it replaced nothing itself.
                let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
                let t = l.task("t", "fp").await.unwrap();
                let claims = t.claim(ks.clone()).await.unwrap();
                assert!(claims.iter().all(|c| *c == Claim::Cached));
                l.finish().await.unwrap();
                sizes.push((round, l.compact().await.unwrap()));
                continue;
            }
            sizes.push((round, l.compact().await.unwrap()));
        }
        // Round 1 replaced nothing; rounds 2 and 3 each left the round before unused.
        assert_eq!(sizes[0], (1, None), "{sizes:?}");
        for (round, compacted) in &sizes[1..] {
            let (before, after) = compacted.unwrap_or_else(|| panic!("round {round}: {sizes:?}"));
            assert!(
                after > 1_000_000 && before > 2 * after - 100_000,
                "round {round}: {sizes:?}"
            );
        }
        assert_eq!(result_logs(dir.path()), ["ledger.results.2"]);

        // A later run (a new process) opens the log the compaction made, and every result
        // is there, checked against its input: the last round's.
        let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        assert!(
            t.claim(ks.clone())
                .await
                .unwrap()
                .iter()
                .all(|c| *c == Claim::Cached)
        );
        let read = t.results(ks.clone()).await.unwrap();
        for (k, r) in ks.iter().zip(&read) {
            assert_eq!(r.as_deref(), Some(json(k, 3).as_str()), "{k}");
        }
        l.finish().await.unwrap();
        drop((t, l));
        // A copy a crash left behind is deleted by the next compaction, and does not count
        // as the log meanwhile.
        std::fs::write(dir.path().join("ledger.results.7"), b"left over").unwrap();
        let (l, t) = store_round(&path, &ks, no_cache, |k| json(k, 4)).await;
        assert!(l.compact().await.unwrap().is_some());
        assert_eq!(result_logs(dir.path()), ["ledger.results.3"]);
        let read = t.results(ks.clone()).await.unwrap();
        assert_eq!(read[7].as_deref(), Some(json(&ks[7], 4).as_str()));
        // A ledger that names another log is not one older versions can read.
        let c = Connection::open(&path).unwrap();
        let format: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(format, FORMAT);
        drop((t, l));
        // The old log a crash after the commit left, and a copy a crash left, go at the end
        // of the next run, though it replaces nothing: not while another pipeline is open.
        std::fs::write(dir.path().join("ledger.results.2"), b"old log").unwrap();
        std::fs::write(dir.path().join("ledger.results.9"), b"left over").unwrap();
        let logs = ["ledger.results.2", "ledger.results.3", "ledger.results.9"];
        let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
        let other = Ledger::open(&path, "q", LedgerOptions::default()).unwrap();
        l.finish().await.unwrap();
        assert_eq!(l.compact().await.unwrap(), None);
        assert_eq!(result_logs(dir.path()), logs);
        drop(other);
        assert_eq!(l.compact().await.unwrap(), None);
        assert_eq!(result_logs(dir.path()), ["ledger.results.3"]);
        let t = l.task("t", "fp").await.unwrap();
        let read = t.results(ks.clone()).await.unwrap();
        assert_eq!(read[7].as_deref(), Some(json(&ks[7], 4).as_str()));
        drop((t, l));
        // A file that cannot be deleted fails the compaction with an error naming it (not
        // the log in use), and the results stay where they were.
        std::fs::create_dir(dir.path().join("ledger.results.8")).unwrap();
        let (l, t) = store_round(&path, &ks, no_cache, |k| json(k, 5)).await;
        let e = l.compact().await.unwrap_err().to_string();
        assert!(e.contains("ledger.results.8"), "{e}");
        let read = t.results(ks.clone()).await.unwrap();
        assert_eq!(read[7].as_deref(), Some(json(&ks[7], 5).as_str()));
    }

    /// A run of pipeline `p` that claims `ks`, stores `json(k)` as each one's result and
    /// ends.
    async fn store_round(
        path: &Path,
        ks: &[String],
        options: LedgerOptions,
        json: impl Fn(&str) -> String,
    ) -> (Arc<Ledger>, TaskLedger) {
        let l = Ledger::open(path, "p", options).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        t.claim(ks.to_vec()).await.unwrap();
        let stored = ks
            .iter()
            .map(|k| StoredResult {
                json: json(k),
                ..done(k, true)
            })
            .collect();
        t.store_results(stored).await.unwrap();
        l.finish().await.unwrap();
        (l, t)
    }

    fn done(key: &str, completed: bool) -> StoredResult {
        StoredResult {
            input_key: key.into(),
            row: None,
            completed,
            json: format!("{{\"k\":\"{key}\"}}"),
            basis: None,
        }
    }

    #[tokio::test]
    async fn results_are_found_by_the_claims_rows_and_by_key_when_a_row_is_not_theirs() {
        let l = Ledger::temporary().unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let ks: Vec<String> = (0..3).map(|i| crate::sink::input_key(&[i])).collect();
        let mut claimed = t.claim_rows(ks.clone()).await.unwrap();
        // Claimed again in the same attempt: a duplicate, on the same row.
        claimed.extend(t.claim_rows(vec![ks[1].clone()]).await.unwrap());
        assert_eq!(claimed[3], (Claim::Duplicate, claimed[1].1));
        let rows: Vec<i64> = claimed.iter().map(|&(_, r)| r).collect();
        assert_eq!(
            rows[..3]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
        t.store_results(ks[..2].iter().map(|k| done(k, true)).collect())
            .await
            .unwrap();
        let want = |k: &str| Some(format!("{{\"k\":\"{k}\"}}"));
        let read = t
            .results_by_row(
                vec![
                    (ks[0].clone(), Some(rows[0])),
                    // Another key's row, a row that does not exist, no row: found by key.
                    (ks[1].clone(), Some(rows[0])),
                    (ks[1].clone(), Some(rows[2] + 100)),
                    (ks[0].clone(), None),
                    // Its own row, no result yet.
                    (ks[2].clone(), Some(rows[2])),
                ],
                true,
            )
            .await
            .unwrap();
        assert_eq!(
            read,
            vec![want(&ks[0]), want(&ks[1]), want(&ks[1]), want(&ks[0]), None]
        );
    }

    #[tokio::test]
    async fn results_are_stored_on_the_row_their_run_names_if_it_is_their_keys() {
        let l = Ledger::temporary().unwrap();
        let t = l.task("t", "fp").await.unwrap();
        let other = l.task("u", "fp2").await.unwrap();
        let ks: Vec<String> = (0..4).map(|i| crate::sink::input_key(&[i])).collect();
        let rows: Vec<i64> = t
            .claim_rows(ks.clone())
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        // The same key claimed by another task: a row of the right key but not this task's.
        let (_, others_row) = other.claim_rows(vec![ks[3].clone()]).await.unwrap()[0];
        let named = |k: &str, row: Option<i64>| StoredResult {
            row,
            ..done(k, true)
        };
        t.store_results(vec![
            named(&ks[0], Some(rows[0])),
            // Another key's row, a row that does not exist, another task's row of the same
            // key: each is stored on its own key's row, and the row named is left alone.
            named(&ks[1], Some(rows[2])),
            named(&ks[2], Some(rows[3] + 100)),
            named(&ks[3], Some(others_row)),
        ])
        .await
        .unwrap();
        let want = |k: &str| Some(format!("{{\"k\":\"{k}\"}}"));
        let read = t.results(ks.clone()).await.unwrap();
        assert_eq!(read, ks.iter().map(|k| want(k)).collect::<Vec<_>>());
        assert_eq!(t.counts().await.unwrap(), (4, 0));
        assert_eq!(
            other.results(vec![ks[3].clone()]).await.unwrap(),
            vec![None]
        );
        assert_eq!(other.counts().await.unwrap(), (1, 1));
    }

    #[tokio::test]
    async fn claims_dedup_resume_and_reuse_across_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let opts = LedgerOptions::default();
        {
            let l = Ledger::open(&path, "p", opts).unwrap();
            assert!(!l.resumed());
            let t = l.task("t", "fp").await.unwrap();
            let c = t.claim(keys(&["a", "b", "a"])).await.unwrap();
            assert_eq!(c, vec![Claim::Submit, Claim::Submit, Claim::Duplicate]);
            // A second open of the same pipeline while this one runs is refused.
            assert!(matches!(
                Ledger::open(&path, "p", opts),
                Err(LedgerError::Busy { .. })
            ));
            let g = t
                .group_or_create(|| async { Ok::<_, String>("tgrp_1".to_string()) })
                .await
                .unwrap();
            assert_eq!(g, "tgrp_1");
            // Interrupted here: "a" reached the group, "b" was claimed but never did.
        }
        {
            let l = Ledger::open(&path, "p", opts).unwrap();
            assert!(l.resumed());
            let t = l.task("t", "fp").await.unwrap();
            assert!(t.should_reconcile());
            assert!(!t.should_reconcile());
            assert_eq!(t.group().await.unwrap().as_deref(), Some("tgrp_1"));
            let r = t.reconcile(vec!["a".into()]).await.unwrap();
            assert_eq!(
                r,
                Reconciled {
                    found: 1,
                    dropped: 1
                }
            );
            let c = t.claim(keys(&["a", "b"])).await.unwrap();
            assert_eq!(c, vec![Claim::Resumed, Claim::Submit]);
            assert_eq!(t.counts().await.unwrap(), (2, 2));
            t.store_results(vec![done("a", true), done("b", false)])
                .await
                .unwrap();
            // A failed result never replaces a completed one.
            t.store_results(vec![done("a", false)]).await.unwrap();
            assert_eq!(t.counts().await.unwrap(), (2, 0));
            l.finish().await.unwrap();
        }
        {
            let l = Ledger::open(&path, "p", opts).unwrap();
            assert!(!l.resumed());
            let t = l.task("t", "fp").await.unwrap();
            assert_eq!(t.group().await.unwrap(), None);
            let c = t.claim(keys(&["a", "b", "c"])).await.unwrap();
            assert_eq!(c, vec![Claim::Cached, Claim::Cached, Claim::Submit]);
            let r = t.results(keys(&["a", "c", "zz"])).await.unwrap();
            assert_eq!(r[0].as_deref(), Some("{\"k\":\"a\"}"));
            assert_eq!(r[1], None);
            assert_eq!(r[2], None);
            // Another task fingerprint shares nothing.
            let other = l.task("t", "fp2").await.unwrap();
            assert_eq!(
                other.claim(keys(&["a"])).await.unwrap(),
                vec![Claim::Submit]
            );
            l.finish().await.unwrap();
        }
        let retry = LedgerOptions {
            retry_failed: true,
            ..opts
        };
        let l = Ledger::open(&path, "p", retry).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        assert_eq!(
            t.claim(keys(&["a", "b"])).await.unwrap(),
            vec![Claim::Cached, Claim::Submit]
        );
        drop(l);
        let no_cache = LedgerOptions {
            no_cache: true,
            ..opts
        };
        let l = Ledger::open(&path, "other pipeline", no_cache).unwrap();
        let t = l.task("t", "fp").await.unwrap();
        assert_eq!(t.claim(keys(&["a"])).await.unwrap(), vec![Claim::Submit]);
    }

    /// The rows whose keys are in `run_keys`, and every row, both by row number.
    fn indexed_and_all(path: &Path) -> (Vec<i64>, Vec<i64>) {
        let c = Connection::open(path).unwrap();
        let rows = |sql: &str| -> Vec<i64> {
            let mut s = c.prepare(sql).unwrap();
            s.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        (
            rows("SELECT row FROM run_keys ORDER BY row"),
            rows("SELECT rowid FROM runs ORDER BY rowid"),
        )
    }

    #[tokio::test]
    async fn keys_reach_the_index_in_sorted_runs_and_other_processes_see_them_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let opts = LedgerOptions::default();
        // Two pipelines with the ledger open, each with its own keys in memory.
        let a = Ledger::open(&path, "a", opts).unwrap();
        let b = Ledger::open(&path, "b", opts).unwrap();
        a.keys.lock().unwrap().fold_at = 2;
        let (ta, tb) = (
            a.task("t", "fp").await.unwrap(),
            b.task("t", "fp").await.unwrap(),
        );
        let x = ta.claim_rows(keys(&["x", "y", "x"])).await.unwrap();
        assert_eq!(
            x.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![Claim::Submit, Claim::Submit, Claim::Duplicate]
        );
        assert_eq!(x[2].1, x[0].1);
        // Claimed, not yet in the index: b reads them before it looks a key up.
        assert_eq!(indexed_and_all(&path), (vec![], vec![x[0].1, x[1].1]));
        ta.store_results(vec![done("y", true)]).await.unwrap();
        assert_eq!(tb.claim(keys(&["y"])).await.unwrap(), vec![Claim::Cached]);
        assert!(matches!(
            tb.claim(keys(&["x"])).await,
            Err(LedgerError::Pending { key, .. }) if key == "x"
        ));
        assert_eq!(
            tb.results(keys(&["y", "x"])).await.unwrap(),
            vec![Some(done("y", true).json), None]
        );
        // Two keys held: a's next claim folds them first, in one sorted run, and then holds
        // only its own new ones.
        let more = ta.claim_rows(keys(&["p", "q"])).await.unwrap();
        let (indexed, all) = indexed_and_all(&path);
        assert_eq!(indexed, vec![x[0].1, x[1].1]);
        assert_eq!(all.len(), 4);
        assert_eq!(a.keys.lock().unwrap().held(), 2);
        // Folded keys are found by both, through the index.
        assert!(matches!(
            tb.claim(keys(&["x"])).await,
            Err(LedgerError::Pending { .. })
        ));
        assert_eq!(b.keys.lock().unwrap().held(), 2);
        assert_eq!(
            ta.claim(keys(&["x", "y", "q"])).await.unwrap(),
            vec![Claim::Duplicate; 3]
        );
        assert_eq!(a.keys.lock().unwrap().held(), 0);
        // Rows are never numbered twice: claims without a result that are forgotten (their
        // group vanished) leave their numbers, and their keys leave the index too.
        let group = ta
            .group_or_create(async || Ok::<_, ()>("g".to_string()))
            .await
            .unwrap();
        ta.forget_group(&group).await.unwrap();
        let (indexed, all) = indexed_and_all(&path);
        assert_eq!((indexed, all), (vec![x[1].1], vec![x[1].1]));
        let again = ta.claim_rows(keys(&["x", "p"])).await.unwrap();
        assert_eq!(
            again.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![Claim::Submit; 2]
        );
        assert!(again[0].1 > more[1].1, "{again:?} after {more:?}");
        // The next ledger opened folds what is left: nothing is held in memory.
        drop((ta, tb, a, b));
        let a = Ledger::open(&path, "a", opts).unwrap();
        assert_eq!(a.keys.lock().unwrap().held(), 0);
        let (indexed, all) = indexed_and_all(&path);
        assert_eq!(indexed, all);
        assert_eq!(all.len(), 3);
        let ta = a.task("t", "fp").await.unwrap();
        assert_eq!(
            ta.claim(keys(&["x", "y", "p", "new"])).await.unwrap(),
            vec![Claim::Submit, Claim::Resumed, Claim::Submit, Claim::Submit]
        );
    }

    #[tokio::test]
    async fn inputs_pending_in_another_pipeline_are_not_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let opts = LedgerOptions::default();
        let a = Ledger::open(&path, "a", opts).unwrap();
        let ta = a.task("t", "fp").await.unwrap();
        ta.claim(keys(&["x", "y"])).await.unwrap();
        ta.store_results(vec![done("y", true)]).await.unwrap();
        let pending = |r: Result<Vec<Claim>, LedgerError>| match r {
            Err(LedgerError::Pending {
                key,
                pipeline,
                running,
                ..
            }) => (key, pipeline, running),
            other => panic!("expected a pending input, got {other:?}"),
        };
        // A run of pipeline b with `options` that claims `ks`, and stops there.
        let claim_as_b = async |options: LedgerOptions, ks: &[&str]| {
            let b = Ledger::open(&path, "b", options).unwrap();
            let tb = b.task("t", "fp").await.unwrap();
            tb.claim(keys(ks)).await
        };
        let b = Ledger::open(&path, "b", opts).unwrap();
        let tb = b.task("t", "fp").await.unwrap();
        // y has its result: reused. x is pending in a, which is running.
        assert_eq!(tb.claim(keys(&["y"])).await.unwrap(), vec![Claim::Cached]);
        let (key, pipeline, running) = pending(tb.claim(keys(&["z", "x"])).await);
        assert_eq!((key.as_str(), pipeline.as_str(), running), ("x", "a", true));
        // Nothing of the refused call was kept: z is still new to this run.
        assert_eq!(tb.claim(keys(&["z"])).await.unwrap(), vec![Claim::Submit]);
        // A run that is going on is never taken over, not even to submit everything again.
        drop((tb, b));
        let no_cache = LedgerOptions {
            no_cache: true,
            ..opts
        };
        assert!(pending(claim_as_b(no_cache, &["x"]).await).2);
        let take_over = LedgerOptions {
            take_over_pending: true,
            ..opts
        };
        assert!(pending(claim_as_b(take_over, &["x"]).await).2);
        // a is interrupted: its pending input waits for it, unless the cache is off.
        drop((ta, a));
        let (key, pipeline, running) = pending(claim_as_b(opts, &["x"]).await);
        assert_eq!(
            (key.as_str(), pipeline.as_str(), running),
            ("x", "a", false)
        );
        let err = LedgerError::Pending {
            path: path.clone(),
            key,
            pipeline,
            running,
        };
        assert!(err.to_string().contains("run a again"), "{err}");
        assert!(err.to_string().contains("--take-over-pending"), "{err}");
        // Taking over submits the pending input and still reuses the stored result,
        // which --no-cache would submit again too.
        assert_eq!(
            claim_as_b(take_over, &["x", "y"]).await.unwrap(),
            vec![Claim::Submit, Claim::Cached]
        );
        // Once b has the input, a resumed takes b's result (b's run has ended).
        let b = Ledger::open(&path, "b", no_cache).unwrap();
        let tb = b.task("t", "fp").await.unwrap();
        assert_eq!(tb.claim(keys(&["x"])).await.unwrap(), vec![Claim::Submit]);
        tb.store_results(vec![done("x", true)]).await.unwrap();
        b.finish().await.unwrap();
        drop(tb);
        let a = Ledger::open(&path, "a", opts).unwrap();
        let ta = a.task("t", "fp").await.unwrap();
        assert_eq!(ta.claim(keys(&["x"])).await.unwrap(), vec![Claim::Cached]);
        drop((ta, a));
        // Another task's inputs are its own.
        let other = b.task("t", "fp2").await.unwrap();
        assert_eq!(
            other.claim(keys(&["x"])).await.unwrap(),
            vec![Claim::Submit]
        );
    }

    /// A finished ledger as groupflow wrote it before format `format` (0: keys as hex text;
    /// 1: fingerprint keys as bytes; both: results in the `results` table, one compressed
    /// and one plain), built with the SQL of those versions.
    fn legacy_ledger(path: &Path, format: i64, ks: &[String]) {
        let key = |k: &String| -> rusqlite::types::Value {
            match (format, fingerprint_bytes(k)) {
                (1, Some(b)) => b.to_vec().into(),
                _ => k.clone().into(),
            }
        };
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA page_size = 1024;
             PRAGMA journal_mode = WAL;
             CREATE TABLE attempts (attempt INTEGER PRIMARY KEY, pipeline TEXT NOT NULL,
               session TEXT NOT NULL, started_at TEXT NOT NULL, finished_at TEXT);
             CREATE TABLE tasks (task_id INTEGER PRIMARY KEY,
               fingerprint TEXT NOT NULL UNIQUE, name TEXT NOT NULL);
             CREATE TABLE runs (task_id INTEGER NOT NULL, input_key TEXT NOT NULL,
               attempt INTEGER NOT NULL, session TEXT NOT NULL, group_id TEXT,
               run_id TEXT, status TEXT NOT NULL, result_id INTEGER,
               PRIMARY KEY (task_id, input_key));
             CREATE TABLE results (result_id INTEGER PRIMARY KEY, json TEXT NOT NULL);
             CREATE INDEX runs_by_group ON runs(group_id);
             INSERT INTO attempts VALUES (1, 'p', 's0', 't0', 't1');
             INSERT INTO tasks VALUES (1, 'fp', 't');",
        )
        .unwrap();
        c.execute_batch(&format!("PRAGMA user_version = {format}"))
            .unwrap();
        for (i, k) in ks.iter().enumerate() {
            let json = format!("{{\"k\":\"{k}\"}}");
            let stored: rusqlite::types::Value = if i % 2 == 0 {
                pack_result(&json, None).into()
            } else {
                json.into()
            };
            c.execute(
                "INSERT INTO results (result_id, json) VALUES (?1, ?2)",
                params![i as i64 + 1, stored],
            )
            .unwrap();
            c.execute(
                "INSERT INTO runs VALUES (1, ?1, 1, 's0', 'tgrp_1', ?2, 'completed', ?3)",
                params![key(k), format!("trun_{i}"), i as i64 + 1],
            )
            .unwrap();
        }
    }

    #[tokio::test]
    async fn older_ledgers_are_converted_and_keep_their_results() {
        let fp = |i: u8| fingerprint(&[i]);
        let ks = vec![fp(1), fp(2), "plain key".to_string()];
        for format in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ledger.sqlite");
            legacy_ledger(&path, format, &ks);
            {
                let l = Ledger::open(&path, "p", LedgerOptions::default()).unwrap();
                let t = l.task("t", "fp").await.unwrap();
                let more = vec![ks[0].clone(), ks[1].clone(), ks[2].clone(), fp(3)];
                let claims = t.claim(more.clone()).await.unwrap();
                assert_eq!(
                    claims,
                    [vec![Claim::Cached; 3], vec![Claim::Submit]].concat(),
                    "format {format}"
                );
                t.store_results(vec![done(&fp(3), true)]).await.unwrap();
                let read = t.results(more).await.unwrap();
                for (k, r) in ks.iter().chain([&fp(3)]).zip(&read) {
                    let want = format!("{{\"k\":\"{k}\"}}");
                    assert_eq!(r.as_deref(), Some(want.as_str()), "format {format}");
                }
            }
            let c = Connection::open(&path).unwrap();
            let kinds: Vec<(String, i64)> = c
                .prepare("SELECT typeof(input_key), length(input_key) FROM runs ORDER BY rowid")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let blob = ("blob".to_string(), 16);
            let want = vec![blob.clone(), blob.clone(), ("text".into(), 9), blob];
            assert_eq!(kinds, want, "format {format}");
            let (version, index): (i64, i64) = c
                .query_row(
                    "SELECT (SELECT user_version FROM pragma_user_version),
                       (SELECT count(*) FROM sqlite_master WHERE name = 'runs_by_group')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((version, index), (FORMAT, 0), "format {format}");
            // A ledger from a newer groupflow is refused, not misread.
            c.execute_batch(&format!("PRAGMA user_version = {}", FORMAT + 1))
                .unwrap();
            drop(c);
            let e = Ledger::open(&path, "p", LedgerOptions::default()).unwrap_err();
            assert!(e.to_string().contains("newer groupflow"), "{e}");
        }
    }

    #[tokio::test]
    async fn two_runs_of_one_input_in_one_batch_keep_the_completed_result() {
        let l = Ledger::temporary().unwrap();
        let t = l.task("t", "fp").await.unwrap();
        t.claim(keys(&["a", "b"])).await.unwrap();
        let with = |key: &str, completed: bool, text: &str| StoredResult {
            json: format!("{{\"k\":\"{text}\"}}"),
            ..done(key, completed)
        };
        let batch = vec![
            with("a", true, "a won"),
            with("a", false, "a lost"),
            with("b", false, "b lost"),
            with("b", true, "b won"),
        ];
        t.store_results(batch).await.unwrap();
        let read = t.results(keys(&["a", "b"])).await.unwrap();
        assert_eq!(read[0].as_deref(), Some("{\"k\":\"a won\"}"));
        assert_eq!(read[1].as_deref(), Some("{\"k\":\"b won\"}"));
        assert_eq!(t.counts().await.unwrap(), (2, 0));
    }

    #[test]
    fn fingerprints_are_stable_and_follow_the_spec() {
        assert_eq!(fingerprint(b"abc"), fingerprint(b"abc"));
        assert_eq!(fingerprint(b"abc").len(), 32);
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xf0, 0xff]), "000fa5f0ff");
        // What SQLite's `unhex` stores, `hex` reads back.
        let c = Connection::open_in_memory().unwrap();
        let key = fingerprint(b"abc");
        let stored: Vec<u8> = c
            .query_row("SELECT unhex(?1)", [&key], |r| r.get(0))
            .unwrap();
        assert_eq!(hex(&stored), key);
        assert_ne!(fingerprint(b"abc"), fingerprint(b"abd"));
        let spec = |t: &str| crate::api::TaskSpec {
            output_schema: crate::api::Schema::Text {
                description: Some(t.into()),
            },
            input_schema: None,
        };
        assert_eq!(
            task_fingerprint("core", &spec("x")),
            task_fingerprint("core", &spec("x"))
        );
        assert_ne!(
            task_fingerprint("core", &spec("x")),
            task_fingerprint("base", &spec("x"))
        );
        assert_ne!(
            task_fingerprint("core", &spec("x")),
            task_fingerprint("core", &spec("y"))
        );
    }
}
