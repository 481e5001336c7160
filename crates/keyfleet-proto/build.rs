//! Generates the gRPC bindings from `proto/` with protox (pure Rust, no `protoc` needed), and
//! writes the encoded descriptor set that gRPC server reflection serves.
//!
//! The services are generated twice: once as usual (every message, clients and servers), and
//! once server-only into `OUT_DIR/encoded/`, where every message is the usual one except
//! `JwksSnapshot`, which is [`EncodedSnapshot`](crate::wire::EncodedSnapshot): bytes encoded
//! once and sent as they are. That server is the one authorities and relays serve, so a change
//! is serialized once for every watcher, not once per watcher. Clients see no difference.
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
    tonic_prost_build::configure().compile_fds(fds.clone())?;
    let encoded = out.join("encoded");
    std::fs::create_dir_all(&encoded)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&encoded)
        .extern_path(".keyfleet.v1.JwksSnapshot", "crate::wire::EncodedSnapshot")
        .extern_path(".keyfleet.v1", "crate::v1")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
