//! Key files neither follow links nor trust what another user could have written (issue 11,
//! item 4): the data dir must be ours and closed to writers; the ring, token and KEK files ours
//! and 0600 (or a read-only secret root provisioned); tokens at least 32 bytes; the ring's
//! temporary file is created exclusively under a random name, so a link planted before or
//! during the run is never written through, and a leftover is unlinked, not followed.
//! The tests run as root: files handed to uid 65534 play the other user's.

use std::os::unix::fs::symlink;
use std::path::PathBuf;

use keyfleet_testkit::files::{OTHER_UID, UNTOUCHED, as_root, bait, chmod, chown, lchown};

use super::*;

/// `Authority::open` refuses with an `Insecure` error whose message contains `want`, and has
/// written nothing into `dir`.
fn refused(config: Config, want: &str) -> OpenError {
    let dir = config.data_dir.clone();
    let before = listing(&dir);
    let err = Authority::open(config).expect_err(want);
    let message = err.to_string();
    assert!(message.contains(want), "{message:?} lacks {want:?}");
    assert_eq!(listing(&dir), before, "{want}: nothing written");
    err
}

fn listing(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let path = e.unwrap().path();
                    let bytes = std::fs::read(&path).unwrap_or_default();
                    (path, bytes)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn a_data_dir_others_can_write_or_own_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    for mode in [0o775, 0o777, 0o1777, 0o707] {
        chmod(&dir, mode);
        let err = refused(
            Config::for_test(&dir),
            &format!(
                "data dir {d} is writable by group or others (mode {mode:04o}): run chmod 700 {d}",
                d = dir.display()
            ),
        );
        assert!(matches!(err, OpenError::Insecure(_)), "{err}");
    }
    if as_root() {
        chmod(&dir, 0o700);
        chown(&dir, OTHER_UID);
        refused(
            Config::for_test(&dir),
            &format!(
                "data dir {d} is owned by uid 65534, but keyfleet runs as uid 0: run chown 0 {d}",
                d = dir.display()
            ),
        );
        chown(&dir, 0);
    }
    // Readable by others is allowed (nothing secret is readable in it: the files are 0600).
    chmod(&dir, 0o755);
    drop(Authority::open(Config::for_test(&dir)).unwrap());
    // A data dir that does not exist yet is created for this user only.
    let fresh = root.path().join("new/data");
    drop(Authority::open(Config::for_test(&fresh)).unwrap());
    assert_eq!(mode(&fresh), 0o700);
}

#[test]
fn a_key_ring_open_to_others_foreign_or_linked_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Authority::open(Config::for_test(dir.path())).unwrap());
    let ring = dir.path().join(KEYRING_FILE);
    let bytes = std::fs::read(&ring).unwrap();

    for mode in [0o644, 0o640, 0o604] {
        chmod(&ring, mode);
        let err = refused(
            Config::for_test(dir.path()),
            &format!(
                "key ring {r} is readable or writable by group or others (mode {mode:04o}): run chmod 600 {r}",
                r = ring.display()
            ),
        );
        assert!(matches!(err, OpenError::Insecure(_)), "{err}");
    }
    chmod(&ring, 0o600);
    if as_root() {
        chown(&ring, OTHER_UID);
        refused(
            Config::for_test(dir.path()),
            &format!("key ring {} is owned by uid 65534", ring.display()),
        );
        chown(&ring, 0);
    }
    // A link, even to a file that passes every other check, and even one we made.
    let elsewhere = tempfile::tempdir().unwrap();
    let real = elsewhere.path().join(KEYRING_FILE);
    std::fs::rename(&ring, &real).unwrap();
    symlink(&real, &ring).unwrap();
    refused(
        Config::for_test(dir.path()),
        &format!("key ring {} is a symbolic link", ring.display()),
    );
    assert_eq!(std::fs::read(&real).unwrap(), bytes);
    // Put back, the same ring opens again.
    std::fs::remove_file(&ring).unwrap();
    std::fs::rename(&real, &ring).unwrap();
    drop(Authority::open(Config::for_test(dir.path())).unwrap());
}

#[test]
fn token_files_short_open_foreign_or_linked_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Authority::open(Config::for_test(dir.path())).unwrap();
    let admin = first.admin_token();
    drop(first);
    let token = dir.path().join("admin.token");
    let saved = std::fs::read(&token).unwrap();

    // A planted one-character token (or any shorter than 32 bytes) would be guessed.
    for short in ["x", "x\n", "0123456789abcdef0123456789abcde\n"] {
        std::fs::write(&token, short).unwrap();
        let err = refused(
            Config::for_test(dir.path()),
            &format!(
                "the token file {} holds a {}-byte token,",
                token.display(),
                short.trim().len()
            ),
        );
        assert!(matches!(err, OpenError::ShortToken { .. }), "{err}");
        assert!(
            err.to_string().contains(
                "delete it to have a new one generated, or write at least 32 random bytes"
            ),
            "{err}"
        );
    }
    std::fs::write(&token, &saved).unwrap();
    chmod(&token, 0o644);
    refused(
        Config::for_test(dir.path()),
        &format!(
            "token file {t} is readable or writable by group or others (mode 0644): run chmod 600 {t}",
            t = token.display()
        ),
    );
    chmod(&token, 0o600);
    if as_root() {
        chown(&token, OTHER_UID);
        refused(
            Config::for_test(dir.path()),
            &format!("token file {} is owned by uid 65534", token.display()),
        );
        chown(&token, 0);
        // A link another user planted in place of the token file.
        let (_outside, theirs) = bait();
        write_private(&theirs, "a".repeat(64));
        std::fs::remove_file(&token).unwrap();
        symlink(&theirs, &token).unwrap();
        lchown(&token, OTHER_UID);
        refused(
            Config::for_test(dir.path()),
            &format!(
                "token file {} is a symbolic link (made by uid 65534)",
                token.display()
            ),
        );
        std::fs::remove_file(&token).unwrap();
        write_private(&token, &saved);
    }
    let reopened = Authority::open(Config::for_test(dir.path())).unwrap();
    assert_eq!(reopened.admin_token(), admin);
}

#[test]
fn a_kek_file_must_be_as_private_as_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let kek_file = dir.path().join("kek");
    std::fs::write(&kek_file, Kek::generate().to_hex()).unwrap();
    chmod(&kek_file, 0o644);
    let err = Kek::from_file(&kek_file).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "key-encryption key file {k} is readable or writable by group or others (mode 0644): run chmod 600 {k}",
            k = kek_file.display()
        )),
        "{err}"
    );
    chmod(&kek_file, 0o600);
    Kek::from_file(&kek_file).unwrap();
    if as_root() {
        chown(&kek_file, OTHER_UID);
        let err = Kek::from_file(&kek_file).unwrap_err();
        assert!(err.to_string().contains("is owned by uid 65534"), "{err}");
        let link = dir.path().join("kek-link");
        chown(&kek_file, 0);
        symlink(&kek_file, &link).unwrap();
        lchown(&link, OTHER_UID);
        let err = Kek::from_file(&link).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
    }
}

#[tokio::test]
async fn a_planted_temporary_link_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let (_outside, target) = bait();
    // Planted before the first start, where the ring's temporary file used to be written: the
    // first write of a new ring went through it.
    let planted = dir.path().join(format!("{KEYRING_FILE}.tmp"));
    symlink(&target, &planted).unwrap();
    let clock = Clock::manual(START);
    let auth = TestAuthority::spawn(manual_config(dir.path(), &clock, policy())).await;
    assert_eq!(std::fs::read(&target).unwrap(), UNTOUCHED);
    assert!(
        std::fs::symlink_metadata(&planted).is_err(),
        "the leftover link is unlinked at start"
    );
    assert_eq!(std::fs::read(&target).unwrap(), UNTOUCHED, "not followed");
    let ring = dir.path().join(KEYRING_FILE);
    assert!(std::fs::symlink_metadata(&ring).unwrap().is_file());

    // Planted while the authority runs (another user may do it at any moment): rotations and
    // revocations change the ring, and none of them writes through the link.
    let mut client = auth.client().await;
    let before = std::fs::read(&ring).unwrap();
    for round in 0..3 {
        let _ = std::fs::remove_file(&planted);
        symlink(&target, &planted).unwrap();
        auth.rotate(&mut client).await;
        client
            .revoke_token(auth.admin(pb::RevokeTokenRequest {
                jti: format!("jti-{round}"),
                until: START + 3600,
            }))
            .await
            .unwrap();
    }
    assert_eq!(std::fs::read(&target).unwrap(), UNTOUCHED);
    let meta = std::fs::symlink_metadata(&ring).unwrap();
    assert!(meta.is_file(), "the ring is a file, not the link");
    assert_eq!(mode(&ring), 0o600);
    assert_ne!(
        std::fs::read(&ring).unwrap(),
        before,
        "the changes were written"
    );
    // Only the planted link is left beside the ring and the token files.
    assert_eq!(temporaries(dir.path()), [format!("{KEYRING_FILE}.tmp")]);
    auth.stop().await;
}

/// The names of the temporary files in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// A crash's leftovers under the random temporary names go at the next start, links
/// unfollowed.
#[tokio::test]
async fn a_crash_leftover_is_unlinked_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_outside, target) = bait();
    drop(Authority::open(Config::for_test(dir.path())).unwrap());
    symlink(
        &target,
        dir.path()
            .join(format!("{KEYRING_FILE}.tmp.00112233aabbccdd")),
    )
    .unwrap();
    let auth = TestAuthority::spawn(Config::for_test(dir.path())).await;
    let strays = temporaries(dir.path());
    assert!(strays.is_empty(), "{strays:?}");
    assert_eq!(std::fs::read(&target).unwrap(), UNTOUCHED);
    auth.stop().await;
}
