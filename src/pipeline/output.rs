//! Writing outputs atomically: Parquet (zstd), CSV or NDJSON, to local disk or S3.
//!
//! Writing has two phases. [`stage`] streams a table into a temporary file — beside the
//! target for local outputs (so the final rename stays on one filesystem), in the run's
//! staging folder for S3. [`StagedOutput::commit`] then renames it into place, or uploads
//! it (as a multipart upload completed only at the end). Until commit nothing exists at the
//! output path; a failure or an interrupt drops the temporary file.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 64 * 1024;
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;

use super::load::Location;
use super::model::FileFormat;

/// Batches buffered between the query and the file writer.
const CHANNEL_BATCHES: usize = 2;

/// Why an output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Encode { path: String, message: String },
    #[error("{path}: computing the table: {source}")]
    Query {
        path: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
    #[error("{path}: upload failed: {source}")]
    Upload {
        path: String,
        #[source]
        source: object_store::Error,
    },
}

impl OutputError {
    /// True when trying again may succeed (object store trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, OutputError::Upload { .. })
    }
}

/// Where and how one output is written.
#[derive(Clone, Debug)]
pub struct OutputTarget {
    /// The path as written in the pipeline, for messages.
    pub display: String,
    pub place: Location,
    pub format: FileFormat,
}

/// A finished temporary file waiting for [`StagedOutput::commit`].
#[derive(Debug)]
pub struct StagedOutput {
    target: OutputTarget,
    temp: NamedTempFile,
    rows: u64,
}

/// What a committed output holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub display: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Streams `stream` into a temporary file in `staging_dir`, so that nothing, not even the
/// output's folder, appears where the output goes before [`StagedOutput::commit`]: an
/// output may be staged while its step still runs, and fail with it. A local output is
/// moved into place when committed (copied, when the two are on different file systems),
/// an S3 output uploaded.
pub async fn stage(
    target: &OutputTarget,
    stream: SendableRecordBatchStream,
    staging_dir: &Path,
) -> Result<StagedOutput, OutputError> {
    let io = |source| OutputError::Io {
        path: target.display.clone(),
        source,
    };
    let temp = output_file(&mut tempfile::Builder::new())
        .prefix("output-")
        .tempfile_in(staging_dir)
        .map_err(io)?;
    let file = temp.reopen().map_err(io)?;
    let rows = write_stream(target, stream, file).await?;
    Ok(StagedOutput {
        target: target.clone(),
        temp,
        rows,
    })
}

/// Temporary files are private (0600) by default; an output is an ordinary file, so it
/// gets the mode a newly created file would have (0666 less the umask).
fn output_file<'a, 'b>(
    builder: &'a mut tempfile::Builder<'b, 'b>,
) -> &'a mut tempfile::Builder<'b, 'b> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
}

impl StagedOutput {
    /// Where this output goes.
    pub fn target(&self) -> &OutputTarget {
        &self.target
    }

    /// Rows written.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Makes a local output's folder (see [`stage`]): done for every output before any is
    /// committed, so that an output whose folder cannot
    /// be made fails the run with none of them in place.
    pub fn prepare(&self) -> Result<(), OutputError> {
        if let Location::Local(path) = &self.target.place
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| OutputError::Io {
                path: self.target.display.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Moves the file into place: a rename for local paths, an upload for S3 (`store` must be
    /// the bucket's store). The output path holds either the old file or the whole new one.
    pub async fn commit(self, store: Option<Arc<dyn ObjectStore>>) -> Result<Written, OutputError> {
        let display = self.target.display.clone();
        let io = |source| OutputError::Io {
            path: display.clone(),
            source,
        };
        let bytes = self.temp.as_file().metadata().map_err(io)?.len();
        match (&self.target.place, store) {
            (Location::Local(path), _) => {
                self.temp.as_file().sync_all().map_err(io)?;
                self.prepare()?;
                match self.temp.persist(path) {
                    Ok(_) => {}
                    Err(e) if e.error.kind() == std::io::ErrorKind::CrossesDevices => {
                        copy_into_place(e.file.path(), path).map_err(io)?;
                    }
                    Err(e) => return Err(io(e.error)),
                }
            }
            (Location::S3(url), Some(store)) => {
                let key = object_store::path::Path::from_url_path(url.path()).map_err(|e| {
                    OutputError::Encode {
                        path: display.clone(),
                        message: format!("bad object key: {e}"),
                    }
                })?;
                upload(self.temp.path(), store, key, &display).await?;
            }
            (Location::S3(_), None) => {
                return Err(OutputError::Encode {
                    path: display,
                    message: "no object store for this bucket".into(),
                });
            }
        }
        Ok(Written {
            display,
            rows: self.rows,
            bytes,
        })
    }
}

/// Copies `from` next to `to` under a temporary name, makes the copy durable, then renames
/// it to `to`: the move of a staged output across file systems.
fn copy_into_place(from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut copy = output_file(&mut tempfile::Builder::new())
        .prefix(".groupflow-copy.")
        .suffix(".groupflow-tmp")
        .tempfile_in(dir)?;
    std::io::copy(&mut File::open(from)?, copy.as_file_mut())?;
    copy.as_file().sync_all()?;
    copy.persist(to).map_err(|e| e.error)?;
    Ok(())
}

/// Uploads a finished file. `BufWriter` switches to a multipart upload for large files and
/// completes it only on `shutdown`, so a failure leaves no object behind.
async fn upload(
    file: &Path,
    store: Arc<dyn ObjectStore>,
    key: object_store::path::Path,
    display: &str,
) -> Result<(), OutputError> {
    let io = |source| OutputError::Io {
        path: display.to_string(),
        source,
    };
    let mut reader = tokio::fs::File::open(file).await.map_err(io)?;
    let mut writer = BufWriter::new(store, key);
    let copied = tokio::io::copy(&mut reader, &mut writer).await;
    let done = match copied {
        Ok(_) => writer.shutdown().await,
        Err(e) => Err(e),
    };
    if let Err(e) = done {
        let _ = writer.abort().await;
        return Err(OutputError::Io {
            path: display.to_string(),
            source: e,
        });
    }
    Ok(())
}

/// Streams batches to a writer on a blocking thread; returns the rows written.
async fn write_stream(
    target: &OutputTarget,
    mut stream: SendableRecordBatchStream,
    file: File,
) -> Result<u64, OutputError> {
    let schema = stream.schema();
    let format = target.format;
    let display = target.display.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(CHANNEL_BATCHES);
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, OutputError> {
        let mut w = FormatWriter::new(format, file, schema, &display)?;
        while let Some(batch) = rx.blocking_recv() {
            w.write(&batch)?;
        }
        w.finish()
    });
    let mut failure = None;
    while let Some(batch) = stream.next().await {
        match batch {
            Ok(b) => {
                if tx.send(b).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(source) => {
                failure = Some(OutputError::Query {
                    path: target.display.clone(),
                    source,
                });
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| OutputError::Encode {
        path: target.display.clone(),
        message: format!("the writer stopped: {e}"),
    })?;
    match failure {
        Some(e) => Err(e),
        None => written,
    }
}

enum Inner {
    Parquet(ArrowWriter<File>),
    Csv(arrow::csv::Writer<File>),
    Ndjson(arrow::json::LineDelimitedWriter<File>),
}

/// One file being written in one format.
struct FormatWriter {
    inner: Inner,
    schema: SchemaRef,
    display: String,
    rows: u64,
}

impl FormatWriter {
    fn new(
        format: FileFormat,
        file: File,
        schema: SchemaRef,
        display: &str,
    ) -> Result<Self, OutputError> {
        let enc = |e: &dyn std::fmt::Display| OutputError::Encode {
            path: display.to_string(),
            message: e.to_string(),
        };
        let inner = match format {
            FileFormat::Parquet => {
                let level = ZstdLevel::try_new(3).map_err(|e| enc(&e))?;
                // Row groups of 64k rows: the writer holds one row group's pages in memory,
                // so the default (1M rows) would make memory grow with the output.
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(level))
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .build();
                Inner::Parquet(
                    ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| enc(&e))?,
                )
            }
            FileFormat::Csv => Inner::Csv(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(file),
            ),
            FileFormat::Ndjson => Inner::Ndjson(
                arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(file),
            ),
        };
        Ok(FormatWriter {
            inner,
            schema,
            display: display.to_string(),
            rows: 0,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> OutputError {
        OutputError::Encode {
            path: self.display.clone(),
            message: e.to_string(),
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), OutputError> {
        let result = match &mut self.inner {
            Inner::Parquet(w) => w.write(batch).map_err(|e| e.to_string()),
            Inner::Csv(w) => match flatten_for_csv(batch) {
                Ok(flat) => w.write(&flat).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Inner::Ndjson(w) => w.write(batch).map_err(|e| e.to_string()),
        };
        result.map_err(|e| self.err(e))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<u64, OutputError> {
        if self.rows == 0 && matches!(self.inner, Inner::Csv(_)) {
            // A CSV with no rows still gets its header line.
            let empty = RecordBatch::new_empty(self.schema.clone());
            self.write(&empty)?;
        }
        let rows = self.rows;
        match self.inner {
            Inner::Parquet(w) => {
                w.close().map_err(|e| OutputError::Encode {
                    path: self.display.clone(),
                    message: e.to_string(),
                })?;
            }
            Inner::Csv(w) => {
                w.into_inner()
                    .sync_all()
                    .map_err(|source| OutputError::Io {
                        path: self.display.clone(),
                        source,
                    })?;
            }
            Inner::Ndjson(mut w) => {
                w.finish().map_err(|e| OutputError::Encode {
                    path: self.display.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(rows)
    }
}

/// CSV cells are flat: nested columns (structs, lists, maps) become their JSON text.
fn flatten_for_csv(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_nested(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if is_nested(field.data_type()) {
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(json_text(field, column)?);
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn is_nested(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Struct(_)
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
            | DataType::FixedSizeList(_, _)
            | DataType::Map(_, _)
    )
}

/// Each value of `column` as JSON text (null stays null).
fn json_text(field: &Field, column: &ArrayRef) -> Result<ArrayRef, arrow::error::ArrowError> {
    let one = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "v",
            field.data_type().clone(),
            true,
        )])),
        vec![column.clone()],
    )?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::LineDelimited>(&mut buf);
        w.write(&one)?;
        w.finish()?;
    }
    let mut out = StringBuilder::with_capacity(column.len(), buf.len());
    for line in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let row: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))?;
        match row.get("v") {
            None | Some(serde_json::Value::Null) => out.append_null(),
            Some(v) => out.append_value(v.to_string()),
        }
    }
    Ok(Arc::new(out.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, ListBuilder, StringArray, StringBuilder as SB};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;

    fn batch() -> RecordBatch {
        let mut tags = ListBuilder::new(SB::new());
        tags.values().append_value("a");
        tags.values().append_value("b\"c");
        tags.append(true);
        tags.append(false);
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("tags", DataType::new_list(DataType::Utf8, true), true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("x"), None])),
                Arc::new(tags.finish()),
            ],
        )
        .unwrap()
    }

    fn stream(
        batches: Vec<Result<RecordBatch, datafusion::error::DataFusionError>>,
    ) -> SendableRecordBatchStream {
        let schema = batch().schema();
        Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::iter(batches),
        ))
    }

    fn target(dir: &Path, name: &str) -> OutputTarget {
        OutputTarget {
            display: name.to_string(),
            place: Location::Local(dir.join("sub").join(name)),
            format: FileFormat::from_path(name).unwrap(),
        }
    }

    #[tokio::test]
    async fn writes_each_format_and_only_commit_makes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["o.csv", "o.ndjson", "o.parquet"] {
            let t = target(dir.path(), name);
            let staged = stage(&t, stream(vec![Ok(batch()), Ok(batch())]), dir.path())
                .await
                .unwrap();
            let Location::Local(path) = &t.place else {
                unreachable!()
            };
            assert!(!path.exists(), "{name} exists before commit");
            let written = staged.commit(None).await.unwrap();
            assert_eq!(written.rows, 4);
            assert!(path.exists());
        }
        let csv = std::fs::read_to_string(dir.path().join("sub/o.csv")).unwrap();
        assert_eq!(
            csv.lines().take(3).collect::<Vec<_>>(),
            ["id,name,tags", r#"1,x,"[""a"",""b\""c""]""#, "2,,"]
        );
        let nd = std::fs::read_to_string(dir.path().join("sub/o.ndjson")).unwrap();
        assert_eq!(
            nd.lines().nth(1).unwrap(),
            r#"{"id":2,"name":null,"tags":null}"#
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 3, "temporary files left: {leftovers:?}");
    }

    #[tokio::test]
    async fn an_output_stays_in_staging_until_committed_and_a_copy_moves_whole() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let t = target(dir.path(), "o.csv");
        let staged = stage(&t, stream(vec![Ok(batch())]), &staging)
            .await
            .unwrap();
        // Nothing where the output goes, not even its folder, until the commit.
        assert!(!dir.path().join("sub").exists());
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 1);
        staged.commit(None).await.unwrap();
        let csv = std::fs::read_to_string(dir.path().join("sub/o.csv")).unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
        // Across file systems the staged file is copied beside the output, then renamed.
        let from = staging.join("staged");
        std::fs::write(&from, "whole").unwrap();
        let to = dir.path().join("sub/o.csv");
        copy_into_place(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "whole");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["o.csv"]);
    }

    #[tokio::test]
    async fn a_failing_query_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), "o.parquet");
        let err = stage(
            &t,
            stream(vec![
                Ok(batch()),
                Err(datafusion::error::DataFusionError::Execution("boom".into())),
            ]),
            dir.path(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        // Neither the output's folder nor a staged file: the folder is where both would be.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
