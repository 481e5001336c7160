//! The `keyfleet` binary end to end, as an operator runs it: real processes on loopback ports,
//! the CLI's output and exit codes, a SIGKILLed authority, `keyfleet demo`.

mod attack;
mod defaults;
mod secure_files;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_keyfleet");

/// A server child process, killed on drop.
struct Server {
    child: Child,
    grpc: String,
    http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `keyfleet <args>` with JSON logs and waits for its "listening" line.
#[allow(clippy::zombie_processes)] // the returned Server kills and waits on drop
fn spawn(args: &[&str]) -> Server {
    spawn_with(Command::new(BIN), args)
}

/// [`spawn`] through `command` (the binary itself, or a wrapper that execs it).
#[allow(clippy::zombie_processes)] // the returned Server kills and waits on drop
fn spawn_with(mut command: Command, args: &[&str]) -> Server {
    let mut child = command
        .args(args)
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyfleet");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("keyfleet {args:?} did not report its addresses"));
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let f = &v["fields"];
        if f["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("listening"))
        {
            let grpc = format!("http://{}", f["grpc"].as_str().unwrap());
            let http = format!("http://{}", f["http"].as_str().unwrap());
            // Keep draining stderr so the child never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return Server { child, grpc, http };
        }
    }
}

fn authority(dir: &Path) -> Server {
    spawn(&[
        "authority",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--issuer",
        "https://issuer.test",
        "--publish-ahead",
        "20s",
    ])
}

/// A verifier following `authority` with the fleet credential in `node_token` (the
/// authority's `<data-dir>/node.token`).
fn verifier(authority: &str, node_token: &Path, node: &str) -> Server {
    spawn(&[
        "verifier",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
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
    ])
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

/// Polls `f` until it returns Some, for at most `secs` seconds.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // A plain thread in a sync test: no runtime to block.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify(verifier: &Server, token: &str) -> (i32, Value) {
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

fn issue(auth: &Server, admin: &Path) -> String {
    let o = keyfleet(
        &[
            "token",
            "issue",
            "--authority",
            &auth.grpc,
            "--subject",
            "alice",
            "--audience",
            "orders",
            "--claim",
            "role=admin",
        ],
        Some(admin),
    );
    assert!(o.status.success(), "token issue failed: {}", stderr(&o));
    stdout(&o).trim().to_owned()
}

/// A plain HTTP/1.1 GET over a raw socket: (status line, body).
fn http_get(base: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (head.to_owned(), body.to_owned())
}

fn keys_json(auth: &Server, admin: &Path) -> Value {
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

#[test]
fn operator_flow_across_rotation_and_authority_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.token");
    let auth = authority(dir.path());
    let nodes: Vec<Server> = (1..=3)
        .map(|i| {
            verifier(
                &auth.grpc,
                &dir.path().join("node.token"),
                &format!("node-{i}"),
            )
        })
        .collect();

    let token = issue(&auth, &admin);
    for node in &nodes {
        let (code, v) = eventually(20, "a verifier to hold keys", || {
            let (code, v) = verify(node, &token);
            (code == 0).then_some((code, v))
        });
        assert_eq!(code, 0);
        assert_eq!(v["valid"], true);
        assert_eq!(v["reason"], "OK");
        assert_eq!(v["subject"], "alice");
        assert_eq!(v["claims"]["role"], "admin");
    }

    // Every node watches and has acknowledged the current version.
    let list = eventually(20, "three acknowledging watchers", || {
        let l = keys_json(&auth, &admin);
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

    // The JWKS over HTTP carries the same keys, as RFC 7517 OKP keys, with a cache lifetime.
    let (head, body) = http_get(&auth.http, "/.well-known/jwks.json");
    assert!(
        head.starts_with("HTTP/1.1 200")
            && head
                .to_ascii_lowercase()
                .contains("cache-control: public, max-age="),
        "{head}"
    );
    let jwks: Value = serde_json::from_str(&body).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&before.as_str()), "{body}");
    for k in jwks["keys"].as_array().unwrap() {
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
    let (head, body) = http_get(&nodes[0].http, "/readyz");
    assert!(head.starts_with("HTTP/1.1 200"), "{head} {body}");

    // Rotate: returns once the new key signs; old and new tokens verify everywhere.
    let o = keyfleet(&["keys", "rotate", "--authority", &auth.grpc], Some(&admin));
    assert!(o.status.success(), "rotate: {}", stderr(&o));
    let after = active_kid(&keys_json(&auth, &admin));
    assert_ne!(before, after);
    let token2 = issue(&auth, &admin);
    for node in &nodes {
        for t in [&token, &token2] {
            let (code, v) = verify(node, t);
            assert_eq!((code, v["reason"].as_str()), (0, Some("OK")), "{v}");
        }
    }
    let table = stdout(&keyfleet(
        &["keys", "list", "--authority", &auth.grpc],
        Some(&admin),
    ));
    assert!(
        table.contains(&after) && table.contains("retiring") && table.contains("node-2"),
        "{table}"
    );

    // A forged token is refused with exit 1 and a reason.
    let mut forged = token2.clone();
    forged.replace_range(forged.len() - 2.., "AA");
    let (code, v) = verify(&nodes[0], &forged);
    assert_eq!(code, 1);
    assert_eq!(v["valid"], false);
    assert_eq!(v["reason"], "BAD_SIGNATURE");

    // SIGKILL the authority: the fleet keeps verifying.
    let jwks_before = keys_json(&auth, &admin)["keys"].clone();
    drop(auth);
    for node in &nodes {
        assert_eq!(verify(node, &token2).0, 0);
    }
    // Restarted on the same data dir: same published keys, same signer; new tokens verify.
    let auth = authority(dir.path());
    let list = keys_json(&auth, &admin);
    assert_eq!(list["keys"], jwks_before);
    assert_eq!(active_kid(&list), after);
    let token3 = issue(&auth, &admin);
    for node in &nodes {
        assert_eq!(verify(node, &token3).0, 0);
    }

    // Emergency revocation of the signing key: it stays listed, with its history.
    let o = keyfleet(
        &["keys", "revoke", &after, "--authority", &auth.grpc],
        Some(&admin),
    );
    assert!(o.status.success(), "revoke: {}", stderr(&o));
    let table = stdout(&keyfleet(
        &["keys", "list", "--authority", &auth.grpc],
        Some(&admin),
    ));
    let line = table
        .lines()
        .find(|l| l.starts_with(&after))
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
    let dir = tempfile::tempdir().unwrap();
    let auth = authority(dir.path());
    let admin = dir.path().join("admin.token");
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
    let dir = tempfile::tempdir().unwrap();
    let auth = authority(dir.path());
    let o = keyfleet(
        &[
            "token",
            "issue",
            "--authority",
            &auth.grpc,
            "--subject",
            "a",
            "--audience",
            "b",
        ],
        None,
    );
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
    let admin = dir.path().join("admin.token");
    let o = keyfleet(&["keys", "list", "--authority", &auth.grpc], Some(&admin));
    assert!(o.status.success(), "{}", stderr(&o));

    // A verifier following an authority needs the fleet credential, and says where it is.
    let o = keyfleet(
        &[
            "verifier",
            "--authority",
            &auth.grpc,
            "--any-audience",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
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
        &[
            "verifier",
            "--jwks-url",
            "http://127.0.0.1:1/jwks.json",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("--issuer"), "{}", stderr(&o));
    // Unsafe lifecycle timings are refused at start.
    let dir = tempfile::tempdir().unwrap();
    let o = keyfleet(
        &[
            "authority",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--rotation-period",
            "5m",
            "--publish-ahead",
            "10m",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
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
        fn with<T>(msg: T, token: &str) -> tonic::Request<T> {
            let mut req = tonic::Request::new(msg);
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            req
        }
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

/// Writes a test CA, a server certificate for 127.0.0.1 and a client certificate (all made
/// now with rcgen) into `dir`: ca.pem, server.pem, server.key, client.pem, client.key.
fn write_pki(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for (name, san, usage) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "verifier-1", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// The TLS flags end to end: an authority that requires client certificates, a verifier that
/// follows it over mTLS (`--authority-ca`, `--authority-client-cert`) and serves TLS itself,
/// and the CLI calling both with `--ca` (and `--tls-cert`/`--tls-key` for mTLS).
#[test]
fn tls_and_mutual_tls_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    write_pki(pki);
    let f = |name: &str| pki.join(name).to_str().unwrap().to_owned();
    let data = dir.path().join("authority");
    let auth = spawn(&[
        "authority",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--issuer",
        "https://issuer.test",
        "--tls-cert",
        &f("server.pem"),
        "--tls-key",
        &f("server.key"),
        "--tls-client-ca",
        &f("ca.pem"),
    ]);
    let auth_url = auth.grpc.replace("http://", "https://");
    let ver = spawn(&[
        "verifier",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
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
    ]);
    let ver_url = ver.grpc.replace("http://", "https://");
    let admin = data.join("admin.token");
    let issue_with = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "issue",
            "--authority",
            &auth_url,
            "--subject",
            "alice",
            "--audience",
            "orders",
        ];
        args.extend_from_slice(extra);
        keyfleet(&args, Some(&admin))
    };
    let (ca, cert, key) = (f("ca.pem"), f("client.pem"), f("client.key"));
    let o = issue_with(&["--ca", &ca, "--tls-cert", &cert, "--tls-key", &key]);
    assert!(o.status.success(), "issue over mTLS: {}", stderr(&o));
    let token = stdout(&o).trim().to_owned();

    // Refused: no client certificate, plaintext to the TLS port, a CA the server is not from.
    assert!(
        !issue_with(&["--ca", &ca]).status.success(),
        "no client cert"
    );
    let plain = keyfleet(
        &[
            "token",
            "issue",
            "--authority",
            &auth.grpc,
            "--subject",
            "a",
            "--audience",
            "b",
        ],
        Some(&admin),
    );
    assert!(!plain.status.success(), "plaintext to a TLS listener");
    assert!(
        !issue_with(&["--tls-cert", &cert, "--tls-key", &key])
            .status
            .success(),
        "server not trusted by the web PKI roots"
    );

    // The verifier learned the keys over mTLS and answers over TLS.
    let (code, v) = eventually(30, "a valid verdict over TLS", || {
        let o = keyfleet(
            &[
                "token",
                "verify",
                "--verifier",
                &ver_url,
                "--ca",
                &ca,
                "--audience",
                "orders",
                &token,
            ],
            None,
        );
        let v: Value = serde_json::from_str(&stdout(&o)).ok()?;
        (v["valid"] == true).then(|| (o.status.code(), v))
    });
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["node_id"], "tls-1");
    // Over mTLS the authority names the watcher by its certificate (DNS name verifier-1), not
    // by the --node-id it says.
    let list = eventually(30, "the certified watcher is listed", || {
        let o = keyfleet(
            &[
                "keys",
                "list",
                "--authority",
                &auth_url,
                "--ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--json",
            ],
            Some(&admin),
        );
        let l: Value = serde_json::from_str(&stdout(&o)).ok()?;
        let named = l["watchers"]
            .as_array()?
            .iter()
            .any(|w| w["node_id"] == "verifier-1");
        named.then_some(l)
    });
    assert!(
        list["watchers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["node_id"] != "tls-1"),
        "{list}"
    );
    // The load generator takes the same TLS flags: it mints over mTLS and verifies over TLS.
    let report = dir.path().join("report.json");
    let o = keyfleet(
        &[
            "loadtest",
            "--authority",
            &auth_url,
            "--verifiers",
            &ver_url,
            "--ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--duration",
            "2s",
            "--concurrency",
            "4",
            "--tokens",
            "20",
            "--no-cost",
            "--report-json",
            report.to_str().unwrap(),
        ],
        Some(&admin),
    );
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
    let health = keyfleet(&["health", "--grpc", &ver_url, "--ca", &ca], None);
    assert!(health.status.success(), "{}", stderr(&health));
    assert!(
        !keyfleet(&["health", "--grpc", &ver.grpc], None)
            .status
            .success()
    );
}
