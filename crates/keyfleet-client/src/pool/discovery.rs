//! Where the pool's nodes are: a static list of URLs, or a DNS name resolved again every
//! `every` (new addresses are added; addresses gone are drained: no new request goes to them,
//! the ones in flight finish). Resolution goes through [`Resolve`], so tests (and service
//! meshes with their own discovery) can supply the answer.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::verdict::BoxFuture;

/// Where a [`crate::VerifierPool`]'s nodes come from.
#[derive(Clone)]
pub enum Endpoints {
    /// These gRPC URLs (`http://host:port`, `https://` for TLS), each one node.
    Static(Vec<String>),
    /// Every address `host` resolves to, at `port`, re-resolved every `every`.
    Dns {
        host: String,
        port: u16,
        /// `https` when true (the certificate must name `host`), else `http`.
        tls: bool,
        every: Duration,
        resolver: Arc<dyn Resolve>,
    },
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoints::Static(urls) => f.debug_tuple("Static").field(urls).finish(),
            Endpoints::Dns {
                host, port, every, ..
            } => f
                .debug_struct("Dns")
                .field("host", host)
                .field("port", port)
                .field("every", every)
                .finish_non_exhaustive(),
        }
    }
}

/// Resolves a host name to socket addresses.
pub trait Resolve: Send + Sync + 'static {
    /// Every address of `host` at `port`. An error keeps the pool's current nodes.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo` through [`tokio::net::lookup_host`]): `/etc/hosts`,
/// then DNS.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            addrs.sort();
            addrs.dedup();
            Ok(addrs)
        })
    }
}

/// A node's address as a URL, with IPv6 in brackets.
pub(crate) fn url_of(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}
