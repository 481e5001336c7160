//! The on-disk cache is trusted like the source (issue 11, item 4): a cache dir other users can
//! write or own, and a `jwks-cache.json` that is theirs, open to them or a link, refuse the
//! start — at `Config::check` (what `keyfleet verifier` runs before it binds, exit 64) and at
//! `Verifier::open` — so a key planted there is never trusted while the source is down. The
//! node writes its cache 0600 through a fresh temporary file, never through a planted link.
//! The tests run as root: files handed to uid 65534 play the other user's.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use keyfleet_testkit::files::{OTHER_UID, UNTOUCHED, as_root, bait, chown, mode};
use keyfleet_verifier::{ConfigError, Verifier};

use super::*;

fn cache_config(dir: &Path, source: Source) -> Config {
    Config {
        cache_dir: Some(dir.to_owned()),
        ..Config::for_test(source)
    }
}

/// Both gates refuse `config` with a message that contains `want`.
async fn refused(config: Config, want: &str) {
    let err = config.check().expect_err(want);
    assert!(matches!(err, ConfigError::InsecureSavedKeySet(_)), "{err}");
    assert!(err.to_string().contains(want), "{err:?} lacks {want:?}");
    let err = Verifier::open(config).await.expect_err(want);
    assert!(err.to_string().contains(want), "{err:?} lacks {want:?}");
}

#[tokio::test]
async fn a_cache_dir_others_can_write_or_own_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    for mode in [0o777, 0o775, 0o1777, 0o730] {
        chmod(&dir, mode);
        refused(
            cache_config(&dir, nowhere()),
            &format!(
                "cache dir {d} is writable by group or others (mode {mode:04o}): run chmod 700 {d}",
                d = dir.display()
            ),
        )
        .await;
    }
    // Readable by others is not a threat to a cache of public keys.
    chmod(&dir, 0o755);
    cache_config(&dir, nowhere()).check().unwrap();
    Verifier::open(cache_config(&dir, nowhere())).await.unwrap();
    if as_root() {
        chmod(&dir, 0o700);
        chown(&dir, OTHER_UID);
        refused(
            cache_config(&dir, nowhere()),
            &format!(
                "cache dir {d} is owned by uid 65534, but keyfleet runs as uid 0: run chown 0 {d}",
                d = dir.display()
            ),
        )
        .await;
    }
    // A missing cache dir is created, for this user only.
    let fresh = root.path().join("new/cache");
    Verifier::open(cache_config(&fresh, nowhere()))
        .await
        .unwrap();
    assert_eq!(mode(&fresh), 0o700);
}

/// A private cache dir under a fresh root.
fn private_cache_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    (root, dir)
}

/// The version in the cache file at `cache`, once there is one.
fn cached_version(cache: &Path) -> Option<u64> {
    std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_written_0600_never_through_a_link() {
    let a = key(1);
    let (_root, dir) = private_cache_dir();
    let (_outside, target) = bait();
    // Links planted before the start where older builds wrote their temporary file: removed
    // (not followed) at start.
    let planted = dir.join(format!("{SAVED_KEY_SET_FILE}.tmp"));
    symlink(&target, &planted).unwrap();

    let authority = FakeAuthority::start(snapshot(7, &[&a])).await;
    let node = ready_node(cache_config(&dir, authority.source())).await;
    let cache = dir.join(SAVED_KEY_SET_FILE);
    eventually("cache written", || async {
        cached_version(&cache) == Some(7)
    })
    .await;
    assert!(
        std::fs::symlink_metadata(&planted).is_err(),
        "leftover removed"
    );
    // Planted again while the node runs: the next write goes elsewhere, safely.
    symlink(&target, &planted).unwrap();
    authority.publish(true, |_| {});
    eventually("new version cached", || async {
        cached_version(&cache) == Some(8)
    })
    .await;
    assert_eq!(std::fs::read(&target).unwrap(), UNTOUCHED);
    let meta = std::fs::symlink_metadata(&cache).unwrap();
    assert!(meta.is_file());
    assert_eq!(mode(&cache), 0o600, "the cache is private");
    node.stop().await;
    authority.stop().await;
}

/// A cache a node wrote for key `a`, with the authority then gone: the node's config, the
/// cache file and its bytes.
async fn a_genuine_cache(a: &Key, dir: &Path) -> (Config, PathBuf, Vec<u8>) {
    let authority = FakeAuthority::start(snapshot(7, &[a])).await;
    let config = cache_config(dir, authority.source());
    let node = ready_node(config.clone()).await;
    let cache = dir.join(SAVED_KEY_SET_FILE);
    eventually("cache written", || async {
        cached_version(&cache) == Some(7)
    })
    .await;
    node.stop().await;
    authority.stop().await;
    let genuine = std::fs::read(&cache).unwrap();
    (config, cache, genuine)
}

/// While the authority is down, an attacker's cache (the real record with their key instead)
/// is refused when it is open to others, another user's, or a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_cache_is_refused() {
    let (a, forger) = (key(1), key(66));
    let (_root, dir) = private_cache_dir();
    let (config, cache, genuine) = a_genuine_cache(&a, &dir).await;
    let mut forged: serde_json::Value = serde_json::from_slice(&genuine).unwrap();
    forged["keys"] = serde_json::json!([forger.jwk()]);
    let forged = serde_json::to_vec(&forged).unwrap();
    let cache_msg = |rest: &str| format!("key set cache {} {rest}", cache.display());

    // Open to others (what a plain write by another process in a shared dir leaves).
    std::fs::remove_file(&cache).unwrap();
    std::fs::write(&cache, &forged).unwrap();
    chmod(&cache, 0o644);
    refused(
        config.clone(),
        &cache_msg(&format!(
            "is readable or writable by group or others (mode 0644): run chmod 600 {}",
            cache.display()
        )),
    )
    .await;
    // Another user's file.
    if as_root() {
        chmod(&cache, 0o600);
        chown(&cache, OTHER_UID);
        refused(config.clone(), &cache_msg("is owned by uid 65534")).await;
    }
    // A link to a file that would pass every other check.
    std::fs::remove_file(&cache).unwrap();
    let decoy = dir.join("decoy.json");
    write_private(&decoy, &forged);
    symlink(&decoy, &cache).unwrap();
    refused(config, &cache_msg("is a symbolic link")).await;
}

/// The node's own file, put back after the refusals, is trusted again: they were about who
/// could have written the file, not about its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_own_cache_is_trusted_again() {
    let a = key(1);
    let (_root, dir) = private_cache_dir();
    let (config, cache, genuine) = a_genuine_cache(&a, &dir).await;
    chmod(&cache, 0o644);
    refused(config.clone(), "is readable or writable by group or others").await;
    std::fs::remove_file(&cache).unwrap();
    write_private(&cache, &genuine);
    config.check().unwrap();
    let node = spawn_node(config).await;
    let now = keyfleet_runtime::clock::system_now();
    check(
        &node,
        "served from the cache",
        &token(&a, now),
        "",
        Reason::Ok,
    )
    .await;
    node.stop().await;
}
