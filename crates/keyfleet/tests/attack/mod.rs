//! Descriptor exhaustion through one listener, played against the real binary: a verifier
//! limited to 256 open files (a careless service unit) and 300 idle HTTP connections. Before
//! connection caps the HTTP listener took every descriptor and gRPC `Verify` timed out.

use super::*;

/// `keyfleet <args>` with its open-files limit set to `limit` (soft and hard).
fn spawn_with_fd_limit(limit: u32, args: &[&str]) -> Process {
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
    let fleet = Fleet::start(0);
    let jwks = format!("{}/.well-known/jwks.json", fleet.auth.http);
    let node = spawn_with_fd_limit(
        256,
        &on_port_0(
            "verifier",
            &[
                "--jwks-url",
                &jwks,
                "--issuer",
                "https://issuer.test",
                "--any-audience",
                "--node-id",
                "fd-limited",
            ],
        ),
    );
    let token = fleet.issue();
    eventually("the node to hold the key set", SETTLE, || {
        (verify(&node, &token).0 == 0).then_some(())
    });

    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(node.http_addr()).unwrap())
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
