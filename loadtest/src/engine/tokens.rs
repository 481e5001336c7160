//! The pool of tokens with known verdicts: legitimate ones minted at the authority before and
//! during the run (outside the timed path), and ones that must be refused — forged here
//! (BAD_SIGNATURE, UNKNOWN_KID), minted for another audience, or minted short-lived and used
//! once surely expired.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use keyfleet_authority::client::AdminClient;
use keyfleet_core::{TokenClaims, sign_token};
use keyfleet_proto::v1::{IssueTokenRequest, IssueTokenResponse, Reason};
use rand::Rng as _;

use super::state::{Shared, write};

/// What a token must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    Valid,
    Refused(Reason),
}

#[derive(Debug)]
pub(super) struct PoolToken {
    /// Identifies the token in the spread counts.
    pub(super) id: u32,
    pub(super) token: String,
    pub(super) expect: Expect,
}

#[derive(Default)]
pub(super) struct Pool {
    pub(super) valid: Vec<Arc<PoolToken>>,
    pub(super) invalid: Vec<Arc<PoolToken>>,
}

/// Fills the pool before the run: `count` legitimate tokens and, with `with_invalid`, each kind
/// that must be refused. Returns the short-lived tokens, which join the refused ones once
/// surely expired (see [`mint_loop`]).
pub(super) async fn fill(
    shared: &Shared,
    authority: &AdminClient,
    count: usize,
    with_invalid: bool,
) -> anyhow::Result<Vec<IssueTokenResponse>> {
    // Eight mints in flight: quick, without flooding the authority.
    let mut valid = Vec::with_capacity(count);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..count.max(1) {
        let request = minted(format!("load-{i}"), &shared.audience, 0);
        let authority = authority.clone();
        batch.spawn(async move { mint(&authority, request).await });
        if batch.len() >= 8 {
            valid.push(batch.join_next().await.expect("a task")??);
        }
    }
    while let Some(r) = batch.join_next().await {
        valid.push(r??);
    }
    shared.set_current_kid(&valid[0].kid);
    let valid = valid
        .into_iter()
        .map(|t| {
            Arc::new(PoolToken {
                id: shared.next_id(),
                token: t.token,
                expect: Expect::Valid,
            })
        })
        .collect();
    write(&shared.pool).valid = valid;

    let mut expiring = Vec::new();
    if with_invalid {
        let mut invalid = crafted(shared, &shared.current_kid(), 8);
        for i in 0..8 {
            let t = mint(
                authority,
                minted(format!("other-{i}"), "not-the-audience", 0),
            )
            .await?;
            invalid.push(Arc::new(PoolToken {
                id: shared.next_id(),
                token: t.token,
                expect: Expect::Refused(Reason::WrongAudience),
            }));
            let short = minted(format!("short-{i}"), &shared.audience, 1);
            expiring.push(mint(authority, short).await?);
        }
        write(&shared.pool).invalid = invalid;
    }
    Ok(expiring)
}

/// `n` legitimate tokens no node has seen yet, for the cost phase of unique tokens (after the
/// load, so the minting costs the run nothing); fewer if the authority stops answering.
pub(super) async fn mint_unique(authority: &AdminClient, audience: &str, n: usize) -> Vec<String> {
    let mut tokens = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..n {
        let request = minted(format!("unique-{i}"), audience, 0);
        let authority = authority.clone();
        batch.spawn(async move { mint(&authority, request).await });
        if batch.len() >= UNIQUE_MINTS_IN_FLIGHT {
            match batch.join_next().await {
                Some(Ok(Ok(t))) => tokens.push(t.token),
                _ => break,
            }
        }
    }
    while let Some(r) = batch.join_next().await {
        if let Ok(Ok(t)) = r {
            tokens.push(t.token);
        }
    }
    tokens
}

/// Mints in flight while filling the unique-token phase (many tokens, the load is over).
const UNIQUE_MINTS_IN_FLIGHT: usize = 32;

/// A token for `subject` and `audience`, living `ttl_seconds` (0: the authority's default).
fn minted(subject: String, audience: &str, ttl_seconds: i64) -> IssueTokenRequest {
    IssueTokenRequest {
        subject,
        audience: vec![audience.to_owned()],
        ttl_seconds,
        ..IssueTokenRequest::default()
    }
}

async fn mint(
    authority: &AdminClient,
    request: IssueTokenRequest,
) -> anyhow::Result<IssueTokenResponse> {
    authority
        .issue(request)
        .await
        .context("minting a token at the authority (IssueToken)")
}

/// Tokens that must be refused, made here: a signature by a key the authority never had under
/// its real kid (BAD_SIGNATURE), and a made-up kid (UNKNOWN_KID).
fn crafted(shared: &Shared, kid: &str, n: usize) -> Vec<Arc<PoolToken>> {
    let mut rng = rand::rng();
    let key = SigningKey::from_bytes(&rng.random());
    let mut out = Vec::new();
    for i in 0..n {
        let claims = TokenClaims {
            iss: "keyfleet-loadtest-forger".into(),
            sub: format!("forged-{i}"),
            aud: vec![shared.audience.clone()],
            iat: 0,
            nbf: 0,
            exp: 253_402_300_000,
            jti: format!("forged-{i}"),
            extra: Default::default(),
        };
        let (kid, expect) = if i % 2 == 0 {
            (kid.to_owned(), Reason::BadSignature)
        } else {
            (format!("loadtest-unknown-{i}"), Reason::UnknownKid)
        };
        out.push(Arc::new(PoolToken {
            id: shared.next_id(),
            token: sign_token(&key, &kid, &claims),
            expect: Expect::Refused(expect),
        }));
    }
    out
}

/// Mints fresh tokens during the run (outside the timed path) and swaps them into the pool;
/// moves short-lived tokens into the refused pool once surely expired.
pub(super) async fn mint_loop(
    shared: Arc<Shared>,
    authority: AdminClient,
    mut expiring: Vec<IssueTokenResponse>,
    leeway: Duration,
    with_invalid: bool,
) {
    let mut n = 0u64;
    while !shared.stopped() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n += 1;
        let Ok(t) = mint(
            &authority,
            minted(format!("fresh-{n}"), &shared.audience, 0),
        )
        .await
        else {
            continue;
        };
        shared.set_current_kid(&t.kid);
        let fresh = Arc::new(PoolToken {
            id: shared.next_id(),
            token: t.token,
            expect: Expect::Valid,
        });
        let now = keyfleet_runtime::Clock::system().now();
        let due: Vec<_> = expiring
            .extract_if(.., |t| now > t.expires_at + leeway.as_secs() as i64 + 1)
            .collect();
        let forged = if with_invalid && n.is_multiple_of(8) {
            // Keep the forged tokens on a kid the fleet still publishes.
            crafted(&shared, &t.kid, 8)
        } else {
            Vec::new()
        };
        let due: Vec<_> = due
            .into_iter()
            .map(|t| {
                Arc::new(PoolToken {
                    id: shared.next_id(),
                    token: t.token,
                    expect: Expect::Refused(Reason::Expired),
                })
            })
            .collect();
        let mut pool = write(&shared.pool);
        let slot = rand::rng().random_range(0..pool.valid.len().max(1));
        if slot < pool.valid.len() {
            pool.valid[slot] = fresh;
        } else {
            pool.valid.push(fresh);
        }
        pool.invalid.extend(due);
        if !forged.is_empty() {
            pool.invalid.retain(|t| {
                !matches!(
                    t.expect,
                    Expect::Refused(Reason::BadSignature | Reason::UnknownKid)
                )
            });
            pool.invalid.extend(forged);
        }
    }
}
