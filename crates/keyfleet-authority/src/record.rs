//! What `keyring.json` holds: [`RingRecord`], the authority's own versioned layout of the ring
//! and its private keys, converted to and from `keyfleet_core::KeyRing` here and nowhere else.
//!
//! The domain crate's types carry no promise about the disk: a field added to `KeyRing` breaks
//! the build here (the conversions destructure it) until this file decides how to save it. To
//! change the layout, add a format (keep reading the older ones) rather than editing `*V1`.
//!
//! Format 1, the layout of every ring written so far (files without a `format` field are read
//! as format 1):
//! `{"format":1,"sealed":bool,"ring":{"policy":{…},"version":…,"keys":[…],"revoked_kids":{…},
//! "revoked_records":{…} (omitted when empty),"revoked_tokens":{…},"rotation_pending":bool,
//! "rotations":…},"private_keys":{kid: base64 seed, or base64 nonce ‖ sealed seed}}`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{KeyRecord, KeyRing, KeyState, RingPolicy, UnixSeconds};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use crate::kek::Kek;
use crate::keys::{RingState, SecretKey};

/// The format this build writes.
const FORMAT: u32 = 1;

/// Why a ring file's content cannot be used; the ring file adds its path.
#[derive(Debug)]
pub(crate) enum RecordError {
    /// Not a ring this build can read, or inconsistent (the detail says what).
    Corrupt(String),
    /// Sealed, and no KEK was given.
    Sealed,
    /// Not sealed, and a KEK was given.
    NotSealed,
    /// A private key does not open with the given KEK.
    WrongKek,
}

/// The whole file.
#[derive(Serialize, Deserialize)]
pub(crate) struct RingRecord {
    #[serde(default = "format_1")]
    format: u32,
    /// Whether `private_keys` are sealed with a KEK (nonce ‖ XChaCha20-Poly1305 ciphertext).
    sealed: bool,
    ring: RingV1,
    /// kid → base64 of the 32-byte seed, or of the sealed seed.
    private_keys: Seeds,
}

fn format_1() -> u32 {
    1
}

/// Read first, to refuse a format from a newer build by its number rather than by whatever
/// field it no longer has.
#[derive(Deserialize)]
struct Header {
    #[serde(default = "format_1")]
    format: u32,
}

/// The private keys as written; wiped when dropped (the strings are, or seal, seeds).
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
struct Seeds(BTreeMap<String, String>);

impl Drop for Seeds {
    fn drop(&mut self) {
        self.0.values_mut().for_each(|seed| seed.zeroize());
    }
}

impl RingRecord {
    /// The record of `state`, its private keys sealed with `kek` when there is one.
    pub(crate) fn new(
        state: &RingState,
        kek: Option<&Kek>,
    ) -> Result<RingRecord, getrandom::Error> {
        let mut private_keys = Seeds::default();
        for kid in state.ring.signing_capable() {
            let Some(key) = state.keys.get(kid) else {
                continue;
            };
            let seed = key.seed();
            let encoded = match kek {
                Some(kek) => {
                    let mut nonce = [0u8; 24];
                    getrandom::fill(&mut nonce)?;
                    STANDARD.encode(kek.seal(kid, &seed[..], nonce))
                }
                None => STANDARD.encode(&seed[..]),
            };
            private_keys.0.insert(kid.to_owned(), encoded);
        }
        Ok(RingRecord {
            format: FORMAT,
            sealed: kek.is_some(),
            ring: RingV1::from(&state.ring),
            private_keys,
        })
    }

    /// The file's bytes.
    pub(crate) fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("the key ring serializes"))
    }

    /// Parses a file of any format this build reads. Checks nothing beyond the layout.
    pub(crate) fn parse(bytes: &[u8]) -> Result<RingRecord, RecordError> {
        let corrupt = |e: serde_json::Error| RecordError::Corrupt(e.to_string());
        let header: Header = serde_json::from_slice(bytes).map_err(corrupt)?;
        if header.format != FORMAT {
            return Err(RecordError::Corrupt(format!(
                "unknown format {}",
                header.format
            )));
        }
        serde_json::from_slice(bytes).map_err(corrupt)
    }

    /// The ring and its private keys, opened with `kek` when the record is sealed, after
    /// checking that the ring is consistent and every key matches its kid.
    pub(crate) fn open(self, kek: Option<&Kek>) -> Result<RingState, RecordError> {
        let corrupt = RecordError::Corrupt;
        let RingRecord {
            sealed,
            ring,
            private_keys,
            ..
        } = self;
        match (sealed, kek) {
            (true, None) => return Err(RecordError::Sealed),
            (false, Some(_)) => return Err(RecordError::NotSealed),
            _ => {}
        }
        let ring = KeyRing::from(ring);
        ring.check().map_err(|e| corrupt(e.to_string()))?;
        for record in &ring.keys {
            if thumbprint(&record.public) != record.kid {
                return Err(corrupt(format!(
                    "kid {} does not match its public key",
                    record.kid
                )));
            }
        }
        let mut keys = BTreeMap::new();
        for kid in ring.signing_capable() {
            let encoded = private_keys
                .0
                .get(kid)
                .ok_or_else(|| corrupt(format!("the private key of {kid} is missing")))?;
            let raw = Zeroizing::new(
                STANDARD
                    .decode(encoded)
                    .map_err(|_| corrupt(format!("the private key of {kid} is not base64")))?,
            );
            let seed = match kek {
                Some(kek) => kek.open(kid, &raw).ok_or(RecordError::WrongKek)?,
                None => raw,
            };
            let key = SecretKey::from_seed(&seed)
                .ok_or_else(|| corrupt(format!("the private key of {kid} is not 32 bytes")))?;
            let record = ring.get(kid).expect("signing-capable kids are in the ring");
            if key.public() != record.public {
                return Err(corrupt(format!(
                    "the private key of {kid} does not match its public key"
                )));
            }
            keys.insert(kid.to_owned(), key);
        }
        Ok(RingState {
            ring,
            keys,
            revoked_sessions: BTreeMap::new(),
        })
    }
}

// Format 1's types. Field order is the file's order.

#[derive(Serialize, Deserialize)]
struct RingV1 {
    policy: PolicyV1,
    version: u64,
    keys: Vec<KeyV1>,
    revoked_kids: BTreeMap<String, UnixSeconds>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    revoked_records: BTreeMap<String, KeyV1>,
    revoked_tokens: BTreeMap<String, UnixSeconds>,
    rotation_pending: bool,
    #[serde(default)]
    rotations: u64,
}

/// Seconds, as `RingPolicy`.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct PolicyV1 {
    token_ttl: i64,
    leeway: i64,
    rotation_period: i64,
    publish_ahead: i64,
}

#[derive(Serialize, Deserialize)]
struct KeyV1 {
    kid: String,
    state: StateV1,
    /// The Ed25519 public key, as a JSON array of 32 numbers.
    public: [u8; 32],
    created_at: UnixSeconds,
    published_at: UnixSeconds,
    published_version: u64,
    activated_at: Option<UnixSeconds>,
    deactivated_at: Option<UnixSeconds>,
    retire_at: Option<UnixSeconds>,
    revoked_at: Option<UnixSeconds>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StateV1 {
    Next,
    Active,
    Retiring,
    Retired,
    Revoked,
}

impl From<&KeyRing> for RingV1 {
    fn from(ring: &KeyRing) -> RingV1 {
        let KeyRing {
            policy,
            version,
            keys,
            revoked_kids,
            revoked_records,
            revoked_tokens,
            rotation_pending,
            rotations,
        } = ring;
        RingV1 {
            policy: PolicyV1::from(*policy),
            version: *version,
            keys: keys.iter().map(KeyV1::from).collect(),
            revoked_kids: revoked_kids.clone(),
            revoked_records: revoked_records
                .iter()
                .map(|(kid, record)| (kid.clone(), KeyV1::from(record)))
                .collect(),
            revoked_tokens: revoked_tokens.clone(),
            rotation_pending: *rotation_pending,
            rotations: *rotations,
        }
    }
}

impl From<RingV1> for KeyRing {
    fn from(ring: RingV1) -> KeyRing {
        KeyRing {
            policy: ring.policy.into(),
            version: ring.version,
            keys: ring.keys.into_iter().map(KeyRecord::from).collect(),
            revoked_kids: ring.revoked_kids,
            revoked_records: ring
                .revoked_records
                .into_iter()
                .map(|(kid, record)| (kid, record.into()))
                .collect(),
            revoked_tokens: ring.revoked_tokens,
            rotation_pending: ring.rotation_pending,
            rotations: ring.rotations,
        }
    }
}

impl From<RingPolicy> for PolicyV1 {
    fn from(policy: RingPolicy) -> PolicyV1 {
        let RingPolicy {
            token_ttl,
            leeway,
            rotation_period,
            publish_ahead,
        } = policy;
        PolicyV1 {
            token_ttl,
            leeway,
            rotation_period,
            publish_ahead,
        }
    }
}

impl From<PolicyV1> for RingPolicy {
    fn from(policy: PolicyV1) -> RingPolicy {
        RingPolicy {
            token_ttl: policy.token_ttl,
            leeway: policy.leeway,
            rotation_period: policy.rotation_period,
            publish_ahead: policy.publish_ahead,
        }
    }
}

impl From<&KeyRecord> for KeyV1 {
    fn from(key: &KeyRecord) -> KeyV1 {
        let KeyRecord {
            kid,
            state,
            public,
            created_at,
            published_at,
            published_version,
            activated_at,
            deactivated_at,
            retire_at,
            revoked_at,
        } = key;
        KeyV1 {
            kid: kid.clone(),
            state: StateV1::from(*state),
            public: *public,
            created_at: *created_at,
            published_at: *published_at,
            published_version: *published_version,
            activated_at: *activated_at,
            deactivated_at: *deactivated_at,
            retire_at: *retire_at,
            revoked_at: *revoked_at,
        }
    }
}

impl From<KeyV1> for KeyRecord {
    fn from(key: KeyV1) -> KeyRecord {
        KeyRecord {
            kid: key.kid,
            state: key.state.into(),
            public: key.public,
            created_at: key.created_at,
            published_at: key.published_at,
            published_version: key.published_version,
            activated_at: key.activated_at,
            deactivated_at: key.deactivated_at,
            retire_at: key.retire_at,
            revoked_at: key.revoked_at,
        }
    }
}

impl From<KeyState> for StateV1 {
    fn from(state: KeyState) -> StateV1 {
        match state {
            KeyState::Next => StateV1::Next,
            KeyState::Active => StateV1::Active,
            KeyState::Retiring => StateV1::Retiring,
            KeyState::Retired => StateV1::Retired,
            KeyState::Revoked => StateV1::Revoked,
        }
    }
}

impl From<StateV1> for KeyState {
    fn from(state: StateV1) -> KeyState {
        match state {
            StateV1::Next => KeyState::Next,
            StateV1::Active => KeyState::Active,
            StateV1::Retiring => KeyState::Retiring,
            StateV1::Retired => KeyState::Retired,
            StateV1::Revoked => KeyState::Revoked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A format-1 file as the authority has written it since the format existed (one active
    /// key signing, one next key published, a revoked token), spelled out byte for byte.
    fn format_1_file(with_format_field: bool) -> (String, [u8; 32], [u8; 32]) {
        let (active, next) = (
            SecretKey::from_seed(&[7; 32]).unwrap(),
            SecretKey::from_seed(&[9; 32]).unwrap(),
        );
        let (a, n) = (thumbprint(&active.public()), thumbprint(&next.public()));
        let list = |bytes: [u8; 32]| format!("{bytes:?}").replace(' ', "");
        let (pa, pn) = (list(active.public()), list(next.public()));
        let (sa, sn) = (STANDARD.encode([7; 32]), STANDARD.encode([9; 32]));
        let format = if with_format_field {
            r#""format":1,"#
        } else {
            ""
        };
        let (first, second) = if a < n {
            ((&a, &sa), (&n, &sn))
        } else {
            ((&n, &sn), (&a, &sa))
        };
        let text = format!(
            r#"{{{format}"sealed":false,"ring":{{"policy":{{"token_ttl":900,"leeway":60,"rotation_period":86400,"publish_ahead":600}},"version":2,"keys":[{{"kid":"{a}","state":"active","public":{pa},"created_at":1000,"published_at":1000,"published_version":1,"activated_at":1000,"deactivated_at":null,"retire_at":null,"revoked_at":null}},{{"kid":"{n}","state":"next","public":{pn},"created_at":1000,"published_at":1000,"published_version":1,"activated_at":null,"deactivated_at":null,"retire_at":null,"revoked_at":null}}],"revoked_kids":{{}},"revoked_tokens":{{"some-jti":2000}},"rotation_pending":false,"rotations":0}},"private_keys":{{"{}":"{}","{}":"{}"}}}}"#,
            first.0, first.1, second.0, second.1
        );
        (text, active.public(), next.public())
    }

    #[test]
    fn reads_and_rewrites_format_1_byte_for_byte() {
        let (text, active, next) = format_1_file(true);
        let state = RingRecord::parse(text.as_bytes())
            .unwrap()
            .open(None)
            .unwrap();
        assert_eq!(state.ring.version, 2);
        assert_eq!(state.ring.active().public, active);
        assert_eq!(state.ring.next().unwrap().public, next);
        assert_eq!(state.ring.revoked_tokens["some-jti"], 2000);
        assert_eq!(state.keys.len(), 2);
        let written = RingRecord::new(&state, None).unwrap().to_bytes();
        assert_eq!(String::from_utf8(written.to_vec()).unwrap(), text);
    }

    #[test]
    fn a_file_without_a_format_is_format_1() {
        let (text, _, _) = format_1_file(false);
        let state = RingRecord::parse(text.as_bytes())
            .unwrap()
            .open(None)
            .unwrap();
        let written = RingRecord::new(&state, None).unwrap().to_bytes();
        assert_eq!(
            String::from_utf8(written.to_vec()).unwrap(),
            format_1_file(true).0
        );
    }

    #[test]
    fn refuses_an_unknown_format_by_its_number() {
        let err = RingRecord::parse(br#"{"format":2,"something":"else"}"#).err();
        assert!(
            matches!(&err, Some(RecordError::Corrupt(d)) if d == "unknown format 2"),
            "{err:?}"
        );
    }

    #[test]
    fn sealed_records_open_only_with_their_kek() {
        let (text, _, _) = format_1_file(true);
        let state = RingRecord::parse(text.as_bytes())
            .unwrap()
            .open(None)
            .unwrap();
        let kek = Kek::generate();
        let sealed = RingRecord::new(&state, Some(&kek)).unwrap().to_bytes();
        let open = |kek: Option<&Kek>| RingRecord::parse(&sealed).unwrap().open(kek);
        let reopened = open(Some(&kek)).unwrap();
        assert_eq!(reopened.ring, state.ring);
        assert!(matches!(open(None), Err(RecordError::Sealed)));
        assert!(matches!(
            open(Some(&Kek::generate())),
            Err(RecordError::WrongKek)
        ));
        let plain = RingRecord::new(&state, None).unwrap().to_bytes();
        assert!(matches!(
            RingRecord::parse(&plain).unwrap().open(Some(&kek)),
            Err(RecordError::NotSealed)
        ));
    }
}
