//! `VerifyLayer` on a real axum app and a real tonic service: 401/403/503 (HTTP) and
//! `UNAUTHENTICATED`/`PERMISSION_DENIED`/`UNAVAILABLE` (gRPC) answered by the layer, the
//! verified claims in the request's extensions otherwise. Tokens are signed by hand (scopes,
//! `auth_time`) and verified in-process against a JWKS served over HTTP.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use keyfleet_client::{LocalVerifier, VerifiedClaims, VerifyLayer};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::verifier_server::{Verifier as VerifierApi, VerifierServer};
use keyfleet_proto::v1::{VerifyBatchRequest, VerifyBatchResponse, VerifyRequest, VerifyResponse};
use keyfleet_verifier::{Config, Source};
use serde_json::json;
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};
use tower::Layer as _;

use super::{ISSUER, Signer, get as http_get, now, serve_jwks};

async fn local_verifier(jwks_url: String) -> Arc<LocalVerifier> {
    let config = Config {
        issuer: Some(ISSUER.into()),
        ..Config::for_test(Source::JwksUrl { url: jwks_url })
    };
    let local = LocalVerifier::start(config).await.unwrap();
    local.wait_ready(Duration::from_secs(10)).await.unwrap();
    Arc::new(local)
}

async fn whoami(Extension(claims): Extension<VerifiedClaims>) -> String {
    let scopes: Vec<&str> = claims.scopes().collect();
    format!("{} [{}]", claims.subject, scopes.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_axum_app_answers_401_403_and_200_with_the_claims() {
    let signer = Signer::new(7);
    let (jwks_url, _jwks) = serve_jwks(signer.jwks()).await;
    let local = local_verifier(jwks_url).await;
    let base = VerifyLayer::new(local.clone()).audience("api");
    let app = Router::new()
        .route("/me", get(whoami).route_layer(base.clone()))
        .route(
            "/read",
            get(whoami).route_layer(base.clone().require_scopes(["read"])),
        )
        .route(
            "/fresh",
            get(whoami).route_layer(base.clone().max_auth_age(Duration::from_secs(60))),
        );
    let (addr, _app) = keyfleet_testkit::serve::http(app).await;

    let plain = signer.token(json!({}));
    let reader = signer.token(json!({ "scope": "read write" }));
    let fresh = signer.token(json!({ "auth_time": now() - 10 }));
    let stale_login = signer.token(json!({ "auth_time": now() - 600 }));
    let other_audience = {
        let mut t = keyfleet_core::TokenClaims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: vec!["other".into()],
            iat: now(),
            nbf: now(),
            exp: now() + 60,
            jti: "x".into(),
            extra: Default::default(),
        };
        t.jti = "other-aud".into();
        keyfleet_core::sign_token(&signer.key, &signer.kid, &t)
    };
    let bearer = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Option<String>, u16, &str, &str)> = vec![
        // path, authorization, status, in the challenge, in the body
        ("/me", None, 401, "Bearer", ""),
        ("/me", Some("Basic YWxpY2U6eA==".into()), 401, "Bearer", ""),
        (
            "/me",
            Some(bearer("not.a.jwt")),
            401,
            "error=\"invalid_token\", error_description=\"MALFORMED\"",
            "",
        ),
        (
            "/me",
            Some(bearer(&other_audience)),
            401,
            "error_description=\"WRONG_AUDIENCE\"",
            "",
        ),
        ("/me", Some(bearer(&plain)), 200, "", "alice []"),
        (
            "/read",
            Some(bearer(&plain)),
            403,
            "error=\"insufficient_scope\", error_description=\"INSUFFICIENT_SCOPE\", scope=\"read\"",
            "",
        ),
        (
            "/read",
            Some(bearer(&reader)),
            200,
            "",
            "alice [read,write]",
        ),
        (
            "/fresh",
            Some(bearer(&plain)),
            403,
            "error=\"insufficient_user_authentication\", error_description=\"LOGIN_TOO_OLD\", max_age=60",
            "",
        ),
        (
            "/fresh",
            Some(bearer(&stale_login)),
            403,
            "LOGIN_TOO_OLD",
            "",
        ),
        ("/fresh", Some(bearer(&fresh)), 200, "", "alice []"),
    ];
    for (path, auth, status, challenge, body) in cases {
        let (got, got_challenge, got_body) = http_get(addr, path, auth.as_deref()).await;
        let what = format!(
            "{path} with {:?}",
            auth.as_deref().map(|a| &a[..a.len().min(20)])
        );
        assert_eq!(got, status, "{what}: {got_challenge} {got_body}");
        assert!(
            got_challenge.contains(challenge),
            "{what}: challenge {got_challenge:?}"
        );
        if status == 200 {
            assert!(got_challenge.is_empty(), "{what}");
            assert_eq!(got_body, body, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_verifier_that_can_decide_is_a_503() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let pool = super::pool(vec![dead], true).await;
    let app = Router::new().route("/me", get(whoami).route_layer(VerifyLayer::new(pool)));
    let (addr, _app) = keyfleet_testkit::serve::http(app).await;
    let (status, _, _) = http_get(addr, "/me", Some("Bearer a.b.c")).await;
    assert_eq!(status, 503);
}

/// A gRPC service that answers with the claims the layer put in the request's extensions.
struct Echo;

#[tonic::async_trait]
impl VerifierApi for Echo {
    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let claims = request
            .extensions()
            .get::<VerifiedClaims>()
            .ok_or_else(|| Status::internal("no verified claims in the extensions"))?;
        Ok(Response::new(VerifyResponse {
            valid: true,
            subject: claims.subject.clone(),
            kid: claims.kid.clone(),
            ..Default::default()
        }))
    }

    async fn verify_batch(
        &self,
        _: Request<VerifyBatchRequest>,
    ) -> Result<Response<VerifyBatchResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_service_answers_unauthenticated_and_permission_denied() {
    let signer = Signer::new(9);
    let (jwks_url, _jwks) = serve_jwks(signer.jwks()).await;
    let local = local_verifier(jwks_url).await;
    let layer = VerifyLayer::new(local)
        .audience("api")
        .require_scopes(["read"]);
    let routes = Routes::new(layer.layer(VerifierServer::new(Echo)));
    let (addr, _server) = keyfleet_testkit::serve::grpc(routes).await;
    let mut client = VerifierClient::new(keyfleet_testkit::grpc::lazy_channel(addr));
    let call = |auth: Option<String>| {
        let mut client = client.clone();
        async move {
            let request = keyfleet_testkit::grpc::with_authorization(
                VerifyRequest::default(),
                auth.as_deref(),
            );
            client.verify(request).await
        }
    };

    let none = call(None).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let forged = format!("{}A", signer.token(json!({ "scope": "read" })));
    let bad = call(Some(format!("Bearer {forged}"))).await.unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated, "{bad:?}");
    assert!(
        bad.message().contains("MALFORMED") || bad.message().contains("BAD_SIGNATURE"),
        "{bad:?}"
    );
    let unscoped = call(Some(format!("Bearer {}", signer.token(json!({})))))
        .await
        .unwrap_err();
    assert_eq!(unscoped.code(), Code::PermissionDenied, "{unscoped:?}");
    assert_eq!(unscoped.message(), "INSUFFICIENT_SCOPE");

    let ok = call(Some(format!(
        "Bearer {}",
        signer.token(json!({ "scope": "read" }))
    )))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (ok.subject.as_str(), ok.kid.as_str()),
        ("alice", signer.kid.as_str())
    );
    // The channel still serves after refusals (trailers-only answers end only their stream).
    let again = client.verify(VerifyRequest::default()).await.unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated);
}
