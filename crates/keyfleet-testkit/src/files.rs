//! Files as the file-safety tests need them: private (0600) secrets, modes and owners, another
//! user to play the attacker, and a bait file a planted link would lead to. Unix only, like
//! keyfleet's file checks. The tests run as root, so files handed to [`OTHER_UID`] play
//! another user's.

use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// `nobody`: another user than the one running the tests.
pub const OTHER_UID: u32 = 65534;

/// What [`bait`] holds, and must still hold at the end.
pub const UNTOUCHED: &[u8] = b"untouched";

/// Whether the tests run as root (and so can hand files to [`OTHER_UID`]).
pub fn as_root() -> bool {
    keyfleet_runtime::secure_fs::euid() == 0
}

/// Writes `contents` to `path` with mode 0600 (created so, or tightened if it was there), as
/// an operator provisions a secret.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    file.write_all(contents.as_ref()).unwrap();
    chmod(path, 0o600);
}

/// Sets the permission bits of `path`.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Hands `path` to `uid` (its group too).
pub fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// Hands the link `path` itself (not what it points to) to `uid`.
pub fn lchown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

/// The permission bits of `path` (a link is followed).
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

/// A file outside any data dir that an attacker would like a server to write into, holding
/// [`UNTOUCHED`]; it lives as long as the returned dir.
pub fn bait() -> (tempfile::TempDir, PathBuf) {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("stolen-seeds");
    std::fs::write(&target, UNTOUCHED).unwrap();
    (outside, target)
}
