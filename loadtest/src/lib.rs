//! keyfleet's load generator, and the local cluster (an authority and N verifiers on loopback)
//! that `keyfleet demo`, `keyfleet loadtest --local` and the end-to-end tests start.

pub mod cluster;
pub mod cpu;
pub mod curve;
pub mod engine;
pub mod fanout;
pub mod html;
pub mod login;
pub mod report;

pub use engine::{Invalid, Load, LoadOptions, Pick, Target, run};
pub use report::Report;
