//! The key ring on disk: one file, `<data_dir>/keyring.json` (mode 0600), holding a
//! [`RingRecord`] (the ring's public state and the private keys that may still sign, sealed
//! with the KEK when one is configured). Every write replaces the whole file atomically (write a
//! temporary file, fsync, rename over, fsync the directory), so a crash at any point leaves
//! either the old or the new ring, never a mix.
//!
//! Another local user must neither read the seeds nor slip a key in: the data directory must be
//! ours and closed to writers, the ring file ours, 0600 and not a link, and the temporary file
//! gets a fresh random name, created exclusively without following links (`secure_fs`).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use keyfleet_runtime::secure_fs;
use zeroize::Zeroizing;

use crate::error::OpenError;
use crate::kek::Kek;
use crate::keys::RingState;
use crate::record::{RecordError, RingRecord};

/// File name of the key ring inside the data directory.
pub const KEYRING_FILE: &str = "keyring.json";

/// Reads and writes `keyring.json`.
#[derive(Debug)]
pub(crate) struct RingFile {
    dir: PathBuf,
    path: PathBuf,
    kek: Option<Kek>,
}

impl RingFile {
    pub(crate) fn new(dir: &Path, kek: Option<Kek>) -> RingFile {
        RingFile {
            dir: dir.to_owned(),
            path: dir.join(KEYRING_FILE),
            kek,
        }
    }

    /// Creates the data directory (mode 0700) when it is missing, then takes its exclusive
    /// lock — an advisory `flock` on the directory itself, so no file is created — held until
    /// the returned handle is dropped (or the process dies). Two authorities on one directory
    /// would each rotate and overwrite the other's ring. Refuses first a directory another user
    /// owns or can write (they could swap the ring or plant links in it); the check is on the
    /// opened handle, the directory locked.
    pub(crate) fn create_and_lock_dir(&self) -> Result<std::fs::File, OpenError> {
        let dir_error = |source| OpenError::DataDir {
            path: self.dir.clone(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(dir_error)?;
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
    pub(crate) fn load(&self) -> Result<Option<RingState>, OpenError> {
        let Some(mut file) = secure_fs::open_private(&self.path, "key ring")? else {
            return Ok(None);
        };
        let mut bytes = Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes)
            .map_err(|source| OpenError::ReadRing {
                path: self.path.clone(),
                source,
            })?;
        let path = self.path.clone();
        RingRecord::parse(&bytes)
            .and_then(|record| record.open(self.kek.as_ref()))
            .map(Some)
            .map_err(|e| match e {
                RecordError::Corrupt(detail) => OpenError::CorruptRing { path, detail },
                RecordError::Sealed => OpenError::Sealed { path },
                RecordError::NotSealed => OpenError::NotSealed { path },
                RecordError::WrongKek => OpenError::WrongKek { path },
            })
    }

    /// The file's bytes for `state` (private keys sealed when a KEK is set).
    pub(crate) fn encode(&self, state: &RingState) -> Result<Zeroizing<Vec<u8>>, getrandom::Error> {
        Ok(RingRecord::new(state, self.kek.as_ref())?.to_bytes())
    }

    /// Atomically replaces the ring file with `bytes` through a fsynced temporary file with a
    /// random name, created exclusively and without following links, and a rename; then fsyncs
    /// the directory so the rename itself is durable. A link planted at any moment is never
    /// written through. Blocking.
    pub(crate) fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        secure_fs::write_atomic(&self.path, bytes)
    }

    /// Removes the temporary files a crash may have left behind (they never hold the ring of
    /// record), unlinking a planted link rather than following it.
    pub(crate) fn remove_leftovers(&self) {
        secure_fs::remove_temp_leftovers(&self.path);
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
