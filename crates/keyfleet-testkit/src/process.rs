//! The `keyfleet` binary as a process: a server started on port 0 that reports where it
//! listens (its JSON "listening" log line), or a command run until it exits. The binary's path
//! is the caller's (`env!("CARGO_BIN_EXE_keyfleet")` exists only in that crate's tests).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The flags that put both of a server's listeners on loopback port 0.
pub const PORT_0: [&str; 4] = [
    "--grpc-listen",
    "127.0.0.1:0",
    "--http-listen",
    "127.0.0.1:0",
];

/// How long a server process may take to report its addresses.
const STARTUP: Duration = Duration::from_secs(30);

/// A server process, killed (SIGKILL) and reaped on drop.
pub struct Process {
    child: Child,
    /// `http://` and the gRPC address.
    pub grpc: String,
    /// `http://` and the HTTP address.
    pub http: String,
}

impl Process {
    /// Runs `command` (a `keyfleet` server command, or a wrapper that execs one) with JSON logs
    /// and waits for its "listening" line.
    #[allow(clippy::zombie_processes)] // the returned Process kills and waits on drop
    pub fn start(mut command: Command) -> Process {
        let what = format!("{command:?}");
        let (child, stderr) = spawn_logging_json(&mut command);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("{what} did not report its addresses"));
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
                return Process { child, grpc, http };
            }
        }
    }

    /// SIGKILLs the process and reaps it (again: a no-op).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.trim_start_matches("http://").parse().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` with JSON logs until it exits, for at most `limit`: its exit code (`None`
/// when it was still running and had to be killed) and its stderr.
pub fn exit_of(mut command: Command, limit: Duration) -> (Option<i32>, String) {
    let (mut child, mut pipe) = spawn_logging_json(&mut command);
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let status = crate::eventually::blocking::within(limit, || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    (status.and_then(|s| s.code()), reader.join().unwrap())
}

/// Spawns `command` with JSON logs at the default level on its stderr (piped, and returned),
/// no stdin and no stdout.
fn spawn_logging_json(command: &mut Command) -> (Child, ChildStderr) {
    let mut child = command
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let stderr = child.stderr.take().unwrap();
    (child, stderr)
}
