//! # vitaltrail-device-sim
//!
//! **Status: planned (issue #4).** This crate will own `vitaltrail sim`:
//! simulated patients with coherent vital signs and clinical scenarios,
//! attack switches for testing the pipeline, replay of real beat-to-beat (RR)
//! interval files and of the MIT-BIH ECG, and an MQTT QoS-1 publisher.
