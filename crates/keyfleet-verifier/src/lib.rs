//! keyfleet-verifier
