//! Descriptor exhaustion through one listener, played against the real binary: a verifier
//! limited to 256 open files (a careless service unit) and 300 idle HTTP connections. Before
//! connection caps the HTTP listener took every descriptor and gRPC `Verify` timed out.

use super::*;

/// `keyfleet <args>` with its open-files limit set to `limit` (soft and hard).
fn spawn_with_fd_limit(limit: u32, args: &[&str]) -> Server {
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
        BIN,
    ]);
    spawn_with(command, args)
}

#[test]
fn idle_http_connections_cannot_starve_grpc_at_a_256_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let auth = authority(dir.path());
    let admin = dir.path().join("admin.token");
    let jwks = format!("{}/.well-known/jwks.json", auth.http);
    let node = spawn_with_fd_limit(
        256,
        &[
            "verifier",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--jwks-url",
            &jwks,
            "--issuer",
            "https://issuer.test",
            "--any-audience",
            "--node-id",
            "fd-limited",
        ],
    );
    let token = issue(&auth, &admin);
    eventually(20, "the node to hold the key set", || {
        (verify(&node, &token).0 == 0).then_some(())
    });

    let http = node.http.trim_start_matches("http://");
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(http).unwrap())
        .collect();
    for _ in 0..3 {
        let (code, verdict) = verify(&node, &token);
        assert_eq!(
            code, 0,
            "Verify answers with 300 idle HTTP connections: {verdict}"
        );
        assert_eq!(verdict["valid"], true);
    }
    drop(idle);
}
