//! The admin and client commands (`token …`, `keys …`, `health`): each command's arguments
//! and output. The calls go through `keyfleet_authority::client::AdminClient`; this file
//! keeps the human side: errors that say what went wrong and what to do, and output safe to
//! print.

use std::borrow::Cow;
use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_authority::client::{AdminClient, ClientError, WaitError, state_name};
use keyfleet_core::escape_untrusted;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{IssueTokenRequest, ListKeysResponse, Reason, VerifyRequest};
use keyfleet_runtime::client::{ConnectError, Settings};
use keyfleet_runtime::clock::system_now;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::cli::{AdminCred, AuthorityConn, ClientTlsArgs, KeysCommand, TokenCommand};
use crate::exit::CliError;

/// How often `keys rotate` looks whether the promoted key signs yet: an operator is waiting,
/// the authority is remote, and the wait is for a fleet's acknowledgements (seconds at least).
const ROTATE_POLL: Duration = Duration::from_millis(250);

/// Connects to the gRPC server at `url` (the `what`, set with `flag`), over TLS for https://.
pub(crate) async fn connect(
    url: &str,
    what: &str,
    flag: &str,
    tls: &ClientTlsArgs,
) -> anyhow::Result<Channel> {
    keyfleet_runtime::client::connect(url, &tls.load()?, &Settings::COMMAND)
        .await
        .map_err(|e| explain_connect(e, url, what, flag))
}

/// Connects the admin client to `--authority` with the admin credential.
async fn admin(conn: &AuthorityConn, cred: &AdminCred) -> anyhow::Result<AdminClient> {
    let token = admin_token(cred)?;
    let url = &conn.authority;
    AdminClient::connect(url, &conn.tls.load()?, &Settings::COMMAND, &token)
        .await
        .map_err(|e| match e {
            ClientError::BadToken => anyhow::Error::new(e).context(CliError::Usage(
                "the admin credential (--admin-token-file or KEYFLEET_ADMIN_TOKEN)".into(),
            )),
            ClientError::Connect(e) => explain_connect(e, url, "authority", "--authority"),
        })
}

/// A bad URL (exit 64) or an unreachable server (exit 69), with the flag that sets it.
pub(crate) fn explain_connect(e: ConnectError, url: &str, what: &str, flag: &str) -> anyhow::Error {
    match e {
        ConnectError::Endpoint(e) => anyhow::Error::new(e).context(CliError::Usage(flag.into())),
        ConnectError::Unreachable { source, .. } => {
            let env = flag.trim_start_matches("--").to_uppercase();
            anyhow::Error::new(source).context(CliError::Unavailable(format!(
                "cannot reach the {what} at {url}: is it running there? (set {flag} or KEYFLEET_{env})"
            )))
        }
    }
}

/// Text a server chose, made safe to print: control characters (ESC, CR, LF, …) escaped, so a
/// hostile or confused server cannot drive the operator's terminal or fake output lines.
pub(crate) fn shown(text: &str) -> Cow<'_, str> {
    escape_untrusted(text)
}

/// Pretty JSON safe for a terminal. serde_json escapes the C0 controls inside strings but leaves
/// DEL, the C1 controls (U+009B starts an escape sequence on some terminals) and U+2028/U+2029
/// raw; those can only occur inside strings, where a `\uXXXX` escape is the same JSON value.
pub(crate) fn terminal_json(value: &serde_json::Value) -> anyhow::Result<String> {
    let text = serde_json::to_string_pretty(value)?;
    let raw = |c: char| c >= '\u{7f}' && (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'));
    if !text.chars().any(raw) {
        return Ok(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if raw(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Turns a gRPC error into a message for a human (the server's message escaped).
pub(crate) fn explain(status: Status, action: &str) -> anyhow::Error {
    let message = shown(status.message());
    match status.code() {
        Code::Unauthenticated => CliError::Usage(format!(
            "{action}: the authority refused the admin credential ({message}): pass --admin-token-file with the authority's admin.token, or set KEYFLEET_ADMIN_TOKEN"
        ))
        .into(),
        Code::Unavailable => {
            CliError::Unavailable(format!("{action}: server unavailable: {message}")).into()
        }
        _ => anyhow!("{action}: {message} ({:?})", status.code()),
    }
}

/// Reads the admin token from `--admin-token-file` or `KEYFLEET_ADMIN_TOKEN`.
pub fn admin_token(cred: &AdminCred) -> anyhow::Result<String> {
    if let Some(path) = &cred.admin_token_file {
        return read_token_file(path);
    }
    match std::env::var("KEYFLEET_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => Err(CliError::Usage(
            "this command needs the admin credential: pass --admin-token-file (the authority's <data-dir>/admin.token) or set KEYFLEET_ADMIN_TOKEN".into(),
        )
        .into()),
    }
}

fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).context(CliError::Usage(format!(
        "cannot read the admin token file {}",
        path.display()
    )))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(
            CliError::Usage(format!("the admin token file {} is empty", path.display())).into(),
        );
    }
    Ok(token.to_owned())
}

pub(crate) fn parse_claim(kv: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| CliError::Usage(format!("--claim {kv:?} is not KEY=VALUE")))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Parses `--until`: Unix seconds, an RFC 3339 time, or a duration from now.
fn parse_until(s: &str) -> anyhow::Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(system_now() + d.as_secs() as i64);
    }
    Err(CliError::Usage(format!(
        "--until {s:?}: give Unix seconds (the token's exp), an RFC 3339 time or a duration like 15m"
    ))
    .into())
}

pub async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue {
            conn,
            cred,
            subject,
            audience,
            ttl,
            claims,
        } => {
            let claims = claims
                .iter()
                .map(|c| parse_claim(c))
                .collect::<anyhow::Result<_>>()?;
            let client = admin(&conn, &cred).await?;
            let req = IssueTokenRequest {
                subject,
                audience,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs() as i64),
                claims,
            };
            let resp = client
                .issue(req)
                .await
                .map_err(|s| explain(s, "issue token"))?;
            println!("{}", shown(&resp.token));
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Verify {
            verifier,
            audience,
            scopes,
            max_auth_age,
            tls,
            token,
        } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the token from stdin")?;
                s.trim().to_owned()
            } else {
                token
            };
            let mut client =
                VerifierClient::new(connect(&verifier, "verifier", "--verifier", &tls).await?);
            let req = VerifyRequest {
                token,
                audience: audience.unwrap_or_default(),
                required_scopes: scopes,
                max_auth_age_seconds: max_auth_age.map_or(0, |d| d.as_secs().max(1) as i64),
            };
            let r = client
                .verify(req)
                .await
                .map_err(|s| explain(s, "verify"))?
                .into_inner();
            let claims: serde_json::Value =
                serde_json::from_str(&r.claims_json).unwrap_or(serde_json::Value::Null);
            let out = json!({
                "valid": r.valid,
                "reason": Reason::try_from(r.reason).map_or("REASON_UNSPECIFIED", |x| x.as_str_name()),
                "kid": r.kid,
                "subject": r.subject,
                "issuer": r.issuer,
                "expires_at": r.expires_at,
                "jti": r.jti,
                "claims": claims,
                "node_id": r.node_id,
                "region": r.region,
                "detail": r.detail,
            });
            println!("{}", terminal_json(&out)?);
            Ok(if r.valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        TokenCommand::Revoke {
            conn,
            cred,
            jti,
            until,
        } => {
            let until = parse_until(&until)?;
            let client = admin(&conn, &cred).await?;
            let resp = client
                .revoke_token(&jti, until)
                .await
                .map_err(|s| explain(s, "revoke token"))?;
            println!(
                "token {jti} denied until {until} (JWKS version {})",
                resp.version
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::List { conn, cred, json } => {
            // The fleet view (node ids, regions, the schedule) is for operators only.
            let resp = admin(&conn, &cred)
                .await?
                .list_keys()
                .await
                .map_err(|s| explain(s, "list keys"))?;
            if json {
                println!("{}", terminal_json(&list_json(&resp))?);
            } else {
                print!("{}", render_list(&resp));
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Rotate {
            conn,
            cred,
            no_wait,
            timeout,
        } => {
            let client = admin(&conn, &cred).await?;
            let r = client
                .rotate()
                .await
                .map_err(|s| explain(s, "rotate keys"))?;
            let kid = shown(&r.promoting_kid);
            if r.activated || no_wait {
                let state = if r.activated {
                    "active"
                } else {
                    "promoting (waiting for the fleet's acknowledgements)"
                };
                println!("key {kid} is {state}");
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "key {kid} is published; waiting until every watching verifier holds it (at most --publish-ahead)..."
            );
            match client
                .wait_until_signing(&r.promoting_kid, timeout, ROTATE_POLL)
                .await
            {
                Ok(()) => {
                    println!("key {kid} is active");
                    Ok(ExitCode::SUCCESS)
                }
                Err(WaitError::Rotate(s)) => Err(explain(s, "rotate keys")),
                Err(WaitError::List(s)) => Err(explain(s, "list keys")),
                Err(WaitError::LeftRotation { state, .. }) => Err(anyhow!(
                    "key {kid} left the rotation (now {state}): see `keyfleet keys list`"
                )),
                Err(WaitError::TimedOut { timeout, .. }) => Err(anyhow!(
                    "key {kid} is still not active after {}: see `keyfleet keys list` for lagging watchers",
                    humantime::format_duration(timeout)
                )),
            }
        }
        KeysCommand::Revoke { conn, cred, kid } => {
            let r = admin(&conn, &cred)
                .await?
                .revoke_key(&kid)
                .await
                .map_err(|s| explain(s, "revoke key"))?;
            println!(
                "key {} revoked; {} signs now (JWKS version {})",
                shown(&r.revoked_kid),
                shown(&r.active_kid),
                r.version
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t as u64))
        .to_string()
}

pub(crate) fn ago(now: i64, t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    let d = now - t;
    if d >= 0 {
        format!("{}s ago", d)
    } else {
        format!("in {}s", -d)
    }
}

fn list_json(r: &ListKeysResponse) -> serde_json::Value {
    json!({
        "issuer": r.issuer,
        "version": r.version,
        "now": r.now,
        "next_rotation_at": r.next_rotation_at,
        "token_ttl_seconds": r.token_ttl_seconds,
        "publish_ahead_seconds": r.publish_ahead_seconds,
        "rotation_period_seconds": r.rotation_period_seconds,
        "keys": r.keys.iter().map(|k| json!({
            "kid": k.kid, "state": state_name(k.state), "created_at": k.created_at, "published_at": k.published_at,
            "activated_at": k.activated_at, "deactivated_at": k.deactivated_at, "retire_at": k.retire_at,
            "revoked_at": k.revoked_at, "published_version": k.published_version,
        })).collect::<Vec<_>>(),
        "watchers": r.watchers.iter().map(|w| json!({
            "node_id": w.node_id, "region": w.region, "acked_version": w.acked_version,
            "last_seen": w.last_seen, "connected": w.connected, "via": w.via,
        })).collect::<Vec<_>>(),
    })
}

/// The `keys list` table: the ring, then the fleet. Every string from the server is escaped.
pub fn render_list(r: &ListKeysResponse) -> String {
    let mut out = format!(
        "issuer {}  JWKS version {}  next rotation {} ({})\n\nKID                                          STATE     PUBLISHED  ACTIVATED  DEACTIVATED  LEAVES JWKS\n",
        shown(&r.issuer),
        r.version,
        time(r.next_rotation_at),
        ago(r.now, r.next_rotation_at)
    );
    for k in &r.keys {
        out.push_str(&format!(
            "{:<44} {:<9} v{:<9} {:<10} {:<12} {}\n",
            shown(&k.kid),
            state_name(k.state),
            k.published_version,
            ago(r.now, k.activated_at),
            ago(r.now, k.deactivated_at),
            if k.revoked_at > 0 {
                format!("revoked {}", ago(r.now, k.revoked_at))
            } else if k.retire_at > 0 {
                ago(r.now, k.retire_at)
            } else {
                "-".into()
            },
        ));
    }
    let behind = r
        .watchers
        .iter()
        .filter(|w| w.connected && w.acked_version < r.version)
        .count();
    out.push_str(&format!(
        "\nWATCHERS ({} connected, {} behind version {})\nNODE                     REGION       HOLDS      LAST SEEN  CONNECTED  VIA\n",
        r.watchers.iter().filter(|w| w.connected).count(),
        behind,
        r.version
    ));
    for w in &r.watchers {
        out.push_str(&format!(
            "{:<24} {:<12} v{:<9} {:<10} {:<10} {}\n",
            shown(&w.node_id),
            shown(&w.region),
            w.acked_version,
            ago(r.now, w.last_seen),
            if w.connected { "yes" } else { "no" },
            // A node watching the authority directly has no relay.
            if w.via.is_empty() {
                Cow::Borrowed("-")
            } else {
                shown(&w.via)
            }
        ));
    }
    out
}

/// `keyfleet health`: exit 0 when the server reports SERVING for `service`.
pub async fn health(url: &str, service: &str, tls: &ClientTlsArgs) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(
        connect(url, "server", "--grpc", tls).await?,
    );
    let r = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| explain(s, "health check"))?
        .into_inner();
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfleet_proto::v1::{KeyInfo, KeyState, WatcherInfo};

    /// What a hostile (or confused) authority could send: ESC sequences, CR, LF, C1 controls.
    const HOSTILE: &str = "node-1\u{1b}[2J\r\nERROR KEY RING CORRUPTED\u{9b}31m\u{7f}";

    fn hostile_list() -> ListKeysResponse {
        ListKeysResponse {
            issuer: format!("https://issuer{HOSTILE}"),
            version: 3,
            now: 1_000,
            keys: vec![KeyInfo {
                kid: format!("kid{HOSTILE}"),
                state: KeyState::Active as i32,
                ..KeyInfo::default()
            }],
            watchers: vec![WatcherInfo {
                node_id: HOSTILE.into(),
                region: format!("eu{HOSTILE}"),
                acked_version: 3,
                connected: true,
                via: format!("relay{HOSTILE}"),
                ..WatcherInfo::default()
            }],
            ..ListKeysResponse::default()
        }
    }

    fn has_raw_control(text: &str) -> bool {
        text.chars().any(|c| c != '\n' && c.is_control())
    }

    /// `keys list` prints node ids, regions, kids and the issuer with every control character
    /// escaped: nothing the server says can clear the screen or add a line to the table.
    #[test]
    fn keys_list_table_escapes_control_characters() {
        let table = render_list(&hostile_list());
        assert!(!has_raw_control(&table), "{table:?}");
        // The table has its own lines only: header, blank, column titles, one key, blank, the
        // watcher header, column titles, one watcher.
        assert_eq!(table.lines().count(), 8, "{table}");
        assert!(
            table.contains("node-1\\u{1b}[2J\\u{d}\\u{a}ERROR KEY RING CORRUPTED\\u{9b}31m\\u{7f}"),
            "{table}"
        );
        assert!(!table.lines().any(|l| l.starts_with("ERROR")), "{table}");
        assert!(table.contains("relaynode-1\\u{1b}[2J"), "{table}");
    }

    /// The table names the relay a node watches through, and `-` for a direct watcher.
    #[test]
    fn keys_list_shows_the_relay_each_node_watches_through() {
        let watcher = |node: &str, via: &str| WatcherInfo {
            node_id: node.into(),
            region: "eu".into(),
            acked_version: 3,
            connected: true,
            via: via.into(),
            ..WatcherInfo::default()
        };
        let list = ListKeysResponse {
            version: 3,
            watchers: vec![watcher("relay-eu", ""), watcher("node-7", "relay-eu")],
            ..ListKeysResponse::default()
        };
        let table = render_list(&list);
        let row = |node: &str| {
            table
                .lines()
                .find(|l| l.starts_with(node))
                .unwrap_or_else(|| panic!("no row for {node}: {table}"))
                .split_whitespace()
                .last()
                .unwrap()
                .to_owned()
        };
        assert_eq!(row("relay-eu"), "-", "{table}");
        assert_eq!(row("node-7"), "relay-eu", "{table}");
        assert!(table.contains("VIA"), "{table}");
        assert_eq!(list_json(&list)["watchers"][1]["via"], "relay-eu");
    }

    /// `--json` output (and `token verify`'s) stays valid JSON with the same values, and holds
    /// no raw control character either (serde_json alone leaves DEL and the C1 range raw).
    #[test]
    fn json_output_escapes_what_serde_json_leaves_raw() {
        let value = list_json(&hostile_list());
        assert!(has_raw_control(
            &serde_json::to_string_pretty(&value).unwrap()
        ));
        let text = terminal_json(&value).unwrap();
        assert!(!has_raw_control(&text), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        assert_eq!(back["watchers"][0]["node_id"], HOSTILE);
    }

    /// A server's error message reaches the operator escaped.
    #[test]
    fn server_error_messages_are_escaped() {
        for code in [Code::Unauthenticated, Code::Unavailable, Code::Internal] {
            let e = explain(Status::new(code, HOSTILE), "list keys");
            let text = format!("{e:#}");
            assert!(!has_raw_control(&text) && !text.contains('\n'), "{text:?}");
            assert!(text.contains("ERROR KEY RING CORRUPTED"), "{text}");
        }
    }
}
