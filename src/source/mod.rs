//! File and object-store tables: CSV, Parquet and NDJSON on local disk or S3, registered
//! as DataFusion listing tables.
//!
//! A location is a local path (`data/companies.csv`, `data/`, `data/*.parquet`), a
//! `file://` URL, or an `s3://bucket/key` URL (a key, a prefix, or a glob). The format comes
//! from the extension unless [`SourceOptions::format`] says otherwise; for a directory or
//! prefix without one, from the first data file found in it.

mod s3;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use url::Url;

pub use s3::S3Config;

/// A table that cannot be registered. Each message names the location.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{location}: {message}")]
    Location { location: String, message: String },
    #[error(
        "{location}: cannot tell the format from the name; set the format to csv, parquet or ndjson"
    )]
    UnknownFormat { location: String },
    #[error("unknown format `{0}` (expected csv, tsv, parquet or ndjson)")]
    BadFormat(String),
    #[error("s3://{bucket}: {message}")]
    Credentials { bucket: String, message: String },
    #[error("{location}: {source}")]
    ObjectStore {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{location}: {source}")]
    DataFusion {
        location: String,
        #[source]
        source: DataFusionError,
    },
}

impl SourceError {
    /// True when trying again later may succeed (network trouble, throttling).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::ObjectStore { source, .. } => is_retryable_store(source),
            SourceError::DataFusion {
                source: DataFusionError::ObjectStore(e),
                ..
            } => is_retryable_store(e),
            _ => false,
        }
    }
}

fn is_retryable_store(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

/// File formats a source can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row.
    Tsv,
    Parquet,
    /// Newline-delimited JSON: one object per line.
    NdJson,
}

impl Format {
    /// The format a file name's extension implies.
    pub fn from_extension(name: &str) -> Option<Format> {
        let ext = name.rsplit('.').next()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "parquet" | "pq" => Some(Format::Parquet),
            "ndjson" | "jsonl" | "json" => Some(Format::NdJson),
            _ => None,
        }
    }

    /// The extension files of this format usually have.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => ".csv",
            Format::Tsv => ".tsv",
            Format::Parquet => ".parquet",
            Format::NdJson => ".ndjson",
        }
    }
}

impl FromStr for Format {
    type Err = SourceError;
    fn from_str(s: &str) -> Result<Format, SourceError> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "parquet" => Ok(Format::Parquet),
            "ndjson" | "jsonl" | "json" => Ok(Format::NdJson),
            _ => Err(SourceError::BadFormat(s.to_string())),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Parquet => "parquet",
            Format::NdJson => "ndjson",
        })
    }
}

/// How to read a source. Everything is optional.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// The format, when the extension does not say it (or says it wrong).
    pub format: Option<Format>,
    /// CSV/TSV: whether the first line names the columns (default true).
    pub has_header: Option<bool>,
    /// CSV: the field delimiter (default `,`; `\t` for TSV).
    pub delimiter: Option<u8>,
    /// S3 settings; `None` reads them from the environment ([`S3Config::from_env`]).
    pub s3: Option<S3Config>,
}

/// What [`register_table`] registered.
#[derive(Clone, Debug)]
pub struct TableInfo {
    /// The listing URL, with the glob if any.
    pub url: String,
    pub format: Format,
    pub schema: SchemaRef,
}

/// Registers `location` as table `name` on `ctx`, inferring its schema.
pub async fn register_table(
    ctx: &SessionContext,
    name: &str,
    location: &str,
    options: &SourceOptions,
) -> Result<TableInfo, SourceError> {
    let url = parse_location(location)?;
    let store = register_object_store(ctx, location, options.s3.as_ref())?;
    let format = match options.format {
        Some(f) => f,
        None => detect_format(&url, store.as_ref(), location).await?,
    };
    // A file named explicitly is read whatever its extension; a directory or prefix only
    // yields files with the format's extension (so `_SUCCESS` and friends are skipped).
    let extension = if url.is_collection() && !has_glob(location) {
        url.file_extension()
            .map(|e| format!(".{e}"))
            .unwrap_or_else(|| format.extension().to_string())
    } else {
        String::new()
    };
    let listing = ListingOptions::new(file_format(format, options)).with_file_extension(extension);
    let df_err = |source| SourceError::DataFusion {
        location: location.to_string(),
        source,
    };
    let state = ctx.state();
    let schema = listing.infer_schema(&state, &url).await.map_err(df_err)?;
    let config = ListingTableConfig::new(url.clone())
        .with_listing_options(listing)
        .with_schema(schema.clone());
    let table = ListingTable::try_new(config).map_err(df_err)?;
    ctx.register_table(name, Arc::new(table)).map_err(df_err)?;
    Ok(TableInfo {
        url: url.to_string(),
        format,
        schema,
    })
}

/// Makes `location`'s object store known to `ctx`: for `s3://bucket/…` registers a store
/// for that bucket (`s3` settings, or the environment's); local paths and `file://` need
/// nothing. Returns the store. Outputs written to S3 need this too.
pub fn register_object_store(
    ctx: &SessionContext,
    location: &str,
    s3: Option<&S3Config>,
) -> Result<Arc<dyn ObjectStore>, SourceError> {
    let bad = |message: String| SourceError::Location {
        location: location.to_string(),
        message,
    };
    match Url::parse(location) {
        Ok(url) if url.scheme() == "s3" || url.scheme() == "s3a" => {
            let bucket = url
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("no bucket in the URL".into()))?
                .to_string();
            let store = match s3 {
                Some(c) => c.build(&bucket)?,
                None => S3Config::from_env().build(&bucket)?,
            };
            let root = Url::parse(&format!("s3://{bucket}"))
                .map_err(|e| bad(format!("bucket name: {e}")))?;
            ctx.register_object_store(&root, store.clone());
            Ok(store)
        }
        Ok(url) if url.scheme() == "file" => local_store(ctx),
        Ok(url) if url.scheme().len() > 1 => Err(bad(format!(
            "unsupported scheme `{}` (use a local path, file:// or s3://)",
            url.scheme()
        ))),
        // Relative paths, and Windows drive letters that parse as one-letter schemes.
        _ => local_store(ctx),
    }
}

fn local_store(ctx: &SessionContext) -> Result<Arc<dyn ObjectStore>, SourceError> {
    let url = datafusion::execution::object_store::ObjectStoreUrl::local_filesystem();
    ctx.runtime_env()
        .object_store(url)
        .map_err(|source| SourceError::DataFusion {
            location: "file:///".into(),
            source,
        })
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A location as a listing URL. DataFusion understands globs only in plain paths, so for
/// URLs the glob part is split off here.
pub fn parse_location(location: &str) -> Result<ListingTableUrl, SourceError> {
    let bad = |message: String| SourceError::Location {
        location: location.to_string(),
        message,
    };
    let is_url = location.contains("://");
    if is_url && has_glob(location) {
        let start = location.find("://").map(|i| i + 3).unwrap_or_default();
        let glob_at = location.find(['*', '?', '[']).unwrap_or(location.len());
        // The glob begins at the segment holding the first wildcard.
        let cut = location[start..glob_at]
            .rfind('/')
            .map(|i| start + i + 1)
            .ok_or_else(|| bad("a glob needs a bucket or directory before it".into()))?;
        let base = Url::parse(&location[..cut]).map_err(|e| bad(e.to_string()))?;
        let pattern =
            glob::Pattern::new(&location[cut..]).map_err(|e| bad(format!("glob: {e}")))?;
        return ListingTableUrl::try_new(base, Some(pattern)).map_err(|e| bad(e.to_string()));
    }
    if is_url {
        let mut url = Url::parse(location).map_err(|e| bad(e.to_string()))?;
        // An S3 prefix without extension or trailing slash is a "directory".
        let last = url
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        if url.scheme() != "file"
            && !last.is_empty()
            && Format::from_extension(&last).is_none()
            && !last.contains('.')
        {
            url.set_path(&format!("{}/", url.path()));
        }
        return ListingTableUrl::try_new(url, None).map_err(|e| bad(e.to_string()));
    }
    ListingTableUrl::parse(location).map_err(|e| bad(e.to_string()))
}

/// The format of a location: its extension, its glob's extension, or that of the first
/// data file listed under it.
async fn detect_format(
    url: &ListingTableUrl,
    store: &dyn ObjectStore,
    location: &str,
) -> Result<Format, SourceError> {
    let named = location.trim_end_matches('/');
    if let Some(f) = Format::from_extension(named.rsplit('/').next().unwrap_or(named)) {
        return Ok(f);
    }
    let prefix: Path = url.prefix().clone();
    let mut listing = store.list(Some(&prefix));
    while let Some(meta) = listing
        .try_next()
        .await
        .map_err(|source| SourceError::ObjectStore {
            location: location.to_string(),
            source,
        })?
    {
        if !url.contains(&meta.location, true) {
            continue;
        }
        if let Some(f) = meta.location.filename().and_then(Format::from_extension) {
            return Ok(f);
        }
    }
    Err(SourceError::UnknownFormat {
        location: location.to_string(),
    })
}

fn file_format(format: Format, options: &SourceOptions) -> Arc<dyn FileFormat> {
    match format {
        Format::Csv | Format::Tsv => {
            let default_delimiter = if format == Format::Tsv { b'\t' } else { b',' };
            Arc::new(
                CsvFormat::default()
                    .with_has_header(options.has_header.unwrap_or(true))
                    .with_delimiter(options.delimiter.unwrap_or(default_delimiter)),
            )
        }
        Format::Parquet => Arc::new(ParquetFormat::default()),
        Format::NdJson => Arc::new(JsonFormat::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(Format::from_extension("a.CSV"), Some(Format::Csv));
        assert_eq!(Format::from_extension("x/y.jsonl"), Some(Format::NdJson));
        assert_eq!(Format::from_extension("p.pq"), Some(Format::Parquet));
        assert_eq!(Format::from_extension("data"), None);
        assert_eq!("NDJSON".parse::<Format>().unwrap(), Format::NdJson);
        assert!("xml".parse::<Format>().is_err());
    }

    #[test]
    fn url_globs_and_prefixes_are_split() {
        let u = parse_location("s3://bucket/data/part-*.parquet").unwrap();
        assert_eq!(u.prefix().as_ref(), "data");
        assert!(u.contains(&Path::from("data/part-1.parquet"), true));
        assert!(!u.contains(&Path::from("data/other.parquet"), true));
        let u = parse_location("s3://bucket/data").unwrap();
        assert!(u.is_collection());
        let u = parse_location("s3://bucket/data/x.csv").unwrap();
        assert!(!u.is_collection());
        assert!(parse_location("s3://*.csv").is_err());
    }
}
