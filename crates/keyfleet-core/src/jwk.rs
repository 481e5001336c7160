//! The JWK/JWKS model (RFC 7517, RFC 8037 `OKP`/`Ed25519`) and the verifier's key set.
//!
//! A [`KeySet`] is built only through [`KeySet::build`], which screens every candidate key:
//! a key that is not a canonical, non-weak Ed25519 public key fit for signature verification
//! is skipped and reported, and the rest still apply.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

use crate::UnixSeconds;

/// One public key as published in a JWKS document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Jwk {
    #[serde(default)]
    pub kty: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crv: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub x: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kid: String,
    #[serde(default, rename = "use", skip_serializing_if = "String::is_empty")]
    pub use_: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alg: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ops: Vec<String>,
    /// A private part: never published, and a key that carries one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
}

impl Jwk {
    /// The public JWK of an Ed25519 key, as the authority publishes it.
    pub fn ed25519(kid: &str, public: &[u8; 32]) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(public),
            kid: kid.into(),
            use_: "sig".into(),
            alg: "EdDSA".into(),
            key_ops: Vec::new(),
            d: None,
        }
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key, used as its `kid`.
pub fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// A JWKS document as parsed by [`parse_jwks`], before screening.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwksDocument {
    pub keys: Vec<Jwk>,
    /// Entries of `keys` that are not JWK objects at all (wrong types, duplicate members).
    pub unparseable: usize,
}

/// Why a JWKS document was refused as a whole (the last good key set then stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a jwks document: {0}")]
pub struct JwksError(String);

/// Parses `{"keys":[...]}` without trusting it: a document that is not a JSON object with a
/// `keys` array (or names `keys` twice) is refused; an entry that is not a JWK object, or that
/// repeats a member, is skipped and counted; screening ([`screen`]) judges the rest. Never
/// panics on any input.
pub fn parse_jwks(body: &[u8]) -> Result<JwksDocument, JwksError> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<crate::strict_json::Tolerant>,
    }
    let doc: Document = serde_json::from_slice(body).map_err(|e| JwksError(e.to_string()))?;
    let mut out = JwksDocument::default();
    for crate::strict_json::Tolerant(entry) in doc.keys {
        match entry.map(serde_json::from_value::<Jwk>) {
            Ok(Ok(jwk)) => out.keys.push(jwk),
            _ => out.unparseable += 1,
        }
    }
    Ok(out)
}

/// Why a candidate key was left out of a key set. Bounded: used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectedKey {
    /// Not a JWK object at all (see [`JwksDocument::unparseable`]).
    Unparseable,
    NotOkpEd25519,
    MissingKid,
    BadEncoding,
    WeakKey,
    PrivatePart,
    WrongUse,
    DuplicateKid,
}

impl RejectedKey {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectedKey::Unparseable => "unparseable",
            RejectedKey::NotOkpEd25519 => "not_okp_ed25519",
            RejectedKey::MissingKid => "missing_kid",
            RejectedKey::BadEncoding => "bad_encoding",
            RejectedKey::WeakKey => "weak_key",
            RejectedKey::PrivatePart => "private_part",
            RejectedKey::WrongUse => "wrong_use",
            RejectedKey::DuplicateKid => "duplicate_kid",
        }
    }
}

/// Screens one JWK: `Ok` only for a canonical, non-weak Ed25519 key fit for verifying.
pub fn screen(jwk: &Jwk) -> Result<VerifyingKey, RejectedKey> {
    if jwk.d.is_some() {
        return Err(RejectedKey::PrivatePart);
    }
    if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
        return Err(RejectedKey::NotOkpEd25519);
    }
    if jwk.kid.is_empty() {
        return Err(RejectedKey::MissingKid);
    }
    let use_ok = jwk.use_.is_empty() || jwk.use_ == "sig";
    let alg_ok = jwk.alg.is_empty() || jwk.alg == "EdDSA" || jwk.alg == "Ed25519";
    let ops_ok = jwk.key_ops.is_empty() || jwk.key_ops.iter().any(|op| op == "verify");
    if !(use_ok && alg_ok && ops_ok) {
        return Err(RejectedKey::WrongUse);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(jwk.x.as_bytes())
        .map_err(|_| RejectedKey::BadEncoding)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| RejectedKey::BadEncoding)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| RejectedKey::BadEncoding)?;
    // A non-canonical encoding (y >= p, or a negative zero x) decodes to a point whose
    // canonical encoding differs. `VerifyingKey::to_bytes` returns the bytes it was given, so
    // compare against a fresh compression of the decoded point.
    if key.to_edwards().compress().to_bytes() != bytes {
        return Err(RejectedKey::BadEncoding);
    }
    if key.is_weak() {
        return Err(RejectedKey::WeakKey);
    }
    Ok(key)
}

/// The keys and deny lists a verifier checks tokens against. Immutable once built; a new
/// snapshot builds a new set.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    /// Source version (the authority's JWKS version; 0 for an HTTP JWKS).
    pub version: u64,
    /// The issuer the source announced, if any.
    pub issuer: Option<String>,
    keys: HashMap<String, VerifyingKey>,
    /// Kids that two different keys claimed: unusable.
    ambiguous: HashSet<String>,
    revoked_kids: HashSet<String>,
    revoked_tokens: HashMap<String, UnixSeconds>,
    /// Ended sessions (`sid` → until): their access tokens are refused with SESSION_REVOKED.
    revoked_sessions: HashMap<String, UnixSeconds>,
}

impl KeySet {
    /// Screens `jwks` into a key set. Returns the set and every key that was left out.
    pub fn build<'a>(
        version: u64,
        issuer: Option<String>,
        jwks: impl IntoIterator<Item = &'a Jwk>,
        revoked_kids: impl IntoIterator<Item = String>,
        revoked_tokens: impl IntoIterator<Item = (String, UnixSeconds)>,
    ) -> (KeySet, Vec<(String, RejectedKey)>) {
        let mut set = KeySet {
            version,
            issuer,
            revoked_kids: revoked_kids.into_iter().collect(),
            revoked_tokens: revoked_tokens.into_iter().collect(),
            ..KeySet::default()
        };
        let mut rejected = Vec::new();
        for jwk in jwks {
            match screen(jwk) {
                Ok(key) => {
                    if set.ambiguous.contains(&jwk.kid) {
                        continue;
                    }
                    if let Some(existing) = set.keys.get(&jwk.kid) {
                        if *existing != key {
                            set.keys.remove(&jwk.kid);
                            set.ambiguous.insert(jwk.kid.clone());
                            rejected.push((jwk.kid.clone(), RejectedKey::DuplicateKid));
                        }
                        continue;
                    }
                    set.keys.insert(jwk.kid.clone(), key);
                }
                Err(why) => rejected.push((jwk.kid.clone(), why)),
            }
        }
        (set, rejected)
    }

    /// The set with `revoked_sessions` (`sid`, until) as its session deny list.
    pub fn with_revoked_sessions(
        mut self,
        revoked_sessions: impl IntoIterator<Item = (String, UnixSeconds)>,
    ) -> KeySet {
        self.revoked_sessions = revoked_sessions.into_iter().collect();
        self
    }

    pub fn key(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }
    pub fn is_key_revoked(&self, kid: &str) -> bool {
        self.revoked_kids.contains(kid)
    }
    pub fn is_ambiguous(&self, kid: &str) -> bool {
        self.ambiguous.contains(kid)
    }
    /// True while `jti` is on the deny list at `now`.
    pub fn is_token_revoked(&self, jti: &str, now: UnixSeconds) -> bool {
        self.revoked_tokens
            .get(jti)
            .is_some_and(|until| now <= *until)
    }
    /// True while session `sid` is on the deny list at `now`.
    pub fn is_session_revoked(&self, sid: &str, now: UnixSeconds) -> bool {
        !self.revoked_sessions.is_empty()
            && self
                .revoked_sessions
                .get(sid)
                .is_some_and(|until| now <= *until)
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
    pub fn revoked_kids(&self) -> impl Iterator<Item = &str> {
        self.revoked_kids.iter().map(String::as_str)
    }
    pub fn revoked_tokens(&self) -> impl Iterator<Item = (&str, UnixSeconds)> {
        self.revoked_tokens.iter().map(|(j, u)| (j.as_str(), *u))
    }
    pub fn revoked_sessions(&self) -> impl Iterator<Item = (&str, UnixSeconds)> {
        self.revoked_sessions.iter().map(|(s, u)| (s.as_str(), *u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Jwk {
        Jwk::ed25519(
            "k1",
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32])
                .verifying_key()
                .to_bytes(),
        )
    }

    #[test]
    fn screens_keys() {
        let identity = {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        };
        let cases: Vec<(Jwk, Result<(), RejectedKey>)> = vec![
            (good(), Ok(())),
            (
                Jwk {
                    d: Some("x".into()),
                    ..good()
                },
                Err(RejectedKey::PrivatePart),
            ),
            (
                Jwk {
                    kty: "EC".into(),
                    ..good()
                },
                Err(RejectedKey::NotOkpEd25519),
            ),
            (
                Jwk {
                    crv: "X25519".into(),
                    ..good()
                },
                Err(RejectedKey::NotOkpEd25519),
            ),
            (
                Jwk {
                    kid: String::new(),
                    ..good()
                },
                Err(RejectedKey::MissingKid),
            ),
            (
                Jwk {
                    use_: "enc".into(),
                    ..good()
                },
                Err(RejectedKey::WrongUse),
            ),
            (
                Jwk {
                    alg: "RS256".into(),
                    ..good()
                },
                Err(RejectedKey::WrongUse),
            ),
            (
                Jwk {
                    key_ops: vec!["sign".into()],
                    ..good()
                },
                Err(RejectedKey::WrongUse),
            ),
            (
                Jwk {
                    x: "AAAA".into(),
                    ..good()
                },
                Err(RejectedKey::BadEncoding),
            ),
            (
                Jwk {
                    x: "!!".into(),
                    ..good()
                },
                Err(RejectedKey::BadEncoding),
            ),
            (
                Jwk {
                    x: URL_SAFE_NO_PAD.encode(identity),
                    ..good()
                },
                Err(RejectedKey::WeakKey),
            ),
        ];
        for (jwk, want) in cases {
            assert_eq!(screen(&jwk).map(|_| ()), want, "{jwk:?}");
        }
    }

    #[test]
    fn two_keys_under_one_kid_make_it_unusable() {
        let other = Jwk::ed25519(
            "k1",
            &ed25519_dalek::SigningKey::from_bytes(&[8; 32])
                .verifying_key()
                .to_bytes(),
        );
        let keys = [good(), other, good()];
        let (set, rejected) = KeySet::build(1, None, &keys, [], []);
        assert!(set.key("k1").is_none());
        assert!(set.is_ambiguous("k1"));
        assert_eq!(rejected, vec![("k1".to_owned(), RejectedKey::DuplicateKid)]);
    }
}
