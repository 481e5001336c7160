//! Files that hold secrets or trusted keys, opened and written so that another local user can
//! neither read them nor slip their own content (or a symbolic link) in: the one set of checks
//! the authority's data dir and the verifier's cache dir share.
//!
//! (Over 600 lines only with its unit tests, which play the other local user against each rule:
//! the rules and their attacks are kept side by side.)
//!
//! The rules, by what a file is:
//! - **Private directories** (`--data-dir`, `--cache-dir`): owned by the process's effective
//!   uid and not writable by group or others. Whoever can write a directory can replace the
//!   files in it, or plant a link where a file will be written.
//! - **Private files** (`keyring.json`, `jwks-cache.json`, a generated `admin.token` /
//!   `node.token`): a regular file, never a symbolic link (opened with `O_NOFOLLOW`), owned by
//!   the effective uid, mode 0600 or stricter. They are read through the opened descriptor, so
//!   the checks and the read see the same file.
//! - **Provisioned secrets** ([`open_secret`]: token files and `--kek-file`, often mounted by an
//!   orchestrator): as private files, or else owned by root and writable by nobody else. Root can
//!   change anything anyway; the threat is a file another *unprivileged* user can write or
//!   plant. Kubernetes mounts secrets as root-owned files (mode `defaultMode`, group `fsGroup`)
//!   behind root-owned symbolic links (`admin-token -> ..data/admin-token`), so a link owned by
//!   root is followed and the file it leads to is checked; a link anyone else made is refused.
//! - **Temporary files** ([`write_atomic`]): a fresh random name next to the target, created
//!   with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600, fsynced, renamed over the target, and the
//!   directory fsynced. A link planted at any name, at any time, makes that one create fail
//!   (and another random name is tried); nothing is ever written through it. Leftovers of a
//!   crash are unlinked ([`remove_temp_leftovers`]), which never follows a link.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;

/// What a temporary file's name adds to its target's: `keyring.json.tmp.<16 hex digits>`.
/// (`keyring.json.tmp`, the name older builds used, is also a leftover.)
const TMP_MARK: &str = ".tmp";

/// Why a directory or file was not trusted. Every message names the path and says what to run.
#[derive(Debug, thiserror::Error)]
pub enum SecureFsError {
    #[error(
        "{what} {path} is writable by group or others (mode {mode:04o}): run chmod 700 {path}",
        path = .path.display()
    )]
    DirWritable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} is readable or writable by group or others (mode {mode:04o}): run chmod 600 {path}",
        path = .path.display()
    )]
    FileOpen {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} is owned by root but writable by group or others (mode {mode:04o}): run chmod go-w {path}",
        path = .path.display()
    )]
    RootFileWritable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {path} is owned by uid {owner}, but keyfleet runs as uid {uid}: run chown {uid} {path} (or run keyfleet as uid {owner})",
        path = .path.display()
    )]
    ForeignOwner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        uid: u32,
    },
    #[error(
        "{what} {path} is a symbolic link{by}, which keyfleet does not follow for its keys, tokens and caches: replace the link with the file itself",
        path = .path.display(),
        by = .owner.map(|o| format!(" (made by uid {o})")).unwrap_or_default()
    )]
    Symlink {
        what: &'static str,
        path: PathBuf,
        owner: Option<u32>,
    },
    #[error("{what} {path} is not a {expected}", path = .path.display())]
    WrongType {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("cannot open {what} {path}: {source}", path = .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The effective uid of this process: the owner every private file and directory must have.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SecureFsError {
    let path = path.to_owned();
    move |source| SecureFsError::Io { what, path, source }
}

/// Checks an open directory: owned by us, not writable by group or others.
pub fn check_dir_handle(
    handle: &File,
    what: &'static str,
    path: &Path,
) -> Result<(), SecureFsError> {
    let meta = handle.metadata().map_err(io_error(what, path))?;
    check_dir_meta(&meta, what, path)
}

/// Owned by this process's effective uid.
fn check_owner(
    meta: &std::fs::Metadata,
    what: &'static str,
    path: &Path,
) -> Result<(), SecureFsError> {
    let uid = euid();
    if meta.uid() != uid {
        return Err(SecureFsError::ForeignOwner {
            what,
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

fn check_dir_meta(
    meta: &std::fs::Metadata,
    what: &'static str,
    path: &Path,
) -> Result<(), SecureFsError> {
    if !meta.is_dir() {
        return Err(SecureFsError::WrongType {
            what,
            path: path.to_owned(),
            expected: "directory",
        });
    }
    check_owner(meta, what, path)?;
    if meta.mode() & 0o022 != 0 {
        return Err(SecureFsError::DirWritable {
            what,
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Checks the directory at `path` (a link to a directory is followed: it is the directory
/// that must be private). `Ok(false)` when it does not exist.
pub fn check_dir(path: &Path, what: &'static str) -> Result<bool, SecureFsError> {
    match std::fs::metadata(path) {
        Ok(meta) => check_dir_meta(&meta, what, path).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(what, path)(e)),
    }
}

/// Creates `path` (and missing parents) with mode 0700 when it does not exist, then checks it.
pub fn create_dir(path: &Path, what: &'static str) -> Result<(), SecureFsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(io_error(what, path))?;
    check_dir(path, what).map(|_| ())
}

/// `O_NOFOLLOW`: a link as the last component fails with `ELOOP`. `O_NONBLOCK`: a planted
/// FIFO does not hang the open (it is then refused as not a regular file). `O_NOCTTY`: a
/// planted terminal device never becomes ours.
fn read_flags(follow: bool) -> i32 {
    let mut flags = OFlags::NONBLOCK | OFlags::NOCTTY;
    if !follow {
        flags |= OFlags::NOFOLLOW;
    }
    flags.bits() as i32
}

/// Opens a file for reading, following no link; `Ok(None)` when it does not exist.
fn open_for_read(
    path: &Path,
    what: &'static str,
    follow: bool,
) -> Result<Option<File>, SecureFsError> {
    let mut options = OpenOptions::new();
    options.read(true).custom_flags(read_flags(follow));
    match options.open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => Err(SecureFsError::Symlink {
                what,
                path: path.to_owned(),
                owner: Some(meta.uid()).filter(|&o| o != euid()),
            }),
            _ => Err(io_error(what, path)(e)),
        },
    }
}

fn check_regular(
    meta: &std::fs::Metadata,
    what: &'static str,
    path: &Path,
) -> Result<(), SecureFsError> {
    if meta.is_file() {
        Ok(())
    } else {
        Err(SecureFsError::WrongType {
            what,
            path: path.to_owned(),
            expected: "regular file",
        })
    }
}

fn check_private_meta(
    meta: &std::fs::Metadata,
    what: &'static str,
    path: &Path,
) -> Result<(), SecureFsError> {
    check_regular(meta, what, path)?;
    check_owner(meta, what, path)?;
    if meta.mode() & 0o077 != 0 {
        return Err(SecureFsError::FileOpen {
            what,
            path: path.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Opens a private file for reading: not a link, a regular file, ours, 0600 or stricter.
/// `Ok(None)` when it does not exist. Read the returned handle: it is the file checked.
pub fn open_private(path: &Path, what: &'static str) -> Result<Option<File>, SecureFsError> {
    let Some(file) = open_for_read(path, what, false)? else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(io_error(what, path))?;
    check_private_meta(&meta, what, path)?;
    Ok(Some(file))
}

/// Checks a private file without reading it; `Ok(false)` when it does not exist.
pub fn check_private(path: &Path, what: &'static str) -> Result<bool, SecureFsError> {
    open_private(path, what).map(|file| file.is_some())
}

/// Opens a provisioned secret (a token or key file) for reading: a private file (see
/// [`open_private`]), or a regular file owned by root that only root can write, reached
/// directly or through a link owned by root (how Kubernetes mounts secrets). `Ok(None)` when
/// it does not exist.
pub fn open_secret(path: &Path, what: &'static str) -> Result<Option<File>, SecureFsError> {
    let link = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type().is_symlink().then_some(meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(what, path)(e)),
    };
    if let Some(link) = &link
        && link.uid() != 0
    {
        // Only root may point us elsewhere: a link another user planted is the attack, and one
        // of our own has no business in place of a secret either.
        return Err(SecureFsError::Symlink {
            what,
            path: path.to_owned(),
            owner: Some(link.uid()).filter(|&o| o != euid()),
        });
    }
    // Not a link when looked at: open without following, so a link swapped in since fails.
    let Some(file) = open_for_read(path, what, link.is_some())? else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(io_error(what, path))?;
    check_regular(&meta, what, path)?;
    if meta.uid() == 0 && euid() != 0 {
        // Provisioned by root for us (a Kubernetes secret is root-owned, mode 0440 with group
        // fsGroup): fine as long as nobody else can change it.
        if meta.mode() & 0o022 != 0 {
            return Err(SecureFsError::RootFileWritable {
                what,
                path: path.to_owned(),
                mode: meta.mode() & 0o7777,
            });
        }
        return Ok(Some(file));
    }
    check_private_meta(&meta, what, path)?;
    Ok(Some(file))
}

fn open_exclusive(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    // create_new is O_CREAT|O_EXCL, which never follows a link at the last component;
    // O_NOFOLLOW says so once more. The mode (less the umask) applies from the first byte.
    options
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NOCTTY).bits() as i32);
    options.open(path)
}

/// Creates `path` exclusively (never through a link, never over an existing file) with mode
/// 0600, writes `bytes` and fsyncs the file and its directory.
pub fn create_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = open_exclusive(path)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

fn tmp_prefix(path: &Path) -> std::io::Result<OsString> {
    let mut name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?
        .to_owned();
    name.push(TMP_MARK);
    Ok(name)
}

/// Replaces `path` atomically with `bytes`, readable by its owner only: a temporary file with
/// a fresh random name in the same directory (exclusive, no link followed, 0600), fsynced,
/// renamed over `path`, then the directory fsynced. A crash leaves the old or the new file;
/// the rename replaces a link at `path` itself, never its target. Blocking.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let prefix = tmp_prefix(path)?;
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let mut suffix = [0u8; 8];
        getrandom::fill(&mut suffix).map_err(std::io::Error::other)?;
        let mut name = prefix.clone();
        name.push(".");
        for byte in suffix {
            name.push(format!("{byte:02x}"));
        }
        let tmp = path.with_file_name(name);
        match open_exclusive(&tmp) {
            Ok(file) => break (tmp, file),
            // Someone holds that name (a planted link or file): take another one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 16 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Removes the temporary files a crash may have left next to `path` (`<name>.tmp` and
/// `<name>.tmp.*`). Unlinking removes a link itself, never its target. Returns how many were
/// removed; a directory that cannot be listed removes none.
pub fn remove_temp_leftovers(path: &Path) -> usize {
    let Ok(prefix) = tmp_prefix(path) else {
        return 0;
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let prefix = prefix.as_encoded_bytes();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        let leftover =
            name == prefix || (name.starts_with(prefix) && name.get(prefix.len()) == Some(&b'.'));
        if !leftover {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %entry.path().display(), "removed a leftover temporary file");
            }
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a leftover temporary file");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    /// Another uid than ours (`nobody`); the tests run as root, which may hand files to it.
    const OTHER: u32 = 65534;

    fn as_root() -> bool {
        euid() == 0
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn directories_must_be_ours_and_closed_to_writers() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        assert!(!check_dir(&dir, "data dir").unwrap());
        create_dir(&dir, "data dir").unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert!(check_dir(&dir, "data dir").unwrap());
        chmod(&dir, 0o755);
        assert!(check_dir(&dir, "data dir").unwrap(), "readable is fine");
        for mode in [0o775, 0o757, 0o777] {
            chmod(&dir, mode);
            let err = check_dir(&dir, "data dir").unwrap_err();
            assert!(matches!(err, SecureFsError::DirWritable { .. }), "{err}");
            assert_eq!(
                err.to_string(),
                format!(
                    "data dir {d} is writable by group or others (mode {mode:04o}): run chmod 700 {d}",
                    d = dir.display()
                )
            );
            let handle = File::open(&dir).unwrap();
            assert!(check_dir_handle(&handle, "data dir", &dir).is_err());
        }
        chmod(&dir, 0o700);
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check_dir(&file, "data dir"),
            Err(SecureFsError::WrongType { .. })
        ));
        if as_root() {
            std::os::unix::fs::chown(&dir, Some(OTHER), Some(OTHER)).unwrap();
            let err = check_dir(&dir, "data dir").unwrap_err();
            assert!(
                matches!(err, SecureFsError::ForeignOwner { owner: OTHER, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("run chown 0 "), "{err}");
        }
    }

    #[test]
    fn private_files_are_ours_0600_and_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        assert!(open_private(&path, "key ring").unwrap().is_none());
        create_new(&path, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(check_private(&path, "key ring").unwrap());
        assert_eq!(
            std::io::read_to_string(open_private(&path, "key ring").unwrap().unwrap()).unwrap(),
            "secret"
        );
        chmod(&path, 0o400);
        assert!(check_private(&path, "key ring").unwrap());
        for mode in [0o644, 0o640, 0o604, 0o660] {
            chmod(&path, mode);
            let err = check_private(&path, "key ring").unwrap_err();
            assert!(matches!(err, SecureFsError::FileOpen { .. }), "{err}");
            assert!(err.to_string().contains("run chmod 600 "), "{err}");
        }
        chmod(&path, 0o600);
        let link = dir.path().join("link.json");
        symlink(&path, &link).unwrap();
        let err = check_private(&link, "key ring").unwrap_err();
        assert!(matches!(err, SecureFsError::Symlink { .. }), "{err}");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            check_private(&sub, "key ring"),
            Err(SecureFsError::WrongType { .. })
        ));
        if as_root() {
            std::os::unix::fs::chown(&path, Some(OTHER), Some(OTHER)).unwrap();
            let err = check_private(&path, "key ring").unwrap_err();
            assert!(matches!(err, SecureFsError::ForeignOwner { .. }), "{err}");
        }
    }

    #[test]
    fn secrets_may_be_root_provisioned_but_not_planted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        assert!(open_secret(&path, "token file").unwrap().is_none());
        create_new(&path, b"t").unwrap();
        assert!(open_secret(&path, "token file").unwrap().is_some());
        chmod(&path, 0o644);
        assert!(
            open_secret(&path, "token file").is_err(),
            "ours: 0600 at most"
        );
        chmod(&path, 0o600);
        if as_root() {
            // A link root made (how Kubernetes mounts a secret) is followed; one another user
            // made is refused.
            let link = dir.path().join("mounted");
            symlink(&path, &link).unwrap();
            assert!(open_secret(&link, "token file").unwrap().is_some());
            std::os::unix::fs::lchown(&link, Some(OTHER), Some(OTHER)).unwrap();
            let err = open_secret(&link, "token file").unwrap_err();
            assert!(
                matches!(
                    err,
                    SecureFsError::Symlink {
                        owner: Some(OTHER),
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("made by uid 65534"), "{err}");
            std::os::unix::fs::chown(&path, Some(OTHER), Some(OTHER)).unwrap();
            let err = open_secret(&path, "token file").unwrap_err();
            assert!(matches!(err, SecureFsError::ForeignOwner { .. }), "{err}");
        }
    }

    #[test]
    fn atomic_writes_never_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("stolen");
        std::fs::write(&target, b"untouched").unwrap();
        let path = dir.path().join("keyring.json");
        // Plant links at the old fixed name and at the target itself.
        symlink(&target, dir.path().join("keyring.json.tmp")).unwrap();
        symlink(&target, &path).unwrap();
        write_atomic(&path, b"seeds").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file(), "the rename replaced the link itself");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"seeds");
        // Only the planted link is left over; removing it leaves its target alone.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::write(
            dir.path().join("keyring.json.tmp.0123456789abcdef"),
            b"half",
        )
        .unwrap();
        std::fs::write(dir.path().join("keyring.json.tmpx"), b"not ours").unwrap();
        assert_eq!(remove_temp_leftovers(&path), 2);
        assert!(dir.path().join("keyring.json.tmpx").exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        // create_new refuses a link and an existing file alike.
        assert!(create_new(&path, b"again").is_err());
        let link = dir.path().join("admin.token");
        symlink(&target, &link).unwrap();
        assert!(create_new(&link, b"token").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    }

    #[test]
    fn a_planted_fifo_does_not_hang_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks-cache.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            open_private(&path, "key set cache"),
            Err(SecureFsError::WrongType { .. })
        ));
    }
}
