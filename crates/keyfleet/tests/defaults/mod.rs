//! Safe defaults through the real binary (issue 11): a verifier must be given an audience
//! policy and refuses a bad configuration before it listens; `--audience` is repeatable (and
//! comma-separated from the environment); `--max-lifetime` is a day unless set to 0.

use std::os::unix::fs::PermissionsExt as _;

use super::*;

/// A fleet credential file, as `--node-token-file` wants it (0600, long enough).
fn node_token(dir: &Path) -> String {
    let path = dir.join("fleet.token");
    std::fs::write(&path, format!("{}\n", "k".repeat(48))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Runs `keyfleet verifier <args>` and waits (bounded) for it to exit: its exit code (`None`
/// if it was still running and had to be killed) and its stderr.
fn verifier_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .arg("verifier")
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .env_remove("KEYFLEET_AUDIENCE")
        .env_remove("KEYFLEET_ANY_AUDIENCE")
        .env_remove("KEYFLEET_MAX_LIFETIME")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyfleet");
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let status = eventually_or_none(20, || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    (status.and_then(|s| s.code()), reader.join().unwrap())
}

/// Polls `f` for at most `secs` seconds; `None` when it never returned Some.
fn eventually_or_none<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        // A plain thread in a sync test: no runtime to block.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Environment variables to set.
type Env<'a> = Vec<(&'a str, &'a str)>;

/// Each bad configuration exits 64 with what to do, and never reports listening.
#[test]
fn verifier_refuses_a_bad_config_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let token = node_token(dir.path());
    let authority = |url: &'static str| vec!["--authority", url, "--node-token-file", &token];
    let local = authority("http://127.0.0.1:1");
    let with = |extra: &[&'static str]| {
        let mut args = local.clone();
        args.extend_from_slice(extra);
        args
    };
    let cases: Vec<(&str, Vec<&str>, Env, &str)> = vec![
        (
            "no audience policy",
            local.clone(),
            vec![],
            "a verifier needs an audience policy: pass --audience NAME (repeatable) for the services it guards, or --any-audience to accept tokens for any audience",
        ),
        (
            "both policies",
            with(&["--audience", "a", "--any-audience"]),
            vec![],
            "--audience and --any-audience contradict each other",
        ),
        (
            "both policies, from the environment",
            local.clone(),
            vec![
                ("KEYFLEET_AUDIENCE", "a,b"),
                ("KEYFLEET_ANY_AUDIENCE", "true"),
            ],
            "--audience and --any-audience contradict each other",
        ),
        (
            "not an http url",
            [authority("ftp://x:1"), vec!["--any-audience"]].concat(),
            vec![],
            "ftp://x:1",
        ),
        (
            "a newline in the node id",
            with(&["--any-audience", "--node-id", "a\nb"]),
            vec![],
            "--node-id \"a\\nb\" is not valid",
        ),
        (
            "a space in the region",
            with(&["--any-audience", "--region", "x y"]),
            vec![],
            "--region \"x y\" is not valid",
        ),
    ];
    for (what, args, env, advice) in cases {
        let (code, err) = verifier_exit(&args, &env);
        assert_eq!(code, Some(64), "{what}: {err}");
        assert!(err.contains(advice), "{what}: want {advice:?} in {err}");
        assert!(!err.contains("listening"), "{what}: it listened: {err}");
    }

    // --help explains both policies and the lifetime cap.
    let o = keyfleet(&["verifier", "--help"], None);
    let help = stdout(&o);
    for want in [
        "--audience <NAME>",
        "--any-audience",
        "KEYFLEET_ANY_AUDIENCE",
        "0 turns the check off",
        "[default: 24h]",
    ] {
        assert!(help.contains(want), "{want:?} missing from\n{help}");
    }
}

/// `token verify` without a caller audience: (exit code, reason).
fn reason(verifier: &Server, token: &str) -> (Option<i32>, String) {
    let o = keyfleet(
        &["token", "verify", "--verifier", &verifier.grpc, token],
        None,
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap_or(Value::Null);
    (
        o.status.code(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A node guarding a and b (flags, or the environment's comma list) accepts a token for b and
/// refuses one for c; a century-long token is refused by default and accepted with
/// `--max-lifetime 0`; `--any-audience` accepts c.
#[test]
fn audience_policy_and_max_lifetime_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
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
        // Lets the authority mint the century-long token a careless issuer might.
        "--token-ttl",
        "36500d",
        "--rotation-period",
        "3650d",
    ]);
    let fleet = data.join("node.token");
    let fleet = fleet.to_str().unwrap();
    let admin = data.join("admin.token");
    let node = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "verifier",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--authority",
            &auth.grpc,
            "--node-token-file",
            fleet,
        ];
        args.extend_from_slice(extra);
        let mut command = Command::new(BIN);
        command
            .env_remove("KEYFLEET_AUDIENCE")
            .env_remove("KEYFLEET_ANY_AUDIENCE")
            .env_remove("KEYFLEET_MAX_LIFETIME")
            .envs(env.iter().copied());
        spawn_with(command, &args)
    };
    // Distinct node ids: the authority refuses a second live watcher under one id.
    let guard = node(
        &["--node-id", "guard", "--audience", "a", "--audience", "b"],
        &[],
    );
    let from_env = node(&["--node-id", "from-env"], &[("KEYFLEET_AUDIENCE", "a,b")]);
    let open = node(
        &["--node-id", "open", "--any-audience", "--max-lifetime", "0"],
        &[],
    );

    let issue = |aud: &str, ttl: &str| {
        let o = keyfleet(
            &[
                "token",
                "issue",
                "--authority",
                &auth.grpc,
                "--subject",
                "alice",
                "--audience",
                aud,
                "--ttl",
                ttl,
            ],
            Some(&admin),
        );
        assert!(o.status.success(), "token issue: {}", stderr(&o));
        stdout(&o).trim().to_owned()
    };
    let for_b = issue("b", "15m");
    let for_c = issue("c", "15m");
    let century = issue("b", "36500d");

    for n in [&guard, &from_env, &open] {
        eventually(20, "a verifier to hold keys", || {
            (reason(n, &for_b).0 == Some(0)).then_some(())
        });
    }
    for n in [&guard, &from_env] {
        assert_eq!(reason(n, &for_b), (Some(0), "OK".into()));
        assert_eq!(reason(n, &for_c), (Some(1), "WRONG_AUDIENCE".into()));
        assert_eq!(reason(n, &century), (Some(1), "MALFORMED".into()));
    }
    assert_eq!(reason(&open, &for_c), (Some(0), "OK".into()));
    assert_eq!(reason(&open, &century), (Some(0), "OK".into()));
}
