//! Test harness (feature `test-util`): a [`ManualClock`] and a scriptable fake authorization
//! server, [`FakeAuthServer`].
//!
//! Share one `Arc<ManualClock>` between the code under test and the fake server: advancing it
//! moves both, so a test can let 180 days pass without waiting for any of them.
mod clock;
mod fake_server;

pub use clock::ManualClock;
pub use fake_server::{
    FakeAuthServer, FakeConfig, GrantId, GrantState, IssuedGrant, Preset, RateLimit,
    RecordedRefresh, RefreshLifetime, RefreshOutcome, RetryAfter, RevocationReason, Rotation,
};
