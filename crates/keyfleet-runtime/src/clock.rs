//! The one place that reads the wall clock. Everything else asks a [`Clock`], so tests can run
//! a real server on a manual clock and step it through rotations and expiries.
#![allow(clippy::disallowed_methods)]

use keyfleet_core::UnixSeconds;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix seconds: the system clock, or a manual one in tests.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands at `start` until moved with [`Clock::advance`] or [`Clock::set`].
    pub fn manual(start: UnixSeconds) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(start))),
        }
    }

    pub fn now(&self) -> UnixSeconds {
        match &self.manual {
            Some(t) => t.load(Ordering::SeqCst),
            None => system_now(),
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, secs: i64) {
        if let Some(t) = &self.manual {
            t.fetch_add(secs, Ordering::SeqCst);
        }
    }

    /// Sets a manual clock; a no-op on the system clock.
    pub fn set(&self, now: UnixSeconds) {
        if let Some(t) = &self.manual {
            t.store(now, Ordering::SeqCst);
        }
    }
}

/// Unix seconds now, from the system clock.
pub fn system_now() -> UnixSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
