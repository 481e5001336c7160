//! The transport end to end on real sockets: TLS and mutual TLS on the gRPC and HTTP listeners
//! with certificates made at test time (rcgen), and load shedding answering
//! `RESOURCE_EXHAUSTED` at once when a server is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::verifier_server::{Verifier, VerifierServer};
use keyfleet_proto::v1::{VerifyRequest, VerifyResponse};
use keyfleet_runtime::CancellationToken;
use keyfleet_runtime::limits::Limits;
use keyfleet_runtime::serve::{Transport, serve_grpc_with, serve_http_with};
use keyfleet_runtime::tls::{ClientTls, ServerTls, endpoint};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};

/// A CA and what it issued, as PEM.
struct Pki {
    ca: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca: cert.pem().into_bytes(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` with `usage`: (certificate PEM, key PEM).
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

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

struct Served {
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(fake: Fake, transport: Transport) -> Served {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (g, h) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let routes = Routes::new(VerifierServer::new(fake));
    let router = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
    let (t, s) = (transport.clone(), shutdown.clone());
    tokio::spawn(async move { serve_grpc_with(grpc, routes, &t, s).await });
    let s = shutdown.clone();
    tokio::spawn(async move { serve_http_with(http, router, &transport, s).await });
    Served {
        grpc: g,
        http: h,
        shutdown,
    }
}

async fn call(url: &str, tls: &ClientTls) -> Result<String, Status> {
    let channel = endpoint(url, tls)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    VerifierClient::new(channel)
        .verify(VerifyRequest {
            token: "t".into(),
            audience: String::new(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_on_both_listeners() {
    let pki = Pki::new("keyfleet test ca");
    let other = Pki::new("another ca");
    let (cert, key) = pki.leaf(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = pki.leaf(&["verifier-1"], ExtendedKeyUsagePurpose::ClientAuth);
    let (stranger_cert, stranger_key) =
        other.leaf(&["stranger"], ExtendedKeyUsagePurpose::ClientAuth);
    let trusting = ClientTls::default().with_ca(pki.ca.clone()).unwrap();
    let with_cert = trusting
        .clone()
        .with_identity(client_cert, client_key)
        .unwrap();
    let with_stranger = trusting
        .clone()
        .with_identity(stranger_cert, stranger_key)
        .unwrap();
    let wrong_ca = ClientTls::default().with_ca(other.ca.clone()).unwrap();

    // TLS only.
    let tls = ServerTls::from_pem(cert.clone(), key.clone()).unwrap();
    let s = serve(
        Fake::default(),
        Transport {
            tls: Some(tls.clone()),
            ..Transport::default()
        },
    )
    .await;
    let (grpcs, https) = (
        format!("https://localhost:{}", s.grpc.port()),
        format!("https://127.0.0.1:{}/ping", s.http.port()),
    );
    assert_eq!(call(&grpcs, &trusting).await.unwrap(), "t");
    assert_eq!(https_get(&https, &trusting).await.unwrap(), "pong");
    assert!(
        call(&grpcs, &wrong_ca).await.is_err(),
        "an untrusted server"
    );
    assert!(https_get(&https, &wrong_ca).await.is_err());
    let plain = format!("http://127.0.0.1:{}", s.grpc.port());
    assert!(
        call(&plain, &ClientTls::default()).await.is_err(),
        "plaintext to a TLS port"
    );
    assert!(
        reqwest::get(format!("http://127.0.0.1:{}/ping", s.http.port()))
            .await
            .is_err()
    );
    drop(s);

    // Mutual TLS: a certificate from the configured CA is required on both listeners.
    let mtls = tls.with_client_ca(pki.ca.clone()).unwrap();
    assert!(mtls.requires_client_cert());
    let s = serve(
        Fake::default(),
        Transport {
            tls: Some(mtls),
            ..Transport::default()
        },
    )
    .await;
    let (grpcs, https) = (
        format!("https://localhost:{}", s.grpc.port()),
        format!("https://127.0.0.1:{}/ping", s.http.port()),
    );
    assert_eq!(call(&grpcs, &with_cert).await.unwrap(), "t");
    assert_eq!(https_get(&https, &with_cert).await.unwrap(), "pong");
    assert!(
        call(&grpcs, &trusting).await.is_err(),
        "no client certificate"
    );
    assert!(https_get(&https, &trusting).await.is_err());
    assert!(
        call(&grpcs, &with_stranger).await.is_err(),
        "a certificate from another CA"
    );
    assert!(https_get(&https, &with_stranger).await.is_err());
    // A client that connects and never says hello does not stop others being served.
    let _silent = tokio::net::TcpStream::connect(s.grpc).await.unwrap();
    assert_eq!(call(&grpcs, &with_cert).await.unwrap(), "t");
}

#[test]
fn bad_material_is_refused_at_load() {
    let pki = Pki::new("ca");
    let (cert, key) = pki.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    assert!(ServerTls::from_pem(b"junk".to_vec(), key.clone()).is_err());
    assert!(ServerTls::from_pem(cert.clone(), b"junk".to_vec()).is_err());
    let (_, other_key) = pki.leaf(&["x"], ExtendedKeyUsagePurpose::ServerAuth);
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
    let url = format!("http://{}", s.grpc);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { call(&url, &ClientTls::default()).await })
        })
        .collect();
    // Bounded wait until both calls hold their permits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.entered.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    while fake.entered.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the next call was not served"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.release.notify_waiters();
    assert_eq!(next.await.unwrap().unwrap(), "t");
    assert_eq!(shed.get(), 3);
}
