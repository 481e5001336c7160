//! The on-disk cache is trusted like the source (issue 11, item 4): a cache dir other users can
//! write or own, and a `jwks-cache.json` that is theirs, open to them or a link, refuse the
//! start — at `Config::check` (what `keyfleet verifier` runs before it binds, exit 64) and at
//! `Verifier::open` — so a key planted there is never trusted while the source is down. The
//! node writes its cache 0600 through a fresh temporary file, never through a planted link.
//! The tests run as root: files handed to uid 65534 play the other user's.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::Path;

use keyfleet_verifier::{ConfigError, Verifier};

use super::*;

/// `nobody`: another user than the one running the tests.
const OTHER: u32 = 65534;

fn as_root() -> bool {
    keyfleet_runtime::secure_fs::euid() == 0
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn cache_config(dir: &Path, source: Source) -> Config {
    Config {
        cache_dir: Some(dir.to_owned()),
        ..Config::for_test(source)
    }
}

fn nowhere() -> Source {
    Source::Authority {
        url: "http://127.0.0.1:1".into(),
    }
}

/// Both gates refuse `config` with a message that contains `want`.
async fn refused(config: Config, want: &str) {
    let err = config.check().expect_err(want);
    assert!(matches!(err, ConfigError::InsecureCache(_)), "{err}");
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
        std::os::unix::fs::chown(&dir, Some(OTHER), Some(OTHER)).unwrap();
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
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_written_0600_never_through_a_link_and_a_planted_one_is_refused() {
    let (a, forger) = (key(1), key(66));
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("elsewhere");
    std::fs::write(&target, b"untouched").unwrap();
    // Links planted before the start where older builds wrote their temporary file: removed
    // (not followed) at start.
    let planted = dir.join(format!("{CACHE_FILE}.tmp"));
    symlink(&target, &planted).unwrap();

    let authority = FakeAuthority::start(snapshot(7, &[&a])).await;
    let config = cache_config(&dir, authority.source());
    let node = spawn_node(config.clone()).await;
    node.wait_ready().await;
    let cache = dir.join(CACHE_FILE);
    let cached_version = |cache: &Path| {
        std::fs::read(cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["version"].as_u64())
    };
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
    assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    let meta = std::fs::symlink_metadata(&cache).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o777, 0o600, "the cache is private");
    node.stop().await;
    authority.stop().await;

    // The authority is down. The attacker's cache: the real record with their key instead.
    let genuine = std::fs::read(&cache).unwrap();
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
        std::os::unix::fs::chown(&cache, Some(OTHER), Some(OTHER)).unwrap();
        refused(config.clone(), &cache_msg("is owned by uid 65534")).await;
    }
    // A link to a file that would pass every other check.
    std::fs::remove_file(&cache).unwrap();
    let decoy = dir.join("decoy.json");
    std::fs::write(&decoy, &forged).unwrap();
    chmod(&decoy, 0o600);
    symlink(&decoy, &cache).unwrap();
    refused(config.clone(), &cache_msg("is a symbolic link")).await;

    // The node's own file, put back, is trusted again: the refusals were about who could
    // have written the file, not about its content.
    std::fs::remove_file(&cache).unwrap();
    std::fs::write(&cache, &genuine).unwrap();
    chmod(&cache, 0o600);
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
