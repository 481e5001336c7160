//! Ed25519 signatures checked together, each answer what `verify_strict` gives it alone: the
//! one signature check behind `VerifyBatch` (`batch.rs`) and the combined single `Verify`
//! calls (`combine.rs`).
//!
//! One batch equation (random 128-bit coefficients, cofactorless) checks n signatures for much
//! less than n strict checks. For a canonical, torsion-free key and a plausible signature it
//! holds exactly when every signature would pass `verify_strict`; the rest is screened:
//! - a signature `verify_strict` refuses whatever the key and message (`S` not canonical, `R`
//!   not a canonical encoding or of small order) is refused before the batch ([`plausible`]);
//! - a key that is weak or carries a small-order (torsion) component, which screening lets
//!   through, is found once per key set ([`Unbatchable`]) and its signatures are checked on
//!   their own, strictly: with such a key the batch equation could accept what
//!   `verify_strict` refuses;
//! - when the batch fails, each signature in it is checked on its own, so a forged one costs
//!   the others time, never their verdict; a lone signature is never batched.
//!
//! The one case left (ARCHITECTURE's invariant 6): an `R` with a torsion component under a
//! torsion-free key. `verify_strict` always refuses it; a batch holding it accepts it when the
//! component's order divides its coefficient. Only the holder of the private key can make such
//! a signature (its `s` must match the rest of the equation), and screening every `R` for it
//! costs a full scalar multiplication, more than the batch saves, so it is not done.

use ed25519_dalek::{Signature, VerifyingKey};
use keyfleet_core::KeySet;

/// One signature to check: the key, the signed bytes, the signature.
pub(crate) struct Signed<'t> {
    pub(crate) key: VerifyingKey,
    pub(crate) message: &'t [u8],
    pub(crate) signature: Signature,
}

/// What [`check_all`] found.
pub(crate) struct Checked {
    /// Per signature, in order: whether `verify_strict` accepts it.
    pub(crate) good: Vec<bool>,
    /// True when a batch equation failed and its signatures were checked one by one.
    pub(crate) fell_back: bool,
}

/// The keys of a key set the batch equation cannot vouch for: weak ones and those with a
/// torsion component. Almost always empty (a key made by `SigningKey` never has one).
#[derive(Debug, Default)]
pub(crate) struct Unbatchable(Vec<[u8; 32]>);

impl Unbatchable {
    /// Finds them in `keys` (a scalar multiplication per key, once per key set).
    pub(crate) fn of(keys: &KeySet) -> Unbatchable {
        Unbatchable(
            keys.kids()
                .filter_map(|kid| keys.key(kid))
                .filter(|key| !batchable(key))
                .map(|key| key.to_bytes())
                .collect(),
        )
    }

    fn contains(&self, key: &VerifyingKey) -> bool {
        !self.0.is_empty() && self.0.contains(key.as_bytes())
    }
}

/// True when the batch equation gives `key`'s signatures the verdict `verify_strict` gives.
fn batchable(key: &VerifyingKey) -> bool {
    !key.is_weak() && key.to_edwards().is_torsion_free()
}

fn strict(s: &Signed<'_>) -> bool {
    s.key.verify_strict(s.message, &s.signature).is_ok()
}

/// Checks every signature, with one batch equation for those that can share one.
pub(crate) fn check_all(signed: &[Signed<'_>], unbatchable: &Unbatchable) -> Checked {
    let mut good = vec![false; signed.len()];
    let mut batch = Vec::with_capacity(signed.len());
    for (i, s) in signed.iter().enumerate() {
        if !plausible(&s.signature) {
            continue;
        }
        if unbatchable.contains(&s.key) {
            good[i] = strict(s);
        } else {
            batch.push(i);
        }
    }
    let mut fell_back = false;
    match batch[..] {
        [] => {}
        [i] => good[i] = strict(&signed[i]),
        _ => {
            let messages: Vec<&[u8]> = batch.iter().map(|&i| signed[i].message).collect();
            let signatures: Vec<Signature> = batch.iter().map(|&i| signed[i].signature).collect();
            let keys: Vec<VerifyingKey> = batch.iter().map(|&i| signed[i].key).collect();
            if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
                for &i in &batch {
                    good[i] = true;
                }
            } else {
                fell_back = true;
                for &i in &batch {
                    good[i] = strict(&signed[i]);
                }
            }
        }
    }
    Checked { good, fell_back }
}

/// False for a signature `verify_strict` refuses whatever the key and message: `S` not
/// canonical, `R` not a canonical encoding, or `R` of small order. Batch verification checks
/// only the first, so the other two are screened here (libsodium's blocklist, sign bit ignored).
pub(crate) fn plausible(signature: &Signature) -> bool {
    let r = signature.r_bytes();
    let mut y = *r;
    y[31] &= 0x7f;
    // y >= p = 2^255 - 19 is a non-canonical encoding.
    let non_canonical = y[31] == 0x7f && y[1..31].iter().all(|b| *b == 0xff) && y[0] >= 0xed;
    let small_order = SMALL_ORDER_Y.contains(&y);
    // A canonical `S` is below the group order; a set top bit is never canonical.
    let s_plausible = signature.s_bytes()[31] & 0xe0 == 0;
    !non_canonical && !small_order && s_plausible
}

/// The `y` coordinates (sign bit cleared) of the eight small-order points.
pub(crate) const SMALL_ORDER_Y: [[u8; 32]; 5] = [
    // y = 0: the two points of order 4.
    [0; 32],
    // y = 1: the identity.
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // y = p - 1: the point of order 2.
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // The four points of order 8.
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
];

#[cfg(test)]
mod tests;
