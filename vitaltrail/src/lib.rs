//! # vitaltrail (the binary's library half)
//!
//! Wiring only: [`up`] assembles the stages of the other crates into one
//! process with embedded defaults. Every stage's logic lives in its crate.

pub mod distributed;
pub mod up;
