//! The one place for gRPC client settings: every channel keyfleet opens (the CLI's commands,
//! the admin client, the load generator, a verifier following its authority) is built by
//! [`endpoint`] from one of the [`Settings`] presets, with TLS when the URL is `https://`.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

/// How a client channel behaves: how long it may take to connect, how long one call may take,
/// and whether it pings an idle connection to find out it is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A TCP (and TLS) connection not established by then is an error.
    pub connect_timeout: Duration,
    /// A call not answered by then fails with `CANCELLED`; `None` for channels that carry
    /// long-lived streams (their callers bound each call themselves).
    pub request_timeout: Option<Duration>,
    /// HTTP/2 pings, so a peer that vanished without a reset (a killed process, a dropped
    /// route) is noticed and the channel reconnects; `None` leaves hyper's default (no pings).
    pub keepalive: Option<Keepalive>,
}

/// HTTP/2 keepalive pings of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// A ping after this long without a frame from the server.
    pub interval: Duration,
    /// The connection is dead when a ping is not answered within this.
    pub timeout: Duration,
    /// Ping even with no call in flight (a load generator's connections idle between bursts
    /// and must be known good when the next request goes out).
    pub while_idle: bool,
}

/// A command an operator runs (`token`, `keys`, `health`) and the local cluster's helpers: the
/// server is expected to be up, so a short connect; 10 s is far beyond any admin call.
const COMMAND_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const COMMAND_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The load generator: a request that has not been answered by this deadline is retried on
/// another node, so it is short; a lost connection must not hold a worker longer either.
const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const LOAD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A killed node sends no reset: 1 s pings answered within 1 s find the dead connection within
/// ~2 s, so the channel reconnects instead of sending every request into the void.
const LOAD_KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(1),
    timeout: Duration::from_secs(1),
    while_idle: true,
};

/// A verifier following its authority: the watch stream lives for hours, so no per-call
/// deadline (each pull has its own); pings every 10 s (answered within 5 s) find a dead
/// authority or route quickly enough for the node to fall back to pulls and reconnect with
/// backoff, without adding noticeable traffic at the authority across a large fleet.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const UPSTREAM_KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(10),
    timeout: Duration::from_secs(5),
    while_idle: false,
};

impl Settings {
    /// A command an operator runs, and the local cluster's own calls.
    pub const COMMAND: Settings = Settings {
        connect_timeout: COMMAND_CONNECT_TIMEOUT,
        request_timeout: Some(COMMAND_REQUEST_TIMEOUT),
        keepalive: None,
    };
    /// The load generator's connections (to the verifiers and to the authority that mints).
    pub const LOAD: Settings = Settings {
        connect_timeout: LOAD_CONNECT_TIMEOUT,
        request_timeout: Some(LOAD_REQUEST_TIMEOUT),
        keepalive: Some(LOAD_KEEPALIVE),
    };
    /// A verifier's one channel to its authority (the watch stream and the pulls).
    pub const UPSTREAM: Settings = Settings {
        connect_timeout: UPSTREAM_CONNECT_TIMEOUT,
        request_timeout: None,
        keepalive: Some(UPSTREAM_KEEPALIVE),
    };
}

/// Why a URL cannot be made into a channel.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{url:?} is not a gRPC URL (write it like http://127.0.0.1:7000, or https:// for TLS)")]
    BadUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot set up TLS for {url}")]
    Tls {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Nothing answered at the URL (refused, timed out, TLS handshake failed).
    #[error("cannot reach {url}")]
    Unreachable {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The endpoint for `url` with `settings`, over TLS (`tls`) when `url` is `https://`. Every
/// channel keyfleet opens is built here; `.connect_lazy()` it to connect on first use.
pub fn endpoint(
    url: &str,
    tls: &ClientTls,
    settings: &Settings,
) -> Result<Endpoint, EndpointError> {
    let mut endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|source| EndpointError::BadUrl {
            url: url.to_owned(),
            source,
        })?;
    if url.starts_with("https://") {
        endpoint =
            endpoint
                .tls_config(tls.tonic_config())
                .map_err(|source| EndpointError::Tls {
                    url: url.to_owned(),
                    source,
                })?;
    }
    // Requests are small (a token, a key set request): never hold one back to fill a segment.
    endpoint = endpoint
        .tcp_nodelay(true)
        .connect_timeout(settings.connect_timeout);
    if let Some(timeout) = settings.request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    if let Some(k) = settings.keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(k.interval)
            .keep_alive_timeout(k.timeout)
            .keep_alive_while_idle(k.while_idle);
    }
    Ok(endpoint)
}

/// A channel to `url`, connected now (so an unreachable server is reported here, not by the
/// first call).
pub async fn connect(
    url: &str,
    tls: &ClientTls,
    settings: &Settings,
) -> Result<Channel, ConnectError> {
    endpoint(url, tls, settings)?
        .connect()
        .await
        .map_err(|source| ConnectError::Unreachable {
            url: url.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_shape_the_endpoint() {
        let tls = ClientTls::default();
        let e = endpoint("http://127.0.0.1:1", &tls, &Settings::LOAD).unwrap();
        assert_eq!(e.get_connect_timeout(), Some(LOAD_CONNECT_TIMEOUT));
        assert!(e.get_tcp_nodelay());
        let e = endpoint("https://127.0.0.1:1", &tls, &Settings::UPSTREAM).unwrap();
        assert_eq!(e.get_connect_timeout(), Some(UPSTREAM_CONNECT_TIMEOUT));
    }

    #[test]
    fn a_bad_url_says_how_to_write_one() {
        let e = endpoint("not a url", &ClientTls::default(), &Settings::COMMAND).unwrap_err();
        assert!(matches!(e, EndpointError::BadUrl { .. }), "{e:?}");
        assert!(e.to_string().contains("http://127.0.0.1:7000"), "{e}");
    }
}
