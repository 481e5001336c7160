//! A message encoded once and sent many times.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};

/// A `keyfleet.v1.JwksSnapshot` already encoded: writing it copies the bytes, nothing else.
/// Cloning it shares them. Build one with [`EncodedSnapshot::encode`]; servers in
/// [`crate::encoded`] answer with it. Decoding into it is never needed (servers do not receive
/// snapshots) and keeps nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedSnapshot(pub Bytes);

impl EncodedSnapshot {
    /// Encodes `snapshot` once.
    pub fn encode(snapshot: &crate::v1::JwksSnapshot) -> EncodedSnapshot {
        EncodedSnapshot(Bytes::from(prost::Message::encode_to_vec(snapshot)))
    }

    /// The encoded length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty message.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Decodes the bytes back into a snapshot (tests and diagnostics).
    pub fn decode(&self) -> Result<crate::v1::JwksSnapshot, prost::DecodeError> {
        prost::Message::decode(self.0.clone())
    }
}

impl prost::Message for EncodedSnapshot {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{JwksSnapshot, RevokedToken};

    #[test]
    fn the_bytes_go_out_as_they_are() {
        let snapshot = JwksSnapshot {
            version: 7,
            issuer: "https://issuer.test".into(),
            revoked_tokens: vec![RevokedToken {
                jti: "j1".into(),
                until: 99,
            }],
            ..Default::default()
        };
        let once = EncodedSnapshot::encode(&snapshot);
        let mut out = Vec::new();
        prost::Message::encode(&once, &mut out).unwrap();
        assert_eq!(out, prost::Message::encode_to_vec(&snapshot));
        assert_eq!(once.decode().unwrap(), snapshot);
    }
}
