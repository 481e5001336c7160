//! The authority's errors: [`OpenError`] for start-up, [`ServeError`] for serving, and the one
//! mapping of request errors to `tonic::Status`. (A refused configuration is a
//! [`crate::ConfigError`], next to the checks.)

use std::path::PathBuf;

use keyfleet_core::RingError;
use tonic::Status;

use crate::config::ConfigError;

/// Why the authority could not start. Nothing on disk is modified when one of these is returned
/// (except [`OpenError::WriteRing`]/[`OpenError::AdminToken`], which report a failed write).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data directory {path} is in use by another keyfleet authority (it holds the directory's lock): stop that one first, or give this one its own --data-dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot read the key ring {path}")]
    ReadRing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the key ring {path} is corrupt ({detail}): restore it from a backup, or move it away to start a new ring with new keys"
    )]
    CorruptRing { path: PathBuf, detail: String },
    #[error("the key ring {path} is sealed: pass --kek-file or KEYFLEET_KEK")]
    Sealed { path: PathBuf },
    #[error(
        "the key ring {path} does not open with this key-encryption key: pass the one it was sealed with (--kek-file or KEYFLEET_KEK)"
    )]
    WrongKek { path: PathBuf },
    #[error(
        "the key ring {path} is not sealed but a key-encryption key was given: start without --kek-file/KEYFLEET_KEK to use it"
    )]
    NotSealed { path: PathBuf },
    #[error("cannot write the key ring {path}")]
    WriteRing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read or create the token file {path}")]
    AdminToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the token file {path} is empty: delete it to have a token generated, or write at least 32 random bytes into it"
    )]
    EmptyAdminToken { path: PathBuf },
    /// Guessing is made hopeless by length (failed guesses are rate-limited per peer, but the
    /// right credential is never refused because of them).
    #[error(
        "the token file {path} holds a {len}-byte token, too short to resist guessing (at least {min} bytes are needed): delete it to have a new one generated, or write at least {min} random bytes into it (e.g. `(umask 077; openssl rand -hex 32 > {path})`)",
        path = .path.display(),
        min = crate::admin::MIN_TOKEN_BYTES
    )]
    ShortToken { path: PathBuf, len: usize },
    /// The data dir, the key ring, a token file or the KEK file is open to other users, owned
    /// by another user, or a symbolic link; the message says what to run.
    #[error(transparent)]
    Insecure(#[from] keyfleet_runtime::secure_fs::SecureFsError),
    #[error("the system random number generator failed")]
    Random(#[source] getrandom::Error),
    #[error("the fleet credential (--node-token-file, default <data-dir>/node.token)")]
    NodeToken(#[source] Box<OpenError>),
    #[error(
        "the fleet credential (--node-token-file) and the admin credential (--admin-token-file) hold the same token: verifiers would hold admin power; give each its own file (delete one to have it generated)"
    )]
    SameTokens,
    #[error(transparent)]
    Sessions(#[from] crate::sqlite::OpenStoreError),
    #[error("cannot load the ended sessions from the session store")]
    LoadSessions(#[source] crate::session_store::StoreError),
}

/// Why [`crate::Authority::serve`] could not serve, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the {listener} listener has no local address")]
    Listener {
        listener: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] keyfleet_runtime::serve::ServeError),
}

/// Why a request failed; turned into a `Status` only by the `From` impl below.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    #[error(
        "admin call: send `authorization: Bearer <token>` with the token from the authority's --admin-token-file (KEYFLEET_ADMIN_TOKEN)"
    )]
    Unauthenticated,
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("cannot persist the key ring")]
    Persist(#[source] std::io::Error),
    #[error("the system random number generator failed")]
    Random(#[source] getrandom::Error),
    #[error("the authority is shutting down")]
    ShuttingDown,
    #[error(
        "admin calls are refused over plaintext on a non-loopback listener: give the authority --tls-cert/--tls-key (or --insecure-admin), or call it from its own host"
    )]
    AdminNeedsTls,
    #[error("too many key-management calls (--admin-rate): retry in a moment")]
    RateLimited,
    #[error(
        "watching the JWKS (and its deny lists) needs the fleet credential: send `authorization: Bearer <token>` with the authority's node token (<data-dir>/node.token, or its --node-token-file); a verifier takes it from --node-token-file"
    )]
    NodeUnauthenticated,
    #[error(
        "too many failed credentials from this address: wait a few seconds, then retry with the right token"
    )]
    TooManyFailures,
    #[error("{0}: retry later")]
    WatchersFull(String),
    #[error(
        "node id {0:?} is held by a live watch stream: give every verifier its own --node-id (a restarted node gets its id back once the old stream is gone, within 15s)"
    )]
    NodeIdTaken(String),
    #[error(transparent)]
    CertificateNamesNoNode(#[from] keyfleet_runtime::tls::CertificateNamesNoNode),
    #[error(transparent)]
    Store(#[from] crate::session_store::StoreError),
    /// A refresh token that cannot be used; the message says which kind.
    #[error("{}", .0.message())]
    Refresh(crate::sessions::Unusable),
    #[error(
        "scope {0:?} is not granted to this session: a refresh can only ask for the session's scopes or fewer"
    )]
    ScopeNotGranted(String),
    #[error("no session {0:?}")]
    NoSuchSession(String),
    #[error(
        "too many unusable refresh tokens from this address: wait a few seconds, then retry with the refresh token the last answer gave"
    )]
    TooManyRefreshFailures,
    /// A transport-level refusal (a message over the size limit, a broken stream), passed on.
    #[error("{}", .0.message())]
    Status(Status),
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        // The caller sees the cause too (`cannot persist the key ring: No space left on device`).
        let message = keyfleet_runtime::error_chain(&err);
        match err {
            ServiceError::Unauthenticated => Status::unauthenticated(message),
            ServiceError::InvalidArgument(_) => Status::invalid_argument(message),
            ServiceError::Ring(RingError::UnknownKid(_)) => Status::not_found(message),
            ServiceError::Ring(RingError::AlreadyRevoked(_) | RingError::NoNextKey) => {
                Status::failed_precondition(message)
            }
            ServiceError::Ring(RingError::DenyListFull) => Status::resource_exhausted(message),
            ServiceError::Ring(RingError::Inconsistent(_)) | ServiceError::Random(_) => {
                Status::internal(message)
            }
            ServiceError::Persist(_) | ServiceError::ShuttingDown => Status::unavailable(message),
            ServiceError::AdminNeedsTls => Status::failed_precondition(message),
            ServiceError::RateLimited
            | ServiceError::TooManyFailures
            | ServiceError::WatchersFull(_) => Status::resource_exhausted(message),
            ServiceError::NodeUnauthenticated => Status::unauthenticated(message),
            ServiceError::NodeIdTaken(_) => Status::already_exists(message),
            ServiceError::CertificateNamesNoNode(_) => Status::permission_denied(message),
            ServiceError::Store(_) => Status::unavailable(message),
            ServiceError::Refresh(_) => Status::unauthenticated(message),
            ServiceError::ScopeNotGranted(_) => Status::permission_denied(message),
            ServiceError::NoSuchSession(_) => Status::not_found(message),
            ServiceError::TooManyRefreshFailures => Status::resource_exhausted(message),
            ServiceError::Status(status) => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_to_status() {
        let cases = [
            (ServiceError::Unauthenticated, Code::Unauthenticated),
            (
                ServiceError::InvalidArgument("subject is required".into()),
                Code::InvalidArgument,
            ),
            (RingError::UnknownKid("k".into()).into(), Code::NotFound),
            (
                RingError::AlreadyRevoked("k".into()).into(),
                Code::FailedPrecondition,
            ),
            (RingError::DenyListFull.into(), Code::ResourceExhausted),
            (
                ServiceError::Persist(std::io::Error::other("disk full")),
                Code::Unavailable,
            ),
            (ServiceError::AdminNeedsTls, Code::FailedPrecondition),
            (ServiceError::RateLimited, Code::ResourceExhausted),
            (ServiceError::TooManyFailures, Code::ResourceExhausted),
            (
                ServiceError::WatchersFull("x".into()),
                Code::ResourceExhausted,
            ),
            (ServiceError::NodeUnauthenticated, Code::Unauthenticated),
            (ServiceError::NodeIdTaken("n".into()), Code::AlreadyExists),
            (
                ServiceError::CertificateNamesNoNode(keyfleet_runtime::tls::CertificateNamesNoNode),
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().ends_with('.'), "{}", status.message());
            assert!(
                status.message().starts_with(|c: char| !c.is_uppercase()),
                "{}",
                status.message()
            );
        }
    }
}
