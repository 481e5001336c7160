//! The servers the fan-out benchmark starts as child processes of the `keyfleet` binary: an
//! authority on loopback with a temporary data dir, and relays (`keyfleet verifier
//! --serve-watch`). Child processes, so their CPU and memory can be read from
//! `/proc/<pid>` apart from the load generator's own.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use anyhow::{Context as _, anyhow};

/// How long a server may take to say where it listens.
const STARTUP: Duration = Duration::from_secs(60);
/// Log lines of a child kept for an error message.
const KEPT_LINES: usize = 20;

/// A server process, killed and reaped on drop.
#[derive(Debug)]
pub(crate) struct ChildServer {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) grpc_url: String,
    /// Its last log lines (warnings and errors; the child logs little else).
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl ChildServer {
    /// Runs `program args…` with JSON logs filtered by `rust_log`, and waits for its
    /// "… listening" line (which names the gRPC address).
    pub(crate) async fn start(
        program: &Path,
        args: Vec<String>,
        rust_log: &str,
    ) -> anyhow::Result<ChildServer> {
        let mut command = Command::new(program);
        command.args(&args).args(["--log-format", "json"]);
        // The caller's KEYFLEET_* settings are for the load generator, not for this server.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEYFLEET_") {
                command.env_remove(name);
            }
        }
        command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let what = format!("{} {}", program.display(), args.join(" "));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let lines: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<String>();
        let kept = lines.clone();
        std::thread::spawn(move || {
            // Reads until the child exits, so it never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let mut server = ChildServer {
            child,
            pid,
            grpc_url: String::new(),
            lines,
        };
        let found = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + STARTUP;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let line = rx.recv_timeout(left).ok()?;
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let f = &v["fields"];
                if f["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("listening"))
                {
                    return f["grpc"].as_str().map(|a| format!("http://{a}"));
                }
            }
        })
        .await
        .context("waiting for a server to start")?;
        match found {
            Some(grpc_url) => {
                server.grpc_url = grpc_url;
                Ok(server)
            }
            None => Err(anyhow!(
                "{what} did not report its addresses within {}s; its last lines:\n{}",
                STARTUP.as_secs(),
                server.last_lines()
            )),
        }
    }

    /// The child's last log lines, one per line.
    pub(crate) fn last_lines(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// True while the process runs.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local authority: the process and its temporary data dir (deleted after the process).
#[derive(Debug)]
pub(crate) struct LocalAuthority {
    pub(crate) server: ChildServer,
    pub(crate) admin_token: String,
    pub(crate) node_token_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts `keyfleet authority` on loopback sized for `watchers` streams: its caps (overall and
/// per peer address: every stream comes from 127.0.0.1) and the admin rate (the benchmark's
/// changes come as fast as the fleet takes them) are raised to fit.
pub(crate) async fn start_authority(
    program: &Path,
    watchers: usize,
) -> anyhow::Result<LocalAuthority> {
    let dir = tempfile::tempdir().context("creating the authority's temporary data dir")?;
    let data = dir.path().join("authority");
    let cap = (watchers + 64).to_string();
    let args = [
        "authority",
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.to_string_lossy(),
        "--max-watchers",
        &cap,
        "--max-watchers-per-peer",
        &cap,
        "--admin-rate",
        "100000",
    ]
    .map(String::from)
    .to_vec();
    let server = ChildServer::start(program, args, "warn,keyfleet_authority::serve=info").await?;
    let admin_token = std::fs::read_to_string(data.join(keyfleet_authority::ADMIN_TOKEN_FILE))
        .context("reading the local authority's admin token")?
        .trim()
        .to_owned();
    Ok(LocalAuthority {
        server,
        admin_token,
        node_token_file: data.join(keyfleet_authority::NODE_TOKEN_FILE),
        _dir: dir,
    })
}

/// Starts relay `index`: `keyfleet verifier --serve-watch` following `authority_url` (with the
/// fleet credential in `node_token_file`), serving `watchers` downstream streams.
pub(crate) async fn start_relay(
    program: &Path,
    index: usize,
    authority_url: &str,
    node_token_file: &Path,
    watchers: usize,
) -> anyhow::Result<ChildServer> {
    let _ = watchers;
    let name = format!("fanout-relay-{index}");
    let args = [
        "verifier",
        "--serve-watch",
        "--authority",
        authority_url,
        "--node-token-file",
        &node_token_file.to_string_lossy(),
        "--any-audience",
        "--node-id",
        &name,
        "--region",
        &name,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    ChildServer::start(program, args, "warn,keyfleet::servers=info").await
}
