//! gRPC bindings for the `keyfleet.v1` package, generated from `proto/` by `build.rs`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `keyfleet.v1` package: the Authority and Verifier services and their messages.
pub mod v1 {
    tonic::include_proto!("keyfleet.v1");
}

/// The same services, server side only, answering `JwksSnapshot` with
/// [`wire::EncodedSnapshot`]: bytes encoded once and sent to every watcher as they are. The
/// authority and relays serve `encoded::authority_server`; clients use [`v1`].
pub mod encoded {
    include!(concat!(env!("OUT_DIR"), "/encoded/keyfleet.v1.rs"));
}

pub mod wire;

/// The encoded `FileDescriptorSet` of every keyfleet proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keyfleet_descriptor.bin"));
