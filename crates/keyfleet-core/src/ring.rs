//! The authority's key ring: every key's lifecycle as a pure state machine.
//!
//! ```text
//!   next ──promote──▶ active ──rotate──▶ retiring ──retire_at──▶ retired (dropped)
//!     └───────────────────┴──────revoke───────┴──▶ revoked (kept on the deny list)
//! ```
//! A key is published (next) before it signs. It is promoted when every live watcher has
//! acknowledged a JWKS version that carries it, or `publish_ahead` after its publication at the
//! latest. A retiring key stays published until the last token it signed has expired:
//! deactivation + `token_ttl` + `leeway`. The ring holds public halves only; the authority keeps
//! the private keys and destroys one when [`TickOutcome::destroyed`] names it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::UnixSeconds;
use crate::jwk::Jwk;

/// Upper bound of the single-token deny list; past it `revoke_token` refuses.
pub const MAX_REVOKED_TOKENS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Next,
    Active,
    Retiring,
    Retired,
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }
    /// Whether a key in this state is in the published JWKS.
    pub fn is_published(self) -> bool {
        matches!(self, KeyState::Next | KeyState::Active | KeyState::Retiring)
    }
}

/// One key's public half and lifecycle times (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kid: String,
    pub state: KeyState,
    pub public: [u8; 32],
    pub created_at: UnixSeconds,
    pub published_at: UnixSeconds,
    /// The first JWKS version that carried this key.
    pub published_version: u64,
    pub activated_at: Option<UnixSeconds>,
    pub deactivated_at: Option<UnixSeconds>,
    /// When a retiring key leaves the JWKS.
    pub retire_at: Option<UnixSeconds>,
    pub revoked_at: Option<UnixSeconds>,
}

/// A freshly generated key's public half, handed to the ring by the authority.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub kid: String,
    pub public: [u8; 32],
}

/// Lifecycle timing, validated once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPolicy {
    /// Longest token lifetime the authority mints.
    pub token_ttl: i64,
    /// Clock skew allowance verifiers apply.
    pub leeway: i64,
    /// How long a key signs before the scheduled rotation.
    pub rotation_period: i64,
    /// Longest wait for the fleet's acknowledgements before a next key is promoted anyway.
    pub publish_ahead: i64,
}

/// `--token-ttl` unless configured: the longest lifetime of a minted token, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: i64 = 15 * 60;
/// `--rotation-period` unless configured: how long a key signs, in seconds.
pub const DEFAULT_ROTATION_PERIOD_SECS: i64 = 24 * 3600;
/// `--publish-ahead` unless configured: the longest wait for the fleet before a next key signs,
/// in seconds.
pub const DEFAULT_PUBLISH_AHEAD_SECS: i64 = 10 * 60;

impl Default for RingPolicy {
    fn default() -> Self {
        RingPolicy {
            token_ttl: DEFAULT_TOKEN_TTL_SECS,
            leeway: crate::token::DEFAULT_LEEWAY_SECS,
            rotation_period: DEFAULT_ROTATION_PERIOD_SECS,
            publish_ahead: DEFAULT_PUBLISH_AHEAD_SECS,
        }
    }
}

impl RingPolicy {
    /// How long a retiring key stays published after it stops signing.
    pub fn retention(&self) -> i64 {
        self.token_ttl + self.leeway
    }

    /// Refuses timings under which a legitimate token could outlive its key's publication or a
    /// key could sign before the fleet had a chance to fetch it.
    pub fn check(&self) -> Result<(), String> {
        if self.token_ttl < 1 {
            return Err("--token-ttl must be at least 1s".into());
        }
        if self.leeway < 0 {
            return Err("--leeway cannot be negative".into());
        }
        if self.rotation_period < 2 {
            return Err("--rotation-period must be at least 2s".into());
        }
        if self.publish_ahead < 0 {
            return Err("--publish-ahead cannot be negative".into());
        }
        if self.publish_ahead >= self.rotation_period {
            return Err(format!(
                "--publish-ahead ({}s) must be shorter than --rotation-period ({}s): the next key is published one rotation ahead",
                self.publish_ahead, self.rotation_period
            ));
        }
        if self.token_ttl > self.rotation_period * 16 {
            return Err(format!(
                "--token-ttl ({}s) is over 16 rotation periods ({}s each): retiring keys would pile up in the JWKS",
                self.token_ttl, self.rotation_period
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("no key with kid {0:?} is in the ring")]
    UnknownKid(String),
    #[error("key {0:?} is already revoked")]
    AlreadyRevoked(String),
    #[error("no next key to promote: publish one first")]
    NoNextKey,
    #[error("the token deny list is full ({MAX_REVOKED_TOKENS} entries)")]
    DenyListFull,
    #[error("the ring is inconsistent: {0}")]
    Inconsistent(String),
}

/// What one [`KeyRing::tick`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// The kid that became active.
    pub promoted: Option<String>,
    /// Kids whose private key must be destroyed now (they stopped signing).
    pub destroyed: Vec<String>,
    /// Kids dropped from the JWKS.
    pub retired: Vec<String>,
    /// Whether the published state changed (and the version moved).
    pub changed: bool,
}

/// The whole key ring: records, deny lists and the published version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    pub policy: RingPolicy,
    /// Bumped on every change to what is published.
    pub version: u64,
    pub keys: Vec<KeyRecord>,
    /// Revoked kid → when it can be forgotten (its tokens have all expired by then).
    pub revoked_kids: BTreeMap<String, UnixSeconds>,
    /// What a revoked key's record said when it was revoked (state `revoked`), for `ListKeys`;
    /// history only, forgotten with its entry in `revoked_kids`. Rings written before it existed
    /// have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revoked_records: BTreeMap<String, KeyRecord>,
    /// Revoked jti → until when it is denied.
    pub revoked_tokens: BTreeMap<String, UnixSeconds>,
    /// A rotation was asked for and waits for the next key to be safe to promote.
    pub rotation_pending: bool,
    /// Rotations so far, by trigger, for metrics.
    #[serde(default)]
    pub rotations: u64,
}

impl KeyRing {
    /// A new ring: `active` signs from `now`, `next` is published alongside it.
    pub fn bootstrap(
        policy: RingPolicy,
        now: UnixSeconds,
        active: NewKey,
        next: NewKey,
    ) -> KeyRing {
        let mut ring = KeyRing {
            policy,
            version: 1,
            keys: Vec::new(),
            revoked_kids: BTreeMap::new(),
            revoked_records: BTreeMap::new(),
            revoked_tokens: BTreeMap::new(),
            rotation_pending: false,
            rotations: 0,
        };
        let mut first = ring.record(active, now, KeyState::Active);
        first.activated_at = Some(now);
        ring.keys.push(first);
        let second = ring.record(next, now, KeyState::Next);
        ring.keys.push(second);
        ring
    }

    fn record(&self, key: NewKey, now: UnixSeconds, state: KeyState) -> KeyRecord {
        KeyRecord {
            kid: key.kid,
            state,
            public: key.public,
            created_at: now,
            published_at: now,
            published_version: self.version,
            activated_at: None,
            deactivated_at: None,
            retire_at: None,
            revoked_at: None,
        }
    }

    /// Checks the invariants a loaded ring must hold: exactly one active key, unique kids.
    pub fn check(&self) -> Result<(), RingError> {
        let active = self
            .keys
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .count();
        if active != 1 {
            return Err(RingError::Inconsistent(format!(
                "{active} active keys, want exactly 1"
            )));
        }
        let mut kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        kids.sort_unstable();
        if kids.windows(2).any(|w| w[0] == w[1]) {
            return Err(RingError::Inconsistent("a kid appears twice".into()));
        }
        let stray = self.revoked_records.iter().find(|(kid, record)| {
            !self.revoked_kids.contains_key(*kid)
                || record.kid != **kid
                || record.state != KeyState::Revoked
        });
        if let Some((kid, _)) = stray {
            return Err(RingError::Inconsistent(format!(
                "the revoked record of {kid:?} does not match the revoked kids"
            )));
        }
        Ok(())
    }

    pub fn active(&self) -> &KeyRecord {
        // `check` and every transition keep exactly one active key.
        self.keys
            .iter()
            .find(|k| k.state == KeyState::Active)
            .expect("ring has an active key")
    }

    pub fn next(&self) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.state == KeyState::Next)
    }

    pub fn get(&self, kid: &str) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Kids whose private half the authority must still hold (active and next).
    pub fn signing_capable(&self) -> impl Iterator<Item = &str> {
        self.keys
            .iter()
            .filter(|k| matches!(k.state, KeyState::Active | KeyState::Next))
            .map(|k| k.kid.as_str())
    }

    /// The published keys, active first.
    pub fn jwks(&self) -> Vec<Jwk> {
        let mut keys: Vec<&KeyRecord> = self
            .keys
            .iter()
            .filter(|k| k.state.is_published())
            .collect();
        keys.sort_by_key(|k| match k.state {
            KeyState::Active => 0,
            KeyState::Next => 1,
            _ => 2,
        });
        keys.into_iter()
            .map(|k| Jwk::ed25519(&k.kid, &k.public))
            .collect()
    }

    /// When the scheduled rotation is due.
    pub fn next_rotation_at(&self) -> UnixSeconds {
        self.active().activated_at.unwrap_or(0) + self.policy.rotation_period
    }

    /// Whether the ring lacks a next key (the authority then generates one and calls `add_next`).
    pub fn needs_next(&self) -> bool {
        self.next().is_none()
    }

    /// Publishes a freshly generated key as next.
    pub fn add_next(&mut self, key: NewKey, now: UnixSeconds) -> Result<(), RingError> {
        if self.next().is_some() {
            return Err(RingError::Inconsistent(
                "a next key is already published".into(),
            ));
        }
        if self.get(&key.kid).is_some() || self.revoked_kids.contains_key(&key.kid) {
            return Err(RingError::Inconsistent(format!(
                "kid {:?} is taken",
                key.kid
            )));
        }
        self.version += 1;
        let record = self.record(key, now, KeyState::Next);
        self.keys.push(record);
        Ok(())
    }

    /// Asks for a rotation: the next key is promoted by `tick` as soon as it is safe.
    /// Returns the kid that will become active.
    pub fn request_rotation(&mut self) -> Result<String, RingError> {
        let next = self.next().ok_or(RingError::NoNextKey)?.kid.clone();
        self.rotation_pending = true;
        Ok(next)
    }

    /// Whether the next key may sign: every live watcher holds it (`min_acked` is the lowest
    /// version acknowledged by a live watcher; `None` when none watch), or it has been
    /// published for `publish_ahead`.
    pub fn next_is_safe(&self, now: UnixSeconds, min_acked: Option<u64>) -> bool {
        self.next().is_some_and(|next| {
            min_acked.is_none_or(|acked| acked >= next.published_version)
                || now >= next.published_at + self.policy.publish_ahead
        })
    }

    /// Advances the lifecycle to `now`: schedules a due rotation, promotes a safe next key,
    /// retires keys and deny-list entries whose time has passed.
    pub fn tick(&mut self, now: UnixSeconds, min_acked: Option<u64>) -> TickOutcome {
        let mut out = TickOutcome::default();
        if now >= self.next_rotation_at() {
            self.rotation_pending = true;
        }
        if self.rotation_pending && self.next_is_safe(now, min_acked) {
            let old = self.promote(now);
            out.promoted = Some(self.active().kid.clone());
            out.destroyed.push(old);
            out.changed = true;
        }
        let before = self.keys.len();
        self.keys.retain(|k| {
            let gone = k.state == KeyState::Retiring && k.retire_at.is_some_and(|t| now >= t);
            if gone {
                out.retired.push(k.kid.clone());
            }
            !gone
        });
        let before_deny = self.revoked_kids.len() + self.revoked_tokens.len();
        self.revoked_kids.retain(|_, forget_at| now < *forget_at);
        let kept = &self.revoked_kids;
        self.revoked_records.retain(|kid, _| kept.contains_key(kid));
        let leeway = self.policy.leeway;
        self.revoked_tokens
            .retain(|_, until| now <= *until + leeway);
        if self.keys.len() != before
            || self.revoked_kids.len() + self.revoked_tokens.len() != before_deny
        {
            out.changed = true;
        }
        if out.changed {
            self.version += 1;
        }
        out
    }

    /// Active → retiring, next → active. Returns the kid that stopped signing.
    fn promote(&mut self, now: UnixSeconds) -> String {
        let retention = self.policy.retention();
        let mut old = String::new();
        for k in &mut self.keys {
            match k.state {
                KeyState::Active => {
                    k.state = KeyState::Retiring;
                    k.deactivated_at = Some(now);
                    k.retire_at = Some(now + retention);
                    old = k.kid.clone();
                }
                KeyState::Next => {
                    k.state = KeyState::Active;
                    k.activated_at = Some(now);
                }
                _ => {}
            }
        }
        self.rotation_pending = false;
        self.rotations += 1;
        old
    }

    /// Emergency revocation: the key leaves the JWKS at once and its tokens are refused. If it
    /// was active, the next key signs from now on (the caller publishes a new next key after).
    /// Returns the kids whose private key must be destroyed.
    pub fn revoke_key(&mut self, kid: &str, now: UnixSeconds) -> Result<Vec<String>, RingError> {
        if self.revoked_kids.contains_key(kid) {
            return Err(RingError::AlreadyRevoked(kid.into()));
        }
        let state = self
            .get(kid)
            .ok_or_else(|| RingError::UnknownKid(kid.into()))?
            .state;
        if state == KeyState::Active && self.next().is_none() {
            return Err(RingError::NoNextKey);
        }
        let mut destroyed = vec![kid.to_owned()];
        if state == KeyState::Active {
            // Promote first so exactly one key stays active, then drop the old one below.
            destroyed = vec![self.promote(now)];
        }
        if let Some(mut record) = self.get(kid).cloned() {
            record.state = KeyState::Revoked;
            record.revoked_at = Some(now);
            record.retire_at = None;
            self.revoked_records.insert(kid.to_owned(), record);
        }
        self.keys.retain(|k| k.kid != kid);
        // Its tokens live at most token_ttl from now; remember the kid that long (and leeway).
        self.revoked_kids
            .insert(kid.to_owned(), now + self.policy.retention());
        self.version += 1;
        Ok(destroyed)
    }

    /// Denies one token until `until` (clamped to the longest any token can live from now).
    pub fn revoke_token(
        &mut self,
        jti: &str,
        until: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<(), RingError> {
        let until = until.min(now + self.policy.token_ttl);
        if until < now || self.revoked_tokens.get(jti).is_some_and(|u| *u >= until) {
            return Ok(());
        }
        if self.revoked_tokens.len() >= MAX_REVOKED_TOKENS && !self.revoked_tokens.contains_key(jti)
        {
            return Err(RingError::DenyListFull);
        }
        self.revoked_tokens.insert(jti.to_owned(), until);
        self.version += 1;
        Ok(())
    }
}
