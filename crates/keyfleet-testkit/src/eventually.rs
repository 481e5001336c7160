//! Bounded polling: a test waits for what a server does in the background by asking again
//! every few milliseconds, never by sleeping a guessed time, and fails naming what it waited for.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long [`eventually`] waits.
pub const WITHIN: Duration = Duration::from_secs(10);

/// The pause between two polls.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it holds, for at most [`WITHIN`]; panics naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(what, WITHIN, check).await;
}

/// Polls `check` until it holds, for at most `limit`; returns how long that took.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    eventually_some(what, limit, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await;
    start.elapsed()
}

/// Polls `poll` until it returns a value, for at most `limit`, and returns that value.
pub async fn eventually_some<T, F, Fut>(what: &str, limit: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The same for a plain thread (a test that runs processes, with no runtime to block).
pub mod blocking {
    use std::time::{Duration, Instant};

    /// The pause between two polls: a process answers slower than a task.
    const POLL: Duration = Duration::from_millis(50);

    /// Polls `poll` until it returns a value, for at most `limit`; panics naming `what`.
    pub fn eventually<T>(what: &str, limit: Duration, poll: impl FnMut() -> Option<T>) -> T {
        within(limit, poll)
            .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
    }

    /// Polls `poll` for at most `limit`: its value, or `None` if it never gave one.
    pub fn within<T>(limit: Duration, mut poll: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = poll() {
                return Some(value);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // A plain thread in a sync test: no runtime to block.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(POLL);
        }
    }
}
