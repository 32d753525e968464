//! # vitaltrail-anchor
//!
//! Anchoring makes a log's history provable to someone who does not trust
//! the attestor's key (`docs/anchoring.md`):
//!
//! * [`heads`]: each partition's latest checkpoint, taken only when it is
//!   signed by the partition's log key and a proven extension of the one
//!   before; a fork stops that partition;
//! * [`store`]: every epoch (default 1 s) in which a head moved becomes
//!   one record, a Merkle tree over every partition's `(origin, size,
//!   root)`, appended to the **epoch log** (the same durable log as a
//!   partition's, its checkpoints signed by the anchor key), with what
//!   proofs need beside it;
//! * [`backend`]: the trait every anchoring backend implements; they run
//!   at once, each as a task;
//! * [`ledger`]: the embedded backend, a local file of signed,
//!   hash-chained records of the epoch log's root;
//! * [`evm`]: the chain backend, through `alloy`: the epoch log's root in
//!   `AnchorRegistry` on any EVM JSON-RPC chain, with confirmations,
//!   replacements, reorg handling and retries;
//! * [`stage`]: [`run`], the stage, fed in process by the attestor or from
//!   `vitals.checkpoints`;
//! * [`metrics`]: its Prometheus metrics.
//!
//! Only roots leave the anchor: an epoch record holds no reading, device or
//! patient.

pub mod backend;
mod error;
pub mod evm;
pub mod heads;
pub mod ledger;
pub mod metrics;
pub mod stage;
pub mod store;

pub use error::{Error, Result};
pub use stage::{AnchorConfig, AnchorSource, StageConfig, run};
