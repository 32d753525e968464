//! Mosquitto configuration from the device registry.
//!
//! [`write()`] writes, into one directory, everything a Mosquitto 2.0 needs
//! to hold devices and the pipeline to the same rules as the embedded
//! broker's gate:
//! - `mosquitto.conf`: two listeners and no anonymous clients.
//!   - **devices**: TLS with a required client certificate of the device
//!     CA; the certificate's common name (the DID) is the user name
//!     (`use_identity_as_username`) and the client ID
//!     (`use_username_as_clientid`), so no device can take over another
//!     client's ID or session.
//!   - **pipeline**: TLS with a required client certificate of the
//!     *pipeline* CA, which signs nothing but the pipeline's own, so no
//!     device can connect there and pick the pipeline's client IDs.
//!   - `retain_available false`: nothing a client sends is kept.
//!   - the same packet limit as the embedded broker (256 KiB + 1 KiB), at
//!     most 100 unacknowledged messages in flight, and at most 100,000
//!     messages or 256 MiB queued per client, and sessions of clients gone
//!     for 14 days expire, so one slow or offline client cannot grow the
//!     broker without bound.
//!
//! `server.key` is written mode 0600: Mosquitto must run as its owner
//! (`--user`), or the operator gives it to Mosquitto's user
//! (`chown mosquitto <out>/server.key`).
//! - `acl`: the pipeline may read `vitals/#` (and so join the ingest share
//!   group) and write `receipts/#`; each **active** registered device may
//!   write exactly `vitals/<did>` and read `receipts/<did>`. A revoked or
//!   unknown device gets no line, so it can neither publish nor receive.
//!   The pipeline also writes `alerts/#`; each active viewer (nurse
//!   station, `vitaltrail viewers add`, common name `viewer:<name>`) may
//!   read exactly `alerts/<ward>` of its wards, and write nothing.
//!   (Mosquitto grants any subscription; the ACL decides what is delivered.)
//! - the certificates and keys the listeners name.
//!
//! Run it again after the registry changes and send Mosquitto `SIGHUP`; it
//! re-reads the ACL.

use std::net::SocketAddr;
use std::path::Path;

use crate::{Error, PIPELINE_USER, Pki, Result};

/// Where the two listeners are.
#[derive(Debug, Clone)]
pub struct MosquittoConfig {
    /// Devices connect here.
    pub devices: SocketAddr,
    /// The pipeline (ingest, the receipt publisher) connects here.
    pub pipeline: SocketAddr,
    /// The user Mosquitto runs as (`user`); `None` keeps its default
    /// (`mosquitto`), which must be able to read `server.key`.
    pub user: Option<String>,
}

/// The ACL for these active devices and these viewers (nurse stations).
pub fn acl(active: &[String], viewers: &crate::viewers::Viewers) -> String {
    let mut s = String::from(
        "# Written by `vitaltrail mqtt mosquitto` from the device registry.\n\
         # The pipeline: every device's readings, every device's receipts.\n",
    );
    s.push_str(&format!(
        "user {PIPELINE_USER}\ntopic read vitals/#\ntopic write receipts/#\ntopic write alerts/#\n\n"
    ));
    s.push_str("# Active devices: their own readings and receipts, nothing else.\n");
    for did in active {
        // Only a DID that is safe in a topic gets a line.
        let (Some(v), Some(r)) = (
            vitaltrail_core::topics::vitals_topic(did),
            vitaltrail_core::topics::receipts_topic(did),
        ) else {
            continue;
        };
        s.push_str(&format!("user {did}\ntopic write {v}\ntopic read {r}\n\n"));
    }
    s.push_str("# Active viewers (nurse stations): their wards' alerts, nothing else.\n");
    for name in viewers.viewers.keys() {
        let Some(wards) = viewers.wards(name) else {
            continue;
        };
        if !crate::viewers::valid_name(name) {
            continue;
        }
        s.push_str(&format!("user {}{name}\n", crate::viewers::PREFIX));
        for t in wards
            .iter()
            .filter_map(|w| vitaltrail_core::topics::alerts_topic(w))
        {
            s.push_str(&format!("topic read {t}\n"));
        }
        s.push('\n');
    }
    s
}

/// Copy a file of the CA directory into `out`, atomically (never through a
/// symlink there); keys stay mode 0600.
fn copy(pki: &Pki, name: &str, out: &Path) -> Result<()> {
    let from = pki.path(name);
    let text = std::fs::read_to_string(&from).map_err(|e| Error::io(&from, e))?;
    crate::pki::write(&out.join(name), &text, name.ends_with(".key"))
}

/// Write the configuration for `active` devices into `out`.
pub fn write(
    pki: &Pki,
    cfg: &MosquittoConfig,
    active: &[String],
    viewers: &crate::viewers::Viewers,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for f in [
        "ca.pem",
        "server-ca.pem",
        "pipeline-ca.pem",
        "server.pem",
        "server.key",
    ] {
        copy(pki, f, out)?;
    }
    let o = out.display();
    let listener = |addr: &SocketAddr, ca: &str, clientid: bool| {
        format!(
            "listener {port} {host}\n\
             cafile {o}/{ca}\ncertfile {o}/server.pem\nkeyfile {o}/server.key\n\
             require_certificate true\nuse_identity_as_username true\n{extra}\n",
            port = addr.port(),
            host = addr.ip(),
            extra = if clientid {
                "use_username_as_clientid true\n"
            } else {
                ""
            },
        )
    };
    let conf = format!(
        "# Written by `vitaltrail mqtt mosquitto`; see docs/threat-model.md (Broker).\n\
         per_listener_settings false\nallow_anonymous false\nretain_available false\n\
         max_packet_size {max_packet}\nmax_inflight_messages 100\n\
         max_queued_messages 100000\nmax_queued_bytes 268435456\n\
         persistent_client_expiration 14d\n\
         acl_file {o}/acl\n{user}\n\
         # Devices: a device-CA certificate; the DID is user name and client ID.\n{}\
         # The pipeline: only a pipeline-CA certificate.\n{}",
        listener(&cfg.devices, "ca.pem", true),
        listener(&cfg.pipeline, "pipeline-ca.pem", false),
        max_packet = crate::embedded::MAX_PAYLOAD + 1024,
        user = cfg
            .user
            .as_ref()
            .map_or(String::new(), |u| format!("user {u}\n")),
    );
    // Atomic, so a SIGHUP never reads half an ACL.
    crate::pki::write(&out.join("acl"), &acl(active, viewers), false)?;
    crate::pki::write(&out.join("mosquitto.conf"), &conf, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_well_formed_devices_get_acl_lines() {
        let did = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        let mut v = crate::viewers::Viewers::default();
        v.add("nurse-3", &["ward-3".into(), "ward-4".into()], "k1", "", 0)
            .unwrap();
        v.add("gone", &["ward-3".into()], "k2", "", 0).unwrap();
        v.viewers.get_mut("gone").unwrap().revoked = true;
        let a = acl(&[did.to_owned(), "did:key:#".to_owned()], &v);
        assert!(a.contains(
            "user viewer:nurse-3\ntopic read alerts/ward-3\ntopic read alerts/ward-4\n\n"
        ));
        assert!(!a.contains("viewer:gone"), "revoked");
        assert!(a.contains("topic write alerts/#\n"));
        assert!(a.contains(&format!("user {did}\ntopic write vitals/{did}\n")));
        assert!(a.contains(&format!("topic read receipts/{did}\n")));
        assert!(!a.contains("did:key:#"));
        assert_eq!(a.matches("topic read vitals/#").count(), 1);
    }
}
