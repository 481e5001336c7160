//! The `keyfleet` binary end to end, as an operator runs it: real processes on loopback ports,
//! the CLI's output and exit codes, a SIGKILLed authority, `keyfleet demo`.

mod attack;
mod defaults;
mod secure_files;
mod session;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keyfleet_testkit::eventually::blocking::eventually;
use keyfleet_testkit::http;
use keyfleet_testkit::process::{PORT_0, Process};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_keyfleet");

/// How long a fleet of processes may take to settle (keys learnt, watchers acknowledged).
const SETTLE: Duration = Duration::from_secs(20);

/// Starts `keyfleet <args>` and waits until it listens; killed on drop.
fn spawn(args: &[&str]) -> Process {
    spawn_with(Command::new(BIN), args)
}

/// [`spawn`] through `command` (the binary itself, or a wrapper that execs it).
fn spawn_with(mut command: Command, args: &[&str]) -> Process {
    command.args(args);
    Process::start(command)
}

/// `keyfleet <command>` with both listeners on port 0, then `args`.
fn on_port_0<'a>(command: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    [&[command][..], &PORT_0, args].concat()
}

fn authority(dir: &Path) -> Process {
    authority_with(dir, &["--publish-ahead", "20s"])
}

/// An authority on `dir` for the test issuer, with `extra` flags.
fn authority_with(dir: &Path, extra: &[&str]) -> Process {
    let data_dir = ["--data-dir", dir.to_str().unwrap()];
    let issuer = ["--issuer", "https://issuer.test"];
    spawn(&on_port_0(
        "authority",
        &[&data_dir[..], &issuer, extra].concat(),
    ))
}

/// A verifier following `authority` with the fleet credential in `node_token` (the
/// authority's `<data-dir>/node.token`).
fn verifier(authority: &str, node_token: &Path, node: &str) -> Process {
    spawn(&on_port_0(
        "verifier",
        &[
            "--authority",
            authority,
            "--node-token-file",
            node_token.to_str().unwrap(),
            "--node-id",
            node,
            "--region",
            "test",
            "--audience",
            "orders",
        ],
    ))
}

/// An authority on a fresh data dir and `nodes` verifiers following it.
struct Fleet {
    dir: tempfile::TempDir,
    auth: Process,
    nodes: Vec<Process>,
}

impl Fleet {
    fn start(nodes: usize) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let node_token = dir.path().join("node.token");
        let nodes = (1..=nodes)
            .map(|i| verifier(&auth.grpc, &node_token, &format!("node-{i}")))
            .collect();
        Fleet { dir, auth, nodes }
    }

    /// The admin token file.
    fn admin(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    fn issue(&self) -> String {
        issue(&self.auth, &self.admin())
    }

    /// Waits until every node verifies `token` (it holds the keys).
    fn until_everywhere(&self, token: &str) {
        for node in &self.nodes {
            eventually("a verifier to hold keys", SETTLE, || {
                (verify(node, token).0 == 0).then_some(())
            });
        }
    }
}

fn keyfleet(args: &[&str], admin: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("KEYFLEET_ADMIN_TOKEN")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    if let Some(file) = admin {
        cmd.env("KEYFLEET_ADMIN_TOKEN_FILE", file);
    } else {
        cmd.env_remove("KEYFLEET_ADMIN_TOKEN_FILE");
    }
    cmd.output().expect("run keyfleet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn verify(verifier: &Process, token: &str) -> (i32, Value) {
    let o = keyfleet(
        &[
            "token",
            "verify",
            "--verifier",
            &verifier.grpc,
            "--audience",
            "orders",
            token,
        ],
        None,
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap_or(Value::Null);
    (o.status.code().unwrap_or(-1), v)
}

/// `keyfleet token issue --authority <authority>` with `args`, and `admin`'s credential.
fn token_issue(authority: &str, admin: Option<&Path>, args: &[&str]) -> Output {
    let command = ["token", "issue", "--authority", authority];
    keyfleet(&[&command[..], args].concat(), admin)
}

/// The token a successful `token issue` printed.
fn minted(o: &Output) -> String {
    assert!(o.status.success(), "token issue failed: {}", stderr(o));
    stdout(o).trim().to_owned()
}

/// A token for alice, with a role, for the audience the test verifiers guard.
fn issue(auth: &Process, admin: &Path) -> String {
    minted(&token_issue(
        &auth.grpc,
        Some(admin),
        &[
            "--subject",
            "alice",
            "--audience",
            "orders",
            "--claim",
            "role=admin",
        ],
    ))
}

fn keys_json(auth: &Process, admin: &Path) -> Value {
    let o = keyfleet(
        &["keys", "list", "--authority", &auth.grpc, "--json"],
        Some(admin),
    );
    assert!(o.status.success(), "keys list: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn active_kid(list: &Value) -> String {
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "active")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Three verifiers learn the keys and verify a token; a rotation returns once the new key
/// signs and old and new tokens verify everywhere; SIGKILLing the authority leaves the fleet
/// verifying, and the restarted authority publishes the same keys and signs with the same key.
#[test]
fn operator_flow_across_rotation_and_authority_sigkill() {
    let mut fleet = Fleet::start(3);
    let admin = fleet.admin();
    let token = fleet.issue();
    fleet.until_everywhere(&token);
    for node in &fleet.nodes {
        let (code, v) = verify(node, &token);
        assert_eq!(code, 0);
        assert_eq!(v["valid"], true);
        assert_eq!(v["reason"], "OK");
        assert_eq!(v["subject"], "alice");
        assert_eq!(v["claims"]["role"], "admin");
    }

    // Every node watches and has acknowledged the current version.
    let list = eventually("three acknowledging watchers", SETTLE, || {
        let l = keys_json(&fleet.auth, &admin);
        let v = l["version"].as_u64().unwrap();
        let acked = l["watchers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["connected"] == true && w["acked_version"].as_u64() == Some(v))
            .count();
        (acked == 3).then_some(l)
    });
    let before = active_kid(&list);

    // Rotate: returns once the new key signs; old and new tokens verify everywhere.
    let o = keyfleet(
        &["keys", "rotate", "--authority", &fleet.auth.grpc],
        Some(&admin),
    );
    assert!(o.status.success(), "rotate: {}", stderr(&o));
    let after = active_kid(&keys_json(&fleet.auth, &admin));
    assert_ne!(before, after);
    let token2 = fleet.issue();
    for node in &fleet.nodes {
        for t in [&token, &token2] {
            let (code, v) = verify(node, t);
            assert_eq!((code, v["reason"].as_str()), (0, Some("OK")), "{v}");
        }
    }
    let table = stdout(&keyfleet(
        &["keys", "list", "--authority", &fleet.auth.grpc],
        Some(&admin),
    ));
    assert!(
        table.contains(&after) && table.contains("retiring") && table.contains("node-2"),
        "{table}"
    );

    // SIGKILL the authority: the fleet keeps verifying.
    let jwks_before = keys_json(&fleet.auth, &admin)["keys"].clone();
    fleet.auth.kill();
    for node in &fleet.nodes {
        assert_eq!(verify(node, &token2).0, 0);
    }
    // Restarted on the same data dir: same published keys, same signer; new tokens verify.
    fleet.auth = authority(fleet.dir.path());
    let list = keys_json(&fleet.auth, &admin);
    assert_eq!(list["keys"], jwks_before);
    assert_eq!(active_kid(&list), after);
    let token3 = fleet.issue();
    for node in &fleet.nodes {
        assert_eq!(verify(node, &token3).0, 0);
    }
}

/// The JWKS over HTTP carries the published keys, as RFC 7517 OKP keys, with a cache
/// lifetime; a verifier holding keys is ready.
#[test]
fn the_http_jwks_carries_the_published_keys() {
    let fleet = Fleet::start(1);
    fleet.until_everywhere(&fleet.issue());
    let active = active_kid(&keys_json(&fleet.auth, &fleet.admin()));
    let jwks = http::blocking_get(fleet.auth.http_addr(), "/.well-known/jwks.json");
    assert_eq!(jwks.status, 200, "{jwks:?}");
    assert!(
        jwks.header("cache-control").starts_with("public, max-age="),
        "{jwks:?}"
    );
    let body: Value = serde_json::from_str(&jwks.body).unwrap();
    let kids: Vec<&str> = body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&active.as_str()), "{}", jwks.body);
    for k in body["keys"].as_array().unwrap() {
        assert_eq!(
            (
                k["kty"].as_str(),
                k["crv"].as_str(),
                k["alg"].as_str(),
                k["use"].as_str()
            ),
            (Some("OKP"), Some("Ed25519"), Some("EdDSA"), Some("sig"))
        );
    }
    let readyz = http::blocking_get(fleet.nodes[0].http_addr(), "/readyz");
    assert_eq!(readyz.status, 200, "{readyz:?}");
}

/// A forged token is refused with exit 1 and a reason.
#[test]
fn a_forged_token_is_refused_with_exit_1_and_a_reason() {
    let fleet = Fleet::start(1);
    let token = fleet.issue();
    fleet.until_everywhere(&token);
    // Change the signature's first character (6 whole bits of its first byte): the last ones
    // carry padding bits too, so overwriting them can leave the token as it was.
    let at = token.rfind('.').unwrap() + 1;
    let first = if &token[at..at + 1] == "A" { "B" } else { "A" };
    let mut forged = token.clone();
    forged.replace_range(at..at + 1, first);
    let (code, v) = verify(&fleet.nodes[0], &forged);
    assert_eq!(code, 1);
    assert_eq!(v["valid"], false);
    assert_eq!(v["reason"], "BAD_SIGNATURE");
}

/// Emergency revocation of the signing key: it stays listed, with its history.
#[test]
fn a_revoked_signing_key_stays_listed_with_its_history() {
    let fleet = Fleet::start(0);
    let admin = fleet.admin();
    let active = active_kid(&keys_json(&fleet.auth, &admin));
    let o = keyfleet(
        &["keys", "revoke", &active, "--authority", &fleet.auth.grpc],
        Some(&admin),
    );
    assert!(o.status.success(), "revoke: {}", stderr(&o));
    let table = stdout(&keyfleet(
        &["keys", "list", "--authority", &fleet.auth.grpc],
        Some(&admin),
    ));
    let line = table
        .lines()
        .find(|l| l.starts_with(&active))
        .unwrap_or_else(|| panic!("the revoked key is listed: {table}"));
    assert!(line.contains("revoked"), "{line}");
    assert_eq!(
        line.matches("s ago").count(),
        3,
        "activated, deactivated and revoked times: {line}"
    );
}

#[test]
fn ids_that_start_with_a_hyphen_can_be_revoked() {
    let fleet = Fleet::start(0);
    let (auth, admin) = (&fleet.auth, fleet.admin());
    let o = keyfleet(
        &[
            "token",
            "revoke",
            "-AbCdEfGh",
            "--until",
            "15m",
            "--authority",
            &auth.grpc,
        ],
        Some(&admin),
    );
    assert!(o.status.success(), "token revoke -AbCdEfGh: {}", stderr(&o));
    // A kid the ring does not hold reaches the authority (and is refused there), instead of
    // being taken for a flag.
    let o = keyfleet(
        &["keys", "revoke", "-Zz0", "--authority", &auth.grpc],
        Some(&admin),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(
        err.contains("-Zz0"),
        "the authority names the unknown kid: {err}"
    );
    assert!(
        err.starts_with("error: ") && !err.contains("exit code"),
        "the message, not the exit code's number: {err}"
    );
}

#[test]
fn admin_commands_need_the_credential() {
    let fleet = Fleet::start(0);
    let (dir, auth) = (&fleet.dir, &fleet.auth);
    let o = token_issue(&auth.grpc, None, &["--subject", "a", "--audience", "b"]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--admin-token-file"), "{}", stderr(&o));

    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let o = keyfleet(&["keys", "rotate", "--authority", &auth.grpc], Some(&wrong));
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("refused the admin credential"),
        "{}",
        stderr(&o)
    );

    // The fleet view is for operators: `keys list` needs the admin credential too.
    let o = keyfleet(&["keys", "list", "--authority", &auth.grpc], None);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--admin-token-file"), "{}", stderr(&o));
    let o = keyfleet(&["keys", "list", "--authority", &auth.grpc], Some(&wrong));
    assert_eq!(o.status.code(), Some(64));
    assert!(
        stderr(&o).contains("refused the admin credential"),
        "{}",
        stderr(&o)
    );
    let o = keyfleet(
        &["keys", "list", "--authority", &auth.grpc],
        Some(&fleet.admin()),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // A verifier following an authority needs the fleet credential, and says where it is.
    let o = keyfleet(
        &on_port_0("verifier", &["--authority", &auth.grpc, "--any-audience"]),
        None,
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--node-token-file") && stderr(&o).contains("node.token"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_input_gets_a_clear_answer() {
    // A wrong flag: usage error, exit 64.
    let o = keyfleet(&["authority", "--no-such-flag"], None);
    assert_eq!(o.status.code(), Some(64));
    // A bad duration says how to write one.
    let o = keyfleet(&["authority", "--token-ttl", "soon"], None);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("15m"), "{}", stderr(&o));
    // An unreachable authority: exit 69 and what to check.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "0".repeat(64)).unwrap();
    let o = keyfleet(
        &["keys", "list", "--authority", "http://127.0.0.1:1"],
        Some(token.path()),
    );
    assert_eq!(o.status.code(), Some(69));
    assert!(
        stderr(&o).contains("cannot reach the authority"),
        "{}",
        stderr(&o)
    );
    // --jwks-url without --issuer.
    let o = keyfleet(
        &on_port_0("verifier", &["--jwks-url", "http://127.0.0.1:1/jwks.json"]),
        None,
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--issuer"), "{}", stderr(&o));
    // Unsafe lifecycle timings are refused at start.
    let dir = tempfile::tempdir().unwrap();
    let o = keyfleet(
        &on_port_0(
            "authority",
            &[
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--rotation-period",
                "5m",
                "--publish-ahead",
                "10m",
            ],
        ),
        None,
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--publish-ahead"), "{}", stderr(&o));
    // --help teaches.
    let o = keyfleet(&["verifier", "--help"], None);
    assert!(o.status.success());
    assert!(
        stdout(&o).contains("--max-stale") && stdout(&o).contains("KEYFLEET_"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn demo_runs_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("demo.html");
    let o = keyfleet(
        &[
            "demo",
            "--tokens",
            "5",
            "--report-html",
            html.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        o.status.success(),
        "demo failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(
        out.contains("OK: every legitimate token verified on every node"),
        "{out}"
    );
    assert!(out.contains("wrong verdicts  0"), "{out}");
    assert!(out.contains("HTML report"), "{out}");
    let page = std::fs::read_to_string(&html).expect("the demo writes its HTML report");
    assert!(page.contains("<svg") && page.contains("PASS"), "{page}");
}

/// SIGKILL the authority at many moments while it rotates and mints: every restart loads a
/// consistent ring, and every token it handed out before the kill still has its key published.
#[test]
fn sigkill_during_rotations_leaves_a_consistent_ring() {
    use keyfleet_proto::v1::authority_client::AuthorityClient;
    use keyfleet_proto::v1::{GetJwksRequest, IssueTokenRequest, RotateKeysRequest};
    use keyfleet_testkit::grpc::bearer as with;

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut issued: Vec<String> = Vec::new();
    let mut rotations = 0;
    for round in 0..20u64 {
        let auth = authority(dir.path());
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let url = auth.grpc.clone();
        let jwks = rt.block_on(async {
            let mut c = AuthorityClient::connect(url).await.unwrap();
            let jwks = c.get_jwks(GetJwksRequest {}).await.unwrap().into_inner();
            // Everything minted before earlier kills is still verifiable: its key is published.
            let kids: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
            for kid in &issued {
                assert!(
                    kids.contains(&kid.as_str()),
                    "round {round}: key {kid} of an issued token vanished"
                );
            }
            assert!(kids.contains(&jwks.active_kid.as_str()));
            // Rotate and mint as fast as possible, and kill at a different moment each round.
            let work = async {
                loop {
                    if c.rotate_keys(with(RotateKeysRequest {}, &token))
                        .await
                        .is_ok()
                    {
                        rotations += 1;
                    }
                    let req = IssueTokenRequest {
                        subject: "s".into(),
                        audience: vec!["a".into()],
                        ttl_seconds: 0,
                        claims: Default::default(),
                    };
                    if let Ok(r) = c.issue_token(with(req, &token)).await {
                        issued.push(r.into_inner().kid);
                    }
                }
            };
            let _ =
                tokio::time::timeout(Duration::from_millis(20 + (round * 37) % 130), work).await;
            jwks
        });
        assert!(!jwks.keys.is_empty());
        drop(auth); // SIGKILL, mid-write at some point
        issued.dedup();
    }
    eprintln!(
        "{rotations} rotations, {} signing keys seen across 20 SIGKILLs",
        issued.len()
    );
    assert!(
        rotations > 20,
        "too few rotations ({rotations}) to have killed one mid-way"
    );
    // The final ring loads too.
    let auth = authority(dir.path());
    let admin = dir.path().join("admin.token");
    let list = keys_json(&auth, &admin);
    let active = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == "active")
        .count();
    assert_eq!(active, 1, "{list}");
}

/// An authority that requires client certificates and a verifier that follows it over mTLS
/// (`--authority-ca`, `--authority-client-cert`) and serves TLS itself, with a test CA, a
/// server certificate for 127.0.0.1 and a client certificate for `verifier-1` in `dir`.
struct TlsFleet {
    dir: tempfile::TempDir,
    auth: Process,
    ver: Process,
    /// `https://` and the authority's gRPC address.
    auth_url: String,
    /// `https://` and the verifier's gRPC address.
    ver_url: String,
}

impl TlsFleet {
    fn start() -> TlsFleet {
        let dir = tempfile::tempdir().unwrap();
        keyfleet_testkit::tls::Pki::new("keyfleet test ca").write(
            dir.path(),
            "127.0.0.1",
            "verifier-1",
        );
        let f = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let data = dir.path().join("authority");
        let auth = authority_with(
            &data,
            &[
                "--tls-cert",
                &f("server.pem"),
                "--tls-key",
                &f("server.key"),
                "--tls-client-ca",
                &f("ca.pem"),
            ],
        );
        let auth_url = auth.grpc.replace("http://", "https://");
        let ver = spawn(&on_port_0(
            "verifier",
            &[
                "--authority",
                &auth_url,
                "--authority-ca",
                &f("ca.pem"),
                "--authority-client-cert",
                &f("client.pem"),
                "--authority-client-key",
                &f("client.key"),
                "--node-token-file",
                data.join("node.token").to_str().unwrap(),
                "--tls-cert",
                &f("server.pem"),
                "--tls-key",
                &f("server.key"),
                "--node-id",
                "tls-1",
                // The tokens minted here, and the load generator's (its default audience).
                "--audience",
                "orders",
                "--audience",
                "loadtest",
            ],
        ));
        let ver_url = ver.grpc.replace("http://", "https://");
        TlsFleet {
            dir,
            auth,
            ver,
            auth_url,
            ver_url,
        }
    }

    /// The path of `name` in the fleet's dir (a PEM file of the test CA's).
    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn admin(&self) -> PathBuf {
        self.dir.path().join("authority/admin.token")
    }

    /// `--ca`, `--tls-cert` and `--tls-key`: the client side of mutual TLS.
    fn mtls(&self) -> [String; 6] {
        [
            "--ca".into(),
            self.file("ca.pem"),
            "--tls-cert".into(),
            self.file("client.pem"),
            "--tls-key".into(),
            self.file("client.key"),
        ]
    }

    /// `keyfleet token issue` for alice with `extra` flags.
    fn issue_with(&self, extra: &[&str]) -> Output {
        let alice = ["--subject", "alice", "--audience", "orders"];
        token_issue(
            &self.auth_url,
            Some(&self.admin()),
            &[&alice[..], extra].concat(),
        )
    }

    /// A token minted over mTLS.
    fn issue(&self) -> String {
        let mtls = self.mtls();
        minted(&self.issue_with(&mtls.each_ref().map(String::as_str)))
    }

    /// Waits until the verifier, asked over TLS, finds `token` valid: its exit code and verdict.
    fn until_valid(&self, token: &str) -> (Option<i32>, Value) {
        let ca = self.file("ca.pem");
        eventually("a valid verdict over TLS", Duration::from_secs(30), || {
            let o = keyfleet(
                &[
                    "token",
                    "verify",
                    "--verifier",
                    &self.ver_url,
                    "--ca",
                    &ca,
                    "--audience",
                    "orders",
                    token,
                ],
                None,
            );
            let v: Value = serde_json::from_str(&stdout(&o)).ok()?;
            (v["valid"] == true).then(|| (o.status.code(), v))
        })
    }
}

/// The TLS flags end to end: the CLI calls the authority with `--ca` and a client certificate
/// (and is refused without one, in plaintext, or trusting the wrong roots); the verifier
/// learned the keys over mTLS and answers, and reports its health, over TLS.
#[test]
fn tls_and_mutual_tls_through_the_cli() {
    let fleet = TlsFleet::start();
    let token = fleet.issue();
    let (ca, cert, key) = (
        fleet.file("ca.pem"),
        fleet.file("client.pem"),
        fleet.file("client.key"),
    );

    // Refused: no client certificate, plaintext to the TLS port, a CA the server is not from.
    assert!(
        !fleet.issue_with(&["--ca", &ca]).status.success(),
        "no client cert"
    );
    let plain = token_issue(
        &fleet.auth.grpc,
        Some(&fleet.admin()),
        &["--subject", "a", "--audience", "b"],
    );
    assert!(!plain.status.success(), "plaintext to a TLS listener");
    assert!(
        !fleet
            .issue_with(&["--tls-cert", &cert, "--tls-key", &key])
            .status
            .success(),
        "server not trusted by the web PKI roots"
    );

    // The verifier learned the keys over mTLS and answers over TLS.
    let (code, v) = fleet.until_valid(&token);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["node_id"], "tls-1");
    let health = keyfleet(&["health", "--grpc", &fleet.ver_url, "--ca", &ca], None);
    assert!(health.status.success(), "{}", stderr(&health));
    assert!(
        !keyfleet(&["health", "--grpc", &fleet.ver.grpc], None)
            .status
            .success()
    );
}

/// Over mTLS the authority names the watcher by its certificate (DNS name verifier-1), not by
/// the --node-id it says.
#[test]
fn over_mutual_tls_a_watcher_is_named_by_its_certificate() {
    let fleet = TlsFleet::start();
    let mtls = fleet.mtls();
    let list = eventually(
        "the certified watcher is listed",
        Duration::from_secs(30),
        || {
            let mut args = vec!["keys", "list", "--authority", &fleet.auth_url, "--json"];
            args.extend(mtls.iter().map(String::as_str));
            let o = keyfleet(&args, Some(&fleet.admin()));
            let l: Value = serde_json::from_str(&stdout(&o)).ok()?;
            let named = l["watchers"]
                .as_array()?
                .iter()
                .any(|w| w["node_id"] == "verifier-1");
            named.then_some(l)
        },
    );
    assert!(
        list["watchers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["node_id"] != "tls-1"),
        "{list}"
    );
}

/// The load generator takes the same TLS flags: it mints over mTLS and verifies over TLS.
#[test]
fn the_load_generator_takes_the_tls_flags() {
    let fleet = TlsFleet::start();
    fleet.until_valid(&fleet.issue());
    let report = fleet.dir.path().join("report.json");
    let mut args = vec![
        "loadtest",
        "--authority",
        &fleet.auth_url,
        "--verifiers",
        &fleet.ver_url,
        "--duration",
        "2s",
        "--concurrency",
        "4",
        "--tokens",
        "20",
        "--no-cost",
        "--report-json",
        report.to_str().unwrap(),
    ];
    let mtls = fleet.mtls();
    args.extend(mtls.iter().map(String::as_str));
    let o = keyfleet(&args, Some(&fleet.admin()));
    assert!(
        o.status.success(),
        "loadtest over TLS: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(
        (
            r["false_rejects"].as_u64(),
            r["false_accepts"].as_u64(),
            r["errors"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
}
