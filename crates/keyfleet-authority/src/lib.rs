//! keyfleet-authority
