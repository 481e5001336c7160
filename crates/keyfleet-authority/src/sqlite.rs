//! The embedded session store: SQLite (compiled in) in `<data-dir>/sessions.db`, WAL journal,
//! `synchronous = FULL`, so a transaction is on disk before its caller is answered.
//!
//! One writer thread owns the connection and runs every operation. Operations that arrive
//! while a commit is in progress are run together in the next transaction, each in a savepoint
//! of its own, and all are answered after that one commit (group commit): a commit costs one
//! fsync whether it carries one refresh or a hundred, and an operation that fails rolls back
//! alone.
//!
//! The file is created like the key ring: 0600, exclusively, never through a link; an
//! existing one must be ours, private and not a link (SQLite creates its `-wal` and `-shm`
//! files with the database's mode, and they are checked the same way).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use keyfleet_runtime::secure_fs;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Map, Value};

use crate::session_store::{
    Decision, EndBy, EndReason, Ended, Ending, Purged, Refreshed, Rotate, Session, SessionStore,
    StoreError, TokenHash, TokenRole, advance, decide,
};

/// File name of the session store inside the data directory.
pub const SESSIONS_FILE: &str = "sessions.db";
/// Operations carried by one transaction at most (group commit).
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Spent refresh tokens remembered per session: presenting one of them is reuse. An older one
/// is forgotten — presenting it is "unknown" and has no effect (it cannot refresh either).
const SPENT_KEPT: i64 = 64;
/// The schema this build writes (`PRAGMA user_version`).
const SCHEMA: i64 = 1;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY NOT NULL,
    subject TEXT NOT NULL,
    audience TEXT NOT NULL,          -- JSON array
    scopes TEXT NOT NULL,            -- JSON array
    claims TEXT NOT NULL,            -- JSON object
    auth_time INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    last_refresh_at INTEGER NOT NULL,
    refresh_count INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL,
    absolute_expires_at INTEGER NOT NULL,
    access_expires_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL,       -- 0 while live
    end_reason TEXT NOT NULL,        -- '' while live
    current_hash BLOB NOT NULL,      -- the refresh token to present next
    prev_hash BLOB,                  -- the one spent for it (the grace window's)
    prev_spent_at INTEGER NOT NULL,
    seq INTEGER NOT NULL             -- tokens issued so far: the current one's number
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_subject ON sessions(subject);
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions(ended_at) WHERE ended_at > 0;
CREATE TABLE IF NOT EXISTS refresh_tokens (
    hash BLOB PRIMARY KEY NOT NULL,  -- SHA-256 of the token; the token itself is never stored
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refresh_tokens_by_session ON refresh_tokens(session_id, seq);
";

const SESSION_COLUMNS: &str = "id, subject, audience, scopes, claims, auth_time, started_at, \
     last_refresh_at, refresh_count, idle_expires_at, absolute_expires_at, access_expires_at, \
     ended_at, end_reason";

/// An operation run on the writer thread (given the connection, or why no transaction could
/// begin): it returns how to answer its caller once the transaction's fate is known, and
/// whether it succeeded (a failed one is rolled back alone).
type Job = Box<dyn FnOnce(Result<&Connection, &StoreError>) -> (Reply, bool) + Send>;
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// The SQLite session store. Cheap to share (`Arc`). Dropping it stops the writer thread and
/// waits for it, so the database is closed (its journal checkpointed) when the drop returns.
pub struct SqliteStore {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Dropped to stop the checkpointer.
    stop_checkpoints: Option<mpsc::Sender<()>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        self.stop_checkpoints.take();
        if let Some(checkpointer) = self.checkpointer.take() {
            let _ = checkpointer.join();
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why the store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error(transparent)]
    Insecure(#[from] secure_fs::SecureFsError),
    #[error("cannot create the session store {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SqliteStore {
    /// Opens (creating when missing) the store in `data_dir`, which the caller has checked and
    /// locked; `max_batch` operations share a commit at most (1: one commit each).
    pub fn open(data_dir: &Path, max_batch: usize) -> Result<SqliteStore, OpenStoreError> {
        let path = data_dir.join(SESSIONS_FILE);
        if !secure_fs::check_private(&path, "session store")? {
            secure_fs::create_new(&path, b"").map_err(|source| OpenStoreError::Create {
                path: path.clone(),
                source,
            })?;
        }
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            secure_fs::check_private(Path::new(&side), "session store journal")?;
        }
        let shown = path.display().to_string();
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: shown.clone(),
            detail: e.to_string(),
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NOFOLLOW
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(corrupt)?;
        // WAL: a commit appends to the journal; FULL: and fsyncs it before returning.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(corrupt)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(
                StoreError::Database(format!("cannot use a WAL journal (got {mode})")).into(),
            );
        }
        // Checkpoints (copying the journal into the database, and an fsync of it) run on a
        // thread of their own, not in a commit that callers wait for. Under a constant stream
        // of commits that thread never catches up to the journal's very end, so the journal
        // could only grow: past 64 MiB a commit finishes the checkpoint itself (by then mostly
        // done, so short), and the journal then starts over and is cut back to that size.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; PRAGMA cache_size = -65536; \
             PRAGMA wal_autocheckpoint = 16384; PRAGMA journal_size_limit = 67108864;",
        )
        .map_err(corrupt)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(corrupt)?;
        if version > SCHEMA {
            return Err(StoreError::NewerSchema {
                path: shown,
                found: version,
                supported: SCHEMA,
            }
            .into());
        }
        conn.execute_batch(CREATE).map_err(corrupt)?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA}"))
            .map_err(corrupt)?;
        // A database that opens but is damaged is refused now, not on a user's refresh.
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: shown,
                detail: check,
            }
            .into());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = std::thread::Builder::new()
            .name("session-store".into())
            .spawn(move || writer(conn, rx, max_batch.max(1)))
            .map_err(|source| OpenStoreError::Create {
                path: path.clone(),
                source,
            })?;
        let checkpoints = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NOFOLLOW
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(corrupt)?;
        checkpoints
            .execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
            .map_err(corrupt)?;
        let (stop_checkpoints, stop) = mpsc::channel::<()>();
        let checkpointer = std::thread::Builder::new()
            .name("session-checkpoint".into())
            .spawn(move || checkpoint(checkpoints, stop))
            .map_err(|source| OpenStoreError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(SqliteStore {
            jobs: Mutex::new(Some(tx)),
            writer: Some(writer),
            stop_checkpoints: Some(stop_checkpoints),
            checkpointer: Some(checkpointer),
            path,
        })
    }

    /// Runs `op` in the writer's next transaction and waits until that transaction committed.
    fn call<R: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => op(conn).map_err(|e| StoreError::Database(e.to_string())),
                Err(e) => Err(e.clone()),
            };
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit| {
                let _ = tx.send(match commit {
                    None => result,
                    Some(e) => Err(e.clone()),
                });
            });
            (reply, ok)
        });
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }
}

/// How often the journal is copied into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The checkpointer thread: every [`CHECKPOINT_EVERY`], copies committed journal pages into
/// the database (`PASSIVE`: never waits for, nor blocks, the writer), until `stop` is dropped.
fn checkpoint(conn: Connection, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "session store: checkpoint failed; retrying");
        }
    }
}

/// The writer thread: takes every operation waiting (up to `max_batch`), runs them in one
/// transaction, commits, then answers them all; until every sender is gone.
fn writer(conn: Connection, jobs: mpsc::Receiver<Job>, max_batch: usize) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = StoreError::Database(e.to_string());
            tracing::error!(error = %e, "session store: cannot begin a transaction");
            // Nothing runs outside a transaction: every operation is answered with the error.
            for job in batch {
                let (reply, _) = job(Err(&e));
                reply(Some(&e));
            }
            continue;
        }
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch {
            let saved = conn.execute_batch("SAVEPOINT op");
            let (reply, ok) = job(Ok(&conn));
            if saved.is_ok() {
                let end = if ok {
                    "RELEASE op"
                } else {
                    "ROLLBACK TO op; RELEASE op"
                };
                let _ = conn.execute_batch(end);
            }
            replies.push(reply);
        }
        let committed = conn
            .execute_batch("COMMIT")
            .map_err(|e| StoreError::Database(e.to_string()));
        if let Err(e) = &committed {
            tracing::error!(error = %e, "session store: commit failed; the operations are not applied");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies {
            reply(committed.as_ref().err());
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, column: usize) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A `sessions` row in [`SESSION_COLUMNS`] order.
fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Session> {
    let reason: String = r.get(13)?;
    Ok(Session {
        id: r.get(0)?,
        subject: r.get(1)?,
        audience: from_json(&r.get::<_, String>(2)?, 2)?,
        scopes: from_json(&r.get::<_, String>(3)?, 3)?,
        claims: from_json::<Map<String, Value>>(&r.get::<_, String>(4)?, 4)?,
        auth_time: r.get(5)?,
        started_at: r.get(6)?,
        last_refresh_at: r.get(7)?,
        refresh_count: r.get::<_, i64>(8)? as u64,
        idle_expires_at: r.get(9)?,
        absolute_expires_at: r.get(10)?,
        access_expires_at: r.get(11)?,
        ended_at: r.get(12)?,
        end_reason: EndReason::parse(&reason),
    })
}

/// The session a refresh token belongs to, with the token's place in its chain.
fn by_token(
    conn: &Connection,
    hash: &TokenHash,
) -> rusqlite::Result<Option<(Session, TokenRole, i64)>> {
    let Some(id) = conn
        .prepare_cached("SELECT session_id FROM refresh_tokens WHERE hash = ?1")?
        .query_row([&hash[..]], |r| r.get::<_, String>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT {SESSION_COLUMNS}, current_hash, prev_hash, prev_spent_at, seq FROM sessions WHERE id = ?1"
    );
    conn.prepare_cached(&sql)?
        .query_row([&id], |r| {
            let session = session_row(r)?;
            let current: Vec<u8> = r.get(14)?;
            let prev: Option<Vec<u8>> = r.get(15)?;
            let role = if current == hash[..] {
                TokenRole::Current
            } else if prev.as_deref() == Some(&hash[..]) {
                TokenRole::Previous {
                    spent_at: r.get(16)?,
                }
            } else {
                TokenRole::Older
            };
            Ok((session, role, r.get::<_, i64>(17)?))
        })
        .optional()
}

/// Marks a live session ended.
fn mark_ended(conn: &Connection, id: &str, at: i64, reason: EndReason) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE sessions SET ended_at = ?2, end_reason = ?3 WHERE id = ?1 AND ended_at = 0",
    )?
    .execute(params![id, at, reason.as_str()])?;
    Ok(())
}

/// The transaction of one refresh.
fn refresh(conn: &Connection, rotate: &Rotate) -> rusqlite::Result<Refreshed> {
    let Some((mut session, role, seq)) = by_token(conn, &rotate.presented)? else {
        return Ok(Refreshed::Unknown);
    };
    let now = rotate.now;
    match decide(&session, role, &rotate.scopes, now, rotate.lifetimes.grace) {
        Decision::AlreadyEnded(reason) => Ok(Refreshed::AlreadyEnded(reason)),
        Decision::ScopeNotGranted(scope) => Ok(Refreshed::ScopeNotGranted(scope)),
        Decision::Expire(reason) => {
            mark_ended(conn, &session.id, session.expires_at(), reason)?;
            Ok(Refreshed::Expired(reason))
        }
        Decision::Reuse => {
            mark_ended(conn, &session.id, now, EndReason::RefreshTokenReuse)?;
            Ok(Refreshed::Reused(Ended {
                sid: session.id,
                access_expires_at: session.access_expires_at,
            }))
        }
        decision @ (Decision::Rotate | Decision::Retry) => {
            let retry = decision == Decision::Retry;
            advance(&mut session, now, rotate.lifetimes);
            let next = seq + 1;
            conn.prepare_cached(
                "INSERT INTO refresh_tokens (hash, session_id, seq) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![&rotate.issued[..], session.id, next])?;
            // A rotation spends the current token (it becomes the previous one); a retry
            // supersedes the current token (the lost answer's) and keeps the previous one.
            let sql = if retry {
                "UPDATE sessions SET current_hash = ?2, seq = ?3, last_refresh_at = ?4, \
                 refresh_count = ?5, idle_expires_at = ?6, access_expires_at = ?7 WHERE id = ?1"
            } else {
                "UPDATE sessions SET prev_hash = current_hash, prev_spent_at = ?4, \
                 current_hash = ?2, seq = ?3, last_refresh_at = ?4, refresh_count = ?5, \
                 idle_expires_at = ?6, access_expires_at = ?7 WHERE id = ?1"
            };
            conn.prepare_cached(sql)?.execute(params![
                session.id,
                &rotate.issued[..],
                next,
                now,
                session.refresh_count as i64,
                session.idle_expires_at,
                session.access_expires_at,
            ])?;
            if next > SPENT_KEPT {
                conn.prepare_cached(
                    "DELETE FROM refresh_tokens WHERE session_id = ?1 AND seq <= ?2",
                )?
                .execute(params![session.id, next - SPENT_KEPT])?;
            }
            Ok(if retry {
                Refreshed::Retried(session)
            } else {
                Refreshed::Rotated(session)
            })
        }
    }
}

impl SqliteStore {
    /// Stores many new sessions, each with its current refresh token, in one transaction: a
    /// bulk load (a migration from another store, a benchmark's million users).
    pub fn import(&self, sessions: Vec<(Session, TokenHash)>) -> Result<(), StoreError> {
        self.call(move |conn| {
            for (session, token) in &sessions {
                insert(conn, session, token)?;
            }
            Ok(())
        })
    }
}

/// Inserts a new session and its first refresh token.
fn insert(conn: &Connection, s: &Session, token: &TokenHash) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO sessions (id, subject, audience, scopes, claims, auth_time, \
                 started_at, last_refresh_at, refresh_count, idle_expires_at, \
                 absolute_expires_at, access_expires_at, ended_at, end_reason, current_hash, \
                 prev_hash, prev_spent_at, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 0, ?8, ?9, ?10, 0, '', ?11, NULL, 0, 1)",
    )?
    .execute(params![
        s.id,
        s.subject,
        to_json(&s.audience),
        to_json(&s.scopes),
        to_json(&s.claims),
        s.auth_time,
        s.started_at,
        s.idle_expires_at,
        s.absolute_expires_at,
        s.access_expires_at,
        &token[..],
    ])?;
    conn.prepare_cached("INSERT INTO refresh_tokens (hash, session_id, seq) VALUES (?1, ?2, 1)")?
        .execute(params![&token[..], s.id])?;
    Ok(())
}

impl SessionStore for SqliteStore {
    fn start(&self, session: &Session, token: TokenHash) -> Result<(), StoreError> {
        let s = session.clone();
        self.call(move |conn| insert(conn, &s, &token))
    }

    fn refresh(&self, rotate: &Rotate) -> Result<Refreshed, StoreError> {
        let rotate = rotate.clone();
        self.call(move |conn| refresh(conn, &rotate))
    }

    fn end(&self, by: &EndBy, reason: EndReason, now: i64) -> Result<Ending, StoreError> {
        let by = by.clone();
        self.call(move |conn| {
            let session = match &by {
                EndBy::Token(hash) => by_token(conn, hash)?.map(|(s, _, _)| s),
                EndBy::Id(id) => {
                    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
                    conn.prepare_cached(&sql)?
                        .query_row([id], session_row)
                        .optional()?
                }
            };
            let Some(session) = session else {
                return Ok(Ending::Unknown);
            };
            if session.end_reason.is_some() {
                return Ok(Ending::AlreadyEnded(session.id));
            }
            if let Some(expired) = session.expiry_at(now) {
                mark_ended(conn, &session.id, session.expires_at(), expired)?;
                return Ok(Ending::AlreadyEnded(session.id));
            }
            mark_ended(conn, &session.id, now, reason)?;
            Ok(Ending::Ended(Ended {
                sid: session.id,
                access_expires_at: session.access_expires_at,
            }))
        })
    }

    fn end_subject(
        &self,
        subject: &str,
        reason: EndReason,
        now: i64,
    ) -> Result<Vec<Ended>, StoreError> {
        let subject = subject.to_owned();
        self.call(move |conn| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE subject = ?1 AND ended_at = 0"
            );
            let live: Vec<Session> = conn
                .prepare_cached(&sql)?
                .query_map([&subject], session_row)?
                .collect::<rusqlite::Result<_>>()?;
            let mut ended = Vec::new();
            for session in live {
                match session.expiry_at(now) {
                    Some(expired) => mark_ended(conn, &session.id, session.expires_at(), expired)?,
                    None => {
                        mark_ended(conn, &session.id, now, reason)?;
                        ended.push(Ended {
                            sid: session.id,
                            access_expires_at: session.access_expires_at,
                        });
                    }
                }
            }
            Ok(ended)
        })
    }

    fn list(&self, subject: &str) -> Result<Vec<Session>, StoreError> {
        let subject = subject.to_owned();
        self.call(move |conn| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE subject = ?1 ORDER BY started_at, id"
            );
            conn.prepare_cached(&sql)?
                .query_map([&subject], session_row)?
                .collect()
        })
    }

    fn ended_since(&self, ended_since: i64, live_at: i64) -> Result<Vec<Ended>, StoreError> {
        self.call(move |conn| {
            conn.prepare_cached(
                "SELECT id, access_expires_at FROM sessions \
                 WHERE ended_at >= ?1 AND ended_at > 0 AND access_expires_at >= ?2 \
                 AND end_reason NOT IN ('idle_expired', 'max_age_expired')",
            )?
            .query_map(params![ended_since, live_at], |r| {
                Ok(Ended {
                    sid: r.get(0)?,
                    access_expires_at: r.get(1)?,
                })
            })?
            .collect()
        })
    }

    fn purge(&self, before: i64, after: &str, scan: usize) -> Result<Purged, StoreError> {
        let after = after.to_owned();
        self.call(move |conn| {
            let rows: Vec<(String, i64, i64)> = conn
                .prepare_cached(
                    "SELECT id, ended_at, MIN(idle_expires_at, absolute_expires_at) FROM sessions \
                     WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?
                .query_map(params![after, scan as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let next = (rows.len() == scan).then(|| rows[rows.len() - 1].0.clone());
            let mut forgotten = 0;
            // Ended, or live but past its expiry (never refreshed again), before `before`.
            for (id, ended_at, expires_at) in &rows {
                let gone = if *ended_at > 0 {
                    *ended_at
                } else {
                    *expires_at
                };
                if gone < before {
                    conn.prepare_cached("DELETE FROM refresh_tokens WHERE session_id = ?1")?
                        .execute([id])?;
                    conn.prepare_cached("DELETE FROM sessions WHERE id = ?1")?
                        .execute([id])?;
                    forgotten += 1;
                }
            }
            Ok(Purged { forgotten, next })
        })
    }
}
