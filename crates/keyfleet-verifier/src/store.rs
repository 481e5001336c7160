//! The key set the node holds: swapped atomically so `Verify` never waits on a refresh, and
//! written to `<cache_dir>/jwks-cache.json` so a restarted node serves at once.
//!
//! The cache is trusted like the source it came from, so nobody else may write it: the cache
//! dir must be ours and closed to writers, the file ours, 0600 and not a link, or the node
//! refuses to start (a forged key planted there would be trusted while the source is down).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use keyfleet_core::{Jwk, KeySet, Policy, UnixSeconds};
use keyfleet_runtime::secure_fs::{self, SecureFsError};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Source};
use crate::metrics::{Metrics, Origin};
use crate::upstream::Fetched;

/// The cache file's name inside `cache_dir`.
pub const CACHE_FILE: &str = "jwks-cache.json";
const CACHE_FORMAT: u32 = 1;

/// One immutable key set with the policy tokens are checked under.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) keys: KeySet,
    /// `None` while no issuer is known (no `--issuer`, and the source named none).
    pub(crate) policy: Option<Policy>,
}

/// What happened to a fetched key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A new set is in use.
    Replaced,
    /// The same version again: only its freshness was renewed.
    Renewed,
    /// Older than the held set while the push stream is live: left alone.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("the jwks holds no usable key")]
    NoUsableKeys,
}

pub(crate) struct Store {
    current: ArcSwapOption<Held>,
    /// Unix seconds of the last successful fetch or push of the held set.
    fetched_at: AtomicI64,
    /// Serialises appliers (push, pull, unknown-kid refresh); never held across I/O.
    apply_lock: Mutex<()>,
    /// Serialises cache writes (on blocking threads).
    write_lock: Mutex<()>,
    /// True while the push stream delivers snapshots: a pull then never rolls the version back.
    pub(crate) watching: AtomicBool,
    ready: tokio::sync::watch::Sender<bool>,
    config: Config,
    metrics: Arc<Metrics>,
}

impl Store {
    pub(crate) fn new(config: Config, metrics: Arc<Metrics>) -> Store {
        Store {
            current: ArcSwapOption::empty(),
            fetched_at: AtomicI64::new(0),
            apply_lock: Mutex::new(()),
            write_lock: Mutex::new(()),
            watching: AtomicBool::new(false),
            ready: tokio::sync::watch::Sender::new(false),
            config,
            metrics,
        }
    }

    pub(crate) fn current(&self) -> Option<Arc<Held>> {
        self.current.load_full()
    }

    pub(crate) fn version(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |h| h.keys.version)
    }

    /// Seconds since the held set was fetched, or `None` before any.
    pub(crate) fn age(&self) -> Option<i64> {
        self.current.load().as_ref()?;
        Some(self.config.clock.now() - self.fetched_at.load(Ordering::Acquire))
    }

    /// True when the held set is older than `max_stale` (fail closed).
    pub(crate) fn is_stale(&self) -> bool {
        self.age()
            .is_some_and(|age| age > self.config.max_stale.as_secs() as i64)
    }

    /// Resolves to true once any key set is held.
    pub(crate) fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Screens and installs `fetched` from `origin`.
    pub(crate) fn apply(&self, fetched: Fetched, origin: Origin) -> Result<Applied, ApplyError> {
        let now = self.config.clock.now();
        self.install(fetched, origin, now)
    }

    fn install(
        &self,
        fetched: Fetched,
        origin: Origin,
        fetched_at: UnixSeconds,
    ) -> Result<Applied, ApplyError> {
        let http = matches!(self.config.source, Source::JwksUrl { .. });
        let _guard = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = self.current.load().as_ref() {
            let held_version = held.keys.version;
            if !http && fetched.version == held_version {
                self.fetched_at.fetch_max(fetched_at, Ordering::AcqRel);
                return Ok(Applied::Renewed);
            }
            if fetched.version < held_version {
                if origin != Origin::Push && self.watching.load(Ordering::Acquire) {
                    tracing::debug!(
                        fetched = fetched.version,
                        held = held_version,
                        "ignoring an older pulled snapshot"
                    );
                    return Ok(Applied::Ignored);
                }
                tracing::warn!(
                    fetched = fetched.version,
                    held = held_version,
                    source = origin.as_str(),
                    "the authority's jwks version went backwards; applying it (the authority is the source of truth)"
                );
            }
        }
        let (keys, rejected) = KeySet::build(
            fetched.version,
            fetched.issuer,
            &fetched.keys,
            fetched.revoked_kids,
            fetched.revoked_tokens,
        );
        for _ in 0..fetched.unparseable {
            self.metrics
                .rejected(keyfleet_core::RejectedKey::Unparseable);
        }
        for (kid, why) in &rejected {
            self.metrics.rejected(*why);
            tracing::warn!(kid = %keyfleet_core::escape_untrusted(kid), why = why.as_str(), source = origin.as_str(), "published key left out by screening");
        }
        if http && keys.is_empty() {
            return Err(ApplyError::NoUsableKeys);
        }
        let issuer = self.config.issuer.clone().or_else(|| keys.issuer.clone());
        if let (Some(configured), Some(announced)) = (&self.config.issuer, &keys.issuer)
            && configured != announced
        {
            tracing::warn!(%configured, announced = %keyfleet_core::escape_untrusted(announced), "--issuer differs from the issuer the authority announces");
        }
        let policy = issuer.map(|issuer| Policy {
            issuer,
            audiences: self.config.audiences.clone(),
            leeway: self.config.leeway.as_secs() as i64,
            max_token_bytes: self.config.max_token_bytes,
            max_lifetime: self.config.max_lifetime.map(|d| d.as_secs() as i64),
        });
        let version = keys.version;
        let _change = tracing::info_span!(
            "jwks.apply",
            node_id = %self.config.node_id,
            region = %self.config.region,
            version,
            source = origin.as_str(),
        )
        .entered();
        tracing::info!(
            version,
            keys = keys.len(),
            source = origin.as_str(),
            "key set applied"
        );
        self.current.store(Some(Arc::new(Held { keys, policy })));
        self.fetched_at.store(fetched_at, Ordering::Release);
        self.metrics.jwks_version.set(version as i64);
        self.ready.send_replace(true);
        Ok(Applied::Replaced)
    }

    fn cache_path(&self) -> Option<PathBuf> {
        self.config.cache_dir.as_ref().map(|d| d.join(CACHE_FILE))
    }

    /// Writes the held set to the cache file, if one is configured. Blocking: run it on a
    /// blocking thread. Errors are logged, never fatal.
    pub(crate) fn write_cache(&self) {
        let Some(path) = self.cache_path() else {
            return;
        };
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Read the state under the write lock so a slow older write never lands last.
        let Some(held) = self.current() else { return };
        let record = CacheRecord {
            format: CACHE_FORMAT,
            source: self.config.source.url().to_owned(),
            issuer: held.keys.issuer.clone(),
            version: held.keys.version,
            fetched_at: self.fetched_at.load(Ordering::Acquire),
            keys: held
                .keys
                .kids()
                .filter_map(|kid| held.keys.key(kid).map(|k| Jwk::ed25519(kid, &k.to_bytes())))
                .collect(),
            revoked_kids: held.keys.revoked_kids().map(str::to_owned).collect(),
            revoked_tokens: held
                .keys
                .revoked_tokens()
                .map(|(jti, until)| CachedRevokedToken {
                    jti: jti.to_owned(),
                    until,
                })
                .collect(),
        };
        if let Err(e) = write_atomically(&path, &record) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the key set cache");
        }
    }

    /// Creates the cache dir (0700) when missing and installs the cached set if there is one
    /// for this source that is younger than `max_stale`. A missing, corrupt or foreign-source
    /// file is logged and ignored; a cache dir or file other users could have written is an
    /// error (the node must not start on keys someone may have planted). Blocking.
    pub(crate) fn load_cache(&self) -> Result<(), SecureFsError> {
        let (Some(dir), Some(path)) = (self.config.cache_dir.as_deref(), self.cache_path()) else {
            return Ok(());
        };
        secure_fs::create_dir(dir, "cache dir")?;
        secure_fs::remove_temp_leftovers(&path);
        let Some(mut file) = secure_fs::open_private(&path, "key set cache")? else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        if let Err(e) = file.read_to_end(&mut bytes) {
            self.metrics.fetched(Origin::Cache, false);
            tracing::warn!(path = %path.display(), error = %e, "could not read the key set cache; ignoring it");
            return Ok(());
        }
        let record: CacheRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.fetched(Origin::Cache, false);
                tracing::warn!(path = %path.display(), error = %e, "the key set cache is corrupt; ignoring it");
                return Ok(());
            }
        };
        if record.format != CACHE_FORMAT || record.source != self.config.source.url() {
            tracing::info!(path = %path.display(), "the key set cache is from another source or format; ignoring it");
            return Ok(());
        }
        let age = self.config.clock.now() - record.fetched_at;
        if age > self.config.max_stale.as_secs() as i64 {
            tracing::info!(
                age_seconds = age,
                "the key set cache is older than --max-stale; ignoring it"
            );
            return Ok(());
        }
        let fetched = Fetched {
            version: record.version,
            issuer: record.issuer,
            keys: record.keys,
            revoked_kids: record.revoked_kids,
            revoked_tokens: record
                .revoked_tokens
                .into_iter()
                .map(|t| (t.jti, t.until))
                .collect(),
            unparseable: 0,
        };
        match self.install(fetched, Origin::Cache, record.fetched_at) {
            Ok(_) => {
                self.metrics.fetched(Origin::Cache, true);
                tracing::info!(
                    version = record.version,
                    age_seconds = age,
                    "serving the cached key set until the source answers"
                );
            }
            Err(e) => {
                self.metrics.fetched(Origin::Cache, false);
                tracing::warn!(error = %e, "the key set cache holds no usable key; ignoring it");
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    format: u32,
    /// The source url the set came from; a cache from another source is ignored.
    source: String,
    issuer: Option<String>,
    version: u64,
    fetched_at: UnixSeconds,
    keys: Vec<Jwk>,
    revoked_kids: Vec<String>,
    revoked_tokens: Vec<CachedRevokedToken>,
}

#[derive(Serialize, Deserialize)]
struct CachedRevokedToken {
    jti: String,
    until: UnixSeconds,
}

/// Refuses a cache dir another user owns or can write, and a cache file that is a link, not
/// ours, or open to others. A missing dir or file passes (the node creates them, privately).
pub(crate) fn check_cache(dir: &Path) -> Result<(), SecureFsError> {
    if secure_fs::check_dir(dir, "cache dir")? {
        secure_fs::check_private(&dir.join(CACHE_FILE), "key set cache")?;
    }
    Ok(())
}

/// A fresh temporary file (random name, exclusive, no link followed, 0600) + fsync + rename +
/// fsync of the directory: a crash leaves the old or the new file, and a link planted in the
/// directory is never written through.
fn write_atomically(path: &Path, record: &CacheRecord) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    secure_fs::write_atomic(path, &bytes)
}
