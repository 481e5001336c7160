//! The combiner's hand-offs, driven one poll at a time: a dropped leader or a request dropped
//! with the lead in hand passes it on; queued requests are checked together, by key set and
//! `now`; a lone request never waits (by counting).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use ed25519_dalek::SigningKey;
use keyfleet_core::{Jwk, KeySet, Policy, TokenClaims, sign_token};
use prometheus_client::registry::Registry;

use super::*;
use crate::config::MAX_VERIFY_BATCH_WINDOW;

const ISSUER: &str = "https://issuer.test";
const NOW: UnixSeconds = 2_000;

fn combiner(max: usize, window: Duration) -> Combiner {
    Combiner::new(
        max,
        window,
        1,
        BatchMetrics::register(&mut Registry::default()),
    )
}

fn held() -> Arc<Held> {
    let key = SigningKey::from_bytes(&[7; 32]);
    let jwks = [Jwk::ed25519("k", &key.verifying_key().to_bytes())];
    let (keys, _) = KeySet::build(1, None, &jwks, Vec::new(), Vec::new());
    Arc::new(Held::new(keys, Some(Policy::new(ISSUER))))
}

/// `n` tokens for the key of [`held`]: valid ones, and every fourth with a forged signature.
fn tokens(n: usize) -> Vec<String> {
    let key = SigningKey::from_bytes(&[7; 32]);
    let forger = SigningKey::from_bytes(&[8; 32]);
    (0..n)
        .map(|i| {
            let claims = TokenClaims {
                iss: ISSUER.into(),
                sub: format!("user-{i}"),
                aud: vec!["api".into()],
                iat: 1_000,
                nbf: 1_000,
                exp: 3_000,
                jti: format!("jti-{i}"),
                extra: Default::default(),
            };
            sign_token(if i % 4 == 3 { &forger } else { &key }, "k", &claims)
        })
        .collect()
}

fn plain(token: &str, held: &Held, now: UnixSeconds) -> Verdict {
    validate(token, &held.keys, now, held.policy.as_ref().unwrap(), None)
}

fn poll<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

fn ready<F: Future>(future: Pin<&mut F>) -> F::Output {
    match poll(future) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("still pending"),
    }
}

fn leading(combiner: &Combiner) -> bool {
    combiner.lock().leaders > 0
}

#[tokio::test]
async fn a_lone_request_never_waits() {
    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    let held = held();
    let tokens = tokens(20);
    for token in &tokens {
        let approach = combiner.approach();
        let verdict = combiner.validate(approach, token, None, &held, NOW).await;
        assert_eq!(verdict, plain(token, &held, NOW));
        assert!(!leading(&combiner));
    }
    let counts = combiner.counts();
    assert_eq!(
        counts,
        BatchCounts {
            batches: 20,
            requests: 20,
            waits: 0,
            fallbacks: 0
        }
    );
}

#[tokio::test]
async fn queued_requests_are_checked_together_by_key_set_and_time() {
    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    let (held, other_held) = (held(), held());
    let tokens = tokens(8);
    // Someone on the way: the leader waits for company instead of checking at once.
    let company = combiner.approach();
    let mut leader = Box::pin(combiner.validate(combiner.approach(), &tokens[0], None, &held, NOW));
    assert!(poll(leader.as_mut()).is_pending());
    assert!(leading(&combiner));
    // Same key set and time as the leader, another time, another (equal) key set.
    let at = |i: usize| match i {
        1..=4 => (&held, NOW),
        5 | 6 => (&held, NOW + 1),
        _ => (&other_held, NOW),
    };
    let mut waiters: Vec<_> = (1..8)
        .map(|i| {
            let (held, now) = at(i);
            Box::pin(combiner.validate(combiner.approach(), &tokens[i], None, held, now))
        })
        .collect();
    for waiter in &mut waiters {
        assert!(poll(waiter.as_mut()).is_pending());
    }
    assert_eq!(combiner.queued.load(Ordering::Acquire), 7);
    drop(company);
    assert_eq!(ready(leader.as_mut()), plain(&tokens[0], &held, NOW));
    for (i, waiter) in (1..8).zip(&mut waiters) {
        let (held, now) = at(i);
        assert_eq!(ready(waiter.as_mut()), plain(&tokens[i], held, now), "{i}");
    }
    assert!(!leading(&combiner));
    // Three groups: the leader's (5 tokens, one forged: the batch fell back), two more.
    assert_eq!(
        combiner.counts(),
        BatchCounts {
            batches: 3,
            requests: 8,
            waits: 1,
            fallbacks: 1
        }
    );
}

#[tokio::test]
async fn a_dropped_leader_hands_the_lead_on() {
    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    let held = held();
    let tokens = tokens(2);
    let company = combiner.approach();
    let mut leader = Box::pin(combiner.validate(combiner.approach(), &tokens[0], None, &held, NOW));
    assert!(poll(leader.as_mut()).is_pending());
    let mut waiter = Box::pin(combiner.validate(combiner.approach(), &tokens[1], None, &held, NOW));
    assert!(poll(waiter.as_mut()).is_pending());
    // The leader's caller goes away while it waits for company.
    drop(leader);
    assert!(leading(&combiner), "the waiting request holds the lead now");
    drop(company);
    assert_eq!(ready(waiter.as_mut()), plain(&tokens[1], &held, NOW));
    assert!(!leading(&combiner));
    assert_eq!(combiner.counts().requests, 1);
    // And the next request leads at once.
    let mut next = Box::pin(combiner.validate(combiner.approach(), &tokens[0], None, &held, NOW));
    assert_eq!(ready(next.as_mut()), plain(&tokens[0], &held, NOW));
}

#[tokio::test]
async fn a_request_dropped_with_the_lead_in_hand_passes_it_on() {
    // Batches of two: the leader takes one queued request, the next is handed the lead.
    let combiner = combiner(2, MAX_VERIFY_BATCH_WINDOW);
    let held = held();
    let tokens = tokens(4);
    let company = combiner.approach();
    let mut futures: Vec<_> = tokens
        .iter()
        .map(|t| Box::pin(combiner.validate(combiner.approach(), t, None, &held, NOW)))
        .collect();
    let mut third = futures.pop().unwrap();
    let mut second = futures.pop().unwrap();
    let mut first = futures.pop().unwrap();
    let mut leader = futures.pop().unwrap();
    assert!(poll(leader.as_mut()).is_pending());
    assert!(poll(first.as_mut()).is_pending());
    assert!(poll(second.as_mut()).is_pending());
    // The batch is full: the leader checks itself and `first`, and hands `second` the lead.
    assert_eq!(ready(leader.as_mut()), plain(&tokens[0], &held, NOW));
    assert!(poll(third.as_mut()).is_pending(), "queued behind `second`");
    // `second` goes away with the lead in hand, before it could act: `third` gets it.
    drop(second);
    assert!(leading(&combiner));
    assert_eq!(ready(first.as_mut()), plain(&tokens[1], &held, NOW));
    drop(company);
    assert_eq!(ready(third.as_mut()), plain(&tokens[3], &held, NOW));
    assert!(!leading(&combiner));
    assert_eq!(combiner.counts().batches, 2);
}

#[tokio::test]
async fn a_request_whose_caller_went_away_costs_only_its_check() {
    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    let held = held();
    let tokens = tokens(2);
    let company = combiner.approach();
    let mut leader = Box::pin(combiner.validate(combiner.approach(), &tokens[0], None, &held, NOW));
    assert!(poll(leader.as_mut()).is_pending());
    let mut gone = Box::pin(combiner.validate(combiner.approach(), &tokens[1], None, &held, NOW));
    assert!(poll(gone.as_mut()).is_pending());
    drop(gone);
    drop(company);
    assert_eq!(ready(leader.as_mut()), plain(&tokens[0], &held, NOW));
    assert!(!leading(&combiner));
    assert_eq!(combiner.counts().requests, 2);
}

#[tokio::test]
async fn max_one_and_a_zero_window_never_queue_nor_wait() {
    let held = held();
    let tokens = tokens(2);
    // Batching off: every request is checked alone, even with a leader in place.
    let off = combiner(1, MAX_VERIFY_BATCH_WINDOW);
    let company = off.approach();
    for token in &tokens {
        let mut request = Box::pin(off.validate(off.approach(), token, None, &held, NOW));
        assert_eq!(ready(request.as_mut()), plain(token, &held, NOW));
    }
    drop(company);
    assert!(!leading(&off));
    // A zero window: a leader with company on its way checks at once.
    let eager = combiner(64, Duration::ZERO);
    let company = eager.approach();
    let mut request = Box::pin(eager.validate(eager.approach(), &tokens[0], None, &held, NOW));
    assert_eq!(ready(request.as_mut()), plain(&tokens[0], &held, NOW));
    drop(company);
    assert_eq!(eager.counts().waits, 0);
}

#[tokio::test]
async fn with_two_seats_two_requests_lead_and_a_third_queues() {
    let combiner = Combiner::new(
        64,
        MAX_VERIFY_BATCH_WINDOW,
        2,
        BatchMetrics::register(&mut Registry::default()),
    );
    let held = held();
    let tokens = tokens(3);
    let company = combiner.approach();
    let mut first = Box::pin(combiner.validate(combiner.approach(), &tokens[0], None, &held, NOW));
    let mut second = Box::pin(combiner.validate(combiner.approach(), &tokens[1], None, &held, NOW));
    let mut third = Box::pin(combiner.validate(combiner.approach(), &tokens[2], None, &held, NOW));
    for request in [&mut first, &mut second, &mut third] {
        assert!(poll(request.as_mut()).is_pending());
    }
    assert_eq!(combiner.lock().leaders, 2);
    assert_eq!(combiner.queued.load(Ordering::Acquire), 1);
    drop(company);
    // The first leader takes the queued request; the second checks its own alone.
    assert_eq!(ready(first.as_mut()), plain(&tokens[0], &held, NOW));
    assert_eq!(ready(second.as_mut()), plain(&tokens[1], &held, NOW));
    assert_eq!(ready(third.as_mut()), plain(&tokens[2], &held, NOW));
    assert_eq!(combiner.lock().leaders, 0);
    let counts = combiner.counts();
    assert_eq!((counts.batches, counts.requests), (2, 3));
}

#[test]
fn small_machines_have_one_seat() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let seats = leader_seats();
    assert!((1..=cores.max(1)).contains(&seats));
    if cores <= 3 {
        assert_eq!(seats, 1);
    }
}

/// Checks `tokens` as one batch (the first leads, the rest queue behind it) and returns the
/// verdicts, in order.
fn one_batch(combiner: &Combiner, held: &Arc<Held>, tokens: &[String]) -> Vec<Verdict> {
    let company = combiner.approach();
    let mut futures: Vec<_> = tokens
        .iter()
        .map(|t| Box::pin(combiner.validate(combiner.approach(), t, None, held, NOW)))
        .collect();
    for f in &mut futures {
        assert!(poll(f.as_mut()).is_pending());
    }
    drop(company);
    futures.iter_mut().map(|f| ready(f.as_mut())).collect()
}

#[tokio::test]
async fn after_a_failed_batch_equation_batches_are_checked_one_by_one_for_a_while() {
    let held = held();
    // Tokens 3 and 7 are forged.
    let tokens = tokens(8);
    let expected: Vec<Verdict> = tokens.iter().map(|t| plain(t, &held, NOW)).collect();

    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    combiner.set_distrust_for(Duration::from_secs(3600));
    assert_eq!(one_batch(&combiner, &held, &tokens[..4]), expected[..4]);
    assert_eq!((combiner.counts().fallbacks, combiner.distrusted()), (1, 0));
    // The next batch with a forgery: no second batch equation wasted, same verdicts.
    assert_eq!(one_batch(&combiner, &held, &tokens[4..]), expected[4..]);
    assert_eq!((combiner.counts().fallbacks, combiner.distrusted()), (1, 1));

    // Without the distrust period every forged batch pays the equation and the fallback.
    let combiner = combiner_with_no_distrust();
    assert_eq!(one_batch(&combiner, &held, &tokens[..4]), expected[..4]);
    assert_eq!(one_batch(&combiner, &held, &tokens[4..]), expected[4..]);
    assert_eq!((combiner.counts().fallbacks, combiner.distrusted()), (2, 0));
}

fn combiner_with_no_distrust() -> Combiner {
    let combiner = combiner(64, MAX_VERIFY_BATCH_WINDOW);
    combiner.set_distrust_for(Duration::ZERO);
    combiner
}
