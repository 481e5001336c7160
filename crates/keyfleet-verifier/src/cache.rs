//! The verified-token cache: a bounded map from a SHA-256 of (token, audience) to the answer a
//! *valid* token got, so a token seen again costs a hash and a lookup instead of a signature
//! check. Refusals are never cached: a forged token always pays the full check.
//!
//! An answer is reused only while the plain path would give it too: before `exp` + leeway,
//! while the same key (same bytes) is still published under its kid and not revoked, while
//! the token's `jti` is not denied, and under the same issuer. Those checks run on every hit,
//! against the key set in use; on every key-set swap a purge drops the entries they would
//! fail, so revoked keys and tokens also leave memory at once.
//!
//! The cached answer is the node's verdict (signature, time, issuer, audience, deny lists),
//! never a caller's demands: each entry keeps the two claims demands look at (`scope`,
//! `auth_time`) and every hit checks the request's own demands against them, so a "valid" for
//! one scope set never stands for another. A hit without demands does not look at them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use keyfleet_core::token::Refusal;
use keyfleet_core::{Demands, Policy, UnixSeconds, Verified, check_demands};
use keyfleet_proto::v1::VerifyResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::keyset::Held;

/// Entries held by default (a valid answer is ~0.5–1 KiB with its claims).
pub const DEFAULT_CACHE_ENTRIES: usize = 16_384;
/// Independent locks, so concurrent `Verify` calls rarely contend.
const SHARDS: usize = 16;

/// SHA-256 of the token, a separator and the caller's audience.
pub(crate) type CacheKey = [u8; 32];

/// `keyfleet_cache_entries`, `keyfleet_cache_hits_total`, `keyfleet_cache_misses_total`.
#[derive(Clone, Default)]
pub(crate) struct CacheMetrics {
    pub(crate) entries: Gauge,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
}

impl CacheMetrics {
    pub(crate) fn register(registry: &mut Registry) -> CacheMetrics {
        let m = CacheMetrics::default();
        registry.register(
            "keyfleet_cache_entries",
            "Valid answers held by the verified-token cache",
            m.entries.clone(),
        );
        registry.register(
            "keyfleet_cache_hits",
            "Verify answers served from the verified-token cache",
            m.hits.clone(),
        );
        registry.register(
            "keyfleet_cache_misses",
            "Verify calls that had to check the token (cache enabled)",
            m.misses.clone(),
        );
        m
    }
}

struct Entry {
    response: VerifyResponse,
    /// The exact key the token was verified with.
    key: [u8; 32],
    issuer: String,
    /// The answer holds while `now` is below this (`exp` + leeway, as the plain path).
    until: UnixSeconds,
    grants: Grants,
}

/// What a cached answer keeps of a valid token's claims beyond the response: its session (for
/// the session deny list) and the claims per-request demands read.
pub(crate) struct Grants {
    sid: Option<String>,
    /// Only `scope` and `auth_time`, when the token has them.
    demanded: Map<String, Value>,
}

impl Grants {
    /// The grants of a valid token.
    pub(crate) fn of(verified: &Verified) -> Grants {
        let claims = &verified.claims;
        let sid = match claims.get("sid") {
            Some(Value::String(sid)) => Some(sid.clone()),
            _ => None,
        };
        let demanded = ["scope", "auth_time"]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), claims.get(name)?.clone())))
            .collect();
        Grants { sid, demanded }
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<CacheKey, Entry>,
    /// Insertion order, for first-in-first-out eviction (may hold keys already removed).
    order: VecDeque<CacheKey>,
}

impl Shard {
    fn evict_to(&mut self, limit: usize) -> usize {
        let mut evicted = 0;
        while self.map.len() > limit {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            evicted += usize::from(self.map.remove(&k).is_some());
        }
        if self.order.len() > 2 * limit.max(8) {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
        evicted
    }
}

/// The node's verified-token cache. Capacity 0 disables it.
pub(crate) struct VerifyCache {
    shards: Box<[Mutex<Shard>]>,
    capacity: AtomicUsize,
    len: AtomicUsize,
    /// Identity of the key set last purged against.
    seen: AtomicUsize,
    metrics: CacheMetrics,
}

impl VerifyCache {
    pub(crate) fn new(capacity: usize, metrics: CacheMetrics) -> VerifyCache {
        VerifyCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            capacity: AtomicUsize::new(capacity),
            len: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
            metrics,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Changes the bound (0 disables the cache and drops every entry).
    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
        let per_shard = capacity.div_ceil(SHARDS);
        for shard in self.shards.iter() {
            let mut s = lock(shard);
            let evicted = s.evict_to(per_shard);
            self.removed(evicted);
        }
    }

    /// The key for `token` asked with `audience`, or `None` while the cache is disabled.
    pub(crate) fn key(&self, token: &str, audience: Option<&str>) -> Option<CacheKey> {
        if self.capacity() == 0 {
            return None;
        }
        let mut h = Sha256::new();
        h.update(token.as_bytes());
        // A byte that never occurs in a compact JWT separates the two parts.
        h.update([0xff]);
        h.update(audience.unwrap_or_default().as_bytes());
        Some(h.finalize().into())
    }

    /// The cached answer for `key`, if the plain path would give it now under `held`: the
    /// valid answer, or the refusal `demands` get from the token (its kid set).
    pub(crate) fn get(
        &self,
        key: Option<&CacheKey>,
        held: &std::sync::Arc<Held>,
        policy: &Policy,
        now: UnixSeconds,
        demands: &Demands<'_>,
    ) -> Option<Result<VerifyResponse, Refusal>> {
        let key = key?;
        self.purge_if_swapped(held, now);
        let mut shard = lock(&self.shards[shard_of(key)]);
        let answer = match shard.map.get(key) {
            None => None,
            Some(e) if still_holds(e, held, policy, now) => Some(if demands.is_empty() {
                Ok(e.response.clone())
            } else {
                match check_demands(&e.grants.demanded, demands, now) {
                    Ok(()) => Ok(e.response.clone()),
                    Err(refusal) => Err(Refusal {
                        kid: Some(e.response.kid.clone()),
                        ..refusal
                    }),
                }
            }),
            Some(_) => {
                shard.map.remove(key);
                self.removed(1);
                None
            }
        };
        drop(shard);
        match &answer {
            Some(_) => self.metrics.hits.inc(),
            None => self.metrics.misses.inc(),
        };
        answer
    }

    /// Remembers a valid answer (refusals are ignored) with the token's `grants`: the node's
    /// verdict, before any caller's demands.
    pub(crate) fn insert(
        &self,
        key: Option<CacheKey>,
        held: &Held,
        policy: &Policy,
        response: &VerifyResponse,
        grants: Option<Grants>,
    ) {
        let (Some(key), true, Some(grants)) = (key, response.valid, grants) else {
            return;
        };
        let Some(verifying_key) = held.keys.key(&response.kid) else {
            return;
        };
        let per_shard = self.capacity().div_ceil(SHARDS);
        if per_shard == 0 {
            return;
        }
        let entry = Entry {
            response: response.clone(),
            key: verifying_key.to_bytes(),
            issuer: policy.issuer.clone(),
            until: response.expires_at.saturating_add(policy.leeway),
            grants,
        };
        let mut shard = lock(&self.shards[shard_of(&key)]);
        if shard.map.insert(key, entry).is_none() {
            shard.order.push_back(key);
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        let evicted = shard.evict_to(per_shard);
        drop(shard);
        self.removed(evicted);
        self.metrics.entries.set(self.len() as i64);
    }

    /// On the first call after a key-set swap, drops every entry the new set no longer backs.
    fn purge_if_swapped(&self, held: &std::sync::Arc<Held>, now: UnixSeconds) {
        let id = std::sync::Arc::as_ptr(held) as usize;
        let seen = self.seen.load(Ordering::Acquire);
        if seen == id
            || self
                .seen
                .compare_exchange(seen, id, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let Some(policy) = held.policy.as_ref() else {
            return;
        };
        for shard in self.shards.iter() {
            let mut s = lock(shard);
            let before = s.map.len();
            s.map.retain(|_, e| still_holds(e, held, policy, now));
            let removed = before - s.map.len();
            self.removed(removed);
        }
    }

    fn removed(&self, n: usize) {
        if n > 0 {
            self.len.fetch_sub(n, Ordering::Relaxed);
            self.metrics.entries.set(self.len() as i64);
        }
    }
}

fn still_holds(e: &Entry, held: &Held, policy: &Policy, now: UnixSeconds) -> bool {
    let kid = e.response.kid.as_str();
    now < e.until
        && e.issuer == policy.issuer
        && !held.keys.is_key_revoked(kid)
        && held.keys.key(kid).is_some_and(|k| k.to_bytes() == e.key)
        && (e.response.jti.is_empty() || !held.keys.is_token_revoked(&e.response.jti, now))
        && e.grants
            .sid
            .as_ref()
            .is_none_or(|sid| !held.keys.is_session_revoked(sid, now))
}

fn shard_of(key: &CacheKey) -> usize {
    usize::from(key[0]) % SHARDS
}

fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}
