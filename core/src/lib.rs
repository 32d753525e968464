//! # vitaltrail-core
//!
//! The formats and math every other vitaltrail crate builds on. It does no
//! I/O: no files, no sockets, no tokio, no reading of the system clock except
//! through the injected [`clock::Clock`].
//!
//! What it owns, and the specification each part follows:
//!
//! | module | owns | specified in |
//! |---|---|---|
//! | [`did`] | device keys and their `did:key` IDs | W3C did:key, multicodec `ed25519-pub` |
//! | [`sig`] | the single Ed25519 rule set for single and batch verification | RFC 8032, cofactored equation; `docs/reading-envelope.md` |
//! | [`envelope`] | the signed reading: COSE_Sign1 over a CBOR payload | RFC 9052, RFC 8949; `docs/reading-envelope.md` |
//! | [`leaf`] | what the log commits to for one reading | `docs/merkle-log.md` |
//! | [`merkle`] | RFC 9162 tree math with BLAKE3, proofs, the stored-hash layout | RFC 9162; `docs/merkle-log.md` |
//! | [`receipt`] | the pipeline's signed word to a device that its reading is in the log (or why not) | `docs/receipts.md` |
//! | [`checkpoint`] | signed tree heads | C2SP tlog-checkpoint and signed-note; `docs/checkpoint.md` |
//! | [`auth`] | bearer tokens and the same-origin rule of the HTTP endpoints | RFC 6750 |
//! | [`busauth`] | the MAC on bus records from ingest to the attestor | `docs/kafka-topics.md` |
//! | [`anchor`] | partition heads, epoch records and signed ledger records | `docs/anchoring.md` |
//! | [`bundle`] | proof bundles that verify offline | `docs/proof-bundle.md` |
//! | [`news2`] | NEWS2 scoring, shared by `vitaltrail news2` and the alert engine | RCP NEWS2 (2017) chart 1; `docs/news2.md` |
//!
//! Every decoder of untrusted bytes returns [`Result`] and never panics; each
//! has a fuzz target under `fuzz/`.

pub mod anchor;
pub mod auth;
pub mod bundle;
pub mod busauth;
pub mod checkpoint;
pub mod clock;
pub mod did;
pub mod envelope;
mod error;
pub mod leaf;
pub mod merkle;
pub mod news2;
pub mod receipt;
pub mod sig;
pub mod topics;

pub use bundle::ProofBundle;
pub use checkpoint::{Checkpoint, LogPublicKey, LogSigner};
pub use clock::{Clock, MockClock, SystemClock};
pub use did::{DeviceId, DidCache, SecretKey};
pub use envelope::{Measurement, Reading, UnsignedReading};
pub use error::{Error, Result};
pub use merkle::{Hash, MemoryTree};
