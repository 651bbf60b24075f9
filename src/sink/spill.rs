//! The spill file: source rows wait here, in order and with their row keys (and the ledger
//! rows their claims found), while their runs execute, so the results can be joined back to
//! them without holding the table in memory. It can be read while it is written: a reader
//! gets each batch once it is whole on disk, and waits for the next until the writer
//! finishes (or stops without finishing, which the reader reports).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use tempfile::TempPath;

/// Name of the row-key column appended to spilled rows.
pub const ROW_KEY_COLUMN: &str = "__groupflow_row_key";
/// Name of the column after it: the ledger row each row's claim found (null: not known).
pub const LEDGER_ROW_COLUMN: &str = "__groupflow_ledger_row";

/// A spill file that could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spill file {path}: {source}")]
    Arrow {
        path: PathBuf,
        #[source]
        source: ArrowError,
    },
    /// The writer stopped before the end (the submission that wrote it failed).
    #[error("spill file {path}: its writer stopped before the last row")]
    Abandoned { path: PathBuf },
}

/// How far a spill's writer has got: whole batches on disk, their rows, and whether more
/// may come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    batches: u64,
    rows: u64,
    state: WriterState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriterState {
    Writing,
    Finished,
    Abandoned,
}

/// Writes source batches, each with its row keys, to a temporary Arrow IPC stream file.
pub struct SpillWriter {
    writer: StreamWriter<BufWriter<File>>,
    spill: Arc<Spill>,
    schema: SchemaRef,
    progress: Progress,
}

impl std::fmt::Debug for SpillWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillWriter")
            .field("path", &self.spill.path.to_path_buf())
            .field("rows", &self.progress.rows)
            .finish()
    }
}

impl SpillWriter {
    /// A new spill file in `dir` (the system temp dir when `None`) for rows of `source`.
    pub fn create(dir: Option<&Path>, source: &Schema) -> Result<Self, SpillError> {
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let file = tempfile::Builder::new()
            .prefix("groupflow-spill-")
            .suffix(".arrows")
            .tempfile_in(&dir)
            .map_err(|source| SpillError::Io {
                path: dir.clone(),
                source,
            })?;
        let (file, path) = file.into_parts();
        let mut fields: Vec<Field> = source.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(ROW_KEY_COLUMN, DataType::Utf8, false));
        fields.push(Field::new(LEDGER_ROW_COLUMN, DataType::Int64, true));
        let schema = Arc::new(Schema::new(fields));
        let arrow_err = |source| SpillError::Arrow {
            path: path.to_path_buf(),
            source,
        };
        let mut writer = StreamWriter::try_new(BufWriter::new(file), &schema).map_err(arrow_err)?;
        // The schema on disk: a reader starts with it.
        writer.get_mut().flush().map_err(|source| SpillError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let progress = Progress {
            batches: 0,
            rows: 0,
            state: WriterState::Writing,
        };
        Ok(SpillWriter {
            writer,
            spill: Arc::new(Spill {
                path,
                progress: tokio::sync::watch::Sender::new(progress),
            }),
            schema,
            progress,
        })
    }

    /// The file being written, for reading while it is.
    pub fn spill(&self) -> Arc<Spill> {
        self.spill.clone()
    }

    /// Appends `batch` with one row key per row.
    #[cfg(test)]
    pub fn write(&mut self, batch: &RecordBatch, row_keys: Vec<String>) -> Result<(), SpillError> {
        let rows = vec![None; row_keys.len()];
        self.write_with_rows(batch, row_keys, rows)
    }

    /// Appends `batch` with one row key and one ledger row (see [`LEDGER_ROW_COLUMN`]) per
    /// row, and makes it readable.
    pub fn write_with_rows(
        &mut self,
        batch: &RecordBatch,
        row_keys: Vec<String>,
        ledger_rows: Vec<Option<i64>>,
    ) -> Result<(), SpillError> {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(StringArray::from(row_keys)));
        cols.push(Arc::new(Int64Array::from(ledger_rows)));
        let path = || self.spill.path.to_path_buf();
        let spilled = RecordBatch::try_new(self.schema.clone(), cols).map_err(|source| {
            SpillError::Arrow {
                path: path(),
                source,
            }
        })?;
        self.writer
            .write(&spilled)
            .map_err(|source| SpillError::Arrow {
                path: path(),
                source,
            })?;
        self.writer
            .get_mut()
            .flush()
            .map_err(|source| SpillError::Io {
                path: path(),
                source,
            })?;
        self.progress.batches += 1;
        self.progress.rows += batch.num_rows() as u64;
        self.spill.progress.send_replace(self.progress);
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.progress.rows
    }

    /// Closes the file; it is deleted when the last [`Spill`] handle is dropped.
    pub fn finish(mut self) -> Result<Arc<Spill>, SpillError> {
        let path = self.spill.path.to_path_buf();
        self.writer
            .finish()
            .map_err(|source| SpillError::Arrow { path, source })?;
        self.progress.state = WriterState::Finished;
        self.spill.progress.send_replace(self.progress);
        Ok(self.spill.clone())
    }
}

impl Drop for SpillWriter {
    fn drop(&mut self) {
        if self.progress.state == WriterState::Writing {
            self.spill
                .progress
                .send_modify(|p| p.state = WriterState::Abandoned);
        }
    }
}

/// A spill file, finished or still being written. Dropping the last handle deletes the
/// file.
#[derive(Debug)]
pub struct Spill {
    path: TempPath,
    progress: tokio::sync::watch::Sender<Progress>,
}

impl Spill {
    /// Rows in the file so far.
    pub fn rows(&self) -> u64 {
        self.progress.borrow().rows
    }

    /// Reads the batches back in the order written; the last two columns hold the row keys
    /// and the ledger rows.
    pub fn reader(&self) -> Result<SpillReader, SpillError> {
        let path = self.path.to_path_buf();
        let file = File::open(&path).map_err(|source| SpillError::Io {
            path: path.clone(),
            source,
        })?;
        let reader = StreamReader::try_new(BufReader::new(file), None).map_err(|source| {
            SpillError::Arrow {
                path: path.clone(),
                source,
            }
        })?;
        Ok(SpillReader {
            reader,
            path,
            progress: self.progress.subscribe(),
            read: 0,
        })
    }
}

/// Iterates a spill file's batches, waiting for the writer where it has not got yet.
pub struct SpillReader {
    reader: StreamReader<BufReader<File>>,
    path: PathBuf,
    progress: tokio::sync::watch::Receiver<Progress>,
    /// Batches read so far.
    read: u64,
}

impl SpillReader {
    /// The next batch, once it is whole on disk; `None` at the end of a finished file.
    pub async fn next_batch(&mut self) -> Result<Option<RecordBatch>, SpillError> {
        loop {
            let written = *self.progress.borrow_and_update();
            if self.read < written.batches {
                self.read += 1;
                return match self.reader.next() {
                    Some(Ok(b)) => Ok(Some(b)),
                    Some(Err(source)) => Err(SpillError::Arrow {
                        path: self.path.clone(),
                        source,
                    }),
                    None => Err(SpillError::Io {
                        path: self.path.clone(),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    }),
                };
            }
            match written.state {
                WriterState::Finished => return Ok(None),
                WriterState::Abandoned => {
                    return Err(SpillError::Abandoned {
                        path: self.path.clone(),
                    });
                }
                // The sender lives in the `Spill`, which this reader's owner holds.
                WriterState::Writing => {
                    if self.progress.changed().await.is_err() {
                        return Err(SpillError::Abandoned {
                            path: self.path.clone(),
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    fn numbers(n: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from(n.to_vec())) as ArrayRef)])
            .unwrap()
    }

    #[tokio::test]
    async fn rows_come_back_in_order_and_the_file_goes_away() {
        let batch = numbers(&[1, 2]);
        let mut w = SpillWriter::create(None, &batch.schema()).unwrap();
        w.write(&batch, vec!["0:a".into(), "1:b".into()]).unwrap();
        w.write(&batch.slice(1, 1), vec!["2:c".into()]).unwrap();
        let spill = w.finish().unwrap();
        assert_eq!(spill.rows(), 3);
        let path = spill.path.to_path_buf();
        let mut r = spill.reader().unwrap();
        let a = r.next_batch().await.unwrap().unwrap();
        assert_eq!(a.column(1).as_string::<i32>().value(1), "1:b");
        assert_eq!(a.column(2).null_count(), 2);
        let b = r.next_batch().await.unwrap().unwrap();
        assert_eq!(b.num_rows(), 1);
        assert!(r.next_batch().await.unwrap().is_none());
        drop(r);
        drop(spill);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_reader_follows_the_writer_and_hears_when_it_stops() {
        let mut w = SpillWriter::create(None, &numbers(&[]).schema()).unwrap();
        let spill = w.spill();
        let mut r = spill.reader().unwrap();
        let reading = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(b) = r.next_batch().await.unwrap() {
                seen.push(
                    b.column(0)
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(0),
                );
            }
            seen
        });
        for i in 0..5 {
            // The reader has read every batch so far and waits for the next.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(!reading.is_finished());
            w.write(&numbers(&[i]), vec![format!("{i}:k")]).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(reading.await.unwrap(), vec![0, 1, 2, 3, 4]);

        // A writer dropped before it finishes: the rows written are read, then the error.
        let mut w = SpillWriter::create(None, &numbers(&[]).schema()).unwrap();
        w.write(&numbers(&[7]), vec!["0:k".into()]).unwrap();
        let spill = w.spill();
        let mut r = spill.reader().unwrap();
        drop(w);
        assert_eq!(r.next_batch().await.unwrap().unwrap().num_rows(), 1);
        assert!(matches!(
            r.next_batch().await,
            Err(SpillError::Abandoned { .. })
        ));
    }
}
