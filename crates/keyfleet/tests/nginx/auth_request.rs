//! nginx `auth_request` guarding an app with a verifier's `GET /auth`
//! (deploy/nginx/auth-request.conf.template): the user reaches the app on 200, whatever the
//! client claimed; 401 with the verifier's `WWW-Authenticate` without or with a bad token; 403
//! for a missing scope; and a verifier that cannot answer refuses the request (fail closed).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::fleet::{Fleet, forged};
use crate::nginx::{self, Nginx};

/// An answer as the client saw it.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// `GET path` from `addr` with `headers`, over a fresh connection (`Connection: close`).
fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The app behind nginx: answers every request with the identity headers it received, one
/// `name=value` line each, and counts the requests that reached it.
struct App {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl App {
    fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || echo(stream));
            }
        });
        App { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let value = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map_or(String::new(), |(_, v)| v.trim().to_owned())
    };
    let body = format!(
        "user={}\nemail={}\nauthorization={}\n",
        value("x-auth-request-user"),
        value("x-auth-request-email"),
        value("authorization")
    );
    let _ = stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_lets_the_verified_user_through_and_refuses_with_401_and_403() {
    let Some(binary) = nginx::binary() else {
        return;
    };
    let mut fleet = Fleet::start(1).await;
    let verifier = fleet.verifiers[0].http_addr();
    let app = App::start();
    let port = nginx::free_port();
    let conf = nginx::template(
        "auth-request.conf.template",
        &[
            ("LISTEN", format!("127.0.0.1:{port}")),
            ("KEYFLEET_VERIFIER_HTTP", verifier.to_string()),
            ("APP", app.addr.to_string()),
        ],
    );
    let nginx = Nginx::start(&binary, &conf, port);
    let alice = fleet
        .issue(
            "alice",
            &[
                ("scope", "orders:read orders:write"),
                ("email", "alice@example.com"),
            ],
        )
        .await;
    let bob = fleet.issue("bob", &[("scope", "orders:write")]).await;
    let elsewhere = fleet
        .issue_for("carol", "billing", &[("scope", "orders:read")])
        .await;
    let addr = nginx.addr;
    let bearer = |token: &str| format!("Bearer {token}");
    let run = move |path: &'static str, headers: Vec<(&'static str, String)>| async move {
        tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            get(addr, path, &headers)
        })
        .await
        .unwrap()
    };

    // A verified token: the app sees the verifier's user and email, not what the client sent,
    // and not the token.
    let ok = run(
        "/orders/42",
        vec![
            ("Authorization", bearer(&alice)),
            ("X-Auth-Request-User", "mallory".into()),
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{}\n{}", ok.body, nginx.log());
    assert_eq!(
        ok.body, "user=alice\nemail=alice@example.com\nauthorization=\n",
        "what the app received"
    );
    let hits = app.hits();
    assert_eq!(hits, 1);

    // No token: 401 with a Bearer challenge, the app untouched.
    let none = run("/orders/42", vec![]).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(
        none.header("www-authenticate").starts_with("Bearer"),
        "{:?}",
        none.headers
    );

    // A forged signature, and a token for another audience: 401, invalid_token.
    for (what, token) in [("forged", forged(&alice)), ("another audience", elsewhere)] {
        let refused = run("/orders/42", vec![("Authorization", bearer(&token))]).await;
        assert_eq!(refused.status, 401, "{what}: {}", refused.body);
        let challenge = refused.header("www-authenticate");
        assert!(
            challenge.starts_with("Bearer") && challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge:?}"
        );
    }

    // A valid token without the route's scope: 403.
    let forbidden = run("/orders/42", vec![("Authorization", bearer(&bob))]).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    // The admin route wants orders:admin (and a recent login): alice is refused there.
    let admin = run("/admin/", vec![("Authorization", bearer(&alice))]).await;
    assert_eq!(admin.status, 403, "{}", admin.body);
    assert_eq!(app.hits(), hits, "a refused request reached the app");

    // A verifier that cannot answer: nginx refuses (500), never lets the request through.
    fleet.verifiers[0].kill();
    let down = run("/orders/42", vec![("Authorization", bearer(&alice))]).await;
    assert_eq!(down.status, 500, "{}", down.body);
    assert_eq!(
        app.hits(),
        hits,
        "a request reached the app without a verdict"
    );
    drop(nginx);
}
