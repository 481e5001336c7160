//! gRPC requests with a credential, and a channel to a server under test.

use std::net::SocketAddr;

use tonic::Request;
use tonic::transport::Channel;

/// `msg` with `authorization: Bearer <token>`, as keyfleet's credentials are sent.
pub fn bearer<T>(msg: T, token: &str) -> Request<T> {
    with_authorization(msg, Some(&format!("Bearer {token}")))
}

/// `msg` with `header` as its `authorization` (a wrong scheme, say), or with none.
pub fn with_authorization<T>(msg: T, header: Option<&str>) -> Request<T> {
    let mut request = Request::new(msg);
    if let Some(value) = header {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

/// A plaintext channel to `addr` that connects on first use.
pub fn lazy_channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}
