//! # vitaltrail-query
//!
//! The read side: DataFusion SQL over what the attestor made durable.
//!
//! | table | from | one row per |
//! |---|---|---|
//! | `readings` | `<data>/readings/date=YYYY-MM-DD/*.parquet` | measurement (device, patient, seq, device_time, log_time, loinc, value, unit, partition, log_index, leaf_hash, date) |
//! | `checkpoints` | `<data>/partitions/*/checkpoints.jsonl` | signed checkpoint (partition, origin, tree_size, root, signed_at, note) |
//! | `rejected` | `<data>/rejected.jsonl` | rejected message (received_at, stage, reason, detail, device, seq, topic, size, source, envelope_b64) |
//!
//! Rejections that a crash made appear twice carry the same `source`;
//! `rejected` lists each source once.
//!
//! It serves the CLI (`vitaltrail query`) and HTTP (`POST /sql`); proof
//! bundles are built by `vitaltrail prove`. Flight SQL and alerts are still
//! to come.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, StringBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::prelude::SessionContext;
use vitaltrail_attestor::parquet_out::readings_schema;
use vitaltrail_attestor::pipeline::read_checkpoints;
use vitaltrail_bus::deadletter::RejectLog;
use vitaltrail_core::Checkpoint;

/// Errors of the query layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The SQL is invalid or refers to something that does not exist (caller's fault).
    #[error("{0}")]
    Sql(#[from] datafusion::error::DataFusionError),
    /// Arrow encoding of a result failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Reading the data directory failed.
    #[error("data directory: {0}")]
    Data(String),
    /// An output format that cannot go where it was asked to.
    #[error("{0}")]
    Format(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// A SQL session over one data directory.
pub struct QueryEngine {
    ctx: SessionContext,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine").finish_non_exhaustive()
    }
}

impl QueryEngine {
    /// Register the tables of `data_dir` (a snapshot of what is durable now).
    pub async fn open(data_dir: &Path) -> Result<Self> {
        let ctx = SessionContext::new();
        let readings = data_dir.join("readings");
        std::fs::create_dir_all(&readings)
            .map_err(|e| Error::Data(format!("{}: {e}", readings.display())))?;
        let opts = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![("date".into(), DataType::Utf8)]);
        let url = format!(
            "{}/",
            readings
                .canonicalize()
                .map_err(|e| Error::Data(e.to_string()))?
                .display()
        );
        ctx.register_listing_table("readings", url, opts, Some(readings_schema()), None)
            .await?;
        ctx.register_batch("checkpoints", checkpoints_batch(data_dir)?)?;
        ctx.register_batch("rejected", rejected_batch(data_dir)?)?;
        Ok(QueryEngine { ctx })
    }

    /// Run one SQL statement.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        Ok(self.ctx.sql(sql).await?.collect().await?)
    }
}

fn checkpoints_batch(data: &Path) -> Result<RecordBatch> {
    let (mut part, mut origin, mut size, mut root, mut at, mut note) = (
        UInt32Builder::new(),
        StringBuilder::new(),
        UInt64Builder::new(),
        StringBuilder::new(),
        TimestampMillisecondBuilder::new(),
        StringBuilder::new(),
    );
    let root_dir = data.join("partitions");
    let mut dirs: Vec<_> = std::fs::read_dir(&root_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        let Some(p) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        for c in read_checkpoints(&dir).map_err(|e| Error::Data(e.to_string()))? {
            let cp =
                Checkpoint::parse_unverified(&c.note).map_err(|e| Error::Data(e.to_string()))?;
            part.append_value(p);
            origin.append_value(&cp.origin);
            size.append_value(cp.size);
            root.append_value(cp.root.to_hex());
            at.append_value(c.time_ms as i64);
            note.append_value(&c.note);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new("origin", DataType::Utf8, false),
        Field::new("tree_size", DataType::UInt64, false),
        Field::new("root", DataType::Utf8, false),
        Field::new("signed_at", ts(), false),
        Field::new("note", DataType::Utf8, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(part.finish()),
        Arc::new(origin.finish()),
        Arc::new(size.finish()),
        Arc::new(root.finish()),
        Arc::new(at.finish().with_timezone("UTC")),
        Arc::new(note.finish()),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

fn rejected_batch(data: &Path) -> Result<RecordBatch> {
    let all =
        RejectLog::read_all(data.join("rejected.jsonl")).map_err(|e| Error::Data(e.to_string()))?;
    let mut at = TimestampMillisecondBuilder::new();
    let (mut stage, mut reason, mut detail, mut device, mut topic, mut source, mut env) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut seq, mut size) = (UInt64Builder::new(), UInt64Builder::new());
    let mut seen = BTreeSet::new();
    for r in all {
        if let Some(s) = &r.source
            && !seen.insert(s.clone())
        {
            continue;
        }
        at.append_value(r.received_ms as i64);
        stage.append_value(&r.stage);
        reason.append_value(&r.reason);
        detail.append_value(&r.detail);
        device.append_option(r.device.as_deref());
        seq.append_option(r.seq);
        topic.append_option(r.topic.as_deref());
        size.append_value(r.size);
        source.append_option(r.source.as_deref());
        env.append_option(r.envelope_b64.as_deref());
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("received_at", ts(), false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("device", DataType::Utf8, true),
        Field::new("seq", DataType::UInt64, true),
        Field::new("topic", DataType::Utf8, true),
        Field::new("size", DataType::UInt64, false),
        Field::new("source", DataType::Utf8, true),
        Field::new("envelope_b64", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(at.finish().with_timezone("UTC")),
        Arc::new(stage.finish()),
        Arc::new(reason.finish()),
        Arc::new(detail.finish()),
        Arc::new(device.finish()),
        Arc::new(seq.finish()),
        Arc::new(topic.finish()),
        Arc::new(size.finish()),
        Arc::new(source.finish()),
        Arc::new(env.finish()),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// Output formats of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A pretty text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
    /// An Arrow IPC stream.
    ArrowIpc,
    /// A Parquet file.
    Parquet,
}

/// Encode results.
pub fn encode(batches: &[RecordBatch], format: Format) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Table => {
            out = arrow::util::pretty::pretty_format_batches(batches)?
                .to_string()
                .into_bytes();
            out.push(b'\n');
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            out.push(b'\n');
        }
        Format::ArrowIpc | Format::Parquet => {
            let Some(schema) = batches.first().map(|b| b.schema()) else {
                return Err(Error::Format(
                    "the query returned no schema to encode".into(),
                ));
            };
            if format == Format::ArrowIpc {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            } else {
                let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None)
                    .map_err(|e| Error::Format(e.to_string()))?;
                for b in batches {
                    w.write(b).map_err(|e| Error::Format(e.to_string()))?;
                }
                w.close().map_err(|e| Error::Format(e.to_string()))?;
            }
        }
    }
    Ok(out)
}
