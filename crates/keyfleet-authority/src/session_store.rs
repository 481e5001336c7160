//! The session store behind one trait, [`SessionStore`]: every operation is one atomic
//! transaction, answered only once it is durable. The embedded default is SQLite
//! (`sqlite.rs`); a shared database (PostgreSQL, for several authority replicas) implements the
//! same trait. What a refresh *means* — rotate, retry within the grace window, reuse, ended,
//! expired — is decided here, by [`decide`], so every backend answers alike; a backend only
//! finds the rows, locks them for its transaction, and writes what `decide` says.

use serde_json::{Map, Value};

/// SHA-256 of a refresh token: the only form in which a refresh token is stored.
pub type TokenHash = [u8; 32];

/// Why a session ended, as `ListSessions` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `EndSession` with the session's refresh token.
    Logout,
    /// `RevokeSubject`.
    RevokedSubject,
    /// A spent refresh token was presented: possibly stolen, so the session ends.
    RefreshTokenReuse,
    /// `EndSession` by session id, with the admin credential.
    Admin,
    IdleExpired,
    MaxAgeExpired,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Logout => "logout",
            EndReason::RevokedSubject => "revoked_subject",
            EndReason::RefreshTokenReuse => "refresh_token_reuse",
            EndReason::Admin => "admin",
            EndReason::IdleExpired => "idle_expired",
            EndReason::MaxAgeExpired => "max_age_expired",
        }
    }

    pub fn parse(text: &str) -> Option<EndReason> {
        [
            EndReason::Logout,
            EndReason::RevokedSubject,
            EndReason::RefreshTokenReuse,
            EndReason::Admin,
            EndReason::IdleExpired,
            EndReason::MaxAgeExpired,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// A session as stored (its refresh tokens are only hashes, kept by the backend).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The `sid` of its access tokens.
    pub id: String,
    pub subject: String,
    pub audience: Vec<String>,
    /// The scopes granted at login; a refresh may ask for fewer, never more.
    pub scopes: Vec<String>,
    /// Custom claims and `acr`/`amr` for every access token of the session.
    pub claims: Map<String, Value>,
    pub auth_time: i64,
    pub started_at: i64,
    /// 0 before the first refresh.
    pub last_refresh_at: i64,
    pub refresh_count: u64,
    /// Extended by each refresh.
    pub idle_expires_at: i64,
    /// Fixed at login (`--session-max`).
    pub absolute_expires_at: i64,
    /// When the newest access token expires: what a revocation of the session must outlast.
    pub access_expires_at: i64,
    /// 0 while live.
    pub ended_at: i64,
    pub end_reason: Option<EndReason>,
}

impl Session {
    /// The earlier of the idle and the absolute expiry.
    pub fn expires_at(&self) -> i64 {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Why a live session has expired at `now`, if it has.
    pub fn expiry_at(&self, now: i64) -> Option<EndReason> {
        (now >= self.expires_at()).then_some(if self.absolute_expires_at <= self.idle_expires_at {
            EndReason::MaxAgeExpired
        } else {
            EndReason::IdleExpired
        })
    }
}

/// The lifetimes a refresh applies (`--session-idle`, `--refresh-reuse-grace`, `--token-ttl`),
/// in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub idle: i64,
    pub grace: i64,
    pub access_ttl: i64,
}

/// One refresh: spend `presented`, issue `issued` (both hashes), at `now`.
#[derive(Debug, Clone)]
pub struct Rotate {
    pub presented: TokenHash,
    pub issued: TokenHash,
    /// Empty: the session's scopes; otherwise they must all be the session's.
    pub scopes: Vec<String>,
    pub now: i64,
    pub lifetimes: Lifetimes,
}

/// A session that ended: its id and until when its newest access token lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub sid: String,
    pub access_expires_at: i64,
}

/// What a refresh came to. Only `Rotated` and `Retried` changed the token chain; `Reused` ended
/// the session; the others changed nothing (an expired session is marked ended, which no one
/// can tell apart from expired).
#[derive(Debug, Clone, PartialEq)]
pub enum Refreshed {
    /// The presented token was the current one: spent, `issued` is the new current one.
    Rotated(Session),
    /// The presented token was the immediately previous one, within the grace window (the
    /// answer to it was lost): the token of that lost answer is superseded (spent), `issued` is
    /// the new current one.
    Retried(Session),
    /// No refresh token with this hash was ever issued (or it is long forgotten).
    Unknown,
    /// A spent token: the session ended now, reason `refresh_token_reuse`.
    Reused(Ended),
    /// The session had already ended.
    AlreadyEnded(EndReason),
    /// The session expired (idle or absolute).
    Expired(EndReason),
    /// The request asked for a scope the session was not granted; nothing changed.
    ScopeNotGranted(String),
}

/// Which session `end` names.
#[derive(Debug, Clone)]
pub enum EndBy {
    Id(String),
    /// Any refresh token of the session, current or spent.
    Token(TokenHash),
}

/// What `end` came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Ended(Ended),
    /// The session had ended already (or expired): nothing changed.
    AlreadyEnded(String),
    Unknown,
}

/// A store failure. A database that cannot be opened says what to do; any other failure fails
/// the one operation (nothing of it was written).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the session store {path} is corrupt or not a keyfleet session database ({detail}): restore it from a backup, or move it away to start with no sessions (every user logs in again)"
    )]
    Corrupt { path: String, detail: String },
    #[error(
        "the session store {path} was written by a newer keyfleet (schema {found}, this build reads up to {supported})"
    )]
    NewerSchema {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("session store: {0}")]
    Database(String),
    #[error("the session store is closed")]
    Closed,
}

/// Where sessions live. Each method is one atomic, durable transaction; methods block (call
/// them from `spawn_blocking`). Time is a parameter: a store never reads the clock.
pub trait SessionStore: Send + Sync {
    /// Stores a new session with its first refresh token.
    fn start(&self, session: &Session, token: TokenHash) -> Result<(), StoreError>;
    /// Spends a refresh token for a new one, as [`decide`] says.
    fn refresh(&self, rotate: &Rotate) -> Result<Refreshed, StoreError>;
    /// Ends one live session with `reason`.
    fn end(&self, by: &EndBy, reason: EndReason, now: i64) -> Result<Ending, StoreError>;
    /// Ends every live session of `subject` with `reason`.
    fn end_subject(
        &self,
        subject: &str,
        reason: EndReason,
        now: i64,
    ) -> Result<Vec<Ended>, StoreError>;
    /// Every stored session of `subject` (live, expired or ended), oldest first.
    fn list(&self, subject: &str) -> Result<Vec<Session>, StoreError>;
    /// Sessions ended (not expired) at or after `ended_since` whose newest access token lives at
    /// or after `live_at`: the deny list to publish after a restart.
    fn ended_since(&self, ended_since: i64, live_at: i64) -> Result<Vec<Ended>, StoreError>;
    /// Looks at up to `scan` sessions after id `after` (in id order) and forgets those that
    /// ended or expired before `before`: a sweep in small steps, so no step holds the store
    /// long.
    fn purge(&self, before: i64, after: &str, scan: usize) -> Result<Purged, StoreError>;
}

/// One step of a purge sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    pub forgotten: usize,
    /// Where the next step starts; `None` when the sweep reached the end.
    pub next: Option<String>,
}

/// Where a presented token stands in its session's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    Current,
    /// The immediately previous token, spent at `spent_at`.
    Previous {
        spent_at: i64,
    },
    /// Any older (or superseded) token of the session.
    Older,
}

/// What to do with a refresh, given the session it names and the token's place in its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Rotate,
    Retry,
    Reuse,
    AlreadyEnded(EndReason),
    Expire(EndReason),
    ScopeNotGranted(String),
}

/// The one rule of refresh: an ended session stays ended; an expired one ends; a spent token
/// (other than the immediately previous one within `grace` seconds of its spending) ends the
/// session; a request for a scope the session lacks changes nothing; otherwise the chain moves.
pub fn decide(
    session: &Session,
    role: TokenRole,
    scopes: &[String],
    now: i64,
    grace: i64,
) -> Decision {
    if let Some(reason) = session.end_reason {
        return Decision::AlreadyEnded(reason);
    }
    if let Some(reason) = session.expiry_at(now) {
        return Decision::Expire(reason);
    }
    let retry = match role {
        TokenRole::Current => false,
        TokenRole::Previous { spent_at } if grace > 0 && now < spent_at + grace => true,
        _ => return Decision::Reuse,
    };
    if let Some(wider) = scopes.iter().find(|s| !session.scopes.contains(s)) {
        return Decision::ScopeNotGranted(wider.clone());
    }
    if retry {
        Decision::Retry
    } else {
        Decision::Rotate
    }
}

/// The session after a rotation (or retry) at `now`: idle expiry extended, the new access
/// token's expiry (never past the session's), one more refresh counted.
pub fn advance(session: &mut Session, now: i64, lifetimes: Lifetimes) {
    session.last_refresh_at = now;
    session.refresh_count += 1;
    session.idle_expires_at = now + lifetimes.idle;
    session.access_expires_at = (now + lifetimes.access_ttl).min(session.expires_at());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            id: "s".into(),
            subject: "alice".into(),
            audience: vec!["api".into()],
            scopes: vec!["read".into(), "write".into()],
            claims: Map::new(),
            auth_time: 100,
            started_at: 100,
            last_refresh_at: 0,
            refresh_count: 0,
            idle_expires_at: 1_000,
            absolute_expires_at: 5_000,
            access_expires_at: 160,
            ended_at: 0,
            end_reason: None,
        }
    }

    #[test]
    fn the_refresh_rule() {
        let live = session();
        let mut ended = session();
        ended.end_reason = Some(EndReason::Logout);
        let mut capped = session();
        capped.absolute_expires_at = 900;
        let none: &[String] = &[];
        let read = &["read".to_owned()][..];
        let admin = &["admin".to_owned()][..];
        let prev = |spent_at| TokenRole::Previous { spent_at };
        /// What, the session, the token's role, the scopes asked for, now, grace: the decision.
        type Case<'a> = (
            &'a str,
            &'a Session,
            TokenRole,
            &'a [String],
            i64,
            i64,
            Decision,
        );
        let cases: [Case; 12] = [
            (
                "current",
                &live,
                TokenRole::Current,
                none,
                200,
                10,
                Decision::Rotate,
            ),
            (
                "narrower",
                &live,
                TokenRole::Current,
                read,
                200,
                10,
                Decision::Rotate,
            ),
            (
                "wider",
                &live,
                TokenRole::Current,
                admin,
                200,
                10,
                Decision::ScopeNotGranted("admin".into()),
            ),
            (
                "previous in grace",
                &live,
                prev(195),
                none,
                204,
                10,
                Decision::Retry,
            ),
            (
                "previous at grace end",
                &live,
                prev(195),
                none,
                205,
                10,
                Decision::Reuse,
            ),
            (
                "previous, grace off",
                &live,
                prev(200),
                none,
                200,
                0,
                Decision::Reuse,
            ),
            (
                "older",
                &live,
                TokenRole::Older,
                none,
                200,
                10,
                Decision::Reuse,
            ),
            (
                "reuse beats scopes",
                &live,
                TokenRole::Older,
                admin,
                200,
                10,
                Decision::Reuse,
            ),
            (
                "ended",
                &ended,
                TokenRole::Current,
                none,
                200,
                10,
                Decision::AlreadyEnded(EndReason::Logout),
            ),
            (
                "ended, older",
                &ended,
                TokenRole::Older,
                none,
                200,
                10,
                Decision::AlreadyEnded(EndReason::Logout),
            ),
            (
                "idle",
                &live,
                TokenRole::Current,
                none,
                1_000,
                10,
                Decision::Expire(EndReason::IdleExpired),
            ),
            (
                "max age",
                &capped,
                TokenRole::Older,
                none,
                900,
                10,
                Decision::Expire(EndReason::MaxAgeExpired),
            ),
        ];
        for (what, session, role, scopes, now, grace, want) in cases {
            assert_eq!(decide(session, role, scopes, now, grace), want, "{what}");
        }
    }

    #[test]
    fn a_refresh_extends_the_idle_expiry_never_the_absolute_one() {
        let lifetimes = Lifetimes {
            idle: 1_000,
            grace: 10,
            access_ttl: 60,
        };
        let mut s = session();
        advance(&mut s, 500, lifetimes);
        assert_eq!(
            (s.idle_expires_at, s.access_expires_at, s.refresh_count),
            (1_500, 560, 1)
        );
        advance(&mut s, 4_980, lifetimes);
        assert_eq!(s.expires_at(), 5_000);
        assert_eq!(
            s.access_expires_at, 5_000,
            "no access token outlives its session"
        );
        for reason in ["logout", "refresh_token_reuse", "max_age_expired"] {
            assert_eq!(EndReason::parse(reason).unwrap().as_str(), reason);
        }
        assert_eq!(EndReason::parse("nope"), None);
    }
}
