//! Attack switches: each makes one kind of message the pipeline must reject,
//! and says which reason code the rejection must carry.

use vitaltrail_core::envelope::{self, UnsignedReading};
use vitaltrail_core::{DeviceId, SecretKey};

use crate::Result;

/// One kind of bad message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attack {
    /// A valid reading with one signature byte flipped.
    ForgedSignature,
    /// A reading naming a device but signed with another key.
    WrongKey,
    /// An earlier reading sent again, byte for byte.
    Replay,
    /// A new reading reusing the device's last seq.
    DuplicateSeq,
    /// A truncated envelope.
    MalformedCbor,
    /// A message over the 16 KiB limit.
    Oversize,
    /// A correctly signed reading from an unregistered device.
    UnknownDevice,
}

impl Attack {
    /// Every attack.
    pub const ALL: [Attack; 7] = [
        Attack::ForgedSignature,
        Attack::WrongKey,
        Attack::Replay,
        Attack::DuplicateSeq,
        Attack::MalformedCbor,
        Attack::Oversize,
        Attack::UnknownDevice,
    ];

    /// The CLI name (`forged-signature`, `wrong-key`, `replay`,
    /// `duplicate-seq`, `malformed-cbor`, `oversize`, `unknown-device`).
    pub fn name(self) -> &'static str {
        match self {
            Attack::ForgedSignature => "forged-signature",
            Attack::WrongKey => "wrong-key",
            Attack::Replay => "replay",
            Attack::DuplicateSeq => "duplicate-seq",
            Attack::MalformedCbor => "malformed-cbor",
            Attack::Oversize => "oversize",
            Attack::UnknownDevice => "unknown-device",
        }
    }

    /// Parse a CLI name; `all` is handled by the caller.
    pub fn parse(s: &str) -> Option<Attack> {
        Attack::ALL.into_iter().find(|a| a.name() == s)
    }

    /// The rejection reason the pipeline must record.
    pub fn expected_reason(self) -> &'static str {
        match self {
            Attack::ForgedSignature | Attack::WrongKey => "bad_signature",
            // A replay of a logged reading inside the anti-replay window is
            // recognised as already logged.
            Attack::Replay | Attack::DuplicateSeq => "duplicate",
            Attack::MalformedCbor => "malformed_cbor",
            Attack::Oversize => "oversize",
            Attack::UnknownDevice => "unknown_device",
        }
    }
}

/// Build the bad message for `attack` against `device`. `reading` is a fresh
/// reading of that device with `seq` = its last sent seq plus one;
/// `earlier` is an envelope it sent before. Returns (claimed device, bytes).
pub fn forge(
    attack: Attack,
    device: &SecretKey,
    reading: &UnsignedReading,
    last_seq: u64,
    earlier: &[u8],
    stranger: &SecretKey,
) -> Result<(DeviceId, Vec<u8>)> {
    let me = device.did().clone();
    Ok(match attack {
        Attack::ForgedSignature => {
            let mut e = envelope::sign(device, reading)?;
            let n = e.len();
            e[n - 1] ^= 0x01;
            (me, e)
        }
        Attack::WrongKey => (me.clone(), envelope::sign_as(stranger, &me, reading)?),
        Attack::Replay => (me, earlier.to_vec()),
        Attack::DuplicateSeq => {
            let mut r = reading.clone();
            r.seq = last_seq;
            if let Some(m) = r.measurements.first_mut() {
                m.value += 1.0;
            }
            (me, envelope::sign(device, &r)?)
        }
        Attack::MalformedCbor => {
            let mut e = envelope::sign(device, reading)?;
            e.truncate(e.len() - 5);
            (me, e)
        }
        Attack::Oversize => {
            let mut e = envelope::sign(device, reading)?;
            e.resize(envelope::MAX_ENVELOPE_BYTES + 100, 0);
            (me, e)
        }
        Attack::UnknownDevice => (stranger.did().clone(), envelope::sign(stranger, reading)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitaltrail_core::Measurement;

    #[test]
    fn each_attack_fails_where_it_should() {
        let dev = SecretKey::from_seed(&[1; 32]).unwrap();
        let stranger = SecretKey::from_seed(&[2; 32]).unwrap();
        let r = |seq| UnsignedReading {
            seq,
            time: 1,
            measurements: vec![Measurement {
                code: "8867-4".into(),
                value: 70.0,
                unit: "/min".into(),
            }],
            meta: None,
        };
        let earlier = envelope::sign(&dev, &r(0)).unwrap();
        for a in Attack::ALL {
            let (claimed, bytes) = forge(a, &dev, &r(5), 4, &earlier, &stranger).unwrap();
            let v = envelope::verify(&bytes);
            match a.expected_reason() {
                // Caught by the signature/format checks in ingest.
                "bad_signature" | "malformed_cbor" | "oversize" => {
                    assert_eq!(v.unwrap_err().code(), a.expected_reason(), "{a:?}")
                }
                // Valid envelopes: caught by the registry or the attestor.
                _ => assert!(v.is_ok(), "{a:?}"),
            }
            if a == Attack::UnknownDevice {
                assert_eq!(&claimed, stranger.did());
            } else {
                assert_eq!(&claimed, dev.did());
            }
        }
    }
}
