//! keyfleet's domain: the JWK/JWKS model, strict EdDSA JWT validation and the key ring's
//! lifecycle state machine.
//!
//! Architecture invariant: this crate does no I/O and never reads the clock. Every function
//! that depends on time takes `now` (Unix seconds) as a parameter, so the whole lifecycle can be
//! driven through any timeline in tests.

pub mod jwk;
pub mod label;
pub mod reason;
pub mod ring;
pub mod strict_json;
pub mod token;

pub use jwk::{Jwk, JwksDocument, JwksError, KeySet, RejectedKey, parse_jwks};
pub use label::{escape_untrusted, is_valid_label};
pub use reason::Reason;
pub use ring::{
    DEFAULT_PUBLISH_AHEAD_SECS, DEFAULT_ROTATION_PERIOD_SECS, DEFAULT_TOKEN_TTL_SECS, KeyRecord,
    KeyRing, KeyState, NewKey, RingError, RingPolicy,
};
pub use token::{
    DEFAULT_LEEWAY_SECS, DEFAULT_MAX_TOKEN_BYTES, Demands, Policy, TokenClaims, Verified,
    check_demands, sign_token, validate, validate_with,
};

/// Unix time in whole seconds, the unit of every JWT time claim.
pub type UnixSeconds = i64;
