//! Declares the cfgs `src/curve.rs` reads to know which field backends curve25519-dalek compiled
//! in (the ones `.cargo/config.toml` or `RUSTFLAGS` may set for every crate of the build).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!(
        r#"cargo::rustc-check-cfg=cfg(curve25519_dalek_backend, values("fiat", "serial", "simd", "avx512"))"#
    );
    println!(r#"cargo::rustc-check-cfg=cfg(curve25519_dalek_bits, values("32", "64"))"#);
}
