//! The anchoring backends, behind one trait. The stage closes epochs and
//! publishes the latest signed epoch log size ([`Target`]); every
//! configured backend runs at once, as a task of its own, anchors at its
//! own pace, and covers every epoch below the size it anchors (so a slow
//! or absent backend never holds epochs, or the others, back).
//!
//! * [`crate::ledger::LedgerBackend`]: the local signed ledger, at once;
//! * [`crate::evm::EvmAnchor`]: an EVM chain, every `evm_interval_ms`.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio::sync::watch;
use vitaltrail_core::merkle::Hash;

use crate::Result;

/// The latest signed epoch log size, its root, and when its newest epoch
/// closed (for the latency metric).
pub type Target = (u64, Hash, Instant);

/// A boxed future, for a trait the stage holds as objects.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A place the epoch log's root is anchored.
pub trait Backend: Send {
    /// Its name: the `backend` label of the metrics and the `anchors` table.
    fn name(&self) -> &'static str;

    /// Anchor what `targets` says until `stop` turns true. The stage sets
    /// `stop` only after its last epoch, so a backend that can anchor at
    /// once (the ledger) anchors that one before it returns. An error
    /// stops the stage if the backend is `essential`, and only the backend
    /// otherwise.
    fn run(
        self: Box<Self>,
        targets: watch::Receiver<Option<Target>>,
        stop: watch::Receiver<bool>,
    ) -> BoxFuture<Result<()>>;

    /// Whether the stage must stop when this backend fails (the ledger:
    /// it is the anchor's own durable record) or may go on without it (a
    /// chain the operator must fix).
    fn essential(&self) -> bool;
}
