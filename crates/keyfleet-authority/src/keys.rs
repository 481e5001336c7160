//! The private side of the ring: [`SecretKey`] (an Ed25519 private key, never printed) and
//! [`RingState`], the ring of record together with the private keys it still needs.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{KeyRing, NewKey, UnixSeconds};
use zeroize::Zeroizing;

use crate::error::ServiceError;

/// An Ed25519 private key. No `Debug` of the key material, no `Serialize`; wiped on drop by
/// `ed25519_dalek`.
#[derive(Clone)]
pub(crate) struct SecretKey(SigningKey);

impl SecretKey {
    /// A fresh key from 32 bytes of system randomness, with its kid (the RFC 7638 thumbprint).
    pub(crate) fn generate() -> Result<(NewKey, SecretKey), getrandom::Error> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut seed[..])?;
        let key = SecretKey(SigningKey::from_bytes(&seed));
        let public = key.public();
        Ok((
            NewKey {
                kid: thumbprint(&public),
                public,
            },
            key,
        ))
    }

    /// The key of a 32-byte seed; `None` for any other length.
    pub(crate) fn from_seed(seed: &[u8]) -> Option<SecretKey> {
        let seed: &[u8; 32] = seed.try_into().ok()?;
        Some(SecretKey(SigningKey::from_bytes(seed)))
    }

    /// The 32-byte seed, wiped when dropped (for the ring file only).
    pub(crate) fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub(crate) fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// The ring and the private keys it still needs, as one consistent unit.
#[derive(Clone, Debug)]
pub(crate) struct RingState {
    pub ring: KeyRing,
    /// kid → private key, for the keys that may still sign (active and next).
    pub keys: BTreeMap<String, SecretKey>,
    /// Ended sessions published to the fleet: sid → until (the newest access token's expiry
    /// plus leeway). Not in `keyring.json`: the session store is their record, and they are
    /// loaded from it at start-up.
    pub revoked_sessions: BTreeMap<String, UnixSeconds>,
}

impl RingState {
    /// Publishes a fresh next key when the ring has none.
    pub(crate) fn ensure_next(&mut self, now: UnixSeconds) -> Result<(), ServiceError> {
        if self.ring.needs_next() {
            let (key, secret) = SecretKey::generate().map_err(ServiceError::Random)?;
            let kid = key.kid.clone();
            self.ring.add_next(key, now)?;
            self.keys.insert(kid, secret);
        }
        Ok(())
    }
}
