//! `keyfleet session …`: persistent login from the command line (`StartSession`, `Refresh`,
//! `EndSession`, `RevokeSubject`, `ListSessions`). Refresh tokens are secrets: they are read
//! from a file or stdin when possible, written to a 0600 file on request, and never put in an
//! error message.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use keyfleet_authority::client::AdminBearer;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::{
    EndSessionRequest, ListSessionsRequest, ListSessionsResponse, RefreshRequest,
    RevokeSubjectRequest, SessionTokens, StartSessionRequest,
};
use keyfleet_runtime::clock::system_now;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::cli::{AdminCred, AuthorityConn, RefreshTokenIn, SessionCommand, SessionOut};
use crate::client::{ago, connect, explain, parse_claim, shown, terminal_json, time};
use crate::exit::CliError;

pub async fn run(cmd: SessionCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionCommand::Start {
            conn,
            cred,
            subject,
            audience,
            scopes,
            claims,
            auth_time,
            acr,
            amr,
            out,
        } => {
            let claims = claims
                .iter()
                .map(|c| parse_claim(c))
                .collect::<anyhow::Result<_>>()?;
            let auth_time = auth_time.as_deref().map(parse_time).transpose()?;
            let bearer = bearer(&cred)?;
            let request = StartSessionRequest {
                subject,
                audience,
                scopes,
                claims,
                auth_time: auth_time.unwrap_or(0),
                acr: acr.unwrap_or_default(),
                amr,
            };
            let tokens = api(&conn)
                .await?
                .start_session(bearer.authorize(Request::new(request)))
                .await
                .map_err(|s| explain_session(s, "start session", &conn, Credential::Admin))?
                .into_inner();
            print_tokens(&tokens, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Refresh {
            conn,
            token,
            scopes,
            out,
        } => {
            let refresh_token = read_refresh_token(&token)?;
            let tokens = api(&conn)
                .await?
                .refresh(RefreshRequest {
                    refresh_token,
                    scopes,
                })
                .await
                .map_err(|s| explain_session(s, "refresh", &conn, Credential::RefreshToken))?
                .into_inner();
            print_tokens(&tokens, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::End {
            conn,
            cred,
            session_id,
            refresh_token_file,
            refresh_token,
            json,
        } => {
            let (request, credential) = match session_id {
                Some(session_id) => {
                    let bearer = bearer(&cred)?;
                    let msg = EndSessionRequest {
                        session_id,
                        refresh_token: String::new(),
                    };
                    (bearer.authorize(Request::new(msg)), Credential::Admin)
                }
                None => {
                    let token = read_refresh_token(&RefreshTokenIn {
                        refresh_token_file,
                        refresh_token,
                    })?;
                    let msg = EndSessionRequest {
                        session_id: String::new(),
                        refresh_token: token,
                    };
                    (Request::new(msg), Credential::RefreshToken)
                }
            };
            let r = api(&conn)
                .await?
                .end_session(request)
                .await
                .map_err(|s| explain_session(s, "end session", &conn, credential))?
                .into_inner();
            if json {
                let value =
                    json!({"session_id": r.session_id, "ended": r.ended, "version": r.version});
                println!("{}", terminal_json(&value)?);
            } else if r.ended {
                println!(
                    "session {} ended; every verifier refuses its access tokens (SESSION_REVOKED) once it holds key-set version {}",
                    shown(&r.session_id),
                    r.version
                );
            } else {
                println!("session {} had already ended", shown(&r.session_id));
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::RevokeSubject {
            conn,
            cred,
            subject,
            json,
        } => {
            let bearer = bearer(&cred)?;
            let msg = RevokeSubjectRequest {
                subject: subject.clone(),
            };
            let r = api(&conn)
                .await?
                .revoke_subject(bearer.authorize(Request::new(msg)))
                .await
                .map_err(|s| explain_session(s, "revoke subject", &conn, Credential::Admin))?
                .into_inner();
            if json {
                let value = json!({"subject": subject, "sessions_ended": r.sessions_ended, "version": r.version});
                println!("{}", terminal_json(&value)?);
            } else {
                println!(
                    "{} live session(s) of {} ended; every verifier refuses their access tokens (SESSION_REVOKED) once it holds key-set version {}",
                    r.sessions_ended,
                    shown(&subject),
                    r.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::List {
            conn,
            cred,
            subject,
            json,
        } => {
            let bearer = bearer(&cred)?;
            let msg = ListSessionsRequest {
                subject: subject.clone(),
            };
            let r = api(&conn)
                .await?
                .list_sessions(bearer.authorize(Request::new(msg)))
                .await
                .map_err(|s| explain_session(s, "list sessions", &conn, Credential::Admin))?
                .into_inner();
            if json {
                println!("{}", terminal_json(&list_json(&r))?);
            } else {
                print!("{}", render_sessions(&subject, &r, system_now()));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Which credential a call carried, so a refusal names the right one.
#[derive(Debug, Clone, Copy)]
enum Credential {
    Admin,
    RefreshToken,
}

async fn api(conn: &AuthorityConn) -> anyhow::Result<AuthorityClient<Channel>> {
    let channel = connect(&conn.authority, "authority", "--authority", &conn.tls).await?;
    Ok(AuthorityClient::new(channel))
}

/// The admin credential as a header value (checked before anything is sent).
fn bearer(cred: &AdminCred) -> anyhow::Result<AdminBearer> {
    let token = crate::client::admin_token(cred)?;
    AdminBearer::new(&token).map_err(|e| {
        anyhow::Error::new(e).context(CliError::Usage(
            "the admin credential (--admin-token-file or KEYFLEET_ADMIN_TOKEN)".into(),
        ))
    })
}

/// A session call's refusal for a human. The server's message is escaped; the refresh token is
/// never part of it.
fn explain_session(
    status: Status,
    action: &str,
    conn: &AuthorityConn,
    credential: Credential,
) -> anyhow::Error {
    let message = shown(status.message());
    match (status.code(), credential) {
        (Code::Unauthenticated, Credential::RefreshToken) => anyhow::anyhow!(
            "{action}: the authority refused the refresh token ({message}); this login cannot be continued: \
log in again (`keyfleet session start`)"
        ),
        (Code::Unimplemented, _) => CliError::Usage(format!(
            "{action}: the authority at {} does not serve sessions ({message}): upgrade it to a keyfleet with persistent login",
            conn.authority
        ))
        .into(),
        (Code::ResourceExhausted, _) => anyhow::anyhow!(
            "{action}: the authority is limiting this client ({message}): wait a moment and try again"
        ),
        _ => explain(status, action),
    }
}

/// `--refresh-token-file` (a file, or `-` for stdin) or `--refresh-token`, trimmed.
fn read_refresh_token(input: &RefreshTokenIn) -> anyhow::Result<String> {
    let (text, from) = match (&input.refresh_token_file, &input.refresh_token) {
        (Some(path), _) if path.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context(CliError::Usage(
                    "cannot read the refresh token from stdin".into(),
                ))?;
            (s, "stdin".to_owned())
        }
        (Some(path), _) => {
            let s = std::fs::read_to_string(path).context(CliError::Usage(format!(
                "cannot read the refresh token file {}",
                path.display()
            )))?;
            (s, format!("the refresh token file {}", path.display()))
        }
        (None, Some(token)) => (token.clone(), "--refresh-token".to_owned()),
        (None, None) => {
            return Err(CliError::Usage(
                "give the refresh token with --refresh-token-file FILE (or - for stdin) or --refresh-token".into(),
            )
            .into());
        }
    };
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::Usage(format!("{from} holds no refresh token")).into());
    }
    Ok(token.to_owned())
}

/// Unix seconds or an RFC 3339 time.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(n) = s.parse::<i64>()
        && n > 0
    {
        return Ok(n);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s)
        && let Ok(d) = t.duration_since(std::time::UNIX_EPOCH)
    {
        return Ok(d.as_secs() as i64);
    }
    Err(CliError::Usage(format!(
        "--auth-time {s:?}: give Unix seconds (when the password was checked) or an RFC 3339 time"
    ))
    .into())
}

/// Prints a session's tokens; the refresh token goes to `--refresh-token-out` when given.
fn print_tokens(t: &SessionTokens, out: &SessionOut) -> anyhow::Result<()> {
    if let Some(path) = &out.refresh_token_out {
        write_refresh_token(path, &t.refresh_token)?;
    }
    let refresh = match &out.refresh_token_out {
        Some(_) => None,
        None => Some(t.refresh_token.as_str()),
    };
    if out.json {
        let mut value = json!({
            "session_id": t.session_id,
            "access_token": t.access_token,
            "access_expires_at": t.access_expires_at,
            "session_expires_at": t.session_expires_at,
        });
        if let Some(r) = refresh {
            value["refresh_token"] = r.into();
        }
        println!("{}", terminal_json(&value)?);
        return Ok(());
    }
    let now = system_now();
    println!("session_id          {}", shown(&t.session_id));
    println!(
        "access_expires_at   {} ({})",
        time(t.access_expires_at),
        ago(now, t.access_expires_at)
    );
    println!(
        "session_expires_at  {} ({}; later refreshes push it back up to the session's maximum age)",
        time(t.session_expires_at),
        ago(now, t.session_expires_at)
    );
    println!("access_token        {}", shown(&t.access_token));
    match (refresh, &out.refresh_token_out) {
        (Some(r), _) => println!("refresh_token       {}", shown(r)),
        (None, Some(path)) => println!("refresh_token       (written to {})", path.display()),
        (None, None) => {}
    }
    Ok(())
}

fn write_refresh_token(path: &Path, token: &str) -> anyhow::Result<()> {
    keyfleet_runtime::secure_fs::write_atomic(path, format!("{token}\n").as_bytes()).with_context(
        || {
            format!(
                "cannot write the new refresh token to {} (the old one is spent: this login now needs a new `session start`)",
                path.display()
            )
        },
    )
}

fn list_json(r: &ListSessionsResponse) -> serde_json::Value {
    json!({
        "sessions": r.sessions.iter().map(|s| json!({
            "session_id": s.session_id, "subject": s.subject, "scopes": s.scopes,
            "auth_time": s.auth_time, "started_at": s.started_at, "last_refresh_at": s.last_refresh_at,
            "refresh_count": s.refresh_count, "idle_expires_at": s.idle_expires_at,
            "absolute_expires_at": s.absolute_expires_at, "ended_at": s.ended_at,
            "end_reason": s.end_reason,
        })).collect::<Vec<_>>(),
    })
}

/// The `session list` table. Every string from the server is escaped.
pub fn render_sessions(subject: &str, r: &ListSessionsResponse, now: i64) -> String {
    let live = r.sessions.iter().filter(|s| s.ended_at == 0).count();
    let mut out = format!(
        "{} session(s) of {} ({live} live)\n\nSESSION                      STATE                 LOGIN       STARTED     LAST REFRESH  REFRESHES  IDLE EXPIRY  MAX EXPIRY   SCOPES\n",
        r.sessions.len(),
        shown(subject),
    );
    for s in &r.sessions {
        let state = if s.ended_at == 0 {
            "live".to_owned()
        } else {
            format!("ended: {}", shown(&s.end_reason))
        };
        let scopes = s.scopes.iter().map(|x| shown(x)).collect::<Vec<_>>();
        out.push_str(&format!(
            "{:<28} {:<21} {:<11} {:<11} {:<13} {:<10} {:<12} {:<12} {}\n",
            shown(&s.session_id),
            state,
            ago(now, s.auth_time),
            ago(now, s.started_at),
            ago(now, s.last_refresh_at),
            s.refresh_count,
            if s.ended_at == 0 {
                ago(now, s.idle_expires_at)
            } else {
                "-".into()
            },
            if s.ended_at == 0 {
                ago(now, s.absolute_expires_at)
            } else {
                "-".into()
            },
            if scopes.is_empty() {
                "-".into()
            } else {
                scopes.join(" ")
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use keyfleet_proto::v1::SessionInfo;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<SessionCommand, clap::Error> {
        let cli = Cli::try_parse_from(["keyfleet", "session"].iter().chain(args))?;
        match cli.command {
            Command::Session(cmd) => Ok(cmd),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// A refresh needs exactly one source of the refresh token; `end` needs a session id or a
    /// refresh token, not both.
    #[test]
    fn refresh_and_end_take_exactly_one_credential() {
        assert!(parse(&["refresh"]).is_err());
        assert!(parse(&["refresh", "--refresh-token-file", "-"]).is_ok());
        assert!(
            parse(&[
                "refresh",
                "--refresh-token-file",
                "f",
                "--refresh-token",
                "t"
            ])
            .is_err()
        );
        assert!(parse(&["end"]).is_err());
        assert!(parse(&["end", "--session-id", "s", "--refresh-token-file", "f"]).is_err());
        let Ok(SessionCommand::End { session_id, .. }) = parse(&["end", "--session-id", "s"])
        else {
            panic!("end --session-id")
        };
        assert_eq!(session_id.as_deref(), Some("s"));
        let Ok(SessionCommand::RevokeSubject { subject, .. }) =
            parse(&["revoke-subject", "-alice"])
        else {
            panic!("revoke-subject")
        };
        assert_eq!(subject, "-alice");
    }

    /// An empty token file is refused before any call, and the message names the file only.
    #[test]
    fn an_empty_refresh_token_file_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt");
        std::fs::write(&path, "\n").unwrap();
        let input = RefreshTokenIn {
            refresh_token_file: Some(path.clone()),
            refresh_token: None,
        };
        let e = read_refresh_token(&input).unwrap_err();
        assert_eq!(crate::exit::exit_code(&e), crate::exit::EXIT_CONFIG);
        assert!(format!("{e:#}").contains("holds no refresh token"), "{e:#}");
        std::fs::write(&path, "  rt-secret \n").unwrap();
        assert_eq!(read_refresh_token(&input).unwrap(), "rt-secret");
    }

    /// A refused refresh says so and what to do, escaped.
    #[test]
    fn a_refused_refresh_token_says_log_in_again() {
        let conn = AuthorityConn {
            authority: "http://127.0.0.1:1".into(),
            tls: Default::default(),
        };
        let status = Status::unauthenticated("refresh token spent\u{1b}[2J");
        let text = format!(
            "{:#}",
            explain_session(status, "refresh", &conn, Credential::RefreshToken)
        );
        assert!(
            text.contains("log in again") && !text.contains('\u{1b}'),
            "{text}"
        );
    }

    #[test]
    fn the_session_table_escapes_and_shows_end_reasons() {
        let r = ListSessionsResponse {
            sessions: vec![
                SessionInfo {
                    session_id: "s1\u{1b}[2J\nFAKE".into(),
                    scopes: vec!["read".into(), "write".into()],
                    started_at: 900,
                    auth_time: 900,
                    ..SessionInfo::default()
                },
                SessionInfo {
                    session_id: "s2".into(),
                    ended_at: 950,
                    end_reason: "refresh_token_reuse".into(),
                    ..SessionInfo::default()
                },
            ],
        };
        let table = render_sessions("alice", &r, 1000);
        assert_eq!(table.lines().count(), 5, "{table}");
        assert!(!table.lines().any(|l| l.starts_with("FAKE")), "{table}");
        assert!(table.contains("ended: refresh_token_reuse"), "{table}");
        assert!(table.contains("read write"), "{table}");
        assert!(table.contains("(1 live)"), "{table}");
    }
}
