//! SQLite state of the server: groups, task specs, runs and the group event log. The runs'
//! outputs go to a file of their own beside the database (see [`super::outputs`]).
//!
//! One writer connection (behind a mutex, used from blocking threads) does every change as
//! one transaction; readers take connections from a small pool, so streams read while the
//! scheduler writes (WAL mode). Run and event sequence numbers are SQLite rowids: they
//! grow monotonically, survive restarts and serve as the opaque stream cursors.
//!
//! Ids carry their row: `trun_` + 16 hex random tag + 16 hex seq, so a lookup by id is a
//! primary-key lookup checked against the tag.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use super::checkpoint::Checkpointer;
use super::outputs::{self, Outputs};
use super::wire::{self, GroupCounts, RunView, StatusCode};

/// A store error: SQLite failed, or the database file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("unexpected value in the database: {0}")]
    Decode(#[from] rusqlite::types::FromSqlError),
    #[error("cannot create the temporary database: {0}")]
    TempDir(#[from] std::io::Error),
    #[error("the store's lock was poisoned by a panic")]
    Poisoned,
    /// Another server has the database open: two schedulers on one database would run
    /// each other's runs, and neither would tell its streams.
    #[error("another groupflow server is using it (it holds {})", .0.display())]
    InUse(std::path::PathBuf),
    #[error("lock {}: {source}", .path.display())]
    Lock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("outputs file {}: {source}", .path.display())]
    Outputs {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// An error of the outputs file `file`.
    fn in_outputs(file: &Outputs, source: std::io::Error) -> StoreError {
        StoreError::Outputs {
            path: file.path().to_path_buf(),
            source,
        }
    }
}

/// Page size of a new database (an existing one keeps its own). A sim output is about
/// 2.6 KB of JSON, so a 4 KB page held one and left 1.4 KB empty; 16 KB pages hold six.
/// At 100k runs the database shrinks from 388 to 282 MB, and the server's CPU time falls
/// from 4.99 to 4.06 s (one binary, the two page sizes alternated, medians of five runs of
/// `benches/vs_parallel_cli.sh`'s pipeline). Outputs have since moved to a file of their own
/// (see [`super::outputs`]), and 16 KB pages still do better than 4 KB: server CPU at 100k
/// runs 2.40–2.81 s against 2.69–3.30 s (five alternated pairs).
const PAGE_SIZE: i64 = 16384;

/// How much of the database file connections read through a memory map.
const MMAP_BYTES: i64 = 1 << 32;

/// A transaction's output records are gathered in a buffer kept for the next one, unless
/// it grew past this.
const RECORDS_KEPT: usize = 16 << 20;

/// How often an active group gets a `task_group_status` event while runs finish.
const STATUS_EVENT_EVERY: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS groups (
  gseq INTEGER PRIMARY KEY,
  tag TEXT NOT NULL,
  metadata TEXT,
  created_at TEXT NOT NULL,
  modified_at TEXT NOT NULL,
  num_runs INTEGER NOT NULL DEFAULT 0,
  n_queued INTEGER NOT NULL DEFAULT 0,
  n_running INTEGER NOT NULL DEFAULT 0,
  n_completed INTEGER NOT NULL DEFAULT 0,
  n_failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS specs (
  spec_id INTEGER PRIMARY KEY,
  json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
  seq INTEGER PRIMARY KEY,
  tag TEXT NOT NULL,
  gseq INTEGER,
  status INTEGER NOT NULL,
  processor TEXT NOT NULL,
  metadata TEXT,
  input TEXT NOT NULL,
  spec_id INTEGER,
  output TEXT, -- only databases written before run_outputs existed fill this
  error TEXT,
  created_at TEXT NOT NULL,
  modified_at TEXT NOT NULL,
  out_at INTEGER, -- where the output's record starts in the outputs file (see outputs.rs)
  out_len INTEGER -- and the output's length in bytes
);
CREATE INDEX IF NOT EXISTS runs_by_group ON runs(gseq);
-- Only databases written before the outputs file existed fill this.
CREATE TABLE IF NOT EXISTS run_outputs (
  seq INTEGER PRIMARY KEY,
  output TEXT NOT NULL
);
-- One row: where the outputs file ends after the last commit that added outputs.
CREATE TABLE IF NOT EXISTS outputs_file (
  id INTEGER PRIMARY KEY CHECK (id = 0),
  ends_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_queued ON runs(seq) WHERE status = 0;
CREATE INDEX IF NOT EXISTS runs_running ON runs(seq) WHERE status = 2;
CREATE TABLE IF NOT EXISTS events (
  eseq INTEGER PRIMARY KEY,
  gseq INTEGER NOT NULL,
  run_seq INTEGER,
  status INTEGER,
  at TEXT NOT NULL,
  payload TEXT
);
CREATE INDEX IF NOT EXISTS events_by_group ON events(gseq);
";

/// A group as stored.
#[derive(Clone, Debug)]
pub struct GroupRow {
    pub gseq: i64,
    pub tag: String,
    pub metadata: Option<String>,
    pub created_at: String,
    pub counts: GroupCounts,
}

impl GroupRow {
    /// The wire id, `tgrp_…`.
    pub fn id(&self) -> String {
        wire::group_id(&self.tag, self.gseq)
    }
}

/// A run as stored, with its group's id and effective task spec.
#[derive(Clone, Debug)]
pub struct RunRow {
    pub seq: i64,
    pub tag: String,
    pub group_id: Option<String>,
    pub status: StatusCode,
    pub processor: String,
    pub metadata: Option<String>,
    pub input: String,
    pub spec: Option<String>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub modified_at: String,
}

impl RunRow {
    /// The run as a `TaskRun` JSON object.
    pub fn run_json(&self) -> String {
        let mut out = String::with_capacity(256);
        self.view().write_json(&mut out);
        out
    }

    /// The borrowed view the JSON writers use.
    pub fn view(&self) -> RunView<'_> {
        RunView {
            tag: &self.tag,
            seq: self.seq,
            status: self.status,
            processor: &self.processor,
            metadata: self.metadata.as_deref(),
            group_id: self.group_id.as_deref(),
            error: self.error.as_deref(),
            created_at: &self.created_at,
            modified_at: &self.modified_at,
        }
    }
}

/// A run to insert: its stored input JSON, metadata JSON and effective spec.
#[derive(Debug)]
pub struct NewRun {
    pub processor: String,
    pub metadata: Option<String>,
    pub input: String,
    pub spec: SpecChoice,
    /// How it ended, when it was executed as it came in: it is stored ended, never queued.
    pub outcome: Option<Outcome>,
}

/// Which task spec a new run executes.
#[derive(Debug)]
pub enum SpecChoice {
    /// None given: the output schema is automatic.
    None,
    /// The request's `default_task_spec`.
    Default,
    /// The run's own `task_spec`, as JSON text.
    Own(String),
}

/// What an add-runs transaction produced.
#[derive(Debug)]
pub struct AddedRuns {
    pub run_ids: Vec<String>,
    pub run_cursor: Option<String>,
    pub event_cursor: Option<String>,
    pub counts: GroupCounts,
}

/// A run the scheduler took to execute.
#[derive(Debug)]
pub struct Claimed {
    pub seq: i64,
    pub gseq: Option<i64>,
    pub processor: String,
    pub input: String,
    pub spec_id: Option<i64>,
    pub spec: Option<String>,
}

/// How an executed run ended: output JSON, or error JSON.
#[derive(Debug)]
pub enum Outcome {
    Completed(String),
    Failed(String),
}

/// A finished run handed back by the scheduler.
#[derive(Debug)]
pub struct Finished {
    pub seq: i64,
    pub gseq: Option<i64>,
    pub outcome: Outcome,
}

/// One page of SSE text, with the cursor of its last event and where each event ends.
#[derive(Debug, Default)]
pub struct Page {
    pub text: String,
    /// Byte offset just past each event in `text`.
    pub ends: Vec<usize>,
    pub last: Option<i64>,
    /// Only for event pages: whether the group still had active runs when read.
    pub active: bool,
}

/// The database: a writer and a pool of readers.
pub struct Store {
    writer: Mutex<Writer>,
    readers: Mutex<Vec<Connection>>,
    outputs: Arc<Outputs>,
    _checkpoints: Checkpointer,
    path: std::path::PathBuf,
    // Held while the store is open (see `StoreError::InUse`).
    _lock: Option<std::fs::File>,
    // Keeps the temporary database alive when no file was given.
    _temp: Option<tempfile::TempDir>,
    // Last, so dropped last: says the store is closed, its lock released (see
    // [`Store::closed`]).
    closed: Closed,
}

/// Set when the store it belongs to has been dropped whole. The last `Arc` of a store can
/// be gone while its fields are still being dropped on another thread (the checkpoint
/// thread joined, then the lock released): a server restarted on the same file in that
/// moment found the lock still held.
struct Closed(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

struct Writer {
    conn: Connection,
    last_status_event: HashMap<i64, Instant>,
    /// Where the next output record goes in the outputs file.
    outputs_end: u64,
    /// The records of a transaction's outputs, written together before it commits.
    records: Vec<u8>,
}

/// Takes the lock of the database at `path` (`<path>.lock`, beside it), held until the
/// returned file is dropped.
fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    // Named from the database's real path, so another path to it (a symlink to the file,
    // `..`) finds the same lock; a database not made yet is named from its real folder.
    let real = match path.canonicalize() {
        Ok(real) => real,
        Err(_) => {
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let folder = folder.canonicalize().map_err(|source| StoreError::Lock {
                path: folder.to_path_buf(),
                source,
            })?;
            folder.join(path.file_name().unwrap_or_default())
        }
    };
    let mut name = real.into_os_string();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let file = std::fs::File::create(&lock_path).map_err(|source| StoreError::Lock {
        path: lock_path.clone(),
        source,
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(lock_path)),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Lock {
            path: lock_path,
            source,
        }),
    }
}

/// Room in each connection's statement cache: the writer runs about twenty distinct
/// statements, and rusqlite's default of 16 had each transaction prepare some of them anew.
const STATEMENTS_CACHED: usize = 64;

/// Settings every connection of the store gets.
///
/// The query planner stability guarantee (QPSG) keeps a statement's plan independent of
/// the values bound to it. Without it, SQLite 3.54 plans `LIMIT ?n` (and `col = ?n` bound
/// to 0 or 1) for the bound value, and so prepares the statement again whenever the value
/// is bound anew: each page of a stream, each claim and each batch of added runs prepared a
/// statement twice: 3.9% of the server's CPU at 100k runs.
fn tune(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
    Ok(())
}

fn open_conn(path: &Path, durable: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    tune(&conn)?;
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if durable { "NORMAL" } else { "OFF" })?;
    // The writer's 64 MiB page cache holds the runs a batch updates.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    Ok(conn)
}

/// Pages of WAL that make a checkpoint due (see [`Checkpointer`]): not SQLite's 1000 but
/// 4096 (64 MiB with 16 KB pages, 16 MiB in databases made with 4 KB pages), so that pages
/// touched by several batches are written back once.
const CHECKPOINT_PAGES: i32 = 4096;

impl Drop for Store {
    /// A store that closes cleanly leaves the outputs file synced, with its mark at the end:
    /// the next open has nothing to check. (Not done by the file itself: a store that fails
    /// to open must leave the mark where it was.)
    fn drop(&mut self) {
        self.outputs.sync_mark_or_warn();
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, or a private temporary one.
    ///
    /// "In memory" is a temporary file deleted on drop: SQLite's shared in-memory databases
    /// lock whole tables, which would stall streams behind the scheduler's writes.
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let (path, temp, durable) = match path {
            Some(p) => (p.to_path_buf(), None, true),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("groupflow-serve")
                    .tempdir()?;
                (dir.path().join("state.sqlite"), Some(dir), false)
            }
        };
        let lock = if durable { Some(lock(&path)?) } else { None };
        let mut conn = open_conn(&path, durable)?;
        conn.execute_batch(SCHEMA)?;
        add_output_columns(&conn)?;
        // Named from the database's real path, as SQLite names its log (a symlink to the
        // database finds the same outputs).
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        let outputs_path = outputs::path_for(&real);
        let in_outputs = |source| StoreError::Outputs {
            path: outputs_path.clone(),
            source,
        };
        let opened = Outputs::open(outputs_path.clone(), durable).map_err(in_outputs)?;
        let outputs = Arc::new(opened.outputs);
        // Outputs the database points at, past what is known to be on disk, are checked.
        let trusted = opened.mark.min(opened.end);
        let ends_at: Option<i64> = conn
            .query_row("SELECT ends_at FROM outputs_file", [], |r| r.get(0))
            .optional()?;
        if ends_at.is_some_and(|e| e as u64 > trusted) {
            let lost = requeue_lost_outputs(&mut conn, &outputs, trusted)?;
            if lost > 0 {
                tracing::warn!(
                    runs = lost,
                    file = %outputs_path.display(),
                    "outputs that never reached the disk before the server stopped: those runs are queued again"
                );
            }
        }
        outputs.sync_mark().map_err(in_outputs)?;
        let synced = outputs.clone();
        let checkpoints = Checkpointer::start(&mut conn, &path, CHECKPOINT_PAGES, move || {
            synced.sync_mark_or_warn()
        })?;
        Ok(Store {
            writer: Mutex::new(Writer {
                conn,
                last_status_event: HashMap::new(),
                outputs_end: opened.end,
                records: Vec::new(),
            }),
            readers: Mutex::new(Vec::new()),
            outputs,
            _checkpoints: checkpoints,
            path,
            _lock: lock,
            _temp: temp,
            closed: Closed(Arc::default()),
        })
    }

    /// Becomes true once this store has been dropped whole: its connections closed, its
    /// checkpoint thread ended and its lock released.
    pub fn closed(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.closed.0.clone()
    }

    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut w = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut w)
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().map_err(|_| StoreError::Poisoned)?.pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path)?;
                tune(&c)?;
                // Pages are read through the map, not copied by `pread`.
                c.pragma_update(None, "mmap_size", MMAP_BYTES)?;
                c
            }
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.readers.lock()
            && pool.len() < 16
        {
            pool.push(conn);
        }
        result
    }

    /// Creates a group.
    pub fn create_group(&self, metadata: Option<String>) -> Result<GroupRow, StoreError> {
        let tag = wire::random_tag();
        let now = crate::api::now_rfc3339();
        self.with_writer(|w| {
            w.conn
                .prepare_cached(
                    "INSERT INTO groups (tag, metadata, created_at, modified_at) VALUES (?1, ?2, ?3, ?3)",
                )?
                .execute(params![tag, metadata, now])?;
            Ok(GroupRow {
                gseq: w.conn.last_insert_rowid(),
                tag,
                metadata,
                created_at: now.clone(),
                counts: GroupCounts {
                    modified_at: now,
                    ..GroupCounts::default()
                },
            })
        })
    }

    /// A group by its sequence and tag.
    pub fn group(&self, gseq: i64, tag: &str) -> Result<Option<GroupRow>, StoreError> {
        self.with_reader(|c| read_group(c, gseq, tag))
    }

    /// Adds runs to a group in one transaction; `None` when the group does not exist.
    pub fn add_runs(
        &self,
        gseq: i64,
        gtag: &str,
        default_spec: Option<&str>,
        runs: Vec<NewRun>,
    ) -> Result<Option<AddedRuns>, StoreError> {
        let now = crate::api::now_rfc3339();
        self.with_writer(|w| {
            let tx = w.conn.transaction()?;
            let Some(group) = read_group(&tx, gseq, gtag)? else {
                return Ok(None);
            };
            let last_run: Option<i64> = tx
                .prepare_cached("SELECT MAX(seq) FROM runs WHERE gseq = ?1")?
                .query_row([gseq], |r| r.get(0))?;
            let last_event: Option<i64> = tx
                .prepare_cached("SELECT MAX(eseq) FROM events WHERE gseq = ?1")?
                .query_row([gseq], |r| r.get(0))?;
            let mut run_ids = Vec::with_capacity(runs.len());
            // Runs are numbered here rather than by the insert: an output's record in the
            // outputs file names its run, and is written before the run's row.
            let mut next_seq: i64 = tx
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs")?
                .query_row([], |r| r.get(0))?;
            let mut ended = (0i64, 0i64);
            w.records.clear();
            {
                let mut spec_ids: HashMap<String, i64> = HashMap::new();
                let mut insert_spec = tx.prepare_cached("INSERT INTO specs (json) VALUES (?1)")?;
                let mut spec_id = |text: &str| -> Result<i64, rusqlite::Error> {
                    if let Some(id) = spec_ids.get(text) {
                        return Ok(*id);
                    }
                    insert_spec.execute([text])?;
                    let id = tx.last_insert_rowid();
                    spec_ids.insert(text.to_string(), id);
                    Ok(id)
                };
                {
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO runs (seq, tag, gseq, status, processor, metadata, input,
                                       spec_id, error, out_at, out_len, created_at, modified_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
                    )?;
                    let mut event = tx.prepare_cached(
                        "INSERT INTO events (gseq, run_seq, status, at) VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    // The batch's default spec is looked up once, not hashed again for each run.
                    let default_id = match default_spec {
                        Some(text)
                            if runs.iter().any(|r| matches!(r.spec, SpecChoice::Default)) =>
                        {
                            Some(spec_id(text)?)
                        }
                        _ => None,
                    };
                    for run in &runs {
                        let sid = match &run.spec {
                            SpecChoice::None => None,
                            SpecChoice::Default => default_id,
                            SpecChoice::Own(text) => Some(spec_id(text)?),
                        };
                        let tag = wire::random_tag();
                        let seq = next_seq;
                        next_seq += 1;
                        let (status, error, out) = match &run.outcome {
                            None => (StatusCode::Queued, None, None),
                            Some(Outcome::Completed(out)) => {
                                let at = Outputs::encode(&mut w.records, w.outputs_end, seq, out);
                                (
                                    StatusCode::Completed,
                                    None,
                                    Some((at as i64, out.len() as i64)),
                                )
                            }
                            Some(Outcome::Failed(err)) => (StatusCode::Failed, Some(err), None),
                        };
                        insert.execute(params![
                            seq,
                            tag,
                            gseq,
                            status as i64,
                            run.processor,
                            run.metadata,
                            run.input,
                            sid,
                            error,
                            out.map(|o| o.0),
                            out.map(|o| o.1),
                            now
                        ])?;
                        if status != StatusCode::Queued {
                            event.execute(params![gseq, seq, status as i64, now])?;
                            if status == StatusCode::Completed {
                                ended.0 += 1;
                            } else {
                                ended.1 += 1;
                            }
                        }
                        run_ids.push(wire::run_id(&tag, seq));
                    }
                }
            }
            let n = runs.len() as i64;
            let (completed, failed) = ended;
            let mut counts = group.counts;
            counts.num_runs += n;
            counts.queued += n - completed - failed;
            counts.completed += completed;
            counts.failed += failed;
            counts.modified_at = now.clone();
            tx.prepare_cached(
                "UPDATE groups SET num_runs = num_runs + ?2, n_queued = n_queued + ?2 - ?4 - ?5,
                 n_completed = n_completed + ?4, n_failed = n_failed + ?5,
                 modified_at = ?3 WHERE gseq = ?1",
            )?
            .execute(params![gseq, n, now, completed, failed])?;
            if n > 0 {
                insert_status_event(&tx, gseq, &counts, &now)?;
            }
            append_outputs(&mut w.records, &mut w.outputs_end, &self.outputs, &tx)?;
            tx.commit()?;
            Ok(Some(AddedRuns {
                run_ids,
                run_cursor: last_run.map(|s| s.to_string()),
                event_cursor: last_event.map(|s| s.to_string()),
                counts,
            }))
        })
    }

    /// Creates a run outside any group.
    pub fn create_run(&self, run: NewRun) -> Result<RunRow, StoreError> {
        let now = crate::api::now_rfc3339();
        let tag = wire::random_tag();
        self.with_writer(|w| {
            let tx = w.conn.transaction()?;
            let spec = match &run.spec {
                SpecChoice::Own(text) => Some(text.clone()),
                _ => None,
            };
            let sid = match &spec {
                Some(text) => {
                    tx.prepare_cached("INSERT INTO specs (json) VALUES (?1)")?
                        .execute([text])?;
                    Some(tx.last_insert_rowid())
                }
                None => None,
            };
            tx.prepare_cached(
                "INSERT INTO runs (tag, gseq, status, processor, metadata, input, spec_id, created_at, modified_at)
                 VALUES (?1, NULL, 0, ?2, ?3, ?4, ?5, ?6, ?6)",
            )?
            .execute(params![tag, run.processor, run.metadata, run.input, sid, now])?;
            let seq = tx.last_insert_rowid();
            tx.commit()?;
            Ok(RunRow {
                seq,
                tag,
                group_id: None,
                status: StatusCode::Queued,
                processor: run.processor,
                metadata: run.metadata,
                input: run.input,
                spec,
                output: None,
                error: None,
                created_at: now.clone(),
                modified_at: now,
            })
        })
    }

    /// A run by its sequence and tag, with its input, spec and output.
    pub fn run(&self, seq: i64, tag: &str) -> Result<Option<RunRow>, StoreError> {
        self.with_reader(|c| {
            let row = c
                .prepare_cached(
                    "SELECT r.status, r.processor, r.metadata, r.input, s.json,
                            CASE WHEN r.out_at IS NULL
                                 THEN COALESCE((SELECT output FROM run_outputs WHERE seq = r.seq), r.output)
                            END, r.error, r.created_at, r.modified_at, g.tag, r.gseq,
                            r.out_at, r.out_len
                     FROM runs r LEFT JOIN specs s ON s.spec_id = r.spec_id
                     LEFT JOIN groups g ON g.gseq = r.gseq
                     WHERE r.seq = ?1 AND r.tag = ?2",
                )?
                .query_row(params![seq, tag], |r| {
                    let gtag: Option<String> = r.get(9)?;
                    let gseq: Option<i64> = r.get(10)?;
                    let stored: Option<(i64, i64)> = r.get::<_, Option<i64>>(11)?.zip(r.get(12)?);
                    Ok((stored, RunRow {
                        seq,
                        tag: tag.to_string(),
                        group_id: gtag.zip(gseq).map(|(t, g)| wire::group_id(&t, g)),
                        status: StatusCode::from_i64(r.get(0)?),
                        processor: r.get(1)?,
                        metadata: r.get(2)?,
                        input: r.get(3)?,
                        spec: r.get(4)?,
                        output: r.get(5)?,
                        error: r.get(6)?,
                        created_at: r.get(7)?,
                        modified_at: r.get(8)?,
                    }))
                })
                .optional()?;
            let Some((stored, mut row)) = row else {
                return Ok(None);
            };
            if let Some((at, len)) = stored {
                let mut buf = outputs::ReadBuf::default();
                row.output = Some(self.read_output(seq, at, len, &mut buf)?.to_string());
            }
            Ok(Some(row))
        })
    }

    /// Run `seq`'s output from the outputs file, where its row says it is.
    fn read_output<'a>(
        &self,
        seq: i64,
        at: i64,
        len: i64,
        buf: &'a mut outputs::ReadBuf,
    ) -> Result<&'a str, StoreError> {
        self.outputs
            .read(seq, at as u64, len as u64, buf)
            .map_err(|e| StoreError::in_outputs(&self.outputs, e))
    }

    /// Runs that were executing when the server stopped, in the order added.
    pub fn running(&self) -> Result<Vec<Claimed>, StoreError> {
        self.with_writer(|w| {
            let mut stmt = w.conn.prepare_cached(
                "SELECT r.seq, r.gseq, r.processor, r.input, r.spec_id, s.json
                 FROM runs r LEFT JOIN specs s ON s.spec_id = r.spec_id
                 WHERE r.status = 2 ORDER BY r.seq",
            )?;
            let rows = stmt.query_map([], claimed_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Moves up to `n` queued runs, oldest first, to `running`, in one transaction.
    pub fn claim(&self, n: usize) -> Result<Vec<Claimed>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let now = crate::api::now_rfc3339();
        self.with_writer(|w| {
            let tx = w.conn.transaction()?;
            let claimed = claim_in(&tx, n, &now)?;
            if !claimed.is_empty() {
                tx.commit()?;
            }
            Ok(claimed)
        })
    }

    /// Records finished runs and then claims up to `claim` queued runs (see
    /// [`Store::claim`]), in one transaction: each commit rewrites every page it touched,
    /// so the slots the finished runs free are refilled in the same one. Groups that became
    /// inactive get a final `task_group_status` event, active ones one at most every
    /// [`STATUS_EVENT_EVERY`].
    pub fn finish(&self, finished: &[Finished], claim: usize) -> Result<Vec<Claimed>, StoreError> {
        if finished.is_empty() {
            return self.claim(claim);
        }
        let now = crate::api::now_rfc3339();
        self.with_writer(|w| {
            let tx = w.conn.transaction()?;
            let mut per_group: HashMap<i64, (i64, i64)> = HashMap::new();
            let mut evented = Vec::new();
            {
                let mut done = tx.prepare_cached(
                    "UPDATE runs SET status = 3, modified_at = ?2, out_at = ?3, out_len = ?4
                     WHERE seq = ?1 AND status = 2",
                )?;
                let mut failed = tx.prepare_cached(
                    "UPDATE runs SET status = 4, error = ?2, modified_at = ?3 WHERE seq = ?1 AND status = 2",
                )?;
                let mut event = tx.prepare_cached(
                    "INSERT INTO events (gseq, run_seq, status, at) VALUES (?1, ?2, ?3, ?4)",
                )?;
                w.records.clear();
                for f in finished {
                    let (changed, code) = match &f.outcome {
                        Outcome::Completed(out) => {
                            // The record is written whether or not the run changes: a
                            // second outcome for a run only leaves unreferenced bytes.
                            let at = Outputs::encode(&mut w.records, w.outputs_end, f.seq, out);
                            let len = out.len() as i64;
                            (done.execute(params![f.seq, now, at as i64, len])?, 3)
                        }
                        Outcome::Failed(err) => (failed.execute(params![f.seq, err, now])?, 4),
                    };
                    // A run finishes once: a second outcome for it changes nothing.
                    if changed == 0 {
                        continue;
                    }
                    if let Some(g) = f.gseq {
                        event.execute(params![g, f.seq, code, now])?;
                        let e = per_group.entry(g).or_default();
                        if code == 3 {
                            e.0 += 1;
                        } else {
                            e.1 += 1;
                        }
                    }
                }
            }
            for (g, (completed, failed)) in &per_group {
                tx.prepare_cached(
                    "UPDATE groups SET n_running = n_running - ?2 - ?3, n_completed = n_completed + ?2,
                     n_failed = n_failed + ?3, modified_at = ?4 WHERE gseq = ?1",
                )?
                .execute(params![g, completed, failed, now])?;
                let counts = read_counts(&tx, *g)?;
                let due = w
                    .last_status_event
                    .get(g)
                    .is_none_or(|t| t.elapsed() >= STATUS_EVENT_EVERY);
                if !counts.is_active() || due {
                    insert_status_event(&tx, *g, &counts, &now)?;
                    evented.push(*g);
                }
            }
            let claimed = if claim > 0 {
                claim_in(&tx, claim, &now)?
            } else {
                Vec::new()
            };
            append_outputs(&mut w.records, &mut w.outputs_end, &self.outputs, &tx)?;
            tx.commit()?;
            // Only once committed: a transaction that fails is tried again whole.
            for g in evented {
                w.last_status_event.insert(g, Instant::now());
            }
            if w.last_status_event.len() > 10_000 {
                w.last_status_event
                    .retain(|_, t| t.elapsed() < STATUS_EVENT_EVERY);
            }
            Ok(claimed)
        })
    }

    /// Up to `limit` runs of a group after cursor `after`, in the order added, as SSE text.
    pub fn runs_page(
        &self,
        group: &GroupRow,
        after: i64,
        status: Option<StatusCode>,
        include_input: bool,
        include_output: bool,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let gid = group.id();
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(RUNS_PAGE)?;
            let mut rows = stmt.query(params![
                group.gseq,
                after,
                status.map(|s| s as i64),
                include_input,
                include_output,
                limit as i64
            ])?;
            let mut page = Page {
                text: String::with_capacity(limit * 512),
                ..Page::default()
            };
            let mut buf = outputs::ReadBuf::default();
            while let Some(r) = rows.next()? {
                let seq: i64 = r.get(0)?;
                let tag = r.get_ref(1)?.as_str()?;
                let status = StatusCode::from_i64(r.get(2)?);
                let view = RunView {
                    tag,
                    seq,
                    status,
                    processor: r.get_ref(3)?.as_str()?,
                    metadata: r.get_ref(4)?.as_str_or_null()?,
                    group_id: Some(&gid),
                    error: r.get_ref(5)?.as_str_or_null()?,
                    created_at: r.get_ref(6)?.as_str()?,
                    modified_at: r.get_ref(7)?.as_str()?,
                };
                let input = r.get_ref(8)?.as_str_or_null()?;
                let output = match (status, r.get::<_, Option<i64>>(10)?) {
                    (StatusCode::Completed, Some(at)) => {
                        Some(self.read_output(seq, at, r.get(11)?, &mut buf)?)
                    }
                    (StatusCode::Completed, None) => r.get_ref(9)?.as_str_or_null()?,
                    _ => None,
                };
                wire::write_run_event(&mut page.text, seq, &view, input, output);
                page.ends.push(page.text.len());
                page.last = Some(seq);
            }
            Ok(page)
        })
    }

    /// Up to `limit` events of a group after cursor `after`, as SSE text, read in one
    /// snapshot together with whether the group is still active.
    pub fn events_page(
        &self,
        group: &GroupRow,
        after: i64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let gid = group.id();
        self.with_reader(|c| {
            let tx = c.unchecked_transaction()?;
            let mut page = Page::default();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT e.eseq, e.run_seq, e.status, e.at, e.payload,
                            r.tag, r.processor, r.metadata, r.error, r.created_at
                     FROM events e LEFT JOIN runs r ON r.seq = e.run_seq
                     WHERE e.gseq = ?1 AND e.eseq > ?2 ORDER BY e.eseq LIMIT ?3",
                )?;
                let mut rows = stmt.query(params![group.gseq, after, limit as i64])?;
                while let Some(r) = rows.next()? {
                    let eseq: i64 = r.get(0)?;
                    let run_seq: Option<i64> = r.get(1)?;
                    match run_seq {
                        None => {
                            let payload = r.get_ref(4)?.as_str_or_null()?.unwrap_or("{}");
                            wire::write_status_event(&mut page.text, eseq, payload);
                        }
                        Some(run_seq) => {
                            let status = StatusCode::from_i64(r.get(2)?);
                            let view = RunView {
                                tag: r.get_ref(5)?.as_str()?,
                                seq: run_seq,
                                status,
                                processor: r.get_ref(6)?.as_str()?,
                                metadata: r.get_ref(7)?.as_str_or_null()?,
                                group_id: Some(&gid),
                                error: if status == StatusCode::Failed {
                                    r.get_ref(8)?.as_str_or_null()?
                                } else {
                                    None
                                },
                                created_at: r.get_ref(9)?.as_str()?,
                                modified_at: r.get_ref(3)?.as_str()?,
                            };
                            wire::write_run_event(&mut page.text, eseq, &view, None, None);
                        }
                    }
                    page.ends.push(page.text.len());
                    page.last = Some(eseq);
                }
            }
            page.active = read_counts(&tx, group.gseq)?.is_active();
            tx.commit()?;
            Ok(page)
        })
    }
}

/// Writes a transaction's output records to the end of the outputs file
/// and records in `tx` where the file now ends. The outputs are in the file before any
/// committed row points at them. Their place is never used again, even if the transaction
/// fails: bytes partly written there may lie below a mark moved since.
fn append_outputs(
    records: &mut Vec<u8>,
    outputs_end: &mut u64,
    outputs: &Outputs,
    tx: &rusqlite::Transaction<'_>,
) -> Result<(), StoreError> {
    if records.is_empty() {
        return Ok(());
    }
    let at = *outputs_end;
    *outputs_end += records.len() as u64;
    tx.prepare_cached(
        "INSERT INTO outputs_file (id, ends_at) VALUES (0, ?1)
         ON CONFLICT (id) DO UPDATE SET ends_at = excluded.ends_at",
    )?
    .execute([*outputs_end as i64])?;
    let written = outputs.write(records, at);
    if records.capacity() > RECORDS_KEPT {
        *records = Vec::new();
    }
    written.map_err(|e| StoreError::in_outputs(outputs, e))
}

/// The runs of a page of a group's runs stream.
const RUNS_PAGE: &str = "
    SELECT r.seq, r.tag, r.status, r.processor, r.metadata, r.error, r.created_at,
           r.modified_at, CASE WHEN ?4 THEN r.input END,
           CASE WHEN ?5 AND r.status = 3 AND r.out_at IS NULL
                THEN COALESCE((SELECT output FROM run_outputs WHERE seq = r.seq), r.output)
           END,
           CASE WHEN ?5 THEN r.out_at END, r.out_len
    FROM runs r
    WHERE r.gseq = ?1 AND r.seq > ?2 AND (?3 IS NULL OR r.status = ?3)
    ORDER BY r.seq LIMIT ?6";

/// Adds the outputs file's columns to a `runs` table made before that file existed.
fn add_output_columns(c: &Connection) -> Result<(), StoreError> {
    let has: bool = c.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('runs') WHERE name = 'out_at'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        c.execute_batch(
            "BEGIN;
             ALTER TABLE runs ADD COLUMN out_at INTEGER;
             ALTER TABLE runs ADD COLUMN out_len INTEGER;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// Queues again the completed runs whose outputs, past byte `from` of the outputs file, are
/// cut off or damaged (see [`outputs`]), and returns how many there were.
fn requeue_lost_outputs(
    c: &mut Connection,
    file: &Outputs,
    from: u64,
) -> Result<usize, StoreError> {
    let mut lost = Vec::new();
    {
        let mut stmt = c.prepare(
            "SELECT seq, gseq, out_at, out_len FROM runs WHERE out_at + ?2 + out_len > ?1",
        )?;
        let mut rows = stmt.query(params![from as i64, outputs::CRC_BYTES as i64])?;
        let mut buf = outputs::ReadBuf::default();
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let (at, len): (i64, i64) = (r.get(2)?, r.get(3)?);
            match file.read(seq, at as u64, len as u64, &mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    lost.push((seq, r.get::<_, Option<i64>>(1)?));
                }
                Err(e) => return Err(StoreError::in_outputs(file, e)),
            }
        }
    }
    if lost.is_empty() {
        return Ok(0);
    }
    // Durable before the file's mark moves past the damaged records.
    let synchronous: i64 = c.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    c.pragma_update(None, "synchronous", "FULL")?;
    let now = crate::api::now_rfc3339();
    let tx = c.transaction()?;
    for (seq, gseq) in &lost {
        tx.execute(
            "UPDATE runs SET status = 0, out_at = NULL, out_len = NULL, modified_at = ?2
             WHERE seq = ?1",
            params![seq, now],
        )?;
        if let Some(g) = gseq {
            tx.execute(
                "UPDATE groups SET n_completed = n_completed - 1, n_queued = n_queued + 1,
                 modified_at = ?2 WHERE gseq = ?1",
                params![g, now],
            )?;
        }
    }
    tx.commit()?;
    c.pragma_update(None, "synchronous", synchronous)?;
    Ok(lost.len())
}

/// The oldest queued runs, with what it takes to execute them.
const CLAIM: &str = "
    SELECT r.seq, r.gseq, r.processor, r.input, r.spec_id, s.json
    FROM runs r LEFT JOIN specs s ON s.spec_id = r.spec_id
    WHERE r.status = 0 ORDER BY r.seq LIMIT ?1";

/// Moves up to `n` queued runs, oldest first, to `running`, within `tx`.
fn claim_in(
    tx: &rusqlite::Transaction<'_>,
    n: usize,
    now: &str,
) -> Result<Vec<Claimed>, StoreError> {
    let claimed = {
        let mut stmt = tx.prepare_cached(CLAIM)?;
        let rows = stmt.query_map([n as i64], claimed_from_row)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    if claimed.is_empty() {
        return Ok(claimed);
    }
    let mut per_group: HashMap<i64, i64> = HashMap::new();
    {
        let mut update =
            tx.prepare_cached("UPDATE runs SET status = 2, modified_at = ?2 WHERE seq = ?1")?;
        let mut event = tx.prepare_cached(
            "INSERT INTO events (gseq, run_seq, status, at) VALUES (?1, ?2, 2, ?3)",
        )?;
        for c in &claimed {
            update.execute(params![c.seq, now])?;
            if let Some(g) = c.gseq {
                event.execute(params![g, c.seq, now])?;
                *per_group.entry(g).or_default() += 1;
            }
        }
    }
    {
        let mut update = tx.prepare_cached(
            "UPDATE groups SET n_queued = n_queued - ?2, n_running = n_running + ?2,
             modified_at = ?3 WHERE gseq = ?1",
        )?;
        for (g, k) in &per_group {
            update.execute(params![g, k, now])?;
        }
    }
    Ok(claimed)
}

fn claimed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Claimed> {
    Ok(Claimed {
        seq: r.get(0)?,
        gseq: r.get(1)?,
        processor: r.get(2)?,
        input: r.get(3)?,
        spec_id: r.get(4)?,
        spec: r.get(5)?,
    })
}

fn read_group(c: &Connection, gseq: i64, tag: &str) -> Result<Option<GroupRow>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT metadata, created_at, modified_at, num_runs, n_queued, n_running, n_completed, n_failed
             FROM groups WHERE gseq = ?1 AND tag = ?2",
        )?
        .query_row(params![gseq, tag], |r| {
            Ok(GroupRow {
                gseq,
                tag: tag.to_string(),
                metadata: r.get(0)?,
                created_at: r.get(1)?,
                counts: GroupCounts {
                    modified_at: r.get(2)?,
                    num_runs: r.get(3)?,
                    queued: r.get(4)?,
                    running: r.get(5)?,
                    completed: r.get(6)?,
                    failed: r.get(7)?,
                },
            })
        })
        .optional()?;
    Ok(row)
}

fn read_counts(c: &Connection, gseq: i64) -> Result<GroupCounts, StoreError> {
    Ok(c.prepare_cached(
        "SELECT modified_at, num_runs, n_queued, n_running, n_completed, n_failed FROM groups WHERE gseq = ?1",
    )?
    .query_row([gseq], |r| {
        Ok(GroupCounts {
            modified_at: r.get(0)?,
            num_runs: r.get(1)?,
            queued: r.get(2)?,
            running: r.get(3)?,
            completed: r.get(4)?,
            failed: r.get(5)?,
        })
    })?)
}

fn insert_status_event(
    c: &Connection,
    gseq: i64,
    counts: &GroupCounts,
    now: &str,
) -> Result<(), StoreError> {
    let mut payload = String::with_capacity(200);
    counts.write_json(&mut payload);
    c.prepare_cached("INSERT INTO events (gseq, at, payload) VALUES (?1, ?2, ?3)")?
        .execute(params![gseq, now, payload])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_is_set_once_the_store_is_dropped_and_its_lock_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        // A store with a run written, so its checkpoint thread has work to end with.
        let store = Store::open(Some(&path)).unwrap();
        let g = store.create_group(None).unwrap();
        let closed = store.closed();
        assert!(!closed.load(std::sync::atomic::Ordering::Acquire));
        assert!(matches!(
            Store::open(Some(&path)),
            Err(StoreError::InUse(_))
        ));
        // Dropped on another thread, as a request's blocking work can be: whoever sees the
        // flag set can open the file at once.
        let dropper = std::thread::spawn(move || drop(store));
        while !closed.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::yield_now();
        }
        let reopened = Store::open(Some(&path)).unwrap();
        assert!(reopened.group(g.gseq, &g.tag).unwrap().is_some());
        dropper.join().unwrap();
    }

    #[test]
    fn statements_are_not_prepared_again_when_new_values_are_bound() {
        use rusqlite::StatementStatus::RePrepare;
        let store = Store::open(None).unwrap();
        let g = store.create_group(None).unwrap();
        let run = || NewRun {
            processor: "core".into(),
            metadata: None,
            input: r#"{"input":"x","processor":"core"}"#.into(),
            spec: SpecChoice::None,
            outcome: None,
        };
        for n in 1..=3 {
            let runs = (0..n).map(|_| run()).collect();
            store.add_runs(g.gseq, &g.tag, None, runs).unwrap().unwrap();
        }
        // Claims and pages of different sizes bind new values to their `LIMIT`.
        assert_eq!(store.claim(1).unwrap().len(), 1);
        assert_eq!(store.claim(2).unwrap().len(), 2);
        assert_eq!(store.claim(5).unwrap().len(), 3);
        for (after, limit, want) in [(0, 2, 2), (0, 4, 4), (2, 10, 4)] {
            let page = store.runs_page(&g, after, None, true, true, limit).unwrap();
            assert_eq!(page.ends.len(), want);
        }
        let claims = store
            .with_writer(|w| Ok(w.conn.prepare_cached(CLAIM)?.get_status(RePrepare)))
            .unwrap();
        let pages = store
            .with_reader(|c| Ok(c.prepare_cached(RUNS_PAGE)?.get_status(RePrepare)))
            .unwrap();
        assert_eq!((claims, pages), (0, 0));
    }

    #[test]
    fn each_run_of_a_batch_keeps_the_spec_it_asked_for() {
        let store = Store::open(None).unwrap();
        let g = store.create_group(None).unwrap();
        let (default, own) = (r#"{"d":1}"#, r#"{"o":2}"#);
        let run = |spec| NewRun {
            processor: "core".into(),
            metadata: None,
            input: r#"{"input":"x","processor":"core"}"#.into(),
            spec,
            outcome: None,
        };
        let choices = || {
            vec![
                run(SpecChoice::Own(own.into())),
                run(SpecChoice::Default),
                run(SpecChoice::None),
                run(SpecChoice::Default),
                run(SpecChoice::Own(default.into())),
            ]
        };
        // The spec of each run of the group, in order.
        let specs = || -> Vec<Option<String>> {
            store
                .with_reader(|c| {
                    let mut q = c.prepare(
                        "SELECT s.json FROM runs r LEFT JOIN specs s ON s.spec_id = r.spec_id
                         WHERE r.gseq = ?1 ORDER BY r.seq",
                    )?;
                    let rows = q.query_map([g.gseq], |r| r.get(0))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .unwrap()
        };
        let mut want = [Some(own), Some(default), None, Some(default), Some(default)]
            .map(|s| s.map(str::to_string))
            .to_vec();
        let added = store.add_runs(g.gseq, &g.tag, Some(default), choices());
        assert_eq!(added.unwrap().unwrap().run_ids.len(), 5);
        assert_eq!(specs(), want);
        // Without a default, a run that asks for it has none.
        let added = store.add_runs(g.gseq, &g.tag, None, vec![run(SpecChoice::Default)]);
        assert!(added.unwrap().is_some());
        want.push(None);
        assert_eq!(specs(), want);
        // One spec row per distinct text in a batch.
        let rows: i64 = store
            .with_reader(|c| Ok(c.query_row("SELECT count(*) FROM specs", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(rows, 2);
    }
}
