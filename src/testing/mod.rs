//! Test harness (feature `test-util`): a [`ManualClock`] and a scriptable fake authorization
//! server, [`FakeAuthServer`].
//!
//! Share one `Arc<ManualClock>` between the code under test and the fake server: advancing it
//! moves both, so a test can let 180 days pass without waiting for any of them.
//!
//! Testing an app's token handling, offline and deterministic:
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use tokenkeeper::testing::{FakeAuthServer, FakeConfig, ManualClock};
//! use tokenkeeper::{ClientSecret, OAuth2Provider, TokenKey, TokenManager};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let clock = Arc::new(ManualClock::fixed());
//! let server = FakeAuthServer::start(FakeConfig::constant_contact(), clock.clone()).await;
//! let provider = OAuth2Provider::builder(server.client_id(), server.token_url())
//!     .client_secret(ClientSecret::new(server.client_secret()))
//!     .build()?;
//! let manager = TokenManager::builder(provider).clock(clock.clone()).build();
//! let key = TokenKey::from("customer-42");
//! manager.insert(key.clone(), server.token_set(&server.issue_grant())).await?;
//!
//! clock.advance(Duration::from_secs(25 * 3600)); // a day passes, instantly
//! let token = manager.access_token(&key).await?; // refreshed, once
//! assert_eq!(server.refresh_calls(), 1);
//! assert!(server.is_access_token_valid(token.secret()));
//! # Ok(()) }
//! ```
mod clock;
mod fake_server;
mod store_contract;

pub use clock::ManualClock;
pub use fake_server::{
    ClientCredentialsRequest, FakeSocialServer, GraphFailure, GraphRateLimit, LongLivedToken,
    SocialConfig, UsageHeader, UserId,
};
pub use fake_server::{
    FakeAuthServer, FakeConfig, GrantId, GrantState, IssuedGrant, Preset, RateLimit,
    RecordedRefresh, RefreshLifetime, RefreshOutcome, RetryAfter, RevocationReason, Rotation,
};
pub use store_contract::{
    assert_one_winner_per_version, assert_store_contract, assert_store_has_lock,
};
