//! The saved key set: the last good key set, kept in `<--cache-dir>/jwks-cache.json` so a
//! restarted node serves at once, even while its source is down. (The flag and the file name
//! are public and keep the word "cache"; in the code, "cache" is only the verified-token cache.)
//!
//! The file is trusted like the source it came from, so nobody else may write it: the
//! directory must be ours and closed to writers, the file ours, 0600 and not a link, or the
//! node refuses to start (a forged key planted there would be trusted while the source is down).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use keyfleet_core::{Jwk, UnixSeconds};
use keyfleet_runtime::secure_fs::{self, SecureFsError};
use serde::{Deserialize, Serialize};

use crate::keyset::Held;
use crate::metrics::{Metrics, Origin};
use crate::upstream::Fetched;

/// The saved key set's file name inside `--cache-dir`.
pub const SAVED_KEY_SET_FILE: &str = "jwks-cache.json";
const FORMAT: u32 = 1;
/// How `secure_fs` names the directory and the file in its errors (what operators read).
const DIR_NAME: &str = "cache dir";
const FILE_NAME: &str = "key set cache";

/// The saved key set's path inside `dir`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(SAVED_KEY_SET_FILE)
}

/// The file's contents: a key set as its source published it, and when it was fetched.
#[derive(Serialize, Deserialize)]
pub(crate) struct SavedKeySet {
    format: u32,
    /// The source url the set came from; a file from another source is ignored.
    source: String,
    issuer: Option<String>,
    pub(crate) version: u64,
    pub(crate) fetched_at: UnixSeconds,
    keys: Vec<Jwk>,
    revoked_kids: Vec<String>,
    revoked_tokens: Vec<SavedRevokedToken>,
    /// Ended sessions (absent in files written before sessions existed).
    #[serde(default)]
    revoked_sessions: Vec<SavedRevokedSession>,
}

#[derive(Serialize, Deserialize)]
struct SavedRevokedSession {
    sid: String,
    until: UnixSeconds,
}

#[derive(Serialize, Deserialize)]
struct SavedRevokedToken {
    jti: String,
    until: UnixSeconds,
}

impl SavedKeySet {
    /// The record of `held`, fetched from `source` at `fetched_at`.
    pub(crate) fn of(held: &Held, source: &str, fetched_at: UnixSeconds) -> SavedKeySet {
        let keys = &held.keys;
        SavedKeySet {
            format: FORMAT,
            source: source.to_owned(),
            issuer: keys.issuer.clone(),
            version: keys.version,
            fetched_at,
            keys: keys
                .kids()
                .filter_map(|kid| keys.key(kid).map(|k| Jwk::ed25519(kid, &k.to_bytes())))
                .collect(),
            revoked_kids: keys.revoked_kids().map(str::to_owned).collect(),
            revoked_tokens: keys
                .revoked_tokens()
                .map(|(jti, until)| SavedRevokedToken {
                    jti: jti.to_owned(),
                    until,
                })
                .collect(),
            revoked_sessions: keys
                .revoked_sessions()
                .map(|(sid, until)| SavedRevokedSession {
                    sid: sid.to_owned(),
                    until,
                })
                .collect(),
        }
    }

    /// The saved set as if just fetched, to be screened again like any other.
    pub(crate) fn into_fetched(self) -> Fetched {
        Fetched {
            version: self.version,
            issuer: self.issuer,
            keys: self.keys,
            revoked_kids: self.revoked_kids,
            revoked_tokens: self
                .revoked_tokens
                .into_iter()
                .map(|t| (t.jti, t.until))
                .collect(),
            revoked_sessions: self
                .revoked_sessions
                .into_iter()
                .map(|s| (s.sid, s.until))
                .collect(),
            unparseable: 0,
            from_delta: false,
        }
    }
}

/// Refuses a directory another user owns or can write, and a saved key set that is a link,
/// not ours, or open to others. A missing dir or file passes (the node creates them, privately).
pub(crate) fn check(dir: &Path) -> Result<(), SecureFsError> {
    if secure_fs::check_dir(dir, DIR_NAME)? {
        secure_fs::check_private(&path(dir), FILE_NAME)?;
    }
    Ok(())
}

/// Creates `dir` (0700) when missing and reads the key set saved there from `source`. A
/// missing, unreadable, corrupt or foreign-source file is logged (and the unreadable and
/// corrupt ones counted) and gives `None`; a dir or file other users could have written is an
/// error (the node must not start on keys someone may have planted). Blocking.
pub(crate) fn read(
    dir: &Path,
    source: &str,
    metrics: &Metrics,
) -> Result<Option<SavedKeySet>, SecureFsError> {
    let path = path(dir);
    secure_fs::create_dir(dir, DIR_NAME)?;
    secure_fs::remove_temp_leftovers(&path);
    let Some(mut file) = secure_fs::open_private(&path, FILE_NAME)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        metrics.fetched(Origin::Saved, false);
        tracing::warn!(path = %path.display(), error = %e, "could not read the saved key set; ignoring it");
        return Ok(None);
    }
    let saved: SavedKeySet = match serde_json::from_slice(&bytes) {
        Ok(saved) => saved,
        Err(e) => {
            metrics.fetched(Origin::Saved, false);
            tracing::warn!(path = %path.display(), error = %e, "the saved key set is corrupt; ignoring it");
            return Ok(None);
        }
    };
    if saved.format != FORMAT || saved.source != source {
        tracing::info!(path = %path.display(), "the saved key set is from another source or format; ignoring it");
        return Ok(None);
    }
    Ok(Some(saved))
}

/// Writes `saved` to `dir` through a fresh temporary file (random name, exclusive, no link
/// followed, 0600) + fsync + rename + fsync of the directory: a crash leaves the old or the new
/// file, and a link planted in the directory is never written through. Blocking.
pub(crate) fn write(dir: &Path, saved: &SavedKeySet) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let bytes = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    secure_fs::write_atomic(&path(dir), &bytes)
}
