//! A real nginx process over one of deploy/nginx's templates.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyfleet_testkit::eventually::blocking::within;

/// How long nginx may take to listen.
const STARTUP: Duration = Duration::from_secs(10);

/// Set to 1 (as `.ci/run` does) and a missing nginx fails the tests instead of skipping them.
const REQUIRE: &str = "KEYFLEET_REQUIRE_NGINX";

/// The nginx binary, or `None` (after a loud note) when it is missing and not required.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        if std::env::var(REQUIRE).is_ok_and(|v| v == "1") {
            panic!(
                "{REQUIRE}=1 but no nginx binary is installed (looked in PATH, /usr/sbin, /usr/local/sbin): install it (apt-get install nginx) or unset {REQUIRE}"
            );
        }
        eprintln!(
            "\n!!!!!!!! SKIPPED: no nginx binary (apt-get install nginx); this nginx test checked nothing. Set {REQUIRE}=1 to make a missing nginx fail. !!!!!!!!\n"
        );
    }
    found
}

/// A free loopback port (bound then released: nginx binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// deploy/nginx/`name` with every `${KEY}` of `vars` replaced. Panics on a placeholder left
/// unfilled, so a template and its test cannot drift apart.
pub fn template(name: &str, vars: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/nginx")
        .join(name);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (key, value) in vars {
        let placeholder = format!("${{{key}}}");
        assert!(text.contains(&placeholder), "{name} has no {placeholder}");
        text = text.replace(&placeholder, value);
    }
    // Comments may name placeholders; configuration lines may not keep one.
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        assert!(
            !code.contains("${"),
            "{name}: unfilled placeholder in {line:?}"
        );
    }
    text
}

/// An nginx serving `conf` (http{}-level configuration) on `port`; killed on drop.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _prefix: tempfile::TempDir,
}

impl Nginx {
    pub fn start(binary: &Path, conf: &str, port: u16) -> Nginx {
        let prefix = tempfile::tempdir().unwrap();
        let dir = prefix.path();
        std::fs::write(dir.join("keyfleet.conf"), conf).unwrap();
        let temp = |what: &str| format!("{what}_temp_path {};", dir.join(what).display());
        let main = format!(
            "events {{ worker_connections 1024; }}\nhttp {{\n    access_log off;\n    {}\n    {}\n    {}\n    {}\n    {}\n    include {};\n}}\n",
            temp("client_body"),
            temp("proxy"),
            temp("fastcgi"),
            temp("uwsgi"),
            temp("scgi"),
            dir.join("keyfleet.conf").display()
        );
        let main_path = dir.join("nginx.conf");
        std::fs::write(&main_path, main).unwrap();
        let globals = format!(
            "daemon off; master_process off; pid {}; error_log stderr notice;",
            dir.join("nginx.pid").display()
        );
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&main_path)
            .args(["-e", "stderr", "-g", &globals])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut nginx = Nginx {
            child,
            addr,
            log,
            _prefix: prefix,
        };
        let up = within(STARTUP, || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}) at start:\n{}", nginx.log());
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        assert!(
            up.is_some(),
            "nginx did not listen on {addr} within {STARTUP:?}:\n{}",
            nginx.log()
        );
        nginx
    }

    /// What nginx logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
