//! Bearer tokens and the origin rule of the HTTP endpoints, without I/O.
//!
//! A token is 32 random bytes as 64 lowercase hex digits. The node keeps
//! each in a mode-0600 file of the data directory (`keys/sql.token`,
//! `keys/metrics.token`); whoever can read the file may use the endpoint.
//! Tokens are compared in constant time and never appear in `Debug` output.

use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq as _;

/// A bearer token (secret).
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A browser page of another origin sent it (HTTP 403).
    CrossOrigin,
    /// No token, or the wrong one (HTTP 401).
    Unauthenticated,
}

impl Refusal {
    /// The HTTP status code to answer with.
    pub fn status(self) -> u16 {
        match self {
            Refusal::CrossOrigin => 403,
            Refusal::Unauthenticated => 401,
        }
    }

    /// What to tell the caller.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::CrossOrigin => "cross-origin requests are refused",
            Refusal::Unauthenticated => {
                "missing or wrong bearer token (Authorization: Bearer <token>)"
            }
        }
    }
}

impl Token {
    /// A new random token.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Token {
        let mut raw = [0u8; 32];
        rng.fill_bytes(&mut raw);
        Token(raw.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A token from its text (at least 32 printable ASCII characters).
    pub fn parse(s: &str) -> Result<Token, &'static str> {
        if s.len() < 32 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token must be at least 32 printable ASCII characters");
        }
        Ok(Token(s.to_owned()))
    }

    /// The token's text, to store or to send as `Authorization: Bearer <token>`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value carries this token.
    pub fn matches_header(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(bearer) else {
            return false;
        };
        given.len() == self.0.len() && bool::from(given.ct_eq(self.0.as_bytes()))
    }

    /// The checks of every authenticated endpoint, in order: the request
    /// is not from a browser page of another origin (an `Origin` header,
    /// when present, must be `http://<Host>` or `https://<Host>`; requests
    /// without one come from scripts, not pages), then it carries the token.
    pub fn authorize(
        &self,
        origin: Option<&[u8]>,
        host: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        if let Some(o) = origin {
            let same = host.is_some_and(|h| {
                [&b"http://"[..], b"https://"]
                    .iter()
                    .any(|scheme| o.strip_prefix(*scheme) == Some(h))
            });
            if !same {
                return Err(Refusal::CrossOrigin);
            }
        }
        if !self.matches_header(authorization) {
            return Err(Refusal::Unauthenticated);
        }
        Ok(())
    }
}

/// The credentials of an `Authorization: Bearer <token>` header value (the
/// scheme's name is case-insensitive, RFC 9110 §11.1).
pub fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_redacted_and_checked_exactly() {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([7; 32]);
        use rand_core::SeedableRng as _;
        let t = Token::generate(&mut rng);
        assert_eq!(t.expose().len(), 64);
        assert_ne!(t.expose(), Token::generate(&mut rng).expose());
        assert!(!format!("{t:?}").contains(t.expose()));
        let good = format!("Bearer {}", t.expose());
        assert!(t.matches_header(Some(good.as_bytes())));
        let lower = format!("bearer {}", t.expose());
        assert!(
            t.matches_header(Some(lower.as_bytes())),
            "the scheme is case-insensitive"
        );
        assert!(!t.matches_header(Some(t.expose().as_bytes())), "no scheme");
        assert!(!t.matches_header(None));
        assert!(!t.matches_header(Some(t.expose().as_bytes())));
        assert!(!t.matches_header(Some(&good.as_bytes()[..good.len() - 1])));
        let mut wrong = good.clone().into_bytes();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(!t.matches_header(Some(&wrong)));
        assert!(Token::parse("short").is_err());
        assert_eq!(Token::parse(t.expose()).unwrap().expose(), t.expose());
    }

    #[test]
    fn origin_rule() {
        let t = Token::parse(&"a".repeat(64)).unwrap();
        let auth = format!("Bearer {}", "a".repeat(64));
        let a = Some(auth.as_bytes());
        let h = Some(&b"127.0.0.1:9464"[..]);
        assert_eq!(t.authorize(None, h, a), Ok(()));
        assert_eq!(t.authorize(Some(b"http://127.0.0.1:9464"), h, a), Ok(()));
        for o in [
            &b"http://evil.example"[..],
            b"null",
            b"http://127.0.0.1:9465",
            b"http://127.0.0.1:9464.evil",
        ] {
            assert_eq!(t.authorize(Some(o), h, a), Err(Refusal::CrossOrigin));
        }
        assert_eq!(
            t.authorize(Some(b"http://127.0.0.1:9464"), None, a),
            Err(Refusal::CrossOrigin)
        );
        assert_eq!(t.authorize(None, h, None), Err(Refusal::Unauthenticated));
    }
}
