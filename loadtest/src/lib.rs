//! keyfleet-loadtest
