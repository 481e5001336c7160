//! Startup: [`Authority::open`] checks the configuration, locks the data directory, loads the
//! key ring (or creates one with an active and a next key) and the two credentials (or creates
//! them), and builds the state the servers share. Everything is read and checked before
//! anything is written.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use keyfleet_core::{KeyRing, RingPolicy, UnixSeconds};
use keyfleet_feed::watch::Slots;
use keyfleet_feed::{Feed, Limits};
use tokio::sync::Notify;
use tracing::info;

use crate::Config;
use crate::admin::AdminToken;
use crate::authority::{Authority, AuthorityState, Signer};
use crate::convert::feed_state;
use crate::error::OpenError;
use crate::keys::{RingState, SecretKey};
use crate::metrics::Metrics;
use crate::ring_file::RingFile;

/// gRPC connections the authority keeps for callers other than watchers (admin, `GetJwks`,
/// health), on top of `--max-watchers`.
const NON_WATCHER_CONNECTIONS: usize = 1024;

impl Authority {
    /// Loads or creates the key ring and the credentials. Fails without modifying anything on
    /// disk when the configuration is invalid ([`Config::check`]), the KEK is missing or wrong,
    /// the ring is corrupt, or a credential file is unsafe or shared.
    pub fn open(config: Config) -> Result<Authority, OpenError> {
        config.check()?;
        let file = RingFile::new(&config.data_dir, config.kek.clone());
        // The directory (created when missing, a no-op otherwise) is locked before it is read.
        let dir_lock = file.create_and_lock_dir()?;
        // Read and check everything before writing anything.
        let loaded = file.load()?;
        let admin = AdminToken::read(&config.admin_token_file)?;
        let node = AdminToken::read(&config.node_token_file).map_err(node_token_error)?;
        if let (Some(admin), Some(node)) = (&admin, &node)
            && admin.expose() == node.expose()
        {
            return Err(OpenError::SameTokens);
        }
        let now = config.clock.now();
        let state = match loaded {
            Some(mut state) => {
                info!(path = %file.path().display(), version = state.ring.version, active_kid = %state.ring.active().kid, "loaded the key ring");
                // The configured policy governs from now on; it is persisted with the next change.
                state.ring.policy = config.policy;
                state
            }
            None => create_ring(&file, config.policy, now, config.kek.is_some())?,
        };
        // The session store: its ended sessions whose access tokens may still live are
        // published again (the store is their record; keyring.json does not hold them).
        let sessions = crate::sqlite::SqliteStore::open(&config.data_dir, config.session_batch)?;
        let mut state = state;
        let window = config.policy.token_ttl + config.policy.leeway;
        state.revoked_sessions = crate::session_store::SessionStore::ended_since(
            &sessions,
            now - window,
            now - config.policy.leeway,
        )
        .map_err(OpenError::LoadSessions)?
        .into_iter()
        .map(|e| (e.sid, e.access_expires_at + config.policy.leeway))
        .collect();
        file.remove_leftovers();
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
                let node = AdminToken::create(&config.node_token_file).map_err(node_token_error)?;
                info!(path = %config.node_token_file.display(), "created the fleet credential (node token) file: give it to the verifiers with --node-token-file");
                node
            }
        };
        let shared = shared_state(
            config,
            file,
            dir_lock,
            state,
            admin,
            node,
            now,
            Arc::new(sessions),
        );
        Ok(Authority {
            shared: Arc::new(shared),
        })
    }
}

/// A failure with the fleet credential's file, said to be about that file.
fn node_token_error(e: OpenError) -> OpenError {
    OpenError::NodeToken(Box::new(e))
}

/// A new ring (an active key signing from `now`, a next key published) written to `file`: the
/// first write of a new data directory. Every later write goes through `commit`.
fn create_ring(
    file: &RingFile,
    policy: RingPolicy,
    now: UnixSeconds,
    sealed: bool,
) -> Result<RingState, OpenError> {
    let (active, active_key) = SecretKey::generate().map_err(OpenError::Random)?;
    let (next, next_key) = SecretKey::generate().map_err(OpenError::Random)?;
    let keys = BTreeMap::from([
        (active.kid.clone(), active_key),
        (next.kid.clone(), next_key),
    ]);
    let state = RingState {
        ring: KeyRing::bootstrap(policy, now, active, next),
        keys,
        revoked_sessions: BTreeMap::new(),
    };
    let bytes = file.encode(&state).map_err(OpenError::Random)?;
    file.write(&bytes).map_err(|source| OpenError::WriteRing {
        path: file.path().to_owned(),
        source,
    })?;
    info!(path = %file.path().display(), active_kid = %state.ring.active().kid, sealed, "created a new key ring");
    Ok(state)
}

/// The state the servers share, from an opened ring and credentials.
#[allow(clippy::too_many_arguments)]
fn shared_state(
    config: Config,
    file: RingFile,
    dir_lock: std::fs::File,
    state: RingState,
    admin: AdminToken,
    node: AdminToken,
    now: UnixSeconds,
    sessions: Arc<dyn crate::session_store::SessionStore>,
) -> AuthorityState {
    let active = state.ring.active().kid.clone();
    let key = state
        .keys
        .get(&active)
        .expect("a loaded ring holds the active private key")
        .clone();
    let metrics = Metrics::new();
    metrics.observe_ring(&state.ring);
    let rotation_pending = state.ring.rotation_pending;
    let feed = Feed::new(
        feed_state(&state, &config.issuer),
        state.ring.version,
        now,
        Limits::default(),
    );
    AuthorityState {
        issuer: config.issuer,
        policy: config.policy,
        clock: config.clock,
        watcher_timeout: config.watcher_timeout,
        tick_interval: config.tick_interval,
        admin,
        node,
        slots: Slots::new(config.max_watchers, config.max_watchers_per_peer),
        file: Arc::new(file),
        _dir_lock: dir_lock,
        ring: tokio::sync::Mutex::new(state),
        signer: ArcSwap::from_pointee(Signer { kid: active, key }),
        feed,
        watchers: Mutex::default(),
        kick: Notify::new(),
        rotation_pending: AtomicBool::new(rotation_pending),
        transport: keyfleet_runtime::serve::Transport {
            tls: config.tls,
            limits: keyfleet_runtime::limits::Limits {
                // Every watcher holds a connection of its own: room for `--max-watchers` of them
                // and the callers besides (still fitted to the descriptor limit when serving).
                max_grpc_connections: config
                    .limits
                    .max_grpc_connections
                    .max(config.max_watchers.saturating_add(NON_WATCHER_CONNECTIONS)),
                ..config.limits
            },
            shed: metrics.shed.clone(),
        },
        metrics,
        insecure_admin: config.insecure_admin,
        admin_rate: config.admin_rate,
        sessions,
        session_policy: config.sessions,
        purge_cursor: Mutex::new(String::new()),
    }
}
