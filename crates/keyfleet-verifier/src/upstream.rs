//! Fetching key sets from the source: `GetJwks` over one shared gRPC channel (carrying the
//! fleet credential on every call), or a JWKS document over one shared HTTP client.

use std::path::Path;
use std::time::Duration;

use keyfleet_core::{Jwk, UnixSeconds};
use keyfleet_feed::FeedState;
use keyfleet_proto::v1::authority_client::AuthorityClient;
use keyfleet_proto::v1::{GetJwksRequest, JwksSnapshot};
use keyfleet_runtime::tls::ClientTls;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::Source;

/// Largest key-set snapshot a node accepts. A full token deny list alone (100,000 `jti`s of up
/// to 256 bytes) is ~27 MB, past tonic's 4 MiB default.
const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;
/// How long one fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS document accepted over HTTP.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Shortest fleet credential accepted: the authority generates 64 characters and refuses
/// tokens shorter than 32 bytes, so a shorter one is a mistake (or a guessable secret).
pub const MIN_NODE_TOKEN_BYTES: usize = 32;

/// The fleet credential (`--node-token-file`). Never printed.
#[derive(Clone)]
pub(crate) struct NodeToken(String);

impl std::fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeToken(<redacted>)")
    }
}

impl NodeToken {
    /// Whether `authorization` metadata (`Bearer <token>`) carries this credential: what a
    /// relay asks of the verifiers behind it. Constant time in the credential's content.
    pub(crate) fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some((scheme, presented)) = authorization.and_then(|v| v.split_at_checked(7)) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer ")
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                presented.trim_ascii(),
                self.0.as_bytes(),
            ))
    }
}

/// Why the fleet credential could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NodeTokenError {
    /// Open to other users, owned by another user, or a link; the message says what to run.
    #[error(transparent)]
    Insecure(#[from] keyfleet_runtime::secure_fs::SecureFsError),
    #[error("cannot read the node token file {path} (--node-token-file)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the node token file {path} (--node-token-file) holds {len} bytes: a fleet credential has at least {MIN_NODE_TOKEN_BYTES}; copy the authority's <data-dir>/node.token"
    )]
    TooShort {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error(
        "the node token file {path} (--node-token-file) has characters that cannot go in a header: copy the authority's <data-dir>/node.token"
    )]
    NotAscii { path: std::path::PathBuf },
}

/// Reads and checks the fleet credential in `path` (surrounding whitespace is ignored).
pub(crate) fn load_node_token(path: &Path) -> Result<NodeToken, NodeTokenError> {
    // Same file rules as the authority's token files: ours and 0600, or root's and closed to
    // writers (a mounted secret); never a link another user planted.
    let read_err = |source| NodeTokenError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = keyfleet_runtime::secure_fs::open_secret(path, "node token file")?
        .ok_or_else(|| read_err(std::io::ErrorKind::NotFound.into()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(read_err)?;
    let token = text.trim();
    if token.len() < MIN_NODE_TOKEN_BYTES {
        return Err(NodeTokenError::TooShort {
            path: path.to_owned(),
            len: token.len(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(NodeTokenError::NotAscii {
            path: path.to_owned(),
        });
    }
    Ok(NodeToken(token.to_owned()))
}

/// Adds `authorization: Bearer <fleet credential>` to every call to the authority (marked
/// sensitive, so HTTP/2 never indexes it); nothing without a credential.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    fn new(token: Option<&NodeToken>) -> Result<Bearer, UpstreamError> {
        let Some(token) = token else {
            return Ok(Bearer(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.0)
            .parse()
            .map_err(|_| UpstreamError::NodeTokenHeader)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The authority client every call goes through.
pub(crate) type AuthorityApi = AuthorityClient<InterceptedService<Channel, Bearer>>;

/// A key set as the source published it, before screening.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fetched {
    pub(crate) version: u64,
    pub(crate) issuer: Option<String>,
    pub(crate) keys: Vec<Jwk>,
    pub(crate) revoked_kids: Vec<String>,
    pub(crate) revoked_tokens: Vec<(String, UnixSeconds)>,
    /// Ended sessions (`sid`, until).
    pub(crate) revoked_sessions: Vec<(String, UnixSeconds)>,
    /// JWKS entries that were not JWK objects at all (counted as rejected keys).
    pub(crate) unparseable: usize,
    /// Built by applying a delta of the push stream: never rolls the held version back (a
    /// pull may have got ahead of the stream).
    pub(crate) from_delta: bool,
}

fn jwk(k: keyfleet_proto::v1::Jwk) -> Jwk {
    Jwk {
        kty: k.kty,
        crv: k.crv,
        x: k.x,
        kid: k.kid,
        use_: k.r#use,
        alg: k.alg,
        ..Jwk::default()
    }
}

impl From<JwksSnapshot> for Fetched {
    fn from(s: JwksSnapshot) -> Fetched {
        Fetched {
            version: s.version,
            issuer: Some(s.issuer).filter(|i| !i.is_empty()),
            keys: s.keys.into_iter().map(jwk).collect(),
            revoked_kids: s.revoked_kids,
            revoked_tokens: s
                .revoked_tokens
                .into_iter()
                .map(|t| (t.jti, t.until))
                .collect(),
            revoked_sessions: (s.revoked_sessions.into_iter())
                .map(|s| (s.sid, s.until))
                .collect(),
            unparseable: 0,
            from_delta: false,
        }
    }
}

impl Fetched {
    /// The key set `state` names at `version`, as a delta of the push stream left it.
    pub(crate) fn of_delta(state: &FeedState, version: u64) -> Fetched {
        Fetched {
            version,
            issuer: Some(state.issuer.clone()).filter(|i| !i.is_empty()),
            keys: state.keys.values().cloned().map(jwk).collect(),
            revoked_kids: state.revoked_kids.iter().cloned().collect(),
            revoked_tokens: state
                .revoked_tokens
                .iter()
                .map(|(jti, until)| (jti.clone(), *until))
                .collect(),
            revoked_sessions: state
                .revoked_sessions
                .iter()
                .map(|(sid, until)| (sid.clone(), *until))
                .collect(),
            unparseable: 0,
            from_delta: true,
        }
    }
}

/// What one pull brought.
#[derive(Debug)]
// One per pull, moved once: boxing the snapshot would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    /// The authority's (or a relay's) snapshot, as it came.
    Snapshot(JwksSnapshot),
    /// A JWKS document, parsed.
    Jwks(Fetched),
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("the authority call failed")]
    Grpc(#[from] tonic::Status),
    #[error("http request failed")]
    Http(#[from] reqwest::Error),
    #[error("http status {0}")]
    HttpStatus(u16),
    #[error("jwks document larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("jwks document is not valid json with a keys array")]
    Parse(#[source] keyfleet_core::JwksError),
    #[error("timed out after {FETCH_TIMEOUT:?}")]
    Timeout,
}

/// Why the client to the source could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Endpoint(#[from] keyfleet_runtime::client::EndpointError),
    #[error(transparent)]
    NodeToken(#[from] NodeTokenError),
    #[error("the node token cannot go in a header: copy the authority's <data-dir>/node.token")]
    NodeTokenHeader,
    #[error("the jwks url {url:?} is not a valid url")]
    JwksUrl {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Tls(#[from] keyfleet_runtime::tls::TlsError),
    #[error("cannot build the HTTP client for the jwks url")]
    HttpClient(#[source] reqwest::Error),
}

/// The one client to the source, shared by every refresh.
#[derive(Debug, Clone)]
pub(crate) enum Upstream {
    Authority(AuthorityApi),
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

impl Upstream {
    /// Builds the client without connecting (the channel connects on first use and reconnects
    /// by itself). Needs a Tokio runtime. `node_token_file` holds the fleet credential sent to
    /// an authority (without it the node gets public keys only, no deny lists, and cannot
    /// watch); a JWKS URL never gets it.
    pub(crate) fn new(
        source: &Source,
        tls: &ClientTls,
        node_token_file: Option<&Path>,
    ) -> Result<Upstream, UpstreamError> {
        Ok(match source {
            Source::Authority { url } => {
                let settings = &keyfleet_runtime::client::Settings::UPSTREAM;
                let channel =
                    keyfleet_runtime::client::endpoint(url, tls, settings)?.connect_lazy();
                let token = node_token_file.map(load_node_token).transpose()?;
                if token.is_none() {
                    tracing::warn!(authority = %url, "no --node-token-file: the authority will refuse this node's watch stream and send it no deny lists (revoked tokens would be accepted)");
                }
                Upstream::Authority(
                    AuthorityClient::with_interceptor(channel, Bearer::new(token.as_ref())?)
                        .max_decoding_message_size(MAX_SNAPSHOT_BYTES),
                )
            }
            Source::JwksUrl { url } => {
                let url = reqwest::Url::parse(url).map_err(|e| UpstreamError::JwksUrl {
                    url: url.clone(),
                    source: e.into(),
                })?;
                let client = reqwest::Client::builder()
                    .use_preconfigured_tls(tls.rustls_config()?)
                    .https_only(url.scheme() == "https")
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(Duration::from_secs(2))
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("keyfleet-verifier/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(UpstreamError::HttpClient)?;
                Upstream::Http { client, url }
            }
        })
    }

    /// One pull of the whole key set.
    pub(crate) async fn fetch(&self) -> Result<Pulled, FetchError> {
        match self {
            Upstream::Authority(client) => {
                let mut client = client.clone();
                let snapshot =
                    tokio::time::timeout(FETCH_TIMEOUT, client.get_jwks(GetJwksRequest {}))
                        .await
                        .map_err(|_| FetchError::Timeout)??;
                Ok(Pulled::Snapshot(snapshot.into_inner()))
            }
            Upstream::Http { client, url } => Ok(Pulled::Jwks(fetch_http(client, url).await?)),
        }
    }
}

async fn fetch_http(client: &reqwest::Client, url: &reqwest::Url) -> Result<Fetched, FetchError> {
    let mut response = client
        .get(url.clone())
        .header("accept", "application/json")
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(FetchError::HttpStatus(response.status().as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    parse_jwks(&body)
}

/// Parses `{"keys":[...]}` with keyfleet-core's hostile-input parser: entries that are not JWK
/// objects are skipped and counted; screening judges the rest.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Fetched, FetchError> {
    let doc = keyfleet_core::parse_jwks(body).map_err(FetchError::Parse)?;
    if doc.unparseable > 0 {
        tracing::warn!(
            skipped = doc.unparseable,
            "jwks entries that are not JWK objects were skipped"
        );
    }
    Ok(Fetched {
        keys: doc.keys,
        unparseable: doc.unparseable,
        ..Fetched::default()
    })
}
