//! The `checkpoints`, `anchors`, `alerts` and `rejected` tables, streamed from their JSONL files
//! line by line in batches of [`BATCH_ROWS`]: a query never reads a whole
//! file into memory, however long the file has grown. Each query reads the
//! files as they are when it starts executing.

use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, StringBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use vitaltrail_attestor::pipeline::CheckpointRecord;
use vitaltrail_bus::deadletter::Rejection;
use vitaltrail_core::Checkpoint;

use crate::{Error, Result, ts};

/// Rows per streamed batch.
pub const BATCH_ROWS: usize = 4096;

/// A batch is cut once its lines reach this many bytes (a rejection
/// carries its envelope, up to ~22 KB of base64), so a query holds at most
/// a few of these outside DataFusion's memory pool.
pub const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Discard the rest of the current line.
fn skip_line(reader: &mut impl std::io::BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// Lines longer than this are not records we wrote (a rejection's
/// envelope is at most 16 KiB); they are skipped.
const MAX_LINE: usize = 1 << 20;

/// Builds one table's rows from the lines of its files.
trait Rows: Send + 'static {
    /// Add the row of `line`, from a file tagged `tag`; a line that is not
    /// a record (a torn last line after a crash) adds nothing.
    fn push(&mut self, line: &str, tag: u32);
    /// Rows added since the last batch.
    fn len(&self) -> usize;
    /// The rows added since the last batch.
    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch>;
}

/// One table: the files it reads (found when a query runs) and its rows.
struct JsonlStream<R> {
    schema: SchemaRef,
    files: Arc<dyn Fn() -> Vec<(PathBuf, u32)> + Send + Sync>,
    rows: Arc<dyn Fn() -> R + Send + Sync>,
}

impl<R> std::fmt::Debug for JsonlStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlStream")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl<R: Rows> PartitionStream for JsonlStream<R> {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel::<datafusion::error::Result<RecordBatch>>(2);
        let schema = self.schema.clone();
        let files = (self.files)();
        let mut rows = (self.rows)();
        tokio::task::spawn_blocking(move || {
            // Bytes of the rows since the last batch (across files).
            let mut bytes = 0usize;
            let send = |b: Result<RecordBatch>| {
                tx.blocking_send(
                    b.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e))),
                )
                .is_ok()
            };
            for (path, tag) in files {
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        send(Err(Error::Data(format!("{}: {e}", path.display()))));
                        return;
                    }
                };
                let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = match std::io::Read::by_ref(&mut reader)
                        .take(MAX_LINE as u64 + 1)
                        .read_until(b'\n', &mut line)
                    {
                        Ok(n) => n,
                        Err(e) => {
                            send(Err(Error::Data(format!("{}: {e}", path.display()))));
                            return;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    if line.len() > MAX_LINE && !line.ends_with(b"\n") {
                        // Skip the rest of an overlong line without
                        // holding it.
                        if let Err(e) = skip_line(&mut reader) {
                            send(Err(Error::Data(format!("{}: {e}", path.display()))));
                            return;
                        }
                        continue;
                    }
                    if let Ok(text) = std::str::from_utf8(&line) {
                        let text = text.trim_end();
                        if !text.is_empty() {
                            rows.push(text, tag);
                        }
                    }
                    bytes += line.len();
                    if (rows.len() >= BATCH_ROWS || bytes >= BATCH_BYTES) && {
                        bytes = 0;
                        !send(rows.batch(&schema))
                    } {
                        // The query stopped reading (a LIMIT, a cap).
                        return;
                    }
                }
            }
            if rows.len() > 0 {
                send(rows.batch(&schema));
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

fn table<R: Rows>(
    schema: SchemaRef,
    files: Arc<dyn Fn() -> Vec<(PathBuf, u32)> + Send + Sync>,
    rows: impl Fn() -> R + Send + Sync + 'static,
) -> Result<Arc<StreamingTable>> {
    let stream = JsonlStream {
        schema: schema.clone(),
        files,
        rows: Arc::new(rows),
    };
    Ok(Arc::new(StreamingTable::try_new(
        schema,
        vec![Arc::new(stream)],
    )?))
}

/// `checkpoints`: every partition's `checkpoints.jsonl`, in partition order.
pub fn checkpoints_table(data: &Path) -> Result<Arc<StreamingTable>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new("origin", DataType::Utf8, false),
        Field::new("tree_size", DataType::UInt64, false),
        Field::new("root", DataType::Utf8, false),
        Field::new("signed_at", ts(), false),
        Field::new("note", DataType::Utf8, false),
    ]));
    let root = data.join("partitions");
    let files = Arc::new(move || {
        let mut parts: Vec<(u32, PathBuf)> = std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let p = e.file_name().to_str()?.parse::<u32>().ok()?;
                        Some((p, e.path().join("checkpoints.jsonl")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        parts.sort();
        parts.into_iter().map(|(p, f)| (f, p)).collect()
    });
    table(schema, files, CheckpointRows::default)
}

#[derive(Default)]
struct CheckpointRows {
    part: UInt32Builder,
    origin: StringBuilder,
    size: UInt64Builder,
    root: StringBuilder,
    at: TimestampMillisecondBuilder,
    note: StringBuilder,
    n: usize,
}

impl Rows for CheckpointRows {
    fn push(&mut self, line: &str, tag: u32) {
        let Ok(c) = serde_json::from_str::<CheckpointRecord>(line) else {
            return;
        };
        let Ok(cp) = Checkpoint::parse_unverified(&c.note) else {
            return;
        };
        self.part.append_value(tag);
        self.origin.append_value(&cp.origin);
        self.size.append_value(cp.size);
        self.root.append_value(cp.root.to_hex());
        self.at.append_value(c.time_ms as i64);
        self.note.append_value(&c.note);
        self.n += 1;
    }

    fn len(&self) -> usize {
        self.n
    }

    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.part.finish()),
            Arc::new(self.origin.finish()),
            Arc::new(self.size.finish()),
            Arc::new(self.root.finish()),
            Arc::new(self.at.finish().with_timezone("UTC")),
            Arc::new(self.note.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

/// `anchors`: every anchor of the epoch log: the local ledger's
/// (`<data>/anchor/ledger.jsonl`, each row from the signed record itself;
/// `vitaltrail anchor verify-ledger` checks them), then the chain's
/// (`<data>/anchor/evm.jsonl`: confirmed ones, and a `reorged` row for
/// each that a reorg removed later).
pub fn anchors_table(data: &Path) -> Result<Arc<StreamingTable>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("backend", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("epoch_log_size", DataType::UInt64, false),
        Field::new("root", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, true),
        Field::new("tx_hash", DataType::Utf8, true),
        Field::new("block_number", DataType::UInt64, true),
        Field::new("confirmations", DataType::UInt64, true),
        Field::new("anchored_at", ts(), false),
    ]));
    let ledger = vitaltrail_anchor::ledger::ledger_path(&data.join("anchor"));
    let evm = vitaltrail_anchor::evm::evm_path(&data.join("anchor"));
    let files = Arc::new(move || vec![(ledger.clone(), 0), (evm.clone(), 1)]);
    // The epoch log's origin is the anchor key's name: the stream of chain
    // lines written before they named it.
    let origin = std::fs::read_to_string(data.join("anchor").join("anchor.vkey"))
        .ok()
        .and_then(|k| k.split('+').next().map(str::to_owned))
        .unwrap_or_default();
    table(schema, files, move || AnchorRows {
        origin: origin.clone(),
        ..AnchorRows::default()
    })
}

#[derive(Default)]
struct AnchorRows {
    /// The epoch log's origin, for chain lines that do not name it.
    origin: String,
    backend: StringBuilder,
    status: StringBuilder,
    stream: StringBuilder,
    target: StringBuilder,
    size: UInt64Builder,
    root: StringBuilder,
    seq: UInt64Builder,
    tx: StringBuilder,
    block: UInt64Builder,
    confirmations: UInt64Builder,
    at: TimestampMillisecondBuilder,
    n: usize,
}

impl Rows for AnchorRows {
    fn push(&mut self, line: &str, tag: u32) {
        if tag == 1 {
            // The chain's: confirmed anchors, and those a reorg removed
            // later (a row of their own, status `reorged`).
            let Ok(l) = serde_json::from_str::<vitaltrail_anchor::evm::EvmLine>(line) else {
                return;
            };
            if l.kind == "submitted" {
                return;
            }
            self.backend.append_value("evm");
            self.status.append_value(&l.kind);
            self.stream.append_value(if l.origin.is_empty() {
                &self.origin
            } else {
                &l.origin
            });
            self.target.append_value(format!(
                "evm:{}:{}",
                l.chain_id,
                l.contract.to_ascii_lowercase()
            ));
            self.size.append_value(l.size);
            self.root.append_value(&l.root);
            self.seq.append_null();
            self.tx.append_value(&l.tx_hash);
            self.block.append_option(l.block_number);
            self.confirmations.append_option(l.confirmations);
            self.at.append_value(l.time_ms as i64);
            self.n += 1;
            return;
        }
        let Ok(l) = serde_json::from_str::<vitaltrail_anchor::ledger::LedgerLine>(line) else {
            return;
        };
        let Ok(r) = vitaltrail_core::anchor::LedgerRecord::parse_unverified(&l.record) else {
            return;
        };
        self.backend.append_value("ledger");
        self.status.append_value("written");
        self.stream.append_value(&r.stream);
        self.target.append_value("ledger");
        self.size.append_value(r.size);
        self.root.append_value(r.root.to_hex());
        self.seq.append_value(r.seq);
        self.tx.append_null();
        self.block.append_null();
        self.confirmations.append_null();
        self.at.append_value(r.time_ms as i64);
        self.n += 1;
    }

    fn len(&self) -> usize {
        self.n
    }

    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.backend.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.stream.finish()),
            Arc::new(self.target.finish()),
            Arc::new(self.size.finish()),
            Arc::new(self.root.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.tx.finish()),
            Arc::new(self.block.finish()),
            Arc::new(self.confirmations.finish()),
            Arc::new(self.at.finish().with_timezone("UTC")),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

/// `alerts`: every alarm event the alert engine wrote
/// (`<data>/alerts/events-*.jsonl`, oldest generation first): one row per
/// change of an alarm (`raised`, `updated`, `escalated`, `acknowledged`,
/// `cleared`), with the alarm's state after it. `evidence` is a JSON array
/// of the triggering readings, each with the `device`, `seq`, `partition`
/// and `log_index` to fetch its proof bundle by.
pub fn alerts_table(data: &Path) -> Result<Arc<StreamingTable>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("at", ts(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("alarm_id", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("subject", DataType::Utf8, false),
        Field::new("ward", DataType::Utf8, true),
        Field::new("severity", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("active", DataType::Boolean, false),
        Field::new("acknowledged_by", DataType::Utf8, true),
        Field::new("acknowledged_at", ts(), true),
        Field::new("acknowledged_via", DataType::Utf8, true),
        Field::new("escalation", DataType::UInt32, false),
        Field::new("notify", DataType::Utf8, true),
        Field::new("raised_at", ts(), false),
        Field::new("evidence", DataType::Utf8, false),
    ]));
    let dir = vitaltrail_alerts::stage::alerts_dir(data);
    let files = Arc::new(move || {
        vitaltrail_alerts::stage::event_files(&dir)
            .into_iter()
            .map(|(_, f)| (f, 0))
            .collect()
    });
    table(schema, files, AlertRows::default)
}

#[derive(Default)]
struct AlertRows {
    at: TimestampMillisecondBuilder,
    kind: StringBuilder,
    id: StringBuilder,
    rule: StringBuilder,
    subject: StringBuilder,
    ward: StringBuilder,
    severity: StringBuilder,
    reason: StringBuilder,
    active: arrow::array::BooleanBuilder,
    ack_by: StringBuilder,
    ack_at: TimestampMillisecondBuilder,
    ack_via: StringBuilder,
    escalation: UInt32Builder,
    notify: StringBuilder,
    raised: TimestampMillisecondBuilder,
    evidence: StringBuilder,
    n: usize,
}

impl Rows for AlertRows {
    fn push(&mut self, line: &str, _tag: u32) {
        let Ok(e) = serde_json::from_str::<vitaltrail_alerts::Event>(line) else {
            return;
        };
        let a = &e.alarm;
        let Ok(evidence) = serde_json::to_string(&a.evidence) else {
            return;
        };
        self.at.append_value(e.at_ms as i64);
        self.kind.append_value(e.kind.as_str());
        self.id.append_value(&a.id);
        self.rule.append_value(&a.rule);
        self.subject.append_value(&a.subject);
        self.ward.append_option(a.ward.as_deref());
        self.severity.append_value(a.severity.as_str());
        self.reason.append_value(&a.reason);
        self.active.append_value(a.active);
        self.ack_by
            .append_option(a.ack.as_ref().map(|k| k.by.as_str()));
        self.ack_at
            .append_option(a.ack.as_ref().map(|k| k.at_ms as i64));
        self.ack_via.append_option(
            a.ack
                .as_ref()
                .and_then(|k| k.via)
                .map(vitaltrail_alerts::ack::AckVia::as_str),
        );
        self.escalation.append_value(a.escalation);
        self.notify.append_option(e.notify.as_deref());
        self.raised.append_value(a.raised_ms as i64);
        self.evidence.append_value(evidence);
        self.n += 1;
    }

    fn len(&self) -> usize {
        self.n
    }

    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.n = 0;
        let utc = |b: &mut TimestampMillisecondBuilder| Arc::new(b.finish().with_timezone("UTC"));
        let cols: Vec<ArrayRef> = vec![
            utc(&mut self.at),
            Arc::new(self.kind.finish()),
            Arc::new(self.id.finish()),
            Arc::new(self.rule.finish()),
            Arc::new(self.subject.finish()),
            Arc::new(self.ward.finish()),
            Arc::new(self.severity.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.active.finish()),
            Arc::new(self.ack_by.finish()),
            utc(&mut self.ack_at),
            Arc::new(self.ack_via.finish()),
            Arc::new(self.escalation.finish()),
            Arc::new(self.notify.finish()),
            utc(&mut self.raised),
            Arc::new(self.evidence.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

/// `rejected`: `<data>/rejected.jsonl`, each `source` once (the Kafka
/// dead-letter copy may repeat a record after a crash).
pub fn rejected_table(data: &Path) -> Result<Arc<StreamingTable>> {
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
        Field::new("count", DataType::UInt64, false),
    ]));
    let file = data.join("rejected.jsonl");
    table(
        schema,
        Arc::new(move || vec![(file.clone(), 0)]),
        RejectedRows::default,
    )
}

#[derive(Default)]
struct RejectedRows {
    at: TimestampMillisecondBuilder,
    stage: StringBuilder,
    reason: StringBuilder,
    detail: StringBuilder,
    device: StringBuilder,
    seq: UInt64Builder,
    topic: StringBuilder,
    size: UInt64Builder,
    source: StringBuilder,
    env: StringBuilder,
    count: UInt64Builder,
    /// Sources seen, as 128-bit BLAKE3 prefixes (16 bytes each; bounded
    /// by the dead-letter file's own byte cap).
    seen: std::collections::HashSet<u128>,
    n: usize,
}

impl Rows for RejectedRows {
    fn push(&mut self, line: &str, _tag: u32) {
        let Ok(r) = serde_json::from_str::<Rejection>(line) else {
            return;
        };
        if let Some(s) = &r.source {
            let h = blake3::hash(s.as_bytes());
            let mut b = [0u8; 16];
            b.copy_from_slice(&h.as_bytes()[..16]);
            if !self.seen.insert(u128::from_le_bytes(b)) {
                return;
            }
        }
        self.at.append_value(r.received_ms as i64);
        self.stage.append_value(&r.stage);
        self.reason.append_value(&r.reason);
        self.detail.append_value(&r.detail);
        self.device.append_option(r.device.as_deref());
        self.seq.append_option(r.seq);
        self.topic.append_option(r.topic.as_deref());
        self.size.append_value(r.size);
        self.source.append_option(r.source.as_deref());
        self.env.append_option(r.envelope_b64.as_deref());
        self.count.append_value(r.count);
        self.n += 1;
    }

    fn len(&self) -> usize {
        self.n
    }

    fn batch(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.n = 0;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.at.finish().with_timezone("UTC")),
            Arc::new(self.stage.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.device.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.size.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.env.finish()),
            Arc::new(self.count.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_files_stream_in_batches_and_skip_torn_lines() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("rejected.jsonl");
        let mut text = String::new();
        for i in 0..10_000u64 {
            let mut r = Rejection::new("ingest", "bad_signature", "x", b"abc", i);
            r.source = Some(format!("vitals.rejected/0@{}", i % 9_000));
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
        }
        text.push_str("{\"torn\": ");
        std::fs::write(&path, text).unwrap();
        let q = crate::QueryEngine::open(d.path()).await.unwrap();
        let n = crate::first_count(&q, "SELECT count(*) AS n, sum(count) AS c FROM rejected").await;
        assert_eq!(n, 9_000, "each source once, the torn line skipped");
        // The table is a stream: a plain scan comes in batches.
        let mut s = q.stream("SELECT * FROM rejected").await.unwrap();
        let mut batches = 0;
        let mut rows = 0;
        while let Some(b) = s.next().await {
            let b = b.unwrap();
            assert!(b.num_rows() <= BATCH_ROWS);
            rows += b.num_rows();
            batches += 1;
        }
        assert_eq!(rows, 9_000);
        assert!(batches >= 3, "{batches} batches");
    }
}
