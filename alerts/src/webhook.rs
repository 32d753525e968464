//! Webhooks (`[[alerts.webhooks]]`): each alarm event as an HTTP POST of a
//! FHIR R4 `Communication` ([`crate::fhir::communication`]), signed with
//! HMAC-SHA256 over the body (`docs/alerts.md` §Webhooks).
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::delivery::{SendError, Sink};
use crate::engine::Event;
use crate::error::{Error, Result};
use crate::fhir;

/// The header carrying the body's signature: `sha256=<64 hex digits>`.
pub const SIGNATURE_HEADER: &str = "X-Vitaltrail-Signature";
/// The header carrying the event's key (also in the signed body).
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// The header naming the event's kind.
pub const EVENT_HEADER: &str = "X-Vitaltrail-Event";

/// One `[[alerts.webhooks]]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Its name (letters, digits, `-`, `_`): the name of its cursor, its
    /// dead letters and its metrics label.
    pub name: String,
    /// Where to POST. `https://`, or `http://` to a loopback address only
    /// (alerts name patients and their values).
    pub url: String,
    /// The wards whose events it receives; `"*"`: every event.
    pub wards: Vec<String>,
    /// A file holding the HMAC secret shared with the receiver (at least
    /// 16 bytes, surrounding whitespace ignored). Never in the config
    /// itself, which `config print` shows.
    pub secret_file: PathBuf,
    /// One attempt's time limit (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The first retry's wait (ms); each further one doubles, with jitter.
    #[serde(default = "default_first_backoff_ms")]
    pub first_backoff_ms: u64,
    /// The longest wait between attempts (ms).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_first_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_ms() -> u64 {
    60_000
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("wards", &self.wards)
            .field("secret_file", &self.secret_file)
            .finish_non_exhaustive()
    }
}

/// `scheme://host[:port]` of a URL: never its path or query, which may hold
/// a token.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => "<url>".to_owned(),
        },
        Err(_) => "<url>".to_owned(),
    }
}

/// A channel name: 1-64 of letters, digits, `-` and `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl WebhookConfig {
    /// Refuse what cannot work as meant.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "webhook name {:?}: 1-64 letters, digits, '-' or '_'",
                self.name
            ));
        }
        let url = reqwest::Url::parse(&self.url)
            .map_err(|_| format!("webhook {}: url is not a URL", self.name))?;
        let loopback = match url.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(format!(
                    "webhook {}: {} is plain HTTP to another machine; alerts name patients and their values: use https://",
                    self.name,
                    redact_url(&self.url)
                ));
            }
            s => {
                return Err(format!(
                    "webhook {}: scheme {s:?} is not http(s)",
                    self.name
                ));
            }
        }
        if self.wards.is_empty() || self.wards.iter().any(|w| w.trim() != w || w.is_empty()) {
            return Err(format!(
                "webhook {}: wards must name at least one ward (\"*\" for every event), without surrounding whitespace",
                self.name
            ));
        }
        if self.timeout_ms < 100
            || self.first_backoff_ms < 50
            || self.max_backoff_ms < self.first_backoff_ms
        {
            return Err(format!(
                "webhook {}: timeout_ms must be at least 100, first_backoff_ms at least 50, max_backoff_ms at least first_backoff_ms",
                self.name
            ));
        }
        Ok(())
    }
}

/// The HMAC secret, read from its file. Never shown; zeroed when dropped.
#[derive(Clone)]
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// Read `path`: at least 16 bytes once surrounding whitespace is cut.
    pub fn load(path: &Path) -> Result<Secret> {
        let raw = zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| Error::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?);
        let s = raw.trim_ascii();
        if s.len() < 16 {
            return Err(Error::Setting(format!(
                "{} holds under 16 bytes: too short for a webhook secret",
                path.display()
            )));
        }
        Ok(Secret(zeroize::Zeroizing::new(s.to_vec())))
    }

    /// From bytes (tests).
    pub fn from_bytes(b: &[u8]) -> Secret {
        Secret(zeroize::Zeroizing::new(b.to_vec()))
    }

    /// `sha256=<hex of HMAC-SHA256(secret, body)>`.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// An error with its sources, `: `-joined (reqwest says "error sending
/// request" and puts the reason, refused or TLS, in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The event key as the `Idempotency-Key` header carries it: every byte
/// but ASCII letters, digits and `-._~/:#` percent-encoded (RFC 3986), so
/// any patient ID makes a valid header. The body carries the key as is.
pub fn header_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:#".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A webhook as a delivery channel.
pub struct Webhook {
    name: String,
    url: reqwest::Url,
    secret: Secret,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &redact_url(self.url.as_str()))
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// Build from its configuration (the secret is read now).
    pub fn new(cfg: &WebhookConfig) -> Result<Webhook> {
        cfg.validate().map_err(Error::Setting)?;
        // reqwest is built without a TLS provider of its own: ring, as the
        // rest of the process. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(5_000)))
            // A redirect would send the alert where nobody configured; so
            // would a proxy from the environment (HTTP_PROXY), in the clear.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| Error::Setting(format!("webhook {}: {}", cfg.name, e.without_url())))?;
        Ok(Webhook {
            name: cfg.name.clone(),
            url: reqwest::Url::parse(&cfg.url)
                .map_err(|_| Error::Setting(format!("webhook {}: url is not a URL", cfg.name)))?,
            secret: Secret::load(&cfg.secret_file)?,
            client,
        })
    }

    /// The request body of `event`: its `Communication`, as JSON.
    pub fn body(event: &Event) -> Vec<u8> {
        serde_json::to_vec(&fhir::communication(event)).expect("JSON values serialise")
    }
}

impl Sink for Webhook {
    async fn send(&mut self, event: &Event, _line: &[u8]) -> std::result::Result<(), SendError> {
        let body = Webhook::body(event);
        let mut resp = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
            .header(SIGNATURE_HEADER, self.secret.sign(&body))
            .header(IDEMPOTENCY_HEADER, header_key(&fhir::event_key(event)))
            .header(EVENT_HEADER, event.kind.as_str())
            .body(body)
            .send()
            .await
            .map_err(|e| SendError {
                permanent: e.is_builder(),
                why: format!("webhook {}: {}", self.name, chain(&e.without_url())),
            })?;
        let status = resp.status();
        // Read (a little of) the answer, so the connection is reused.
        let mut read = 0usize;
        while read < 64 * 1024 {
            match resp.chunk().await {
                Ok(Some(c)) => read += c.len(),
                _ => break,
            }
        }
        if status.is_success() {
            return Ok(());
        }
        let code = status.as_u16();
        Err(SendError {
            // The receiver refuses this event for what it is. Any other
            // answer (401, 403, 404: the receiver's own setup; 408, 429;
            // 5xx) holds the channel and is retried: dead-lettering every
            // alarm behind a misconfigured receiver would lose them all.
            permanent: matches!(code, 400 | 413 | 415 | 422),
            why: format!("webhook {}: HTTP {status}", self.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 ("Jefe"): the header is that HMAC, in hex.
    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        let s = Secret::from_bytes(b"Jefe");
        assert_eq!(
            s.sign(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    fn cfg(url: &str) -> WebhookConfig {
        WebhookConfig {
            name: "ehr".into(),
            url: url.into(),
            wards: vec!["ward-3".into()],
            secret_file: "/dev/null".into(),
            timeout_ms: 10_000,
            first_backoff_ms: 500,
            max_backoff_ms: 60_000,
        }
    }

    #[test]
    fn any_event_key_makes_a_valid_header() {
        let k = "news2/Ünal \u{7}x/1-1#raised";
        let h = header_key(k);
        assert_eq!(h, "news2/%C3%9Cnal%20%07x/1-1#raised");
        assert!(reqwest::header::HeaderValue::from_str(&h).is_ok());
        assert_eq!(header_key("news2/p-1/17-1#raised"), "news2/p-1/17-1#raised");
    }

    #[test]
    fn plain_http_only_to_loopback_and_urls_are_redacted() {
        assert_eq!(cfg("https://ehr.example/hook?token=abc").validate(), Ok(()));
        assert_eq!(cfg("http://127.0.0.1:9000/hook").validate(), Ok(()));
        assert_eq!(cfg("http://localhost:9000/hook").validate(), Ok(()));
        assert!(cfg("http://ehr.example/hook").validate().is_err());
        assert!(cfg("ftp://ehr.example/hook").validate().is_err());
        let mut c = cfg("https://ehr.example/hook");
        c.name = "a/b".into();
        assert!(c.validate().is_err());
        let mut c = cfg("https://ehr.example/hook");
        c.wards = vec![];
        assert!(c.validate().is_err());
        let d = format!("{:?}", cfg("https://ehr.example/hook?token=abc"));
        assert!(!d.contains("token"), "{d}");
    }
}
