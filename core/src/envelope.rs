//! The signed reading envelope: a COSE_Sign1 (RFC 9052, tag 18, EdDSA) over a
//! CBOR reading. The normative description is `docs/reading-envelope.md`; the
//! checks below run in the order that document gives, and each failure has its
//! own [`Error`] variant.
//!
//! Verification always runs over the bytes received: the `Sig_structure` is
//! built from the protected header bytes and payload bytes exactly as they
//! arrived (coset keeps the original protected bytes), never from a
//! re-encoding.

use ciborium::Value;
use coset::{AsCborValue, CoseSign1, CoseSign1Builder, HeaderBuilder, iana};
use serde::{Deserialize, Serialize};

use crate::did::{DeviceId, SecretKey};
use crate::error::{Error, Result};
use crate::sig;

/// Largest envelope accepted, in bytes.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024;
/// Most measurements one reading may carry.
pub const MAX_MEASUREMENTS: usize = 64;
/// Longest UCUM unit string accepted.
pub const MAX_UNIT_LEN: usize = 64;
/// Deepest nesting accepted inside `meta`.
pub const MAX_META_DEPTH: usize = 8;

/// One coded measurement: a LOINC code, a value, and a UCUM unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// LOINC code, e.g. `8867-4` (heart rate).
    pub code: String,
    /// The value, finite.
    pub value: f64,
    /// UCUM unit, e.g. `/min`.
    pub unit: String,
}

/// A reading before it is signed: what a device fills in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsignedReading {
    /// Strictly increasing per device.
    pub seq: u64,
    /// Device time, Unix milliseconds.
    pub time: u64,
    /// At least one measurement.
    pub measurements: Vec<Measurement>,
    /// The device's own free-form metadata (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A reading whose signature has been verified.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reading {
    /// The signing device (the envelope's `kid`, equal to the payload `did`).
    pub did: DeviceId,
    /// Per-device sequence number.
    pub seq: u64,
    /// Device time, Unix milliseconds.
    pub time: u64,
    /// The measurements.
    pub measurements: Vec<Measurement>,
    /// The device's free-form metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An envelope whose structure and headers have been checked, but whose
/// signature has not: the input to (batch) verification.
#[derive(Debug)]
pub struct Envelope {
    device: DeviceId,
    tbs: Vec<u8>,
    signature: [u8; 64],
    payload: Vec<u8>,
}

impl Envelope {
    /// The device named by the protected `kid`.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Verify the signature, then decode the payload.
    pub fn verify(self) -> Result<Reading> {
        sig::verify(self.device.verifying_key(), &self.tbs, &self.signature)?;
        decode_payload(&self.payload, self.device)
    }
}

/// Decode a message whose signature was already verified upstream, without
/// checking the signature again: every structural and payload check still
/// runs. The attestor uses this on records that only the ingest tier (which
/// batch-verifies) can write; the signature is re-checked by anyone who
/// verifies a proof bundle, because the leaf holds these exact bytes.
pub fn decode_verified_upstream(bytes: &[u8]) -> Result<Reading> {
    decode_verified_upstream_with(bytes, DeviceId::parse)
}

/// [`decode_verified_upstream`] with the `kid` resolved by `resolve`
/// (for example [`crate::DidCache::resolve`]), which must answer as
/// [`DeviceId::parse`] does.
pub fn decode_verified_upstream_with(
    bytes: &[u8],
    resolve: impl FnOnce(&str) -> Result<DeviceId>,
) -> Result<Reading> {
    let env = parse_with(bytes, resolve)?;
    decode_payload(&env.payload, env.device)
}

/// Check one message fully (structure, headers, signature, payload).
pub fn verify(bytes: &[u8]) -> Result<Reading> {
    parse(bytes)?.verify()
}

/// Verify many messages with one batch signature check. The verdict for each
/// message is the same as [`verify`] would give it (see [`crate::sig`]).
pub fn verify_batch<B: AsRef<[u8]>>(messages: &[B]) -> Vec<Result<Reading>> {
    let parsed: Vec<Result<Envelope>> = messages.iter().map(|m| parse(m.as_ref())).collect();
    verify_parsed(parsed)
}

/// Batch-verify envelopes that were already parsed (so the caller can, for
/// example, look devices up in a registry first).
pub fn verify_parsed(parsed: Vec<Result<Envelope>>) -> Vec<Result<Reading>> {
    let ok: Vec<&Envelope> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
    let items: Vec<(&ed25519_dalek::VerifyingKey, &[u8], &[u8; 64])> = ok
        .iter()
        .map(|e| (e.device.verifying_key(), e.tbs.as_slice(), &e.signature))
        .collect();
    let mut verdicts = sig::verify_many(&items).into_iter();
    parsed
        .into_iter()
        .map(|p| {
            let env = p?;
            // `verdicts` has exactly one entry per Ok envelope, in order.
            verdicts.next().unwrap_or(Err(Error::BadSignature))?;
            decode_payload(&env.payload, env.device)
        })
        .collect()
}

/// Check the CBOR items of `bytes` for what the format forbids but a
/// general decoder would take silently: any tag (but one at the top, when
/// `top_tag`: the message's tag, which step 3 checks), the simple value
/// `undefined` and every simple value other than `false`, `true` and
/// `null`. ciborium reads `undefined` as `null` and a tag 2/3 bignum as an
/// integer, so without this a reading a spec-following verifier rejects
/// could be logged. Only headers are read: malformed lengths are left to
/// the decoder (which reports them).
fn check_items(bytes: &[u8], part: &'static str, top_tag: bool) -> Result<()> {
    let bad = |detail: String| Error::MalformedCbor { part, detail };
    // (position, items left in the current container; u64::MAX =
    // indefinite until a break).
    let mut at = 0usize;
    let mut stack: Vec<u64> = vec![1];
    let mut top = true;
    while let Some(left) = stack.last_mut() {
        if *left == 0 {
            stack.pop();
            continue;
        }
        let Some(&ib) = bytes.get(at) else {
            return Ok(()); // truncated: the decoder reports it
        };
        at += 1;
        let (major, info) = (ib >> 5, ib & 0x1f);
        if ib == 0xff {
            if *left == u64::MAX {
                stack.pop();
                continue;
            }
            return Ok(()); // a stray break: the decoder reports it
        }
        if *left != u64::MAX {
            *left -= 1;
        }
        let arg = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let n = 1usize << (info - 24);
                let Some(b) = bytes.get(at..at + n) else {
                    return Ok(());
                };
                at += n;
                b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x))
            }
            31 => u64::MAX,
            _ => return Ok(()),
        };
        let was_top = std::mem::replace(&mut top, false);
        match major {
            0 | 1 => {}
            2 | 3 => {
                if arg != u64::MAX {
                    at = at.saturating_add(usize::try_from(arg).unwrap_or(usize::MAX));
                } else {
                    stack.push(u64::MAX);
                }
            }
            4 => stack.push(arg),
            5 => stack.push(if arg == u64::MAX {
                arg
            } else {
                arg.saturating_mul(2)
            }),
            6 => {
                if !(was_top && top_tag) {
                    return Err(bad(format!("tag {arg} is not allowed here")));
                }
                stack.push(1);
            }
            _ => match info {
                20..=22 | 25..=27 => {}
                23 => return Err(bad("the simple value undefined is not allowed".into())),
                _ => return Err(bad(format!("the simple value {arg} is not allowed"))),
            },
        }
        if stack.len() > 300 {
            return Ok(()); // the decoder refuses nesting past its limit
        }
    }
    Ok(())
}

/// Decode exactly one CBOR item; trailing bytes are an error.
fn decode_one(bytes: &[u8], part: &'static str) -> Result<Value> {
    check_items(bytes, part, part == "message")?;
    let mut rest = bytes;
    let v: Value = ciborium::de::from_reader(&mut rest).map_err(|e| Error::MalformedCbor {
        part,
        detail: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::MalformedCbor {
            part,
            detail: format!("{} trailing bytes after the data item", rest.len()),
        });
    }
    Ok(v)
}

/// Structural checks (steps 1–7 of the spec), without the signature.
pub fn parse(bytes: &[u8]) -> Result<Envelope> {
    parse_with(bytes, DeviceId::parse)
}

/// [`parse`] with the `kid` resolved by `resolve`, which must answer as
/// [`DeviceId::parse`] does (a cache of it, or a registry of parsed keys).
pub fn parse_with(
    bytes: &[u8],
    resolve: impl FnOnce(&str) -> Result<DeviceId>,
) -> Result<Envelope> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(Error::Oversize {
            len: bytes.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    let inner = match decode_one(bytes, "message")? {
        Value::Tag(18, inner) => *inner,
        Value::Tag(t, _) => return Err(Error::WrongTag { found: Some(t) }),
        _ => return Err(Error::WrongTag { found: None }),
    };
    let sign1 = CoseSign1::from_cbor_value(inner).map_err(|e| Error::MalformedCose {
        detail: e.to_string(),
    })?;
    let protected = sign1.protected.original_data.as_deref().unwrap_or(&[]);
    let kid = check_protected(protected)?;
    if !sign1.unprotected.is_empty() {
        return Err(Error::UnexpectedHeader(
            "the unprotected header must be empty".into(),
        ));
    }
    let kid = std::str::from_utf8(&kid).map_err(|_| Error::InvalidDid("kid is not UTF-8"))?;
    let device = resolve(kid)?;
    let Some(payload) = sign1.payload.clone() else {
        return Err(Error::MalformedCose {
            detail: "payload is detached (nil); it must be attached".into(),
        });
    };
    let signature: [u8; 64] = sign1
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| Error::BadSignature)?;
    let tbs = sign1.tbs_data(b"");
    Ok(Envelope {
        device,
        tbs,
        signature,
        payload,
    })
}

/// The protected header must be exactly `{1: -8, 4: kid}`. Returns the kid.
fn check_protected(bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.is_empty() {
        return Err(Error::MissingHeader("alg"));
    }
    let Value::Map(entries) = decode_one(bytes, "protected header")? else {
        return Err(Error::MalformedCose {
            detail: "protected header is not a map".into(),
        });
    };
    let mut alg = None;
    let mut kid = None;
    for (k, v) in entries {
        match k.as_integer().map(i128::from) {
            Some(1) => alg = Some(v),
            Some(4) => kid = Some(v),
            _ => {
                return Err(Error::UnexpectedHeader(format!(
                    "protected label {}",
                    label(&k)
                )));
            }
        }
    }
    match alg {
        None => return Err(Error::MissingHeader("alg")),
        Some(v) if v.as_integer().map(i128::from) == Some(-8) => {}
        Some(v) => return Err(Error::WrongAlg { found: label(&v) }),
    }
    match kid {
        None => Err(Error::MissingHeader("kid")),
        Some(Value::Bytes(b)) => Ok(b),
        Some(_) => Err(Error::MalformedCose {
            detail: "kid must be a byte string".into(),
        }),
    }
}

fn label(v: &Value) -> String {
    match v {
        Value::Integer(i) => i128::from(*i).to_string(),
        Value::Text(t) => format!("{t:?}"),
        _ => "(non-integer)".into(),
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidField {
        field,
        reason: reason.into(),
    }
}

fn as_u64(v: Value, field: &'static str) -> Result<u64> {
    v.as_integer()
        .and_then(|i| u64::try_from(i128::from(i)).ok())
        .ok_or_else(|| invalid(field, "must be an unsigned integer below 2^64"))
}

/// Steps 9–14 of the spec. Runs only on signed bytes.
fn decode_payload(payload: &[u8], kid: DeviceId) -> Result<Reading> {
    let Value::Map(entries) = decode_one(payload, "payload")? else {
        return Err(invalid("payload", "must be a CBOR map"));
    };
    let (mut did, mut seq, mut time, mut obs, mut meta) = (None, None, None, None, None);
    for (k, v) in entries {
        let Value::Text(k) = k else {
            return Err(invalid("payload", "keys must be text strings"));
        };
        let slot = match k.as_str() {
            "did" => &mut did,
            "seq" => &mut seq,
            "time" => &mut time,
            "obs" => &mut obs,
            "meta" => &mut meta,
            _ => return Err(Error::UnknownField(k)),
        };
        if slot.replace(v).is_some() {
            return Err(invalid("payload", format!("duplicate key {k:?}")));
        }
    }
    let did = match did.ok_or(Error::MissingField("did"))? {
        Value::Text(t) => t,
        _ => return Err(invalid("did", "must be a text string")),
    };
    if did != kid.as_str() {
        return Err(Error::KidMismatch {
            kid: kid.as_str().to_owned(),
            did,
        });
    }
    let seq = as_u64(seq.ok_or(Error::MissingField("seq"))?, "seq")?;
    let time = as_u64(time.ok_or(Error::MissingField("time"))?, "time")?;
    let Value::Array(obs) = obs.ok_or(Error::MissingField("obs"))? else {
        return Err(invalid("obs", "must be an array"));
    };
    if obs.is_empty() || obs.len() > MAX_MEASUREMENTS {
        return Err(invalid(
            "obs",
            format!("must hold 1 to {MAX_MEASUREMENTS} measurements"),
        ));
    }
    let mut measurements = Vec::with_capacity(obs.len());
    for o in obs {
        let Value::Array(parts) = o else {
            return Err(invalid("obs", "each measurement must be an array"));
        };
        let [code, value, unit]: [Value; 3] = parts
            .try_into()
            .map_err(|_| invalid("obs", "each measurement must be [code, value, unit]"))?;
        let (Value::Text(code), Value::Text(unit)) = (code, unit) else {
            return Err(invalid("obs", "code and unit must be text strings"));
        };
        let value = match value {
            Value::Integer(i) => i128::from(i) as f64,
            Value::Float(f) => f,
            _ => return Err(invalid("obs", "value must be a number")),
        };
        let m = Measurement { code, value, unit };
        validate_measurement(&m)?;
        measurements.push(m);
    }
    let meta = match meta {
        None => None,
        Some(v) => match cbor_to_json(v, 0)? {
            serde_json::Value::Object(m) => Some(m),
            _ => return Err(invalid("meta", "must be a map")),
        },
    };
    Ok(Reading {
        did: kid,
        seq,
        time,
        measurements,
        meta,
    })
}

/// True if `code` is a syntactically valid LOINC code with a correct
/// mod-10 (Luhn) check digit, e.g. `8867-4`.
pub fn is_loinc(code: &str) -> bool {
    let Some((body, check)) = code.split_once('-') else {
        return false;
    };
    if body.is_empty()
        || body.len() > 7
        || check.len() != 1
        || !body.bytes().all(|b| b.is_ascii_digit())
        || !check.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let mut sum = 0u32;
    for (i, b) in body.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    let expected = (10 - sum % 10) % 10;
    u32::from(check.as_bytes()[0] - b'0') == expected
}

/// The checks every measurement must pass, on the device and at ingest.
pub fn validate_measurement(m: &Measurement) -> Result<()> {
    if !is_loinc(&m.code) {
        return Err(invalid(
            "obs",
            format!(
                "code {:?} is not a LOINC code with a valid check digit",
                truncate(&m.code)
            ),
        ));
    }
    if !m.value.is_finite() {
        return Err(Error::NonFiniteValue);
    }
    if m.unit.is_empty()
        || m.unit.len() > MAX_UNIT_LEN
        || !m.unit.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "obs",
            format!(
                "unit {:?} is not a UCUM code (1-{MAX_UNIT_LEN} printable ASCII characters)",
                truncate(&m.unit)
            ),
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn cbor_to_json(v: Value, depth: usize) -> Result<serde_json::Value> {
    use serde_json::Value as J;
    if depth > MAX_META_DEPTH {
        return Err(invalid("meta", "nested too deeply"));
    }
    Ok(match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(b),
        Value::Text(t) => J::String(t),
        Value::Integer(i) => {
            let i = i128::from(i);
            if let Ok(u) = u64::try_from(i) {
                J::from(u)
            } else if let Ok(s) = i64::try_from(i) {
                J::from(s)
            } else {
                return Err(invalid("meta", "integer out of range"));
            }
        }
        Value::Float(f) => J::Number(
            serde_json::Number::from_f64(f).ok_or_else(|| invalid("meta", "non-finite number"))?,
        ),
        Value::Array(a) => J::Array(
            a.into_iter()
                .map(|x| cbor_to_json(x, depth + 1))
                .collect::<Result<_>>()?,
        ),
        Value::Map(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let Value::Text(k) = k else {
                    return Err(invalid("meta", "map keys must be text strings"));
                };
                if out.insert(k, cbor_to_json(v, depth + 1)?).is_some() {
                    return Err(invalid("meta", "duplicate key"));
                }
            }
            J::Object(out)
        }
        _ => {
            return Err(invalid(
                "meta",
                "only JSON-compatible CBOR types are allowed",
            ));
        }
    })
}

fn json_to_cbor(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::String(s) => Value::Text(s.clone()),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::Integer(u.into())
            } else if let Some(i) = n.as_i64() {
                Value::Integer(i.into())
            } else {
                Value::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        J::Array(a) => Value::Array(a.iter().map(json_to_cbor).collect()),
        J::Object(m) => Value::Map(sorted_text_map(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_cbor(v)))
                .collect(),
        )),
    }
}

/// RFC 8949 §4.2.1 core deterministic order for text keys: shorter first,
/// then bytewise.
fn sorted_text_map(mut entries: Vec<(String, Value)>) -> Vec<(Value, Value)> {
    entries.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(&b.0)));
    entries
        .into_iter()
        .map(|(k, v)| (Value::Text(k), v))
        .collect()
}

fn number(v: f64) -> Value {
    // Integral values travel as CBOR integers (smaller, and exact).
    if v.fract() == 0.0 && v.abs() < 9.0e15 && !(v == 0.0 && v.is_sign_negative()) {
        Value::Integer((v as i64).into())
    } else {
        Value::Float(v)
    }
}

/// Encode the payload of `r` for device `did` (deterministic CBOR).
pub fn encode_payload(did: &DeviceId, r: &UnsignedReading) -> Result<Vec<u8>> {
    if r.measurements.is_empty() || r.measurements.len() > MAX_MEASUREMENTS {
        return Err(invalid(
            "obs",
            format!("must hold 1 to {MAX_MEASUREMENTS} measurements"),
        ));
    }
    for m in &r.measurements {
        validate_measurement(m)?;
    }
    let obs = Value::Array(
        r.measurements
            .iter()
            .map(|m| {
                Value::Array(vec![
                    Value::Text(m.code.clone()),
                    number(m.value),
                    Value::Text(m.unit.clone()),
                ])
            })
            .collect(),
    );
    let mut entries = vec![
        ("did".to_owned(), Value::Text(did.as_str().to_owned())),
        ("seq".to_owned(), Value::Integer(r.seq.into())),
        ("time".to_owned(), Value::Integer(r.time.into())),
        ("obs".to_owned(), obs),
    ];
    if let Some(meta) = &r.meta {
        entries.push((
            "meta".to_owned(),
            json_to_cbor(&serde_json::Value::Object(meta.clone())),
        ));
    }
    let mut out = Vec::with_capacity(128);
    ciborium::ser::into_writer(&Value::Map(sorted_text_map(entries)), &mut out).map_err(|e| {
        Error::MalformedCbor {
            part: "payload",
            detail: e.to_string(),
        }
    })?;
    Ok(out)
}

/// Sign a reading as a COSE_Sign1 envelope with the device key.
pub fn sign(key: &SecretKey, r: &UnsignedReading) -> Result<Vec<u8>> {
    sign_as(key, key.did(), r)
}

/// Sign a reading that *claims* to come from `claimed` with `key`. Only a
/// test or a simulated attacker wants this: unless `key` is `claimed`'s
/// key, every verifier rejects the result with `bad_signature`.
pub fn sign_as(key: &SecretKey, claimed: &DeviceId, r: &UnsignedReading) -> Result<Vec<u8>> {
    sign_payload(key, claimed, encode_payload(claimed, r)?)
}

/// Sign encoded `payload` bytes as an envelope claiming `claimed`.
fn sign_payload(key: &SecretKey, claimed: &DeviceId, payload: Vec<u8>) -> Result<Vec<u8>> {
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .key_id(claimed.as_str().as_bytes().to_vec())
        .build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .create_signature(b"", |tbs| key.sign(tbs).to_vec())
        .build();
    let value = Value::Tag(
        18,
        Box::new(sign1.to_cbor_value().map_err(|e| Error::MalformedCose {
            detail: e.to_string(),
        })?),
    );
    let mut out = Vec::with_capacity(256);
    ciborium::ser::into_writer(&value, &mut out).map_err(|e| Error::MalformedCbor {
        part: "message",
        detail: e.to_string(),
    })?;
    if out.len() > MAX_ENVELOPE_BYTES {
        return Err(Error::Oversize {
            len: out.len(),
            max: MAX_ENVELOPE_BYTES,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> SecretKey {
        SecretKey::from_seed(&[i; 32]).unwrap()
    }

    fn reading(seq: u64) -> UnsignedReading {
        UnsignedReading {
            seq,
            time: 1_700_000_000_000 + seq,
            measurements: vec![
                Measurement {
                    code: "8867-4".into(),
                    value: 72.0,
                    unit: "/min".into(),
                },
                Measurement {
                    code: "2708-6".into(),
                    value: 97.5,
                    unit: "%".into(),
                },
            ],
            meta: None,
        }
    }

    #[test]
    fn sign_verify_roundtrip() {
        let k = key(1);
        let mut r = reading(5);
        r.meta = Some(
            serde_json::json!({"fw": "1.0", "battery": 80, "x": [1, 2.5, null]})
                .as_object()
                .unwrap()
                .clone(),
        );
        let bytes = sign(&k, &r).unwrap();
        let got = verify(&bytes).unwrap();
        assert_eq!(got.did, *k.did());
        assert_eq!(got.seq, 5);
        assert_eq!(got.time, r.time);
        assert_eq!(got.measurements, r.measurements);
        assert_eq!(got.meta, r.meta);
        assert_eq!(bytes[0], 0xd2, "tag 18");
    }

    #[test]
    fn loinc_check_digits() {
        for ok in [
            "8867-4", "8889-8", "2708-6", "59408-5", "9279-1", "8310-5", "8480-6", "8462-4",
            "8478-0", "85354-9", "2339-0", "99504-3", "41950-7",
        ] {
            assert!(is_loinc(ok), "{ok}");
        }
        for bad in [
            "8867-5",
            "8867",
            "-4",
            "8867-",
            "88a7-4",
            "12345678-0",
            "8867-44",
            "",
        ] {
            assert!(!is_loinc(bad), "{bad}");
        }
    }

    #[test]
    fn any_flipped_bit_fails() {
        let bytes = sign(&key(2), &reading(1)).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut t = bytes.clone();
                t[i] ^= 1 << bit;
                assert!(
                    verify(&t).is_err(),
                    "flip byte {i} bit {bit} still verifies"
                );
            }
        }
    }

    #[test]
    fn signing_rejects_what_verification_would() {
        let k = key(3);
        let mut r = reading(1);
        r.measurements[0].value = f64::NAN;
        assert_eq!(sign(&k, &r), Err(Error::NonFiniteValue));
        let mut r = reading(1);
        r.measurements.clear();
        assert!(sign(&k, &r).is_err());
        let mut r = reading(1);
        r.measurements[0].code = "8867-3".into();
        assert!(sign(&k, &r).is_err());
        let mut r = reading(1);
        r.meta = Some(
            serde_json::json!({"blob": "x".repeat(MAX_ENVELOPE_BYTES)})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert!(matches!(sign(&k, &r), Err(Error::Oversize { .. })));
    }

    #[test]
    fn batch_equals_single() {
        let keys: Vec<SecretKey> = (0..8).map(key).collect();
        let mut msgs: Vec<Vec<u8>> = (0..50u64)
            .map(|i| sign(&keys[(i % 8) as usize], &reading(i)).unwrap())
            .collect();
        msgs[3][20] ^= 1;
        let n = msgs[9].len();
        msgs[9][n - 1] ^= 1;
        msgs[17] = vec![0xd2, 0x84];
        msgs[30].truncate(10);
        let batch = verify_batch(&msgs);
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(batch[i], verify(m), "message {i}");
        }
        assert_eq!(batch.iter().filter(|r| r.is_ok()).count(), 46);
    }

    #[test]
    fn garbage_never_panics() {
        let good = sign(&key(4), &reading(1)).unwrap();
        for len in 0..good.len() {
            let _ = verify(&good[..len]);
        }
        for b in 0..=255u8 {
            let _ = verify(&[b]);
            let _ = verify(&[0xd2, b]);
            let _ = verify(&[0xd2, 0x84, b, b, b]);
        }
        assert!(matches!(verify(&[]), Err(Error::MalformedCbor { .. })));
        assert!(matches!(
            verify(&vec![0u8; MAX_ENVELOPE_BYTES + 1]),
            Err(Error::Oversize { .. })
        ));
    }
    /// Sign `payload` (raw CBOR bytes) as `key`'s envelope.
    fn sign_raw(key: &SecretKey, payload: Vec<u8>) -> Vec<u8> {
        sign_payload(key, key.did(), payload).unwrap()
    }

    fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = hay.windows(from.len()).position(|w| w == from).unwrap();
        [&hay[..at], to, &hay[at + from.len()..]].concat()
    }

    /// What §3 forbids is refused, though ciborium would read it: before
    /// this check a tag-2 bignum `seq` was read as 5, and `undefined` in
    /// `meta` as null, so the log could hold envelopes a verifier written
    /// from the spec rejects.
    #[test]
    fn bignums_undefined_and_tags_are_refused_as_the_spec_says() {
        let k = key(3);
        let plain = encode_payload(k.did(), &reading(5)).unwrap();
        assert!(verify(&sign_raw(&k, plain.clone())).is_ok());
        let seq = b"\x63seq";
        let bignum = replace(
            &plain,
            &[&seq[..], &[0x05]].concat(),
            &[&seq[..], &[0xc2, 0x41, 0x05]].concat(),
        );
        let with_meta = |item: &[u8]| {
            let mut p = plain.clone();
            assert_eq!(p[0], 0xa4);
            p[0] = 0xa5;
            p.extend_from_slice(b"\x64meta\xa1\x61x");
            p.extend_from_slice(item);
            p
        };
        let undefined = with_meta(&[0xf7]);
        let tagged = with_meta(&[0xc1, 0x1a, 0x65, 0x5c, 0x00, 0x00]);
        let simple = with_meta(&[0xf8, 0x20]);
        let null = with_meta(&[0xf6]);
        assert!(verify(&sign_raw(&k, null)).is_ok());
        for (what, p) in [
            ("bignum", bignum),
            ("undefined", undefined),
            ("tag", tagged),
            ("simple", simple),
        ] {
            let e = verify(&sign_raw(&k, p)).unwrap_err();
            assert_eq!(e.code(), "malformed_cbor", "{what}: {e}");
        }
        // Nor outside the payload: a second tag inside the message's tag 18.
        let env = sign(&k, &reading(1)).unwrap();
        let e = parse(&[&[0xd2, 0xc1][..], &env[1..]].concat()).unwrap_err();
        assert_eq!(e.code(), "malformed_cbor", "{e}");
    }
}
