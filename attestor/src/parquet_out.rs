//! Readings to Parquet: one row per measurement, with the reading's log index
//! and leaf hash, under `<data>/readings/date=YYYY-MM-DD/` (the log-time date).
//!
//! The Parquet files are derived from the partition's Merkle log, which is
//! the source of truth. Each export covers the leaves `[hw, size)` and is
//! written as `p<partition>-<first>-<last>.parquet` (temp file, fsync,
//! rename; one file per log-time date), then the high-water mark
//! `parquet.hw` moves to `size`: that write is the commit. On open, files of
//! this partition that start at or past the high-water mark are leftovers of
//! an export that did not commit, and are deleted before anything else, so
//! no row is lost or duplicated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Builder, StringBuilder, TimestampMillisecondBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use vitaltrail_core::{DidCache, Hash, Reading, envelope, leaf};

use crate::durable::{DurableLog, write_atomic};
use crate::error::{Error, Result};

/// Looks up the patient of a device DID (from the device registry).
pub type PatientLookup = Arc<dyn Fn(&str) -> Registered + Send + Sync>;

/// What the device registry says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// Registered for this patient, not revoked.
    Active(String),
    /// Registered for this patient, then revoked.
    Revoked(String),
    /// Never registered.
    Unknown,
}

impl Registered {
    /// The patient, revoked or not.
    pub fn patient(self) -> Option<String> {
        match self {
            Registered::Active(p) | Registered::Revoked(p) => Some(p),
            Registered::Unknown => None,
        }
    }
}

/// The schema of the `readings` table.
pub fn readings_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("patient", DataType::Utf8, true),
        Field::new("seq", DataType::UInt64, false),
        Field::new("device_time", ts.clone(), false),
        Field::new("log_time", ts, false),
        Field::new("loinc", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("unit", DataType::Utf8, false),
        Field::new("partition", DataType::UInt32, false),
        Field::new("log_index", DataType::UInt64, false),
        Field::new("leaf_hash", DataType::Utf8, false),
        // Reached the log more than `LATE_AFTER_MS` after its device time
        // (an offline sync). Null in files written before the column existed.
        Field::new("late", DataType::Boolean, true),
    ]))
}

#[derive(Default)]
struct Rows {
    device: StringBuilder,
    patient: StringBuilder,
    seq: UInt64Builder,
    device_time: TimestampMillisecondBuilder,
    log_time: TimestampMillisecondBuilder,
    loinc: StringBuilder,
    value: Float64Builder,
    unit: StringBuilder,
    partition: UInt32Builder,
    log_index: UInt64Builder,
    leaf_hash: StringBuilder,
    late: arrow::array::BooleanBuilder,
}

impl Rows {
    fn finish(mut self) -> Result<RecordBatch> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.device.finish()),
            Arc::new(self.patient.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.device_time.finish().with_timezone("UTC")),
            Arc::new(self.log_time.finish().with_timezone("UTC")),
            Arc::new(self.loinc.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.unit.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.log_index.finish()),
            Arc::new(self.leaf_hash.finish()),
            Arc::new(self.late.finish()),
        ];
        RecordBatch::try_new(readings_schema(), cols).map_err(|e| Error::State {
            path: PathBuf::from("readings"),
            detail: e.to_string(),
        })
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix-ms time.
pub fn utc_date(ms: u64) -> String {
    arrow::temporal_conversions::timestamp_ms_to_datetime(ms as i64)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into())
}

/// Delete files of `partition` whose first leaf is `>= hw` (an export that
/// crashed before its commit) and temp files.
fn remove_uncommitted(root: &Path, partition: u32, hw: u64) -> Result<()> {
    let Ok(dates) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let prefix = format!("p{partition}-");
    for date in dates.flatten() {
        let Ok(files) = std::fs::read_dir(date.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let first = name
                .strip_prefix(&prefix)
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse::<u64>().ok());
            let stale_tmp = name.starts_with(&format!(".{prefix}")) && name.ends_with(".tmp");
            if first.is_some_and(|first| first >= hw) || stale_tmp {
                std::fs::remove_file(f.path()).map_err(|e| perr(&f.path(), e))?;
            }
        }
    }
    Ok(())
}

/// Exports one partition's log to Parquet.
#[derive(Debug)]
pub struct ParquetExporter {
    root: PathBuf,
    state_dir: PathBuf,
    partition: u32,
    hw: u64,
    /// Readings the attestor just logged and already decoded, from `hw` on
    /// and contiguous, so an export need not read and decode them again.
    staged: std::collections::VecDeque<Staged>,
}

/// One logged reading, decoded, as handed over by the attestor.
#[derive(Debug)]
struct Staged {
    index: u64,
    log_time_ms: u64,
    hash: Hash,
    reading: Reading,
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

impl ParquetExporter {
    /// Exporter for `partition`, writing under `<data_dir>/readings`, keeping
    /// its high-water mark in `state_dir`.
    pub fn open(data_dir: &Path, state_dir: &Path, partition: u32) -> Result<Self> {
        let hw_path = state_dir.join("parquet.hw");
        let hw = match std::fs::read_to_string(&hw_path) {
            Ok(s) => s.trim().parse().map_err(|e| perr(&hw_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(perr(&hw_path, e)),
        };
        let root = data_dir.join("readings");
        remove_uncommitted(&root, partition, hw)?;
        Ok(ParquetExporter {
            root,
            state_dir: state_dir.to_owned(),
            partition,
            hw,
            staged: std::collections::VecDeque::new(),
        })
    }

    /// Hand over readings just appended at `first_index..`, with their log
    /// time and leaf hashes, so the next export need not decode them. A
    /// gap (anything not continuing what is staged) discards the staging;
    /// export then reads the log, which is always correct.
    pub fn stage(
        &mut self,
        first_index: u64,
        log_time_ms: u64,
        readings: Vec<Reading>,
        hashes: &[Hash],
    ) {
        let next = self.staged.back().map_or(self.hw, |s| s.index + 1);
        if first_index != next || readings.len() != hashes.len() {
            self.staged.clear();
            return;
        }
        for (i, (reading, hash)) in readings.into_iter().zip(hashes).enumerate() {
            self.staged.push_back(Staged {
                index: first_index + i as u64,
                log_time_ms,
                hash: *hash,
                reading,
            });
        }
    }

    /// Leaves exported so far.
    pub fn high_water(&self) -> u64 {
        self.hw
    }

    /// Export the leaves `[hw, log.size())`. Returns the rows written.
    pub fn export(
        &mut self,
        log: &DurableLog,
        patients: &PatientLookup,
        dids: &mut DidCache,
    ) -> Result<usize> {
        let end = log.size();
        if end <= self.hw {
            return Ok(0);
        }
        let first = self.hw;
        let mut by_date: BTreeMap<String, Rows> = BTreeMap::new();
        let mut n = 0;
        for i in first..end {
            let staged = match self.staged.front() {
                Some(s) if s.index == i => self.staged.pop_front(),
                _ => {
                    self.staged.clear();
                    None
                }
            };
            let (r, log_time_ms, hash) = match staged {
                Some(s) => (s.reading, s.log_time_ms, s.hash.to_hex()),
                None => {
                    let bytes = log.leaf(i)?;
                    let l = leaf::decode(&bytes)?;
                    let r =
                        envelope::decode_verified_upstream_with(l.envelope, |s| dids.resolve(s))?;
                    (r, l.log_time_ms, log.leaf_hash(i)?.to_hex())
                }
            };
            let did = r.did.as_str();
            let patient = patients(did).patient();
            let rows = by_date.entry(utc_date(log_time_ms)).or_default();
            for m in &r.measurements {
                rows.device.append_value(did);
                rows.patient.append_option(patient.as_deref());
                rows.seq.append_value(r.seq);
                rows.device_time.append_value(r.time as i64);
                rows.log_time.append_value(log_time_ms as i64);
                rows.loinc.append_value(&m.code);
                rows.value.append_value(m.value);
                rows.unit.append_value(&m.unit);
                rows.partition.append_value(self.partition);
                rows.log_index.append_value(i);
                rows.leaf_hash.append_value(&hash);
                rows.late.append_value(
                    log_time_ms.saturating_sub(r.time) > crate::pipeline::LATE_AFTER_MS,
                );
                n += 1;
            }
        }
        for (date, rows) in by_date {
            let dir = self.root.join(format!("date={date}"));
            std::fs::create_dir_all(&dir).map_err(|e| perr(&dir, e))?;
            let name = format!("p{}-{first:012}-{:012}.parquet", self.partition, end - 1);
            let batch = rows.finish()?;
            let mut buf = Vec::new();
            {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::SNAPPY)
                    .build();
                let mut w =
                    parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))
                        .map_err(|e| perr(&dir, e))?;
                w.write(&batch).map_err(|e| perr(&dir, e))?;
                w.close().map_err(|e| perr(&dir, e))?;
            }
            write_atomic(&dir, &name, &buf)?;
        }
        write_atomic(&self.state_dir, "parquet.hw", end.to_string().as_bytes())?;
        self.hw = end;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::SecretKey;
    use vitaltrail_core::envelope::{Measurement, UnsignedReading, sign};

    fn fill(log: &mut DurableLog, from: u64, to: u64) {
        let dev = SecretKey::from_seed(&[4; 32]).unwrap();
        let leaves: Vec<Vec<u8>> = (from..to)
            .map(|seq| {
                let e = sign(
                    &dev,
                    &UnsignedReading {
                        seq,
                        time: 1_800_000_000_000,
                        measurements: vec![
                            Measurement {
                                code: "8867-4".into(),
                                value: 60.0,
                                unit: "/min".into(),
                            },
                            Measurement {
                                code: "2708-6".into(),
                                value: 98.0,
                                unit: "%".into(),
                            },
                        ],
                        meta: None,
                    },
                )
                .unwrap();
                leaf::encode(1_800_000_000_000 + seq, &e)
            })
            .collect();
        log.append_batch(&leaves).unwrap();
    }

    fn rows(data: &Path) -> usize {
        let mut n = 0;
        for d in std::fs::read_dir(data.join("readings")).unwrap().flatten() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                let file = std::fs::File::open(f.path()).unwrap();
                let r =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                        .unwrap()
                        .build()
                        .unwrap();
                n += r.map(|b| b.unwrap().num_rows()).sum::<usize>();
            }
        }
        n
    }

    #[test]
    fn exports_once_and_recovers_from_an_uncommitted_export() {
        let data = tempfile::tempdir().unwrap();
        let pdir = data.path().join("partitions/0");
        let mut log = DurableLog::open(&pdir).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        fill(&mut log, 0, 10);
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        assert_eq!(
            ex.export(&log, &patients, &mut DidCache::default())
                .unwrap(),
            20
        );
        assert_eq!(
            ex.export(&log, &patients, &mut DidCache::default())
                .unwrap(),
            0
        );
        fill(&mut log, 10, 15);
        assert_eq!(
            ex.export(&log, &patients, &mut DidCache::default())
                .unwrap(),
            10
        );
        assert_eq!(rows(data.path()), 30);
        // Simulate a crash after files were written but before the commit.
        fill(&mut log, 15, 20);
        std::fs::write(pdir.join("parquet.hw"), b"15").unwrap();
        let mut partial = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        partial.hw = 15;
        partial
            .export(&log, &patients, &mut DidCache::default())
            .unwrap();
        std::fs::write(pdir.join("parquet.hw"), b"15").unwrap();
        fill(&mut log, 20, 22);
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        ex.export(&log, &patients, &mut DidCache::default())
            .unwrap();
        assert_eq!(rows(data.path()), 44, "every reading exactly once");
    }

    /// Every row, in log order (file names start with the first index).
    fn all_rows(data: &Path) -> RecordBatch {
        let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("readings"))
            .unwrap()
            .flatten()
            .flat_map(|d| {
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path())
            })
            .collect();
        files.sort_by_key(|p| p.file_name().unwrap().to_owned());
        let mut batches = Vec::new();
        for f in files {
            let file = std::fs::File::open(f).unwrap();
            let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap();
            batches.extend(r.map(|b| b.unwrap()));
        }
        arrow::compute::concat_batches(&readings_schema(), &batches).unwrap()
    }

    #[test]
    fn staged_readings_export_exactly_what_the_log_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let pdir = tmp.path().join("log");
        let mut log = DurableLog::open(&pdir).unwrap();
        fill(&mut log, 0, 30);
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let (sa, sb) = (tmp.path().join("sa"), tmp.path().join("sb"));
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::create_dir_all(&sb).unwrap();
        let mut staged = ParquetExporter::open(&a, &sa, 0).unwrap();
        let mut plain = ParquetExporter::open(&b, &sb, 0).unwrap();
        let mut dids = DidCache::default();
        // Stage leaves 0..12 and 13..30: leaf 12 is a gap, so part of the
        // export must fall back to reading the log.
        for i in (0..30).filter(|&i| i != 12) {
            let bytes = log.leaf(i).unwrap();
            let l = leaf::decode(&bytes).unwrap();
            let r = envelope::decode_verified_upstream(l.envelope).unwrap();
            staged.stage(i, l.log_time_ms, vec![r], &[log.leaf_hash(i).unwrap()]);
            if i == 20 {
                staged.export(&log, &patients, &mut dids).unwrap();
            }
        }
        staged.export(&log, &patients, &mut dids).unwrap();
        plain.export(&log, &patients, &mut dids).unwrap();
        let rows = all_rows(&a);
        assert_eq!(rows.num_rows(), 60);
        assert_eq!(rows, all_rows(&b));
    }
}
