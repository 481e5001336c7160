//! Compact EdDSA JWTs: minting ([`sign_token`]) and strict validation ([`validate`]).
//!
//! Validation is written here rather than delegated to `jsonwebtoken`: measured on these
//! machines, jsonwebtoken 12 verifies EdDSA non-strictly, accepts weak public keys, keeps the
//! last of duplicate claims, ignores `iat` and checks `nbf` only when asked (see
//! ARCHITECTURE.md). Each rule below is one line of the design's "Verification rules".

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::UnixSeconds;
use crate::jwk::KeySet;
use crate::reason::Reason;
use crate::strict_json::parse_object;

/// Latest accepted time claim: 9999-12-31T23:59:59Z.
const MAX_TIME: f64 = 253_402_300_799.0;

/// The node's verification policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `iss` must equal this exactly.
    pub issuer: String,
    /// The audiences the node guards: `aud` must name at least one of them (Envoy jwt_authn's
    /// rule). Empty means any audience; a verifier leaves it empty only when its operator chose
    /// `--any-audience`.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway: i64,
    /// Tokens longer than this are refused before any decoding.
    pub max_token_bytes: usize,
    /// When set, `exp - iat` (or `exp - now` without `iat`) may not exceed it.
    pub max_lifetime: Option<i64>,
}

/// Clock skew allowed on `exp`, `nbf` and `iat` unless configured otherwise (`--leeway`), in
/// seconds. The authority keeps a retiring key published `token_ttl` + this long.
pub const DEFAULT_LEEWAY_SECS: i64 = 60;
/// Tokens longer than this are refused before any decoding unless configured otherwise
/// (`--max-token-bytes`); the authority refuses to mint one longer.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;

impl Policy {
    /// A policy with the design's defaults for `issuer`.
    pub fn new(issuer: impl Into<String>) -> Policy {
        Policy {
            issuer: issuer.into(),
            audiences: Vec::new(),
            leeway: DEFAULT_LEEWAY_SECS,
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            max_lifetime: None,
        }
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub kid: String,
    pub subject: String,
    pub issuer: String,
    pub expires_at: UnixSeconds,
    pub jti: String,
    pub claims: Map<String, Value>,
}

/// A refusal: the verdict and a short explanation for humans (never containing key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The token's `kid`, when the header got that far.
    pub kid: Option<String>,
    pub detail: String,
}

fn refuse(reason: Reason, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        kid: None,
        detail: detail.into(),
    }
}

/// Claims to mint. Custom claims may not use registered names.
#[derive(Debug, Clone, Serialize)]
pub struct TokenClaims {
    pub iss: String,
    pub sub: String,
    /// One audience is written as a string, several as an array.
    pub aud: Vec<String>,
    pub iat: UnixSeconds,
    pub nbf: UnixSeconds,
    pub exp: UnixSeconds,
    pub jti: String,
    pub extra: Map<String, Value>,
}

/// Claim names a caller may not set as custom claims.
pub const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// Signs `claims` with `key` under `kid`: header `{"alg":"EdDSA","kid":…,"typ":"JWT"}`.
pub fn sign_token(key: &SigningKey, kid: &str, claims: &TokenClaims) -> String {
    let header = serde_json::json!({ "alg": "EdDSA", "kid": kid, "typ": "JWT" });
    let mut body = claims.extra.clone();
    body.retain(|k, _| !REGISTERED_CLAIMS.contains(&k.as_str()));
    body.insert("iss".into(), claims.iss.clone().into());
    body.insert("sub".into(), claims.sub.clone().into());
    match claims.aud.as_slice() {
        [] => {}
        [one] => {
            body.insert("aud".into(), one.clone().into());
        }
        many => {
            body.insert("aud".into(), many.to_vec().into());
        }
    }
    body.insert("iat".into(), claims.iat.into());
    body.insert("nbf".into(), claims.nbf.into());
    body.insert("exp".into(), claims.exp.into());
    body.insert("jti".into(), claims.jti.clone().into());
    let mut out = String::with_capacity(256);
    URL_SAFE_NO_PAD.encode_string(header.to_string(), &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(Value::Object(body).to_string(), &mut out);
    let signature = key.sign(out.as_bytes());
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut out);
    out
}

/// Validates `token` against `keys` at `now` under `policy`. `audience`, when given by the
/// caller, must be in `aud` too (besides one of the policy's audiences). Never reads the clock;
/// never panics on any input.
pub fn validate(
    token: &str,
    keys: &KeySet,
    now: UnixSeconds,
    policy: &Policy,
    audience: Option<&str>,
) -> Result<Verified, Refusal> {
    validate_with(token, keys, now, policy, audience, verify_signature)
}

/// [`validate`] with the signature check supplied by the caller (`check(key, signing_input,
/// signature)`), so the verifier's batch path can collect signatures for one Ed25519 batch
/// verification and then validate again with the batch's answer. Every other rule is the same.
pub fn validate_with<'t>(
    token: &'t str,
    keys: &KeySet,
    now: UnixSeconds,
    policy: &Policy,
    audience: Option<&str>,
    check: impl FnOnce(&VerifyingKey, &'t [u8], &[u8]) -> bool,
) -> Result<Verified, Refusal> {
    // Size before anything else, so a huge token costs a length check.
    if token.len() > policy.max_token_bytes {
        return Err(refuse(
            Reason::TooLarge,
            format!("token longer than {} bytes", policy.max_token_bytes),
        ));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            Reason::Malformed,
            "a JWT has exactly three dot-separated segments",
        ));
    };
    // Every segment is decoded up front, so a token that is not three unpadded base64url
    // segments is MALFORMED whatever its kid; decoding is cheap and trusts nothing.
    let header = decode_segment(h64, "header")?;
    let claims = decode_segment(c64, "claims")?;
    let sig = decode_segment(s64, "signature")?;
    let header =
        parse_object(&header).map_err(|e| refuse(Reason::Malformed, format!("header: {e}")))?;

    let kid = check_header(&header)?;
    let with_kid = |mut r: Refusal| {
        r.kid = Some(kid.to_owned());
        r
    };
    if keys.is_key_revoked(kid) {
        return Err(with_kid(refuse(
            Reason::KeyRevoked,
            "the signing key was revoked",
        )));
    }
    let Some(key) = keys.key(kid) else {
        let why = if keys.is_ambiguous(kid) {
            "two different keys claim this kid"
        } else {
            "no such kid in the key set"
        };
        return Err(with_kid(refuse(Reason::UnknownKid, why)));
    };

    // Signature before any claim is trusted (or even parsed).
    let signing_input = &token.as_bytes()[..h64.len() + 1 + c64.len()];
    if !check(key, signing_input, &sig) {
        return Err(with_kid(refuse(
            Reason::BadSignature,
            "signature does not verify",
        )));
    }

    let claims = parse_object(&claims)
        .map_err(|e| with_kid(refuse(Reason::Malformed, format!("claims: {e}"))))?;
    check_claims(kid, claims, keys, now, policy, audience).map_err(with_kid)
}

/// What a caller may demand of a valid token beyond the node's policy, per request: scopes
/// (`VerifyRequest.required_scopes`) and a recent login (`max_auth_age_seconds`). Checked after
/// [`validate`] accepted the token (and after a cache hit), so a cached verdict never stands
/// for another request's demands.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demands<'a> {
    /// Each must be in the token's space-separated `scope` claim (RFC 9068).
    pub required_scopes: &'a [String],
    /// When > 0, `now - auth_time` may not exceed it, and `auth_time` must be present.
    pub max_auth_age: i64,
}

impl Demands<'_> {
    /// True when nothing is demanded (the common case: no claim needs looking at).
    pub fn is_empty(&self) -> bool {
        self.required_scopes.is_empty() && self.max_auth_age <= 0
    }
}

/// Checks `demands` against a valid token's claims at `now`: INSUFFICIENT_SCOPE or
/// LOGIN_TOO_OLD (with the RFC 9470 hint `max_age=N` in the detail), else `Ok`.
pub fn check_demands(
    claims: &Map<String, Value>,
    demands: &Demands<'_>,
    now: UnixSeconds,
) -> Result<(), Refusal> {
    if !demands.required_scopes.is_empty() {
        let granted = match claims.get("scope") {
            Some(Value::String(s)) => s.as_str(),
            _ => "",
        };
        if let Some(missing) = demands.required_scopes.iter().find(|wanted| {
            !granted
                .split(' ')
                .any(|g| !g.is_empty() && g == wanted.as_str())
        }) {
            return Err(refuse(
                Reason::InsufficientScope,
                format!(
                    "scope \"{}\" is not granted to this token",
                    crate::label::escape_untrusted(missing)
                ),
            ));
        }
    }
    if demands.max_auth_age > 0 {
        let max = demands.max_auth_age;
        let auth_time = match claims.get("auth_time") {
            Some(Value::Number(n)) => n.as_f64().filter(|t| t.is_finite()),
            _ => None,
        };
        let Some(auth_time) = auth_time else {
            return Err(refuse(
                Reason::LoginTooOld,
                format!("the token has no auth_time; log in again (max_age={max})"),
            ));
        };
        if now as f64 - auth_time > max as f64 {
            return Err(refuse(
                Reason::LoginTooOld,
                format!("the login is older than {max} s; log in again (max_age={max})"),
            ));
        }
    }
    Ok(())
}

/// The one signature check: strict Ed25519 (canonical `S`, no small-order `R` or weak key).
pub fn verify_signature(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .is_ok()
}

fn decode_segment(segment: &str, what: &str) -> Result<Vec<u8>, Refusal> {
    // The base64 engine refuses padding, whitespace, other alphabets and non-zero trailing bits.
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        refuse(
            Reason::Malformed,
            format!("{what} is not unpadded base64url"),
        )
    })
}

fn check_header(header: &Map<String, Value>) -> Result<&str, Refusal> {
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "EdDSA" || alg == "Ed25519" => {}
        Some(Value::String(alg)) => {
            return Err(refuse(
                Reason::UnsupportedAlgorithm,
                format!("alg {alg:?} is not EdDSA"),
            ));
        }
        _ => return Err(refuse(Reason::Malformed, "header has no string alg")),
    }
    for refused in ["crit", "b64", "zip", "enc"] {
        if header.contains_key(refused) {
            return Err(refuse(
                Reason::Malformed,
                format!("header {refused:?} is not supported"),
            ));
        }
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => {}
        Some(_) => return Err(refuse(Reason::Malformed, "typ must be JWT")),
    }
    if header
        .get("cty")
        .is_some_and(|c| c.as_str().is_some_and(|c| c.eq_ignore_ascii_case("JWT")))
    {
        return Err(refuse(
            Reason::Malformed,
            "nested JWTs (cty JWT) are not accepted",
        ));
    }
    // jwk, jku, x5u and x5c are never consulted: keys come only from the key set.
    match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid),
        _ => Err(refuse(Reason::Malformed, "header has no kid")),
    }
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() && (0.0..=MAX_TIME).contains(&t) => Ok(Some(t)),
            _ => Err(refuse(Reason::Malformed, format!("{name} is out of range"))),
        },
        Some(_) => Err(refuse(Reason::Malformed, format!("{name} is not a number"))),
    }
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<String, Refusal> {
    match claims.get(name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(refuse(Reason::Malformed, format!("{name} is not a string"))),
    }
}

fn check_claims(
    kid: &str,
    claims: Map<String, Value>,
    keys: &KeySet,
    now: UnixSeconds,
    policy: &Policy,
    audience: Option<&str>,
) -> Result<Verified, Refusal> {
    let now_f = now as f64;
    let leeway = policy.leeway as f64;
    let exp =
        time_claim(&claims, "exp")?.ok_or_else(|| refuse(Reason::Malformed, "exp is required"))?;
    let nbf = time_claim(&claims, "nbf")?;
    let iat = time_claim(&claims, "iat")?;
    let iss = string_claim(&claims, "iss")?;
    let sub = string_claim(&claims, "sub")?;
    let jti = string_claim(&claims, "jti")?;
    let aud: Vec<&str> = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| refuse(Reason::Malformed, "aud holds a non-string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(refuse(
                Reason::Malformed,
                "aud is neither a string nor an array",
            ));
        }
    };

    if now_f >= exp + leeway {
        return Err(refuse(Reason::Expired, "token has expired"));
    }
    if nbf.is_some_and(|nbf| now_f + leeway < nbf) {
        return Err(refuse(Reason::NotYetValid, "nbf is in the future"));
    }
    if iat.is_some_and(|iat| now_f + leeway < iat) {
        return Err(refuse(Reason::NotYetValid, "iat is in the future"));
    }
    if let Some(max) = policy.max_lifetime
        && exp - iat.unwrap_or(now_f) > max as f64
    {
        return Err(refuse(Reason::Malformed, "lifetime exceeds --max-lifetime"));
    }
    if iss != policy.issuer {
        return Err(refuse(
            Reason::WrongIssuer,
            "iss does not match the expected issuer",
        ));
    }
    if !policy.audiences.is_empty() && !policy.audiences.iter().any(|a| aud.contains(&a.as_str())) {
        return Err(refuse(
            Reason::WrongAudience,
            "aud names none of the audiences this node guards",
        ));
    }
    if let Some(wanted) = audience
        && !aud.contains(&wanted)
    {
        return Err(refuse(
            Reason::WrongAudience,
            "aud does not name the audience the caller asked for",
        ));
    }
    if !jti.is_empty() && keys.is_token_revoked(&jti, now) {
        return Err(refuse(Reason::TokenRevoked, "this token was revoked"));
    }
    match claims.get("sid") {
        None => {}
        Some(Value::String(sid)) if keys.is_session_revoked(sid, now) => {
            return Err(refuse(
                Reason::SessionRevoked,
                "the token's session was ended (logout, revocation or a reused refresh token)",
            ));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(refuse(Reason::Malformed, "sid is not a string")),
    }
    Ok(Verified {
        kid: kid.to_owned(),
        subject: sub,
        issuer: iss,
        expires_at: exp.floor() as UnixSeconds,
        jti,
        claims,
    })
}
