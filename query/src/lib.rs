//! # vitaltrail-query
//!
//! The read side: DataFusion SQL over what the attestor made durable.
//!
//! | table | from | one row per |
//! |---|---|---|
//! | `readings` | `<data>/readings/date=YYYY-MM-DD/*.parquet` | measurement (device, patient, seq, device_time, log_time, loinc, value, unit, partition, log_index, leaf_hash, date) |
//! | `checkpoints` | `<data>/partitions/*/checkpoints.jsonl` | signed checkpoint (partition, origin, tree_size, root, signed_at, note) |
//! | `anchors` | `<data>/anchor/ledger.jsonl`, `<data>/anchor/evm.jsonl` | anchor of the epoch log (backend `ledger` or `evm`, status `written`, `confirmed` or `reorged`, stream (the epoch log origin), target (`ledger` or `evm:<chain id>:<contract>`), epoch_log_size, root, seq, tx_hash, block_number, confirmations, anchored_at) |
//! | `alerts` | `<data>/alerts/events-*.jsonl` | alarm event (at, kind, alarm_id, rule, subject, ward, severity, reason, active, acknowledged_by, acknowledged_at, acknowledged_via, escalation, notify, raised_at, evidence as JSON) |
//! | `rejected` | `<data>/rejected.jsonl` | rejected message (received_at, stage, reason, detail, device, seq, topic, size, source, envelope_b64, count), or a summary of `count` rejections past a dead-letter limit |
//!
//! Rejections that a crash made appear twice carry the same `source`;
//! `rejected` lists each source once.
//!
//! `readings` lists only **live** files ([`store::LiveFiles`]): a file the
//! attestor's compaction has merged into a larger one is skipped, so every
//! row is read once at every instant. `checkpoints` and `rejected` are
//! streamed from their files line by line (`jsonl`), never read whole.
//!
//! It serves the CLI (`vitaltrail query`, `vitaltrail fhir observations`) and
//! HTTP (`POST /sql`, `GET /fhir/Observation`, [`http`], [`fhir`]);
//! proof bundles are built by `vitaltrail prove`. Flight SQL and alerts are
//! still to come.
//!
//! **Read-only.** Every statement is planned, and the plan is refused
//! ([`Error::ReadOnly`]) if any node of it (subqueries and `EXPLAIN`
//! included) is DDL (`CREATE [EXTERNAL] TABLE`, `DROP`, views), DML
//! (`INSERT`, `UPDATE`, `DELETE`, `COPY … TO`) or a statement (`SET`,
//! transactions): a query can read the verified data, never write where
//! another query reads, nor touch the file system. URL tables (`SELECT …
//! FROM '/etc/passwd'`) are not enabled.
//!
//! **Bounded.** Results stream in batches ([`QueryEngine::stream`]) with a
//! row cap and a byte cap ([`QueryLimits`]); execution runs in a memory pool
//! of fixed size, so one `SELECT *` cannot take the service's memory.

pub mod fhir;
pub mod http;
mod jsonl;
pub mod prove;
pub mod store;

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt as _;
use vitaltrail_attestor::parquet_out::readings_schema;

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
    /// No such reading is logged (caller's fault).
    #[error("{0}")]
    NotFound(String),
    /// The reading is not provable yet (logged, but no checkpoint covers
    /// it): retry in a second.
    #[error("{0}; retry in a second")]
    NotYet(String),
    /// An output format that cannot go where it was asked to.
    #[error("{0}")]
    Format(String),
    /// The statement would write or change state; queries are read-only
    /// (caller's fault).
    #[error("read-only: {0}; only queries (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE) may run")]
    ReadOnly(String),
    /// The query ran past [`QueryLimits::timeout`].
    #[error("the query ran longer than {0:?}")]
    Timeout(std::time::Duration),
    /// A string function asked to build a string beyond
    /// [`MAX_STRING_ARG`] (caller's fault).
    #[error("{0}")]
    TooBig(String),
    /// The result is larger than the configured cap (caller's fault: add a
    /// `LIMIT`, filter, or aggregate).
    #[error("the result exceeds the cap of {limit} {what}; add a LIMIT, a filter or an aggregate")]
    TooLarge {
        /// `rows` or `bytes`.
        what: &'static str,
        /// The cap.
        limit: u64,
    },
}

impl Error {
    /// True when the request itself is at fault (HTTP 4xx), false when the
    /// data directory or the engine failed.
    pub fn is_caller_fault(&self) -> bool {
        match self {
            Error::Sql(e) => !matches!(
                e,
                datafusion::error::DataFusionError::IoError(_)
                    | datafusion::error::DataFusionError::ObjectStore(_)
                    | datafusion::error::DataFusionError::Internal(_)
            ),
            Error::ReadOnly(_)
            | Error::TooLarge { .. }
            | Error::Format(_)
            | Error::Timeout(_)
            | Error::TooBig(_)
            | Error::NotFound(_) => true,
            Error::Arrow(_) | Error::Data(_) | Error::NotYet(_) => false,
        }
    }
}

/// Caps on what one query may produce and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Most rows a result may hold.
    pub max_rows: u64,
    /// Most bytes (Arrow in-memory size) a result may hold.
    pub max_bytes: u64,
    /// Memory pool of one query's execution (sorts, joins, aggregates).
    pub memory_bytes: usize,
    /// Longest a query may run, from planning to its last batch.
    pub timeout: std::time::Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_rows: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
            memory_bytes: 1024 * 1024 * 1024,
            timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// Largest literal length or count a string-building function (`repeat`,
/// `lpad`, `rpad`) may be given: the memory pool does not see what one
/// scalar function allocates, so `repeat('x', 2e9)` is refused at planning.
pub const MAX_STRING_ARG: i64 = 1 << 20;

/// Refuse string-building calls whose literal size argument is beyond
/// [`MAX_STRING_ARG`].
fn check_string_growth(plan: &datafusion::logical_expr::LogicalPlan) -> Result<()> {
    use datafusion::common::tree_node::{TreeNode as _, TreeNodeRecursion};
    use datafusion::logical_expr::Expr;
    use datafusion::scalar::ScalarValue;
    let mut bad = None;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::ScalarFunction(f) = x
                    && matches!(f.name(), "repeat" | "lpad" | "rpad")
                {
                    for a in f.args.iter().skip(1) {
                        let n = match a {
                            Expr::Literal(ScalarValue::Int64(Some(n)), _) => Some(*n),
                            Expr::Literal(ScalarValue::Int32(Some(n)), _) => Some(i64::from(*n)),
                            Expr::Literal(ScalarValue::Float64(Some(n)), _) => Some(*n as i64),
                            _ => None,
                        };
                        if n.is_some_and(|n| n > MAX_STRING_ARG) {
                            bad = Some(f.name().to_owned());
                            return Ok(TreeNodeRecursion::Stop);
                        }
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    match bad {
        Some(name) => Err(Error::TooBig(format!(
            "{name}() may build strings of at most {MAX_STRING_ARG} characters"
        ))),
        None => Ok(()),
    }
}

/// What a read-only session accepts: no DDL, no DML (`COPY` included), no
/// statements.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// A query's result batches, stopped with [`Error::TooLarge`] once a cap
/// is passed.
pub struct CappedStream {
    inner: SendableRecordBatchStream,
    limits: QueryLimits,
    rows: u64,
    bytes: u64,
    failed: bool,
    deadline: tokio::time::Instant,
}

impl std::fmt::Debug for CappedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CappedStream")
            .field("rows", &self.rows)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl CappedStream {
    /// Execute `df`, its result held to `limits` and stopped at `deadline`.
    pub(crate) async fn start(
        df: datafusion::dataframe::DataFrame,
        limits: QueryLimits,
        deadline: tokio::time::Instant,
    ) -> Result<Self> {
        Ok(CappedStream {
            inner: df.execute_stream().await?,
            limits,
            rows: 0,
            bytes: 0,
            failed: false,
            deadline,
        })
    }

    /// The result's schema.
    pub fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    /// The next batch, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<RecordBatch>> {
        if self.failed {
            return None;
        }
        let next = tokio::time::timeout_at(self.deadline, self.inner.next()).await;
        let item = match next {
            Err(_) => {
                self.failed = true;
                return Some(Err(Error::Timeout(self.limits.timeout)));
            }
            Ok(None) => return None,
            Ok(Some(Ok(b))) => b,
            Ok(Some(Err(e))) => {
                self.failed = true;
                return Some(Err(e.into()));
            }
        };
        self.rows += item.num_rows() as u64;
        self.bytes += item.get_array_memory_size() as u64;
        let over = if self.rows > self.limits.max_rows {
            Some(("rows", self.limits.max_rows))
        } else if self.bytes > self.limits.max_bytes {
            Some(("bytes", self.limits.max_bytes))
        } else {
            None
        };
        if let Some((what, limit)) = over {
            self.failed = true;
            return Some(Err(Error::TooLarge { what, limit }));
        }
        Some(Ok(item))
    }

    /// Every batch, within the caps.
    pub async fn collect(mut self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        while let Some(b) = self.next().await {
            out.push(b?);
        }
        Ok(out)
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// A read-only SQL session over one data directory.
pub struct QueryEngine {
    ctx: SessionContext,
    limits: QueryLimits,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine").finish_non_exhaustive()
    }
}

impl QueryEngine {
    /// Register the tables of `data_dir` (a snapshot of what is durable
    /// now), with the default [`QueryLimits`].
    pub async fn open(data_dir: &Path) -> Result<Self> {
        Self::open_with(data_dir, QueryLimits::default()).await
    }

    /// Register the tables of `data_dir` under `limits`.
    pub async fn open_with(data_dir: &Path, limits: QueryLimits) -> Result<Self> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .build_arc()?;
        if !data_dir.is_dir() {
            return Err(Error::Data(format!(
                "{} is not a data directory",
                data_dir.display()
            )));
        }
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        // Read-only, and only live files (compaction never shows a row
        // twice).
        let local = datafusion::execution::object_store::ObjectStoreUrl::local_filesystem();
        ctx.register_object_store(local.as_ref(), Arc::new(store::LiveFiles::new()));
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
        // Streamed from their JSONL files, never read whole.
        ctx.register_table("checkpoints", jsonl::checkpoints_table(data_dir)?)?;
        ctx.register_table("rejected", jsonl::rejected_table(data_dir)?)?;
        ctx.register_table("anchors", jsonl::anchors_table(data_dir)?)?;
        ctx.register_table("alerts", jsonl::alerts_table(data_dir)?)?;
        Ok(QueryEngine { ctx, limits })
    }

    /// Plan one statement and refuse it unless it only reads.
    async fn plan(&self, sql: &str) -> Result<datafusion::logical_expr::LogicalPlan> {
        let plan = self.ctx.state().create_logical_plan(sql).await?;
        read_only().verify_plan(&plan).map_err(|e| {
            Error::ReadOnly(e.strip_backtrace().replace("Error during planning: ", ""))
        })?;
        check_string_growth(&plan)?;
        Ok(plan)
    }

    /// Run one read-only statement and stream its result within the caps.
    pub async fn stream(&self, sql: &str) -> Result<CappedStream> {
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let plan = self.plan(sql).await?;
        let df = self.ctx.execute_logical_plan(plan).await?;
        CappedStream::start(df, self.limits, deadline).await
    }

    /// Run one read-only statement and collect its result within the caps.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        self.stream(sql).await?.collect().await
    }
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

/// Encodes a result batch by batch, for formats that stream (JSON, CSV,
/// Arrow IPC): what it returns can be sent as soon as a batch is ready.
pub struct StreamEncoder {
    state: EncState,
}

enum EncState {
    Json { first: bool },
    Csv { first: bool },
    Ipc(Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>),
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncoder").finish_non_exhaustive()
    }
}

impl StreamEncoder {
    /// Start encoding a result of `schema`; returns the encoder and the
    /// bytes that open the output.
    pub fn begin(format: Format, schema: &Schema) -> Result<(Self, Vec<u8>)> {
        Ok(match format {
            Format::Json => (
                StreamEncoder {
                    state: EncState::Json { first: true },
                },
                b"[".to_vec(),
            ),
            Format::Csv => (
                StreamEncoder {
                    state: EncState::Csv { first: true },
                },
                Vec::new(),
            ),
            Format::ArrowIpc => {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)?;
                let head = std::mem::take(w.get_mut());
                (
                    StreamEncoder {
                        state: EncState::Ipc(Box::new(w)),
                    },
                    head,
                )
            }
            Format::Table | Format::Parquet => {
                return Err(Error::Format(
                    "table and parquet output do not stream".into(),
                ));
            }
        })
    }

    /// The bytes of one more batch.
    pub fn batch(&mut self, b: &RecordBatch) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match &mut self.state {
            EncState::Json { first } => {
                if b.num_rows() == 0 {
                    return Ok(out);
                }
                let mut lines = Vec::new();
                {
                    let mut w = arrow::json::LineDelimitedWriter::new(&mut lines);
                    w.write(b)?;
                    w.finish()?;
                }
                // One JSON object per line (JSON escapes newlines in strings).
                for line in lines.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                    if !*first {
                        out.push(b',');
                    }
                    *first = false;
                    out.extend_from_slice(line);
                }
            }
            EncState::Csv { first } => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(*first)
                    .build(&mut out);
                w.write(b)?;
                *first = false;
            }
            EncState::Ipc(w) => {
                w.write(b)?;
                out = std::mem::take(w.get_mut());
            }
        }
        Ok(out)
    }

    /// The bytes that close the output.
    pub fn finish(self) -> Result<Vec<u8>> {
        Ok(match self.state {
            EncState::Json { .. } => b"]\n".to_vec(),
            EncState::Csv { .. } => Vec::new(),
            EncState::Ipc(mut w) => {
                w.finish()?;
                std::mem::take(w.get_mut())
            }
        })
    }
}

/// The first column of the first row of `sql`, a count (tests).
#[cfg(test)]
pub(crate) async fn first_count(q: &QueryEngine, sql: &str) -> i64 {
    let b = q.sql(sql).await.unwrap();
    b[0].column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory whose partition 0 holds `n` exports of 2 readings
    /// (4 rows) each, compacted with the covered files kept (grace).
    fn compacted_data(n: u64) -> tempfile::TempDir {
        use vitaltrail_attestor::parquet_out::{
            CompactionPolicy, ParquetExporter, PatientLookup, Registered,
        };
        use vitaltrail_core::envelope::{Measurement, UnsignedReading, sign};
        let d = tempfile::tempdir().unwrap();
        let pdir = d.path().join("partitions/0");
        let mut log = vitaltrail_attestor::DurableLog::open(&pdir).unwrap();
        let dev = vitaltrail_core::SecretKey::from_seed(&[7; 32]).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("pt".into()));
        let mut ex = ParquetExporter::open(d.path(), &pdir, 0).unwrap();
        let mut dids = vitaltrail_core::DidCache::default();
        for k in 0..n {
            let leaves: Vec<Vec<u8>> = (k * 2..k * 2 + 2)
                .map(|seq| {
                    let m = |code: &str, value| Measurement {
                        code: code.into(),
                        value,
                        unit: "%".into(),
                    };
                    let e = sign(
                        &dev,
                        &UnsignedReading {
                            seq,
                            time: 1_800_000_000_000,
                            measurements: vec![m("2708-6", 97.0), m("8867-4", 70.0)],
                            meta: None,
                        },
                    )
                    .unwrap();
                    vitaltrail_core::leaf::encode(1_800_000_000_000 + seq, &e)
                })
                .collect();
            log.append_batch(&leaves).unwrap();
            ex.export(&log, &patients, &mut dids).unwrap();
        }
        let policy = CompactionPolicy {
            min_files: 4,
            grace: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let stats = vitaltrail_attestor::parquet_out::Compactor::new(d.path(), 0)
            .compact(ex.high_water(), &policy, true)
            .unwrap()
            .unwrap();
        assert_eq!(stats.merged as u64, n);
        d
    }

    #[tokio::test]
    async fn compacted_files_are_read_exactly_once() {
        let d = compacted_data(12);
        let files = std::fs::read_dir(d.path().join("readings"))
            .unwrap()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
            .count();
        assert_eq!(files, 13, "the 12 covered files are still there");
        let q = QueryEngine::open(d.path()).await.unwrap();
        for sql in [
            "SELECT count(*) AS n FROM readings",
            "SELECT count(*) AS n FROM readings WHERE date = '2027-01-15'",
            "SELECT count(DISTINCT concat(CAST(log_index AS VARCHAR), loinc)) AS n FROM readings",
        ] {
            assert_eq!(first_count(&q, sql).await, 48, "{sql}");
        }
    }

    async fn engine(limits: QueryLimits) -> (tempfile::TempDir, QueryEngine) {
        let d = tempfile::tempdir().unwrap();
        let q = QueryEngine::open_with(d.path(), limits).await.unwrap();
        (d, q)
    }

    #[tokio::test]
    async fn writes_and_state_changes_are_refused_before_they_run() {
        let (d, q) = engine(QueryLimits::default()).await;
        let target = d.path().join("out");
        let refused = [
            format!("COPY (SELECT 1) TO '{}/x.csv'", target.display()),
            "INSERT INTO readings (device) VALUES ('forged')".to_owned(),
            "DROP TABLE readings".to_owned(),
            "CREATE TABLE t AS SELECT 1".to_owned(),
            "CREATE VIEW v AS SELECT 1".to_owned(),
            format!(
                "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '{}/'",
                target.display()
            ),
            "SET datafusion.execution.batch_size = 1".to_owned(),
            format!(
                "EXPLAIN ANALYZE COPY (SELECT 1) TO '{}/y.csv'",
                target.display()
            ),
            "DELETE FROM readings".to_owned(),
        ];
        for sql in &refused {
            match q.sql(sql).await {
                Err(Error::ReadOnly(m)) => assert!(!m.is_empty()),
                other => panic!("{sql}: {other:?}"),
            }
        }
        assert!(!target.exists(), "a refused statement wrote files");
        // The tables are untouched and queries still work.
        let b = q.sql("SELECT count(*) AS n FROM readings").await.unwrap();
        assert_eq!(b[0].num_rows(), 1);
        // No URL tables: a query cannot read arbitrary files.
        assert!(q.sql("SELECT * FROM '/etc/passwd'").await.is_err());
    }

    #[tokio::test]
    async fn results_past_a_cap_fail_with_a_clear_error() {
        let limits = QueryLimits {
            max_rows: 1000,
            max_bytes: 1 << 30,
            memory_bytes: 64 << 20,
            ..QueryLimits::default()
        };
        let (_d, q) = engine(limits).await;
        let ok = q.sql("SELECT * FROM range(1000)").await.unwrap();
        assert_eq!(ok.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
        match q.sql("SELECT * FROM range(1001)").await {
            Err(Error::TooLarge {
                what: "rows",
                limit: 1000,
            }) => {}
            other => panic!("{other:?}"),
        }
        let limits = QueryLimits {
            max_bytes: 4096,
            ..limits
        };
        let (_d, q) = engine(limits).await;
        match q.sql("SELECT repeat('x', 10000) AS big").await {
            Err(e @ Error::TooLarge { what: "bytes", .. }) => assert!(e.is_caller_fault()),
            other => panic!("{other:?}"),
        }
        // A string the memory pool would not see is refused at planning.
        for sql in [
            "SELECT length(repeat('x', 2100000000))",
            "SELECT lpad('x', 2000000000)",
            "SELECT * FROM range(1) WHERE rpad('a', 1e12) = 'b'",
        ] {
            match q.sql(sql).await {
                Err(e @ Error::TooBig(_)) => assert!(e.is_caller_fault()),
                other => panic!("{sql}: {other:?}"),
            }
        }
        // A query that runs too long is cut off.
        let limits = QueryLimits {
            timeout: std::time::Duration::from_millis(50),
            ..QueryLimits::default()
        };
        let (_d, q) = engine(limits).await;
        match q
            .sql(
                "SELECT count(*) FROM range(100000000) a, range(100) b WHERE a.value % 7 = b.value",
            )
            .await
        {
            Err(Error::Timeout(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn stream_encoders_match_the_whole_result_encoders() {
        let (_d, q) = engine(QueryLimits::default()).await;
        let sql = "SELECT value AS v, CAST(value AS VARCHAR) || '\"\\n' AS s FROM range(10)";
        let whole = q.sql(sql).await.unwrap();
        for f in [Format::Json, Format::Csv, Format::ArrowIpc] {
            let mut s = q.stream(sql).await.unwrap();
            let (mut enc, mut out) = StreamEncoder::begin(f, &s.schema()).unwrap();
            while let Some(b) = s.next().await {
                out.extend(enc.batch(&b.unwrap()).unwrap());
            }
            out.extend(enc.finish().unwrap());
            if f == Format::Json {
                let a: serde_json::Value = serde_json::from_slice(&out).unwrap();
                let b: serde_json::Value =
                    serde_json::from_slice(&encode(&whole, f).unwrap()).unwrap();
                assert_eq!(a, b);
            } else {
                assert_eq!(out, encode(&whole, f).unwrap(), "{f:?}");
            }
        }
    }
}
