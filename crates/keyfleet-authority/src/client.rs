//! The one admin client of the authority, used by the CLI's `token` and `keys` commands, the
//! load generator and the local cluster: the admin credential is added to every call by an
//! interceptor, and rotate-then-wait has one definition of "the new key signs" ([`signs`]).

use std::time::Duration;

use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::{
    IssueTokenRequest, IssueTokenResponse, KeyState, ListKeysRequest, ListKeysResponse,
    RevokeKeyRequest, RevokeKeyResponse, RevokeTokenRequest, RevokeTokenResponse,
    RotateKeysRequest, RotateKeysResponse,
};
use keyfleet_runtime::client::{ConnectError, Settings};
use keyfleet_runtime::tls::ClientTls;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Adds `authorization: Bearer <admin token>` to every call (marked sensitive, so HTTP/2
/// never indexes it). Never printed.
#[derive(Clone)]
pub struct AdminBearer(MetadataValue<Ascii>);

impl std::fmt::Debug for AdminBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminBearer(<redacted>)")
    }
}

impl AdminBearer {
    /// The header for `admin_token`; a token that cannot go in a header is an error here,
    /// never a call sent without the credential.
    pub fn new(admin_token: &str) -> Result<AdminBearer, ClientError> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {admin_token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        value.set_sensitive(true);
        Ok(AdminBearer(value))
    }

    /// `request` with the admin credential.
    pub fn authorize<T>(&self, mut request: Request<T>) -> Request<T> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        request
    }
}

impl Interceptor for AdminBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        Ok(self.authorize(request))
    }
}

/// Why an [`AdminClient`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the admin token has characters that cannot go in a header")]
    BadToken,
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Why [`AdminClient::rotate_and_wait`] or [`AdminClient::wait_until_signing`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("rotate keys")]
    Rotate(#[source] Status),
    #[error("list keys")]
    List(#[source] Status),
    /// The key is neither waiting nor signing any more (retired, revoked or gone).
    #[error("key {kid} left the rotation (now {state})")]
    LeftRotation { kid: String, state: &'static str },
    #[error("key {kid} is still not signing after {timeout:?}")]
    TimedOut { kid: String, timeout: Duration },
}

/// Whether a key a rotation promoted has started signing: it is `Active`, or already
/// `Retiring` because it signed and another rotation (scheduled, or another operator's)
/// superseded it while we looked away. `Next` is still waiting for the fleet's
/// acknowledgements (at most `--publish-ahead`); anything else never signed as this rotation
/// meant (see [`WaitError::LeftRotation`]).
pub fn signs(state: KeyState) -> bool {
    matches!(state, KeyState::Active | KeyState::Retiring)
}

/// A key state as `keys list` shows it (an unknown number from a newer server is "unknown").
pub fn state_name(state: i32) -> &'static str {
    match KeyState::try_from(state) {
        Ok(KeyState::Next) => "next",
        Ok(KeyState::Active) => "active",
        Ok(KeyState::Retiring) => "retiring",
        Ok(KeyState::Retired) => "retired",
        Ok(KeyState::Revoked) => "revoked",
        _ => "unknown",
    }
}

/// An admin client of the authority. Cheap to clone (one shared channel).
#[derive(Debug, Clone)]
pub struct AdminClient {
    api: AuthorityClient<InterceptedService<Channel, AdminBearer>>,
    bearer: AdminBearer,
}

impl AdminClient {
    /// A client over `channel` sending `admin_token` on every call.
    pub fn new(channel: Channel, admin_token: &str) -> Result<AdminClient, ClientError> {
        Ok(AdminClient::with_bearer(
            channel,
            AdminBearer::new(admin_token)?,
        ))
    }

    fn with_bearer(channel: Channel, bearer: AdminBearer) -> AdminClient {
        AdminClient {
            api: AuthorityClient::with_interceptor(channel, bearer.clone()),
            bearer,
        }
    }

    /// Connects to the authority at `url` now (an unreachable one is reported here).
    pub async fn connect(
        url: &str,
        tls: &ClientTls,
        settings: &Settings,
        admin_token: &str,
    ) -> Result<AdminClient, ClientError> {
        // The token is checked before anything is sent.
        let bearer = AdminBearer::new(admin_token)?;
        let channel = keyfleet_runtime::client::connect(url, tls, settings).await?;
        Ok(AdminClient::with_bearer(channel, bearer))
    }

    /// A client of the authority at `url` that connects on its first call.
    pub fn lazy(
        url: &str,
        tls: &ClientTls,
        settings: &Settings,
        admin_token: &str,
    ) -> Result<AdminClient, ClientError> {
        let endpoint = keyfleet_runtime::client::endpoint(url, tls, settings)
            .map_err(|e| ClientError::Connect(e.into()))?;
        AdminClient::new(endpoint.connect_lazy(), admin_token)
    }

    /// `msg` as a request carrying the admin credential, for a caller that talks to the
    /// generated client itself (tests).
    pub fn authorize<T>(&self, msg: T) -> Request<T> {
        self.bearer.authorize(Request::new(msg))
    }

    /// Mints a token (`IssueToken`).
    pub async fn issue(&self, request: IssueTokenRequest) -> Result<IssueTokenResponse, Status> {
        Ok(self.api.clone().issue_token(request).await?.into_inner())
    }

    /// Asks for a rotation now (`RotateKeys`) without waiting for the promoted key to sign.
    pub async fn rotate(&self) -> Result<RotateKeysResponse, Status> {
        Ok(self
            .api
            .clone()
            .rotate_keys(RotateKeysRequest {})
            .await?
            .into_inner())
    }

    /// Rotates and waits (at most `timeout`, looking every `poll`) until the promoted key
    /// signs; returns its kid.
    pub async fn rotate_and_wait(
        &self,
        timeout: Duration,
        poll: Duration,
    ) -> Result<String, WaitError> {
        let r = self.rotate().await.map_err(WaitError::Rotate)?;
        if !r.activated {
            self.wait_until_signing(&r.promoting_kid, timeout, poll)
                .await?;
        }
        Ok(r.promoting_kid)
    }

    /// Waits (at most `timeout`, looking every `poll`) until `kid` [`signs`].
    pub async fn wait_until_signing(
        &self,
        kid: &str,
        timeout: Duration,
        poll: Duration,
    ) -> Result<(), WaitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let list = self.list_keys().await.map_err(WaitError::List)?;
            match list.keys.iter().find(|k| k.kid == kid).map(|k| k.state()) {
                Some(state) if signs(state) => return Ok(()),
                Some(KeyState::Next) => {}
                other => {
                    return Err(WaitError::LeftRotation {
                        kid: kid.to_owned(),
                        state: other.map_or("gone from the ring", |s| state_name(s as i32)),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(WaitError::TimedOut {
                    kid: kid.to_owned(),
                    timeout,
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Every key with its state and times, and every watching verifier (`ListKeys`).
    pub async fn list_keys(&self) -> Result<ListKeysResponse, Status> {
        Ok(self
            .api
            .clone()
            .list_keys(ListKeysRequest {})
            .await?
            .into_inner())
    }

    /// Removes `kid` from the JWKS at once (`RevokeKey`).
    pub async fn revoke_key(&self, kid: &str) -> Result<RevokeKeyResponse, Status> {
        let request = RevokeKeyRequest {
            kid: kid.to_owned(),
        };
        Ok(self.api.clone().revoke_key(request).await?.into_inner())
    }

    /// Denies the token `jti` until `until` (Unix seconds, normally its `exp`; `RevokeToken`).
    pub async fn revoke_token(&self, jti: &str, until: i64) -> Result<RevokeTokenResponse, Status> {
        let request = RevokeTokenRequest {
            jti: jti.to_owned(),
            until,
        };
        Ok(self.api.clone().revoke_token(request).await?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_that_cannot_go_in_a_header_is_refused_up_front() {
        assert!(matches!(
            AdminBearer::new("line\nbreak"),
            Err(ClientError::BadToken)
        ));
        let bearer = AdminBearer::new("s3cret").unwrap();
        assert!(!format!("{bearer:?}").contains("s3cret"));
        let request = bearer.authorize(Request::new(()));
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
    }

    #[test]
    fn a_promoted_key_signs_once_active_or_already_superseded() {
        assert!(signs(KeyState::Active) && signs(KeyState::Retiring));
        for state in [
            KeyState::Next,
            KeyState::Retired,
            KeyState::Revoked,
            KeyState::Unspecified,
        ] {
            assert!(!signs(state), "{state:?}");
        }
    }
}
