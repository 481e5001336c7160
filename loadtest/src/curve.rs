//! Which field backend curve25519-dalek (under ed25519-dalek: every signature check of the
//! verifiers, and of this process) runs on this machine: the report's `curve_backend`.
//!
//! The crate picks it at run time and has no public API that says which, so this mirrors its
//! rules (curve25519-dalek 5.x: `build.rs` for what is compiled in, `get_selected_backend` in
//! `backend.rs` for the pick), read from the same cfgs, which `.cargo/config.toml` or
//! `RUSTFLAGS` give every crate of the build:
//! - compiled in: with `--cfg curve25519_dalek_backend="avx512"`, the AVX-512 IFMA and AVX2
//!   backends; with `"simd"`, AVX2; with `"serial"` or `"fiat"`, that one only; with none, AVX-512
//!   IFMA and AVX2 when the compile target itself has `avx512ifma` and `avx512vl` (e.g.
//!   `-C target-cpu=native` on such a CPU), else AVX2 — the vector backends only on x86_64 with
//!   64-bit arithmetic; the serial code is always there as the last fallback;
//! - picked at run time: AVX-512 IFMA when compiled in and the CPU has `avx512ifma` and
//!   `avx512vl`, else AVX2 when compiled in and the CPU has `avx2`, else serial (or fiat).

/// The backends this build of curve25519-dalek holds, best first.
pub const COMPILED: &[&str] = compiled();

const fn compiled() -> &'static [&'static str] {
    const IFMA: &[&str] = &["avx512ifma", "avx2", "serial"];
    const AVX2: &[&str] = &["avx2", "serial"];
    let bits64 = cfg!(curve25519_dalek_bits = "64")
        || (!cfg!(curve25519_dalek_bits = "32") && cfg!(target_pointer_width = "64"));
    let vector = cfg!(target_arch = "x86_64") && bits64;
    // The crate's build script reads the cfg as one value: two of them count as none.
    match (
        cfg!(curve25519_dalek_backend = "fiat"),
        cfg!(curve25519_dalek_backend = "serial"),
        cfg!(curve25519_dalek_backend = "simd"),
        cfg!(curve25519_dalek_backend = "avx512"),
    ) {
        (true, false, false, false) => &["fiat"],
        (false, true, false, false) => &["serial"],
        // Either cfg without a vector target does not compile curve25519-dalek at all.
        (false, false, true, false) => AVX2,
        (false, false, false, true) => IFMA,
        _ if vector
            && cfg!(all(
                target_feature = "avx512ifma",
                target_feature = "avx512vl"
            )) =>
        {
            IFMA
        }
        _ if vector => AVX2,
        _ => &["serial"],
    }
}

/// `"avx512ifma"`, `"avx2"`, `"serial"` or `"fiat"`: the backend curve25519-dalek runs here.
pub fn backend() -> &'static str {
    let compiled = |b: &str| COMPILED.contains(&b);
    #[cfg(target_arch = "x86_64")]
    {
        if compiled("avx512ifma")
            && std::arch::is_x86_feature_detected!("avx512ifma")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return "avx512ifma";
        }
        if compiled("avx2") && std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    if compiled("fiat") { "fiat" } else { "serial" }
}

#[cfg(test)]
mod tests {
    use super::{COMPILED, backend};

    /// The backend named is one this build holds, and a build always holds a fallback.
    #[test]
    fn names_a_compiled_backend() {
        assert!(
            COMPILED.contains(&backend()),
            "{} not in {COMPILED:?}",
            backend()
        );
        assert!(COMPILED.contains(&"serial") || COMPILED.contains(&"fiat"));
    }
}
