//! The admin and client commands (`token …`, `keys …`): thin gRPC calls with errors that say
//! what went wrong and what to do.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::verifier_client::VerifierClient;
use keyfleet_proto::v1::{
    IssueTokenRequest, KeyState, ListKeysRequest, ListKeysResponse, Reason, RevokeKeyRequest,
    RevokeTokenRequest, RotateKeysRequest, VerifyRequest,
};
use keyfleet_runtime::clock::system_now;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::cli::{
    AdminCred, ClientTlsArgs, EXIT_CONFIG, EXIT_UNAVAILABLE, KeysCommand, TokenCommand, exit_with,
};

/// Connects to a gRPC server (over TLS for an https:// URL), explaining an unreachable one.
pub async fn connect(
    url: &str,
    what: &str,
    flag: &str,
    tls: &ClientTlsArgs,
) -> anyhow::Result<Channel> {
    let tls = tls.load()?;
    let endpoint = keyfleet_runtime::tls::endpoint(url, &tls)
        .map_err(|e| {
            exit_with(
                EXIT_CONFIG,
                anyhow!("{flag} {url:?} is not a URL ({e}): write it like http://127.0.0.1:7000"),
            )
        })?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    endpoint.connect().await.map_err(|e| {
        exit_with(
            EXIT_UNAVAILABLE,
            anyhow!("cannot reach the {what} at {url}: {e}; is it running there? (set {flag} or KEYFLEET_{})", flag.trim_start_matches("--").to_uppercase()),
        )
    })
}

/// Turns a gRPC error into a message for a human.
fn explain(status: Status, action: &str) -> anyhow::Error {
    match status.code() {
        Code::Unauthenticated => exit_with(
            EXIT_CONFIG,
            anyhow!(
                "{action}: the authority refused the admin credential ({}): pass --admin-token-file with the authority's admin.token, or set KEYFLEET_ADMIN_TOKEN",
                status.message()
            ),
        ),
        Code::Unavailable => exit_with(
            EXIT_UNAVAILABLE,
            anyhow!("{action}: server unavailable: {}", status.message()),
        ),
        _ => anyhow!("{action}: {} ({:?})", status.message(), status.code()),
    }
}

/// Reads the admin token from `--admin-token-file` or `KEYFLEET_ADMIN_TOKEN`.
pub fn admin_token(cred: &AdminCred) -> anyhow::Result<String> {
    if let Some(path) = &cred.admin_token_file {
        return read_token_file(path);
    }
    match std::env::var("KEYFLEET_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => Err(exit_with(
            EXIT_CONFIG,
            anyhow!(
                "this command needs the admin credential: pass --admin-token-file (the authority's <data-dir>/admin.token) or set KEYFLEET_ADMIN_TOKEN"
            ),
        )),
    }
}

fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        exit_with(
            EXIT_CONFIG,
            anyhow!("cannot read the admin token file {}: {e}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(exit_with(
            EXIT_CONFIG,
            anyhow!("the admin token file {} is empty", path.display()),
        ));
    }
    Ok(token.to_owned())
}

/// Wraps `msg` in a request carrying `authorization: Bearer <token>`.
pub fn with_admin<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    let value = format!("Bearer {token}")
        .parse()
        .context("the admin token has characters that cannot go in a header")?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

fn parse_claim(kv: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| exit_with(EXIT_CONFIG, anyhow!("--claim {kv:?} is not KEY=VALUE")))?;
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
    Err(exit_with(
        EXIT_CONFIG,
        anyhow!(
            "--until {s:?}: give Unix seconds (the token's exp), an RFC 3339 time or a duration like 15m"
        ),
    ))
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
            let token = admin_token(&cred)?;
            let claims = claims
                .iter()
                .map(|c| parse_claim(c))
                .collect::<anyhow::Result<_>>()?;
            let mut client = AuthorityClient::new(
                connect(&conn.authority, "authority", "--authority", &conn.tls).await?,
            );
            let req = IssueTokenRequest {
                subject,
                audience,
                ttl_seconds: ttl.map_or(0, |d| d.as_secs() as i64),
                claims,
            };
            let resp = client
                .issue_token(with_admin(req, &token)?)
                .await
                .map_err(|s| explain(s, "issue token"))?;
            println!("{}", resp.into_inner().token);
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Verify {
            verifier,
            audience,
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
            println!("{}", serde_json::to_string_pretty(&out)?);
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
            let token = admin_token(&cred)?;
            let until = parse_until(&until)?;
            let mut client = AuthorityClient::new(
                connect(&conn.authority, "authority", "--authority", &conn.tls).await?,
            );
            let resp = client
                .revoke_token(with_admin(
                    RevokeTokenRequest {
                        jti: jti.clone(),
                        until,
                    },
                    &token,
                )?)
                .await
                .map_err(|s| explain(s, "revoke token"))?;
            println!(
                "token {jti} denied until {until} (JWKS version {})",
                resp.into_inner().version
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::List { conn, json } => {
            let mut client = AuthorityClient::new(
                connect(&conn.authority, "authority", "--authority", &conn.tls).await?,
            );
            let resp = client
                .list_keys(ListKeysRequest {})
                .await
                .map_err(|s| explain(s, "list keys"))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&list_json(&resp))?);
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
            let token = admin_token(&cred)?;
            let mut client = AuthorityClient::new(
                connect(&conn.authority, "authority", "--authority", &conn.tls).await?,
            );
            let r = client
                .rotate_keys(with_admin(RotateKeysRequest {}, &token)?)
                .await
                .map_err(|s| explain(s, "rotate keys"))?
                .into_inner();
            if r.activated || no_wait {
                let state = if r.activated {
                    "active"
                } else {
                    "promoting (waiting for the fleet's acknowledgements)"
                };
                println!("key {} is {state}", r.promoting_kid);
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "key {} is published; waiting until every watching verifier holds it (at most --publish-ahead)...",
                r.promoting_kid
            );
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let list = client
                    .list_keys(ListKeysRequest {})
                    .await
                    .map_err(|s| explain(s, "list keys"))?
                    .into_inner();
                let state = list
                    .keys
                    .iter()
                    .find(|k| k.kid == r.promoting_kid)
                    .map(|k| k.state());
                match state {
                    Some(KeyState::Active) | Some(KeyState::Retiring) => {
                        println!("key {} is active", r.promoting_kid);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(KeyState::Next) => {}
                    other => {
                        return Err(anyhow!(
                            "key {} left the rotation (now {:?}): see `keyfleet keys list`",
                            r.promoting_kid,
                            other
                        ));
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(anyhow!(
                        "key {} is still not active after {}: see `keyfleet keys list` for lagging watchers",
                        r.promoting_kid,
                        humantime::format_duration(timeout)
                    ));
                }
            }
        }
        KeysCommand::Revoke { conn, cred, kid } => {
            let token = admin_token(&cred)?;
            let mut client = AuthorityClient::new(
                connect(&conn.authority, "authority", "--authority", &conn.tls).await?,
            );
            let r = client
                .revoke_key(with_admin(RevokeKeyRequest { kid }, &token)?)
                .await
                .map_err(|s| explain(s, "revoke key"))?
                .into_inner();
            println!(
                "key {} revoked; {} signs now (JWKS version {})",
                r.revoked_kid, r.active_kid, r.version
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn state_name(state: i32) -> &'static str {
    match KeyState::try_from(state) {
        Ok(KeyState::Next) => "next",
        Ok(KeyState::Active) => "active",
        Ok(KeyState::Retiring) => "retiring",
        Ok(KeyState::Retired) => "retired",
        Ok(KeyState::Revoked) => "revoked",
        _ => "unknown",
    }
}

fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t as u64))
        .to_string()
}

fn ago(now: i64, t: i64) -> String {
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
            "last_seen": w.last_seen, "connected": w.connected,
        })).collect::<Vec<_>>(),
    })
}

/// The `keys list` table: the ring, then the fleet.
pub fn render_list(r: &ListKeysResponse) -> String {
    let mut out = format!(
        "issuer {}  JWKS version {}  next rotation {} ({})\n\nKID                                          STATE     PUBLISHED  ACTIVATED  DEACTIVATED  LEAVES JWKS\n",
        r.issuer,
        r.version,
        time(r.next_rotation_at),
        ago(r.now, r.next_rotation_at)
    );
    for k in &r.keys {
        out.push_str(&format!(
            "{:<44} {:<9} v{:<9} {:<10} {:<12} {}\n",
            k.kid,
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
        "\nWATCHERS ({} connected, {} behind version {})\nNODE                     REGION       HOLDS      LAST SEEN  CONNECTED\n",
        r.watchers.iter().filter(|w| w.connected).count(),
        behind,
        r.version
    ));
    for w in &r.watchers {
        out.push_str(&format!(
            "{:<24} {:<12} v{:<9} {:<10} {}\n",
            w.node_id,
            w.region,
            w.acked_version,
            ago(r.now, w.last_seen),
            if w.connected { "yes" } else { "no" }
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
