//! Plumbing shared by keyfleet's servers: the one clock, telemetry init, serving gRPC and HTTP
//! on already-bound listeners, and shutdown.

pub mod client;
pub mod clock;
pub mod credentials;
pub mod limits;
pub mod metrics_bridge;
pub mod rpc_trace;
#[cfg(unix)]
pub mod secure_fs;
pub mod serve;
pub mod telemetry;
pub mod tls;

pub use clock::Clock;
pub use tokio_util::sync::CancellationToken;

/// Parses a humane duration (`90s`, `15m`, `24h`, `1h30m`) for clap.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 90s, 15m or 24h)"))
}

/// An error and every cause below it, joined by ": " (how the binary prints an error, and how a
/// log line should carry one: library errors do not repeat their cause in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
