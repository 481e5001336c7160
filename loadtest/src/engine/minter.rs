//! The authority as the load generator uses it: mint a token, rotate and wait for the new key.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::{
    IssueTokenRequest, IssueTokenResponse, KeyState, ListKeysRequest, RotateKeysRequest,
};
use tokio::time::Instant;
use tonic::Request;
use tonic::transport::Channel;

/// An admin client of the authority.
#[derive(Clone)]
pub(super) struct Minter {
    pub(super) client: AuthorityClient<Channel>,
    pub(super) admin_token: String,
}

impl Minter {
    fn admin<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.admin_token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Mints a token for `subject` and `audience`; `ttl` 0 is the authority's default lifetime.
    pub(super) async fn issue(
        &self,
        subject: &str,
        audience: &str,
        ttl: i64,
    ) -> anyhow::Result<IssueTokenResponse> {
        let req = IssueTokenRequest {
            subject: subject.into(),
            audience: vec![audience.into()],
            ttl_seconds: ttl,
            claims: Default::default(),
        };
        Ok(self
            .client
            .clone()
            .issue_token(self.admin(req))
            .await
            .context("minting a token at the authority (IssueToken)")?
            .into_inner())
    }

    /// Rotates and waits until the promoted key signs; returns its kid.
    pub(super) async fn rotate(&self, timeout: Duration) -> anyhow::Result<String> {
        let mut client = self.client.clone();
        let r = client
            .rotate_keys(self.admin(RotateKeysRequest {}))
            .await
            .context("RotateKeys")?
            .into_inner();
        let deadline = Instant::now() + timeout;
        loop {
            let list = client
                .list_keys(self.admin(ListKeysRequest {}))
                .await?
                .into_inner();
            if list
                .keys
                .iter()
                .any(|k| k.state() == KeyState::Active && k.kid == r.promoting_kid)
            {
                return Ok(r.promoting_kid);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "key {} did not become active in time",
                    r.promoting_kid
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
