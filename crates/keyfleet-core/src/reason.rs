//! Why a token was accepted or refused: the stable, machine-readable verdict codes.

use std::fmt;

/// A verification verdict. Mirrors `keyfleet.v1.Reason`; names never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Ok,
    Malformed,
    UnsupportedAlgorithm,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    KeyRevoked,
    TokenRevoked,
    TooLarge,
    /// The node cannot decide (for example its key set is too old): never a valid verdict.
    Unavailable,
    /// The token's session (`sid`) was ended (logout, revoke-all, refresh-token reuse).
    SessionRevoked,
    /// The caller's required scopes are not all in the token's `scope`.
    InsufficientScope,
    /// The login behind the token (`auth_time`) is older than the caller allows, or unknown.
    LoginTooOld,
}

impl Reason {
    /// Every reason, for metrics that pre-register one series per reason.
    pub const ALL: [Reason; 16] = [
        Reason::Ok,
        Reason::Malformed,
        Reason::UnsupportedAlgorithm,
        Reason::UnknownKid,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongIssuer,
        Reason::WrongAudience,
        Reason::KeyRevoked,
        Reason::TokenRevoked,
        Reason::TooLarge,
        Reason::Unavailable,
        Reason::SessionRevoked,
        Reason::InsufficientScope,
        Reason::LoginTooOld,
    ];

    /// The proto enum name, used in JSON output and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "OK",
            Reason::Malformed => "MALFORMED",
            Reason::UnsupportedAlgorithm => "UNSUPPORTED_ALGORITHM",
            Reason::UnknownKid => "UNKNOWN_KID",
            Reason::BadSignature => "BAD_SIGNATURE",
            Reason::Expired => "EXPIRED",
            Reason::NotYetValid => "NOT_YET_VALID",
            Reason::WrongIssuer => "WRONG_ISSUER",
            Reason::WrongAudience => "WRONG_AUDIENCE",
            Reason::KeyRevoked => "KEY_REVOKED",
            Reason::TokenRevoked => "TOKEN_REVOKED",
            Reason::TooLarge => "TOO_LARGE",
            Reason::Unavailable => "UNAVAILABLE",
            Reason::SessionRevoked => "SESSION_REVOKED",
            Reason::InsufficientScope => "INSUFFICIENT_SCOPE",
            Reason::LoginTooOld => "LOGIN_TOO_OLD",
        }
    }

    /// Parses a proto enum name (as printed by `as_str`).
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
