//! A real authority and verifiers (the keyfleet binary as processes), and tokens from it.

use std::collections::HashMap;
use std::process::Command;

use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{IssueTokenRequest, VerifyRequest};
use keyfleet_testkit::eventually_within;
use keyfleet_testkit::grpc::bearer;
use keyfleet_testkit::process::{PORT_0, Process};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_keyfleet");

/// How long a fleet of processes may take to settle (keys learnt).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(20);

/// The audience every test verifier guards.
pub const AUDIENCE: &str = "orders";

/// An authority on a fresh data dir and the verifiers following it.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub authority: Process,
    pub verifiers: Vec<Process>,
}

impl Fleet {
    /// An authority and `n` verifiers, `node-1`…`node-n`, all holding keys.
    pub async fn start(n: usize) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("authority")
            .args(PORT_0)
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--issuer", "https://issuer.test"]);
        let authority = Process::start(command);
        let node_token = dir.path().join("node.token");
        let verifiers = (1..=n)
            .map(|i| {
                let mut command = Command::new(BIN);
                command
                    .arg("verifier")
                    .args(PORT_0)
                    .args(["--authority", &authority.grpc])
                    .arg("--node-token-file")
                    .arg(&node_token)
                    .args(["--node-id", &format!("node-{i}"), "--region", "test"])
                    .args(["--audience", AUDIENCE]);
                Process::start(command)
            })
            .collect();
        let fleet = Fleet {
            dir,
            authority,
            verifiers,
        };
        let probe = fleet.issue("probe", &[]).await;
        for verifier in &fleet.verifiers {
            let client = VerifierClient::new(channel(&verifier.grpc));
            eventually_within("a verifier to hold keys", SETTLE, || {
                let mut client = client.clone();
                let token = probe.clone();
                async move {
                    client
                        .verify(VerifyRequest {
                            token,
                            audience: AUDIENCE.into(),
                            ..Default::default()
                        })
                        .await
                        .is_ok_and(|r| r.into_inner().valid)
                }
            })
            .await;
        }
        fleet
    }

    /// A token for `subject` (audience [`AUDIENCE`]) with extra `claims`.
    pub async fn issue(&self, subject: &str, claims: &[(&str, &str)]) -> String {
        self.issue_for(subject, AUDIENCE, claims).await
    }

    /// A token for `subject` and `audience` with extra `claims`.
    pub async fn issue_for(
        &self,
        subject: &str,
        audience: &str,
        claims: &[(&str, &str)],
    ) -> String {
        let admin = std::fs::read_to_string(self.dir.path().join("admin.token")).unwrap();
        let request = IssueTokenRequest {
            subject: subject.into(),
            audience: vec![audience.into()],
            claims: claims
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        };
        AuthorityClient::new(channel(&self.authority.grpc))
            .issue_token(bearer(request, admin.trim()))
            .await
            .expect("IssueToken")
            .into_inner()
            .token
    }
}

/// A channel to `url` that connects on first use.
pub fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned()).unwrap().connect_lazy()
}

/// `token` with its signature's first character changed.
pub fn forged(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let first = if sig.starts_with('A') { 'B' } else { 'A' };
    format!("{head}.{first}{}", &sig[1..])
}
