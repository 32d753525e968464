//! # vitaltrail-anchor
//!
//! **Status: planned.** This crate will own anchoring: it rolls the
//! checkpoints of each epoch into one root and writes that root to the
//! embedded local signed ledger, or to a registry contract on an EVM chain
//! through `alloy`, waiting for confirmations and retrying without loss while
//! the chain is down. Only roots go on chain, never readings.
