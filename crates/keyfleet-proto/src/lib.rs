//! gRPC bindings for the `keyfleet.v1` package, generated from `proto/` by `build.rs`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `keyfleet.v1` package: the Authority and Verifier services and their messages.
pub mod v1 {
    tonic::include_proto!("keyfleet.v1");
}

/// The encoded `FileDescriptorSet` of every keyfleet proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keyfleet_descriptor.bin"));
