//! Delivery: every alarm event to every channel, at least once, in order.
//!
//! The outbox is the events files themselves (`events-<gen>.jsonl`, fsynced
//! before `state.json` names their length). Each channel keeps one durable
//! cursor, `<alerts>/delivery/<channel>.json`: how far into the events it
//! has delivered. A channel reads only what the stage has committed (the
//! length `state.json` names, published through a [`watch`]), so it never
//! sends an event a crash would cut and raise again; it sends events one at
//! a time, in file order, retrying each until it is taken (exponential
//! backoff with jitter), and saves its cursor after each batch. A crash
//! resends at most the batch in flight: receivers drop repeats by the
//! event's key ([`crate::fhir::event_key`]).
//!
//! The outbox is bounded as the events files are: the current generation
//! and the one before it. When the stage starts a new generation and the
//! one before the previous still holds events a channel has not delivered,
//! it copies those events to the channel's dead letters
//! (`<alerts>/dead-letters/<channel>.jsonl`, counted in
//! `vitaltrail_alerts_dead_letters_total`) before deleting the file; the
//! channel goes on from the oldest generation left. Dead letters are
//! bounded too: past `max_events_bytes` a channel's file starts again, the
//! previous kept as `<channel>.1.jsonl`, and the events of the one before
//! are counted in `vitaltrail_alerts_dead_letters_discarded_total`.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::engine::Event;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::stage::{event_files, events_file};

/// What the stage has committed: events up to `len` of generation
/// `generation` of the events series `series`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Which events series (a new one on every rebuild of the state).
    pub series: u64,
    /// The current events generation.
    pub generation: u64,
    /// Its committed length.
    pub len: u64,
}

/// A channel's position: everything before it is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// The events series it is in.
    pub series: u64,
    /// The events generation.
    pub generation: u64,
    /// The byte offset in that generation's file.
    pub offset: u64,
}

/// Which events a channel takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wards {
    /// Every event, with or without a ward.
    All,
    /// Events of these wards only.
    Only(BTreeSet<String>),
}

impl Wards {
    /// From a configured list (`"*"`: every ward).
    pub fn from_list(list: &[String]) -> Wards {
        if list.iter().any(|w| w == "*") {
            Wards::All
        } else {
            Wards::Only(list.iter().cloned().collect())
        }
    }

    /// Whether the channel takes `e`.
    pub fn wants(&self, e: &Event) -> bool {
        match self {
            Wards::All => true,
            Wards::Only(w) => e.alarm.ward.as_ref().is_some_and(|x| w.contains(x)),
        }
    }
}

/// What the stage knows of each channel: its durable cursor and its wards,
/// to move what it has not delivered to dead letters before a generation
/// is deleted.
#[derive(Debug, Clone, Default)]
pub struct Channels(Arc<Mutex<BTreeMap<String, (Cursor, Wards)>>>);

impl Channels {
    fn set(&self, name: &str, cursor: Cursor, wards: &Wards) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), (cursor, wards.clone()));
    }

    fn snapshot(&self) -> BTreeMap<String, (Cursor, Wards)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The directory of the channels' cursors.
pub fn cursors_dir(alerts: &Path) -> PathBuf {
    alerts.join("delivery")
}

/// The directory of the channels' dead letters.
pub fn dead_letters_dir(alerts: &Path) -> PathBuf {
    alerts.join("dead-letters")
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io { op, path, source }
}

/// Before generation `generation` (file `file`) is deleted: each channel
/// that has not delivered all of it gets the rest (the events it takes) in
/// its dead letters. Bounded: a channel's dead letters file starts again
/// past `max_bytes`, the previous one kept as `<channel>.1.jsonl`.
pub(crate) fn dead_letter_generation(
    alerts: &Path,
    channels: &Channels,
    series: u64,
    generation: u64,
    file: &Path,
    max_bytes: u64,
    metrics: &Metrics,
) -> Result<()> {
    // Read once, for every channel behind.
    let mut content: Option<Vec<u8>> = None;
    for (name, (cursor, wards)) in channels.snapshot() {
        if cursor.series != series || cursor.generation > generation {
            continue;
        }
        let from = if cursor.generation == generation {
            cursor.offset
        } else {
            0
        };
        let all = match &content {
            Some(c) => c,
            None => match std::fs::read(file) {
                Ok(b) => content.insert(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("read", file)(e)),
            },
        };
        let rest = all.get(from as usize..).unwrap_or_default();
        let mut out = Vec::new();
        let mut n = 0u64;
        for line in rest.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let take = match serde_json::from_slice::<Event>(line) {
                Ok(e) => wards.wants(&e),
                Err(_) => true,
            };
            if take {
                out.extend_from_slice(line);
                out.push(b'\n');
                n += 1;
            }
        }
        if n == 0 {
            continue;
        }
        append_dead_letters(alerts, &name, &out, n, max_bytes, metrics)?;
        let path = dead_letters_dir(alerts).join(format!("{name}.jsonl"));
        tracing::warn!(
            channel = %name,
            events = n,
            to = %path.display(),
            "events this channel has not delivered are past the outbox's bound (two events generations): moved to its dead letters"
        );
    }
    Ok(())
}

/// One delivery channel.
pub trait Sink: Send + 'static {
    /// Deliver one event (`line`: its line in the events file). `Err`
    /// says why it was not taken; it is tried again.
    fn send(
        &mut self,
        event: &Event,
        line: &[u8],
    ) -> impl std::future::Future<Output = std::result::Result<(), SendError>> + Send;
}

/// How a channel retries.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub first: Duration,
    /// The longest.
    pub max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt + 1` (from 1): exponential, with
    /// "equal jitter" (half fixed, half random), so receivers coming back
    /// are not hit by every sender at once.
    pub fn wait(&self, attempt: u32) -> Duration {
        let exp = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Events read, each with the cursor just past it.
type Batch = Vec<(Cursor, Vec<u8>)>;

/// Bytes read from an events file at once, at most.
const READ_CHUNK: usize = 1 << 20;

/// Events read per batch, at most (the cursor is saved after each).
const BATCH: usize = 256;

/// Read committed events from `c` on: up to [`BATCH`], each with the
/// cursor just past it. Also returns the cursor after skipping deleted
/// generations.
fn read_batch(dir: &Path, mut c: Cursor, committed: Committed) -> Result<(Cursor, Batch)> {
    let mut out = Vec::new();
    loop {
        if (c.generation, c.offset) >= (committed.generation, committed.len) {
            return Ok((c, out));
        }
        let path = events_file(dir, c.generation);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if c.generation >= committed.generation {
                    return Ok((c, out));
                }
                // Deleted (its undelivered events went to dead letters):
                // on from the oldest generation left.
                let next = event_files(dir)
                    .into_iter()
                    .map(|(g, _)| g)
                    .find(|&g| g > c.generation)
                    .unwrap_or(committed.generation)
                    .min(committed.generation);
                c = Cursor {
                    series: c.series,
                    generation: next,
                    offset: 0,
                };
                continue;
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        let end = if c.generation == committed.generation {
            committed.len
        } else {
            f.metadata().map_err(io("stat", &path))?.len()
        };
        if c.offset >= end {
            if c.generation < committed.generation {
                c = Cursor {
                    series: c.series,
                    generation: c.generation + 1,
                    offset: 0,
                };
                continue;
            }
            return Ok((c, out));
        }
        f.seek(SeekFrom::Start(c.offset))
            .map_err(io("seek", &path))?;
        let mut buf = Vec::new();
        (&mut f)
            .take((end - c.offset).min(READ_CHUNK as u64))
            .read_to_end(&mut buf)
            .map_err(io("read", &path))?;
        let mut at = c.offset;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') {
                break;
            }
            at += line.len() as u64;
            out.push((
                Cursor {
                    series: c.series,
                    generation: c.generation,
                    offset: at,
                },
                line[..line.len() - 1].to_vec(),
            ));
            if out.len() >= BATCH {
                return Ok((c, out));
            }
        }
        if at == c.offset {
            // No whole line in a chunk: not a file the stage wrote (a line
            // is a few KiB). Skipped, said, and never a spin.
            tracing::warn!(
                generation = c.generation,
                offset = c.offset,
                "events file damaged: a chunk without a line end is skipped"
            );
            c.offset += buf.len() as u64;
            continue;
        }
        c.offset = at;
        if !out.is_empty() {
            return Ok((c, out));
        }
    }
}

/// A running channel's static parts.
#[derive(Debug)]
pub struct ChannelSpec {
    /// Its name: the cursor's and dead letters' file name, the metrics label.
    pub name: String,
    /// Which events it takes.
    pub wards: Wards,
    /// How it retries.
    pub backoff: Backoff,
    /// Its dead letters file starts again past this many bytes.
    pub dead_letters_max: u64,
}

/// Why an attempt failed.
#[derive(Debug)]
pub struct SendError {
    /// In words (never a secret, never a URL's path or query).
    pub why: String,
    /// The receiver refused this event for what it is (an HTTP 4xx other
    /// than 408, 425 and 429), or it cannot be sent at all: after
    /// [`PERMANENT_ATTEMPTS`] such answers it goes to the channel's dead
    /// letters, so that one event cannot hold back every later one.
    pub permanent: bool,
}

impl SendError {
    /// A failure worth retrying (the receiver is down or busy).
    pub fn transient(why: impl Into<String>) -> SendError {
        SendError {
            why: why.into(),
            permanent: false,
        }
    }
}

/// Permanent refusals of one event before it is dead-lettered.
pub const PERMANENT_ATTEMPTS: u32 = 3;

/// Append `lines` to the channel's dead letters (fsynced), counted.
pub(crate) fn append_dead_letters(
    alerts: &Path,
    name: &str,
    lines: &[u8],
    n: u64,
    max_bytes: u64,
    metrics: &Metrics,
) -> Result<()> {
    let dir = dead_letters_dir(alerts);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let path = dir.join(format!("{name}.jsonl"));
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if len > 0 && len + lines.len() as u64 > max_bytes {
        let old = dir.join(format!("{name}.1.jsonl"));
        let gone = std::fs::read(&old)
            .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
            .unwrap_or(0);
        std::fs::rename(&path, &old).map_err(io("rename", &path))?;
        metrics
            .dead_letters_discarded
            .with_label_values(&[name])
            .inc_by(gone);
    }
    let mut d = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io("open", &path))?;
    d.write_all(lines).map_err(io("append", &path))?;
    d.sync_data().map_err(io("fsync", &path))?;
    metrics.dead_letters.with_label_values(&[name]).inc_by(n);
    Ok(())
}

fn cursor_file(alerts: &Path, name: &str) -> PathBuf {
    cursors_dir(alerts).join(format!("{name}.json"))
}

fn save_cursor(alerts: &Path, name: &str, c: Cursor) -> Result<()> {
    let dir = cursors_dir(alerts);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let bytes = serde_json::to_vec(&c).map_err(|e| Error::State(e.to_string()))?;
    vitaltrail_log::write_atomic(&dir, &format!("{name}.json"), &bytes)?;
    Ok(())
}

/// Where a channel starts: its saved cursor, checked against what is
/// committed. Never past the committed end, never mid-line; a cursor that
/// cannot be read starts from the oldest events left (resending is safe,
/// skipping is not); a channel with no cursor yet starts at the end.
pub(crate) fn initial_cursor(alerts: &Path, name: &str, now: Committed) -> Cursor {
    let path = cursor_file(alerts, name);
    let oldest = || Cursor {
        series: now.series,
        generation: event_files(alerts)
            .first()
            .map_or(now.generation, |(g, _)| *g)
            .min(now.generation),
        offset: 0,
    };
    let saved = match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<Cursor>(&b) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(channel = %name, error = %e, "delivery cursor unreadable: resending from the oldest events left");
                return oldest();
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new channel takes events from now on.
            return Cursor {
                series: now.series,
                generation: now.generation,
                offset: now.len,
            };
        }
        Err(e) => {
            tracing::warn!(channel = %name, error = %e, "delivery cursor unreadable: resending from the oldest events left");
            return oldest();
        }
    };
    if saved.series != now.series {
        // The state was rebuilt since: its events are a new series, raised
        // again from the logs. From its start.
        return Cursor {
            series: now.series,
            generation: 0,
            offset: 0,
        };
    }
    if (saved.generation, saved.offset) > (now.generation, now.len) {
        // Past what is committed (an older state.json restored, a file
        // cut): resend the current generation rather than skip anything.
        tracing::warn!(channel = %name, "delivery cursor past the committed events: resending the current generation");
        return Cursor {
            series: now.series,
            generation: now.generation,
            offset: 0,
        };
    }
    Cursor {
        offset: line_start(alerts, saved.generation, saved.offset),
        ..saved
    }
}

/// `offset`, or the start of the line it falls in.
fn line_start(alerts: &Path, generation: u64, offset: u64) -> u64 {
    if offset == 0 {
        return 0;
    }
    let from = offset.saturating_sub(READ_CHUNK as u64);
    let mut buf = Vec::new();
    let read = std::fs::File::open(events_file(alerts, generation)).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        (&mut f).take(offset - from).read_to_end(&mut buf)
    });
    if read.is_err() {
        return offset;
    }
    match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) if i + 1 == buf.len() => offset,
        Some(i) => from + i as u64 + 1,
        None => from,
    }
}

/// Register a channel's cursor (so the stage never deletes events it has
/// not delivered without moving them to its dead letters), then run it,
/// restarting it after an error (said at once) until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_channel<S: Sink>(
    spec: ChannelSpec,
    sink: S,
    alerts: PathBuf,
    channels: Channels,
    committed: watch::Receiver<Committed>,
    shutdown: watch::Receiver<bool>,
    metrics: Metrics,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let now = *committed.borrow();
    let cursor = initial_cursor(&alerts, &spec.name, now);
    save_cursor(&alerts, &spec.name, cursor)?;
    channels.set(&spec.name, cursor, &spec.wards);
    Ok(tokio::spawn(supervise(
        spec, sink, cursor, alerts, channels, committed, shutdown, metrics,
    )))
}

#[allow(clippy::too_many_arguments)]
async fn supervise<S: Sink>(
    spec: ChannelSpec,
    mut sink: S,
    mut cursor: Cursor,
    alerts: PathBuf,
    channels: Channels,
    committed: watch::Receiver<Committed>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Metrics,
) -> Result<()> {
    loop {
        let ctx = Ctx {
            spec: &spec,
            alerts: &alerts,
            channels: &channels,
            metrics: &metrics,
        };
        match run_channel(
            ctx,
            &mut sink,
            &mut cursor,
            committed.clone(),
            shutdown.clone(),
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) => {
                // A disk error, say: said now, counted, and tried again.
                metrics
                    .delivery_failures
                    .with_label_values(&[&spec.name])
                    .inc();
                tracing::error!(channel = %spec.name, error = %e, "alarm delivery stopped on an error; starting it again in 5 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    r = shutdown.changed() => if r.is_err() { return Ok(()) },
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
                cursor = initial_cursor(&alerts, &spec.name, *committed.borrow());
            }
        }
    }
}

/// What a channel's loop borrows.
struct Ctx<'a> {
    spec: &'a ChannelSpec,
    alerts: &'a Path,
    channels: &'a Channels,
    metrics: &'a Metrics,
}

/// Deliver from `cursor` until `shutdown`: the channel's loop.
async fn run_channel<S: Sink>(
    ctx: Ctx<'_>,
    sink: &mut S,
    cursor: &mut Cursor,
    mut committed: watch::Receiver<Committed>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let Ctx {
        spec,
        alerts,
        channels,
        metrics,
    } = ctx;
    let name = spec.name.as_str();
    let save = |c: Cursor| -> Result<()> {
        save_cursor(alerts, name, c)?;
        channels.set(name, c, &spec.wards);
        Ok(())
    };
    let label = [name];
    let delivered = metrics.delivered.with_label_values(&label);
    let failures = metrics.delivery_failures.with_label_values(&label);
    let backlog = metrics.delivery_backlog.with_label_values(&label);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let now = *committed.borrow_and_update();
        if now.series != cursor.series {
            // Rebuilt while running (not done today; a restart is).
            *cursor = Cursor {
                series: now.series,
                generation: 0,
                offset: 0,
            };
        }
        let dir = alerts.to_owned();
        let at = *cursor;
        let (skipped, batch) = tokio::task::spawn_blocking(move || read_batch(&dir, at, now))
            .await
            .map_err(|e| Error::State(format!("delivery task: {e}")))??;
        backlog.set(if now.generation == skipped.generation {
            now.len.saturating_sub(skipped.offset) as i64
        } else {
            -1
        });
        if batch.is_empty() {
            if skipped != *cursor {
                *cursor = skipped;
                save(*cursor)?;
                // Past a skipped generation there may be more to read now.
                continue;
            }
            tokio::select! {
                r = committed.changed() => if r.is_err() { return Ok(()) },
                r = shutdown.changed() => if r.is_err() { return Ok(()) },
            }
            continue;
        }
        for (after, line) in batch {
            let event: Event = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => {
                    // Not written by this version (or damaged): kept in
                    // the dead letters, never silently dropped.
                    tracing::warn!(channel = %name, error = %e, "an events line that does not parse goes to the dead letters");
                    let mut l = line.clone();
                    l.push(b'\n');
                    append_dead_letters(alerts, name, &l, 1, spec.dead_letters_max, metrics)?;
                    *cursor = after;
                    continue;
                }
            };
            if !spec.wards.wants(&event) {
                *cursor = after;
                continue;
            }
            let mut attempt = 0u32;
            let mut refusals = 0u32;
            loop {
                // An attempt in flight is given up at shutdown (Kafka waits
                // for a cluster that is down without a time limit): the
                // event is sent again after the restart.
                let sent = tokio::select! {
                    r = sink.send(&event, &line) => Some(r),
                    _ = shutdown.changed() => None,
                };
                let Some(sent) = sent else {
                    save(*cursor)?;
                    return Ok(());
                };
                let err = match sent {
                    Ok(()) => {
                        delivered.inc();
                        break;
                    }
                    Err(e) => e,
                };
                attempt = attempt.saturating_add(1);
                failures.inc();
                if err.permanent {
                    refusals += 1;
                    if refusals >= PERMANENT_ATTEMPTS {
                        tracing::warn!(channel = %name, error = %err.why, "alarm event refused {refusals} times: moved to the dead letters");
                        let mut l = line.clone();
                        l.push(b'\n');
                        append_dead_letters(alerts, name, &l, 1, spec.dead_letters_max, metrics)?;
                        break;
                    }
                }
                if attempt == 1 || attempt.is_multiple_of(10) {
                    tracing::warn!(channel = %name, attempt, error = %err.why, "alarm event not delivered yet; retrying");
                }
                let wait = spec.backoff.wait(attempt);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    r = shutdown.changed() => if r.is_err() { return Ok(()) },
                }
                if *shutdown.borrow() {
                    save(*cursor)?;
                    return Ok(());
                }
            }
            *cursor = after;
        }
        save(*cursor)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_within_half() {
        let b = Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(60),
        };
        for _ in 0..100 {
            let w1 = b.wait(1);
            assert!(w1 >= Duration::from_millis(250) && w1 <= Duration::from_millis(500));
            let w4 = b.wait(4);
            assert!(w4 >= Duration::from_millis(2000) && w4 <= Duration::from_millis(4000));
            let w40 = b.wait(40);
            assert!(w40 >= Duration::from_secs(30) && w40 <= Duration::from_secs(60));
        }
    }
}
