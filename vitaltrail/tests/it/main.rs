//! The end-to-end tests of vitaltrail, in one test binary (one link of the
//! whole workspace, not one per file): real processes, real servers on
//! 127.0.0.1, real files. `cargo test -p vitaltrail --test it kafka::` runs
//! one module. The shared servers and checks are in `common`.

mod alerts;
mod anchor_cli;
mod anvil;
mod broker_auth;
mod cli;
mod common;
mod embedded;
mod fhir;
mod guarantees;
mod kafka;
mod mosquitto;
mod receipts_interop;
mod replay;
