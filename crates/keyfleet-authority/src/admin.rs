//! The admin credential: a random bearer token kept in `--admin-token-file` (created with mode
//! 0600 when missing) and checked in constant time on every admin RPC.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::error::OpenError;

/// The admin bearer token. Never printed.
#[derive(Clone)]
pub(crate) struct AdminToken(Zeroizing<String>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// Reads the token file; `Ok(None)` when it does not exist. Never writes.
    pub(crate) fn read(path: &Path) -> Result<Option<AdminToken>, OpenError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(OpenError::AdminToken {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let token = text.trim();
        if token.is_empty() {
            return Err(OpenError::EmptyAdminToken {
                path: path.to_owned(),
            });
        }
        Ok(Some(AdminToken(Zeroizing::new(token.to_owned()))))
    }

    /// Creates the token file (mode 0600) with a fresh random token.
    pub(crate) fn create(path: &Path) -> Result<AdminToken, OpenError> {
        let err = |source| OpenError::AdminToken {
            path: path.to_owned(),
            source,
        };
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..]).map_err(OpenError::Random)?;
        let token = Zeroizing::new(hex::encode(&bytes[..]));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(err)?;
        file.write_all(format!("{}\n", token.as_str()).as_bytes())
            .map_err(err)?;
        file.sync_all().map_err(err)?;
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
}
