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
//!
//! **Compaction** ([`Compactor`], on a thread of its own per partition)
//! keeps the file count bounded. Once a date directory holds
//! [`CompactionPolicy::min_files`] consecutive committed files of a
//! partition (consecutive in index order among the live files) of one
//! size tier (tier `t` holds 4^t to 4^(t+1) − 1 leaves; a file takes the
//! largest tier of the files after it, so a small file before a large one
//! is swept up with it), and
//! under [`CompactionPolicy::target_bytes`] together, they are rewritten as
//! one file named for the whole range, `p<partition>-<first of run>-<last
//! of run>.parquet` (temp file, fsync, rename: the rename is the commit).
//! The result is about `min_files` times larger, so a row is rewritten
//! about once per factor of `min_files` in file size, and a directory
//! settles below `min_files` live files per tier. A file whose range lies inside another file of the same
//! partition in the same directory is **covered**: readers skip it
//! ([`covered_files`]), so a reading is in exactly one live file at every
//! instant, before, during and after a compaction, and after a crash at any
//! point. Covered files are deleted once their oldest cover is older than
//! [`CompactionPolicy::grace`] (longer than any query may run), so a query
//! that listed them before the rename can still read them. Only names this
//! module writes are taken for its files ([`FileRange::parse`] is strict);
//! the directory is trusted storage (see `docs/threat-model.md`).

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
    let tmp_prefix = format!(".p{partition}-");
    for date in dates.flatten() {
        if !date.file_name().to_string_lossy().starts_with("date=") {
            continue;
        }
        let Ok(files) = std::fs::read_dir(date.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let uncommitted =
                FileRange::parse(&name).is_some_and(|r| r.partition == partition && r.first >= hw);
            let stale_tmp = name.starts_with(&tmp_prefix) && name.ends_with(".tmp");
            if (uncommitted || stale_tmp) && f.path().is_file() {
                match std::fs::remove_file(f.path()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(perr(&f.path(), e)),
                }
            }
        }
    }
    Ok(())
}

/// The index range a Parquet file of the `readings` table covers, from
/// its name `p<partition>-<first>-<last>.parquet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileRange {
    /// The partition.
    pub partition: u32,
    /// Its first leaf index.
    pub first: u64,
    /// Its last leaf index.
    pub last: u64,
}

impl FileRange {
    /// Parse a file name; `None` for anything else (temp files included).
    pub fn parse(name: &str) -> Option<FileRange> {
        let rest = name.strip_prefix('p')?.strip_suffix(".parquet")?;
        let mut it = rest.splitn(3, '-');
        let partition = it.next()?.parse().ok()?;
        let first = it.next()?.parse().ok()?;
        let last = it.next()?.parse().ok()?;
        let r = FileRange {
            partition,
            first,
            last,
        };
        // Only the names we write: an odd one (`p00-…`, unpadded numbers)
        // must never be taken for a file of ours.
        (first <= last && r.name() == name).then_some(r)
    }

    /// The file name.
    pub fn name(&self) -> String {
        format!(
            "p{}-{:012}-{:012}.parquet",
            self.partition, self.first, self.last
        )
    }

    fn inside(&self, other: &FileRange) -> bool {
        self != other
            && self.partition == other.partition
            && other.first <= self.first
            && self.last <= other.last
    }
}

/// Of the file names of one directory, those covered by another file of
/// the same partition (a compaction merged them; readers must skip them).
pub fn covered_files<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranges: Vec<(FileRange, &str)> = names
        .into_iter()
        .filter_map(|n| FileRange::parse(n).map(|r| (r, n)))
        .collect();
    // By partition, then first ascending and last descending: a covering
    // file comes before everything inside it.
    ranges.sort_by_key(|(r, _)| (r.partition, r.first, std::cmp::Reverse(r.last)));
    let mut out = Vec::new();
    let mut cover: Option<FileRange> = None;
    for (r, n) in ranges {
        match cover {
            Some(c) if r.inside(&c) => out.push(n),
            _ => cover = Some(r),
        }
    }
    out
}

/// When and how much to compact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compact a date directory once it holds this many small files of
    /// one partition.
    pub min_files: usize,
    /// A file this large is not small; a merge stops adding files here.
    pub target_bytes: u64,
    /// Delete a covered file once the file covering it is this old.
    pub grace: std::time::Duration,
    /// Look at the directories at most this often.
    pub every: std::time::Duration,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_files: 16,
            target_bytes: 64 * 1024 * 1024,
            // Five query timeouts (`QueryLimits::timeout`, 60 s).
            grace: std::time::Duration::from_secs(300),
            every: std::time::Duration::from_secs(10),
        }
    }
}

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionStats {
    /// Files merged into one (0 when nothing was due).
    pub merged: usize,
    /// Covered files deleted.
    pub deleted: usize,
    /// Live files of this partition after the pass, in the directories
    /// looked at.
    pub live_files: usize,
    /// Bytes of the files merged (what was read to be rewritten).
    pub rewritten_bytes: u64,
}

/// Files are tiered by size in leaves: tier `t` holds `SIZE_RATIO^t` to
/// `SIZE_RATIO^(t+1) − 1` leaves.
const SIZE_RATIO: u64 = 4;

/// The tier of a file of `leaves` leaves: ⌊log_ratio(leaves)⌋.
fn tier(leaves: u64, ratio: u64) -> u32 {
    leaves.max(1).ilog(ratio.max(2))
}

/// The first run of at least `min` consecutive files of `live` (sorted by
/// first index) that are committed (below `hw`), each under `target`
/// bytes and strictly after the one before (no overlap), at most `target`
/// bytes together, and of one *effective tier*; as long as those rules
/// allow.
///
/// A file's effective tier is the largest tier among it and the eligible
/// files after it (up to the first one that is not eligible). Size-tiered
/// compaction merges files of one tier; the effective tier also sweeps a
/// small file that sits before a larger one (an export cut short by a
/// crash, or a quiet spell before a busy one) into the larger one's tier,
/// where it would otherwise stay forever. Effective tiers never rise from
/// older to newer files, and no tier keeps `min` files, so a directory
/// settles at fewer than `min` live files per tier: O(min · log N).
fn pick_run(
    live: &[(FileRange, u64)],
    hw: u64,
    min: usize,
    target: u64,
    ratio: u64,
) -> Option<Vec<FileRange>> {
    let ok = |k: usize| {
        let (r, len) = live[k];
        r.last < hw && len < target && (k == 0 || r.first > live[k - 1].0.last)
    };
    // By leaves (a file's index range), not bytes: a small file is mostly
    // its footer, so bytes barely grow when small files merge.
    let leaves = |k: usize| live[k].0.last - live[k].0.first + 1;
    let mut eff = vec![None; live.len()];
    let mut next: Option<u32> = None;
    for k in (0..live.len()).rev() {
        next = if ok(k) {
            Some(next.map_or(tier(leaves(k), ratio), |t| t.max(tier(leaves(k), ratio))))
        } else {
            None
        };
        eff[k] = next;
    }
    for a in 0..live.len() {
        let Some(t) = eff[a] else { continue };
        let mut sum = live[a].1;
        let mut b = a + 1;
        while b < live.len() && eff[b] == Some(t) && sum + live[b].1 <= target {
            sum += live[b].1;
            b += 1;
        }
        if b - a >= min {
            return Some(live[a..b].iter().map(|(r, _)| *r).collect());
        }
    }
    None
}

/// Read a `readings` file batch by batch (8k rows each), in the current
/// schema (a column a file written before it existed is null), handing
/// each to `f`: a file is never held in memory whole.
fn each_batch(path: &Path, mut f: impl FnMut(RecordBatch) -> Result<()>) -> Result<()> {
    let schema = readings_schema();
    let file = std::fs::File::open(path).map_err(|e| perr(path, e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| perr(path, e))?
        .with_batch_size(8192)
        .build()
        .map_err(|e| perr(path, e))?;
    for b in reader {
        let b = b.map_err(|e| perr(path, e))?;
        let cols: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| match b.column_by_name(f.name()) {
                Some(c) => c.clone(),
                None => arrow::array::new_null_array(f.data_type(), b.num_rows()),
            })
            .collect();
        f(RecordBatch::try_new(schema.clone(), cols).map_err(|e| perr(path, e))?)?;
    }
    Ok(())
}

/// Compacts one partition's Parquet files. It touches only files wholly
/// below the high-water mark it is given, and the exporter only creates
/// files at or past it, so it can run beside the exporter (on a thread of
/// its own).
#[derive(Debug)]
pub struct Compactor {
    root: PathBuf,
    partition: u32,
    compacted_at: Option<std::time::Instant>,
    /// Every date directory was looked at once (later passes look at the
    /// newest two only: older days get no new files).
    scanned_all: bool,
}

impl Compactor {
    /// For `partition`'s files under `<data_dir>/readings`.
    pub fn new(data_dir: &Path, partition: u32) -> Self {
        Compactor {
            root: data_dir.join("readings"),
            partition,
            compacted_at: None,
            scanned_all: false,
        }
    }

    /// One pass, if `policy.every` has passed since the last (or
    /// `force`): in each date directory, delete covered files past their
    /// grace, and merge at most one run of consecutive committed files
    /// (below `hw`) of one size class. Returns `None` when not due. An error
    /// leaves every file as it was or as a committed merge left it.
    pub fn compact(
        &mut self,
        hw: u64,
        policy: &CompactionPolicy,
        force: bool,
    ) -> Result<Option<CompactionStats>> {
        if !force
            && self
                .compacted_at
                .is_some_and(|t| t.elapsed() < policy.every)
        {
            return Ok(None);
        }
        self.compacted_at = Some(std::time::Instant::now());
        let mut stats = CompactionStats::default();
        let Ok(dates) = std::fs::read_dir(&self.root) else {
            return Ok(Some(stats));
        };
        let mut dirs: Vec<PathBuf> = dates
            .flatten()
            .filter(|d| d.file_name().to_string_lossy().starts_with("date="))
            .map(|d| d.path())
            .collect();
        dirs.sort();
        // The first pass looks at every day (a restart may have left
        // covered files or a tail to merge anywhere); later ones at the
        // newest two, which are the only ones that get new files.
        if self.scanned_all {
            let keep = dirs.len().saturating_sub(2);
            dirs.drain(..keep);
        }
        // A problem in one directory (reported) does not keep the others,
        // today's included, from being compacted.
        let mut first_err = None;
        for dir in dirs {
            if let Err(e) = self.compact_dir(&dir, hw, policy, &mut stats) {
                first_err.get_or_insert(e);
            }
        }
        self.scanned_all = true;
        match first_err {
            Some(e) => Err(e),
            None => Ok(Some(stats)),
        }
    }

    fn compact_dir(
        &self,
        dir: &Path,
        hw: u64,
        policy: &CompactionPolicy,
        stats: &mut CompactionStats,
    ) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| perr(dir, e))?;
        // (range, bytes, written) of every non-empty file of ours (an
        // empty one is no Parquet file, and covers nothing).
        let mut all: Vec<(FileRange, u64, std::time::SystemTime)> = Vec::new();
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(|e| perr(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Other partitions' files never cover ours: not even looked at
            // (their compactors delete theirs concurrently).
            let Some(r) = FileRange::parse(&name).filter(|r| r.partition == self.partition) else {
                continue;
            };
            // Any doubt about a file of ours (it vanished, it is not a
            // plain file) stops this directory's pass: deciding what is
            // covered without it could delete rows.
            let meta = std::fs::metadata(e.path()).map_err(|e| perr(dir, e))?;
            if !meta.is_file() {
                return Err(perr(&e.path(), "not a regular file"));
            }
            if meta.len() == 0 {
                continue;
            }
            let mtime = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            names.push(name);
            all.push((r, meta.len(), mtime));
        }
        let covered: std::collections::HashSet<&str> =
            covered_files(names.iter().map(String::as_str))
                .into_iter()
                .collect();
        // This partition's files: (range, bytes, written, covered).
        let files: Vec<(FileRange, u64, std::time::SystemTime, bool)> = all
            .iter()
            .zip(&names)
            .filter(|((r, ..), _)| r.partition == self.partition)
            .map(|(&(r, len, mtime), n)| (r, len, mtime, covered.contains(n.as_str())))
            .collect();
        // A covered file goes once its oldest cover (live or covered
        // itself) is past the grace: it has been covered at least that
        // long, so no query that listed it as live is still running.
        // (The newest cover is rewritten at every merge, so waiting on it
        // would never delete anything under steady traffic.)
        let mut deleted_here = 0;
        for (r, _, _, is_covered) in &files {
            if !is_covered {
                continue;
            }
            let oldest_cover = files
                .iter()
                .filter(|(c, ..)| r.inside(c))
                .map(|(_, _, mtime, _)| *mtime)
                .min();
            if oldest_cover.is_some_and(|t| t.elapsed().is_ok_and(|age| age >= policy.grace)) {
                let path = dir.join(r.name());
                match std::fs::remove_file(&path) {
                    Ok(()) => deleted_here += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(perr(&path, e)),
                }
            }
        }
        if deleted_here > 0 {
            crate::durable::sync_dir(dir)?;
        }
        stats.deleted += deleted_here;
        let mut live: Vec<(FileRange, u64)> = files
            .iter()
            .filter(|f| !f.3)
            .map(|(r, len, _, _)| (*r, *len))
            .collect();
        live.sort_by_key(|(r, _)| r.first);
        stats.live_files += live.len();
        if stats.merged > 0 {
            return Ok(());
        }
        // Size-tiered: a run is consecutive live files (in index order),
        // all committed, of one effective tier (`pick_run`); the merged file covers the run's
        // whole range, so no other file may lie inside it. A growing file
        // is thus merged again only with files about as large, and a row is
        // rewritten about once per factor of `min_files` in file size.
        let min = policy.min_files.max(2);
        let Some(run) = pick_run(&live, hw, min, policy.target_bytes, SIZE_RATIO) else {
            return Ok(());
        };
        let merged = self.merge(dir, &run)?;
        stats.merged = run.len();
        stats.rewritten_bytes = live
            .iter()
            .filter(|(r, _)| run.contains(r))
            .map(|(_, len)| len)
            .sum();
        // The run's files are covered now, not live.
        stats.live_files = stats.live_files + 1 - run.len();
        tracing::debug!(dir = %dir.display(), file = %merged, files = run.len(), "compacted");
        Ok(())
    }

    /// Write the rows of `run` (ascending, non-overlapping) as one file
    /// covering their whole range; returns its name.
    fn merge(&self, dir: &Path, run: &[FileRange]) -> Result<String> {
        use std::io::Write as _;
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Err(perr(dir, "empty compaction run"));
        };
        let name = FileRange {
            partition: self.partition,
            first: first.first,
            last: last.last,
        }
        .name();
        // A name of its own: a second compactor of the partition (a stale
        // thread) never writes into this one's temp file. Temp files are
        // removed on open (`remove_uncommitted`).
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = dir.join(format!(".{name}.{}-{nonce}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| perr(&tmp, e))?;
        // Row groups of at most 64k rows: a merge holds one in memory, never
        // the whole run.
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_row_count(Some(64 * 1024))
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, readings_schema(), Some(props))
            .map_err(|e| perr(&tmp, e))?;
        for r in run {
            each_batch(&dir.join(r.name()), |b| {
                w.write(&b).map_err(|e| perr(&tmp, e))
            })?;
        }
        let mut file = w.into_inner().map_err(|e| perr(&tmp, e))?;
        file.flush()
            .and_then(|_| file.sync_all())
            .map_err(|e| perr(&tmp, e))?;
        drop(file);
        let dst = dir.join(&name);
        std::fs::rename(&tmp, &dst).map_err(|e| perr(&dst, e))?;
        crate::durable::sync_dir(dir)?;
        Ok(name)
    }
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
            let name = FileRange {
                partition: self.partition,
                first,
                last: end - 1,
            }
            .name();
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

    /// Every live row (covered files skipped, as readers do), in log order.
    fn live_rows(data: &Path) -> RecordBatch {
        let mut files = Vec::new();
        for d in std::fs::read_dir(data.join("readings")).unwrap().flatten() {
            // As readers do: empty files are skipped and cover nothing.
            let names: Vec<String> = std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .filter(|f| f.metadata().unwrap().len() > 0)
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            let covered = covered_files(names.iter().map(String::as_str));
            for n in &names {
                if FileRange::parse(n).is_some() && !covered.contains(&n.as_str()) {
                    files.push(d.path().join(n));
                }
            }
        }
        files.sort_by_key(|p| p.file_name().unwrap().to_owned());
        let mut batches = Vec::new();
        for f in files {
            each_batch(&f, |b| {
                batches.push(b);
                Ok(())
            })
            .unwrap();
        }
        arrow::compute::concat_batches(&readings_schema(), &batches).unwrap()
    }

    fn files_of(data: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(data.join("readings")).unwrap().flatten() {
            for f in std::fs::read_dir(d.path()).unwrap().flatten() {
                out.push(f.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    }

    #[test]
    fn covered_files_match_a_naive_reference() {
        use proptest::prelude::*;
        proptest!(|(files in proptest::collection::vec((0u32..2, 0u64..40, 0u64..8), 0..20))| {
            let names: Vec<String> = files
                .iter()
                .map(|&(p, a, len)| FileRange { partition: p, first: a, last: a + len }.name())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let got: std::collections::BTreeSet<&str> =
                covered_files(names.iter().map(String::as_str)).into_iter().collect();
            for n in &names {
                let r = FileRange::parse(n).unwrap();
                let naive = names
                    .iter()
                    .map(|m| FileRange::parse(m).unwrap())
                    .any(|o| r.inside(&o));
                // Compaction never makes partial overlaps, but the rule
                // must hold for nested ranges whatever the input.
                let partial = names.iter().map(|m| FileRange::parse(m).unwrap()).any(|o| {
                    o.partition == r.partition && o != r && o.first < r.first
                        && o.last >= r.first && o.last < r.last
                });
                if !partial {
                    prop_assert_eq!(got.contains(n.as_str()), naive, "{}", n);
                }
            }
        });
        assert_eq!(
            FileRange::parse("p3-000000000010-000000000020.parquet"),
            Some(FileRange {
                partition: 3,
                first: 10,
                last: 20
            })
        );
        for bad in [
            "p3-10.parquet",
            "x3-1-2.parquet",
            ".p3-1-2.parquet.tmp",
            "p3-5-2.parquet",
            "p-1-2.parquet",
        ] {
            assert_eq!(FileRange::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn compaction_keeps_every_row_exactly_once_through_crashes() {
        let data = tempfile::tempdir().unwrap();
        let pdir = data.path().join("partitions/0");
        let mut log = DurableLog::open(&pdir).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        let mut comp = Compactor::new(data.path(), 0);
        let mut dids = DidCache::default();
        // 40 exports of 3 leaves: 40 small files.
        for k in 0..40 {
            fill(&mut log, k * 3, k * 3 + 3);
            ex.export(&log, &patients, &mut dids).unwrap();
        }
        let plain = live_rows(data.path());
        assert_eq!(plain.num_rows(), 240);
        assert_eq!(files_of(data.path()).len(), 40);
        let policy = CompactionPolicy {
            min_files: 8,
            target_bytes: 64 * 1024 * 1024,
            grace: std::time::Duration::from_secs(3600),
            every: std::time::Duration::ZERO,
        };
        // Not due yet when recently run (and `every` is honoured).
        let lazy = CompactionPolicy {
            every: std::time::Duration::from_secs(3600),
            min_files: 1000,
            ..policy
        };
        assert!(
            comp.compact(ex.high_water(), &lazy, false)
                .unwrap()
                .is_some()
        );
        assert!(
            comp.compact(ex.high_water(), &lazy, false)
                .unwrap()
                .is_none()
        );
        let before = files_of(data.path());
        let stats = comp
            .compact(ex.high_water(), &policy, true)
            .unwrap()
            .unwrap();
        assert_eq!(stats.merged, 40);
        assert_eq!(stats.live_files, 1);
        // The originals stay (grace) but are covered: still exactly once.
        assert_eq!(files_of(data.path()).len(), 41);
        assert_eq!(live_rows(data.path()), plain);
        // Nothing more to merge; within the grace nothing is deleted.
        let stats = comp
            .compact(ex.high_water(), &policy, true)
            .unwrap()
            .unwrap();
        assert_eq!((stats.merged, stats.deleted, stats.live_files), (0, 0, 1));
        // Past the grace the covered files go.
        let now = CompactionPolicy {
            grace: std::time::Duration::ZERO,
            ..policy
        };
        let stats = comp.compact(ex.high_water(), &now, true).unwrap().unwrap();
        assert_eq!((stats.deleted, stats.live_files), (40, 1));
        assert_eq!(files_of(data.path()).len(), 1);
        assert_eq!(live_rows(data.path()), plain);

        // A crash during a merge leaves a temp file: reopening removes it.
        for k in 40..60 {
            fill(&mut log, k * 3, k * 3 + 3);
            ex.export(&log, &patients, &mut dids).unwrap();
        }
        let plain = live_rows(data.path());
        assert_eq!(plain.num_rows(), 360);
        let dir = data
            .path()
            .join("readings")
            .join(format!("date={}", utc_date(1_800_000_000_000)));
        std::fs::write(
            dir.join(".p0-000000000120-000000000179.parquet.tmp"),
            b"partial",
        )
        .unwrap();
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        assert!(!files_of(data.path()).iter().any(|n| n.ends_with(".tmp")));
        assert_eq!(live_rows(data.path()), plain);
        // Files merge with files of about their size only (the 120-leaf
        // file stays as it is), and an uncommitted export (past the
        // high-water mark) is never merged.
        fill(&mut log, 180, 183);
        let hw = ex.high_water();
        ex.export(&log, &patients, &mut dids).unwrap();
        std::fs::write(pdir.join("parquet.hw"), hw.to_string()).unwrap();
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        let mut comp = Compactor::new(data.path(), 0);
        let stats = comp.compact(ex.high_water(), &now, true).unwrap().unwrap();
        assert_eq!(stats.merged, 20);
        assert_eq!(live_rows(data.path()), plain);
        ex.export(&log, &patients, &mut dids).unwrap();
        assert_eq!(live_rows(data.path()).num_rows(), 366);
        let names = files_of(data.path());
        for n in [
            "p0-000000000000-000000000119.parquet",
            "p0-000000000120-000000000179.parquet",
            "p0-000000000180-000000000182.parquet",
        ] {
            assert!(names.contains(&n.to_owned()), "{names:?}");
        }
        let _ = before;
    }

    #[test]
    fn covered_files_are_deleted_under_steady_compaction() {
        let data = tempfile::tempdir().unwrap();
        let pdir = data.path().join("partitions/0");
        let mut log = DurableLog::open(&pdir).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        let mut comp = Compactor::new(data.path(), 0);
        let mut dids = DidCache::default();
        let policy = CompactionPolicy {
            min_files: 2,
            target_bytes: 64 * 1024 * 1024,
            grace: std::time::Duration::from_secs(3600),
            every: std::time::Duration::ZERO,
        };
        let dir = data
            .path()
            .join("readings")
            .join(format!("date={}", utc_date(1_800_000_000_000)));
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let age_all = || {
            for f in std::fs::read_dir(&dir).unwrap().flatten() {
                std::fs::File::options()
                    .write(true)
                    .open(f.path())
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        };
        // Every pass merges something new, so there is always a fresh
        // cover; the older (aged) covers are what let covered files go.
        for k in 0..16 {
            fill(&mut log, k * 2, k * 2 + 2);
            ex.export(&log, &patients, &mut dids).unwrap();
            comp.compact(ex.high_water(), &policy, true).unwrap();
            age_all();
        }
        fill(&mut log, 32, 34);
        ex.export(&log, &patients, &mut dids).unwrap();
        let stats = comp
            .compact(ex.high_water(), &policy, true)
            .unwrap()
            .unwrap();
        assert!(stats.merged > 0 && stats.deleted > 0, "{stats:?}");
        // What is left covered is covered by fresh files only.
        let names = files_of(data.path());
        let fresh = |n: &str| std::fs::metadata(dir.join(n)).unwrap().modified().unwrap() > old;
        for c in covered_files(names.iter().map(String::as_str)) {
            let r = FileRange::parse(c).unwrap();
            for n in &names {
                if r.inside(&FileRange::parse(n).unwrap()) {
                    assert!(fresh(n), "{c} is covered by the old {n} and was kept");
                }
            }
        }
        assert!(names.len() < 8, "{names:?}");
        assert_eq!(live_rows(data.path()).num_rows(), 68);
    }

    /// The effective tiers of `live` as `pick_run` defines them, the
    /// naive way: for each file, the largest tier from it to the first
    /// ineligible file after it.
    fn naive_eff(live: &[(FileRange, u64)], hw: u64, target: u64, ratio: u64) -> Vec<Option<u32>> {
        let ok = |k: usize| {
            let (r, len) = live[k];
            r.last < hw && len < target && (k == 0 || r.first > live[k - 1].0.last)
        };
        (0..live.len())
            .map(|k| {
                ok(k).then(|| {
                    (k..live.len())
                        .take_while(|&j| ok(j))
                        .map(|j| (live[j].0.last - live[j].0.first + 1).ilog(ratio))
                        .max()
                        .unwrap()
                })
            })
            .collect()
    }

    #[test]
    fn runs_are_consecutive_committed_and_within_bounds() {
        use proptest::prelude::*;
        proptest!(|(shape in proptest::collection::vec((1u64..40, 1u64..40), 0..30),
                    hw_at in 0usize..32, min in 2usize..6, target in 1u64..200, ratio in 2u64..5)| {
            let mut next = 0;
            let live: Vec<(FileRange, u64)> = shape
                .iter()
                .map(|&(leaves, len)| {
                    let r = FileRange { partition: 0, first: next, last: next + leaves - 1 };
                    next += leaves;
                    (r, len)
                })
                .collect();
            let hw = live.get(hw_at).map_or(next, |f| f.0.first);
            let eff = naive_eff(&live, hw, target, ratio);
            let fits = |a: usize, b: usize| {
                let sum: u64 = live[a..b].iter().map(|f| f.1).sum();
                eff[a].is_some() && eff[a..b].iter().all(|t| *t == eff[a]) && sum <= target
            };
            // Naive: every window of consecutive files.
            let any = (0..live.len()).any(|a| (a + min..=live.len()).any(|b| fits(a, b)));
            let got = pick_run(&live, hw, min, target, ratio);
            prop_assert_eq!(got.is_some(), any);
            if let Some(run) = got {
                let start = live.iter().position(|f| f.0 == run[0]).unwrap();
                for (k, r) in run.iter().enumerate() {
                    prop_assert_eq!(live[start + k].0, *r, "consecutive");
                }
                prop_assert!(run.len() >= min);
                prop_assert!(fits(start, start + run.len()));
                // The first run that fits, as long as it fits.
                prop_assert!(!(0..start).any(|a| fits(a, a + min)));
                prop_assert!(start + run.len() == live.len() || !fits(start, start + run.len() + 1));
            }
        });
    }

    /// Whatever the sizes of the exports (a crash cuts one short, a quiet
    /// spell makes them small), the live files settle below `min` per
    /// tier. Before effective tiers, a small file between two large ones
    /// was never merged, and a run of irregular exports kept every one of
    /// them (21 live files after 60 exports in the kill -9 test).
    #[test]
    fn live_files_stay_below_min_per_tier_whatever_the_export_sizes() {
        use proptest::prelude::*;
        proptest!(|(exports in proptest::collection::vec(1u64..2000, 1..120), min in 2usize..5)| {
            let target = u64::MAX / 4;
            let mut live: Vec<(FileRange, u64)> = Vec::new();
            let mut next = 0;
            for n in exports {
                live.push((FileRange { partition: 0, first: next, last: next + n - 1 }, 100 + n * 10));
                next += n;
                while let Some(run) = pick_run(&live, next, min, target, SIZE_RATIO) {
                    let a = live.iter().position(|f| f.0 == run[0]).unwrap();
                    let bytes = live[a..a + run.len()].iter().map(|f| f.1).sum();
                    let merged = FileRange { partition: 0, first: run[0].first, last: run[run.len() - 1].last };
                    live.splice(a..a + run.len(), [(merged, bytes)]);
                }
                let tiers = tier(next, SIZE_RATIO) as usize + 1;
                prop_assert!(live.len() < min * tiers, "{} live files: {:?}", live.len(), live);
            }
        });
    }

    #[test]
    fn each_row_is_rewritten_a_bounded_number_of_times() {
        let data = tempfile::tempdir().unwrap();
        let pdir = data.path().join("partitions/0");
        let mut log = DurableLog::open(&pdir).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        let mut comp = Compactor::new(data.path(), 0);
        let mut dids = DidCache::default();
        let policy = CompactionPolicy {
            min_files: 4,
            target_bytes: 64 * 1024 * 1024,
            grace: std::time::Duration::ZERO,
            every: std::time::Duration::ZERO,
        };
        // Tiny exports, a pass after each: the worst case for rewriting a
        // growing file again and again.
        let dir = data
            .path()
            .join("readings")
            .join(format!("date={}", utc_date(1_800_000_000_000)));
        let (mut rewritten, mut exported) = (0u64, 0u64);
        for k in 0..400 {
            fill(&mut log, k * 2, k * 2 + 2);
            ex.export(&log, &patients, &mut dids).unwrap();
            let new = FileRange {
                partition: 0,
                first: k * 2,
                last: k * 2 + 1,
            }
            .name();
            exported += std::fs::metadata(dir.join(new)).unwrap().len();
            rewritten += comp
                .compact(ex.high_water(), &policy, true)
                .unwrap()
                .unwrap()
                .rewritten_bytes;
        }
        assert_eq!(live_rows(data.path()).num_rows(), 1600);
        // 400 exports merge 4 at a time: about log4(400) ≈ 4 levels, the
        // first reading what the exports wrote, the others much less.
        assert!(
            rewritten <= 3 * exported,
            "rewrote {rewritten} bytes for {exported} bytes exported"
        );
    }

    #[test]
    fn odd_and_empty_files_are_not_taken_for_ours() {
        for odd in [
            "p0-5-9.parquet",
            "p00-000000000005-000000000009.parquet",
            "p+0-000000000005-000000000009.parquet",
        ] {
            assert_eq!(FileRange::parse(odd), None, "{odd}");
        }
        let data = tempfile::tempdir().unwrap();
        let pdir = data.path().join("partitions/0");
        let mut log = DurableLog::open(&pdir).unwrap();
        let patients: PatientLookup = Arc::new(|_| Registered::Active("patient-1".into()));
        let mut ex = ParquetExporter::open(data.path(), &pdir, 0).unwrap();
        let mut comp = Compactor::new(data.path(), 0);
        let mut dids = DidCache::default();
        for k in 0..4 {
            fill(&mut log, k * 2, k * 2 + 2);
            ex.export(&log, &patients, &mut dids).unwrap();
        }
        let dir = data
            .path()
            .join("readings")
            .join(format!("date={}", utc_date(1_800_000_000_000)));
        // An empty file with a wide range covers nothing and is not merged.
        std::fs::write(dir.join("p0-000000000000-999999999999.parquet"), b"").unwrap();
        let now = CompactionPolicy {
            min_files: 2,
            grace: std::time::Duration::ZERO,
            every: std::time::Duration::ZERO,
            ..Default::default()
        };
        let stats = comp.compact(ex.high_water(), &now, true).unwrap().unwrap();
        assert_eq!(stats.merged, 4);
        assert_eq!(live_rows(data.path()).num_rows(), 16);
        // Something that is not a plain file stops the pass (an error),
        // and deletes nothing.
        std::fs::create_dir(dir.join("p0-000000000100-000000000101.parquet")).unwrap();
        let before = files_of(data.path());
        assert!(comp.compact(ex.high_water(), &now, true).is_err());
        assert_eq!(files_of(data.path()), before);
    }
}
