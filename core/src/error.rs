//! The one error type of `vitaltrail-core`.
//!
//! Every variant says whose fault it is ([`Error::is_caller_fault`]) and has a
//! stable, machine-readable [`Error::code`] that the ingest tier writes to the
//! dead-letter topic and the CLI prints.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `vitaltrail-core`.
///
/// All of these are caused by the input (untrusted bytes, a bad argument), so
/// none of them is worth retrying.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    // ---- reading envelope ----
    /// The message is larger than [`crate::envelope::MAX_ENVELOPE_BYTES`].
    #[error("oversize message: {len} bytes, the limit is {max}")]
    Oversize { len: usize, max: usize },
    /// The bytes are not one well-formed CBOR data item.
    #[error("malformed CBOR in {part}: {detail}")]
    MalformedCbor { part: &'static str, detail: String },
    /// The outer CBOR tag is not 18 (COSE_Sign1), or there is none.
    #[error("wrong CBOR tag: expected 18 (COSE_Sign1), found {}", .found.map(|t| t.to_string()).unwrap_or_else(|| "no tag".into()))]
    WrongTag { found: Option<u64> },
    /// The tagged item is not a COSE_Sign1 structure with an attached payload.
    #[error("malformed COSE_Sign1: {detail}")]
    MalformedCose { detail: String },
    /// The protected `alg` is not EdDSA (-8).
    #[error("wrong algorithm: expected EdDSA (-8), found {found}")]
    WrongAlg { found: String },
    /// A required protected header parameter is absent.
    #[error("missing protected header parameter: {0}")]
    MissingHeader(&'static str),
    /// A header parameter that the envelope format does not allow.
    #[error("unexpected header parameter: {0}")]
    UnexpectedHeader(String),
    /// A `did:key` that does not parse, or names an unusable key.
    #[error("invalid did:key: {0}")]
    InvalidDid(&'static str),
    /// The payload's `did` differs from the protected `kid`.
    #[error("kid/DID mismatch: kid is {kid}, payload did is {did}")]
    KidMismatch { kid: String, did: String },
    /// The signature does not verify under the rules in `docs/reading-envelope.md`.
    #[error("bad signature")]
    BadSignature,
    /// A required payload field is absent.
    #[error("missing field: {0}")]
    MissingField(&'static str),
    /// A payload key the format does not define.
    #[error("unknown field: {0}")]
    UnknownField(String),
    /// A payload field has the wrong type or an out-of-range value.
    #[error("invalid field {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// A measurement value is NaN or infinite.
    #[error("non-finite measurement value")]
    NonFiniteValue,

    // ---- keys ----
    /// A key file or key string could not be read.
    #[error("invalid key: {0}")]
    InvalidKey(String),

    // ---- Merkle log ----
    /// Indexes or sizes that do not describe a valid proof request.
    #[error("invalid proof request: {0}")]
    InvalidProofRequest(String),
    /// An inclusion or consistency proof that does not verify.
    #[error("proof does not verify: {0}")]
    ProofMismatch(&'static str),
    /// A hash reader returned the wrong number of hashes.
    #[error("hash storage returned {got} hashes for {want} indexes")]
    HashCount { want: usize, got: usize },

    // ---- checkpoints ----
    /// The checkpoint note or body is malformed.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(String),
    /// A receipt that does not parse, or an entry that cannot be checked.
    #[error("malformed receipt: {0}")]
    MalformedReceipt(String),
    /// No valid signature from the expected log key.
    #[error("checkpoint signature does not verify with the log key")]
    CheckpointSignature,

    // ---- anchoring ----
    /// An epoch record, partition head or ledger record that does not parse.
    #[error("malformed anchor data: {0}")]
    MalformedAnchor(String),
    /// No valid signature from the expected anchor key.
    #[error("signature does not verify with the anchor key")]
    AnchorSignature,

    // ---- proof bundles ----
    /// The bundle is not valid JSON of the documented shape.
    #[error("malformed proof bundle: {0}")]
    MalformedBundle(String),
}

impl Error {
    /// A stable, machine-readable reason code (snake_case).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Oversize { .. } => "oversize",
            Error::MalformedCbor { .. } => "malformed_cbor",
            Error::WrongTag { .. } => "wrong_tag",
            Error::MalformedCose { .. } => "malformed_cose",
            Error::WrongAlg { .. } => "wrong_alg",
            Error::MissingHeader(_) => "missing_header",
            Error::UnexpectedHeader(_) => "unexpected_header",
            Error::InvalidDid(_) => "invalid_did",
            Error::KidMismatch { .. } => "kid_mismatch",
            Error::BadSignature => "bad_signature",
            Error::MissingField(_) => "missing_field",
            Error::UnknownField(_) => "unknown_field",
            Error::InvalidField { .. } => "invalid_field",
            Error::NonFiniteValue => "non_finite_value",
            Error::InvalidKey(_) => "invalid_key",
            Error::InvalidProofRequest(_) => "invalid_proof_request",
            Error::ProofMismatch(_) => "proof_mismatch",
            Error::HashCount { .. } => "hash_count",
            Error::MalformedCheckpoint(_) => "malformed_checkpoint",
            Error::MalformedReceipt(_) => "malformed_receipt",
            Error::CheckpointSignature => "checkpoint_signature",
            Error::MalformedAnchor(_) => "malformed_anchor",
            Error::AnchorSignature => "anchor_signature",
            Error::MalformedBundle(_) => "malformed_bundle",
        }
    }

    /// True when the input is at fault (never retry, dead-letter it); false
    /// when the failure came from outside the caller's control.
    pub fn is_caller_fault(&self) -> bool {
        !matches!(self, Error::HashCount { .. })
    }
}
