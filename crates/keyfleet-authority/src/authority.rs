//! The authority's state and operations: the key ring with its private keys behind one lock,
//! every change persisted before it is published, the lifecycle loop, and the servers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyfleet_core::ring::TickOutcome;
use keyfleet_core::token::REGISTERED_CLAIMS;
use keyfleet_core::{
    KeyRecord, KeyRing, KeyState, RingError, RingPolicy, TokenClaims, UnixSeconds,
};
use keyfleet_proto::v1 as pb;
use keyfleet_runtime::{CancellationToken, Clock};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tonic::service::Routes;
use tracing::{error, info, warn};

use crate::admin::AdminToken;
use crate::error::{OpenError, ServiceError};
use crate::guard::AdminGuard;
use crate::metrics::{Metrics, Trigger};
use crate::store::{SecretKey, Store, Stored, write_atomic};
use crate::watchers::{Slots, Watchers};
use crate::{Config, grpc, http};

/// Verifiers refuse longer tokens (keyfleet_core's default `max_token_bytes`).
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const MAX_JTI_LEN: usize = 256;

/// The signing authority: open it with [`Authority::open`], then [`Authority::serve`] it.
pub struct Authority {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("issuer", &self.shared.issuer)
            .finish_non_exhaustive()
    }
}

/// The key currently signing.
pub(crate) struct Signer {
    pub kid: String,
    pub key: SecretKey,
}

/// The version and active kid after a committed change.
#[derive(Debug, Clone)]
pub(crate) struct Committed {
    pub version: u64,
    pub active_kid: String,
}

pub(crate) struct Shared {
    pub issuer: String,
    pub policy: RingPolicy,
    pub clock: Clock,
    pub watcher_timeout: Duration,
    tick_interval: Duration,
    pub admin: AdminToken,
    /// The fleet credential (`WatchJwks`, `GetJwks` with deny lists).
    pub node: AdminToken,
    /// The caps on open watch streams.
    pub slots: Slots,
    store: Store,
    /// The data directory's lock ([`Store::lock_dir`]), held as long as the authority lives.
    _dir_lock: std::fs::File,
    /// The ring of record and its private keys; held across the write that persists a change,
    /// so memory never runs ahead of disk.
    state: tokio::sync::Mutex<Stored>,
    signer: ArcSwap<Signer>,
    pub snapshots: watch::Sender<Arc<pb::JwksSnapshot>>,
    pub watchers: Mutex<Watchers>,
    /// Asks the lifecycle loop for a tick now (after an ack or a disconnect).
    pub kick: Notify,
    pub metrics: Metrics,
    /// How the listeners are served (TLS, limits) and the admin rules (`--insecure-admin`,
    /// the admin rate).
    transport: keyfleet_runtime::serve::Transport,
    insecure_admin: bool,
    admin_rate: u32,
}

impl Authority {
    /// Loads or creates the key ring and the admin token. Fails without modifying anything on
    /// disk when the policy is invalid, the KEK is missing or wrong, or the ring is corrupt.
    pub fn open(config: Config) -> Result<Authority, OpenError> {
        config.policy.check().map_err(OpenError::Config)?;
        if config.issuer.trim().is_empty() {
            return Err(OpenError::Config("--issuer must not be empty".into()));
        }
        if config.tick_interval.is_zero() || config.watcher_timeout.is_zero() {
            return Err(OpenError::Config(
                "the tick interval and watcher timeout must be positive".into(),
            ));
        }
        let store = Store::new(&config.data_dir, config.kek.clone());
        // The directory (created when missing, a no-op otherwise) is locked before it is read.
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(store.dir())
            .map_err(|source| OpenError::DataDir {
                path: store.dir().to_owned(),
                source,
            })?;
        let dir_lock = store.lock_dir()?;
        // Read and check everything before writing anything.
        let loaded = store.load()?;
        if config.admin_token_file == config.node_token_file {
            return Err(OpenError::SameTokens);
        }
        let admin = AdminToken::read(&config.admin_token_file)?;
        let node = AdminToken::read(&config.node_token_file)
            .map_err(|e| OpenError::NodeToken(Box::new(e)))?;
        if let (Some(admin), Some(node)) = (&admin, &node)
            && admin.expose() == node.expose()
        {
            return Err(OpenError::SameTokens);
        }
        if config.max_watchers == 0 || config.max_watchers_per_peer == 0 {
            return Err(OpenError::Config(
                "--max-watchers and the per-peer cap must be at least 1".into(),
            ));
        }
        let now = config.clock.now();
        let stored = match loaded {
            Some(mut stored) => {
                info!(path = %store.path().display(), version = stored.ring.version, active_kid = %stored.ring.active().kid, "loaded the key ring");
                // The configured policy governs from now on; it is persisted with the next change.
                stored.ring.policy = config.policy;
                stored
            }
            None => {
                let (active, active_key) = SecretKey::generate().map_err(OpenError::Random)?;
                let (next, next_key) = SecretKey::generate().map_err(OpenError::Random)?;
                let keys = BTreeMap::from([
                    (active.kid.clone(), active_key),
                    (next.kid.clone(), next_key),
                ]);
                let stored = Stored {
                    ring: KeyRing::bootstrap(config.policy, now, active, next),
                    keys,
                };
                let bytes = store.encode(&stored).map_err(OpenError::Random)?;
                store.write(&bytes).map_err(|source| OpenError::WriteRing {
                    path: store.path().to_owned(),
                    source,
                })?;
                info!(path = %store.path().display(), active_kid = %stored.ring.active().kid, sealed = config.kek.is_some(), "created a new key ring");
                stored
            }
        };
        store.remove_leftovers();
        let admin = match admin {
            Some(admin) => admin,
            None => {
                let admin = AdminToken::create(&config.admin_token_file)?;
                info!(path = %config.admin_token_file.display(), "created the admin token file");
                admin
            }
        };
        let node = match node {
            Some(node) => node,
            None => {
                let node = AdminToken::create(&config.node_token_file)
                    .map_err(|e| OpenError::NodeToken(Box::new(e)))?;
                info!(path = %config.node_token_file.display(), "created the fleet credential (node token) file: give it to the verifiers with --node-token-file");
                node
            }
        };

        let active = stored.ring.active().kid.clone();
        let key = stored
            .keys
            .get(&active)
            .expect("a loaded ring holds the active private key")
            .clone();
        let metrics = Metrics::new();
        metrics.observe_ring(&stored.ring);
        let snapshot = Arc::new(snapshot(&stored.ring, &config.issuer, now));
        let shared = Shared {
            issuer: config.issuer,
            policy: config.policy,
            clock: config.clock,
            watcher_timeout: config.watcher_timeout,
            tick_interval: config.tick_interval,
            admin,
            node,
            slots: Slots::new(config.max_watchers, config.max_watchers_per_peer),
            store,
            _dir_lock: dir_lock,
            state: tokio::sync::Mutex::new(stored),
            signer: ArcSwap::from_pointee(Signer { kid: active, key }),
            snapshots: watch::Sender::new(snapshot),
            watchers: Mutex::default(),
            kick: Notify::new(),
            transport: keyfleet_runtime::serve::Transport {
                tls: config.tls,
                limits: config.limits,
                shed: metrics.shed.clone(),
            },
            metrics,
            insecure_admin: config.insecure_admin,
            admin_rate: config.admin_rate,
        };
        Ok(Authority {
            shared: Arc::new(shared),
        })
    }

    /// The admin bearer token (for the demo and tests).
    pub fn admin_token(&self) -> String {
        self.shared.admin.expose().to_owned()
    }

    /// The fleet credential verifiers send (for the demo and tests).
    pub fn node_token(&self) -> String {
        self.shared.node.expose().to_owned()
    }

    /// Serves gRPC on `grpc` and HTTP on `http` and runs the key lifecycle until `shutdown` is
    /// cancelled; then ends every watch stream, drains both servers and returns.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let shared = self.shared;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;
        let stop = shutdown.child_token();
        let guard = AdminGuard::new(
            grpc_addr,
            shared.transport.tls.is_some(),
            shared.insecure_admin,
            shared.admin_rate,
        );
        if !guard.transport_ok(None) {
            warn!(grpc = %grpc_addr, "admin calls are refused on this plaintext non-loopback listener (except from this host): give --tls-cert/--tls-key, or --insecure-admin");
        }
        let service = grpc::AuthorityService::new(shared.clone(), stop.clone(), guard);
        let (routes, _health) = keyfleet_runtime::serve::with_health_and_reflection(
            Routes::new(
                pb::authority_server::AuthorityServer::new(service)
                    .max_decoding_message_size(grpc::MAX_REQUEST_BYTES),
            ),
            "keyfleet.v1.Authority",
        )
        .await?;
        let labels = keyfleet_runtime::rpc_trace::ServerLabels {
            role: "authority",
            node_id: "authority".to_owned(),
            region: String::new(),
        };
        let weak = Arc::downgrade(&shared);
        keyfleet_runtime::metrics_bridge::export(&labels.attributes(), move || {
            let shared = weak.upgrade()?;
            let watchers = shared.lock_watchers();
            shared
                .metrics
                .observe_watchers(&watchers, shared.watcher_timeout);
            drop(watchers);
            Some(shared.metrics.encode())
        });
        let routes = keyfleet_runtime::rpc_trace::traced(routes, labels);
        let router = http::router(shared.clone(), http_addr);
        info!(grpc = %grpc_addr, http = %http_addr, issuer = %shared.issuer, "authority listening");

        let lifecycle = tokio::spawn(lifecycle(shared.clone(), stop.clone()));
        // Whichever server stops first (an error, or the shutdown) stops the other.
        let grpc_server = async {
            let result = keyfleet_runtime::serve::serve_grpc_with(
                grpc,
                routes,
                &shared.transport,
                stop.clone(),
            )
            .await;
            stop.cancel();
            result
        };
        let http_server = async {
            let result = keyfleet_runtime::serve::serve_http_with(
                http,
                router,
                &shared.transport,
                stop.clone(),
            )
            .await;
            stop.cancel();
            result
        };
        let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
        let _ = lifecycle.await;
        grpc_result?;
        http_result?;
        info!("authority stopped");
        Ok(())
    }
}

/// Ticks the ring every `tick_interval` and whenever kicked, until `stop`.
async fn lifecycle(shared: Arc<Shared>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(shared.tick_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
            _ = shared.kick.notified() => {}
        }
        {
            let mut watchers = shared.lock_watchers();
            watchers.prune();
            shared
                .metrics
                .observe_watchers(&watchers, shared.watcher_timeout);
        }
        match shared.tick().await {
            // Already logged where it happened.
            Ok(()) | Err(ServiceError::Persist(_)) => {}
            Err(e) => warn!(error = %e, "lifecycle tick failed; retrying on the next tick"),
        }
    }
}

impl Shared {
    pub(crate) fn lock_watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn min_acked(&self) -> Option<u64> {
        self.lock_watchers().min_acked(self.watcher_timeout)
    }

    /// Applies `change` to a copy of the ring, tops up the next key, drops private keys the ring
    /// no longer needs, persists, and only then swaps the copy in and publishes it. On any error
    /// nothing changes, in memory or on disk.
    async fn mutate<T>(
        &self,
        change: impl FnOnce(&mut Stored, UnixSeconds) -> Result<T, ServiceError>,
    ) -> Result<(T, Committed), ServiceError> {
        let mut state = self.state.lock().await;
        let now = self.clock.now();
        let mut work = state.clone();
        let value = change(&mut work, now)?;
        ensure_next(&mut work, now)?;
        let needed: Vec<String> = work.ring.signing_capable().map(str::to_owned).collect();
        work.keys.retain(|kid, _| needed.contains(kid));
        if let Some(kid) = needed.iter().find(|kid| !work.keys.contains_key(*kid)) {
            return Err(RingError::Inconsistent(format!("no private key for {kid}")).into());
        }
        if work.ring != state.ring {
            let bytes = self.store.encode(&work).map_err(ServiceError::Random)?;
            let (dir, store_path) = (self.store.dir().to_owned(), self.store.path().to_owned());
            let path = store_path.clone();
            // The write blocks on fsync: keep it off the async workers.
            let written = tokio::task::spawn_blocking(move || write_atomic(&dir, &path, &bytes))
                .await
                .map_err(|_| ServiceError::ShuttingDown)?;
            if let Err(e) = written {
                self.metrics.persist_failures.inc();
                error!(path = %store_path.display(), error = %e, "cannot persist the key ring; the change is not applied");
                return Err(ServiceError::Persist(e));
            }
            let published = work.ring.version != state.ring.version;
            // A span per key-set change; no await follows while it is entered.
            let _change = published.then(|| {
                tracing::info_span!(
                    "jwks.publish",
                    version = work.ring.version,
                    previous = state.ring.version,
                    active_kid = %work.ring.active().kid,
                )
                .entered()
            });
            let old_next = state.ring.next().map(|k| k.kid.clone());
            *state = work;
            if let Some(next) = state
                .ring
                .next()
                .filter(|k| Some(&k.kid) != old_next.as_ref())
            {
                info!(kid = %next.kid, "next key published");
            }
            let active = state.ring.active();
            if self.signer.load().kid != active.kid {
                let key = state.keys[&active.kid].clone();
                self.signer.store(Arc::new(Signer {
                    kid: active.kid.clone(),
                    key,
                }));
            }
            if published {
                self.snapshots
                    .send_replace(Arc::new(snapshot(&state.ring, &self.issuer, now)));
            }
            self.metrics.observe_ring(&state.ring);
        }
        let committed = Committed {
            version: state.ring.version,
            active_kid: state.ring.active().kid.clone(),
        };
        Ok((value, committed))
    }

    /// One lifecycle step at the clock's now.
    pub(crate) async fn tick(&self) -> Result<(), ServiceError> {
        let min_acked = self.min_acked();
        let ((outcome, trigger), _) = self
            .mutate(|work, now| {
                let trigger = if work.ring.rotation_pending && now < work.ring.next_rotation_at() {
                    Trigger::Manual
                } else {
                    Trigger::Scheduled
                };
                Ok((work.ring.tick(now, min_acked), trigger))
            })
            .await?;
        self.report(&outcome, trigger);
        Ok(())
    }

    fn report(&self, outcome: &TickOutcome, trigger: Trigger) {
        let _span = (outcome.promoted.is_some()
            || !outcome.destroyed.is_empty()
            || !outcome.retired.is_empty())
        .then(|| tracing::info_span!("keyring.tick", trigger = trigger.as_str()).entered());
        if let Some(kid) = &outcome.promoted {
            self.metrics.rotated(trigger);
            info!(kid = %kid, trigger = trigger.as_str(), "key activated");
        }
        for kid in &outcome.destroyed {
            info!(kid = %kid, "key retiring: stopped signing, private key destroyed");
        }
        for kid in &outcome.retired {
            info!(kid = %kid, "key retired: removed from the JWKS");
        }
    }

    pub(crate) fn current(&self) -> Arc<pb::JwksSnapshot> {
        self.snapshots.borrow().clone()
    }

    pub(crate) fn issue_token(
        &self,
        req: pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse, ServiceError> {
        let invalid = |m: String| ServiceError::InvalidArgument(m);
        if req.subject.trim().is_empty() {
            return Err(invalid("subject is required".into()));
        }
        if req.audience.iter().any(|a| a.is_empty()) {
            return Err(invalid("an audience cannot be empty".into()));
        }
        let max_ttl = self.policy.token_ttl;
        let ttl = match req.ttl_seconds {
            0 => max_ttl,
            t if !(1..=max_ttl).contains(&t) => {
                return Err(invalid(format!(
                    "ttl_seconds must be between 1 and the authority's --token-ttl ({max_ttl}s), or 0 for the maximum; got {t}"
                )));
            }
            t => t,
        };
        let mut extra = serde_json::Map::new();
        for (name, value) in req.claims {
            if name.is_empty() {
                return Err(invalid("a claim name cannot be empty".into()));
            }
            if REGISTERED_CLAIMS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "claim {name:?} is registered and set by the authority; use another name"
                )));
            }
            let value = serde_json::from_str::<Value>(&value).unwrap_or(Value::String(value));
            extra.insert(name, value);
        }
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(ServiceError::Random)?;
        let now = self.clock.now();
        let claims = TokenClaims {
            iss: self.issuer.clone(),
            sub: req.subject,
            aud: req.audience,
            iat: now,
            nbf: now,
            exp: now + ttl,
            jti: URL_SAFE_NO_PAD.encode(jti),
            extra,
        };
        let signer = self.signer.load();
        let token = keyfleet_core::sign_token(signer.key.signing_key(), &signer.kid, &claims);
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(format!(
                "the token would be {} bytes, over the {MAX_TOKEN_BYTES} verifiers accept: send fewer or shorter claims",
                token.len()
            )));
        }
        self.metrics.tokens_issued.inc();
        Ok(pb::IssueTokenResponse {
            token,
            kid: signer.kid.clone(),
            jti: claims.jti,
            expires_at: claims.exp,
        })
    }

    pub(crate) async fn rotate(&self) -> Result<pb::RotateKeysResponse, ServiceError> {
        let min_acked = self.min_acked();
        let ((promoting, outcome), committed) = self
            .mutate(|work, now| {
                ensure_next(work, now)?;
                let promoting = work.ring.request_rotation()?;
                Ok((promoting, work.ring.tick(now, min_acked)))
            })
            .await?;
        info!(kid = %promoting, activated = outcome.promoted.is_some(), "rotation requested");
        self.report(&outcome, Trigger::Manual);
        Ok(pb::RotateKeysResponse {
            activated: committed.active_kid == promoting,
            promoting_kid: promoting,
            active_kid: committed.active_kid,
        })
    }

    pub(crate) async fn revoke_key(
        &self,
        kid: String,
    ) -> Result<pb::RevokeKeyResponse, ServiceError> {
        if kid.is_empty() {
            return Err(ServiceError::InvalidArgument("kid is required".into()));
        }
        let (was_active, committed) = self
            .mutate(|work, now| {
                let was_active = work.ring.active().kid == kid;
                match work.ring.revoke_key(&kid, now) {
                    Err(RingError::NoNextKey) => {
                        ensure_next(work, now)?;
                        work.ring.revoke_key(&kid, now)?;
                    }
                    other => {
                        other?;
                    }
                }
                Ok(was_active)
            })
            .await?;
        if was_active {
            self.metrics.rotated(Trigger::Revocation);
        }
        warn!(kid = %kid, was_active, active_kid = %committed.active_kid, "key revoked");
        Ok(pb::RevokeKeyResponse {
            revoked_kid: kid,
            active_kid: committed.active_kid,
            version: committed.version,
        })
    }

    pub(crate) async fn revoke_token(
        &self,
        jti: String,
        until: UnixSeconds,
    ) -> Result<pb::RevokeTokenResponse, ServiceError> {
        if jti.is_empty() {
            return Err(ServiceError::InvalidArgument("jti is required".into()));
        }
        if jti.len() > MAX_JTI_LEN {
            return Err(ServiceError::InvalidArgument(format!(
                "jti is longer than {MAX_JTI_LEN} bytes"
            )));
        }
        let policy_ttl = self.policy.token_ttl;
        let ((), committed) = self
            .mutate(|work, now| {
                // 0 means "as long as any token can live".
                let until = if until == 0 { now + policy_ttl } else { until };
                Ok(work.ring.revoke_token(&jti, until, now)?)
            })
            .await?;
        info!(version = committed.version, "token revoked");
        Ok(pb::RevokeTokenResponse {
            version: committed.version,
        })
    }

    pub(crate) async fn list_keys(&self) -> pb::ListKeysResponse {
        let now = self.clock.now();
        let state = self.state.lock().await;
        let ring = &state.ring;
        let mut keys: Vec<pb::KeyInfo> = ring.keys.iter().map(key_info).collect();
        let retention = ring.policy.retention();
        keys.extend(ring.revoked_kids.iter().map(|(kid, forget_at)| {
            match ring.revoked_records.get(kid) {
                Some(k) => key_info(k),
                // A ring written before revoked records were kept knows only the kid and when:
                // it remembers a revoked kid for exactly `retention` after its revocation.
                None => pb::KeyInfo {
                    kid: kid.clone(),
                    state: pb::KeyState::Revoked as i32,
                    revoked_at: forget_at - retention,
                    ..pb::KeyInfo::default()
                },
            }
        }));
        pb::ListKeysResponse {
            keys,
            watchers: self.lock_watchers().list(),
            version: ring.version,
            issuer: self.issuer.clone(),
            next_rotation_at: ring.next_rotation_at(),
            token_ttl_seconds: self.policy.token_ttl,
            publish_ahead_seconds: self.policy.publish_ahead,
            rotation_period_seconds: self.policy.rotation_period,
            now,
        }
    }

    /// `Cache-Control: max-age` of the HTTP JWKS: half of publish-ahead (1s to 5min), so a
    /// cached copy learns a next key well before it may sign.
    pub(crate) fn jwks_max_age(&self) -> i64 {
        (self.policy.publish_ahead / 2).clamp(1, 300)
    }
}

/// Publishes a fresh next key when the ring has none.
fn ensure_next(work: &mut Stored, now: UnixSeconds) -> Result<(), ServiceError> {
    if work.ring.needs_next() {
        let (key, secret) = SecretKey::generate().map_err(ServiceError::Random)?;
        let kid = key.kid.clone();
        work.ring.add_next(key, now)?;
        work.keys.insert(kid, secret);
    }
    Ok(())
}

fn key_info(k: &KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        kid: k.kid.clone(),
        state: proto_state(k.state) as i32,
        created_at: k.created_at,
        published_at: k.published_at,
        activated_at: k.activated_at.unwrap_or(0),
        deactivated_at: k.deactivated_at.unwrap_or(0),
        retire_at: k.retire_at.unwrap_or(0),
        revoked_at: k.revoked_at.unwrap_or(0),
        published_version: k.published_version,
    }
}

fn proto_state(state: KeyState) -> pb::KeyState {
    match state {
        KeyState::Next => pb::KeyState::Next,
        KeyState::Active => pb::KeyState::Active,
        KeyState::Retiring => pb::KeyState::Retiring,
        KeyState::Retired => pb::KeyState::Retired,
        KeyState::Revoked => pb::KeyState::Revoked,
    }
}

/// The snapshot verifiers receive for `ring`.
pub(crate) fn snapshot(ring: &KeyRing, issuer: &str, now: UnixSeconds) -> pb::JwksSnapshot {
    pb::JwksSnapshot {
        version: ring.version,
        issuer: issuer.to_owned(),
        keys: ring
            .jwks()
            .into_iter()
            .map(|k| pb::Jwk {
                kid: k.kid,
                kty: k.kty,
                crv: k.crv,
                x: k.x,
                alg: k.alg,
                r#use: k.use_,
            })
            .collect(),
        revoked_kids: ring.revoked_kids.keys().cloned().collect(),
        revoked_tokens: ring
            .revoked_tokens
            .iter()
            .map(|(jti, until)| pb::RevokedToken {
                jti: jti.clone(),
                until: *until,
            })
            .collect(),
        active_kid: ring.active().kid.clone(),
        generated_at: now,
    }
}
