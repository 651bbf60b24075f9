//! The spill file: source rows wait here, in order and with their row keys (and the ledger
//! rows their claims found), while their runs execute, so the results can be joined back to
//! them without holding the table in memory.

use std::fs::File;
use std::io::{BufReader, BufWriter};
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
}

/// Writes source batches, each with its row keys, to a temporary Arrow IPC stream file.
pub struct SpillWriter {
    writer: StreamWriter<BufWriter<File>>,
    path: TempPath,
    schema: SchemaRef,
    rows: u64,
}

impl std::fmt::Debug for SpillWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillWriter")
            .field("path", &self.path.to_path_buf())
            .field("rows", &self.rows)
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
        let writer = StreamWriter::try_new(BufWriter::new(file), &schema).map_err(|source| {
            SpillError::Arrow {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(SpillWriter {
            writer,
            path,
            schema,
            rows: 0,
        })
    }

    /// Appends `batch` with one row key per row.
    pub fn write(&mut self, batch: &RecordBatch, row_keys: Vec<String>) -> Result<(), SpillError> {
        let rows = vec![None; row_keys.len()];
        self.write_with_rows(batch, row_keys, rows)
    }

    /// Appends `batch` with one row key and one ledger row (see [`LEDGER_ROW_COLUMN`]) per row.
    pub fn write_with_rows(
        &mut self,
        batch: &RecordBatch,
        row_keys: Vec<String>,
        ledger_rows: Vec<Option<i64>>,
    ) -> Result<(), SpillError> {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(StringArray::from(row_keys)));
        cols.push(Arc::new(Int64Array::from(ledger_rows)));
        let err = |source| SpillError::Arrow {
            path: self.path.to_path_buf(),
            source,
        };
        let spilled = RecordBatch::try_new(self.schema.clone(), cols).map_err(err)?;
        self.writer.write(&spilled).map_err(err)?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Closes the file; it is deleted when the returned [`Spill`] is dropped.
    pub fn finish(mut self) -> Result<Spill, SpillError> {
        let path = self.path.to_path_buf();
        self.writer
            .finish()
            .map_err(|source| SpillError::Arrow { path, source })?;
        Ok(Spill {
            path: self.path,
            rows: self.rows,
        })
    }
}

/// A finished spill file. Dropping it deletes the file.
#[derive(Debug)]
pub struct Spill {
    path: TempPath,
    rows: u64,
}

impl Spill {
    /// Rows in the file.
    pub fn rows(&self) -> u64 {
        self.rows
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
        Ok(SpillReader { reader, path })
    }
}

/// Iterates a spill file's batches.
pub struct SpillReader {
    reader: StreamReader<BufReader<File>>,
    path: PathBuf,
}

impl SpillReader {
    /// The next batch, or `None` at the end.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>, SpillError> {
        self.reader
            .next()
            .transpose()
            .map_err(|source| SpillError::Arrow {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    #[test]
    fn rows_come_back_in_order_and_the_file_goes_away() {
        let batch =
            RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef)])
                .unwrap();
        let mut w = SpillWriter::create(None, &batch.schema()).unwrap();
        w.write(&batch, vec!["0:a".into(), "1:b".into()]).unwrap();
        w.write(&batch.slice(1, 1), vec!["2:c".into()]).unwrap();
        let spill = w.finish().unwrap();
        assert_eq!(spill.rows(), 3);
        let path = spill.path.to_path_buf();
        let mut r = spill.reader().unwrap();
        let a = r.next_batch().unwrap().unwrap();
        assert_eq!(a.column(1).as_string::<i32>().value(1), "1:b");
        assert_eq!(a.column(2).null_count(), 2);
        let b = r.next_batch().unwrap().unwrap();
        assert_eq!(b.num_rows(), 1);
        assert!(r.next_batch().unwrap().is_none());
        drop(r);
        drop(spill);
        assert!(!path.exists());
    }
}
