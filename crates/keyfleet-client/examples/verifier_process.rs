//! One verifier node as its own process, for the pool's tests (a node stopped with SIGSTOP
//! must be another process) and for trying the pool by hand:
//!
//! ```text
//! cargo run -p keyfleet-client --example verifier_process -- AUTHORITY_URL NODE_TOKEN_FILE NODE_ID [AUDIENCE]
//! ```
//!
//! Without an audience the node accepts any (`--any-audience`).
//!
//! It listens on two loopback ports the system picks, prints `grpc=ADDR http=ADDR` on stdout
//! once bound, and runs until killed.

use std::io::Write as _;
use std::time::Duration;

use keyfleet_verifier::{CancellationToken, Config, Source};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (authority, token_file, node_id, audience) = match args.as_slice() {
        [a, t, n] => (a, t, n, None),
        [a, t, n, aud] => (a, t, n, Some(aud.clone())),
        _ => {
            return Err(
                "usage: verifier_process AUTHORITY_URL NODE_TOKEN_FILE NODE_ID [AUDIENCE]".into(),
            );
        }
    };
    let mut config = Config::new(Source::Authority {
        url: authority.clone(),
    });
    match audience {
        Some(audience) => config.audiences = vec![audience],
        None => config.any_audience = true,
    }
    config.node_token_file = Some(token_file.into());
    config.node_id = node_id.clone();
    config.refresh_interval = Duration::from_secs(30);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let line = format!("grpc={} http={}\n", grpc.local_addr()?, http.local_addr()?);
    let mut stdout = std::io::stdout();
    stdout.write_all(line.as_bytes())?;
    stdout.flush()?;
    keyfleet_verifier::run(grpc, http, config, CancellationToken::new()).await?;
    Ok(())
}
