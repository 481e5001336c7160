//! Every refusal of an unsafe file at start exits 64 and says what to run (issue 11, items 2
//! and 4), through the real binary: a data dir others can write, a one-character admin token,
//! a key-set cache another user could have planted. The tests run as root: files handed to
//! uid 65534 play the other user's.

use std::os::unix::fs::symlink;

use keyfleet_testkit::files::{OTHER_UID, as_root, chmod, chown, write_private};

use super::*;

fn authority_once(dir: &Path) -> Output {
    keyfleet(
        &on_port_0("authority", &["--data-dir", dir.to_str().unwrap()]),
        None,
    )
}

fn verifier_once(cache: &Path) -> Output {
    keyfleet(
        &on_port_0(
            "verifier",
            &[
                // A JWKS URL needs no fleet credential: only the cache is under test.
                "--jwks-url",
                "http://127.0.0.1:1/jwks.json",
                "--issuer",
                "https://issuer.test",
                "--any-audience",
                "--cache-dir",
                cache.to_str().unwrap(),
            ],
        ),
        None,
    )
}

/// Exit 64 with `want` on stderr.
fn exits_64(o: &Output, want: &str) {
    assert_eq!(o.status.code(), Some(64), "{}", stderr(o));
    assert!(stderr(o).contains(want), "{:?} lacks {want:?}", stderr(o));
}

#[test]
fn unsafe_key_and_token_files_refuse_the_authority_with_exit_64() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o775);
    exits_64(
        &authority_once(&dir),
        &format!(
            "data dir {d} is writable by group or others (mode 0775): run chmod 700 {d}",
            d = dir.display()
        ),
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );

    // A planted one-character admin token (0600, ours: only its length is wrong).
    chmod(&dir, 0o700);
    let token = dir.join("admin.token");
    write_private(&token, "x\n");
    exits_64(
        &authority_once(&dir),
        &format!(
            "the token file {} holds a 1-byte token, too short to resist guessing (at least 32 bytes are needed): delete it to have a new one generated, or write at least 32 random bytes",
            token.display()
        ),
    );
    assert!(!dir.join("keyring.json").exists(), "nothing written");

    // A KEK file others can read.
    std::fs::remove_file(&token).unwrap();
    let kek = root.path().join("kek");
    std::fs::write(&kek, "00".repeat(32)).unwrap();
    chmod(&kek, 0o644);
    let o = keyfleet(
        &on_port_0(
            "authority",
            &[
                "--data-dir",
                dir.to_str().unwrap(),
                "--kek-file",
                kek.to_str().unwrap(),
            ],
        ),
        None,
    );
    exits_64(
        &o,
        &format!(
            "key-encryption key file {k} is readable or writable by group or others (mode 0644): run chmod 600 {k}",
            k = kek.display()
        ),
    );
}

#[test]
fn a_planted_key_set_cache_refuses_the_verifier_with_exit_64() {
    let root = tempfile::tempdir().unwrap();
    let cache_dir = root.path().join("cache");
    std::fs::create_dir(&cache_dir).unwrap();
    chmod(&cache_dir, 0o777);
    exits_64(
        &verifier_once(&cache_dir),
        &format!(
            "cache dir {d} is writable by group or others (mode 0777): run chmod 700 {d}",
            d = cache_dir.display()
        ),
    );
    chmod(&cache_dir, 0o700);
    let cache = cache_dir.join("jwks-cache.json");
    std::fs::write(&cache, b"{}").unwrap();
    chmod(&cache, 0o644);
    exits_64(
        &verifier_once(&cache_dir),
        &format!(
            "key set cache {c} is readable or writable by group or others (mode 0644): run chmod 600 {c}",
            c = cache.display()
        ),
    );
    if as_root() {
        chmod(&cache, 0o600);
        chown(&cache, OTHER_UID);
        exits_64(
            &verifier_once(&cache_dir),
            &format!(
                "key set cache {c} is owned by uid 65534, but keyfleet runs as uid 0: run chown 0 {c}",
                c = cache.display()
            ),
        );
    }
    std::fs::remove_file(&cache).unwrap();
    let elsewhere = root.path().join("forged.json");
    write_private(&elsewhere, b"{}");
    symlink(&elsewhere, &cache).unwrap();
    exits_64(
        &verifier_once(&cache_dir),
        &format!("key set cache {} is a symbolic link", cache.display()),
    );
}
