//! The transport end to end on real sockets: TLS and mutual TLS on the gRPC and HTTP listeners
//! with certificates made at test time (rcgen), and load shedding answering
//! `RESOURCE_EXHAUSTED` at once when a server is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::verifier_server::{Verifier, VerifierServer};
use keyfleet_proto::v1::{VerifyRequest, VerifyResponse};
use keyfleet_runtime::client::{Settings, endpoint};
use keyfleet_runtime::limits::Limits;
use keyfleet_runtime::serve::{Transport, serve_grpc_with, serve_http_with};
use keyfleet_runtime::tls::{ClientTls, ServerTls};
use keyfleet_testkit::eventually;
use keyfleet_testkit::serve::Pair;
use keyfleet_testkit::tls::Pki;
use tokio::sync::Notify;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};

/// A Verify service that answers at once, or holds every call until released.
#[derive(Clone, Default)]
struct Fake {
    hold: bool,
    release: Arc<Notify>,
    entered: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Verifier for Fake {
    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        if self.hold {
            self.release.notified().await;
        }
        Ok(Response::new(VerifyResponse {
            kid: request.into_inner().token,
            ..VerifyResponse::default()
        }))
    }

    async fn verify_batch(
        &self,
        _: Request<keyfleet_proto::v1::VerifyBatchRequest>,
    ) -> Result<Response<keyfleet_proto::v1::VerifyBatchResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// Serves `fake` over gRPC and a `/ping` route over HTTP, both with `transport`.
async fn serve(fake: Fake, transport: Transport) -> Pair {
    let routes = Routes::new(VerifierServer::new(fake));
    let router = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
    Pair::start(|grpc, http, shutdown| async move {
        let (served_grpc, served_http) = tokio::join!(
            serve_grpc_with(grpc, routes, &transport, shutdown.clone()),
            serve_http_with(http, router, &transport, shutdown),
        );
        served_grpc.and(served_http)
    })
    .await
}

async fn call(url: &str, tls: &ClientTls) -> Result<String, Status> {
    let channel = endpoint(url, tls, &Settings::COMMAND)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    VerifierClient::new(channel)
        .verify(VerifyRequest {
            token: "t".into(),
            audience: String::new(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().kid)
}

async fn https_get(url: &str, tls: &ClientTls) -> Result<String, reqwest::Error> {
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls.rustls_config().unwrap())
        .timeout(Duration::from_secs(5))
        .build()?;
    client.get(url).send().await?.text().await
}

/// A CA's server certificate for localhost, and the clients the TLS tests try.
struct Clients {
    pki: Pki,
    server: ServerTls,
    /// Trusts the CA, has no certificate.
    trusting: ClientTls,
    /// Trusts the CA, with a client certificate it issued.
    with_cert: ClientTls,
    /// Trusts the CA, with a client certificate from another CA.
    with_stranger: ClientTls,
    /// Trusts another CA only.
    wrong_ca: ClientTls,
}

impl Clients {
    fn new() -> Clients {
        let pki = Pki::new("keyfleet test ca");
        let other = Pki::new("another ca");
        let (cert, key) = pki.server(&["localhost", "127.0.0.1"]);
        let (client_cert, client_key) = pki.client(&["verifier-1"]);
        let (stranger_cert, stranger_key) = other.client(&["stranger"]);
        let trusting = ClientTls::default().with_ca(pki.ca.clone()).unwrap();
        Clients {
            server: ServerTls::from_pem(cert, key).unwrap(),
            with_cert: trusting
                .clone()
                .with_identity(client_cert, client_key)
                .unwrap(),
            with_stranger: trusting
                .clone()
                .with_identity(stranger_cert, stranger_key)
                .unwrap(),
            wrong_ca: ClientTls::default().with_ca(other.ca.clone()).unwrap(),
            trusting,
            pki,
        }
    }
}

/// A fake served with `tls` on both listeners: (the gRPC URL, the HTTPS `/ping` URL).
async fn serve_tls(tls: ServerTls) -> (Pair, String, String) {
    let served = serve(
        Fake::default(),
        Transport {
            tls: Some(tls),
            ..Transport::default()
        },
    )
    .await;
    let grpcs = format!("https://localhost:{}", served.grpc.port());
    let https = format!("https://127.0.0.1:{}/ping", served.http.port());
    (served, grpcs, https)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_listeners() {
    let clients = Clients::new();
    let (served, grpcs, https) = serve_tls(clients.server.clone()).await;
    assert_eq!(call(&grpcs, &clients.trusting).await.unwrap(), "t");
    assert_eq!(https_get(&https, &clients.trusting).await.unwrap(), "pong");
    assert!(
        call(&grpcs, &clients.wrong_ca).await.is_err(),
        "an untrusted server"
    );
    assert!(https_get(&https, &clients.wrong_ca).await.is_err());
    let plain = format!("http://127.0.0.1:{}", served.grpc.port());
    assert!(
        call(&plain, &ClientTls::default()).await.is_err(),
        "plaintext to a TLS port"
    );
    assert!(
        reqwest::get(format!("http://127.0.0.1:{}/ping", served.http.port()))
            .await
            .is_err()
    );
}

/// Mutual TLS: a certificate from the configured CA is required on both listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_both_listeners() {
    let clients = Clients::new();
    let mtls = clients
        .server
        .clone()
        .with_client_ca(clients.pki.ca.clone())
        .unwrap();
    assert!(mtls.requires_client_cert());
    let (served, grpcs, https) = serve_tls(mtls).await;
    assert_eq!(call(&grpcs, &clients.with_cert).await.unwrap(), "t");
    assert_eq!(https_get(&https, &clients.with_cert).await.unwrap(), "pong");
    assert!(
        call(&grpcs, &clients.trusting).await.is_err(),
        "no client certificate"
    );
    assert!(https_get(&https, &clients.trusting).await.is_err());
    assert!(
        call(&grpcs, &clients.with_stranger).await.is_err(),
        "a certificate from another CA"
    );
    assert!(https_get(&https, &clients.with_stranger).await.is_err());
    // A client that connects and never says hello does not stop others being served.
    let _silent = tokio::net::TcpStream::connect(served.grpc).await.unwrap();
    assert_eq!(call(&grpcs, &clients.with_cert).await.unwrap(), "t");
}

#[test]
fn bad_material_is_refused_at_load() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.server(&["localhost"]);
    assert!(ServerTls::from_pem(b"junk".to_vec(), key.clone()).is_err());
    assert!(ServerTls::from_pem(cert.clone(), b"junk".to_vec()).is_err());
    let (_, other_key) = pki.server(&["x"]);
    assert!(
        ServerTls::from_pem(cert.clone(), other_key).is_err(),
        "key of another cert"
    );
    assert!(
        ServerTls::from_pem(cert.clone(), key.clone())
            .unwrap()
            .with_client_ca(b"junk".to_vec())
            .is_err()
    );
    assert!(ClientTls::default().with_ca(b"junk".to_vec()).is_err());
    let debug = format!("{:?}", ServerTls::from_pem(cert, key).unwrap());
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted() {
    let fake = Fake {
        hold: true,
        ..Fake::default()
    };
    let shed = prometheus_client::metrics::counter::Counter::default();
    let s = serve(
        fake.clone(),
        Transport {
            limits: Limits {
                max_inflight: 2,
                ..Limits::default()
            },
            shed: shed.clone(),
            ..Transport::default()
        },
    )
    .await;
    let url = s.grpc_url();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { call(&url, &ClientTls::default()).await })
        })
        .collect();
    eventually("both calls to hold their permits", || async {
        fake.entered.load(Ordering::SeqCst) >= 2
    })
    .await;
    for _ in 0..3 {
        let status = call(&url, &ClientTls::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert_eq!(shed.get(), 3);
    assert_eq!(
        fake.entered.load(Ordering::SeqCst),
        2,
        "shed calls never reach the service"
    );
    fake.release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), "t");
    }
    // Capacity is back: the next call reaches the service.
    let next = tokio::spawn(async move { call(&url, &ClientTls::default()).await });
    eventually("the next call to be served", || async {
        fake.entered.load(Ordering::SeqCst) >= 3
    })
    .await;
    fake.release.notify_waiters();
    assert_eq!(next.await.unwrap().unwrap(), "t");
    assert_eq!(shed.get(), 3);
}
