//! MQTT for every stage of vitaltrail.
//!
//! - [`pki`]: the local certificate authorities of a data directory. Device
//!   certificates bind a registered device's own `did:key` public key, so a
//!   device authenticates to the broker with the key it signs readings with
//!   and nobody else can use its certificate.
//! - [`endpoint`]: how a client (ingest, the receipt publisher, the
//!   simulator) reaches a broker: host, port, TLS with a client
//!   certificate, or a password.
//! - [`embedded`]: the broker `vitaltrail up` runs in process (rumqttd),
//!   on loopback, for the pipeline and the gate only;
//! - [`gate`]: where devices connect to it: mutual TLS with a device
//!   certificate, the registry, and each device held to its own topics.
//! - [`mosquitto`]: the same rules for an external Mosquitto, written from
//!   the device registry (certificates, listeners, ACL).
//! - [`receipts`]: publishing signed receipts to `receipts/<did>`.
//! - [`viewers`]: nurse stations, which may only subscribe to the alert
//!   topics of their wards.
//!
//! What each of these protects, and what it does not, is in
//! `docs/threat-model.md` ("Broker").

pub mod embedded;
pub mod endpoint;
mod error;
pub mod gate;
pub mod metrics;
pub mod mosquitto;
pub mod pki;
pub mod receipts;
pub mod viewers;

pub use endpoint::{ClientTls, Login, MqttEndpoint};
pub use error::{Error, Result};
pub use pki::Pki;

/// The pipeline's MQTT user name: on the embedded broker's pipeline
/// listener (with its token), and the common name of the pipeline's client
/// certificate for an external broker.
pub const PIPELINE_USER: &str = "vitaltrail-pipeline";

/// The gate's MQTT user name on the embedded broker.
pub const GATE_USER: &str = "vitaltrail-gate";
