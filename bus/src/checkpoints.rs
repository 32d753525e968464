//! The wire form of an announced checkpoint: a value on
//! `vitals.checkpoints` (key = origin), and what the attestor hands the
//! in-process anchor. Specified in `docs/kafka-topics.md`.

use serde::{Deserialize, Serialize};

/// A checkpoint as a partition worker announces it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedCheckpoint {
    /// The partition whose log it commits to.
    pub partition: u32,
    /// The log's origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// When it was signed, Unix ms.
    pub time_ms: u64,
    /// The signed note.
    pub note: String,
    /// The size of the checkpoint this partition signed before this one
    /// (0 for its first).
    #[serde(default)]
    pub from_size: u64,
    /// The consistency proof from `from_size` to `size` (RFC 9162 §2.1.4,
    /// standard base64 per hash); empty when `from_size` is 0 or `size`.
    #[serde(default)]
    pub consistency: Vec<String>,
}
