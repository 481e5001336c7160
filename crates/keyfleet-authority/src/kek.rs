//! The key-encryption key (KEK) that seals private keys at rest, and the sealing itself
//! (XChaCha20-Poly1305, a random 24-byte nonce per key, the kid as associated data).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, Zeroizing};

const NONCE_LEN: usize = 24;

/// A 32-byte key-encryption key. Never printed, never serialized; wiped on drop.
#[derive(Clone)]
pub struct Kek([u8; 32]);

/// Why a KEK could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("a key-encryption key is 32 bytes written as 64 hex characters or in base64")]
    Format,
    #[error("cannot read the key-encryption key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key-encryption key file {path} is invalid: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<KekError>,
    },
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    /// Another user owns or can change the file, or it is a link someone other than root made.
    #[error(transparent)]
    Insecure(#[from] keyfleet_runtime::secure_fs::SecureFsError),
}

impl Kek {
    /// Parses 64 hex characters or the base64 (standard or URL-safe, padded or not) of 32 bytes;
    /// surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Kek, KekError> {
        let text = text.trim();
        let mut bytes = Zeroizing::new([0u8; 32]);
        if text.len() == 64 && hex::decode_to_slice(text, &mut bytes[..]).is_ok() {
            return Ok(Kek(*bytes));
        }
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            if let Ok(decoded) = engine.decode(text) {
                let decoded = Zeroizing::new(decoded);
                if decoded.len() == 32 {
                    bytes.copy_from_slice(&decoded);
                    return Ok(Kek(*bytes));
                }
            }
        }
        Err(KekError::Format)
    }

    /// Reads and parses a KEK file, which must be as private as the key ring it opens: ours
    /// and 0600 or stricter, or owned by root and writable by nobody else (a mounted secret);
    /// never a link another user made (see `keyfleet_runtime::secure_fs::open_secret`).
    pub fn from_file(path: &Path) -> Result<Kek, KekError> {
        let read_error = |source| KekError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = keyfleet_runtime::secure_fs::open_secret(path, "key-encryption key file")?
            .ok_or_else(|| read_error(std::io::ErrorKind::NotFound.into()))?;
        let mut text = Zeroizing::new(String::new());
        std::io::Read::read_to_string(&mut std::io::Read::take(&mut file, 64 * 1024), &mut text)
            .map_err(read_error)?;
        Kek::parse(&text).map_err(|e| KekError::File {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// A fresh random KEK.
    pub fn generate() -> Kek {
        Kek::try_generate().expect("the system random number generator works")
    }

    pub(crate) fn try_generate() -> Result<Kek, KekError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(KekError::Random)?;
        Ok(Kek(bytes))
    }

    /// The KEK as 64 hex characters (what [`Kek::parse`] reads back).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0))
    }

    /// Seals `secret` bound to `kid`: nonce ‖ ciphertext.
    pub(crate) fn seal(&self, kid: &str, secret: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: kid.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message this short");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`Kek::seal`] made for `kid`; `None` when the KEK or the kid is wrong or the
    /// data was altered.
    pub(crate) fn open(&self, kid: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: kid.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Drop for Kek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_base64() {
        let kek = Kek::generate();
        let hex = kek.to_hex();
        let raw = hex::decode(&hex).unwrap();
        for text in [
            hex.clone(),
            format!("  {hex}\n"),
            hex.to_uppercase(),
            STANDARD.encode(&raw),
            URL_SAFE_NO_PAD.encode(&raw),
            format!("{}\n", STANDARD.encode(&raw)),
        ] {
            assert_eq!(Kek::parse(&text).unwrap().to_hex(), hex, "{text:?}");
        }
        for bad in [
            "",
            "abc",
            &hex[..62],
            &STANDARD.encode([1u8; 31]),
            &format!("{hex}00"),
        ] {
            assert!(matches!(Kek::parse(bad), Err(KekError::Format)), "{bad:?}");
        }
    }

    #[test]
    fn kek_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = Kek::generate();
        std::fs::write(&path, kek.to_hex()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Kek::from_file(&path).unwrap_err();
        assert!(matches!(err, KekError::Insecure(_)), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "key-encryption key file {} is readable or writable by group or others (mode 0644): run chmod 600",
                path.display()
            )),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(Kek::from_file(&path).unwrap().to_hex(), kek.to_hex());
        if keyfleet_runtime::secure_fs::euid() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            let err = Kek::from_file(&path).unwrap_err();
            assert!(err.to_string().contains("is owned by uid 65534"), "{err}");
        }
        let missing = Kek::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(missing, KekError::Read { .. }), "{missing}");
    }

    #[test]
    fn debug_is_redacted() {
        let kek = Kek::generate();
        assert_eq!(format!("{kek:?}"), "Kek(<redacted>)");
    }

    #[test]
    fn seal_binds_key_and_kid() {
        let kek = Kek::generate();
        let sealed = kek.seal("kid-a", b"secret seed", [9; NONCE_LEN]);
        assert_eq!(
            kek.open("kid-a", &sealed).unwrap().as_slice(),
            b"secret seed"
        );
        assert!(kek.open("kid-b", &sealed).is_none());
        assert!(Kek::generate().open("kid-a", &sealed).is_none());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(kek.open("kid-a", &tampered).is_none());
        assert!(kek.open("kid-a", &sealed[..10]).is_none());
    }
}
