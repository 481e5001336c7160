//! The key ring on disk: one file, `<data_dir>/keyring.json` (mode 0600), holding the ring's
//! public state and the private keys that may still sign (active and next), sealed with the KEK
//! when one is configured. Every write replaces the whole file atomically (write a temporary
//! file, fsync, rename over, fsync the directory), so a crash at any point leaves either the old
//! or the new ring, never a mix.
//!
//! Another local user must neither read the seeds nor slip a key in: the data directory must be
//! ours and closed to writers, the ring file ours, 0600 and not a link, and the temporary file
//! gets a fresh random name, created exclusively without following links (`secure_fs`).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::SigningKey;
use keyfleet_core::jwk::thumbprint;
use keyfleet_core::{KeyRing, NewKey};
use keyfleet_runtime::secure_fs;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::OpenError;
use crate::kek::Kek;

/// File name of the key ring inside the data directory.
pub const KEYRING_FILE: &str = "keyring.json";
const FORMAT: u32 = 1;

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

    fn from_seed(seed: &[u8]) -> Option<SecretKey> {
        let seed: &[u8; 32] = seed.try_into().ok()?;
        Some(SecretKey(SigningKey::from_bytes(seed)))
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
pub(crate) struct Stored {
    pub ring: KeyRing,
    pub keys: BTreeMap<String, SecretKey>,
}

#[derive(Serialize, Deserialize)]
struct FileModel {
    format: u32,
    /// Whether `private_keys` are sealed with a KEK (nonce ‖ XChaCha20-Poly1305 ciphertext).
    sealed: bool,
    ring: KeyRing,
    /// kid → base64 of the 32-byte seed, or of the sealed seed.
    private_keys: BTreeMap<String, String>,
}

/// Reads and writes `keyring.json`.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    path: PathBuf,
    kek: Option<Kek>,
}

impl Store {
    pub(crate) fn new(dir: &Path, kek: Option<Kek>) -> Store {
        Store {
            dir: dir.to_owned(),
            path: dir.join(KEYRING_FILE),
            kek,
        }
    }

    /// Takes the data directory's exclusive lock — an advisory `flock` on the directory itself,
    /// so no file is created — held until the returned handle is dropped (or the process dies).
    /// Two authorities on one directory would each rotate and overwrite the other's ring.
    /// Refuses first a directory another user owns or can write (they could swap the ring or
    /// plant links in it); the check is on the opened handle, the directory locked.
    pub(crate) fn lock_dir(&self) -> Result<std::fs::File, OpenError> {
        let dir_error = |source| OpenError::DataDir {
            path: self.dir.clone(),
            source,
        };
        let handle = std::fs::File::open(&self.dir).map_err(dir_error)?;
        secure_fs::check_dir_handle(&handle, "data dir", &self.dir)?;
        match handle.try_lock() {
            Ok(()) => Ok(handle),
            Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
                path: self.dir.clone(),
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(dir_error(source)),
        }
    }

    /// Loads and fully checks the ring; `Ok(None)` when there is none yet. Never writes.
    /// Refuses a ring file that is a link, not ours, or readable by anyone else.
    pub(crate) fn load(&self) -> Result<Option<Stored>, OpenError> {
        let Some(mut file) = secure_fs::open_private(&self.path, "key ring")? else {
            return Ok(None);
        };
        let mut bytes = Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes)
            .map_err(|source| OpenError::ReadRing {
                path: self.path.clone(),
                source,
            })?;
        let corrupt = |detail: String| OpenError::CorruptRing {
            path: self.path.clone(),
            detail,
        };
        let file: FileModel = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.format != FORMAT {
            return Err(corrupt(format!("unknown format {}", file.format)));
        }
        match (file.sealed, &self.kek) {
            (true, None) => {
                return Err(OpenError::Sealed {
                    path: self.path.clone(),
                });
            }
            (false, Some(_)) => {
                return Err(OpenError::NotSealed {
                    path: self.path.clone(),
                });
            }
            _ => {}
        }
        file.ring.check().map_err(|e| corrupt(e.to_string()))?;
        for record in &file.ring.keys {
            if thumbprint(&record.public) != record.kid {
                return Err(corrupt(format!(
                    "kid {} does not match its public key",
                    record.kid
                )));
            }
        }
        let mut keys = BTreeMap::new();
        for kid in file.ring.signing_capable() {
            let encoded = file
                .private_keys
                .get(kid)
                .ok_or_else(|| corrupt(format!("the private key of {kid} is missing")))?;
            let raw = Zeroizing::new(
                STANDARD
                    .decode(encoded)
                    .map_err(|_| corrupt(format!("the private key of {kid} is not base64")))?,
            );
            let seed = match &self.kek {
                Some(kek) => kek.open(kid, &raw).ok_or_else(|| OpenError::WrongKek {
                    path: self.path.clone(),
                })?,
                None => raw,
            };
            let key = SecretKey::from_seed(&seed)
                .ok_or_else(|| corrupt(format!("the private key of {kid} is not 32 bytes")))?;
            let record = file
                .ring
                .get(kid)
                .expect("signing-capable kids are in the ring");
            if key.public() != record.public {
                return Err(corrupt(format!(
                    "the private key of {kid} does not match its public key"
                )));
            }
            keys.insert(kid.to_owned(), key);
        }
        Ok(Some(Stored {
            ring: file.ring,
            keys,
        }))
    }

    /// The file's bytes for `stored` (private keys sealed when a KEK is set).
    pub(crate) fn encode(&self, stored: &Stored) -> Result<Zeroizing<Vec<u8>>, getrandom::Error> {
        let mut private_keys = BTreeMap::new();
        for kid in stored.ring.signing_capable() {
            let Some(key) = stored.keys.get(kid) else {
                continue;
            };
            let seed = Zeroizing::new(key.0.to_bytes());
            let encoded = match &self.kek {
                Some(kek) => {
                    let mut nonce = [0u8; 24];
                    getrandom::fill(&mut nonce)?;
                    STANDARD.encode(kek.seal(kid, &seed[..], nonce))
                }
                None => STANDARD.encode(&seed[..]),
            };
            private_keys.insert(kid.to_owned(), encoded);
        }
        let file = FileModel {
            format: FORMAT,
            sealed: self.kek.is_some(),
            ring: stored.ring.clone(),
            private_keys,
        };
        let bytes = Zeroizing::new(serde_json::to_vec(&file).expect("the key ring serializes"));
        // The map's base64 strings held seeds: wipe them before they are freed.
        for (_, mut v) in file.private_keys {
            zeroize::Zeroize::zeroize(&mut v);
        }
        Ok(bytes)
    }

    /// Atomically replaces the ring file with `bytes`. Blocking.
    pub(crate) fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.dir, &self.path, bytes)
    }

    /// Removes the temporary files a crash may have left behind (they never hold the ring of
    /// record), unlinking a planted link rather than following it.
    pub(crate) fn remove_leftovers(&self) {
        secure_fs::remove_temp_leftovers(&self.path);
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Writes `bytes` to `path` (in `dir`) through a fsynced temporary file with a random name,
/// created exclusively and without following links, and a rename; then fsyncs `dir` so the
/// rename itself is durable. A link planted at any moment is never written through. Blocking.
pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    debug_assert_eq!(path.parent(), Some(dir), "the ring lives in the data dir");
    secure_fs::write_atomic(path, bytes)
}
