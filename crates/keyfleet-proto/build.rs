//! Generates the gRPC bindings from `proto/` with protox (pure Rust, no `protoc` needed), and
//! writes the encoded descriptor set that gRPC server reflection serves.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "keyfleet/v1/common.proto",
        "keyfleet/v1/authority.proto",
        "keyfleet/v1/verifier.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("keyfleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
