//! The admin credential: a random bearer token kept in `--admin-token-file` (created with mode
//! 0600 when missing) and checked in constant time on every admin RPC. The fleet credential
//! (`node.token`) is the same kind of file, read and created by the same two functions.

use std::io::Read as _;
use std::path::Path;

use keyfleet_runtime::secure_fs;

use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::error::OpenError;

/// The admin bearer token. Never printed.
/// Tokens shorter than this are refused at start: with 32 bytes (the generated tokens carry 32
/// random bytes as 64 hex characters) no rate of guessing gets anywhere.
pub(crate) const MIN_TOKEN_BYTES: usize = 32;

#[derive(Clone)]
pub(crate) struct AdminToken(Zeroizing<String>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Reads the token file; `Ok(None)` when it does not exist. Never writes. Refuses a file
    /// another user owns or can read or write, a link (see [`secure_fs::open_secret`]: a
    /// root-owned, read-only mounted secret is accepted), and a token shorter than
    /// [`MIN_TOKEN_BYTES`].
    pub(crate) fn read(path: &Path) -> Result<Option<AdminToken>, OpenError> {
        let Some(mut file) = secure_fs::open_secret(path, "token file")? else {
            return Ok(None);
        };
        let mut text = Zeroizing::new(String::new());
        // A token is 64 characters; a file a thousand times longer is not a token file.
        (&mut file)
            .take(64 * 1024)
            .read_to_string(&mut text)
            .map_err(|source| OpenError::AdminToken {
                path: path.to_owned(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(OpenError::EmptyAdminToken {
                path: path.to_owned(),
            });
        }
        if token.len() < MIN_TOKEN_BYTES {
            return Err(OpenError::ShortToken {
                path: path.to_owned(),
                len: token.len(),
            });
        }
        Ok(Some(AdminToken(Zeroizing::new(token.to_owned()))))
    }

    /// Creates the token file with a fresh random token (64 hex characters): exclusively,
    /// never through a link, mode 0600, fsynced with its directory. A missing parent directory
    /// is created with mode 0700.
    pub(crate) fn create(path: &Path) -> Result<AdminToken, OpenError> {
        let err = |source| OpenError::AdminToken {
            path: path.to_owned(),
            source,
        };
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..]).map_err(OpenError::Random)?;
        let token = Zeroizing::new(hex::encode(&bytes[..]));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(parent).map_err(err)?;
        }
        let line = Zeroizing::new(format!("{}\n", token.as_str()));
        secure_fs::create_new(path, line.as_bytes()).map_err(err)?;
        Ok(AdminToken(token))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `authorization` metadata (`Bearer <token>`) carries this token; constant time in
    /// the token's content.
    pub(crate) fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(presented) = strip_bearer(value) else {
            return false;
        };
        bool::from(presented.ct_eq(self.0.as_bytes()))
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let token = AdminToken(Zeroizing::new("s3cret".into()));
        let cases: [(Option<&[u8]>, bool); 8] = [
            (Some(b"Bearer s3cret"), true),
            (Some(b"bearer s3cret"), true),
            (Some(b"Bearer  s3cret "), true),
            (Some(b"Bearer s3cre"), false),
            (Some(b"Bearer s3cretx"), false),
            (Some(b"Basic s3cret"), false),
            (Some(b"s3cret"), false),
            (None, false),
        ];
        for (value, want) in cases {
            assert_eq!(
                token.accepts(value),
                want,
                "{:?}",
                value.map(String::from_utf8_lossy)
            );
        }
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn creates_then_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        assert!(AdminToken::read(&path).unwrap().is_none());
        let created = AdminToken::create(&path).unwrap();
        assert_eq!(created.expose().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let read = AdminToken::read(&path).unwrap().unwrap();
        assert_eq!(read.expose(), created.expose());
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            AdminToken::read(&path),
            Err(OpenError::EmptyAdminToken { .. })
        ));
    }

    #[test]
    fn short_tokens_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        AdminToken::create(&path).unwrap();
        for short in [
            "x",
            "x\n",
            &"a".repeat(31),
            &format!("  {}  \n", "b".repeat(31)),
        ] {
            std::fs::write(&path, short).unwrap();
            let err = AdminToken::read(&path).unwrap_err();
            assert!(
                matches!(err, OpenError::ShortToken { .. }),
                "{short:?}: {err}"
            );
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains(
                    "delete it to have a new one generated, or write at least 32 random bytes"
                ),
                "{message}"
            );
        }
        std::fs::write(&path, "c".repeat(32)).unwrap();
        assert_eq!(
            AdminToken::read(&path).unwrap().unwrap().expose(),
            "c".repeat(32)
        );
    }

    #[test]
    fn open_foreign_or_linked_token_files_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.token");
        AdminToken::create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AdminToken::read(&path).unwrap_err();
        assert!(err.to_string().contains("run chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A token planted through a link, or pointed at one, is never created through it.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let link = dir.path().join("admin.token");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(AdminToken::create(&link).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        if keyfleet_runtime::secure_fs::euid() == 0 {
            std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
            let err = AdminToken::read(&link).unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{err}");
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
            let err = AdminToken::read(&path).unwrap_err();
            assert!(err.to_string().contains("is owned by uid 65534"), "{err}");
        }
    }
}
