//! Acknowledgements: how a nurse station's (or an operator's) "I have
//! seen it" reaches the engine, and what it is told back.
//!
//! The HTTP server (`POST /alerts/<id>/ack`, in `vitaltrail-node`)
//! authenticates the caller and sends an [`AckRequest`] through an
//! [`AckHandle`]; the stage takes it in its next round (at once: a waiting
//! request starts a round), records it as an `acknowledged` event, and
//! answers only once that event and the engine's state are durable. So a
//! 200 means the acknowledgement survives a crash and will be delivered on
//! every channel. A refusal means it was not taken; no answer (the caller
//! gone, the stage stopped after queueing it) means it may have been, and
//! sending it again is safe (a 409 naming the caller then says it was).
//!
//! Who and when come from the caller's credential and the engine's clock,
//! never from the request.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::engine::Event;

/// Requests waiting for the stage, at most; past it a caller gets 503.
pub const INBOX: usize = 256;

/// Acknowledgements taken in one round, at most (the rest wait for the
/// next, which follows at once).
pub const PER_ROUND: usize = 64;

/// How the acknowledger proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckVia {
    /// A nurse station's token (`vitaltrail viewers add`): `by` is the
    /// viewer's name.
    Viewer,
    /// The operator's token (`<data>/keys/alerts.token`,
    /// `vitaltrail alerts ack --as NAME`): `by` is the name the operator
    /// gave.
    Operator,
}

impl AckVia {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AckVia::Viewer => "viewer",
            AckVia::Operator => "operator",
        }
    }
}

/// Who acknowledges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A nurse station: only alarms of its wards.
    Viewer {
        /// Its name in `viewers.json`.
        name: String,
        /// Its wards.
        wards: Vec<String>,
    },
    /// The operator, acknowledging on behalf of `name`: any ward.
    Operator {
        /// Whom the operator names.
        name: String,
    },
}

impl Actor {
    /// The name recorded.
    pub fn name(&self) -> &str {
        match self {
            Actor::Viewer { name, .. } | Actor::Operator { name } => name,
        }
    }

    /// How it proved who it is.
    pub fn via(&self) -> AckVia {
        match self {
            Actor::Viewer { .. } => AckVia::Viewer,
            Actor::Operator { .. } => AckVia::Operator,
        }
    }

    /// The wards it may acknowledge in (`None`: all).
    pub fn wards(&self) -> Option<&[String]> {
        match self {
            Actor::Viewer { wards, .. } => Some(wards),
            Actor::Operator { .. } => None,
        }
    }
}

/// Why an acknowledgement was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckRefusal {
    /// The request itself is wrong (an empty or overlong name or ID).
    #[error("{0}")]
    Invalid(String),
    /// No alarm with this ID that the caller may acknowledge is held here:
    /// never raised, cleared long ago, held by another engine, or not on
    /// the caller's wards (told apart from none, so a station cannot learn
    /// of another ward's alarms).
    #[error(
        "no alarm {0:?} that you may acknowledge is held by this engine (not raised here, cleared long ago, or not on your wards)"
    )]
    Unknown(String),
    /// The alarm has cleared: there is nothing left to acknowledge.
    #[error("alarm {id:?} cleared at {cleared_ms} (Unix ms): nothing to acknowledge")]
    Cleared {
        /// The alarm.
        id: String,
        /// When it cleared.
        cleared_ms: u64,
    },
    /// Somebody acknowledged it first.
    #[error("alarm {id:?} was already acknowledged by {by} at {at_ms} (Unix ms)")]
    AlreadyAcknowledged {
        /// The alarm.
        id: String,
        /// Who.
        by: String,
        /// When.
        at_ms: u64,
    },
    /// Too many acknowledgements are waiting; retry shortly.
    #[error("the alert engine is busy; retry shortly")]
    Busy,
    /// The engine is not running (stopping, or failed).
    #[error("the alert engine is not running")]
    Unavailable,
}

impl AckRefusal {
    /// A label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            AckRefusal::Invalid(_) => "invalid",
            AckRefusal::Unknown(_) => "unknown",
            AckRefusal::Cleared { .. } => "cleared",
            AckRefusal::AlreadyAcknowledged { .. } => "already_acknowledged",
            AckRefusal::Busy => "busy",
            AckRefusal::Unavailable => "unavailable",
        }
    }

    /// A short code for clients (`"code"` of the error body).
    pub fn code(&self) -> &'static str {
        match self {
            AckRefusal::Invalid(_) => "invalid",
            AckRefusal::Unknown(_) => "unknown",
            AckRefusal::Cleared { .. } => "cleared",
            AckRefusal::AlreadyAcknowledged { .. } => "already-acknowledged",
            AckRefusal::Busy => "busy",
            AckRefusal::Unavailable => "unavailable",
        }
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            AckRefusal::Invalid(_) => 400,
            AckRefusal::Unknown(_) => 404,
            AckRefusal::Cleared { .. } | AckRefusal::AlreadyAcknowledged { .. } => 409,
            AckRefusal::Busy | AckRefusal::Unavailable => 503,
        }
    }
}

/// The answer to one request.
pub type AckResult = std::result::Result<Event, AckRefusal>;

/// One acknowledgement on its way to the stage.
#[derive(Debug)]
pub struct AckRequest {
    /// The alarm ID.
    pub id: String,
    /// Who.
    pub actor: Actor,
    /// Where the answer goes, once durable.
    pub reply: oneshot::Sender<AckResult>,
}

/// The sending side, for the HTTP server (cheap to clone).
#[derive(Debug, Clone)]
pub struct AckHandle(mpsc::Sender<AckRequest>);

/// The receiving side, for the stage (`StageConfig::acks`).
#[derive(Debug)]
pub struct AckInbox(pub(crate) mpsc::Receiver<AckRequest>);

/// A bounded inbox of [`INBOX`] requests.
pub fn inbox() -> (AckHandle, AckInbox) {
    let (tx, rx) = mpsc::channel(INBOX);
    (AckHandle(tx), AckInbox(rx))
}

impl AckHandle {
    /// Acknowledge alarm `id` as `actor`; answers once the event is
    /// durable, or why not.
    pub async fn acknowledge(&self, id: &str, actor: Actor) -> AckResult {
        if id.is_empty() || id.len() > 1024 {
            return Err(AckRefusal::Invalid("an alarm ID is 1-1024 bytes".into()));
        }
        let (reply, answer) = oneshot::channel();
        let req = AckRequest {
            id: id.to_owned(),
            actor,
            reply,
        };
        match self.0.try_send(req) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(AckRefusal::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(AckRefusal::Unavailable),
        }
        // Dropped unanswered: the stage stopped (or failed to persist,
        // which stops it) before the event was durable.
        answer.await.unwrap_or(Err(AckRefusal::Unavailable))
    }
}

impl AckInbox {
    /// Wait for a request (never, once every handle is gone).
    pub(crate) async fn recv(&mut self) -> Option<AckRequest> {
        self.0.recv().await
    }

    /// Up to [`PER_ROUND`] waiting requests, `first` included.
    pub(crate) fn drain(&mut self, first: AckRequest) -> Vec<AckRequest> {
        let mut out = vec![first];
        while out.len() < PER_ROUND {
            match self.0.try_recv() {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        out
    }

    /// Waiting requests, at most [`PER_ROUND`], without waiting.
    pub(crate) fn take_waiting(&mut self) -> Vec<AckRequest> {
        match self.0.try_recv() {
            Ok(first) => self.drain(first),
            Err(_) => Vec::new(),
        }
    }
}
