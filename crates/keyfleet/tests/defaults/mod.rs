//! Safe defaults through the real binary (issue 11): a verifier must be given an audience
//! policy and refuses a bad configuration before it listens; `--audience` is repeatable (and
//! comma-separated from the environment); `--max-lifetime` is a day unless set to 0.

use keyfleet_testkit::files::write_private;
use keyfleet_testkit::process::exit_of;

use super::*;

/// A fleet credential file, as `--node-token-file` wants it (0600, long enough).
fn node_token(dir: &Path) -> String {
    let path = dir.join("fleet.token");
    write_private(&path, format!("{}\n", "k".repeat(48)));
    path.to_str().unwrap().to_owned()
}

/// Runs `keyfleet verifier <args>` and waits (bounded) for it to exit: its exit code (`None`
/// if it was still running and had to be killed) and its stderr.
fn verifier_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = verifier_command(env);
    command.args(on_port_0("verifier", args));
    exit_of(command, SETTLE)
}

/// The binary with no audience policy or lifetime cap from this environment, and `env`.
fn verifier_command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("KEYFLEET_AUDIENCE")
        .env_remove("KEYFLEET_ANY_AUDIENCE")
        .env_remove("KEYFLEET_MAX_LIFETIME")
        .envs(env.iter().copied());
    command
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
fn reason(verifier: &Process, token: &str) -> (Option<i32>, String) {
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
    // Lets the authority mint the century-long token a careless issuer might.
    let auth = authority_with(
        &data,
        &["--token-ttl", "36500d", "--rotation-period", "3650d"],
    );
    let fleet = data.join("node.token");
    let fleet = fleet.to_str().unwrap();
    let admin = data.join("admin.token");
    let node = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--authority", &auth.grpc, "--node-token-file", fleet];
        args.extend_from_slice(extra);
        spawn_with(verifier_command(env), &on_port_0("verifier", &args))
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
        let args = ["--subject", "alice", "--audience", aud, "--ttl", ttl];
        minted(&token_issue(&auth.grpc, Some(&admin), &args))
    };
    let for_b = issue("b", "15m");
    let for_c = issue("c", "15m");
    let century = issue("b", "36500d");

    for n in [&guard, &from_env, &open] {
        eventually("a verifier to hold keys", SETTLE, || {
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
