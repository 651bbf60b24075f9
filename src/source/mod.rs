//! File and object-store tables: CSV, Parquet and NDJSON on local disk or S3, registered
//! as DataFusion tables.
