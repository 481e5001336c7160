//! The key-set feed: what a JWKS version names ([`FeedState`]), its [`digest`](FeedState::digest),
//! the [delta](FeedState::diff) between two versions, and the [`Feed`] an authority or a relay
//! publishes into and every watch stream reads from.
//!
//! The feed encodes each change once: a full snapshot and a delta per version, kept in a
//! bounded change log, shared as bytes by every stream ([`Subscription::next`]). A node that
//! names a version the log still reaches gets only what changed since; one too far behind, or
//! whose digest differs, gets a full snapshot.

mod feed;
mod state;
pub mod watch;

pub use feed::{Feed, Limits, Message, Published, Subscription};
pub use state::{Digest, FeedState};
