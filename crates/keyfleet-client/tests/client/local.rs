//! `LocalVerifier` gives a node's verdicts: over the hostile-token corpus (with its hostile
//! JWKS and fixed clock), and while following an authority across a rotation and revocations.

use std::time::Duration;

use keyfleet_client::{Demands, LocalVerifier, TokenVerifier};
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{IssueTokenRequest, Reason, VerifyRequest, VerifyResponse};
use keyfleet_runtime::Clock;
use keyfleet_testkit::serve::Pair;
use keyfleet_verifier::{Config, Source, Verifier};
use tonic::transport::Channel;

use super::{Fleet, serve_jwks};

const CORPUS: &str = include_str!("../../../keyfleet-core/tests/data/hostile_corpus.json");

/// What must be equal between a node's answer and the in-process one.
fn verdict(r: &VerifyResponse) -> (bool, Reason, &str, &str, &str, &str) {
    (
        r.valid,
        r.reason(),
        r.kid.as_str(),
        r.subject.as_str(),
        r.claims_json.as_str(),
        r.detail.as_str(),
    )
}

async fn node_answer(
    client: &VerifierClient<Channel>,
    token: &str,
    audience: &str,
) -> VerifyResponse {
    let request = VerifyRequest {
        token: token.to_owned(),
        audience: audience.to_owned(),
        ..Default::default()
    };
    client.clone().verify(request).await.unwrap().into_inner()
}

async fn local_answer(local: &LocalVerifier, token: &str, audience: &str) -> VerifyResponse {
    let demands = Demands {
        audience: (!audience.is_empty()).then(|| audience.to_owned()),
        ..Demands::none()
    };
    local.verify_raw(token, &demands).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_verdicts_equal_a_nodes_over_the_hostile_corpus() {
    let corpus: serde_json::Value = serde_json::from_str(CORPUS).unwrap();
    let (url, _jwks) = serve_jwks(corpus["jwks"].as_str().unwrap().to_owned()).await;
    let config = Config {
        issuer: Some(corpus["issuer"].as_str().unwrap().to_owned()),
        leeway: Duration::from_secs(corpus["leeway"].as_u64().unwrap()),
        max_token_bytes: corpus["max_token_bytes"].as_u64().unwrap() as usize,
        max_lifetime: Some(Duration::from_secs(
            corpus["max_lifetime"].as_u64().unwrap(),
        )),
        clock: Clock::manual(corpus["now"].as_i64().unwrap()),
        ..Config::for_test(Source::JwksUrl { url })
    };
    let node = Verifier::open(config.clone()).await.unwrap();
    let ready = node.clone();
    let pair = Pair::start(|g, h, stop| node.serve(g, h, stop)).await;
    let local = LocalVerifier::start(config).await.unwrap();
    local.wait_ready(Duration::from_secs(10)).await.unwrap();
    keyfleet_testkit::eventually("the node holds the corpus's key set", || {
        let ready = ready.clone();
        async move { ready.is_ready() }
    })
    .await;
    let client = VerifierClient::new(keyfleet_testkit::grpc::lazy_channel(pair.grpc));

    let cases = corpus["cases"].as_array().unwrap();
    assert!(cases.len() >= 300, "{} cases", cases.len());
    let mut differ = Vec::new();
    for case in cases {
        let token = case["token"].as_str().unwrap();
        let audience = case["audience"].as_str().unwrap();
        let (from_node, from_local) = (
            node_answer(&client, token, audience).await,
            local_answer(&local, token, audience).await,
        );
        let want = case["expect"].as_str().unwrap();
        if verdict(&from_node) != verdict(&from_local) || from_local.reason().as_str_name() != want
        {
            differ.push(format!(
                "{} / {}: node {:?}, local {:?}, corpus {want}",
                case["class"],
                case["name"],
                verdict(&from_node),
                verdict(&from_local)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_verdicts_follow_a_rotation_and_revocations_as_a_node_does() {
    let fleet = Fleet::start(1).await;
    let local = LocalVerifier::start(fleet.node_config("in-process"))
        .await
        .unwrap();
    local.wait_ready(Duration::from_secs(10)).await.unwrap();
    let client = VerifierClient::new(keyfleet_testkit::grpc::lazy_channel(fleet.nodes[0].grpc));
    let issue = || async {
        fleet
            .admin
            .issue(IssueTokenRequest {
                subject: "alice".into(),
                audience: vec!["api".into()],
                ..Default::default()
            })
            .await
            .unwrap()
    };
    // Both give `want` for `token` (waiting for both to hold the newest key set), and the
    // same verdict.
    let agree = |token: String, want: Reason| {
        let (client, local) = (client.clone(), &local);
        async move {
            keyfleet_testkit::eventually(&format!("node and local say {want:?}"), || {
                let (client, token) = (client.clone(), token.clone());
                async move {
                    let n = node_answer(&client, &token, "api").await;
                    let l = local_answer(local, &token, "api").await;
                    n.reason() == want
                        && l.reason() == want
                        && verdict(&n).0 == verdict(&l).0
                        && (n.kid.as_str(), n.subject.as_str(), n.claims_json.as_str())
                            == (l.kid.as_str(), l.subject.as_str(), l.claims_json.as_str())
                }
            })
            .await;
        }
    };

    let first = issue().await;
    agree(first.token.clone(), Reason::Ok).await;
    // Through the trait too: the claims of a valid token.
    let claims = TokenVerifier::verify(&local, &first.token, &Demands::none())
        .await
        .unwrap();
    assert_eq!(
        (claims.subject.as_str(), claims.kid.as_str()),
        ("alice", first.kid.as_str())
    );
    assert_eq!(claims.node_id, "in-process");

    let new_kid = fleet
        .admin
        .rotate_and_wait(Duration::from_secs(20), Duration::from_millis(20))
        .await
        .unwrap();
    let second = issue().await;
    assert_eq!(second.kid, new_kid);
    agree(second.token.clone(), Reason::Ok).await;
    agree(first.token.clone(), Reason::Ok).await;

    fleet
        .admin
        .revoke_token(&second.jti, second.expires_at)
        .await
        .unwrap();
    agree(second.token.clone(), Reason::TokenRevoked).await;

    fleet.admin.revoke_key(&first.kid).await.unwrap();
    agree(first.token.clone(), Reason::KeyRevoked).await;
    local.shutdown().await.unwrap();
}
