//! The authority's errors: [`OpenError`] for start-up, and the one mapping of request errors to
//! `tonic::Status`.

use std::path::PathBuf;

use keyfleet_core::RingError;
use tonic::Status;

/// Why the authority could not start. Nothing on disk is modified when one of these is returned
/// (except [`OpenError::WriteRing`]/[`OpenError::AdminToken`], which report a failed write).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the data directory {path} is in use by another keyfleet authority (it holds the directory's lock): stop that one first, or give this one its own --data-dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot read the key ring {path}: {source}")]
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
    #[error("cannot write the key ring {path}: {source}")]
    WriteRing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot read or create the admin token file {path}: {source}: check --admin-token-file"
    )]
    AdminToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the admin token file {path} is empty: write a token into it, or delete it to have one generated"
    )]
    EmptyAdminToken { path: PathBuf },
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
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
    #[error("cannot persist the key ring: {0}")]
    Persist(#[source] std::io::Error),
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("the authority is shutting down")]
    ShuttingDown,
    #[error(
        "admin calls are refused over plaintext on a non-loopback listener: give the authority --tls-cert/--tls-key (or --insecure-admin), or call it from its own host"
    )]
    AdminNeedsTls,
    #[error("too many admin calls or failed credentials: retry in a moment")]
    RateLimited,
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        let message = err.to_string();
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
            ServiceError::RateLimited => Status::resource_exhausted(message),
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
