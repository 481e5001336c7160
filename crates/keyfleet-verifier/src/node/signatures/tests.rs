//! Signatures checked together get the answer `verify_strict` gives each alone: the Wycheproof
//! Ed25519 vectors, and keys and `R`s with small-order components, in random batches.

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha512};

use super::*;

const WYCHEPROOF: &str =
    include_str!("../../../../keyfleet-core/tests/data/wycheproof_ed25519_test.json");

/// A small seeded generator (xorshift64*), so every run checks the same batches.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

struct Case {
    what: String,
    key: VerifyingKey,
    message: Vec<u8>,
    signature: Signature,
}

impl Case {
    fn signed(&self) -> Signed<'_> {
        Signed {
            key: self.key,
            message: &self.message,
            signature: self.signature,
        }
    }

    fn alone(&self) -> bool {
        strict(&self.signed())
    }
}

/// Checks `cases` shuffled into batches of 1 to 64, `rounds` times; returns every case whose
/// answer differed from its lone check, and how many batches fell back.
fn differences(cases: &[Case], unbatchable: &Unbatchable, rounds: usize) -> (Vec<String>, usize) {
    let want: Vec<bool> = cases.iter().map(Case::alone).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut order: Vec<usize> = (0..cases.len()).collect();
    let (mut wrong, mut fell_back) = (Vec::new(), 0);
    for _ in 0..rounds {
        rng.shuffle(&mut order);
        let mut rest = &order[..];
        while !rest.is_empty() {
            let (batch, more) = rest.split_at((1 + rng.below(64)).min(rest.len()));
            rest = more;
            let signed: Vec<Signed<'_>> = batch.iter().map(|&i| cases[i].signed()).collect();
            let checked = check_all(&signed, unbatchable);
            fell_back += usize::from(checked.fell_back);
            for (&i, good) in batch.iter().zip(checked.good) {
                if good != want[i] {
                    wrong.push(format!("{} (alone {})", cases[i].what, want[i]));
                }
            }
        }
    }
    (wrong, fell_back)
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn blocklisted_r_values_are_exactly_the_weak_points() {
    for y in SMALL_ORDER_Y {
        for sign in [0u8, 0x80] {
            let mut r = y;
            r[31] |= sign;
            // Either no point at all, or a small-order one.
            if let Ok(k) = VerifyingKey::from_bytes(&r) {
                assert!(k.is_weak(), "{r:?}");
            }
        }
    }
    let key = SigningKey::from_bytes(&[9; 32]);
    for i in 0..64u8 {
        assert!(plausible(&key.sign(&[i])));
    }
}

#[test]
fn wycheproof_vectors_checked_together_answer_as_alone() {
    let data: serde_json::Value = serde_json::from_str(WYCHEPROOF).unwrap();
    let (mut cases, mut weak) = (Vec::new(), Vec::new());
    for group in data["testGroups"].as_array().unwrap() {
        let pk = hex(group["publicKey"]["pk"].as_str().unwrap());
        let key = <[u8; 32]>::try_from(pk.as_slice())
            .ok()
            .and_then(|b| VerifyingKey::from_bytes(&b).ok());
        for t in group["tests"].as_array().unwrap() {
            let valid = t["result"] == "valid";
            let sig = <[u8; 64]>::try_from(hex(t["sig"].as_str().unwrap()).as_slice());
            let (Some(key), Ok(sig)) = (key, sig) else {
                // No key or no 64-byte signature: never reaches a signature check.
                assert!(!valid, "tcId {}", t["tcId"]);
                continue;
            };
            if key.is_weak() {
                weak.push(key.to_bytes());
            }
            let case = Case {
                what: format!("tcId {} ({})", t["tcId"], t["comment"]),
                key,
                message: hex(t["msg"].as_str().unwrap()),
                signature: Signature::from_bytes(&sig),
            };
            // Screening refuses weak keys, so a node never accepts their signatures.
            assert_eq!(case.alone() && !key.is_weak(), valid, "{}", case.what);
            cases.push(case);
        }
    }
    assert!(cases.len() > 100, "{}", cases.len());
    let (wrong, fell_back) = differences(&cases, &Unbatchable(weak), 20);
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(fell_back > 0);
}

/// `sum(bytes[i] * 256^i) mod l`, with the scalar type of `like` (curve25519-dalek's
/// `Scalar`, which this crate does not name).
fn reduce<S>(bytes: &[u8], like: S) -> S
where
    S: Copy + From<u64> + std::ops::Mul<Output = S> + std::ops::Add<Output = S>,
{
    let _ = like;
    let base = S::from(256);
    bytes
        .iter()
        .rev()
        .fold(S::from(0), |acc, &b| acc * base + S::from(u64::from(b)))
}

/// The point of order 8 whose multiples are every small-order point.
fn torsion(multiple: u8) -> ed25519_dalek::VerifyingKey {
    let eight = VerifyingKey::from_bytes(&SMALL_ORDER_Y[3])
        .unwrap()
        .to_edwards();
    let mut point = VerifyingKey::from_bytes(&SMALL_ORDER_Y[1])
        .unwrap()
        .to_edwards();
    for _ in 0..multiple {
        point += eight;
    }
    VerifyingKey::from_bytes(&point.compress().to_bytes()).unwrap()
}

/// A signature by the holder of `signer` on `message` under the public key `published`
/// (which may differ from `signer`'s by a small-order point), with `R` = `r·B` plus the
/// small-order point `torsion(r_torsion)`: what only the private key's holder can make.
fn crafted(
    signer: &SigningKey,
    published: &VerifyingKey,
    nonce: u8,
    r_torsion: u8,
    message: &[u8],
) -> Signature {
    let a = signer.to_scalar();
    let nonce = SigningKey::from_bytes(&[nonce; 32]);
    let r = nonce.to_scalar();
    let big_r = (nonce.verifying_key().to_edwards() + torsion(r_torsion).to_edwards())
        .compress()
        .to_bytes();
    let hash = Sha512::new()
        .chain_update(big_r)
        .chain_update(published.as_bytes())
        .chain_update(message)
        .finalize();
    let h = reduce(&hash, a);
    let s = r + h * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&big_r);
    sig[32..].copy_from_slice(&s.to_bytes());
    Signature::from_bytes(&sig)
}

/// Good signatures, forged ones, every signature `plausible` screens out, and signatures under
/// keys with a small-order component (of order 8, 4 and 2), some of which `verify_strict`
/// accepts: checked together, each gets its lone answer, and only because such keys are kept
/// out of the batch.
#[test]
fn small_order_components_never_change_a_verdict() {
    let clean = SigningKey::from_bytes(&[1; 32]);
    let mut cases = Vec::new();
    let mut mixed_keys = Vec::new();
    for i in 0..48u8 {
        let message = format!("header.claims-{i}").into_bytes();
        let signature = clean.sign(&message);
        let mut forged = signature.to_bytes();
        forged[usize::from(i) % 64] ^= 1 << (i % 8);
        for (what, signature) in [
            ("good", signature),
            ("forged", Signature::from_bytes(&forged)),
        ] {
            cases.push(Case {
                what: format!("{what} {i}"),
                key: clean.verifying_key(),
                message: message.clone(),
                signature,
            });
        }
    }
    // R of small order (every encoding, both signs) or not canonical; S not canonical.
    let message = b"header.claims".to_vec();
    let good = clean.sign(&message).to_bytes();
    let mut bad_r: Vec<[u8; 32]> = SMALL_ORDER_Y
        .iter()
        .flat_map(|y| {
            [0u8, 0x80].map(|sign| {
                let mut r = *y;
                r[31] |= sign;
                r
            })
        })
        .collect();
    let mut p = [0xff; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    bad_r.push(p);
    for (i, r) in bad_r.into_iter().enumerate() {
        let mut sig = good;
        sig[..32].copy_from_slice(&r);
        cases.push(Case {
            what: format!("screened R {i}"),
            key: clean.verifying_key(),
            message: message.clone(),
            signature: Signature::from_bytes(&sig),
        });
    }
    // S + l: the same scalar, not reduced.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut sig = good;
    let mut carry = 0u16;
    for (i, l) in L.iter().enumerate() {
        let sum = u16::from(sig[32 + i]) + u16::from(*l) + carry;
        sig[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    let unreduced = Case {
        what: "S + l".into(),
        key: clean.verifying_key(),
        message: message.clone(),
        signature: Signature::from_bytes(&sig),
    };
    assert!(plausible(&unreduced.signature) && !unreduced.alone());
    cases.push(unreduced);
    // Keys with a small-order component, their owners' signatures with every small-order
    // component in R: `verify_strict` accepts those where the two cancel.
    for (seed, multiple) in [(11u8, 1u8), (12, 2), (13, 4)] {
        let owner = SigningKey::from_bytes(&[seed; 32]);
        let published = VerifyingKey::from_bytes(
            &(owner.verifying_key().to_edwards() + torsion(multiple).to_edwards())
                .compress()
                .to_bytes(),
        )
        .unwrap();
        assert!(!published.is_weak() && !batchable(&published));
        mixed_keys.push(published);
        for (nonce, k) in (0..8u8).flat_map(|n| (0..8u8).map(move |k| (n, k))) {
            let message = format!("header.mixed-{seed}-{nonce}").into_bytes();
            let signature = crafted(&owner, &published, 100 + nonce, k, &message);
            cases.push(Case {
                what: format!("key with torsion {multiple}, nonce {nonce}, R torsion {k}"),
                key: published,
                message,
                signature,
            });
        }
    }
    let accepted = cases.iter().filter(|c| c.alone()).count();
    assert!(
        accepted > 48,
        "some signatures under keys with torsion verify: {accepted}"
    );
    let jwks: Vec<_> = (0..mixed_keys.len())
        .map(|i| keyfleet_core::Jwk::ed25519(&format!("m{i}"), &mixed_keys[i].to_bytes()))
        .chain([keyfleet_core::Jwk::ed25519(
            "clean",
            &clean.verifying_key().to_bytes(),
        )])
        .collect();
    let (keys, _) = KeySet::build(1, None, &jwks, Vec::new(), Vec::new());
    let unbatchable = Unbatchable::of(&keys);
    assert_eq!(unbatchable.0.len(), 3, "exactly the keys with torsion");
    let (wrong, fell_back) = differences(&cases, &unbatchable, 40);
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(fell_back > 0);
    // Without that screen the batch equation would accept some the strict check refuses.
    let (wrong, _) = differences(&cases, &Unbatchable::default(), 40);
    assert!(!wrong.is_empty(), "the test cases exercise the screen");
}

/// The one case ARCHITECTURE's invariant 6 leaves: an `R` with a torsion component under a
/// clean key, made by the key's owner. Alone it is always refused; inside a batch it may pass,
/// but it never changes another signature's answer.
#[test]
fn a_torsion_component_in_r_never_changes_another_verdict() {
    let owner = SigningKey::from_bytes(&[21; 32]);
    let key = owner.verifying_key();
    // (not crafted, message, signature)
    let mut cases = Vec::new();
    for i in 0..32u8 {
        let message = format!("header.claims-{i}").into_bytes();
        let signature = owner.sign(&message);
        let mut forged = signature.to_bytes();
        forged[40] ^= 1 << (i % 8);
        cases.push((true, message.clone(), signature));
        cases.push((true, message.clone(), Signature::from_bytes(&forged)));
        let crafted = crafted(&owner, &key, 50 + i, 1 + i % 7, &message);
        assert!(key.verify_strict(&message, &crafted).is_err());
        cases.push((false, message, crafted));
    }
    let mut rng = Rng(7);
    for _ in 0..50 {
        rng.shuffle(&mut cases);
        for batch in cases.chunks(2 + rng.below(30)) {
            let signed: Vec<Signed<'_>> = batch
                .iter()
                .map(|(_, message, signature)| Signed {
                    key,
                    message,
                    signature: *signature,
                })
                .collect();
            let checked = check_all(&signed, &Unbatchable::default());
            for ((clean, message, signature), good) in batch.iter().zip(checked.good) {
                if *clean {
                    assert_eq!(good, key.verify_strict(message, signature).is_ok());
                }
            }
        }
    }
}
